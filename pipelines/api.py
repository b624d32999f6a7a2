"""The data teams' API: every result set under a home as one polars LazyFrame, reviews to come."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pipelines.results import scan_results


def results(home: str | Path | None = None) -> Any:
    """`polars.LazyFrame` over all result sets (columns of the contract + hive `watchlist_id`, `run_id`).

    >>> import polars as pl
    >>> from pipelines.api import results
    >>> results("/data/gallerymatch").filter(pl.col("above_threshold")).group_by("case_id").len().collect()
    """
    from pipelines.settings import Settings

    root = Path(home) / "results" if home is not None else Settings().results_dir
    return scan_results(root)

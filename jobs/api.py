"""The data teams' API: every result set under a home as one polars LazyFrame, review decisions joined in."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pipelines.results import scan_results


def results(home: str | Path | None = None) -> Any:
    """`polars.LazyFrame` over all result sets (columns of the contract + hive `watchlist_id`, `run_id`).

    `review_status` is the status under the two-person rule, from the reviews table (the files are
    immutable; they say `unreviewed`).

    >>> import polars as pl
    >>> from jobs.api import results
    >>> results("/data/gallerymatch").filter(pl.col("above_threshold")).group_by("case_id").len().collect()
    """
    import polars as pl

    from lance_tables.reviews import effective_statuses
    from lance_tables.store import Gallery
    from pipelines.settings import Settings

    settings = Settings(home=str(home)) if home is not None else Settings()
    frame = scan_results(settings.storage)
    statuses = effective_statuses(Gallery(settings.storage)) if settings.store.folders("lance") else {}
    if not statuses:
        return frame
    reviews = pl.DataFrame(
        [(run, probe, rank, status) for (run, probe, rank), status in statuses.items()],
        schema={"run_id": pl.String, "probe_id": pl.String, "rank": pl.Int32, "reviewed": pl.String},
        orient="row",
    )
    joined = frame.join(reviews.lazy(), on=["run_id", "probe_id", "rank"], how="left")
    return joined.with_columns(pl.coalesce("reviewed", "review_status").alias("review_status")).drop("reviewed")

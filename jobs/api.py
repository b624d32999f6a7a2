"""The data teams' API: every result set under a home as one polars LazyFrame, review decisions joined in."""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any

from pipelines.results import scan_results


def _settings(home: str | Path | None) -> Any:
    from pipelines.settings import Settings

    return Settings(home=str(home)) if home is not None else Settings()


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

    settings = _settings(home)
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


def latest_runs(home: str | Path | None = None) -> Any:
    """`polars.LazyFrame` of the candidates of each watchlist's latest run only (what the nightly last wrote).

    >>> latest_runs("/data/gallerymatch").filter(pl.col("new_since_parent")).collect()
    """
    import polars as pl

    from pipelines.results import latest_runs as newest

    newest_ids = [str(m["run_id"]) for m in newest(_settings(home).store).values()]
    return results(home).filter(pl.col("run_id").is_in(newest_ids))


def new_since(run_id: str, home: str | Path | None = None) -> Any:
    """`polars.LazyFrame` of the candidates of the watchlist's later runs that were not listed by `run_id` or
    before it: each (probe, gallery row) pair once, in the run that first listed it."""
    import polars as pl

    from pipelines.results import require_run

    manifest = require_run(_settings(home).store, run_id)
    frame = results(home).filter(pl.col("watchlist_id") == manifest["watchlist_id"])
    later = frame.filter(pl.col("matched_at") > pl.lit(dt.datetime.fromisoformat(manifest["matched_at"])))
    seen = frame.filter(pl.col("matched_at") <= pl.lit(dt.datetime.fromisoformat(manifest["matched_at"])))
    fresh = later.join(seen.select("probe_id", "gallery_id").unique(), on=["probe_id", "gallery_id"], how="anti")
    return fresh.sort("matched_at").unique(subset=["probe_id", "gallery_id"], keep="first", maintain_order=True)

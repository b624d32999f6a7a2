"""Human review of candidates: one decision per reviewer, two different reviewers to confirm."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pyarrow.compute as pc

from lance_tables.reviews import add_review, effective_statuses
from lance_tables.store import Gallery
from pipelines.audit import AuditLog
from pipelines.errors import Refused
from pipelines.results import read_run, require_run
from pipelines.settings import Settings
from pipelines.shards import check_id


def review_candidate(
    settings: Settings, run_id: str, probe_id: str, rank: int, status: str, reviewer: str
) -> dict[str, Any]:
    check_id("reviewer id", reviewer)
    manifest = require_run(settings.results_dir, run_id)
    table = read_run(Path(manifest["path"]))
    hit = table.filter(pc.and_(pc.equal(table["probe_id"], probe_id), pc.equal(table["rank"], rank)))
    if hit.num_rows == 0:
        raise Refused(f"result set {run_id} has no candidate of rank {rank} for probe {probe_id!r}")
    gallery = Gallery(settings.lance_dir)
    row = add_review(gallery, hit.to_pylist()[0], status, reviewer)
    effective = effective_statuses(gallery)[(run_id, probe_id, rank)]
    AuditLog(settings.audit_dir).append(
        reviewer,
        "review",
        case_id=manifest["case_id"],
        purpose=manifest.get("purpose"),
        run_id=run_id,
        watchlist_id=manifest["watchlist_id"],
        probe_id=probe_id,
        rank=rank,
        status=status,
        review_status=effective,
        table_versions={"reviews": gallery.version("reviews")},
    )
    return row | {"review_status": effective}


def with_reviews(settings: Settings, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Result rows with `review_status` taken from the reviews table (the files stay as written)."""
    statuses = effective_statuses(Gallery(settings.lance_dir))
    return [
        r | {"review_status": statuses.get((r["run_id"], r["probe_id"], r["rank"]), r["review_status"])} for r in rows
    ]

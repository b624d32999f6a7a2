"""Human review of candidates: one decision per reviewer, two different reviewers to confirm."""

from __future__ import annotations

from typing import Any

import pyarrow.compute as pc

from jobs.session import writer_session
from lance_tables.erasure import erased_ids
from lance_tables.reviews import add_review, effective_statuses, normalise_reviewer
from lance_tables.store import Gallery
from pipelines.errors import Refused
from pipelines.results import read_run, require_run
from pipelines.settings import Settings
from pipelines.shards import check_id


def review_candidate(
    settings: Settings, run_id: str, probe_id: str, rank: int, status: str, reviewer: str
) -> dict[str, Any]:
    """Under the writer lease, so a review never lands on a candidate an erasure is removing."""
    reviewer = normalise_reviewer(check_id("reviewer id", reviewer))
    with writer_session(settings, "review") as log:
        manifest = require_run(settings.store, run_id)
        table = read_run(settings.store, manifest)
        hit = table.filter(pc.and_(pc.equal(table["probe_id"], probe_id), pc.equal(table["rank"], rank)))
        if hit.num_rows == 0:
            raise Refused(f"result set {run_id} has no candidate of rank {rank} for probe {probe_id!r}")
        candidate = hit.to_pylist()[0]
        gallery = Gallery(settings.storage)
        if candidate["image_id"] and candidate["image_id"] in erased_ids(gallery):
            raise Refused(f"candidate {candidate['gallery_id']} was erased; it cannot be reviewed")
        fields = {
            "case_id": manifest["case_id"],
            "purpose": manifest.get("purpose"),
            "watchlist_id": manifest["watchlist_id"],
        }
        fields |= {"run_id": run_id, "probe_id": probe_id, "rank": rank, "decision": status}
        with log.action(reviewer, "review", **fields) as op:
            row = add_review(gallery, candidate, status, reviewer)
            effective = effective_statuses(gallery)[(run_id, probe_id, rank)]
            op.record(review_status=effective, table_versions={"reviews": gallery.version("reviews")})
    return row | {"review_status": effective}


def with_reviews(settings: Settings, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Result rows with `review_status` taken from the reviews table (the files stay as written)."""
    statuses = effective_statuses(Gallery(settings.storage))
    return [
        r | {"review_status": statuses.get((r["run_id"], r["probe_id"], r["rank"]), r["review_status"])} for r in rows
    ]

"""Reading result sets: the list of runs, and one run's best candidates (an audited look at people's images)."""

from __future__ import annotations

from typing import Any

from jobs.review import with_reviews
from pipelines.audit import AuditLog
from pipelines.results import list_runs, read_run, require_run
from pipelines.settings import Settings
from pipelines.shards import check_id


def list_result_sets(settings: Settings) -> list[dict[str, Any]]:
    """The manifests of every complete result set, newest first (ids and counts; no candidate is named)."""
    return list_runs(settings.store)


def show_result_set(
    settings: Settings, run_id: str, limit: int, requested_by: str | None = None, new_only: bool = False
) -> dict[str, Any]:
    """A run's manifest and the candidates of rank <= `limit` of each probe, review status joined in;
    `new_only`: only those new since the run's parent run (`new_since_parent`).

    Showing candidates names gallery images to a person, so it is audited like an export: who looked at
    which run, for which case, and how many candidates were shown (`results.show`, intent then outcome)."""
    actor = check_id("requester id", requested_by) if requested_by is not None else settings.actor
    manifest = require_run(settings.store, run_id)
    fields = {
        "case_id": manifest["case_id"],
        "purpose": manifest.get("purpose"),
        "watchlist_id": manifest["watchlist_id"],
    }
    with AuditLog.of(settings).action(
        actor, "results.show", run_id=run_id, limit=limit, new_only=new_only, **fields
    ) as op:
        table = read_run(settings.store, manifest)
        shown = [r for r in table.to_pylist() if r["rank"] <= limit and (r["new_since_parent"] or not new_only)]
        rows = with_reviews(settings, shown)
        op.record(counts={"candidates_shown": len(rows)})
    return manifest | {"candidates_shown": rows}

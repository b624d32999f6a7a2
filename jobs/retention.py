"""Retention: expire watchlists (their probe vectors go), delete result sets past the retention period."""

from __future__ import annotations

import datetime as dt
import shutil
from pathlib import Path
from typing import Any

from lance_tables.erasure import purge
from lance_tables.schemas import WATCHLISTS, to_arrow
from lance_tables.store import Gallery, sql_list
from lance_tables.watchlists import list_watchlists
from pipelines.audit import AuditLog
from pipelines.locks import holds_writer_lock
from pipelines.results import list_runs, manifest_path
from pipelines.settings import Settings


@holds_writer_lock
def run_retention(settings: Settings, now: dt.datetime | None = None) -> dict[str, Any]:
    """Idempotent; `now` exists so the schedule can be tested with a fake clock."""
    now = now or dt.datetime.now(dt.UTC)
    gallery = Gallery(settings.lance_dir)
    expired = _expire_watchlists(gallery, now)
    cutoff = now - dt.timedelta(days=settings.results_retention_days)
    deleted = [
        _delete_run(settings.results_dir, settings.staging_dir, m)
        for m in list_runs(settings.results_dir)
        if dt.datetime.fromisoformat(m["matched_at"]) < cutoff
    ]
    summary = {
        "now": now.isoformat(),
        "results_retention_days": settings.results_retention_days,
        "watchlists_expired": expired,
        "result_sets_deleted": deleted,
    }
    AuditLog(settings.audit_dir).append(
        settings.actor,
        "retention",
        counts={"watchlists_expired": len(expired), "result_sets_deleted": len(deleted)},
        watchlist_ids=expired,
        run_ids=deleted,
        table_versions={"probes": gallery.version("probes")},
    )
    return summary


def _expire_watchlists(gallery: Gallery, now: dt.datetime) -> list[str]:
    due = [w for w in list_watchlists(gallery) if w["status"] == "open" and w["expires_at"] <= now]
    if not due:
        return []
    ids = [w["watchlist_id"] for w in due]
    table = gallery.open("probes")
    if table is not None:
        table.delete(f"watchlist_id IN {sql_list(ids)}")
        purge(gallery, "probes", delete_unverified=False)  # the probe vectors are physically gone
    rows = [w | {"status": "expired", "closed_at": now, "closed_by": "retention"} for w in due]
    gallery.upsert("watchlists", to_arrow(rows, WATCHLISTS))
    return ids


def _delete_run(results_root: Path, staging_root: Path, manifest: dict[str, Any]) -> str:
    """Move the run out of the results tree in one rename, then delete it and its manifest."""
    staging_root.mkdir(parents=True, exist_ok=True)
    trash = staging_root / f"deleting.{manifest['run_id']}"
    Path(manifest["path"]).rename(trash)
    shutil.rmtree(trash)
    manifest_path(results_root, manifest["watchlist_id"], manifest["run_id"]).unlink(missing_ok=True)
    return str(manifest["run_id"])

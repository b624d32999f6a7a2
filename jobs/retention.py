"""Retention: expire watchlists, erase the probe vectors of expired and closed watchlists, delete old result sets.

Every step is idempotent and derives its work from the state, not from a previous step's success: a crash
anywhere leaves something the next run finishes (probes of a watchlist already marked expired still go).
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from jobs.erase_steps import bucket_versioning, purge_versions
from jobs.session import writer_session
from lance_tables.erasure import delete_keys, purge
from lance_tables.store import Gallery
from lance_tables.watchlists import list_watchlists
from pipelines.faults import crash_point
from pipelines.results import delete_run, list_runs
from pipelines.schemas import WATCHLISTS, to_arrow
from pipelines.settings import Settings
from pipelines.sql import sql_list
from pipelines.storage import LANCE, MANIFESTS, RESULTS


def run_retention(settings: Settings, now: dt.datetime | None = None) -> dict[str, Any]:
    """`now` exists so the schedule can be tested with a fake clock."""
    now = now or dt.datetime.now(dt.UTC)
    with writer_session(settings, "retention") as log, log.action(settings.actor, "retention") as op:
        gallery = Gallery(settings.storage)
        watchlists = list_watchlists(gallery)
        expired = _expire(gallery, watchlists, now)
        crash_point("retention:after-expire")
        probes_erased = _erase_probes(gallery, watchlists, now, settings.closed_probe_grace_days)
        cutoff = now - dt.timedelta(days=settings.results_retention_days)
        old = [m for m in list_runs(settings.store) if dt.datetime.fromisoformat(m["matched_at"]) < cutoff]
        for manifest in old:
            delete_run(settings.store, manifest)
            crash_point("retention:after-run-delete")
        deleted = [str(m["run_id"]) for m in old]
        versions = _object_versions(settings)
        op.record(
            counts={
                "watchlists_expired": len(expired),
                "probe_sets_erased": len(probes_erased),
                "result_sets_deleted": len(deleted),
            },
            watchlist_ids=expired,
            run_ids=deleted,
            table_versions={"probes": gallery.version("probes"), "watchlists": gallery.version("watchlists")},
            object_versions=versions,
        )
    return {
        "now": now.isoformat(),
        "results_retention_days": settings.results_retention_days,
        "closed_probe_grace_days": settings.closed_probe_grace_days,
        "watchlists_expired": expired,
        "probe_vectors_erased_for": probes_erased,
        "result_sets_deleted": deleted,
        "object_versions": versions,
    }


def _object_versions(settings: Settings) -> dict[str, Any]:
    """On a versioned bucket the deleted probe vectors and result sets stay as noncurrent versions: under the
    'purge-versions' policy they go (every run: idempotent, and it finishes what a killed run left); under
    'refuse' they stay, and the summary says so (the bucket's lifecycle rules must expire them)."""
    versioning = bucket_versioning(settings.storage)
    if versioning is None:
        return {"versioning": None}
    policy = settings.erase_versioned_bucket
    areas = (f"{LANCE}/probes.lance", RESULTS, MANIFESTS)
    out: dict[str, Any] = {"versioning": versioning, "policy": policy, "areas": [f"{a}/" for a in areas]}
    if policy == "purge-versions":
        return out | purge_versions(settings.storage, areas)
    return out | {
        "noncurrent_removed": 0,
        "delete_markers_removed": 0,
        "note": "noncurrent versions still hold what retention deleted until the bucket's lifecycle expires them",
    }


def _expire(gallery: Gallery, watchlists: list[dict[str, Any]], now: dt.datetime) -> list[str]:
    due = [w for w in watchlists if w["status"] == "open" and w["expires_at"] <= now]
    if due:
        rows = [w | {"status": "expired", "closed_at": now, "closed_by": "retention"} for w in due]
        gallery.upsert("watchlists", to_arrow(rows, WATCHLISTS))
    return [w["watchlist_id"] for w in due]


def probes_due(watchlist: dict[str, Any], now: dt.datetime, grace_days: int) -> bool:
    """A watchlist's probe vectors go at expiry, or at closing plus the grace period, whichever comes first."""
    if watchlist["expires_at"] <= now or watchlist["status"] == "expired":
        return True
    closed = watchlist["status"] == "closed" and watchlist["closed_at"] is not None
    return closed and watchlist["closed_at"] + dt.timedelta(days=grace_days) <= now


def _erase_probes(gallery: Gallery, watchlists: list[dict[str, Any]], now: dt.datetime, grace_days: int) -> list[str]:
    ids = [w["watchlist_id"] for w in watchlists if probes_due(w, now, grace_days)]
    table = gallery.open("probes")
    if table is None:
        return []
    holding = [i for i in ids if gallery.count("probes", f"watchlist_id IN {sql_list([i])}")]
    delete_keys(gallery, "probes", "watchlist_id", holding)
    crash_point("retention:after-probe-delete")
    if holding or len(table.list_versions()) > 1:  # also finishes a purge a crash interrupted
        purge(gallery, "probes", delete_unverified=False)  # the probe vectors are physically gone
    return holding

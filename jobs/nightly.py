"""The nightly: retention first, then every open, unexpired watchlist re-matched against what its gallery
gained since its last run, merged exactly (`pipelines.delta`), with one engine start-up for the night.

Per gallery table and model, the probes of every watchlist that can be extended are stacked and the rows
written since the earliest of their last runs are read once, in one pass, for all of them; each watchlist then
keeps its own top K, threshold and minors rule. A watchlist that cannot be extended (see
`pipelines.delta.FULL_REASONS`) gets a full run through the engine, and its manifest says why.

Each run commits on its own (result set, then audit outcome), so a night killed half-way and run again
finishes the rest: a watchlist already matched tonight has nothing new and is skipped, and a second nightly
waiting on the writer lease finds everything up to date.
"""

from __future__ import annotations

import datetime as dt
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from jobs.match import (
    RunPlan,
    full_plan,
    gallery_filter,
    gallery_table,
    match_watchlist,
    metadata,
    named_candidates,
    parent_candidates,
    pin_table,
)
from jobs.retention import run_retention
from jobs.session import writer_session
from lance_tables.delta import (
    PinnedTable,
    count_rows,
    delta_blocks,
    stamps_of,
    written_before,
    written_since,
    written_unstamped,
)
from lance_tables.store import Gallery
from lance_tables.watchlists import list_watchlists, read_probes_of
from pipelines.audit import AuditLog
from pipelines.delta import (
    Candidate,
    DeltaBlock,
    DeltaGroup,
    RunBasis,
    Tonight,
    full_reason,
    model_weights,
    probes_digest,
    scan_delta,
)
from pipelines.engines import Engine, EngineOptions, open_engine
from pipelines.faults import crash_point
from pipelines.results import latest_runs
from pipelines.settings import Settings
from pipelines.sql import sql_list
from pipelines.vocab import CHILD_PROTECTION_PURPOSES

MAX_STACKED = 2048  # probes scored together against a delta block (a 2048 x 4096 float32 product: 32 MiB)


@dataclass
class WatchlistNight:
    """One active watchlist tonight: its probes, its last run, its table, and how it will be matched."""

    wl: dict[str, Any]
    probes: list[dict[str, Any]]
    vectors: np.ndarray
    parent: dict[str, Any] | None
    pinned: PinnedTable | None
    reason: str | None  # why a full run; None while it can be extended
    parent_rows: list[list[Candidate]] | None = None
    delta: list[list[Candidate]] | None = None
    fresh: int = 0  # rows written since its last run that it may see
    weights: tuple[str, ...] = ()
    rows: int | None = None  # rows of its model in the pinned table
    unstamped: int | None = None  # of which written without a stamp

    @property
    def watchlist_id(self) -> str:
        return str(self.wl["watchlist_id"])

    @property
    def basis(self) -> RunBasis | None:
        return RunBasis.from_manifest(self.parent) if self.parent else None


def run_nightly(settings: Settings, engine: str = "local", now: dt.datetime | None = None) -> dict[str, Any]:
    """Retention, then tonight's runs. Returns {"runs", "skipped", "retention", "cases"} (JSON-ready)."""
    runner = open_engine(engine, EngineOptions.from_settings(settings))
    runner.prepare_runtime()  # once for the night, before LanceDB is opened
    try:
        with writer_session(settings, "nightly") as log:
            # the night's clock starts once the lease is held: a run committed while this one waited is older
            now = (now or dt.datetime.now(dt.UTC)).astimezone(dt.UTC)
            retention = run_retention(settings, now)
            crash_point("nightly:after-retention")
            with log.action(settings.actor, "nightly", engine=engine) as op:
                runs, skipped = _night(settings, log, runner, now)
                op.record(
                    counts={
                        "runs": len(runs),
                        "delta": sum(r["mode"] == "delta" for r in runs),
                        "full": sum(r["mode"] == "full" for r in runs),
                        "skipped": len(skipped),
                        "new_candidates": sum(r["new_candidates"] for r in runs),
                    },
                    run_ids=[r["run_id"] for r in runs],
                    up_to_date=[{k: x[k] for k in ("watchlist_id", "last_run_id", "gallery_version")} for x in skipped],
                )
    finally:
        runner.close()  # what prepare_runtime held for the night (Modal's app run)
    return {"runs": runs, "skipped": skipped, "retention": retention, "cases": _by_case(runs), "engine": engine}


def _night(
    settings: Settings, log: AuditLog, runner: Engine, now: dt.datetime
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    gallery = Gallery(settings.storage)
    active = [w for w in list_watchlists(gallery) if w["status"] == "open" and w["expires_at"] > now]
    active.sort(key=lambda w: w["watchlist_id"])
    latest = latest_runs(settings.store)
    pins = {name: pin_table(gallery, name_modality) for name, name_modality in _tables(active)}  # pinned once
    probes = read_probes_of(gallery, [w["watchlist_id"] for w in active])
    tonight = [_plan(settings, w, probes[w["watchlist_id"]], latest.get(w["watchlist_id"]), pins) for w in active]
    by_model: dict[tuple[str, str], list[WatchlistNight]] = defaultdict(list)
    for t in tonight:
        if t.reason is None:
            by_model[(gallery_table(t.wl["modality"]), t.wl["model_id"])].append(t)
    for (name, model_id), group in by_model.items():
        _delta_pass(settings, pins.get(name), model_id, group)
    runs: list[dict[str, Any]] = []
    skipped: list[dict[str, Any]] = []
    for t in tonight:
        if t.reason is None and _up_to_date(t):
            skipped.append(_skip(t))
            continue
        if t.reason is None:
            plan = RunPlan(
                "delta",
                None,
                t.parent,
                t.delta,
                from_version=t.basis.gallery_version if t.basis else None,
                parent_rows=t.parent_rows,
                gallery_weights=t.weights,
                gallery_rows=t.rows,
                unstamped_rows=t.unstamped,
            )
        else:
            plan = full_plan(settings.store, t.parent, t.probes, t.reason)
        result = match_watchlist(
            settings, gallery, runner, log, t.wl, t.probes, t.vectors, now, plan, pinned=pins.get(_table_of(t))
        )
        runs.append(_summary(result))
        crash_point("nightly:after-run")
    return runs, skipped


def _table_of(t: WatchlistNight) -> str:
    return gallery_table(t.wl["modality"])


def _tables(active: list[dict[str, Any]]) -> list[tuple[str, str]]:
    return sorted({(gallery_table(w["modality"]), w["modality"]) for w in active})


def _plan(
    settings: Settings,
    wl: dict[str, Any],
    probe_set: tuple[list[dict[str, Any]], np.ndarray],
    parent: dict[str, Any] | None,
    pins: dict[str, PinnedTable | None],
) -> WatchlistNight:
    """What can be decided from the manifests and the watchlist alone."""
    probes, vectors = probe_set
    name = gallery_table(wl["modality"])
    pinned = pins.get(name)
    now = Tonight(
        gallery_table=name,
        gallery_version=pinned.version if pinned is not None else 0,
        top_k=int(wl["top_k"]),
        threshold=float(wl["threshold"]),
        probes_digest=probes_digest([p["probe_id"] for p in probes], vectors, str(wl["weights_digest"])),
        gallery_filter=gallery_filter(wl["model_id"], wl["purpose"]),
    )
    t = WatchlistNight(wl, probes, vectors, parent, pinned, None)
    t.reason = full_reason(t.basis, now)
    if t.reason is None:
        t.parent_rows = parent_candidates(settings.store, parent, probes)
        if t.parent_rows is None:
            t.reason = "parent_unreadable"
    return t


def _delta_pass(settings: Settings, pinned: PinnedTable | None, model_id: str, group: list[WatchlistNight]) -> None:
    """Check the parents' candidates are still in the gallery as they were, then scan the delta once."""
    if pinned is None:  # no table then and none now: nothing can be new
        for t in group:
            t.delta = [[] for _ in t.probes]
            t.weights = (t.basis.gallery_weights or ()) if t.basis else ()
        return
    _check_parents(pinned, model_id, group)
    group[:] = [t for t in group if t.reason is None]
    if not group:
        return
    since = min(t.basis.gallery_version for t in group if t.basis)
    stamp = written_since(pinned, since)
    groups: list[DeltaGroup] = []
    slots: dict[str, tuple[int, int]] = {}  # watchlist id -> (group index, its first probe row in the stack)
    rows = count_rows(pinned, f"model_id IN {sql_list([model_id])}")
    for t in group:
        t.rows = rows
        if not t.probes:  # nothing to score (its probes were erased): nothing can be new for it
            t.delta = []
            t.weights = tuple(sorted(model_weights(t.basis.gallery_weights or ()))) if t.basis else ()
    scored = [t for t in group if t.probes]
    for allow in (False, True):
        members = [t for t in scored if (t.wl["purpose"] in CHILD_PROTECTION_PURPOSES) == allow]
        for chunk in _stacks(members):
            row = 0
            for t in chunk:
                slots[t.watchlist_id] = (len(groups), row)
                row += len(t.probes)
            stacked = np.concatenate([t.vectors for t in chunk]) if row else np.zeros((0, 1), np.float32)
            groups.append(DeltaGroup(allow, stacked, max(int(t.wl["top_k"]) for t in chunk), settings.device))
    versions = {t.watchlist_id: (slots[t.watchlist_id][0], _from(t)) for t in scored}
    weights: dict[str, set[str]] = {t.watchlist_id: set() for t in scored}

    def blocks() -> Iterator[DeltaBlock]:
        if stamp is None:
            return
        for block in delta_blocks(pinned, f"model_id IN {sql_list([model_id])} AND {stamp}", settings.match_block_rows):
            for t in scored:
                weights[t.watchlist_id].update(model_weights(block.weights[block.stamp >= _from(t)]))
            yield block

    fresh = scan_delta(blocks(), groups, versions)
    rowids = np.unique(np.concatenate([g.top.all_rowids() for g in groups])) if groups else np.zeros(0, np.int64)
    meta = metadata(pinned, rowids)
    for t in scored:
        known = model_weights(t.basis.gallery_weights or ()) if t.basis else set()
        if weights[t.watchlist_id] - known:
            t.reason = "weights_changed"
            continue
        index, first = slots[t.watchlist_id]
        t.fresh = fresh[t.watchlist_id]
        t.weights = tuple(sorted(known))
        t.delta = named_candidates(groups[index].top, meta, t.probes, int(t.wl["top_k"]), first)


def _stacks(members: list[WatchlistNight]) -> list[list[WatchlistNight]]:
    """Watchlists in stacks of at most MAX_STACKED probes (a watchlist is never split): every stack scores
    each delta block with one product, and the score matrix stays bounded however many watchlists there are."""
    stacks: list[list[WatchlistNight]] = []
    size = 0
    for t in members:
        if not stacks or size + len(t.probes) > MAX_STACKED:
            stacks.append([])
            size = 0
        stacks[-1].append(t)
        size += len(t.probes)
    return stacks


def _from(t: WatchlistNight) -> int:
    return t.basis.gallery_version if t.basis else 0


def _check_parents(pinned: PinnedTable, model_id: str, group: list[WatchlistNight]) -> None:
    """A parent's candidate that was erased or replaced since (no row, or a newer stamp) breaks the merge.

    The rows last written at or before a parent's version are a subset of what it saw; when there are as many
    as it counted (`gallery_rows`), nothing it saw was removed or replaced (one count per version). Otherwise
    its candidates are looked up one by one."""
    model = f"model_id IN {sql_list([model_id])}"
    unstamped = count_rows(pinned, f"{model} AND {written_unstamped(pinned)}")
    for t in group:
        t.unstamped = unstamped
        if t.basis is not None and (t.basis.unstamped_rows is None or unstamped > t.basis.unstamped_rows):
            t.reason = "untracked_writes"  # rows were written without a stamp (not through Gallery.upsert)
    counts: dict[int, int] = {}
    unsure = []
    for t in group:
        if t.reason is not None:
            continue
        version = _from(t)
        if t.basis is not None and t.basis.gallery_rows is not None:
            if version not in counts:
                counts[version] = count_rows(pinned, f"{model} AND {written_before(pinned, version)}")
            if counts[version] == t.basis.gallery_rows:
                continue
        unsure.append(t)
    ids = [c.gallery_id for t in unsure for lst in t.parent_rows or [] for c in lst]
    stamps = stamps_of(pinned, ids) if ids else {}
    for t in unsure:
        version = _from(t)
        for lst in t.parent_rows or []:
            if any(c.gallery_id not in stamps or _after(stamps[c.gallery_id], version) for c in lst):
                t.reason = "gallery_changed"
                break


def _after(stamp: int | None, version: int) -> bool:
    return stamp is not None and stamp >= version


def _up_to_date(t: WatchlistNight) -> bool:
    """Nothing new it may see, and the same K and threshold as its last run: a new run would be a copy."""
    basis = t.basis
    assert basis is not None
    same = basis.top_k == int(t.wl["top_k"]) and np.float32(basis.threshold) == np.float32(t.wl["threshold"])
    return t.fresh == 0 and same


def _skip(t: WatchlistNight) -> dict[str, Any]:
    basis = t.basis
    return {
        "watchlist_id": t.watchlist_id,
        "case_id": t.wl["case_id"],
        "reason": "up_to_date",
        "detail": "nothing was added to or replaced in its gallery since its last run",
        "last_run_id": basis.run_id if basis else None,
        "gallery_version": basis.gallery_version if basis else None,
    }


def _summary(result: dict[str, Any]) -> dict[str, Any]:
    keys = (
        "watchlist_id",
        "case_id",
        "run_id",
        "path",
        "mode",
        "full_reason",
        "parent_run_id",
        "from_version",
        "to_version",
        "new_candidates",
        "new_above_threshold",
        "candidates",
        "above_threshold",
        "probes",
        "top_k",
        "threshold",
        "calibration_id",
        "threshold_warnings",
    )
    return {k: result.get(k) for k in keys}


def _by_case(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per case: the runs, new candidates and new above-threshold candidates tonight."""
    cases: dict[str, dict[str, Any]] = {}
    for r in runs:
        c = cases.setdefault(
            r["case_id"], {"case_id": r["case_id"], "runs": 0, "new_candidates": 0, "new_above_threshold": 0}
        )
        c["runs"] += 1
        c["new_candidates"] += r["new_candidates"]
        c["new_above_threshold"] += r["new_above_threshold"]
    return sorted(cases.values(), key=lambda c: c["case_id"])

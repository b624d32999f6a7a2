"""The match job: every probe against every gallery vector of its model, exact, written as a result set."""

from __future__ import annotations

import datetime as dt
import uuid
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from jobs.session import writer_session
from lance_tables.calibrations import get_calibration
from lance_tables.delta import PinnedTable, count_rows, weights_of, written_unstamped
from lance_tables.store import Gallery
from lance_tables.watchlists import get_watchlist, read_probes
from pipelines.audit import AuditLog, digest
from pipelines.calibration import Calibration, threshold_warnings
from pipelines.delta import DELTA_BASIS, Candidate, Mode, merge, model_weights, probes_digest, with_history
from pipelines.engines import Engine, EngineOptions, open_engine
from pipelines.errors import Refused
from pipelines.match_unit import MatchUnit
from pipelines.matcher import TopK, ranked
from pipelines.results import latest_runs, read_run, write_result_set
from pipelines.schemas import RESULT_SCHEMA
from pipelines.settings import Settings
from pipelines.sql import sql_list
from pipelines.vocab import CHILD_PROTECTION_PURPOSES

MatchEngine = Literal["local", "ray", "modal"]
Method = Literal["exact", "ivf_pq"]
RECALL_SAMPLE = 20


def gallery_filter(model_id: str, purpose: str) -> str:
    """Same model only; rows flagged minor only for a child-protection purpose."""
    where = f"model_id IN {sql_list([model_id])}"
    return where if purpose in CHILD_PROTECTION_PURPOSES else where + " AND minor = false"


def plan_units(
    uri: str,
    version: int,
    where: str,
    k: int,
    block_rows: int,
    device: str,
    parts: int,
    options: dict[str, str] | None = None,
) -> list[MatchUnit]:
    """Fragment ranges: contiguous, balanced by row count."""
    import lance

    fragments = lance.dataset(uri, version=version, storage_options=options or None).get_fragments()
    groups: list[list[int]] = [[] for _ in range(max(1, min(parts, len(fragments))))]
    for i, fragment in enumerate(fragments):
        groups[i * len(groups) // max(1, len(fragments))].append(fragment.fragment_id)
    opts = tuple(sorted((options or {}).items()))
    return [MatchUnit(uri, version, tuple(g), where, k, block_rows, device, storage_options=opts) for g in groups if g]


def run_match(
    settings: Settings,
    watchlist_id: str,
    engine: MatchEngine = "local",
    method: Method = "exact",
    nprobes: int = 20,
    refine: int = 10,
) -> dict[str, Any]:
    """Audited write-ahead: the search's intent (case, purpose, requester, run id) is recorded before it runs.

    A full run over the whole gallery; each candidate says whether it is new since the watchlist's last run."""
    runner = open_engine(engine, EngineOptions.from_settings(settings))
    runner.prepare_runtime()  # before LanceDB's runtime exists: Ray must not fork a live async runtime
    try:
        with writer_session(settings, "match") as log:
            gallery = Gallery(settings.storage)
            wl = get_watchlist(gallery, watchlist_id)
            now = dt.datetime.now(dt.UTC)
            if wl["status"] != "open":
                raise Refused(f"watchlist {watchlist_id} is {wl['status']}; closed watchlists are not matched")
            if wl["expires_at"] <= now:
                raise Refused(
                    f"watchlist {watchlist_id} expired on {wl['expires_at']:%Y-%m-%d}; it is no longer matched"
                )
            probes, vectors = read_probes(gallery, watchlist_id)
            parent = latest_runs(settings.store, watchlist_id).get(watchlist_id)
            plan = full_plan(settings.store, parent, probes, None)
            return match_watchlist(
                settings, gallery, runner, log, wl, probes, vectors, now, plan, method, nprobes, refine
            )
    finally:
        runner.close()


@dataclass(frozen=True)
class RunPlan:
    """How one run is made: `full` over the whole gallery, or `delta` (the parent's candidates merged with
    `delta` lists computed from the rows written since `from_version`)."""

    mode: Mode
    full_reason: str | None
    parent: dict[str, Any] | None  # the parent's manifest
    delta: list[list[Candidate]] | None  # delta mode: per probe, the delta's candidates
    from_version: int | None = None
    parent_rows: list[list[Candidate]] | None = None  # per probe, the parent's candidates (when read)
    gallery_weights: tuple[str, ...] | None = None
    gallery_rows: int | None = None  # delta mode: rows of the model in the pinned table
    unstamped_rows: int | None = None  # delta mode: of which without a write stamp


def full_plan(store: Any, parent: dict[str, Any] | None, probes: list[dict[str, Any]], reason: str | None) -> RunPlan:
    """A full run; its candidates are compared with the parent's (when readable) to mark what is new."""
    return RunPlan("full", reason, parent, None, parent_rows=parent_candidates(store, parent, probes))


def parent_candidates(
    store: Any, parent: dict[str, Any] | None, probes: list[dict[str, Any]]
) -> list[list[Candidate]] | None:
    """Per probe, the parent run's candidates (None: no parent, or its result set cannot be read)."""
    if parent is None:
        return None
    try:
        rows = read_run(store, parent)
    except (OSError, ValueError, pa.ArrowException):
        return None
    return candidates_of(rows, probes, int(parent.get("top_k") or 0) or len(rows) or 1)


def gallery_table(modality: str) -> str:
    return "faces" if modality == "face" else "image_embeddings"


def pin_table(gallery: Gallery, modality: str) -> PinnedTable | None:
    """The watchlist's gallery table at its latest version (None: no such table yet)."""
    name = gallery_table(modality)
    table = gallery.open(name)
    if table is None:
        return None
    return PinnedTable(name, gallery.table_uri(name), int(table.version), dict(gallery.options))


def match_watchlist(
    settings: Settings,
    gallery: Gallery,
    runner: Engine,
    log: AuditLog,
    wl: dict[str, Any],
    probes: list[dict[str, Any]],
    vectors: np.ndarray,
    now: dt.datetime,
    plan: RunPlan,
    method: Method = "exact",
    nprobes: int = 20,
    refine: int = 10,
    pinned: PinnedTable | None = None,
) -> dict[str, Any]:
    """One audited run of one watchlist: the intent names the case, purpose, requester, mode and versions."""
    run_id = f"run-{now:%Y%m%dT%H%M%S}-{uuid.uuid4().hex[:8]}"
    fields = {k: wl[k] for k in ("case_id", "purpose", "requested_by", "watchlist_id", "model_id")}
    parent = plan.parent
    lineage = {
        "mode": plan.mode,
        "full_reason": plan.full_reason,
        "parent_run_id": parent["run_id"] if parent else None,
        "from_version": plan.from_version,
    }
    with log.action(wl["requested_by"], "match", run_id=run_id, method=method, **fields, **lineage) as op:
        if method == "ivf_pq" and gallery.open(gallery_table(wl["modality"])) is not None:
            from lance_tables.ann import ensure_ivf_pq

            ensure_ivf_pq(gallery.open(gallery_table(wl["modality"])))  # a new table version at the first build
            pinned = None
        pinned = pinned or pin_table(gallery, wl["modality"])
        result = _match(settings, runner, pinned, wl, probes, vectors, run_id, now, plan, method, nprobes, refine)
        result |= {"audit_head": op.head.as_dict()}
        path = write_result_set(settings.store, wl["watchlist_id"], run_id, result.pop("rows"), result)
        op.record(
            table_versions={result["gallery_table"]: result["gallery_version"]},
            inputs_digest=digest([p["probe_id"] for p in probes]),
            counts={k: result[k] for k in ("probes", "candidates", "above_threshold", "new_candidates")},
            kernel=result.get("filter_kernel"),
            to_version=result["to_version"],
        )
        return result | {"path": str(path)}


def _match(
    settings: Settings,
    runner: Engine,
    pinned: PinnedTable | None,
    wl: dict[str, Any],
    probes: list[dict[str, Any]],
    vectors: np.ndarray,
    run_id: str,
    now: dt.datetime,
    plan: RunPlan,
    method: Method,
    nprobes: int,
    refine: int,
) -> dict[str, Any]:
    name = gallery_table(wl["modality"])
    version = pinned.version if pinned is not None else 0
    where = gallery_filter(wl["model_id"], wl["purpose"])
    k = int(wl["top_k"])
    extra: dict[str, Any] = {}
    weights: tuple[str, ...] = ()
    rows_of_model, unstamped = plan.gallery_rows, plan.unstamped_rows
    if plan.mode == "delta":
        assert plan.delta is not None and plan.parent_rows is not None
        lists = [merge(old, new, k) for old, new in zip(plan.parent_rows, plan.delta, strict=True)]
        weights = plan.gallery_weights or ()
    else:
        lists = [[] for _ in probes]
        if pinned is not None and len(probes):
            units = plan_units(
                pinned.uri,
                version,
                where,
                k,
                settings.match_block_rows,
                settings.device,
                runner.match_parts(),
                pinned.options,
            )
            if method == "ivf_pq":
                table = Gallery(settings.storage).open(name)
                top, extra = _approximate(table, version, units, vectors, where, k, nprobes, refine)
            else:
                top = TopK(len(probes), k)
                for partial in _partials(runner, units, vectors):
                    top.merge(partial)
            lists = ranked_candidates(pinned, top, probes, k)
        if pinned is not None:  # what the next night checks its view against
            model = f"model_id IN {sql_list([wl['model_id']])}"
            weights = tuple(sorted(model_weights(weights_of(pinned, model))))
            rows_of_model = count_rows(pinned, model)
            unstamped = count_rows(pinned, f"{model} AND {written_unstamped(pinned)}")
        lists = [with_history(ranked, first_seen_of(plan)) for ranked in lists]
    rows = result_rows(wl, probes, lists, run_id, version, now)
    new = rows.filter(pc.field("new_since_parent"))
    calibration = _calibration_of(settings, wl)
    manifest = {
        "run_id": run_id,
        "watchlist_id": wl["watchlist_id"],
        "case_id": wl["case_id"],
        "purpose": wl["purpose"],
        "model_id": wl["model_id"],
        "threshold": float(wl["threshold"]),
        "top_k": k,
        "gallery_table": name,
        "gallery_version": version,
        "matched_at": now.isoformat(),
        "engine": runner.name,
        "method": method,
        "probes": len(probes),
        "candidates": rows.num_rows,
        "above_threshold": _count(rows.column("above_threshold")),
        "filter_kernel": _kernel(len(probes), settings.device),
        "mode": plan.mode,
        "full_reason": plan.full_reason,
        "parent_run_id": plan.parent["run_id"] if plan.parent else None,
        "from_version": plan.from_version,
        "to_version": version,
        "new_candidates": new.num_rows,
        "new_above_threshold": _count(new.column("above_threshold")),
        "probes_digest": probes_digest([p["probe_id"] for p in probes], vectors, str(wl["weights_digest"])),
        "gallery_filter": where,
        "gallery_weights": list(weights),
        "gallery_rows": rows_of_model,
        "unstamped_rows": unstamped,
        "delta_basis": DELTA_BASIS,
        "calibration_id": calibration.calibration_id if calibration is not None else None,
        "calibration": calibration.summary() if calibration is not None else None,
        "threshold_warnings": threshold_warnings(calibration, weights, rows_of_model)
        if wl["modality"] == "face"
        else [],
    }
    return manifest | extra | {"rows": rows}


def _calibration_of(settings: Settings, wl: dict[str, Any]) -> Calibration | None:
    """The calibration the watchlist's threshold came from (None: given by hand, or its record is gone)."""
    ident = wl.get("calibration_id")
    if not ident:
        return None
    try:
        return get_calibration(Gallery(settings.storage), str(ident))
    except Refused:
        return None


def _count(column: Any) -> int:
    return int(np.sum(column.to_numpy(zero_copy_only=False))) if len(column) else 0


def first_seen_of(plan: RunPlan) -> dict[tuple[str, str], str]:
    """(probe id, gallery id) -> the run that first listed it, from the parent's rows."""
    if plan.parent_rows is None:
        return {}
    return {(c.probe_id, c.gallery_id): str(c.first_seen_run_id) for lst in plan.parent_rows for c in lst}


def _kernel(probes: int, device: str) -> str:
    """The filter kernel the matcher chose on this machine (recorded in the manifest)."""
    from pipelines.matcher import choose_filter_kernel
    from pipelines.models import resolve_device

    return choose_filter_kernel(probes, resolve_device(device))


def _approximate(
    table: Any,
    version: int,
    units: list[MatchUnit],
    vectors: np.ndarray,
    where: str,
    k: int,
    nprobes: int,
    refine: int,
) -> tuple[TopK, dict[str, Any]]:
    """IVF_PQ search at the pinned version, and its recall@k measured against exact on a probe sample."""
    from lance_tables.ann import search_ivf_pq
    from pipelines.engines.local import match_local

    table.checkout(version)
    top = search_ivf_pq(table, vectors, where, k, nprobes, refine)
    sample = min(len(vectors), RECALL_SAMPLE)
    exact = TopK(sample, k)
    for partial in match_local(units, vectors[:sample]):
        exact.merge(partial)
    hits = total = 0
    for row in range(sample):
        truth = set(exact.candidates(row)[1].tolist())
        hits += len(truth & set(top.candidates(row)[1].tolist()))
        total += min(k, len(truth))
    recall = hits / total if total else 1.0
    return top, {
        "index": "IVF_PQ",
        "nprobes": nprobes,
        "refine_factor": refine,
        "recall_at_k_sample": round(recall, 4),
        "recall_sample_probes": sample,
    }


def _partials(runner: Engine, units: list[MatchUnit], vectors: np.ndarray) -> list[TopK]:
    """Every unit's partial top-k, from the engine (one step of the benchmark's breakdown)."""
    return runner.match(units, vectors)


def metadata(table: PinnedTable, rowids: np.ndarray) -> dict[int, dict[str, Any]]:
    """Row id -> what a result row names (gallery id, image, record, source, subject), at the pinned version."""
    if len(rowids) == 0:
        return {}
    columns = [table.id_column, "image_id", "record_id", "source_id", "subject_id"]
    rows = table.dataset()._take_rows(rowids.tolist(), columns=columns).to_pylist()
    return {int(r): row | {"gallery_id": row[table.id_column]} for r, row in zip(rowids.tolist(), rows, strict=True)}


def ranked_candidates(table: PinnedTable, top: TopK, probes: list[dict[str, Any]], k: int) -> list[list[Candidate]]:
    """Per probe, its top k by (score desc, gallery id asc), named from the table."""
    return named_candidates(top, metadata(table, top.all_rowids()), probes, k)


def named_candidates(
    top: TopK, meta: dict[int, dict[str, Any]], probes: list[dict[str, Any]], k: int, first_row: int = 0
) -> list[list[Candidate]]:
    """The top k of `probes`, which are rows `first_row`... of `top`, named from `meta` (row id -> names)."""
    ids = {rowid: m["gallery_id"] for rowid, m in meta.items()}
    out = []
    for row, probe in enumerate(probes, start=first_row):
        out.append(
            [
                Candidate(
                    probe_id=probe["probe_id"],
                    gallery_id=meta[rowid]["gallery_id"],
                    score=float(np.float32(score)),
                    image_id=meta[rowid]["image_id"],
                    record_id=meta[rowid]["record_id"],
                    source_id=meta[rowid]["source_id"],
                    subject_id=meta[rowid]["subject_id"],
                )
                for score, rowid in ranked(top, row, ids, k)
            ]
        )
    return out


def candidates_of(rows: pa.Table, probes: list[dict[str, Any]], k: int) -> list[list[Candidate]]:
    """A result set's rows as per-probe candidate lists (rank <= k), each with the run it was first seen in."""
    by_probe: dict[str, list[Candidate]] = {p["probe_id"]: [] for p in probes}
    for r in rows.sort_by([("probe_id", "ascending"), ("rank", "ascending")]).to_pylist():
        if r["probe_id"] in by_probe and r["rank"] <= k:
            by_probe[r["probe_id"]].append(
                Candidate(
                    probe_id=r["probe_id"],
                    gallery_id=r["gallery_id"],
                    score=float(np.float32(r["score"])),
                    image_id=r["image_id"],
                    record_id=r["record_id"],
                    source_id=r["source_id"],
                    subject_id=r["subject_id"],
                    first_seen_run_id=r.get("first_seen_run_id") or r["run_id"],
                )
            )
    return [by_probe[p["probe_id"]] for p in probes]


def result_rows(
    wl: dict[str, Any],
    probes: list[dict[str, Any]],
    lists: list[list[Candidate]],
    run_id: str,
    version: int,
    now: dt.datetime,
) -> pa.Table:
    threshold = np.float32(wl["threshold"])
    out: list[dict[str, Any]] = []
    for probe, candidates in zip(probes, lists, strict=True):
        for rank, c in enumerate(candidates, start=1):
            out.append(
                {
                    "run_id": run_id,
                    "watchlist_id": wl["watchlist_id"],
                    "case_id": wl["case_id"],
                    "probe_id": probe["probe_id"],
                    "subject_id": c.subject_id,
                    "rank": rank,
                    "gallery_id": c.gallery_id,
                    "image_id": c.image_id,
                    "record_id": c.record_id,
                    "source_id": c.source_id,
                    "score": np.float32(c.score),
                    "above_threshold": bool(np.float32(c.score) >= threshold),
                    "model_id": wl["model_id"],
                    "gallery_version": version,
                    "matched_at": now,
                    "review_status": "unreviewed",
                    "new_since_parent": c.first_seen_run_id is None,
                    "first_seen_run_id": c.first_seen_run_id or run_id,
                }
            )
    return pa.Table.from_pylist(out, schema=RESULT_SCHEMA)

"""The match job: every probe against every gallery vector of its model, exact, written as a result set."""

from __future__ import annotations

import datetime as dt
import uuid
from typing import Any, Literal

import numpy as np
import pyarrow as pa

from jobs.session import writer_session
from lance_tables.store import Gallery
from lance_tables.watchlists import get_watchlist, read_probes
from pipelines.audit import digest
from pipelines.engines import EngineOptions, open_engine
from pipelines.errors import Refused
from pipelines.match_unit import MatchUnit
from pipelines.matcher import TopK, ranked
from pipelines.results import write_result_set
from pipelines.schemas import RESULT_SCHEMA
from pipelines.settings import Settings
from pipelines.sql import sql_list
from pipelines.vocab import CHILD_PROTECTION_PURPOSES

MatchEngine = Literal["local", "ray"]
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
    """Audited write-ahead: the search's intent (case, purpose, requester, run id) is recorded before it runs."""
    runner = open_engine(engine, EngineOptions.from_settings(settings))
    runner.prepare_runtime()  # before LanceDB's runtime exists: Ray must not fork a live async runtime
    with writer_session(settings, "match") as log:
        gallery = Gallery(settings.storage)
        wl = get_watchlist(gallery, watchlist_id)
        now = dt.datetime.now(dt.UTC)
        if wl["status"] != "open":
            raise Refused(f"watchlist {watchlist_id} is {wl['status']}; closed watchlists are not matched")
        if wl["expires_at"] <= now:
            raise Refused(f"watchlist {watchlist_id} expired on {wl['expires_at']:%Y-%m-%d}; it is no longer matched")
        run_id = f"run-{now:%Y%m%dT%H%M%S}-{uuid.uuid4().hex[:8]}"
        fields = {k: wl[k] for k in ("case_id", "purpose", "requested_by", "watchlist_id", "model_id")}
        with log.action(wl["requested_by"], "match", run_id=run_id, method=method, **fields) as op:
            result = _match(settings, gallery, wl, run_id, now, engine, method, nprobes, refine, op.head.as_dict())
            op.record(
                table_versions={result["gallery_table"]: result["gallery_version"]},
                inputs_digest=result.pop("inputs_digest"),
                counts={k: result[k] for k in ("probes", "candidates", "above_threshold")},
                kernel=result.get("filter_kernel"),
            )
            return result


def _match(
    settings: Settings,
    gallery: Gallery,
    wl: dict[str, Any],
    run_id: str,
    now: dt.datetime,
    engine: MatchEngine,
    method: Method,
    nprobes: int,
    refine: int,
    audit_head: dict[str, Any],
) -> dict[str, Any]:
    watchlist_id = wl["watchlist_id"]
    probes, vectors = read_probes(gallery, watchlist_id)
    name = "faces" if wl["modality"] == "face" else "image_embeddings"
    table = gallery.open(name)
    if method == "ivf_pq" and table is not None:
        from lance_tables.ann import ensure_ivf_pq

        ensure_ivf_pq(table)  # a new table version when the index is first built
    version = int(table.version) if table is not None else 0  # pinned: latest at the start of the run
    top = TopK(len(probes), wl["top_k"])
    meta: dict[int, dict[str, Any]] = {}
    extra: dict[str, Any] = {}
    if table is not None and len(probes):
        uri, options = gallery.table_uri(name), gallery.options
        where = gallery_filter(wl["model_id"], wl["purpose"])
        parts = 1 if engine == "local" else int(settings.ray_num_cpus or 2)
        units = plan_units(uri, version, where, wl["top_k"], settings.match_block_rows, settings.device, parts, options)
        if method == "ivf_pq":
            top, extra = _approximate(table, version, units, vectors, where, wl["top_k"], nprobes, refine)
        else:
            for partial in _partials(settings, engine, units, vectors):
                top.merge(partial)
        meta = _metadata(uri, version, name, top.all_rowids(), options)
    rows = _result_rows(wl, probes, top, meta, run_id, version, now)
    manifest = {
        "run_id": run_id,
        "watchlist_id": watchlist_id,
        "case_id": wl["case_id"],
        "purpose": wl["purpose"],
        "model_id": wl["model_id"],
        "threshold": float(wl["threshold"]),
        "top_k": int(wl["top_k"]),
        "gallery_table": name,
        "gallery_version": version,
        "matched_at": now.isoformat(),
        "engine": engine,
        "method": method,
        "probes": len(probes),
        "candidates": rows.num_rows,
        "above_threshold": int(np.sum(rows.column("above_threshold").to_numpy(zero_copy_only=False))),
        "filter_kernel": _kernel(len(probes), settings.device),
        "audit_head": audit_head,
    }
    manifest |= extra
    path = write_result_set(settings.store, watchlist_id, run_id, rows, manifest)
    return manifest | {"path": str(path), "inputs_digest": digest([p["probe_id"] for p in probes])}


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


def _partials(settings: Settings, engine: MatchEngine, units: list[MatchUnit], vectors: np.ndarray) -> list[TopK]:
    return open_engine(engine, EngineOptions.from_settings(settings)).match(units, vectors)


def _metadata(
    uri: str, version: int, name: str, rowids: np.ndarray, options: dict[str, str]
) -> dict[int, dict[str, Any]]:
    import lance

    if len(rowids) == 0:
        return {}
    id_col = "face_id" if name == "faces" else "embedding_id"
    columns = [id_col, "image_id", "record_id", "source_id", "subject_id"]
    table = lance.dataset(uri, version=version, storage_options=options or None)._take_rows(
        rowids.tolist(), columns=columns
    )
    rows = table.to_pylist()
    return {int(r): row | {"gallery_id": row[id_col]} for r, row in zip(rowids.tolist(), rows, strict=True)}


def _result_rows(
    wl: dict[str, Any],
    probes: list[dict[str, Any]],
    top: TopK,
    meta: dict[int, dict[str, Any]],
    run_id: str,
    version: int,
    now: dt.datetime,
) -> pa.Table:
    ids = {rowid: m["gallery_id"] for rowid, m in meta.items()}
    threshold = np.float32(wl["threshold"])
    out: list[dict[str, Any]] = []
    for row, probe in enumerate(probes):
        for rank, (score, rowid) in enumerate(ranked(top, row, ids, wl["top_k"]), start=1):
            m = meta[rowid]
            out.append(
                {
                    "run_id": run_id,
                    "watchlist_id": wl["watchlist_id"],
                    "case_id": wl["case_id"],
                    "probe_id": probe["probe_id"],
                    "subject_id": m["subject_id"],
                    "rank": rank,
                    "gallery_id": m["gallery_id"],
                    "image_id": m["image_id"],
                    "record_id": m["record_id"],
                    "source_id": m["source_id"],
                    "score": np.float32(score),
                    "above_threshold": bool(np.float32(score) >= threshold),
                    "model_id": wl["model_id"],
                    "gallery_version": version,
                    "matched_at": now,
                    "review_status": "unreviewed",
                }
            )
    return pa.Table.from_pylist(out, schema=RESULT_SCHEMA)

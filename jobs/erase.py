"""Erasure: rows gone from every table, indexes rebuilt, old versions dropped, result sets rewritten, a receipt."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import shutil
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from lance_tables.erasure import ERASED, delete_keys, purge, tagged, vector_patterns
from lance_tables.store import Gallery, sql_list
from pipelines.audit import AuditLog
from pipelines.errors import GalleryMatchError, Refused
from pipelines.locks import writer_lock
from pipelines.results import list_runs, manifest_path, read_run, run_dir, write_result_set
from pipelines.settings import Settings
from pipelines.shards import check_id

TABLES = ("images", "faces", "image_embeddings", "quarantine", "probes")
KEY = {
    "images": "image_id",
    "faces": "face_id",
    "image_embeddings": "embedding_id",
    "quarantine": "quarantine_id",
    "probes": "probe_key",
}


def selectors(image_id: str | None, subject_id: str | None, source_id: str | None) -> dict[str, str]:
    """Per table, the predicate (on opaque ids only) that finds the rows to erase."""
    given = [(k, v) for k, v in (("image", image_id), ("subject", subject_id), ("source", source_id)) if v]
    if len(given) != 1:
        raise Refused("give exactly one of --image-id, --subject-id, --source")
    kind, value = given[0]
    check_id(f"{kind} id", value)
    v = sql_list([value])
    if kind == "image":
        return {
            "images": f"image_id IN {v}",
            "faces": f"image_id IN {v}",
            "image_embeddings": f"image_id IN {v}",
            "quarantine": f"item_id IN {v}",
            "probes": f"photo_sha256 IN {v}",
        }
    column = "subject_id" if kind == "subject" else "source_id"
    return {
        "images": f"{column} IN {v}",
        "faces": f"{column} IN {v}",
        "image_embeddings": f"{column} IN {v}",
        "quarantine": f"source_id IN {v}" if kind == "source" else "",
        "probes": f"{column} IN {v}" if kind == "subject" else "",
    }


def erase(
    settings: Settings,
    reason: str,
    requested_by: str,
    image_id: str | None = None,
    subject_id: str | None = None,
    source_id: str | None = None,
) -> dict[str, Any]:
    check_id("requester id", requested_by)
    if not reason.strip():
        raise Refused("an erasure needs --reason")
    where = selectors(image_id, subject_id, source_id)
    with writer_lock(settings.home, exclusive=True):
        gallery = Gallery(settings.lance_dir)
        blocked = tagged(gallery, [*TABLES, "erased"])
        if blocked:
            raise Refused(f"tagged versions pin old data ({blocked}); delete the tags first. Nothing was removed.")
        return _erase_locked(settings, gallery, where, reason, requested_by)


def _erase_locked(
    settings: Settings, gallery: Gallery, where: dict[str, str], reason: str, requested_by: str
) -> dict[str, Any]:
    receipt_id = "erasure-" + uuid.uuid4().hex[:16]
    before = {n: gallery.version(n) for n in TABLES}
    found = {n: _matching(gallery, n, where[n]) for n in TABLES}
    image_ids = sorted({i for n in ("images", "faces", "image_embeddings") for i in found[n]["image_id"] if i})
    image_ids += [i for i in found["quarantine"]["item_id"] if len(i) == 64 and i not in image_ids]
    vectors = [v for n in ("faces", "image_embeddings", "probes") for v in found[n]["vector"]]
    removed = {n: delete_keys(gallery, n, KEY[n], found[n][KEY[n]]) for n in TABLES}
    gallery_ids = {i for n in ("faces", "image_embeddings") for i in found[n][KEY[n]]}
    removed["reviews"] = delete_keys(gallery, "reviews", "gallery_id", sorted(gallery_ids))
    _block_reingest(gallery, image_ids, receipt_id)
    purged = {n: purge(gallery, n) for n in (*TABLES, "reviews", "erased")}  # also drops crashed writers' files
    probe_ids = {(k.split("/", 1)[0], k.split("/", 1)[1]) for k in found["probes"]["probe_key"]}
    rewritten = _rewrite_results(settings, gallery_ids, set(image_ids), probe_ids)
    shutil.rmtree(settings.staging_dir, ignore_errors=True)  # files of crashed match runs; we hold the lock
    checks = _checks(settings, gallery, vectors)
    receipt = {
        "receipt_id": receipt_id,
        "erased_at": dt.datetime.now(dt.UTC).isoformat(),
        "requested_by": requested_by,
        "reason_digest": "sha256:" + hashlib.sha256(reason.encode()).hexdigest(),
        "removed_rows": removed,
        "images_blocked_from_reingest": len(image_ids),
        "result_sets_rewritten": rewritten,
        "versions_before": before,
        "versions_after": {n: gallery.version(n) for n in TABLES},
        "purge": purged,
        "checks": checks,
        "ok": all(c["passed"] for c in checks),
    }
    receipt_hash = _write_receipt(settings, receipt)
    AuditLog(settings.audit_dir).append(
        requested_by,
        "erase",
        receipt_id=receipt_id,
        receipt_hash=receipt_hash,
        counts=removed,
        table_versions=receipt["versions_after"],
    )
    if not receipt["ok"]:
        raise GalleryMatchError(f"erasure {receipt_id} ran but a check FAILED: {checks}; see the receipt")
    return receipt | {"receipt_sha256": receipt_hash}


def _matching(gallery: Gallery, name: str, predicate: str) -> dict[str, list[Any]]:
    columns = {
        "images": ["image_id"],
        "faces": ["face_id", "image_id", "vector"],
        "image_embeddings": ["embedding_id", "image_id", "vector"],
        "quarantine": ["quarantine_id", "item_id"],
        "probes": ["probe_key", "vector"],
    }[name]
    empty: dict[str, list[Any]] = {c: [] for c in [*columns, "image_id", "vector"]}
    if not predicate or gallery.open(name) is None:
        return empty
    table = gallery.read(name, columns=columns, where=predicate)
    return empty | {c: table.column(c).to_pylist() for c in columns}


def _block_reingest(gallery: Gallery, image_ids: list[str], receipt_id: str) -> None:
    if not image_ids:
        return
    now = dt.datetime.now(dt.UTC)
    rows = [{"image_id": i, "receipt_id": receipt_id, "erased_at": now} for i in image_ids]
    table = gallery.ensure("erased", ERASED)
    table.merge_insert("image_id").when_not_matched_insert_all().execute(pa.Table.from_pylist(rows, schema=ERASED))


def _rewrite_results(
    settings: Settings, gallery_ids: set[str], image_ids: set[str], probes: set[tuple[str, str]]
) -> list[str]:
    """Each affected run is rewritten without the erased rows, staged and swapped in by renames."""
    rewritten = []
    for manifest in list_runs(settings.results_dir):
        table = read_run(Path(manifest["path"]))
        wl_probes = [p for w, p in probes if w == manifest["watchlist_id"]]
        drop = pc.or_(
            pc.is_in(table["gallery_id"], pa.array(sorted(gallery_ids), pa.string())),
            pc.is_in(table["image_id"], pa.array(sorted(image_ids), pa.string())),
        )
        drop = pc.or_(drop, pc.is_in(table["probe_id"], pa.array(wl_probes, pa.string())))
        if not pc.any(drop).as_py():
            continue
        kept = table.filter(pc.invert(pc.fill_null(drop, False)))
        _swap_run(settings, manifest, kept)
        rewritten.append(manifest["run_id"])
    return rewritten


def _swap_run(settings: Settings, manifest: dict[str, Any], kept: pa.Table) -> None:
    watchlist_id, run_id = manifest["watchlist_id"], manifest["run_id"]
    final, trash = run_dir(settings.results_dir, watchlist_id, run_id), settings.staging_dir / f"old.{run_id}"
    settings.staging_dir.mkdir(parents=True, exist_ok=True)
    final.rename(trash)
    meta = {k: v for k, v in manifest.items() if k not in ("path", "parts", "rows", "notice")}
    meta |= {"candidates": kept.num_rows, "rewritten_after_erasure": True}
    manifest_path(settings.results_dir, watchlist_id, run_id).unlink(missing_ok=True)
    write_result_set(settings.results_dir, settings.staging_dir, watchlist_id, run_id, kept, meta)
    shutil.rmtree(trash)


def scan_for(root: Path, patterns: list[bytes]) -> list[str]:
    """Every file under root that contains any of the byte patterns."""
    hits = []
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        data = path.read_bytes()
        if any(pattern in data for pattern in patterns):
            hits.append(str(path.relative_to(root)))
    return hits


def _checks(settings: Settings, gallery: Gallery, vectors: list[np.ndarray]) -> list[dict[str, Any]]:
    hits = scan_for(settings.home, vector_patterns(vectors)) if vectors else []
    versions = {n: len(t.list_versions()) for n in TABLES if (t := gallery.open(n)) is not None}
    return [
        {
            "check": "byte scan of every file under GALLERYMATCH_HOME for the erased vectors (float32, float16)",
            "vectors": len(vectors),
            "files_with_hits": hits,
            "passed": not hits,
        },
        {"check": "no old table versions left", "versions": versions, "passed": all(v == 1 for v in versions.values())},
    ]


def _write_receipt(settings: Settings, receipt: dict[str, Any]) -> str:
    folder = settings.home / "erasure" / "receipts"
    folder.mkdir(parents=True, exist_ok=True)
    body = json.dumps(receipt, indent=2, sort_keys=True, default=str).encode()
    (folder / f"{receipt['receipt_id']}.json").write_bytes(body)
    return hashlib.sha256(body).hexdigest()

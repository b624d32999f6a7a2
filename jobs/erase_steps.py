"""The pieces of an erasure: what a selector finds, which result sets name the person, their rewrite, the checks."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from lance_tables.erasure import kept_vector_bytes, present, vector_patterns
from lance_tables.store import Gallery
from pipelines.errors import Refused
from pipelines.faults import crash_point
from pipelines.objectstore import ObjectStore
from pipelines.results import list_runs, read_run, sweep, write_result_set
from pipelines.schemas import KEYS
from pipelines.shards import check_id
from pipelines.sql import sql_list
from pipelines.storage import ERASURE, LANCE, MANIFESTS, RESULTS, STAGING, Storage

if TYPE_CHECKING:
    from jobs.erase import Plan
    from pipelines.s3store import S3Store
    from pipelines.settings import Settings

TABLES = ("images", "faces", "image_embeddings", "quarantine", "probes")
VECTOR_TABLES = ("faces", "image_embeddings", "probes")


@dataclass(frozen=True)
class Selector:
    kind: str  # image | subject | source
    value: str

    @property
    def ids(self) -> dict[str, str]:
        return {self.kind: self.value}


@dataclass
class Found:
    keys: dict[str, list[str]] = field(default_factory=dict)
    image_ids: list[str] = field(default_factory=list)
    probes: set[tuple[str, str]] = field(default_factory=set)
    vectors: list[np.ndarray] = field(default_factory=list)


def selectors(image_id: str | None, subject_id: str | None, source_id: str | None) -> Selector:
    given = [(k, v) for k, v in (("image", image_id), ("subject", subject_id), ("source", source_id)) if v]
    if len(given) != 1:
        raise Refused("give exactly one of --image-id, --subject-id, --source")
    kind, value = given[0]
    check_id(f"{kind} id", value)
    return Selector(kind, value)


def _predicates(selector: Selector, image_ids: list[str], quarantine_has_subject: bool) -> dict[str, str]:
    v = sql_list([selector.value])
    photos = sql_list(image_ids) if image_ids else None
    if selector.kind == "image":
        return {"quarantine": f"item_id IN {v}", "probes": f"photo_sha256 IN {v}"}
    column = "subject_id" if selector.kind == "subject" else "source_id"
    by_photo = [f"item_id IN {photos}"] if photos else []
    own = [f"{column} IN {v}"] if (selector.kind == "source" or quarantine_has_subject) else []
    probes = [f"subject_id IN {v}"] if selector.kind == "subject" else []
    probes += [f"photo_sha256 IN {photos}"] if photos else []
    return {"quarantine": " OR ".join(own + by_photo), "probes": " OR ".join(probes)}


def find_rows(gallery: Gallery, selector: Selector) -> Found:
    """Every row about the person: gallery rows first, then quarantine and probe rows of their photos."""
    out = Found()
    column = {"image": "image_id", "subject": "subject_id", "source": "source_id"}[selector.kind]
    where = f"{column} IN {sql_list([selector.value])}"
    for name, key in (("images", "image_id"), ("faces", "face_id"), ("image_embeddings", "embedding_id")):
        columns = list(dict.fromkeys([key, "image_id"] + (["vector"] if name != "images" else [])))
        rows = _read(gallery, name, columns, where)
        out.keys[name] = rows.get(key, [])
        out.image_ids += [i for i in rows.get("image_id", []) if i]
        out.vectors += rows.get("vector", [])
    if selector.kind == "image":
        out.image_ids.append(selector.value)
    out.image_ids = sorted(set(out.image_ids))
    gallery.add_declared_columns("quarantine")  # older tables gain the subject_id column (null) first
    quarantine = gallery.open("quarantine")
    has_subject = quarantine is not None and "subject_id" in quarantine.schema.names
    more = _predicates(selector, out.image_ids, has_subject)
    rows = _read(gallery, "quarantine", ["quarantine_id", "item_id"], more["quarantine"])
    out.keys["quarantine"] = rows.get("quarantine_id", [])
    out.image_ids = sorted(set(out.image_ids) | {i for i in rows.get("item_id", []) if len(i) == 64})
    rows = _read(gallery, "probes", ["probe_key", "vector"], more["probes"])
    out.keys["probes"] = rows.get("probe_key", [])
    out.vectors += rows.get("vector", [])
    out.probes = {(k.split("/", 1)[0], k.split("/", 1)[1]) for k in out.keys["probes"]}
    return out


def _read(gallery: Gallery, name: str, columns: list[str], where: str) -> dict[str, list[Any]]:
    if not where or gallery.open(name) is None:
        return {}
    table = gallery.read(name, columns=columns, where=where)
    return {c: table.column(c).to_pylist() for c in columns} if table.num_columns else {}


def _drop_mask(table: pa.Table, gallery_ids: set[str], image_ids: set[str], probes: list[str]) -> Any:
    drop = pc.or_(
        pc.is_in(table["gallery_id"], pa.array(sorted(gallery_ids), pa.string())),
        pc.is_in(table["image_id"], pa.array(sorted(image_ids), pa.string())),
    )
    drop = pc.or_(drop, pc.is_in(table["probe_id"], pa.array(probes, pa.string())))
    return pc.fill_null(drop, False)


def affected_runs(
    store: ObjectStore, gallery_ids: set[str], image_ids: set[str], probes: set[tuple[str, str]]
) -> list[str]:
    out = []
    for manifest in list_runs(store):
        own = [p for w, p in probes if w == manifest["watchlist_id"]]
        if pc.any(_drop_mask(read_run(store, manifest), gallery_ids, image_ids, own)).as_py():
            out.append(str(manifest["run_id"]))
    return sorted(out)


def rewrite_runs(store: ObjectStore, plan: Plan) -> list[str]:
    """Each run naming the person becomes a new generation without those rows; the old one is deleted.
    Idempotent: a run already rewritten names nobody erased, and `sweep` drops a superseded generation."""
    rewritten = []
    gallery_ids, image_ids = set(plan.gallery_ids), set(plan.image_ids)
    for manifest in list_runs(store):
        own = [p for w, p in plan.probes if w == manifest["watchlist_id"]]
        table = read_run(store, manifest)
        drop = _drop_mask(table, gallery_ids, image_ids, own)
        if not pc.any(drop).as_py():
            continue
        kept = table.filter(pc.invert(drop))
        meta = {k: v for k, v in manifest.items() if k not in ("path", "parts", "rows", "notice", "manifest_key")}
        meta |= {"candidates": kept.num_rows, "rewritten_after_erasure": plan.receipt_id}
        generation = int(manifest.get("generation", 0)) + 1
        write_result_set(store, manifest["watchlist_id"], manifest["run_id"], kept, meta, generation)
        crash_point("erase:after-new-generation")  # both generations exist; the old one still names the person
        rewritten.append(str(manifest["run_id"]))
    sweep(store)  # the superseded generations' parts and manifests go now
    return sorted(set(rewritten) | set(plan.runs))


CHUNK = 8 * 1024 * 1024  # bytes read at a time by the scan
# Areas of a home whose deleted or overwritten objects may hold a person's bytes: their noncurrent versions go
# when erasure purges object versions (the audit trail holds no biometrics and its history is never purged).
VERSIONED_AREAS = (LANCE, RESULTS, MANIFESTS, STAGING, f"{ERASURE}/journal")


@dataclass(frozen=True)
class StoredObject:
    """One stored byte sequence under a home: an object, or a noncurrent version of one (S3)."""

    key: str  # relative to the home
    version_id: str | None = None  # None: the current object

    @property
    def label(self) -> str:
        return self.key if self.version_id is None else f"{self.key}?versionId={self.version_id}"


def scan_for(storage: Storage, patterns: list[bytes], skip: set[str] | None = None) -> list[str]:
    """Every object (and noncurrent object version) under the home holding any of the byte patterns."""
    return sorted({label for label, _ in scan_hits(storage, patterns, skip or set())})


def scan_hits(storage: Storage, patterns: list[bytes], skip: set[str]) -> list[tuple[str, int]]:
    """(object label, pattern index) for every pattern found in every stored object under the home: every file
    of a local home (temporary files included), every object of an S3 home and, when its bucket has or had
    versioning, every noncurrent version (`key?versionId=...`). `skip` holds keys relative to the home."""
    if not patterns:
        return []
    hits = []
    for item in stored_objects(storage):
        if item.key in skip:
            continue
        found = find_in_chunks(_chunks(storage, item), patterns)
        hits += [(item.label, i) for i in sorted(found)]
    return hits


def find_in_chunks(chunks: Iterable[bytes], patterns: list[bytes]) -> set[int]:
    """Which patterns occur in the concatenation of `chunks` (each chunk is searched with the last
    max(len(pattern)) - 1 bytes of the previous one in front, so a pattern across a boundary is found)."""
    overlap = max(len(p) for p in patterns) - 1
    found: set[int] = set()
    tail = b""
    for chunk in chunks:
        data = tail + chunk
        found |= {i for i, p in enumerate(patterns) if i not in found and p in data}
        if len(found) == len(patterns):
            break
        tail = data[-overlap:] if overlap else b""
    return found


def stored_objects(storage: Storage) -> Iterator[StoredObject]:
    """Everything stored under the home, sorted by key; noncurrent versions only on a versioned bucket."""
    if not storage.is_s3:
        import pyarrow.fs as pafs

        root = storage.fs_path()
        selector = pafs.FileSelector(root, recursive=True, allow_not_found=True)
        infos = storage.fs.get_file_info(selector)
        keys = sorted(i.path[len(root) :].lstrip("/") for i in infos if i.type == pafs.FileType.File)
        yield from (StoredObject(k) for k in keys)
        return
    store = _s3(storage)
    if store.versioning() is None:  # never versioned: the listing is every stored byte
        yield from (StoredObject(k) for k in sorted(store.sizes("")))
        return
    versions = [v for v in store.versions("") if not v.delete_marker]
    for v in sorted(versions, key=lambda v: (v.key, not v.is_latest, v.version_id)):
        yield StoredObject(v.key, None if v.is_latest else v.version_id)


def _chunks(storage: Storage, item: StoredObject) -> Iterator[bytes]:
    """The bytes of one stored object, CHUNK at a time (an object gone since the listing yields nothing)."""
    if item.version_id is None:
        try:
            stream = storage.fs.open_input_stream(storage.fs_path(item.key))
        except FileNotFoundError:
            return
        with stream:
            while chunk := stream.read(CHUNK):
                yield bytes(chunk)
        return
    store = _s3(storage)
    full = store.location(item.key).removeprefix(f"s3://{store.bucket}/")
    body = store.client.get_object(Bucket=store.bucket, Key=full, VersionId=item.version_id)["Body"]
    try:
        yield from body.iter_chunks(CHUNK)
    finally:
        body.close()


def _s3(storage: Storage) -> S3Store:
    from pipelines.s3store import S3Store

    store = storage.store
    assert isinstance(store, S3Store)
    return store


def bucket_versioning(storage: Storage) -> str | None:
    """'Enabled' or 'Suspended' when the home's bucket keeps noncurrent versions; None (local or never)."""
    return _s3(storage).versioning() if storage.is_s3 else None


def purge_versions(storage: Storage, areas: tuple[str, ...] = VERSIONED_AREAS) -> dict[str, int]:
    """Permanently delete every noncurrent version and delete marker under `areas` of the home.

    Idempotent and safe to kill anywhere: first every noncurrent data version goes, then, listed again, the
    delete markers of keys that no longer have any noncurrent data version. A marker is never removed while an
    older version of its key exists, so an interrupted purge cannot bring a deleted object back."""
    if bucket_versioning(storage) is None:
        return {"noncurrent_removed": 0, "delete_markers_removed": 0}
    store = _s3(storage)
    old = [v for a in areas for v in store.versions(a) if not v.is_latest and not v.delete_marker]
    store.delete_versions(old)
    crash_point("versions:between-passes")
    listed = [v for a in areas for v in store.versions(a)]
    holding = {v.key for v in listed if not v.delete_marker and not v.is_latest}
    markers = [v for v in listed if v.delete_marker and v.key not in holding]
    store.delete_versions(markers)
    return {"noncurrent_removed": len(old), "delete_markers_removed": len(markers)}


def drop_with_versions(storage: Storage, key: str) -> None:
    """Delete `key` and, on a versioned bucket, every version of it (nothing keeps its bytes)."""
    if bucket_versioning(storage) is None:
        storage.store.delete(key)
        return
    store = _s3(storage)  # a delete by version id leaves no marker: nothing to bring back if killed half-way
    store.delete_versions([v for v in store.versions(key[: key.rfind("/") + 1]) if v.key == key])


def checks(settings: Settings, gallery: Gallery, plan: Plan, vectors: list[np.ndarray]) -> list[dict[str, Any]]:
    patterns = vector_patterns(vectors)
    shared = kept_vector_bytes(gallery, VECTOR_TABLES, {patterns[i] for i in range(0, len(patterns), 2)})
    hits = scan_hits(settings.storage, patterns, {plan.prefix + "vectors.npz"})
    kept = {i for i in range(len(patterns)) if patterns[i - i % 2] in shared}
    failing = sorted({f for f, i in hits if i not in kept})
    detail = str(failing)
    if any("?versionId=" in f for f in failing):
        detail += (
            " (noncurrent object versions of the versioned bucket still hold the bytes: with "
            "GALLERYMATCH_ERASE_VERSIONED_BUCKET=purge-versions the rerun removes them)"
        )
    left = {n: present(gallery, n, KEYS[n], plan.keys.get(n, [])) for n in plan.keys}
    versions = {n: len(t.list_versions()) for n in TABLES if (t := gallery.open(n)) is not None}
    named = affected_runs(settings.store, set(plan.gallery_ids), set(plan.image_ids), {(w, p) for w, p in plan.probes})
    return [
        {
            "check": "byte scan of every object (and every noncurrent object version) under GALLERYMATCH_HOME "
            "for the erased vectors (float32, float16)",
            "vectors": len(vectors),
            "files_with_hits": failing,
            "kept_rows_with_the_same_bytes": len(shared),
            "files_with_kept_rows_bytes": sorted({f for f, i in hits if i in kept}),
            "passed": not failing and len(vectors) == plan.vectors,
            "detail": "the erased vectors to scan for are missing" if len(vectors) != plan.vectors else detail,
        },
        {"check": "no planned row left in any table", "left": left, "passed": not any(left.values()), "detail": ""},
        {"check": "no result set names the person", "runs": named, "passed": not named, "detail": str(named)},
        {
            "check": "no old table versions left",
            "versions": versions,
            "passed": all(v == 1 for v in versions.values()),
            "detail": str(versions),
        },
    ]

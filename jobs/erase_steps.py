"""The pieces of an erasure: what a selector finds, which result sets name the person, their rewrite, the checks."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
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

if TYPE_CHECKING:
    from jobs.erase import Plan
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


def scan_for(root: Path, patterns: list[bytes], skip: set[Path] | None = None) -> list[str]:
    """Every file under root that contains any of the byte patterns."""
    return sorted({path for path, _ in scan_hits(root, patterns, skip or set())})


def scan_hits(root: Path, patterns: list[bytes], skip: set[Path]) -> list[tuple[str, int]]:
    """(file, pattern index) for every pattern found in every file under root."""
    hits = []
    for path in sorted(p for p in root.rglob("*") if p.is_file() and p not in skip):
        data = path.read_bytes()
        hits += [(str(path.relative_to(root)), i) for i, pattern in enumerate(patterns) if pattern in data]
    return hits


def checks(settings: Settings, gallery: Gallery, plan: Plan, vectors: list[np.ndarray]) -> list[dict[str, Any]]:

    patterns = vector_patterns(vectors)
    shared = kept_vector_bytes(gallery, VECTOR_TABLES, {patterns[i] for i in range(0, len(patterns), 2)})
    journal = {Path(settings.store.location(plan.prefix + "vectors.npz"))}
    hits = scan_hits(settings.local_home, patterns, journal)
    kept = {i for i in range(len(patterns)) if patterns[i - i % 2] in shared}
    failing = sorted({f for f, i in hits if i not in kept})
    left = {n: present(gallery, n, KEYS[n], plan.keys.get(n, [])) for n in plan.keys}
    versions = {n: len(t.list_versions()) for n in TABLES if (t := gallery.open(n)) is not None}
    named = affected_runs(settings.store, set(plan.gallery_ids), set(plan.image_ids), {(w, p) for w, p in plan.probes})
    return [
        {
            "check": "byte scan of every file under GALLERYMATCH_HOME for the erased vectors (float32, float16)",
            "vectors": len(vectors),
            "files_with_hits": failing,
            "kept_rows_with_the_same_bytes": len(shared),
            "files_with_kept_rows_bytes": sorted({f for f, i in hits if i in kept}),
            "passed": not failing and len(vectors) == plan.vectors,
            "detail": "the erased vectors to scan for are missing" if len(vectors) != plan.vectors else str(failing),
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

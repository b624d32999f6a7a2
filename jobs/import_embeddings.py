"""The import-embeddings job: precomputed vectors into the gallery, bad rows quarantined."""

from __future__ import annotations

import datetime as dt
import hashlib
from pathlib import Path
from typing import Any, Literal

import numpy as np

from lance_tables.sources import require_registered
from lance_tables.store import Gallery
from pipelines.audit import table_versions
from pipelines.delta import IMPORTED_WEIGHTS
from pipelines.embed import embedding_id
from pipelines.errors import Refused
from pipelines.importer import (
    ImportBatch,
    check_minor_column,
    file_digest,
    open_embeddings,
    summarise,
    validate_batch,
)
from pipelines.models import FACE_DIM, check_dim, check_model_id, face_spec, image_spec
from pipelines.schemas import FACES, QUARANTINE, image_embeddings_schema, to_arrow
from pipelines.settings import Settings
from pipelines.shards import check_id

Modality = Literal["face", "image"]


def expected_dim(gallery: Gallery, model_id: str, modality: Modality, dim: int | None) -> int:
    """Known models fix the width; otherwise --dim (1..MAX_DIM), otherwise the table's width."""
    if dim is not None:
        check_dim(dim)
    if modality == "face":
        known = face_spec(model_id).dim if model_id.startswith("facenet-") else None
        _agree(model_id, known, dim)
        width = known or dim or FACE_DIM
        if width != FACE_DIM:
            raise Refused(f"the faces table holds {FACE_DIM}-d vectors; {model_id!r} is {width}-d")
        return width
    table = gallery.open("image_embeddings")
    known = image_spec(model_id).dim if "/" in model_id or model_id == "clip-untrained" else None
    _agree(model_id, known, dim)
    have = table.schema.field("vector").type.list_size if table is not None else None
    image_width = known or dim or have
    if image_width is None:
        raise Refused(f"cannot tell the width of {model_id!r} vectors: pass --dim")
    if have is not None and have != image_width:
        raise Refused(f"the image_embeddings table holds {have}-d vectors; {model_id!r} is {image_width}-d")
    return int(image_width)


def _agree(model_id: str, known: int | None, dim: int | None) -> None:
    if known is not None and dim is not None and dim != known:
        raise Refused(f"--dim {dim} disagrees with model {model_id!r}, which gives {known}-d vectors: drop --dim")


def run_import(
    settings: Settings,
    path: str | Path,
    source_id: str,
    model_id: str,
    modality: Modality,
    dim: int | None,
    allow_undeclared_minors: bool = False,
) -> dict[str, Any]:
    """Under the writer lease (Lance's merge_insert does not stop two writers inserting the same new keys).

    `path` is a local file or an s3:// URI (read with the AWS_* variables)."""
    from jobs.session import writer_session

    check_model_id(model_id)
    check_id("source id", source_id)
    with writer_session(settings, "import-embeddings") as log:
        gallery = Gallery(settings.storage)
        require_registered(gallery, {source_id})
        handle = open_embeddings(path)
        minors = check_minor_column(handle, path, allow_undeclared_minors)
        width = expected_dim(gallery, model_id, modality, dim)
        key = file_digest(path)
        fields: dict[str, object] = {"source_id": source_id, "model_id": model_id, "inputs_digest": f"sha256:{key}"}
        fields |= {"allow_undeclared_minors": True} if allow_undeclared_minors else {}
        with log.action(settings.actor, "import-embeddings", **fields) as op:
            seen: set[str] = set()
            imported, quarantined, offset = 0, [], 0
            for batch in handle.iter_batches(batch_size=65536):
                result = validate_batch(batch, width, seen, key, offset, minors=minors)
                offset += batch.num_rows
                _commit(gallery, result, source_id, model_id, modality, width, key)
                imported += len(result.rows)
                quarantined += result.quarantine
            summary = summarise(quarantined, imported, offset)
            op.record(
                counts={"rows": offset, "imported": imported, "quarantined": len(quarantined)},
                table_versions=table_versions(gallery, ("faces", "image_embeddings", "quarantine")),
            )
    return summary | {
        "file": str(path),
        "source_id": source_id,
        "model_id": model_id,
        "modality": modality,
        "dim": width,
        "table_version": gallery.version("faces" if modality == "face" else "image_embeddings"),
    }


def _commit(
    gallery: Gallery, result: ImportBatch, source_id: str, model_id: str, modality: Modality, dim: int, key: str
) -> None:
    now = dt.datetime.now(dt.UTC)
    qrows = [
        q
        | {
            "quarantine_id": hashlib.sha256(f"{key}|{q['item_id']}|import".encode()).hexdigest()[:32],
            "source_id": source_id,
            "uri": None,
            "stage": "import",
            "reason": str(q["reason"]),
            "shard_key": key,
            "quarantined_at": now,
        }
        for q in result.quarantine
    ]
    gallery.upsert("quarantine", to_arrow(qrows, QUARANTINE))
    if not result.rows:
        return
    digest = f"{IMPORTED_WEIGHTS}sha256:{key}"
    id_col = "face_id" if modality == "face" else "embedding_id"
    rows = [
        r
        | {
            id_col: embedding_id(f"{source_id}|{r['record_id']}", model_id),
            "image_id": None,
            "source_id": source_id,
            "model_id": model_id,
            "weights_digest": digest,
            "origin": "imported",
            "shard_key": key,
            "ingested_at": now,
        }
        for r in result.rows
    ]
    schema = FACES if modality == "face" else image_embeddings_schema(dim)
    name = "faces" if modality == "face" else "image_embeddings"
    if name == "image_embeddings":
        gallery.ensure_image_embeddings(dim)
    gallery.upsert(name, to_arrow(rows, schema, np.stack(result.vectors)))

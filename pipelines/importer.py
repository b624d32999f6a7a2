"""Bring-your-own embeddings: validate each row (id, width, finite, non-zero); bad rows are quarantined."""

from __future__ import annotations

import datetime as dt
import hashlib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipelines.errors import Refused
from pipelines.vocab import Reason

BATCH_ROWS = 65536


@dataclass
class ImportBatch:
    """Valid rows (unit-length float32 vectors) and quarantine rows of one record batch."""

    rows: list[dict[str, Any]] = field(default_factory=list)
    vectors: list[np.ndarray] = field(default_factory=list)
    quarantine: list[dict[str, Any]] = field(default_factory=list)


def open_embeddings(path: Path, id_column: str = "record_id") -> pq.ParquetFile:
    """Open the file and refuse, naming what is missing, when it is not in the contract's format."""
    if not path.is_file():
        raise Refused(f"{path} does not exist")
    try:
        handle = pq.ParquetFile(path)
    except Exception as exc:
        raise Refused(f"{path} is not a readable Parquet file: {exc}") from exc
    names = handle.schema_arrow.names
    missing = [c for c in (id_column, "embedding") if c not in names]
    if missing:
        raise Refused(f"{path} lacks the required column(s) {', '.join(missing)} (contract: {id_column}, embedding)")
    if (
        not pa.types.is_list(handle.schema_arrow.field("embedding").type)
        and not pa.types.is_fixed_size_list(handle.schema_arrow.field("embedding").type)
        and not pa.types.is_large_list(handle.schema_arrow.field("embedding").type)
    ):
        raise Refused(f"{path}: column 'embedding' must be a list of floats")
    return handle


def file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def validate_batch(
    batch: pa.RecordBatch, dim: int, seen: set[str], file_key: str, offset: int, id_column: str = "record_id"
) -> ImportBatch:
    """Check every row; `seen` carries ids across batches to catch duplicates."""
    out = ImportBatch()
    ids = batch.column(id_column).cast(pa.string()).to_pylist()
    subjects = _optional(batch, "subject_id", pa.string())
    minors = _optional(batch, "minor", pa.bool_())
    embeddings = batch.column("embedding")
    lengths = pc.list_value_length(embeddings).to_pylist()
    flat = np.asarray(pc.list_flatten(embeddings).cast(pa.float64()).to_numpy(zero_copy_only=False))
    starts = np.concatenate([[0], np.cumsum([n or 0 for n in lengths])])
    for i, (rid, length) in enumerate(zip(ids, lengths, strict=True)):
        item = rid or f"row-{file_key[:16]}-{offset + i}"
        problem = _row_problem(rid, length, dim, seen)
        vector = None if problem else flat[starts[i] : starts[i] + dim]
        if vector is not None:
            problem = _vector_problem(vector)
        if problem:
            out.quarantine.append({"item_id": item, "reason": problem[0], "detail": problem[1]})
            continue
        seen.add(rid)
        assert vector is not None
        out.vectors.append((vector / np.linalg.norm(vector)).astype(np.float32))
        out.rows.append({id_column: rid, "subject_id": subjects[i], "minor": bool(minors[i] or False)})
    return out


def _optional(batch: pa.RecordBatch, name: str, kind: pa.DataType) -> list[Any]:
    if name not in batch.schema.names:
        return [None] * batch.num_rows
    return batch.column(name).cast(kind).to_pylist()


def _row_problem(rid: str | None, length: int | None, dim: int, seen: set[str]) -> tuple[Reason, str] | None:
    if not rid:
        return Reason.MISSING_FIELD, "the id is empty"
    if rid in seen:
        return Reason.DUPLICATE_RECORD, f"id {rid!r} appears more than once; the first row was kept"
    if length is None:
        return Reason.MISSING_FIELD, "embedding is null"
    if length != dim:
        return Reason.WRONG_DIMENSION, f"embedding has {length} values, expected {dim}"
    return None


def _vector_problem(vector: np.ndarray) -> tuple[Reason, str] | None:
    if not np.all(np.isfinite(vector)):
        return Reason.NON_FINITE, "embedding contains NaN or infinity"
    norm = float(np.linalg.norm(vector))
    if norm == 0.0 or not np.isfinite(norm) or not np.isfinite(np.float32(1.0 / norm)):
        return Reason.ZERO_VECTOR, "embedding has zero length; cosine similarity is undefined"
    return None


def summarise(quarantine: list[dict[str, Any]], imported: int, rows: int) -> dict[str, Any]:
    reasons = Counter(q["reason"].value if isinstance(q["reason"], Reason) else q["reason"] for q in quarantine)
    return {
        "rows": rows,
        "imported": imported,
        "quarantined": sum(reasons.values()),
        "quarantine_reasons": dict(sorted(reasons.items())),
        "finished_at": dt.datetime.now(dt.UTC).isoformat(),
    }

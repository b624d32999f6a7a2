"""Bring-your-own embeddings: validate each row (id, width, finite, non-zero); bad rows are quarantined."""

from __future__ import annotations

import datetime as dt
import hashlib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipelines.errors import Refused
from pipelines.shards import ID_RULE, is_valid_id, minor_column_state
from pipelines.storage import filesystem_for
from pipelines.vocab import Reason

BATCH_ROWS = 65536
MinorPolicy = Literal["required", "allow-undeclared", "ignore"]


@dataclass
class ImportBatch:
    """Valid rows (unit-length float32 vectors) and quarantine rows of one record batch."""

    rows: list[dict[str, Any]] = field(default_factory=list)
    vectors: list[np.ndarray] = field(default_factory=list)
    quarantine: list[dict[str, Any]] = field(default_factory=list)


def open_embeddings(path: str | Path, id_column: str = "record_id") -> pq.ParquetFile:
    """Open the file (a local path or an s3:// URI) and refuse, naming what is missing, when it is not in
    the contract's format."""
    import pyarrow.fs as pafs

    fs, where = filesystem_for(path)
    if fs.get_file_info(where).type != pafs.FileType.File:
        raise Refused(f"{path} does not exist")
    try:
        handle = pq.ParquetFile(fs.open_input_file(where))
    except Exception as exc:
        raise Refused(f"{path} is not a readable Parquet file: {exc}") from exc
    names = handle.schema_arrow.names
    missing = [c for c in (id_column, "embedding") if c not in names]
    if missing:
        raise Refused(f"{path} lacks the required column(s) {', '.join(missing)} (contract: {id_column}, embedding)")
    _check_embedding_type(path, handle.schema_arrow.field("embedding").type)
    for name in (id_column, "subject_id"):
        if name in names and not _id_type(handle.schema_arrow.field(name).type):
            kind = handle.schema_arrow.field(name).type
            raise Refused(f"{path}: column {name!r} is {kind}; ids are strings: write it as a string column")
    return handle


def _check_embedding_type(path: str | Path, kind: pa.DataType) -> None:
    is_list = pa.types.is_list(kind) or pa.types.is_large_list(kind) or pa.types.is_fixed_size_list(kind)
    values = kind.value_type if is_list else None
    if values is None or not (pa.types.is_floating(values) or pa.types.is_integer(values)):
        raise Refused(
            f"{path}: column 'embedding' is {kind}; it must be a list of floats (list<float32> or "
            "fixed_size_list<float32>): convert the vectors to numbers and write the file again"
        )


def _id_type(kind: pa.DataType) -> bool:
    checks = (pa.types.is_string, pa.types.is_large_string, pa.types.is_integer, pa.types.is_null)
    return any(check(kind) for check in checks)


def check_minor_column(handle: pq.ParquetFile, path: str | Path, allow_undeclared_minors: bool = False) -> MinorPolicy:
    """Fail closed on minors: a file must declare a bool `minor` column, unless the operator says otherwise."""
    state = minor_column_state(handle.schema_arrow)
    if state == "wrong-type":
        kind = handle.schema_arrow.field("minor").type
        raise Refused(f"{path}: column 'minor' is {kind}; it must be bool (true/false): convert it and import again")
    if state == "absent" and not allow_undeclared_minors:
        raise Refused(
            f"{path} has no 'minor' column, so no row could be kept out of non-child-protection searches: add "
            "a bool 'minor' column (true for a child), or pass allow_undeclared_minors (--allow-undeclared-minors) "
            "to import every row as not a minor"
        )
    return "allow-undeclared" if state == "absent" else "required"


def file_digest(path: str | Path) -> str:
    """sha256 of the file's bytes (a local path or an s3:// URI)."""
    fs, where = filesystem_for(path)
    digest = hashlib.sha256()
    with fs.open_input_stream(where) as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def validate_batch(
    batch: pa.RecordBatch,
    dim: int,
    seen: set[str],
    file_key: str,
    offset: int,
    id_column: str = "record_id",
    minors: MinorPolicy = "required",
) -> ImportBatch:
    """Check every row; `seen` carries ids across batches to catch duplicates.

    `minors`: "required" quarantines a row whose minor flag is null or absent (MINOR_UNKNOWN),
    "allow-undeclared" takes a file without the column as all adults, "ignore" (probes) never reads it."""
    out = ImportBatch()
    ids = batch.column(id_column).cast(pa.string()).to_pylist()
    subjects = _optional(batch, "subject_id", pa.string())
    flags = _minor_flags(batch, minors)
    embeddings = batch.column("embedding")
    lengths = pc.list_value_length(embeddings).to_pylist()
    flat = np.asarray(pc.list_flatten(embeddings).cast(pa.float64()).to_numpy(zero_copy_only=False))
    starts = np.concatenate([[0], np.cumsum([n or 0 for n in lengths])])
    for i, (rid, length) in enumerate(zip(ids, lengths, strict=True)):
        problem = _row_problem(rid, length, dim, seen) or _meta_problem(subjects[i], flags[i])
        vector = None if problem else flat[starts[i] : starts[i] + dim]
        problem = problem or _vector_problem(vector)
        if problem:
            out.quarantine.append(_quarantine_row(rid, subjects[i], f"row-{file_key[:16]}-{offset + i}", *problem))
            continue
        seen.add(rid)
        assert vector is not None
        out.vectors.append((vector / np.linalg.norm(vector)).astype(np.float32))
        out.rows.append({id_column: rid, "subject_id": subjects[i], "minor": bool(flags[i])})
    return out


def _quarantine_row(rid: str | None, subject: str | None, fallback: str, reason: Reason, detail: str) -> dict[str, Any]:
    """Only ids erasure could later be asked for are stored; others give way to the file's row number."""
    return {
        "item_id": rid if is_valid_id(rid) else fallback,
        "subject_id": subject if is_valid_id(subject) else None,
        "reason": reason,
        "detail": detail,
    }


def _optional(batch: pa.RecordBatch, name: str, kind: pa.DataType) -> list[Any]:
    if name not in batch.schema.names:
        return [None] * batch.num_rows
    return batch.column(name).cast(kind).to_pylist()


def _minor_flags(batch: pa.RecordBatch, minors: MinorPolicy) -> list[bool | None]:
    if minors == "ignore" or ("minor" not in batch.schema.names and minors == "allow-undeclared"):
        return [False] * batch.num_rows
    return _optional(batch, "minor", pa.bool_())


def _row_problem(rid: str | None, length: int | None, dim: int, seen: set[str]) -> tuple[Reason, str] | None:
    if not rid:
        return Reason.MISSING_FIELD, "the id is empty"
    if not is_valid_id(rid):
        return Reason.INVALID_ID, f"the id is not a valid id ({ID_RULE}); the value is not stored"
    if rid in seen:
        return Reason.DUPLICATE_RECORD, f"id {rid!r} appears more than once; the first row was kept"
    if length is None:
        return Reason.MISSING_FIELD, "embedding is null"
    if length != dim:
        return Reason.WRONG_DIMENSION, f"embedding has {length} values, expected {dim}"
    return None


def _meta_problem(subject: str | None, minor: bool | None) -> tuple[Reason, str] | None:
    if subject is not None and not is_valid_id(subject):
        return Reason.INVALID_ID, (
            f"subject_id is not a valid id ({ID_RULE}), so it could never be erased by subject; "
            "fix it and import again (the value is not stored)"
        )
    if minor is None:
        return Reason.MINOR_UNKNOWN, "the minor flag is null: set true or false for this row and import again"
    return None


def _vector_problem(vector: np.ndarray | None) -> tuple[Reason, str] | None:
    if vector is None:
        return None
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

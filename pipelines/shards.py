"""Parquet image shards: pack a folder (bytes as-is, one row per distinct sha256) and read shards back."""

from __future__ import annotations

import csv
import datetime as dt
import hashlib
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pyarrow as pa
import pyarrow.parquet as pq

from pipelines.errors import Refused
from pipelines.schemas import SHARD_SCHEMA
from pipelines.vocab import Reason

REQUIRED_COLUMNS = ("image_id", "image", "source_id")
ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")  # matched in full, never searched
ID_RULE = "1-64 letters, digits, '.', '_' or '-', starting with a letter or digit"


class ShardProblem(ValueError):
    """A shard that cannot be ingested at all: quarantined whole with this reason."""

    def __init__(self, reason: Reason, detail: str):
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


def is_valid_id(value: object) -> bool:
    """The one id grammar: every stored id must be one that erasure and predicates accept."""
    return isinstance(value, str) and ID_PATTERN.fullmatch(value) is not None


def check_id(kind: str, value: str) -> str:
    """Opaque ids are short tokens: safe in paths, hive partitions and SQL predicates."""
    if not is_valid_id(value):
        raise Refused(f"{kind} {_shown(value)} is not a valid id: use {ID_RULE}")
    return value


def _shown(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


@dataclass
class RowMeta:
    """Per-file metadata from the optional CSV given to `pack --metadata`."""

    subject_id: str | None = None
    minor: bool | None = None
    captured_at: dt.datetime | None = None


@dataclass
class PackReport:
    """What `pack` did; nothing it saw is left out."""

    files: int = 0
    distinct: int = 0
    duplicates: int = 0
    duplicate_of: dict[str, str] = field(default_factory=dict)
    oversize: list[str] = field(default_factory=list)
    skipped_hidden: list[str] = field(default_factory=list)
    shards: list[str] = field(default_factory=list)
    bytes: int = 0


def sha256_file(path: Path) -> tuple[str, int]:
    digest, size = hashlib.sha256(), 0
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
            size += len(block)
    return digest.hexdigest(), size


def list_images(images_dir: Path, report: PackReport) -> list[Path]:
    """Regular files under the folder in a deterministic order; hidden files are listed, not packed."""
    if not images_dir.is_dir():
        raise Refused(f"{images_dir} is not a folder")
    found = []
    for path in sorted(images_dir.rglob("*"), key=lambda p: p.relative_to(images_dir).as_posix()):
        rel = path.relative_to(images_dir)
        if any(part.startswith(".") for part in rel.parts):
            if path.is_file():
                report.skipped_hidden.append(rel.as_posix())
            continue
        if path.is_file():
            found.append(path)
    return found


def pack_folder(
    images_dir: Path,
    shards_dir: Path,
    source_id: str,
    rows_per_shard: int,
    max_bytes: int,
    metadata: dict[str, RowMeta] | None = None,
    default_minor: bool | None = None,
) -> PackReport:
    """Write the folder's images as Parquet shards under SHARDS_DIR/source_id=<id>/.

    `default_minor` is the operator's explicit statement for every image whose minor flag the metadata
    does not give (not in the CSV, or a blank `minor` cell); None leaves it null, and ingest quarantines
    such rows (MINOR_UNKNOWN): nobody is silently taken for an adult.
    """
    check_id("source id", source_id)
    report = PackReport()
    metadata = metadata or {}
    rows: list[dict[str, object]] = []
    seen: dict[str, str] = {}
    for path in list_images(images_dir, report):
        rel = path.relative_to(images_dir).as_posix()
        report.files += 1
        image_id, size = sha256_file(path)
        if image_id in seen:
            report.duplicates += 1
            report.duplicate_of[rel] = seen[image_id]
            continue
        seen[image_id] = rel
        report.bytes += size
        meta = _with_default_minor(metadata.get(rel, RowMeta()), default_minor)
        rows.append(_row(path, rel, image_id, size, source_id, max_bytes, meta, report))
    report.distinct = len(rows)
    out_dir = shards_dir / f"source_id={source_id}"
    for start in range(0, len(rows), rows_per_shard):
        report.shards.append(str(_write_shard(out_dir, rows[start : start + rows_per_shard])))
    return report


def _with_default_minor(meta: RowMeta, default_minor: bool | None) -> RowMeta:
    if meta.minor is not None or default_minor is None:
        return meta
    return RowMeta(meta.subject_id, default_minor, meta.captured_at)


def _row(
    path: Path, rel: str, image_id: str, size: int, source_id: str, max_bytes: int, meta: RowMeta, report: PackReport
) -> dict[str, object]:
    oversize = size > max_bytes
    if oversize:
        report.oversize.append(rel)
    return {
        "image_id": image_id,
        "image": None if oversize else path.read_bytes(),
        "uri": rel,
        "source_id": source_id,
        "captured_at": meta.captured_at,
        "minor": meta.minor,
        "subject_id": meta.subject_id,
        "num_bytes": size,
        "pack_error": Reason.TOO_LARGE_BYTES.value if oversize else None,
    }


def _write_shard(out_dir: Path, rows: list[dict[str, object]]) -> Path:
    """Content-named, written to a temporary name and renamed: a crash never leaves half a shard."""
    out_dir.mkdir(parents=True, exist_ok=True)
    name = hashlib.sha256("".join(str(r["image_id"]) for r in rows).encode()).hexdigest()[:20]
    final = out_dir / f"shard-{name}.parquet"
    tmp = out_dir / f".tmp-{name}-{os.getpid()}.parquet"
    pq.write_table(pa.Table.from_pylist(rows, schema=SHARD_SCHEMA), tmp, row_group_size=64)
    os.replace(tmp, final)
    return final


def read_metadata_csv(path: Path) -> dict[str, RowMeta]:
    """CSV with a `path` column (relative to the images folder) and optional subject_id, minor, captured_at."""
    out: dict[str, RowMeta] = {}
    with path.open(newline="") as handle:
        reader = csv.DictReader(handle)
        if reader.fieldnames is None or "path" not in reader.fieldnames:
            raise Refused(f"{path}: the metadata CSV needs a 'path' column")
        for line, rec in enumerate(reader, start=2):
            out[rec["path"]] = _meta(rec, path, line)
    return out


def _meta(rec: dict[str, str], path: Path, line: int) -> RowMeta:
    minor_text = (rec.get("minor") or "").strip().lower()
    if minor_text not in ("", "true", "false", "1", "0", "yes", "no"):
        raise Refused(f"{path}:{line}: minor must be true or false, got {minor_text!r}")
    captured = (rec.get("captured_at") or "").strip()
    try:
        when = dt.datetime.fromisoformat(captured) if captured else None
    except ValueError as exc:
        raise Refused(f"{path}:{line}: captured_at is not an ISO date/time: {captured!r}") from exc
    if when is not None and when.tzinfo is None:
        when = when.replace(tzinfo=dt.UTC)
    subject = (rec.get("subject_id") or "").strip() or None
    if subject is not None:
        check_id("subject id", subject)
    return RowMeta(subject, minor_text in ("true", "1", "yes") if minor_text else None, when)


def find_shards(shards_dir: Path) -> list[Path]:
    """Every shard file under a folder (or the file itself), in a deterministic order."""
    if shards_dir.is_file():
        return [shards_dir]
    if not shards_dir.is_dir():
        raise Refused(f"{shards_dir} is neither a shard file nor a folder of shards")
    files = [p for p in shards_dir.rglob("*.parquet") if not p.name.startswith(".")]
    return sorted(files, key=lambda p: p.relative_to(shards_dir).as_posix())


def shard_key(path: Path) -> str:
    """A shard's identity is its content: renaming or moving it does not make it new."""
    return sha256_file(path)[0]


def shard_sources(path: Path) -> set[str]:
    """Distinct source ids a shard names (empty when it cannot be read; ingest quarantines it then)."""
    try:
        column = pq.read_table(path, columns=["source_id"]).column("source_id")
    except Exception:  # noqa: BLE001 - unreadable shards are reported by the ingest, not here
        return set()
    return {v for v in column.to_pylist() if v is not None}


def read_shard(path: Path, allow_undeclared_minors: bool = False) -> pa.Table:
    """Read one shard, columns conformed to SHARD_SCHEMA; raises ShardProblem when it cannot be ingested.

    A shard without a `minor` column is refused (MINORS_UNDECLARED) unless the operator explicitly allows
    it, and then every row is taken as not a minor.
    """
    table = pq.read_table(path)
    missing = [c for c in REQUIRED_COLUMNS if c not in table.column_names]
    if missing:
        raise ShardProblem(Reason.BAD_SHARD, f"missing required column(s): {', '.join(missing)}")
    state = minor_column_state(table.schema)
    if state == "absent" and not allow_undeclared_minors:
        raise ShardProblem(Reason.MINORS_UNDECLARED, MINORS_UNDECLARED_FIX)
    if state == "absent":
        table = table.append_column(SHARD_SCHEMA.field("minor"), pa.array([False] * table.num_rows, pa.bool_()))
    return _conformed(table)


MINORS_UNDECLARED_FIX = (
    "the shard has no 'minor' column, so nobody in it can be kept out of non-child-protection searches: "
    "re-pack it with a minor flag per image (pack --metadata with a minor column, or pack --minor-default), "
    "or ingest with allow_undeclared_minors (--allow-undeclared-minors) to take every row as not a minor"
)


def minor_column_state(schema: pa.Schema) -> Literal["declared", "absent", "wrong-type"]:
    """Whether a file declares minors: a bool column (an all-null column counts: its rows are unknown)."""
    if "minor" not in schema.names:
        return "absent"
    kind = schema.field("minor").type
    return "declared" if pa.types.is_boolean(kind) or pa.types.is_null(kind) else "wrong-type"


def _conformed(table: pa.Table) -> pa.Table:
    """Known columns cast to their declared types; a column of another kind makes the shard unusable."""
    for name in SHARD_SCHEMA.names:
        if name not in table.column_names:
            continue
        want, have = SHARD_SCHEMA.field(name).type, table.schema.field(name).type
        if _family(have) not in ("null", _family(want)):
            raise ShardProblem(Reason.BAD_SHARD, f"column {name!r} is {have}; a shard's {name} must be {want}")
        try:
            column = table.column(name).cast(want)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
            raise ShardProblem(Reason.BAD_SHARD, f"column {name!r} cannot be read as {want}: {exc}") from exc
        table = table.set_column(table.column_names.index(name), pa.field(name, want), column)
    return table


def _family(kind: pa.DataType) -> str:
    checks = (
        ("null", pa.types.is_null),
        ("string", lambda t: pa.types.is_string(t) or pa.types.is_large_string(t)),
        ("binary", lambda t: pa.types.is_binary(t) or pa.types.is_large_binary(t)),
        ("timestamp", pa.types.is_timestamp),
        ("bool", pa.types.is_boolean),
        ("int", pa.types.is_integer),
    )
    return next((name for name, check in checks if check(kind)), str(kind))

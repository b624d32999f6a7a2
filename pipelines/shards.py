"""Parquet image shards: pack a folder (bytes as-is, one row per distinct sha256) and read shards back.

A shards folder is a local folder or an `s3://bucket/prefix` URI (reached with the AWS_* variables, see
`pipelines.storage.filesystem_for`); a shard is named by a URI: its absolute local path or `s3://bucket/key`.

A packed shard is `SHARDS_DIR/source_id=<id>/shard-<images>-<content>.parquet`: `<images>` is a digest of
its image ids (which images it holds: a re-pack of the same images replaces it), `<content>` the sha256 of the
file's bytes. The content digest is the shard's identity (the ledger key, as it always was: the sha256 of the
file), read from the name, so a run is planned from one listing without opening any shard; the worker that
reads a shard checks its bytes against it. Shards with other names (older packs, foreign files) are hashed.
"""

from __future__ import annotations

import csv
import datetime as dt
import hashlib
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import pyarrow as pa
import pyarrow.parquet as pq

from pipelines.errors import GalleryMatchError, Refused
from pipelines.schemas import SHARD_SCHEMA
from pipelines.storage import filesystem_for, is_s3
from pipelines.vocab import Reason

REQUIRED_COLUMNS = ("image_id", "image", "source_id")
ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")  # matched in full, never searched
ID_RULE = "1-64 letters, digits, '.', '_' or '-', starting with a letter or digit"


PACKED_NAME = re.compile(r"shard-(?P<images>[0-9a-f]{20})-(?P<content>[0-9a-f]{64})\.parquet")
LEGACY_NAME = re.compile(r"shard-(?P<images>[0-9a-f]{20})\.parquet")  # packs before content-named shards
PARTITION = "source_id="


class ShardUnreadable(GalleryMatchError):
    """A shard that storage would not give us (missing, no access, network): the run stops, nothing is
    quarantined or ledgered for it, and a rerun retries it. Bad *content* is a ShardProblem instead."""


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
    shards: list[str] = field(default_factory=list)  # URIs of every shard of this pack
    unchanged: list[str] = field(default_factory=list)  # already there with the same content, not rewritten
    replaced: list[str] = field(default_factory=list)  # earlier packs of the same images (removed)
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
    shards_dir: str | Path,
    source_id: str,
    rows_per_shard: int,
    max_bytes: int,
    metadata: dict[str, RowMeta] | None = None,
    default_minor: bool | None = None,
) -> PackReport:
    """Write the folder's images as Parquet shards under SHARDS_DIR/source_id=<id>/ (a folder or s3:// URI).

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
    if rows:
        _ShardWriter(shards_dir, source_id, report).write_all(
            [rows[start : start + rows_per_shard] for start in range(0, len(rows), rows_per_shard)]
        )
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


class _ShardWriter:
    """Writes one source's shards through a pyarrow filesystem: tmp + rename locally (a crash never leaves
    half a shard), a plain PUT on S3 (an object appears whole or not at all; one already there under the
    same content name and size is kept). Then earlier packs of the same images are removed."""

    def __init__(self, shards_dir: str | Path, source_id: str, report: PackReport):
        self.fs, root = filesystem_for(shards_dir)
        self.s3 = is_s3(str(shards_dir))
        self.folder = f"{root}/{PARTITION}{source_id}"
        self.report = report
        self.existing = self._listing()

    def _listing(self) -> dict[str, int]:
        """Names and sizes of the files already in the source's folder (one listing)."""
        import pyarrow.fs as pafs

        if not self.s3:
            self.fs.create_dir(self.folder, recursive=True)
        infos = self.fs.get_file_info(pafs.FileSelector(self.folder, recursive=False, allow_not_found=True))
        return {i.base_name: i.size for i in infos if i.type == pafs.FileType.File}

    def write_all(self, chunks: list[list[dict[str, object]]]) -> None:
        written: dict[str, str] = {}  # images digest -> shard name
        for chunk in chunks:
            images, name, data = _encode_shard(chunk)
            self._put(name, data)
            written[images] = name
            self.report.shards.append(self._uri(name))
        for old in sorted(self.existing):
            match = PACKED_NAME.fullmatch(old) or LEGACY_NAME.fullmatch(old)
            if match and match["images"] in written and written[match["images"]] != old:
                self.fs.delete_file(f"{self.folder}/{old}")  # the same images, packed before with other rows
                self.report.replaced.append(self._uri(old))

    def _put(self, name: str, data: bytes) -> None:
        path = f"{self.folder}/{name}"
        if self.s3:
            if self.existing.get(name) == len(data):  # the name is the content's digest: already there
                self.report.unchanged.append(self._uri(name))
                return
            with self.fs.open_output_stream(path) as out:
                out.write(data)
            return
        tmp = Path(self.folder) / f".tmp-{name}-{os.getpid()}"
        tmp.write_bytes(data)
        os.replace(tmp, path)

    def _uri(self, name: str) -> str:
        return f"{'s3://' if self.s3 else ''}{self.folder}/{name}"


def _encode_shard(rows: list[dict[str, object]]) -> tuple[str, str, bytes]:
    """The shard's bytes and its name: the digest of its image ids, then the sha256 of the bytes."""
    images = hashlib.sha256("".join(str(r["image_id"]) for r in rows).encode()).hexdigest()[:20]
    sink = pa.BufferOutputStream()
    pq.write_table(pa.Table.from_pylist(rows, schema=SHARD_SCHEMA), sink, row_group_size=64)
    data = sink.getvalue().to_pybytes()
    return images, f"shard-{images}-{hashlib.sha256(data).hexdigest()}.parquet", data


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


def find_shards(shards_dir: str | Path) -> list[str]:
    """URIs of every shard under a folder (or the file itself), in a deterministic order.

    One recursive listing, never a read: on S3 that is one LIST (paged) whatever the number of shards."""
    import pyarrow.fs as pafs

    fs, root = filesystem_for(shards_dir)
    prefix = "s3://" if is_s3(str(shards_dir)) else ""
    kind = pafs.FileType.Directory if prefix else fs.get_file_info(root).type  # S3: list first, no HEAD
    infos = [] if kind != pafs.FileType.Directory else fs.get_file_info(pafs.FileSelector(root, recursive=True))
    if prefix and not infos:  # nothing under the prefix: one shard object, or nothing at all
        kind = fs.get_file_info(root).type
    if kind == pafs.FileType.File:
        return [prefix + root]
    if kind != pafs.FileType.Directory or (prefix and not infos):
        raise Refused(f"{shards_dir} is neither a shard file nor a folder of shards")
    files = [
        i.path
        for i in infos
        if i.type == pafs.FileType.File and i.base_name.endswith(".parquet") and not i.base_name.startswith(".")
    ]
    return [prefix + path for path in sorted(files, key=lambda p: p[len(root) :])]


def shard_name(uri: str | Path) -> str:
    return str(uri).rstrip("/").rsplit("/", 1)[-1]


def shard_key(uri: str | Path) -> str:
    """A shard's identity is its content (the sha256 of its bytes): renaming or moving it does not make it
    new. A packed shard carries it in its name, so it is not read here; any other file is hashed."""
    named = PACKED_NAME.fullmatch(shard_name(uri))
    if named:
        return named["content"]
    digest = hashlib.sha256()
    with _open_shard(uri) as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def partition_source(uri: str | Path) -> str | None:
    """The source a shard's hive folder names (`.../source_id=<id>/...`, the innermost), or None."""
    folders = str(uri).split("/")[:-1]
    named = [part[len(PARTITION) :] for part in folders if part.startswith(PARTITION)]
    return named[-1] if named else None


def shard_sources(uri: str | Path) -> set[str]:
    """The sources a shard belongs to: its hive folder's, without reading it; a shard outside a
    `source_id=` folder is read (its source_id column; empty when unreadable: ingest quarantines it)."""
    source = partition_source(uri)
    if source is not None:
        return {source}
    try:
        with _open_shard(uri, random_access=True) as handle:
            column = pq.read_table(handle, columns=["source_id"]).column("source_id")
    except Exception:  # noqa: BLE001 - unreadable shards are reported by the ingest, not here
        return set()
    return {v for v in column.to_pylist() if v is not None}


def _open_shard(uri: str | Path, random_access: bool = False) -> Any:
    fs, path = filesystem_for(uri)
    return fs.open_input_file(path) if random_access else fs.open_input_stream(path)


def read_shard_bytes(uri: str | Path) -> bytes:
    """The whole file; a storage failure is ShardUnreadable (never taken for a bad shard)."""
    try:
        with _open_shard(uri) as stream:
            return bytes(stream.read())
    except GalleryMatchError as exc:
        raise ShardUnreadable(f"cannot read shard {uri}: {exc}") from exc
    except OSError as exc:
        raise ShardUnreadable(f"cannot read shard {uri}: {exc}") from exc


def read_shard(uri: str | Path, allow_undeclared_minors: bool = False, expected_key: str | None = None) -> pa.Table:
    """Read one shard, columns conformed to SHARD_SCHEMA; raises ShardProblem when it cannot be ingested.

    With `expected_key` (its planned identity), bytes that do not hash to it are refused (BAD_SHARD): the
    file changed after it was packed or planned, so its rows are not stored under another content's key.
    A shard without a `minor` column is refused (MINORS_UNDECLARED) unless the operator explicitly allows
    it, and then every row is taken as not a minor. A shard in a `source_id=<id>` folder whose rows name
    another source is refused (BAD_SHARD): its source was checked as registered from that folder name.
    """
    data = read_shard_bytes(uri)
    if expected_key is not None and hashlib.sha256(data).hexdigest() != expected_key:
        raise ShardProblem(
            Reason.BAD_SHARD,
            f"the file's bytes do not match its identity {expected_key[:16]}...: it changed after it was packed "
            "or listed; re-pack it",
        )
    table = pq.read_table(pa.BufferReader(data))
    missing = [c for c in REQUIRED_COLUMNS if c not in table.column_names]
    if missing:
        raise ShardProblem(Reason.BAD_SHARD, f"missing required column(s): {', '.join(missing)}")
    state = minor_column_state(table.schema)
    if state == "absent" and not allow_undeclared_minors:
        raise ShardProblem(Reason.MINORS_UNDECLARED, MINORS_UNDECLARED_FIX)
    if state == "absent":
        table = table.append_column(SHARD_SCHEMA.field("minor"), pa.array([False] * table.num_rows, pa.bool_()))
    table = _conformed(table)
    _check_partition(table, partition_source(uri))
    return table


def _check_partition(table: pa.Table, source: str | None) -> None:
    if source is None:
        return
    other = sorted({v for v in table.column("source_id").to_pylist() if v is not None and v != source})
    if other:
        example = _shown(other[0]) if is_valid_id(other[0]) else "one not a valid id"  # never echo free text
        raise ShardProblem(
            Reason.BAD_SHARD,
            f"{len(other)} other source id(s) (e.g. {example}) in a shard under {PARTITION}{source}: "
            "a shard's rows must belong to the source of its folder; pack each source into its own folder",
        )


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

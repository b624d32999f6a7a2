"""The one interface every commit protocol is built on: create-if-absent, read, list, delete (no rename, no flock).

Object stores offer exactly these (S3: `PutObject` with `If-None-Match: *`), so the audit chain, the writer
lease, the erasure journal and the result-set commit written against `ObjectStore` move to S3 by a change of
backend. `LocalStore` gives the same guarantees on a POSIX filesystem: a created object appears whole (written
to a private temporary file, fsynced, then hard-linked into place, which fails when the name exists).
"""

from __future__ import annotations

import errno
import os
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from pipelines.errors import GalleryMatchError

TMP = ".objtmp"


class StorageFull(GalleryMatchError):
    """The store refused a write for lack of space; nothing was committed."""


class ObjectStore(Protocol):
    """Keys are '/'-separated relative names; values are whole byte strings."""

    def create(self, key: str, data: bytes) -> bool:
        """Write `data` under `key` only if nothing is there; False when the key already exists."""

    def read(self, key: str) -> bytes | None:
        """The bytes under `key`, or None when absent."""

    def folders(self, prefix: str) -> list[str]:
        """The names of the folders directly under `prefix`, sorted (S3: ListObjectsV2 with Delimiter '/')."""

    def list(self, prefix: str) -> list[str]:
        """Every key under `prefix` (a folder-like prefix ending in '/', or ''), sorted."""

    def delete(self, key: str) -> None:
        """Remove `key`; absent keys are fine (every step built on it is idempotent)."""

    def drop_incomplete(self, prefix: str) -> int:
        """Remove what creates that never finished left under `prefix` (only safe when no writer is creating
        there: callers hold the writer lease); the number removed."""

    def location(self, key: str) -> str:
        """A human-readable address of `key` (a path or URI), for messages and receipts."""


@dataclass(frozen=True)
class LocalStore:
    """An `ObjectStore` on a local folder."""

    root: Path

    def _path(self, key: str) -> Path:
        parts = [p for p in key.split("/") if p]
        if not parts or any(p in (".", "..") or p.startswith(TMP) for p in parts):
            raise ValueError(f"not a valid object key: {key!r}")
        return self.root.joinpath(*parts)

    def create(self, key: str, data: bytes) -> bool:
        final = self._path(key)
        for _ in range(3):  # a concurrent delete may prune the folder between mkdir and the write
            final.parent.mkdir(parents=True, exist_ok=True)
            try:
                return self._create(final, data)
            except FileNotFoundError:
                continue
        return self._create(final, data)

    def _create(self, final: Path, data: bytes) -> bool:
        tmp = final.parent / f"{TMP}-{uuid.uuid4().hex}"
        try:
            _write_synced(tmp, data)
            try:
                os.link(tmp, final)
            except FileExistsError:
                return False
            _fsync_dir(final.parent)
            return True
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise StorageFull(f"no space left to write {final}: free some space and rerun") from exc
            raise
        finally:
            tmp.unlink(missing_ok=True)

    def read(self, key: str) -> bytes | None:
        try:
            return self._path(key).read_bytes()
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            return None

    def folders(self, prefix: str) -> list[str]:
        base = self._base(prefix)
        if not base.is_dir():
            return []
        with os.scandir(base) as entries:
            return sorted(e.name for e in entries if e.is_dir() and not e.name.startswith(TMP))

    def list(self, prefix: str) -> list[str]:
        base = self._base(prefix)
        if not base.is_dir():
            return []
        return sorted(_walk(base, self.root))

    def _base(self, prefix: str) -> Path:
        return self.root.joinpath(*[p for p in prefix.split("/") if p]) if prefix.strip("/") else self.root

    def drop_incomplete(self, prefix: str) -> int:
        base = self._base(prefix)
        torn = sorted(base.rglob(f"{TMP}-*")) if base.is_dir() else []
        for path in torn:
            path.unlink(missing_ok=True)
            _prune_empty(path.parent, self.root)
        return len(torn)

    def delete(self, key: str) -> None:
        path = self._path(key)
        path.unlink(missing_ok=True)
        _prune_empty(path.parent, self.root)

    def location(self, key: str) -> str:
        return str(self._path(key))


def _walk(base: Path, root: Path) -> Iterator[str]:
    for folder, dirs, files in os.walk(base):
        dirs[:] = [d for d in dirs if not d.startswith(TMP)]
        rel = os.path.relpath(folder, root).replace(os.sep, "/")  # once per folder: pathlib per file is slow
        for name in files:
            if not name.startswith(TMP):
                yield name if rel == "." else f"{rel}/{name}"


def _write_synced(path: Path, data: bytes) -> None:
    with path.open("xb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _prune_empty(folder: Path, root: Path) -> None:
    """Remove folders left empty by a delete (object stores have no folders to leave behind)."""
    while folder != root and root in folder.parents:
        try:
            folder.rmdir()
        except OSError:
            return
        folder = folder.parent

"""The audit trail: append-only JSON lines, each record holding the previous record's hash (one chain)."""

from __future__ import annotations

import datetime as dt
import fcntl
import hashlib
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

GENESIS = "0" * 64
LOG = "audit.jsonl"


def canonical(record: dict[str, Any]) -> bytes:
    return json.dumps(record, sort_keys=True, separators=(",", ":"), default=str).encode()


def record_hash(record: dict[str, Any]) -> str:
    return hashlib.sha256(canonical({k: v for k, v in record.items() if k != "hash"})).hexdigest()


def digest(value: object) -> str:
    """A digest of a command's inputs: the trail proves what was asked without holding it."""
    return "sha256:" + hashlib.sha256(canonical({"v": value})).hexdigest()


@dataclass(frozen=True)
class AuditLog:
    """The chain under `<home>/audit/`; a lock file makes concurrent writers append one after another."""

    folder: Path

    @property
    def path(self) -> Path:
        return self.folder / LOG

    @contextmanager
    def _locked(self) -> Iterator[None]:
        self.folder.mkdir(parents=True, exist_ok=True)
        with (self.folder / "audit.lock").open("a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def append(self, actor: str, action: str, **fields: Any) -> dict[str, Any]:
        """Add one record (opaque ids, digests, versions and counts only) and return it."""
        with self._locked():
            last = self._last()
            record = {
                "seq": (last["seq"] + 1) if last else 1,
                "time": dt.datetime.now(dt.UTC).isoformat(),
                "actor": actor,
                "action": action,
                **{k: v for k, v in fields.items() if v is not None},
                "prev_hash": last["hash"] if last else GENESIS,
            }
            record["hash"] = record_hash(record)
            with self.path.open("ab") as handle:
                handle.write(canonical(record) + b"\n")
                handle.flush()
                os.fsync(handle.fileno())
            return record

    def _last(self) -> dict[str, Any] | None:
        if not self.path.exists() or self.path.stat().st_size == 0:
            return None
        with self.path.open("rb") as handle:
            handle.seek(max(0, self.path.stat().st_size - 65536))
            tail = handle.read().splitlines()
        return dict(json.loads(tail[-1]))

    def records(self) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        return [json.loads(line) for line in self.path.read_bytes().splitlines() if line.strip()]

    def verify(self) -> dict[str, Any]:
        """Recompute the chain; name the first record that does not fit (1-based line number)."""
        if not self.path.exists():
            return {"ok": True, "records": 0}
        prev, expected_seq = GENESIS, 1
        lines = self.path.read_bytes().splitlines()
        for number, line in enumerate(lines, start=1):
            problem = _check_line(line, prev, expected_seq)
            if problem:
                return {"ok": False, "records": len(lines), "first_bad_line": number, "problem": problem}
            record = json.loads(line)
            prev, expected_seq = record["hash"], record["seq"] + 1
        return {"ok": True, "records": len(lines), "head": prev}


def _check_line(line: bytes, prev: str, expected_seq: int) -> str | None:
    try:
        record = json.loads(line)
    except (ValueError, UnicodeDecodeError):
        return "not a readable record (altered bytes)"
    if not isinstance(record, dict) or "hash" not in record:
        return "not an audit record"
    if record_hash(record) != record["hash"]:
        return "its content does not match its hash (altered)"
    if record.get("prev_hash") != prev:
        return "its prev_hash does not match the previous record (a record was removed, inserted or reordered)"
    if record.get("seq") != expected_seq:
        return f"sequence {record.get('seq')} where {expected_seq} was expected"
    return None


def table_versions(gallery: Any, names: tuple[str, ...]) -> dict[str, int | None]:
    return {name: gallery.version(name) for name in names}

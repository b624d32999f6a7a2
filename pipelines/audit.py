"""The audit trail: one hash-chained object per record, written ahead of every action and anchored by signatures.

- One object per record, created if absent: two writers can never both take sequence n, and reading the
  head never depends on a record's length. Records are bounded: long values become a count and a digest.
- Write-ahead: `AuditLog.action` writes an intent before the action and an outcome after it; an action whose
  intent cannot be written does not run, and an intent without an outcome shows in `verify` and `show`.
- Anchored: every record is followed by a signed checkpoint (count + head hash) kept beside the signing key,
  outside the home (the witness); periodic signed checkpoints are kept in the home too. See `verify`.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import socket
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipelines import storage as area
from pipelines.errors import GalleryMatchError
from pipelines.objectstore import LocalStore, ObjectStore
from pipelines.signing import Checkpoint, Signer, home_tag, load_signer, public_key_hex

GENESIS = "0" * 64
RECORDS = f"{area.AUDIT}/records/"
CHECKPOINTS = f"{area.AUDIT}/checkpoints/"
LEGACY = f"{area.AUDIT}/audit.jsonl"  # the one-file log of homes made before records became objects: adopted verbatim
OPEN = f"{area.AUDIT}/open/"  # one marker per intent still without an outcome: recovery lists these, not the chain
BUCKET = 10_000  # records per folder: the head is found by listing the last folder only
MAX_RECORD_BYTES = 16_384
MAX_STR = 256  # longer strings are kept as their length and digest
MAX_ITEMS = 32  # longer lists (and larger dicts) are kept as a count and a digest
CHECKPOINT_EVERY = 64  # signed checkpoints kept in the home (the witness gets one per record)
WITNESS_KEEP = 4
READERS = 16  # reads in flight when the whole trail is read (verify, show, report)
FORWARD_READS = 64  # records read forward from a known head; further behind, the head is found by listing


class AuditUnavailable(GalleryMatchError):
    """The audit trail cannot take a record, so the action was not run (or its outcome was not recorded)."""


def canonical(record: dict[str, Any]) -> bytes:
    return json.dumps(record, sort_keys=True, separators=(",", ":"), default=str).encode()


def record_hash(record: dict[str, Any]) -> str:
    return hashlib.sha256(canonical({k: v for k, v in record.items() if k != "hash"})).hexdigest()


def digest(value: object) -> str:
    """A digest of a command's inputs: the trail proves what was asked without holding it."""
    return "sha256:" + hashlib.sha256(canonical({"v": value})).hexdigest()


def bounded(value: Any) -> Any:
    """A record value of bounded size: long strings, lists and dicts become a count and a digest."""
    if value is None or isinstance(value, bool | int | float):
        return value
    if isinstance(value, str):
        return value if len(value) <= MAX_STR else {"chars": len(value), "digest": digest(value)}
    if isinstance(value, set | frozenset):
        value = sorted(value, key=str)
    if isinstance(value, list | tuple):
        return (
            [bounded(v) for v in value] if len(value) <= MAX_ITEMS else {"count": len(value), "digest": digest(value)}
        )
    if isinstance(value, dict):
        if len(value) > MAX_ITEMS:
            return {"count": len(value), "digest": digest(value)}
        return {str(k)[:64]: bounded(v) for k, v in value.items()}
    return bounded(str(value))


def record_key(seq: int) -> str:
    return f"{RECORDS}{seq // BUCKET:08d}/{seq:012d}.json"


def key_seq(key: str) -> int:
    """The sequence number a record key names; -1 for an object that is not a record (planted or renamed)."""
    name = key.rsplit("/", 1)[-1].removesuffix(".json")
    return int(name) if name.isascii() and name.isdigit() else -1


@dataclass(frozen=True)
class Head:
    """Where the chain ends: the number of records and the last record's hash (handed out in manifests)."""

    seq: int
    hash: str

    def as_dict(self) -> dict[str, Any]:
        return {"seq": self.seq, "hash": self.hash}


@dataclass
class Outcome:
    """What an action reports when it ends; filled in by the action, written by `AuditLog.action`."""

    intent: dict[str, Any]
    fields: dict[str, Any] = field(default_factory=dict)

    @property
    def head(self) -> Head:
        """The intent's place in the chain: what manifests and receipts hand out."""
        return Head(int(self.intent["seq"]), str(self.intent["hash"]))

    def record(self, **fields: Any) -> None:
        self.fields |= {k: v for k, v in fields.items() if v is not None}


@dataclass
class AuditLog:
    """The chain of one home; `key_dir` holds the signing key and the witness (outside the home)."""

    store: ObjectStore
    home: str
    key_dir: Path
    lease: str | None = None  # the writer lease held by this process, recorded in its intents
    _known: Head | None = field(default=None, init=False, repr=False, compare=False)  # the last head seen
    _legacy_done: bool = field(default=False, init=False, repr=False, compare=False)

    @classmethod
    def of(cls, settings: Any) -> AuditLog:
        from pipelines.locks import current_lease

        return cls(settings.store, settings.home_uri, settings.resolved_audit_key_dir, current_lease(settings.store))

    # -- writing -------------------------------------------------------------------------------------------
    def append(self, actor: str, action: str, **fields: Any) -> dict[str, Any]:
        """Add one record and return it; raises `AuditUnavailable` when it cannot be written."""
        reserved = {"seq", "time", "actor", "action", "prev_hash", "hash"}
        body = {k: bounded(v) for k, v in fields.items() if v is not None and k not in reserved}
        signer = self._signer()  # no key, no record: an unanchored record would weaken every later check
        self._adopt_legacy()
        witnessed = self._witnessed()  # read before the head: a concurrent writer only moves the head further
        start = self._check_extends(witnessed)  # the witnessed record, checked: the head is read forward from it
        checked = True
        for _ in range(200):
            head = self._find_head(start, checked)
            record = {
                "seq": head.seq + 1,
                "time": dt.datetime.now(dt.UTC).isoformat(),
                "actor": bounded(actor),
                "action": action,
                **body,
                "prev_hash": head.hash,
            }
            record["hash"] = record_hash(record)
            data = canonical(record)
            if len(data) > MAX_RECORD_BYTES:
                raise AuditUnavailable(f"an audit record of {len(data)} bytes is over the {MAX_RECORD_BYTES} cap")
            if self._create(record_key(record["seq"]), data):
                self._known = Head(record["seq"], record["hash"])
                self._anchor(signer.sign(self.home, record["seq"], record["hash"]))
                return record
            checked = False  # another writer took this sequence number: read on from the head and retry
            time.sleep(0.005)
        raise AuditUnavailable("the audit trail is too busy to take a record; nothing was done, retry")

    @contextmanager
    def action(self, actor: str, action: str, **fields: Any) -> Iterator[Outcome]:
        """Intent before the action (no intent, no action); an outcome after it, ok or failed."""
        intent = self.append(actor, action, phase="intent", lease=self.lease, **fields)
        self._mark_open(intent)
        outcome = Outcome(intent)
        same = {k: v for k, v in fields.items() if k in ("case_id", "purpose", "requested_by", "watchlist_id")}
        try:
            yield outcome
        except BaseException as exc:
            error = {"status": "failed", "error": type(exc).__name__, "error_digest": digest(str(exc))}
            self._close(actor, action, intent, same | outcome.fields | error)
            raise
        self._close(actor, action, intent, same | outcome.fields | {"status": "ok"})

    def close_intent(self, intent: dict[str, Any], status: str, **fields: Any) -> dict[str, Any]:
        """Write the outcome of an intent whose process died (recovery knows what became of it)."""
        return self._close(str(intent.get("actor")), str(intent["action"]), intent, fields | {"status": status})

    def _close(self, actor: str, action: str, intent: dict[str, Any], fields: dict[str, Any]) -> dict[str, Any]:
        record = self.append(actor, action, phase="outcome", intent_seq=intent["seq"], **fields)
        self.store.delete(f"{OPEN}{intent['seq']:012d}.json")
        return record

    def _mark_open(self, intent: dict[str, Any]) -> None:
        owner = {"host": socket.gethostname(), "pid": os.getpid(), "lease": self.lease}
        self.store.create(f"{OPEN}{intent['seq']:012d}.json", canonical({"intent": intent, "owner": owner}))

    def open_intents(self) -> list[tuple[dict[str, Any], dict[str, Any]]]:
        """(intent, owner) of every action whose outcome is not written yet (cheap: one marker each)."""
        keys = self.store.list(OPEN)
        return [marker for data in read_many(self.store, keys) if (marker := _parse_marker(data)) is not None]

    def _create(self, key: str, data: bytes) -> bool:
        try:
            return self.store.create(key, data)
        except GalleryMatchError as exc:
            raise AuditUnavailable(f"the audit trail cannot be written ({exc}); nothing was done") from exc
        except OSError as exc:
            raise AuditUnavailable(f"the audit trail cannot be written ({exc}); nothing was done") from exc

    def _adopt_legacy(self) -> None:
        """A home from before one-object-per-record: its verified JSON-lines log becomes records 1..n, byte for
        byte (same hashes), so the chain continues from it. Idempotent; a broken legacy log stops every action."""
        if self._legacy_done:
            return
        data = self.store.read(LEGACY)
        lines = [line for line in (data or b"").splitlines() if line.strip()]
        if not lines or self.store.read(record_key(len(lines))) is not None:  # one read, never a listing
            self._legacy_done = True
            return
        prev = GENESIS
        for seq, line in enumerate(lines, start=1):  # the whole legacy chain is checked before any record is made
            record = _parse(line)
            if record is None or record.get("seq") != seq or record.get("prev_hash") != prev:
                raise AuditUnavailable(f"the legacy audit log {LEGACY} is broken at record {seq}; nothing was done")
            if record_hash(record) != record["hash"]:
                raise AuditUnavailable(f"the legacy audit log {LEGACY} is altered at record {seq}; nothing was done")
            prev = str(record["hash"])
        for seq, line in enumerate(lines, start=1):
            if not self._create(record_key(seq), line) and self.store.read(record_key(seq)) != line:
                raise AuditUnavailable(f"record {seq} differs from the legacy audit log {LEGACY}; nothing was done")
        self._legacy_done = True

    def _witnessed(self) -> Checkpoint | None:
        witness = LocalStore(self.witness_dir)
        names = witness.list("")
        data = witness.read(names[-1]) if names else None
        if data is None:
            return None
        try:
            return Checkpoint.from_json(data)
        except GalleryMatchError as exc:
            problem = f"the witness checkpoint {names[-1]} is unreadable; run `gallerymatch audit verify`"
            raise AuditUnavailable(problem) from exc

    def _check_extends(self, witnessed: Checkpoint | None) -> Head | None:
        """Fail closed: never extend a chain that no longer reaches what the witness vouched for (a cut log
        extended by new records would otherwise look whole again). Returns the witnessed head, checked."""
        if witnessed is None or witnessed.count == 0:
            return None
        record = _parse(self.store.read(record_key(witnessed.count)))
        if record is None or record.get("hash") != witnessed.head_hash or record.get("seq") != witnessed.count:
            raise AuditUnavailable(
                f"the audit log no longer extends its witness (record {witnessed.count} is missing or different): "
                "records were cut or rewritten. Nothing was done; run `gallerymatch audit verify` and restore the "
                "log before any further action."
            )
        return Head(witnessed.count, witnessed.head_hash)

    def _signer(self) -> Signer:
        try:
            return load_signer(self.key_dir)
        except (GalleryMatchError, OSError) as exc:
            raise AuditUnavailable(f"the audit signing key cannot be used ({exc}); nothing was done") from exc

    def _anchor(self, checkpoint: Checkpoint) -> None:
        """The signed new head goes to the witness (outside the home) and, periodically, into the home."""
        try:
            witness = LocalStore(self.witness_dir)
            name = f"{checkpoint.count:012d}.json"
            if not witness.create(name, checkpoint.to_json()):
                held = Checkpoint.from_json(witness.read(name) or b"{}")
                if held.head_hash != checkpoint.head_hash:
                    raise AuditUnavailable(f"the witness holds another record {checkpoint.count}: the log was forked")
            for old in witness.list("")[:-WITNESS_KEEP]:
                witness.delete(old)
            if checkpoint.count % CHECKPOINT_EVERY == 0:
                self.store.create(f"{CHECKPOINTS}{checkpoint.count:012d}.json", checkpoint.to_json())
        except (GalleryMatchError, OSError) as exc:
            raise AuditUnavailable(f"record {checkpoint.count} was written but not anchored ({exc})") from exc

    def checkpoint(self) -> Checkpoint:
        """A signed checkpoint of the current head, for a third party to keep."""
        head = self.head()
        return self._signer().sign(self.home, head.seq, head.hash)

    # -- reading -------------------------------------------------------------------------------------------
    @property
    def witness_dir(self) -> Path:
        return self.key_dir / "witness" / home_tag(self.home)

    def head(self) -> Head:
        """The last record: read forward from the witness (or the last head this log saw), a few requests
        whatever the length of the trail; found by listing (the last folder only) when there is no such start."""
        try:
            witnessed = self._witnessed()
        except AuditUnavailable:
            witnessed = None
        start = Head(witnessed.count, witnessed.head_hash) if witnessed is not None and witnessed.count else None
        return self._find_head(start, checked=False)

    def _find_head(self, start: Head | None, checked: bool) -> Head:
        """`checked`: `start` was just read and found as it should be (no need to read it again)."""
        known = self._known if self._known is not None and (start is None or self._known.seq > start.seq) else start
        head = self._read_forward(known, checked and known is start) if known is not None else None
        if head is None:
            head = self._listed_head()
        self._known = head
        return head

    def _read_forward(self, known: Head, checked: bool) -> Head | None:
        """Read the records after `known` until one is absent (one GET each on S3). None when `known` is no
        longer there as it was (a cut or rewritten log: left to the listing, and to verify) or when the head is
        far ahead of it: the head is then listed."""
        if not checked:
            record = _parse(self.store.read(record_key(known.seq)))
            if record is None or record.get("hash") != known.hash:
                return None
        head = known
        for _ in range(FORWARD_READS):
            following = head.seq + 1
            data = self.store.read(record_key(following))
            if data is None:
                return head
            record = _parse(data)
            if record is None or record.get("seq") != following:
                raise AuditUnavailable(
                    f"audit record {following} is unreadable or out of place: run `gallerymatch audit verify`"
                )
            head = Head(following, str(record["hash"]))
        return None

    def _listed_head(self) -> Head:
        for folder in reversed(self.store.folders(RECORDS)):  # the last folder with a record holds the head
            keys = self.store.list(f"{RECORDS}{folder}/")
            if keys:
                last = keys[-1]
                break
        else:
            return Head(0, GENESIS)
        record = _parse(self.store.read(last))
        if record is None:
            raise AuditUnavailable(f"the last audit record ({last}) is unreadable: run `gallerymatch audit verify`")
        return Head(int(record["seq"]), str(record["hash"]))

    def records(self) -> list[dict[str, Any]]:
        """Every record in order; an unreadable one is returned as {"seq": n, "unreadable": True}."""
        keys = self.store.list(RECORDS)
        out = []
        for key, data in zip(keys, read_many(self.store, keys), strict=True):
            record = _parse(data)
            out.append(record if record is not None else {"seq": key_seq(key), "unreadable": True})
        return out

    def verify(self, anchors: Iterable[tuple[str, Head]] = (), against: Checkpoint | None = None) -> dict[str, Any]:
        """Recompute the chain, then hold it against every anchor: signed checkpoints (in the home, the witness
        outside it, `against` from a third party) and the heads handed out in manifests and receipts."""
        from pipelines.audit_verify import verify_chain

        return verify_chain(self, list(anchors), against, public_key_hex(self.key_dir))


def read_many(store: ObjectStore, keys: list[str]) -> list[bytes | None]:
    """The objects under `keys`, in order: one GET each is unavoidable on S3, so they run side by side."""
    if len(keys) <= 4:
        return [store.read(key) for key in keys]
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=READERS) as pool:
        return list(pool.map(store.read, keys))


def _parse(data: bytes | None) -> dict[str, Any] | None:
    if data is None:
        return None
    try:
        record = json.loads(data)
    except (ValueError, UnicodeDecodeError):
        return None
    return record if isinstance(record, dict) and "seq" in record and "hash" in record else None


def _parse_marker(data: bytes | None) -> tuple[dict[str, Any], dict[str, Any]] | None:
    try:
        body = json.loads(data) if data is not None else None
        return (dict(body["intent"]), dict(body["owner"])) if body else None
    except (ValueError, KeyError, TypeError):
        return None


def table_versions(gallery: Any, names: tuple[str, ...]) -> dict[str, int | None]:
    return {name: gallery.version(name) for name in names}

"""Verifying the audit chain: the records themselves, then every anchor that vouches for part of it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from pipelines.objectstore import LocalStore
from pipelines.signing import Checkpoint

if TYPE_CHECKING:
    from pipelines.audit import AuditLog, Head


@dataclass
class ChainScan:
    """The readable, well-linked prefix of the chain and what broke it."""

    hashes: dict[int, str] = field(default_factory=dict)  # seq -> hash, for the valid prefix
    records: list[dict[str, Any]] = field(default_factory=list)
    total: int = 0
    problems: list[str] = field(default_factory=list)
    first_bad: int | None = None


def scan(log: AuditLog) -> ChainScan:
    from pipelines.audit import GENESIS, RECORDS, _parse, key_seq, read_many, record_hash, record_key

    out, prev = ChainScan(), GENESIS
    keys = log.store.list(RECORDS)
    out.total = len(keys)
    for expected, (key, data) in enumerate(zip(keys, read_many(log.store, keys), strict=True), start=1):
        problem = None
        record = _parse(data)
        if key != record_key(expected) and (key_seq(key) < 0 or record_key(key_seq(key)) != key):
            problem = f"{key} is not a record object but lies among them (planted or renamed)"
        elif key != record_key(expected):
            problem = f"record {expected} is missing (the next one present is {key_seq(key)})"
        elif record is None:
            problem = f"record {expected} is not a readable record (altered or torn bytes)"
        elif record.get("seq") != expected:
            problem = f"record {expected}: its object holds record {record.get('seq')!r} (moved or reordered)"
        elif record_hash(record) != record.get("hash"):
            problem = f"record {expected}: its content does not match its hash (altered)"
        elif record.get("prev_hash") != prev:
            problem = f"record {expected}: its prev_hash does not match record {expected - 1} (removed or reordered)"
        if problem:
            out.problems.append(problem)
            out.first_bad = expected
            return out
        assert record is not None
        prev = out.hashes[expected] = str(record["hash"])
        out.records.append(record)
    return out


def verify_chain(
    log: AuditLog, anchors: list[tuple[str, Head]], against: Checkpoint | None, public_key: str | None
) -> dict[str, Any]:
    from pipelines.audit import CHECKPOINTS, LEGACY, Head, read_many

    chain = scan(log)
    legacy = [line for line in (log.store.read(LEGACY) or b"").splitlines() if line.strip()]
    if len(legacy) > chain.total:
        chain.problems.append(
            f"the legacy log {LEGACY} holds {len(legacy)} records the chain does not (the next action adopts them)"
        )
    keys = log.store.list(CHECKPOINTS)
    signed: list[tuple[str, Checkpoint]] = [
        (f"home checkpoint {key.rsplit('/', 1)[-1]}", _load(data))
        for key, data in zip(keys, read_many(log.store, keys), strict=True)
    ]
    kept = LocalStore(log.witness_dir)
    witness = kept.list("")
    for name in witness:  # every kept one: an older checkpoint can contradict a chain cut and extended since
        signed.append((f"the witness checkpoint {name} outside the home", _load(kept.read(name))))
    if against is not None:
        signed.append(("the checkpoint given with --against", against))
    elif chain.total and not witness:
        chain.problems.append(
            f"no witness checkpoint for this home under {log.key_dir}: cut-off records could not be detected "
            "(verify where the witness is kept, or pass --against a checkpoint kept elsewhere)"
        )
    if signed and public_key is None:
        chain.problems.append(f"no public key in {log.key_dir}: signed checkpoints cannot be checked")
    for name, checkpoint in signed:
        chain.problems += _signature_problems(name, checkpoint, public_key, log.home)
    anchors = anchors + [(name, Head(c.count, c.head_hash)) for name, c in signed if c.count >= 0]
    for name, anchor in anchors:
        chain.problems += _anchor_problems(name, anchor, chain)
    incomplete = _incomplete(chain.records)
    last = max(chain.hashes) if chain.hashes else 0
    return {
        "ok": not chain.problems,
        "records": chain.total,
        "head": {"seq": last, "hash": chain.hashes.get(last)},
        "problems": chain.problems,
        "first_bad_record": chain.first_bad,
        "anchors_checked": len(anchors),
        "witness": witness[-1].removesuffix(".json") if witness else None,
        "incomplete_actions": incomplete,
    }


def _load(data: bytes | None) -> Checkpoint:
    if data is None:
        return Checkpoint("", -1, "", "", "", "")
    try:
        return Checkpoint.from_json(data)
    except Exception:  # noqa: BLE001 - an unreadable checkpoint is reported as a problem, not raised
        return Checkpoint("", -1, "", "", "", "")


def _signature_problems(name: str, checkpoint: Checkpoint, public_key: str | None, home: str) -> list[str]:
    if checkpoint.count < 0:
        return [f"{name} is unreadable"]
    if not checkpoint.valid():
        return [f"{name} has an invalid signature (altered)"]
    if public_key is not None and checkpoint.public_key != public_key:
        return [f"{name} is signed by another key than this deployment's"]
    if checkpoint.home != home:
        return [f"{name} is for another home ({checkpoint.home})"]
    return []


def _anchor_problems(name: str, head: Head, chain: ChainScan) -> list[str]:
    if head.seq == 0:
        return []
    if head.seq > chain.total:
        return [
            f"{name} vouches for {head.seq} records but the log holds {chain.total}: "
            "records were cut off, or the log was emptied or deleted"
        ]
    have = chain.hashes.get(head.seq)
    if have is None:
        return []  # beyond the first broken record: already reported
    if have != head.hash:
        return [f"{name} says record {head.seq} has hash {head.hash[:16]}..., the log has {have[:16]}...: rewritten"]
    return []


def _incomplete(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Intents with no outcome: actions that were stopped, or are running now."""
    closed = {r.get("intent_seq") for r in records if r.get("phase") == "outcome"}
    return [
        {k: r.get(k) for k in ("seq", "time", "actor", "action", "case_id", "watchlist_id", "run_id")}
        for r in records
        if r.get("phase") == "intent" and r["seq"] not in closed
    ]

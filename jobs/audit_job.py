"""Audit commands over a home: verify against every anchor it has handed out, show, export a checkpoint."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pipelines import storage as area
from pipelines.audit import AuditLog, Head
from pipelines.errors import Refused
from pipelines.results import list_runs
from pipelines.settings import Settings
from pipelines.signing import Checkpoint

RECEIPTS = f"{area.ERASURE}/receipts/"


def handed_out(settings: Settings) -> list[tuple[str, Head]]:
    """The chain heads the system gave away: in result manifests and erasure receipts."""
    heads = []
    for manifest in list_runs(settings.store):
        if isinstance(manifest.get("audit_head"), dict):
            heads.append((f"result set {manifest['run_id']}", _head(manifest["audit_head"])))
    for key in settings.store.list(RECEIPTS):
        receipt = json.loads(settings.store.read(key) or b"{}")
        if isinstance(receipt.get("audit_head"), dict):
            heads.append((f"erasure receipt {receipt.get('receipt_id')}", _head(receipt["audit_head"])))
    return heads


def _head(data: dict[str, Any]) -> Head:
    return Head(int(data.get("seq", 0)), str(data.get("hash", "")))


def verify_home(settings: Settings, against: Path | None = None) -> dict[str, Any]:
    checkpoint = None
    if against is not None:
        if not against.is_file():
            raise Refused(f"{against} is not a checkpoint file (make one with `gallerymatch audit checkpoint --to`)")
        checkpoint = Checkpoint.from_json(against.read_bytes())
    return AuditLog.of(settings).verify(handed_out(settings), checkpoint)


def records(settings: Settings, case_id: str | None = None) -> tuple[list[dict[str, Any]], set[Any]]:
    """The audit records (of one case, if given) and the `intent_seq` of every outcome (a tampered record's
    value is kept as it is: this is a view of the log, not a check of it)."""
    every = AuditLog.of(settings).records()
    closed = {r.get("intent_seq") for r in every if r.get("phase") == "outcome"}
    return [r for r in every if case_id is None or r.get("case_id") == case_id], closed


def export_checkpoint(settings: Settings, to: Path) -> dict[str, Any]:
    """A signed checkpoint of the current head, written to a file a third party keeps."""
    if to.exists():
        raise Refused(f"{to} exists; checkpoints are never overwritten: choose a new file name")
    log = AuditLog.of(settings)
    log.append(settings.actor, "audit.checkpoint")
    checkpoint = log.checkpoint()
    to.parent.mkdir(parents=True, exist_ok=True)
    to.write_bytes(checkpoint.to_json())
    return {
        "path": str(to),
        "count": checkpoint.count,
        "head_hash": checkpoint.head_hash,
        "public_key": checkpoint.public_key,
    }


def printable(value: object) -> str:
    """A value as one line of data: control characters (newlines included) are shown escaped, never obeyed."""
    text = value if isinstance(value, str) else json.dumps(value, default=str, sort_keys=True)
    return text.encode("unicode_escape").decode("ascii")

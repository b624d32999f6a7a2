"""Erasure as a journal: the plan is recorded before anything is removed, every step is idempotent and marked
done, and a rerun (or the next writer command) resumes the plan instead of recomputing it from what is left.

Journal objects under `erasure/journal/<receipt_id>/` (create-if-absent only): `plan.json` (row keys, ids,
affected runs), `vectors.npz` (the erased vectors, for the byte-scan check; deleted once the check passed),
`step-<name>.json` per finished step, `checks-failed-<n>.json` per failed check, `done.json` last.

On an S3 home whose bucket has (or had) versioning, every delete and rewrite leaves the old bytes as noncurrent
object versions: the `purge-versions` step removes them (setting `erase_versioned_bucket`), or `erase` refuses
before removing anything; the byte scan reads every noncurrent version, and the receipt's `object_versions`
says which happened.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import io
import json
import uuid
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa

from jobs.erase_steps import (
    TABLES,
    VERSIONED_AREAS,
    affected_runs,
    bucket_versioning,
    checks,
    drop_with_versions,
    find_rows,
    purge_versions,
    rewrite_runs,
    selectors,
)
from lance_tables.erasure import delete_keys, present, purge, tagged
from lance_tables.reviews import delete_reviews
from lance_tables.store import Gallery
from pipelines import storage as area
from pipelines.audit import AuditLog, Outcome
from pipelines.errors import GalleryMatchError, Refused
from pipelines.faults import crash_point
from pipelines.objectstore import ObjectStore
from pipelines.results import list_runs
from pipelines.schemas import ERASED, KEYS
from pipelines.settings import Settings
from pipelines.shards import check_id
from pipelines.storage import Storage

JOURNAL = f"{area.ERASURE}/journal/"
RECEIPTS = f"{area.ERASURE}/receipts/"


@dataclass
class Plan:
    """What one erasure removes, fixed before the first removal."""

    receipt_id: str
    selector: dict[str, str]  # kind -> opaque id
    requested_by: str
    reason_digest: str
    keys: dict[str, list[str]]  # table -> row keys
    gallery_ids: list[str]
    image_ids: list[str]
    probes: list[list[str]]  # [watchlist_id, probe_id]
    runs: list[str]  # run ids naming the person when planned
    vectors: int
    planned_at: str = field(default_factory=lambda: dt.datetime.now(dt.UTC).isoformat())

    @property
    def prefix(self) -> str:
        return f"{JOURNAL}{self.receipt_id}/"


def erase(
    settings: Settings,
    reason: str,
    requested_by: str,
    image_id: str | None = None,
    subject_id: str | None = None,
    source_id: str | None = None,
) -> dict[str, Any]:
    from jobs.session import writer_session

    check_id("requester id", requested_by)
    if not reason.strip():
        raise Refused("an erasure needs --reason")
    selector = selectors(image_id, subject_id, source_id)
    _refuse_versioned_bucket(settings)
    pending = [p.receipt_id for p in _journals(settings.store) if p.selector == selector.ids]  # read only
    with writer_session(settings, "erase", exclusive=True) as log:
        gallery = Gallery(settings.storage)
        blocked = tagged(gallery, [*TABLES, "erased", "reviews"])
        if blocked:
            raise Refused(f"tagged versions pin old data ({blocked}); delete the tags first. Nothing was removed.")
        unfinished = [p for p in _journals(settings.store) if p.selector == selector.ids]
        if unfinished:  # a failed or interrupted erasure of the same person: finish that plan, never a new one
            return _run(settings, gallery, log, unfinished[0], requested_by, resumed=True)
        finished = [r for r in pending if settings.store.read(f"{JOURNAL}{r}/done.json") is not None]
        if finished:  # the session's recovery just finished this person's interrupted plan: hand out its
            return _stored_receipt(settings.store, finished[0])  # receipt, not an empty second erasure's
        with log.action(requested_by, "erase", selector_kind=selector.kind, reason=_digest(reason)) as op:
            plan, vectors = _plan(settings, gallery, selector, requested_by, reason, op)
            _store_plan(settings.store, plan, vectors, op)
            return _execute(settings, gallery, log, plan, op)


def _refuse_versioned_bucket(settings: Settings) -> None:
    """Under the 'refuse' policy, a versioned bucket is refused before anything is removed (or resumed)."""
    versioning = bucket_versioning(settings.storage)
    if versioning is None or settings.erase_versioned_bucket != "refuse":
        return
    areas = ", ".join(f"{a}/" for a in VERSIONED_AREAS)
    raise Refused(
        f"the bucket of {settings.home_uri} has object versioning {versioning}: deleted and overwritten objects "
        "stay stored as noncurrent versions, so the person's bytes would outlive the erasure, and "
        "GALLERYMATCH_ERASE_VERSIONED_BUCKET=refuse forbids removing those versions. Nothing was removed. "
        "To proceed, set GALLERYMATCH_ERASE_VERSIONED_BUCKET=purge-versions (the erase then permanently deletes "
        f"every noncurrent version and delete marker under {areas} of this home), or move the home to a bucket "
        "that never had versioning."
    )


def unfinished_erasures(store: ObjectStore) -> list[dict[str, Any]]:
    """Erasures not finished yet: interrupted (the next writer resumes them) or failed (rerun the erase)."""
    return [
        {"receipt_id": p.receipt_id, "failed_checks": len(_failed_attempts(store, p)), "planned_at": p.planned_at}
        for p in _journals(store)
    ]


def resume_unfinished(settings: Settings, log: AuditLog) -> list[str]:
    """Finish erasures a crash interrupted (not those whose check failed: `erase` retries those)."""
    _drop_unplanned(settings.storage)
    done = []
    for plan in _journals(settings.store):
        if _failed_attempts(settings.store, plan):
            continue
        gallery = Gallery(settings.storage)
        _run(settings, gallery, log, plan, plan.requested_by, resumed=True)
        done.append(plan.receipt_id)
    return done


def _drop_unplanned(storage: Storage) -> None:
    """A journal without its plan was cut off before the plan was recorded, so nothing was removed; its
    `vectors.npz` is a copy of the vectors nothing will ever read again (and would fail every later byte scan).
    Only called under the writer lease, before this process starts an erasure of its own. On a versioned bucket
    the copy goes with its versions (whatever the policy: it is the journal's own copy, never the home's data)."""
    names = storage.store.list(JOURNAL)
    planned = {n.removesuffix("plan.json") for n in names if n.endswith("/plan.json")}
    for name in names:
        if name[: name.rfind("/") + 1] not in planned:
            drop_with_versions(storage, name)


def _run(settings: Settings, gallery: Gallery, log: AuditLog, plan: Plan, actor: str, resumed: bool) -> dict[str, Any]:
    _close_original(settings.store, log, plan)
    with log.action(actor, "erase", receipt_id=plan.receipt_id, resumed=resumed) as op:
        return _execute(settings, gallery, log, plan, op)


def _plan(
    settings: Settings, gallery: Gallery, selector: Any, requested_by: str, reason: str, op: Outcome
) -> tuple[Plan, list[np.ndarray]]:
    found = find_rows(gallery, selector)
    image_ids = sorted(set(found.image_ids))
    gallery_ids = sorted(found.keys.get("faces", []) + found.keys.get("image_embeddings", []))
    runs = affected_runs(settings.store, set(gallery_ids), set(image_ids), found.probes)
    plan = Plan(
        receipt_id="erasure-" + uuid.uuid4().hex[:16],
        selector=selector.ids,
        requested_by=requested_by,
        reason_digest=_digest(reason),
        keys=found.keys,
        gallery_ids=gallery_ids,
        image_ids=image_ids,
        probes=[list(p) for p in sorted(found.probes)],
        runs=runs,
        vectors=len(found.vectors),
    )
    op.record(receipt_id=plan.receipt_id, counts={t: len(k) for t, k in plan.keys.items()})
    return plan, found.vectors


def _store_plan(store: ObjectStore, plan: Plan, vectors: list[np.ndarray], op: Outcome) -> None:
    """Vectors first, the plan last: a journal exists once its plan does, and then it is whole."""
    buffer = io.BytesIO()
    np.savez(buffer, *[np.asarray(v, np.float32) for v in vectors])
    store.create(plan.prefix + "vectors.npz", buffer.getvalue())
    body = asdict(plan) | {"intent_seq": op.intent["seq"]}
    crash_point("erase:before-plan")
    store.create(plan.prefix + "plan.json", json.dumps(body, sort_keys=True).encode())
    crash_point("erase:after-plan")


def _execute(settings: Settings, gallery: Gallery, log: AuditLog, plan: Plan, op: Outcome) -> dict[str, Any]:
    store = settings.store
    _step(store, plan, "delete-rows", lambda: _delete_rows(gallery, plan))
    _step(
        store, plan, "reviews", lambda: {"reviews": delete_reviews(gallery, plan.gallery_ids, _run_probes(plan, store))}
    )
    _step(store, plan, "block-reingest", lambda: _block_reingest(gallery, plan))
    rewritten = _step(store, plan, "rewrite-results", lambda: {"runs": rewrite_runs(store, plan)})
    _step(store, plan, "purge", lambda: {n: purge(gallery, n) for n in (*TABLES, "reviews", "erased")})
    versions = _step(store, plan, "purge-versions", lambda: _object_versions(settings))
    if store.read(_receipt_key(plan)) is None:
        if _failed_attempts(store, plan):  # a retry: fixing the cause (deleting a stray copy) left versions too
            versions = _add_counts(versions, _object_versions(settings))
        result = checks(settings, gallery, plan, _vectors(store, plan))
        if not all(c["passed"] for c in result):
            attempt = len(_failed_attempts(store, plan)) + 1
            store.create(f"{plan.prefix}checks-failed-{attempt:03d}.json", json.dumps(result, default=str).encode())
            op.record(receipt_id=plan.receipt_id, checks=[c["check"] for c in result if not c["passed"]])
            raise GalleryMatchError(
                f"erasure {plan.receipt_id} ran but a check FAILED: {_failures(result)}. The plan is kept: "
                "fix the cause and rerun the same erase to retry; it resumes this plan."
            )
        _write_receipt(store, _receipt(gallery, plan, rewritten, result, op) | {"object_versions": versions})
        crash_point("erase:after-receipt")
    receipt = _stored_receipt(store, plan.receipt_id)
    drop_with_versions(settings.storage, plan.prefix + "vectors.npz")  # the plan must not keep the erased vectors
    crash_point("erase:before-done")
    store.create(plan.prefix + "done.json", b"{}")
    op.record(receipt_id=plan.receipt_id, receipt_hash=receipt["receipt_sha256"], counts=receipt.get("removed_rows"))
    return receipt


def _step(store: ObjectStore, plan: Plan, name: str, work: Any) -> dict[str, Any]:
    """Run a step once: its marker says it is done (every step is idempotent, so a crash inside reruns it)."""
    key = f"{plan.prefix}step-{name}.json"
    data = store.read(key)
    if data is not None:
        return dict(json.loads(data))
    crash_point(f"erase:before-{name}")
    result = dict(work())
    crash_point(f"erase:inside-{name}")  # the work is done, its marker not yet written
    store.create(key, json.dumps(result, default=str, sort_keys=True).encode())
    return result


def _object_versions(settings: Settings) -> dict[str, Any]:
    """On a versioned bucket, the noncurrent versions the deletes and rewrites left (under the 'purge-versions'
    policy they go: idempotent, a rerun redoes it; under 'refuse' they stay and the byte scan fails on them)."""
    versioning = bucket_versioning(settings.storage)
    if versioning is None:
        return {"versioning": None}
    policy = settings.erase_versioned_bucket
    out: dict[str, Any] = {"versioning": versioning, "policy": policy, "areas": [f"{a}/" for a in VERSIONED_AREAS]}
    if policy == "purge-versions":
        return out | purge_versions(settings.storage)
    return out | {"noncurrent_removed": 0, "delete_markers_removed": 0}


def _add_counts(first: dict[str, Any], again: dict[str, Any]) -> dict[str, Any]:
    counts = ("noncurrent_removed", "delete_markers_removed")
    return again | {c: int(first.get(c, 0)) + int(again.get(c, 0)) for c in counts if c in again}


def _delete_rows(gallery: Gallery, plan: Plan) -> dict[str, Any]:
    for name in TABLES:
        delete_keys(gallery, name, KEYS[name], plan.keys.get(name, []))
        crash_point(f"erase:deleted-{name}")
    left = {name: present(gallery, name, KEYS[name], plan.keys.get(name, [])) for name in TABLES}
    if any(left.values()):
        raise GalleryMatchError(f"rows still present after the delete: {left}; rerun the erase")
    return {"left": left}


def _block_reingest(gallery: Gallery, plan: Plan) -> dict[str, Any]:
    if plan.image_ids:
        now = dt.datetime.now(dt.UTC)
        rows = [{"image_id": i, "receipt_id": plan.receipt_id, "erased_at": now} for i in plan.image_ids]
        table = gallery.ensure("erased", ERASED)
        table.merge_insert("image_id").when_not_matched_insert_all().execute(pa.Table.from_pylist(rows, schema=ERASED))
    return {"blocked": len(plan.image_ids)}


def _receipt(
    gallery: Gallery, plan: Plan, rewritten: dict[str, Any], result: list[dict[str, Any]], op: Outcome
) -> dict[str, Any]:
    return {
        "receipt_id": plan.receipt_id,
        "erased_at": dt.datetime.now(dt.UTC).isoformat(),
        "planned_at": plan.planned_at,
        "requested_by": plan.requested_by,
        "reason_digest": plan.reason_digest,
        "removed_rows": {t: len(k) for t, k in plan.keys.items()},
        "images_blocked_from_reingest": len(plan.image_ids),
        "result_sets_rewritten": rewritten.get("runs", []),
        "versions_after": {n: gallery.version(n) for n in TABLES},
        "checks": result,
        "ok": True,
        "audit_head": op.head.as_dict(),
    }


def _receipt_key(plan: Plan) -> str:
    return RECEIPTS + plan.receipt_id + ".json"


def _stored_receipt(store: ObjectStore, receipt_id: str) -> dict[str, Any]:
    """The receipt as written, with the sha256 of its bytes (the digest the audit outcome records)."""
    data = store.read(RECEIPTS + receipt_id + ".json") or b"{}"
    return dict(json.loads(data)) | {"receipt_sha256": hashlib.sha256(data).hexdigest()}


def _write_receipt(store: ObjectStore, receipt: dict[str, Any]) -> None:
    body = json.dumps(receipt, indent=2, sort_keys=True, default=str).encode()
    store.create(RECEIPTS + receipt["receipt_id"] + ".json", body)


def _journals(store: ObjectStore) -> list[Plan]:
    """Unfinished journals (a plan and no done marker), oldest first."""
    names = set(store.list(JOURNAL))
    plans = []
    for name in sorted(n for n in names if n.endswith("/plan.json")):
        if name.replace("/plan.json", "/done.json") in names:
            continue
        body = json.loads(store.read(name) or b"{}")
        body.pop("intent_seq", None)
        plans.append(Plan(**body))
    return sorted(plans, key=lambda p: p.planned_at)


def _failed_attempts(store: ObjectStore, plan: Plan) -> list[str]:
    return [n for n in store.list(plan.prefix) if "/checks-failed-" in n]


def _vectors(store: ObjectStore, plan: Plan) -> list[np.ndarray]:
    data = store.read(plan.prefix + "vectors.npz")
    if data is None:
        return []
    with np.load(io.BytesIO(data)) as archive:
        return [archive[k] for k in archive.files]


def _close_original(store: ObjectStore, log: AuditLog, plan: Plan) -> None:
    """The interrupted command's intent gets its outcome before the resumed run starts."""
    body = json.loads(store.read(plan.prefix + "plan.json") or b"{}")
    for intent, _ in log.open_intents():
        if intent["seq"] == body.get("intent_seq"):
            log.close_intent(intent, "interrupted", receipt_id=plan.receipt_id, resumed=True)


def _run_probes(plan: Plan, store: ObjectStore) -> list[tuple[str, str]]:
    """(run_id, probe_id) of every run of a watchlist whose probe is erased."""
    runs = list_runs(store)
    return [(m["run_id"], p) for w, p in plan.probes for m in runs if m["watchlist_id"] == w]


def _failures(result: list[dict[str, Any]]) -> str:
    return "; ".join(f"{c['check']}: {c.get('detail', '')}" for c in result if not c["passed"])


def _digest(text: str) -> str:
    return "sha256:" + hashlib.sha256(text.encode()).hexdigest()

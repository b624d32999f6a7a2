"""The audit trail, attacked: every way of altering, cutting or forging it must show in `verify`.

Each test writes a real chain under a tmp home (signing key beside it, outside the home, as in production),
then does what an insider with write access to the home could do, and asserts that `verify` names it.
"""

from __future__ import annotations

import errno
import itertools
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import make_settings
from helpers import child_env, faithful_conditional_puts

from jobs.audit_job import export_checkpoint, verify_home
from pipelines import audit as audit_module
from pipelines import objectstore
from pipelines.audit import (
    CHECKPOINT_EVERY,
    GENESIS,
    LEGACY,
    MAX_RECORD_BYTES,
    AuditLog,
    AuditUnavailable,
    Head,
    canonical,
    digest,
    record_hash,
    record_key,
)
from pipelines.errors import Refused
from pipelines.objectstore import LocalStore
from pipelines.settings import Settings
from pipelines.signing import PRIVATE, PUBLIC, load_signer, public_key_hex

ROOT = Path(__file__).resolve().parents[1]


def new_log(tmp_path: Path, n: int = 0) -> tuple[Settings, AuditLog]:
    settings = make_settings(tmp_path / "home")
    log = AuditLog.of(settings)
    fill(log, n)
    return settings, log


def fill(log: AuditLog, n: int, start: int = 0) -> None:
    for i in range(start, start + n):
        log.append("analyst-1", "match", case_id=f"CASE-{i}", counts={"candidates": i})


def path_of(settings: Settings, seq: int) -> Path:
    return Path(settings.store.location(record_key(seq)))


def broken(log: AuditLog, **kw: Any) -> dict[str, Any]:
    result = log.verify(**kw)
    assert result["ok"] is False and result["problems"], result
    return result


def said(result: dict[str, Any]) -> str:
    return " | ".join(result["problems"])


def rehash_from(settings: Settings, seq: int, change: dict[str, Any]) -> None:
    """A perfect forgery without the key: rewrite record `seq`, then recompute every later prev_hash and hash."""
    prev = None
    last = len(list((settings.local_home / "audit" / "records").rglob("*.json")))
    for n in range(seq, last + 1):
        record = json.loads(path_of(settings, n).read_bytes())
        if n == seq:
            record |= change
        else:
            record["prev_hash"] = prev
        record["hash"] = record_hash(record)
        prev = record["hash"]
        path_of(settings, n).write_bytes(canonical(record))


# -- 1. one chain, whoever writes ------------------------------------------------------------------------------


def test_chain_links_every_record(tmp_path: Path) -> None:
    settings, log = new_log(tmp_path, 5)
    records = log.records()
    assert [r["seq"] for r in records] == [1, 2, 3, 4, 5]
    assert records[0]["prev_hash"] == GENESIS
    assert all(b["prev_hash"] == a["hash"] for a, b in itertools.pairwise(records))
    assert all(record_hash(r) == r["hash"] for r in records)
    on_disk = sorted((settings.local_home / "audit" / "records").rglob("*.json"))
    assert [json.loads(p.read_bytes()) for p in on_disk] == records  # one object per record, nothing else
    result = log.verify()
    assert result["ok"] and result["problems"] == [] and result["first_bad_record"] is None
    assert result["records"] == 5 and result["head"] == {"seq": 5, "hash": records[-1]["hash"]}
    assert result["witness"] == "000000000005"  # the signed head of record 5 lies outside the home
    assert not (settings.local_home / "audit-signing-key.pem").exists() and not list(settings.local_home.rglob("*.pem"))


def test_concurrent_threads_never_share_a_sequence_number(
    any_settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every thread reads the same head before any of them writes: all but one must lose seq 1 and retry."""
    settings = any_settings
    load_signer(settings.resolved_audit_key_dir)  # the key's own first-use race has its test below
    threads, per_thread = 6, (3 if settings.storage.is_s3 else 8)
    if settings.storage.is_s3:
        faithful_conditional_puts()
    barrier = threading.Barrier(threads, timeout=30)
    real_head = AuditLog._find_head
    first: set[int] = set()
    lost: list[str] = []
    store_type = type(settings.store)
    real_create = store_type.create

    def head(self: AuditLog, *args: Any) -> Head:
        h = real_head(self, *args)
        if threading.get_ident() not in first:
            first.add(threading.get_ident())
            barrier.wait()  # everybody holds the same head now
        return h

    def create(self: Any, key: str, data: bytes) -> bool:
        made = real_create(self, key, data)
        if key.startswith("audit/records/") and not made:
            lost.append(key)
        return made

    monkeypatch.setattr(AuditLog, "_find_head", head)
    monkeypatch.setattr(store_type, "create", create)
    errors: list[BaseException] = []

    def work(worker: int) -> None:
        try:
            log = AuditLog.of(settings)
            for i in range(per_thread):
                log.append(f"thread-{worker}", "review", counts={"i": i})
        except BaseException as exc:  # noqa: BLE001 - reported by the assertion below
            errors.append(exc)

    pool = [threading.Thread(target=work, args=(w,)) for w in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join(timeout=120)
    assert errors == []
    assert len(lost) >= threads - 1  # the race really happened, on seq 1 at least
    log = AuditLog.of(settings)
    seqs = [r["seq"] for r in log.records()]
    assert seqs == list(range(1, threads * per_thread + 1))
    actors = [r["actor"] for r in log.records()]
    assert all(actors.count(f"thread-{w}") == per_thread for w in range(threads))
    assert log.verify()["ok"]


def test_first_use_of_the_key_from_many_threads_makes_one_key(tmp_path: Path) -> None:
    key_dir = tmp_path / "keys"
    threads = 8
    barrier = threading.Barrier(threads, timeout=30)
    keys: list[str] = []
    errors: list[BaseException] = []

    def first_use() -> None:
        try:
            barrier.wait()
            keys.append(load_signer(key_dir).public_hex)
        except BaseException as exc:  # noqa: BLE001 - reported by the assertion below
            errors.append(exc)

    for _ in range(5):  # a few rounds: the race window is small
        shutil.rmtree(key_dir, ignore_errors=True)
        keys.clear()
        pool = [threading.Thread(target=first_use) for _ in range(threads)]
        for t in pool:
            t.start()
        for t in pool:
            t.join(timeout=60)
        assert errors == []
        assert len(keys) == threads and len(set(keys)) == 1  # everybody signs with the one key that was kept
        assert public_key_hex(key_dir) == keys[0] == load_signer(key_dir).public_hex
        assert sorted(p.name for p in key_dir.iterdir()) == [PRIVATE, PUBLIC]  # no temporary file left behind


def test_a_lost_public_key_is_published_again(tmp_path: Path) -> None:
    """A first use that died between writing the private and the public key must not break verify forever."""
    settings, log = new_log(tmp_path, 2)
    public = settings.resolved_audit_key_dir / PUBLIC
    expected = public.read_text()
    public.unlink()
    assert "no public key" in said(broken(log))
    log.append("analyst-1", "match")
    assert public.read_text() == expected and log.verify()["ok"]


WRITER = """
import sys, time
from pathlib import Path
from pipelines.audit import AuditLog
from pipelines.settings import Settings

home, keys, worker, n, sync = sys.argv[1:]
settings = Settings(home=home, audit_key_dir=keys, model_downloads=False)
Store = type(settings.store)
real_head, real_create, lost, first = AuditLog._find_head, Store.create, [0], [True]

def head(self, *args):
    h = real_head(self, *args)
    if first[0]:  # read the head, then wait for every other process to have read it too
        first[0] = False
        Path(sync, "ready-" + worker).touch()
        deadline = time.time() + 60
        while not Path(sync, "go").exists() and time.time() < deadline:
            time.sleep(0.002)
    return h

def create(self, key, data):
    made = real_create(self, key, data)
    lost[0] += key.startswith("audit/records/") and not made
    return made

AuditLog._find_head, Store.create = head, create
log = AuditLog.of(settings)
for i in range(int(n)):
    log.append("process-" + worker, "match", counts={"i": i})
print(lost[0])
"""


def test_concurrent_processes_form_one_chain(any_settings: Settings, tmp_path: Path) -> None:
    """Processes (each its own S3 client, or its own files) that all read head 2 and write at once."""
    settings, log = any_settings, AuditLog.of(any_settings)
    fill(log, 2)  # the key exists; the processes race on records only
    sync = tmp_path / "sync"
    sync.mkdir()
    procs, per_proc = 3, (4 if settings.storage.is_s3 else 12)
    if settings.storage.is_s3:
        faithful_conditional_puts()
    env = child_env(PYTHONPATH=str(ROOT))
    running = [
        subprocess.Popen(
            [
                sys.executable,
                "-c",
                WRITER,
                settings.home_uri,
                str(settings.audit_key_dir),
                str(w),
                str(per_proc),
                str(sync),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
            cwd=ROOT,
        )
        for w in range(procs)
    ]
    deadline = time.time() + 60
    while len(list(sync.glob("ready-*"))) < procs and time.time() < deadline:
        assert all(p.poll() is None for p in running), [p.communicate() for p in running]
        time.sleep(0.01)
    (sync / "go").touch()  # all three hold head 2: they all try seq 3 at once
    outs = [p.communicate(timeout=120) for p in running]
    assert [p.returncode for p in running] == [0] * procs, outs
    assert sum(int(out.strip()) for out, _ in outs) >= procs - 1  # the race happened
    records = log.records()
    total = 2 + procs * per_proc
    assert [r["seq"] for r in records] == list(range(1, total + 1))  # no seq twice, none lost
    assert all([r["actor"] for r in records].count(f"process-{w}") == per_proc for w in range(procs))
    result = log.verify()
    assert result["ok"] and result["records"] == total, result


def test_the_head_is_found_without_reading_the_trail(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Appending must not get slower as the trail grows: the head is read forward from the witness (no listing);
    with nothing to start from, it is found by listing the last folder alone."""
    monkeypatch.setattr(audit_module, "BUCKET", 10)
    settings, log = new_log(tmp_path, 25)  # folders 0 (1-9), 1 (10-19), 2 (20-25)
    folders = sorted(p.name for p in (settings.local_home / "audit" / "records").iterdir())
    assert folders == ["00000000", "00000001", "00000002"]
    assert log.verify()["ok"]
    listed: list[str] = []
    read: list[str] = []
    real_list, real_read = LocalStore.list, LocalStore.read

    def spy_list(self: LocalStore, prefix: str) -> list[str]:
        keys = real_list(self, prefix)
        if self.root == settings.local_home:  # the home, not the witness (a local folder beside the key)
            listed.extend(keys)
        return keys

    def spy_read(self: LocalStore, key: str) -> bytes | None:
        if self.root == settings.local_home:
            read.append(key)
        return real_read(self, key)

    monkeypatch.setattr(LocalStore, "list", spy_list)
    monkeypatch.setattr(LocalStore, "read", spy_read)
    assert AuditLog.of(settings).head().seq == 25  # a new log (another command): only the witness to start from
    assert listed == [] and read == [record_key(25), record_key(26)], read
    read.clear()
    assert log.append("analyst-1", "match")["seq"] == 26
    assert listed == [] and [k for k in read if k.startswith("audit/records/")] == [record_key(25), record_key(26)]
    shutil.rmtree(log.witness_dir)  # nothing to start from: the last folder is listed, and only it
    read.clear()
    assert AuditLog.of(settings).head().seq == 26
    assert listed and all(k.startswith("audit/records/00000002/") for k in listed), listed
    monkeypatch.setattr(LocalStore, "list", real_list)
    monkeypatch.setattr(LocalStore, "read", real_read)
    shutil.rmtree(settings.local_home / "audit" / "records" / "00000001")  # a whole middle folder goes
    result = broken(log)
    assert result["first_bad_record"] == 10 and "record 10 is missing" in said(result)


# -- 2. tampering ------------------------------------------------------------------------------------------------


def test_a_flipped_byte_in_a_middle_record_is_caught_there(tmp_path: Path) -> None:
    settings, log = new_log(tmp_path, 8)
    path = path_of(settings, 4)
    data = bytearray(path.read_bytes())
    data[data.index(b"CASE-3") + 5] ^= 0x01  # CASE-3 -> CASE-2: still valid JSON, no longer what was hashed
    path.write_bytes(bytes(data))
    result = broken(log)
    assert result["first_bad_record"] == 4 and "record 4" in said(result) and "altered" in said(result)


def test_a_torn_record_is_caught_there(tmp_path: Path) -> None:
    settings, log = new_log(tmp_path, 8)
    path = path_of(settings, 5)
    path.write_bytes(path.read_bytes()[:40])
    result = broken(log)
    assert result["first_bad_record"] == 5 and "record 5 is not a readable record" in said(result)


def test_a_deleted_middle_record_is_caught_as_a_gap(tmp_path: Path) -> None:
    settings, log = new_log(tmp_path, 8)
    path_of(settings, 4).unlink()
    result = broken(log)
    assert result["first_bad_record"] == 4 and "record 4 is missing" in said(result)


@pytest.mark.parametrize("name", ["00000000/zzz-notes.json", "00000000/12.json", "00000000/000000000004.json.bak"])
def test_an_object_planted_among_the_records_is_reported_not_a_crash(tmp_path: Path, name: str) -> None:
    settings, log = new_log(tmp_path, 4)
    planted = settings.local_home / "audit" / "records" / name
    planted.write_bytes(path_of(settings, 4).read_bytes())
    result = broken(log)
    assert f"audit/records/{name} is not a record object" in said(result)
    assert len(log.records()) == 5  # `audit show` still lists everything, the stray one as it is


def test_cutting_the_last_records_is_caught_by_the_witness(tmp_path: Path) -> None:
    """The remaining chain is perfect: only a signed head kept outside the home knows there were 8."""
    settings, log = new_log(tmp_path, 8)
    for seq in (7, 8):
        settings.store.delete(record_key(seq))
    result = broken(log)
    assert result["first_bad_record"] is None  # every remaining record is fine
    assert "witness" in said(result) and "vouches for 8 records but the log holds 6" in said(result)


def test_a_cut_tail_stays_caught_after_new_records(tmp_path: Path) -> None:
    settings, log = new_log(tmp_path, 8)
    for seq in (7, 8):
        settings.store.delete(record_key(seq))
    assert not log.verify()["ok"]
    with pytest.raises(AuditUnavailable, match="no longer extends its witness"):
        fill(log, 3, start=100)  # the product refuses to go on working on the cut chain (fails closed)
    assert not log.verify()["ok"]
    assert len(settings.store.list("audit/records/")) == 6  # nothing was appended


def test_keeping_only_the_first_two_records_is_caught(tmp_path: Path) -> None:
    settings, log = new_log(tmp_path, 8)
    for seq in range(3, 9):
        path_of(settings, seq).unlink()
    result = broken(log)
    assert result["records"] == 2 and "the log holds 2" in said(result)


def test_an_emptied_log_is_caught(tmp_path: Path) -> None:
    settings, log = new_log(tmp_path, 8)
    for path in (settings.local_home / "audit" / "records").rglob("*.json"):
        path.unlink()
    result = broken(log)
    assert result["records"] == 0 and "the log holds 0" in said(result) and "emptied or deleted" in said(result)


def test_a_deleted_audit_folder_is_caught(tmp_path: Path) -> None:
    settings, _ = new_log(tmp_path, 8)
    shutil.rmtree(settings.local_home / "audit")
    result = broken(AuditLog.of(settings))
    assert result["records"] == 0 and "vouches for 8 records but the log holds 0" in said(result)


def test_swapped_records_are_caught_at_the_first(tmp_path: Path) -> None:
    settings, log = new_log(tmp_path, 8)
    a, b = path_of(settings, 4), path_of(settings, 5)
    first, second = a.read_bytes(), b.read_bytes()
    a.write_bytes(second)
    b.write_bytes(first)
    result = broken(log)
    assert result["first_bad_record"] == 4 and "reordered" in said(result), said(result)


def test_a_perfect_rehash_without_the_key_is_caught_by_the_witness(tmp_path: Path) -> None:
    """Rewrite record 4 and recompute every later prev_hash and hash: the chain alone is consistent again."""
    settings, log = new_log(tmp_path, 8)
    rehash_from(settings, 4, {"actor": "someone-else", "case_id": "CASE-OTHER"})
    records = log.records()
    assert records[3]["actor"] == "someone-else"
    assert all(b["prev_hash"] == a["hash"] for a, b in itertools.pairwise(records))  # the forgery is complete
    result = broken(log)
    assert result["first_bad_record"] is None  # no record is out of place: only the signed head disagrees
    assert "witness" in said(result) and "rewritten" in said(result) and "record 8" in said(result)


def test_a_perfect_rehash_is_caught_by_the_home_checkpoint_too(tmp_path: Path) -> None:
    settings, log = new_log(tmp_path, 70)
    home_checkpoints = sorted(p.name for p in (settings.local_home / "audit" / "checkpoints").iterdir())
    assert home_checkpoints == [f"{CHECKPOINT_EVERY:012d}.json"]
    assert log.verify()["ok"]
    rehash_from(settings, 10, {"case_id": "CASE-OTHER"})
    result = broken(log)
    assert "witness" in said(result) and f"home checkpoint {CHECKPOINT_EVERY:012d}.json says record 64" in said(result)
    shutil.rmtree(log.witness_dir)  # a verifier holding only the home (and the public key) still sees it
    alone = broken(log)
    assert alone["witness"] is None and "home checkpoint" in said(alone) and "rewritten" in said(alone)


def test_a_forged_home_checkpoint_is_caught(tmp_path: Path) -> None:
    settings, log = new_log(tmp_path, 64)
    path = settings.local_home / "audit" / "checkpoints" / f"{CHECKPOINT_EVERY:012d}.json"
    body = json.loads(path.read_bytes())
    path.write_bytes(json.dumps(body | {"count": 60}).encode())  # lower the count it vouches for
    result = broken(log)
    assert "invalid signature" in said(result)


# -- 2b. tampering through the bucket (an S3 home) -------------------------------------------------------------


def s3_key(settings: Settings, key: str) -> tuple[Any, str, str]:
    """A raw boto3 client (what an insider with the bucket's credentials has), the bucket, and the object key."""
    from s3 import client

    bucket, _, prefix = settings.home_uri.removeprefix("s3://").partition("/")
    return client(dict(os.environ)), bucket, f"{prefix}/{key}"


def test_a_record_overwritten_in_the_bucket_is_caught(s3_settings: Settings) -> None:
    settings, log = s3_settings, AuditLog.of(s3_settings)
    fill(log, 6)
    assert log.verify()["ok"]
    raw, bucket, key = s3_key(settings, record_key(3))
    record = json.loads(raw.get_object(Bucket=bucket, Key=key)["Body"].read())
    raw.put_object(Bucket=bucket, Key=key, Body=canonical(record | {"case_id": "CASE-OTHER"}))  # a plain PUT
    result = broken(log)
    assert result["first_bad_record"] == 3 and "record 3: its content does not match its hash" in said(result)


def test_a_perfect_rehash_in_the_bucket_is_caught_by_the_witness(s3_settings: Settings) -> None:
    settings, log = s3_settings, AuditLog.of(s3_settings)
    fill(log, 6)
    raw, bucket, _ = s3_key(settings, record_key(1))
    prev = None
    for seq in range(3, 7):  # rewrite record 3, then recompute every later prev_hash and hash
        key = s3_key(settings, record_key(seq))[2]
        record = json.loads(raw.get_object(Bucket=bucket, Key=key)["Body"].read())
        record |= {"actor": "someone-else"} if seq == 3 else {"prev_hash": prev}
        record["hash"] = prev = record_hash(record)
        raw.put_object(Bucket=bucket, Key=key, Body=canonical(record))
    result = broken(log)
    assert result["first_bad_record"] is None and "witness" in said(result) and "rewritten" in said(result)


def test_records_deleted_in_the_bucket_are_caught_and_stop_every_action(s3_settings: Settings) -> None:
    settings, log = s3_settings, AuditLog.of(s3_settings)
    fill(log, 6)
    raw, bucket, key = s3_key(settings, record_key(3))
    raw.delete_object(Bucket=bucket, Key=key)
    result = broken(log)
    assert result["first_bad_record"] == 3 and "record 3 is missing" in said(result)
    for seq in (5, 6):  # the tail too: the remaining records 1, 2, 4 say nothing of it, the witness does
        raw.delete_object(Bucket=bucket, Key=s3_key(settings, record_key(seq))[2])
    assert "vouches for 6 records but the log holds 3" in said(broken(log))
    with pytest.raises(AuditUnavailable, match="no longer extends its witness"):
        AuditLog.of(settings).append("analyst-1", "match")  # fails closed: nothing is added to a cut log
    assert len(settings.store.list("audit/records/")) == 3


class Requests:
    """Every request the home's boto3 client sends, by operation (`before-send` fires once per HTTP request)."""

    def __init__(self, settings: Settings) -> None:
        self.client = settings.storage.s3.client()  # type: ignore[union-attr]
        self.sent: list[str] = []

    def _count(self, event_name: str, **_: Any) -> None:
        self.sent.append(event_name.rsplit(".", 1)[-1])

    def __enter__(self) -> Requests:
        self.client.meta.events.register("before-send.s3.*", self._count)
        return self

    def __exit__(self, *exc: object) -> None:
        self.client.meta.events.unregister("before-send.s3.*", self._count)

    def of(self, operation: str) -> int:
        return self.sent.count(operation)


def test_an_append_on_s3_costs_a_few_requests_whatever_the_trail_length(
    s3_settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No listing when appending (a listing grows with the trail, and S3 lists 1000 keys per request): the head
    is read forward from the witness, so an append is a handful of GETs and one PUT, at 3 records as at 40."""
    monkeypatch.setattr(audit_module, "BUCKET", 10)  # several folders, as a long trail has
    settings = s3_settings
    costs = []
    for total in (3, 40):
        fill(AuditLog.of(settings), total - len(settings.store.list("audit/records/")))
        with Requests(settings) as sent:
            AuditLog.of(settings).append("analyst-1", "match")  # a new log, as every command makes
        costs.append(sorted(sent.sent))
        assert sent.of("ListObjectsV2") == 0 and sent.of("PutObject") == 1 and sent.of("GetObject") <= 3, sent.sent
    assert costs[0] == costs[1]
    # a home that began as a one-file log: whether it was adopted is one read, not a listing of the whole chain
    first = b"\n".join(settings.store.read(record_key(seq)) or b"" for seq in (1, 2, 3))
    assert settings.store.create(LEGACY, first + b"\n")
    with Requests(settings) as sent:
        AuditLog.of(settings).append("analyst-1", "match")
    assert sent.of("ListObjectsV2") == 0 and sent.of("GetObject") <= 4, sent.sent  # one more: the last legacy record
    with Requests(settings) as sent, AuditLog.of(settings).action("analyst-1", "match", case_id="C-1"):
        pass  # legacy check (2 GETs), intent (2 GETs, PUT), open marker, outcome (2 GETs, PUT), marker removed
    assert sent.of("ListObjectsV2") == 0 and len(sent.sent) <= 10, sent.sent
    with Requests(settings) as sent:
        assert AuditLog.of(settings).head().seq == 44
    assert sent.sent == ["GetObject", "GetObject"]
    with Requests(settings) as sent:
        assert AuditLog.of(settings).verify()["ok"]
    assert sent.of("GetObject") == 44 + 1 and sent.of("ListObjectsV2") <= 3  # a GET a record, and the legacy log


# -- 3. bounded records ------------------------------------------------------------------------------------------


def test_oversized_values_are_bounded_and_the_chain_goes_on(tmp_path: Path) -> None:
    settings, log = new_log(tmp_path, 2)
    note, ids = "n" * 70_000, [f"id-{i}" for i in range(10_000)]
    record = log.append("analyst-1", "watchlist.submit", note=note, ids=ids, fine=["a", "b"])
    assert record["note"] == {"chars": 70_000, "digest": digest(note)}  # proves what was asked without holding it
    assert record["ids"] == {"count": 10_000, "digest": digest(ids)} and record["fine"] == ["a", "b"]
    size = path_of(settings, 3).stat().st_size
    assert size < 2_048 < MAX_RECORD_BYTES
    after = log.append("analyst-1", "match", case_id="CASE-9")
    assert after["seq"] == 4 and after["prev_hash"] == record["hash"]
    assert log.verify()["ok"]


def test_a_record_over_the_cap_is_refused_and_nothing_is_written(tmp_path: Path) -> None:
    _, log = new_log(tmp_path, 2)
    wide = {f"k{i}": [f"{i}-{j}-" + "v" * 240 for j in range(32)] for i in range(32)}  # every part within bounds
    with pytest.raises(AuditUnavailable, match="over the 16384 cap"):
        log.append("analyst-1", "match", detail=wide)
    assert [r["seq"] for r in log.records()] == [1, 2]
    assert log.append("analyst-1", "match")["seq"] == 3 and log.verify()["ok"]


def test_a_near_cap_record_does_not_hide_the_head(tmp_path: Path) -> None:
    settings, log = new_log(tmp_path, 1)
    big = log.append("a", "x", detail={f"k{i}": ["v" * 250] * 2 for i in range(28)})
    assert 14_000 < path_of(settings, 2).stat().st_size <= MAX_RECORD_BYTES
    assert log.head() == Head(2, big["hash"])
    assert log.append("a", "y")["prev_hash"] == big["hash"] and log.verify()["ok"]


# -- 4. write-ahead ----------------------------------------------------------------------------------------------


def _full_disk_at_create(monkeypatch: pytest.MonkeyPatch) -> None:
    real = LocalStore.create

    def create(self: LocalStore, key: str, data: bytes) -> bool:
        if key.startswith("audit/"):
            raise OSError(errno.ENOSPC, "No space left on device", key)
        return real(self, key, data)

    monkeypatch.setattr(LocalStore, "create", create)


def _full_disk_at_write(monkeypatch: pytest.MonkeyPatch) -> None:
    real = objectstore._write_synced

    def write(path: Path, data: bytes) -> None:
        if "audit" in path.parts:
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        real(path, data)

    monkeypatch.setattr(objectstore, "_write_synced", write)


@pytest.mark.parametrize("full_disk", [_full_disk_at_create, _full_disk_at_write], ids=["create", "write"])
def test_no_intent_no_action(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, full_disk: Any) -> None:
    _, log = new_log(tmp_path, 2)
    full_disk(monkeypatch)
    ran: list[str] = []
    with pytest.raises(AuditUnavailable, match="nothing was done"), log.action("analyst-1", "match", case_id="C-1"):
        ran.append("searched")
    assert ran == []  # the search never ran unaudited
    monkeypatch.undo()
    assert [r["seq"] for r in log.records()] == [1, 2] and log.open_intents() == []
    assert log.verify()["ok"]


def test_an_action_records_intent_then_outcome(tmp_path: Path) -> None:
    _, log = new_log(tmp_path)
    with log.action("analyst-1", "match", case_id="C-1", purpose="fraud-investigation") as op:
        assert [r["phase"] for r in log.records()] == ["intent"]  # written before the body runs
        assert len(log.open_intents()) == 1
        op.record(counts={"candidates": 3})
    intent, outcome = log.records()
    assert intent["phase"] == "intent" and intent["case_id"] == "C-1"
    assert outcome["phase"] == "outcome" and outcome["intent_seq"] == intent["seq"] and outcome["status"] == "ok"
    assert outcome["counts"] == {"candidates": 3} and outcome["case_id"] == "C-1"
    assert log.open_intents() == [] and log.verify()["incomplete_actions"] == []


def test_a_failing_action_gets_a_failed_outcome(tmp_path: Path) -> None:
    _, log = new_log(tmp_path)
    with pytest.raises(ValueError, match="boom"), log.action("analyst-1", "match", case_id="C-1") as op:
        op.record(counts={"candidates": 1})
        raise ValueError("boom")
    intent, outcome = log.records()
    assert outcome["phase"] == "outcome" and outcome["intent_seq"] == intent["seq"]
    assert outcome["status"] == "failed" and outcome["error"] == "ValueError" and outcome["case_id"] == "C-1"
    assert outcome["error_digest"] == digest("boom")  # the message itself could hold anything: only its digest
    result = log.verify()
    assert result["ok"] and result["incomplete_actions"] == []


def test_an_intent_without_outcome_shows_in_verify(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _, log = new_log(tmp_path, 1)

    def killed(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(AuditLog, "_close", killed)
    with pytest.raises(KeyboardInterrupt), log.action("analyst-1", "match", case_id="C-9", run_id="run-1"):
        pass
    monkeypatch.undo()
    result = log.verify()
    assert result["ok"]  # nothing was altered: the trail says truthfully that the outcome is unknown
    assert len(result["incomplete_actions"]) == 1
    stopped = result["incomplete_actions"][0]
    assert stopped["seq"] == 2 and stopped["action"] == "match" and stopped["case_id"] == "C-9"
    [(intent, owner)] = log.open_intents()
    assert intent["seq"] == 2 and owner["pid"] == os.getpid()
    closed = log.close_intent(intent, "interrupted")
    assert closed["intent_seq"] == 2 and closed["status"] == "interrupted"
    assert log.verify()["incomplete_actions"] == [] and log.open_intents() == []


# -- 5. anchors --------------------------------------------------------------------------------------------------


def test_handed_out_heads_are_held_against_the_log(tmp_path: Path) -> None:
    _, log = new_log(tmp_path, 5)
    records = log.records()
    good = log.verify(anchors=[("result set run-1", Head(3, records[2]["hash"]))])
    assert good["ok"] and good["anchors_checked"] == 1 + 4  # the manifest's head and the 4 witness checkpoints kept
    beyond = broken(log, anchors=[("result set run-1", Head(9, records[-1]["hash"]))])
    assert "result set run-1 vouches for 9 records but the log holds 5" in said(beyond)
    other = broken(log, anchors=[("erasure receipt r-1", Head(3, "ab" * 32))])
    assert "erasure receipt r-1 says record 3 has hash abababab" in said(other) and "rewritten" in said(other)


def test_a_checkpoint_kept_elsewhere_is_extended_by_later_records(tmp_path: Path) -> None:
    settings, log = new_log(tmp_path, 5)
    kept = tmp_path / "third-party" / "checkpoint.json"
    exported = export_checkpoint(settings, kept)
    assert exported["count"] == 6  # the export is itself audited
    fill(log, 3, start=5)
    assert verify_home(settings, kept)["ok"]
    with pytest.raises(Refused, match="never overwritten"):
        export_checkpoint(settings, kept)


def test_a_cut_below_a_kept_checkpoint_is_caught(tmp_path: Path) -> None:
    settings, log = new_log(tmp_path, 5)
    kept = tmp_path / "checkpoint.json"
    export_checkpoint(settings, kept)
    fill(log, 3, start=5)
    for seq in range(5, 10):
        settings.store.delete(record_key(seq))
    shutil.rmtree(log.witness_dir)  # even without the witness, the third party's copy tells
    result = verify_home(settings, kept)
    assert not result["ok"]
    assert "the checkpoint given with --against vouches for 6 records but the log holds 4" in said(result)


def test_a_rehash_below_a_kept_checkpoint_is_caught(tmp_path: Path) -> None:
    settings, log = new_log(tmp_path, 5)
    kept = tmp_path / "checkpoint.json"
    export_checkpoint(settings, kept)
    rehash_from(settings, 2, {"actor": "someone-else"})
    shutil.rmtree(log.witness_dir)
    result = verify_home(settings, kept)
    assert not result["ok"] and "--against says record 6" in said(result) and "rewritten" in said(result)


@pytest.mark.parametrize(
    "alter", [{"signature": "flip"}, {"count": 3}, {"head_hash": "cd" * 32}], ids=["signature", "count", "head"]
)
def test_an_altered_checkpoint_is_refused(tmp_path: Path, alter: dict[str, Any]) -> None:
    settings, _ = new_log(tmp_path, 5)
    kept = tmp_path / "checkpoint.json"
    export_checkpoint(settings, kept)
    body = json.loads(kept.read_bytes())
    if alter.get("signature") == "flip":
        sig = body["signature"]
        alter = {"signature": sig[:-1] + ("0" if sig[-1] != "0" else "1")}
    forged = tmp_path / "forged.json"
    forged.write_bytes(json.dumps(body | alter).encode())
    result = verify_home(settings, forged)
    assert not result["ok"] and "--against has an invalid signature" in said(result)


def test_a_checkpoint_signed_by_another_key_is_refused(tmp_path: Path) -> None:
    settings, _ = new_log(tmp_path, 5)
    impostor = make_settings(settings.home, audit_key_dir=tmp_path / "impostor-keys")
    forged = tmp_path / "forged.json"
    forged.write_bytes(AuditLog.of(impostor).checkpoint().to_json())  # a valid signature, by the wrong key
    result = verify_home(settings, forged)
    assert not result["ok"] and "--against is signed by another key" in said(result)


def test_a_checkpoint_of_another_home_is_refused(tmp_path: Path) -> None:
    settings, _ = new_log(tmp_path, 5)
    other = make_settings(tmp_path / "other-home", audit_key_dir=settings.audit_key_dir)  # same key
    other_log = AuditLog.of(other)
    fill(other_log, 5)
    forged = tmp_path / "forged.json"
    forged.write_bytes(other_log.checkpoint().to_json())
    result = verify_home(settings, forged)
    assert not result["ok"] and "--against is for another home" in said(result)


def test_a_missing_or_garbage_checkpoint_file_is_refused(tmp_path: Path) -> None:
    settings, _ = new_log(tmp_path, 2)
    with pytest.raises(Refused, match="not a checkpoint file"):
        verify_home(settings, tmp_path / "nowhere.json")
    garbage = tmp_path / "garbage.json"
    garbage.write_text('{"home": "x"}')
    with pytest.raises(Refused, match="not a gallerymatch audit checkpoint"):
        verify_home(settings, garbage)


# -- 6. the key lives outside the home ---------------------------------------------------------------------------


def test_a_key_folder_inside_the_home_is_refused(tmp_path: Path) -> None:
    home = tmp_path / "home"
    for inside in (home / "keys", home, home / "a" / ".." / "keys"):
        with pytest.raises(Refused, match="inside GALLERYMATCH_HOME"):
            _ = Settings(home=home, audit_key_dir=inside).resolved_audit_key_dir
    with pytest.raises(Refused):
        AuditLog.of(Settings(home=home, audit_key_dir=home / "keys"))
    assert not (home / "keys").exists()


def test_a_key_folder_linked_into_the_home_is_refused(tmp_path: Path) -> None:
    home = tmp_path / "home"
    (home / "keys").mkdir(parents=True)
    link = tmp_path / "keys-link"
    link.symlink_to(home / "keys")
    with pytest.raises(Refused, match="inside GALLERYMATCH_HOME"):
        _ = Settings(home=home, audit_key_dir=link).resolved_audit_key_dir


def test_a_legacy_one_file_log_is_adopted_into_the_chain(tmp_path: Path) -> None:
    """A home made before records became objects keeps its history: the old lines become records 1..n."""
    import hashlib as _hashlib
    import json as _json

    settings = make_settings(tmp_path / "home")
    prev, lines = "0" * 64, []
    for seq in range(1, 4):
        record = {"seq": seq, "time": "2026-11-01T00:00:00+00:00", "actor": "a", "action": "match", "prev_hash": prev}
        body = _json.dumps(record, sort_keys=True, separators=(",", ":")).encode()
        record["hash"] = prev = _hashlib.sha256(body).hexdigest()
        lines.append(_json.dumps(record, sort_keys=True, separators=(",", ":")).encode())
    legacy = settings.local_home / "audit" / "audit.jsonl"
    legacy.parent.mkdir(parents=True)
    legacy.write_bytes(b"\n".join(lines) + b"\n")
    log = AuditLog.of(settings)
    assert "legacy log" in " ".join(log.verify()["problems"])  # not silently ignored before adoption
    log.append("b", "review")
    records = log.records()
    assert [r["seq"] for r in records] == [1, 2, 3, 4] and records[3]["prev_hash"] == prev
    assert log.verify()["ok"]
    lines[1] = lines[1].replace(b'"match"', b'"matcH"')  # an altered legacy log is never adopted
    other = make_settings(tmp_path / "home2")
    (other.local_home / "audit").mkdir(parents=True)
    (other.local_home / "audit" / "audit.jsonl").write_bytes(b"\n".join(lines))
    with pytest.raises(AuditUnavailable, match="altered at record 2"):
        AuditLog.of(other).append("b", "review")
    assert other.store.list("audit/records/") == []

"""The audit trail: hash chain, tamper detection at the right record, one chain under concurrent writers."""

from __future__ import annotations

import itertools
import json
import multiprocessing
from pathlib import Path

from pipelines.audit import GENESIS, AuditLog


def fill(log: AuditLog, n: int) -> None:
    for i in range(n):
        log.append("analyst-1", "match", case_id=f"CASE-{i}", counts={"candidates": i})


def test_chain_links_every_record(tmp_path: Path) -> None:
    log = AuditLog(tmp_path / "audit")
    fill(log, 5)
    records = log.records()
    assert [r["seq"] for r in records] == [1, 2, 3, 4, 5]
    assert records[0]["prev_hash"] == GENESIS
    assert all(b["prev_hash"] == a["hash"] for a, b in itertools.pairwise(records))
    assert log.verify() == {"ok": True, "records": 5, "head": records[-1]["hash"]}


def test_a_flipped_byte_is_caught_at_its_record(tmp_path: Path) -> None:
    log = AuditLog(tmp_path / "audit")
    fill(log, 6)
    lines = log.path.read_bytes().splitlines()
    target = bytearray(lines[3])
    at = target.index(b"CASE-3") + 5
    target[at] ^= 0x01  # CASE-3 -> CASE-2: still valid JSON, no longer the hashed content
    lines[3] = bytes(target)
    log.path.write_bytes(b"\n".join(lines) + b"\n")
    result = log.verify()
    assert not result["ok"] and result["first_bad_line"] == 4 and "altered" in result["problem"]


def test_a_deleted_record_is_caught_where_the_gap_is(tmp_path: Path) -> None:
    log = AuditLog(tmp_path / "audit")
    fill(log, 6)
    lines = log.path.read_bytes().splitlines()
    del lines[2]
    log.path.write_bytes(b"\n".join(lines) + b"\n")
    result = log.verify()
    assert not result["ok"] and result["first_bad_line"] == 3 and "prev_hash" in result["problem"]


def test_two_swapped_records_are_caught_at_the_first(tmp_path: Path) -> None:
    log = AuditLog(tmp_path / "audit")
    fill(log, 6)
    lines = log.path.read_bytes().splitlines()
    lines[1], lines[2] = lines[2], lines[1]
    log.path.write_bytes(b"\n".join(lines) + b"\n")
    result = log.verify()
    assert not result["ok"] and result["first_bad_line"] == 2


def test_a_rewritten_record_with_a_fresh_hash_breaks_the_next_link(tmp_path: Path) -> None:
    from pipelines.audit import canonical, record_hash

    log = AuditLog(tmp_path / "audit")
    fill(log, 4)
    lines = log.path.read_bytes().splitlines()
    forged = json.loads(lines[1]) | {"actor": "someone-else"}
    forged["hash"] = record_hash(forged)
    lines[1] = canonical(forged)
    log.path.write_bytes(b"\n".join(lines) + b"\n")
    result = log.verify()
    assert not result["ok"] and result["first_bad_line"] == 3


def _writer(folder: str, worker: int, n: int) -> None:
    log = AuditLog(Path(folder))
    for i in range(n):
        log.append(f"worker-{worker}", "review", counts={"i": i})


def test_concurrent_writers_form_one_chain(tmp_path: Path) -> None:
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_writer, args=(str(tmp_path / "audit"), w, 25)) for w in range(4)]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(timeout=120)
        assert proc.exitcode == 0
    log = AuditLog(tmp_path / "audit")
    assert log.verify()["ok"] and log.verify()["records"] == 100
    assert sorted(r["seq"] for r in log.records()) == list(range(1, 101))

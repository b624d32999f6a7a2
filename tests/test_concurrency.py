"""Writers in several processes at once: they serialise on the home's writer lease, so the same keys are stored
once and every search gets its own complete run; an erasure refuses at once rather than race another writer."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import make_settings, register
from helpers import another_writer, faithful_conditional_puts, finish_all
from test_erasure_crash import REPO, embeddings_file, env_for

from jobs.erase import erase
from jobs.import_embeddings import run_import
from jobs.match import run_match
from jobs.watchlist import Submission, submit
from lance_tables.store import Gallery
from pipelines.audit import AuditLog
from pipelines.errors import GalleryMatchError, Refused
from pipelines.locks import LEASE, RENEWALS, Lease, writer_lock
from pipelines.results import list_runs, load_run
from pipelines.settings import Settings
from pipelines.sql import sql_list

DIM = 32
# every child imports first, says it is ready, then waits for the same start signal: the writes really overlap
PRELUDE = (
    "import sys, time, pathlib\n"
    "from pipelines.settings import Settings\n"
    "{imports}\n"
    "settings = Settings()\n"
    "pathlib.Path(sys.argv[1]).touch()\n"
    "while not pathlib.Path(sys.argv[2]).exists():\n"
    "    time.sleep(0.002)\n"
)
IMPORT = PRELUDE.format(imports="from jobs.import_embeddings import run_import") + (
    "run_import(settings, pathlib.Path(sys.argv[3]), 'archive', 'model-a', 'image', 32)\n"
)
MATCH = PRELUDE.format(imports="from jobs.match import run_match") + "run_match(settings, sys.argv[3])\n"


def together(settings: Settings, code: str, arg: str, count: int) -> list[subprocess.CompletedProcess[bytes]]:
    """Run `count` processes of `code` that start their work at the same instant; wait for all of them."""
    root = settings.local_home.parent
    go = root / "go"
    go.unlink(missing_ok=True)
    ready = [root / f"ready-{i}" for i in range(count)]
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code, str(flag), str(go), arg],
            cwd=REPO,
            env=env_for(settings),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        for flag in ready
    ]
    try:
        deadline = time.monotonic() + 180
        while not all(flag.exists() for flag in ready):
            assert all(p.poll() is None for p in procs), [p.communicate()[1].decode()[-2000:] for p in procs]
            assert time.monotonic() < deadline, "the writers did not start"
            time.sleep(0.01)
        go.touch()
    except BaseException:
        for proc in procs:
            proc.kill()
        finish_all(procs, 30)  # reaped, not left behind
        raise
    return finish_all(procs, 300)


def assert_one_at_a_time(settings: Settings, action: str, count: int) -> None:
    """The audit trail shows the writers ran one after another: each intent is followed by its own outcome
    before the next intent (writers that overlapped would write their intents first, then their outcomes)."""
    records = [r for r in AuditLog.of(settings).records() if r["action"] == action]
    assert [r["phase"] for r in records] == ["intent", "outcome"] * count
    for intent, outcome in zip(records[::2], records[1::2], strict=True):
        assert outcome["intent_seq"] == intent["seq"] and outcome["status"] == "ok"


def gallery_file(path: Path, rows: int, seed: int = 1) -> tuple[Path, np.ndarray]:
    vecs = np.random.default_rng(seed).standard_normal((rows, DIM))
    return embeddings_file(path, [f"r{i:05d}" for i in range(rows)], list(vecs), [None] * rows), vecs


def probe_watchlist(settings: Settings, root: Path, probes: np.ndarray, top_k: int) -> str:
    path = embeddings_file(
        root / "p.parquet", [f"p{i}" for i in range(len(probes))], list(probes), [None] * len(probes), "probe_id"
    )
    sub = Submission(path, "w", "CASE-2", "fraud-investigation", "basis", "analyst-1", "image", "model-a", top_k=top_k)
    return str(submit(settings, sub)["watchlist_id"])


@pytest.mark.slow
def test_three_concurrent_imports_of_one_file_store_each_row_once(tmp_path: Path) -> None:
    settings = make_settings(tmp_path / "home")
    register(settings)
    path, vecs = gallery_file(tmp_path / "g.parquet", 3000)
    done = together(settings, IMPORT, str(path), 3)
    assert [d.returncode for d in done] == [0, 0, 0], [d.stderr.decode()[-2000:] for d in done]
    gallery = Gallery(settings.storage)
    table = gallery.read("image_embeddings", columns=["embedding_id", "record_id"])
    keys = table.column("embedding_id").to_pylist()
    assert len(keys) == 3000 and len(set(keys)) == 3000
    assert len(set(table.column("record_id").to_pylist())) == 3000
    wid = probe_watchlist(settings, tmp_path, vecs[:5] + 0.01, top_k=20)
    rows = load_run(settings.store, run_match(settings, wid)["run_id"]).to_pylist()
    assert len(rows) == 5 * 20
    for probe in {r["probe_id"] for r in rows}:
        ids = [r["gallery_id"] for r in rows if r["probe_id"] == probe]
        assert len(ids) == len(set(ids)), probe  # no gallery row listed twice
    assert_one_at_a_time(settings, "import-embeddings", 3)
    report = AuditLog.of(settings).verify()
    assert report["ok"] and report["incomplete_actions"] == []


def small_gallery(root: Path) -> tuple[Settings, np.ndarray]:
    settings = make_settings(root / "home")
    register(settings)
    path, vecs = gallery_file(root / "g.parquet", 300)
    run_import(settings, path, "archive", "model-a", "image", DIM)
    return settings, vecs


@pytest.mark.slow
def test_two_concurrent_matches_of_one_watchlist_give_two_whole_runs(tmp_path: Path) -> None:
    settings, vecs = small_gallery(tmp_path)
    wid = probe_watchlist(settings, tmp_path, vecs[:4] + 0.01, top_k=5)
    done = together(settings, MATCH, wid, 2)
    assert [d.returncode for d in done] == [0, 0], [d.stderr.decode()[-2000:] for d in done]
    runs = [m for m in list_runs(settings.store) if m["watchlist_id"] == wid]
    assert len(runs) == 2 and runs[0]["run_id"] != runs[1]["run_id"]
    tables = [load_run(settings.store, m["run_id"]) for m in runs]
    assert [t.num_rows for t in tables] == [20, 20]
    stable, order = ["probe_id", "rank", "gallery_id"], [("probe_id", "ascending"), ("rank", "ascending")]
    assert tables[0].select(stable).sort_by(order).equals(tables[1].select(stable).sort_by(order))
    assert_one_at_a_time(settings, "match", 2)
    report = AuditLog.of(settings).verify()
    assert report["ok"] and report["incomplete_actions"] == []


def test_erase_refuses_while_another_writer_holds_the_lease(tmp_path: Path) -> None:
    settings, _ = small_gallery(tmp_path)
    path, _ = gallery_file(tmp_path / "s.parquet", 1, seed=9)
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pq.read_table(path)
    table = table.set_column(table.schema.get_field_index("subject_id"), "subject_id", pa.array(["subj-x"]))
    table = table.set_column(0, "record_id", pa.array(["x-1"]))
    pq.write_table(table, path)
    run_import(settings, path, "archive", "model-a", "image", DIM)
    gallery = Gallery(settings.storage)
    records = len(AuditLog.of(settings).records())
    impatient = make_settings(settings.home, lock_wait_s=0.5)
    with another_writer(settings):
        started = time.monotonic()
        with pytest.raises(Refused, match="another writer"):
            erase(settings, "request", "dpo-1", subject_id="subj-x")
        assert time.monotonic() - started < 5  # at once: erasure never waits behind a writer it cannot see
        with pytest.raises(Refused, match="waited"):  # an ordinary writer waits, then gives up, doing nothing
            run_import(impatient, path, "archive", "model-a", "image", DIM)
    assert gallery.count("image_embeddings") == 301
    assert gallery.count("image_embeddings", f"subject_id IN {sql_list(['subj-x'])}") == 1
    assert not (settings.local_home / "erasure").exists()  # no plan, no journal, no receipt
    assert len(AuditLog.of(settings).records()) == records  # nothing was done, so nothing is recorded
    receipt = erase(settings, "request", "dpo-1", subject_id="subj-x")  # the holder is gone: its lease is stale
    assert receipt["ok"] and receipt["removed_rows"]["image_embeddings"] == 1
    assert gallery.count("image_embeddings") == 300


# -- the writer lease itself, on a local and on an S3 home -------------------------------------------------------


def lease_body(host: str, pid: int, acquired_at: float, ttl_s: float, lease_id: str = "elsewhere-1") -> bytes:
    return Lease(lease_id, host, pid, "match", acquired_at, ttl_s).to_json()


def test_a_second_writer_is_refused_naming_the_holder_and_a_killed_holder_is_taken_over(any_settings: Settings) -> None:
    settings = any_settings
    if settings.storage.is_s3:
        faithful_conditional_puts()  # two creates of the lease object: S3 lets one win, moto must too
    store = settings.store
    with another_writer(settings) as holder:
        for exclusive, wait in ((True, 60.0), (False, 0.5)):
            with pytest.raises(Refused) as refused, writer_lock(store, exclusive, wait, command="erase"):
                pytest.fail("a second writer got the lease")
            message = str(refused.value)
            assert (
                f"test writer (pid {holder.pid} on {socket.gethostname()})" in message and "Nothing was done" in message
            )
            assert ("erasure cannot guarantee removal" if exclusive else "waited") in message
        assert json.loads(store.read(LEASE) or b"{}")["pid"] == holder.pid  # the refusals left the lease alone
        holder.send_signal(signal.SIGKILL)  # crashed while holding it: no release, the lease object stays
        holder.wait()
        assert json.loads(store.read(LEASE) or b"{}")["pid"] == holder.pid
        started = time.monotonic()
        with writer_lock(store, wait_s=30, command="next") as lease_id:
            assert time.monotonic() - started < 5  # a dead holder on this host is known dead at once
            held = json.loads(store.read(LEASE) or b"{}")
            assert held["lease_id"] == lease_id and held["pid"] == os.getpid() and held["command"] == "next"
    assert store.list("locks/") == []  # released at the end: no lease, renewal or break marker left


def test_a_lease_not_renewed_within_its_ttl_expires(any_settings: Settings) -> None:
    """A holder on another machine cannot be asked whether it lives: its renewals say so, within its TTL."""
    settings = any_settings
    store = settings.store
    now = time.time()
    assert store.create(LEASE, lease_body("other-host", 4242, now - 100, ttl_s=5))
    assert store.create(f"{RENEWALS}elsewhere-1/{int(now * 1000):015d}", b"")  # ...but renewed just now
    with pytest.raises(Refused, match=r"match \(pid 4242 on other-host\)"), writer_lock(store, wait_s=0.3):
        pytest.fail("a renewed lease was taken over")
    store.delete(f"{RENEWALS}elsewhere-1/{int(now * 1000):015d}")  # no renewal for 100 s, TTL 5 s: it crashed
    with writer_lock(store, wait_s=5, command="next"):
        assert json.loads(store.read(LEASE) or b"{}")["host"] == socket.gethostname()
    assert store.list("locks/") == []


def test_a_held_lease_is_renewed_and_released(any_settings: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    """The heartbeat renews every TTL/4 and keeps only its newest renewal; a failed renewal (a network or S3 error,
    not only an OSError) does not stop it, or the lease would expire under a live writer."""
    settings = any_settings
    store = settings.store
    store_type = type(store)
    real_create = store_type.create
    failed: list[str] = []

    def flaky(self: Any, key: str, data: bytes) -> bool:
        if key.startswith(RENEWALS) and not failed:
            failed.append(key)
            raise GalleryMatchError("the store is unreachable for a moment")
        return real_create(self, key, data)

    monkeypatch.setattr(store_type, "create", flaky)
    with writer_lock(store, ttl_s=1.0, command="long job") as lease_id:
        time.sleep(1.3)  # about five beats: the first fails, the others renew
        renewals = store.list(f"{RENEWALS}{lease_id}/")
        assert failed and 1 <= len(renewals) <= 2, renewals  # not one object per beat since the start
        stamp = int(renewals[-1].rsplit("/", 1)[-1]) / 1000
        assert time.time() - stamp < 1.0  # renewed within its TTL: nobody may take it over
    assert store.list("locks/") == []

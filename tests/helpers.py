"""Test helpers: the gallery read back for comparisons, another writer holding the lease, child processes."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from lance_tables.store import Gallery
from pipelines.schemas import KEYS
from pipelines.settings import Settings

REPO = Path(__file__).resolve().parents[1]
VOLATILE = {"ingested_at", "quarantined_at", "finished_at", "registered_at"}
# Which table version a row's commit started from depends on how the writes were batched into commits
# (engine scheduling, a resumed crash), not on the row: compared as "stamped or not", never by value.
HISTORY = {"written_after_version"}
GALLERY_TABLES = ("images", "faces", "image_embeddings", "quarantine", "ledger")


def table_rows(settings: Settings, name: str) -> list[dict[str, Any]]:
    data = Gallery(settings.storage).read(name)
    if not data.num_columns:
        return []
    rows = [{k: v for k, v in row.items() if k not in VOLATILE} for row in data.to_pylist()]
    return sorted(rows, key=lambda r: r[KEYS[name]])


def snapshot(settings: Settings) -> dict[str, list[dict[str, Any]]]:
    return {name: table_rows(settings, name) for name in GALLERY_TABLES}


def assert_same_rows(left: dict[str, list[dict[str, Any]]], right: dict[str, list[dict[str, Any]]]) -> None:
    """Same keys and values everywhere; vectors equal to float tolerance (thread counts may differ)."""
    for name in GALLERY_TABLES:
        a, b = left[name], right[name]
        assert [r[KEYS[name]] for r in a] == [r[KEYS[name]] for r in b], name
        for ra, rb in zip(a, b, strict=True):
            assert set(ra) == set(rb)
            for key in ra:
                if key in ("vector", "box", "landmarks", "det_prob") and ra[key] is not None:
                    assert np.allclose(ra[key], rb[key], atol=1e-3), (name, key)
                elif key in HISTORY:
                    assert (ra[key] is None) == (rb[key] is None), (name, key)
                else:
                    assert ra[key] == rb[key], (name, key)


def assert_unique_keys(settings: Settings) -> None:
    for name in GALLERY_TABLES:
        keys = [r[KEYS[name]] for r in table_rows(settings, name)]
        assert len(keys) == len(set(keys)), name


@contextmanager
def another_writer(settings: Settings, seconds: float = 60.0) -> Iterator[subprocess.Popen[bytes]]:
    """Another process holding the home's writer lease (local or s3://) until the block ends (it is then killed)."""
    sync = Path(tempfile.mkdtemp(prefix="writer-"))
    ready = sync / "ready"
    code = (
        "import sys, time, pathlib\n"
        "from pipelines.locks import writer_lock\n"
        "from pipelines.settings import Settings\n"
        "with writer_lock(Settings(home=sys.argv[1]).store, command='test writer'):\n"
        "    pathlib.Path(sys.argv[2]).touch()\n"
        f"    time.sleep({seconds})\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code, settings.home_uri, str(ready)], env=child_env(), cwd=REPO)
    try:
        deadline = time.monotonic() + 60
        while not ready.exists():
            assert proc.poll() is None and time.monotonic() < deadline, "the other writer did not start"
            time.sleep(0.05)
        yield proc
    finally:
        proc.kill()
        proc.wait()
        shutil.rmtree(sync, ignore_errors=True)


def child_env(**extra: str) -> dict[str, str]:
    """The environment of a child process: this one's (the AWS_* variables of an S3 home included), with bytecode
    cached outside the repository (without it every child compiles lancedb and pyarrow again)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    return (
        env
        | {
            "RAY_ENABLE_UV_RUN_RUNTIME_ENV": "0",
            "PYTHONPYCACHEPREFIX": str(Path(tempfile.gettempdir()) / "gallerymatch-test-pycache"),
        }
        | extra
    )


_PUTS = threading.Lock()


def faithful_conditional_puts() -> None:
    """Make moto's conditional PUT atomic, as S3's is. moto (5.2) checks If-None-Match and then stores, two steps
    between which another request thread of its server can store the same key: two creates could then both
    succeed, which S3 never lets happen. The server runs in this process, so one lock around its PUT handler
    serves every client (threads and child processes alike). Idempotent."""
    from moto.s3.responses import S3Response

    if getattr(S3Response.put_object, "_serialised", False):
        return
    real = S3Response.put_object

    def put_object(self: Any) -> Any:
        with _PUTS:
            return real(self)

    put_object._serialised = True  # type: ignore[attr-defined]
    S3Response.put_object = put_object  # type: ignore[method-assign]


def finish_all(procs: list[Any], timeout: float) -> list[subprocess.CompletedProcess[Any]]:
    """Wait for every child and collect its output; whatever still runs on the way out (a failed wait) is killed."""
    try:
        done = []
        for proc in procs:
            out, err = proc.communicate(timeout=timeout)
            done.append(subprocess.CompletedProcess(proc.args, proc.returncode, out, err))
        return done
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()

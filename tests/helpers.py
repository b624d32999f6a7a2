"""Reading the gallery back for comparisons (timestamps dropped, rows sorted by key)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np

from lance_tables.store import Gallery
from pipelines.schemas import KEYS
from pipelines.settings import Settings

VOLATILE = {"ingested_at", "quarantined_at", "finished_at", "registered_at"}
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
                else:
                    assert ra[key] == rb[key], (name, key)


def assert_unique_keys(settings: Settings) -> None:
    for name in GALLERY_TABLES:
        keys = [r[KEYS[name]] for r in table_rows(settings, name)]
        assert len(keys) == len(set(keys)), name


@contextmanager
def another_writer(settings: Settings, seconds: float = 60.0) -> Iterator[subprocess.Popen[bytes]]:
    """Another process holding the home's writer lease until the block ends (it is then killed)."""
    ready = settings.local_home.parent / f"writer-ready-{os.getpid()}"
    code = (
        "import sys, time, pathlib\n"
        "from pipelines.locks import writer_lock\n"
        "from pipelines.objectstore import LocalStore\n"
        "with writer_lock(LocalStore(pathlib.Path(sys.argv[1])), command='test writer'):\n"
        "    pathlib.Path(sys.argv[2]).touch()\n"
        f"    time.sleep({seconds})\n"
    )
    settings.local_home.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen([sys.executable, "-c", code, str(settings.store.root), str(ready)])
    try:
        deadline = time.monotonic() + 60
        while not ready.exists():
            assert proc.poll() is None and time.monotonic() < deadline, "the other writer did not start"
            time.sleep(0.05)
        yield proc
    finally:
        proc.kill()
        proc.wait()
        ready.unlink(missing_ok=True)

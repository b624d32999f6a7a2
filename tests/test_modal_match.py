"""Matching on Modal without a Modal account: the real `MatchWorker` code through `.local()`, unit by unit, merged,
equals the local engine candidate for candidate and score for score (ties at the k-th place included), on a local
home and on an S3 home; the engine's own match path (`ModalEngine.match`) with only Modal's fan-out (`.map`) and
the app run swapped for in-process stand-ins; one app run shared by every call between `prepare_runtime()` and
`close()`."""

from __future__ import annotations

import contextlib
import pickle
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import make_settings, register

from jobs.import_embeddings import run_import
from jobs.match import gallery_filter, plan_units
from lance_tables.store import Gallery
from pipelines.engines import LocalEngine, ModalEngine, open_engine
from pipelines.engines import modal as modal_engine
from pipelines.engines.modal import MatchWorker, with_credentials, without_credentials
from pipelines.errors import Refused
from pipelines.match_unit import MatchUnit
from pipelines.matcher import TopK
from pipelines.settings import Settings

DIM = 16
MODEL = "model-a"
K = 4
TABLE = "image_embeddings"


def sign_vectors(n: int, seed: int) -> np.ndarray:
    """Vectors in {-1, +1}^16: every cosine is a multiple of 1/16, so ties are everywhere."""
    return np.random.default_rng(seed).choice([-1.0, 1.0], size=(n, DIM)).astype(np.float32)


def build_gallery(settings: Settings, tmp_path: Path) -> None:
    """60 vectors (three exact duplicates) imported as three files: three Lance fragments."""
    register(settings)
    vectors = sign_vectors(60, 1)
    vectors[10] = vectors[3]
    vectors[11] = vectors[3]
    records = [f"r{i:03d}" for i in range(60)]
    for part, (start, stop) in enumerate(((0, 25), (25, 41), (41, 60))):
        path = tmp_path / f"gallery-{part}.parquet"
        columns = {
            "record_id": records[start:stop],
            "embedding": [list(v) for v in vectors[start:stop]],
            "minor": [False] * (stop - start),
        }
        pq.write_table(pa.table(columns), path)
        run_import(settings, path, "archive", MODEL, "image", DIM)


def units_of(settings: Settings, parts: int, k: int = K) -> list[MatchUnit]:
    gallery = Gallery(settings.storage)
    table = gallery.open(TABLE)
    assert table is not None
    where = gallery_filter(MODEL, "fraud-investigation")
    uri = gallery.table_uri(TABLE)
    return plan_units(uri, int(table.version), where, k, 7, "cpu", parts, gallery.options)


def probes() -> np.ndarray:
    gallery_like = sign_vectors(60, 1)
    return np.vstack([sign_vectors(6, 9), gallery_like[3:4], -gallery_like[3:4]])


def merged(partials: list[TopK], n: int, k: int = K) -> TopK:
    top = TopK(n, k)
    for partial in partials:
        top.merge(partial)
    return top


def candidates(top: TopK) -> list[list[tuple[float, int]]]:
    """Per probe, every kept candidate (the k best and all ties with the k-th) as (score, row id), ordered."""
    out = []
    for row in range(top.n_probes):
        scores, rowids = top.candidates(row)
        out.append(sorted(zip(scores.tolist(), rowids.tolist(), strict=True), key=lambda p: (-p[0], p[1])))
    return out


def brute_force(settings: Settings, version: int, queries: np.ndarray, k: int = K) -> list[list[tuple[float, int]]]:
    """Every gallery row scoring at least the k-th best score of each probe, from a plain read of the table."""
    import lance

    gallery = Gallery(settings.storage)
    dataset = lance.dataset(gallery.table_uri(TABLE), version=version, storage_options=gallery.options or None)
    data = dataset.to_table(columns=["vector"], with_row_id=True)
    vectors = np.asarray(data.column("vector").to_pylist(), dtype=np.float64)
    rowids = data.column("_rowid").to_numpy()
    unit = queries.astype(np.float64) / np.linalg.norm(queries, axis=1, keepdims=True)
    scores = unit @ vectors.T  # stored vectors are unit rows: cosines, exact multiples of 1/16 here
    out = []
    for row in scores:
        kth = np.sort(row)[::-1][k - 1]
        keep = np.flatnonzero(row >= kth)
        out.append(sorted(((float(row[i]), int(rowids[i])) for i in keep), key=lambda p: (-p[0], p[1])))
    return out


def run_on_worker(units: list[MatchUnit], queries: np.ndarray) -> list[TopK]:
    """What a Modal container does with each unit: the real worker method, in-process (one container)."""
    worker = MatchWorker()
    blob = pickle.dumps(queries, protocol=5)
    return [pickle.loads(worker.match.local(pickle.dumps(without_credentials(u), protocol=5), blob)) for u in units]


def make_home(home: str, tmp_path: Path, request: pytest.FixtureRequest) -> Settings:
    if home == "local":
        return make_settings(tmp_path / "home")
    settings: Settings = request.getfixturevalue("s3_settings")
    return settings


@pytest.mark.parametrize("home", ["local", "s3"])
def test_worker_units_merge_to_the_local_engine(home: str, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    settings = make_home(home, tmp_path, request)
    build_gallery(settings, tmp_path)
    units = units_of(settings, parts=3)
    assert len(units) == 3 and all(len(u.fragment_ids) == 1 for u in units)  # one fragment per container call
    queries = probes()

    remote = candidates(merged(run_on_worker(units, queries), len(queries)))
    local = candidates(merged(LocalEngine().match(units, queries), len(queries)))
    whole = candidates(merged(LocalEngine().match(units_of(settings, parts=1), queries), len(queries)))
    assert remote == local == whole  # candidate for candidate, score for score (float32, exactly)
    reference = brute_force(settings, units[0].version, queries)
    assert remote == [[(float(np.float32(s)), r) for s, r in c] for c in reference]
    tied = [c for c in remote if len(c) > K]
    assert tied, "the gallery must tie at the k-th place, or the test proves nothing about ties"
    assert any(len({r for _, r in c}) == len(c) for c in tied)  # ties kept whole, each row once


def test_units_travel_without_credentials(s3_settings: Settings, s3_env: dict[str, str], tmp_path: Path) -> None:
    """The call inputs (stored by Modal) hold no secret; the container reads with its own secret's variables."""
    build_gallery(s3_settings, tmp_path)
    (unit,) = units_of(s3_settings, parts=1)
    assert dict(unit.storage_options)["aws_secret_access_key"] == s3_env["AWS_SECRET_ACCESS_KEY"]
    blob = pickle.dumps(without_credentials(unit), protocol=5)
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        assert s3_env[name].encode() not in blob
    sent = pickle.loads(blob)
    assert dict(sent.storage_options)["aws_endpoint"] == s3_env["AWS_ENDPOINT_URL"]  # where to read stays
    rebuilt = with_credentials(sent, {**s3_env, "AWS_SECRET_ACCESS_KEY": "container-secret"})
    assert dict(rebuilt.storage_options)["aws_secret_access_key"] == "container-secret"
    with pytest.raises(Refused, match="AWS_ACCESS_KEY_ID"):
        with_credentials(sent, {})  # a container without the secret says what is missing
    local = MatchUnit("/data/home/lance/x.lance", 1, (0,), "true", 1, 8)
    assert with_credentials(local, {}) is local


class AppRuns:
    """Stands in for `app.run()` (which needs a Modal account): counts the runs entered and left."""

    def __init__(self) -> None:
        self.entered = 0
        self.exited = 0

    @contextlib.contextmanager
    def run(self) -> Iterator[None]:
        self.entered += 1
        try:
            yield
        finally:
            self.exited += 1

    @property
    def open(self) -> int:
        return self.entered - self.exited


@pytest.fixture
def modal_offline(monkeypatch: pytest.MonkeyPatch) -> tuple[AppRuns, list[str]]:
    """Only the two calls that reach Modal's servers are swapped: the app run, and `.map`, which here calls the
    very method handle the engine built (`.local`, the worker's real code) once per input, in order."""
    runs = AppRuns()
    names: list[str] = []

    def local_map(method: Any, *inputs: list[bytes], ordered: bool = True) -> Iterator[bytes]:
        names.append(str(method))
        assert all(len(column) == len(inputs[0]) for column in inputs)
        return iter([method.local(*args) for args in zip(*inputs, strict=True)])

    monkeypatch.setattr(modal_engine.app, "run", runs.run)
    monkeypatch.setattr(modal_engine, "_map", local_map)
    return runs, names


def test_modal_engine_match_end_to_end(
    s3_settings: Settings, tmp_path: Path, modal_offline: tuple[AppRuns, list[str]]
) -> None:
    runs, names = modal_offline
    build_gallery(s3_settings, tmp_path)
    units = units_of(s3_settings, parts=3)
    queries = probes()
    engine = open_engine("modal")
    assert isinstance(engine, ModalEngine)
    partials = engine.match(units, queries)
    assert len(partials) == len(units) and names == ["Method(MatchWorker.match)"]
    expected = candidates(merged(LocalEngine().match(units, queries), len(queries)))
    assert candidates(merged(partials, len(queries))) == expected
    assert (runs.entered, runs.open) == (1, 0)  # unprepared: the call ran its own app run and left it
    assert engine.match([], queries) == [] and runs.entered == 1  # nothing to do starts nothing


def test_modal_engine_refuses_a_gallery_its_containers_cannot_read(
    settings: Settings, tmp_path: Path, modal_offline: tuple[AppRuns, list[str]]
) -> None:
    runs, _ = modal_offline
    build_gallery(settings, tmp_path)
    with pytest.raises(Refused, match=r"object storage \(s3://"):
        open_engine("modal").match(units_of(settings, parts=2), probes())
    assert runs.entered == 0  # refused before anything started


@pytest.mark.slow
def test_one_app_run_from_prepare_runtime_to_close(
    s3_settings: Settings, tmp_path: Path, modal_offline: tuple[AppRuns, list[str]], sample_shards: Path
) -> None:
    """The nightly's pattern: one engine, one start-up, many matches (and an ingest) inside it, released at close."""
    from conftest import FACE, IMAGE

    from jobs.ingest import plan
    from pipelines.engines import EngineOptions
    from pipelines.engines.local import run_local
    from pipelines.shards import find_shards
    from pipelines.task import IngestTask

    runs, names = modal_offline
    build_gallery(s3_settings, tmp_path)
    queries = probes()
    expected = candidates(merged(LocalEngine().match(units_of(s3_settings, 1), queries), len(queries)))
    engine = open_engine("modal", EngineOptions.from_settings(s3_settings))
    engine.prepare_runtime()
    try:
        engine.prepare_runtime()  # idempotent: still one run
        for parts in (1, 2, 3):
            assert candidates(merged(engine.match(units_of(s3_settings, parts), queries), len(queries))) == expected
        task = IngestTask.from_settings(s3_settings, "face", FACE, IMAGE)
        items, _ = plan(task, find_shards(sample_shards)[:1], set())
        (remote,) = list(engine.ingest(task, items))
        assert (runs.entered, runs.open) == (1, 1)  # every call inside the one held run
    finally:
        engine.close()
    assert (runs.entered, runs.open) == (1, 0)
    engine.close()  # twice is harmless
    assert runs.exited == 1
    (local,) = list(run_local(task, items))
    assert remote.stats == local.stats
    assert names == ["Method(MatchWorker.match)"] * 3 + ["Method(IngestWorker.process)"]
    engine.match(units_of(s3_settings, 2), queries)  # after close: its own run again
    assert (runs.entered, runs.open) == (2, 0)

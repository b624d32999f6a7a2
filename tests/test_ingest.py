"""The ingest job end to end on real LanceDB with real MTCNN and the labelled untrained models."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import FACE, IMAGE, make_settings, register
from helpers import assert_same_rows, assert_unique_keys, snapshot, table_rows

from jobs.ingest import run_ingest
from jobs.status import gallery_status
from lance_tables.store import Gallery
from pipelines.errors import ModelWeightsUnavailable, Refused
from pipelines.samples import BAD_INPUTS, tricky_inputs
from pipelines.settings import Settings
from pipelines.shards import pack_folder

MB = 1024 * 1024


def ingest(settings: Settings, shards: str | Path, **kwargs: object) -> dict:
    options: dict[str, object] = {"face_model": FACE, "image_model": IMAGE, "progress": False} | kwargs
    return run_ingest(settings, shards, **options)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory, sample_shards: Path) -> tuple[Settings, dict]:
    settings = make_settings(tmp_path_factory.mktemp("ref") / "home")
    register(settings)
    return settings, ingest(settings, sample_shards, engine="local")


def test_every_image_is_embedded_or_quarantined(reference: tuple[Settings, dict], sample_folder: Path) -> None:
    settings, summary = reference
    distinct = len([p for p in sample_folder.rglob("*") if p.is_file()]) - 1  # one duplicate file
    assert summary["images"] == distinct
    quarantine = table_rows(settings, "quarantine")
    decode_q = {q["item_id"] for q in quarantine if q["stage"] == "decode"}
    no_face = {q["item_id"] for q in quarantine if q["stage"] == "face"}
    faces = table_rows(settings, "faces")
    with_faces = {f["image_id"] for f in faces}
    embedded = {e["image_id"] for e in table_rows(settings, "image_embeddings")}
    assert len(with_faces) + len(decode_q) + len(no_face) == distinct  # face modality
    assert len(embedded) + len(decode_q) == distinct  # image modality
    assert not (with_faces & no_face) and not (embedded & decode_q)
    reasons = {q["uri"].split("/")[-1]: q["reason"] for q in quarantine}
    assert reasons == {
        "truncated.jpg": "TRUNCATED",
        "page.jpg": "UNSUPPORTED_FORMAT",
        "empty.jpg": "EMPTY",
        "bomb.png": "TOO_MANY_PIXELS",
        "coffee.jpg": "NO_FACE",
        "chelsea.jpg": "NO_FACE",
        "rocket.jpg": "NO_FACE",
    }
    assert set(BAD_INPUTS) <= set(reasons)
    uris = {r["uri"].split("/")[-1] for r in table_rows(settings, "images")}
    assert set(tricky_inputs()) <= uris  # CMYK, 16-bit, rotated, animated... all decoded


def test_face_rows_carry_the_contract_fields(reference: tuple[Settings, dict]) -> None:
    settings, summary = reference
    faces = table_rows(settings, "faces")
    assert summary["faces"] == len(faces) == 12  # astronaut, camera, a group of three, 7 awkward copies
    group = [
        f
        for f in faces
        if f["image_id"]
        in {r["image_id"] for r in table_rows(settings, "images") if r["uri"].endswith("group-of-three.jpg")}
    ]
    assert sorted(f["face_index"] for f in group) == [0, 1, 2]
    for face in faces:
        assert len(face["vector"]) == 512 and len(face["box"]) == 4 and len(face["landmarks"]) == 10
        assert face["det_prob"] >= 0.9
        assert face["model_id"] == FACE and face["weights_digest"].startswith("sha256:")
        assert face["source_id"] == "archive" and face["origin"] == "detected"
    assert {e["model_id"] for e in table_rows(settings, "image_embeddings")} == {IMAGE}
    assert summary["untrained_models"] and all("UNTRAINED" in n for n in summary["untrained_models"])


def test_status_reports_the_contract_counts(reference: tuple[Settings, dict]) -> None:
    settings, _ = reference
    status = gallery_status(settings)
    assert status["faces"] == 12 and status["images"] == 13 and status["image_embeddings"] == 13
    assert status["quarantined"] == 7 and status["quarantine_reasons"]["NO_FACE"] == 3
    assert status["tables"]["faces"]["version"] >= 1


def test_rerun_is_idempotent(reference: tuple[Settings, dict], sample_shards: Path) -> None:
    settings, first = reference
    before = snapshot(settings)
    versions = {n: Gallery(settings.storage).version(n) for n in ("faces", "images", "ledger")}
    again = ingest(settings, sample_shards, engine="local")
    assert again["shards_processed"] == 0 and again["shards_skipped"] == first["shards"]
    assert snapshot(settings) == before
    assert versions == {n: Gallery(settings.storage).version(n) for n in ("faces", "images", "ledger")}


def test_unregistered_source_is_refused_before_any_work(settings: Settings, sample_shards: Path) -> None:
    with pytest.raises(Refused, match="unregistered source"):
        ingest(settings, sample_shards, engine="local")
    assert Gallery(settings.storage).names() == []


def test_missing_weights_refused_before_any_work(settings: Settings, sample_shards: Path) -> None:
    register(settings)
    with pytest.raises(ModelWeightsUnavailable, match=r"20180402-114759-vggface2\.pt"):
        run_ingest(settings, sample_shards, face_model="facenet-vggface2", image_model=IMAGE, progress=False)
    assert Gallery(settings.storage).names() == ["sources"]


def test_modalities_add_up_and_resume_per_part(
    settings: Settings, sample_shards: Path, reference: tuple[Settings, dict]
) -> None:
    register(settings)
    face_only = ingest(settings, sample_shards, modality="face")
    assert face_only["image_embeddings"] == 0 and face_only["faces"] == 12
    assert Gallery(settings.storage).open("image_embeddings") is None
    both = ingest(settings, sample_shards, modality="all")
    assert both["shards_processed"] == both["shards"] and both["faces"] == 0 and both["image_embeddings"] == 13
    assert_same_rows(snapshot(settings), snapshot(reference[0]))


def test_bad_shard_files_are_quarantined(settings: Settings, tmp_path: Path) -> None:
    register(settings)
    shards = tmp_path / "shards"
    shards.mkdir()
    (shards / "broken.parquet").write_bytes(b"PAR1 this is not parquet")
    summary = ingest(settings, shards, engine="local")
    assert summary["quarantine_reasons"] == {"BAD_SHARD": 1}
    (row,) = table_rows(settings, "quarantine")
    assert row["stage"] == "shard" and "broken.parquet" in row["uri"]


def test_oversize_rows_are_quarantined_at_ingest(settings: Settings, tmp_path: Path) -> None:
    register(settings)
    folder = tmp_path / "imgs"
    folder.mkdir()
    (folder / "big.jpg").write_bytes(b"x" * 5000)
    pack_folder(folder, tmp_path / "shards", "archive", rows_per_shard=10, max_bytes=1000)
    summary = ingest(settings, tmp_path / "shards", engine="local")
    assert summary["quarantine_reasons"] == {"TOO_LARGE_BYTES": 1}


KILL_SCRIPT = """
import sys
from jobs.ingest import run_ingest
from pipelines.settings import Settings
settings = Settings(home=sys.argv[1], model_downloads=False)  # the audit key dir and AWS_* from the environment
run_ingest(settings, sys.argv[2], engine="local", face_model="facenet-untrained",
           image_model="clip-untrained", progress=False)
"""
# Kill points (ledger rows seen before the kill, then a delay) per home: on S3 a smaller corpus, for time.
KILLS = {"local": ((1, 0.0), (3, 0.7), (5, 1.3)), "s3": ((4, 0.3),)}  # s3: after 2 of 5 shards
S3_PICK = ("people/astronaut.jpg", "people/camera.png", "scenes/coffee.jpg", "bad/truncated.jpg", "awkward/grey.png")


@pytest.mark.slow
@pytest.mark.parametrize("home", ["local", "s3"])
def test_sigkill_then_rerun_gives_the_rows_of_an_uninterrupted_run(
    home: str, tmp_path: Path, sample_folder: Path, request: pytest.FixtureRequest
) -> None:
    """Local: local shards into a local home. S3: s3:// shards into an s3:// home (the child gets the URIs,
    the AWS_* variables and GALLERYMATCH_AUDIT_KEY_DIR); the uninterrupted run reads the same s3:// shards."""
    if home == "local":
        shards: str | Path = tmp_path / "shards"
        pack_folder(sample_folder, shards, "archive", rows_per_shard=2, max_bytes=50 * MB, default_minor=False)
        killed = make_settings(tmp_path / "killed")
    else:
        from s3 import make_bucket

        s3_env = request.getfixturevalue("s3_env")
        folder = tmp_path / "images"
        for rel in S3_PICK:
            (folder / rel).parent.mkdir(parents=True, exist_ok=True)
            (folder / rel).write_bytes((sample_folder / rel).read_bytes())
        shards = f"s3://{make_bucket(s3_env)}/shards"
        pack_folder(folder, shards, "archive", rows_per_shard=1, max_bytes=50 * MB, default_minor=False)
        killed = request.getfixturevalue("s3_settings")
    uninterrupted = make_settings(tmp_path / "clean")
    register(uninterrupted)
    ingest(uninterrupted, shards, engine="local")
    register(killed)
    for ledgered, delay in KILLS[home]:
        _run_and_kill(killed, shards, ledgered, delay)
    partial = len(table_rows(killed, "ledger"))
    assert 0 < partial < len(table_rows(uninterrupted, "ledger"))
    ingest(killed, shards, engine="local")
    assert_unique_keys(killed)
    assert_same_rows(snapshot(killed), snapshot(uninterrupted))


def _run_and_kill(settings: Settings, shards: str | Path, ledgered: int, delay: float) -> None:
    env = os.environ | {
        "PYTHONPATH": str(Path(__file__).parents[1]),
        "GALLERYMATCH_AUDIT_KEY_DIR": str(settings.resolved_audit_key_dir),  # the parent's signing key
    }
    proc = subprocess.Popen([sys.executable, "-c", KILL_SCRIPT, settings.home, str(shards)], env=env)
    deadline = time.monotonic() + 300
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if _ledger_rows(settings) >= ledgered:
                break
            time.sleep(0.1)
        time.sleep(delay)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()


def _ledger_rows(settings: Settings) -> int:
    try:
        return Gallery(settings.storage).count("ledger")
    except Exception:  # noqa: BLE001 - the table may be mid-creation
        return 0


@pytest.mark.slow
def test_ray_engine_gives_the_same_rows_as_local(
    tmp_path: Path, sample_shards: Path, reference: tuple[Settings, dict]
) -> None:
    settings = make_settings(tmp_path / "ray")
    register(settings)
    summary = ingest(settings, sample_shards, engine="ray")
    assert summary["engine"] == "ray" and summary["shards_processed"] == reference[1]["shards_processed"]
    assert_same_rows(snapshot(settings), snapshot(reference[0]))

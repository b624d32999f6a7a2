"""Calibrated thresholds: estimate and measurement, `--threshold calibrated`, the match's warnings, audit."""

from __future__ import annotations

import datetime as dt
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from conftest import FACE, make_settings, register
from helpers import child_env
from PIL import Image

from jobs.accuracy import calibrate
from jobs.match import run_match
from jobs.watchlist import Submission, ThresholdChoice, submit
from lance_tables.calibrations import add_evaluation
from lance_tables.store import Gallery
from pipelines.accuracy import fpir_from_fmr
from pipelines.audit import AuditLog
from pipelines.calibration import Calibration, Evaluation, threshold_warnings
from pipelines.errors import Refused
from pipelines.models import load_face_model
from pipelines.schemas import FACES, to_arrow
from pipelines.settings import Settings


@pytest.fixture(scope="module")
def untrained_digest() -> str:
    return load_face_model(FACE, Path("/nonexistent"), False, "cpu")[1]


def add_faces(settings: Settings, n: int, digest: str, seed: int, start: int = 0) -> np.ndarray:
    """n random unit face rows of the untrained model (the gallery a calibration is made for)."""
    rng = np.random.default_rng(seed)
    vectors = rng.normal(size=(n, 512)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    now = dt.datetime.now(dt.UTC)
    rows = [
        {
            "face_id": f"f{start + i:06d}",
            "image_id": f"img{start + i:06d}",
            "source_id": "archive",
            "minor": False,
            "model_id": FACE,
            "weights_digest": digest,
            "origin": "detected",
            "shard_key": "test",
            "ingested_at": now,
        }
        for i in range(n)
    ]
    Gallery(settings.storage).upsert("faces", to_arrow(rows, FACES, vectors))
    return vectors


def synthetic_evaluation(digest: str, pairs: int, tail: list[float], mated: list[float]) -> Evaluation:
    return Evaluation(
        evaluation_id="eval-00000000000000aa",
        model_id=FACE,
        weights_digest=digest,
        dataset_digest="sha256:test",
        identities=10,
        mated_searches=len(mated),
        non_mated_searches=0,
        failed_to_enrol=0,
        figures="{}",
        mated_scores=mated,
        mated_failed=1,
        impostor_pairs=pairs,
        impostor_tail=sorted(tail, reverse=True),
        created_at=dt.datetime.now(dt.UTC),
        requested_by="tester",
    )


def face_photos(folder: Path) -> Path:
    from skimage import data

    folder.mkdir(parents=True, exist_ok=True)
    Image.fromarray(data.astronaut()).save(folder / "astronaut.jpg", quality=92)
    Image.fromarray(data.astronaut()[:, ::-1]).save(folder / "astronaut-flipped.jpg", quality=92)
    Image.fromarray(np.stack([data.camera()] * 3, axis=-1)).save(folder / "camera.png")
    Image.fromarray(data.coffee()).save(folder / "coffee.jpg")  # no face: counted, not searched
    return folder


def gm(settings: Settings, *args: str) -> subprocess.CompletedProcess[str]:
    home = {"GALLERYMATCH_HOME": settings.home_uri, "GALLERYMATCH_AUDIT_KEY_DIR": str(settings.audit_key_dir)}
    script = Path(sys.executable).parent / "gallerymatch"
    env = child_env(**home, GALLERYMATCH_MODEL_DOWNLOADS="false")
    return subprocess.run([str(script), *args], capture_output=True, text=True, env=env, timeout=600, check=False)


def test_threshold_choice_parses_numbers_and_calibrations_and_refuses_the_rest() -> None:
    assert ThresholdChoice.parse(None) == ThresholdChoice()
    assert ThresholdChoice.parse("0.42").value == 0.42
    assert ThresholdChoice.parse("calibrated") == ThresholdChoice(calibrated=True)
    assert ThresholdChoice.parse("calibrated:cal-0123456789abcdef").calibration_id == "cal-0123456789abcdef"
    for hostile in ("calibrated:../../etc", "calibrated:cal-XYZ' OR 1=1", "calibrate", "0.4x", "", "nan'"):
        with pytest.raises(Refused):
            ThresholdChoice.parse(hostile)


def test_the_estimate_holds_the_target_fpir_at_the_gallerys_size(tmp_path: Path, untrained_digest: str) -> None:
    """Impostor scores with a known FMR curve: the threshold is the smallest one whose extrapolated FPIR
    1 - (1 - FMR)^N stays at or below the target, and the record says it is an estimate."""
    settings = make_settings(tmp_path / "home")
    register(settings)
    n = 50
    add_faces(settings, n, untrained_digest, seed=1)
    pairs = 1_000_000
    tail = [0.9 - i * 1e-4 for i in range(5000)]  # the 5000 highest of 1e6 impostor scores, 1e-4 apart
    add_evaluation(Gallery(settings.storage), synthetic_evaluation(untrained_digest, pairs, tail, [0.95, 0.7, 0.5]))
    target = 0.01
    record = calibrate(settings, FACE, target, "calibrator-1", progress=False)
    fmr = 1 - (1 - target) ** (1 / n)  # per-pair FMR allowed: ~2.01e-4, i.e. 201 impostor pairs of 1e6
    allowed = int(np.floor(fmr * pairs))
    assert record["method"] == "estimate" and record["gallery_rows"] == n
    assert tail[allowed] < record["threshold"] <= tail[allowed - 1]  # the (allowed+1)-th score is refused
    assert record["fpir"] == pytest.approx(fpir_from_fmr(allowed / pairs, n)) and record["fpir"] <= target
    assert record["fpir_low"] <= record["fpir"] <= record["fpir_high"]
    assert record["fnir"] == pytest.approx(3 / 4)  # 0.7 and 0.5 below ~0.88, plus the faceless mated search
    assert any("estimate" in w for w in record["warnings"])
    [outcome] = [r for r in AuditLog.of(settings).records() if r["action"] == "calibrate" and r["phase"] == "outcome"]
    assert outcome["status"] == "ok" and outcome["threshold"] == record["threshold"]


def test_calibrate_refuses_without_a_basis_and_records_nothing(tmp_path: Path, untrained_digest: str) -> None:
    settings = make_settings(tmp_path / "home")
    register(settings)
    with pytest.raises(Refused, match="no face rows"):
        calibrate(settings, FACE, 0.01, "calibrator-1", progress=False)
    add_faces(settings, 10, untrained_digest, seed=2)
    with pytest.raises(Refused, match="--non-mated DIR"):
        calibrate(settings, FACE, 0.01, "calibrator-1", progress=False)
    for bad in (0.0, 0.5, -1.0, float("nan")):
        with pytest.raises(Refused):
            calibrate(settings, FACE, bad, "calibrator-1", progress=False)
    with pytest.raises(Refused):
        calibrate(settings, FACE, 0.01, "x'; DROP", progress=False)
    assert Gallery(settings.storage).count("calibrations") == 0


@pytest.mark.slow
def test_a_measured_calibration_searches_the_whole_gallery(tmp_path: Path, untrained_digest: str) -> None:
    """Non-mated photos searched top-1 against every gallery row: the threshold admits none of them at a
    target below 1/U, and lies just above the highest non-mated score (checked by brute force)."""
    from pipelines.faces import FaceDetector, FaceEmbedder, stack_crops

    settings = make_settings(tmp_path / "home")
    register(settings)
    gallery = add_faces(settings, 300, untrained_digest, seed=3)
    photos = face_photos(tmp_path / "non-mated")
    record = calibrate(settings, FACE, 0.2, "calibrator-1", non_mated=photos, progress=False)
    detector, embedder = FaceDetector(20, 0.9, 1280, 8), FaceEmbedder(FACE, tmp_path, False, 32)
    images = [
        Image.open(photos / name).convert("RGB") for name in ("astronaut.jpg", "astronaut-flipped.jpg", "camera.png")
    ]
    vectors = embedder.embed(stack_crops([faces[0] for faces in detector.detect(images)]))
    top = (vectors.astype(np.float64) @ gallery.astype(np.float64).T).max(axis=1)
    assert record["method"] == "measured" and record["probe_count"] == 3  # coffee has no face
    assert record["threshold"] > np.float32(top.max()) and record["threshold"] == pytest.approx(top.max(), abs=1e-5)
    assert record["fpir"] == 0.0 and record["fpir_high"] == pytest.approx(1 - 0.025 ** (1 / 3))
    assert any("not demonstrated" in w for w in record["warnings"])  # 3 searches cannot show FPIR 0.2


def test_threshold_calibrated_is_refused_until_a_calibration_exists(tmp_path: Path, untrained_digest: str) -> None:
    settings = make_settings(tmp_path / "home")
    register(settings)
    add_faces(settings, 20, untrained_digest, seed=4)
    probes = face_photos(tmp_path / "probes")
    args = [
        "watchlist",
        "submit",
        str(probes),
        "--name",
        "b",
        "--case-id",
        "C-1",
        "--purpose",
        "criminal-investigation",
    ]
    args += ["--legal-basis", "x", "--requested-by", "analyst-1", "--model-id", FACE, "--threshold", "calibrated"]
    refused = gm(settings, *args)
    assert refused.returncode == 2, refused.stderr
    assert "gallerymatch calibrate --model-id facenet-untrained" in refused.stderr
    assert "Traceback" not in refused.stderr
    unknown = gm(settings, *args[:-1], "calibrated:cal-0000000000000000")
    assert unknown.returncode == 2 and "no calibration" in unknown.stderr
    assert Gallery(settings.storage).count("watchlists") == 0


@pytest.mark.slow
def test_a_calibrated_watchlist_names_its_calibration_and_the_match_warns_when_it_stops_fitting(
    tmp_path: Path, untrained_digest: str
) -> None:
    settings = make_settings(tmp_path / "home")
    register(settings)
    add_faces(settings, 100, untrained_digest, seed=5)
    add_evaluation(
        Gallery(settings.storage),
        synthetic_evaluation(untrained_digest, 10_000, [0.8 - i * 1e-3 for i in range(500)], [0.9]),
    )
    cal = calibrate(settings, FACE, 0.05, "calibrator-1", progress=False)
    probes = face_photos(tmp_path / "probes")
    sub = Submission(probes, "b", "C-1", "criminal-investigation", "x", "analyst-1", "face", FACE, 5)
    wl = submit(settings, Submission(**{**sub.__dict__, "calibrated": ThresholdChoice.parse("calibrated")}))
    assert wl["calibration_id"] == cal["calibration_id"]
    assert wl["threshold"] >= cal["threshold"] and wl["threshold"] == pytest.approx(cal["threshold"], abs=1e-6)
    run = run_match(settings, wl["watchlist_id"])
    assert run["calibration"]["calibration_id"] == cal["calibration_id"] and run["threshold_warnings"] == []
    add_faces(settings, 11, untrained_digest, seed=6, start=1000)  # 111 rows: 11% more than calibrated for
    grown = run_match(settings, wl["watchlist_id"])
    assert any("recalibrate" in w and "11%" in w for w in grown["threshold_warnings"])
    assert grown["calibration"]["threshold"] == cal["threshold"]
    part = next(Path(grown["path"]).glob("part-*.parquet"))
    meta = {k.decode(): v.decode() for k, v in pq.read_schema(part).metadata.items()}
    assert meta["calibration_id"] == cal["calibration_id"]
    assert json.loads(meta["calibration"])["target_fpir"] == 0.05
    by_hand = submit(settings, sub)
    assert by_hand["calibration_id"] is None
    assert any("not calibrated" in w for w in run_match(settings, by_hand["watchlist_id"])["threshold_warnings"])


def test_threshold_warnings_name_other_weights_and_a_gallery_off_by_more_than_ten_percent() -> None:
    cal = Calibration.of(
        {
            "calibration_id": "cal-0123456789abcdef",
            "model_id": FACE,
            "weights_digest": "sha256:aaaa",
            "gallery_table": "faces",
            "gallery_version": 3,
            "gallery_rows": 1000,
            "gallery_filter": "x",
            "method": "measured",
            "probe_count": 5000,
            "probe_source": "y",
            "target_fpir": 0.001,
            "threshold": 0.6,
            "fpir": 0.0008,
            "fpir_low": 0.0002,
            "fpir_high": 0.002,
            "fnir": None,
            "fnir_source": None,
            "created_at": dt.datetime.now(dt.UTC),
            "requested_by": "c",
        }
    )
    assert threshold_warnings(cal, ["sha256:aaaa"], 1100) == []
    assert threshold_warnings(cal, ["sha256:aaaa"], 900) == []
    assert len(threshold_warnings(cal, ["sha256:aaaa"], 1101)) == 1
    assert len(threshold_warnings(cal, ["sha256:aaaa"], 899)) == 1
    assert len(threshold_warnings(cal, ["sha256:aaaa", "sha256:bbbb"], 1000)) == 1
    assert "not calibrated" in threshold_warnings(None, [], 10)[0]


@pytest.mark.slow
def test_a_calibration_killed_before_its_record_leaves_none_and_is_audited_then_reruns(
    tmp_path: Path, untrained_digest: str
) -> None:
    """SIGKILL inside the audited action: no calibration row, the intent stays open until the next writer
    closes it; a rerun records one calibration."""
    settings = make_settings(tmp_path / "home")
    register(settings)
    add_faces(settings, 50, untrained_digest, seed=7)
    tail = [0.9 - i * 1e-4 for i in range(5000)]
    add_evaluation(Gallery(settings.storage), synthetic_evaluation(untrained_digest, 1_000_000, tail, [0.95]))
    args = ["calibrate", "--model-id", FACE, "--target-fpir", "0.01", "--requested-by", "calibrator-1", "--json"]
    home = {"GALLERYMATCH_HOME": settings.home_uri, "GALLERYMATCH_AUDIT_KEY_DIR": str(settings.audit_key_dir)}
    script = str(Path(sys.executable).parent / "gallerymatch")
    killed = subprocess.run(
        [script, *args], env=child_env(**home, GALLERYMATCH_KILL_AT="calibrate:before-record"),
        capture_output=True, text=True, timeout=600, check=False,
    )  # fmt: skip
    assert killed.returncode == -9, killed.stderr
    assert Gallery(settings.storage).count("calibrations") == 0
    assert [i["action"] for i, _ in AuditLog.of(settings).open_intents()] == ["calibrate"]
    again = gm(settings, *args)
    assert again.returncode == 0, again.stderr
    assert Gallery(settings.storage).count("calibrations") == 1
    assert AuditLog.of(settings).open_intents() == []  # the dead run's intent was closed by the next writer
    outcomes = [r for r in AuditLog.of(settings).records() if r["action"] == "calibrate" and r["phase"] == "outcome"]
    assert len(outcomes) == 2 and outcomes[-1]["status"] == "ok"  # the killed run's closed, then the rerun's

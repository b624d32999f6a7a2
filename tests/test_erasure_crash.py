"""Erasure survives a kill anywhere: a rerun of the erase, or any later writer command, finishes the recorded plan.

Every case kills a real process (SIGKILL at a named crash point, or on a timer), then checks that the person is
gone from every table, every result set and every file under the home; that no result set was lost; that the
receipt says what was really removed; and that the audit trail is whole with no action left open.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import make_settings, register

from jobs.erase import erase
from jobs.erase_steps import scan_for, stored_objects
from jobs.import_embeddings import run_import
from jobs.match import run_match
from jobs.retention import run_retention
from jobs.review import review_candidate
from jobs.watchlist import Submission, submit
from lance_tables.erasure import vector_patterns
from lance_tables.store import Gallery
from pipelines.audit import AuditLog
from pipelines.errors import GalleryMatchError
from pipelines.results import list_runs, load_run, part_keys
from pipelines.settings import Settings
from pipelines.sql import sql_list

REPO = Path(__file__).resolve().parents[1]
TARGET = "subj-target"
TABLES = ("images", "faces", "image_embeddings", "quarantine", "probes")
STEPS = ("delete-rows", "reviews", "block-reingest", "rewrite-results", "purge", "purge-versions")
ERASE_POINTS = [
    "erase:before-plan",
    "erase:after-plan",
    # purge-versions is a no-op on a local home: test_erasure_s3 kills it half-way, on a versioned bucket
    *[f"erase:{when}-{step}" for step in STEPS if step != "purge-versions" for when in ("before", "inside")],
    *[f"erase:deleted-{name}" for name in TABLES],
    "erase:after-new-generation",
    "results:before-manifest",  # the rewrite of a result set, killed between its parts and its manifest
    "erase:after-receipt",
    "erase:before-done",
]
# what the subject has in the world built below: one image embedding, one face, one quarantined row, one probe
REMOVED = {"images": 0, "faces": 1, "image_embeddings": 1, "quarantine": 1, "probes": 1}
ERASE = (
    "import sys, pathlib\n"
    "import lance, lancedb\n"  # imported here, not lazily inside the erase: the timer's zero is the erase's start
    "from jobs.erase import erase\n"
    "from pipelines.settings import Settings\n"
    "settings = Settings()\n"
    "pathlib.Path(sys.argv[2]).touch()\n"  # imports done: the erase starts now (the timer's zero)
    "erase(settings, 'data subject request 41', 'dpo-1', subject_id=sys.argv[1])\n"
)


@dataclass(frozen=True)
class World:
    """A home where one subject has rows in every table, result sets and reviews, and what must survive them."""

    settings: Settings
    vectors: tuple[np.ndarray, ...]  # the subject's stored vectors (image embedding, face, probe), exact bytes
    gallery_ids: frozenset[str]  # the subject's gallery rows
    named_run: str  # the run that names the subject (and holds the subject's probe)
    expected_rows: dict[str, int]  # every run id -> its rows once the subject is erased
    counts: dict[str, int]  # table -> rows before the erasure
    kept_reviews: frozenset[str]  # review ids of candidates that are not the subject's


def embeddings_file(
    path: Path, ids: list[str], vectors: list[Any], subjects: list[str | None], id_column: str = "record_id"
) -> Path:
    """An import (or probe) file with a subject_id column; gallery files declare `minor`."""
    columns: dict[str, Any] = {
        id_column: ids,
        "embedding": [[float(x) for x in v] for v in vectors],
        "subject_id": pa.array(subjects, pa.string()),
    }
    if id_column == "record_id":
        columns["minor"] = [False] * len(ids)
    pq.write_table(pa.table(columns), path)
    return path


def watchlist(settings: Settings, path: Path, name: str) -> str:
    sub = Submission(path, name, "CASE-9", "fraud-investigation", "basis", "analyst-1", "image", "model-a", top_k=3)
    return str(submit(settings, sub)["watchlist_id"])


def build_world(
    root: Path, rows: int = 300, dim: int = 32, index: bool = False, settings: Settings | None = None
) -> World:
    """A gallery (one of its rows the subject's, one quarantined row of theirs), a face of theirs, two watchlists
    (one holding a probe photo of the subject), a run per watchlist, and reviews of candidates of both kinds.
    On a local home under `root`, or on the (S3) home of `settings`; the input files go under `root`."""
    root.mkdir(parents=True, exist_ok=True)
    settings = settings or make_settings(root / "home")
    register(settings)
    rng = np.random.default_rng(21)
    vecs = rng.standard_normal((rows, dim))
    ids = [f"r{i:05d}" for i in range(rows)]
    subjects: list[str | None] = [TARGET if i == 5 else None for i in range(rows)]
    gallery = embeddings_file(
        root / "g.parquet", [*ids, "r-bad"], [*vecs, np.full(dim, np.nan)], [*subjects, TARGET]
    )  # the subject's unusable photo is quarantined, with their subject id
    run_import(settings, gallery, "archive", "model-a", "image", dim)
    faces = embeddings_file(
        root / "f.parquet", ["f0", "f1", "f2"], list(rng.standard_normal((3, 512))), [None, TARGET, None]
    )
    run_import(settings, faces, "archive", "model-f", "face", None)
    if index:
        from lancedb.index import IvfPq

        config = IvfPq(distance_type="cosine", num_partitions=16, num_sub_vectors=dim // 8)
        Gallery(settings.storage).ensure("image_embeddings").create_index("vector", config=config)
    near = vecs[[5, 9, 40]] + 0.05 * rng.standard_normal((3, dim))
    probes_a = embeddings_file(root / "pa.parquet", ["p0", "p1", "p2"], list(near), [None, None, TARGET], "probe_id")
    near_b = vecs[[20, 21]] + 0.05 * rng.standard_normal((2, dim))
    probes_b = embeddings_file(root / "pb.parquet", ["q0", "q1"], list(near_b), [None, None], "probe_id")
    run_a = run_match(settings, watchlist(settings, probes_a, "a"))["run_id"]
    run_b = run_match(settings, watchlist(settings, probes_b, "b"))["run_id"]

    store = Gallery(settings.storage)
    where = f"subject_id IN {sql_list([TARGET])}"
    vectors, gallery_ids = [], set()
    for name, key in (("image_embeddings", "embedding_id"), ("faces", "face_id"), ("probes", "probe_key")):
        found = store.read(name, columns=[key, "vector"], where=where).to_pylist()
        assert len(found) == 1, name
        vectors.append(np.asarray(found[0]["vector"], np.float32))
        if name != "probes":
            gallery_ids.add(found[0][key])
    assert store.count("quarantine", where) == 1
    table_a = load_run(settings.store, run_a).to_pylist()
    top = {r["probe_id"]: r for r in table_a if r["rank"] == 1}
    assert top["p0"]["subject_id"] == TARGET  # the run names the subject: the erasure must rewrite it
    erased_review = review_candidate(settings, run_a, "p0", 1, "potential_candidate", "rev-1")["review_id"]
    probe_review = review_candidate(settings, run_a, "p2", 1, "potential_candidate", "rev-1")["review_id"]
    kept = {review_candidate(settings, run_a, "p1", 1, "potential_candidate", "rev-1")["review_id"]}
    kept.add(review_candidate(settings, run_b, "q0", 1, "no_candidate", "rev-2")["review_id"])
    assert erased_review not in kept and probe_review not in kept
    table_b = load_run(settings.store, run_b).to_pylist()
    assert not {r["gallery_id"] for r in table_b} & gallery_ids  # the other run names nobody erased
    left_a = [r for r in table_a if r["gallery_id"] not in gallery_ids and r["probe_id"] != "p2"]
    assert 0 < len(left_a) < len(table_a)
    for vector in vectors:  # negative control: the scan finds each of the subject's vectors before the erasure
        assert scan_for(settings.storage, vector_patterns([vector]))
    return World(
        settings=settings,
        vectors=tuple(vectors),
        gallery_ids=frozenset(gallery_ids),
        named_run=run_a,
        expected_rows={run_a: len(left_a), run_b: len(table_b)},
        counts={n: store.count(n) for n in ("faces", "image_embeddings", "quarantine", "probes")},
        kept_reviews=frozenset(kept),
    )


def clone_home(settings: Settings, root: Path, versioned: bool = False) -> Settings:
    """A copy of a home (and of its key folder) under `root`, or for an S3 home into a new bucket of the same
    server (`versioned` or not; only current objects are copied): built once, crashed many times. The copy's
    audit chain is anchored anew (its witness is keyed by the home's location); the template must stay under 64
    records, since the home's own signed checkpoints name the home they were made for."""
    assert not settings.store.list("audit/checkpoints/")
    assert settings.audit_key_dir is not None
    if not settings.storage.is_s3:
        home = root / "home"
        shutil.copytree(settings.home, home)
        keys = make_settings(home).audit_key_dir
        assert keys is not None
        shutil.copytree(settings.audit_key_dir, keys)
        return make_settings(home)
    from s3 import client, make_bucket

    from pipelines.storage import split_s3

    env = {k: os.environ[k] for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_REGION", "AWS_ENDPOINT_URL")}
    source, prefix = split_s3(settings.home)
    bucket = make_bucket(env, versioned=versioned)
    s3 = client(env)
    for key in settings.store.list(""):
        s3.copy_object(Bucket=bucket, Key=f"home/{key}", CopySource={"Bucket": source, "Key": f"{prefix}/{key}"})
    keys = root / "audit-keys"
    shutil.copytree(settings.audit_key_dir, keys)
    return make_settings(f"s3://{bucket}/home", audit_key_dir=keys)


def clone(world: World, root: Path, versioned: bool = False) -> World:
    return replace(world, settings=clone_home(world.settings, root, versioned))


def done_journals(settings: Settings) -> list[str]:
    return [k for k in settings.store.list("erasure/journal/") if k.endswith("/done.json")]


def scratch(settings: Settings) -> Path:
    """A local folder beside the home (an S3 home's is its audit key folder's parent)."""
    assert settings.audit_key_dir is not None
    return settings.audit_key_dir.parent


def stored(settings: Settings, area: str) -> set[str]:
    """Every stored byte sequence under `area/` of the home: files (a local home's temporary files too),
    objects, and on a versioned bucket every noncurrent version (`key?versionId=...`)."""
    return {o.label for o in stored_objects(settings.storage) if o.key.startswith(area.rstrip("/") + "/")}


def env_for(settings: Settings, **extra: str) -> dict[str, str]:
    """The environment of another process working on this home (its settings come from GALLERYMATCH_*).

    Bytecode is cached outside the repository and the virtualenv: without it every child process compiles
    lancedb and pyarrow again (over ten seconds each on a small machine)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("GALLERYMATCH_") and k != "PYTHONDONTWRITEBYTECODE"}
    return (
        env
        | {
            "GALLERYMATCH_HOME": str(settings.home),
            "GALLERYMATCH_AUDIT_KEY_DIR": str(settings.audit_key_dir),
            "RAY_ENABLE_UV_RUN_RUNTIME_ENV": "0",
            "PYTHONPYCACHEPREFIX": str(Path(tempfile.gettempdir()) / "gallerymatch-test-pycache"),
        }
        | extra
    )


def erase_process(settings: Settings, kill_at: str | None = None) -> subprocess.Popen[bytes]:
    started = scratch(settings) / "erase-started"
    started.unlink(missing_ok=True)
    extra = {"GALLERYMATCH_KILL_AT": kill_at} if kill_at else {}
    return subprocess.Popen(
        [sys.executable, "-c", ERASE, TARGET, str(started)],
        cwd=REPO,
        env=env_for(settings, **extra),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )


def wait_started(settings: Settings, proc: subprocess.Popen[bytes]) -> float:
    started = scratch(settings) / "erase-started"
    deadline = time.monotonic() + 120
    while not started.exists():
        assert proc.poll() is None, proc.communicate()[1].decode()[-3000:]
        assert time.monotonic() < deadline, "the erase process did not start"
        time.sleep(0.01)
    return time.monotonic()


def killed_at(settings: Settings, point: str) -> None:
    proc = erase_process(settings, point)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == -signal.SIGKILL, (point, proc.returncode, err.decode()[-3000:])


def assert_erased(world: World, receipt: dict[str, Any] | None = None) -> None:
    """Everything about the subject is gone, nothing else is, and the record of it is true and complete."""
    settings, gallery = world.settings, Gallery(world.settings.storage)
    where = f"subject_id IN {sql_list([TARGET])}"
    for name in TABLES:
        table = gallery.open(name)
        if table is not None and "subject_id" in table.schema.names:
            assert gallery.count(name, where) == 0, name
    for name, count in world.counts.items():  # exactly the subject's rows went
        assert gallery.count(name) == count - REMOVED[name], name
    reviews = gallery.read("reviews").to_pylist()
    assert {r["review_id"] for r in reviews} == world.kept_reviews  # reviews of the subject's candidates went
    assert not {r["gallery_id"] for r in reviews} & world.gallery_ids

    runs = {m["run_id"]: m for m in list_runs(settings.store)}
    assert set(runs) == set(world.expected_rows)  # no result set was lost
    for run_id, rows in world.expected_rows.items():
        table = load_run(settings.store, run_id)
        assert table.num_rows == rows, run_id
        assert not set(table.column("gallery_id").to_pylist()) & world.gallery_ids
        assert TARGET not in table.column("subject_id").to_pylist()
        assert run_id != world.named_run or "p2" not in table.column("probe_id").to_pylist()
    named = {key for m in runs.values() for key in part_keys(m)}
    assert stored(settings, "results") == named  # no superseded generation, no orphaned part, no old version
    assert len(stored(settings, "manifests")) == len(runs)

    assert scan_for(settings.storage, vector_patterns(list(world.vectors))) == []

    journal = stored(settings, "erasure/journal")
    plans = sorted(k for k in journal if k.endswith("/plan.json"))
    assert len(plans) == 1, sorted(journal)
    folder = plans[0].removesuffix("plan.json")
    receipt_id = folder.removeprefix("erasure/journal/").rstrip("/")
    assert all(k.startswith(folder) for k in journal)  # no other journal kept the vectors
    assert folder + "done.json" in journal and not [k for k in journal if "vectors.npz" in k]
    stored_receipt = settings.store.read(f"erasure/receipts/{receipt_id}.json")
    assert stored_receipt is not None
    body = json.loads(stored_receipt)
    assert body["ok"] and body["removed_rows"] == REMOVED
    assert all(c["passed"] for c in body["checks"])
    assert body["checks"][0]["vectors"] == len(world.vectors)
    assert body["result_sets_rewritten"] == [world.named_run]
    versioning = body["object_versions"]["versioning"]
    assert versioning == (world.settings.storage.store.versioning() if world.settings.storage.is_s3 else None)
    if versioning:
        assert body["object_versions"]["policy"] == "purge-versions"
    if receipt is not None:  # what the requester was handed is that receipt
        assert receipt["receipt_id"] == receipt_id and receipt["removed_rows"] == REMOVED and receipt["ok"]

    log = AuditLog.of(settings)
    report = log.verify()
    assert report["ok"], report["problems"]
    assert report["incomplete_actions"] == []
    outcomes = [r for r in log.records() if r["action"] == "erase" and r.get("phase") == "outcome"]
    assert any(r["status"] == "ok" and r.get("receipt_id") == receipt_id for r in outcomes)
    assert settings.store.read("locks/writer.json") is None


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> World:
    return build_world(tmp_path_factory.mktemp("world"))


def test_everything_about_the_person_goes(template: World, tmp_path: Path) -> None:
    """Uninterrupted, and the baseline every crash case is held to: their gallery rows, their quarantined photo,
    their probe in a watchlist, the reviews of their candidates and of their probe, their rows in result sets."""
    world = clone(template, tmp_path)
    gallery, where = Gallery(world.settings.storage), f"subject_id IN {sql_list([TARGET])}"
    assert gallery.count("quarantine", where) == 1 and gallery.count("probes", where) == 1
    reviews = gallery.read("reviews").to_pylist()
    assert {r["probe_id"] for r in reviews if r["review_id"] not in world.kept_reviews} == {"p0", "p2"}
    receipt = erase(world.settings, "data subject request 41", "dpo-1", subject_id=TARGET)
    assert_erased(world, receipt)
    left = Gallery(world.settings.storage).read("probes", columns=["probe_id"]).column("probe_id").to_pylist()
    assert sorted(left) == ["p0", "p1", "q0", "q1"]  # the other probes of their watchlist stay


@pytest.mark.parametrize("point", ERASE_POINTS)
def test_a_killed_erase_is_finished_by_its_rerun(template: World, tmp_path: Path, point: str) -> None:
    world = clone(template, tmp_path)
    killed_at(world.settings, point)
    receipt = erase(world.settings, "data subject request 41", "dpo-1", subject_id=TARGET)
    assert_erased(world, receipt)  # the receipt handed back is the interrupted plan's, with its real counts


@pytest.mark.parametrize(
    "point",
    [
        "erase:after-plan",
        "erase:deleted-image_embeddings",
        "erase:inside-reviews",
        "erase:after-new-generation",
        "erase:inside-purge",
        "erase:after-receipt",
    ],
)
def test_a_killed_erase_is_finished_by_the_next_writer_command(template: World, tmp_path: Path, point: str) -> None:
    """Nobody reruns the erase: the next writer (here retention) finishes the plan before doing its own work."""
    world = clone(template, tmp_path)
    killed_at(world.settings, point)
    run_retention(world.settings)
    assert_erased(world)


def test_an_erase_killed_before_its_plan_leaves_no_copy_of_the_vectors(template: World, tmp_path: Path) -> None:
    """Killed after the journal's vectors file but before its plan: nothing was removed, so nothing is resumed,
    but the next writer deletes that copy of the vectors and closes the dead command's audit record."""
    world = clone(template, tmp_path)
    killed_at(world.settings, "erase:before-plan")
    journal = stored(world.settings, "erasure/journal")
    assert [k for k in journal if k.endswith("/vectors.npz")]  # the crash left a copy of the subject's vectors
    run_retention(world.settings)
    assert stored(world.settings, "erasure/journal") == set()
    report = AuditLog.of(world.settings).verify()
    assert report["ok"] and report["incomplete_actions"] == []
    where = f"subject_id IN {sql_list([TARGET])}"
    assert Gallery(world.settings.storage).count("image_embeddings", where) == 1  # no plan, nothing removed
    assert_erased(world, erase(world.settings, "data subject request 41", "dpo-1", subject_id=TARGET))


def test_a_failed_check_never_turns_green(template: World, tmp_path: Path) -> None:
    """A copy of the vector outside Lance's folders fails the byte scan; the same erase again resumes the same
    plan and fails again (never `ok` with zero vectors scanned); once the copy is gone the plan completes."""
    world = clone(template, tmp_path)
    settings = world.settings
    assert settings.store.create("stray.bin", b"a backup tool's leftover" + vector_patterns([world.vectors[0]])[0])
    with pytest.raises(GalleryMatchError, match="FAILED"):
        erase(settings, "data subject request 41", "dpo-1", subject_id=TARGET)
    for _ in range(2):
        with pytest.raises(GalleryMatchError, match="FAILED"):
            erase(settings, "data subject request 41", "dpo-2", subject_id=TARGET)
    run_retention(settings)  # another writer neither greens nor drops the failed plan
    journal = stored(settings, "erasure/journal")
    (plan,) = [k for k in journal if k.endswith("/plan.json")]
    folder = plan.removesuffix("plan.json")
    assert folder + "vectors.npz" in journal and folder + "done.json" not in journal
    assert len([k for k in journal if k.startswith(folder + "checks-failed-")]) == 3
    assert not settings.store.list("erasure/receipts/")  # no receipt while a check fails
    settings.store.delete("stray.bin")
    receipt = erase(settings, "data subject request 41", "dpo-2", subject_id=TARGET)
    scan = receipt["checks"][0]
    assert receipt["ok"] and scan["passed"] and scan["vectors"] == len(world.vectors) >= 1
    assert receipt["receipt_id"] == folder.removeprefix("erasure/journal/").rstrip("/")  # the first plan
    assert_erased(world, receipt)


def test_a_kept_row_with_the_same_bytes_is_reported_not_failed(tmp_path: Path) -> None:
    """Two records of two people that hold the very same vector: erasing one leaves the other's bytes on disk,
    which the byte scan reports as a kept row's, and does not fail on."""
    settings = make_settings(tmp_path / "home")
    register(settings)
    vecs = list(np.random.default_rng(5).standard_normal((40, 16)))
    twin = vecs[3]
    subjects: list[str | None] = [None] * 40 + ["subj-a", "subj-b"]
    path = embeddings_file(
        tmp_path / "g.parquet", [f"r{i}" for i in range(40)] + ["twin-a", "twin-b"], [*vecs, twin, twin], subjects
    )
    run_import(settings, path, "archive", "model-a", "image", 16)
    gallery = Gallery(settings.storage)
    rows = gallery.read("image_embeddings", columns=["record_id", "vector"]).to_pylist()
    stored = {r["record_id"]: np.asarray(r["vector"], np.float32) for r in rows}
    assert stored["twin-a"].tobytes() == stored["twin-b"].tobytes() == stored["r3"].tobytes()
    receipt = erase(settings, "request", "dpo-1", subject_id="subj-a")
    scan = receipt["checks"][0]
    assert receipt["ok"] and scan["passed"] and scan["vectors"] == 1
    assert scan["kept_rows_with_the_same_bytes"] == 1 and scan["files_with_kept_rows_bytes"]
    assert scan["files_with_hits"] == []
    assert receipt["removed_rows"]["image_embeddings"] == 1
    left = gallery.read("image_embeddings", columns=["record_id", "subject_id", "vector"]).to_pylist()
    assert "twin-a" not in {r["record_id"] for r in left}
    (other,) = [r for r in left if r["record_id"] == "twin-b"]
    assert other["subject_id"] == "subj-b"
    assert np.asarray(other["vector"], np.float32).tobytes() == stored["twin-b"].tobytes()
    assert len(left) == 41


@pytest.mark.slow
def test_an_erase_killed_on_a_timer_is_finished_by_its_rerun(tmp_path: Path) -> None:
    """A larger gallery with an IVF_PQ index (rebuilt by the purge), killed at moments spread over a measured
    erase rather than at named points: whatever the moment, the rerun meets every invariant."""
    world = build_world(tmp_path / "world", rows=6000, dim=64, index=True)
    measured = clone(world, tmp_path / "measured")
    proc = erase_process(measured.settings)
    start = wait_started(measured.settings, proc)
    while not done_journals(measured.settings):  # the erase's duration: until its journal is done
        assert proc.poll() is None, proc.communicate()[1].decode()[-3000:]
        time.sleep(0.005)
    duration = time.monotonic() - start
    assert proc.wait(timeout=300) == 0, proc.communicate()[1].decode()[-3000:]
    assert_erased(measured)
    killed = 0
    for i, fraction in enumerate((0.08, 0.16, 0.5, 0.95)):  # recovery or plan, steps, purge, checks
        case = clone(world, tmp_path / f"kill-{i}")
        proc = erase_process(case.settings)
        start = wait_started(case.settings, proc)
        time.sleep(max(0.0, start + fraction * duration - time.monotonic()))
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=300)
        assert proc.returncode in (0, -signal.SIGKILL), proc.returncode
        killed += proc.returncode == -signal.SIGKILL
        if done_journals(case.settings):  # killed after the plan was done: nothing left to rerun
            run_retention(case.settings)
            assert_erased(case)
        else:
            assert_erased(case, erase(case.settings, "data subject request 41", "dpo-1", subject_id=TARGET))
        assert Gallery(case.settings.storage).ensure("image_embeddings").list_indices()  # rebuilt, not lost
    assert killed >= 3, f"only {killed} of 4 erases were still running when killed ({duration:.1f} s measured)"


def test_the_crash_points_cover_every_step_and_table() -> None:
    """The parametrisation follows the code: a new step, table or crash point must join the list above."""
    import re

    import jobs.erase
    import jobs.erase_steps

    source = Path(jobs.erase.__file__).read_text() + Path(jobs.erase_steps.__file__).read_text()
    assert set(re.findall(r'_step\(\s*store, plan, "([a-z-]+)"', source)) == set(STEPS)
    assert jobs.erase_steps.TABLES == TABLES
    named = set(re.findall(r'crash_point\("(erase:[a-z-]+)"\)', source))
    assert named <= set(ERASE_POINTS) and len(named) == 5
    assert {f"erase:{w}-{s}" for s in STEPS for w in ("before", "inside")} - set(ERASE_POINTS) == {
        "erase:before-purge-versions",
        "erase:inside-purge-versions",
    }
    assert re.findall(r'crash_point\("(versions:[a-z-]+)"\)', source) == ["versions:between-passes"]  # S3 tests


# killed between writing an object's temporary file and linking it into place (`LocalStore.create`): the
# temporary file is whole and fsynced, and invisible to `ObjectStore.list`
TORN_ERASE = (
    "import os, signal, sys\n"
    "import pipelines.objectstore as objectstore\n"
    "from jobs.erase import erase\n"
    "from pipelines.settings import Settings\n"
    "real = os.link\n"
    "def link(src, dst):\n"
    "    if str(dst).endswith(sys.argv[2]):\n"
    "        os.kill(os.getpid(), signal.SIGKILL)\n"
    "    real(src, dst)\n"
    "objectstore.os = type(os)('os_with_a_torn_link')\n"
    "objectstore.os.__dict__.update(os.__dict__)\n"
    "objectstore.os.link = link\n"
    "erase(Settings(), 'data subject request 41', 'dpo-1', subject_id=sys.argv[1])\n"
)


@pytest.mark.parametrize("suffix", ["vectors.npz", ".parquet", "plan.json"])
def test_an_erase_killed_while_writing_an_object_leaves_no_torn_copy(
    template: World, tmp_path: Path, suffix: str
) -> None:
    """The journal's copy of the vectors, or a rewritten result part, killed before it was linked into place:
    the temporary file must not outlive the crash (it holds the vectors, or result rows, nothing will read)."""
    world = clone(template, tmp_path)
    done = subprocess.run(
        [sys.executable, "-c", TORN_ERASE, TARGET, suffix],
        cwd=REPO,
        env=env_for(world.settings),
        capture_output=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == -signal.SIGKILL, done.stderr.decode()[-3000:]
    assert list(world.settings.local_home.rglob(".objtmp-*"))  # the crash left a temporary file
    assert_erased(world, erase(world.settings, "data subject request 41", "dpo-1", subject_id=TARGET))
    assert not list(world.settings.local_home.rglob(".objtmp-*"))

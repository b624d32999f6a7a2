"""Human review: confirmation takes two different people (however their ids are spelt), and no review ever lands
on a candidate an erasure removes, even one submitted while that erasure runs."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_erasure_crash import REPO, TARGET, World, build_world, clone, env_for

from jobs.erase import erase
from jobs.review import review_candidate
from lance_tables.reviews import effective_statuses
from lance_tables.store import Gallery
from pipelines.audit import AuditLog
from pipelines.errors import Refused
from pipelines.results import list_runs, load_run

# the erase pauses after it removed the reviews and before it rewrote the result sets: the window where a review
# that did not wait for the writer lease would land on a candidate that is about to disappear
PAUSED_ERASE = (
    "import sys, time, pathlib\n"
    "import jobs.erase as job\n"
    "from pipelines.settings import Settings\n"
    "real = job.crash_point\n"
    "def pause(name):\n"
    "    if name == 'erase:before-block-reingest':\n"
    "        pathlib.Path(sys.argv[2]).touch()\n"
    "        time.sleep(float(sys.argv[3]))\n"
    "    real(name)\n"
    "job.crash_point = pause\n"
    "job.erase(Settings(), 'data subject request 7', 'dpo-1', subject_id=sys.argv[1])\n"
)


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> World:
    return build_world(tmp_path_factory.mktemp("world"))


def other_run(world: World) -> str:
    return next(r for r in world.expected_rows if r != world.named_run)


def status(world: World, run_id: str, probe_id: str, rank: int) -> str:
    return effective_statuses(Gallery(world.settings.storage))[(run_id, probe_id, rank)]


def test_one_person_under_several_spellings_never_confirms(template: World, tmp_path: Path) -> None:
    world = clone(template, tmp_path)
    run_id = other_run(world)
    first = review_candidate(world.settings, run_id, "q1", 1, "potential_candidate", "rev-1")
    assert first["review_status"] == "potential_candidate" and first["reviewer"] == "rev-1"
    again = review_candidate(world.settings, run_id, "q1", 1, "potential_candidate", "REV-1")
    assert again["reviewer"] == "rev-1" and again["review_status"] == "potential_candidate"  # still one person
    for spelling in (" rev-1", "rev-1 ", "Rev-1"):
        try:
            row = review_candidate(world.settings, run_id, "q1", 1, "potential_candidate", spelling)
        except Refused:
            continue  # refused as an invalid id is as good: it is not a second reviewer either
        assert row["reviewer"] == "rev-1" and row["review_status"] == "potential_candidate", spelling
    for invalid in ("rev-1\n", "rev-1\x00", "rev 1", ""):
        with pytest.raises(Refused, match="not a valid id"):
            review_candidate(world.settings, run_id, "q1", 1, "potential_candidate", invalid)
    assert status(world, run_id, "q1", 1) == "potential_candidate"
    confirmed = review_candidate(world.settings, run_id, "q1", 1, "potential_candidate", "rev-2")
    assert confirmed["review_status"] == "confirmed_candidate"  # a second, different person
    changed = review_candidate(world.settings, run_id, "q1", 1, "no_candidate", "REV-2")
    assert changed["review_status"] == "inconclusive"  # their own later decision replaces theirs: no longer confirmed
    with pytest.raises(Refused, match="no 'identified' status"):
        review_candidate(world.settings, run_id, "q1", 1, "confirmed_candidate", "rev-3")
    reviewers = {r["reviewer"] for r in Gallery(world.settings.storage).read("reviews").to_pylist()}
    assert reviewers == {"rev-1", "rev-2"}  # stored normalised


def test_a_candidate_of_an_erased_person_cannot_be_reviewed(template: World, tmp_path: Path) -> None:
    world = clone(template, tmp_path)
    erase(world.settings, "data subject request 7", "dpo-1", subject_id=TARGET)
    for probe_id in ("p0", "p2"):  # their gallery row's candidate, and the candidates of their probe photo
        with pytest.raises(Refused, match="no candidate"):
            review_candidate(world.settings, world.named_run, probe_id, 1, "potential_candidate", "rev-2")
    reviews = Gallery(world.settings.storage).read("reviews").to_pylist()
    assert {r["review_id"] for r in reviews} == world.kept_reviews


def test_a_review_submitted_during_an_erasure_waits_and_is_refused(template: World, tmp_path: Path) -> None:
    world = clone(template, tmp_path)
    paused = tmp_path / "erase-paused"
    before = {r["probe_id"]: r for r in load_run(world.settings.store, world.named_run).to_pylist() if r["rank"] == 1}
    assert before["p0"]["subject_id"] == TARGET
    proc = subprocess.Popen(
        [sys.executable, "-c", PAUSED_ERASE, TARGET, str(paused), "3"],
        cwd=REPO,
        env=env_for(world.settings),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 120
        while not paused.exists():
            assert proc.poll() is None, proc.communicate()[1].decode()[-3000:]
            assert time.monotonic() < deadline, "the erase did not reach its pause"
            time.sleep(0.01)
        started = time.monotonic()
        with pytest.raises(Refused, match="no candidate"):
            review_candidate(world.settings, world.named_run, "p0", 1, "potential_candidate", "rev-2")
        assert time.monotonic() - started > 1.0  # it waited for the erasure's lease
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err.decode()[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    gallery = Gallery(world.settings.storage)
    reviews = gallery.read("reviews").to_pylist()
    assert not {r["gallery_id"] for r in reviews} & world.gallery_ids
    assert {r["review_id"] for r in reviews} == world.kept_reviews
    for manifest in list_runs(world.settings.store):
        ids = set(load_run(world.settings.store, manifest["run_id"]).column("gallery_id").to_pylist())
        assert not ids & world.gallery_ids
    records = [r for r in AuditLog.of(world.settings).records() if r["action"] == "review"]
    assert len(records) == 2 * 4  # the four reviews of the world's build; the refused one did nothing
    report = AuditLog.of(world.settings).verify()
    assert report["ok"] and report["incomplete_actions"] == []

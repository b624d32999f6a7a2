"""Accountability around matching: audit records of every action, the two-person rule, retention, minors, report."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import numpy as np
import pytest
from conftest import make_settings, register
from hypothesis import HealthCheck, given
from hypothesis import settings as hsettings
from hypothesis import strategies as st
from test_match import DIM, sign_vectors, write_embeddings

from jobs.api import results
from jobs.audit_job import handed_out, verify_home
from jobs.import_embeddings import run_import
from jobs.match import run_match
from jobs.report import transparency_report
from jobs.retention import run_retention
from jobs.review import review_candidate
from jobs.watchlist import Submission, submit
from lance_tables.store import Gallery
from pipelines.audit import AuditLog
from pipelines.errors import Refused
from pipelines.results import list_runs
from pipelines.settings import Settings
from pipelines.vocab import CHILD_PROTECTION_PURPOSES, PURPOSES


def small_gallery(tmp_path: Path, minors: list[bool] | None = None) -> tuple[Settings, np.ndarray]:
    settings = make_settings(tmp_path / "home")
    register(settings)
    vecs = sign_vectors(12, 1)
    path = write_embeddings(tmp_path / "g.parquet", [f"r{i}" for i in range(12)], vecs, minors=minors)
    run_import(settings, path, "archive", "model-a", "image", DIM)
    return settings, vecs


def submit_probes(
    settings: Settings,
    tmp_path: Path,
    probes: np.ndarray,
    purpose: str = "fraud-investigation",
    requested_by: str = "unit-1",
    **kw: object,
) -> str:
    path = write_embeddings(
        tmp_path / f"p-{purpose}.parquet", [f"p{i}" for i in range(len(probes))], probes, id_column="probe_id"
    )
    sub = Submission(path, "b", "CASE-1", purpose, "basis", requested_by, "image", "model-a", **kw)  # type: ignore[arg-type]
    return str(submit(settings, sub)["watchlist_id"])


def test_every_action_leaves_an_audit_record_without_biometrics(tmp_path: Path) -> None:
    settings, vecs = small_gallery(tmp_path)
    wid = submit_probes(settings, tmp_path, vecs[:2], top_k=3)
    run = run_match(settings, wid)
    review_candidate(settings, run["run_id"], "p0", 1, "potential_candidate", "reviewer-a")
    log = AuditLog.of(settings)
    records = log.records()
    actions = [(r["action"], r["phase"]) for r in records]
    assert actions == [
        (action, phase)
        for action in ("import-embeddings", "watchlist.submit", "match", "review")
        for phase in ("intent", "outcome")
    ]
    intent, outcome = records[4], records[5]  # the match: asked for before it ran, its counts after
    assert intent["case_id"] == "CASE-1" and intent["purpose"] == "fraud-investigation"
    assert intent["run_id"] == run["run_id"]
    assert outcome["intent_seq"] == intent["seq"] and outcome["status"] == "ok" and outcome["case_id"] == "CASE-1"
    assert outcome["table_versions"]["image_embeddings"] >= 1
    raw = "".join(p.read_text() for p in sorted((settings.local_home / "audit").rglob("*.json")))
    assert raw.count('"seq":') == len(records) == 8
    assert "vector" not in raw and "embedding" not in raw.replace("image_embeddings", "").replace(
        "import-embeddings", ""
    )
    floats = {f"{v:.6f}" for v in (vecs[0] / np.linalg.norm(vecs[0])).tolist()}
    assert not any(f in raw for f in floats if f not in ("0.250000", "-0.250000"))  # no vector values
    assert log.verify()["ok"]
    assert [name for name, _ in handed_out(settings)] == [f"result set {run['run_id']}"]  # the head went out
    assert verify_home(settings)["ok"]


def test_two_different_reviewers_confirm_a_candidate(tmp_path: Path) -> None:
    settings, vecs = small_gallery(tmp_path)
    run = run_match(settings, submit_probes(settings, tmp_path, vecs[:1], top_k=2))
    first = review_candidate(settings, run["run_id"], "p0", 1, "potential_candidate", "reviewer-a")
    assert first["review_status"] == "potential_candidate"
    same = review_candidate(settings, run["run_id"], "p0", 1, "potential_candidate", "reviewer-a")
    assert same["review_status"] == "potential_candidate"  # the same reviewer twice is still one person
    second = review_candidate(settings, run["run_id"], "p0", 1, "potential_candidate", "reviewer-b")
    assert second["review_status"] == "confirmed_candidate"
    dissent = review_candidate(settings, run["run_id"], "p0", 2, "potential_candidate", "reviewer-a")
    dissent = review_candidate(settings, run["run_id"], "p0", 2, "no_candidate", "reviewer-b")
    assert dissent["review_status"] == "inconclusive"
    with pytest.raises(Refused, match="no 'identified' status"):
        review_candidate(settings, run["run_id"], "p0", 1, "identified", "reviewer-c")
    with pytest.raises(Refused, match="no candidate of rank 9"):
        review_candidate(settings, run["run_id"], "p0", 9, "no_candidate", "reviewer-c")
    frame = results(settings.home).collect().sort("rank")
    assert frame["review_status"].to_list() == ["confirmed_candidate", "inconclusive"]


def test_retention_with_a_fake_clock(tmp_path: Path) -> None:
    settings, vecs = small_gallery(tmp_path)
    settings = make_settings(settings.home, results_retention_days=30)
    wid = submit_probes(settings, tmp_path, vecs[:1], expires=dt.date.today() + dt.timedelta(days=10))
    run_match(settings, wid)
    now = dt.datetime.now(dt.UTC)
    soon = run_retention(settings, now + dt.timedelta(days=1))
    assert soon["watchlists_expired"] == [] and soon["result_sets_deleted"] == []
    later = run_retention(settings, now + dt.timedelta(days=11))
    assert later["watchlists_expired"] == [wid] and later["result_sets_deleted"] == []
    assert Gallery(settings.storage).count("probes") == 0
    with pytest.raises(Refused, match="expired"):
        run_match(settings, wid)
    gone = run_retention(settings, now + dt.timedelta(days=31))
    assert len(gone["result_sets_deleted"]) == 1 and list_runs(settings.store) == []
    assert not any((settings.local_home / "results").rglob("*.parquet"))
    retention = [r for r in AuditLog.of(settings).records() if r["action"] == "retention"]
    assert [r["status"] for r in retention if r["phase"] == "outcome"] == ["ok"] * 3


def test_audit_retention_cannot_go_below_183_days(tmp_path: Path) -> None:
    from pydantic import ValidationError

    with pytest.raises(ValidationError):
        make_settings(tmp_path, audit_retention_days=182)
    assert make_settings(tmp_path, audit_retention_days=183).audit_retention_days == 183


@hsettings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(minors=st.lists(st.booleans(), min_size=12, max_size=12), purpose=st.sampled_from(PURPOSES))
def test_minors_only_for_child_protection(
    tmp_path_factory: pytest.TempPathFactory, minors: list[bool], purpose: str
) -> None:
    tmp = tmp_path_factory.mktemp("minors")
    settings, vecs = small_gallery(tmp, minors)
    run = run_match(settings, submit_probes(settings, tmp, vecs[:3], purpose=purpose, top_k=12))
    ids = set(results(settings.home).collect()["gallery_id"].to_list())
    from pipelines.embed import embedding_id

    minor_ids = {embedding_id(f"archive|r{i}", "model-a") for i, m in enumerate(minors) if m}
    if purpose in CHILD_PROTECTION_PURPOSES:
        assert run["candidates"] == 3 * 12
    else:
        assert not ids & minor_ids and run["candidates"] == 3 * (12 - sum(minors))


def test_transparency_report(tmp_path: Path) -> None:
    settings, vecs = small_gallery(tmp_path)
    a = submit_probes(settings, tmp_path, vecs[:2], purpose="fraud-investigation", requested_by="unit-1", top_k=2)
    b = submit_probes(settings, tmp_path, vecs[:1], purpose="missing-person", requested_by="unit-2", top_k=2)
    run = run_match(settings, a)
    run_match(settings, b)
    review_candidate(settings, run["run_id"], "p0", 1, "no_candidate", "reviewer-a")
    report = transparency_report(settings, dt.date.today() - dt.timedelta(days=1))
    assert report["watchlists_by_purpose"] == {"fraud-investigation": 1, "missing-person": 1}
    assert report["runs"] == 2 and report["candidates"] == 2 * 2 + 1 * 2
    assert report["review_outcomes"] == {"no_candidate": 1}
    assert report["per_requesting_unit"]["unit-1"] == {"watchlists": 1, "runs": 1, "candidates": 4}
    assert report["audit_chain"]["ok"]
    assert transparency_report(settings, dt.date.today() + dt.timedelta(days=1))["runs"] == 0

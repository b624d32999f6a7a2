"""The nightly delta re-match: exact against an independent oracle over randomised nights, every fall-back,
idempotent reruns, kills half-way, minors, expiry, concurrency, the CLI and the Polars API."""

from __future__ import annotations

import datetime as dt
import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import make_settings, register
from helpers import child_env, finish_all
from hypothesis import HealthCheck, given
from hypothesis import settings as hsettings
from hypothesis import strategies as st

from jobs.audit_job import verify_home
from jobs.erase import erase
from jobs.import_embeddings import run_import
from jobs.match import run_match
from jobs.nightly import run_nightly
from jobs.session import writer_session
from jobs.watchlist import Submission, amend, submit
from lance_tables.store import Gallery
from pipelines.audit import AuditLog
from pipelines.delta import FULL_REASONS, RunBasis, Tonight, full_reason
from pipelines.embed import embedding_id
from pipelines.results import list_runs, load_run
from pipelines.schemas import RESULT_SCHEMA
from pipelines.settings import Settings

DIM = 16
MODEL = "model-a"
CHILD = "missing-person"  # a child-protection purpose: may see rows flagged minor
OTHER = "fraud-investigation"
GALLERYMATCH = str(Path(sys.executable).parent / "gallerymatch")


def signs(n: int, seed: int) -> np.ndarray:
    """{-1, +1}^16 vectors: every cosine is an exact multiple of 1/16, so ties abound and scores are exact."""
    return np.random.default_rng(seed).choice([-1.0, 1.0], size=(n, DIM))


class World:
    """A home plus an independent model of what its gallery holds (the oracle's view)."""

    def __init__(self, root: Path, settings: Settings | None = None):
        self.root = root
        self.settings: Settings = settings or make_settings(root / "home", match_block_rows=5)
        register(self.settings)
        self.rows: dict[str, tuple[np.ndarray, bool, str]] = {}  # gallery id -> (vector, minor, subject)
        self.files = 0
        self.probes: dict[str, np.ndarray] = {}

    def gid(self, record: str) -> str:
        return embedding_id(f"archive|{record}", MODEL)

    def put(self, records: list[str], vectors: np.ndarray, minors: list[bool], subjects: list[str]) -> None:
        """Import (insert or replace by record id) through the public importer."""
        self.files += 1
        path = self.root / f"g{self.files:04d}.parquet"
        table = {
            "record_id": records,
            "embedding": [list(v) for v in vectors],
            "minor": minors,
            "subject_id": subjects,
        }
        pq.write_table(pa.table(table), path)
        run_import(self.settings, path, "archive", MODEL, "image", DIM)
        for r, v, m, s in zip(records, vectors, minors, subjects, strict=True):
            self.rows[self.gid(r)] = (v, m, s)

    def erase_subject(self, subject: str) -> None:
        erase(self.settings, "test erasure", "dpo-1", subject_id=subject)
        self.rows = {g: row for g, row in self.rows.items() if row[2] != subject}

    def watch(self, probes: np.ndarray, purpose: str = OTHER, top_k: int = 3, **kw: Any) -> str:
        self.files += 1
        path = self.root / f"p{self.files:04d}.parquet"
        ids = [f"p{i}" for i in range(len(probes))]
        pq.write_table(pa.table({"probe_id": ids, "embedding": [list(v) for v in probes]}), path)
        sub = Submission(
            path, "batch", f"CASE-{purpose[:5]}", purpose, "basis", "analyst-1", "image", MODEL, top_k, **kw
        )
        wid = str(submit(self.settings, sub)["watchlist_id"])
        self.probes[wid] = probes
        return wid

    def expected(self, wid: str, k: int, allow_minors: bool) -> dict[str, list[tuple[float, str]]]:
        """Brute force with integer dot products: (score desc, gallery id asc), top k."""
        ids = sorted(g for g, (_, minor, _) in self.rows.items() if allow_minors or not minor)
        out = {}
        for i, probe in enumerate(self.probes[wid]):
            pairs = [(int(probe.astype(int) @ self.rows[g][0].astype(int)), g) for g in ids]
            ranked = sorted(pairs, key=lambda p: (-p[0], p[1]))[:k]
            out[f"p{i}"] = [(float(np.float32(s / DIM)), g) for s, g in ranked]
        return out


def rows_of(settings: Settings, run_id: str) -> dict[str, list[tuple[float, str]]]:
    out: dict[str, list[tuple[float, str]]] = {}
    for r in sorted(load_run(settings.store, run_id).to_pylist(), key=lambda r: (r["probe_id"], r["rank"])):
        out.setdefault(r["probe_id"], []).append((float(r["score"]), r["gallery_id"]))
    return out


def latest(settings: Settings, wid: str) -> dict[str, Any]:
    return next(m for m in list_runs(settings.store) if m["watchlist_id"] == wid)


def runs_of(settings: Settings, wid: str) -> list[dict[str, Any]]:
    return [m for m in list_runs(settings.store) if m["watchlist_id"] == wid]


def by_watchlist(summary: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {r["watchlist_id"]: r for r in summary["runs"]}


# ---- exactness over randomised nights ------------------------------------------------------------------------

OPS = st.sampled_from(["append", "append", "replace", "amend_k_down", "amend_k_up", "threshold", "erase", "quiet"])


@given(nights=st.lists(st.tuples(OPS, st.integers(0, 10_000)), min_size=2, max_size=4))
@hsettings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_delta_equals_the_oracle_over_random_nights(nights: list[tuple[str, int]]) -> None:
    """Appends, replacements, erasures, K and threshold changes: after every night each watchlist's latest run
    is exactly the top K over the whole gallery, minors only for the child-protection purpose."""
    with tempfile.TemporaryDirectory() as tmp:
        world = World(Path(tmp))
        n = 0

        def add(count: int, seed: int, replace: bool = False) -> None:
            nonlocal n
            rng = np.random.default_rng(seed)
            if replace and world.rows:
                pool = sorted(world.rows)
                records = [f"r{int(i):04d}" for i in rng.choice(n, size=min(count, n), replace=False)]
                del pool
            else:
                records = [f"r{i:04d}" for i in range(n, n + count)]
                n += count
            world.put(
                records,
                signs(len(records), seed),
                [bool(x) for x in rng.random(len(records)) < 0.3],
                [f"subj{int(x)}" for x in rng.integers(0, 6, len(records))],
            )

        add(30, 1)
        watchlists = {
            world.watch(signs(3, 7), OTHER, top_k=3): OTHER,
            world.watch(signs(2, 8), CHILD, top_k=4): CHILD,
        }
        clock = dt.datetime.now(dt.UTC)
        first = run_nightly(world.settings, now=clock)
        assert {r["full_reason"] for r in first["runs"]} == {"first_run"}
        for op, seed in nights:
            wid = sorted(watchlists)[seed % 2]
            if op == "append":
                add(1 + seed % 9, seed)
            elif op == "replace":
                add(1 + seed % 4, seed, replace=True)
            elif op == "amend_k_down":
                amend(world.settings, wid, "analyst-1", top_k=max(1, latest(world.settings, wid)["top_k"] - 1))
            elif op == "amend_k_up":
                amend(world.settings, wid, "analyst-1", top_k=latest(world.settings, wid)["top_k"] + 2)
            elif op == "threshold":
                amend(world.settings, wid, "analyst-1", threshold=round((seed % 16) / 16 - 0.25, 4))
            elif op == "erase":
                world.erase_subject(f"subj{seed % 6}")
            clock += dt.timedelta(days=1)
            night = run_nightly(world.settings, now=clock)
            ran = by_watchlist(night)
            for w, purpose in watchlists.items():
                run = latest(world.settings, w)
                assert rows_of(world.settings, run["run_id"]) == world.expected(w, run["top_k"], purpose == CHILD), (
                    op,
                    run["mode"],
                    run["full_reason"],
                )
                if w in ran:
                    assert ran[w]["to_version"] == run["gallery_version"]
            if op in ("append",):  # a plain append is always extended, never re-scanned
                assert all(r["mode"] == "delta" for r in night["runs"]), night["runs"]


def test_a_delta_run_writes_what_a_full_run_writes(tmp_path: Path) -> None:
    """Candidate for candidate and score for score: only run metadata and new_since_parent differ."""
    world = World(tmp_path)
    world.put([f"r{i}" for i in range(40)], signs(40, 1), [False] * 40, ["s"] * 40)
    wid = world.watch(signs(5, 2), top_k=6)
    run_nightly(world.settings)
    world.put([f"n{i}" for i in range(15)], signs(15, 3), [False] * 15, ["s"] * 15)
    delta = by_watchlist(run_nightly(world.settings))[wid]
    assert delta["mode"] == "delta" and delta["from_version"] < delta["to_version"]
    full = run_match(world.settings, wid)
    assert full["gallery_version"] == delta["to_version"]
    keep = [
        c for c in RESULT_SCHEMA.names if c not in ("run_id", "matched_at", "new_since_parent", "first_seen_run_id")
    ]
    a = load_run(world.settings.store, delta["run_id"]).select(keep)
    b = load_run(world.settings.store, full["run_id"]).select(keep)
    assert a.num_rows == 30 and a.equals(b)


def test_ties_at_the_kth_place_across_the_merge(tmp_path: Path) -> None:
    """Rows added tonight that tie last night's k-th score take its place only when their id sorts first."""
    world = World(tmp_path)
    base = signs(1, 5)[0]
    world.put(["m", "q"], np.vstack([base, base]), [False, False], ["s", "s"])  # two equal scores
    world.put(["z0"], -base[None, :], [False], ["s"])
    wid = world.watch(base[None, :], top_k=2)
    run_nightly(world.settings)
    ids = sorted([world.gid("a-tie"), world.gid("zz-tie")])
    world.put(["a-tie", "zz-tie"], np.vstack([base, base]), [False, False], ["s", "s"])
    night = by_watchlist(run_nightly(world.settings))[wid]
    assert night["mode"] == "delta"
    got = rows_of(world.settings, night["run_id"])["p0"]
    assert got == world.expected(wid, 2, False)["p0"]
    assert (
        all(score == 1.0 for score, _ in got)
        and [g for _, g in got] == sorted([world.gid("m"), world.gid("q"), *ids])[:2]
    )


# ---- fall-backs ---------------------------------------------------------------------------------------------


def basis(**kw: Any) -> RunBasis:
    fields = dict(
        run_id="run-1",
        gallery_table="faces",
        gallery_version=5,
        top_k=10,
        threshold=0.5,
        method="exact",
        probes_digest="p",
        gallery_filter="f",
        gallery_weights=("w",),
        delta_basis="written_after_version",
        rewritten=False,
        gallery_rows=10,
        unstamped_rows=0,
    )
    return RunBasis(**(fields | kw))  # type: ignore[arg-type]


NOW = Tonight("faces", 7, 10, 0.5, "p", "f")


@pytest.mark.parametrize(
    ("parent", "tonight", "reason"),
    [
        (None, NOW, "first_run"),
        (basis(method="ivf_pq"), NOW, "parent_approximate"),
        (basis(delta_basis=None), NOW, "parent_untracked"),
        (basis(rewritten=True), NOW, "parent_rewritten"),
        (basis(gallery_version=9), NOW, "gallery_recreated"),
        (basis(gallery_table="image_embeddings"), NOW, "gallery_recreated"),
        (basis(top_k=5), NOW, "top_k_raised"),
        (basis(probes_digest="other"), NOW, "probes_changed"),
        (basis(gallery_filter="model_id IN ('m')"), NOW, "minors_rule_changed"),
        (basis(top_k=20), NOW, None),  # a lower K: truncated
        (basis(threshold=0.9), NOW, None),  # another threshold: re-flagged
        (basis(), NOW, None),
    ],
)
def test_full_reason_decides_from_the_manifest(parent: RunBasis | None, tonight: Tonight, reason: str | None) -> None:
    assert full_reason(parent, tonight) == reason
    assert reason is None or reason in FULL_REASONS


def test_every_fall_back_the_gallery_can_cause(tmp_path: Path) -> None:
    """Replaced and erased candidates, an unreadable parent, a raised K, other weights: each gives a full run
    that says why, and every full run is still exact."""
    world = World(tmp_path)
    world.put([f"r{i}" for i in range(20)], signs(20, 1), [False] * 20, [f"s{i}" for i in range(20)])
    wid = world.watch(signs(2, 2), top_k=3)
    run_nightly(world.settings)

    def night() -> dict[str, Any]:
        out = by_watchlist(run_nightly(world.settings))[wid]
        assert rows_of(world.settings, out["run_id"]) == world.expected(wid, out["top_k"], False)
        return out

    top = rows_of(world.settings, latest(world.settings, wid)["run_id"])["p0"][0][1]
    record = next(f"r{i}" for i in range(20) if world.gid(f"r{i}") == top)
    world.put([record], -world.rows[top][0][None, :], [False], ["s-new"])  # a candidate replaced
    assert night()["full_reason"] == "gallery_changed"

    other = rows_of(world.settings, latest(world.settings, wid)["run_id"])["p1"][0][1]
    world.erase_subject(world.rows[other][2])  # a candidate erased: the run is rewritten without it
    assert night()["full_reason"] == "parent_rewritten"

    world.put(["x1"], signs(1, 40), [False], ["sx"])
    parent = latest(world.settings, wid)
    part = Path(parent["path"]) / parent["parts"][0]["file"]
    part.unlink()  # the parent's rows are gone
    assert night()["full_reason"] == "parent_unreadable"

    amend(world.settings, wid, "analyst-1", top_k=5)
    assert night()["full_reason"] == "top_k_raised"

    listed = {g for pairs in rows_of(world.settings, latest(world.settings, wid)["run_id"]).values() for _, g in pairs}
    outside = sorted(set(world.rows) - listed)[0]  # not a candidate: only its weights make the merge unsafe
    with writer_session(world.settings, "test"):
        gallery = Gallery(world.settings.storage)
        table = gallery.read("image_embeddings", where=f"embedding_id = '{outside}'")
        column = table.column_names.index("weights_digest")
        gallery.upsert("image_embeddings", table.set_column(column, "weights_digest", pa.array(["sha256:other"])))
    assert night()["full_reason"] == "weights_changed"
    world.put(["x2"], signs(1, 41), [False], ["sy"])
    assert night()["mode"] == "delta"  # tracked again from the full run


# ---- idempotence, kills, concurrency ------------------------------------------------------------------------


def test_a_rerun_with_nothing_new_writes_nothing(tmp_path: Path) -> None:
    world = World(tmp_path)
    world.put([f"r{i}" for i in range(10)], signs(10, 1), [False] * 10, ["s"] * 10)
    wid = world.watch(signs(2, 2))
    run_nightly(world.settings)
    again = run_nightly(world.settings)
    assert again["runs"] == [] and [s["watchlist_id"] for s in again["skipped"]] == [wid]
    assert again["skipped"][0]["reason"] == "up_to_date"
    assert len(runs_of(world.settings, wid)) == 1
    amend(world.settings, wid, "analyst-1", threshold=0.9)  # a threshold change re-flags, without a scan
    flagged = by_watchlist(run_nightly(world.settings))[wid]
    assert flagged["mode"] == "delta" and flagged["new_candidates"] == 0
    assert load_run(world.settings.store, flagged["run_id"]).column("above_threshold").to_pylist() == [
        s >= np.float32(0.9) for s in load_run(world.settings.store, flagged["run_id"]).column("score").to_pylist()
    ]


def env_of(settings: Settings, **extra: str) -> dict[str, str]:
    return child_env(
        GALLERYMATCH_HOME=str(settings.home), GALLERYMATCH_AUDIT_KEY_DIR=str(settings.audit_key_dir), **extra
    )


def _cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([GALLERYMATCH, *args], env=env, capture_output=True, text=True, timeout=300, check=False)


def test_killed_half_way_and_rerun_finishes_the_rest(tmp_path: Path) -> None:
    world = World(tmp_path)
    world.put([f"r{i}" for i in range(20)], signs(20, 1), [False] * 20, ["s"] * 20)
    wids = sorted([world.watch(signs(2, 2)), world.watch(signs(2, 3), CHILD)])
    run_nightly(world.settings)
    world.put([f"n{i}" for i in range(5)], signs(5, 4), [False] * 5, ["s"] * 5)
    env = env_of(world.settings, GALLERYMATCH_KILL_AT="nightly:after-run")
    killed = _cli(env, "nightly", "--json")
    assert killed.returncode == -9, killed.stderr
    assert [len(runs_of(world.settings, w)) for w in wids] == [2, 1]  # the first watchlist's run committed
    env.pop("GALLERYMATCH_KILL_AT")
    rerun = _cli(env, "nightly", "--json")
    assert rerun.returncode == 0, rerun.stderr
    out = json.loads(rerun.stdout)
    assert [r["watchlist_id"] for r in out["runs"]] == [wids[1]] and out["runs"][0]["mode"] == "delta"
    assert [s["watchlist_id"] for s in out["skipped"]] == [wids[0]]
    assert [len(runs_of(world.settings, w)) for w in wids] == [2, 2]
    for w, purpose in zip(wids, (OTHER, CHILD), strict=True):
        run = latest(world.settings, w)
        assert rows_of(world.settings, run["run_id"]) == world.expected(w, 3, purpose == CHILD)
    assert verify_home(world.settings)["ok"]


def test_two_nightlies_at_once_write_each_run_once(tmp_path: Path) -> None:
    world = World(tmp_path)
    world.put([f"r{i}" for i in range(20)], signs(20, 1), [False] * 20, ["s"] * 20)
    wid = world.watch(signs(2, 2))
    env = env_of(world.settings)
    cmd = [GALLERYMATCH, "nightly", "--json"]
    procs = [subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in "ab"]
    outs = finish_all(procs, 300)
    assert all(p.returncode == 0 for p in procs), outs
    assert len(runs_of(world.settings, wid)) == 1


# ---- minors, expiry ------------------------------------------------------------------------------------------


def test_minors_never_appear_for_other_purposes_in_delta_runs(tmp_path: Path) -> None:
    world = World(tmp_path)
    world.put([f"r{i}" for i in range(10)], signs(10, 1), [False] * 10, ["s"] * 10)
    probe = signs(1, 9)
    other, child = world.watch(probe, OTHER, top_k=3), world.watch(probe, CHILD, top_k=3)
    run_nightly(world.settings)
    world.put(["kid0", "kid1"], np.vstack([probe, probe]), [True, True], ["k", "k"])  # perfect matches, minors
    summary = run_nightly(world.settings)
    night = by_watchlist(summary)
    assert night[child]["mode"] == "delta" and night[child]["new_candidates"] == 2
    kids = {world.gid("kid0"), world.gid("kid1")}
    assert kids <= {g for _, g in rows_of(world.settings, night[child]["run_id"])["p0"]}
    assert [s["watchlist_id"] for s in summary["skipped"]] == [other]  # nothing new it may see
    world.put(["adult"], probe, [False], ["a"])
    night = by_watchlist(run_nightly(world.settings))
    assert night[other]["mode"] == "delta" and night[other]["new_candidates"] == 1
    assert not kids & {g for _, g in rows_of(world.settings, night[other]["run_id"])["p0"]}
    assert rows_of(world.settings, night[other]["run_id"]) == world.expected(other, 3, False)


def test_expired_watchlists_stop(tmp_path: Path) -> None:
    world = World(tmp_path)
    world.put([f"r{i}" for i in range(10)], signs(10, 1), [False] * 10, ["s"] * 10)
    soon = world.watch(signs(1, 2), expires=(dt.datetime.now(dt.UTC) + dt.timedelta(days=2)).date())
    stays = world.watch(signs(1, 3))
    run_nightly(world.settings)
    world.put(["n0"], signs(1, 4), [False], ["s"])
    later = run_nightly(world.settings, now=dt.datetime.now(dt.UTC) + dt.timedelta(days=3))
    assert later["retention"]["watchlists_expired"] == [soon]
    assert [r["watchlist_id"] for r in later["runs"]] == [stays]
    assert len(runs_of(world.settings, soon)) == 1


# ---- what analysts and data teams see ------------------------------------------------------------------------


def test_new_candidates_are_marked_shown_and_queryable(tmp_path: Path) -> None:
    import polars as pl

    from jobs.api import latest_runs, new_since

    world = World(tmp_path)
    world.put([f"r{i}" for i in range(10)], signs(10, 1), [False] * 10, ["s"] * 10)
    probe = signs(1, 9)
    wid = world.watch(probe, top_k=3)
    first = by_watchlist(run_nightly(world.settings))[wid]
    world.put(["hit"], probe, [False], ["s"])
    env = env_of(world.settings)
    out = _cli(env, "nightly", "--json")
    assert out.returncode == 0, out.stderr
    summary = json.loads(out.stdout)
    assert set(summary) >= {"runs", "skipped", "retention"}
    run = summary["runs"][0]
    assert set(run) >= {
        "watchlist_id",
        "run_id",
        "path",
        "mode",
        "full_reason",
        "parent_run_id",
        "from_version",
        "to_version",
        "new_candidates",
    }
    assert run["parent_run_id"] == first["run_id"] and run["new_candidates"] == 1
    assert summary["cases"] == [
        {"case_id": "CASE-fraud", "runs": 1, "new_candidates": 1, "new_above_threshold": run["new_above_threshold"]}
    ]
    rows = load_run(world.settings.store, run["run_id"]).to_pylist()
    new = [r for r in rows if r["new_since_parent"]]
    assert [r["gallery_id"] for r in new] == [world.gid("hit")] and new[0]["first_seen_run_id"] == run["run_id"]
    assert {r["first_seen_run_id"] for r in rows if not r["new_since_parent"]} == {first["run_id"]}
    shown = _cli(env, "results", "show", run["run_id"], "--new", "--json", "--requested-by", "analyst-2")
    assert [c["gallery_id"] for c in json.loads(shown.stdout)["candidates_shown"]] == [world.gid("hit")]
    frame = latest_runs(world.settings.home).collect()
    assert set(frame["run_id"].to_list()) == {run["run_id"]}
    fresh = new_since(first["run_id"], world.settings.home).collect()
    assert fresh.select("gallery_id", "run_id").rows() == [(world.gid("hit"), run["run_id"])]
    assert fresh.filter(pl.col("new_since_parent")).height == 1
    records = [r for r in AuditLog.of(world.settings).records() if r["action"] == "match" and r["phase"] == "intent"]
    assert records[-1]["mode"] == "delta" and records[-1]["from_version"] == run["from_version"]


def test_the_nightly_on_an_s3_home(s3_settings: Settings, tmp_path: Path) -> None:
    """The same night on object storage: delta found through the stamps, merged exactly, a rerun writes nothing."""
    world = World(tmp_path, s3_settings)
    world.put([f"r{i}" for i in range(20)], signs(20, 1), [False] * 20, ["s"] * 20)
    wid = world.watch(signs(3, 2), top_k=4)
    assert by_watchlist(run_nightly(world.settings))[wid]["full_reason"] == "first_run"
    world.put([f"n{i}" for i in range(6)], signs(6, 3), [False] * 6, ["s"] * 6)
    night = by_watchlist(run_nightly(world.settings))[wid]
    assert night["mode"] == "delta" and night["path"].startswith("s3://")
    assert rows_of(world.settings, night["run_id"]) == world.expected(wid, 4, False)
    assert run_nightly(world.settings)["runs"] == []


def test_many_watchlists_are_stacked_in_bounded_groups(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With stacks of at most 3 probes, five watchlists need several products per block; still exact."""
    import jobs.nightly

    monkeypatch.setattr(jobs.nightly, "MAX_STACKED", 3)
    world = World(tmp_path)
    world.put([f"r{i}" for i in range(25)], signs(25, 1), [i % 4 == 0 for i in range(25)], ["s"] * 25)
    wids = {world.watch(signs(2, 10 + i), CHILD if i % 2 else OTHER, top_k=2 + i): i % 2 for i in range(5)}
    run_nightly(world.settings)
    world.put([f"n{i}" for i in range(9)], signs(9, 30), [i % 3 == 0 for i in range(9)], ["s"] * 9)
    night = by_watchlist(run_nightly(world.settings))
    for wid, child in wids.items():
        run = latest(world.settings, wid)
        assert rows_of(world.settings, run["run_id"]) == world.expected(wid, run["top_k"], bool(child))
        assert wid not in night or night[wid]["mode"] == "delta"


def test_the_latest_run_is_found_from_the_listing(tmp_path: Path) -> None:
    """Run ids carry their second; within one second matched_at decides; only those manifests are read."""
    from pipelines.results import latest_runs, write_result_set

    settings = make_settings(tmp_path / "home")
    empty = RESULT_SCHEMA.empty_table()
    for run_id, at in (
        ("run-20261201T010000-ffffffff", "2026-12-01T01:00:00.100000+00:00"),
        ("run-20261201T020000-bbbbbbbb", "2026-12-01T02:00:00.900000+00:00"),
        ("run-20261201T020000-aaaaaaaa", "2026-12-01T02:00:00.200000+00:00"),
    ):
        write_result_set(
            settings.store, "wl-a", run_id, empty, {"run_id": run_id, "watchlist_id": "wl-a", "matched_at": at}
        )
    write_result_set(
        settings.store,
        "wl-b",
        "legacy-id",
        empty,
        {"run_id": "legacy-id", "watchlist_id": "wl-b", "matched_at": "2026-01-01"},
    )
    found = latest_runs(settings.store)
    assert {w: m["run_id"] for w, m in found.items()} == {"wl-a": "run-20261201T020000-bbbbbbbb", "wl-b": "legacy-id"}
    assert set(latest_runs(settings.store, "wl-b")) == {"wl-b"}


def test_a_watchlist_whose_probes_were_all_erased_does_not_stop_the_night(tmp_path: Path) -> None:
    """Erasure removes a person's probe too; a watchlist left with none is matched as empty, the others go on."""
    world = World(tmp_path)
    world.put([f"r{i}" for i in range(10)], signs(10, 1), [False] * 10, ["s"] * 10)
    path = world.root / "victim-probes.parquet"
    pq.write_table(
        pa.table({"probe_id": ["v0"], "embedding": [list(signs(1, 5)[0])], "subject_id": ["victim-x"]}), path
    )
    sub = Submission(path, "batch", "CASE-v", OTHER, "basis", "analyst-1", "image", MODEL, 3)
    emptied = str(submit(world.settings, sub)["watchlist_id"])
    other = world.watch(signs(2, 6))
    run_nightly(world.settings)
    world.erase_subject("victim-x")
    run_nightly(world.settings)
    world.put(["n0", "n1"], signs(2, 7), [False, False], ["s", "s"])
    night = run_nightly(world.settings)
    assert by_watchlist(night)[other]["mode"] == "delta"
    assert [s["watchlist_id"] for s in night["skipped"]] == [emptied]
    assert rows_of(world.settings, latest(world.settings, other)["run_id"]) == world.expected(other, 3, False)


def test_rows_written_around_the_stamp_are_never_missed(tmp_path: Path) -> None:
    """A commit that lands between a write's stamp and its own commit (a writer that lost its lease) is caught
    by the committed version: the rows are re-stamped, and the next night sees them."""
    from lance_tables import store

    world = World(tmp_path)
    world.put([f"r{i}" for i in range(10)], signs(10, 1), [False] * 10, ["s"] * 10)
    probe = signs(1, 9)
    wid = world.watch(probe, top_k=2)
    run_nightly(world.settings)
    original = store._stamped
    sneaked: list[int] = []

    def stamp_then_interleave(rows: pa.Table, version: int | None = None) -> pa.Table:
        out = original(rows, version)
        if version is not None and not sneaked:
            sneaked.append(version)
            world.put(["other"], signs(1, 11), [False], ["s"])  # another commit, then a nightly, in between
            run_nightly(world.settings)
        return out

    store._stamped = stamp_then_interleave
    try:
        world.put(["hit"], probe, [False], ["s"])
    finally:
        store._stamped = original
    night = by_watchlist(run_nightly(world.settings))
    assert wid in night, "the exact copy of the probe was written after the last run: it must be matched"
    assert rows_of(world.settings, night[wid]["run_id"]) == world.expected(wid, 2, False)


def test_rows_written_without_a_stamp_force_a_full_run(tmp_path: Path) -> None:
    """A writer that bypasses Gallery.upsert (an old version, a repair script) leaves rows with no stamp."""
    world = World(tmp_path)
    world.put([f"r{i}" for i in range(10)], signs(10, 1), [False] * 10, ["s"] * 10)
    probe = signs(1, 9)
    wid = world.watch(probe, top_k=2)
    run_nightly(world.settings)
    gallery = Gallery(world.settings.storage)
    table = gallery.open("image_embeddings")
    assert table is not None
    row = gallery.read("image_embeddings", where=f"embedding_id = '{world.gid('r0')}'")
    bare = row.set_column(row.column_names.index("embedding_id"), "embedding_id", pa.array(["bare-row"]))
    vector = pa.FixedSizeListArray.from_arrays(pa.array(probe[0] / 4.0, pa.float32()), DIM)
    bare = bare.set_column(bare.column_names.index("vector"), bare.schema.field("vector"), vector)
    table.add(
        bare.set_column(
            bare.column_names.index("written_after_version"), "written_after_version", pa.nulls(1, pa.int64())
        )
    )
    world.rows["bare-row"] = (probe[0], False, "s")
    night = by_watchlist(run_nightly(world.settings))[wid]
    assert night["full_reason"] == "untracked_writes"
    assert rows_of(world.settings, night["run_id"]) == world.expected(wid, 2, False)


def test_amend_refuses_crafted_ids_and_closed_watchlists_and_is_audited(tmp_path: Path) -> None:
    from jobs.admin import close
    from pipelines.errors import Refused

    world = World(tmp_path)
    world.put([f"r{i}" for i in range(5)], signs(5, 1), [False] * 5, ["s"] * 5)
    wid = world.watch(signs(1, 2))
    for watchlist_id, requester in ((f"{wid}' OR '1'='1", "analyst-1"), (wid, "analyst\n1"), (wid, "")):
        with pytest.raises(Refused):
            amend(world.settings, watchlist_id, requester, top_k=4)
    with pytest.raises(Refused):
        amend(world.settings, wid, "analyst-1", top_k=0)
    amend(world.settings, wid, "analyst-1", top_k=4, threshold=0.75)
    records = [r for r in AuditLog.of(world.settings).records() if r["action"] == "watchlist.amend"]
    assert [r["phase"] for r in records] == ["intent", "outcome"]
    assert records[0]["before"]["top_k"] == 3 and records[0]["after"] == {"top_k": 4, "threshold": 0.75}
    close(world.settings, wid, "analyst-1")
    with pytest.raises(Refused):
        amend(world.settings, wid, "analyst-1", top_k=5)

"""Retention keeps its schedule through kills: expired watchlists lose their probe vectors for good, old result sets
go whole (manifest and parts), recent ones stay, and a closed watchlist's probes go at closing plus the grace."""

from __future__ import annotations

import datetime as dt
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from conftest import make_settings, register
from test_erasure_crash import REPO, clone_home, embeddings_file, env_for, stored

from jobs.admin import close
from jobs.erase_steps import scan_for
from jobs.import_embeddings import run_import
from jobs.match import run_match
from jobs.retention import run_retention
from jobs.watchlist import Submission, submit
from lance_tables.erasure import vector_patterns
from lance_tables.store import Gallery
from lance_tables.watchlists import get_watchlist
from pipelines.audit import AuditLog
from pipelines.results import list_runs, load_run, read_run, scan_results, write_result_set
from pipelines.settings import Settings
from pipelines.sql import sql_list

DIM = 32
RESULTS_DAYS = 30
GRACE_DAYS = 10
RETENTION = (
    "import sys, datetime as dt\n"
    "from jobs.retention import run_retention\n"
    "from pipelines.settings import Settings\n"
    "run_retention(Settings(), now=dt.datetime.fromisoformat(sys.argv[1]))\n"
)
POINTS = [
    "retention:after-expire",
    "retention:after-probe-delete",
    "retention:after-run-delete",
    "results:delete-between-manifest-and-parts",
]


@dataclass(frozen=True)
class Home:
    settings: Settings
    now: dt.datetime  # the fake clock retention runs at: past the short watchlist's expiry
    expiring: str  # watchlist that expires before `now`
    staying: str  # watchlist that stays open
    expiring_vectors: tuple[np.ndarray, ...]  # its probe vectors, exact stored bytes
    recent: dict[str, int]  # run id -> rows of the runs younger than the cutoff
    old: tuple[str, ...]  # run ids older than the cutoff


def retention_settings(home: Path | str, **overrides: object) -> Settings:
    return make_settings(home, results_retention_days=RESULTS_DAYS, closed_probe_grace_days=GRACE_DAYS, **overrides)


def probes_of(settings: Settings, watchlist_id: str) -> list[np.ndarray]:
    rows = Gallery(settings.storage).read(
        "probes", columns=["vector"], where=f"watchlist_id IN {sql_list([watchlist_id])}"
    )
    return [np.asarray(v, np.float32) for v in rows.column("vector").to_pylist()] if rows.num_columns else []


def new_watchlist(settings: Settings, root: Path, name: str, seed: int, expires: dt.date | None = None) -> str:
    vectors = np.random.default_rng(seed).standard_normal((2, DIM))  # not in the gallery: their bytes are theirs
    path = embeddings_file(root / f"{name}.parquet", ["p0", "p1"], list(vectors), [None, None], "probe_id")
    sub = Submission(
        path, name, "CASE-4", "fraud-investigation", "basis", "analyst-1", "image", "model-a", top_k=4, expires=expires
    )
    return str(submit(settings, sub)["watchlist_id"])


def gallery_home(root: Path, settings: Settings | None = None) -> Settings:
    settings = settings or retention_settings(root / "home")
    register(settings)
    vecs = np.random.default_rng(3).standard_normal((200, DIM))
    path = embeddings_file(root / "g.parquet", [f"r{i}" for i in range(200)], list(vecs), [None] * 200)
    run_import(settings, path, "archive", "model-a", "image", DIM)
    return settings


def build_home(root: Path, settings: Settings | None = None) -> Home:
    settings = gallery_home(root, settings)
    today = dt.datetime.now(dt.UTC)
    expiring = new_watchlist(settings, root, "short", 1, expires=(today + dt.timedelta(days=1)).date())
    staying = new_watchlist(settings, root, "long", 2)
    recent = [run_match(settings, w)["run_id"] for w in (expiring, staying)]
    manifest = next(m for m in list_runs(settings.store) if m["run_id"] == recent[1])
    table = read_run(settings.store, manifest)
    old = []
    for i, days in enumerate((400, 90)):  # two runs older than the cutoff, written as a match would have
        run_id = f"run-old-{i}"
        when = today - dt.timedelta(days=days)
        meta = {k: v for k, v in manifest.items() if k not in ("path", "parts", "rows", "notice", "manifest_key")}
        meta |= {"run_id": run_id, "matched_at": when.isoformat()}
        meta.pop("generation", None)
        rows = table.set_column(table.schema.get_field_index("run_id"), "run_id", [[run_id] * table.num_rows])
        write_result_set(settings.store, staying, run_id, rows, meta)
        old.append(run_id)
    vectors = probes_of(settings, expiring)
    assert len(vectors) == 2 and all(scan_for(settings.storage, vector_patterns([v])) for v in vectors)
    return Home(
        settings=settings,
        now=today + dt.timedelta(days=3),
        expiring=expiring,
        staying=staying,
        expiring_vectors=tuple(vectors),
        recent={r: load_run(settings.store, r).num_rows for r in recent},
        old=tuple(old),
    )


def assert_retained(home: Home) -> None:
    settings, gallery = home.settings, Gallery(home.settings.storage)
    assert get_watchlist(gallery, home.expiring)["status"] == "expired"
    assert get_watchlist(gallery, home.staying)["status"] == "open"
    assert probes_of(settings, home.expiring) == []
    assert len(probes_of(settings, home.staying)) == 2
    assert scan_for(settings.storage, vector_patterns(list(home.expiring_vectors))) == []  # physically gone
    assert len(gallery.ensure("probes").list_versions()) == 1  # no old version keeps them
    runs = {m["run_id"] for m in list_runs(settings.store)}
    assert runs == set(home.recent)
    for run_id, rows in home.recent.items():
        assert load_run(settings.store, run_id).num_rows == rows  # recent result sets intact
    for run_id in home.old:  # old result sets gone entirely: no manifest, no part (no old version of either)
        assert not [k for k in stored(settings, "manifests") if f"/{run_id}." in k]
        assert not [k for k in stored(settings, "results") if f"/run_id={run_id}/" in k]
        if not settings.storage.is_s3:  # and no empty folder
            assert not list((settings.local_home / "results").rglob(f"run_id={run_id}"))
    assert scan_results(settings.storage).collect().height == sum(home.recent.values())
    report = AuditLog.of(settings).verify()
    assert report["ok"] and report["incomplete_actions"] == [], report
    assert settings.store.read("locks/writer.json") is None


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> Home:
    return build_home(tmp_path_factory.mktemp("retention"))


def copy(home: Home, root: Path) -> Home:
    settings = clone_home(home.settings, root)
    return Home(**{**home.__dict__, "settings": retention_settings(settings.home)})


def test_retention_in_one_go(template: Home, tmp_path: Path) -> None:
    home = copy(template, tmp_path)
    summary = run_retention(home.settings, now=home.now)
    assert summary["watchlists_expired"] == [home.expiring]
    assert summary["probe_vectors_erased_for"] == [home.expiring]
    assert sorted(summary["result_sets_deleted"]) == sorted(home.old)
    assert_retained(home)
    again = run_retention(home.settings, now=home.now)  # idempotent
    assert again["watchlists_expired"] == again["probe_vectors_erased_for"] == again["result_sets_deleted"] == []
    assert_retained(home)


def test_retention_on_a_versioned_s3_home(s3_env: dict[str, str], tmp_path: Path) -> None:
    """On S3 with bucket versioning, what retention deletes stays in noncurrent versions: under `refuse` they stay
    and the summary says so (negative control: the scan finds the expired probe vectors, only in old versions);
    under `purge-versions` the next run removes them and the home meets every retention invariant."""
    from s3 import make_bucket

    uri = f"s3://{make_bucket(s3_env, versioned=True)}/home"
    keys = tmp_path / "audit-keys"
    home = build_home(tmp_path, retention_settings(uri, audit_key_dir=keys, erase_versioned_bucket="refuse"))
    summary = run_retention(home.settings, now=home.now)
    assert summary["watchlists_expired"] == summary["probe_vectors_erased_for"] == [home.expiring]
    assert sorted(summary["result_sets_deleted"]) == sorted(home.old)
    kept = summary["object_versions"]
    assert kept["versioning"] == "Enabled" and kept["policy"] == "refuse" and kept["noncurrent_removed"] == 0
    assert "lifecycle" in kept["note"]
    hits = scan_for(home.settings.storage, vector_patterns(list(home.expiring_vectors)))
    assert hits and all("?versionId=" in h and h.startswith("lance/probes.lance/") for h in hits), hits
    assert [k for k in stored(home.settings, "results") if "?versionId=" in k]  # the old result sets' parts too

    purging = Home(**{**home.__dict__, "settings": retention_settings(uri, audit_key_dir=keys)})
    summary = run_retention(purging.settings, now=home.now)
    assert summary["result_sets_deleted"] == summary["probe_vectors_erased_for"] == []
    removed = summary["object_versions"]
    assert removed["policy"] == "purge-versions" and removed["noncurrent_removed"] >= len(hits)
    assert removed["areas"] == ["lance/probes.lance/", "results/", "manifests/"]
    assert_retained(purging)


@pytest.mark.parametrize("point", POINTS)
def test_a_killed_retention_is_finished_by_the_next_run(template: Home, tmp_path: Path, point: str) -> None:
    home = copy(template, tmp_path)
    extra = {
        "GALLERYMATCH_KILL_AT": point,
        "GALLERYMATCH_RESULTS_RETENTION_DAYS": str(RESULTS_DAYS),
        "GALLERYMATCH_CLOSED_PROBE_GRACE_DAYS": str(GRACE_DAYS),
    }
    done = subprocess.run(
        [sys.executable, "-c", RETENTION, home.now.isoformat()],
        cwd=REPO,
        env=env_for(home.settings, **extra),
        capture_output=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == -signal.SIGKILL, done.stderr.decode()[-3000:]
    run_retention(home.settings, now=home.now)
    assert_retained(home)
    later = run_retention(home.settings, now=home.now + dt.timedelta(days=1))  # never FileNotFoundError
    assert later["result_sets_deleted"] == [] and later["probe_vectors_erased_for"] == []
    assert_retained(home)


def close_on(settings: Settings, watchlist_id: str, when: dt.datetime, monkeypatch: pytest.MonkeyPatch) -> dt.datetime:
    """Close a watchlist as if on `when` (the closing command reads the clock itself)."""
    import types

    import lance_tables.watchlists

    class Clock(dt.datetime):
        @classmethod
        def now(cls, tz: dt.tzinfo | None = None) -> Clock:
            return cls.fromtimestamp(when.timestamp(), tz)

    with monkeypatch.context() as patch:
        patch.setattr(lance_tables.watchlists, "dt", types.SimpleNamespace(datetime=Clock, UTC=dt.UTC))
        closed = close(settings, watchlist_id, "analyst-2")["closed_at"]
    assert closed == when
    return when


def test_closed_probes_go_at_closing_plus_grace_or_at_expiry(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The grace runs from the closing, not the creation; expiry ends it early."""
    settings = gallery_home(tmp_path)
    created = dt.datetime.now(dt.UTC)
    long = new_watchlist(settings, tmp_path, "long", 5)  # expires in 90 days: the grace comes first
    short = new_watchlist(settings, tmp_path, "short", 6, expires=(created + dt.timedelta(days=2)).date())
    vectors = {w: probes_of(settings, w) for w in (long, short)}
    closed_long = close_on(settings, long, created + dt.timedelta(days=5), monkeypatch)
    close_on(settings, short, created + dt.timedelta(hours=1), monkeypatch)

    def present(watchlist_id: str) -> bool:
        found = [bool(scan_for(settings.storage, vector_patterns([v]))) for v in vectors[watchlist_id]]
        rows = len(probes_of(settings, watchlist_id))
        assert all(found) == (rows == 2) and any(found) == (rows > 0), (found, rows)  # table and bytes agree
        return rows == 2

    run_retention(settings, now=created + dt.timedelta(days=1))
    assert present(long) and present(short)  # closed, within the grace and before expiry: kept
    run_retention(settings, now=created + dt.timedelta(days=3))
    assert present(long) and not present(short)  # the short one's expiry came before its grace ended
    run_retention(settings, now=created + dt.timedelta(days=GRACE_DAYS + 1))
    assert present(long)  # past creation + grace, but not past closing + grace
    run_retention(settings, now=closed_long + dt.timedelta(days=GRACE_DAYS) - dt.timedelta(minutes=1))
    assert present(long)
    summary = run_retention(settings, now=closed_long + dt.timedelta(days=GRACE_DAYS))
    assert summary["probe_vectors_erased_for"] == [long] and not present(long)
    gallery = Gallery(settings.storage)
    assert {get_watchlist(gallery, w)["status"] for w in (long, short)} == {"closed"}  # not rewritten as expired
    assert run_retention(settings, now=closed_long + dt.timedelta(days=40))["probe_vectors_erased_for"] == []
    report = AuditLog.of(settings).verify()
    assert report["ok"] and report["incomplete_actions"] == []

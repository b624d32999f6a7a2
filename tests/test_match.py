"""Watchlists and exact matching: brute-force reference, ties, blocks, engines, atomic result sets."""

from __future__ import annotations

import datetime as dt
import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import make_settings, register
from helpers import child_env

from jobs.import_embeddings import run_import
from jobs.match import run_match
from jobs.retention import run_retention
from jobs.watchlist import Submission, submit
from lance_tables.store import Gallery
from lance_tables.watchlists import close_watchlist
from pipelines.audit import AuditLog
from pipelines.embed import embedding_id
from pipelines.errors import Refused
from pipelines.results import NOTICE, list_runs, load_run, scan_results
from pipelines.schemas import RESULT_SCHEMA
from pipelines.settings import Settings

DIM = 16


def sign_vectors(n: int, seed: int) -> np.ndarray:
    """Vectors in {-1, +1}^16: after normalisation every dot product is an exact multiple of 1/16 (many ties)."""
    return np.random.default_rng(seed).choice([-1.0, 1.0], size=(n, DIM))


def write_embeddings(
    path: Path, ids: list[str], vectors: np.ndarray, id_column: str = "record_id", minors: list[bool] | None = None
) -> Path:
    columns = {id_column: ids, "embedding": [list(v) for v in vectors]}
    if id_column == "record_id":  # gallery files declare minors (undeclared ones are refused: fail closed)
        columns["minor"] = minors if minors is not None else [False] * len(ids)
    pq.write_table(pa.table(columns), path)
    return path


def brute_force(probes: np.ndarray, gallery: np.ndarray, gids: list[str], k: int) -> list[list[tuple[int, str]]]:
    scores = probes.astype(int) @ gallery.astype(int).T  # exact integers, same order as the cosine
    return [sorted(zip(row.tolist(), gids, strict=True), key=lambda p: (-p[0], p[1]))[:k] for row in scores]


@pytest.fixture
def gallery(tmp_path: Path) -> tuple[Settings, dict[str, np.ndarray], dict[str, list[str]]]:
    """Two models side by side in one table, imported as several files (several Lance fragments)."""
    settings = make_settings(tmp_path / "home", match_block_rows=7)
    register(settings)
    vectors, ids = {}, {}
    for model, seed in (("model-a", 1), ("model-b", 2)):
        vecs = sign_vectors(60, seed)
        vecs[10] = vecs[3]  # exact duplicates: ties on every probe
        vecs[11] = vecs[3]
        records = [f"{model}-r{i:03d}" for i in range(60)]
        for part, (start, stop) in enumerate(((0, 25), (25, 41), (41, 60))):
            path = write_embeddings(tmp_path / f"{model}-{part}.parquet", records[start:stop], vecs[start:stop])
            run_import(settings, path, "archive", model, "image", DIM)
        vectors[model] = vecs
        ids[model] = [embedding_id(f"archive|{r}", model) for r in records]
    return settings, vectors, ids


def watch(settings: Settings, tmp_path: Path, probes: np.ndarray, model: str = "model-a", **kw: object) -> str:
    path = write_embeddings(
        tmp_path / f"probes-{model}.parquet", [f"p{i}" for i in range(len(probes))], probes, id_column="probe_id"
    )
    sub = Submission(
        path,
        "batch",
        "CASE-7",
        kw.pop("purpose", "fraud-investigation"),
        "basis",  # type: ignore[arg-type]
        "analyst-1",
        "image",
        model,
        **kw,
    )  # type: ignore[arg-type]
    return str(submit(settings, sub)["watchlist_id"])


def result_pairs(settings: Settings, run: dict[str, Any]) -> dict[str, list[tuple[float, str]]]:
    table = load_run(settings.store, run["run_id"]).to_pylist()
    out: dict[str, list[tuple[float, str]]] = {}
    for row in sorted(table, key=lambda r: (r["probe_id"], r["rank"])):
        out.setdefault(row["probe_id"], []).append((row["score"], row["gallery_id"]))
    return out


@pytest.mark.parametrize("k", [1, 5, 12, 200])
def test_exact_top_k_equals_brute_force(gallery, tmp_path: Path, k: int) -> None:  # type: ignore[no-untyped-def]
    settings, vectors, ids = gallery
    probes = np.vstack([sign_vectors(5, 9), vectors["model-a"][3:4], -vectors["model-a"][3:4]])
    run = run_match(settings, watch(settings, tmp_path, probes, top_k=k))
    got = result_pairs(settings, run)
    expected = brute_force(probes, vectors["model-a"], ids["model-a"], k)
    assert len(got) == len(probes)
    for i, exp in enumerate(expected):
        pairs = got[f"p{i}"]
        assert len(pairs) == min(k, 60)  # K larger than the gallery gives the whole gallery
        assert [g for _, g in pairs] == [g for _, g in exp]
        assert np.allclose([s for s, _ in pairs], [s / DIM for s, _ in exp], atol=1e-6)
    assert {g for pairs in got.values() for _, g in pairs} <= set(ids["model-a"])


def test_result_rows_name_the_importers_record(gallery, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    settings, vectors, ids = gallery
    run = run_match(settings, watch(settings, tmp_path, vectors["model-a"][3:4], top_k=60))
    rows = load_run(settings.store, run["run_id"]).to_pylist()
    by_id = dict(zip(ids["model-a"], [f"model-a-r{i:03d}" for i in range(60)], strict=True))
    assert {r["record_id"] for r in rows} == set(by_id.values())  # a data team can join back to its records
    assert all(r["record_id"] == by_id[r["gallery_id"]] and r["image_id"] is None for r in rows)


def test_models_are_never_mixed(gallery, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    settings, vectors, ids = gallery
    run = run_match(settings, watch(settings, tmp_path, vectors["model-b"][:3], model="model-b", top_k=60))
    table = load_run(settings.store, run["run_id"])
    assert set(table.column("gallery_id").to_pylist()) == set(ids["model-b"])
    assert set(table.column("model_id").to_pylist()) == {"model-b"}


def test_threshold_edges(gallery, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    settings, vectors, _ = gallery
    probe = vectors["model-a"][3:4]
    run = run_match(settings, watch(settings, tmp_path, probe, top_k=60, threshold=0.5))
    table = load_run(settings.store, run["run_id"]).to_pylist()
    assert any(r["score"] == 0.5 for r in table)  # a score exactly on the threshold...
    for row in table:
        assert row["above_threshold"] == (row["score"] >= 0.5)  # ...is flagged (at or above)
    assert run["above_threshold"] == sum(r["above_threshold"] for r in table)


def test_local_and_ray_give_identical_result_sets(gallery, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    settings, vectors, _ = gallery
    wid = watch(settings, tmp_path, np.vstack([sign_vectors(4, 5), vectors["model-a"][:2]]), top_k=9)
    local = load_run(settings.store, run_match(settings, wid, "local")["run_id"])
    ray = load_run(settings.store, run_match(settings, wid, "ray")["run_id"])
    again = load_run(settings.store, run_match(settings, wid, "local")["run_id"])
    run_only = ("run_id", "matched_at", "new_since_parent", "first_seen_run_id")
    stable = [c for c in RESULT_SCHEMA.names if c not in run_only]
    assert local.select(stable).equals(ray.select(stable))
    assert local.select(stable).equals(again.select(stable))  # a rerun gives identical rows
    assert all(local.column("new_since_parent").to_pylist())  # the first run: everything is new
    assert not any(ray.column("new_since_parent").to_pylist())  # the same candidates again: nothing is new
    assert set(again.column("first_seen_run_id").to_pylist()) == set(local.column("run_id").to_pylist())


def test_result_set_contract(gallery, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    import duckdb
    import polars as pl

    settings, vectors, _ = gallery
    run = run_match(settings, watch(settings, tmp_path, vectors["model-a"][:2], top_k=3))
    part = next(Path(run["path"]).glob("part-*.parquet"))
    meta = {k.decode(): v.decode() for k, v in pq.read_schema(part).metadata.items()}
    assert meta["notice"] == NOTICE == "Candidate list for human review; not an identification."
    assert meta["top_k"] == "3" and meta["model_id"] == "model-a"
    assert int(meta["gallery_version"]) == run["gallery_version"] and float(meta["threshold"]) == 0.5
    assert pq.read_schema(part).remove_metadata().equals(RESULT_SCHEMA)
    root = settings.local_home / "results"
    frame = pl.scan_parquet(root, hive_partitioning=True).collect()
    assert frame.height == 6 and set(frame["rank"].to_list()) == {1, 2, 3}
    assert scan_results(settings.storage).filter(pl.col("rank") == 1).collect().height == 2
    count = duckdb.sql(f"select count(*) from read_parquet('{root}/**/*.parquet', hive_partitioning=true)")
    assert count.fetchall() == [(6,)]
    assert [r["run_id"] for r in list_runs(settings.store)] == [run["run_id"]]


def test_no_candidates_is_a_valid_empty_result_set(tmp_path: Path) -> None:
    settings = make_settings(tmp_path / "home")
    register(settings)
    vecs = sign_vectors(5, 3)
    run_import(
        settings,
        write_embeddings(tmp_path / "g.parquet", [f"r{i}" for i in range(5)], vecs, minors=[True] * 5),
        "archive",
        "model-a",
        "image",
        DIM,
    )
    run = run_match(settings, watch(settings, tmp_path, vecs[:2], purpose="fraud-investigation"))
    assert run["candidates"] == 0
    table = load_run(settings.store, run["run_id"])
    assert table.num_rows == 0 and table.schema.remove_metadata().equals(RESULT_SCHEMA)
    child = run_match(settings, watch(settings, tmp_path, vecs[:2], purpose="child-safeguarding"))
    assert child["candidates"] == 2 * 5  # minors appear only for a child-protection purpose


def test_a_crash_before_the_manifest_leaves_no_run_and_is_swept(
    gallery,
    tmp_path: Path,  # type: ignore[no-untyped-def]
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import polars as pl

    settings, vectors, _ = gallery
    wid = watch(settings, tmp_path, vectors["model-a"][:2], top_k=3)
    real_create = type(settings.store).create

    def crash(store: object, key: str, data: bytes) -> bool:
        if key.startswith("manifests/"):
            raise OSError("killed between the parts and the manifest")
        return real_create(store, key, data)  # type: ignore[arg-type]

    monkeypatch.setattr(type(settings.store), "create", crash)
    with pytest.raises(OSError, match="killed"):
        run_match(settings, wid)
    monkeypatch.undo()
    assert any((settings.local_home / "results").rglob("part-*.parquet"))  # the parts were written...
    assert list_runs(settings.store) == []  # ...but no run exists for the API
    assert scan_results(settings.storage).collect().height == 0
    assert isinstance(scan_results(settings.storage), pl.LazyFrame)
    (intent,) = [r for r in AuditLog.of(settings).records() if r.get("phase") == "intent" and r["action"] == "match"]
    run = run_match(settings, wid)  # the next writer sweeps the orphans and closes the dead search's record
    assert [p.parent.name for p in (settings.local_home / "results").rglob("part-*.parquet")] == [
        f"run_id={run['run_id']}"
    ]
    outcomes = [r for r in AuditLog.of(settings).records() if r.get("intent_seq") == intent["seq"]]
    assert [o["status"] for o in outcomes] == ["failed"]


def test_a_match_killed_after_its_manifest_is_audited_as_done(
    gallery,
    tmp_path: Path,  # type: ignore[no-untyped-def]
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    settings, vectors, _ = gallery
    wid = watch(settings, tmp_path, vectors["model-a"][:2], top_k=3)
    real_close = AuditLog._close

    def die(self: AuditLog, actor: str, action: str, intent: dict[str, Any], fields: dict[str, Any]) -> Any:
        if action == "match":
            raise KeyboardInterrupt  # stands for SIGKILL: no outcome is written
        return real_close(self, actor, action, intent, fields)

    monkeypatch.setattr(AuditLog, "_close", die)
    with pytest.raises(KeyboardInterrupt):
        run_match(settings, wid)
    monkeypatch.undo()
    (run,) = list_runs(settings.store)  # the search was made and its run committed
    assert AuditLog.of(settings).verify()["incomplete_actions"][0]["run_id"] == run["run_id"]
    run_retention(settings)  # any later writer closes the record: the search is audited as done
    match_records = [r for r in AuditLog.of(settings).records() if r["action"] == "match"]
    assert [(r["phase"], r.get("status"), r.get("recovered")) for r in match_records] == [
        ("intent", None, None),
        ("outcome", "ok", True),
    ]
    assert AuditLog.of(settings).verify()["incomplete_actions"] == []
    assert load_run(settings.store, run["run_id"]).num_rows == run["rows"] == 6


def test_refusals_store_nothing(gallery, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    settings, vectors, _ = gallery
    path = write_embeddings(tmp_path / "p.parquet", ["p0"], vectors["model-a"][:1], id_column="probe_id")
    good = {
        "probes": path,
        "name": "n",
        "case_id": "CASE-1",
        "purpose": "criminal-investigation",
        "legal_basis": "basis",
        "requested_by": "analyst-1",
        "modality": "image",
        "model_id": "model-a",
    }
    too_late = dt.date.today() + dt.timedelta(days=settings.watchlist_max_days + 2)
    cases = [
        ({"case_id": ""}, "--case-id"),
        ({"purpose": "curiosity"}, "closed list"),
        ({"legal_basis": " "}, "--legal-basis"),
        ({"requested_by": ""}, "--requested-by"),
        ({"expires": too_late}, "beyond the maximum"),
        ({"expires": dt.date(2000, 1, 1)}, "in the past"),
        ({"model_id": "model-z"}, "no image embeddings of model 'model-z'"),
        ({"model_id": None}, "need --model-id"),
        ({"top_k": 0}, "--top-k"),
    ]
    for change, message in cases:
        with pytest.raises(Refused, match=message):
            submit(settings, Submission(**(good | change)))  # type: ignore[arg-type]
    gallery_db = Gallery(settings.storage)
    assert gallery_db.count("watchlists") == 0 and gallery_db.count("probes") == 0
    bad = write_embeddings(
        tmp_path / "bad.parquet", ["p0", "p1"], np.array([[1.0] * DIM, [np.nan] * DIM]), id_column="probe_id"
    )
    with pytest.raises(Refused, match="NON_FINITE"):
        submit(settings, Submission(**(good | {"probes": bad})))  # type: ignore[arg-type]
    assert gallery_db.count("probes") == 0


def test_closed_and_expired_watchlists_are_not_matched(gallery, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    settings, vectors, _ = gallery
    wid = watch(settings, tmp_path, vectors["model-a"][:1])
    close_watchlist(Gallery(settings.storage), wid, "analyst-2")
    with pytest.raises(Refused, match="closed"):
        run_match(settings, wid)


def test_ivf_pq_reports_its_recall_against_exact(tmp_path: Path) -> None:
    settings = make_settings(tmp_path / "home")
    register(settings)
    rng = np.random.default_rng(4)
    gallery_vecs = rng.standard_normal((3000, 32))
    run_import(
        settings,
        write_embeddings(tmp_path / "g.parquet", [f"r{i}" for i in range(3000)], gallery_vecs),
        "archive",
        "model-a",
        "image",
        32,
    )
    probes = gallery_vecs[:30] + 0.05 * rng.standard_normal((30, 32))
    path = write_embeddings(tmp_path / "p.parquet", [f"p{i:02d}" for i in range(30)], probes, id_column="probe_id")
    wid = submit(
        settings,
        Submission(path, "b", "CASE-1", "fraud-investigation", "basis", "analyst-1", "image", "model-a", top_k=5),
    )["watchlist_id"]
    approx = run_match(settings, wid, method="ivf_pq", nprobes=10, refine=5)
    exact = run_match(settings, wid)
    assert approx["method"] == "ivf_pq" and approx["recall_sample_probes"] == 20
    a, e = result_pairs(settings, approx), result_pairs(settings, exact)
    sample = sorted(e)[:20]
    hits = sum(len({g for _, g in a[p]} & {g for _, g in e[p]}) for p in sample)
    assert approx["recall_at_k_sample"] == pytest.approx(hits / (20 * 5), abs=1e-4)
    assert approx["recall_at_k_sample"] > 0.5
    assert sum(a[p][0][1] == e[p][0][1] for p in e) >= 25  # near-duplicates are found first
    assert exact["gallery_version"] == approx["gallery_version"]  # the index commit came before both pins


def test_ivf_pq_refused_on_a_tiny_gallery(gallery, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    settings, vectors, _ = gallery
    with pytest.raises(Refused, match="too few for an IVF_PQ index"):
        run_match(settings, watch(settings, tmp_path, vectors["model-a"][:1]), method="ivf_pq")


def test_an_export_into_the_home_is_refused(gallery, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from jobs.admin import export_run

    settings, vectors, _ = gallery
    run = run_match(settings, watch(settings, tmp_path, vectors["model-a"][:2], top_k=3))
    before = len(AuditLog.of(settings).records())
    for target in ((settings.local_home / "results"), settings.home, settings.local_home / "exports"):
        with pytest.raises(Refused, match="inside GALLERYMATCH_HOME"):
            export_run(settings, run["run_id"], target, "unit-1")
    assert len(list((settings.local_home / "results").rglob("*.parquet"))) == 1  # nothing doubled what the API reads
    assert len(AuditLog.of(settings).records()) == before
    done = export_run(settings, run["run_id"], tmp_path / "out", "unit-1")
    assert done["rows"] == 6 and len(list((tmp_path / "out").rglob("part-*.parquet"))) == 1


def test_result_sets_written_before_generations_still_read(gallery, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """Runs of older homes (`part-00000.parquet`, manifest `<run>.json`) list, load and survive the sweep."""
    import json

    from pipelines.results import sweep

    settings, vectors, _ = gallery
    run = run_match(settings, watch(settings, tmp_path, vectors["model-a"][:2], top_k=3))
    (part,) = (settings.local_home / "results").rglob("part-*.parquet")
    part.rename(part.with_name("part-00000.parquet"))
    (manifest,) = (settings.local_home / "manifests").rglob("*.json")
    body = json.loads(manifest.read_text())
    body["parts"][0]["file"] = "part-00000.parquet"
    body.pop("generation")
    manifest.with_name(f"{run['run_id']}.json").write_text(json.dumps(body))
    manifest.unlink()
    assert sweep(settings.store) == []
    assert load_run(settings.store, run["run_id"]).num_rows == 6


def gm(settings: Settings, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    """The `gallerymatch` command in a child process, on this home (local or s3://, the AWS_* variables inherited)."""
    home = {"GALLERYMATCH_HOME": settings.home_uri, "GALLERYMATCH_AUDIT_KEY_DIR": str(settings.audit_key_dir)}
    script = Path(sys.executable).parent / "gallerymatch"
    return subprocess.run(
        [str(script), *args], capture_output=True, text=True, env=child_env(**home, **env), timeout=600, check=False
    )


def test_a_match_killed_between_its_parts_and_its_manifest(any_settings: Settings, tmp_path: Path) -> None:
    """SIGKILL after the parts are stored, before the manifest: no run anywhere a reader looks (the CLI, the
    Polars API), and the next writer command removes the orphan parts from the home (the bucket, on S3)."""
    import polars as pl

    from jobs.api import results

    settings = any_settings
    register(settings)
    vecs = sign_vectors(30, 1)
    run_import(
        settings,
        write_embeddings(tmp_path / "g.parquet", [f"r{i}" for i in range(30)], vecs),
        "archive",
        "model-a",
        "image",
        DIM,
    )
    wid = watch(settings, tmp_path, vecs[:2], top_k=3)
    killed = gm(settings, "match", wid, "--json", GALLERYMATCH_KILL_AT="results:before-manifest")
    assert killed.returncode == -signal.SIGKILL and killed.stdout == "", killed.stderr[-2000:]
    orphans = [k for k in settings.store.list("results/") if k.endswith(".parquet")]
    assert len(orphans) == 1 and settings.store.list("manifests/") == []  # the part is there, no manifest
    if settings.storage.is_s3:  # seen in the bucket itself, not only through the store
        from s3 import client

        bucket, _, prefix = settings.home_uri.removeprefix("s3://").partition("/")
        listed = client(dict(os.environ)).list_objects_v2(Bucket=bucket, Prefix=f"{prefix}/results/")
        assert [o["Key"] for o in listed["Contents"]] == [f"{prefix}/{orphans[0]}"]
    listed_runs = gm(settings, "results", "list", "--json")
    assert listed_runs.returncode == 0 and json.loads(listed_runs.stdout) == {"runs": []}, listed_runs.stderr
    frame = results(settings.home_uri)
    assert isinstance(frame, pl.LazyFrame) and frame.collect().height == 0
    (intent,) = [r for r in AuditLog.of(settings).records() if r["action"] == "match"]  # the search's intent only
    run = run_match(settings, wid)  # the next writer: sweeps the orphan, closes the dead search's record
    parts = [k for k in settings.store.list("results/") if k.endswith(".parquet")]
    assert parts and all(f"/run_id={run['run_id']}/" in k for k in parts) and orphans[0] not in parts
    assert results(settings.home_uri).collect().height == 2 * 3
    outcomes = [r for r in AuditLog.of(settings).records() if r.get("intent_seq") == intent["seq"]]
    assert [(o["status"], o.get("recovered")) for o in outcomes] == [("interrupted", True)]
    assert AuditLog.of(settings).verify()["incomplete_actions"] == []

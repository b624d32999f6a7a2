"""The command line: help everywhere, one JSON object with --json, refusals on stderr with non-zero exits."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from jobs.cli import app

ROOT = Path(__file__).parents[1]
COMMANDS = [
    [],
    ["sources"],
    ["sources", "add"],
    ["sources", "list"],
    ["pack"],
    ["ingest"],
    ["import-embeddings"],
    ["models"],
    ["models", "install"],
    ["status"],
    ["watchlist"],
    ["watchlist", "submit"],
    ["watchlist", "list"],
    ["watchlist", "show"],
    ["watchlist", "close"],
    ["watchlist", "amend"],
    ["nightly"],
    ["match"],
    ["results"],
    ["results", "list"],
    ["results", "show"],
    ["results", "export"],
    ["results", "sheet"],
    ["audit"],
    ["audit", "verify"],
    ["audit", "show"],
    ["audit", "checkpoint"],
    ["retention"],
    ["retention", "run"],
    ["review"],
    ["report"],
    ["erase"],
    ["evaluate"],
    ["calibrate"],
    ["serve"],
]


def gm(home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = os.environ | {
        "GALLERYMATCH_HOME": str(home),
        "GALLERYMATCH_MODEL_DOWNLOADS": "0",
        "GALLERYMATCH_AUDIT_KEY_DIR": str(home.parent / f"{home.name}-audit-keys"),
    }
    script = Path(sys.executable).parent / "gallerymatch"
    return subprocess.run(
        [str(script), *args], capture_output=True, text=True, env=env, cwd=ROOT, timeout=600, check=False
    )


def ingest_faces(home: Path, shards: Path | str, *extra: str) -> subprocess.CompletedProcess[str]:
    """`gallerymatch ingest` of the face modality, in-process engine, the labelled untrained model."""
    args = ["ingest", str(shards), "--engine", "local", "--modality", "face", "--face-model", "facenet-untrained"]
    return gm(home, *args, *extra)


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: " ".join(c) or "root")
def test_every_command_has_help(command: list[str]) -> None:
    from typer.testing import CliRunner

    result = CliRunner().invoke(app, [*command, "--help"])
    assert result.exit_code == 0, result.output
    assert "Usage" in result.output and len(result.output) > 100


def test_every_registered_command_is_covered() -> None:
    import typer.main

    def walk(command: object, prefix: tuple[str, ...]) -> set[tuple[str, ...]]:
        found = {prefix} if prefix else set()
        for name, sub in getattr(command, "commands", {}).items():
            found |= walk(sub, (*prefix, name))
        return found

    assert walk(typer.main.get_command(app), ()) == {tuple(c) for c in COMMANDS if c}


def test_cli_end_to_end(tmp_path: Path, sample_folder: Path) -> None:
    home = tmp_path / "home"
    refused = gm(home, "sources", "add", "scraped", "--channel", "social-media", "--legal-basis", "x", "--terms", "y")
    assert refused.returncode == 2 and "forbidden" in refused.stderr and refused.stdout == ""
    unregistered = gm(home, "pack", str(sample_folder), str(tmp_path / "shards"), "--source", "archive")
    assert unregistered.returncode == 2 and "sources add" in unregistered.stderr
    added = gm(
        home, "sources", "add", "archive", "--channel", "operator-owned", "--legal-basis", "b", "--terms", "t", "--json"
    )
    assert added.returncode == 0 and json.loads(added.stdout)["source_id"] == "archive"
    args = ["pack", str(sample_folder), str(tmp_path / "shards"), "--source", "archive", "--minor-default", "false"]
    packed = gm(home, *args, "--json")
    assert packed.returncode == 0 and json.loads(packed.stdout)["duplicates"] == 1
    ingested = ingest_faces(home, tmp_path / "shards", "--json")
    assert ingested.returncode == 0, ingested.stderr
    summary = json.loads(ingested.stdout)
    assert summary["faces"] == 12 and summary["quarantined"] == 7
    assert "UNTRAINED" in ingested.stderr  # loud about the model it used
    status = json.loads(gm(home, "status", "--json").stdout)
    assert {"images", "faces", "image_embeddings", "quarantined", "quarantine_reasons"} <= set(status)
    bad = gm(home, "ingest", str(tmp_path / "shards"), "--engine", "spark")
    assert bad.returncode != 0 and "local, ray" in bad.stderr


def test_core_is_engine_free() -> None:
    code = (
        "import sys, pipelines.decode, pipelines.faces, pipelines.clip, pipelines.prepare, pipelines.embed, "
        "pipelines.shards, pipelines.importer, pipelines.models, pipelines.settings, lance_tables.store, "
        "pipelines.engines.local, jobs.ingest, jobs.cli\n"
        "bad = [m for m in ('ray', 'modal') if m in sys.modules]\n"
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, timeout=300)


def test_modal_worker_runs_the_same_unit_of_work(tmp_path: Path, sample_shards: Path) -> None:
    """The Modal engine's worker, run in-process with `.local()` (no Modal account here), matches the local
    engine; the deployable wrapper in infra/ carries the engine's worker and adds the nightly retention."""
    import pickle

    from conftest import FACE, IMAGE, make_settings

    import infra.modal_app
    from jobs.ingest import plan
    from pipelines.engines.local import run_local
    from pipelines.engines.modal import IngestWorker, aws_environment
    from pipelines.shards import find_shards
    from pipelines.task import IngestTask

    settings = make_settings(tmp_path / "home")
    task = IngestTask.from_settings(settings, "face", FACE, IMAGE)
    items, _ = plan(task, find_shards(sample_shards)[:1], set())
    (local,) = list(run_local(task, items))
    remote = pickle.loads(IngestWorker().process.local(pickle.dumps(task), pickle.dumps(items[0])))
    assert remote.stats == local.stats
    for name, table in local.tables.items():
        other = remote.tables[name]
        assert other.num_rows == table.num_rows
        keys = [c for c in table.column_names if c not in ("vector", "ingested_at", "quarantined_at")]
        assert other.select(keys).equals(table.select(keys)), name
        if "vector" in table.column_names:
            assert np.allclose(other["vector"].to_pylist(), table["vector"].to_pylist(), atol=1e-4)
    import modal

    from pipelines.engines import modal as engine

    assert infra.modal_app.ingest_app is engine.app  # the wrapper deploys the engine's own app, not a copy
    assert isinstance(infra.modal_app.retention, modal.Function)
    env = {"AWS_ACCESS_KEY_ID": "a", "AWS_SECRET_ACCESS_KEY": "s", "HOME": "/root", "GALLERYMATCH_HOME": "s3://b/h"}
    assert aws_environment(env) == {"AWS_ACCESS_KEY_ID": "a", "AWS_SECRET_ACCESS_KEY": "s"}  # nothing else leaves


def test_watchlist_of_photos_end_to_end(tmp_path: Path) -> None:
    """Probe photos go through the gallery's own decode/detect/embed path; several faces give several probes."""
    import polars as pl

    from jobs.api import results
    from pipelines import samples

    home, gallery_dir, probe_dir = tmp_path / "home", tmp_path / "gallery", tmp_path / "probes"
    gallery_dir.mkdir()
    probe_dir.mkdir()
    (gallery_dir / "astronaut.jpg").write_bytes(samples.encode(samples.astronaut(), "JPEG", quality=92))
    (gallery_dir / "pair.jpg").write_bytes(samples.encode(samples.composite(2), "JPEG", quality=92))
    (probe_dir / "three.jpg").write_bytes(samples.encode(samples.composite(3), "JPEG", quality=90))
    (probe_dir / "coffee.jpg").write_bytes(samples.encode(samples.no_face_images()["coffee"], "JPEG"))
    assert (
        gm(
            home, "sources", "add", "archive", "--channel", "consented-enrollment", "--legal-basis", "b", "--terms", "t"
        ).returncode
        == 0
    )
    args = ["pack", str(gallery_dir), str(tmp_path / "shards"), "--source", "archive", "--minor-default", "false"]
    assert gm(home, *args).returncode == 0
    assert ingest_faces(home, tmp_path / "shards").returncode == 0
    submitted = gm(
        home,
        "watchlist",
        "submit",
        str(probe_dir),
        "--name",
        "batch 1",
        "--case-id",
        "CASE-9",
        "--purpose",
        "criminal-investigation",
        "--legal-basis",
        "warrant 123",
        "--requested-by",
        "unit-4",
        "--model-id",
        "facenet-untrained",
        "--top-k",
        "2",
        "--json",
    )
    assert submitted.returncode == 0, submitted.stderr
    wl = json.loads(submitted.stdout)
    assert wl["probes"] == 3
    inputs = {i["uri"]: i for i in wl["inputs"]}
    assert len(inputs["three.jpg"]["probes"]) == 3 and inputs["coffee.jpg"]["reason"] == "NO_FACE"
    human = gm(home, "watchlist", "list")
    assert wl["watchlist_id"] in human.stdout and "CASE-9" in human.stdout
    matched = gm(home, "match", wl["watchlist_id"], "--json")
    assert matched.returncode == 0, matched.stderr
    run = json.loads(matched.stdout)
    assert run["probes"] == 3 and run["candidates"] == 3 * 2 and run["gallery_version"] >= 1
    shown = json.loads(gm(home, "results", "show", run["run_id"], "--requested-by", "unit-4", "--json").stdout)
    assert shown["notice"] == "Candidate list for human review; not an identification."
    assert {c["rank"] for c in shown["candidates_shown"]} == {1, 2}
    listed = json.loads(gm(home, "results", "list", "--json").stdout)
    assert [r["run_id"] for r in listed["runs"]] == [run["run_id"]]
    frame = results(home).filter(pl.col("case_id") == "CASE-9").collect()
    assert frame.height == 6 and set(frame["watchlist_id"]) == {wl["watchlist_id"]}
    exported = gm(home, "results", "export", run["run_id"], "--to", str(tmp_path / "out"), "--requested-by", "unit-4")
    assert exported.returncode == 0 and len(list((tmp_path / "out").rglob("part-*.parquet"))) == 1
    closed = gm(home, "watchlist", "close", wl["watchlist_id"], "--closed-by", "unit-4")
    assert closed.returncode == 0 and "closed" in closed.stdout
    assert gm(home, "match", wl["watchlist_id"]).returncode == 2
    check_audit_trail(home)


def check_audit_trail(home: Path) -> None:
    """Every action wrote its intent then its outcome; the case filter, the report and tampering."""
    audit = json.loads(gm(home, "audit", "show", "--json").stdout)["records"]
    actions = ["sources.add", "pack", "ingest", "watchlist.submit", "match", "results.show", "results.export"]
    actions += ["watchlist.close"]
    assert [r["action"] for r in audit if r["phase"] == "outcome"] == actions
    assert [r["phase"] for r in audit] == ["intent", "outcome"] * len(actions)  # each intent, then its outcome
    assert all(r["status"] == "ok" for r in audit if r["phase"] == "outcome")
    by_case = json.loads(gm(home, "audit", "show", "--case-id", "CASE-9", "--json").stdout)["records"]
    assert [r["action"] for r in by_case if r["phase"] == "outcome"] == [
        "watchlist.submit",
        "match",
        "results.show",
        "results.export",
        "watchlist.close",
    ]
    report = json.loads(gm(home, "report", "--since", "2020-01-01", "--json").stdout)
    assert report["runs"] == 1 and report["watchlists_by_purpose"] == {"criminal-investigation": 1}
    assert report["audit_chain"]["ok"] and report["audit_checkpoint"]["count"] == len(audit)
    record = next((home / "audit" / "records").rglob("000000000009.json"))  # the match's intent
    record.write_bytes(record.read_bytes().replace(b'"match"', b'"matcH"'))
    broken = gm(home, "audit", "verify")
    assert broken.returncode == 1 and "record 9" in broken.stdout


def test_location_arguments_take_s3_uris(tmp_path: Path, s3_env: dict[str, str]) -> None:
    """pack/ingest SHARDS_DIR, import-embeddings FILE and results export --to pass an s3:// URI on unchanged."""
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq
    from s3 import client, make_bucket

    from pipelines import samples

    bucket, home, photos = make_bucket(s3_env), tmp_path / "home", tmp_path / "photos"
    photos.mkdir()
    (photos / "astronaut.jpg").write_bytes(samples.encode(samples.astronaut(), "JPEG", quality=92))
    (photos / "coffee.jpg").write_bytes(samples.encode(samples.no_face_images()["coffee"], "JPEG"))
    add = ["sources", "add", "archive", "--channel", "operator-owned", "--legal-basis", "b", "--terms", "t"]
    assert gm(home, *add).returncode == 0
    packed = gm(home, "pack", str(photos), f"s3://{bucket}/shards", "--source", "archive", "--minor-default", "false")
    assert packed.returncode == 0, packed.stderr
    keys = [o["Key"] for o in client(s3_env).list_objects_v2(Bucket=bucket).get("Contents", [])]
    assert keys and all(k.startswith("shards/") and k.endswith(".parquet") for k in keys)
    ingested = ingest_faces(home, f"s3://{bucket}/shards", "--json")
    assert ingested.returncode == 0, ingested.stderr
    assert json.loads(ingested.stdout)["images"] == 2

    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((4, 512)).astype(np.float32)  # the faces table is 512-d
    gallery = pa.table(
        {
            "record_id": [f"rec-{i}" for i in range(4)],
            "embedding": pa.array(vectors.tolist(), pa.list_(pa.float32())),
            "minor": [False] * 4,
        }
    )
    buffer = io.BytesIO()
    pq.write_table(gallery, buffer)
    client(s3_env).put_object(Bucket=bucket, Key="vectors.parquet", Body=buffer.getvalue())
    imported = gm(
        home, "import-embeddings", f"s3://{bucket}/vectors.parquet", "--source", "archive", "--model-id", "vendor-x",
        "--dim", "512", "--json",
    )  # fmt: skip
    assert imported.returncode == 0, imported.stderr
    assert json.loads(imported.stdout)["imported"] == 4

    probes = tmp_path / "probes.parquet"
    pq.write_table(
        pa.table({"probe_id": ["p-1"], "embedding": pa.array([vectors[0].tolist()], pa.list_(pa.float32()))}), probes
    )
    submit = ["watchlist", "submit", str(probes), "--name", "n", "--case-id", "CASE-3", "--model-id", "vendor-x"]
    submit += ["--purpose", "fraud-investigation", "--legal-basis", "w", "--requested-by", "unit-4", "--json"]
    submitted = gm(home, *submit)
    assert submitted.returncode == 0, submitted.stderr
    matched = gm(home, "match", json.loads(submitted.stdout)["watchlist_id"], "--json")
    assert matched.returncode == 0, matched.stderr
    run_id = json.loads(matched.stdout)["run_id"]
    exported = gm(home, "results", "export", run_id, "--to", f"s3://{bucket}/out", "--requested-by", "unit-4", "--json")
    assert exported.returncode == 0, exported.stderr
    assert json.loads(exported.stdout)["path"].startswith(f"s3://{bucket}/out/")
    out = [o["Key"] for o in client(s3_env).list_objects_v2(Bucket=bucket, Prefix="out/").get("Contents", [])]
    assert f"out/{run_id}.manifest.json" in out and any(k.endswith(".parquet") for k in out)

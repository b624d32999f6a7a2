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
    ["status"],
]


def gm(home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = os.environ | {"GALLERYMATCH_HOME": str(home), "GALLERYMATCH_MODEL_DOWNLOADS": "0"}
    script = Path(sys.executable).parent / "gallerymatch"
    return subprocess.run(
        [str(script), *args], capture_output=True, text=True, env=env, cwd=ROOT, timeout=600, check=False
    )


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: " ".join(c) or "root")
def test_every_command_has_help(command: list[str]) -> None:
    from typer.testing import CliRunner

    result = CliRunner().invoke(app, [*command, "--help"])
    assert result.exit_code == 0, result.output
    assert "Usage" in result.output and len(result.output) > 100


def test_every_registered_command_is_covered() -> None:
    import typer.main

    group = typer.main.get_command(app)
    names = set(group.commands)  # type: ignore[attr-defined]
    assert names == {c[0] for c in COMMANDS if c}


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
    packed = gm(home, "pack", str(sample_folder), str(tmp_path / "shards"), "--source", "archive", "--json")
    assert packed.returncode == 0 and json.loads(packed.stdout)["duplicates"] == 1
    ingested = gm(
        home,
        "ingest",
        str(tmp_path / "shards"),
        "--engine",
        "local",
        "--modality",
        "face",
        "--face-model",
        "facenet-untrained",
        "--json",
    )
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
    """The Modal layer, run in-process with `.local()` (no Modal account here), matches the local engine."""
    import pickle

    from conftest import FACE, IMAGE, make_settings

    from infra.modal_app import IngestWorker
    from jobs.ingest import plan
    from pipelines.engines.local import run_local
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

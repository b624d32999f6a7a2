"""The command line on an S3 home: every command in its own process, GALLERYMATCH_HOME=s3://..., the standard AWS_*
variables (a loopback S3 server), the audit key in a local folder; and what happens without credentials or without
an endpoint."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import pytest
from helpers import child_env, faithful_conditional_puts, finish_all
from s3 import client, make_bucket
from test_erasure_crash import embeddings_file

from jobs.api import results

DIM = 16
SUBJECT = "subj-cli-1"


def gm_env(home: str, keys: Path, env: dict[str, str] | None = None) -> dict[str, str]:
    base = child_env() if env is None else env
    return base | {"GALLERYMATCH_HOME": home, "GALLERYMATCH_AUDIT_KEY_DIR": str(keys), "GALLERYMATCH_RAY_NUM_CPUS": "1"}


def gm(home: str, keys: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """`gallerymatch ARGS` in a child process on `home`; the AWS_* variables are this process's (or `env`)."""
    return together(home, keys, [list(args)], env)[0]


def together(
    home: str, keys: Path, commands: list[list[str]], env: dict[str, str] | None = None
) -> list[subprocess.CompletedProcess[str]]:
    """Several `gallerymatch` commands started at once, each in its own process (writers among them take turns on
    the home's writer lease); their results in order."""
    return finish_all(start(home, keys, commands, env), 600)


def start(
    home: str, keys: Path, commands: list[list[str]], env: dict[str, str] | None = None
) -> list[subprocess.Popen[str]]:
    script = str(Path(sys.executable).parent / "gallerymatch")
    return [
        subprocess.Popen(
            [script, *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=gm_env(home, keys, env),
            cwd=keys.parent,
        )
        for args in commands
    ]


def ok(done: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    """The one JSON object a successful --json command prints."""
    assert done.returncode == 0 and "Traceback" not in done.stderr, (done.args[1:], done.stderr[-3000:])
    return json.loads(done.stdout)  # type: ignore[no-any-return]


@pytest.mark.slow
def test_every_command_on_an_s3_home(s3_env: dict[str, str], tmp_path: Path) -> None:  # noqa: PLR0915 - one story
    """Each command as a user runs it; independent ones at the same time (as several users would), which also keeps
    the test's time to what the slowest of them takes."""
    faithful_conditional_puts()  # writers racing for the lease object: S3 lets one create win, moto must too
    bucket, outside = make_bucket(s3_env), make_bucket(s3_env)
    home, keys = f"s3://{bucket}/home", tmp_path / "audit-keys"
    rng = np.random.default_rng(5)
    vecs = rng.standard_normal((30, DIM))
    subjects: list[str | None] = [SUBJECT if i == 7 else None for i in range(30)]
    gallery = embeddings_file(tmp_path / "gallery.parquet", [f"r{i:03d}" for i in range(30)], list(vecs), subjects)
    probes = embeddings_file(
        tmp_path / "probes.parquet", ["p0", "p1"], [vecs[7] + 0.01, vecs[20] + 0.01], [None, None], "probe_id"
    )

    def cli(*args: str) -> dict[str, Any]:
        return ok(gm(home, keys, *args))

    def at_once(*commands: list[str]) -> list[subprocess.CompletedProcess[str]]:
        return together(home, keys, list(commands))

    add = ["sources", "add", "archive", "--channel", "operator-owned", "--legal-basis", "b", "--terms", "t", "--json"]
    assert cli(*add)["created"]
    imported = cli(
        "import-embeddings", str(gallery), "--source", "archive", "--model-id", "model-a", "--modality", "image",
        "--dim", str(DIM), "--json",
    )  # fmt: skip
    assert imported["imported"] == 30 and imported["quarantined"] == 0
    wl = cli(
        "watchlist", "submit", str(probes), "--name", "batch", "--case-id", "CASE-1", "--purpose",
        "fraud-investigation", "--legal-basis", "basis", "--requested-by", "unit-1", "--modality", "image",
        "--model-id", "model-a", "--top-k", "3", "--json",
    )  # fmt: skip
    assert wl["probes"] == 2
    on_ray = start(home, keys, [["match", wl["watchlist_id"], "--engine", "ray", "--json"]])  # runs on meanwhile
    local = cli("match", wl["watchlist_id"], "--engine", "local", "--json")
    assert local["candidates"] == 2 * 3 and local["path"].startswith(f"{home}/results/") and local["engine"] == "local"
    run = local["run_id"]

    target = f"s3://{outside}/exports"
    listed, shown, to_folder, to_s3, into_home, reviewed, kept = at_once(
        ["results", "list", "--json"],
        ["results", "show", run, "--requested-by", "unit-1", "--json"],
        ["results", "export", run, "--to", str(tmp_path / "out"), "--requested-by", "unit-1", "--json"],
        ["results", "export", run, "--to", target, "--requested-by", "unit-1", "--json"],
        ["results", "export", run, "--to", f"{home}/exports", "--requested-by", "unit-1", "--json"],
        ["review", run, "p1", "1", "--status", "potential_candidate", "--reviewer", "rev-1", "--json"],
        ["retention", "run", "--json"],
    )
    (ray,) = map(ok, finish_all(on_ray, 600))
    assert ray["engine"] == "ray" and ray["candidates"] == 2 * 3 and ray["gallery_version"] == local["gallery_version"]
    runs = {r["run_id"] for r in ok(listed)["runs"]}
    assert run in runs and runs <= {run, ray["run_id"]}  # and the ray run, if it had committed by then
    best = {c["probe_id"]: c for c in ok(shown)["candidates_shown"] if c["rank"] == 1}
    assert best["p0"]["record_id"] == "r007" and best["p1"]["record_id"] == "r020"  # each probe finds its own row
    assert ok(to_folder)["rows"] == 6 and len(list((tmp_path / "out").rglob("part-*.parquet"))) == 1
    assert pq.read_table(next((tmp_path / "out").rglob("part-*.parquet"))).num_rows == 6
    assert ok(to_s3)["path"].startswith(f"{target}/") and ok(to_s3)["rows"] == 6
    copied = [o["Key"] for o in client(s3_env).list_objects_v2(Bucket=outside)["Contents"]]
    assert any(k.endswith(".parquet") for k in copied) and f"exports/{run}.manifest.json" in copied
    assert into_home.returncode == 2 and "inside GALLERYMATCH_HOME" in into_home.stderr, into_home.stderr
    assert into_home.stdout == "" and "Traceback" not in into_home.stderr
    assert ok(reviewed)["review_status"] == "potential_candidate"
    assert ok(kept)["watchlists_expired"] == [] and ok(kept)["result_sets_deleted"] == []
    stable = ["probe_id", "rank", "gallery_id", "score"]
    frame = results(home).collect()  # the data team's API, straight from the bucket: the engines agree
    local_rows, ray_rows = (frame.filter(frame["run_id"] == r).sort(["probe_id", "rank"]).select(stable) for r in
                            (run, ray["run_id"]))  # fmt: skip
    assert local_rows.equals(ray_rows) and local_rows.height == 6

    receipt = cli("erase", "--subject-id", SUBJECT, "--reason", "request 12", "--requested-by", "dpo-1", "--json")
    assert receipt["removed_rows"]["image_embeddings"] == 1 and len(receipt["result_sets_rewritten"]) == 2
    after = results(home).collect()
    assert after.height == 2 * (2 * 3 - 1) and "r007" not in set(after["record_id"])  # gone from both runs
    status, report, verified, shown_audit = map(ok, at_once(
        ["status", "--json"], ["report", "--since", "2020-01-01", "--json"], ["audit", "verify", "--json"],
        ["audit", "show", "--json"],
    ))  # fmt: skip
    assert status["home"] == home and status["image_embeddings"] == 29  # the home as its URI, the subject gone
    assert status["erasures_unfinished"] == [] and status["actions_without_outcome"] == []
    assert report["runs"] == 2 and report["watchlists_by_purpose"] == {"fraud-investigation": 1}
    assert report["audit_chain"]["ok"]
    assert verified["ok"] and verified["problems"] == [] and verified["incomplete_actions"] == []
    audit = shown_audit["records"]
    outcomes = [r["action"] for r in audit if r["phase"] == "outcome"]
    for action in ("sources.add", "import-embeddings", "watchlist.submit", "match", "results.export", "review",
                   "retention", "erase"):  # fmt: skip
        assert action in outcomes, (action, outcomes)
    assert outcomes.count("match") == 2 and outcomes.count("results.export") == 2  # the refused one did nothing
    assert all(r["status"] == "ok" for r in audit if r["phase"] == "outcome")
    assert verified["records"] == len(audit) and sorted(p.name for p in tmp_path.iterdir()) == [
        "audit-keys", "gallery.parquet", "out", "probes.parquet"
    ]  # fmt: skip

    raw = client(s3_env)  # an insider alters the match's intent through the bucket: `audit verify` exits 1
    intent = next(r for r in audit if r["action"] == "match" and r["phase"] == "intent")
    key = f"home/audit/records/00000000/{intent['seq']:012d}.json"
    body = raw.get_object(Bucket=bucket, Key=key)["Body"].read()
    raw.put_object(Bucket=bucket, Key=key, Body=body.replace(b"CASE-1", b"CASE-2"))
    broken = gm(home, keys, "audit", "verify")
    assert broken.returncode == 1 and f"record {intent['seq']}" in broken.stdout and "Traceback" not in broken.stderr


def test_without_credentials_an_s3_home_is_refused(s3_env: dict[str, str], tmp_path: Path) -> None:
    bucket = make_bucket(s3_env)
    bare = {k: v for k, v in child_env().items() if k not in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")}
    for args in (["status", "--json"], ["audit", "verify"]):
        done = gm(f"s3://{bucket}/home", tmp_path / "keys", *args, env=bare)
        assert done.returncode == 2 and done.stdout == "", done.stderr
        assert "AWS_ACCESS_KEY_ID" in done.stderr and "Traceback" not in done.stderr
        assert len(done.stderr.strip().splitlines()) == 1
    assert "Contents" not in client(s3_env).list_objects_v2(Bucket=bucket)  # nothing was written anywhere
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_without_an_endpoint_only_aws_over_https_is_tried(s3_env: dict[str, str], tmp_path: Path) -> None:
    """Keys but no AWS_ENDPOINT_URL: the command goes for AWS over https, never the loopback S3 server or a local
    folder. Its traffic is sent to a proxy on a loopback port where nothing listens, so nothing leaves this machine,
    and the command ends with one line naming where it looked."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {k: v for k, v in child_env().items() if not k.startswith(("AWS_ENDPOINT_URL", "NO_PROXY", "no_proxy"))}
    env |= {"HTTPS_PROXY": f"http://127.0.0.1:{port}", "HTTP_PROXY": f"http://127.0.0.1:{port}"}
    bucket = make_bucket(s3_env)
    done = gm(f"s3://{bucket}/home", tmp_path / "keys", "results", "list", "--json", env=env)
    assert done.returncode == 1 and done.stdout == "" and "Traceback" not in done.stderr, done.stderr
    assert (
        f"could not list s3://{bucket}/home: AWS S3 (region {s3_env['AWS_REGION']}, https) is unreachable"
        in done.stderr
    )
    assert "127.0.0.1" in done.stderr and s3_env["AWS_ENDPOINT_URL"] not in done.stderr  # the proxy, not the server
    assert "Contents" not in client(s3_env).list_objects_v2(Bucket=bucket)
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no local fallback home

"""The nightly as a Ray job: a real Ray head on loopback (`ray start --head`), the Jobs API submitting exactly the
documented entrypoint `gallerymatch nightly --engine ray --json`, the job's driver joining that head (its match
tasks are in the head's task list: no second Ray was started), its JSON in the job's logs, result sets for both
watchlists in the home, and the submission id refused a second time (the idempotency key the docs rely on).

The head is stopped by signalling the processes this test started (found by a marker in their environment),
never with `ray stop`, which would stop every Ray of the machine's user."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import make_settings, register
from helpers import child_env

from jobs.import_embeddings import run_import
from jobs.watchlist import Submission, submit
from pipelines.results import list_runs
from pipelines.settings import Settings

BIN = Path(sys.executable).parent  # the venv's ray and gallerymatch
ENTRYPOINT = "gallerymatch nightly --engine ray --json"
DIM = 16
MODEL = "model-a"
MARKER = "GALLERYMATCH_TEST_RAY_HEAD"  # in the environment of every process of the test's head
PORTS = (
    "port",
    "dashboard-port",
    "ray-client-server-port",
    "dashboard-agent-listen-port",
    "dashboard-agent-grpc-port",
    "runtime-env-agent-port",
    "metrics-export-port",
    "node-manager-port",
    "object-manager-port",
)

pytestmark = pytest.mark.slow


def free_ports(n: int) -> list[int]:
    sockets = [socket.socket() for _ in range(n)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


@dataclass
class Head:
    process: subprocess.Popen[bytes]
    address: str  # the dashboard (Jobs API) URL
    marker: str
    temp_dir: Path
    headers: dict[str, str]  # the head's own token: Ray's token authentication stays on, as it ships


def processes_of(marker: str) -> list[int]:
    """Every live process whose environment carries this head's marker (its Ray processes and their children)."""
    found = []
    needle = f"{MARKER}={marker}".encode()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            environ = Path(f"/proc/{entry}/environ").read_bytes()
            state = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if needle in environ.split(b"\0") and state != "Z":
            found.append(int(entry))
    return found


def stop(head: Head) -> None:
    """SIGTERM the head's process group, SIGKILL it after a moment, then SIGKILL by pid whatever of this head left
    the group (Ray runs a job's entrypoint in a session of its own); returns once none is left (or after 30 s)."""
    group = head.process.pid  # `ray start --block` leads its own session (start_new_session)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(group, signal.SIGTERM)
    wait_gone(head.marker, 3)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(group, signal.SIGKILL)
    for pid in processes_of(head.marker):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        head.process.wait(timeout=30)
    wait_gone(head.marker, 30)


def wait_gone(marker: str, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while processes_of(marker) and time.monotonic() < deadline:
        time.sleep(0.2)


@pytest.fixture
def ray_head() -> Iterator[Head]:
    """A one-node Ray head on 127.0.0.1 only, on free ports, with its own short temp dir.

    RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 keeps every Ray address on loopback: without it, `ray start` replaces
    127.0.0.1 by the machine's routable address (`resolve_ip_for_localhost`)."""
    temp_dir = Path(tempfile.mkdtemp(prefix="gmrj", dir="/tmp"))  # short: Ray's socket paths live under it
    marker = uuid.uuid4().hex
    token = uuid.uuid4().hex + uuid.uuid4().hex
    ports = dict(zip(PORTS, free_ports(len(PORTS)), strict=True))
    env = child_env(
        PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        RAY_ENABLE_UV_RUN_RUNTIME_ENV="0",
        RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0",
        RAY_AUTH_MODE="token",
        RAY_AUTH_TOKEN=token,  # this head's, not ~/.ray/auth_token; its processes (the job's driver too) inherit it
        **{MARKER: marker},
    )
    for name in ("RAY_ADDRESS", "GALLERYMATCH_RAY_ADDRESS", "GALLERYMATCH_HOME", "RAY_AUTH_TOKEN_PATH"):
        env.pop(name, None)
    command = [
        str(BIN / "ray"),
        "start",
        "--head",
        "--block",
        "--node-ip-address=127.0.0.1",
        "--dashboard-host=127.0.0.1",
        "--num-cpus=2",
        "--disable-usage-stats",
        "--include-log-monitor=false",
        f"--temp-dir={temp_dir}",
        *(f"--{name}={port}" for name, port in ports.items()),
    ]
    log = (temp_dir / "start.log").open("wb")
    process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    address = f"http://127.0.0.1:{ports['dashboard-port']}"
    head = Head(process, address, marker, temp_dir, {"authorization": f"Bearer {token}"})
    try:
        yield head
    finally:
        stop(head)
        log.close()
        left = processes_of(marker)
        shutil.rmtree(temp_dir, ignore_errors=True)
        assert not left, f"processes of the test's Ray head left running: {left}"


def connect(head: Head, timeout: float = 120) -> Any:
    from ray.job_submission import JobSubmissionClient

    deadline = time.monotonic() + timeout
    while True:
        try:
            return JobSubmissionClient(head.address, headers=head.headers)
        except ConnectionError:
            if head.process.poll() is not None or time.monotonic() > deadline:
                log = (head.temp_dir / "start.log").read_text(errors="replace")[-3000:]
                raise AssertionError(f"the Ray head did not come up:\n{log}") from None
            time.sleep(0.5)


def build_home(tmp_path: Path) -> tuple[Settings, set[str]]:
    """A local home: a gallery in two imports (two fragments) and two watchlists, made through the library."""
    settings = make_settings(tmp_path / "home")
    register(settings)
    rng = np.random.default_rng(3)
    for part in range(2):
        path = tmp_path / f"gallery-{part}.parquet"
        vectors = rng.choice([-1.0, 1.0], size=(30, DIM))
        columns = {
            "record_id": [f"r{part}-{i:03d}" for i in range(30)],
            "embedding": [list(v) for v in vectors],
            "minor": [False] * 30,
        }
        pq.write_table(pa.table(columns), path)
        run_import(settings, path, "archive", MODEL, "image", DIM)
    watchlists = set()
    for name in ("one", "two"):
        path = tmp_path / f"probes-{name}.parquet"
        probes = rng.choice([-1.0, 1.0], size=(3, DIM))
        pq.write_table(pa.table({"probe_id": ["p0", "p1", "p2"], "embedding": [list(v) for v in probes]}), path)
        sub = Submission(path, name, f"CASE-{name}", "fraud-investigation", "basis", "analyst-1", "image", MODEL)
        watchlists.add(str(submit(settings, sub)["watchlist_id"]))
    return settings, watchlists


def summary_in(logs: str) -> dict[str, Any]:
    """The one JSON object the command printed, among whatever else the driver logged."""
    for line in logs.splitlines():
        if line.startswith("{"):
            try:
                value = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(value, dict) and "runs" in value:
                return value
    raise AssertionError(f"no nightly JSON in the job's logs:\n{logs[-3000:]}")


def test_nightly_submitted_through_the_jobs_api(ray_head: Head, tmp_path: Path) -> None:
    from ray.util.state.api import StateApiClient
    from ray.util.state.common import ListApiOptions, StateResource

    began = time.monotonic()
    settings, watchlists = build_home(tmp_path)
    home_ready = time.monotonic()
    client = connect(ray_head)
    head_ready = time.monotonic()
    assert processes_of(ray_head.marker)  # the leak check at teardown sees this head's processes
    submission_id = f"gallerymatch-nightly-{uuid.uuid4().hex[:8]}"
    runtime_env = {
        "env_vars": {
            "RAY_ENABLE_UV_RUN_RUNTIME_ENV": "0",
            "GALLERYMATCH_HOME": settings.home_uri,
            "GALLERYMATCH_AUDIT_KEY_DIR": str(settings.audit_key_dir),
        }
    }
    assert client.submit_job(entrypoint=ENTRYPOINT, submission_id=submission_id, runtime_env=runtime_env) == (
        submission_id
    )
    deadline = time.monotonic() + 240
    while not (status := client.get_job_status(submission_id)).is_terminal():
        assert time.monotonic() < deadline, f"the job is still {status} after 240 s"
        time.sleep(1)
    logs = client.get_job_logs(submission_id)
    job = time.monotonic() - head_ready
    print(f"home {home_ready - began:.1f} s, head up {head_ready - home_ready:.1f} s more, job {job:.1f} s")
    assert status == "SUCCEEDED", logs[-3000:]

    summary = summary_in(logs)
    assert summary["engine"] == "ray"
    assert {r["watchlist_id"] for r in summary["runs"]} == watchlists
    assert {r["mode"] for r in summary["runs"]} == {"full"}  # first nights: full runs, through the engine
    committed = {m["run_id"]: m for m in list_runs(settings.store)}
    for run in summary["runs"]:
        assert committed[run["run_id"]]["watchlist_id"] == run["watchlist_id"]  # a result set in the home

    # The full runs' units ran as tasks of this head: the driver joined it (RAY_ADDRESS) instead of starting a Ray.
    state = StateApiClient(ray_head.address, headers=ray_head.headers)
    options = ListApiOptions(filters=[("name", "=", "run_unit")])
    deadline = time.monotonic() + 30  # task events reach the head shortly after the tasks end
    while len(tasks := state.list(StateResource.TASKS, options, raise_on_missing_output=False)) < len(watchlists):
        assert time.monotonic() < deadline, f"the head saw {len(tasks)} run_unit task(s)"
        time.sleep(0.5)
    assert {getattr(t, "state", None) for t in tasks} == {"FINISHED"}  # TaskState rows

    with pytest.raises(RuntimeError, match="already"):  # a dated submission id runs one nightly per night
        client.submit_job(entrypoint=ENTRYPOINT, submission_id=submission_id, runtime_env=runtime_env)

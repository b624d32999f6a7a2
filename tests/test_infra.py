"""The deployment wrappers under infra/: the Modal app's nightly run in-process through `.local()` (as a scheduled
container would, the durable-places checks and the audit-key volume included), and the Ray / Kubernetes specs:
they parse, their entrypoints are commands the CLI accepts, their schedules are valid cron and agree with each
other and with Modal's, and every scheduler carries the very RayJob spec of rayjob-nightly.yaml."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from conftest import register
from helpers import child_env

from infra import modal_app
from jobs.import_embeddings import run_import
from jobs.watchlist import Submission, submit
from pipelines.errors import Refused
from pipelines.results import list_runs
from pipelines.settings import Settings

pytestmark = pytest.mark.filterwarnings("ignore:The .* function is executing locally:UserWarning")  # `.local()`

ROOT = Path(__file__).resolve().parents[1]
INFRA = ROOT / "infra"
RAY = INFRA / "ray"
NIGHTLY_ENTRYPOINT = ["gallerymatch", "nightly", "--engine", "ray", "--json"]
DIM = 16
MODEL = "model-a"


# ---- the Modal app -----------------------------------------------------------------------------------------


def add_gallery(settings: Settings, tmp_path: Path, name: str, first: int, count: int) -> None:
    vectors = np.random.default_rng(first).choice([-1.0, 1.0], size=(count, DIM))
    path = tmp_path / f"{name}.parquet"
    pq.write_table(
        pa.table(
            {
                "record_id": [f"r{i:04d}" for i in range(first, first + count)],
                "embedding": [list(v) for v in vectors],
                "minor": [False] * count,
            }
        ),
        path,
    )
    run_import(settings, path, "archive", MODEL, "image", DIM)


def add_watchlist(settings: Settings, tmp_path: Path, name: str, seed: int) -> str:
    path = tmp_path / f"probes-{name}.parquet"
    vectors = np.random.default_rng(seed).choice([-1.0, 1.0], size=(3, DIM))
    pq.write_table(pa.table({"probe_id": ["p0", "p1", "p2"], "embedding": [list(v) for v in vectors]}), path)
    sub = Submission(path, name, f"CASE-{seed}", "fraud-investigation", "basis", "analyst-1", "image", MODEL, top_k=5)
    return str(submit(settings, sub)["watchlist_id"])


@pytest.fixture
def deployed_home(s3_settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Settings, set[str]]:
    """An S3 home (as in the Modal secret) with a gallery and two watchlists; the environment a scheduled
    container has (GALLERYMATCH_HOME, the AWS_* variables, GALLERYMATCH_AUDIT_KEY_DIR)."""
    register(s3_settings)
    add_gallery(s3_settings, tmp_path, "g0", 0, 40)
    watchlists = {add_watchlist(s3_settings, tmp_path, name, seed) for name, seed in (("one", 7), ("two", 8))}
    monkeypatch.setenv("GALLERYMATCH_HOME", s3_settings.home_uri)
    monkeypatch.setenv("GALLERYMATCH_AUDIT_KEY_DIR", str(s3_settings.audit_key_dir))
    return s3_settings, watchlists


def test_modal_nightly_runs_the_nightly(deployed_home: tuple[Settings, set[str]], tmp_path: Path) -> None:
    settings, watchlists = deployed_home
    first = modal_app.nightly.local()
    assert json.loads(json.dumps(first)) == first  # JSON-ready, as a Modal function's result
    assert first["engine"] == modal_app.NIGHTLY_ENGINE == "local" and "retention" in first
    assert {r["watchlist_id"] for r in first["runs"]} == watchlists and first["skipped"] == []
    committed = {m["run_id"] for m in list_runs(settings.store)}
    assert {r["run_id"] for r in first["runs"]} <= committed  # result sets in the bucket

    again = modal_app.nightly.local()  # the same night again: nothing new, nothing run
    assert again["runs"] == [] and {s["watchlist_id"] for s in again["skipped"]} == watchlists

    add_gallery(settings, tmp_path, "g1", 1000, 10)
    night = modal_app.nightly.local()  # the next night: each watchlist extended by the gallery's delta
    assert {r["watchlist_id"] for r in night["runs"]} == watchlists
    assert {r["mode"] for r in night["runs"]} == {"delta"}
    assert isinstance(modal_app.retention.local(), dict)  # retention on demand, same settings


class Volume:
    def __init__(self) -> None:
        self.calls: list[str] = []

    def reload(self) -> None:
        self.calls.append("reload")

    def commit(self) -> None:
        self.calls.append("commit")


@pytest.fixture
def in_container(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[Volume]:
    """As in a Modal container: `modal.is_local()` false, the audit-key volume mounted (a folder here)."""
    volume = Volume()
    monkeypatch.setattr(modal_app, "_in_container", lambda: True)
    monkeypatch.setattr(modal_app, "audit_keys", volume)
    yield volume


def test_in_a_container_the_audit_keys_are_reloaded_and_committed(
    deployed_home: tuple[Settings, set[str]], in_container: Volume, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings, watchlists = deployed_home
    monkeypatch.setattr(modal_app, "AUDIT_KEYS", str(settings.audit_key_dir))
    result = modal_app.nightly.local()
    assert {r["watchlist_id"] for r in result["runs"]} == watchlists
    assert in_container.calls == ["reload", "commit"]

    def fails(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("killed half-way")

    monkeypatch.setattr("jobs.nightly.run_nightly", fails)
    with pytest.raises(RuntimeError, match="half-way"):
        modal_app.nightly.local()
    assert in_container.calls[2:] == ["reload", "commit"]  # what was written before the failure is kept


def test_in_a_container_a_home_or_key_that_would_not_last_is_refused(
    deployed_home: tuple[Settings, set[str]], in_container: Volume, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    settings, _ = deployed_home
    with pytest.raises(Refused, match=r"GALLERYMATCH_AUDIT_KEY_DIR .* set it to /audit-keys"):
        modal_app.nightly.local()  # the key is not on the volume: a new key every night
    monkeypatch.setenv("GALLERYMATCH_HOME", str(tmp_path / "container-disk"))
    monkeypatch.setattr(modal_app, "AUDIT_KEYS", str(settings.audit_key_dir))
    with pytest.raises(Refused, match=r"GALLERYMATCH_HOME is .*: set it to an s3:// URI in the Modal secret"):
        modal_app.retention.local()
    assert in_container.calls == []  # refused before anything was read or written
    assert list_runs(settings.store) == []


def test_deployment_problems(s3_settings: Settings, tmp_path: Path) -> None:
    from conftest import make_settings

    good = make_settings(s3_settings.home_uri, audit_key_dir=Path("/audit-keys"))
    assert modal_app.deployment_problems(good) == []
    nested = make_settings(s3_settings.home_uri, audit_key_dir=Path("/audit-keys/prod"))
    assert modal_app.deployment_problems(nested) == []
    local = make_settings(tmp_path / "home")
    assert len(modal_app.deployment_problems(local)) == 2


def test_modal_schedules() -> None:
    """What `modal deploy` registers: the nightly on NIGHTLY_CRON in UTC, nothing else on a schedule (the
    nightly runs retention first). Read by recording the app's own decorator calls in a fresh interpreter."""
    code = (
        "import json, modal\n"
        "crons, seen = {}, {}\n"
        "real_cron, real_function = modal.Cron.__init__, modal.App.function\n"
        "def cron(self, spec, timezone='UTC'):\n"
        "    crons[id(self)] = [spec, timezone]\n"
        "    real_cron(self, spec, timezone=timezone)\n"
        "def function(self, *args, **kwargs):\n"
        "    decorate = real_function(self, *args, **kwargs)\n"
        "    schedule = kwargs.get('schedule')\n"
        "    def wrap(f):\n"
        "        seen[f.__name__] = crons.get(id(schedule)) if schedule is not None else None\n"
        "        return decorate(f)\n"
        "    return wrap\n"
        "modal.Cron.__init__, modal.App.function = cron, function\n"
        "import infra.modal_app\n"
        "print(json.dumps(seen))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        check=False,
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=child_env(),
        timeout=300,
    )
    assert out.returncode == 0, out.stderr
    seen = json.loads(out.stdout.strip().splitlines()[-1])
    assert seen == {"nightly": [modal_app.NIGHTLY_CRON, "UTC"], "retention": None}
    assert valid_cron(modal_app.NIGHTLY_CRON)


# ---- cron --------------------------------------------------------------------------------------------------

CRON_FIELDS = ((0, 59), (0, 23), (1, 31), (1, 12), (0, 7))  # minute, hour, day of month, month, day of week


def valid_cron(expr: str) -> bool:
    """Five fields of numbers, ranges, lists, `*` and steps, each within its field's range."""
    fields = expr.split()
    if len(fields) != 5:
        return False
    for field, (low, high) in zip(fields, CRON_FIELDS, strict=True):
        for item in field.split(","):
            base, slash, step = item.partition("/")
            if slash and not (step.isdigit() and int(step) > 0):
                return False
            if base == "*":
                continue
            first, dash, last = base.partition("-")
            bounds = [first, last] if dash else [first]
            if not all(b.isdigit() and low <= int(b) <= high for b in bounds):
                return False
            if dash and int(first) > int(last):
                return False
    return True


def test_the_cron_check_can_fail() -> None:
    assert valid_cron("0 2 * * *") and valid_cron("*/15 0-6,22 1 1-12 1-5")
    for bad in ("0 2 * *", "0 2 * * * *", "60 2 * * *", "0 24 * * *", "*/0 * * * *", "0 5-2 * * *", "@daily"):
        assert not valid_cron(bad), bad


# ---- the Ray / Kubernetes specs ----------------------------------------------------------------------------


def documents(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def the(kind: str, path: Path) -> dict[str, Any]:
    (doc,) = [d for d in documents(path) if d["kind"] == kind]
    return doc


def rayjob_spec() -> dict[str, Any]:
    spec: dict[str, Any] = the("RayJob", RAY / "rayjob-nightly.yaml")["spec"]
    return spec


def embedded_rayjob() -> dict[str, Any]:
    """The RayJob manifest the CronJob's kubectl pod creates, from the ConfigMap it mounts."""
    cron = the("CronJob", RAY / "cronjob-nightly.yaml")
    pod = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    args = container["args"]
    assert args[:2] == ["create", "-f"] and "kubectl" in container["image"]  # create: generateName needs it
    manifest = Path(args[2])
    (mount,) = [m for m in container["volumeMounts"] if Path(m["mountPath"]) == manifest.parent]
    (volume,) = [v for v in pod["volumes"] if v["name"] == mount["name"]]
    configmap = the("ConfigMap", RAY / "cronjob-nightly.yaml")
    assert volume["configMap"]["name"] == configmap["metadata"]["name"]
    rayjob: dict[str, Any] = yaml.safe_load(configmap["data"][manifest.name])
    return rayjob


def yaml_files() -> list[Path]:
    return sorted(p for p in INFRA.rglob("*") if p.suffix in (".yaml", ".yml"))


def test_every_yaml_under_infra_parses() -> None:
    assert {p.name for p in yaml_files()} >= {
        "rayjob-nightly.yaml",
        "raycronjob-nightly.yaml",
        "cronjob-nightly.yaml",
        "audit-keys.yaml",
    }
    for path in yaml_files():
        docs = documents(path)
        assert docs, path
        for doc in docs:
            assert {"apiVersion", "kind", "metadata"} <= set(doc), path
            assert doc["metadata"].get("name") or doc["metadata"].get("generateName"), path


def cli_command(argv: list[str]) -> Any:
    """The parsed invocation, as the installed `gallerymatch` would parse it (unknown options, missing values and
    commands fail here): the console script is jobs.cli:main, and the command is one of jobs.cli.app's."""
    import typer

    from jobs.cli import app

    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert argv[0] in scripts and scripts[argv[0]] == "jobs.cli:main"
    group = typer.main.get_command(app)
    command = group.commands.get(argv[1])  # type: ignore[attr-defined]
    assert command is not None, f"{argv[1]!r} is no command of gallerymatch"
    return command.make_context(argv[1], list(argv[2:]))


def test_the_cli_check_can_fail() -> None:
    with pytest.raises(Exception) as unknown:  # typer's own (vendored) click raises NoSuchOption
        cli_command(["gallerymatch", "nightly", "--engine", "ray", "--jsn"])
    assert "UsageError" in {c.__name__ for c in type(unknown.value).__mro__} and "--jsn" in str(unknown.value)
    with pytest.raises(AssertionError):
        cli_command(["gallerymatch", "nighty", "--json"])
    with pytest.raises(AssertionError):
        cli_command(["gallerymtch", "nightly"])


def entrypoints() -> dict[str, str]:
    return {
        "rayjob-nightly.yaml": rayjob_spec()["entrypoint"],
        "raycronjob-nightly.yaml": the("RayCronJob", RAY / "raycronjob-nightly.yaml")["spec"]["jobTemplate"][
            "entrypoint"
        ],
        "cronjob-nightly.yaml": embedded_rayjob()["spec"]["entrypoint"],
    }


def test_entrypoints_are_the_clis_nightly() -> None:
    for name, entrypoint in entrypoints().items():
        argv = shlex.split(entrypoint)
        assert argv == NIGHTLY_ENTRYPOINT, name
        ctx = cli_command(argv)
        assert ctx.params["engine"] == "ray" and ctx.params["as_json"] is True, name


def submit_commands() -> list[tuple[Path, str]]:
    """Every `ray job submit` line of the docs that schedule the nightly."""
    found = []
    for doc in (RAY / "README.md", ROOT / "README.md"):
        for line in doc.read_text().splitlines():
            if line.strip().startswith("ray job submit"):
                found.append((doc, line.strip()))
    return found


def test_documented_ray_job_submit_is_valid() -> None:
    """Ray's own `ray job submit` parser accepts each documented command, and what it submits is the nightly."""
    from ray.dashboard.modules.job.cli import job_cli_group

    commands = submit_commands()
    assert {doc.name for doc, _ in commands} == {"README.md"} and len(commands) >= 2
    submit_cli = job_cli_group.commands["submit"]
    for doc, line in commands:
        argv = shlex.split(line)
        assert argv[:3] == ["ray", "job", "submit"], doc
        ctx = submit_cli.make_context("submit", argv[3:])
        assert ctx.params["address"].startswith("http://") and ctx.params["submission_id"], doc
        assert json.loads(ctx.params["runtime_env_json"])["env_vars"]["RAY_ENABLE_UV_RUN_RUNTIME_ENV"] == "0"
        entrypoint = list(ctx.params["entrypoint"])
        assert entrypoint == NIGHTLY_ENTRYPOINT, doc
        cli_command(entrypoint)


def test_every_scheduler_carries_the_rayjob_spec() -> None:
    spec = rayjob_spec()
    assert the("RayCronJob", RAY / "raycronjob-nightly.yaml")["spec"]["jobTemplate"] == spec
    created = embedded_rayjob()
    assert created["spec"] == spec
    assert created["apiVersion"] == "ray.io/v1" and created["kind"] == "RayJob"
    assert "name" not in created["metadata"] and created["metadata"]["generateName"]  # a new RayJob each night


def test_schedules_agree() -> None:
    schedules = {
        "RayCronJob": the("RayCronJob", RAY / "raycronjob-nightly.yaml")["spec"]["schedule"],
        "CronJob": the("CronJob", RAY / "cronjob-nightly.yaml")["spec"]["schedule"],
        "Modal": modal_app.NIGHTLY_CRON,
    }
    assert all(valid_cron(s) for s in schedules.values()), schedules
    assert len(set(schedules.values())) == 1, schedules
    assert the("CronJob", RAY / "cronjob-nightly.yaml")["spec"]["timeZone"] == "Etc/UTC"


def test_rayjob_runs_once_and_cleans_up() -> None:
    spec = rayjob_spec()
    assert spec["shutdownAfterJobFinishes"] is True and spec["ttlSecondsAfterFinished"] > 0
    assert spec["activeDeadlineSeconds"] > 0
    runtime_env = yaml.safe_load(spec["runtimeEnvYAML"])
    assert runtime_env["env_vars"]["RAY_ENABLE_UV_RUN_RUNTIME_ENV"] == "0"
    assert all(isinstance(v, str) for v in runtime_env["env_vars"].values())


def literal_credentials(node: Any) -> list[str]:
    """Environment entries anywhere in the specs that write an AWS_* value or the home in clear."""
    found = []
    if isinstance(node, dict):
        name = node.get("name")
        if isinstance(name, str) and "value" in node and (name.startswith("AWS_") or name == "GALLERYMATCH_HOME"):
            found.append(name)
        for value in node.values():
            found += literal_credentials(value)
    elif isinstance(node, list):
        for value in node:
            found += literal_credentials(value)
    return found


def test_the_credentials_check_can_fail() -> None:
    pod = {"containers": [{"env": [{"name": "AWS_SECRET_ACCESS_KEY", "value": "x"}, {"name": "A", "value": "1"}]}]}
    assert literal_credentials([{"spec": pod}]) == ["AWS_SECRET_ACCESS_KEY"]


def pod_specs() -> Iterator[tuple[str, dict[str, Any]]]:
    cluster = rayjob_spec()["rayClusterSpec"]
    yield "head", cluster["headGroupSpec"]["template"]["spec"]
    for group in cluster["workerGroupSpecs"]:
        yield group["groupName"], group["template"]["spec"]


def test_credentials_come_from_the_secret_and_the_audit_key_lasts() -> None:
    assert not literal_credentials([*(d for p in yaml_files() for d in documents(p)), embedded_rayjob()])
    for name, pod in pod_specs():
        for container in pod["containers"]:
            refs = [e["secretRef"]["name"] for e in container.get("envFrom", []) if "secretRef" in e]
            assert refs == ["gallerymatch"], name  # GALLERYMATCH_HOME and AWS_* for every node
    head = dict(pod_specs())["head"]
    (container,) = head["containers"]
    env = {e["name"]: e["value"] for e in container["env"]}
    key_dir = Path(env["GALLERYMATCH_AUDIT_KEY_DIR"])
    (mount,) = [
        m
        for m in container["volumeMounts"]
        if key_dir == Path(m["mountPath"]) or Path(m["mountPath"]) in key_dir.parents
    ]
    (volume,) = [v for v in head["volumes"] if v["name"] == mount["name"]]
    claim = the("PersistentVolumeClaim", RAY / "audit-keys.yaml")
    assert volume["persistentVolumeClaim"]["claimName"] == claim["metadata"]["name"]


def test_the_scheduler_may_create_rayjobs_and_nothing_else() -> None:
    path = RAY / "cronjob-nightly.yaml"
    account = the("ServiceAccount", path)["metadata"]["name"]
    role, binding = the("Role", path), the("RoleBinding", path)
    assert role["rules"] == [{"apiGroups": ["ray.io"], "resources": ["rayjobs"], "verbs": ["create"]}]
    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "Role",
        "name": role["metadata"]["name"],
    }
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": account}]
    pod = the("CronJob", path)["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == account


def test_the_image_holds_the_locked_ray() -> None:
    """rayVersion must be the Ray the image installs: the one uv.lock pins (the Dockerfile syncs the lock)."""
    lock = tomllib.loads((ROOT / "uv.lock").read_text())
    (ray,) = [p for p in lock["package"] if p["name"] == "ray"]
    assert rayjob_spec()["rayClusterSpec"]["rayVersion"] == ray["version"]
    dockerfile = (RAY / "Dockerfile").read_text()
    assert "uv sync --locked" in dockerfile and "--no-dev" in dockerfile
    python = re.search(r"^FROM python:(\d+\.\d+)", dockerfile, re.MULTILINE)
    requires = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["requires-python"]
    assert python is not None and f">={python.group(1)}" in requires
    images = {c["image"] for _, pod in pod_specs() for c in pod["containers"]}
    assert len(images) == 1  # head and workers run the same build

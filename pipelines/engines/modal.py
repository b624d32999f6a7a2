"""Modal engine: an ingest shard is one call to a GPU container that holds both stages; a match unit (a range of
gallery fragments at a pinned version) is one call to a CPU container that scans it.

The engine owns its runtime: the Modal app, its image and the `IngestWorker` and `MatchWorker` classes are
defined here. A `ModalSession` is one ephemeral run of the app (`app.run()`) with the worker handles: the
engine opens one in `prepare_runtime()` and keeps it until `close()`, so a nightly job's many matches share
one start-up; an ingest or a match called without it opens and closes its own. The work itself is the
engine-free `PrepareStage` + `EmbedStage` and `run_unit`; `infra/modal_app.py` is only the deployable wrapper
(schedules, entrypoint) and nothing here imports it.

Needs a Modal account (`modal token new`). Containers read what they work on themselves: shards at s3://
URIs, and the gallery's Lance table on object storage (GALLERYMATCH_HOME=s3://...; LanceDB on Modal Volumes
is reported not to work, modal-client#2211). They get the driver's standard AWS_* variables as a Modal
secret and nothing else: a match unit leaves the driver without the Lance credential options, and the
container puts its own back. Tests call `IngestWorker().process.local(...)` and `MatchWorker().match.local(...)`.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import pickle
from collections.abc import Iterator, Mapping
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import modal
import numpy as np

from pipelines.embed import EmbedStage, ShardOutput
from pipelines.engines import MODAL_MATCH_CONTAINERS
from pipelines.errors import Refused
from pipelines.match_unit import MatchUnit, run_unit
from pipelines.matcher import TopK
from pipelines.prepare import PrepareStage
from pipelines.storage import S3Config, is_s3
from pipelines.task import IngestTask, WorkItem

ROOT = Path(__file__).resolve().parents[2]
GPU = "L4"
MAX_CONTAINERS = 8  # a capped GPU pool
MATCH_CPUS = 4.0  # reserved cores of a match container (numpy/torch GEMM threads; Lance scan threads)
MATCH_MEMORY_MIB = 8192  # a probe block (probes x block_rows float32 scores) plus the scan's batches
MATCH_CONTAINERS = MODAL_MATCH_CONTAINERS  # a capped CPU pool; a job's units beyond it queue
# What a container needs to read s3:// shards and tables, forwarded from the driver (see pipelines.storage.S3Config).
AWS_VARIABLES = (
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_REGION",
    "AWS_DEFAULT_REGION",
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
)
# Lance storage options that are secrets: never sent as call inputs, rebuilt from the container's secret.
CREDENTIAL_OPTIONS = ("aws_access_key_id", "aws_secret_access_key", "aws_session_token")

log = logging.getLogger(__name__)

app = modal.App("gallerymatch-engine")

image = (
    modal.Image.debian_slim(python_version="3.11")
    .uv_sync(str(ROOT), frozen=True)
    .env({"RAY_ENABLE_UV_RUN_RUNTIME_ENV": "0"})
    .add_local_python_source("pipelines")  # the stages and their core; no storage tables, jobs or infra
)


@app.cls(gpu=GPU, image=image, timeout=3600, max_containers=MAX_CONTAINERS)
class IngestWorker:
    """One container keeps its models loaded across shards (setup once, process many)."""

    @modal.enter()
    def start(self) -> None:
        self.stages: dict[bytes, tuple[PrepareStage, EmbedStage]] = {}

    @modal.method()
    def process(self, task_blob: bytes, item_blob: bytes) -> bytes:
        """Pickled IngestTask + WorkItem (a shard URI, never the payload) -> pickled ShardOutput."""
        stages = self.__dict__.setdefault("stages", {})  # in-process `.local()` calls may skip @enter
        if task_blob not in stages:
            task = pickle.loads(task_blob)
            stages[task_blob] = (PrepareStage(task), EmbedStage(task))
        prepare, embed = stages[task_blob]
        output = embed.process(prepare.process(pickle.loads(item_blob)))
        return pickle.dumps(output, protocol=5)


@app.cls(image=image, cpu=MATCH_CPUS, memory=MATCH_MEMORY_MIB, timeout=3600, max_containers=MATCH_CONTAINERS)
class MatchWorker:
    """One container scans many units: its threads, device and filter kernel are settled once, at start.

    The filter kernel is chosen by a short timed probe of this container's CPU (`pipelines.kernels`): done in
    `@enter`, it is paid once per container, never inside a unit's timing."""

    @modal.enter()
    def start(self) -> None:
        self._warm()

    def _warm(self) -> None:
        from pipelines.kernels import kernel_report, worker_device

        self.device = worker_device("auto")
        if self.device == "cpu":
            import torch

            # A container's reservation, not every core of its host (torch's default sees the host).
            torch.set_num_threads(max(1, min(int(MATCH_CPUS), len(os.sched_getaffinity(0)))))
        report = kernel_report()  # cached for the process: every unit's "auto" kernel reads it
        import lance  # noqa: F401 - the scan library, loaded before the first unit

        self.kernel = report.kernel
        log.info("match worker on %s (%s): %s filter, %s", self.device, report.cpu_model, self.kernel, report.reason)

    @modal.method()
    def match(self, unit_blob: bytes, probes_blob: bytes) -> bytes:
        """A pickled MatchUnit (without credentials) + pickled float32 probes -> the pickled partial TopK."""
        if "kernel" not in self.__dict__:  # in-process `.local()` calls may skip @enter
            self._warm()
        unit = with_credentials(pickle.loads(unit_blob))
        probes = pickle.loads(probes_blob)
        return pickle.dumps(run_unit(unit, probes), protocol=5)


def aws_environment(environ: Mapping[str, str] | None = None) -> dict[str, str | None]:
    """The standard AWS_* variables the driver has (the only credentials a container is given)."""
    env = os.environ if environ is None else environ
    return {name: env[name] for name in AWS_VARIABLES if env.get(name)}


def without_credentials(unit: MatchUnit) -> MatchUnit:
    """The unit as it travels: its Lance options without secrets (function inputs are stored by Modal)."""
    kept = tuple((k, v) for k, v in unit.storage_options if k not in CREDENTIAL_OPTIONS)
    return dataclasses.replace(unit, storage_options=kept)


def with_credentials(unit: MatchUnit, environ: Mapping[str, str] | None = None) -> MatchUnit:
    """The unit as a container runs it: an s3:// table read with this process's AWS_* credentials (the
    Modal secret's); endpoint and region options stay as the driver planned them."""
    if not is_s3(unit.table_uri):
        return unit
    secrets = {k: v for k, v in S3Config.from_env(environ).lance_options().items() if k in CREDENTIAL_OPTIONS}
    options = dict(unit.storage_options) | secrets
    return dataclasses.replace(unit, storage_options=tuple(sorted(options.items())))


class ModalSession:
    """One ephemeral run of the engine's app and the worker handles it serves, open until `close()`.

    The workers are given the AWS_* variables the driver has when the session starts, as a Modal secret."""

    def __init__(self) -> None:
        self._stack = ExitStack()
        self._stack.enter_context(app.run())
        self._secrets = [modal.Secret.from_dict(aws_environment())]
        self._workers: dict[str, Any] = {}

    def worker(self, kind: str, gpu: bool = False) -> Any:
        """The handle of a worker class of this run: "ingest", or "match" (on a GPU when a unit asks for CUDA)."""
        key = f"{kind}{'-gpu' if gpu else ''}"
        if key not in self._workers:
            cls: Any = {"ingest": IngestWorker, "match": MatchWorker}[kind]
            options: dict[str, Any] = {"secrets": self._secrets} | ({"gpu": GPU} if gpu else {})
            self._workers[key] = cls.with_options(**options)()
        return self._workers[key]

    def close(self) -> None:
        self._workers.clear()
        self._stack.close()


@contextmanager
def _session(held: ModalSession | None) -> Iterator[ModalSession]:
    """The session the engine holds, or one of its own for this call."""
    if held is not None:
        yield held
        return
    session = ModalSession()
    try:
        yield session
    finally:
        session.close()


def _map(method: Any, *inputs: list[bytes], ordered: bool = True) -> Iterator[bytes]:
    """Modal's fan-out of one method over the inputs (one call per position): the engine's only remote call."""
    return iter(method.map(*inputs, order_outputs=ordered))


def run_modal(task: IngestTask, items: list[WorkItem], held: ModalSession | None = None) -> Iterator[ShardOutput]:
    if not items:
        return
    task_blob = pickle.dumps(task)
    with _session(held) as session:
        blobs = [pickle.dumps(item) for item in items]
        for result in _map(session.worker("ingest").process, [task_blob] * len(blobs), blobs, ordered=False):
            yield pickle.loads(result)


def match_modal(units: list[MatchUnit], probes: np.ndarray, held: ModalSession | None = None) -> list[TopK]:
    """One container call per unit; every call carries the probes (one copy per unit, as on Ray)."""
    if not units:
        return []
    local = sorted({u.table_uri for u in units if not is_s3(u.table_uri)})
    if local:
        raise Refused(
            f"the modal engine's containers cannot read the gallery at {local[0]}: "
            "put GALLERYMATCH_HOME on object storage (s3://...), or match with --engine local or ray"
        )
    probes_blob = pickle.dumps(np.ascontiguousarray(probes, dtype=np.float32), protocol=5)
    blobs = [pickle.dumps(without_credentials(unit), protocol=5) for unit in units]
    gpu = any(unit.device == "cuda" for unit in units)
    with _session(held) as session:
        results = _map(session.worker("match", gpu).match, blobs, [probes_blob] * len(blobs))
        return [pickle.loads(result) for result in results]

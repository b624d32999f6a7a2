"""Modal engine: each shard is one call to a GPU container that holds both stages.

The engine owns its runtime: the Modal app, its image and the `IngestWorker` class are defined here, and
`run_modal` runs them as an ephemeral app for one ingest. The work itself is the engine-free
`PrepareStage` + `EmbedStage`; `infra/modal_app.py` is only the deployable wrapper (schedules, entrypoint)
and nothing here imports it.

Needs a Modal account (`modal token new`). Shards must be at URIs the containers can read (object
storage), and GALLERYMATCH_HOME should point at object storage too: LanceDB on Modal Volumes is reported
not to work (modal-client#2211). The containers get the driver's standard AWS_* variables, nothing else.
Tests call `IngestWorker().process.local(...)`.
"""

from __future__ import annotations

import os
import pickle
from collections.abc import Iterator
from pathlib import Path

import modal

from pipelines.embed import EmbedStage, ShardOutput
from pipelines.prepare import PrepareStage
from pipelines.task import IngestTask, WorkItem

ROOT = Path(__file__).resolve().parents[2]
GPU = "L4"
MAX_CONTAINERS = 8  # a capped GPU pool
# What a container needs to read s3:// shards, forwarded from the driver (see pipelines.storage.S3Config).
AWS_VARIABLES = (
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_REGION",
    "AWS_DEFAULT_REGION",
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
)

app = modal.App("gallerymatch-ingest")

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


def aws_environment(environ: dict[str, str] | None = None) -> dict[str, str | None]:
    """The standard AWS_* variables the driver has (the only credentials a container is given)."""
    env = dict(os.environ) if environ is None else environ
    return {name: env[name] for name in AWS_VARIABLES if env.get(name)}


def run_modal(task: IngestTask, items: list[WorkItem]) -> Iterator[ShardOutput]:
    if not items:
        return
    task_blob = pickle.dumps(task)
    with app.run():
        worker_cls = IngestWorker.with_options(secrets=[modal.Secret.from_dict(aws_environment())])  # type: ignore[attr-defined]
        worker = worker_cls()
        blobs = [pickle.dumps(item) for item in items]
        for result in worker.process.map([task_blob] * len(blobs), blobs, order_outputs=False):
            yield pickle.loads(result)

"""Ray Data engine: a CPU prepare stage (tasks) feeding a model stage on an actor pool."""

from __future__ import annotations

import logging
import os
import pickle
from collections.abc import Iterator
from typing import Any

import numpy as np

from pipelines.embed import EmbedStage, ShardOutput
from pipelines.match_unit import MatchUnit, run_unit
from pipelines.matcher import TopK
from pipelines.prepare import PrepareStage
from pipelines.task import IngestTask, WorkItem


def start_ray(address: str | None, num_cpus: int | None) -> None:
    """Connect to a cluster, or start a local Ray when no address is configured.

    The Ray engine's runtime hook (`RayEngine.prepare_runtime`): jobs never call it themselves. Without an
    address, a driver that Ray Jobs started (RAY_ADDRESS set) joins its cluster; otherwise a new local Ray
    is started, never another user's `ray start` head found on the same machine. Local workers inherit this
    process's environment (the AWS_* variables they read s3:// shards with)."""
    os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")  # workers use this venv, not a rebuilt one
    import ray

    if ray.is_initialized():
        return
    quiet: dict[str, Any] = {"logging_level": logging.WARNING, "log_to_driver": False}
    if address:
        ray.init(address=address, **quiet)
    elif os.environ.get("RAY_ADDRESS"):
        ray.init(**quiet)
    else:
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, **quiet)
    logging.getLogger("ray.data").setLevel(logging.WARNING)


class _PrepareActor:
    """CPU stage: MTCNN is built once per actor; one row in, one prepared shard out."""

    def __init__(self, task: IngestTask):
        self.stage = PrepareStage(task)
        self.stage.setup()

    def __call__(self, row: dict[str, Any]) -> dict[str, Any]:
        return {"payload": pickle.dumps(self.stage.process(pickle.loads(row["item"])), protocol=5)}


class _EmbedActor:
    """Model stage: the embedders load once per actor; a batch of prepared shards in, outputs out.

    On CPU it is the slow stage, so it runs torch on every core of its node (or `threads`), not on the one
    thread Ray's OMP_NUM_THREADS=1 gives an actor of one CPU: the prepare actors' cores are idle whenever
    they wait for it, and its threads take that time up."""

    def __init__(self, task: IngestTask, threads: int | None, on_gpu: bool):
        if not on_gpu:
            import torch

            torch.set_num_threads(threads or len(os.sched_getaffinity(0)))
        self.stage = EmbedStage(task)
        self.stage.setup()

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        outputs = [self.stage.process(pickle.loads(payload)) for payload in batch["payload"]]
        return {"output": [pickle.dumps(out, protocol=5) for out in outputs]}


def run_ray(
    task: IngestTask,
    items: list[WorkItem],
    address: str | None,
    num_cpus: int | None,
    shards_per_batch: int,
    model_threads: int | None = None,
) -> Iterator[ShardOutput]:
    if not items:
        return
    start_ray(address, num_cpus)
    import ray
    import torch
    from ray.data import ActorPoolStrategy, DataContext

    ctx = DataContext.get_current()
    ctx.enable_progress_bars = False  # the job draws its own bar
    ctx.max_errored_blocks = 0  # never drop a block silently
    gpus = 1.0 if task.device != "cpu" and (torch.cuda.is_available() or ray.cluster_resources().get("GPU")) else 0.0
    ds: Any = ray.data.from_items([{"item": pickle.dumps(i)} for i in items], override_num_blocks=len(items))
    cpus = int(ray.cluster_resources().get("CPU", 2))
    prepare_actors = max(1, min(len(items), cpus - 1))  # leave a CPU for the model stage
    ds = ds.map(
        _PrepareActor,
        fn_constructor_args=(task,),
        compute=ActorPoolStrategy(min_size=1, max_size=prepare_actors),
        num_cpus=PrepareStage.num_cpus,
    )
    ds = ds.map_batches(
        _EmbedActor,
        fn_constructor_args=(task, model_threads, bool(gpus)),
        batch_size=shards_per_batch,
        compute=ActorPoolStrategy(size=1),
        num_cpus=0 if gpus else 1,
        num_gpus=gpus,
    )
    for row in ds.iter_rows():
        yield pickle.loads(row["output"])


def match_ray(units: list[MatchUnit], probes: np.ndarray, address: str | None, num_cpus: int | None) -> list[TopK]:
    """One Ray task per fragment range; the probe matrix is put in the object store once."""
    start_ray(address, num_cpus)
    import ray

    remote = ray.remote(num_cpus=1)(run_unit)
    probes_ref = ray.put(probes)
    return list(ray.get([remote.remote(unit, probes_ref) for unit in units]))

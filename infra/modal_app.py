"""Modal app: the same two ingest stages on Modal GPUs; the driver commits to LanceDB on object storage.

Deploy/run needs a Modal account (`modal token new`). Shards must be at URIs the containers can read
(object storage), and GALLERYMATCH_HOME should point at object storage too: LanceDB on Modal
Volumes is reported not to work (modal-client#2211). Tests call `IngestWorker().process.local(...)`.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import modal

from pipelines.embed import EmbedStage
from pipelines.prepare import PrepareStage

ROOT = Path(__file__).resolve().parents[1]

app = modal.App("gallerymatch-ingest")

image = (
    modal.Image.debian_slim(python_version="3.11")
    .uv_sync(str(ROOT), frozen=True)
    .env({"RAY_ENABLE_UV_RUN_RUNTIME_ENV": "0"})
    .add_local_python_source("pipelines", "lance_tables", "jobs", "infra")
)

GPU = "L4"
MAX_CONTAINERS = 8  # a capped GPU pool


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


@app.local_entrypoint()
def main(shards_dir: str, modality: str = "all") -> None:
    """`modal run infra/modal_app.py --shards-dir s3://...`: the ingest job with Modal as the engine."""
    from jobs.ingest import run_ingest
    from pipelines.settings import load_settings

    summary = run_ingest(load_settings(), Path(shards_dir), modality, "modal")  # type: ignore[arg-type]
    print(summary)

"""Modal engine: each shard is one call to a GPU container that holds both stages (see infra/modal_app.py)."""

from __future__ import annotations

import pickle
from collections.abc import Iterator

from pipelines.embed import ShardOutput
from pipelines.task import IngestTask, WorkItem


def run_modal(task: IngestTask, items: list[WorkItem]) -> Iterator[ShardOutput]:
    if not items:
        return
    from infra.modal_app import IngestWorker, app

    task_blob = pickle.dumps(task)
    with app.run():
        worker = IngestWorker()
        blobs = [pickle.dumps(item) for item in items]
        for result in worker.process.map([task_blob] * len(blobs), blobs, order_outputs=False):
            yield pickle.loads(result)

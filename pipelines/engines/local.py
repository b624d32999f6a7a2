"""The reference engine: the same two stages, in-process, one shard after another."""

from __future__ import annotations

from collections.abc import Iterator

from pipelines.embed import EmbedStage, ShardOutput
from pipelines.prepare import PrepareStage
from pipelines.task import IngestTask, WorkItem


def run_local(task: IngestTask, items: list[WorkItem]) -> Iterator[ShardOutput]:
    prepare, embed = PrepareStage(task), EmbedStage(task)
    for item in items:
        yield embed.process(prepare.process(item))

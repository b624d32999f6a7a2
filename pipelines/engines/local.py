"""The reference engine: the same units of work in-process (ingest: shard after shard; match: unit after unit)."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from pipelines.embed import EmbedStage, ShardOutput
from pipelines.match_unit import MatchUnit, run_unit
from pipelines.matcher import TopK
from pipelines.prepare import PrepareStage
from pipelines.task import IngestTask, WorkItem


def run_local(task: IngestTask, items: list[WorkItem]) -> Iterator[ShardOutput]:
    prepare, embed = PrepareStage(task), EmbedStage(task)
    for item in items:
        yield embed.process(prepare.process(item))


def match_local(units: list[MatchUnit], probes: np.ndarray) -> list[TopK]:
    return [run_unit(unit, probes) for unit in units]

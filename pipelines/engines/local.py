"""The reference engine: the same units of work in-process (ingest: shard after shard; match: unit after unit).

Ingest overlaps its two stages: a background thread prepares (decode, detect) the next shard while this
thread embeds the current one and the job commits it. Commits stay in shard order, in the caller's thread.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from pipelines.embed import EmbedStage, ShardOutput
from pipelines.match_unit import MatchUnit, run_unit
from pipelines.matcher import TopK
from pipelines.prefetch import read_ahead
from pipelines.prepare import PrepareStage
from pipelines.task import IngestTask, WorkItem


def run_local(task: IngestTask, items: list[WorkItem]) -> Iterator[ShardOutput]:
    prepare, embed = PrepareStage(task), EmbedStage(task)
    prepare.setup()  # here, not in the thread: the libraries are imported by one thread only
    prepared = (prepare.process(item) for item in items)
    for shard in read_ahead(prepared, depth=1, name="ingest-prepare", meanwhile=embed.setup):  # models load
        yield embed.process(shard)  # while the first shard is prepared


def match_local(units: list[MatchUnit], probes: np.ndarray) -> list[TopK]:
    return [run_unit(unit, probes) for unit in units]

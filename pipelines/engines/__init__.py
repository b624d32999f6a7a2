"""Engines run the units of work (ingest: one shard; match: one fragment range) and own their runtime.

A job opens an engine by name with plain values (`open_engine`), calls `prepare_runtime()` before it opens
LanceDB, then hands it work: `ingest(task, items)` yields one output per shard, `match(units, probes)`
returns one partial top-k per unit; `close()` releases what `prepare_runtime()` holds. A job that runs many
matches (the nightly) opens one engine for all of them:

    engine = open_engine(name, EngineOptions.from_settings(settings))
    engine.prepare_runtime()
    try:
        ... engine.match(units, probes) ...
    finally:
        engine.close()

What an engine needs to run (Ray's cluster connection, Modal's app) is its own business: no job imports Ray
or Modal. Importing this package imports neither.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, Protocol, get_args

from pipelines.errors import Refused

if TYPE_CHECKING:
    import numpy as np

    from pipelines.embed import ShardOutput
    from pipelines.engines.modal import ModalSession
    from pipelines.match_unit import MatchUnit
    from pipelines.matcher import TopK
    from pipelines.settings import Settings
    from pipelines.task import IngestTask, WorkItem

EngineName = Literal["local", "ray", "modal"]
MODAL_MATCH_CONTAINERS = 16  # the Modal match pool's cap (pipelines/engines/modal.py: MATCH_CONTAINERS)


@dataclass(frozen=True)
class EngineOptions:
    """What the engines take from settings, as plain values (no environment reads inside an engine)."""

    ray_address: str | None = None
    ray_num_cpus: int | None = None
    shards_per_batch: int = 1
    model_threads: int | None = None

    @classmethod
    def from_settings(cls, settings: Settings) -> EngineOptions:
        return cls(
            ray_address=settings.ray_address,
            ray_num_cpus=settings.ray_num_cpus,
            shards_per_batch=settings.shards_per_model_batch,
            model_threads=settings.model_threads,
        )


class Engine(Protocol):
    name: str

    def prepare_runtime(self) -> None:
        """Start or connect what the engine runs on. Call it before LanceDB is opened in this process:
        a runtime that forks or spawns helpers must not do so once LanceDB's async runtime is live."""

    def ingest(self, task: IngestTask, items: list[WorkItem]) -> Iterator[ShardOutput]: ...

    def match(self, units: list[MatchUnit], probes: np.ndarray) -> list[TopK]: ...

    def match_parts(self) -> int:
        """How many units a match should be planned in (one per worker the engine runs side by side)."""

    def close(self) -> None:
        """Release what `prepare_runtime()` holds; the engine may be prepared again. Safe to call twice."""


class _EngineBase:
    """What every engine shares: its options, and no runtime to start or release unless it says otherwise."""

    def __init__(self, options: EngineOptions | None = None):
        self.options = options or EngineOptions()

    def prepare_runtime(self) -> None:
        return None

    def close(self) -> None:
        return None

    def match_parts(self) -> int:
        return 1


class LocalEngine(_EngineBase):
    """In-process: nothing to start."""

    name = "local"

    def ingest(self, task: IngestTask, items: list[WorkItem]) -> Iterator[ShardOutput]:
        from pipelines.engines.local import run_local

        return run_local(task, items)

    def match(self, units: list[MatchUnit], probes: np.ndarray) -> list[TopK]:
        from pipelines.engines.local import match_local

        return match_local(units, probes)


class RayEngine(_EngineBase):
    """Ray Data / Ray tasks on a local Ray (started here) or the cluster at `ray_address`.

    `close()` leaves Ray up: a connection or a local Ray serves the whole process (a later `prepare_runtime()`
    finds it), and Ray shuts it down when the process exits."""

    name = "ray"

    def prepare_runtime(self) -> None:
        from pipelines.engines.ray import start_ray

        start_ray(self.options.ray_address, self.options.ray_num_cpus)

    def ingest(self, task: IngestTask, items: list[WorkItem]) -> Iterator[ShardOutput]:
        from pipelines.engines.ray import run_ray

        o = self.options
        return run_ray(task, items, o.ray_address, o.ray_num_cpus, o.shards_per_batch, o.model_threads)

    def match(self, units: list[MatchUnit], probes: np.ndarray) -> list[TopK]:
        from pipelines.engines.ray import match_ray

        return match_ray(units, probes, self.options.ray_address, self.options.ray_num_cpus)

    def match_parts(self) -> int:
        return int(self.options.ray_num_cpus or 2)


class ModalEngine(_EngineBase):
    """Modal containers (the app and workers are defined in pipelines/engines/modal.py).

    `prepare_runtime()` starts one ephemeral run of the app and keeps it until `close()`: every ingest and
    match in between uses it (one start-up for a night's matches). Without it, each call runs its own."""

    name = "modal"

    def __init__(self, options: EngineOptions | None = None):
        super().__init__(options)
        self._session: ModalSession | None = None  # the app run prepare_runtime() holds

    def prepare_runtime(self) -> None:
        if self._session is None:
            from pipelines.engines.modal import ModalSession

            self._session = ModalSession()

    def close(self) -> None:
        session, self._session = self._session, None
        if session is not None:
            session.close()

    def ingest(self, task: IngestTask, items: list[WorkItem]) -> Iterator[ShardOutput]:
        from pipelines.engines.modal import run_modal

        return run_modal(task, items, self._session)

    def match(self, units: list[MatchUnit], probes: np.ndarray) -> list[TopK]:
        from pipelines.engines.modal import match_modal

        return match_modal(units, probes, self._session)

    def match_parts(self) -> int:
        return MODAL_MATCH_CONTAINERS


ENGINES: dict[str, type[LocalEngine] | type[RayEngine] | type[ModalEngine]] = {
    "local": LocalEngine,
    "ray": RayEngine,
    "modal": ModalEngine,
}


def open_engine(name: str, options: EngineOptions | None = None) -> Engine:
    """The engine called `name`; its runtime is not started until `prepare_runtime()`."""
    if name not in ENGINES:
        raise Refused(f"unknown engine {name!r}: use one of {', '.join(get_args(EngineName))}")
    engine: Engine = ENGINES[name](options)
    return engine

"""Run an iterator ahead in a background thread, so one stage of work overlaps the next."""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import Any, TypeVar

T = TypeVar("T")
_POLL_S = 0.1


def read_ahead(
    items: Iterable[T], depth: int = 1, name: str = "read-ahead", meanwhile: Callable[[], object] | None = None
) -> Iterator[T]:
    """Yield `items` in order while a background thread produces up to `depth` of them ahead.

    `meanwhile` runs in the consumer's thread once the producer has started (loading what the consumer
    needs while the first item is produced).

    An error raised while producing an item is raised here, in the consumer, at that item's place; the
    items before it are all yielded first. When the consumer stops early (an error of its own, or it
    closes the generator), the producer stops at its next item and the thread is joined: nothing runs
    on after this generator is gone.
    """
    box: queue.Queue[tuple[str, Any]] = queue.Queue(maxsize=max(1, depth))
    stop = threading.Event()

    def put(entry: tuple[str, Any]) -> bool:
        while not stop.is_set():
            try:
                box.put(entry, timeout=_POLL_S)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for item in items:
                if stop.is_set() or not put(("item", item)):
                    return
            put(("end", None))
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer and raised there
            put(("error", exc))

    worker = threading.Thread(target=produce, name=name, daemon=True)
    worker.start()
    try:
        if meanwhile is not None:
            meanwhile()
        while True:
            kind, value = box.get()
            if kind == "end":
                return
            if kind == "error":
                raise value
            yield value
    finally:
        stop.set()
        worker.join()

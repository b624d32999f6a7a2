"""read_ahead: order kept, producer errors raised in place, an early stop stops the producer."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import pytest

from pipelines.prefetch import read_ahead


def test_order_and_overlap() -> None:
    produced: list[int] = []

    def items() -> Iterator[int]:
        for i in range(20):
            produced.append(i)
            yield i

    seen = []
    for value in read_ahead(items(), depth=2):
        time.sleep(0.002)
        seen.append(value)
        assert len(produced) - len(seen) <= 3  # never more than depth (+ the one in hand) ahead
    assert seen == list(range(20))


def test_an_error_is_raised_after_the_items_before_it() -> None:
    def items() -> Iterator[int]:
        yield 1
        yield 2
        raise ValueError("shard 3 is broken")

    seen = []
    with pytest.raises(ValueError, match="shard 3 is broken"):
        for value in read_ahead(items()):
            seen.append(value)
    assert seen == [1, 2]


def test_stopping_early_stops_the_producer() -> None:
    produced: list[int] = []

    def items() -> Iterator[int]:
        for i in range(10_000):
            produced.append(i)
            yield i

    before = threading.active_count()
    with pytest.raises(RuntimeError):
        for value in read_ahead(items(), depth=1):
            if value == 3:
                raise RuntimeError("the consumer failed")
    assert threading.active_count() == before  # the producer thread is joined
    assert len(produced) <= 6


def test_meanwhile_runs_while_the_first_item_is_produced() -> None:
    events: list[str] = []
    started = threading.Event()

    def items() -> Iterator[int]:
        started.set()
        time.sleep(0.05)
        events.append("produced")
        yield 1

    def meanwhile() -> None:
        assert started.wait(5)
        events.append("meanwhile")

    assert list(read_ahead(items(), meanwhile=meanwhile)) == [1]
    assert events == ["meanwhile", "produced"]

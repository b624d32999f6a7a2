"""The gallery writer lock: writers share it; erasure takes it alone, or refuses."""

from __future__ import annotations

import fcntl
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import wraps
from pathlib import Path
from typing import Any, ParamSpec, TypeVar

from pipelines.errors import Refused

P = ParamSpec("P")
R = TypeVar("R")


@contextmanager
def writer_lock(home: Path, exclusive: bool = False) -> Iterator[None]:
    """Shared: blocks while an erasure runs. Exclusive: refuses at once when any other writer runs."""
    folder = home / "locks"
    folder.mkdir(parents=True, exist_ok=True)
    with (folder / "writer.lock").open("a") as handle:
        try:
            fcntl.flock(handle, (fcntl.LOCK_EX | fcntl.LOCK_NB) if exclusive else fcntl.LOCK_SH)
        except BlockingIOError as exc:
            raise Refused(
                "another writer (ingest, import, match, ...) is running: erasure cannot guarantee "
                "removal while it runs; nothing was removed, try again when it has finished"
            ) from exc
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def holds_writer_lock(func: Callable[P, R]) -> Callable[P, R]:
    """For job functions whose first argument is the Settings."""

    @wraps(func)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        settings: Any = args[0]
        with writer_lock(settings.home):
            return func(*args, **kwargs)

    return wrapper

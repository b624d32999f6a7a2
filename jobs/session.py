"""A writer command's session: take the writer lease, finish or close what a crashed writer left, then work."""

from __future__ import annotations

import os
import socket
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import wraps
from typing import Any, ParamSpec, TypeVar

from pipelines import storage as area
from pipelines.audit import AuditLog
from pipelines.locks import current_lease, writer_lock
from pipelines.results import find_run, sweep
from pipelines.settings import Settings

P = ParamSpec("P")
R = TypeVar("R")


@contextmanager
def writer_session(settings: Settings, command: str, exclusive: bool = False) -> Iterator[AuditLog]:
    """Hold the lease; on first entry, recover (unfinished erasures, orphaned result parts, dead intents)."""
    outer = current_lease(settings.store) is None
    with writer_lock(settings.store, exclusive, settings.lock_wait_s, settings.lock_ttl_s, command):
        log = AuditLog.of(settings)
        if outer:
            recover_home(settings, log)
        yield log


def writer_job(func: Callable[P, R]) -> Callable[P, R]:
    """For job functions whose first argument is the Settings."""

    @wraps(func)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        settings: Any = args[0]
        with writer_session(settings, func.__qualname__):
            return func(*args, **kwargs)

    return wrapper


def recover_home(settings: Settings, log: AuditLog) -> dict[str, Any]:
    """Idempotent, under the lease: finish interrupted erasures first, then tidy and close the record."""
    from jobs.erase import resume_unfinished

    torn = drop_torn_objects(settings)
    resumed = resume_unfinished(settings, log)
    swept = sweep(settings.store)
    closed = close_dead_intents(settings, log)
    return {
        "torn_objects_dropped": torn,
        "erasures_resumed": resumed,
        "result_objects_swept": len(swept),
        "intents_closed": closed,
    }


WRITER_ONLY = (
    f"{area.ERASURE}/",
    f"{area.RESULTS}/",
    f"{area.MANIFESTS}/",
    f"{area.STAGING}/",
)  # only the lease holder creates objects here


def drop_torn_objects(settings: Settings) -> int:
    """What writers killed inside `create` left in the writer-only folders: a copy of the vectors an erasure
    journals (failing every later byte scan), a result part. The lease and the audit trail are also written by
    processes without the lease, so their folders are left alone."""
    return sum(settings.store.drop_incomplete(prefix) for prefix in WRITER_ONLY)


def close_dead_intents(settings: Settings, log: AuditLog) -> list[int]:
    """Every intent of a process that died gets its outcome: a match whose run was committed is audited as
    done (the search was made), anything else as interrupted (its rerun is idempotent).

    Runs after `resume_unfinished`, which closed the intents of the erasures it finished; an erase intent still
    open here died before its plan was recorded, or while retrying a plan whose check failed (`erase` retries it)."""
    closed = []
    for intent, owner in log.open_intents():
        if not _dead(owner, log.lease):
            continue  # live owners are left alone
        run = find_run(settings.store, str(intent.get("run_id"))) if intent.get("run_id") else None
        if run is not None:
            log.close_intent(intent, "ok", recovered=True, counts={"candidates": run.get("candidates")})
        else:
            log.close_intent(intent, "interrupted", recovered=True)
        closed.append(int(intent["seq"]))
    return closed


def _dead(owner: dict[str, Any], lease: str | None) -> bool:
    if owner.get("lease") and owner.get("lease") != lease:
        return True  # we hold the lease, so its holder is gone
    if owner.get("host") == socket.gethostname() and owner.get("pid") != os.getpid():
        try:
            os.kill(int(owner["pid"]), 0)
        except ProcessLookupError:
            return True
        except (PermissionError, ValueError, TypeError):
            return False
    return False

"""The writer lease: one writer at a time per home, built on create-if-absent alone (no flock, no rename).

The lease is an object `locks/writer.json` naming its owner (host, pid) and a time-to-live; a heartbeat
thread renews it by creating renewal objects. A lease is stale when its owner is a dead process on this
host, or when it was not renewed within its time-to-live (a crashed holder elsewhere). A stale lease is
broken by whoever first creates its break marker, so two waiters never both take over. Re-entrant within
a process. Writers wait for each other; erasure refuses at once when another writer holds the lease.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from functools import wraps
from typing import Any, ParamSpec, TypeVar

from pipelines import storage as area
from pipelines.errors import Refused
from pipelines.objectstore import ObjectStore

P = ParamSpec("P")
R = TypeVar("R")
LEASE = f"{area.LOCKS}/writer.json"
RENEWALS = f"{area.LOCKS}/renewals/"
BREAKS = f"{area.LOCKS}/breaks/"
_held: dict[str, tuple[str, int]] = {}  # store location -> (lease id, depth) held by this process
_guard = threading.Lock()


@dataclass(frozen=True)
class Lease:
    lease_id: str
    host: str
    pid: int
    command: str
    acquired_at: float
    ttl_s: float

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), sort_keys=True).encode()


def current_lease(store: ObjectStore) -> str | None:
    """The lease id this process holds on `store`, if any."""
    held = _held.get(store.location(LEASE))
    return held[0] if held else None


@contextmanager
def writer_lock(
    store: ObjectStore, exclusive: bool = False, wait_s: float = 900.0, ttl_s: float = 120.0, command: str = ""
) -> Iterator[str]:
    """Hold the home's writer lease. `exclusive` (erasure) refuses at once instead of waiting."""
    where = store.location(LEASE)
    with _guard:
        if where in _held:
            lease_id, depth = _held[where]
            _held[where] = (lease_id, depth + 1)
            reentered = True
        else:
            reentered = False
    if reentered:
        try:
            yield lease_id
        finally:
            with _guard:
                _held[where] = (lease_id, _held[where][1] - 1)
        return
    lease = _acquire(store, 0.0 if exclusive else wait_s, ttl_s, command)
    stop = threading.Event()
    beat = threading.Thread(target=_heartbeat, args=(store, lease, stop), daemon=True)
    beat.start()
    with _guard:
        _held[where] = (lease.lease_id, 1)
    try:
        yield lease.lease_id
    finally:
        with _guard:
            _held.pop(where, None)
        stop.set()
        beat.join()
        _release(store, lease)


def _acquire(store: ObjectStore, wait_s: float, ttl_s: float, command: str) -> Lease:
    deadline = time.monotonic() + wait_s
    while True:
        lease = Lease(uuid.uuid4().hex, socket.gethostname(), os.getpid(), command[:200], time.time(), ttl_s)
        if store.create(LEASE, lease.to_json()):
            return lease
        holder = _read(store)
        if holder is not None and _stale(store, holder):
            _break(store, holder)
            continue
        if time.monotonic() >= deadline:
            raise Refused(_busy_message(holder, wait_s))
        time.sleep(0.2)


def _busy_message(holder: Lease | None, waited: float) -> str:
    who = f"{holder.command or 'a command'} (pid {holder.pid} on {holder.host})" if holder else "another writer"
    what = "erasure cannot guarantee removal while it runs" if waited == 0 else f"waited {waited:.0f} s"
    return f"another writer holds the home's writer lease: {who}; {what}. Nothing was done; rerun when it has finished."


def _read(store: ObjectStore) -> Lease | None:
    data = store.read(LEASE)
    if data is None:
        return None
    try:
        return Lease(**json.loads(data))
    except (ValueError, TypeError):
        return Lease("unreadable", "", 0, "", 0.0, 0.0)  # a torn lease cannot come from create: treat as stale


def _last_renewal(store: ObjectStore, lease: Lease) -> float:
    keys = store.list(f"{RENEWALS}{lease.lease_id}/")
    return max([lease.acquired_at, *(float(k.rsplit("/", 1)[-1]) / 1000 for k in keys)])


def _stale(store: ObjectStore, lease: Lease) -> bool:
    if lease.host == socket.gethostname() and not _alive(lease.pid):
        return True
    return time.time() - _last_renewal(store, lease) > lease.ttl_s


def _alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _break(store: ObjectStore, lease: Lease) -> None:
    """Only the waiter that creates the break marker removes the stale lease."""
    stamp = dt.datetime.now(dt.UTC).isoformat().encode()
    if store.create(f"{BREAKS}{lease.lease_id}", stamp):
        _release(store, lease)


def _heartbeat(store: ObjectStore, lease: Lease, stop: threading.Event) -> None:
    """Renew every quarter of the time-to-live; only the newest renewal is kept (a long job leaves one object,
    and a waiter's check lists one or two, not one per renewal since the start)."""
    previous: str | None = None
    while not stop.wait(lease.ttl_s / 4):
        renewal = f"{RENEWALS}{lease.lease_id}/{int(time.time() * 1000):015d}"
        try:
            store.create(renewal, b"")
            if previous is not None:
                store.delete(previous)
            previous = renewal
        except Exception:  # noqa: BLE001 - S3 and network errors too: a dead heartbeat would let the lease expire
            continue  # a missed renewal only shortens the lease; the next one may succeed


def _release(store: ObjectStore, lease: Lease) -> None:
    for key in store.list(f"{RENEWALS}{lease.lease_id}/"):
        store.delete(key)
    holder = _read(store)
    if holder is not None and holder.lease_id == lease.lease_id:
        store.delete(LEASE)
    store.delete(f"{BREAKS}{lease.lease_id}")


def holds_writer_lock(func: Callable[P, R]) -> Callable[P, R]:
    """For job functions whose first argument is the Settings: they run holding the writer lease."""

    @wraps(func)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        settings: Any = args[0]
        with writer_lock(settings.store, False, settings.lock_wait_s, settings.lock_ttl_s, func.__qualname__):
            return func(*args, **kwargs)

    return wrapper

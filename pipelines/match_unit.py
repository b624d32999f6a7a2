"""One unit of matching work: a range of gallery fragments at a pinned version, read from Lance and scanned
in blocks, with the filter kernel that the worker's own CPU runs fastest (`pipelines.kernels`).

The next blocks are read on a background thread while the current one is scored (Lance and the BLAS product
release the GIL), so reading the vector column overlaps the filter product instead of adding to it.
"""

from __future__ import annotations

import contextlib
import queue
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from pipelines.kernels import (  # noqa: F401 - re-exported: the kernel's names as callers knew them here
    CLEARLY_SLOWER,
    INT8_FLAGS,
    INT8_GAIN,
    PROBE_DIM,
    PROBE_REPEATS,
    PROBE_ROWS,
    VECTOR_FLAGS,
    X86,
    FilterTiming,
    KernelChoice,
    KernelReport,
    choose_filter_kernel,
    cpu_kernel_report,
    decide_filter_kernel,
    int8_capable,
    kernel_report,
    parse_cpuinfo,
    time_filters,
    unit_kernel,
)
from pipelines.kernels import worker_device as _device
from pipelines.matcher import FILTER_KERNELS, INT8_MIN_PROBES, ProbeSet, TopK, score_block  # noqa: F401

SCAN_BATCH = 4096  # Lance rows per scan batch at most (measured on an AVX2 EPYC: 16,384-row batches of 512-d
# vectors scanned ~5x slower, in wall and CPU time, than 2,048-4,096; 1,024 no faster)
PREFETCH = 2  # blocks read ahead of the one being scored (each a block_rows x d float32 buffer)


@dataclass(frozen=True)
class MatchUnit:
    """Everything a worker needs; the probes travel separately (one copy per worker)."""

    table_uri: str
    version: int
    fragment_ids: tuple[int, ...]
    where: str
    k: int
    block_rows: int
    device: str = "cpu"
    kernel: str = "auto"  # "auto": choose_filter_kernel on the worker; "int8" or "float32" forces it
    storage_options: tuple[tuple[str, str], ...] = ()  # how the worker reaches an s3:// table (Lance options)


def run_unit(unit: MatchUnit, probes: np.ndarray) -> TopK:
    """Top-k (plus boundary ties) of every probe over this unit's fragments; one filter product per block."""
    import lance

    dataset = lance.dataset(unit.table_uri, version=unit.version, storage_options=dict(unit.storage_options) or None)
    device = _device(unit.device)
    queries = ProbeSet.build(probes, device, unit_kernel(unit.kernel, len(probes), device))
    top = TopK(len(probes), unit.k)
    for vectors, rowids in _read_ahead(_unit_blocks(dataset, unit, PREFETCH + 2), PREFETCH):
        top.add(*score_block(queries, top, vectors, rowids))
    top.compact()
    return top


def _unit_blocks(dataset: Any, unit: MatchUnit, buffers: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """The unit's blocks, fragment after fragment, copied blocks cycling through `buffers` arrays."""
    pool = BlockBuffers(buffers)
    for fragment_id in unit.fragment_ids:
        yield from _fragment_blocks(dataset, fragment_id, unit, pool)


class BlockBuffers:
    """`count` float32 work arrays handed out in turn (made on first use, remade when a shape changes):
    an array handed out stays untouched until `count` - 1 more have been."""

    def __init__(self, count: int = 1) -> None:
        self.count, self.turn = max(1, count), 0
        self.arrays: list[np.ndarray] = []

    def take(self, shape: tuple[int, int]) -> np.ndarray:
        index, self.turn = self.turn, (self.turn + 1) % self.count
        if index == len(self.arrays):
            self.arrays.append(np.empty(shape, np.float32))
        elif self.arrays[index].shape != shape:
            self.arrays[index] = np.empty(shape, np.float32)
        return self.arrays[index]


def _read_ahead(blocks: Iterator[tuple[np.ndarray, np.ndarray]], depth: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """`blocks`, produced on a background thread up to `depth` ahead of the consumer; its errors are raised here.

    A block's buffer is refilled only `depth` + 2 blocks later, after the consumer has asked for the block
    that follows it (see `_fragment_blocks`); a consumer that stops early stops the thread."""
    if depth <= 0:
        yield from blocks
        return
    ready: queue.Queue[Any] = queue.Queue(maxsize=depth)
    stop = threading.Event()
    done = object()

    def produce() -> None:
        try:
            for item in blocks:
                while not stop.is_set():
                    try:
                        ready.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            ready.put(done)
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer, raised there
            ready.put(exc)

    thread = threading.Thread(target=produce, name="match-read-ahead", daemon=True)
    thread.start()
    try:
        while True:
            item = ready.get()
            if item is done:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        while thread.is_alive():
            with contextlib.suppress(queue.Empty):  # unblock a producer waiting to put
                ready.get(timeout=0.1)
        thread.join()


def _fragment_blocks(
    dataset: Any, fragment_id: int, unit: MatchUnit, pool: BlockBuffers | None = None
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Blocks of up to `block_rows` vectors of one fragment, filled from small scan batches.

    Small Lance batches scan faster and hold less memory; blocks never span fragments, so every engine
    (whatever fragments its units hold) reads the same blocks. Scores never depend on blocks (see matcher).
    A block that is not a slice of one batch is copied into an array of `pool` (one array of its own without
    a pool): a yielded block stays valid until the pool has handed out its other arrays.
    """
    pool = BlockBuffers() if pool is None else pool
    fragment = dataset.get_fragment(fragment_id)
    if fragment is None:
        raise RuntimeError(f"fragment {fragment_id} is missing from version {unit.version} of {unit.table_uri}")
    scanner = dataset.scanner(
        columns=["vector"],
        filter=unit.where,
        with_row_id=True,
        batch_size=min(SCAN_BATCH, unit.block_rows),
        late_materialization=True,  # filter column first, then the vectors taken (measured ~2x faster)
        fragments=[fragment],
        scan_in_order=True,
    )
    block: np.ndarray | None = None
    ids = np.zeros(unit.block_rows, np.int64)
    filled = 0
    for batch in scanner.to_batches():
        rows, offset = batch.num_rows, 0
        vectors = batch.column("vector").flatten().to_numpy(zero_copy_only=False).reshape(rows, -1) if rows else None
        rowids = batch.column("_rowid").to_numpy() if rows else None
        while offset < rows:
            assert vectors is not None and rowids is not None
            if filled == 0 and rows - offset >= unit.block_rows:  # a whole block in the batch: no copy
                yield vectors[offset : offset + unit.block_rows], rowids[offset : offset + unit.block_rows]
                offset += unit.block_rows
                continue
            if block is None:
                block = pool.take((unit.block_rows, vectors.shape[1]))
            take = min(rows - offset, unit.block_rows - filled)
            block[filled : filled + take] = vectors[offset : offset + take]
            ids[filled : filled + take] = rowids[offset : offset + take]
            filled, offset = filled + take, offset + take
            if filled == unit.block_rows:
                yield block, ids.copy()
                block, filled = None, 0
    if block is not None and filled:
        yield block[:filled], ids[:filled].copy()

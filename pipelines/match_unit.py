"""One unit of matching work: a range of gallery fragments at a pinned version, read from Lance and scanned
in blocks, with the filter kernel that the worker's own CPU runs fastest (`pipelines.kernels`)."""

from __future__ import annotations

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

SCAN_BATCH = 16_384  # Lance rows per scan batch at most (measured: large batches scan slower)


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
    for fragment_id in unit.fragment_ids:
        for vectors, rowids in _fragment_blocks(dataset, fragment_id, unit):
            top.add(*score_block(queries, top, vectors, rowids))
    top.compact()
    return top


def _fragment_blocks(dataset: Any, fragment_id: int, unit: MatchUnit) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Blocks of up to `block_rows` vectors of one fragment, filled from small scan batches.

    Small Lance batches scan faster and hold less memory; blocks never span fragments, so every engine
    (whatever fragments its units hold) reads the same blocks. Scores never depend on blocks (see matcher).
    """
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
                block = np.empty((unit.block_rows, vectors.shape[1]), np.float32)
            take = min(rows - offset, unit.block_rows - filled)
            block[filled : filled + take] = vectors[offset : offset + take]
            ids[filled : filled + take] = rowids[offset : offset + take]
            filled, offset = filled + take, offset + take
            if filled == unit.block_rows:
                yield block, ids.copy()
                filled = 0
    if block is not None and filled:
        yield block[:filled], ids[:filled].copy()

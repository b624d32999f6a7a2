"""One unit of matching work: a range of gallery fragments at a pinned version, scanned in blocks."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pipelines.matcher import TopK, probe_tensor, score_block


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


def run_unit(unit: MatchUnit, probes: np.ndarray) -> TopK:
    """Top-k (plus boundary ties) of every probe over this unit's fragments; one GEMM per block."""
    import lance

    dataset = lance.dataset(unit.table_uri, version=unit.version)
    device = _device(unit.device)
    queries = probe_tensor(probes, device)
    top = TopK(len(probes), unit.k)
    for fragment_id in unit.fragment_ids:
        fragment = dataset.get_fragment(fragment_id)
        if fragment is None:
            raise RuntimeError(f"fragment {fragment_id} is missing from version {unit.version} of {unit.table_uri}")
        scanner = dataset.scanner(
            columns=["vector"],
            filter=unit.where,
            with_row_id=True,
            batch_size=unit.block_rows,
            fragments=[fragment],
            scan_in_order=True,
        )
        for batch in scanner.to_batches():
            if batch.num_rows == 0:
                continue
            column = batch.column("vector")
            vectors = column.values.to_numpy(zero_copy_only=False).reshape(batch.num_rows, -1)
            rowids = batch.column("_rowid").to_numpy().astype(np.int64)
            top.add(*score_block(queries, vectors, rowids, unit.k, device))
    return top


def _device(setting: str) -> str:
    from pipelines.models import resolve_device

    return resolve_device(setting)

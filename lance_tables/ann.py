"""The approximate path: a LanceDB IVF_PQ index on a gallery table, searched at a pinned version."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from pipelines.errors import Refused
from pipelines.matcher import TopK

MIN_ROWS = 1024  # PQ training needs a few hundred rows per code; below this exact matching is cheap anyway


def has_vector_index(table: Any) -> bool:
    return any("vector" in (index.columns or []) for index in table.list_indices())


def ensure_ivf_pq(table: Any) -> None:
    """Build the index once (cosine metric); later rows are searched flat until it is rebuilt or optimised."""
    if has_vector_index(table):
        return
    rows = table.count_rows()
    if rows < MIN_ROWS:
        raise Refused(
            f"the gallery has {rows} vectors: too few for an IVF_PQ index (needs {MIN_ROWS}); "
            "exact matching is the right tool at this size"
        )
    dim = table.schema.field("vector").type.list_size
    table.create_index(
        metric="cosine",
        index_type="IVF_PQ",
        vector_column_name="vector",
        num_partitions=max(1, int(math.sqrt(rows))),
        num_sub_vectors=_sub_vectors(dim),
    )


def _sub_vectors(dim: int) -> int:
    for size in (8, 4, 2, 1):  # 8-wide sub-vectors when the width allows
        if dim % size == 0:
            return dim // size
    return 1


def search_ivf_pq(table: Any, probes: np.ndarray, where: str, k: int, nprobes: int, refine: int) -> TopK:
    """All probes in one call; scores are cosine similarities (1 - cosine distance)."""
    top = TopK(len(probes), k)
    if len(probes) == 0:
        return top
    query = (
        table.search(probes.astype(np.float32), vector_column_name="vector")
        .distance_type("cosine")
        .where(where, prefilter=True)
        .limit(k)
        .nprobes(nprobes)
        .refine_factor(refine)
        .with_row_id(True)
        .select(["_rowid"])
    )
    found = query.to_arrow()
    qidx = (
        found.column("query_index").to_numpy()
        if "query_index" in found.column_names
        else np.zeros(found.num_rows, np.int64)
    )
    dist = found.column("_distance").to_numpy()
    rowid = found.column("_rowid").to_numpy().astype(np.int64)
    top.add(qidx.astype(np.int64), (1.0 - dist).astype(np.float32), rowid)  # at most k rows per probe
    top.compact()
    return top

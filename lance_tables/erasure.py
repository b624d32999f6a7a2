"""Physical removal from Lance tables: delete by opaque key, rewrite fragments, rebuild indexes, drop old versions."""

from __future__ import annotations

import datetime as dt
import math
from typing import Any

import numpy as np

from lance_tables.store import Gallery
from pipelines.sql import sql_list

BATCH = 500  # keys per delete predicate


def tagged(gallery: Gallery, names: list[str]) -> dict[str, list[str]]:
    """Tables with tagged versions: a tag pins an old version that cleanup would have to keep."""
    out = {}
    for name in names:
        table = gallery.open(name)
        if table is not None and table.tags.list():
            out[name] = sorted(table.tags.list())
    return out


def delete_keys(gallery: Gallery, name: str, column: str, keys: list[str]) -> int:
    """Delete rows by opaque key (the predicate text is stored in Lance's transaction files)."""
    table = gallery.open(name)
    if table is None or not keys:
        return 0
    before = table.count_rows()
    for start in range(0, len(keys), BATCH):
        table.delete(f"{column} IN {sql_list(keys[start : start + BATCH])}")
    return int(before - table.count_rows())


def purge(gallery: Gallery, name: str, delete_unverified: bool = True) -> dict[str, Any]:
    """Make deletions physical: compaction materialises every deletion, indexes are rebuilt, old versions go.

    `delete_unverified` also removes files no version references (crashed writers' leftovers); only safe
    while no other writer runs (erasure holds the writer lock alone).
    """
    table = gallery.open(name)
    if table is None:
        return {}
    dataset = table.to_lance()
    dataset.optimize.compact_files(
        materialize_deletions=True, materialize_deletions_threshold=0.0, defer_index_remap=False
    )
    table.checkout_latest()
    rebuilt = [_rebuild_index(table, index) for index in table.list_indices() if "vector" in (index.columns or [])]
    stats = table.to_lance().cleanup_old_versions(
        older_than=dt.timedelta(0), delete_unverified=delete_unverified, error_if_tagged_old_versions=True
    )
    table.checkout_latest()
    return {
        "version": int(table.version),
        "indexes_rebuilt": rebuilt,
        "versions_left": len(table.list_versions()),
        "old_versions_removed": int(getattr(stats, "old_versions", 0)),
        "bytes_removed": int(getattr(stats, "bytes_removed", 0)),
    }


def _rebuild_index(table: Any, index: Any) -> str:
    """Recreate a vector index of the same kind over the remaining rows (no entry of an erased row survives)."""
    from lancedb.index import HnswPq, HnswSq, IvfFlat, IvfPq

    rows = table.count_rows()
    dim = table.schema.field("vector").type.list_size
    if rows < 256:
        table.drop_index(index.name)
        return f"{index.index_type} dropped ({rows} rows left: too few to train)"
    parts = max(1, int(math.sqrt(rows)))
    kinds = {
        "IvfPq": lambda: IvfPq(distance_type="cosine", num_partitions=parts, num_sub_vectors=_sub(dim)),
        "IvfHnswSq": lambda: HnswSq(distance_type="cosine", num_partitions=max(1, parts // 8)),
        "IvfHnswPq": lambda: HnswPq(
            distance_type="cosine", num_partitions=max(1, parts // 8), num_sub_vectors=_sub(dim)
        ),
        "IvfFlat": lambda: IvfFlat(distance_type="cosine", num_partitions=parts),
    }
    make = kinds.get(index.index_type)
    if make is None:
        table.drop_index(index.name)
        return f"{index.index_type} dropped (no rebuild recipe)"
    table.create_index("vector", config=make(), replace=True, name=index.name)
    return str(index.index_type)


def _sub(dim: int) -> int:
    return next((dim // s for s in (8, 4, 2, 1) if dim % s == 0), 1)


def vector_patterns(vectors: list[np.ndarray]) -> list[bytes]:
    """The bytes an erased vector would leave behind: float32 and float16 encodings."""
    out = []
    for vector in vectors:
        out.append(np.asarray(vector, dtype=np.float32).tobytes())
        out.append(np.asarray(vector, dtype=np.float16).tobytes())
    return out


def present(gallery: Gallery, name: str, column: str, keys: list[str]) -> int:
    """How many of `keys` the table still holds (0 once a delete step has run)."""
    if gallery.open(name) is None or not keys:
        return 0
    return sum(gallery.count(name, f"{column} IN {sql_list(keys[i : i + BATCH])}") for i in range(0, len(keys), BATCH))


def kept_vector_bytes(gallery: Gallery, names: tuple[str, ...], wanted: set[bytes]) -> set[bytes]:
    """Which of the `wanted` float32 encodings a row still in the tables holds (same bytes, another row)."""
    found: set[bytes] = set()
    for name in names:
        table = gallery.open(name)
        if table is None or not wanted:
            continue
        for batch in table.to_lance().to_batches(columns=["vector"]):
            for vector in batch.column("vector").to_numpy(zero_copy_only=False):
                raw = np.asarray(vector, dtype=np.float32).tobytes()
                if raw in wanted:
                    found.add(raw)
    return found


def erased_ids(gallery: Gallery) -> frozenset[str]:
    table = gallery.read("erased", columns=["image_id"])
    return frozenset(table.column("image_id").to_pylist()) if table.num_columns else frozenset()

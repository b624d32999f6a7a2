"""What the nightly reads from a gallery table at a pinned version: the rows written since a version (one
scan, in blocks), the stamps of a run's candidates, and the weights the rows were made with."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow.compute as pc

from pipelines.delta import DELTA_BASIS, DeltaBlock
from pipelines.match_unit import SCAN_BATCH
from pipelines.sql import sql_list

IDS_PER_QUERY = 5_000  # gallery ids per IN (...) predicate


@dataclass(frozen=True)
class PinnedTable:
    """One gallery table at the version a run reads (workers open it from the uri and options)."""

    name: str
    uri: str
    version: int
    options: dict[str, str]

    @property
    def id_column(self) -> str:
        return "face_id" if self.name == "faces" else "embedding_id"

    def dataset(self) -> Any:
        import lance

        return lance.dataset(self.uri, version=self.version, storage_options=self.options or None)

    def stamped(self) -> bool:
        """Whether the table has the write stamp yet (every gallery write adds it)."""
        return DELTA_BASIS in self.dataset().schema.names


def written_since(table: PinnedTable, version: int) -> str | None:
    """A predicate for the rows written after `version`; None when no row was ever stamped (then nothing was
    written since the stamp was introduced: every write adds the column)."""
    return f"{DELTA_BASIS} >= {int(version)}" if table.stamped() else None


def count_rows(table: PinnedTable, where: str) -> int:
    return int(table.dataset().count_rows(filter=where))


def written_before(table: PinnedTable, version: int) -> str:
    """A predicate for the rows last written at or before `version` (all rows when none is stamped yet)."""
    if not table.stamped():
        return "true"
    return f"({DELTA_BASIS} < {int(version)} OR {DELTA_BASIS} IS NULL)"


def written_unstamped(table: PinnedTable) -> str:
    """A predicate for the rows that carry no stamp (all rows when the column does not exist yet)."""
    return f"{DELTA_BASIS} IS NULL" if table.stamped() else "true"


def delta_blocks(table: PinnedTable, where: str, block_rows: int) -> Iterator[DeltaBlock]:
    """One pass over the rows matching `where` (the filter columns first, then only those rows' vectors)."""
    scanner = table.dataset().scanner(
        columns=["vector", "minor", DELTA_BASIS, "weights_digest"],
        filter=where,
        with_row_id=True,
        batch_size=max(1, min(SCAN_BATCH, block_rows)),
        late_materialization=True,
    )
    for batch in scanner.to_batches():
        rows = batch.num_rows
        if not rows:
            continue
        yield DeltaBlock(
            vectors=batch.column("vector").flatten().to_numpy(zero_copy_only=False).reshape(rows, -1),
            rowids=batch.column("_rowid").to_numpy().astype(np.int64),
            minor=batch.column("minor").to_numpy(zero_copy_only=False).astype(bool),
            stamp=batch.column(DELTA_BASIS).to_numpy(zero_copy_only=False).astype(np.int64),
            weights=batch.column("weights_digest").to_numpy(zero_copy_only=False),
        )


def stamps_of(table: PinnedTable, gallery_ids: list[str]) -> dict[str, int | None]:
    """gallery id -> write stamp (None: written before stamps existed) of those of `gallery_ids` present."""
    dataset = table.dataset()
    stamped = DELTA_BASIS in dataset.schema.names
    columns = [table.id_column, DELTA_BASIS] if stamped else [table.id_column]
    found: dict[str, int | None] = {}
    unique = sorted(set(gallery_ids))
    for lo in range(0, len(unique), IDS_PER_QUERY):
        chunk = unique[lo : lo + IDS_PER_QUERY]
        rows = dataset.to_table(columns=columns, filter=f"{table.id_column} IN {sql_list(chunk)}")
        ids = rows.column(table.id_column).to_pylist()
        stamps = rows.column(DELTA_BASIS).to_pylist() if stamped else [None] * len(ids)
        found.update(zip(ids, stamps, strict=True))
    return found


def weights_of(table: PinnedTable, where: str) -> tuple[str, ...]:
    """The distinct weights digests of the rows matching `where`."""
    rows = table.dataset().to_table(columns=["weights_digest"], filter=where)
    return tuple(sorted(str(v) for v in pc.unique(rows.column("weights_digest")).to_pylist() if v is not None))

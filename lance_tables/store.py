"""The gallery's LanceDB database: open tables, keyed upserts, counts."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import Any

import pyarrow as pa

from lance_tables.schemas import FIXED, KEYS, image_embeddings_schema
from pipelines.errors import Refused


def sql_list(values: list[str]) -> str:
    """A SQL IN-list of opaque ids (hex digests and the like; quotes are escaped anyway)."""
    return "(" + ", ".join("'" + v.replace("'", "''") + "'" for v in values) + ")"


class Gallery:
    """All gallery tables under one LanceDB directory; only this class writes them."""

    def __init__(self, lance_dir: Path):
        import lancedb

        lance_dir.mkdir(parents=True, exist_ok=True)
        self.path = lance_dir
        self.db = lancedb.connect(str(lance_dir), read_consistency_interval=timedelta(0))

    def names(self) -> list[str]:
        return sorted(self.db.list_tables().tables)

    def open(self, name: str) -> Any | None:
        return self.db.open_table(name) if name in self.names() else None

    def ensure(self, name: str, schema: pa.Schema | None = None) -> Any:
        """Open a table, creating it (from its declared schema) when missing."""
        table = self.open(name)
        if table is not None:
            return table
        schema = schema if schema is not None else FIXED[name]
        return self.db.create_table(name, schema=schema, exist_ok=True)

    def ensure_image_embeddings(self, dim: int) -> Any:
        table = self.open("image_embeddings")
        if table is None:
            return self.ensure("image_embeddings", image_embeddings_schema(dim))
        have = table.schema.field("vector").type.list_size
        if have != dim:
            raise Refused(
                f"the image_embeddings table holds {have}-d vectors; this model gives {dim}-d. "
                "Use a model of the same width, or a separate GALLERYMATCH_HOME for the other model."
            )
        return table

    def upsert(self, name: str, rows: pa.Table, scope: str | None = None) -> None:
        """Keyed insert-or-update in one commit; rows matching `scope` but absent from `rows` are deleted."""
        if rows.num_rows == 0 and scope is None:
            return
        table = self.ensure(name, rows.schema)
        merge = table.merge_insert(KEYS[name]).when_matched_update_all().when_not_matched_insert_all()
        if scope is not None:
            merge = merge.when_not_matched_by_source_delete(scope)
        merge.execute(rows)

    def count(self, name: str, where: str | None = None) -> int:
        table = self.open(name)
        return 0 if table is None else int(table.count_rows(where))

    def version(self, name: str) -> int | None:
        table = self.open(name)
        return None if table is None else int(table.version)

    def read(self, name: str, columns: list[str] | None = None, where: str | None = None) -> pa.Table:
        table = self.open(name)
        if table is None:
            return pa.table({})
        query = table.search()
        if where:
            query = query.where(where)
        if columns:
            query = query.select(columns)
        return query.limit(None).to_arrow()

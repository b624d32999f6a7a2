"""The gallery's LanceDB database: open tables, keyed upserts, counts."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pyarrow as pa

from pipelines.delta import DELTA_BASIS
from pipelines.errors import Refused
from pipelines.schemas import FIXED, GALLERY_TABLES, KEYS, image_embeddings_schema
from pipelines.storage import Storage


class Gallery:
    """All gallery tables under one LanceDB directory; only this class writes them."""

    def __init__(self, storage: Storage):
        import lancedb

        self.storage = storage
        self.uri = storage.lance_uri
        self.options = storage.lance_options
        self.db = lancedb.connect(self.uri, read_consistency_interval=timedelta(0), storage_options=self.options)

    def table_uri(self, name: str) -> str:
        """The Lance dataset of one table (workers open it with `self.options`)."""
        return f"{self.uri}/{name}.lance"

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

    def add_declared_columns(self, name: str) -> None:
        """Bring an existing fixed-schema table up to its declared schema (new nullable columns, all null)."""
        table = self.open(name)
        if table is not None:
            _add_missing_columns(table, FIXED[name])

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
        """Keyed insert-or-update in one commit; rows matching `scope` but absent from `rows` are deleted.

        Rows of the gallery tables are stamped with the version the commit starts from (`DELTA_BASIS`, see
        `pipelines.delta`): the nightly finds what was written since a run by it. Callers hold the writer
        lease, so no other commit comes between the stamp and this one."""
        if rows.num_rows == 0 and scope is None:
            return
        if name in GALLERY_TABLES:
            rows = _stamped(rows)
        table = self.ensure(name, rows.schema)
        _add_missing_columns(table, rows.schema)
        stamp = int(table.version)
        if name in GALLERY_TABLES:
            rows = _stamped(rows, stamp)
        merge = table.merge_insert(KEYS[name]).when_matched_update_all().when_not_matched_insert_all()
        if scope is not None:
            merge = merge.when_not_matched_by_source_delete(scope)
        result = merge.execute(rows)
        committed = getattr(result, "version", None)
        if name in GALLERY_TABLES and committed is not None and int(committed) != stamp + 1:
            # Another commit came between the stamp and this one (a writer that lost its lease, or Lance
            # retrying a conflict): re-stamp so no run pinned before this commit counts these rows as seen.
            table.update(where=f"{DELTA_BASIS} = {stamp}", values={DELTA_BASIS: int(committed) - 1})

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


def _stamped(rows: pa.Table, version: int | None = None) -> pa.Table:
    """`rows` with the write stamp column set to `version` (null until the version is known)."""
    stamp = pa.array([version] * rows.num_rows, pa.int64())
    if DELTA_BASIS in rows.column_names:
        return rows.set_column(rows.column_names.index(DELTA_BASIS), pa.field(DELTA_BASIS, pa.int64()), stamp)
    return rows.append_column(pa.field(DELTA_BASIS, pa.int64()), stamp)


def _add_missing_columns(table: Any, schema: pa.Schema) -> None:
    """A table created before a nullable column was declared gets it (all null) before the next write."""
    have = set(table.schema.names)
    missing = [f for f in schema if f.name not in have]
    if not missing:
        return
    required = [f.name for f in missing if not f.nullable]
    if required:
        raise Refused(f"table {table.name!r} lacks the required column(s) {', '.join(required)}; migrate it first")
    table.add_columns(missing)

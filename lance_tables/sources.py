"""The sources table: every gallery row belongs to a source registered with its provenance."""

from __future__ import annotations

import datetime as dt
from typing import Any

import pyarrow as pa

from lance_tables.store import Gallery
from pipelines.errors import Refused
from pipelines.schemas import SOURCES
from pipelines.shards import check_id
from pipelines.sql import sql_list
from pipelines.vocab import check_channel


def add_source(
    gallery: Gallery, source_id: str, channel: str, legal_basis: str, terms: str, registered_by: str | None
) -> dict[str, Any]:
    """Register a source; refused for forbidden or unknown channels and for empty provenance."""
    check_id("source id", source_id)
    refusal = check_channel(channel)
    if refusal:
        raise Refused(f"source {source_id!r} refused: {refusal}")
    if not legal_basis.strip():
        raise Refused("a source needs its legal basis (--legal-basis)")
    if not terms.strip():
        raise Refused("a source needs the terms it was obtained under (--terms)")
    existing = get_source(gallery, source_id)
    record = {"source_id": source_id, "channel": channel, "legal_basis": legal_basis, "terms": terms}
    if existing is not None:
        if all(existing[k] == v for k, v in record.items()):
            return existing | {"created": False}
        raise Refused(f"source {source_id!r} is already registered with different provenance; use a new id")
    row = record | {"registered_by": registered_by, "registered_at": dt.datetime.now(dt.UTC)}
    gallery.upsert("sources", pa.Table.from_pylist([row], schema=SOURCES))
    return row | {"created": True}


def get_source(gallery: Gallery, source_id: str) -> dict[str, Any] | None:
    rows = gallery.read("sources", where=f"source_id IN {sql_list([source_id])}").to_pylist()
    return rows[0] if rows else None


def registered_ids(gallery: Gallery) -> set[str]:
    table = gallery.read("sources", columns=["source_id"])
    return set(table.column("source_id").to_pylist()) if table.num_columns else set()


def require_registered(gallery: Gallery, source_ids: set[str]) -> None:
    """Refuse, before any work, when a source is not registered."""
    missing = sorted(source_ids - registered_ids(gallery))
    if missing:
        raise Refused(
            f"unregistered source(s): {', '.join(missing)}. Register each with "
            "`gallerymatch sources add SOURCE_ID --channel CH --legal-basis TEXT --terms TEXT` first; "
            "nothing was done."
        )


def list_sources(gallery: Gallery) -> list[dict[str, Any]]:
    table = gallery.read("sources")
    return sorted(table.to_pylist(), key=lambda r: r["source_id"]) if table.num_columns else []

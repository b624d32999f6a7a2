"""The watchlists and probes tables: probes are written first, the watchlist row last (the commit point)."""

from __future__ import annotations

import datetime as dt
from typing import Any

import numpy as np

from lance_tables.store import Gallery
from pipelines.errors import Refused
from pipelines.schemas import PROBES, WATCHLISTS, to_arrow
from pipelines.sql import sql_list


def store_watchlist(
    gallery: Gallery, record: dict[str, Any], probes: list[dict[str, Any]], vectors: list[np.ndarray]
) -> None:
    now = record["created_at"]
    rows = [
        p
        | {
            "probe_key": f"{record['watchlist_id']}/{p['probe_id']}",
            "watchlist_id": record["watchlist_id"],
            "vector": v.astype(np.float32).tolist(),
            "model_id": record["model_id"],
            "weights_digest": record["weights_digest"],
            "created_at": now,
        }
        for p, v in zip(probes, vectors, strict=True)
    ]
    gallery.upsert("probes", to_arrow(rows, PROBES))
    gallery.upsert("watchlists", to_arrow([record], WATCHLISTS))


def get_watchlist(gallery: Gallery, watchlist_id: str) -> dict[str, Any]:
    rows = gallery.read("watchlists", where=f"watchlist_id IN {sql_list([watchlist_id])}").to_pylist()
    if not rows:
        raise Refused(f"no watchlist {watchlist_id!r}; see `gallerymatch watchlist list`")
    return dict(rows[0])


def list_watchlists(gallery: Gallery) -> list[dict[str, Any]]:
    table = gallery.read("watchlists")
    return sorted(table.to_pylist(), key=lambda r: r["created_at"], reverse=True) if table.num_columns else []


# Matching reads the probes' vectors and ids; the thumbnails are read only for a review sheet.
PROBE_COLUMNS = [name for name in PROBES.names if name != "thumbnail"]


def read_probes(gallery: Gallery, watchlist_id: str) -> tuple[list[dict[str, Any]], np.ndarray]:
    table = gallery.read("probes", columns=PROBE_COLUMNS, where=f"watchlist_id IN {sql_list([watchlist_id])}")
    rows = sorted(table.to_pylist(), key=lambda r: r["probe_id"]) if table.num_columns else []
    vectors = np.array([r.pop("vector") for r in rows], dtype=np.float32)
    return rows, vectors


def read_probes_of(gallery: Gallery, watchlist_ids: list[str]) -> dict[str, tuple[list[dict[str, Any]], np.ndarray]]:
    """`read_probes` of many watchlists in one read of the probes table."""
    out: dict[str, tuple[list[dict[str, Any]], np.ndarray]] = {}
    if not watchlist_ids:
        return out
    table = gallery.read("probes", columns=PROBE_COLUMNS, where=f"watchlist_id IN {sql_list(watchlist_ids)}")
    grouped: dict[str, list[dict[str, Any]]] = {w: [] for w in watchlist_ids}
    for row in table.to_pylist() if table.num_columns else []:
        grouped[row["watchlist_id"]].append(row)
    for watchlist_id, rows in grouped.items():
        rows.sort(key=lambda r: r["probe_id"])
        vectors = np.array([r.pop("vector") for r in rows], dtype=np.float32)
        out[watchlist_id] = (rows, vectors.reshape(len(rows), -1) if rows else np.zeros((0, 0), np.float32))
    return out


def close_watchlist(gallery: Gallery, watchlist_id: str, closed_by: str) -> dict[str, Any]:
    record = get_watchlist(gallery, watchlist_id)
    if record["status"] == "closed":
        return record
    record |= {"status": "closed", "closed_at": dt.datetime.now(dt.UTC), "closed_by": closed_by}
    gallery.upsert("watchlists", to_arrow([record], WATCHLISTS))
    return record


def read_thumbnails(gallery: Gallery, watchlist_id: str) -> dict[str, bytes | None]:
    """probe id -> its thumbnail (None: an embedding probe, or one stored before thumbnails were kept);
    empty when the watchlist's probes are gone (retention removed them)."""
    table = gallery.open("probes")
    if table is None:
        return {}
    columns = ["probe_id", "thumbnail"] if "thumbnail" in table.schema.names else ["probe_id"]
    rows = gallery.read("probes", columns=columns, where=f"watchlist_id IN {sql_list([watchlist_id])}").to_pylist()
    return {r["probe_id"]: r.get("thumbnail") for r in rows}

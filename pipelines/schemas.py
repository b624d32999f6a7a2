"""Every schema of gallerymatch, declared once: the LanceDB tables, image shards and result sets.

Writers build rows from these, never by inference; readers conform to them."""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa

from pipelines.models import FACE_DIM

TS = pa.timestamp("us", tz="UTC")

SOURCES = pa.schema(
    [
        pa.field("source_id", pa.string(), nullable=False),
        pa.field("channel", pa.string(), nullable=False),
        pa.field("legal_basis", pa.string(), nullable=False),
        pa.field("terms", pa.string(), nullable=False),
        pa.field("registered_by", pa.string()),
        pa.field("registered_at", TS, nullable=False),
    ]
)

IMAGES = pa.schema(
    [
        pa.field("image_id", pa.string(), nullable=False),
        pa.field("source_id", pa.string(), nullable=False),
        pa.field("uri", pa.string()),
        pa.field("subject_id", pa.string()),
        pa.field("minor", pa.bool_(), nullable=False),
        pa.field("captured_at", TS),
        pa.field("format", pa.string(), nullable=False),
        pa.field("width", pa.int32(), nullable=False),
        pa.field("height", pa.int32(), nullable=False),
        pa.field("num_bytes", pa.int64(), nullable=False),
        pa.field("shard_key", pa.string(), nullable=False),
        pa.field("ingested_at", TS, nullable=False),
    ]
)


def _gallery_fields() -> list[pa.Field]:
    return [
        pa.field("image_id", pa.string()),
        pa.field("record_id", pa.string()),
        pa.field("source_id", pa.string(), nullable=False),
        pa.field("subject_id", pa.string()),
        pa.field("minor", pa.bool_(), nullable=False),
    ]


def _provenance_fields() -> list[pa.Field]:
    return [
        pa.field("model_id", pa.string(), nullable=False),
        pa.field("weights_digest", pa.string(), nullable=False),
        pa.field("origin", pa.string(), nullable=False),  # "detected" | "embedded" | "imported"
        pa.field("shard_key", pa.string(), nullable=False),
        pa.field("ingested_at", TS, nullable=False),
        # The table version the commit that wrote this row started from (set by Gallery.upsert; null for rows
        # written before the column existed): rows with a stamp >= v were written after version v.
        pa.field("written_after_version", pa.int64()),
    ]


FACES = pa.schema(
    [
        pa.field("face_id", pa.string(), nullable=False),
        *_gallery_fields(),
        pa.field("face_index", pa.int32()),
        pa.field("box", pa.list_(pa.float32())),  # x1 y1 x2 y2 (null for imported vectors)
        pa.field("det_prob", pa.float32()),
        pa.field(
            "landmarks", pa.list_(pa.float32())
        ),  # 5 points x y; plain lists: LanceDB treats fixed-size float lists as vectors
        pa.field("vector", pa.list_(pa.float32(), FACE_DIM), nullable=False),
        *_provenance_fields(),
    ]
)


def image_embeddings_schema(dim: int) -> pa.Schema:
    """Whole-image embeddings; the vector width is fixed when the table is created."""
    return pa.schema(
        [
            pa.field("embedding_id", pa.string(), nullable=False),
            *_gallery_fields(),
            pa.field("vector", pa.list_(pa.float32(), dim), nullable=False),
            *_provenance_fields(),
        ]
    )


QUARANTINE = pa.schema(
    [
        pa.field("quarantine_id", pa.string(), nullable=False),
        pa.field("item_id", pa.string(), nullable=False),  # image_id, record_id or shard key
        pa.field("source_id", pa.string()),
        pa.field("uri", pa.string()),
        pa.field("stage", pa.string(), nullable=False),  # shard | decode | face | import
        pa.field("reason", pa.string(), nullable=False),
        pa.field("detail", pa.string(), nullable=False),
        pa.field("shard_key", pa.string(), nullable=False),
        pa.field("quarantined_at", TS, nullable=False),
        pa.field("subject_id", pa.string()),  # when known: erasure by subject finds a person's unusable photos
    ]
)

LEDGER = pa.schema(
    [
        pa.field("ledger_key", pa.string(), nullable=False),
        pa.field("shard_key", pa.string(), nullable=False),
        pa.field("shard_uri", pa.string(), nullable=False),
        pa.field("task", pa.string(), nullable=False),
        pa.field("images", pa.int64(), nullable=False),
        pa.field("embedded", pa.int64(), nullable=False),
        pa.field("quarantined", pa.int64(), nullable=False),
        pa.field("finished_at", TS, nullable=False),
    ]
)

WATCHLISTS = pa.schema(
    [
        pa.field("watchlist_id", pa.string(), nullable=False),
        pa.field("name", pa.string(), nullable=False),
        pa.field("case_id", pa.string(), nullable=False),
        pa.field("purpose", pa.string(), nullable=False),
        pa.field("legal_basis", pa.string(), nullable=False),
        pa.field("requested_by", pa.string(), nullable=False),
        pa.field("modality", pa.string(), nullable=False),
        pa.field("model_id", pa.string(), nullable=False),
        pa.field("weights_digest", pa.string(), nullable=False),
        pa.field("top_k", pa.int32(), nullable=False),
        pa.field("threshold", pa.float32(), nullable=False),
        pa.field("probes", pa.int32(), nullable=False),
        pa.field("status", pa.string(), nullable=False),  # open | closed
        pa.field("created_at", TS, nullable=False),
        pa.field("expires_at", TS, nullable=False),
        pa.field("closed_at", TS),
        pa.field("closed_by", pa.string()),
        # The calibration record the threshold came from (`--threshold calibrated`); null: given by hand.
        pa.field("calibration_id", pa.string()),
    ]
)

PROBES = pa.schema(
    [
        pa.field("probe_key", pa.string(), nullable=False),  # watchlist_id/probe_id: probe ids are per watchlist
        pa.field("probe_id", pa.string(), nullable=False),
        pa.field("watchlist_id", pa.string(), nullable=False),
        pa.field("origin", pa.string(), nullable=False),  # photo | embedding
        pa.field("photo_sha256", pa.string()),
        pa.field("uri", pa.string()),
        pa.field("face_index", pa.int32()),
        pa.field("box", pa.list_(pa.float32())),
        pa.field("det_prob", pa.float32()),
        pa.field("subject_id", pa.string()),
        pa.field("vector", pa.list_(pa.float32()), nullable=False),  # plain list: widths differ by model
        pa.field("model_id", pa.string(), nullable=False),
        pa.field("weights_digest", pa.string(), nullable=False),
        pa.field("created_at", TS, nullable=False),
        # What a reviewer sees of a photo probe: its face crop (JPEG, 160 px), removed with the probe rows.
        pa.field("thumbnail", pa.binary()),
    ]
)

REVIEWS = pa.schema(
    [
        pa.field("review_id", pa.string(), nullable=False),
        pa.field("run_id", pa.string(), nullable=False),
        pa.field("probe_id", pa.string(), nullable=False),
        pa.field("rank", pa.int32(), nullable=False),
        pa.field("gallery_id", pa.string(), nullable=False),
        pa.field("status", pa.string(), nullable=False),
        pa.field("reviewer", pa.string(), nullable=False),
        pa.field("reviewed_at", pa.timestamp("us", tz="UTC"), nullable=False),
    ]
)

# `gallerymatch evaluate` on a labelled set the user holds: the figures, and the score distributions
# `calibrate` estimates from. Identity names and photos are never stored: counts, scores and digests only.
EVALUATIONS = pa.schema(
    [
        pa.field("evaluation_id", pa.string(), nullable=False),
        pa.field("model_id", pa.string(), nullable=False),
        pa.field("weights_digest", pa.string(), nullable=False),
        pa.field("dataset_digest", pa.string(), nullable=False),  # sha256 over the photos' digests and labels
        pa.field("identities", pa.int64(), nullable=False),
        pa.field("mated_searches", pa.int64(), nullable=False),
        pa.field("non_mated_searches", pa.int64(), nullable=False),
        pa.field("failed_to_enrol", pa.int64(), nullable=False),
        pa.field("figures", pa.string(), nullable=False),  # the JSON `evaluate --json` printed
        pa.field("mated_scores", pa.list_(pa.float64()), nullable=False),  # one per mated search with a face
        pa.field("mated_failed", pa.int64(), nullable=False),  # mated searches without a face: misses
        pa.field("impostor_pairs", pa.int64(), nullable=False),  # 1:1 impostor pairs compared
        pa.field("impostor_tail", pa.list_(pa.float64()), nullable=False),  # their highest scores, descending
        pa.field("created_at", TS, nullable=False),
        pa.field("requested_by", pa.string(), nullable=False),
    ]
)

# `gallerymatch calibrate`: a threshold for a target FPIR at the operational gallery's size.
CALIBRATIONS = pa.schema(
    [
        pa.field("calibration_id", pa.string(), nullable=False),
        pa.field("model_id", pa.string(), nullable=False),
        pa.field("weights_digest", pa.string(), nullable=False),
        pa.field("gallery_table", pa.string(), nullable=False),
        pa.field("gallery_version", pa.int64(), nullable=False),
        pa.field("gallery_rows", pa.int64(), nullable=False),  # N: rows of the model searched
        pa.field("gallery_filter", pa.string(), nullable=False),
        pa.field("method", pa.string(), nullable=False),  # measured | estimate
        pa.field("probe_count", pa.int64(), nullable=False),  # non-mated searches (measured) or impostor pairs
        pa.field("probe_source", pa.string(), nullable=False),  # what they were, by digest or evaluation id
        pa.field("target_fpir", pa.float64(), nullable=False),
        pa.field("threshold", pa.float64(), nullable=False),
        pa.field("fpir", pa.float64(), nullable=False),  # measured (or estimated) at the threshold
        pa.field("fpir_low", pa.float64(), nullable=False),  # 95% Clopper-Pearson interval
        pa.field("fpir_high", pa.float64(), nullable=False),
        pa.field("fnir", pa.float64()),  # at the threshold, from the latest evaluation of these weights
        pa.field("fnir_source", pa.string()),
        pa.field("created_at", TS, nullable=False),
        pa.field("requested_by", pa.string(), nullable=False),
    ]
)

ERASED = pa.schema(
    [
        pa.field("image_id", pa.string(), nullable=False),
        pa.field("receipt_id", pa.string()),
        pa.field("erased_at", pa.timestamp("us", tz="UTC")),
    ]
)

# Image shards (Parquet, hive-partitioned by source_id): one row per image, bytes as-is.
SHARD_SCHEMA = pa.schema(
    [
        pa.field("image_id", pa.string(), nullable=False),
        pa.field("image", pa.large_binary()),
        pa.field("uri", pa.string()),
        pa.field("source_id", pa.string(), nullable=False),
        pa.field("captured_at", pa.timestamp("us", tz="UTC")),
        pa.field("minor", pa.bool_()),
        pa.field("subject_id", pa.string()),
        pa.field("num_bytes", pa.int64()),
        pa.field("pack_error", pa.string()),
    ]
)

# Result sets (Parquet parts under results/watchlist_id=/run_id=, manifest last).
RESULT_SCHEMA = pa.schema(
    [
        pa.field("run_id", pa.string(), nullable=False),
        pa.field("watchlist_id", pa.string(), nullable=False),
        pa.field("case_id", pa.string(), nullable=False),
        pa.field("probe_id", pa.string(), nullable=False),
        pa.field("subject_id", pa.string()),
        pa.field("rank", pa.int32(), nullable=False),
        pa.field("gallery_id", pa.string(), nullable=False),
        pa.field("image_id", pa.string()),
        pa.field("record_id", pa.string()),  # the importer's id of an imported vector (null for ingested images)
        pa.field("source_id", pa.string(), nullable=False),
        pa.field("score", pa.float32(), nullable=False),
        pa.field("above_threshold", pa.bool_(), nullable=False),
        pa.field("model_id", pa.string(), nullable=False),
        pa.field("gallery_version", pa.int64(), nullable=False),
        pa.field("matched_at", pa.timestamp("us", tz="UTC"), nullable=False),
        pa.field("review_status", pa.string(), nullable=False),
        # Null in result sets written before nightly runs existed.
        pa.field("new_since_parent", pa.bool_()),  # the pair (probe, gallery row) was not in the parent run
        pa.field("first_seen_run_id", pa.string()),  # the first run of this watchlist that listed the pair
    ]
)

GALLERY_TABLES = ("faces", "image_embeddings")  # the tables matched against (rows stamped on write)

KEYS = {
    "sources": "source_id",
    "images": "image_id",
    "faces": "face_id",
    "image_embeddings": "embedding_id",
    "quarantine": "quarantine_id",
    "ledger": "ledger_key",
    "watchlists": "watchlist_id",
    "probes": "probe_key",
    "evaluations": "evaluation_id",
    "calibrations": "calibration_id",
}

FIXED = {
    "sources": SOURCES,
    "images": IMAGES,
    "faces": FACES,
    "quarantine": QUARANTINE,
    "ledger": LEDGER,
    "watchlists": WATCHLISTS,
    "probes": PROBES,
    "evaluations": EVALUATIONS,
    "calibrations": CALIBRATIONS,
}


def to_arrow(rows: list[dict[str, Any]], schema: pa.Schema, vectors: np.ndarray | None = None) -> pa.Table:
    """Rows -> Arrow from the declared schema; the vector column is built from the float32 matrix."""
    if vectors is None or "vector" not in schema.names:
        return pa.Table.from_pylist([{k: r.get(k) for k in schema.names} for r in rows], schema=schema)
    others = [n for n in schema.names if n != "vector"]
    base = {n: [r.get(n) for r in rows] for n in others}
    dim = schema.field("vector").type.list_size
    flat = pa.array(np.ascontiguousarray(vectors, dtype=np.float32).reshape(-1), pa.float32())
    columns = [
        pa.array(base[n], schema.field(n).type) if n != "vector" else pa.FixedSizeListArray.from_arrays(flat, dim)
        for n in schema.names
    ]
    return pa.Table.from_arrays(columns, schema=schema)


def conform(table: pa.Table, schema: pa.Schema) -> pa.Table:
    """A table read from an older file, brought to the declared schema: missing nullable columns added as
    nulls, columns in declared order, types cast. A missing required column is an error."""
    columns = []
    for field in schema:
        if field.name in table.column_names:
            columns.append(table.column(field.name).cast(field.type))
        elif field.nullable:
            columns.append(pa.nulls(table.num_rows, field.type))
        else:
            raise ValueError(f"column {field.name!r} is missing")
    return pa.Table.from_arrays(columns, schema=schema)

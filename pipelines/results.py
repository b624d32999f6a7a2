"""Result sets: one declared schema, hive-partitioned Parquet, staged then renamed (manifest inside)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

NOTICE = "Candidate list for human review; not an identification."
MANIFEST = "_manifest.json"
PART_ROWS = 500_000

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
        pa.field("source_id", pa.string(), nullable=False),
        pa.field("score", pa.float32(), nullable=False),
        pa.field("above_threshold", pa.bool_(), nullable=False),
        pa.field("model_id", pa.string(), nullable=False),
        pa.field("gallery_version", pa.int64(), nullable=False),
        pa.field("matched_at", pa.timestamp("us", tz="UTC"), nullable=False),
        pa.field("review_status", pa.string(), nullable=False),
    ]
)


def run_dir(results_root: Path, watchlist_id: str, run_id: str) -> Path:
    return results_root / f"watchlist_id={watchlist_id}" / f"run_id={run_id}"


def write_result_set(
    results_root: Path, staging_root: Path, watchlist_id: str, run_id: str, table: pa.Table, meta: dict[str, Any]
) -> Path:
    """Write parts and the manifest into a staging folder, then rename it into place in one step.

    A crash at any point leaves either the whole run visible under `results_root` or nothing.
    """
    table = table.cast(RESULT_SCHEMA)
    kv = {k: str(v) for k, v in meta.items()} | {"notice": NOTICE}
    stage = staging_root / f"{watchlist_id}.{run_id}"
    shutil.rmtree(stage, ignore_errors=True)
    stage.mkdir(parents=True)
    parts = []
    for index, start in enumerate(range(0, max(table.num_rows, 1), PART_ROWS)):
        part = table.slice(start, PART_ROWS).replace_schema_metadata(kv)
        path = stage / f"part-{index:05d}.parquet"
        pq.write_table(part, path)
        parts.append({"file": path.name, "rows": part.num_rows, "sha256": _digest(path)})
    manifest = meta | {"notice": NOTICE, "rows": table.num_rows, "parts": parts}
    _write_json(stage / MANIFEST, manifest)
    final = run_dir(results_root, watchlist_id, run_id)
    final.parent.mkdir(parents=True, exist_ok=True)
    _fsync_dir(stage)
    os.rename(stage, final)  # atomic on one filesystem: the run appears whole
    _fsync_dir(final.parent)
    return final


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _write_json(path: Path, data: dict[str, Any]) -> None:
    with path.open("w") as handle:
        json.dump(data, handle, indent=2, sort_keys=True, default=str)
        handle.flush()
        os.fsync(handle.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def list_runs(results_root: Path) -> list[dict[str, Any]]:
    """Manifests of every complete run, newest first."""
    runs = []
    for manifest in results_root.glob(f"watchlist_id=*/run_id=*/{MANIFEST}"):
        runs.append(json.loads(manifest.read_text()) | {"path": str(manifest.parent)})
    return sorted(runs, key=lambda m: (m.get("matched_at", ""), m.get("run_id", "")), reverse=True)


def find_run(results_root: Path, run_id: str) -> dict[str, Any] | None:
    for manifest in results_root.glob(f"watchlist_id=*/run_id={run_id}/{MANIFEST}"):
        return dict(json.loads(manifest.read_text())) | {"path": str(manifest.parent)}
    return None


def read_run(path: Path) -> pa.Table:
    tables = [pq.read_table(p) for p in sorted(path.glob("part-*.parquet"))]
    return pa.concat_tables(tables) if tables else RESULT_SCHEMA.empty_table()


def scan_results(results_root: Path) -> Any:
    """All result sets as one `polars.LazyFrame` (hive partitions watchlist_id and run_id)."""
    import polars as pl

    if not any(results_root.glob(f"watchlist_id=*/run_id=*/{MANIFEST}")):
        empty = pl.DataFrame(pl.from_arrow(RESULT_SCHEMA.empty_table()))
        return empty.lazy()
    return pl.scan_parquet(results_root / "**" / "*.parquet", hive_partitioning=True)

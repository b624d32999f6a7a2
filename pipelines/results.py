"""Result sets: one declared schema, hive-partitioned Parquet, staged then renamed (manifest inside)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

NOTICE = "Candidate list for human review; not an identification."
PENDING = ".pending"
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


def manifests_root(results_root: Path) -> Path:
    """Beside the results tree, which holds only Parquet (Polars refuses mixed extensions in a scan)."""
    return results_root.parent / "manifests"


def manifest_path(results_root: Path, watchlist_id: str, run_id: str) -> Path:
    return manifests_root(results_root) / f"watchlist_id={watchlist_id}" / f"{run_id}.json"


def write_result_set(
    results_root: Path, staging_root: Path, watchlist_id: str, run_id: str, table: pa.Table, meta: dict[str, Any]
) -> Path:
    """Stage the parts, write the manifest as pending, rename the run into place, then the manifest (last).

    A crash before the rename leaves nothing visible; after it, the run is whole and `recover`
    completes its manifest. No reader ever sees part of a run.
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
    final_manifest = manifest_path(results_root, watchlist_id, run_id)
    pending = final_manifest.with_suffix(PENDING)
    pending.parent.mkdir(parents=True, exist_ok=True)
    _write_json(pending, meta | {"notice": NOTICE, "rows": table.num_rows, "parts": parts})
    final = run_dir(results_root, watchlist_id, run_id)
    final.parent.mkdir(parents=True, exist_ok=True)
    _fsync_dir(stage)
    os.rename(stage, final)  # atomic on one filesystem: the run appears whole
    _fsync_dir(final.parent)
    os.rename(pending, final_manifest)  # the manifest, last
    return final


def recover(results_root: Path, staging_root: Path, stale_after_s: float = 3600.0) -> None:
    """After a crash: roll forward runs already renamed into place; drop stale staging (older than an hour,
    so a run in progress elsewhere is left alone)."""
    now = time.time()
    for pending in manifests_root(results_root).glob(f"watchlist_id=*/*{PENDING}"):
        watchlist_id = pending.parent.name.removeprefix("watchlist_id=")
        run_id = pending.name.removesuffix(PENDING)
        if run_dir(results_root, watchlist_id, run_id).is_dir():
            os.rename(pending, pending.with_suffix(".json"))
        elif now - pending.stat().st_mtime > stale_after_s:
            pending.unlink()
    for stage in staging_root.glob("*") if staging_root.is_dir() else []:
        if now - stage.stat().st_mtime > stale_after_s:
            shutil.rmtree(stage, ignore_errors=True)


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
    for manifest in manifests_root(results_root).glob("watchlist_id=*/*.json"):
        data = json.loads(manifest.read_text())
        runs.append(data | {"path": str(run_dir(results_root, data["watchlist_id"], data["run_id"]))})
    return sorted(runs, key=lambda m: (m.get("matched_at", ""), m.get("run_id", "")), reverse=True)


def find_run(results_root: Path, run_id: str) -> dict[str, Any] | None:
    return next((m for m in list_runs(results_root) if m["run_id"] == run_id), None)


def require_run(results_root: Path, run_id: str) -> dict[str, Any]:
    """The manifest of a run, or a refusal that says where to look."""
    from pipelines.errors import Refused

    manifest = find_run(results_root, run_id)
    if manifest is None:
        raise Refused(f"no result set {run_id!r}; see `gallerymatch results list`")
    return manifest


def read_run(path: Path) -> pa.Table:
    tables = [pq.read_table(p) for p in sorted(path.glob("part-*.parquet"))]
    return pa.concat_tables(tables) if tables else RESULT_SCHEMA.empty_table()


def scan_results(results_root: Path) -> Any:
    """All result sets as one `polars.LazyFrame` (hive partitions watchlist_id and run_id)."""
    import polars as pl

    if not any(results_root.glob("watchlist_id=*/run_id=*/part-*.parquet")):
        empty = pl.DataFrame(pl.from_arrow(RESULT_SCHEMA.empty_table()))
        return empty.lazy()
    return pl.scan_parquet(results_root / "**" / "*.parquet", hive_partitioning=True)

"""Result sets: one declared schema, hive-partitioned Parquet parts under a unique run prefix, the manifest last.

The commit needs only create-if-absent, read, list and delete (see `pipelines.objectstore`):
parts are created under `results/watchlist_id=W/run_id=R/`, then the manifest `manifests/watchlist_id=W/
R.gNNNN.json` is created; a run exists when its manifest does. A rewrite (after an erasure) is generation
N+1: new parts, then the new manifest, then the old generation's parts and manifest are deleted. Readers
take each run's highest generation and read only the parts it names; `sweep` (run by writers, under the
writer lease) deletes what a crash left: parts of a generation with no manifest, and superseded generations.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from pipelines import storage as area
from pipelines.faults import crash_point
from pipelines.objectstore import ObjectStore
from pipelines.schemas import RESULT_SCHEMA, conform
from pipelines.storage import Storage

NOTICE = "Candidate list for human review; not an identification."
PART_ROWS = 500_000
RESULTS = f"{area.RESULTS}/"
MANIFESTS = f"{area.MANIFESTS}/"
_MANIFEST = re.compile(r"^manifests/watchlist_id=([^/]+)/([^/]+?)(?:\.g(\d{4}))?\.json$")
_RUN_SECOND = re.compile(r"^run-(\d{8}T\d{6})-")
_PART = re.compile(r"^results/watchlist_id=([^/]+)/run_id=([^/]+)/part-(?:g(\d{4})-)?\d{5}\.parquet$")


@dataclass(frozen=True)
class RunKey:
    watchlist_id: str
    run_id: str

    @property
    def prefix(self) -> str:
        return f"{RESULTS}watchlist_id={self.watchlist_id}/run_id={self.run_id}/"

    def part(self, generation: int, index: int) -> str:
        return f"{self.prefix}part-g{generation:04d}-{index:05d}.parquet"

    def manifest(self, generation: int) -> str:
        return f"{MANIFESTS}watchlist_id={self.watchlist_id}/{self.run_id}.g{generation:04d}.json"


def _kv(value: Any) -> str:
    """A Parquet key-value metadata value: text as is, numbers as written, structures as JSON."""
    if isinstance(value, dict | list | tuple):
        return json.dumps(value, sort_keys=True, default=str)
    return str(value)


def write_result_set(
    store: ObjectStore, watchlist_id: str, run_id: str, table: pa.Table, meta: dict[str, Any], generation: int = 1
) -> str:
    """Create the parts, then the manifest (the commit). Rerunning a crashed write of the same generation
    replaces its parts; a generation whose manifest exists is never written again."""
    key = RunKey(watchlist_id, run_id)
    table = conform(table, RESULT_SCHEMA)  # a rewrite of an older run gains the newer (null) columns
    kv = {k: _kv(v) for k, v in meta.items()} | {"notice": NOTICE}
    parts = []
    for index, start in enumerate(range(0, max(table.num_rows, 1), PART_ROWS)):
        part = table.slice(start, PART_ROWS).replace_schema_metadata(kv)
        data = _parquet_bytes(part)
        name = key.part(generation, index)
        if not store.create(name, data):  # left by a crashed attempt of this generation (no manifest yet)
            store.delete(name)
            store.create(name, data)
        parts.append(
            {"file": name.rsplit("/", 1)[-1], "rows": part.num_rows, "sha256": hashlib.sha256(data).hexdigest()}
        )
    crash_point("results:before-manifest")
    body = meta | {"notice": NOTICE, "rows": table.num_rows, "parts": parts, "generation": generation}
    if not store.create(key.manifest(generation), json.dumps(body, indent=2, sort_keys=True, default=str).encode()):
        raise RuntimeError(f"result set {run_id} generation {generation} already exists")
    return store.location(key.prefix)


def _parquet_bytes(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    return bytes(sink.getvalue().to_pybytes())


def _manifest_keys(store: ObjectStore) -> dict[RunKey, list[tuple[int, str]]]:
    found: dict[RunKey, list[tuple[int, str]]] = {}
    for name in store.list(MANIFESTS):
        match = _MANIFEST.match(name)
        if match:
            found.setdefault(RunKey(match[1], match[2]), []).append((int(match[3] or 0), name))
    return {k: sorted(v) for k, v in found.items()}


def list_runs(store: ObjectStore) -> list[dict[str, Any]]:
    """Manifests of every complete run (its latest generation), newest first."""
    return _load_manifests(store, _manifest_keys(store))


def _load_manifests(store: ObjectStore, found: dict[RunKey, list[tuple[int, str]]]) -> list[dict[str, Any]]:
    """One listing found them; the latest generation of each is read (side by side: a GET each on S3)."""
    from pipelines.audit import read_many

    latest = [(key, generations[-1][1]) for key, generations in found.items()]
    runs = []
    for (key, name), data in zip(latest, read_many(store, [name for _, name in latest]), strict=True):
        if data is None:
            continue
        try:
            manifest = json.loads(data)
        except ValueError:
            continue
        runs.append(manifest | {"path": store.location(key.prefix), "manifest_key": name})
    return sorted(runs, key=lambda m: (m.get("matched_at", ""), m.get("run_id", "")), reverse=True)


def latest_runs(store: ObjectStore, watchlist_id: str | None = None) -> dict[str, dict[str, Any]]:
    """The newest complete run of each watchlist (or of one), its manifest, reading about one manifest each.

    Run ids start with the UTC second they were made (`run-YYYYmmddTHHMMSS-...`), so one listing names each
    watchlist's newest second; only the runs of that second (and any id of another shape) are read, and
    `matched_at` decides among them."""
    by_watchlist: dict[str, list[RunKey]] = {}
    found = _manifest_keys(store)
    for key in found:
        if watchlist_id is None or key.watchlist_id == watchlist_id:
            by_watchlist.setdefault(key.watchlist_id, []).append(key)
    chosen: dict[RunKey, list[tuple[int, str]]] = {}
    for keys in by_watchlist.values():
        seconds = {key: m[1] if (m := _RUN_SECOND.match(key.run_id)) else None for key in keys}
        newest = max((second for second in seconds.values() if second), default=None)
        chosen |= {key: found[key] for key, second in seconds.items() if second is None or second == newest}
    latest: dict[str, dict[str, Any]] = {}
    for manifest in _load_manifests(store, chosen):  # newest first
        latest.setdefault(str(manifest["watchlist_id"]), manifest)
    return latest


def find_run(store: ObjectStore, run_id: str) -> dict[str, Any] | None:
    """One run's manifest: the listing names the run, so only its manifest is read (not every run's)."""
    found = {key: generations for key, generations in _manifest_keys(store).items() if key.run_id == run_id}
    return next(iter(_load_manifests(store, found)), None)


def require_run(store: ObjectStore, run_id: str) -> dict[str, Any]:
    """The manifest of a run, or a refusal that says where to look."""
    from pipelines.errors import Refused

    manifest = find_run(store, run_id)
    if manifest is None:
        raise Refused(f"no result set {run_id!r}; see `gallerymatch results list`")
    return manifest


def part_keys(manifest: dict[str, Any]) -> list[str]:
    key = RunKey(manifest["watchlist_id"], manifest["run_id"])
    return [key.prefix + p["file"] for p in manifest.get("parts", [])]


def read_run(store: ObjectStore, manifest: dict[str, Any]) -> pa.Table:
    """The rows of a run: exactly the parts its manifest names."""
    tables = []
    for name in part_keys(manifest):
        data = store.read(name)
        if data is None:
            raise FileNotFoundError(f"part {name} of result set {manifest['run_id']} is missing")
        tables.append(conform(pq.read_table(pa.BufferReader(data)), RESULT_SCHEMA))
    return pa.concat_tables(tables) if tables else RESULT_SCHEMA.empty_table()


def delete_run(store: ObjectStore, manifest: dict[str, Any]) -> None:
    """Idempotent: the manifests go first (the run disappears), then every part under its prefix."""
    key = RunKey(manifest["watchlist_id"], manifest["run_id"])
    for _, name in _manifest_keys(store).get(key, []):
        store.delete(name)
    crash_point("results:delete-between-manifest-and-parts")
    for name in store.list(key.prefix):
        store.delete(name)


def sweep(store: ObjectStore) -> list[str]:
    """Delete what crashed writers left: parts no manifest names, and superseded generations (writers only)."""
    manifests = _manifest_keys(store)
    removed = []
    for generations in manifests.values():
        for _, old in generations[:-1]:
            store.delete(old)
            removed.append(old)
    for name in store.list(RESULTS):
        match = _PART.match(name)
        latest = manifests.get(RunKey(match[1], match[2])) if match else None
        if match and latest is not None and int(match[3] or 0) == latest[-1][0]:
            continue
        store.delete(name)
        removed.append(name)
    return removed


def scan_results(storage: Storage) -> Any:
    """All result sets as one `polars.LazyFrame` (hive partitions watchlist_id and run_id); committed runs only.

    Reads only the parts the manifests name (one listing of the manifests, then Polars reads the parts
    directly from the home, local or s3://, with the home's `storage_options`)."""
    import polars as pl

    store = storage.store
    files = [store.location(name) for m in list_runs(store) for name in part_keys(m)]
    if not files:
        return pl.DataFrame(pl.from_arrow(RESULT_SCHEMA.empty_table())).lazy()
    return pl.scan_parquet(
        files,
        hive_partitioning=True,
        storage_options=storage.polars_options,
        schema=_polars_schema(),
        missing_columns="insert",  # result sets written before a nullable column was declared
    )


def _polars_schema() -> Any:
    """RESULT_SCHEMA as Polars dtypes (the file columns; the hive columns are added by the scan)."""
    import polars as pl

    return pl.DataFrame(pl.from_arrow(RESULT_SCHEMA.empty_table())).schema


def load_run(store: ObjectStore, run_id: str) -> pa.Table:
    """The rows of one run, by id."""
    return read_run(store, require_run(store, run_id))

"""Benchmark exact matching (probe-gallery pairs/s): run_match end to end against FAISS, numpy and LanceDB.

The filter kernel of `run_match` is the one `choose_filter_kernel` picks on this CPU (`--kernels auto`); other
kernels can be forced for comparison (`--kernels auto,int8`). FAISS is optional: without it numpy is the reference.

At the `--s3-sizes` (default N=100k) the same gallery is also written to an S3 home (moto's server on loopback,
started by this script, every request counted) and `run_match` timed there beside the local home, same run.
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib
import importlib.util
import json
import math
import os
import resource
import shlex
import shutil
import sys
import tempfile
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from bench_ingest import (
    KINDS,
    TRAFFIC_HEADER,
    LoopbackS3,
    S3Request,
    Traffic,
    load_warning,
    loopback_s3,
    machine,
    markdown_table,
    max_in_flight,
    run_child,
    timed,
    total_traffic,
    traffic_by,
    traffic_cells,
    wrap_functions,
    write_s3_log,
    write_section,
)

from jobs.watchlist import Submission, submit
from lance_tables.sources import add_source
from lance_tables.store import Gallery
from pipelines.match_unit import (
    CLEARLY_SLOWER,
    FILTER_KERNELS,
    PROBE_ROWS,
    FilterTiming,
    choose_filter_kernel,
    kernel_report,
    time_filters,
)
from pipelines.matcher import INT8_MIN_PROBES
from pipelines.models import FACE_DIM
from pipelines.results import load_run
from pipelines.schemas import FACES
from pipelines.settings import Settings

SECTION = "## Match (scripts/bench_match.py)"
MODEL = "bench-model"
SOURCE = "bench"
SEED = 20261126
CHUNK = 100_000  # gallery rows per LanceDB append (one fragment each)
BLOCK = 65_536  # the numpy peer's block rows
ANATOMY_BLOCKS = 8  # blocks of `match_block_rows` random rows scored in a row for the anatomy table
NEAR_NOISE = 0.5  # every other probe is a gallery vector plus this much random unit noise (cosine ~0.89)
TIE_TOLERANCE = 1e-5  # a differing id whose score is this close to the k-th is a float tie, not a miss
NPROBES, REFINE, SUB_VECTORS = 20, 10, 64
IVF_ITERATIONS, IVF_SAMPLE_RATE = 10, 64  # LanceDB defaults (50, 256) take ~5 min at N=100k on 2 cores
FAISS_TARGET, FLAT_TARGET, MEMORY_TARGET = 1.2, 10.0, 1.5e9  # FAISS: issue 11 item 6 (was 0.8)
TARGET_N, TARGET_Q = 1_000_000, 1000
DEFAULT_SIZES, DEFAULT_QUERIES = "100000,1000000", "100,1000"
DEFAULT_S3_SIZES, DEFAULT_S3_ENGINES = "100000", "local,ray"  # a Ray failure (start-up) is reported, not fatal
MB = 1e6


@dataclass
class Row:
    """One throughput figure: `timed_q` probes against `n` gallery vectors in `seconds`."""

    n: int
    q: int
    method: str
    seconds: float
    timed_q: int
    recall: float | None
    note: str = ""
    kernel: str = ""  # ours: the kernel setting of the run ("auto" or forced)

    @property
    def rate(self) -> float:
        return self.timed_q * self.n / self.seconds if self.seconds > 0 else 0.0


@dataclass
class Ours:
    """What the child process measured around one `run_match` call."""

    seconds: float
    imports: float
    rss_before: int
    peak_rss: int
    vm_hwm: int
    phases: dict[str, float]
    calls: dict[str, int]
    path: str
    run_id: str
    kernels: list[str]  # the filter kernels the units ran
    engine: str = "local"
    ray_start: float = 0.0  # Ray engine: `start_ray` before the clock (not in `seconds`)
    spans: list[list[Any]] = field(default_factory=list)  # [label, wall-clock start, end] of the top-level steps

    @property
    def growth(self) -> int:
        return self.peak_rss - self.rss_before


@dataclass
class Results:
    """Everything the report needs."""

    rows: list[Row] = field(default_factory=list)
    once: list[tuple[int, str, float]] = field(default_factory=list)
    ours: dict[tuple[int, int, str], Ours] = field(default_factory=dict)  # (N, Q, kernel setting)
    load: list[float] = field(default_factory=list)
    anatomy: dict[int, dict[str, float]] = field(default_factory=dict)  # per Q: seconds per step of one block
    timing: FilterTiming | None = None  # the kernel probe, timed for the report even where the choice skips it
    s3: list[S3Pair] = field(default_factory=list)  # local home against S3 home
    s3_failed: list[str] = field(default_factory=list)  # S3 comparisons on an engine other than local that failed


@dataclass
class S3Pair:
    """`run_match` on the local home and on the S3 home holding the same gallery, with the S3 requests it made."""

    n: int
    q: int
    engine: str
    local: Ours
    s3: Ours
    requests: list[S3Request]
    table_bytes: int  # the `faces` table's data files on S3
    same_ids: float  # fraction of probes whose top-K ids are the same on both homes


@dataclass
class Case:
    """One gallery size in memory, with its LanceDB home."""

    n: int
    settings: Settings
    gallery: np.ndarray
    faiss_index: Any = None
    exact: dict[int, np.ndarray] = field(default_factory=dict)  # FAISS ids per Q, the reference
    probes: dict[int, np.ndarray] = field(default_factory=dict)
    sources: dict[int, np.ndarray] = field(default_factory=dict)  # near-duplicate probes' gallery rows, else -1
    s3_settings: Settings | None = None  # the same gallery on an S3 home, at the --s3-sizes
    s3: LoopbackS3 | None = None
    s3_bucket: str = ""


# ---- data ---------------------------------------------------------------------------------------------------


def unit_rows(rng: np.random.Generator, count: int) -> np.ndarray:
    vectors = rng.standard_normal((count, FACE_DIM), dtype=np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors


def gallery_vectors(n: int) -> np.ndarray:
    """Seeded per chunk, so a chunk is the same whatever N it belongs to."""
    out = np.empty((n, FACE_DIM), dtype=np.float32)
    for start in range(0, n, CHUNK):
        stop = min(n, start + CHUNK)
        out[start:stop] = unit_rows(np.random.default_rng([SEED, start]), stop - start)
    return out


def probe_vectors(gallery: np.ndarray, q: int) -> tuple[np.ndarray, np.ndarray]:
    """Unit-norm probes; the even ones are noisy copies of a random gallery vector (returned, -1 for the rest)."""
    rng = np.random.default_rng([SEED, len(gallery), q])
    probes = unit_rows(rng, q)
    sources = np.full(q, -1, dtype=np.int64)
    sources[::2] = rng.integers(0, len(gallery), size=len(sources[::2]))
    near = gallery[sources[::2]] + NEAR_NOISE * unit_rows(rng, len(sources[::2]))
    probes[::2] = near / np.linalg.norm(near, axis=1, keepdims=True)
    return probes, sources


def face_id(index: int) -> str:
    return f"{index:032x}"


def faces_chunk(vectors: np.ndarray, start: int, now: dt.datetime) -> pa.Table:
    """Rows of the FACES schema, built column by column; what the table does not need stays null."""
    n = len(vectors)
    constant = {
        "source_id": SOURCE,
        "minor": False,
        "model_id": MODEL,
        "weights_digest": "bench:synthetic",
        "origin": "imported",
        "shard_key": "bench",
        "ingested_at": now,
    }
    columns = []
    for spec in FACES:
        if spec.name == "face_id":
            columns.append(pa.array([face_id(i) for i in range(start, start + n)], spec.type))
        elif spec.name == "vector":
            flat = pa.array(np.ascontiguousarray(vectors).reshape(-1), pa.float32())
            columns.append(pa.FixedSizeListArray.from_arrays(flat, FACE_DIM))
        elif spec.name in constant:
            columns.append(pa.repeat(pa.scalar(constant[spec.name], spec.type), n))
        else:
            columns.append(pa.nulls(n, spec.type))
    return pa.Table.from_arrays(columns, schema=FACES)


def build_home(home: Path | str, gallery: np.ndarray) -> Settings:
    """A fresh GALLERYMATCH home whose `faces` table holds the gallery, appended CHUNK rows at a time."""
    settings = Settings(home=home, model_downloads=False)
    store = Gallery(settings.storage)
    add_source(store, SOURCE, "operator-owned", "benchmark data", "synthetic vectors", "bench_match")
    table = store.ensure("faces")
    now = dt.datetime.now(dt.UTC)
    for start in range(0, len(gallery), CHUNK):
        table.add(faces_chunk(gallery[start : start + CHUNK], start, now))
    return settings


def probe_id(index: int) -> str:
    return f"p{index:06d}"  # zero-padded: read_probes sorts by id, so row i is probe i


def submit_watchlist(settings: Settings, folder: Path, probes: np.ndarray, k: int) -> str:
    path = folder / f"probes-{len(probes)}.parquet"
    flat = pa.array(np.ascontiguousarray(probes).reshape(-1), pa.float32())
    ids = [probe_id(i) for i in range(len(probes))]
    pq.write_table(pa.table({"probe_id": ids, "embedding": pa.FixedSizeListArray.from_arrays(flat, FACE_DIM)}), path)
    sub = Submission(path, "bench", "BENCH-1", "criminal-investigation", "benchmark", "bench", "face", MODEL, top_k=k)
    return str(submit(settings, sub)["watchlist_id"])


# ---- ours, in a child process (its peak RSS is the match's alone) -------------------------------------------

PHASES = (  # (module, attribute, label): timed by wrapping, in the child only
    ("jobs.match", "read_probes", "read probes"),
    ("jobs.match", "_partials", "match loop"),
    ("pipelines.match_unit", "score_block", "score_block"),
    ("pipelines.matcher", "filter_product", "filter product"),
    ("pipelines.matcher", "_survivors", "survivors"),
    ("pipelines.matcher", "exact_scores", "rescore"),
    ("pipelines.matcher", "TopK.add", "TopK.add"),
    ("jobs.match", "metadata", "metadata take"),
    ("jobs.match", "result_rows", "result rows"),
    ("jobs.match", "write_result_set", "Parquet write"),
    ("jobs.match", "plan_units", "plan units"),  # not in the phase table (it is in `other` there)
)
STEPS = ("read probes", "plan units", "match loop", "metadata take", "Parquet write")  # top-level, sequential
REST = "rest (lease, audit, watchlist, table opens)"


def vm_hwm() -> int:
    """This process's own peak RSS since exec (/proc VmHWM), the cross-check of ru_maxrss."""
    line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith("VmHWM:"))
    return int(line.split()[1]) * 1024


def current_rss() -> int:
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def import_libraries() -> None:
    """What `run_match` imports lazily (`import lancedb` alone takes seconds): before the clock and the baseline."""
    import lance  # noqa: F401
    import lancedb  # noqa: F401
    import torch  # noqa: F401

    import pipelines.engines.local  # noqa: F401


def force_kernel(kernel: str, used: list[str]) -> None:
    """Every unit runs `kernel` ("auto": the worker's own choice); what each one ran is appended to `used`."""
    from pipelines import match_unit

    original = match_unit.unit_kernel

    def recorded(setting: str, n_probes: int, device: str) -> str:
        value = original(setting if kernel == "auto" else kernel, n_probes, device)
        used.append(value)
        return value

    match_unit.unit_kernel = recorded


def child(home: str, watchlist_id: str, kernel: str, engine: str) -> int:
    """`run_match` once, libraries imported before the RSS baseline; one JSON line on stdout."""
    from jobs import match

    _, imports = timed(import_libraries)
    if home.startswith("s3://"):
        _, s3_imports = timed(lambda: importlib.import_module("boto3"))
        imports += s3_imports
    settings = Settings(home=home, model_downloads=False)
    ray_start = 0.0
    if engine == "ray":
        from pipelines.engines.ray import start_ray

        _, ray_start = timed(lambda: start_ray(settings.ray_address, settings.ray_num_cpus))
    spent: dict[str, float] = {}
    calls: dict[str, int] = {}
    spans: list[tuple[str, float, float]] = []
    used: list[str] = []
    wrap_functions(PHASES, spent, calls, spans)
    force_kernel(kernel, used)
    before = current_rss()
    manifest, seconds = timed(lambda: match.run_match(settings, watchlist_id, engine))  # type: ignore[arg-type]
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(
        json.dumps(
            {
                "seconds": seconds,
                "imports": imports,
                "rss_before": before,
                "peak_rss": peak,
                "vm_hwm": vm_hwm(),
                "phases": spent,
                "calls": calls,
                "path": manifest["path"],
                "run_id": manifest["run_id"],
                "kernels": sorted(set(used)),
                "engine": engine,
                "ray_start": ray_start,
                "spans": [list(span) for span in spans if span[0] in STEPS],
            }
        )
    )
    return 0


def run_ours(settings: Settings, watchlist_id: str, kernel: str, engine: str = "local") -> Ours:
    """`run_match` in a child process (`bench_ingest.run_child`: forked by a shell, so its ru_maxrss is its own)."""
    home = settings.home_uri
    return Ours(**run_child([str(Path(__file__).resolve()), "--child", home, watchlist_id, kernel, engine]))


def ours_ids(settings: Settings, run_id: str, q: int, k: int) -> np.ndarray:
    table = load_run(settings.store, run_id)
    ids = np.full((q, k), -1, dtype=np.int64)
    probes = [int(p[1:]) for p in table.column("probe_id").to_pylist()]
    ranks = table.column("rank").to_pylist()
    for row, rank, gid in zip(probes, ranks, table.column("gallery_id").to_pylist(), strict=True):
        ids[row, rank - 1] = int(gid, 16)
    return ids


# ---- the peers, in this process -----------------------------------------------------------------------------


def has_faiss() -> bool:
    """FAISS is a peer, not a dependency: without it the numpy GEMM is the exact reference."""
    return importlib.util.find_spec("faiss") is not None


def faiss_index(gallery: np.ndarray) -> tuple[Any, float]:
    import faiss

    index = faiss.IndexFlatIP(FACE_DIM)
    _, seconds = timed(lambda: index.add(gallery))
    return index, seconds


def faiss_search(index: Any, probes: np.ndarray, k: int) -> tuple[np.ndarray, float]:
    (_, ids), seconds = timed(lambda: index.search(probes, k))
    return np.asarray(ids, dtype=np.int64), seconds


def numpy_top_k(probes: np.ndarray, gallery: np.ndarray, k: int) -> np.ndarray:
    """Blocked GEMM, argpartition per block, merged into a running (Q, k); sorted at the end."""
    best_s = np.full((len(probes), k), -np.inf, dtype=np.float32)
    best_i = np.full((len(probes), k), -1, dtype=np.int64)
    for start in range(0, len(gallery), BLOCK):
        scores = probes @ gallery[start : start + BLOCK].T
        kk = min(k, scores.shape[1])
        idx = np.argpartition(scores, -kk, axis=1)[:, -kk:]
        cat_s = np.concatenate([best_s, np.take_along_axis(scores, idx, axis=1)], axis=1)
        cat_i = np.concatenate([best_i, idx + start], axis=1)
        keep = np.argpartition(cat_s, -k, axis=1)[:, -k:]
        best_s, best_i = np.take_along_axis(cat_s, keep, axis=1), np.take_along_axis(cat_i, keep, axis=1)
    order = np.argsort(-best_s, axis=1, kind="stable")
    return np.take_along_axis(best_i, order, axis=1)


def lancedb_search(
    settings: Settings, probes: np.ndarray, k: int, tune: Callable[[Any], Any]
) -> tuple[np.ndarray, float]:
    """All probes in one multi-vector query (a `query_index` column says which probe each row answers)."""
    table = Gallery(settings.storage).ensure("faces")

    def query() -> pa.Table:
        search = table.search(probes, vector_column_name="vector").where(f"model_id = '{MODEL}'", prefilter=True)
        return tune(search.select(["face_id"]).limit(k)).to_arrow()

    result, seconds = timed(query)
    return lance_ids(result, len(probes), k), seconds


def lance_ids(result: pa.Table, q: int, k: int) -> np.ndarray:
    ids = np.full((q, k), -1, dtype=np.int64)
    rows = result.column("query_index").to_pylist() if "query_index" in result.column_names else [0] * len(result)
    filled = [0] * q
    for row, gid in zip(rows, result.column("face_id").to_pylist(), strict=True):
        if filled[row] < k:
            ids[row, filled[row]] = int(gid, 16)
            filled[row] += 1
    return ids


def flat(search: Any) -> Any:
    return search.distance_type("dot").bypass_vector_index()


def ivf_pq(search: Any) -> Any:
    return search.distance_type("cosine").nprobes(NPROBES).refine_factor(REFINE)


def partitions(n: int) -> int:
    return max(1, round(math.sqrt(n)))


def build_ivf_pq(settings: Settings, n: int) -> float:
    from lancedb.index import IvfPq

    table = Gallery(settings.storage).ensure("faces")
    config = IvfPq(
        distance_type="cosine",
        num_partitions=partitions(n),
        num_sub_vectors=SUB_VECTORS,
        max_iterations=IVF_ITERATIONS,
        sample_rate=IVF_SAMPLE_RATE,
    )
    _, seconds = timed(lambda: table.create_index("vector", config=config))
    return seconds


def anatomy(q: int, k: int) -> dict[str, float]:
    """`score_block`'s steps over ANATOMY_BLOCKS blocks of random rows, with the kernel `run_unit` would choose:
    the median of the last half (the running k-th has settled a little), plus a float32 GEMM of the same shape."""
    import torch

    from pipelines import matcher

    rows = Settings().match_block_rows
    rng = np.random.default_rng([SEED, q])
    prepared = matcher.ProbeSet.build(unit_rows(rng, q), "cpu", choose_filter_kernel(q, "cpu"))
    top = matcher.TopK(q, k)
    spent: dict[str, list[float]] = {}
    originals = {name: getattr(matcher, name) for name in ("filter_product", "_survivors", "exact_scores")}

    def timing(name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def wrapped(*args: Any) -> Any:
            value, seconds = timed(lambda: fn(*args))
            spent.setdefault(name, []).append(seconds)
            return value

        return wrapped

    try:
        for name, fn in originals.items():
            setattr(matcher, name, timing(name, fn))
        survivors = []
        for i in range(ANATOMY_BLOCKS):
            block, ids = unit_rows(rng, rows), np.arange(rows) + i * rows
            found, total = timed(partial(matcher.score_block, prepared, top, block, ids))
            spent.setdefault("score_block", []).append(total)
            survivors.append(len(found[0]))
            top.add(*found)
    finally:
        for name, fn in originals.items():
            setattr(matcher, name, fn)
    left, right = torch.from_numpy(unit_rows(rng, q)), torch.from_numpy(unit_rows(rng, rows))
    out = torch.empty(q, rows)
    gemm = [timed(lambda: torch.mm(left, right.T, out=out))[1] for _ in range(3)]
    late = ANATOMY_BLOCKS // 2
    result = {name: float(np.median(values[late:])) for name, values in spent.items()}
    return result | {"survivors": float(np.median(survivors[late:])), "float32 GEMM": float(np.median(gemm))}


# ---- checks -------------------------------------------------------------------------------------------------


def recall(got: np.ndarray, reference: np.ndarray) -> float:
    """Mean over probes of |got ∩ reference| / |reference| (sets of ids, order ignored)."""
    hits = [
        len(set(g[g >= 0].tolist()) & set(r[r >= 0].tolist())) / max(1, int((r >= 0).sum()))
        for g, r in zip(got, reference, strict=True)
    ]
    return float(np.mean(hits)) if hits else 1.0


def boundary_ties(got: np.ndarray, reference: np.ndarray, probes: np.ndarray, gallery: np.ndarray) -> tuple[int, int]:
    """Probes whose id sets differ, and how many of those differ only by ids scored (float64) at the k-th."""
    differ = tied = 0
    k = reference.shape[1]
    for row, (g, r) in enumerate(zip(got, reference, strict=True)):
        a, b = set(g[g >= 0].tolist()), set(r[r >= 0].tolist())
        if a == b:
            continue
        differ += 1
        ids = np.array(sorted(a | b))
        exact = gallery[ids].astype(np.float64) @ probes[row].astype(np.float64)
        kth = np.sort(exact)[::-1][min(k, len(exact)) - 1]
        odd = np.isin(ids, list(a ^ b))
        tied += bool(np.all(np.abs(exact[odd] - kth) <= TIE_TOLERANCE))
    return differ, tied


def found_sources(ids: np.ndarray, sources: np.ndarray) -> float:
    """Fraction of near-duplicate probes whose source gallery vector is ranked first."""
    near = sources >= 0
    return float(np.mean(ids[near, 0] == sources[near])) if near.any() else 1.0


# ---- one gallery size ---------------------------------------------------------------------------------------


def prepare_case(n: int, root: Path, res: Results, s3: LoopbackS3 | None) -> Case:
    gallery, gen_s = timed(lambda: gallery_vectors(n))
    settings, write_s = timed(lambda: build_home(root / f"home-{n}", gallery))
    res.once += [
        (n, "generate the unit-norm gallery (numpy, seeded)", gen_s),
        (n, f"write it to the LanceDB `faces` table ({math.ceil(n / CHUNK)} appends of <= {CHUNK:,} rows)", write_s),
    ]
    case = Case(n, settings, gallery, s3=s3)
    if s3 is not None:
        case.s3_bucket = s3.bucket()
        case.s3_settings, s3_write_s = timed(lambda: build_home(f"s3://{case.s3_bucket}/home-{n}", gallery))
        res.once.append(
            (n, "write it to the `faces` table of the S3 home (moto on loopback), the same appends", s3_write_s)
        )
    if has_faiss():
        case.faiss_index, add_s = faiss_index(gallery)
        res.once.append((n, "FAISS `IndexFlatIP.add` (copy into the index)", add_s))
    return case


def measure_exact(case: Case, q: int, args: argparse.Namespace, root: Path, res: Results) -> None:
    probes, sources = probe_vectors(case.gallery, q)
    case.probes[q], case.sources[q] = probes, sources
    wid = submit_watchlist(case.settings, root, probes, args.k)
    by_numpy, numpy_s = timed(lambda: numpy_top_k(probes, case.gallery, args.k))
    peers = [Row(case.n, q, "numpy", numpy_s, q, None, f"blocks of {BLOCK:,}; the reference (no FAISS)")]
    case.exact[q] = by_numpy
    faiss_times: list[float] = []
    ours_runs: dict[str, list[Ours]] = {kernel: [] for kernel in args.kernel_list}
    for _ in range(args.repeats):  # FAISS and ours in turn, so a change of load touches both
        if case.faiss_index is not None:
            case.exact[q], faiss_s = faiss_search(case.faiss_index, probes, args.k)
            faiss_times.append(faiss_s)
        for kernel in args.kernel_list:
            ours_runs[kernel].append(run_ours(case.settings, wid, kernel))
    if faiss_times:
        peers = [
            Row(case.n, q, "faiss", min(faiss_times), q, None, f"the reference; one `search`{tries(faiss_times)}"),
            Row(case.n, q, "numpy", numpy_s, q, recall(by_numpy, case.exact[q]), f"blocks of {BLOCK:,}"),
        ]
    for kernel, runs in ours_runs.items():
        ours = res.ours[(case.n, q, kernel)] = min(runs, key=lambda run: run.seconds)
        mine = ours_ids(case.settings, ours.run_id, q, args.k)
        note = f"filter {kernel_label(kernel, ours)}; {ours_note(mine, by_numpy, case)}"
        note += tries([run.seconds for run in runs])
        res.rows.append(Row(case.n, q, "ours", ours.seconds, q, recall(mine, case.exact[q]), note, kernel))
    if case.s3_settings is not None:
        measure_s3(case, q, wid, args, root, res)
    res.rows += [*peers, measure_flat(case, q, probes, args, case.exact[q])]


def tries(seconds: list[float]) -> str:
    """The note on a row timed more than once (`--repeats`): the row is the fastest run."""
    if len(seconds) < 2:
        return ""
    return f"; fastest of {len(seconds)} runs ({', '.join(f'{s:.2f}' for s in seconds)} s)"


def measure_s3(case: Case, q: int, wid: str, args: argparse.Namespace, root: Path, res: Results) -> None:
    """`run_match` on the S3 home right after the local home's (chosen kernel), per engine; the requests it made.

    The local engine's local-home figure is the `ours` row just measured (kernel `auto`) where there is one."""
    assert case.s3_settings is not None and case.s3 is not None
    s3_wid = submit_watchlist(case.s3_settings, root, case.probes[q], args.k)
    table_bytes = case.s3.stored_bytes(case.s3_bucket, f"home-{case.n}/lance/faces.lance/data/")
    for engine in args.s3_engine_list:
        print(f"N={case.n:,} Q={q}: local home against S3 home, {engine} engine", file=sys.stderr, flush=True)
        mark = case.s3.tally.mark()
        try:
            local = res.ours.get((case.n, q, "auto")) if engine == "local" else None
            local = local or run_ours(case.settings, wid, "auto", engine)
            mark = case.s3.tally.mark()
            remote = run_ours(case.s3_settings, s3_wid, "auto", engine)
        except RuntimeError as exc:
            if engine == "local":
                raise
            last = [line for line in str(exc).splitlines() if line.strip()][-1]
            res.s3_failed.append(f"N={case.n:,} Q={q} {engine}: {last.strip()}")  # e.g. Ray's start timed out
            continue
        requests = case.s3.tally.since(mark)
        here = ours_ids(case.settings, local.run_id, q, args.k)
        there = ours_ids(case.s3_settings, remote.run_id, q, args.k)
        same = float(np.mean([set(a.tolist()) == set(b.tolist()) for a, b in zip(here, there, strict=True)]))
        res.s3.append(S3Pair(case.n, q, engine, local, remote, requests, table_bytes, same))


def kernel_label(kernel: str, ours: Ours) -> str:
    ran = "/".join(ours.kernels) or "none"
    return f"**{ran}** (chosen)" if kernel == "auto" else f"**{ran}** (forced)"


def ours_note(mine: np.ndarray, by_numpy: np.ndarray, case: Case) -> str:
    q = len(mine)
    differ, tied = boundary_ties(mine, case.exact[q], case.probes[q], case.gallery)
    first = found_sources(mine, case.sources[q])
    note = f"vs numpy {recall(mine, by_numpy):.4f}; near-duplicate source ranked 1st: {first:.3f}"
    if differ:
        note += f"; {differ} probe(s) differ from the reference, {tied} of them only by float ties at the k-th"
    return note


def measure_flat(case: Case, q: int, probes: np.ndarray, args: argparse.Namespace, reference: np.ndarray) -> Row:
    m = min(q, args.lancedb_flat_max_q)
    ids, seconds = lancedb_search(case.settings, probes[:m], args.k, flat)
    note = "distance `dot`, prefilter on model_id"
    if m < q:
        note += f"; **{m} of {q} probes timed, pairs/s extrapolated** (full Q ~ {seconds * q / m:,.0f} s)"
    return Row(case.n, q, "lancedb_flat", seconds, m, recall(ids, reference[:m]), note)


def measure_ivf(case: Case, queries: list[int], args: argparse.Namespace, res: Results) -> None:
    build_s = build_ivf_pq(case.settings, case.n)
    name = (
        f"LanceDB IVF_PQ build ({partitions(case.n)} partitions, {SUB_VECTORS} sub-vectors, "
        f"max_iterations {IVF_ITERATIONS}, sample_rate {IVF_SAMPLE_RATE})"
    )
    res.once.append((case.n, name, build_s))
    lancedb_search(case.settings, case.probes[queries[0]][:1], args.k, ivf_pq)  # warm-up: loads the index
    for q in queries:
        ids, seconds = lancedb_search(case.settings, case.probes[q], args.k, ivf_pq)
        first = found_sources(ids, case.sources[q])
        note = f"cosine, nprobes {NPROBES}, refine_factor {REFINE}; near-duplicate source ranked 1st: {first:.3f}"
        res.rows.append(Row(case.n, q, "lancedb_ivf_pq", seconds, q, recall(ids, case.exact[q]), note))


def measure_size(n: int, args: argparse.Namespace, root: Path, res: Results, s3: LoopbackS3 | None) -> None:
    case = prepare_case(n, root, res, s3 if n in args.s3_size_list else None)
    try:
        for q in args.query_list:
            print(f"N={n:,} Q={q}: measuring", file=sys.stderr, flush=True)
            measure_exact(case, q, args, root, res)
        if not args.no_ivf_pq:
            measure_ivf(case, args.query_list, args, res)
    finally:
        shutil.rmtree(case.settings.local_home, ignore_errors=True)
        if case.s3 is not None:
            case.s3.drop(case.s3_bucket)  # moto keeps the objects in this process


# ---- report -------------------------------------------------------------------------------------------------

METHODS = {
    "ours": "**ours** (`run_match`, local: Lance scan -> filter product, exact rescoring -> Parquet)",
    "faiss": "FAISS `IndexFlatIP` (in memory)",
    "numpy": "numpy GEMM + argpartition (in memory)",
    "lancedb_flat": "LanceDB flat (no index, one multi-vector query)",
    "lancedb_ivf_pq": "LanceDB IVF_PQ (approximate)",
}


def fmt_recall(value: float | None) -> str:
    return "ref" if value is None else f"{value:.4f}"


def reference_name(res: Results) -> str:
    return "FAISS" if any(r.method == "faiss" for r in res.rows) else "numpy"


def throughput_lines(res: Results, k: int) -> list[str]:
    order = list(METHODS)
    rows = sorted(res.rows, key=lambda r: (r.n, r.q, order.index(r.method)))
    cells = [
        [
            f"{r.n:,}",
            str(r.q),
            METHODS[r.method],
            str(r.timed_q),
            f"{r.seconds:.2f}",
            f"{r.rate / MB:,.1f}",
            fmt_recall(r.recall),
            r.note,
        ]
        for r in rows
    ]
    header = [
        "N",
        "Q",
        "Method",
        "Probes timed",
        "Wall s",
        "M pairs/s",
        f"Recall@{k} vs {reference_name(res)}",
        "Notes",
    ]
    return markdown_table(header, cells, "rrlrrrrl")


def once_lines(res: Results) -> list[str]:
    cells = [[f"{n:,}", name, f"{s:.2f}"] for n, name, s in res.once]
    return markdown_table(["N", "One-time cost (not in the rows above)", "Seconds"], cells, "rlr")


def rate(res: Results, n: int, q: int, method: str) -> float:
    return next((r.rate for r in res.rows if (r.n, r.q, r.method) == (n, q, method)), 0.0)


def verdict(ratio: float, target: float, applies: bool) -> str:
    if not applies:
        return "(no target)"
    return "yes" if ratio >= target else "NO"


def ratio_lines(res: Results, main: str) -> list[str]:
    """Ours with the first `--kernels` setting (the first ours row of each size) against the peers."""
    cells = []
    for n, q in sorted({(n, q) for n, q, kernel in res.ours if kernel == main}):
        ours, peer, lance = (rate(res, n, q, m) for m in ("ours", "faiss", "lancedb_flat"))
        to_lance = ours / lance if lance else 0.0
        at_target = (n, q) == (TARGET_N, TARGET_Q)
        faiss_cells = [f"{ours / peer:.2f}", verdict(ours / peer, FAISS_TARGET, at_target)] if peer else ["n/a"] * 2
        cells.append(
            [
                f"{n:,}",
                str(q),
                cpu_label(),
                f"{ours / MB:,.1f}",
                *faiss_cells,
                f"{to_lance:.1f}",
                verdict(to_lance, FLAT_TARGET, True),
            ]
        )
    header = [
        "N",
        "Q",
        "CPU (vector extensions)",
        "Ours M pairs/s",
        f"Ours / FAISS (target >= {FAISS_TARGET} at N=1M, Q=1000)",
        "Met",
        f"Ours / LanceDB flat (target >= {FLAT_TARGET:.0f})",
        "Met",
    ]
    return markdown_table(header, cells, "rrlrrlrl")


def cpu_label() -> str:
    """This CPU's model and what the filter kernels care about: AVX-512 and an int8 dot-product instruction."""
    report = kernel_report()
    flags = set(report.vector_flags)
    wide = "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else report.torch_capability
    int8 = [f for f in ("avx512_vnni", "avx_vnni", "amx_int8") if f in flags]
    return f"{report.cpu_model} ({wide}, {'+'.join(int8) if int8 else 'no VNNI'})"


def memory_lines(res: Results) -> list[str]:
    cells = []
    for (n, q, kernel), ours in sorted(res.ours.items()):
        probe_bytes = q * FACE_DIM * 4
        beyond = ours.growth - probe_bytes
        met = ("yes" if beyond < MEMORY_TARGET else "NO") if n == TARGET_N else "(no target)"
        cells.append(
            [
                f"{n:,}",
                str(q),
                kernel_cell(kernel, ours),
                f"{probe_bytes / MB:.2f}",
                f"{ours.rss_before / MB:,.0f}",
                f"{ours.peak_rss / MB:,.0f}",
                f"{ours.vm_hwm / MB:,.0f}",
                f"{ours.growth / MB:,.0f}",
                f"{beyond / MB:,.0f}",
                met,
            ]
        )
    header = [
        "N",
        "Q",
        "Filter kernel",
        "Probe matrix MB",
        "RSS before MB",
        "Peak RSS MB (ru_maxrss)",
        "VmHWM MB (cross-check)",
        "Peak - before MB",
        f"Beyond the probes MB (target < {MEMORY_TARGET / MB:,.0f} at N=1M)",
        "Met",
    ]
    return markdown_table(header, cells, "rrlrrrrrrl")


def phase_lines(res: Results) -> list[str]:
    cells = []
    for (n, q, kernel), ours in sorted(res.ours.items()):
        p = ours.phases
        scan = p.get("match loop", 0.0) - p.get("score_block", 0.0) - p.get("TopK.add", 0.0)
        inside = [p.get("filter product", 0.0), p.get("survivors", 0.0), p.get("rescore", 0.0)]
        parts = [p.get("read probes", 0.0), scan, *inside, p.get("score_block", 0.0) - sum(inside)]
        parts += [p.get("TopK.add", 0.0), p.get("metadata take", 0.0), p.get("result rows", 0.0)]
        parts += [p.get("Parquet write", 0.0)]
        other = ours.seconds - sum(parts)
        cells.append(
            [
                f"{n:,}",
                str(q),
                kernel_cell(kernel, ours),
                f"{ours.imports:.2f}",
                *(f"{s:.2f}" for s in [*parts, other]),
                f"{ours.seconds:.2f}",
                str(ours.calls.get("score_block", 0)),
            ]
        )
    header = [
        "N",
        "Q",
        "Filter kernel",
        "imports (not in total)",
        "read probes",
        "Lance scan + to numpy",
        "filter product",
        "survivors (compare pass)",
        "exact rescoring",
        "rest of score_block",
        "TopK.add",
        "metadata take",
        "result rows",
        "Parquet write",
        "other",
        "total s",
        "blocks",
    ]
    return markdown_table(header, cells, "rrl" + "r" * 14)


def kernel_cell(kernel: str, ours: Ours) -> str:
    return f"{'/'.join(ours.kernels) or 'none'} ({'chosen' if kernel == 'auto' else 'forced'})"


ANATOMY_STEPS = ("filter_product", "_survivors", "exact_scores", "score_block", "float32 GEMM")


def anatomy_lines(res: Results) -> list[str]:
    cells = [
        [
            str(q),
            choose_filter_kernel(q, "cpu"),
            *(f"{steps[name] * 1000:.1f}" for name in ANATOMY_STEPS),
            f"{steps['survivors']:,.0f}",
        ]
        for q, steps in sorted(res.anatomy.items())
    ]
    header = [
        "Q",
        "Filter kernel (chosen)",
        "filter product ms (int8: quantise the block, int8 GEMM; float32: one GEMM)",
        "survivors ms (one compare pass)",
        "exact rescoring ms",
        "score_block ms",
        "float32 GEMM alone ms (for comparison)",
        "pairs rescored",
    ]
    return markdown_table(header, cells, "rlrrrrrr")


def step_of(request: S3Request, spans: list[list[Any]]) -> str:
    """The top-level step of `run_match` (timed in the child) during which the server got the request."""
    return next((str(label) for label, start, end in spans if start <= request.start <= end), REST)


def steps_traffic(pair: S3Pair) -> dict[str, Traffic]:
    return traffic_by(pair.requests, partial(step_of, spans=pair.s3.spans))


def s3_lines(res: Results) -> list[str]:
    """Local home against S3 home: wall time and ratio, the steps' seconds on each, the requests by step."""
    if not res.s3:
        return []
    lines = [
        "The same gallery on an S3 home (moto's S3 server on loopback, run by this script in its own process; "
        "every request counted in the server), `run_match` right after the local home's, same run:",
        "",
    ]
    cells = []
    for pair in res.s3:
        t = total_traffic(pair.requests)
        cells.append(
            [
                f"{pair.n:,}",
                str(pair.q),
                pair.engine,
                f"{pair.local.seconds:.2f}",
                f"{pair.s3.seconds:.2f}",
                f"{pair.s3.seconds / pair.local.seconds:.1f}" if pair.local.seconds else "-",
                f"{pair.same_ids:.3f}",
                *traffic_cells(t)[:8],
                f"{t.sent / MB:,.1f} ({t.sent / max(1, pair.table_bytes):.2f}x)",
                f"{t.whole / MB:,.0f}",
                f"{t.busy:.2f}",
            ]
        )
    header = ["N", "Q", "Engine", "Local home s", "S3 home s", "S3 / local", "Same top-K ids", "S3 requests", *KINDS]
    header += ["MB read from S3 (x the table's data)", "MB moto read to cut the ranges", "moto busy s (sum)"]
    lines += [*markdown_table(header, cells, "rrl" + "r" * 16), ""]
    lines += ["Where the time goes on each home (seconds, timed in the child by wrapping the functions):", ""]
    cells = []
    for pair in res.s3:
        for home, ours in (("local", pair.local), ("S3", pair.s3)):
            cells.append([f"{pair.n:,}", str(pair.q), pair.engine, home, *step_cells(ours), f"{ours.seconds:.2f}"])
    header = ["N", "Q", "Engine", "Home", "read probes", "plan units (open the table, list fragments)"]
    header += ["Lance scan + to numpy", "score_block + TopK.add", "metadata take", "result rows", "Parquet write"]
    header += [REST, "total s"]
    lines += [*markdown_table(header, cells, "rrll" + "r" * 9), ""]
    lines += ["S3 requests by step of `run_match` (by the time the server got them):", ""]
    cells = []
    for pair in res.s3:
        by_step = steps_traffic(pair)
        for step in [*STEPS, REST]:
            if step in by_step:
                cells.append([f"{pair.n:,}", str(pair.q), pair.engine, step, *traffic_cells(by_step[step])])
    lines += [*markdown_table(["N", "Q", "Engine", "Step", *TRAFFIC_HEADER], cells, "rrll" + "r" * 12), ""]
    return lines


def step_cells(ours: Ours) -> list[str]:
    """Seconds of the top-level steps; on Ray the scan and scoring run in the workers (the whole loop is shown)."""
    p = ours.phases
    scoring = p.get("score_block", 0.0) + p.get("TopK.add", 0.0)
    scan = p.get("match loop", 0.0) - scoring
    parts = [p.get(x, 0.0) for x in ("read probes", "plan units")]
    parts += [scan, scoring, *(p.get(x, 0.0) for x in ("metadata take", "result rows", "Parquet write"))]
    cells = [f"{v:.2f}" for v in parts]
    if ours.engine == "ray":
        cells[2], cells[3] = f"{scan:.2f} (whole loop, in Ray)", "(in Ray)"
    return [*cells, f"{ours.seconds - sum(parts):.2f}"]


def s3_notes(res: Results) -> list[str]:
    """The request pattern in numbers: per block, per row, listings inside the scan, dataset opens."""
    failed = [f"- Left out (the run failed): {'; '.join(res.s3_failed)}."] if res.s3_failed else []
    if not res.s3:
        return failed
    found = []
    for pair in res.s3:
        by_step = steps_traffic(pair)
        in_loop = [r for r in pair.requests if step_of(r, pair.s3.spans) == "match loop"]
        take = by_step.get("metadata take", Traffic())
        scan = [r for r in in_loop if "/faces.lance/data/" in r.key and r.kind in ("GET", "GET range")]
        big = [r for r in scan if r.sent >= MB]
        opens = sum(1 for r in pair.requests if "/faces.lance/_versions/" in r.key and r.op == "GetObject")
        blocks = pair.s3.calls.get("score_block", 0)
        lists = sum(t.kinds.get("LIST", 0) for t in by_step.values())
        found.append(
            f"N={pair.n:,} Q={pair.q} {pair.engine}: {len(pair.requests)} requests "
            f"({len(pair.requests) / pair.n * 1e3:.2f} per 1,000 gallery rows), {lists} of them LIST; the match "
            f"loop {len(in_loop)} requests"
            + (f" for {blocks} blocks" if blocks else "")
            + f", {sum(1 for r in in_loop if r.kind == 'LIST')} LIST, the vectors in {len(big)} ranged GETs of "
            f"{sum(r.sent for r in big) / max(1, len(big)) / MB:.1f} MB on average, up to "
            f"{max_in_flight(in_loop)} in flight, {sum(r.sent for r in scan) / max(1, pair.table_bytes):.2f}x the "
            f"table's data read; the metadata take {take.requests} requests ({take.sent / MB:.2f} MB); the `faces` "
            f"manifest read {opens} times."
        )
    outside = all(
        r.kind != "LIST" for pair in res.s3 for r in pair.requests if step_of(r, pair.s3.spans) == "match loop"
    )
    return [
        "- The S3 rows: " + " ".join(found) + " The match loop's requests follow the data file's bytes (large "
        "ranges), not its blocks or rows. "
        + ("The LISTs are all outside the match loop: " if outside else "Where the LISTs come from: ")
        + "LanceDB lists a table's `_versions/` before every operation on it (the tables are "
        "opened with `read_consistency_interval=0`) and `Gallery.open` lists the table names; the session (writer "
        "lease, audit records, unfinished uploads) adds its own small requests. The `faces` table is opened anew by "
        "`Gallery.open`, `plan_units`, the unit and `_metadata` (manifest HEAD and GET each), and `_metadata`'s open "
        "reads the data file's footer again before the top-K rows' columns. moto is a Python server: every request "
        "is parsed and answered in Python, and a ranged GET reads the whole object from moto's spool file to cut "
        "the range (`MB moto read to cut the ranges`), so a request into a large data file costs moto far more than "
        "the bytes it sends; its summed busy time runs across concurrent requests. The ratio is therefore an upper "
        "bound of the request pattern against a slow server, not what a real S3 would take: there is no target "
        "ratio.",
        *failed,
    ]


def versions() -> str:
    import lance
    import lancedb

    return (
        f"numpy {np.__version__}, {faiss_version()}, "
        f"lancedb {lancedb.__version__}, pylance {lance.__version__}, pyarrow {pa.__version__}"
    )


def faiss_version() -> str:
    if not has_faiss():
        return "faiss-cpu not installed (FAISS peer skipped; the numpy GEMM is the exact reference)"
    import faiss

    return f"faiss-cpu {faiss.__version__} ({faiss.omp_get_max_threads()} OpenMP threads)"


def kernel_lines(timing: FilterTiming | None) -> list[str]:
    """The CPU's vector extensions, the filter kernel chosen for large batches and why, and the probe's timings."""
    report = kernel_report()
    lines = [
        f"CPU vector extensions: {', '.join(report.vector_flags) or 'none known'} (torch CPU capability "
        f"{report.torch_capability}); filter kernel chosen for Q >= {INT8_MIN_PROBES}: **{report.kernel}** "
        f"({report.reason}); below {INT8_MIN_PROBES} probes float32",
    ]
    if timing is not None:
        lines.append(
            f"Kernel probe, timed for this table: int8 {timing.int8_ms:.2f} ms, float32 {timing.float32_ms:.2f} ms "
            f"(`matcher.filter_product` of {INT8_MIN_PROBES} probes by {PROBE_ROWS} rows, 512-d, best of up to 3 "
            f"rounds: it stops once int8 is {CLEARLY_SLOWER:g}x slower)"
        )
    return lines


def render(res: Results, args: argparse.Namespace, command: str) -> str:
    when = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    lines = [args.heading, ""]
    if max(args.size_list) < TARGET_N or max(args.query_list) < TARGET_Q:
        lines += ["**Reduced run** (below N=1M, Q=1000): the targets are stated at N=1M, Q=1000.", ""]
    lines += [f"Measured {when} with `{command}`.", ""]
    lines += [f"- {item}" for item in [*machine("auto"), *kernel_lines(res.timing), versions()]]
    lines += [
        f"- 1-minute load average at start / end: {' / '.join(f'{v:.2f}' for v in res.load)} "
        f"(anything else running on the machine slows every row){load_warning(res.load)}",
        f"- Data: N seeded unit-norm {FACE_DIM}-d float32 vectors, written to the `faces` table of a fresh "
        f"GALLERYMATCH home (model `{MODEL}`, appends of {CHUNK:,} rows, so one fragment per 100k rows); Q seeded "
        f"unit-norm probes, every other one a gallery vector plus noise (cosine ~0.89), submitted with "
        f"`jobs.watchlist.submit` (top_k={args.k}).",
        "",
    ]
    lines += [*throughput_lines(res, args.k), "", *ratio_lines(res, args.kernel_list[0]), "", *memory_lines(res), ""]
    lines += ["Where the time of `run_match` goes (seconds, timed in the child by wrapping the functions):", ""]
    lines += [*phase_lines(res), ""]
    lines += [
        f"Inside `score_block`: blocks of {Settings().match_block_rows:,} random rows (`match_block_rows`), "
        f"{ANATOMY_BLOCKS} in a row, median of the last {ANATOMY_BLOCKS // 2}:",
        "",
    ]
    lines += [*anatomy_lines(res), "", *once_lines(res), ""]
    lines += s3_lines(res)
    lines += [*notes(args)[:-1], *s3_notes(res), ""]
    return "\n".join(lines) + "\n"


def notes(args: argparse.Namespace) -> list[str]:
    return [
        "How to read it:",
        "",
        "- Throughput is probe-gallery pairs per second: Q x N / wall seconds (for a capped row, the probes timed "
        "x N / seconds). The peers get the vectors already in memory; **ours** reads them from the Lance table "
        "(just written, so mostly from the page cache) and includes reading the watchlist and probes, the "
        "metadata take, building the result rows and writing the Parquet result set.",
        f"- LanceDB flat is capped at `--lancedb-flat-max-q {args.lancedb_flat_max_q}` probes: where Q is larger, "
        "only the first probes are searched and its pairs/s (and so the ratio) is extrapolated from them, which "
        "assumes its time grows linearly with Q (every probe's distances are computed; the scan is shared).",
        "- **ours** runs in a child process (`--child`): torch, lance, lancedb and the local engine are imported "
        "before the clock and the RSS baseline (the `imports` column; `import lancedb` alone takes seconds), so "
        "`Peak - before` is the match's own working memory (`ru_maxrss` after the call minus the RSS just before). "
        "The child is forked by `/bin/sh`, not exec'd from the benchmark: Linux keeps the RSS high-water mark of "
        "the process that calls exec in `ru_maxrss`, so a direct child reported the parent's ~6 GB. "
        "`Lance scan + to numpy` is the match loop less `score_block` and `TopK.add`.",
        "- **ours** is exact: one matrix product filters every block with a computed error bound (no pair "
        "that can reach a probe's top K is dropped), and the survivors are rescored in float64 "
        "(`pipelines/matcher.py` explains the bound); recall@K 1.0 against the reference checks it end to end. "
        "The filter is int8 only on a CPU with int8 dot-product instructions where a timed probe finds it faster "
        "than float32 (`pipelines.match_unit.choose_filter_kernel`), float32 elsewhere; the kernel never changes a "
        "score. A `(forced)` row runs every unit with that kernel instead (`--kernels`), for comparison.",
        "- Recall@K compares sets of ids per probe with the reference (FAISS, or numpy without it); a differing id "
        f"whose float64 score is within {TIE_TOLERANCE:g} of the k-th is counted as a float tie. IVF_PQ recall "
        "is against the same exact sets; uniformly random vectors have no cluster structure, the worst case for "
        "IVF, so its recall of the random half of the probes is low by construction: the near-duplicate column is "
        "the meaningful one there.",
        "- IVF_PQ is timed after a one-probe warm-up query (index load); its build uses fewer k-means iterations and "
        f"samples than LanceDB's defaults (max_iterations {IVF_ITERATIONS}, sample_rate {IVF_SAMPLE_RATE} instead "
        "of 50 and 256), which took ~5 min at N=100k on this machine.",
        "- Every row uses all the cores it can: torch (ours), OpenMP (FAISS), the numpy BLAS and LanceDB's own "
        "thread pool.",
        "",
    ]


# ---- docs file and CLI --------------------------------------------------------------------------------------


def int_list(text: str) -> list[int]:
    return [int(v.replace("_", "")) for v in text.split(",") if v.strip()]


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sizes", default=DEFAULT_SIZES, help="gallery sizes N, comma separated (%(default)s)")
    parser.add_argument("--queries", default=DEFAULT_QUERIES, help="probe counts Q, comma separated (%(default)s)")
    parser.add_argument("--k", type=int, default=10, help="top K per probe (default %(default)s)")
    parser.add_argument("--repeats", type=int, default=1, help="FAISS and ours timed in turn this often, fastest kept")
    parser.add_argument("--no-ivf-pq", action="store_true", help="skip the LanceDB IVF_PQ build and rows (slow)")
    parser.add_argument("--lancedb-flat-max-q", type=int, default=100, help="probes timed for LanceDB flat")
    parser.add_argument("--workdir", type=Path, default=None, help="parent of the temporary data (default: $TMPDIR)")
    parser.add_argument("--no-write", action="store_true", help="print the tables only; leave the docs alone")
    parser.add_argument("--out", type=Path, default=Path("docs/benchmarks.md"), help="docs file (%(default)s)")
    parser.add_argument("--heading", default=SECTION, help="the docs section (its heading) to replace or append")
    parser.add_argument(
        "--kernels",
        default="auto",
        help="filter kernels of ours, comma separated: auto (chosen for this CPU), int8, float32 (forced); "
        "the first is the one in the ratio table (%(default)s)",
    )
    parser.add_argument(
        "--s3-sizes",
        default=DEFAULT_S3_SIZES,
        help="sizes (of --sizes) at which the gallery is also matched on an S3 home, moto on loopback; "
        "'none' for none (%(default)s)",
    )
    parser.add_argument(
        "--s3-engines", default=DEFAULT_S3_ENGINES, help="engines of the S3 comparison: local, ray (%(default)s)"
    )
    parser.add_argument("--s3-log", type=Path, default=None, help="write every counted S3 request here (JSON lines)")
    parser.add_argument(
        "--child", nargs=4, metavar=("HOME", "WATCHLIST_ID", "KERNEL", "ENGINE"), help=argparse.SUPPRESS
    )
    args = parser.parse_args(argv)
    args.size_list, args.query_list = int_list(args.sizes), int_list(args.queries)
    s3_sizes = [] if args.s3_sizes.strip().lower() in ("", "none") else int_list(args.s3_sizes)
    args.s3_size_list = [n for n in s3_sizes if n in args.size_list]
    args.s3_engine_list = [v.strip() for v in args.s3_engines.split(",") if v.strip()]
    if not args.s3_engine_list or not set(args.s3_engine_list) <= {"local", "ray"}:
        parser.error("--s3-engines takes local, ray")
    args.kernel_list = [v.strip() for v in args.kernels.split(",") if v.strip()]
    if not args.kernel_list or not set(args.kernel_list) <= {"auto", *FILTER_KERNELS}:
        parser.error(f"--kernels takes auto, {', '.join(FILTER_KERNELS)}")
    if not args.heading.startswith("## "):
        parser.error("--heading must be a second-level markdown heading ('## ...')")
    if not args.size_list or not args.query_list or min(args.size_list + args.query_list) < 1:
        parser.error("--sizes and --queries need positive integers")
    if args.repeats < 1:
        parser.error("--repeats needs a positive integer")
    if not 1 <= args.k <= 10_000 or args.lancedb_flat_max_q < 1 or args.k > min(args.size_list):
        parser.error("need 1 <= --k <= 10000 (and <= every size), --lancedb-flat-max-q >= 1")
    return args


def command_line(argv: list[str]) -> str:
    return shlex.join([os.path.relpath(sys.executable), "scripts/bench_match.py", *argv])


@contextmanager
def s3_server(wanted: bool) -> Iterator[LoopbackS3 | None]:
    if not wanted:
        yield None
        return
    with loopback_s3() as s3:
        yield s3


def run(args: argparse.Namespace) -> Results:
    res = Results(load=[os.getloadavg()[0]], timing=time_filters())
    with (
        tempfile.TemporaryDirectory(prefix="bench-match-", dir=args.workdir) as name,
        s3_server(bool(args.s3_size_list)) as s3,
    ):
        for n in args.size_list:
            measure_size(n, args, Path(name), res, s3)
    res.anatomy = {q: anatomy(q, args.k) for q in args.query_list}
    res.load.append(os.getloadavg()[0])
    return res


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.child:
        return child(*args.child)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    res = run(args)
    section = render(res, args, command_line(argv))
    if args.s3_log is not None:
        write_s3_log(args.s3_log, [(f"N={p.n} Q={p.q} {p.engine}", p.requests) for p in res.s3])
    print(section)
    if not args.no_write:
        write_section(args.out, section, args.heading)
        print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

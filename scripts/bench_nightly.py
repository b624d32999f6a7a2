"""Benchmark the nightly delta re-match (`gallerymatch nightly`) against a full re-match of every watchlist.

A seeded synthetic gallery of N 512-d rows is written to a fresh home (`Gallery.upsert` under the writer lease,
as every gallery write is), W watchlists of Q probes are submitted, and then, in this order, all in this process:

1. night 1: `run_nightly`: every watchlist has no earlier run, so each gets a full run (`first_run`);
2. N x `--append-frac` new rows are written (one upsert: one commit);
3. night 2: `run_nightly` again: every watchlist extended by the delta (the measured figure);
4. night 3: `run_nightly` with nothing new: the fixed cost of a night (it must write no result set);
5. full re-match: `run_match` of every watchlist, one after the other (the reference, at the same gallery
   version as night 2);
6. check: every watchlist's delta run has the same rows (probe, rank, gallery id, score) as its full run.

The scans of the delta are counted by wrapping `delta_blocks` (calls, rows read, per model): the target is one
scan per model. The target: night 2 costs at most 5% of the full re-match plus the fixed cost of night 3.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import re
import resource
import shlex
import statistics
import sys
import tempfile
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from bench_ingest import load_warning, machine, markdown_table, timed, write_section
from bench_match import NEAR_NOISE, SOURCE, faces_chunk, import_libraries, kernel_lines, unit_rows

import jobs.nightly
import lance_tables.delta
from jobs.match import MatchEngine, run_match
from jobs.nightly import run_nightly
from jobs.session import writer_session
from jobs.watchlist import Submission, submit
from lance_tables.sources import add_source
from lance_tables.store import Gallery
from pipelines.models import FACE_DIM
from pipelines.results import list_runs, load_run
from pipelines.settings import Settings

SECTION = "## Nightly delta re-match (scripts/bench_nightly.py)"
SEED = 20261203
MODEL = "bench-model"  # the model id of bench_match's rows (`faces_chunk`)
PURPOSE = "criminal-investigation"  # not a child-protection purpose: the gallery filter adds `minor = false`
CASES = 5  # watchlists are spread over this many case ids
TARGET_SHARE = 0.05  # the delta costs at most this share of the full re-match, plus the fixed cost
TARGET_GALLERY, TARGET_APPEND, TARGET_WATCHLISTS, TARGET_PROBES = 1_000_000, 0.01, 50, 100
DEFAULT_GALLERY = 1_000_000
DEFAULT_CHUNK = 100_000  # gallery rows per upsert (one commit, one fragment each)
COMPARED = ("probe_id", "rank", "gallery_id", "score")
MB = 1e6

PHASES = (  # (module, attribute, label): every call timed, in the steps that make them
    ("jobs.nightly", "run_retention", "retention"),
    ("jobs.nightly", "latest_runs", "latest runs (every manifest)"),
    ("jobs.nightly", "read_probes_of", "read probes"),
    ("jobs.nightly", "parent_candidates", "read last runs' result sets"),
    ("jobs.nightly", "stamps_of", "last candidates' stamps (stamps_of)"),
    ("jobs.nightly", "scan_delta", "delta scan + scoring (scan_delta)"),
    ("jobs.nightly", "metadata", "delta metadata take"),
    ("jobs.nightly", "match_watchlist", "runs (match_watchlist)"),
    ("jobs.match", "match_watchlist", "runs (match_watchlist)"),
    ("jobs.match", "_partials", "full match loop (engine)"),
    ("jobs.match", "write_result_set", "Parquet writes"),
)
SCANNER = "delta_blocks"  # counted where the nightly looks it up, and where it is defined
PHASE_ORDER = tuple(dict.fromkeys(label for _, _, label in PHASES))


@dataclass
class Scan:
    """One call of `delta_blocks`: one pass over the rows written since a version, for one model."""

    model: str
    rows: int = 0
    blocks: int = 0
    seconds: float = 0.0  # spent inside the scan (reading and decoding), not in the scoring between blocks


@dataclass
class Step:
    """One timed call: a night, or the full re-match of every watchlist."""

    label: str
    seconds: float
    rss_before: int
    peak_rss: int  # this process's peak RSS during the step (the high-water mark is reset before it)
    runs: int = 0
    modes: dict[str, int] = field(default_factory=dict)  # "delta" / "full" (and its reason) -> runs
    skipped: int = 0
    new_candidates: int = 0
    result_sets: int = 0  # result sets written by the step (manifests before and after)
    phases: dict[str, float] = field(default_factory=dict)
    calls: dict[str, int] = field(default_factory=dict)
    scans: list[Scan] = field(default_factory=list)
    per_watchlist: list[float] = field(default_factory=list)  # full re-match: each run_match

    @property
    def growth(self) -> int:
        return max(0, self.peak_rss - self.rss_before)


@dataclass
class Check:
    """The delta runs of night 2 against the full runs of the same watchlists at the same gallery version."""

    compared: int = 0
    equal: int = 0
    rows: int = 0
    differing: list[str] = field(default_factory=list)
    same_version: bool = True
    appended_top1: int = 0  # probes whose best candidate (delta run) is a row appended before night 2
    near_appended: int = 0  # probes made as noisy copies of appended rows

    @property
    def ok(self) -> bool:
        return self.compared > 0 and self.equal == self.compared and self.same_version


@dataclass
class Results:
    gallery: int
    appended: int
    watchlists: int
    probes: int
    top_k: int
    engine: str
    chunk: int
    build_s: float = 0.0
    submit_s: float = 0.0
    append_s: float = 0.0
    ray_start_s: float = 0.0
    imports_s: float = 0.0
    code: str = ""
    steps: dict[str, Step] = field(default_factory=dict)
    check: Check = field(default_factory=Check)
    load: list[float] = field(default_factory=list)
    peak_rss: int = 0  # the whole process (build included)

    @property
    def delta(self) -> Step:
        return self.steps["delta"]

    @property
    def full(self) -> Step:
        return self.steps["full"]

    @property
    def fixed(self) -> Step:
        return self.steps["nothing_new"]

    @property
    def ratio(self) -> float:
        return self.delta.seconds / self.full.seconds if self.full.seconds > 0 else float("inf")

    @property
    def variable_share(self) -> float:
        """(delta - fixed) / full: the share of the full re-match the delta costs beyond the fixed cost."""
        return (self.delta.seconds - self.fixed.seconds) / self.full.seconds if self.full.seconds > 0 else 0.0

    @property
    def budget(self) -> float:
        """What the target allows night 2: 5% of the full re-match plus the fixed cost."""
        return TARGET_SHARE * self.full.seconds + self.fixed.seconds

    @property
    def met(self) -> bool:
        return self.delta.seconds <= self.budget

    def scans_per_model(self, step: str) -> dict[str, int]:
        out: dict[str, int] = {}
        for scan in self.steps[step].scans:
            out[scan.model] = out.get(scan.model, 0) + 1
        return out


# ---- memory -------------------------------------------------------------------------------------------------


def current_rss() -> int:
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def vm_hwm() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def reset_peak() -> bool:
    """Reset this process's RSS high-water mark (Linux >= 4.0: `5` to /proc/self/clear_refs)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


# ---- instrumentation ----------------------------------------------------------------------------------------


class Probe:
    """Times the PHASES and counts the delta scans while installed; `take()` returns and clears the tallies."""

    def __init__(self) -> None:
        self.spent: dict[str, float] = {}
        self.calls: dict[str, int] = {}
        self.scans: list[Scan] = []

    def take(self) -> tuple[dict[str, float], dict[str, int], list[Scan]]:
        out = (dict(self.spent), dict(self.calls), list(self.scans))
        self.spent.clear()
        self.calls.clear()
        self.scans.clear()
        return out

    def timer(self, fn: Callable[..., Any], label: str) -> Callable[..., Any]:
        def wrapped(*args: Any, **kwargs: Any) -> Any:
            value, seconds = timed(lambda: fn(*args, **kwargs))
            self.spent[label] = self.spent.get(label, 0.0) + seconds
            self.calls[label] = self.calls.get(label, 0) + 1
            return value

        return wrapped

    def counter(self, fn: Callable[..., Iterator[Any]]) -> Callable[..., Iterator[Any]]:
        """`delta_blocks(table, where, block_rows)`, counted: one Scan per call, its rows and its own time."""

        def wrapped(table: Any, where: str, block_rows: int) -> Iterator[Any]:
            found = re.search(r"model_id IN \('((?:[^']|'')*)'", where)
            scan = Scan(found[1].replace("''", "'") if found else where)
            self.scans.append(scan)
            blocks = fn(table, where, block_rows)
            while True:
                block, seconds = timed(lambda: next(blocks, None))
                scan.seconds += seconds
                if block is None:
                    return
                scan.rows += len(block.rowids)
                scan.blocks += 1
                yield block

        return wrapped


@contextmanager
def instrumented() -> Iterator[Probe]:
    """Install the probe where the jobs look the functions up; put the originals back on the way out."""
    import importlib

    probe = Probe()
    saved: list[tuple[Any, str, Any]] = []
    for module_name, name, label in PHASES:
        module = importlib.import_module(module_name)
        saved.append((module, name, getattr(module, name)))
        setattr(module, name, probe.timer(getattr(module, name), label))
    for module in (jobs.nightly, lance_tables.delta):
        original = getattr(module, SCANNER)
        saved.append((module, SCANNER, original))
        setattr(module, SCANNER, probe.counter(original))
    try:
        yield probe
    finally:
        for module, name, original in reversed(saved):
            setattr(module, name, original)


def say(text: str) -> None:
    """Progress, on stderr (the section goes to stdout)."""
    print(f"[{dt.datetime.now():%H:%M:%S}] {text}", file=sys.stderr, flush=True)


def measure(label: str, settings: Settings, probe: Probe, fn: Callable[[], Any]) -> tuple[Any, Step]:
    """One step, timed, with its peak RSS, its phases, its scans and the result sets it wrote."""
    say(f"{label} ...")
    before_sets = len(list_runs(settings.store))
    probe.take()
    reset_peak()
    rss = current_rss()
    value, seconds = timed(fn)
    peak = vm_hwm()
    spent, calls, scans = probe.take()
    step = Step(label, seconds, rss, peak, phases=spent, calls=calls, scans=scans)
    step.result_sets = len(list_runs(settings.store)) - before_sets
    say(f"{label}: {seconds:.2f} s")
    return value, step


def night_step(label: str, settings: Settings, probe: Probe, engine: str) -> tuple[dict[str, Any], Step]:
    summary, step = measure(label, settings, probe, lambda: run_nightly(settings, engine))
    step.runs = len(summary["runs"])
    step.skipped = len(summary["skipped"])
    step.new_candidates = sum(int(r["new_candidates"]) for r in summary["runs"])
    for r in summary["runs"]:
        mode = r["mode"] if r["mode"] == "delta" else f"full ({r['full_reason']})"
        step.modes[mode] = step.modes.get(mode, 0) + 1
    return summary, step


def full_rematch(settings: Settings, ids: list[str], engine: MatchEngine) -> tuple[dict[str, str], list[float]]:
    """`run_match` of every watchlist, one after the other: watchlist id -> run id, and each one's seconds."""
    runs: dict[str, str] = {}
    seconds: list[float] = []
    for wid in ids:
        manifest, spent = timed(lambda wid=wid: run_match(settings, wid, engine))  # type: ignore[misc]
        runs[wid] = str(manifest["run_id"])
        seconds.append(spent)
    return runs, seconds


def home_settings(root: Path) -> Settings:
    """A fresh home under `root`, its audit signing key beside it (not in the user's config folder)."""
    return Settings(
        home=str(root / "home"),
        audit_key_dir=root / "audit-keys",
        model_downloads=False,
        ray_num_cpus=len(os.sched_getaffinity(0)),
    )


# ---- data ---------------------------------------------------------------------------------------------------


def chunk_vectors(start: int, count: int) -> np.ndarray:
    """Seeded per chunk start: the same rows whatever the gallery size."""
    return unit_rows(np.random.default_rng([SEED, start]), count)


def stamp_free(start: int, vectors: np.ndarray, now: dt.datetime) -> pa.Table:
    """FACES rows for gallery rows start.. (ids `face_id(index)`, source `bench`, model `bench-model`)."""
    return faces_chunk(vectors, start, now)


def write_rows(settings: Settings, start: int, vectors: np.ndarray) -> None:
    """One upsert (one commit, stamped with the table version) under the writer lease."""
    rows = stamp_free(start, vectors, dt.datetime.now(dt.UTC))
    with writer_session(settings, "bench"):
        Gallery(settings.storage).upsert("faces", rows)


def build_gallery(settings: Settings, n: int, chunk: int, wanted: np.ndarray) -> np.ndarray:
    """Write N rows, `chunk` per commit; return the vectors of the rows `wanted` (sorted indices)."""
    add_source(Gallery(settings.storage), SOURCE, "operator-owned", "benchmark data", "synthetic vectors", "bench")
    picked = np.empty((len(wanted), FACE_DIM), dtype=np.float32)
    for start in range(0, n, chunk):
        vectors = chunk_vectors(start, min(chunk, n - start))
        inside = (wanted >= start) & (wanted < start + len(vectors))
        picked[inside] = vectors[wanted[inside] - start]
        write_rows(settings, start, vectors)
    return picked


def noisy(rng: np.random.Generator, vectors: np.ndarray) -> np.ndarray:
    near = vectors + NEAR_NOISE * unit_rows(rng, len(vectors))
    return (near / np.linalg.norm(near, axis=1, keepdims=True)).astype(np.float32)


def watchlist_probes(
    rng: np.random.Generator, q: int, base: np.ndarray, appended: np.ndarray
) -> tuple[np.ndarray, int]:
    """Q unit probes: every 4th a noisy copy of a gallery row written before night 1, every 4th + 1 a noisy
    copy of a row appended before night 2 (so the delta changes candidates), the rest random. Returns the probes
    and how many copy appended rows."""
    probes = unit_rows(rng, q)
    old = np.arange(0, q, 4)
    probes[old] = noisy(rng, base[rng.integers(0, len(base), len(old))])
    new = np.arange(1, q, 4)
    if len(appended):
        probes[new] = noisy(rng, appended[rng.integers(0, len(appended), len(new))])
    return probes, len(new) if len(appended) else 0


def submit_watchlist(settings: Settings, folder: Path, index: int, probes: np.ndarray, k: int) -> str:
    path = folder / f"watchlist-{index:04d}.parquet"
    flat = pa.array(np.ascontiguousarray(probes).reshape(-1), pa.float32())
    ids = [f"p{i:06d}" for i in range(len(probes))]
    pq.write_table(pa.table({"probe_id": ids, "embedding": pa.FixedSizeListArray.from_arrays(flat, FACE_DIM)}), path)
    sub = Submission(
        path, f"bench-{index}", f"BENCH-{index % CASES}", PURPOSE, "benchmark", "bench", "face", MODEL, top_k=k
    )
    return str(submit(settings, sub)["watchlist_id"])


# ---- the check ----------------------------------------------------------------------------------------------


def compared_rows(settings: Settings, run_id: str) -> pa.Table:
    return (
        load_run(settings.store, run_id)
        .select(list(COMPARED))
        .sort_by([("probe_id", "ascending"), ("rank", "ascending")])
    )


def check_runs(
    settings: Settings, delta: dict[str, dict[str, Any]], full: dict[str, str], n: int, near_appended: int
) -> Check:
    check = Check(near_appended=near_appended)
    manifests = {m["run_id"]: m for m in list_runs(settings.store)}
    for wid, summary in delta.items():
        a = compared_rows(settings, str(summary["run_id"]))
        b = compared_rows(settings, full[wid])
        check.compared += 1
        check.rows += a.num_rows
        if manifests[full[wid]]["gallery_version"] != summary["to_version"]:
            check.same_version = False
        if a.equals(b):
            check.equal += 1
        else:
            check.differing.append(wid)
        first = a.filter(pc.equal(a.column("rank"), 1)).column("gallery_id").to_pylist()
        check.appended_top1 += sum(int(g, 16) >= n for g in first)
    return check


# ---- the run ------------------------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> Results:
    res = Results(args.gallery, args.appended, args.watchlists, args.probes, args.top_k, args.engine, args.chunk)
    res.code = code_state()  # when the modules are imported: what is measured
    res.load.append(os.getloadavg()[0])
    rng = np.random.default_rng([SEED, args.gallery, args.watchlists, args.probes])
    wanted = np.unique(rng.integers(0, args.gallery, args.watchlists * max(1, args.probes // 4)))
    _, res.imports_s = timed(import_libraries)  # torch, lance, lancedb, the local engine: before every clock
    with tempfile.TemporaryDirectory(prefix="bench-nightly-", dir=args.workdir) as name:
        root = Path(name)
        settings = home_settings(root)
        if args.engine == "ray":
            from pipelines.engines.ray import start_ray

            _, res.ray_start_s = timed(lambda: start_ray(settings.ray_address, settings.ray_num_cpus))
        say(f"building a gallery of {args.gallery:,} rows ...")
        base, res.build_s = timed(lambda: build_gallery(settings, args.gallery, args.chunk, wanted))
        say(f"gallery built in {res.build_s:.1f} s; submitting {args.watchlists} watchlists ...")
        appended = chunk_vectors(args.gallery, args.appended)  # written before night 2
        folder = root / "probes"
        folder.mkdir()
        made = [watchlist_probes(rng, args.probes, base, appended) for _ in range(args.watchlists)]
        near = sum(copies for _, copies in made)
        ids, res.submit_s = timed(
            lambda: [submit_watchlist(settings, folder, w, probes, args.top_k) for w, (probes, _) in enumerate(made)]
        )
        with instrumented() as probe:
            _, res.steps["first"] = night_step("night 1", settings, probe, args.engine)
            _, res.append_s = timed(lambda: write_rows(settings, args.gallery, appended))
            summary, res.steps["delta"] = night_step("night 2", settings, probe, args.engine)
            _, res.steps["nothing_new"] = night_step("night 3", settings, probe, args.engine)
            (runs, per), res.steps["full"] = measure(
                "full re-match", settings, probe, lambda: full_rematch(settings, ids, args.engine)
            )
            res.full.runs, res.full.per_watchlist = len(runs), per
            res.full.modes = {"full (run_match)": len(runs)}
        delta_runs = {r["watchlist_id"]: r for r in summary["runs"] if r["mode"] == "delta"}
        res.check = check_runs(settings, delta_runs, runs, args.gallery, near)
        if args.engine == "ray":
            import ray

            ray.shutdown()
    res.load.append(os.getloadavg()[0])
    res.peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return res


# ---- the report ---------------------------------------------------------------------------------------------


def fmt_s(seconds: float) -> str:
    return f"{seconds:,.2f}"


def fmt_mb(value: int) -> str:
    return f"{value / MB:,.0f}"


def modes_cell(step: Step) -> str:
    parts = [f"{count} {mode}" for mode, count in sorted(step.modes.items())]
    if step.skipped:
        parts.append(f"{step.skipped} skipped (up to date)")
    return ", ".join(parts) or "none"


def step_rows(res: Results) -> list[list[str]]:
    order = (
        ("first", "night 1: `run_nightly`, no earlier runs (one full run per watchlist)", res.gallery),
        ("delta", "**night 2: `run_nightly`, delta** (after the append)", res.gallery + res.appended),
        ("nothing_new", "night 3: `run_nightly`, nothing new (the fixed cost)", res.gallery + res.appended),
        ("full", "**full re-match: `run_match` of every watchlist**, one after the other", res.gallery + res.appended),
    )
    rows = []
    for key, label, rows_now in order:
        step = res.steps[key]
        per = step.seconds / res.watchlists if res.watchlists else 0.0
        rows.append(
            [
                label,
                f"{rows_now:,}",
                fmt_s(step.seconds),
                f"{per:,.3f}",
                modes_cell(step),
                str(step.result_sets),
                f"{step.new_candidates:,}" if key != "full" else "",
                fmt_mb(step.peak_rss),
                fmt_mb(step.growth),
            ]
        )
    return rows


def step_lines(res: Results) -> list[str]:
    header = [
        "Step",
        "Gallery rows",
        "Wall s",
        "s per watchlist",
        "Runs",
        "Result sets written",
        "New candidates",
        "Peak RSS MB",
        "Peak - before MB",
    ]
    return markdown_table(header, step_rows(res), "lrrrlrrrr")


def target_lines(res: Results) -> list[str]:
    verdict = "**met**" if res.met else "**NOT met**"
    header = [
        "Delta (night 2) s",
        "Full re-match s",
        "Delta / full",
        "Fixed (night 3) s",
        "(Delta - fixed) / full",
        f"Budget: {TARGET_SHARE:.0%} x full + fixed, s",
        "Target",
    ]
    row = [
        fmt_s(res.delta.seconds),
        fmt_s(res.full.seconds),
        f"{res.ratio:.2%}",
        fmt_s(res.fixed.seconds),
        f"{res.variable_share:.2%}",
        fmt_s(res.budget),
        verdict,
    ]
    return markdown_table(header, [row], "rrrrrrl")


def scan_rows(res: Results) -> list[list[str]]:
    rows = []
    for key, label in (("first", "night 1"), ("delta", "night 2"), ("nothing_new", "night 3")):
        step = res.steps[key]
        per_model = res.scans_per_model(key)
        rows.append(
            [
                label,
                str(len(step.scans)),
                ", ".join(f"{m}: {c}" for m, c in sorted(per_model.items())) or "none",
                f"{sum(s.rows for s in step.scans):,}",
                f"{res.appended if key == 'delta' else 0:,}",
                str(sum(s.blocks for s in step.scans)),
                fmt_s(sum(s.seconds for s in step.scans)),
            ]
        )
    return rows


def scan_lines(res: Results) -> list[str]:
    header = [
        "Night",
        "Delta scans",
        "Scans per model",
        "Rows read",
        "Rows new since the last runs",
        "Blocks",
        "Scan s",
    ]
    return markdown_table(header, scan_rows(res), "lrlrrrr")


def phase_lines(res: Results) -> list[str]:
    keys = ("first", "delta", "nothing_new", "full")
    labels = [label for label in PHASE_ORDER if any(label in res.steps[k].phases for k in keys)]
    rows = []
    for label in labels:
        cells = [label]
        for k in keys:
            step = res.steps[k]
            spent = step.phases.get(label)
            cells.append(f"{spent:,.2f} ({step.calls.get(label, 0)})" if spent is not None else "")
        rows.append(cells)
    rows.append(["wall", *(fmt_s(res.steps[k].seconds) for k in keys)])
    return markdown_table(["Phase: seconds (calls)", "Night 1", "Night 2", "Night 3", "Full re-match"], rows, "lrrrr")


def check_line(res: Results) -> str:
    c = res.check
    if c.ok:
        verdict = (
            f"**exact**: all {c.compared} delta runs of night 2 have the same rows as the full `run_match` runs of "
            f"the same watchlists at the same gallery version ({c.rows:,} rows compared: probe id, rank, gallery id, "
            "score, bit for bit)"
        )
    else:
        differing = ", ".join(c.differing[:5]) + (" ..." if len(c.differing) > 5 else "")
        verdict = (
            f"**DIFFERENT**: {c.compared - c.equal} of {c.compared} delta runs differ from the full runs "
            f"({differing or 'none'}){'' if c.same_version else '; the runs were not at the same gallery version'}"
        )
    return (
        f"Check: {verdict}. In the delta runs, {c.appended_top1:,} probes have a row appended before night 2 as "
        f"their best candidate ({c.near_appended:,} probes were made as noisy copies of appended rows)."
    )


def code_state() -> str:
    """The commit measured, and the code files changed in the working tree beside it (docs aside)."""
    import subprocess

    def git(*args: str) -> str:
        root = Path(__file__).parents[1]
        done = subprocess.run(["git", *args], capture_output=True, text=True, check=False, cwd=root)
        return done.stdout if done.returncode == 0 else ""

    commit = git("rev-parse", "--short", "HEAD").strip()
    if not commit:
        return "Code: not a git checkout"
    status = git("status", "--porcelain", "--untracked-files=no").splitlines()
    changed = [line[3:] for line in status if len(line) > 3 and not line[3:].startswith("docs/")]
    return f"Code: commit {commit}" + (f", with uncommitted changes to {', '.join(changed)}" if changed else "")


def versions() -> str:
    import lance
    import lancedb

    return (
        f"numpy {np.__version__}, lancedb {lancedb.__version__}, pylance {lance.__version__}, pyarrow {pa.__version__}"
    )


def reduced(res: Results) -> bool:
    return (
        res.gallery < TARGET_GALLERY
        or res.appended < TARGET_GALLERY * TARGET_APPEND
        or res.watchlists < TARGET_WATCHLISTS
        or res.probes < TARGET_PROBES
    )


def render(res: Results, command: str, heading: str = SECTION) -> str:
    when = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    lines = [heading, ""]
    if reduced(res):
        lines += [
            f"**Reduced run**: the target configuration is a gallery of {TARGET_GALLERY:,} rows, "
            f"{TARGET_APPEND:.0%} appended, {TARGET_WATCHLISTS} watchlists of {TARGET_PROBES} probes; this run "
            f"used {res.gallery:,} rows, {res.appended:,} appended, {res.watchlists} watchlists of {res.probes} "
            "probes. The ratio is what carries over.",
            "",
        ]
    cores = len(os.sched_getaffinity(0))
    met = "met" if res.met else "NOT met"
    lines += [f"Measured {when} with `{command}`.", ""]
    lines += [f"- {item}" for item in [*machine("cpu"), *kernel_lines(None), versions(), res.code]]
    lines += [
        f"- 1-minute load average at start / end: {' / '.join(f'{v:.2f}' for v in res.load)} (the machine has "
        f"{cores} usable cores and is shared: anything else running slows every step){load_warning(res.load)}",
        f"- Data: a seeded synthetic gallery of {res.gallery:,} unit-norm {FACE_DIM}-d float32 rows in the `faces` "
        f"table of a fresh home (model `{MODEL}`), written with `Gallery.upsert` under the writer lease, "
        f"{res.chunk:,} rows per commit, in {fmt_s(res.build_s)} s; {res.watchlists} watchlists of {res.probes} "
        f"probes (top_k={res.top_k}, purpose `{PURPOSE}`, one model) submitted with `jobs.watchlist.submit` in "
        f"{fmt_s(res.submit_s)} s: every 4th probe a noisy copy of a gallery row (cosine ~0.89), every 4th + 1 a "
        f"noisy copy of an appended row, the rest random; {res.appended:,} rows appended before night 2 "
        f"({res.appended / res.gallery:.1%}, one upsert, {fmt_s(res.append_s)} s).",
        f"- Engine `{res.engine}`"
        + (f" (Ray started before the clocks in {fmt_s(res.ray_start_s)} s)" if res.engine == "ray" else "")
        + f"; every step in this one process, torch, lance, lancedb and the local engine imported before the "
        f"clocks ({fmt_s(res.imports_s)} s); peak RSS of the process (gallery build included): "
        f"{fmt_mb(res.peak_rss)} MB.",
        "",
        *step_lines(res),
        "",
        *target_lines(res),
        "",
        f"Target (night 2 at most {TARGET_SHARE:.0%} of the full re-match plus the fixed cost of a night): "
        f"**{met}**. Night 2 took {fmt_s(res.delta.seconds)} s against a budget of {fmt_s(res.budget)} s "
        f"({TARGET_SHARE:.0%} of {fmt_s(res.full.seconds)} s plus {fmt_s(res.fixed.seconds)} s).",
        "",
        "Delta scans (`delta_blocks` calls, counted by wrapping it; the target is one per model a night):",
        "",
        *scan_lines(res),
        "",
        check_line(res),
        "",
        "Where the time goes (seconds and calls, timed by wrapping the functions; nested: `runs` includes the "
        "full match loop and the Parquet writes, `delta scan + scoring` includes the scan):",
        "",
        *phase_lines(res),
        "",
        *notes(res),
    ]
    return "\n".join(lines) + "\n"


def notes(res: Results) -> list[str]:
    per = res.full.per_watchlist
    spread = f"{min(per):.2f} / {statistics.median(per):.2f} / {max(per):.2f} s (min / median / max)" if per else "none"
    return [
        "How to read it:",
        "",
        "- Night 2 is the figure: every watchlist extended from its night-1 run by the rows appended since (one "
        "pass over them per model for every watchlist at once), merged exactly with its night-1 candidates, and a "
        "new result set written for each. The full re-match is `run_match` of every watchlist at the same gallery "
        f"version, each over the whole gallery (each run_match: {spread}); it is also what the nightly's own "
        "full path costs (night 1 runs one full match per watchlist, over the gallery before the append, with one "
        "engine start-up for the night).",
        "- The fixed cost is night 3: the same nightly with nothing new: retention, the manifests of every run, "
        "every watchlist's probes and last result set, the stamps of the last candidates, and one filtered scan "
        "that finds no row; it writes no result set. The target allows night 2 that fixed cost plus "
        f"{TARGET_SHARE:.0%} of the full re-match.",
        "- Delta scans count the calls of `delta_blocks` (one call is one pass over the rows written since the "
        "earliest last run of the model's watchlists) and the rows they yielded. Night 1 has no scan (no watchlist "
        "has a run to extend); night 3's scan reads no row.",
        "- Peak RSS is this process's high-water mark during the step (reset before it through "
        "/proc/self/clear_refs); `Peak - before` is the step's own working memory. The gallery was just written, so "
        "the full re-match reads it mostly from the page cache.",
        "",
    ]


def to_json(res: Results) -> dict[str, Any]:
    data = asdict(res)
    data["derived"] = {
        "delta_s": res.delta.seconds,
        "full_s": res.full.seconds,
        "fixed_s": res.fixed.seconds,
        "ratio": res.ratio,
        "variable_share": res.variable_share,
        "budget_s": res.budget,
        "target_share": TARGET_SHARE,
        "met": res.met,
        "scans_per_model": {k: res.scans_per_model(k) for k in res.steps if k != "full"},
        "check_ok": res.check.ok,
        "reduced": reduced(res),
    }
    return data


# ---- CLI ----------------------------------------------------------------------------------------------------


def count(text: str) -> int:
    return int(text.replace("_", "").replace(",", ""))


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--gallery",
        type=count,
        default=DEFAULT_GALLERY,
        help=f"gallery rows before the append (target {TARGET_GALLERY:,}; default %(default)s)",
    )
    parser.add_argument(
        "--append-frac",
        type=float,
        default=TARGET_APPEND,
        help="rows appended before night 2, a share of --gallery (%(default)s)",
    )
    parser.add_argument("--watchlists", type=int, default=TARGET_WATCHLISTS, help="open watchlists (%(default)s)")
    parser.add_argument("--probes", type=int, default=TARGET_PROBES, help="probes per watchlist (%(default)s)")
    parser.add_argument("--top-k", type=int, default=10, help="top K of every watchlist (%(default)s)")
    parser.add_argument("--engine", choices=("local", "ray"), default="local", help="engine of the jobs (%(default)s)")
    parser.add_argument("--chunk", type=count, default=DEFAULT_CHUNK, help="gallery rows per commit (%(default)s)")
    parser.add_argument("--workdir", type=Path, default=None, help="parent of the temporary home (default: $TMPDIR)")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here (JSON)")
    parser.add_argument("--no-write", action="store_true", help="print the section only; leave the docs alone")
    parser.add_argument("--out", type=Path, default=Path("docs/benchmarks.md"), help="docs file (%(default)s)")
    parser.add_argument("--heading", default=SECTION, help="the docs section (its heading) to replace or append")
    args = parser.parse_args(argv)
    if args.gallery < 1 or args.watchlists < 1 or args.probes < 1 or args.chunk < 1:
        parser.error("--gallery, --watchlists, --probes and --chunk need positive integers")
    if not 0 < args.append_frac <= 1:
        parser.error("--append-frac must be in (0, 1]")
    args.appended = max(1, round(args.gallery * args.append_frac))
    if not 1 <= args.top_k <= min(1000, args.gallery):
        parser.error("need 1 <= --top-k <= min(1000, --gallery)")
    if not args.heading.startswith("## "):
        parser.error("--heading must be a second-level markdown heading ('## ...')")
    return args


def command_line(argv: list[str]) -> str:
    return shlex.join([os.path.relpath(sys.executable), "scripts/bench_nightly.py", *argv])


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    res = run(args)
    section = render(res, command_line(argv), args.heading)
    print(section)
    if args.json is not None:
        args.json.write_text(json.dumps(to_json(res), indent=2) + "\n")
    if not args.no_write:
        write_section(args.out, section, args.heading)  # re-reads the file and replaces this section only
        print(f"wrote {args.out}", file=sys.stderr)
    return 0 if res.check.ok else 1


if __name__ == "__main__":
    sys.exit(main())

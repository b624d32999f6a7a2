"""Benchmark ingest throughput (images/s): each stage alone, then end to end on the local and Ray engines."""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import os
import platform
import re
import shlex
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

os.environ["RAY_ENABLE_UV_RUN_RUNTIME_ENV"] = "0"  # before anything imports ray: workers use this venv

from PIL import Image

import jobs.ingest as ingest_job
from jobs.ingest import Engine, plan, run_ingest
from lance_tables.sources import add_source
from lance_tables.store import Gallery
from pipelines import samples
from pipelines.decode import Decoded, decode_image
from pipelines.embed import EmbedStage, ShardOutput
from pipelines.prepare import CHUNK, PreparedShard, PrepareStage, read_shard_rows
from pipelines.settings import Settings
from pipelines.shards import find_shards, pack_folder
from pipelines.task import IngestTask, WorkItem

FACE = "facenet-untrained"
IMAGE = "clip-untrained"
SOURCE = "bench"
SECTION = "## Ingest (scripts/bench_ingest.py)"
DEFAULT_IMAGES = 1536
TARGET = 0.7
ENGINES: tuple[Engine, ...] = ("local", "ray")
INTRO = (
    "# Benchmarks\n\n"
    "Every figure here was measured by a script in `scripts/` on the machine named beside it, with the date "
    "and the exact command line. The machines are small and shared, so absolute times are noisy: compare the "
    "ratios measured in the same run (end to end against the stage bound, ours against FAISS) rather than raw "
    "figures across runs. Rerun with "
    "`make bench` (or the command shown in a section); each script replaces its own section.\n"
)
T = TypeVar("T")


@dataclass
class Row:
    """One throughput figure."""

    name: str
    images: int
    seconds: float
    note: str = ""

    @property
    def rate(self) -> float:
        return self.images / self.seconds if self.seconds > 0 else 0.0


@dataclass
class Results:
    """Throughput rows by key, and one-time costs (seconds) kept out of them."""

    rows: dict[str, Row] = field(default_factory=dict)
    once: dict[str, float] = field(default_factory=dict)
    startup: dict[str, float] = field(default_factory=dict)  # per engine: job start to the first commit
    load: list[float] = field(default_factory=list)  # 1-minute load average at the start and at the end
    device: str = "auto"  # the device setting the stages ran with


@dataclass
class Corpus:
    """The generated images, packed and planned."""

    shards_dir: Path
    items: list[WorkItem]
    images: int
    with_faces: int


def timed(fn: Callable[[], T]) -> tuple[T, float]:
    start = time.perf_counter()
    value = fn()
    return value, time.perf_counter() - start


def make_settings(home: Path) -> Settings:
    """Like the tests: downloads off, Ray limited to the usable cores; the rest from GALLERYMATCH_* or defaults."""
    values: dict[str, object] = {"home": home, "model_downloads": False, "ray_num_cpus": len(os.sched_getaffinity(0))}
    return Settings(**values)  # type: ignore[arg-type]


# ---- data ---------------------------------------------------------------------------------------------------


def templates() -> list[tuple[str, Image.Image, bool]]:
    """(name, image, has faces): the astronaut at a few sizes, two group shots, three no-face photos."""
    faces = [(f"astronaut{s}", samples.astronaut(s), True) for s in (256, 384, 512)]
    faces += [("group2", samples.composite(2), True), ("group3", samples.composite(3), True)]
    return faces + [(name, img, False) for name, img in samples.no_face_images().items()]


def perturbed(img: Image.Image, index: int) -> bytes:
    """A distinct JPEG per index: one recoloured pixel, a varied quality and a comment naming the index."""
    out = img.copy()
    out.putpixel((index % out.width, (index // out.width) % out.height), (index % 256, (index * 7) % 256, 255))
    return samples.encode(out, "JPEG", quality=80 + index % 16, comment=f"bench-{index}".encode())


def write_images(folder: Path, count: int) -> int:
    """Write `count` distinct images cycling through the templates; return how many have faces."""
    folder.mkdir(parents=True)
    kinds, digests, with_faces = templates(), set(), 0
    for index in range(count):
        name, img, has_faces = kinds[index % len(kinds)]
        data = perturbed(img, index)
        digests.add(hashlib.sha256(data).hexdigest())
        (folder / f"{index:05d}-{name}.jpg").write_bytes(data)
        with_faces += has_faces
    if len(digests) != count:
        raise RuntimeError(f"only {len(digests)} distinct images out of {count}")
    return with_faces


def build_corpus(tmp: Path, count: int, rows_per_shard: int, task: IngestTask) -> Corpus:
    with_faces = write_images(tmp / "images", count)
    shards_dir = tmp / "shards"
    report = pack_folder(tmp / "images", shards_dir, SOURCE, rows_per_shard, task.limits.max_bytes, default_minor=False)
    items, _ = plan(task, find_shards(shards_dir), set())
    return Corpus(shards_dir, items, report.distinct, with_faces)


def register(settings: Settings) -> None:
    gallery = Gallery(settings.storage)
    add_source(gallery, SOURCE, "operator-owned", "benchmark data", "public-domain sample images", "bench_ingest")


# ---- stages alone -------------------------------------------------------------------------------------------


def measure_decode(task: IngestTask, items: list[WorkItem], res: Results) -> list[list[Image.Image]]:
    """decode_image over every shard row (the Parquet read is outside the timing); decoded images per shard."""
    shards = [read_shard_rows(item.shard_uri) for item in items]

    def run() -> list[list[Image.Image]]:
        out = [[decode_image(row["image"], task.limits) for row in rows] for rows in shards]
        return [[d.image for d in shard if isinstance(d, Decoded)] for shard in out]

    decoded, seconds = timed(run)
    res.rows["decode"] = Row("decode alone (`decode_image`)", sum(map(len, decoded)), seconds)
    return decoded


def measure_prepare(
    task: IngestTask, items: list[WorkItem], decoded: list[list[Image.Image]], res: Results
) -> list[PreparedShard]:
    """Stage 1 whole, then its detect and CLIP-prep parts on the pre-decoded images."""
    stage = PrepareStage(task)
    _, res.once["stage 1 setup (MTCNN, CLIP transform) + warm-up"] = timed(lambda: warm_prepare(stage, decoded))
    prepared, seconds = timed(lambda: [stage.process(item) for item in items])
    faces = sum(len(p.faces) for p in prepared)
    res.rows["prepare"] = Row(
        "**stage 1 alone** (`PrepareStage.process`: read, decode, detect, crops, CLIP prep)",
        sum(len(p.images) for p in prepared),
        seconds,
        f"{faces} faces",
    )
    res.rows["detect"] = Row(
        "detect only (`FaceDetector.detect`, pre-decoded)",
        sum(map(len, decoded)),
        timed(lambda: detect_only(stage, decoded))[1],
        f"chunks of {CHUNK}, as stage 1",
    )
    res.rows["clip_prep"] = Row(
        "CLIP prep only (`ClipPreparer.prepare`, pre-decoded)",
        sum(map(len, decoded)),
        timed(lambda: clip_prep_only(stage, decoded))[1],
    )
    return prepared


def warm_prepare(stage: PrepareStage, decoded: list[list[Image.Image]]) -> None:
    stage.setup()
    first = [img for shard in decoded for img in shard][:1]
    if stage.detector is not None and first:
        stage.detector.detect(first)


def detect_only(stage: PrepareStage, decoded: list[list[Image.Image]]) -> None:
    assert stage.detector is not None
    for shard in decoded:
        for start in range(0, len(shard), CHUNK):
            stage.detector.detect(shard[start : start + CHUNK])


def clip_prep_only(stage: PrepareStage, decoded: list[list[Image.Image]]) -> None:
    assert stage.preparer is not None
    for shard in decoded:
        for img in shard:
            stage.preparer.prepare(img)


def measure_embed(task: IngestTask, prepared: list[PreparedShard], res: Results) -> None:
    """Stage 2 whole (models loaded first), then each model alone on the same inputs."""
    stage = EmbedStage(task)
    _, res.once["stage 2 setup (InceptionResnetV1, ViT-B-32, weight digests) + warm-up"] = timed(
        lambda: warm_embed(stage, prepared)
    )
    images = sum(len(p.images) for p in prepared)
    _, seconds = timed(lambda: [stage.process(p) for p in prepared])
    res.rows["embed"] = Row("**stage 2 alone** (`EmbedStage.process`: both models, rows)", images, seconds)
    face, image = stage.face, stage.image
    assert face is not None and image is not None
    crops = sum(len(p.face_crops) for p in prepared)
    res.rows["face_embed"] = Row(
        "face embed only (InceptionResnetV1)",
        images,
        timed(lambda: [face.embed(p.face_crops) for p in prepared])[1],
        f"{crops} crops",
    )
    res.rows["image_embed"] = Row(
        "image embed only (open_clip ViT-B-32)",
        images,
        timed(lambda: [image.embed(p.clip_inputs) for p in prepared])[1],
    )


def warm_embed(stage: EmbedStage, prepared: list[PreparedShard]) -> None:
    stage.setup()
    crops = next((p.face_crops[:1] for p in prepared if len(p.face_crops)), None)
    inputs = next((p.clip_inputs[:1] for p in prepared if p.clip_inputs), None)
    if stage.face is not None and crops is not None:
        stage.face.embed(crops)
    if stage.image is not None and inputs is not None:
        stage.image.embed(inputs)


# ---- end to end ---------------------------------------------------------------------------------------------


def measure_engine(engine: Engine, tmp: Path, corpus: Corpus, res: Results) -> None:
    """run_ingest into a fresh home; Ray is started (and timed) before, model loads in actors are inside."""
    settings = make_settings(tmp / f"home-{engine}")
    register(settings)
    if engine == "ray":
        from pipelines.engines.ray import start_ray

        _, res.once["Ray start (`start_ray`)"] = timed(lambda: start_ray(settings.ray_address, settings.ray_num_cpus))
    commits: list[tuple[float, int]] = []
    original = ingest_job.commit_shard

    def commit(gallery: Any, output: ShardOutput, task: IngestTask) -> Any:
        value = original(gallery, output, task)
        commits.append((time.perf_counter(), int(output.stats["distinct_images"])))
        return value

    ingest_job.commit_shard = commit
    try:
        start = time.perf_counter()
        summary, seconds = timed(lambda: run_ingest(settings, corpus.shards_dir, "all", engine, FACE, IMAGE, False))
    finally:
        ingest_job.commit_shard = original
    if len(commits) >= 2:
        res.startup[engine] = commits[0][0] - start
        steady_images = sum(n for _, n in commits[1:])
        res.rows[f"steady_{engine}"] = Row(
            f"steady state, {engine} (first commit to last)",
            steady_images,
            commits[-1][0] - commits[0][0],
            f"{len(commits) - 1} shards after the first; start-up (job start to first commit) "
            f"{res.startup[engine]:.2f} s",
        )
    if summary["images"] != corpus.images:
        raise RuntimeError(f"{engine}: ingested {summary['images']} images, expected {corpus.images}")
    note = (
        f"{summary['faces']} faces, {summary['quarantined']} quarantined; job loop {summary['elapsed_s']:.2f} s; "
        "model loads included"
    )
    res.rows[f"e2e_{engine}"] = Row(
        f"**end to end, {engine}** (`run_ingest`, LanceDB commits)", summary["images"], seconds, note
    )


def stop_ray() -> None:
    if "ray" in sys.modules:
        import ray

        ray.shutdown()


# ---- report -------------------------------------------------------------------------------------------------


def machine(device: str) -> list[str]:
    import torch

    from pipelines.models import resolve_device

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    return [
        f"CPU: {cpu_model()}, {len(os.sched_getaffinity(0))} usable cores (of {os.cpu_count()})",
        f"RAM: {ram_gib():.1f} GiB",
        f"torch {torch.__version__}: device {resolve_device(device)}, "
        f"{torch.get_num_threads()} threads in the driver; GPU: {gpu}",
        f"Python {platform.python_version()} on {platform.system()} {platform.machine()}",
    ]


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def ram_gib() -> float:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return 0.0


def stage_rates(res: Results) -> tuple[float, float]:
    return res.rows["prepare"].rate, res.rows["embed"].rate


def shares_cores(res: Results) -> bool:
    """Whether the two stages compete for the same processors (no GPU for the model stage)."""
    from pipelines.models import resolve_device

    return resolve_device(res.device) == "cpu"


def stage_bound(res: Results) -> float:
    """The throughput the stages' own work allows here, with no pipeline overhead at all.

    With the model stage on a GPU the stages run on separate processors, and the bound is the slowest stage
    alone. On a CPU-only machine both stages need the same cores, so an image costs the time of stage 1 plus
    the time of stage 2 (each measured alone on all cores): the bound is 1 / (1/s1 + 1/s2)."""
    s1, s2 = stage_rates(res)
    if not shares_cores(res):
        return min(s1, s2)
    return 1.0 / (1.0 / s1 + 1.0 / s2) if s1 and s2 else 0.0


def break_even(target_rate: float, startup: float, steady: float) -> str:
    """Images a job needs for its end-to-end rate N / (startup + N / steady) to reach target_rate."""
    if steady <= target_rate:
        return "never"
    return f"{target_rate * startup / (1.0 - target_rate / steady):,.0f}"


def ratios(res: Results) -> list[list[str]]:
    """Per engine: end to end against the stage bound (the target: pipeline overhead under 30%), and against
    the slowest stage alone on all cores with the most that ratio can be where the stages share the cores."""
    slowest, bound = min(stage_rates(res)), stage_bound(res)
    table = []
    for engine in ENGINES:
        row = res.rows.get(f"e2e_{engine}")
        if row is None:
            continue
        steady = res.rows.get(f"steady_{engine}")
        startup = res.startup.get(engine, 0.0)
        overhead = row.rate / bound if bound else 0.0
        cells = [engine, str(row.images), f"{row.rate:.2f}", f"{steady.rate:.2f}" if steady else "-"]
        cells += [f"{startup:.1f}", f"{bound:.2f}", f"{overhead:.2f} ({'met' if overhead >= TARGET else 'NO'})"]
        cells.append(f"{steady.rate / bound:.2f}" if steady and bound else "-")
        cells.append(break_even(TARGET * bound, startup, steady.rate) if steady else "-")
        cells += [f"{slowest:.2f}", f"{row.rate / slowest:.2f}" if slowest else "-"]
        table.append(cells)
    return table


def markdown_table(header: list[str], rows: list[list[str]], align: str) -> list[str]:
    """A GitHub table; `align` has one letter per column, "l" (left) or "r" (right)."""
    rule = ["---:" if a == "r" else "---" for a in align]
    return [f"| {' | '.join(cells)} |" for cells in [header, rule, *rows]]


ORDER = (
    "decode",
    "detect",
    "clip_prep",
    "prepare",
    "face_embed",
    "image_embed",
    "embed",
    "e2e_local",
    "steady_local",
    "e2e_ray",
    "steady_ray",
)


def throughput_lines(res: Results) -> list[str]:
    rows = [res.rows[k] for k in ORDER if k in res.rows]
    cells = [[r.name, str(r.images), f"{r.seconds:.2f}", f"{r.rate:.2f}", r.note] for r in rows]
    return markdown_table(["Measurement", "Images", "Wall s", "Images/s", "Notes"], cells, "lrrrl")


def once_lines(res: Results) -> list[str]:
    return markdown_table(
        ["One-time cost (not in the stage-alone rows)", "Seconds"],
        [[name, f"{s:.2f}"] for name, s in res.once.items()],
        "lr",
    )


def ratio_lines(res: Results) -> list[str]:
    header = [
        "Engine",
        "Images",
        "End to end img/s",
        "Steady state img/s",
        "Start-up s",
        "Stage bound img/s",
        f"End to end / stage bound (target >= {TARGET})",
        "Steady state / stage bound",
        f"Job size for {TARGET} (images)",
        "Slowest stage alone img/s",
        "End to end / slowest stage alone",
    ]
    return markdown_table(header, ratios(res), "lrrrrrrrrrr")


def render(res: Results, corpus: Corpus, args: argparse.Namespace, command: str) -> str:
    when = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    lines = [SECTION, ""]
    if args.images < DEFAULT_IMAGES:
        lines += [
            f"**Smoke run** ({args.images} images, below the default {DEFAULT_IMAGES}): it only shows the "
            "script works; the figures are dominated by start-up costs. Replace it with a full run.",
            "",
        ]
    lines += [f"Measured {when} with `{command}`.", ""]
    lines += [f"- {item}" for item in machine(res.device)]
    lines += [
        f"- 1-minute load average at start / end: {' / '.join(f'{v:.2f}' for v in res.load)} "
        "(anything else running on the machine slows every row)"
    ]
    lines += [
        f"- Data: {corpus.images} distinct JPEGs made from `pipelines.samples` ({corpus.with_faces} with faces: "
        f"the astronaut at 256/384/512 px and 2- and 3-face composites; the rest coffee/chelsea/rocket, no "
        f"face), packed into {len(corpus.items)} shards of up to {args.rows_per_shard} rows; modality `all`.",
        f"- Models: `{FACE}` and `{IMAGE}`, the real architectures (InceptionResnetV1, open_clip ViT-B-32) "
        "with seeded random weights, because no pretrained weights can be had on these machines. The compute "
        "per image is the real one; the embeddings mean nothing.",
        "",
    ]
    lines += [*throughput_lines(res), "", *once_lines(res), "", *ratio_lines(res), ""]
    lines += notes(res)
    return "\n".join(lines) + "\n"


def notes(res: Results) -> list[str]:
    s1, s2 = stage_rates(res)
    slowest, bound = min(s1, s2), stage_bound(res)
    if shares_cores(res):
        bound_text = (
            f"Here the model stage runs on the CPU, so both stages need the same {len(os.sched_getaffinity(0))} "
            f"cores and an image costs 1/{s1:.2f} s of stage 1 plus 1/{s2:.2f} s of stage 2: the bound is "
            f"1 / (1/s1 + 1/s2) = {bound:.2f} img/s. Against the slowest stage alone ({slowest:.2f} img/s), no "
            f"pipeline on these cores can do better than about {bound / slowest:.2f}x (a little more where two "
            "stages on a core each use the cores better than one stage on all of them): that ratio is the last "
            "column, and it measures the machine's core count, not the pipeline."
        )
    else:
        bound_text = "Here the model stage runs on the GPU, so the bound is the slowest stage alone."
    return [
        "How to read it:",
        "",
        "- Stage-alone rows exclude one-time model loading and a one-image warm-up (listed separately); the end "
        "to end rows include them (in-process for `local`, inside the actors for `ray`), and the Parquet read, "
        "shard hashing, planning and every LanceDB commit. Ray start-up (`start_ray`) is not in the `ray` row; "
        "the actors' start (worker processes, imports, model loads) is, and is the `Start-up` column: job "
        "start to the first committed shard. Steady state is the images after the first shard over the time "
        "from the first commit to the last.",
        "- Both engines overlap the stages: `local` prepares the next shard in a background thread while it "
        "embeds and commits the current one; `ray` runs stage 1 on an actor of one CPU and stage 2 on an actor "
        "whose torch threads use every core of its node (on a CPU; `GALLERYMATCH_MODEL_THREADS` overrides), "
        "since the model stage is the slow one and stage 1's core idles while it waits.",
        f"- The target is end to end >= {TARGET}x the slowest stage alone: pipeline overhead under 30%. The "
        "**stage bound** is what the stages' own work allows on this machine with no overhead at all. " + bound_text,
        "- Start-up is paid once per job, so a small job's end-to-end rate is mostly start-up. `Job size for "
        f"{TARGET}` is the number of images from which a job's end to end reaches {TARGET}x the stage bound, "
        "from the measured start-up and steady state: N / (start-up + N / steady state) >= "
        f"{TARGET} x bound. A gallery ingest is thousands to millions of images.",
        "",
    ]


# ---- docs file and CLI --------------------------------------------------------------------------------------


def write_section(path: Path, section: str, heading: str = SECTION) -> None:
    """Replace one benchmark's section (its heading up to the next `## ` heading) or append it."""
    text = path.read_text() if path.exists() else INTRO
    pattern = re.compile(rf"^{re.escape(heading)}$.*?(?=^## |\Z)", re.MULTILINE | re.DOTALL)
    found = pattern.search(text)
    if found is None:
        text = text.rstrip("\n") + "\n\n" + section
    else:
        gap = "\n" if found.end() < len(text) else ""
        text = text[: found.start()] + section + gap + text[found.end() :]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--images", type=int, default=DEFAULT_IMAGES, help="images to generate (default %(default)s)")
    parser.add_argument("--rows-per-shard", type=int, default=16, help="rows per shard (default %(default)s)")
    parser.add_argument("--engines", default="local,ray", help="end-to-end engines, comma separated (local,ray)")
    parser.add_argument("--no-write", action="store_true", help="print the table only; leave the docs alone")
    parser.add_argument("--out", type=Path, default=Path("docs/benchmarks.md"), help="docs file (%(default)s)")
    args = parser.parse_args(argv)
    args.engine_list = [e.strip() for e in args.engines.split(",") if e.strip()]
    unknown = sorted(set(args.engine_list) - set(ENGINES))
    if unknown or args.images < 1 or args.rows_per_shard < 1:
        parser.error(f"need --images >= 1, --rows-per-shard >= 1 and engines from {', '.join(ENGINES)}")
    return args


def command_line(argv: list[str]) -> str:
    exe = Path(sys.executable)
    shown = os.path.relpath(exe) if exe.is_relative_to(Path.cwd()) else str(exe)
    return shlex.join([shown, "scripts/bench_ingest.py", *argv])


def run(args: argparse.Namespace, tmp: Path) -> tuple[Results, Corpus]:
    res, settings = Results(load=[os.getloadavg()[0]]), make_settings(tmp / "home-stages")
    res.device = settings.device
    task = IngestTask.from_settings(settings, "all", FACE, IMAGE)
    corpus = build_corpus(tmp, args.images, args.rows_per_shard, task)
    decoded = measure_decode(task, corpus.items, res)
    prepared = measure_prepare(task, corpus.items, decoded, res)
    measure_embed(task, prepared, res)
    for engine in (e for e in ENGINES if e in args.engine_list):
        measure_engine(engine, tmp, corpus, res)
    res.load.append(os.getloadavg()[0])
    return res, corpus


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    warnings.filterwarnings("ignore", "lancedb fork support is experimental", RuntimeWarning)
    try:
        with tempfile.TemporaryDirectory(prefix="bench-ingest-") as name:
            res, corpus = run(args, Path(name))
    finally:
        stop_ray()
    section = render(res, corpus, args, command_line(argv))
    print(section)
    if not args.no_write:
        write_section(args.out, section)
        print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

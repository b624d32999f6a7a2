"""Benchmark `gallerymatch evaluate` end to end: a labelled folder of about 1,500 face photos made here from
public-domain images, then the CLI run on it in a child process (`--json`, progress bar on stderr), with the
time split between its steps.

The photos are augmentations of two public-domain portraits only (scikit-image's `astronaut` and `camera`):
random crops that keep the face whole, rescales, flips, brightness/contrast, small rotations, JPEG quality,
some pasted onto public-domain backgrounds (`coffee`, `chelsea`, `rocket`). They are split into pseudo-identities,
so the set holds TWO REAL PEOPLE: its accuracy figures mean nothing, only the timing counts.

The child runs the `gallerymatch` console entry point (`jobs.cli:main`) with the `evaluate` arguments, after
wrapping the job's functions with timers (a few microseconds a call); `--plain` runs the installed `gallerymatch`
executable instead, without the split.
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import importlib
import io
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageEnhance

SECTION = "## Evaluate (scripts/bench_evaluate.py)"
MODEL = "facenet-casia-webface"
SEED = 20261202
DEFAULT_IDENTITIES, DEFAULT_PER_IDENTITY = 150, 10
TARGET_S = 600.0  # the issue: evaluate on 1,500 faces in minutes on 2 cores, here "< 10 minutes"
TARGET_PHOTOS = 1500
GALLERY_SIZE = 1_000_000  # --gallery-size: the operational estimate is timed too
BASES = ("astronaut", "camera")  # the two real people
BACKGROUNDS = ("coffee", "chelsea", "rocket")  # public-domain photos without a face
FACE_BOXES = {"astronaut": (181, 62, 268, 172), "camera": (199, 119, 254, 192)}  # MTCNN's boxes, 512 px originals
LABELS = {  # key: label of a phase timed in the child (the labels key the child's JSON)
    "list": "list the labelled folder",
    "embed_all": "`_embed` whole (loads, read + sha256, decode, detect, embed, progress bar)",
    "load_mtcnn": "load MTCNN",
    "load_face": "load InceptionResnetV1 (weights, sha256 check, digest)",
    "decode": "decode (`decode_image`)",
    "detect": "detect (`FaceDetector.detect`, MTCNN)",
    "embed": "embed (`FaceEmbedder.embed`, InceptionResnetV1)",
    "ident": "1:N metrics (`evaluate_identification`)",
    "verif": "1:1 metrics over all pairs (`evaluate_verification`)",
    "operational": "operational estimate (`--gallery-size`)",
    "plot": "DET plot (`--plot`)",
    "evaluate": "`jobs.accuracy.evaluate` whole",
}
INSIDE_EMBED = ("load_mtcnn", "load_face", "decode", "detect", "embed")  # parts of `_embed`, indented in the table
METRICS = ("ident", "verif", "operational")
PHASES = (  # (module, attribute, label): timed in the child by wrapping, in the table's order
    ("jobs.accuracy", "_labelled", LABELS["list"]),
    ("jobs.accuracy", "_embed", LABELS["embed_all"]),
    ("pipelines.faces", "FaceDetector.__init__", LABELS["load_mtcnn"]),
    ("pipelines.faces", "FaceEmbedder.__init__", LABELS["load_face"]),
    ("jobs.accuracy", "decode_image", LABELS["decode"]),
    ("pipelines.faces", "FaceDetector.detect", LABELS["detect"]),
    ("pipelines.faces", "FaceEmbedder.embed", LABELS["embed"]),
    ("jobs.accuracy", "evaluate_identification", LABELS["ident"]),
    ("jobs.accuracy", "evaluate_verification", LABELS["verif"]),
    ("jobs.accuracy", "_operational", LABELS["operational"]),
    ("jobs.accuracy", "write_det_plot", LABELS["plot"]),
    ("jobs.accuracy", "evaluate", LABELS["evaluate"]),
)


@dataclass
class Dataset:
    folder: Path
    identities: int
    photos: int
    by_base: dict[str, int]
    composites: int
    sizes: tuple[int, int, int]  # min / median / max longest side
    seconds: float
    mbytes: float


@dataclass
class Outcome:
    command: list[str]
    wall: float
    returncode: int
    result: dict[str, Any]
    phases: dict[str, float] = field(default_factory=dict)
    calls: dict[str, int] = field(default_factory=dict)
    child_imports: float = 0.0  # child start to the CLI's call (the interpreter's own start is outside)
    progress_updates: int = 0
    stderr_tail: str = ""

    def spent(self, *keys: str) -> float:
        """Seconds of the phases named by LABELS keys, summed."""
        return sum(self.phases.get(LABELS[key], 0.0) for key in keys)


# ---- the labelled folder ------------------------------------------------------------------------------------


def skimage_photo(name: str) -> Image.Image:
    from skimage import data

    return Image.fromarray(getattr(data, name)()).convert("RGB")


def augment(base: Image.Image, box: tuple[int, int, int, int], rng: np.random.Generator) -> Image.Image:
    """A crop around the face (kept whole with a margin), rotated up to 10 degrees about it, maybe flipped,
    rescaled 0.5-1.5x, with brightness and contrast changed."""
    x0, y0, x1, y1 = box
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    img = base.rotate(float(rng.uniform(-10, 10)), Image.Resampling.BILINEAR, center=(cx, cy), fillcolor=(127,) * 3)
    fw, fh = x1 - x0, y1 - y0
    margin = int(0.35 * max(fw, fh))  # rotation and MTCNN's box both fit inside it
    w = int(rng.integers(min(img.width, fw + 2 * margin), img.width + 1))
    h = int(rng.integers(min(img.height, fh + 2 * margin), img.height + 1))
    left_lo, left_hi = max(0, x1 + margin - w), min(x0 - margin, img.width - w)
    top_lo, top_hi = max(0, y1 + margin - h), min(y0 - margin, img.height - h)
    left = int(rng.integers(left_lo, max(left_lo, left_hi) + 1))
    top = int(rng.integers(top_lo, max(top_lo, top_hi) + 1))
    img = img.crop((left, top, left + w, top + h))
    if rng.random() < 0.5:
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    scale = float(rng.uniform(0.5, 1.5))
    img = img.resize((max(1, round(img.width * scale)), max(1, round(img.height * scale))), Image.Resampling.BILINEAR)
    img = ImageEnhance.Brightness(img).enhance(float(rng.uniform(0.7, 1.3)))
    return ImageEnhance.Contrast(img).enhance(float(rng.uniform(0.7, 1.3)))


def composite(photo: Image.Image, background: Image.Image, rng: np.random.Generator) -> Image.Image:
    """The photo pasted somewhere on a larger canvas cut from a public-domain photo without a face."""
    width, height = photo.width + int(rng.integers(32, 257)), photo.height + int(rng.integers(32, 257))
    scale = max(width / background.width, height / background.height, 1.0)
    bg = background.resize((round(background.width * scale) + 1, round(background.height * scale) + 1))
    left, top = int(rng.integers(0, bg.width - width + 1)), int(rng.integers(0, bg.height - height + 1))
    canvas = bg.crop((left, top, left + width, top + height))
    canvas.paste(
        photo, (int(rng.integers(0, width - photo.width + 1)), int(rng.integers(0, height - photo.height + 1)))
    )
    return canvas


def jpeg(img: Image.Image, quality: int) -> bytes:
    buffer = io.BytesIO()
    img.save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def build_dataset(folder: Path, identities: int, per_identity: int, seed: int = SEED) -> Dataset:
    """`identities` folders of `per_identity` distinct JPEGs; identity k is an augmentation of BASES[k % 2]."""
    start = time.perf_counter()
    bases = {name: skimage_photo(name) for name in BASES}
    backgrounds = [skimage_photo(name) for name in BACKGROUNDS]
    digests: set[str] = set()
    by_base = dict.fromkeys(BASES, 0)
    composites, sides, total = 0, [], 0
    for k in range(identities):
        name = BASES[k % len(BASES)]
        (folder / f"person-{k:04d}").mkdir(parents=True)
        for j in range(per_identity):
            rng = np.random.default_rng([seed, k, j])
            img = augment(bases[name], FACE_BOXES[name], rng)
            if rng.random() < 0.25:
                img = composite(img, backgrounds[int(rng.integers(len(backgrounds)))], rng)
                composites += 1
            data = jpeg(img, int(rng.integers(30, 96)))
            digest = hashlib.sha256(data).hexdigest()
            if digest in digests:
                raise RuntimeError(f"photo {k}/{j} repeats an earlier one")
            digests.add(digest)
            (folder / f"person-{k:04d}" / f"{j:03d}.jpg").write_bytes(data)
            by_base[name] += 1
            sides.append(max(img.size))
            total += len(data)
    sides.sort()
    return Dataset(
        folder,
        identities,
        len(digests),
        by_base,
        composites,
        (sides[0], sides[len(sides) // 2], sides[-1]),
        time.perf_counter() - start,
        total / 1e6,
    )


# ---- the child: the CLI with its functions timed ------------------------------------------------------------


def timer(fn: Callable[..., Any], label: str, spent: dict[str, float], calls: dict[str, int]) -> Callable[..., Any]:
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            spent[label] = spent.get(label, 0.0) + time.perf_counter() - start
            calls[label] = calls.get(label, 0) + 1

    return wrapped


def child(timings: Path, cli_args: list[str]) -> int:
    """Run `gallerymatch CLI_ARGS` in this process with PHASES timed; the timings go to a JSON file."""
    started = time.perf_counter()
    import jobs.cli

    spent: dict[str, float] = {}
    calls: dict[str, int] = {}
    for module_name, attribute, label in PHASES:
        owner: Any = importlib.import_module(module_name)
        holder_name, _, name = attribute.rpartition(".")
        holder = getattr(owner, holder_name) if holder_name else owner
        setattr(holder, name, timer(getattr(holder, name), label, spent, calls))
    sys.argv = ["gallerymatch", *cli_args]
    imports = time.perf_counter() - started
    try:
        jobs.cli.main()
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 0 if exc.code is None else 1
    timings.write_text(json.dumps({"phases": spent, "calls": calls, "imports": imports}))
    return code


def run_evaluate(dataset: Path, home: Path, models_dir: Path, model: str, plain: bool, plot: Path | None) -> Outcome:
    cli = ["evaluate", str(dataset), "--model-id", model, "--gallery-size", str(GALLERY_SIZE), "--json"]
    cli += ["--plot", str(plot)] if plot is not None else []
    timings = home.parent / "timings.json"
    if plain:
        exe = Path(sys.executable).with_name("gallerymatch")
        command = [str(exe) if exe.exists() else "gallerymatch", *cli]
    else:
        command = [sys.executable, str(Path(__file__).resolve()), "--child-timings", str(timings), "--", *cli]
    env = os.environ | {
        "GALLERYMATCH_HOME": str(home),
        "GALLERYMATCH_MODELS_DIR": str(models_dir),
        "GALLERYMATCH_MODEL_DOWNLOADS": "false",
        "RAY_ENABLE_UV_RUN_RUNTIME_ENV": "0",
    }
    start = time.perf_counter()
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - start
    lines = done.stdout.strip().splitlines()
    result: dict[str, Any] = json.loads(lines[-1]) if done.returncode == 0 and lines else {}
    out = Outcome(command, wall, done.returncode, result, stderr_tail=done.stderr[-3000:])
    out.progress_updates = done.stderr.count("photo/s") + done.stderr.count("s/photo")
    if timings.exists():
        data = json.loads(timings.read_text())
        out.phases, out.calls, out.child_imports = data["phases"], data["calls"], data["imports"]
    return out


# ---- report -------------------------------------------------------------------------------------------------


def fmt(value: Any) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def render(args: argparse.Namespace, ds: Dataset, out: Outcome, load: list[float], command: str) -> str:
    from bench_ingest import load_warning, machine, markdown_table

    when = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    r, cores = out.result, len(os.sched_getaffinity(0))
    lines = [args.heading, ""]
    if ds.photos < TARGET_PHOTOS:
        lines += [
            f"**Reduced run** ({ds.photos} photos, below the target's {TARGET_PHOTOS}): the verdict below is "
            "projected from this run's rate.",
            "",
        ]
    lines += [
        "**The accuracy figures of this set are meaningless**: its photos show only **two real people** (the "
        "astronaut and the cameraman of scikit-image), cut into pseudo-identities. Only the timing counts.",
        "",
        f"Measured {when} with `{command}`.",
        "",
    ]
    lines += [f"- {item}" for item in machine("cpu")]
    lines += [
        f"- 1-minute load average at start / end: {' / '.join(f'{v:.2f}' for v in load)} (the machine has "
        f"{cores} usable cores and is shared: anything else running slows every step){load_warning(load)}",
        f"- Data: {ds.photos} distinct JPEGs in {ds.identities} identity folders of {ds.photos // ds.identities} "
        f"(made in {ds.seconds:.1f} s, {ds.mbytes:.1f} MB), seeded augmentations of scikit-image's public-domain "
        f"`astronaut` ({ds.by_base['astronaut']}) and `camera` ({ds.by_base['camera']}): crops around the face that "
        "keep it whole, rotations up to 10 degrees, flips, rescales 0.5-1.5x, brightness and contrast 0.7-1.3x, "
        f"JPEG quality 30-95; {ds.composites} of them pasted onto a larger canvas cut from `coffee`, `chelsea` or "
        f"`rocket`. Longest side min / median / max: {' / '.join(map(str, ds.sizes))} px.",
        f"- Model: `{args.model}` (InceptionResnetV1, trained weights, from `gallerymatch models install "
        f"{args.model}` into a models dir of the benchmark's; weights digest "
        f"`{str(r.get('weights_digest', ''))[:23]}...`); a fresh GALLERYMATCH home.",
        "- The child: "
        + (
            "the installed `gallerymatch` executable, as is."
            if args.plain
            else "`jobs.cli:main` (what the `gallerymatch` executable runs) in a child Python that first wraps "
            "the job's functions with timers; the CLI arguments are exactly those of the command below."
        ),
        "",
    ]
    cli = shlex.join(["gallerymatch", *out.command[out.command.index("evaluate") :]])
    verdict = projected = out.wall
    if ds.photos < TARGET_PHOTOS:
        fixed = out.spent("load_mtcnn", "load_face") + out.child_imports
        projected = fixed + (out.wall - fixed) * TARGET_PHOTOS / ds.photos
        verdict = projected
    met = "Met" if out.returncode == 0 and verdict < TARGET_S else "NOT met"
    header = ["Run", "Photos", "Wall s", "Photos/s", "Exit", "Progress bar on stderr", f"Target < {TARGET_S:.0f} s"]
    cells = [
        [
            f"`{cli}` (child process)",
            str(ds.photos),
            f"{out.wall:.1f}",
            f"{ds.photos / out.wall:.2f}",
            str(out.returncode),
            f"yes ({out.progress_updates} updates)" if out.progress_updates else "not seen",
            f"**{met}**" + (f" (projected {projected:.0f} s for {TARGET_PHOTOS})" if projected != out.wall else ""),
        ]
    ]
    lines += [*markdown_table(header, cells, "lrrrrll"), ""]
    lines += [
        f"Target (evaluate on {TARGET_PHOTOS:,} faces in under {TARGET_S / 60:.0f} minutes on this "
        f"{cores}-core machine, with a progress bar): **{met}**: {verdict:.1f} s"
        + (" (projected)" if projected != out.wall else "")
        + f" = {verdict / 60:.1f} min.",
        "",
    ]
    if out.phases:
        lines += [
            "Where the time goes (seconds and calls, timed in the child by wrapping the functions; the indented "
            "rows are parts of `_embed`, and every row from `list` to the metrics is inside "
            "`jobs.accuracy.evaluate`):",
            "",
        ]
        rows = [["child start to the CLI call (imports, timers)", f"{out.child_imports:.2f}", "1"]]
        nested = {LABELS[key] for key in INSIDE_EMBED}
        for _, _, label in PHASES:
            if label in out.phases:
                shown = f"&nbsp;&nbsp;{label}" if label in nested else label
                rows.append([shown, f"{out.phases[label]:.2f}", str(out.calls.get(label, 0))])
                if label == LABELS["embed"] and out.spent("embed_all"):
                    rest = out.spent("embed_all") - out.spent(*INSIDE_EMBED)
                    rows.append(
                        ["&nbsp;&nbsp;rest of `_embed` (file reads, sha256, crops, progress bar)", f"{rest:.2f}", ""]
                    )
        accounted = out.child_imports + out.spent("evaluate")
        rows.append(
            ["interpreter start, CLI parsing, JSON output, exit (wall - the above)", f"{out.wall - accounted:.2f}", ""]
        )
        rows.append(["**wall (child process)**", f"{out.wall:.2f}", ""])
        lines += [*markdown_table(["Step", "Seconds", "Calls"], rows, "lrr"), ""]
        front, emb, metrics = out.spent("decode", "detect"), out.spent("embed"), out.spent(*METRICS)
        lines += [
            f"Split: decode + detect {front:.1f} s ({front / out.wall:.0%} of the wall), embed {emb:.1f} s "
            f"({emb / out.wall:.0%}; {r.get('photos', 0) - r.get('failed_to_enrol', 0)} crops, "
            f"{(r.get('photos', 0) - r.get('failed_to_enrol', 0)) / emb if emb else 0:.1f} crops/s), metrics "
            f"{metrics:.1f} s ({metrics / out.wall:.0%}).",
            "",
        ]
    if r:
        reasons = f" {r['failed_to_enrol_reasons']}" if r["failed_to_enrol_reasons"] else ""
        lines += [
            "What the CLI reported (`--json`; **meaningless as accuracy**, see above): "
            f"{r['identities']} identities, {r['photos']} photos, {r['enrolled']} enrolled, "
            f"{r['mated_searches']} mated and {r['non_mated_searches']} non-mated searches, {r['failed_to_enrol']} "
            f"photos without a usable face{reasons}, {r['genuine_pairs']:,} genuine and {r['impostor_pairs']:,} "
            f"impostor pairs; rank-1 {fmt(r['rank1'])}, 1:1 EER {fmt(r['eer'])}.",
            "",
        ]
    else:
        lines += [f"The CLI failed (exit {out.returncode}):", "", "```", out.stderr_tail.strip(), "```", ""]
    lines += [
        "How to read it:",
        "",
        "- The wall time is the whole child process: interpreter start, imports, model loads, every photo read, "
        "hashed, decoded, detected and embedded (largest face), the 1:N and 1:1 figures, the operational estimate "
        f"at N={GALLERY_SIZE:,} and the JSON. Generating the photos is not in it.",
        "- Detection (MTCNN over the photo's image pyramid) costs more per photo than the embedding of its one "
        "crop; both run on the CPU with torch's threads on every usable core.",
        "- The labelled set is degenerate on purpose for timing (two real people), so mated and non-mated "
        "scores overlap completely: ignore every accuracy figure here.",
        "",
    ]
    return "\n".join(lines) + "\n"


# ---- CLI ----------------------------------------------------------------------------------------------------


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--identities", type=int, default=DEFAULT_IDENTITIES, help="identity folders (%(default)s)")
    parser.add_argument("--per-identity", type=int, default=DEFAULT_PER_IDENTITY, help="photos each (%(default)s)")
    parser.add_argument("--model", default=MODEL, help="face model id to evaluate (%(default)s)")
    parser.add_argument(
        "--models-dir",
        type=Path,
        default=None,
        help="models dir with the weights (default GALLERYMATCH_MODELS_DIR, else a temporary one where "
        "`gallerymatch models install MODEL` is run first, not timed)",
    )
    parser.add_argument("--plain", action="store_true", help="run the `gallerymatch` executable, no time split")
    parser.add_argument("--plot", action="store_true", help="also write the DET plot (--plot) inside the timing")
    parser.add_argument("--workdir", type=Path, default=None, help="parent of the temporary folders ($TMPDIR)")
    parser.add_argument("--keep", action="store_true", help="keep the labelled folder and home (prints where)")
    parser.add_argument("--no-write", action="store_true", help="print the section only; leave the docs alone")
    parser.add_argument("--out", type=Path, default=Path("docs/benchmarks.md"), help="docs file (%(default)s)")
    parser.add_argument("--heading", default=SECTION, help="the docs section (its heading) to replace or append")
    parser.add_argument("--child-timings", type=Path, help=argparse.SUPPRESS)
    args, rest = parser.parse_known_args(argv)
    args.cli_args = rest[1:] if rest[:1] == ["--"] else rest
    if args.child_timings is None and args.cli_args:
        parser.error(f"unrecognized arguments: {' '.join(args.cli_args)}")
    if args.identities < 2 or args.per_identity < 2:
        parser.error("need --identities >= 2 and --per-identity >= 2")
    if not args.heading.startswith("## "):
        parser.error("--heading must be a second-level markdown heading ('## ...')")
    return args


def command_line(argv: list[str]) -> str:
    exe = Path(sys.executable)
    shown = os.path.relpath(exe) if exe.is_relative_to(Path.cwd()) else str(exe)
    return shlex.join([shown, "scripts/bench_evaluate.py", *argv])


def install(models_dir: Path, model: str) -> None:
    """`gallerymatch models install MODEL` into models_dir (idempotent; outside the timing)."""
    exe = Path(sys.executable).with_name("gallerymatch")
    command = [str(exe) if exe.exists() else "gallerymatch", "models", "install", model]
    env = os.environ | {"GALLERYMATCH_MODELS_DIR": str(models_dir), "GALLERYMATCH_HOME": str(models_dir / "home")}
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"`{shlex.join(command)}` failed ({done.returncode}):\n{done.stderr[-3000:]}")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.child_timings is not None:
        return child(args.child_timings, args.cli_args)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    sys.path.insert(0, str(Path(__file__).parent))
    tmp = Path(tempfile.mkdtemp(prefix="bench-evaluate-", dir=args.workdir))
    try:
        models_dir = args.models_dir or (
            Path(os.environ["GALLERYMATCH_MODELS_DIR"]) if os.environ.get("GALLERYMATCH_MODELS_DIR") else None
        )
        if models_dir is None:
            models_dir = tmp / "models"
            print(f"installing {args.model} into {models_dir} (not timed)", file=sys.stderr)
            install(models_dir, args.model)
        print("writing the labelled folder", file=sys.stderr)
        ds = build_dataset(tmp / "labelled", args.identities, args.per_identity)
        load = [os.getloadavg()[0]]
        print(f"timing gallerymatch evaluate on {ds.photos} photos", file=sys.stderr)
        plot = tmp / "det.png" if args.plot else None
        out = run_evaluate(ds.folder, tmp / "home", models_dir, args.model, args.plain, plot)
        load.append(os.getloadavg()[0])
    finally:
        if args.keep:
            print(f"kept {tmp}", file=sys.stderr)
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    section = render(args, ds, out, load, command_line(argv))
    print(section)
    if not args.no_write:
        from bench_ingest import write_section

        write_section(args.out, section, args.heading)  # re-reads the file and replaces this section only
        print(f"wrote {args.out}", file=sys.stderr)
    return 0 if out.returncode == 0 else 1


if __name__ == "__main__":
    sys.exit(main())

"""Benchmark ingest throughput (images/s): each stage alone, then end to end on the local and Ray engines; then
the same small corpus ingested into a local home and into an S3 home (moto's server on loopback, started here),
with every S3 request counted.

The S3 helpers here (a loopback moto server whose requests are tallied) are shared with scripts/bench_match.py.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import hashlib
import importlib
import json
import logging
import os
import platform
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import uuid
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import parse_qs, unquote

os.environ["RAY_ENABLE_UV_RUN_RUNTIME_ENV"] = "0"  # before anything imports ray: workers use this venv

from PIL import Image

import jobs.ingest as ingest_job
from jobs.ingest import Engine, plan, run_ingest
from lance_tables.sources import add_source
from lance_tables.store import Gallery
from pipelines import samples
from pipelines.decode import Decoded, decode_image
from pipelines.embed import EmbedStage, ShardOutput
from pipelines.errors import Refused
from pipelines.faces import FaceEmbedder
from pipelines.models import face_spec
from pipelines.prepare import CHUNK, PreparedShard, PrepareStage, read_shard_rows
from pipelines.settings import Settings
from pipelines.shards import find_shards, pack_folder
from pipelines.task import IngestTask, Modality, WorkItem

FACE = "facenet-untrained"
IMAGE = "clip-untrained"
SOURCE = "bench"
SECTION = "## Ingest (scripts/bench_ingest.py)"
TRAINED_FACE = "facenet-casia-webface"  # the trained face weights `gallerymatch models install` builds
TRAINED_SECTION = f"## Ingest with trained face weights (scripts/bench_ingest.py --face-model {TRAINED_FACE})"
COMPARE_ROUNDS = 2  # trained and untrained face embedding timed alternately this many times each; best of each
DEFAULT_IMAGES = 1536
DEFAULT_S3_IMAGES = 256  # the local-home / S3-home comparison: ingest is model-bound, a small corpus shows the I/O
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


@dataclass(frozen=True)
class Models:
    """The models and modality a run ingests with (`--face-model`, `--modality`, `--models-dir`)."""

    face: str = FACE
    image: str = IMAGE
    modality: Modality = "all"
    models_dir: Path | None = None  # None: GALLERYMATCH_MODELS_DIR or HOME/models

    @property
    def face_trained(self) -> bool:
        return not face_spec(self.face).untrained

    @property
    def wants_face(self) -> bool:
        return self.modality in ("face", "all")

    @property
    def wants_image(self) -> bool:
        return self.modality in ("image", "all")

    def child_args(self) -> list[str]:
        """These options again, for a child process of this script."""
        out = ["--face-model", self.face, "--modality", self.modality]
        return out + (["--models-dir", str(self.models_dir)] if self.models_dir is not None else [])


@dataclass
class Results:
    """Throughput rows by key, and one-time costs (seconds) kept out of them."""

    models: Models = field(default_factory=Models)
    face_digest: str = ""  # weights digest of the face model measured (stage 2 alone)
    rows: dict[str, Row] = field(default_factory=dict)
    once: dict[str, float] = field(default_factory=dict)
    startup: dict[str, float] = field(default_factory=dict)  # per engine: job start to the first commit
    load: list[float] = field(default_factory=list)  # 1-minute load average at the start and at the end
    device: str = "auto"  # the device setting the stages ran with
    s3_runs: list[HomeRun] = field(default_factory=list)  # the local-home / S3-home comparison, in run order
    s3_skipped: str = ""  # why the s3:// shards row is missing, if it is


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


def make_settings(home: Path | str, models_dir: Path | None = None) -> Settings:
    """Like the tests: downloads off, Ray limited to the usable cores; the rest from GALLERYMATCH_* or defaults
    (`models_dir` overrides GALLERYMATCH_MODELS_DIR)."""
    values: dict[str, object] = {
        "home": str(home),
        "model_downloads": False,
        "ray_num_cpus": len(os.sched_getaffinity(0)),
    }
    if models_dir is not None:
        values["models_dir"] = str(models_dir)
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
    stage, m = PrepareStage(task), res.models
    parts = ["MTCNN"] * m.wants_face + ["CLIP transform"] * m.wants_image
    _, res.once[f"stage 1 setup ({', '.join(parts)}) + warm-up"] = timed(lambda: warm_prepare(stage, decoded))
    prepared, seconds = timed(lambda: [stage.process(item) for item in items])
    faces = sum(len(p.faces) for p in prepared)
    work = ["read", "decode"] + ["detect", "crops"] * m.wants_face + ["CLIP prep"] * m.wants_image
    res.rows["prepare"] = Row(
        f"**stage 1 alone** (`PrepareStage.process`: {', '.join(work)})",
        sum(len(p.images) for p in prepared),
        seconds,
        f"{faces} faces",
    )
    if stage.detector is not None:
        res.rows["detect"] = Row(
            "detect only (`FaceDetector.detect`, pre-decoded)",
            sum(map(len, decoded)),
            timed(lambda: detect_only(stage, decoded))[1],
            f"chunks of {CHUNK}, as stage 1",
        )
    if stage.preparer is not None:
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


def weights_words(model_id: str) -> str:
    return "seeded random weights" if face_spec(model_id).untrained else "trained weights"


def measure_embed(task: IngestTask, prepared: list[PreparedShard], res: Results) -> None:
    """Stage 2 whole (models loaded first), then each model alone on the same inputs; with trained face weights
    also the untrained face model on the same crops, timed alternately with the trained one."""
    stage, m = EmbedStage(task), res.models
    parts = ["InceptionResnetV1"] * m.wants_face + ["ViT-B-32"] * m.wants_image
    _, res.once[f"stage 2 setup ({', '.join(parts)}, weight digests) + warm-up"] = timed(
        lambda: warm_embed(stage, prepared)
    )
    images = sum(len(p.images) for p in prepared)
    _, seconds = timed(lambda: [stage.process(p) for p in prepared])
    models = "both models" if m.wants_face and m.wants_image else "face model" if m.wants_face else "image model"
    res.rows["embed"] = Row(f"**stage 2 alone** (`EmbedStage.process`: {models}, rows)", images, seconds)
    face, image = stage.face, stage.image
    if face is not None:
        res.face_digest = face.weights_digest
        crops = sum(len(p.face_crops) for p in prepared)
        name = f"face embed only (InceptionResnetV1, {m.face} {weights_words(m.face)})"
        if m.face_trained:
            measure_face_pair(task, face, prepared, images, crops, res)
        else:
            seconds = timed(lambda: [face.embed(p.face_crops) for p in prepared])[1]
            res.rows["face_embed"] = Row(name, images, seconds, f"{crops} crops")
    if image is not None:
        res.rows["image_embed"] = Row(
            "image embed only (open_clip ViT-B-32)",
            images,
            timed(lambda: [image.embed(p.clip_inputs) for p in prepared])[1],
        )


def embed_all(model: FaceEmbedder, prepared: list[PreparedShard]) -> float:
    """Seconds to embed every shard's face crops with `model`."""
    return timed(lambda: [model.embed(p.face_crops) for p in prepared])[1]


def measure_face_pair(
    task: IngestTask, face: FaceEmbedder, prepared: list[PreparedShard], images: int, crops: int, res: Results
) -> None:
    """The trained face model and the untrained one (same architecture) on the same crops, alternately
    COMPARE_ROUNDS times each, best round of each: the same compute should give the same rate."""
    from pipelines.models import resolve_device

    device = resolve_device(task.device)
    (untrained, seconds) = timed(
        lambda: FaceEmbedder(FACE, Path(task.models_dir), task.downloads, task.face_batch_size, device)
    )
    res.once[f"load {FACE} for the comparison row"] = seconds
    first = next((p.face_crops[:1] for p in prepared if len(p.face_crops)), None)
    if first is not None:
        untrained.embed(first)
    best = {"trained": float("inf"), "untrained": float("inf")}
    for _ in range(COMPARE_ROUNDS):
        for key, model in (("trained", face), ("untrained", untrained)):
            best[key] = min(best[key], embed_all(model, prepared))
    note = f"{crops} crops; best of {COMPARE_ROUNDS} rounds, alternating with the other face row"
    res.rows["face_embed"] = Row(
        f"**face embed only (InceptionResnetV1, {res.models.face} trained weights)**", images, best["trained"], note
    )
    res.rows["face_embed_untrained"] = Row(
        f"face embed only (InceptionResnetV1, {FACE} seeded random weights), same crops",
        images,
        best["untrained"],
        note,
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
    m = res.models
    settings = make_settings(tmp / f"home-{engine}", m.models_dir)
    register(settings)
    if engine == "ray":
        from pipelines.engines.ray import start_ray

        _, res.once["Ray start (`start_ray`)"] = timed(lambda: start_ray(settings.ray_address, settings.ray_num_cpus))
    with recorded_commits() as commits:
        start = time.perf_counter()
        summary, seconds = timed(
            lambda: run_ingest(settings, corpus.shards_dir, m.modality, engine, m.face, m.image, False)
        )
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
        f"**end to end, {engine}** (`run_ingest`, LanceDB commits{e2e_words(m)})", summary["images"], seconds, note
    )


def e2e_words(m: Models) -> str:
    """What the end-to-end rows ran with, where it is not the default (both untrained models, modality all)."""
    words = [f"{m.face} {weights_words(m.face)}"] * (m.face != FACE) + [f"modality `{m.modality}`"] * (
        m.modality != "all"
    )
    return "".join(f"; {w}" for w in words)


@contextmanager
def recorded_commits() -> Iterator[list[tuple[float, int]]]:
    """(time, images) of every shard commit `run_ingest` makes while inside; the job's own function runs as is."""
    commits: list[tuple[float, int]] = []
    original = ingest_job.commit_shard

    def commit(gallery: Any, output: ShardOutput, task: IngestTask) -> Any:
        value = original(gallery, output, task)
        commits.append((time.perf_counter(), int(output.stats["distinct_images"])))
        return value

    ingest_job.commit_shard = commit
    try:
        yield commits
    finally:
        ingest_job.commit_shard = original


def stop_ray() -> None:
    if "ray" in sys.modules:
        import ray

        ray.shutdown()


# ---- S3 on loopback: moto's server in this process, every request it serves tallied ------------------------

S3_ACCESS, S3_SECRET, S3_REGION = "gallerymatch-bench", "gallerymatch-bench-secret", "us-east-1"
KINDS = ("LIST", "GET range", "GET", "HEAD", "PUT", "DELETE", "other")  # request kinds, the tables' columns
LIST_OPS = {"ListObjectsV2", "ListObjects", "ListObjectVersions", "ListMultipartUploads"}
PUT_OPS = {"PutObject", "PutObject (If-None-Match)", "CopyObject", "UploadPart", "CreateMultipartUpload"}
PUT_OPS |= {"CompleteMultipartUpload"}
DELETE_OPS = {"DeleteObject", "DeleteObjects", "AbortMultipartUpload"}
MB = 1e6


@dataclass(frozen=True)
class S3Request:
    """One request moto served: when (wall clock, comparable with a child process's), what, how much, how long."""

    start: float
    seconds: float  # in the server: from the request reaching moto to its answer built (the socket write aside)
    op: str  # the S3 operation
    key: str  # the object's key in its bucket (for a listing: the prefix listed)
    sent: int  # bytes of the answer's body
    received: int  # bytes of the request's body
    whole: int  # a ranged GET: the size of the whole object (moto reads all of it to cut the range); else `sent`
    status: int

    @property
    def kind(self) -> str:
        return request_kind(self.op)


def request_kind(op: str) -> str:
    if op in LIST_OPS:
        return "LIST"
    if op in ("GetObject", "GetObject (range)", "HeadObject"):
        return {"GetObject": "GET", "GetObject (range)": "GET range", "HeadObject": "HEAD"}[op]
    if op in PUT_OPS:
        return "PUT"
    return "DELETE" if op in DELETE_OPS else "other"


def s3_operation(method: str, path: str, query: str, headers: Mapping[str, str]) -> tuple[str, str]:
    """(operation, key) of a path-style S3 request (`/bucket/key?query`); `headers` as WSGI names (HTTP_RANGE).
    For a listing the key is the prefix listed."""
    _, _, key = unquote(path).lstrip("/").partition("/")
    params = parse_qs(query, keep_blank_values=True)
    if not key:
        bucket_ops = {
            ("GET", "versions"): "ListObjectVersions",
            ("GET", "uploads"): "ListMultipartUploads",
            ("GET", "versioning"): "GetBucketVersioning",
            ("PUT", "versioning"): "PutBucketVersioning",
            ("POST", "delete"): "DeleteObjects",
        }
        op = next((name for (m, p), name in bucket_ops.items() if m == method and p in params), "")
        if not op and method == "GET":
            op = "ListObjectsV2" if params.get("list-type") == ["2"] else "ListObjects"
        op = op or {"PUT": "CreateBucket", "HEAD": "HeadBucket", "DELETE": "DeleteBucket"}.get(method, "")
        return op or f"{method} bucket ({', '.join(sorted(params)) or 'no query'})", params.get("prefix", [""])[0]
    if method in ("GET", "HEAD"):
        op = "HeadObject" if method == "HEAD" else "GetObject (range)" if headers.get("HTTP_RANGE") else "GetObject"
    elif method == "PUT":
        if "partNumber" in params:
            op = "UploadPart"
        elif headers.get("HTTP_X_AMZ_COPY_SOURCE"):
            op = "CopyObject"
        else:
            op = "PutObject (If-None-Match)" if headers.get("HTTP_IF_NONE_MATCH") else "PutObject"
    elif method == "POST":
        op = "CreateMultipartUpload" if "uploads" in params else ""
        op = op or ("CompleteMultipartUpload" if "uploadId" in params else "")
    elif method == "DELETE":
        op = "AbortMultipartUpload" if "uploadId" in params else "DeleteObject"
    else:
        op = ""
    return op or f"{method} object ({', '.join(sorted(params)) or 'no query'})", key


class S3Tally:
    """WSGI middleware around moto's application: records every request it answers."""

    def __init__(self, app: Callable[..., Iterable[bytes]]):
        self.app = app
        self.requests: list[S3Request] = []
        self._lock = threading.Lock()

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
        """The answer is read whole before it is sent (moto builds it whole anyway), so the request is on
        record before the client has its answer: a count taken when a client is done misses nothing."""
        start, began = time.time(), time.perf_counter()
        answer: dict[str, Any] = {"status": 0, "range": ""}

        def recording(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
            answer["status"] = int(status.split(maxsplit=1)[0])
            answer["range"] = next((v for k, v in headers if k.lower() == "content-range"), "")
            return start_response(status, headers, exc_info)

        body = self.app(environ, recording)
        try:
            chunks = [bytes(chunk) for chunk in body]
        finally:
            close = getattr(body, "close", None)
            if close is not None:
                close()
        sent = sum(map(len, chunks))
        method, path, query = environ["REQUEST_METHOD"], environ.get("PATH_INFO", ""), environ.get("QUERY_STRING", "")
        op, key = s3_operation(method, path, query, environ)
        total = answer["range"].rpartition("/")[2]
        whole = int(total) if total.isdigit() else sent
        received = int(environ.get("CONTENT_LENGTH") or 0)
        request = S3Request(start, time.perf_counter() - began, op, key, sent, received, whole, answer["status"])
        with self._lock:
            self.requests.append(request)
        return chunks

    def mark(self) -> int:
        with self._lock:
            return len(self.requests)

    def since(self, mark: int) -> list[S3Request]:
        with self._lock:
            return list(self.requests[mark:])


@dataclass
class LoopbackS3:
    """moto's S3 server on 127.0.0.1 (a port the OS picks), in a thread of this process."""

    server: Any
    tally: S3Tally
    endpoint: str

    @property
    def env(self) -> dict[str, str]:
        """The standard AWS variables for this server (what `pipelines.storage` reads; children inherit them)."""
        return {
            "AWS_ACCESS_KEY_ID": S3_ACCESS,
            "AWS_SECRET_ACCESS_KEY": S3_SECRET,
            "AWS_REGION": S3_REGION,
            "AWS_ENDPOINT_URL": self.endpoint,
        }

    def client(self) -> Any:
        import boto3

        return boto3.session.Session(
            aws_access_key_id=S3_ACCESS, aws_secret_access_key=S3_SECRET, region_name=S3_REGION
        ).client("s3", endpoint_url=self.endpoint)

    def bucket(self) -> str:
        """A fresh bucket (its name unique to this run: an S3 home's audit witness is kept outside it)."""
        name = f"gm-bench-{uuid.uuid4().hex[:12]}"
        self.client().create_bucket(Bucket=name)
        return name

    def stored_bytes(self, bucket: str, prefix: str) -> int:
        pages = self.client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
        return sum(int(item["Size"]) for page in pages for item in page.get("Contents", []))

    def drop(self, bucket: str) -> None:
        """Delete a bucket and everything in it (moto holds it in this process)."""
        client = self.client()
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket):
            keys = [{"Key": item["Key"]} for item in page.get("Contents", [])]
            if keys:
                client.delete_objects(Bucket=bucket, Delete={"Objects": keys, "Quiet": True})
        client.delete_bucket(Bucket=bucket)

    def upload(self, folder: Path, bucket: str, prefix: str) -> str:
        """Copy a local folder's files under s3://bucket/prefix/ (same relative names); the URI of the copy."""
        client = self.client()
        for path in sorted(p for p in folder.rglob("*") if p.is_file()):
            key = f"{prefix}/{path.relative_to(folder).as_posix()}"
            client.put_object(Bucket=bucket, Key=key, Body=path.read_bytes())
        return f"s3://{bucket}/{prefix}"


@contextmanager
def loopback_s3() -> Iterator[LoopbackS3]:
    """Start moto's server with a tally; the AWS_* variables point at it until the block ends."""
    from moto.moto_server.werkzeug_app import DomainDispatcherApplication, MotoRequestHandler, create_backend_app
    from werkzeug.serving import make_server

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    tally = S3Tally(DomainDispatcherApplication(create_backend_app))
    server = make_server("127.0.0.1", 0, tally, threaded=True, request_handler=MotoRequestHandler)
    thread = threading.Thread(target=server.serve_forever, name="moto-s3", daemon=True)
    thread.start()
    s3 = LoopbackS3(server, tally, f"http://127.0.0.1:{server.server_address[1]}")
    saved = {name: os.environ.get(name) for name in (*s3.env, "AWS_ENDPOINT_URL_S3", "AWS_SESSION_TOKEN")}
    os.environ.update(s3.env)
    for name in ("AWS_ENDPOINT_URL_S3", "AWS_SESSION_TOKEN"):
        os.environ.pop(name, None)
    try:
        yield s3
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        server.shutdown()
        thread.join(timeout=10)


@dataclass
class Traffic:
    """Requests of one group, by kind, with their bytes and the server's time."""

    kinds: dict[str, int] = field(default_factory=dict)
    sent: int = 0
    received: int = 0
    whole: int = 0
    busy: float = 0.0

    @property
    def requests(self) -> int:
        return sum(self.kinds.values())

    def add(self, request: S3Request) -> None:
        self.kinds[request.kind] = self.kinds.get(request.kind, 0) + 1
        self.sent += request.sent
        self.received += request.received
        self.whole += request.whole if request.op == "GetObject (range)" else 0
        self.busy += request.seconds


def traffic_by(requests: Iterable[S3Request], group: Callable[[S3Request], str]) -> dict[str, Traffic]:
    out: dict[str, Traffic] = {}
    for request in requests:
        out.setdefault(group(request), Traffic()).add(request)
    return out


def total_traffic(requests: Iterable[S3Request]) -> Traffic:
    return traffic_by(requests, lambda _: "all").get("all", Traffic())


def max_in_flight(requests: Iterable[S3Request]) -> int:
    """The most requests moto was serving at once."""
    events = sorted(
        [(r.start, 1) for r in requests] + [(r.start + r.seconds, -1) for r in requests], key=lambda e: (e[0], e[1])
    )
    most = now = 0
    for _, change in events:
        now += change
        most = max(most, now)
    return most


def area_of(request: S3Request) -> str:
    """Which part of a bucket a request touched: the shards, one Lance table, or an area of the home."""
    parts = [p for p in request.key.split("/") if p]
    if not parts:
        return "(bucket)"
    if parts[0] == "shards":
        return "shards (Parquet)"
    if len(parts) >= 3 and parts[1] == "lance":
        return f"lance/{parts[2]}"
    if parts[1:] == ["lance"]:
        return "lance/ (the table names)"
    return parts[1] if len(parts) >= 2 else parts[0]


TRAFFIC_HEADER = [
    "Requests",
    *KINDS,
    "MB sent",
    "MB received",
    "MB moto read to cut ranges",
    "moto busy s (sum)",
]


def traffic_cells(t: Traffic) -> list[str]:
    return [
        str(t.requests),
        *(str(t.kinds.get(k, 0)) for k in KINDS),
        f"{t.sent / MB:,.2f}",
        f"{t.received / MB:,.2f}",
        f"{t.whole / MB:,.1f}",
        f"{t.busy:.2f}",
    ]


def write_s3_log(path: Path, runs: Iterable[tuple[str, list[S3Request]]]) -> None:
    """Every counted request, one JSON object a line, labelled with its run: the tables' raw material."""
    with path.open("w") as out:
        for label, requests in runs:
            for request in requests:
                out.write(json.dumps({"run": label, **dataclasses.asdict(request)}) + "\n")


def wrap_functions(
    targets: Iterable[tuple[str, str, str]],
    spent: dict[str, float],
    calls: dict[str, int],
    spans: list[tuple[str, float, float]] | None = None,
) -> None:
    """Time every call of each (module, attribute, label) target, by replacing it where it is looked up;
    `spans` (when given) gets each call's wall-clock start and end, to match against a server's log."""
    for module_name, attribute, label in targets:
        owner: Any = importlib.import_module(module_name)
        holder_name, _, name = attribute.rpartition(".")
        holder = getattr(owner, holder_name) if holder_name else owner
        original = getattr(holder, name, None)
        if original is not None:
            setattr(holder, name, _timer(original, label, spent, calls, spans))


def _timer(
    fn: Callable[..., Any],
    label: str,
    spent: dict[str, float],
    calls: dict[str, int],
    spans: list[tuple[str, float, float]] | None,
) -> Callable[..., Any]:
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        start = time.time()
        value, seconds = timed(lambda: fn(*args, **kwargs))
        spent[label] = spent.get(label, 0.0) + seconds
        calls[label] = calls.get(label, 0) + 1
        if spans is not None:
            spans.append((label, start, start + seconds))
        return value

    return wrapped


def run_child(argv: list[str]) -> dict[str, Any]:
    """Run this machine's Python on `argv` (a script and its child options) and return the JSON of its last line.

    The child is forked by a shell, not exec'd from here: Linux carries the RSS high-water mark of the process
    that calls exec into ru_maxrss, so a direct child would report this (large) process's peak."""
    command = ["/bin/sh", "-c", '"$@"; exit $?', "sh", sys.executable, *argv]
    done = subprocess.run(command, check=False, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"the child {argv[:2]} failed ({done.returncode}):\n{done.stderr[-4000:]}")
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


# ---- local home against S3 home, in child processes (moto serves from this one) ----------------------------

INGEST_PHASES = (  # (module, attribute, label): timed in the ingest child
    ("jobs.ingest", "find_shards", "find shards"),
    ("jobs.ingest", "shard_sources", "shard sources"),
    ("jobs.ingest", "plan", "plan (shard keys, ledger)"),
    ("jobs.ingest", "done_keys", "ledger read"),
    ("pipelines.prepare", "read_shard_rows", "shard reads"),
    ("jobs.ingest", "commit_shard", "commits"),
)


@dataclass
class HomeRun:
    """One `run_ingest` (local engine) in a child process: which home, which shards, what it took."""

    label: str
    seconds: float
    imports: float
    images: int
    shards: int
    phases: dict[str, float]
    calls: dict[str, int]
    startup: float  # job start to the first committed shard
    steady_images: int  # images after the first shard
    steady_seconds: float  # first commit to the last
    commit_spans: list[list[float]] = field(default_factory=list)  # wall-clock [start, end] of each commit_shard
    requests: list[S3Request] = field(default_factory=list)

    @property
    def rate(self) -> float:
        return self.images / self.seconds if self.seconds > 0 else 0.0

    @property
    def steady_rate(self) -> float:
        return self.steady_images / self.steady_seconds if self.steady_seconds > 0 else 0.0


def import_ingest_libraries() -> None:
    """What `run_ingest` imports lazily: before the clock, in both children alike."""
    import boto3  # noqa: F401
    import lance  # noqa: F401
    import lancedb  # noqa: F401
    import open_clip  # noqa: F401
    import torch  # noqa: F401

    for module in ("pipelines.engines.local", "pipelines.faces", "pipelines.embed"):
        importlib.import_module(module)


def ingest_child(home: str, shards: str, m: Models) -> int:
    """`run_ingest` once on the local engine, libraries imported before the clock; one JSON line on stdout."""
    _, imports = timed(import_ingest_libraries)
    settings = make_settings(home, m.models_dir)
    spent: dict[str, float] = {}
    calls: dict[str, int] = {}
    spans: list[tuple[str, float, float]] = []
    wrap_functions(INGEST_PHASES, spent, calls, spans)
    with recorded_commits() as commits:
        start = time.perf_counter()
        summary, seconds = timed(lambda: run_ingest(settings, shards, m.modality, "local", m.face, m.image, False))
    out = {"seconds": seconds, "imports": imports, "images": summary["images"], "shards": summary["shards"]}
    out |= {
        "startup": commits[0][0] - start if commits else seconds,
        "steady_images": sum(n for _, n in commits[1:]),
        "steady_seconds": commits[-1][0] - commits[0][0] if commits else 0.0,
        "commit_spans": [[start, end] for label, start, end in spans if label == "commits"],
    }
    print(json.dumps(out | {"phases": spent, "calls": calls}))
    return 0


def run_home(label: str, home: str, shards: str, expected: int, s3: LoopbackS3, m: Models) -> HomeRun:
    mark = s3.tally.mark()
    out = run_child([str(Path(__file__).resolve()), "--child-ingest", home, shards, *m.child_args()])
    if out["images"] != expected:
        raise RuntimeError(f"{label}: ingested {out['images']} images, expected {expected}")
    return HomeRun(label, requests=s3.tally.since(mark), **out)


def s3_shards_supported(uri: str) -> str:
    """'' when this checkout's ingest lists s3:// shards; else why not (the row is left out, with the reason)."""
    lister: Callable[[Any], list[Any]] = find_shards  # took a Path only before s3:// shards landed
    try:
        found = lister(uri)
    except Exception as exc:  # noqa: BLE001 - any failure means: not supported here
        return f"`find_shards` does not take an s3:// URI in this checkout ({type(exc).__name__}: {exc})"
    return "" if found else f"`find_shards({uri!r})` found no shards"


def measure_s3_homes(args: argparse.Namespace, tmp: Path, task: IngestTask, res: Results) -> Corpus:
    """The same small corpus ingested (local engine) into a local home from local shards, into an S3 home from
    the same local shards, and into an S3 home from a copy of the shards on S3: back to back, same run."""
    corpus = build_corpus(tmp / "s3-corpus", args.s3_images, args.rows_per_shard, task)
    with loopback_s3() as s3:
        bucket = s3.bucket()
        local_home = tmp / "home-s3-compare-local"
        register(make_settings(local_home, res.models.models_dir))
        res.s3_runs.append(
            run_home("local home, local shards", str(local_home), str(corpus.shards_dir), corpus.images, s3, res.models)
        )
        shutil.rmtree(local_home, ignore_errors=True)
        home = f"s3://{bucket}/home-local-shards"
        register(make_settings(home, res.models.models_dir))
        res.s3_runs.append(
            run_home("S3 home, local shards", home, str(corpus.shards_dir), corpus.images, s3, res.models)
        )
        (uri, seconds) = timed(lambda: s3.upload(corpus.shards_dir, bucket, "shards"))
        res.once["copy the comparison's shards to S3 (boto3 put_object)"] = seconds
        res.s3_skipped = s3_shards_supported(uri)
        if not res.s3_skipped:
            home = f"s3://{bucket}/home-s3-shards"
            register(make_settings(home, res.models.models_dir))
            res.s3_runs.append(run_home("S3 home, s3:// shards", home, uri, corpus.images, s3, res.models))
    return corpus


# ---- report -------------------------------------------------------------------------------------------------


VECTOR_FLAGS = (
    *("sse4_2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx_vnni"),
    *("avx512_bf16", "amx_tile", "amx_bf16", "amx_int8", "asimd", "asimddp", "i8mm", "sve"),
)


def vector_extensions() -> str:
    flags: set[str] = set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                flags = set(line.split(":", 1)[1].split())
                break
    except OSError:
        pass
    import torch

    have = [f for f in VECTOR_FLAGS if f in flags]
    missing = [f for f in ("avx512f", "avx512_vnni", "avx_vnni", "amx_tile") if f not in flags]
    text = f"CPU vector extensions: {', '.join(have) or 'none of those known'}"
    if platform.machine() in ("x86_64", "AMD64") and missing:
        text += f" (no {', '.join(missing)})"
    return text + f"; torch CPU capability {torch.backends.cpu.get_cpu_capability()}"


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
        vector_extensions(),
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


def load_warning(load: list[float]) -> str:
    """A warning for a run on a machine that others kept busy (load average above its usable cores)."""
    cores = len(os.sched_getaffinity(0))
    if not load or max(load) <= cores:
        return ""
    return (
        f"; **the machine was loaded** (load average above its {cores} usable cores: other work ran beside "
        "this benchmark), so absolute figures are slow and noisy: rely on the ratios measured in this run"
    )


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
    "face_embed_untrained",
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


def s3_compare_lines(res: Results, corpus: Corpus) -> list[str]:
    """The comparison's tables: wall time and ratio, seconds inside the job's steps, requests by area."""
    if not res.s3_runs:
        return []
    base = res.s3_runs[0]
    lines = [
        f"Local home against an S3 home (moto's server on loopback, in the benchmark's process), the same "
        f"{corpus.images} images in {len(corpus.items)} shards, `run_ingest` on the local engine in a child "
        "process each, back to back:",
        "",
    ]
    cells = []
    for run in res.s3_runs:
        t = total_traffic(run.requests)
        ratio = run.seconds / base.seconds if base.seconds else 0.0
        steady = base.steady_rate / run.steady_rate if run.steady_rate else 0.0
        cells.append(
            [
                *(run.label, str(run.images), str(run.shards), f"{run.seconds:.2f}", f"{run.rate:.2f}", f"{ratio:.2f}"),
                *(f"{run.startup:.1f}", f"{run.steady_rate:.2f}", f"{steady:.2f}"),
                *(str(t.requests), f"{t.sent / MB:,.2f}", f"{t.received / MB:,.2f}", f"{t.busy:.2f}"),
            ]
        )
    header = ["Run", "Images", "Shards", "Wall s", "Images/s", f"Wall / {base.label}", "Start-up s"]
    header += ["Steady state img/s", "Steady time per image / local home's", "S3 requests"]
    header += ["MB sent by S3", "MB sent to S3", "moto busy s (sum)"]
    lines += [*markdown_table(header, cells, "l" + "r" * (len(header) - 1)), ""]
    labels = [label for _, _, label in INGEST_PHASES]
    cells = [
        [run.label, f"{run.imports:.2f}", *(f"{run.phases.get(x, 0.0):.2f}" for x in labels), f"{run.seconds:.2f}"]
        for run in res.s3_runs
    ]
    lines += ["Seconds inside the job's steps (timed in the child by wrapping the functions):", ""]
    header = ["Run", "imports (not in total)", *labels, "total s"]
    lines += [*markdown_table(header, cells, "l" + "r" * (len(header) - 1)), ""]
    rows = []
    for run in res.s3_runs[1:]:
        for area, t in sorted(traffic_by(run.requests, area_of).items()):
            rows.append([run.label, area, *traffic_cells(t)])
    if rows:
        lines += ["S3 requests by what they touched (counted in the server):", ""]
        lines += [*markdown_table(["Run", "Area", *TRAFFIC_HEADER], rows, "ll" + "r" * 12), ""]
    return lines


def data_reads_per_commit(run: HomeRun) -> list[int]:
    """GETs of LanceDB data files made during each `commit_shard`, in commit order."""
    reads = [r.start for r in run.requests if "/lance/" in r.key and "/data/" in r.key and r.kind.startswith("GET")]
    return [sum(1 for t in reads if start <= t <= end) for start, end in run.commit_spans]


def s3_notes(res: Results) -> list[str]:
    """What the request log shows per shard and per image: the check for a request per row or per file."""
    if len(res.s3_runs) < 2:
        return []
    notes = []
    for run in res.s3_runs[1:]:
        by_area = traffic_by(run.requests, area_of)
        lance = Traffic()
        for area, t in by_area.items():
            if area.startswith("lance/"):
                lance.kinds = {k: lance.kinds.get(k, 0) + t.kinds.get(k, 0) for k in KINDS}
        commits = max(1, run.calls.get("commits", 0))
        lists = sum(t.kinds.get("LIST", 0) for t in by_area.values())
        per_commit = run.phases.get("commits", 0.0) / commits
        base = res.s3_runs[0].phases.get("commits", 0.0) / max(1, res.s3_runs[0].calls.get("commits", 0))
        text = (
            f"{run.label}: `commit_shard` {per_commit:.2f} s per shard against {base:.2f} s on the local home; "
            f"{len(run.requests)} requests for {run.images} images in {run.shards} shards "
            f"({len(run.requests) / max(1, run.shards):.1f} per shard, {len(run.requests) / max(1, run.images):.2f} "
            f"per image), {lists} of them LIST; LanceDB {lance.requests / commits:.1f} per committed shard ("
            + ", ".join(f"{k} {v / commits:.1f}" for k, v in lance.kinds.items() if v)
            + ")"
        )
        growth = data_reads_per_commit(run)
        if len(growth) >= 2:
            text += (
                f"; LanceDB data-file GETs per commit {' '.join(map(str, growth))} (commit 1 to {len(growth)}, all "
                "tables)"
            )
        shards = by_area.get("shards (Parquet)")
        if shards is not None:
            text += (
                f"; the shards {shards.requests} ("
                + ", ".join(f"{k} {v}" for k, v in shards.kinds.items() if v)
                + f"), {shards.sent / MB:.2f} MB read"
            )
        notes.append(text + ".")
    if res.s3_skipped:
        notes.append(f"No s3:// shards row: {res.s3_skipped}.")
    grows = any(len(g) >= 3 and g[-1] > g[1] for g in map(data_reads_per_commit, res.s3_runs[1:]))
    return [
        "- The S3 comparison: " + " ".join(notes) + " Nothing is requested per row or per image: the shards are "
        "listed once and each is read whole, and the LanceDB requests come per committed shard, five upserts each. "
        + (
            "But the data-file GETs per commit grow with the tables: every `Gallery.upsert` is a `merge_insert` on "
            "the table's key, and it reads every data file of the table (the key has no scalar index), so commit k "
            "reads the k-1 files the job wrote before it in each table: a job makes O(shards^2) such GETs, and a "
            "commit into a gallery of F fragments reads F files per table. "
            if grows
            else ""
        )
        + "Most requests are LISTs of a table's `_versions/`: the tables are opened with "
        "`read_consistency_interval=0`, so every table operation first lists the versions (about 10 LISTs per "
        "`Gallery.upsert` whatever the rows), and every `Gallery.open` lists the table names too. moto is a Python "
        "server (every request is parsed, signed and answered in Python, and a ranged GET reads the whole object to "
        "cut the range), so the S3 rows measure the request pattern against a slow server, not what a real S3 would "
        "take: there is no target ratio. Read the request counts for the pattern and the ratio as an upper bound.",
    ]


def render(
    res: Results, corpus: Corpus, args: argparse.Namespace, command: str, s3_corpus: Corpus | None = None
) -> str:
    when = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    lines = [args.heading, ""]
    if args.images < DEFAULT_IMAGES:
        lines += [
            f"**Reduced run** ({args.images} images, below the default {DEFAULT_IMAGES}): the stage-alone rows "
            "carry over, but at this size the end-to-end rates are dominated by start-up costs (see the `Job size` "
            "column). Replace it with a full run where the machine allows.",
            "",
        ]
    lines += [f"Measured {when} with `{command}`.", ""]
    lines += [f"- {item}" for item in machine(res.device)]
    lines += [
        f"- 1-minute load average at start / end: {' / '.join(f'{v:.2f}' for v in res.load)} "
        f"(anything else running on the machine slows every row){load_warning(res.load)}"
    ]
    lines += [
        f"- Data: {corpus.images} distinct JPEGs made from `pipelines.samples` ({corpus.with_faces} with faces: "
        f"the astronaut at 256/384/512 px and 2- and 3-face composites; the rest coffee/chelsea/rocket, no "
        f"face), packed into {len(corpus.items)} shards of up to {args.rows_per_shard} rows; modality "
        f"`{res.models.modality}`.",
        models_line(res),
        "",
    ]
    lines += [*throughput_lines(res), "", *once_lines(res), "", *ratio_lines(res), ""]
    lines += face_compare_lines(res)
    if s3_corpus is not None:
        lines += s3_compare_lines(res, s3_corpus)
    lines += [*notes(res)[:-1], *s3_notes(res), ""]
    return "\n".join(lines) + "\n"


def models_line(res: Results) -> str:
    m = res.models
    if not m.face_trained and m.modality == "all" and m.image == IMAGE:
        return (
            f"- Models: `{FACE}` and `{IMAGE}`, the real architectures (InceptionResnetV1, open_clip ViT-B-32) "
            "with seeded random weights, because no pretrained weights can be had on these machines. The compute "
            "per image is the real one; the embeddings mean nothing."
        )
    parts = []
    if m.wants_face:
        face = f"`{m.face}` (InceptionResnetV1, {weights_words(m.face)}"
        if m.face_trained:
            face += f", built offline by `gallerymatch models install {m.face}`"
        parts.append(face + (f", weights digest `{res.face_digest[:23]}...`)" if res.face_digest else ")"))
    if m.wants_image:
        parts.append(f"`{m.image}` (open_clip ViT-B-32, {'seeded random' if m.image == IMAGE else 'trained'} weights)")
    text = f"- Models: {' and '.join(parts)}"
    if m.face_trained and m.wants_face:
        text += (
            f"; the comparison row runs `{FACE}` (the same architecture, seeded random weights) on the same crops "
            "in the same process"
        )
    if m.modality != "all":
        text += (
            f". Modality `{m.modality}` only, so the end-to-end rows are not comparable with an `all` run's: the "
            "face rows are"
        )
    return text + "."


def face_compare_lines(res: Results) -> list[str]:
    """The trained against the untrained face model on the same crops: the same architecture, the same compute."""
    trained, untrained = res.rows.get("face_embed"), res.rows.get("face_embed_untrained")
    if trained is None or untrained is None or not untrained.rate:
        return []
    ratio = trained.rate / untrained.rate
    verdict = "the same within 10%" if abs(ratio - 1.0) <= 0.10 else "NOT within 10% of each other"
    return [
        f"Trained against untrained face weights on the same {trained.note.split(' crops')[0]} crops: "
        f"{trained.rate:.2f} against {untrained.rate:.2f} images/s, ratio **{ratio:.2f}** ({verdict}). The two "
        "are the same InceptionResnetV1 (the same layers, shapes and operations), so the compute per crop is the "
        "same; only the values of the weights differ.",
        "",
    ]


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
    parser.add_argument(
        "--heading",
        default=None,
        help=f"the docs section (its heading) to replace or append (default {SECTION!r}, or with a trained "
        f"--face-model {TRAINED_SECTION!r})",
    )
    parser.add_argument(
        "--face-model",
        default=FACE,
        help=f"face model id: {FACE} (seeded random weights) or trained weights such as {TRAINED_FACE} "
        f"(`gallerymatch models install {TRAINED_FACE}` first) (default %(default)s)",
    )
    parser.add_argument(
        "--modality",
        choices=("all", "face"),
        default="all",
        help="what to ingest: face and image embeddings, or faces only (%(default)s)",
    )
    parser.add_argument(
        "--models-dir",
        type=Path,
        default=None,
        help="model weights directory (default: GALLERYMATCH_MODELS_DIR or HOME/models)",
    )
    parser.add_argument(
        "--s3-images",
        type=int,
        default=DEFAULT_S3_IMAGES,
        help="images of the local-home / S3-home comparison (moto on loopback); 0 leaves it out (%(default)s)",
    )
    parser.add_argument("--s3-log", type=Path, default=None, help="write every counted S3 request here (JSON lines)")
    parser.add_argument("--child-ingest", nargs=2, metavar=("HOME", "SHARDS"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.engine_list = [e.strip() for e in args.engines.split(",") if e.strip()]
    try:
        trained = not face_spec(args.face_model).untrained
    except Refused as exc:
        parser.error(f"--face-model: {exc}")
    if args.heading is None:
        args.heading = TRAINED_SECTION if trained and args.face_model == TRAINED_FACE else SECTION
    args.models = Models(args.face_model, IMAGE, args.modality, args.models_dir)
    unknown = sorted(set(args.engine_list) - set(ENGINES))
    if unknown or args.images < 1 or args.rows_per_shard < 1 or args.s3_images < 0:
        parser.error(
            f"need --images >= 1, --rows-per-shard >= 1, --s3-images >= 0 and engines from {', '.join(ENGINES)}"
        )
    if not args.heading.startswith("## "):
        parser.error("--heading must be a second-level markdown heading ('## ...')")
    return args


def command_line(argv: list[str]) -> str:
    exe = Path(sys.executable)
    shown = os.path.relpath(exe) if exe.is_relative_to(Path.cwd()) else str(exe)
    return shlex.join([shown, "scripts/bench_ingest.py", *argv])


def run(args: argparse.Namespace, tmp: Path) -> tuple[Results, Corpus, Corpus | None]:
    m: Models = args.models
    res, settings = Results(models=m, load=[os.getloadavg()[0]]), make_settings(tmp / "home-stages", m.models_dir)
    res.device = settings.device
    task = IngestTask.from_settings(settings, m.modality, m.face, m.image)
    corpus = build_corpus(tmp, args.images, args.rows_per_shard, task)
    decoded = measure_decode(task, corpus.items, res)
    prepared = measure_prepare(task, corpus.items, decoded, res)
    measure_embed(task, prepared, res)
    for engine in (e for e in ENGINES if e in args.engine_list):
        measure_engine(engine, tmp, corpus, res)
    s3_corpus = measure_s3_homes(args, tmp, task, res) if args.s3_images else None
    res.load.append(os.getloadavg()[0])
    return res, corpus, s3_corpus


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    warnings.filterwarnings("ignore", "lancedb fork support is experimental", RuntimeWarning)
    if args.child_ingest:
        home, shards = args.child_ingest
        return ingest_child(home, shards, args.models)
    try:
        with tempfile.TemporaryDirectory(prefix="bench-ingest-") as name:
            res, corpus, s3_corpus = run(args, Path(name))
    finally:
        stop_ray()
    section = render(res, corpus, args, command_line(argv), s3_corpus)
    if args.s3_log is not None:
        write_s3_log(args.s3_log, [(run.label, run.requests) for run in res.s3_runs])
    print(section)
    if not args.no_write:
        write_section(args.out, section, args.heading)
        print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

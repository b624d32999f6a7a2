"""The ingest job: plan shards against the ledger, drive an engine, commit each shard, summarise."""

from __future__ import annotations

import dataclasses
import sys
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from jobs.session import writer_session
from lance_tables.erasure import erased_ids
from lance_tables.ledger import commit_shard, done_keys
from lance_tables.sources import require_registered
from lance_tables.store import Gallery
from pipelines.audit import digest
from pipelines.embed import ShardOutput
from pipelines.engines import Engine as EngineRunner
from pipelines.engines import EngineName, EngineOptions, open_engine
from pipelines.models import ensure_weights, face_spec, image_spec
from pipelines.settings import Settings
from pipelines.shards import find_shards, shard_key, shard_sources
from pipelines.task import IngestTask, Modality, WorkItem, ledger_key

Engine = EngineName  # the engine's name, as the CLI and scripts pass it


def plan(task: IngestTask, shards: Sequence[str | Path], done: set[str]) -> tuple[list[WorkItem], int]:
    """Work items for shards with parts still to do, and how many shards are already complete.

    A packed shard's identity comes from its name: planning reads no shard (others are hashed)."""
    items, skipped = [], 0
    for uri in shards:
        key = shard_key(uri)
        do_face = task.wants_face and ledger_key(key, task.face_part()) not in done
        do_image = task.wants_image and ledger_key(key, task.image_part()) not in done
        if do_face or do_image:
            items.append(WorkItem(str(uri), key, do_face, do_image))
        else:
            skipped += 1
    return items, skipped


def check_models(task: IngestTask, gallery: Gallery) -> list[str]:
    """Refuse unknown ids, missing weights or a vector-width clash before any work; return the notices."""
    notices, models_dir = [], Path(task.models_dir)
    if task.wants_face:
        spec = face_spec(task.face_model)
        ensure_weights(spec.model_id, models_dir, task.downloads)
        if spec.untrained:
            notices.append(f"face model {spec.model_id}: UNTRAINED (seeded random weights) - test/demo only")
    if task.wants_image:
        spec = image_spec(task.image_model)
        ensure_weights(spec.model_id, models_dir, task.downloads)
        existing = gallery.open("image_embeddings")
        if existing is not None:
            gallery.ensure_image_embeddings(spec.dim)
        if spec.untrained:
            notices.append(f"image model {spec.model_id}: UNTRAINED (seeded random weights) - test/demo only")
    return notices


def run_ingest(
    settings: Settings,
    shards_dir: str | Path,
    modality: Modality = "all",
    engine: Engine = "local",
    face_model: str | None = None,
    image_model: str | None = None,
    progress: bool = True,
    allow_undeclared_minors: bool = False,
) -> dict[str, Any]:
    """`allow_undeclared_minors` takes shards without a minor column as all adults (an operator's statement,
    recorded in the audit); without it such shards are quarantined whole (minors fail closed).

    `shards_dir` is a local folder or file, or an s3:// URI (read with the AWS_* variables)."""
    task = IngestTask.from_settings(settings, modality, face_model, image_model, allow_undeclared_minors)
    runner = open_engine(engine, EngineOptions.from_settings(settings))
    runner.prepare_runtime()  # before LanceDB's runtime exists: nothing forks a live async runtime
    with writer_session(settings, "ingest") as log:
        gallery = Gallery(settings.storage)
        task = dataclasses.replace(task, erased=erased_ids(gallery))
        shards = find_shards(shards_dir)
        require_registered(gallery, set().union(*(shard_sources(uri) for uri in shards)))
        notices = check_models(task, gallery)
        for notice in notices:
            print(f"WARNING: {notice}", file=sys.stderr)
        items, skipped = plan(task, shards, done_keys(gallery))
        models = [
            m
            for m in (task.face_model if task.wants_face else None, task.image_model if task.wants_image else None)
            if m
        ]
        with log.action(
            settings.actor,
            "ingest",
            inputs_digest=digest(sorted(i.shard_key for i in items)),
            models=models,
            allow_undeclared_minors=allow_undeclared_minors or None,
        ) as op:
            summary = _ingest(task, gallery, runner, items, len(shards), skipped, notices, progress)
            op.record(
                counts={
                    k: summary[k] for k in ("shards_processed", "images", "faces", "image_embeddings", "quarantined")
                },
                table_versions=summary["table_versions"],
            )
    return summary


def _ingest(
    task: IngestTask,
    gallery: Gallery,
    runner: EngineRunner,
    items: list[WorkItem],
    shards: int,
    skipped: int,
    notices: list[str],
    progress: bool,
) -> dict[str, Any]:
    started = time.perf_counter()
    totals: Counter[str] = Counter()
    reasons: Counter[str] = Counter()
    for output in _progress(runner.ingest(task, items), len(items), progress):
        commit_shard(gallery, output, task)
        totals.update({k: v for k, v in output.stats.items() if isinstance(v, int)})
        reasons.update(output.stats["quarantined"])
    elapsed = time.perf_counter() - started
    return _summary(task, runner.name, shards, len(items), skipped, totals, reasons, elapsed, notices, gallery)


def _progress(outputs: Iterator[ShardOutput], total: int, enabled: bool) -> Iterator[ShardOutput]:
    from tqdm import tqdm

    bar = tqdm(total=total, unit="shard", desc="ingest", disable=not enabled or total == 0, file=sys.stderr)
    with bar:
        for output in outputs:
            yield output
            bar.update(1)
            bar.set_postfix(images=output.stats["distinct_images"], faces=output.stats["faces"])


def _summary(
    task: IngestTask,
    engine: str,
    shards: int,
    processed: int,
    skipped: int,
    totals: Counter[str],
    reasons: Counter[str],
    elapsed: float,
    notices: list[str],
    gallery: Gallery,
) -> dict[str, Any]:
    images = totals["distinct_images"]
    return {
        "engine": engine,
        "modality": task.modality,
        "face_model": task.face_model if task.wants_face else None,
        "image_model": task.image_model if task.wants_image else None,
        "untrained_models": notices,
        "shards": shards,
        "shards_processed": processed,
        "shards_skipped": skipped,
        "images": images,
        "duplicates_in_shards": totals["duplicates_in_shard"],
        "decoded": totals["decoded"],
        "faces": totals["faces"],
        "images_with_faces": totals["images_with_faces"],
        "image_embeddings": totals["image_embeddings"],
        "quarantined": sum(reasons.values()),
        "quarantine_reasons": dict(sorted(reasons.items())),
        "elapsed_s": round(elapsed, 3),
        "images_per_s": round(images / elapsed, 3) if elapsed > 0 and images else 0.0,
        "table_versions": {name: gallery.version(name) for name in gallery.names()},
    }

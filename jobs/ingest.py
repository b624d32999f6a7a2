"""The ingest job: plan shards against the ledger, drive an engine, commit each shard, summarise."""

from __future__ import annotations

import dataclasses
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

from jobs.session import writer_session
from lance_tables.erasure import erased_ids
from lance_tables.ledger import commit_shard, done_keys
from lance_tables.sources import require_registered
from lance_tables.store import Gallery
from pipelines.audit import digest
from pipelines.embed import ShardOutput
from pipelines.models import ensure_weights, face_spec, image_spec
from pipelines.settings import Settings
from pipelines.shards import find_shards, shard_key, shard_sources
from pipelines.task import IngestTask, Modality, WorkItem, ledger_key

Engine = Literal["local", "ray", "modal"]


def plan(task: IngestTask, shards: list[Path], done: set[str]) -> tuple[list[WorkItem], int]:
    """Work items for shards with parts still to do, and how many shards are already complete."""
    items, skipped = [], 0
    for path in shards:
        key = shard_key(path)
        do_face = task.wants_face and ledger_key(key, task.face_part()) not in done
        do_image = task.wants_image and ledger_key(key, task.image_part()) not in done
        if do_face or do_image:
            items.append(WorkItem(str(path), key, do_face, do_image))
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
    shards_dir: Path,
    modality: Modality = "all",
    engine: Engine = "local",
    face_model: str | None = None,
    image_model: str | None = None,
    progress: bool = True,
    allow_undeclared_minors: bool = False,
) -> dict[str, Any]:
    """`allow_undeclared_minors` takes shards without a minor column as all adults (an operator's statement,
    recorded in the audit); without it such shards are quarantined whole (minors fail closed)."""
    task = IngestTask.from_settings(settings, modality, face_model, image_model, allow_undeclared_minors)
    if engine == "ray":  # start Ray before LanceDB's runtime exists: no fork of a live async runtime
        from pipelines.engines.ray import start_ray

        start_ray(settings.ray_address, settings.ray_num_cpus)
    with writer_session(settings, "ingest") as log:
        gallery = Gallery(settings.storage)
        task = dataclasses.replace(task, erased=erased_ids(gallery))
        shards = find_shards(shards_dir)
        require_registered(gallery, set().union(*(shard_sources(p) for p in shards)))
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
            summary = _ingest(settings, task, gallery, engine, items, len(shards), skipped, notices, progress)
            op.record(
                counts={
                    k: summary[k] for k in ("shards_processed", "images", "faces", "image_embeddings", "quarantined")
                },
                table_versions=summary["table_versions"],
            )
    return summary


def _ingest(
    settings: Settings,
    task: IngestTask,
    gallery: Gallery,
    engine: Engine,
    items: list[WorkItem],
    shards: int,
    skipped: int,
    notices: list[str],
    progress: bool,
) -> dict[str, Any]:
    started = time.perf_counter()
    totals: Counter[str] = Counter()
    reasons: Counter[str] = Counter()
    for output in _progress(_outputs(settings, task, items, engine), len(items), progress):
        commit_shard(gallery, output, task)
        totals.update({k: v for k, v in output.stats.items() if isinstance(v, int)})
        reasons.update(output.stats["quarantined"])
    elapsed = time.perf_counter() - started
    return _summary(task, engine, shards, len(items), skipped, totals, reasons, elapsed, notices, gallery)


def _outputs(settings: Settings, task: IngestTask, items: list[WorkItem], engine: Engine) -> Iterator[ShardOutput]:
    if engine == "ray":
        from pipelines.engines.ray import run_ray

        return run_ray(
            task,
            items,
            settings.ray_address,
            settings.ray_num_cpus,
            settings.shards_per_model_batch,
            settings.model_threads,
        )
    if engine == "modal":
        from pipelines.engines.modal import run_modal

        return run_modal(task, items)
    from pipelines.engines.local import run_local

    return run_local(task, items)


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

"""Stage 2 (model, GPU when present): embed a prepared shard and build its rows from the declared schemas."""

from __future__ import annotations

import datetime as dt
import hashlib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa

from pipelines.clip import ImageEmbedder
from pipelines.faces import FaceEmbedder
from pipelines.models import check_model_id
from pipelines.prepare import PreparedShard
from pipelines.schemas import FACES, IMAGES, QUARANTINE, image_embeddings_schema, to_arrow
from pipelines.task import IngestTask, WorkItem


@dataclass
class ShardOutput:
    """Rows for each table and the scope each commit replaces; small enough to return to the driver."""

    item: WorkItem
    tables: dict[str, pa.Table] = field(default_factory=dict)
    scopes: dict[str, str | None] = field(default_factory=dict)
    stats: dict[str, Any] = field(default_factory=dict)


def face_id(image_id: str, index: int, model_id: str) -> str:
    return hashlib.sha256(f"{image_id}|{index}|{model_id}".encode()).hexdigest()[:32]


def embedding_id(item_id: str, model_id: str) -> str:
    return hashlib.sha256(f"{item_id}|{model_id}".encode()).hexdigest()[:32]


class EmbedStage:
    """Holds the models (loaded once per actor) and turns PreparedShards into ShardOutputs."""

    def __init__(self, task: IngestTask):
        self.task = task
        self.face: FaceEmbedder | None = None
        self.image: ImageEmbedder | None = None

    @property
    def num_gpus(self) -> float:
        import torch

        return 1.0 if self.task.device != "cpu" and torch.cuda.is_available() else 0.0

    def setup(self) -> None:
        from pipelines.models import resolve_device

        t, device, models_dir = self.task, resolve_device(self.task.device), Path(self.task.models_dir)
        if t.wants_face and self.face is None:
            self.face = FaceEmbedder(t.face_model, models_dir, t.downloads, t.face_batch_size, device)
        if t.wants_image and self.image is None:
            self.image = ImageEmbedder(t.image_model, models_dir, t.downloads, t.image_batch_size, device)

    def process(self, prep: PreparedShard) -> ShardOutput:
        self.setup()
        now = dt.datetime.now(dt.UTC)
        out = ShardOutput(prep.item)
        key = prep.item.shard_key
        out.tables["quarantine"] = to_arrow(
            [q | {"shard_key": key, "quarantined_at": now} for q in prep.quarantine], QUARANTINE
        )
        out.tables["images"] = to_arrow([r | {"shard_key": key, "ingested_at": now} for r in prep.images], IMAGES)
        if prep.item.do_face and self.face is not None:
            out.tables["faces"] = self._faces(prep, now)
        if prep.item.do_image and self.image is not None:
            out.tables["image_embeddings"] = self._image_embeddings(prep, now)
        out.scopes = _scopes(prep, self.task)
        out.stats = _stats(prep, out)
        return out

    def _faces(self, prep: PreparedShard, now: dt.datetime) -> pa.Table:
        assert self.face is not None
        vectors = self.face.embed(prep.face_crops)
        model, digest = self.face.model_id, self.face.weights_digest
        rows = [
            {k: v for k, v in meta.items() if k not in {"uri", "captured_at"}}
            | {
                "face_id": face_id(meta["image_id"], meta["face_index"], model),
                "record_id": None,
                "vector": vec,
                "model_id": model,
                "weights_digest": digest,
                "origin": "detected",
                "shard_key": prep.item.shard_key,
                "ingested_at": now,
            }
            for meta, vec in zip(prep.faces, vectors, strict=True)
        ]
        return to_arrow(rows, FACES, vectors)

    def _image_embeddings(self, prep: PreparedShard, now: dt.datetime) -> pa.Table:
        assert self.image is not None
        vectors = self.image.embed(prep.clip_inputs)
        model, digest = self.image.model_id, self.image.weights_digest
        rows = [
            {k: meta[k] for k in ("image_id", "source_id", "subject_id", "minor")}
            | {
                "embedding_id": embedding_id(meta["image_id"], model),
                "record_id": None,
                "vector": vec,
                "model_id": model,
                "weights_digest": digest,
                "origin": "embedded",
                "shard_key": prep.item.shard_key,
                "ingested_at": now,
            }
            for meta, vec in zip(prep.clip_rows, vectors, strict=True)
        ]
        return to_arrow(rows, image_embeddings_schema(self.image.dim), vectors)


def _scopes(prep: PreparedShard, task: IngestTask) -> dict[str, str | None]:
    """Each commit replaces exactly the rows this shard part owns (stale rows of a rerun go).

    Every value goes through `sql_str`: model ids and item ids are never pasted into a predicate."""
    from pipelines.sql import sql_list, sql_str

    ids = sql_list(prep.image_ids or [prep.item.shard_key])
    stages = sql_list(["shard", "decode"] + (["face"] if prep.item.do_face else []))
    scopes: dict[str, str | None] = {
        "quarantine": f"(item_id IN {ids} OR item_id = {sql_str(prep.item.shard_key)}) AND stage IN {stages}",
        "images": None,
    }
    if prep.item.do_face:
        scopes["faces"] = _model_scope(ids, task.face_model, "detected")
    if prep.item.do_image:
        scopes["image_embeddings"] = _model_scope(ids, task.image_model, "embedded")
    return scopes


def _model_scope(ids: str, model_id: str, origin: str) -> str:
    from pipelines.sql import sql_str

    return f"image_id IN {ids} AND model_id = {sql_str(check_model_id(model_id))} AND origin = {sql_str(origin)}"


def _stats(prep: PreparedShard, out: ShardOutput) -> dict[str, Any]:
    reasons = Counter(q["reason"] for q in prep.quarantine)
    face_images = {f["image_id"] for f in prep.faces}
    return {
        "rows": prep.rows_in_shard,
        "distinct_images": len(prep.image_ids),
        "duplicates_in_shard": prep.duplicates_in_shard,
        "decoded": len(prep.images),
        "faces": out.tables["faces"].num_rows if "faces" in out.tables else 0,
        "images_with_faces": len(face_images),
        "image_embeddings": out.tables["image_embeddings"].num_rows if "image_embeddings" in out.tables else 0,
        "quarantined": dict(reasons),
    }

"""What one ingest run asks for, as plain values, and the work items it plans (one per shard)."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Protocol

from pipelines.decode import DecodeLimits
from pipelines.models import check_model_id

Modality = Literal["face", "image", "all"]


class TaskSettings(Protocol):
    """What `IngestTask.from_settings` reads (pipelines.settings.Settings has it; the core does not import it)."""

    @property
    def face_model(self) -> str: ...
    @property
    def image_model(self) -> str: ...
    @property
    def max_image_bytes(self) -> int: ...
    @property
    def max_image_pixels(self) -> int: ...
    @property
    def allowed_formats(self) -> tuple[str, ...]: ...
    @property
    def face_min_size(self) -> int: ...
    @property
    def face_min_prob(self) -> float: ...
    @property
    def detect_max_side(self) -> int: ...
    @property
    def detect_batch_size(self) -> int: ...
    @property
    def face_batch_size(self) -> int: ...
    @property
    def image_batch_size(self) -> int: ...
    @property
    def resolved_models_dir(self) -> Path: ...
    @property
    def model_downloads(self) -> bool: ...
    @property
    def device(self) -> str: ...


@dataclass(frozen=True)
class IngestTask:
    """Everything a worker needs; picklable, no environment reads."""

    modality: Modality
    face_model: str
    image_model: str
    limits: DecodeLimits
    face_min_size: int
    face_min_prob: float
    detect_max_side: int
    detect_batch_size: int
    face_batch_size: int
    image_batch_size: int
    models_dir: str
    downloads: bool
    device: str
    erased: frozenset[str] = frozenset()  # sha256 of erased images: never ingested again
    allow_undeclared_minors: bool = False  # a shard without a minor column: rows taken as not minors

    def __post_init__(self) -> None:
        check_model_id(self.face_model)  # model ids reach paths and predicates: the closed grammar first
        check_model_id(self.image_model)

    @classmethod
    def from_settings(
        cls,
        settings: TaskSettings,
        modality: Modality,
        face_model: str | None,
        image_model: str | None,
        allow_undeclared_minors: bool = False,
    ) -> IngestTask:
        return cls(
            modality=modality,
            face_model=face_model or settings.face_model,
            image_model=image_model or settings.image_model,
            limits=DecodeLimits(settings.max_image_bytes, settings.max_image_pixels, settings.allowed_formats),
            face_min_size=settings.face_min_size,
            face_min_prob=settings.face_min_prob,
            detect_max_side=settings.detect_max_side,
            detect_batch_size=settings.detect_batch_size,
            face_batch_size=settings.face_batch_size,
            image_batch_size=settings.image_batch_size,
            models_dir=str(settings.resolved_models_dir),
            downloads=settings.model_downloads,
            device=settings.device,
            allow_undeclared_minors=allow_undeclared_minors,
        )

    @property
    def wants_face(self) -> bool:
        return self.modality in ("face", "all")

    @property
    def wants_image(self) -> bool:
        return self.modality in ("image", "all")

    def face_part(self) -> str:
        """Ledger name of the face part: the model and every setting that changes its rows."""
        return (
            f"face:{self.face_model}:min{self.face_min_size}:p{self.face_min_prob}:side{self.detect_max_side}:"
            f"{self._rows_settings()}"
        )

    def image_part(self) -> str:
        return f"image:{self.image_model}:{self._rows_settings()}"

    def _rows_settings(self) -> str:
        """Decode limits, and the minors override only when given (existing ledgers keep their names)."""
        limits = f"{self.limits.max_bytes}:{self.limits.max_pixels}:{','.join(self.limits.formats)}"
        return limits + (":undeclared-minors-allowed" if self.allow_undeclared_minors else "")


@dataclass(frozen=True)
class WorkItem:
    """One shard and the parts of the task still to do for it.

    `shard_uri` is where the worker reads it itself (an absolute local path or s3://bucket/key): the
    driver hands out URIs, never bytes. `shard_key` is its content digest, checked against the bytes."""

    shard_uri: str
    shard_key: str
    do_face: bool
    do_image: bool


def ledger_key(shard_key: str, part: str) -> str:
    return hashlib.sha256(f"{shard_key}|{part}".encode()).hexdigest()[:32]

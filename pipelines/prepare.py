"""Stage 1 (CPU): read a shard, validate and decode every image, detect faces, cut model inputs."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from pipelines.clip import ClipPreparer
from pipelines.decode import Decoded, decode_image
from pipelines.faces import CROP_SIZE, Face, FaceDetector
from pipelines.shards import ID_RULE, ShardProblem, ShardUnreadable, is_valid_id, read_shard
from pipelines.task import IngestTask, WorkItem
from pipelines.vocab import Reason

CHUNK = 32  # images decoded at a time: bounds memory for shards of very large photos


@dataclass
class PreparedShard:
    """Stage 1 output: metadata rows, quarantine rows, and uint8 model inputs (cheap to ship)."""

    item: WorkItem
    image_ids: list[str] = field(default_factory=list)
    images: list[dict[str, Any]] = field(default_factory=list)
    quarantine: list[dict[str, Any]] = field(default_factory=list)
    faces: list[dict[str, Any]] = field(default_factory=list)
    face_crops: np.ndarray = field(default_factory=lambda: np.zeros((0, CROP_SIZE, CROP_SIZE, 3), np.uint8))
    clip_rows: list[dict[str, Any]] = field(default_factory=list)
    clip_inputs: list[np.ndarray] = field(default_factory=list)
    rows_in_shard: int = 0
    duplicates_in_shard: int = 0


class PrepareStage:
    """Decode + detect; heavy state (MTCNN) is built once per worker by `setup`."""

    num_cpus = 1.0

    def __init__(self, task: IngestTask):
        self.task = task
        self.detector: FaceDetector | None = None
        self.preparer: ClipPreparer | None = None

    def setup(self) -> None:
        from pipelines.models import resolve_device

        if self.task.wants_face and self.detector is None:
            t = self.task
            self.detector = FaceDetector(
                t.face_min_size, t.face_min_prob, t.detect_max_side, t.detect_batch_size, resolve_device(t.device)
            )
        if self.task.wants_image and self.preparer is None:
            self.preparer = ClipPreparer(self.task.image_model)

    def process(self, item: WorkItem) -> PreparedShard:
        self.setup()
        out = PreparedShard(item)
        try:  # the worker opens the shard itself, from its URI (a local path or s3://)
            table = read_shard_rows(item.shard_uri, self.task.allow_undeclared_minors, item.shard_key)
        except ShardUnreadable:  # storage, not content: the run stops and a rerun retries the shard
            raise
        except ShardProblem as exc:  # a shard that cannot be ingested (no minor column...): quarantined whole
            out.quarantine.append(_quarantine(item.shard_key, None, item.shard_uri, "shard", exc.reason, exc.detail))
            return out
        except Exception as exc:  # noqa: BLE001 - a broken shard is quarantined whole, the job goes on
            out.quarantine.append(_quarantine(item.shard_key, None, item.shard_uri, "shard", Reason.BAD_SHARD, exc))
            return out
        out.rows_in_shard = len(table)
        pending = self._validate(table, out)
        for start in range(0, len(pending), CHUNK):
            self._prepare_chunk(pending[start : start + CHUNK], out)
        return out

    def _validate(self, rows: list[dict[str, Any]], out: PreparedShard) -> list[tuple[dict[str, Any], Decoded]]:
        seen: set[str] = set()
        decoded: list[tuple[dict[str, Any], Decoded]] = []
        for index, row in enumerate(rows):
            image_id = row["image_id"] if is_valid_id(row.get("image_id")) else f"row-{out.item.shard_key[:16]}-{index}"
            if image_id in seen:
                out.duplicates_in_shard += 1
                continue
            seen.add(image_id)
            out.image_ids.append(image_id)
            result = self._check_row(row, image_id)
            if isinstance(result, Decoded):
                decoded.append((row, result))
            else:
                out.quarantine.append(_row_quarantine(row, image_id, *result))
        return decoded

    def _check_row(self, row: dict[str, Any], image_id: str) -> Decoded | tuple[Reason, str]:
        missing = [k for k in ("image_id", "source_id") if not row.get(k)]
        if row.get("pack_error"):
            return _pack_error(row["pack_error"])
        if row.get("image") is None:
            missing.append("image")
        if missing:
            return Reason.MISSING_FIELD, f"missing field(s): {', '.join(missing)}"
        if image_id in self.task.erased:
            return Reason.ERASED, "this image was erased; it is on the do-not-ingest list"
        problem = _metadata_problem(row)
        if problem is not None:
            return problem
        data: bytes = row["image"]
        if hashlib.sha256(data).hexdigest() != image_id:
            return Reason.IMAGE_ID_MISMATCH, "image_id is not the sha256 of the image bytes"
        result = decode_image(data, self.task.limits)
        return result if isinstance(result, Decoded) else (result.reason, result.detail)

    def _prepare_chunk(self, chunk: list[tuple[dict[str, Any], Decoded]], out: PreparedShard) -> None:
        do_face, do_image = out.item.do_face, out.item.do_image
        found = self._detect([d.image for _, d in chunk]) if do_face else [[] for _ in chunk]
        crops: list[np.ndarray] = []
        for (row, dec), faces in zip(chunk, found, strict=True):
            meta = _gallery_meta(row)
            out.images.append(
                meta | {"format": dec.format, "width": dec.width, "height": dec.height, "num_bytes": len(row["image"])}
            )
            if do_face:
                self._add_faces(meta, faces, out, crops)
            if do_image and self.preparer is not None:
                out.clip_rows.append(meta)
                out.clip_inputs.append(self.preparer.prepare(dec.image))
        if crops:
            out.face_crops = np.concatenate([out.face_crops, np.stack(crops)])

    def _detect(self, images: list[Any]) -> list[list[Face] | Exception | str]:
        """Faces per image; an image too small to hold a face gets the reason (text), never a detector run."""
        assert self.detector is not None
        small = [self.detector.too_small(image) for image in images]
        found = iter(self._detect_all([image for image, why in zip(images, small, strict=True) if why is None]))
        return [why if why is not None else next(found) for why in small]

    def _detect_all(self, images: list[Any]) -> list[list[Face] | Exception]:
        assert self.detector is not None
        try:
            return list(self.detector.detect(images))
        except Exception:  # noqa: BLE001 - find the image that breaks detection, keep the rest
            results: list[list[Face] | Exception] = []
            for image in images:
                try:
                    results.append(self.detector.detect([image])[0])
                except Exception as exc:  # noqa: BLE001
                    results.append(exc)
            return results

    @staticmethod
    def _add_faces(
        meta: dict[str, Any], faces: list[Face] | Exception | str, out: PreparedShard, crops: list[np.ndarray]
    ) -> None:
        if isinstance(faces, Exception | str) or not faces:
            reason = Reason.DETECT_FAILED if isinstance(faces, Exception) else Reason.NO_FACE
            detail = faces or "no face above the size and probability floors"
            out.quarantine.append(
                _quarantine(
                    meta["image_id"], meta["source_id"], meta["uri"], "face", reason, detail, meta["subject_id"]
                )
            )
            return
        for index, face in enumerate(faces):
            out.faces.append(
                meta
                | {"face_index": index, "box": list(face.box), "det_prob": face.prob, "landmarks": list(face.landmarks)}
            )
            crops.append(face.crop)


def read_shard_rows(
    uri: str, allow_undeclared_minors: bool = False, expected_key: str | None = None
) -> list[dict[str, Any]]:
    return read_shard(uri, allow_undeclared_minors, expected_key).to_pylist()


def _metadata_problem(row: dict[str, Any]) -> tuple[Reason, str] | None:
    """Ids that erasure could never be asked for, and unknown minor flags, are never stored (fail closed)."""
    if not is_valid_id(row["image_id"]):
        return Reason.INVALID_ID, f"image_id is not a valid id ({ID_RULE}); a packed shard has its sha256"
    if row.get("subject_id") is not None and not is_valid_id(row["subject_id"]):
        return Reason.INVALID_ID, (
            f"subject_id is not a valid id ({ID_RULE}), so it could never be erased by subject; "
            "fix it in the pack metadata and re-pack (the value is not stored)"
        )
    if row.get("minor") is None:
        return Reason.MINOR_UNKNOWN, (
            "the minor flag is null, and nobody is taken for an adult by default: re-pack with a minor flag "
            "(pack --metadata with a minor column, or pack --minor-default)"
        )
    return None


def _pack_error(text: str) -> tuple[Reason, str]:
    known = text in {reason.value for reason in Reason}
    return (Reason(text) if known else Reason.BAD_SHARD), f"recorded at pack time: {text[:100]}"


def _gallery_meta(row: dict[str, Any]) -> dict[str, Any]:
    return {
        "image_id": row["image_id"],
        "source_id": row["source_id"],
        "uri": row.get("uri"),
        "subject_id": row.get("subject_id"),
        "minor": bool(row["minor"]),
        "captured_at": row.get("captured_at"),
    }


def _row_quarantine(row: dict[str, Any], image_id: str, reason: Reason, detail: str) -> dict[str, Any]:
    """An erased image leaves no name behind: no uri, no subject id (its sha256 is on the erased list)."""
    erased = reason is Reason.ERASED
    uri = None if erased else row.get("uri")
    subject = row.get("subject_id")
    subject = subject if not erased and is_valid_id(subject) else None
    return _quarantine(image_id, row.get("source_id"), uri, "decode", reason, detail, subject)


def _quarantine(
    item_id: str,
    source_id: str | None,
    uri: str | None,
    stage: str,
    reason: Reason,
    detail: object,
    subject_id: str | None = None,
) -> dict[str, Any]:
    text = detail if isinstance(detail, str) else f"{type(detail).__name__}: {detail}"
    return {
        "quarantine_id": hashlib.sha256(f"{item_id}|{stage}".encode()).hexdigest()[:32],
        "item_id": item_id,
        "source_id": source_id,
        "subject_id": subject_id,
        "uri": uri,
        "stage": stage,
        "reason": reason.value,
        "detail": text[:500],
    }

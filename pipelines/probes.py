"""Probes of a watchlist: photos through the gallery's own decode/detect/embed path, or given embeddings."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from pipelines.decode import Decoded, DecodeLimits, decode_image
from pipelines.errors import Refused
from pipelines.importer import file_digest, open_embeddings, validate_batch
from pipelines.models import check_model_id
from pipelines.shards import PackReport, list_images

ProbeModality = Literal["face", "image"]


@dataclass
class ProbeSet:
    """Probe rows (no vectors), their unit vectors, and what happened to every input."""

    rows: list[dict[str, Any]] = field(default_factory=list)
    vectors: list[np.ndarray] = field(default_factory=list)
    weights_digest: str = ""
    report: list[dict[str, Any]] = field(default_factory=list)


@dataclass(frozen=True)
class PhotoModels:
    """How probe photos are turned into vectors: the same settings the gallery used."""

    modality: ProbeModality
    model_id: str
    limits: DecodeLimits
    face_min_size: int
    face_min_prob: float
    detect_max_side: int
    models_dir: Path
    downloads: bool
    device: str = "cpu"

    def __post_init__(self) -> None:
        check_model_id(self.model_id)


THUMBNAIL_SIDE = 160  # the probe's face crop is 160 px already; a whole-image probe is scaled down to it


def thumbnail(pixels: np.ndarray) -> bytes:
    """What a reviewer sees of a probe: its face crop (or the whole image, scaled to THUMBNAIL_SIDE) as JPEG.

    Kept with the watchlist's probes and removed with them (expiry, closing plus grace: retention purges the
    probes table physically); the photo itself is never kept."""
    import io

    from PIL import Image

    img = Image.fromarray(np.ascontiguousarray(pixels, dtype=np.uint8)).convert("RGB")
    img.thumbnail((THUMBNAIL_SIDE, THUMBNAIL_SIDE))
    buffer = io.BytesIO()
    img.save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def probes_from_photos(folder: Path, models: PhotoModels) -> ProbeSet:
    """Every face of every photo becomes a probe (face modality); every photo one probe (image modality)."""
    out = ProbeSet()
    decoded: list[tuple[str, str, Decoded]] = []
    for path in list_images(folder, PackReport()):
        rel, data = path.relative_to(folder).as_posix(), path.read_bytes()
        result = decode_image(data, models.limits)
        if isinstance(result, Decoded):
            decoded.append((rel, hashlib.sha256(data).hexdigest(), result))
        else:
            out.report.append({"uri": rel, "probes": [], "reason": result.reason.value, "detail": result.detail})
    if models.modality == "face":
        _face_probes(decoded, models, out)
    else:
        _image_probes(decoded, models, out)
    return out


def _face_probes(decoded: list[tuple[str, str, Decoded]], models: PhotoModels, out: ProbeSet) -> None:
    from pipelines.faces import FaceDetector, FaceEmbedder, stack_crops

    detector = FaceDetector(models.face_min_size, models.face_min_prob, models.detect_max_side, 8, models.device)
    embedder = FaceEmbedder(models.model_id, models.models_dir, models.downloads, 32, models.device)
    out.weights_digest = embedder.weights_digest
    found = detector.detect([d.image for _, _, d in decoded])
    for (rel, sha, _), faces in zip(decoded, found, strict=True):
        if not faces:
            out.report.append({"uri": rel, "probes": [], "reason": "NO_FACE", "detail": "no face found"})
            continue
        vectors = embedder.embed(stack_crops(faces))
        ids = [f"{sha[:16]}-f{i}" for i in range(len(faces))]
        for i, (face, vector) in enumerate(zip(faces, vectors, strict=True)):
            out.rows.append(
                {
                    "probe_id": ids[i],
                    "origin": "photo",
                    "photo_sha256": sha,
                    "uri": rel,
                    "face_index": i,
                    "box": list(face.box),
                    "det_prob": face.prob,
                    "subject_id": None,
                    "thumbnail": thumbnail(face.crop),
                }
            )
            out.vectors.append(vector)
        out.report.append({"uri": rel, "probes": ids, "reason": None, "detail": f"{len(faces)} face(s)"})


def _image_probes(decoded: list[tuple[str, str, Decoded]], models: PhotoModels, out: ProbeSet) -> None:
    from pipelines.clip import ClipPreparer, ImageEmbedder

    preparer = ClipPreparer(models.model_id)
    embedder = ImageEmbedder(models.model_id, models.models_dir, models.downloads, 16, models.device)
    out.weights_digest = embedder.weights_digest
    inputs = [preparer.prepare(d.image) for _, _, d in decoded]
    vectors = embedder.embed(inputs) if inputs else np.zeros((0, embedder.dim), np.float32)
    for (rel, sha, photo), vector in zip(decoded, vectors, strict=True):
        probe_id = f"{sha[:16]}-img"
        out.rows.append(
            {
                "probe_id": probe_id,
                "origin": "photo",
                "photo_sha256": sha,
                "uri": rel,
                "face_index": None,
                "box": None,
                "det_prob": None,
                "subject_id": None,
                "thumbnail": thumbnail(np.asarray(photo.image.convert("RGB"))),
            }
        )
        out.vectors.append(vector)
        out.report.append({"uri": rel, "probes": [probe_id], "reason": None, "detail": "whole image"})


def probes_from_embeddings(path: Path, dim: int, model_id: str | None = None) -> ProbeSet:
    """Probe embeddings (probe_id, embedding, optional subject_id); any bad row refuses the whole file.

    `model_id`, when given, is checked against the model id grammar before the file is read."""
    if model_id is not None:
        check_model_id(model_id)
    handle = open_embeddings(path, id_column="probe_id")
    key, seen, out, offset = file_digest(path), set[str](), ProbeSet(), 0
    problems: list[str] = []
    for batch in handle.iter_batches(batch_size=65536):
        checked = validate_batch(batch, dim, seen, key, offset, id_column="probe_id", minors="ignore")
        offset += batch.num_rows
        problems += [f"{q['item_id']}: {q['reason']} ({q['detail']})" for q in checked.quarantine]
        for row, vector in zip(checked.rows, checked.vectors, strict=True):
            out.rows.append(
                {
                    "probe_id": row["probe_id"],
                    "origin": "embedding",
                    "photo_sha256": None,
                    "uri": None,
                    "face_index": None,
                    "box": None,
                    "det_prob": None,
                    "subject_id": row["subject_id"],
                }
            )
            out.vectors.append(vector)
    if problems:
        shown = "; ".join(problems[:10]) + (f"; ... {len(problems) - 10} more" if len(problems) > 10 else "")
        raise Refused(f"{len(problems)} bad probe row(s) in {path}, nothing stored: {shown}")
    out.weights_digest = f"imported:sha256:{key}"
    out.report.append(
        {
            "uri": str(path),
            "probes": [r["probe_id"] for r in out.rows],
            "reason": None,
            "detail": f"{len(out.rows)} embedding(s)",
        }
    )
    return out

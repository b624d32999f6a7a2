"""`gallerymatch evaluate` and `gallerymatch calibrate`: accuracy measured on the user's data, thresholds chosen.

evaluate: a labelled folder the user holds (one sub-folder per identity, consenting staff or a public benchmark).
Identities are split by the sha256 of their folder name: every other one is enrolled (its first photo with a
face, in path order), the rest are held out. The enrolled identities' other photos are mated searches, the held-out
identities' photos non-mated searches. Each photo's largest face is used. A photo without a usable face is a
failure to enrol: counted, never dropped; a mated search without a face is a miss at every threshold and rank.
The 1:1 figures (EER, AUC) compare every pair of photos with a face. The figures are NIST FRTE 1:N ones
(`pipelines.accuracy` defines them). With `--requested-by` the figures and score distributions are kept in the
`evaluations` table (audited), which `calibrate` estimates from; identity names and photos are never kept.

calibrate: a threshold for a target FPIR at the operational gallery's real size. With `--non-mated DIR`, those
photos (people known not to be in the gallery) are searched against the gallery, top-1 each: the threshold is the
smallest one with measured FPIR <= target, with a 95% Clopper-Pearson interval. Without it, the latest evaluation
of the same weights gives the per-pair FMR, extrapolated to the gallery's N by FPIR = 1 - (1 - FMR)^N, and the
record says `estimate`. Either way it is audited: searching the gallery is a search.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import sys
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from jobs.match import gallery_filter, pin_table, plan_units
from jobs.session import writer_session
from lance_tables.calibrations import add_calibration, add_evaluation, latest_evaluation
from lance_tables.delta import count_rows, weights_of
from lance_tables.store import Gallery
from pipelines.accuracy import (
    DEFAULT_FPIR_TARGETS,
    IdentificationResult,
    VerificationResult,
    clopper_pearson,
    evaluate_identification,
    evaluate_verification,
    fmr_for_fpir,
    fpir_from_fmr,
    fpir_key,
    threshold_for_fmr,
    write_det_plot,
)
from pipelines.audit import digest, table_versions
from pipelines.calibration import Calibration, Evaluation, figures_json, float32_at_least
from pipelines.decode import Decoded, DecodeLimits, decode_image
from pipelines.delta import model_weights
from pipelines.errors import Refused
from pipelines.faults import crash_point
from pipelines.models import ModelSpec, face_spec, resolve_device
from pipelines.settings import Settings
from pipelines.shards import PackReport, check_id, list_images

IMPOSTOR_TAIL = 100_000  # highest 1:1 impostor scores kept per evaluation: FMR down to 1e5 / pairs is exact
CALIBRATION_FILTER_PURPOSE = "criminal-investigation"  # a purpose that sees no minors: the strictest gallery
CHUNK = 16  # photos decoded and detected at a time (bounded memory)


@dataclass
class Photo:
    identity: str
    rel: str
    sha256: str
    vector: np.ndarray | None = None  # None: no usable face
    reason: str | None = None


@dataclass
class Embedded:
    photos: list[Photo] = field(default_factory=list)
    weights_digest: str = ""
    ignored: list[str] = field(default_factory=list)  # files outside any identity folder


def _face_model(settings: Settings, model_id: str) -> ModelSpec:
    spec = face_spec(model_id)
    if spec.untrained:
        print(
            f"WARNING: face model {model_id}: UNTRAINED (seeded random weights) - its figures mean nothing",
            file=sys.stderr,
        )
    return spec


def _embed(
    settings: Settings, items: list[tuple[str, Path, str]], model_id: str, progress: bool
) -> tuple[list[Photo], str]:
    """(identity, path, rel) -> photos with the embedding of their largest face (or why none)."""
    from tqdm import tqdm

    from pipelines.faces import FaceDetector, FaceEmbedder

    device = resolve_device(settings.device)
    limits = DecodeLimits(settings.max_image_bytes, settings.max_image_pixels, settings.allowed_formats)
    detector = FaceDetector(settings.face_min_size, settings.face_min_prob, settings.detect_max_side, 8, device)
    embedder = FaceEmbedder(model_id, settings.resolved_models_dir, settings.model_downloads, 32, device)
    photos: list[Photo] = []
    with tqdm(total=len(items), desc="faces", unit="photo", file=sys.stderr, disable=not progress) as bar:
        for start in range(0, len(items), CHUNK):
            chunk = items[start : start + CHUNK]
            decoded: list[tuple[Photo, Decoded]] = []
            for identity, path, rel in chunk:
                data = path.read_bytes()
                photo = Photo(identity, rel, hashlib.sha256(data).hexdigest())
                photos.append(photo)
                result = decode_image(data, limits)
                if isinstance(result, Decoded):
                    decoded.append((photo, result))
                else:
                    photo.reason = f"{result.reason.value}: {result.detail}"
            found = detector.detect([d.image for _, d in decoded]) if decoded else []
            crops = []
            for (photo, _), faces in zip(decoded, found, strict=True):
                if faces:
                    crops.append((photo, faces[0].crop))  # largest face first
                else:
                    photo.reason = "NO_FACE: no face found"
            if crops:
                vectors = embedder.embed(np.stack([c for _, c in crops]))
                for (photo, _), vector in zip(crops, vectors, strict=True):
                    photo.vector = vector
            bar.update(len(chunk))
    return photos, embedder.weights_digest


def _labelled(folder: Path) -> tuple[list[tuple[str, Path, str]], list[str]]:
    if not folder.is_dir():
        raise Refused(f"{folder} is not a folder: give a folder with one sub-folder per identity")
    items: list[tuple[str, Path, str]] = []
    ignored = []
    for path in list_images(folder, PackReport()):
        rel = path.relative_to(folder)
        if len(rel.parts) < 2:
            ignored.append(rel.as_posix())
            continue
        items.append((rel.parts[0], path, rel.as_posix()))
    identities = {i for i, _, _ in items}
    if len(identities) < 2:
        raise Refused(
            f"{folder} holds {len(identities)} identity folder(s) with photos: an evaluation needs at least two "
            "(one enrolled, one held out), and mated searches need identities with two photos or more"
        )
    return items, ignored


def _split(photos: list[Photo]) -> tuple[list[Photo], list[Photo], list[Photo], int, list[Photo]]:
    """(enrolled, mated, non_mated, mated_failed, failed_to_enrol)."""
    by_identity: dict[str, list[Photo]] = {}
    for p in photos:
        by_identity.setdefault(p.identity, []).append(p)
    order = sorted(by_identity, key=lambda name: hashlib.sha256(name.encode()).hexdigest())
    enrolled: list[Photo] = []
    mated: list[Photo] = []
    non_mated: list[Photo] = []
    mated_failed = 0
    failed = [p for p in photos if p.vector is None]
    for index, name in enumerate(order):
        group = sorted(by_identity[name], key=lambda p: p.rel)
        if index % 2:  # held out
            non_mated += [p for p in group if p.vector is not None]
            continue
        first = next((p for p in group if p.vector is not None), None)
        if first is None:
            continue  # nothing to enrol: its photos are failures to enrol, and no search can be made of it
        enrolled.append(first)
        rest = [p for p in group if p is not first]
        mated += [p for p in rest if p.vector is not None]
        mated_failed += sum(1 for p in rest if p.vector is None)
    return enrolled, mated, non_mated, mated_failed, failed


def _stack(photos: list[Photo], dim: int = 512) -> np.ndarray:
    vectors = [p.vector for p in photos if p.vector is not None]
    return np.stack(vectors).astype(np.float32) if vectors else np.zeros((0, dim), np.float32)


def evaluate(
    settings: Settings,
    labelled_dir: Path,
    model_id: str,
    gallery_size: int | None = None,
    plot: Path | None = None,
    requested_by: str | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """NIST FRTE 1:N figures of a face model on a labelled folder; kept (audited) when a requester is named."""
    _face_model(settings, model_id)
    if requested_by is not None:
        check_id("requester id", requested_by)
    if gallery_size is not None and gallery_size < 1:
        raise Refused("--gallery-size must be at least 1")
    if plot is not None and plot.suffix.lower() != ".png":
        raise Refused(f"--plot {plot}: the plot is written as PNG; give a FILE.png")
    items, ignored = _labelled(labelled_dir)
    photos, weights = _embed(settings, items, model_id, progress)
    enrolled, mated, non_mated, mated_failed, failed = _split(photos)
    if not enrolled:
        raise Refused("no identity could be enrolled: no photo of an enrolled identity has a usable face")
    ident = evaluate_identification(
        _stack(enrolled),
        [p.identity for p in enrolled],
        _stack(mated),
        [p.identity for p in mated],
        _stack(non_mated),
        mated_failed=mated_failed,
    )
    usable = [p for p in photos if p.vector is not None]
    verif = evaluate_verification(_stack(usable), [p.identity for p in usable])
    dataset = digest(sorted(f"{p.identity}/{p.sha256}" for p in photos))
    figures = _figures(ident, verif, model_id, weights, photos, failed, dataset, ignored)
    if gallery_size is not None:
        figures["operational"] = _operational(ident, verif, gallery_size)
    if plot is not None:
        write_det_plot(plot, ident, verif, f"{model_id} on {len(set(p.identity for p in photos))} identities")
        figures["plot"] = str(plot)
    figures["evaluation_id"] = None
    if requested_by is not None:
        figures["evaluation_id"] = _keep(settings, figures, ident, verif, requested_by)
    return figures


def _figures(
    ident: IdentificationResult,
    verif: VerificationResult,
    model_id: str,
    weights: str,
    photos: list[Photo],
    failed: list[Photo],
    dataset: str,
    ignored: list[str],
) -> dict[str, Any]:
    one = ident.to_json()
    reasons: dict[str, int] = {}
    for p in failed:
        key = (p.reason or "").split(":")[0]
        reasons[key] = reasons.get(key, 0) + 1
    return {
        "model_id": model_id,
        "weights_digest": weights,
        "dataset_digest": dataset,
        "identities": len({p.identity for p in photos}),
        "photos": len(photos),
        "enrolled": ident.gallery_size,
        "mated_searches": ident.mated_searches,
        "non_mated_searches": ident.non_mated_searches,
        "failed_to_enrol": len(failed),
        "failed_to_enrol_reasons": reasons,
        "mated_failed": ident.mated_failed,
        "ignored_files": ignored,
        "rank1": one["rank1"],
        "rank5": one["rank5"],
        "fnir_at_fpir": one["fnir_at_fpir"],
        "threshold_at_fpir": one["threshold_at_fpir"],
        "fpir_at_threshold": one["fpir_at_threshold"],
        "resolvable": one["resolvable"],
        "genuine": one["genuine"],
        "impostor": one["impostor"],
        "eer": verif.eer,
        "eer_threshold": verif.eer_threshold,
        "auc": verif.auc,
        "genuine_pairs": verif.genuine_pairs,
        "impostor_pairs": verif.impostor_pairs,
        "notice": "accuracy on this labelled set only; differentials on the operational gallery are unmeasured",
    }


def _operational(ident: IdentificationResult, verif: VerificationResult, n: int) -> dict[str, Any]:
    """Thresholds for the FPIR targets at an operational gallery of n, from the 1:1 FMR: an estimate."""
    impostor = verif.impostor_scores
    out: dict[str, Any] = {"gallery_size": n, "estimate": True, "basis": "FPIR = 1 - (1 - FMR)^N on 1:1 impostor pairs"}
    for target in DEFAULT_FPIR_TARGETS:
        fmr = fmr_for_fpir(target, n)
        threshold, achieved, resolvable = threshold_for_fmr(impostor, fmr)
        out[fpir_key(target)] = {
            "fmr_needed": fmr,
            "threshold": threshold,
            "fpir": fpir_from_fmr(achieved, n) if achieved is not None else None,
            "fnir": ident.fnir(threshold) if threshold is not None else None,
            "resolvable": resolvable,
        }
    return out


def _keep(
    settings: Settings,
    figures: dict[str, Any],
    ident: IdentificationResult,
    verif: VerificationResult,
    requested_by: str,
) -> str:
    evaluation_id = "eval-" + uuid.uuid4().hex[:16]
    with writer_session(settings, "evaluate") as log:
        fields = {"model_id": figures["model_id"], "evaluation_id": evaluation_id, "purpose": "accuracy-evaluation"}
        with log.action(requested_by, "evaluate", **fields) as op:
            gallery = Gallery(settings.storage)
            tail = verif.impostor_scores[::-1][:IMPOSTOR_TAIL]
            record = Evaluation(
                evaluation_id=evaluation_id,
                model_id=figures["model_id"],
                weights_digest=figures["weights_digest"],
                dataset_digest=figures["dataset_digest"],
                identities=figures["identities"],
                mated_searches=figures["mated_searches"],
                non_mated_searches=figures["non_mated_searches"],
                failed_to_enrol=figures["failed_to_enrol"],
                figures=figures_json(figures | {"evaluation_id": evaluation_id}),
                mated_scores=[float(s) for s in ident.mated_scores],
                mated_failed=ident.mated_failed,
                impostor_pairs=verif.impostor_pairs,
                impostor_tail=[float(s) for s in tail],
                created_at=dt.datetime.now(dt.UTC),
                requested_by=requested_by,
            )
            crash_point("evaluate:before-record")
            add_evaluation(gallery, record)
            op.record(
                evaluation_id=evaluation_id,
                inputs_digest=figures["dataset_digest"],
                weights_digest=figures["weights_digest"],
                counts={
                    k: figures[k] for k in ("identities", "mated_searches", "non_mated_searches", "failed_to_enrol")
                },
                table_versions=table_versions(gallery, ("evaluations",)),
            )
    return evaluation_id


def calibrate(
    settings: Settings,
    model_id: str,
    target_fpir: float,
    requested_by: str,
    non_mated: Path | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """A threshold for `target_fpir` at the gallery's size, measured or estimated; recorded and audited."""
    _face_model(settings, model_id)
    check_id("requester id", requested_by)
    if not 0.0 < target_fpir < 0.5:
        raise Refused(f"--target-fpir {target_fpir}: a false-positive identification rate between 0 and 0.5")
    items: list[tuple[str, Path, str]] = []
    if non_mated is not None:
        if not non_mated.is_dir():
            raise Refused(f"--non-mated {non_mated} is not a folder of photos")
        items = [("non-mated", p, p.relative_to(non_mated).as_posix()) for p in list_images(non_mated, PackReport())]
        if not items:
            raise Refused(f"--non-mated {non_mated} holds no photos")
    now = dt.datetime.now(dt.UTC)
    calibration_id = "cal-" + uuid.uuid4().hex[:16]
    with writer_session(settings, "calibrate") as log:
        gallery = Gallery(settings.storage)
        pinned = pin_table(gallery, "face")
        where = gallery_filter(model_id, CALIBRATION_FILTER_PURPOSE)
        n = count_rows(pinned, where) if pinned is not None else 0
        if pinned is None or n == 0:
            raise Refused(f"the gallery has no face rows of model {model_id!r}: nothing to calibrate against")
        weights = sorted(model_weights(weights_of(pinned, where)))
        if len(weights) != 1:
            raise Refused(
                f"the gallery's {model_id} rows were made with {len(weights)} different weights "
                f"({', '.join(w[:19] + '...' for w in weights)}): re-ingest them with one set first"
            )
        method = "measured" if non_mated is not None else "estimate"
        fields = {"model_id": model_id, "calibration_id": calibration_id, "purpose": "calibration", "method": method}
        with log.action(requested_by, "calibrate", **fields) as op:
            evaluation = latest_evaluation(gallery, model_id, weights[0])
            if non_mated is not None:
                measured = _measure(settings, pinned, where, items, model_id, weights[0], target_fpir, progress)
            else:
                measured = _estimate(evaluation, model_id, weights[0], target_fpir, n)
            threshold, fpir, low, high, count, source = measured
            record = Calibration(
                calibration_id=calibration_id,
                model_id=model_id,
                weights_digest=weights[0],
                gallery_table="faces",
                gallery_version=pinned.version,
                gallery_rows=n,
                gallery_filter=where,
                method=method,
                probe_count=count,
                probe_source=source,
                target_fpir=target_fpir,
                threshold=threshold,
                fpir=fpir,
                fpir_low=low,
                fpir_high=high,
                fnir=evaluation.fnir_at(threshold) if evaluation is not None else None,
                fnir_source=evaluation.evaluation_id if evaluation is not None else None,
                created_at=now,
                requested_by=requested_by,
            )
            crash_point("calibrate:before-record")
            add_calibration(gallery, record)
            op.record(
                calibration_id=calibration_id,
                method=method,
                threshold=threshold,
                target_fpir=target_fpir,
                fpir=fpir,
                counts={"gallery_rows": n, "probes": count},
                table_versions={"faces": pinned.version} | table_versions(gallery, ("calibrations",)),
            )
    out = record.row() | {"warnings": calibration_warnings(record)}
    return out


def calibration_warnings(record: Calibration) -> list[str]:
    out = []
    if record.fpir_high > record.target_fpir:
        out.append(
            f"FPIR {record.target_fpir:g} is not demonstrated: the 95% upper bound at this threshold is "
            f"{record.fpir_high:.3g} from {record.probe_count} "
            + ("non-mated searches" if record.method == "measured" else "impostor pairs")
            + f"; about {int(np.ceil(3 / record.target_fpir))} non-mated searches with none at or above the "
            "threshold are needed to show it (the rule of three)"
        )
    if record.method == "estimate":
        out.append(
            "estimated from a labelled set's 1:1 FMR (FPIR = 1 - (1 - FMR)^N): not measured on this gallery; "
            "measure with --non-mated DIR"
        )
    if record.fnir is None:
        out.append("FNIR unknown: no evaluation of these weights (run `gallerymatch evaluate ... --requested-by`)")
    return out


def _measure(
    settings: Settings,
    pinned: Any,
    where: str,
    items: list[tuple[str, Path, str]],
    model_id: str,
    weights: str,
    target: float,
    progress: bool,
) -> tuple[float, float, float, float, int, str]:
    from pipelines.match_unit import run_unit
    from pipelines.matcher import TopK

    photos, digest_now = _embed(settings, items, model_id, progress)
    if digest_now != weights:
        raise Refused(
            f"the gallery's {model_id} rows were made with weights {weights[:19]}..., the model here is "
            f"{digest_now[:19]}...: calibrate with the weights the gallery was made with"
        )
    usable = [p for p in photos if p.vector is not None]
    if not usable:
        raise Refused("no face was found in any --non-mated photo: nothing to measure")
    vectors = _stack(usable)
    device = resolve_device(settings.device)
    units = plan_units(pinned.uri, pinned.version, where, 1, settings.match_block_rows, device, 1, pinned.options)
    top = TopK(len(vectors), 1)
    for unit in units:
        top.merge(run_unit(unit, vectors))
    # Result rows carry float32 scores and compare them with a float32 threshold: calibrate on the same values.
    scores = np.array([np.float32(top.candidates(i)[0][0]) for i in range(len(vectors))], np.float64)
    ascending = np.sort(scores)
    found, achieved, _ = threshold_for_fmr(ascending, target)
    assert found is not None and achieved is not None
    threshold = float32_at_least(found)
    k = int(np.sum(ascending >= threshold))
    low, high = clopper_pearson(k, len(ascending))
    source = f"{len(usable)} photos (of {len(photos)}), digest {digest(sorted(p.sha256 for p in photos))}"
    return threshold, achieved, low, high, len(ascending), source


def _estimate(
    evaluation: Evaluation | None, model_id: str, weights: str, target: float, n: int
) -> tuple[float, float, float, float, int, str]:
    if evaluation is None:
        raise Refused(
            f"nothing to calibrate {model_id} from: give --non-mated DIR (photos of people known not to be in the "
            f"gallery) to measure, or keep an evaluation of these weights first (`gallerymatch evaluate "
            f"LABELLED_DIR --model-id {model_id} --requested-by ID`) to estimate from"
        )
    pairs = evaluation.impostor_pairs
    tail = np.sort(np.asarray(evaluation.impostor_tail, np.float64))
    if pairs == 0 or len(tail) == 0:
        raise Refused(f"evaluation {evaluation.evaluation_id} has no impostor pairs: it cannot give an FMR")
    fmr = fmr_for_fpir(target, n)
    allowed = int(np.floor(fmr * pairs))  # impostor pairs that may score at or above the threshold
    if allowed >= len(tail):
        raise Refused(
            f"evaluation {evaluation.evaluation_id} kept its {len(tail)} highest impostor scores; FMR {fmr:.3g} "
            f"needs the {allowed + 1}-th: evaluate again"
        )
    threshold = float32_at_least(float(np.nextafter(tail[::-1][allowed], np.inf)))
    k = int(np.sum(tail >= threshold))
    low, high = clopper_pearson(k, pairs)
    source = f"evaluation {evaluation.evaluation_id} ({pairs} impostor pairs, dataset {evaluation.dataset_digest})"
    return threshold, fpir_from_fmr(k / pairs, n), fpir_from_fmr(low, n), fpir_from_fmr(high, n), pairs, source

"""Watchlist submission: purpose binding checked first, probes made, stored only when everything is valid."""

from __future__ import annotations

import datetime as dt
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from jobs.session import writer_session
from lance_tables.calibrations import get_calibration, latest_calibration
from lance_tables.store import Gallery
from lance_tables.watchlists import store_watchlist
from pipelines.audit import digest, table_versions
from pipelines.calibration import Calibration, ThresholdChoice, float32_at_least
from pipelines.decode import DecodeLimits
from pipelines.errors import Refused
from pipelines.models import face_spec, image_spec
from pipelines.probes import PhotoModels, ProbeModality, probes_from_embeddings, probes_from_photos
from pipelines.schemas import WATCHLISTS, to_arrow
from pipelines.settings import Settings
from pipelines.shards import check_id
from pipelines.sql import sql_list
from pipelines.vocab import PURPOSES


@dataclass(frozen=True)
class Submission:
    """What the analyst asked for."""

    probes: Path
    name: str
    case_id: str
    purpose: str
    legal_basis: str
    requested_by: str
    modality: ProbeModality = "face"
    model_id: str | None = None
    top_k: int | None = None
    threshold: float | None = None
    expires: dt.date | None = None
    calibrated: ThresholdChoice | None = None  # `--threshold calibrated[:ID]`: the threshold of a calibration


def check_purpose_binding(sub: Submission, settings: Settings, now: dt.datetime) -> dt.datetime:
    """Refuse, naming what is missing, before anything is computed or stored; return the expiry."""
    missing = [
        flag
        for flag, value in (
            ("--case-id", sub.case_id),
            ("--legal-basis", sub.legal_basis),
            ("--requested-by", sub.requested_by),
            ("--name", sub.name),
        )
        if not (value or "").strip()
    ]
    if missing:
        raise Refused(f"a watchlist needs {', '.join(missing)}: every search has a case, a purpose and a requester")
    check_id("case id", sub.case_id)
    check_id("requester id", sub.requested_by)
    if sub.purpose not in PURPOSES:
        raise Refused(f"purpose {sub.purpose!r} is not on the closed list: {', '.join(PURPOSES)}")
    latest = now + dt.timedelta(days=settings.watchlist_max_days)
    if sub.expires is None:
        return now + dt.timedelta(days=settings.watchlist_default_days)
    expires = dt.datetime.combine(sub.expires, dt.time(23, 59, 59), tzinfo=dt.UTC)
    if expires > latest:
        raise Refused(
            f"expiry {sub.expires} is beyond the maximum of {settings.watchlist_max_days} days (latest {latest.date()})"
        )
    if expires <= now:
        raise Refused(f"expiry {sub.expires} is in the past")
    return expires


def gallery_rows(gallery: Gallery, modality: ProbeModality, model_id: str) -> int:
    table = "faces" if modality == "face" else "image_embeddings"
    return gallery.count(table, f"model_id IN {sql_list([model_id])}")


def submit(settings: Settings, sub: Submission) -> dict[str, Any]:
    now = dt.datetime.now(dt.UTC)
    expires = check_purpose_binding(sub, settings, now)
    with writer_session(settings, "watchlist.submit") as log:
        gallery = Gallery(settings.storage)
        watchlist_id = "wl-" + uuid.uuid4().hex[:16]
        fields = {"case_id": sub.case_id, "purpose": sub.purpose, "requested_by": sub.requested_by}
        with log.action(sub.requested_by, "watchlist.submit", watchlist_id=watchlist_id, **fields) as op:
            record, report = _submit(settings, gallery, sub, watchlist_id, now, expires)
            op.record(
                model_id=record["model_id"],
                inputs_digest=digest([r.get("photo_sha256") or r["probe_id"] for r in report.rows]),
                counts={"probes": len(report.rows)},
                table_versions=table_versions(gallery, ("watchlists", "probes")),
            )
    return {k: v for k, v in record.items() if k != "weights_digest"} | {"inputs": report.report}


def _submit(
    settings: Settings, gallery: Gallery, sub: Submission, watchlist_id: str, now: dt.datetime, expires: dt.datetime
) -> tuple[dict[str, Any], Any]:
    model_id = sub.model_id or (settings.face_model if sub.modality == "face" else settings.image_model)
    if sub.probes.is_file() and not sub.model_id:
        raise Refused("probe embeddings need --model-id: the model that made them")
    if sub.probes.is_dir():  # photos need a model gallerymatch can run: unknown ids are refused with the choices
        (face_spec if sub.modality == "face" else image_spec)(model_id)
    top_k = settings.default_top_k if sub.top_k is None else sub.top_k
    threshold = settings.default_threshold if sub.threshold is None else sub.threshold
    _check_numbers(top_k, threshold)
    calibration = None
    if sub.calibrated is not None and sub.calibrated.calibration_id is not None:  # refused before any work
        calibration = _calibration_for(gallery, sub.calibrated, model_id, None)
    if gallery_rows(gallery, sub.modality, model_id) == 0:
        raise Refused(
            f"the gallery has no {sub.modality} embeddings of model {model_id!r}: nothing to match "
            "against (ingest or import with that model first, or pass --model-id)"
        )
    probes = _make_probes(settings, sub, model_id, gallery)
    if not probes.rows:
        raise Refused(f"no probes could be made from {sub.probes}: {probes.report}")
    if sub.calibrated is not None:
        calibration = _calibration_for(gallery, sub.calibrated, model_id, probes.weights_digest)
        threshold = float32_at_least(calibration.threshold)
    record = {
        "watchlist_id": watchlist_id,
        "name": sub.name,
        "case_id": sub.case_id,
        "purpose": sub.purpose,
        "legal_basis": sub.legal_basis,
        "requested_by": sub.requested_by,
        "modality": sub.modality,
        "model_id": model_id,
        "weights_digest": probes.weights_digest,
        "top_k": top_k,
        "threshold": threshold,
        "probes": len(probes.rows),
        "status": "open",
        "created_at": now,
        "expires_at": expires,
        "closed_at": None,
        "closed_by": None,
        "calibration_id": calibration.calibration_id if calibration is not None else None,
    }
    store_watchlist(gallery, record, probes.rows, probes.vectors)
    return record, probes


def amend(
    settings: Settings, watchlist_id: str, requested_by: str, top_k: int | None = None, threshold: float | None = None
) -> dict[str, Any]:
    """Change an open watchlist's top K or threshold (`gallerymatch watchlist amend`), audited with both values.

    Its next nightly run follows: a lower K or another threshold extends the last run (truncated, re-flagged);
    a higher K needs the whole gallery again (a full run)."""
    from lance_tables.watchlists import get_watchlist

    check_id("requester id", requested_by)
    if top_k is None and threshold is None:
        raise Refused("nothing to amend: give --top-k and/or --threshold")
    with writer_session(settings, "watchlist.amend") as log:
        gallery = Gallery(settings.storage)
        record = get_watchlist(gallery, watchlist_id)
        if record["status"] != "open":
            raise Refused(f"watchlist {watchlist_id} is {record['status']}; only open watchlists are amended")
        new_k = int(record["top_k"]) if top_k is None else top_k
        new_t = float(record["threshold"]) if threshold is None else threshold
        _check_numbers(new_k, new_t)
        fields = {k: record[k] for k in ("case_id", "purpose", "watchlist_id")}
        before = {"top_k": int(record["top_k"]), "threshold": float(record["threshold"])}
        after = {"top_k": new_k, "threshold": new_t}
        with log.action(requested_by, "watchlist.amend", **fields, before=before, after=after):
            record |= after
            gallery.upsert("watchlists", to_arrow([record], WATCHLISTS))
    return {k: v for k, v in record.items() if k != "weights_digest"}


def _calibration_for(
    gallery: Gallery, choice: ThresholdChoice, model_id: str, weights_digest: str | None
) -> Calibration:
    """The calibration `--threshold calibrated[:ID]` names, checked against the probes' model and weights."""
    if choice.calibration_id is not None:
        calibration = get_calibration(gallery, choice.calibration_id)
        if calibration.model_id != model_id:
            raise Refused(
                f"calibration {calibration.calibration_id} is of model {calibration.model_id!r}, "
                f"the probes are of {model_id!r}"
            )
        if weights_digest is not None and calibration.weights_digest != weights_digest:
            raise Refused(
                f"calibration {calibration.calibration_id} was made for weights {calibration.weights_digest[:23]}..., "
                f"the probes were made with {weights_digest[:23]}...: calibrate these weights first"
            )
        return calibration
    found = latest_calibration(gallery, model_id, weights_digest) if weights_digest else None
    if found is None:
        raise Refused(
            f"--threshold calibrated: no calibration of model {model_id!r} with these weights exists. Run "
            f"`gallerymatch calibrate --model-id {model_id} --target-fpir 0.001 --requested-by ID "
            "[--non-mated DIR]` first, or give the threshold as a number"
        )
    return found


def _check_numbers(top_k: int, threshold: float) -> None:
    if not 1 <= top_k <= 10_000:
        raise Refused("--top-k must be between 1 and 10000")
    if not -1.0 <= threshold <= 1.0:
        raise Refused("--threshold is a cosine similarity: between -1 and 1")


def _make_probes(settings: Settings, sub: Submission, model_id: str, gallery: Gallery) -> Any:
    if sub.probes.is_dir():
        models = PhotoModels(
            sub.modality,
            model_id,
            DecodeLimits(settings.max_image_bytes, settings.max_image_pixels, settings.allowed_formats),
            settings.face_min_size,
            settings.face_min_prob,
            settings.detect_max_side,
            settings.resolved_models_dir,
            settings.model_downloads,
        )
        return probes_from_photos(sub.probes, models)
    if sub.probes.is_file():
        table = gallery.open("faces" if sub.modality == "face" else "image_embeddings")
        dim = table.schema.field("vector").type.list_size if table is not None else image_spec(model_id).dim
        return probes_from_embeddings(sub.probes, dim, model_id=model_id)
    raise Refused(f"{sub.probes} is neither a folder of probe photos nor a Parquet of probe embeddings")


def list_all(settings: Settings) -> list[dict[str, Any]]:
    """Every watchlist, newest first (`gallerymatch watchlist list`)."""
    from lance_tables.watchlists import list_watchlists

    return list_watchlists(Gallery(settings.storage))


def show(settings: Settings, watchlist_id: str) -> dict[str, Any]:
    """One watchlist and its probes, without their vectors (`gallerymatch watchlist show`)."""
    from lance_tables.watchlists import get_watchlist, read_probes

    gallery = Gallery(settings.storage)
    record = get_watchlist(gallery, watchlist_id)
    probes, _ = read_probes(gallery, watchlist_id)
    return record | {"probe_list": probes}

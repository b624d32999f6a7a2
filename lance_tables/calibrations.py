"""The evaluations and calibrations tables: append-only records of measured accuracy and chosen thresholds."""

from __future__ import annotations

from typing import Any

from lance_tables.store import Gallery
from pipelines.calibration import Calibration, Evaluation
from pipelines.errors import Refused
from pipelines.schemas import CALIBRATIONS, EVALUATIONS, to_arrow
from pipelines.sql import sql_list


def add_evaluation(gallery: Gallery, record: Evaluation) -> None:
    gallery.upsert("evaluations", to_arrow([record.row()], EVALUATIONS))


def _latest(gallery: Gallery, table: str, model_id: str, weights_digest: str) -> dict[str, Any] | None:
    """The newest record of a table for one model's weights (ties broken by id), or None."""
    where = f"model_id IN {sql_list([model_id])} AND weights_digest IN {sql_list([weights_digest])}"
    rows = gallery.read(table, where=where).to_pylist()
    key = "evaluation_id" if table == "evaluations" else "calibration_id"
    return max(rows, key=lambda r: (r["created_at"], r[key])) if rows else None


def latest_evaluation(gallery: Gallery, model_id: str, weights_digest: str) -> Evaluation | None:
    row = _latest(gallery, "evaluations", model_id, weights_digest)
    return Evaluation.of(row) if row else None


def add_calibration(gallery: Gallery, record: Calibration) -> None:
    gallery.upsert("calibrations", to_arrow([record.row()], CALIBRATIONS))


def get_calibration(gallery: Gallery, calibration_id: str) -> Calibration:
    rows = gallery.read("calibrations", where=f"calibration_id IN {sql_list([calibration_id])}").to_pylist()
    if not rows:
        raise Refused(f"no calibration {calibration_id!r}; see `gallerymatch calibrate`")
    return Calibration.of(rows[0])


def latest_calibration(gallery: Gallery, model_id: str, weights_digest: str) -> Calibration | None:
    row = _latest(gallery, "calibrations", model_id, weights_digest)
    return Calibration.of(row) if row else None


def list_calibrations(gallery: Gallery) -> list[Calibration]:
    rows = gallery.read("calibrations").to_pylist()
    return sorted((Calibration.of(r) for r in rows), key=lambda c: c.created_at, reverse=True)

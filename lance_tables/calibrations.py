"""The evaluations and calibrations tables: append-only records of measured accuracy and chosen thresholds."""

from __future__ import annotations

from lance_tables.store import Gallery
from pipelines.calibration import Calibration, Evaluation
from pipelines.errors import Refused
from pipelines.schemas import CALIBRATIONS, EVALUATIONS, to_arrow
from pipelines.sql import sql_list


def add_evaluation(gallery: Gallery, record: Evaluation) -> None:
    gallery.upsert("evaluations", to_arrow([record.row()], EVALUATIONS))


def latest_evaluation(gallery: Gallery, model_id: str, weights_digest: str) -> Evaluation | None:
    where = f"model_id IN {sql_list([model_id])} AND weights_digest IN {sql_list([weights_digest])}"
    rows = gallery.read("evaluations", where=where).to_pylist()
    if not rows:
        return None
    return Evaluation.of(max(rows, key=lambda r: (r["created_at"], r["evaluation_id"])))


def add_calibration(gallery: Gallery, record: Calibration) -> None:
    gallery.upsert("calibrations", to_arrow([record.row()], CALIBRATIONS))


def get_calibration(gallery: Gallery, calibration_id: str) -> Calibration:
    rows = gallery.read("calibrations", where=f"calibration_id IN {sql_list([calibration_id])}").to_pylist()
    if not rows:
        raise Refused(f"no calibration {calibration_id!r}; see `gallerymatch calibrate`")
    return Calibration.of(rows[0])


def latest_calibration(gallery: Gallery, model_id: str, weights_digest: str) -> Calibration | None:
    where = f"model_id IN {sql_list([model_id])} AND weights_digest IN {sql_list([weights_digest])}"
    rows = gallery.read("calibrations", where=where).to_pylist()
    if not rows:
        return None
    return Calibration.of(max(rows, key=lambda r: (r["created_at"], r["calibration_id"])))


def list_calibrations(gallery: Gallery) -> list[Calibration]:
    rows = gallery.read("calibrations").to_pylist()
    return sorted((Calibration.of(r) for r in rows), key=lambda c: c.created_at, reverse=True)

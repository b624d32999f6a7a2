"""Calibrated thresholds: the typed records of `evaluate` and `calibrate`, and when a threshold stops fitting.

A threshold is a number of one model's weights and one gallery size. NIST FRTE 1:N: the false-positive
identification rate of a threshold grows with the gallery, FPIR ~ 1 - (1 - FMR)^N. So a calibration records the
weights digest and the gallery's size N it was made for, and a match warns when either no longer holds: other
weights, or a gallery more than GALLERY_DRIFT (10%) away from N.
"""

from __future__ import annotations

import datetime as dt
import json
import re
from dataclasses import asdict, dataclass, fields
from typing import Any

from pipelines.errors import Refused

GALLERY_DRIFT = 0.10
CALIBRATED = "calibrated"
CALIBRATION_ID = re.compile(r"cal-[0-9a-f]{16}")
EVALUATION_ID = re.compile(r"eval-[0-9a-f]{16}")


@dataclass(frozen=True)
class Evaluation:
    """What `gallerymatch evaluate` measured on a labelled set (no names, no photos: counts and scores)."""

    evaluation_id: str
    model_id: str
    weights_digest: str
    dataset_digest: str
    identities: int
    mated_searches: int
    non_mated_searches: int
    failed_to_enrol: int
    figures: str  # JSON
    mated_scores: list[float]
    mated_failed: int
    impostor_pairs: int
    impostor_tail: list[float]  # descending
    created_at: dt.datetime
    requested_by: str

    def row(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def of(cls, row: dict[str, Any]) -> Evaluation:
        return cls(**{f.name: row[f.name] for f in fields(cls)})

    def fnir_at(self, threshold: float) -> float | None:
        """FNIR at a threshold on this labelled set: mated searches (faceless ones included) below it."""
        total = len(self.mated_scores) + self.mated_failed
        if total == 0:
            return None
        return (sum(1 for s in self.mated_scores if s < threshold) + self.mated_failed) / total


@dataclass(frozen=True)
class Calibration:
    """A threshold for a target FPIR, for one model's weights and one gallery size."""

    calibration_id: str
    model_id: str
    weights_digest: str
    gallery_table: str
    gallery_version: int
    gallery_rows: int
    gallery_filter: str
    method: str  # "measured": non-mated probes searched against the gallery; "estimate": from a labelled set
    probe_count: int
    probe_source: str
    target_fpir: float
    threshold: float
    fpir: float
    fpir_low: float
    fpir_high: float
    fnir: float | None
    fnir_source: str | None
    created_at: dt.datetime
    requested_by: str

    def row(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def of(cls, row: dict[str, Any]) -> Calibration:
        return cls(**{f.name: row[f.name] for f in fields(cls)})

    def summary(self) -> dict[str, Any]:
        """What a result set's manifest says of the calibration its threshold came from."""
        return {
            "calibration_id": self.calibration_id,
            "method": self.method,
            "target_fpir": self.target_fpir,
            "threshold": self.threshold,
            "fpir": self.fpir,
            "fpir_interval": [self.fpir_low, self.fpir_high],
            "gallery_rows": self.gallery_rows,
            "weights_digest": self.weights_digest,
            "created_at": self.created_at.isoformat(),
        }


@dataclass(frozen=True)
class ThresholdChoice:
    """`--threshold`: a cosine given by hand, `calibrated` (the latest for the model's weights) or `calibrated:ID`."""

    value: float | None = None
    calibrated: bool = False
    calibration_id: str | None = None

    @classmethod
    def parse(cls, text: str | float | None) -> ThresholdChoice:
        if text is None:
            return cls()
        if isinstance(text, float | int) and not isinstance(text, bool):
            return cls(value=float(text))
        raw = str(text).strip()
        if raw == CALIBRATED:
            return cls(calibrated=True)
        if raw.startswith(CALIBRATED + ":"):
            ident = raw[len(CALIBRATED) + 1 :]
            if not CALIBRATION_ID.fullmatch(ident):
                raise Refused(f"--threshold {raw[:60]!r}: a calibration id looks like cal-0123456789abcdef")
            return cls(calibrated=True, calibration_id=ident)
        try:
            value = float(raw)
        except ValueError:
            raise Refused(
                f"--threshold {raw[:60]!r} is neither a cosine (-1..1) nor 'calibrated' / 'calibrated:ID'"
            ) from None
        return cls(value=value)


def threshold_warnings(
    calibration: Calibration | None, gallery_weights: tuple[str, ...] | list[str], gallery_rows: int | None
) -> list[str]:
    """Why a watchlist's threshold does not fit this gallery (empty: it was calibrated for it)."""
    if calibration is None:
        return [
            "the threshold was not calibrated: it was given by hand (or defaulted); its false-positive rate at this "
            "gallery's size is unknown (see `gallerymatch calibrate`)"
        ]
    out = []
    others = sorted(set(gallery_weights) - {calibration.weights_digest})
    if others:
        out.append(
            f"calibration {calibration.calibration_id} was made for weights {calibration.weights_digest[:19]}..., "
            f"but the gallery holds rows of other weights ({', '.join(w[:19] + '...' for w in others)}): recalibrate"
        )
    if gallery_rows is not None and calibration.gallery_rows > 0:
        drift = abs(gallery_rows - calibration.gallery_rows) / calibration.gallery_rows
        if drift > GALLERY_DRIFT:
            out.append(
                f"calibration {calibration.calibration_id} was made for a gallery of {calibration.gallery_rows} rows; "
                f"it now has {gallery_rows} ({drift:.0%} off, more than {GALLERY_DRIFT:.0%}): FPIR grows with the "
                "gallery, recalibrate"
            )
    return out


def float32_at_least(value: float) -> float:
    """The smallest float32 >= value: scores and thresholds are compared in float32 (a result row's score and
    the watchlist's threshold), so a calibrated threshold is rounded up, never down past a score it excludes."""
    import numpy as np

    v = np.float32(value)
    if float(v) < value:
        v = np.nextafter(v, np.float32(np.inf))
    return float(v)


def figures_json(figures: dict[str, Any]) -> str:
    return json.dumps(figures, sort_keys=True, default=str)

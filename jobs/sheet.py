"""`gallerymatch results sheet`: a self-contained HTML review sheet of one run, written as an audited export.

Per probe: its thumbnail (kept with the watchlist's probes, removed with them) beside its ranked candidates'
face crops, cut on demand from the gallery image in its shard with the stored box. Nothing about a person is
kept for the sheet: the crops exist only inside the exported file. A sheet shows what the committed run holds:
erased candidates are never in it (erasure rewrites the run, and the sheet says so).

Shards must stay readable where they were ingested from (the ledger's `shard_uri`, a folder or s3:// URI) for
gallery crops to appear; a shard that is gone, unreadable or changed since ingest gives a placeholder that
says which and why, never a wrong face.
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from lance_tables.reviews import reviewer_decisions, two_person_state
from lance_tables.store import Gallery
from lance_tables.watchlists import read_thumbnails
from pipelines.audit import AuditLog
from pipelines.decode import Decoded, DecodeLimits, decode_image
from pipelines.errors import GalleryMatchError, Refused
from pipelines.results import read_run, require_run
from pipelines.settings import Settings
from pipelines.shards import check_id, read_shard_bytes
from pipelines.sheet import CandidateCard, ProbeCard, SheetRun, render_sheet, score_plot, write_sheet
from pipelines.sql import sql_list

CROP_SIDE = 160
CROP_MARGIN = 0.25  # of the box's size on each side: the reviewer sees the face and a little around it


def write_review_sheet(
    settings: Settings, run_id: str, to: str | Path, requested_by: str, new_only: bool = False
) -> dict[str, Any]:
    """Render one run's review sheet into the folder `to` (outside the home); audited as an export."""
    check_id("requester id", requested_by)
    if str(to).startswith("s3://"):
        raise Refused("--to: a review sheet is written to a local folder (it is opened in a browser)")
    folder = Path(to)
    if settings.storage.contains(str(folder)):
        raise Refused(f"--to {to} is inside GALLERYMATCH_HOME ({settings.storage.uri}); write the sheet outside it")
    if folder.exists() and not folder.is_dir():
        raise Refused(f"--to {to} exists and is not a folder")
    with audited_sheet_run(settings, run_id, requested_by, new_only, "results.sheet") as built:
        path = write_sheet(folder, render_sheet(built.run, score_plot(built.run)))
    return {
        "run_id": run_id,
        "path": str(path),
        "audit_record": built.run.audit_record,
        "probes": len(built.run.probes),
        "candidates": built.shown,
        "crops_missing": built.crops_missing,
        "rewritten_after_erasure": built.manifest.get("rewritten_after_erasure"),
    }


def build_sheet_run(
    settings: Settings,
    run_id: str,
    requested_by: str,
    new_only: bool = False,
    audit_action: str = "results.sheet",
) -> SheetRun:
    """One run's `SheetRun` (faces cut, reviews joined in), built under an audit record `audit_action` whose
    actor is `requested_by`: whoever gets it is shown gallery faces (`gallerymatch serve` uses `results.view`)."""
    with audited_sheet_run(settings, run_id, requested_by, new_only, audit_action) as built:
        return built.run


@dataclass
class BuiltSheet:
    run: SheetRun
    manifest: dict[str, Any]
    shown: int
    crops_missing: int


@contextmanager
def audited_sheet_run(
    settings: Settings, run_id: str, requested_by: str, new_only: bool, audit_action: str
) -> Iterator[BuiltSheet]:
    """The SheetRun of a run inside its audit action: the caller's block (e.g. writing the file) is part of the
    action, and the outcome (counts) is written once it ends; a failure in it is audited as failed."""
    check_id("requester id", requested_by)
    manifest = require_run(settings.store, run_id)
    fields = {
        "case_id": manifest["case_id"],
        "purpose": manifest.get("purpose"),
        "watchlist_id": manifest["watchlist_id"],
    }
    log = AuditLog.of(settings)
    with log.action(requested_by, audit_action, run_id=run_id, new_only=new_only, **fields) as op:
        audit_record = f"#{op.head.seq} (hash {op.head.hash[:16]}...)"
        gallery = Gallery(settings.storage)
        rows = read_run(settings.store, manifest).to_pylist()
        if new_only:
            rows = [r for r in rows if r.get("new_since_parent")]
        rows.sort(key=lambda r: (r["probe_id"], r["rank"]))
        crops = _GalleryCrops(settings, gallery, str(manifest.get("gallery_table") or "faces"))
        run = _sheet_run(settings, gallery, manifest, rows, crops, audit_record, new_only)
        shown = sum(len(p.candidates) for p in run.probes)
        yield BuiltSheet(run, manifest, shown, crops.missing)
        op.record(counts={"probes": len(run.probes), "candidates_shown": shown, "crops_missing": crops.missing})


def _sheet_run(
    settings: Settings,
    gallery: Gallery,
    manifest: dict[str, Any],
    rows: list[dict[str, Any]],
    crops: _GalleryCrops,
    audit_record: str,
    new_only: bool,
) -> SheetRun:
    decisions = reviewer_decisions(gallery)
    thumbnails = read_thumbnails(gallery, manifest["watchlist_id"])
    probe_ids = sorted({r["probe_id"] for r in rows} | set(thumbnails))
    probes = []
    for probe_id in probe_ids:
        cards = []
        for r in (r for r in rows if r["probe_id"] == probe_id):
            statuses = decisions.get((r["run_id"], r["probe_id"], r["rank"]), [])
            crop, why = crops.crop(r)
            cards.append(
                CandidateCard(
                    rank=int(r["rank"]),
                    score=float(r["score"]),
                    above_threshold=bool(r["above_threshold"]),
                    gallery_id=str(r["gallery_id"]),
                    image_id=r.get("image_id"),
                    record_id=r.get("record_id"),
                    source_id=str(r["source_id"]),
                    review_status=_status(statuses, str(r["review_status"])),
                    review_detail=two_person_state(statuses),
                    # a run without a parent has nothing to be new against: no badge, rather than all "new"
                    new_since_parent=r.get("new_since_parent") if manifest.get("parent_run_id") else None,
                    first_seen_run_id=r.get("first_seen_run_id"),
                    crop=crop,
                    crop_missing=why,
                )
            )
        thumb = thumbnails.get(probe_id)
        missing = None
        if thumb is None:
            missing = (
                "probe thumbnail removed with the watchlist's probes (retention)"
                if probe_id not in thumbnails
                else "no thumbnail: a probe given as an embedding, or stored before thumbnails were kept"
            )
        probes.append(ProbeCard(probe_id, thumb, missing, tuple(cards)))
    calibration = manifest.get("calibration")
    generation = int(manifest.get("generation") or 1)
    erased = manifest.get("rewritten_after_erasure")
    return SheetRun(
        run_id=str(manifest["run_id"]),
        watchlist_id=str(manifest["watchlist_id"]),
        case_id=str(manifest["case_id"]),
        purpose=str(manifest.get("purpose") or ""),
        model_id=str(manifest["model_id"]),
        matched_at=str(manifest["matched_at"]),
        top_k=int(manifest.get("top_k") or 0),
        threshold=float(manifest["threshold"]),
        calibration=_calibration_line(calibration) if calibration else None,
        threshold_warnings=_untrained(str(manifest["model_id"])) + tuple(manifest.get("threshold_warnings") or ()),
        mode=str(manifest.get("mode") or "full"),
        parent_run_id=manifest.get("parent_run_id"),
        generation=generation,
        erasure_note=(
            f"This run was rewritten by erasure (generation {generation}, receipt {erased}): erased candidates "
            "are not shown, and their ranks are left as they were."
            if erased
            else None
        ),
        audit_record=audit_record,
        new_only=new_only,
        probes=tuple(probes),
    )


def _untrained(model_id: str) -> tuple[str, ...]:
    from pipelines.models import UNTRAINED_IDS

    if model_id in UNTRAINED_IDS:
        return (f"model {model_id} is UNTRAINED (seeded random weights, for tests and demos): its scores mean nothing",)
    return ()


def _status(statuses: list[str], stored: str) -> str:
    from lance_tables.reviews import decide

    return decide(statuses) if statuses else stored


def _calibration_line(calibration: dict[str, Any]) -> str:
    low, high = [*(calibration.get("fpir_interval") or []), None, None][:2]
    interval = f"{low:.3g}-{high:.3g}" if isinstance(low, float | int) and isinstance(high, float | int) else "n/a"
    return (
        f"calibrated: {calibration.get('calibration_id')} for FPIR {calibration.get('target_fpir')} "
        f"({calibration.get('method')}, N={calibration.get('gallery_rows')}, FPIR 95% interval {interval})"
    )


class _GalleryCrops:
    """Gallery face crops cut on demand from the shards the images were ingested from (each shard read once)."""

    def __init__(self, settings: Settings, gallery: Gallery, table: str) -> None:
        self.gallery = gallery
        self.table = table
        self.limits = DecodeLimits(settings.max_image_bytes, settings.max_image_pixels, settings.allowed_formats)
        self.shards: dict[str, pa.Table | str] = {}  # shard key -> its rows, or why it cannot be read
        self.missing = 0

    def crop(self, row: dict[str, Any]) -> tuple[bytes | None, str | None]:
        crop, why = self._crop(row)
        self.missing += crop is None
        return crop, why

    def _crop(self, row: dict[str, Any]) -> tuple[bytes | None, str | None]:
        image_id = row.get("image_id")
        if not image_id:
            return None, "imported vector: there is no image to show"
        image = self.gallery.read("images", where=f"image_id IN {sql_list([image_id])}").to_pylist()
        if not image:
            return None, "the gallery image is no longer in the gallery"
        shard = self._shard(str(image[0]["shard_key"]))
        if isinstance(shard, str):
            return None, shard
        found = shard.filter(pc.equal(shard.column("image_id"), image_id))
        if found.num_rows == 0 or found.column("image")[0].as_py() is None:
            return None, "the image is not in its shard any more"
        decoded = decode_image(found.column("image")[0].as_py(), self.limits)
        if not isinstance(decoded, Decoded):
            return None, f"the image in its shard cannot be decoded ({decoded.reason.value})"
        box = self._box(row) if self.table == "faces" else None
        return _cut(decoded, box), None

    def _box(self, row: dict[str, Any]) -> list[float] | None:
        faces = self.gallery.read("faces", columns=["box"], where=f"face_id IN {sql_list([row['gallery_id']])}")
        boxes = faces.column("box").to_pylist() if faces.num_rows else []
        return boxes[0] if boxes else None

    def _shard(self, key: str) -> pa.Table | str:
        if key not in self.shards:
            self.shards[key] = self._read_shard(key)
        return self.shards[key]

    def _read_shard(self, key: str) -> pa.Table | str:
        ledger = self.gallery.read("ledger", columns=["shard_uri"], where=f"shard_key IN {sql_list([key])}")
        uris = sorted(set(ledger.column("shard_uri").to_pylist())) if ledger.num_rows else []
        if not uris:
            return f"no record of where shard {key[:16]}... was read from"
        why = ""
        for uri in uris:
            try:
                data = read_shard_bytes(uri)
            except GalleryMatchError as exc:
                why = f"shard {uri} is not readable ({str(exc)[:120]}): shards must stay where they were ingested from"
                continue
            if hashlib.sha256(data).hexdigest() != key:
                why = f"shard {uri} changed since it was ingested: no crop is cut from other bytes"
                continue
            return pq.read_table(io.BytesIO(data), columns=["image_id", "image"])
        return why


def _cut(decoded: Decoded, box: list[float] | None) -> bytes:
    img = decoded.image.convert("RGB")
    if box is not None and len(box) == 4:
        x1, y1, x2, y2 = box
        mx, my = (x2 - x1) * CROP_MARGIN, (y2 - y1) * CROP_MARGIN
        left, top = max(0, int(x1 - mx)), max(0, int(y1 - my))
        right, bottom = min(img.width, int(x2 + mx + 1)), min(img.height, int(y2 + my + 1))
        if right > left and bottom > top:
            img = img.crop((left, top, right, bottom))
    img.thumbnail((CROP_SIDE, CROP_SIDE))
    buffer = io.BytesIO()
    img.save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()

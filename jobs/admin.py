"""Smaller audited actions: register a source, pack a folder, close a watchlist, export a result set."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from jobs.session import writer_session
from lance_tables.sources import add_source, require_registered
from lance_tables.store import Gallery
from lance_tables.watchlists import close_watchlist
from pipelines.audit import AuditLog, digest, table_versions
from pipelines.errors import Refused
from pipelines.results import part_keys, require_run
from pipelines.settings import Settings
from pipelines.shards import PackReport, check_id, pack_folder, read_metadata_csv
from pipelines.storage import filesystem_for


def register_source(
    settings: Settings, source_id: str, channel: str, legal_basis: str, terms: str, registered_by: str | None
) -> dict[str, Any]:
    actor = check_id("registered-by id", registered_by) if registered_by is not None else settings.actor
    check_id("source id", source_id)
    with writer_session(settings, "sources.add") as log:
        gallery = Gallery(settings.storage)
        with log.action(actor, "sources.add", source_id=source_id, channel=channel) as op:
            row = add_source(gallery, source_id, channel, legal_basis, terms, registered_by)
            op.record(created=row["created"], table_versions=table_versions(gallery, ("sources",)))
    return row


def pack_images(
    settings: Settings,
    images_dir: Path,
    shards_dir: str | Path,
    source_id: str,
    rows_per_shard: int | None,
    metadata: Path | None,
    default_minor: bool | None,
) -> PackReport:
    """Pack under the lease (its shards are content-named, so a rerun writes the same files).

    `shards_dir` is a local folder or an s3:// URI (written with the AWS_* variables)."""
    with writer_session(settings, "pack") as log:
        require_registered(Gallery(settings.storage), {source_id})
        meta = read_metadata_csv(metadata) if metadata else None
        with log.action(settings.actor, "pack", source_id=source_id, default_minor=default_minor) as op:
            size = rows_per_shard or settings.rows_per_shard
            report = pack_folder(
                images_dir, shards_dir, source_id, size, settings.max_image_bytes, meta, default_minor=default_minor
            )
            counts = {"files": report.files, "distinct": report.distinct, "duplicates": report.duplicates}
            op.record(inputs_digest=digest(report.shards), counts=counts | {"shards": len(report.shards)})
    return report


def close(settings: Settings, watchlist_id: str, closed_by: str) -> dict[str, Any]:
    check_id("closed-by id", closed_by)
    with writer_session(settings, "watchlist.close") as log:
        gallery = Gallery(settings.storage)
        from lance_tables.watchlists import get_watchlist

        wl = get_watchlist(gallery, watchlist_id)
        fields = {"case_id": wl["case_id"], "purpose": wl["purpose"], "watchlist_id": watchlist_id}
        with log.action(closed_by, "watchlist.close", **fields) as op:
            record = close_watchlist(gallery, watchlist_id, closed_by)
            op.record(table_versions={"watchlists": gallery.version("watchlists")})
    return record


def export_run(settings: Settings, run_id: str, to: str | Path, requested_by: str) -> dict[str, Any]:
    """Copy one result set out of the home (never into it: that would double what the API reads).

    `to` is a local folder or an s3:// URI (reached with the same AWS_* variables as the home)."""
    check_id("requester id", requested_by)
    storage = settings.storage
    if storage.contains(to):
        raise Refused(f"--to {to} is inside GALLERYMATCH_HOME ({storage.uri}); export to a folder outside the home")
    fs, target_root = filesystem_for(to)
    manifest = require_run(settings.store, run_id)
    target = f"{target_root}/watchlist_id={manifest['watchlist_id']}/run_id={run_id}"
    fields = {
        "case_id": manifest["case_id"],
        "purpose": manifest.get("purpose"),
        "watchlist_id": manifest["watchlist_id"],
    }
    with AuditLog.of(settings).action(requested_by, "results.export", run_id=run_id, **fields) as op:
        fs.create_dir(target, recursive=True)
        for name in part_keys(manifest):
            _write(fs, f"{target}/{name.rsplit('/', 1)[-1]}", settings.store.read(name) or b"")
        body = {k: v for k, v in manifest.items() if k not in ("path", "manifest_key")}
        _write(fs, f"{target_root}/{run_id}.manifest.json", json.dumps(body, indent=2, default=str).encode())
        op.record(counts={"rows": manifest["rows"]})
    shown = f"s3://{target}" if str(to).startswith("s3://") else target
    return {"run_id": run_id, "path": shown, "rows": manifest["rows"]}


def _write(fs: Any, path: str, data: bytes) -> None:
    with fs.open_output_stream(path) as out:
        out.write(data)

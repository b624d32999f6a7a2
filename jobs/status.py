"""Read-only views of a home: `status` (tables, versions, the counts of the contract), `sources list`, `models`."""

from __future__ import annotations

from collections import Counter
from typing import Any

from jobs.erase import unfinished_erasures
from lance_tables.store import Gallery
from pipelines.audit import AuditLog
from pipelines.settings import Settings


def _counter(gallery: Gallery, table: str, column: str) -> dict[str, int]:
    data = gallery.read(table, columns=[column])
    if not data.num_columns:
        return {}
    return dict(sorted(Counter(data.column(column).to_pylist()).items()))


def gallery_status(settings: Settings) -> dict[str, Any]:
    gallery = Gallery(settings.storage)
    tables = {name: {"version": gallery.version(name), "rows": gallery.count(name)} for name in gallery.names()}
    reasons = _counter(gallery, "quarantine", "reason")
    return {
        "home": settings.home_uri,
        "tables": tables,
        "sources": gallery.count("sources"),
        "images": gallery.count("images"),
        "faces": gallery.count("faces"),
        "image_embeddings": gallery.count("image_embeddings"),
        "quarantined": sum(reasons.values()),
        "quarantine_reasons": reasons,
        "shards_done": len(set(_counter(gallery, "ledger", "shard_key"))),
        "face_models": _counter(gallery, "faces", "model_id"),
        "image_models": _counter(gallery, "image_embeddings", "model_id"),
        "actions_without_outcome": [i["seq"] for i, _ in AuditLog.of(settings).open_intents()],
        "erasures_unfinished": unfinished_erasures(settings.store),
    }


def sources(settings: Settings) -> list[dict[str, Any]]:
    """Registered sources, by id (`gallerymatch sources list`)."""
    from lance_tables.sources import list_sources

    return list_sources(Gallery(settings.storage))


def models(settings: Settings) -> dict[str, Any]:
    """Known model ids, widths, and whether their weights are here without a download (`gallerymatch models`)."""
    from pipelines.models import model_catalogue

    rows = model_catalogue(settings.resolved_models_dir, [settings.face_model, settings.image_model])
    return {"models_dir": str(settings.resolved_models_dir), "models": rows}

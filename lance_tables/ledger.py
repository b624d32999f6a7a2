"""The shard ledger and the per-shard commit: keyed upserts first, the ledger row last."""

from __future__ import annotations

import datetime as dt

import pyarrow as pa

from lance_tables.store import Gallery
from pipelines.embed import ShardOutput
from pipelines.schemas import LEDGER
from pipelines.task import IngestTask, ledger_key

COMMIT_ORDER = ("quarantine", "images", "faces", "image_embeddings")


def done_keys(gallery: Gallery) -> set[str]:
    table = gallery.read("ledger", columns=["ledger_key"])
    return set(table.column("ledger_key").to_pylist()) if table.num_columns else set()


def commit_shard(gallery: Gallery, output: ShardOutput, task: IngestTask) -> None:
    """Idempotent: a crash anywhere in here leaves the shard un-ledgered, and its rerun replaces the same keys."""
    for name in COMMIT_ORDER:
        if name not in output.tables:
            continue
        if name == "image_embeddings":
            gallery.ensure_image_embeddings(output.tables[name].schema.field("vector").type.list_size)
        gallery.upsert(name, output.tables[name], output.scopes.get(name))
    gallery.upsert("ledger", _ledger_rows(output, task))


def _ledger_rows(output: ShardOutput, task: IngestTask) -> pa.Table:
    item, stats, now = output.item, output.stats, dt.datetime.now(dt.UTC)
    stages = output.tables["quarantine"].column("stage").to_pylist()
    common = sum(1 for s in stages if s != "face")
    parts = []
    if item.do_face:
        parts.append((task.face_part(), stats["images_with_faces"], len(stages)))
    if item.do_image:
        parts.append((task.image_part(), stats["image_embeddings"], common))
    rows = [
        {
            "ledger_key": ledger_key(item.shard_key, part),
            "shard_key": item.shard_key,
            "shard_uri": item.shard_uri,
            "task": part,
            "images": stats["distinct_images"],
            "embedded": embedded,
            "quarantined": quarantined,
            "finished_at": now,
        }
        for part, embedded, quarantined in parts
    ]
    return pa.Table.from_pylist(rows, schema=LEDGER)

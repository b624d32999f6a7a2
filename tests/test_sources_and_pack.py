"""Registered sources with provenance, and Parquet image shards."""

from __future__ import annotations

from pathlib import Path

import pyarrow.parquet as pq
import pytest

from lance_tables.sources import add_source, list_sources, require_registered
from lance_tables.store import Gallery
from pipelines.errors import Refused
from pipelines.schemas import SHARD_SCHEMA
from pipelines.settings import Settings
from pipelines.shards import find_shards, pack_folder, read_metadata_csv
from pipelines.vocab import ACCEPTED_CHANNELS

MB = 1024 * 1024


@pytest.mark.parametrize("channel", ACCEPTED_CHANNELS)
def test_accepted_channels(settings: Settings, channel: str) -> None:
    gallery = Gallery(settings.storage)
    row = add_source(gallery, "src-1", channel, "basis", "terms", None)
    assert row["created"] and [s["source_id"] for s in list_sources(gallery)] == ["src-1"]


@pytest.mark.parametrize(
    ("channel", "why"),
    [
        ("web-scrape", "forbidden"),
        ("social-media", "forbidden"),
        ("bulk-cctv", "forbidden"),
        ("purchased-dataset", "not on the accepted list"),
        ("", "not on the accepted list"),
    ],
)
def test_refused_channels_store_nothing(settings: Settings, channel: str, why: str) -> None:
    gallery = Gallery(settings.storage)
    with pytest.raises(Refused, match=why):
        add_source(gallery, "src-1", channel, "basis", "terms", None)
    assert list_sources(gallery) == []


def test_provenance_is_required_and_immutable(settings: Settings) -> None:
    gallery = Gallery(settings.storage)
    with pytest.raises(Refused, match="legal basis"):
        add_source(gallery, "s", "operator-owned", "  ", "terms", None)
    with pytest.raises(Refused, match="not a valid id"):
        add_source(gallery, "bad id'; drop", "operator-owned", "b", "t", None)
    with pytest.raises(Refused, match="not a valid id"):
        add_source(gallery, "src-1\n", "operator-owned", "b", "t", None)  # re.match with $ accepted this
    add_source(gallery, "s", "operator-owned", "b", "t", None)
    assert not add_source(gallery, "s", "operator-owned", "b", "t", None)["created"]
    with pytest.raises(Refused, match="different provenance"):
        add_source(gallery, "s", "partner-transfer", "b", "t", None)
    with pytest.raises(Refused, match="unregistered source"):
        require_registered(gallery, {"s", "other"})


def test_pack_is_deterministic_and_counts_duplicates(sample_folder: Path, tmp_path: Path) -> None:
    (sample_folder / ".DS_Store").write_bytes(b"junk")
    try:
        first = pack_folder(sample_folder, tmp_path / "a", "archive", rows_per_shard=4, max_bytes=50 * MB)
        pack_folder(sample_folder, tmp_path / "b", "archive", rows_per_shard=4, max_bytes=50 * MB)
    finally:
        (sample_folder / ".DS_Store").unlink()
    files = sorted(p for p in sample_folder.rglob("*") if p.is_file() and p.name != ".DS_Store")
    assert first.files == len(files) and first.duplicates == 1 and first.distinct == len(files) - 1
    assert first.skipped_hidden == [".DS_Store"]
    shards_a, shards_b = find_shards(tmp_path / "a"), find_shards(tmp_path / "b")
    assert [p.name for p in shards_a] == [p.name for p in shards_b]
    assert all(a.read_bytes() == b.read_bytes() for a, b in zip(shards_a, shards_b, strict=True))
    assert all(p.parent.name == "source_id=archive" for p in shards_a)
    table = pq.read_table(shards_a[0])
    assert table.schema.equals(SHARD_SCHEMA)
    assert sum(pq.read_metadata(p).num_rows for p in shards_a) == first.distinct
    ids = [i for p in shards_a for i in pq.read_table(p, columns=["image_id"]).column(0).to_pylist()]
    assert len(ids) == len(set(ids))


def test_oversize_files_are_packed_as_errors_not_dropped(tmp_path: Path) -> None:
    folder = tmp_path / "imgs"
    folder.mkdir()
    (folder / "big.jpg").write_bytes(b"x" * 2000)
    (folder / "small.jpg").write_bytes(b"y" * 10)
    report = pack_folder(folder, tmp_path / "shards", "archive", rows_per_shard=10, max_bytes=1000)
    assert report.oversize == ["big.jpg"]
    rows = {r["uri"]: r for r in pq.read_table(find_shards(tmp_path / "shards")[0]).to_pylist()}
    assert rows["big.jpg"]["image"] is None and rows["big.jpg"]["pack_error"] == "TOO_LARGE_BYTES"
    assert rows["small.jpg"]["image"] == b"y" * 10


def test_metadata_csv(tmp_path: Path) -> None:
    csv_path = tmp_path / "meta.csv"
    csv_path.write_text("path,subject_id,minor,captured_at\na.jpg,subj-1,true,2024-05-01T10:00:00\n")
    meta = read_metadata_csv(csv_path)
    assert meta["a.jpg"].subject_id == "subj-1" and meta["a.jpg"].minor is True
    assert meta["a.jpg"].captured_at is not None and meta["a.jpg"].captured_at.tzinfo is not None
    csv_path.write_text("path,minor\na.jpg,maybe\n")
    with pytest.raises(Refused, match="minor must be true or false"):
        read_metadata_csv(csv_path)
    csv_path.write_text("path,subject_id\na.jpg,Jane Doe\n")
    with pytest.raises(Refused, match="subject id 'Jane Doe' is not a valid id"):
        read_metadata_csv(csv_path)

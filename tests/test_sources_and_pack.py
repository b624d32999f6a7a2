"""Registered sources with provenance, and Parquet image shards."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from lance_tables.sources import add_source, list_sources, require_registered
from lance_tables.store import Gallery
from pipelines.errors import Refused
from pipelines.schemas import SHARD_SCHEMA
from pipelines.settings import Settings
from pipelines.shards import (
    PACKED_NAME,
    PackReport,
    ShardProblem,
    find_shards,
    pack_folder,
    read_metadata_csv,
    read_shard,
    shard_key,
    shard_sources,
)
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
    shards_a = [Path(uri) for uri in find_shards(tmp_path / "a")]
    shards_b = [Path(uri) for uri in find_shards(tmp_path / "b")]
    assert [str(p) for p in shards_a] == sorted(first.shards) and all(p.is_absolute() for p in shards_a)
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


# ---------------------------------------------------------------- shard names, identity, partitions


def _shards(folder: Path, default_minor: bool | None = False, rows: int = 2) -> PackReport:
    return pack_folder(folder, folder.parent / "shards", "archive", rows, 50 * MB, default_minor=default_minor)


@pytest.fixture
def three_images(tmp_path: Path) -> Path:
    folder = tmp_path / "imgs"
    folder.mkdir()
    for name in ("a.jpg", "b.jpg", "c.jpg"):
        (folder / name).write_bytes(name.encode() * 10)
    return folder


def test_a_shard_is_named_by_its_images_and_its_content(three_images: Path, tmp_path: Path) -> None:
    report = _shards(three_images)
    assert len(report.shards) == 2
    for uri in report.shards:
        path = Path(uri)
        named = PACKED_NAME.fullmatch(path.name)
        assert named is not None and path.parent.name == "source_id=archive"
        ids = pq.read_table(path, columns=["image_id"]).column(0).to_pylist()
        assert named["images"] == hashlib.sha256("".join(ids).encode()).hexdigest()[:20]
        assert named["content"] == hashlib.sha256(path.read_bytes()).hexdigest() == shard_key(uri)
    copy = tmp_path / "elsewhere" / "any-name.parquet"  # moved and renamed: hashed, the same identity
    copy.parent.mkdir()
    copy.write_bytes(Path(report.shards[0]).read_bytes())
    assert shard_key(copy) == shard_key(report.shards[0])
    assert find_shards(copy) == [str(copy)] and shard_sources(copy) == {"archive"}  # read: no hive folder


def test_a_re_pack_replaces_the_earlier_shards_of_the_same_images(three_images: Path) -> None:
    unknown = _shards(three_images, default_minor=None)
    first = Path(unknown.shards[0])
    legacy = first.parent / f"shard-{PACKED_NAME.fullmatch(first.name)['images']}.parquet"  # type: ignore[index]
    legacy.write_bytes(first.read_bytes())  # what a pack before content names left
    stated = _shards(three_images, default_minor=False)
    assert set(stated.shards).isdisjoint(unknown.shards) and not stated.unchanged
    assert sorted(stated.replaced) == sorted([*unknown.shards, str(legacy)])
    assert find_shards(three_images.parent / "shards") == sorted(stated.shards)
    rows = [r for uri in stated.shards for r in pq.read_table(uri).to_pylist()]
    assert [r["minor"] for r in rows] == [False, False, False]
    assert _shards(three_images).shards == stated.shards  # the same rows again: the same files


def test_a_shard_under_one_source_folder_holding_another_sources_rows_is_bad(three_images: Path) -> None:
    uri = _shards(three_images, rows=3).shards[0]
    table = pq.read_table(uri)
    table = table.set_column(table.column_names.index("source_id"), "source_id", pa.array(["archive", "other", "x"]))
    pq.write_table(table, uri)
    assert shard_sources(uri) == {"archive"}  # planning takes the folder's source, without reading
    with pytest.raises(ShardProblem, match=r"2 other source id\(s\) \(e\.g\. 'other'\)") as caught:
        read_shard(uri)
    assert caught.value.reason == "BAD_SHARD"


def test_find_shards_refuses_what_is_not_there(tmp_path: Path) -> None:
    with pytest.raises(Refused, match="neither a shard file nor a folder of shards"):
        find_shards(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    assert find_shards(tmp_path / "empty") == []
    with pytest.raises(Refused, match="local path or an s3:// URI"):
        find_shards("gs://bucket/shards")

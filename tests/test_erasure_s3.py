"""Erasure on an S3 home (moto's server on loopback): versioned buckets keep deleted bytes as noncurrent versions,
so erase removes them (or refuses before removing anything), the byte scan reads every version, and a kill
anywhere, between the two passes of the version purge included, is finished by the rerun."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pytest
from conftest import make_settings
from test_erasure_crash import TARGET, World, assert_erased, build_world, clone, killed_at, stored

import jobs.erase
from jobs.erase import erase
from jobs.erase_steps import VERSIONED_AREAS, find_in_chunks, scan_for, scan_hits
from jobs.retention import run_retention
from lance_tables.erasure import delete_keys, kept_vector_bytes, purge, vector_patterns
from lance_tables.store import Gallery
from pipelines.errors import GalleryMatchError, Refused
from pipelines.s3store import ObjectVersion, S3Store
from pipelines.settings import Settings
from pipelines.storage import split_s3

REQUEST = "data subject request 41"


@pytest.fixture(scope="module")
def s3_world(moto_endpoint: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    """The crash tests' world, built once on an (unversioned) S3 home; every test works on a copy of it."""
    from s3 import aws_env, make_bucket

    env = aws_env(moto_endpoint)
    with pytest.MonkeyPatch.context() as patch:
        for name in ("AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_ENDPOINT_URL_S3", "AWS_SESSION_TOKEN"):
            patch.delenv(name, raising=False)
        for name, value in env.items():
            patch.setenv(name, value)
        root = tmp_path_factory.mktemp("s3-world")
        settings = make_settings(f"s3://{make_bucket(env)}/home", audit_key_dir=root / "audit-keys")
        yield build_world(root / "inputs", settings=settings)


def s3store(settings: Settings) -> S3Store:
    store = settings.store
    assert isinstance(store, S3Store)
    return store


def old_versions(settings: Settings, areas: tuple[str, ...] = VERSIONED_AREAS) -> list[ObjectVersion]:
    """The noncurrent versions and delete markers under `areas` of the home."""
    store = s3store(settings)
    return [v for a in areas for v in store.versions(a) if v.delete_marker or not v.is_latest]


def test_the_scan_finds_a_pattern_across_chunk_boundaries() -> None:
    """Large objects are read in chunks: a pattern split between two chunks is still found, at every split."""
    pattern = np.arange(8, dtype=np.float32).tobytes()
    data = b"x" * 100 + pattern + b"y" * 50
    for cut in range(100, 100 + len(pattern) + 1):
        assert find_in_chunks([data[:cut], data[cut:]], [b"absent-pattern", pattern]) == {1}, cut
    chunks = [data[i : i + 3] for i in range(0, len(data), 3)]  # chunks shorter than the pattern
    assert find_in_chunks(chunks, [pattern]) == {0}
    assert find_in_chunks([data[:120], data[120:]], [pattern[::-1]]) == set()  # and nothing is invented


def test_a_versioned_bucket_keeps_the_bytes_until_erase_removes_the_versions(
    s3_world: World, s3_env: dict[str, str], tmp_path: Path
) -> None:
    """Negative control first: an erase that leaves the noncurrent versions fails its byte scan, which finds the
    bytes only in old versions (of Lance files, a crashed writer's leftover, an overwritten copy), and old versions
    of the rewritten result sets still name the person. The rerun, under the default `purge-versions`, removes
    them and the receipt says so; current objects, and versions outside the areas, stay."""
    from s3 import client

    world = clone(s3_world, tmp_path, versioned=True)
    settings = world.settings
    patterns = vector_patterns(list(world.vectors))
    leftover = "lance/image_embeddings.lance/data/00ff-crashed-writer.lance"
    assert settings.store.create(leftover, b"junk" + patterns[1] + patterns[0])
    copy = "staging/export.bin"  # a copy of a vector, since overwritten: its old version holds the bytes
    assert settings.store.create(copy, b"an export" + patterns[0])
    bucket, prefix = split_s3(settings.home)
    client(s3_env).put_object(Bucket=bucket, Key=f"{prefix}/{copy}", Body=b"overwritten")
    assert scan_for(settings.storage, patterns)  # the bytes are there before the erasure
    with pytest.MonkeyPatch.context() as patch:  # an erasure that knows nothing of object versions
        patch.setattr(jobs.erase, "purge_versions", lambda *_: {"noncurrent_removed": 0, "delete_markers_removed": 0})
        with pytest.raises(GalleryMatchError, match="noncurrent object versions"):
            erase(settings, REQUEST, "dpo-1", subject_id=TARGET)
    journal = {k for k in settings.store.list("erasure/journal/") if k.endswith("/vectors.npz")}
    hits = scan_for(settings.storage, patterns, journal)
    assert hits and all("?versionId=" in h for h in hits), hits  # current objects are clean, old versions not
    assert {h.split("/", 1)[0] for h in hits} == {"lance", "staging"}  # Lance's files, the overwritten copy
    assert [k for k in stored(settings, "results") if "?versionId=" in k]  # the old rows naming them stay too
    assert any(h.startswith(leftover + "?") for h in hits)  # Lance's cleanup deleted it, its version stays
    assert scan_for(settings.storage, patterns, journal | {h.split("?")[0] for h in hits}) == []

    receipt = erase(settings, REQUEST, "dpo-1", subject_id=TARGET)  # the same plan, resumed
    versions = receipt["object_versions"]
    assert versions["versioning"] == "Enabled" and versions["policy"] == "purge-versions"
    assert versions["noncurrent_removed"] >= len(hits) and versions["delete_markers_removed"] > 0
    assert versions["areas"] == [f"{a}/" for a in VERSIONED_AREAS]
    assert_erased(world, receipt)
    assert old_versions(settings) == []  # no noncurrent version, no delete marker under the areas
    assert settings.store.read(copy) == b"overwritten"  # current objects stay: only old versions go
    assert old_versions(settings, ("locks",))  # the history of the lease and of the audit trail's open
    assert old_versions(settings, ("audit",))  # intents holds no biometrics: left alone


def test_the_refuse_policy_refuses_before_anything_is_removed(
    s3_world: World, s3_env: dict[str, str], tmp_path: Path
) -> None:
    """Versioning Suspended still keeps the old versions: with `refuse`, erase refuses, says how to proceed, and
    the bucket is exactly as it was (not one object or version written or removed, no row gone). Proceeding as
    the message says is the default policy, which the test above runs."""
    from s3 import client

    world = clone(s3_world, tmp_path, versioned=True)
    bucket, _ = split_s3(world.settings.home)
    client(s3_env).put_bucket_versioning(Bucket=bucket, VersioningConfiguration={"Status": "Suspended"})
    refusing = make_settings(
        world.settings.home, audit_key_dir=world.settings.audit_key_dir, erase_versioned_bucket="refuse"
    )
    store = s3store(refusing)
    before = sorted((v.key, v.version_id, v.is_latest, v.delete_marker) for v in store.versions(""))
    with pytest.raises(Refused) as refused:
        erase(refusing, REQUEST, "dpo-1", subject_id=TARGET)
    message = str(refused.value)
    assert "versioning Suspended" in message and "Nothing was removed" in message
    assert "GALLERYMATCH_ERASE_VERSIONED_BUCKET=purge-versions" in message
    assert sorted((v.key, v.version_id, v.is_latest, v.delete_marker) for v in store.versions("")) == before
    gallery = Gallery(refusing.storage)
    assert {n: gallery.count(n) for n in world.counts} == world.counts
    assert all(scan_for(refusing.storage, vector_patterns([v])) for v in world.vectors)
    assert not refusing.store.list("erasure/")  # no plan, no journal copy of the vectors


def test_a_killed_erase_on_s3_is_finished_by_its_rerun(s3_world: World, s3_env: dict[str, str], tmp_path: Path) -> None:
    """An unversioned bucket, with a crashed writer's leftover holding the vector: a real process (inheriting the
    AWS_* variables) killed once its plan is recorded; the rerun finishes it, and the receipt says no versioning."""
    world = clone(s3_world, tmp_path)
    settings = world.settings
    patterns = vector_patterns(list(world.vectors))
    leftover = "lance/image_embeddings.lance/data/00ff-crashed-writer.lance"
    assert settings.store.create(leftover, b"junk" + patterns[1] + patterns[0])
    hits = {h for h, _ in scan_hits(settings.storage, patterns, set())}
    assert leftover in hits and len({i // 2 for _, i in scan_hits(settings.storage, patterns, set())}) == 3
    killed_at(settings, "erase:after-plan")
    receipt = erase(settings, REQUEST, "dpo-1", subject_id=TARGET)
    assert receipt["object_versions"] == {"versioning": None}
    assert_erased(world, receipt)  # the scan finds none of them now
    assert settings.store.read(leftover) is None  # Lance's cleanup of unverified files reached the bucket


def test_an_erase_on_a_versioned_bucket_killed_twice_is_finished_by_the_next_writer(
    s3_world: World, s3_env: dict[str, str], tmp_path: Path
) -> None:
    """Killed between the two passes of the version purge (every old data version gone, the delete markers left:
    nothing deleted can come back), then its rerun killed after the receipt (the journal's copy of the vectors not
    yet dropped with its versions); nobody reruns the erase again: retention, the next writer, finishes it."""
    world = clone(s3_world, tmp_path, versioned=True)
    killed_at(world.settings, "versions:between-passes")
    left = old_versions(world.settings)
    assert left and all(v.delete_marker for v in left)
    killed_at(world.settings, "erase:after-receipt")
    assert [k for k in world.settings.store.list("erasure/journal/") if k.endswith("/vectors.npz")]
    run_retention(world.settings)
    assert_erased(world)
    assert old_versions(world.settings) == []


def test_lance_purge_on_s3_uses_the_homes_storage_options(
    s3_settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Compaction, index-free cleanup of unverified files and `to_lance()` scans reach the bucket with the
    options `Gallery(storage)` was given, not with the process environment: here the AWS_* variables point at a
    closed loopback port with wrong keys once the storage is built."""
    storage = s3_settings.storage
    assert storage.store.list("") == []
    gallery = Gallery(storage)
    vectors = np.random.default_rng(3).standard_normal((20, 8)).astype(np.float32)
    rows = pa.table({"key": [f"k{i}" for i in range(20)], "vector": pa.array(list(vectors), pa.list_(pa.float32(), 8))})
    gallery.db.create_table("t", rows)
    for i in range(3):  # more versions and fragments
        gallery.open("t").add(rows.slice(i, 1).set_column(0, "key", [[f"extra{i}"]]))
    leftover = "lance/t.lance/data/00ff-crashed-writer.lance"
    storage.store.create(leftover, b"junk" + vectors[4].tobytes())
    with socket.socket() as probe:  # a loopback port nobody listens on
        probe.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{probe.getsockname()[1]}"
    monkeypatch.setenv("AWS_ENDPOINT_URL", dead)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "wrong")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong")
    delete_keys(gallery, "t", "key", ["k4"])
    done: dict[str, Any] = purge(gallery, "t")
    assert done["versions_left"] == 1 and done["old_versions_removed"] >= 4
    assert kept_vector_bytes(gallery, ("t",), {vectors[4].tobytes(), vectors[5].tobytes()}) == {vectors[5].tobytes()}
    assert storage.store.read(leftover) is None  # delete_unverified reached the bucket
    assert scan_for(storage, [vectors[4].tobytes()]) == []
    assert scan_for(storage, [vectors[5].tobytes()])  # the scan itself still sees the bucket

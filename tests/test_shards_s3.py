"""Image shards on S3 (moto's server on loopback): pack writes s3:// shards, ingest plans them from one listing
without reading them, and its workers (in-process or Ray) read them from their URIs, into a local or S3 home."""

from __future__ import annotations

import os
import shutil
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from conftest import FACE, IMAGE, make_settings, register
from helpers import assert_same_rows, assert_unique_keys, snapshot
from s3 import client, make_bucket

from jobs.admin import pack_images
from jobs.ingest import plan, run_ingest
from pipelines.prepare import PrepareStage
from pipelines.settings import Settings
from pipelines.shards import (
    PACKED_NAME,
    ShardProblem,
    ShardUnreadable,
    find_shards,
    pack_folder,
    read_shard,
    shard_sources,
)
from pipelines.task import IngestTask, WorkItem

MB = 1024 * 1024
# A face, a second face, no face, a truncated file, an awkward encoding: 5 images, 3 shards of 2.
PICK = ("people/astronaut.jpg", "people/camera.png", "scenes/coffee.jpg", "bad/truncated.jpg", "awkward/grey.png")


def ingest(settings: Settings, shards: str | Path, **kwargs: object) -> dict:
    options: dict[str, object] = {"face_model": FACE, "image_model": IMAGE, "progress": False} | kwargs
    return run_ingest(settings, shards, **options)  # type: ignore[arg-type]


def pack(folder: Path, target: str | Path, **kwargs: Any) -> Any:
    options = {"rows_per_shard": 2, "max_bytes": 50 * MB, "default_minor": False} | kwargs
    return pack_folder(folder, target, "archive", **options)


def objects(env: dict[str, str], uri: str) -> dict[str, bytes]:
    """Every object under an s3:// prefix: key relative to it -> body."""
    bucket, prefix = uri.removeprefix("s3://").split("/", 1)
    s3 = client(env)
    listed = s3.list_objects_v2(Bucket=bucket, Prefix=prefix + "/").get("Contents", [])
    return {o["Key"][len(prefix) + 1 :]: s3.get_object(Bucket=bucket, Key=o["Key"])["Body"].read() for o in listed}


def comparable(settings: Settings) -> dict[str, list[dict[str, Any]]]:
    """The gallery's rows; the ledger's shard_uri (where the shard was read from) left out."""
    rows = snapshot(settings)
    rows["ledger"] = [{k: v for k, v in r.items() if k != "shard_uri"} for r in rows["ledger"]]
    return rows


@pytest.fixture(scope="module")
def small_folder(sample_folder: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("small") / "images"
    for rel in PICK:
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(sample_folder / rel, folder / rel)
    return folder


@pytest.fixture(scope="module")
def local_shards(small_folder: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("small-shards")
    pack(small_folder, out)
    return out


@pytest.fixture(scope="module")
def reference(local_shards: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Settings, dict]:
    """Local shards into a local home on the local engine: what every other run must equal."""
    settings = make_settings(tmp_path_factory.mktemp("ref") / "home")
    register(settings)
    return settings, ingest(settings, local_shards, engine="local")


@pytest.fixture
def s3_shards(s3_env: dict[str, str], small_folder: Path) -> str:
    uri = f"s3://{make_bucket(s3_env)}/shards"
    pack(small_folder, uri)
    return uri


# ---------------------------------------------------------------- pack


def test_pack_to_s3_writes_the_local_shards_byte_for_byte(
    s3_env: dict[str, str], small_folder: Path, local_shards: Path
) -> None:
    uri = f"s3://{make_bucket(s3_env)}/shards"
    report = pack(small_folder, uri)
    local = {p.relative_to(local_shards).as_posix(): p.read_bytes() for p in local_shards.rglob("*.parquet")}
    assert objects(s3_env, uri) == local and len(local) == 3
    assert sorted(report.shards) == find_shards(uri) == [f"{uri}/{rel}" for rel in sorted(local)]
    assert all(rel.startswith("source_id=archive/") for rel in local)
    again = pack(small_folder, uri)  # content-named: what is there already is not written again
    assert again.shards == report.shards and again.unchanged == report.shards and not again.replaced
    # re-packed with other metadata: new content names, and the earlier shards of the same images go
    fixed = pack(small_folder, uri, default_minor=True)
    assert sorted(fixed.replaced) == sorted(report.shards) and not fixed.unchanged
    assert find_shards(uri) == sorted(fixed.shards) and set(fixed.shards).isdisjoint(report.shards)


@pytest.mark.parametrize("home", ["local", "s3"])
def test_pack_images_passes_an_s3_target_through(
    home: str, s3_env: dict[str, str], small_folder: Path, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    settings = make_settings(tmp_path / "home") if home == "local" else request.getfixturevalue("s3_settings")
    register(settings)
    uri = f"s3://{make_bucket(s3_env)}/incoming/shards"
    report = pack_images(settings, small_folder, uri, "archive", 2, None, False)
    assert report.distinct == len(PICK) and len(report.shards) == 3
    assert find_shards(uri) == sorted(report.shards)
    assert all(shard.startswith(f"{uri}/source_id=archive/") for shard in report.shards)


# ---------------------------------------------------------------- planning reads no shard


def test_planning_an_s3_folder_lists_once_and_reads_no_shard(
    s3_env: dict[str, str], s3_shards: str, settings: Settings
) -> None:
    """One LIST, no GET of any shard: a shard whose body is garbage is still planned, by its name."""
    from moto.s3.models import S3Backend

    bucket = s3_shards.removeprefix("s3://").split("/", 1)[0]
    first = find_shards(s3_shards)[0]
    client(s3_env).put_object(Bucket=bucket, Key=first.removeprefix(f"s3://{bucket}/"), Body=b"PAR1 garbage")
    calls: Counter[str] = Counter()  # requests on the shards' bucket, as moto's backend serves them
    get_object, list_objects_v2 = S3Backend.get_object, S3Backend.list_objects_v2

    def get(self: Any, bucket_name: str, key_name: str, *args: Any, **kwargs: Any) -> Any:
        calls[f"get {key_name}"] += bucket_name == bucket
        return get_object(self, bucket_name, key_name, *args, **kwargs)

    def listing(self: Any, bucket: Any, **kwargs: Any) -> Any:
        calls["list"] += bucket.name == shards_bucket
        return list_objects_v2(self, bucket=bucket, **kwargs)

    shards_bucket = bucket
    task = IngestTask.from_settings(settings, "all", FACE, IMAGE)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(S3Backend, "get_object", get)
        patch.setattr(S3Backend, "list_objects_v2", listing)
        uris = find_shards(s3_shards)
        items, skipped = plan(task, uris, set())
        sources = set().union(*(shard_sources(uri) for uri in uris))
    shard_reads = {call: n for call, n in calls.items() if call.startswith("get ") and call.endswith(".parquet")}
    assert shard_reads == {} and calls["list"] == 1, calls
    assert len(uris) == 3 and uris[0] == first and skipped == 0 and sources == {"archive"}
    assert [i.shard_key for i in items] == [PACKED_NAME.fullmatch(u.rsplit("/", 1)[1])["content"] for u in uris]  # type: ignore[index]
    # the worker that reads it checks the bytes against that identity: the garbage is a bad shard
    with pytest.raises(ShardProblem, match="do not match its identity") as caught:
        read_shard(items[0].shard_uri, expected_key=items[0].shard_key)
    assert caught.value.reason == "BAD_SHARD"
    assert read_shard(items[1].shard_uri, expected_key=items[1].shard_key).num_rows == 2


def test_a_shard_storage_will_not_give_stops_the_run_and_is_not_quarantined(s3_shards: str, settings: Settings) -> None:
    """Missing object, no credentials: ShardUnreadable out of the worker (a rerun retries it), never a
    BAD_SHARD quarantine row that would ledger the shard as done."""
    uri = find_shards(s3_shards)[0]
    key = PACKED_NAME.fullmatch(uri.rsplit("/", 1)[1])["content"]  # type: ignore[index]
    stage = PrepareStage(IngestTask.from_settings(settings, "image", FACE, IMAGE))
    missing = WorkItem(uri.replace("/shards/", "/elsewhere/"), key, False, True)
    with pytest.raises(ShardUnreadable, match="cannot read shard s3://"):
        stage.process(missing)
    with pytest.MonkeyPatch.context() as patch, pytest.raises(ShardUnreadable, match="needs credentials"):
        patch.delenv("AWS_SECRET_ACCESS_KEY")
        stage.process(WorkItem(uri, key, False, True))
    assert stage.process(WorkItem(uri, key, False, True)).quarantine == []  # an image with no face is fine here


# ---------------------------------------------------------------- ingest from s3:// shards


def _ray_with_this_environment(env: dict[str, str]) -> None:
    """Ray workers read shards with the AWS_* variables Ray was started with: restart a Ray that an earlier
    test started before these variables were set (a real driver has them from the start)."""
    import ray

    if not ray.is_initialized():
        return

    @ray.remote(num_cpus=0)
    def endpoint() -> str | None:
        return os.environ.get("AWS_ENDPOINT_URL")

    if ray.get(endpoint.remote()) != env["AWS_ENDPOINT_URL"]:
        ray.shutdown()


@pytest.mark.slow
@pytest.mark.parametrize(
    ("home", "engine"),
    [("local", "local"), ("s3", "local"), ("s3", "ray")],  # Ray's workers read s3:// shards, the driver commits
)
def test_ingest_from_s3_shards_equals_the_local_run(
    home: str,
    engine: str,
    s3_env: dict[str, str],
    s3_shards: str,
    reference: tuple[Settings, dict],
    tmp_path: Path,
    request: pytest.FixtureRequest,
) -> None:
    """s3:// shards into a local or an S3 home, on the local or the Ray engine: the rows of the local run
    (local shards, local home, local engine), shard URIs aside."""
    settings = make_settings(tmp_path / "home") if home == "local" else request.getfixturevalue("s3_settings")
    ref_settings, ref_summary = reference
    register(settings)
    if engine == "ray":
        _ray_with_this_environment(s3_env)
    summary = ingest(settings, s3_shards, engine=engine)
    counts = ("shards", "shards_processed", "images", "faces", "image_embeddings", "quarantined", "quarantine_reasons")
    assert {k: summary[k] for k in counts} == {k: ref_summary[k] for k in counts}
    assert summary["engine"] == engine and summary["shards"] == 3 and summary["faces"] == 3
    assert_unique_keys(settings)
    assert_same_rows(comparable(settings), comparable(ref_settings))
    ledger = snapshot(settings)["ledger"]
    assert {r["shard_uri"] for r in ledger} == set(find_shards(s3_shards))
    again = ingest(settings, s3_shards, engine="local")
    assert again["shards_processed"] == 0 and again["shards_skipped"] == 3

"""The storage seam on S3: only the AWS_* variables reach a store, errors are one line, listings are not per object,
and a data team reads result sets from the bucket with Polars as they would from a folder."""

from __future__ import annotations

import os
import re
import socket
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pytest
from conftest import register
from s3 import client
from test_audit import Requests
from test_match import DIM, sign_vectors, watch, write_embeddings

from jobs.api import results
from jobs.import_embeddings import run_import
from jobs.match import run_match
from pipelines import storage as storage_module
from pipelines.errors import Refused
from pipelines.results import find_run, list_runs, load_run, write_result_set
from pipelines.s3store import S3Error, S3Store
from pipelines.schemas import RESULT_SCHEMA
from pipelines.settings import Settings
from pipelines.storage import S3Config, Storage

KEYS = {"AWS_ACCESS_KEY_ID": "AKIAFAKE", "AWS_SECRET_ACCESS_KEY": "fake-secret"}


def pyarrow_endpoint(fs: Any) -> tuple[str, str]:
    """(endpoint_override, scheme) of a pyarrow S3FileSystem, read from what it pickles (no request sent)."""
    kwargs = fs.__reduce__()[1][0]
    return kwargs["endpoint_override"], kwargs["scheme"]


# -- reaching a store: the AWS_* variables, and nothing else ------------------------------------------------------


def test_without_an_endpoint_only_aws_over_https_is_used(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Fake keys and no AWS_ENDPOINT_URL: every client aims at AWS over https; nothing falls back to a local
    server or folder, not even one a profile's config file names. No request is sent."""
    config_file = tmp_path / "aws-config"
    config_file.write_text(
        "[default]\nendpoint_url = http://127.0.0.1:9\n[profile other]\nendpoint_url = http://127.0.0.1:9\n"
    )
    for name in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_REGION", "AWS_DEFAULT_REGION", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(config_file))
    monkeypatch.setenv("AWS_PROFILE", "other")
    config = S3Config.from_env(KEYS)
    assert config.endpoint is None and not config.allow_http and config.region == "us-east-1"
    assert "aws_endpoint" not in config.lance_options() and "allow_http" not in config.lance_options()
    assert "aws_endpoint_url" not in config.polars_options() and "aws_allow_http" not in config.polars_options()
    endpoint = config.client().meta.endpoint_url
    assert endpoint.startswith("https://") and endpoint.endswith(".amazonaws.com"), endpoint
    assert pyarrow_endpoint(config.filesystem()) == ("", "https")
    home = Storage.at("s3://some-bucket/home", KEYS)
    assert home.is_s3 and home.uri == "s3://some-bucket/home" and home.polars_options == config.polars_options()
    assert not home.contains(tmp_path) and home.store.location("a/b") == "s3://some-bucket/home/a/b"
    assert "fake-secret" not in repr(config) and "fake-secret" not in repr(home)


def test_an_endpoint_is_used_exactly_as_set() -> None:
    """What tests/test_storage.py checks of the options, here of the clients themselves (no request is sent)."""
    local = S3Config.from_env(KEYS | {"AWS_ENDPOINT_URL": "http://127.0.0.1:9/ignored/path"})
    assert local.client().meta.endpoint_url == "http://127.0.0.1:9"
    assert pyarrow_endpoint(local.filesystem()) == ("127.0.0.1:9", "http")
    assert local.lance_options()["aws_endpoint"] == local.polars_options()["aws_endpoint_url"] == "http://127.0.0.1:9"
    tls = S3Config.from_env(KEYS | {"AWS_ENDPOINT_URL": "https://minio.example:9000"})
    assert tls.client().meta.endpoint_url == "https://minio.example:9000"
    assert pyarrow_endpoint(tls.filesystem()) == ("minio.example:9000", "https")
    only_s3 = S3Config.from_env(KEYS | {"AWS_ENDPOINT_URL": "https://a:1", "AWS_ENDPOINT_URL_S3": "https://b:2"})
    assert only_s3.endpoint == "https://b:2"  # the S3-specific variable wins, as in the AWS tools


@pytest.mark.parametrize(
    ("environ", "message"),
    [
        ({"AWS_ACCESS_KEY_ID": "AKIAFAKE"}, "AWS_SECRET_ACCESS_KEY"),
        (KEYS | {"AWS_ENDPOINT_URL": "127.0.0.1:9"}, "AWS_ENDPOINT_URL must be an http"),
    ],
)
def test_half_the_keys_or_an_endpoint_without_scheme_are_refused(environ: dict[str, str], message: str) -> None:
    with pytest.raises(Refused, match=message):
        Storage.at("s3://some-bucket/home", environ)


# -- the store --------------------------------------------------------------------------------------------------


def test_the_s3_store_keeps_the_object_store_contract(s3_settings: Settings) -> None:
    store = s3_settings.store
    assert isinstance(store, S3Store)
    assert store.create("a/b/one.json", b"1") and not store.create("a/b/one.json", b"other")  # created if absent
    assert store.read("a/b/one.json") == b"1" and store.read("a/b/none.json") is None
    assert store.create("a/c/two.json", b"2") and store.create("a/three.json", b"3")
    assert store.list("a/") == ["a/b/one.json", "a/c/two.json", "a/three.json"] and store.folders("a") == ["b", "c"]
    assert store.list("a/b/") == ["a/b/one.json"] and store.list("nothing/") == [] and store.folders("zz") == []
    store.delete("a/b/one.json")
    store.delete("a/b/one.json")  # absent keys are fine
    store.delete_many(["a/c/two.json", "a/three.json", "a/never.json"])
    assert store.list("") == []
    with pytest.raises(ValueError, match="not a valid object key"):
        store.create("a/../b", b"x")
    raw = client(dict(os.environ))
    key = f"{store.prefix}/results/watchlist_id=w/run_id=r/part-g0001-00000.parquet"
    raw.create_multipart_upload(Bucket=store.bucket, Key=key)  # a writer killed inside a multipart upload
    assert store.drop_incomplete("results/") == 1 and store.drop_incomplete("results/") == 0
    assert not raw.list_multipart_uploads(Bucket=store.bucket).get("Uploads")


def test_an_unreachable_or_missing_bucket_is_one_clear_error(
    s3_settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    missing = S3Store(s3_settings.storage.s3, "gm-no-such-bucket", "home")  # type: ignore[arg-type]
    with pytest.raises(
        S3Error, match=r"could not list s3://gm-no-such-bucket/home at http://127\.0\.0\.1:[0-9]+: NoSuchBucket"
    ):
        missing.list("results/")
    with socket.socket() as probe:  # a loopback port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    config = S3Config.from_env(dict(os.environ) | {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}"})
    import boto3
    from botocore.config import Config

    impatient = boto3.client(  # as the product's client, without its retries (they only make this test slow)
        "s3",
        endpoint_url=config.endpoint,
        aws_access_key_id=config.access_key,
        aws_secret_access_key=config.secret_key,
        region_name=config.region,
        config=Config(retries={"max_attempts": 1}, connect_timeout=2),
    )
    monkeypatch.setitem(storage_module._CLIENTS, config, impatient)
    gone = S3Store(config, "bucket", "home")
    for call in (
        lambda: gone.read("k"),
        lambda: gone.create("k", b"x"),
        lambda: gone.list(""),
        lambda: gone.delete("k"),
    ):
        with pytest.raises(S3Error, match=re.escape(f"http://127.0.0.1:{port} is unreachable")):
            call()


def test_finding_one_run_reads_one_manifest(s3_settings: Settings) -> None:
    """`results show`, `review` and export find their run by its key, not by reading every run's manifest."""
    store = s3_settings.store
    empty = RESULT_SCHEMA.empty_table()
    for i in range(6):
        meta = {"run_id": f"run-{i}", "watchlist_id": "wl-1", "case_id": "C", "matched_at": f"2026-01-0{i + 1}"}
        write_result_set(store, "wl-1", f"run-{i}", empty, meta | {"candidates": 0})
    with Requests(s3_settings) as sent:
        found = find_run(store, "run-3")
    assert found is not None and found["run_id"] == "run-3" and found["matched_at"] == "2026-01-04"
    assert sent.of("GetObject") == 1 and sent.of("ListObjectsV2") == 1, sent.sent
    with Requests(s3_settings) as sent:
        assert find_run(store, "run-9") is None
    assert sent.sent == ["ListObjectsV2"]
    assert [m["run_id"] for m in list_runs(store)] == [f"run-{i}" for i in reversed(range(6))]  # newest first
    assert load_run(store, "run-0").num_rows == 0


# -- Polars reads result sets where they lie ---------------------------------------------------------------------


def test_polars_reads_result_sets_from_any_home(any_settings: Settings, tmp_path: Path) -> None:
    """Through the API (committed runs, reviews joined), and with a plain `pl.scan_parquet` over the home's
    results, hive-partitioned, with the storage options the README gives a data team."""
    import polars as pl

    settings = any_settings
    register(settings)
    vecs = sign_vectors(20, 3)
    gallery = write_embeddings(tmp_path / "g.parquet", [f"r{i}" for i in range(20)], vecs)
    run_import(settings, gallery, "archive", "model-a", "image", DIM)
    run = run_match(settings, watch(settings, tmp_path, vecs[:3], top_k=4))
    expected = load_run(settings.store, run["run_id"])
    assert expected.num_rows == 3 * 4
    key = ["probe_id", "rank", "gallery_id"]

    def rows(frame: pl.DataFrame) -> list[tuple[Any, ...]]:
        return sorted(frame.select(key).iter_rows())

    api = results(settings.home_uri).collect()
    assert rows(api) == rows(pl.from_arrow(expected.select(key)))  # type: ignore[arg-type]
    assert set(api["run_id"]) == {run["run_id"]} and set(api["watchlist_id"]) == {run["watchlist_id"]}
    if settings.storage.is_s3:
        options = {
            "aws_access_key_id": os.environ["AWS_ACCESS_KEY_ID"],
            "aws_secret_access_key": os.environ["AWS_SECRET_ACCESS_KEY"],
            "aws_region": os.environ["AWS_REGION"],
            "aws_endpoint_url": os.environ["AWS_ENDPOINT_URL"],  # only for an S3-compatible store
            "aws_allow_http": "true",  # only for a plain-http endpoint such as this test's
        }
        assert options == S3Config.from_env().polars_options()  # what the README documents is what the code hands out
        plain = pl.scan_parquet(
            f"{settings.home_uri}/results/**/*.parquet", hive_partitioning=True, storage_options=options
        )
    else:
        plain = pl.scan_parquet(f"{settings.home_uri}/results/**/*.parquet", hive_partitioning=True)
    frame = plain.filter(pl.col("above_threshold") | ~pl.col("above_threshold")).collect()
    assert rows(frame) == rows(api) and set(frame["run_id"]) == {run["run_id"]}
    assert frame.schema["score"] == pl.Float32 and frame.schema["rank"] == pl.Int32
    by_probe = frame.group_by("probe_id").agg(pl.len()).sort("probe_id")
    assert by_probe.rows() == [(f"p{i}", 4) for i in range(3)]
    assert np.isclose(frame["score"].max(), 1.0, atol=1e-6)  # the probes are gallery vectors: a perfect match


def test_an_empty_s3_home_reads_as_an_empty_frame(s3_settings: Settings) -> None:
    frame = results(s3_settings.home_uri).collect()
    assert frame.height == 0 and set(RESULT_SCHEMA.names) <= set(frame.columns)
    assert isinstance(pa.table(frame.to_arrow()), pa.Table)

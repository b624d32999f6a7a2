"""The storage seam: what a home location means, and where S3 settings may (and may not) come from."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipelines.errors import Refused
from pipelines.storage import S3Config, Storage, filesystem_for

CREDS = {"AWS_ACCESS_KEY_ID": "id", "AWS_SECRET_ACCESS_KEY": "secret"}


def test_a_local_home_is_an_absolute_folder(tmp_path: Path) -> None:
    storage = Storage.at(tmp_path / "home" / ".." / "home")
    assert storage.uri == str(tmp_path / "home") and not storage.is_s3
    assert storage.lance_uri == str(tmp_path / "home" / "lance") and storage.lance_options == {}
    assert storage.contains(tmp_path / "home" / "results") and not storage.contains(tmp_path / "elsewhere")
    assert not storage.contains("s3://bucket/home")


def test_an_s3_home_is_bucket_and_prefix() -> None:
    storage = Storage.at("s3://my-bucket/gallery/home/", CREDS)
    assert storage.uri == "s3://my-bucket/gallery/home" and storage.is_s3
    assert storage.lance_uri == "s3://my-bucket/gallery/home/lance"
    assert storage.fs_path("results/x.parquet") == "my-bucket/gallery/home/results/x.parquet"
    assert storage.contains("s3://my-bucket/gallery/home/exports") and not storage.contains("s3://my-bucket/gallery")
    assert not storage.contains("s3://my-bucket/gallery/homework")  # a sibling prefix is not inside
    with pytest.raises(Refused, match="not a local folder"):
        _ = storage.local_root


@pytest.mark.parametrize(
    "location", ["s3://ab/home", "s3://bucket/a/../b", "gs://bucket/home", "s3://bucket/home?x=1", "http://h/x"]
)
def test_unusable_locations_are_refused(location: str) -> None:
    with pytest.raises(Refused):
        Storage.at(location, CREDS)


def test_s3_without_credentials_is_refused_with_what_to_set() -> None:
    with pytest.raises(Refused, match="AWS_ACCESS_KEY_ID"):
        Storage.at("s3://bucket/home", {})
    with pytest.raises(Refused, match="AWS_ACCESS_KEY_ID"):
        filesystem_for("s3://bucket/shards", {"AWS_SECRET_ACCESS_KEY": "x"})


def test_plain_http_only_towards_an_endpoint_the_user_set() -> None:
    default = S3Config.from_env(CREDS)
    assert default.endpoint is None and not default.allow_http
    assert "allow_http" not in default.lance_options() and "aws_allow_http" not in default.polars_options()
    local = S3Config.from_env(CREDS | {"AWS_ENDPOINT_URL": "http://127.0.0.1:9000/", "AWS_REGION": "eu-west-1"})
    assert local.endpoint == "http://127.0.0.1:9000" and local.allow_http and local.region == "eu-west-1"
    assert local.lance_options()["allow_http"] == "true" and local.polars_options()["aws_allow_http"] == "true"
    secure = S3Config.from_env(CREDS | {"AWS_ENDPOINT_URL": "https://minio.internal"})
    assert not secure.allow_http
    with pytest.raises(Refused, match="AWS_ENDPOINT_URL"):
        S3Config.from_env(CREDS | {"AWS_ENDPOINT_URL": "ftp://host"})


def test_secrets_never_print() -> None:
    config = S3Config.from_env(CREDS | {"AWS_SECRET_ACCESS_KEY": "very-secret-value"})
    assert "very-secret-value" not in repr(config) and "very-secret-value" not in repr(Storage("s3://b/h", config))


def test_aws_config_files_and_profiles_are_not_read(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    aws = tmp_path / ".aws"
    aws.mkdir()
    (aws / "config").write_text("[default]\nregion = eu-west-9\nendpoint_url = http://10.9.9.9:1\n")
    (aws / "credentials").write_text("[default]\naws_access_key_id = FROMFILE\naws_secret_access_key = x\n")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(aws / "config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(aws / "credentials"))
    client = S3Config.from_env(CREDS).client()
    assert client.meta.region_name == "us-east-1"
    assert "10.9.9.9" not in client.meta.endpoint_url
    assert client._request_signer._credentials.access_key == "id"

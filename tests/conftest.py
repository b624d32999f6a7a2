"""Shared fixtures: every test makes its own data under tmp paths; models are the labelled untrained ids."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")

from lance_tables.sources import add_source
from lance_tables.store import Gallery
from pipelines.settings import Settings
from pipelines.shards import pack_folder

FACE = "facenet-untrained"
IMAGE = "clip-untrained"


def make_settings(home: Path | str, **overrides: object) -> Settings:
    """Settings for a home (a folder, or an s3:// URI with `audit_key_dir` given: the key stays local)."""
    if not str(home).startswith("s3://"):
        home = Path(home)
    values: dict[str, object] = {"home": str(home)}
    if isinstance(home, Path):  # the signing key lives outside the home it protects
        values["audit_key_dir"] = home.parent / f"{home.name}-audit-keys"
    values |= {
        "model_downloads": False,
        "ray_num_cpus": 2,
    } | overrides
    return Settings(**values)  # type: ignore[arg-type]


def register(settings: Settings, source_id: str = "archive") -> None:
    add_source(Gallery(settings.storage), source_id, "operator-owned", "test basis", "test terms", "tester")


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return make_settings(tmp_path / "home")


@pytest.fixture(scope="session")
def moto_endpoint() -> Iterator[str]:
    """A real S3 API (moto's server) on loopback for the whole session; nothing leaves 127.0.0.1."""
    from s3 import start_moto

    server, endpoint = start_moto()
    yield endpoint
    server.stop()


@pytest.fixture
def s3_env(moto_endpoint: str, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """The standard AWS variables pointing at the loopback server (children of the test inherit them)."""
    from s3 import aws_env

    env = aws_env(moto_endpoint)
    for name in ("AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_ENDPOINT_URL_S3", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return env


@pytest.fixture
def s3_settings(s3_env: dict[str, str], tmp_path: Path) -> Settings:
    """A fresh home on its own bucket of the loopback S3 server."""
    from s3 import make_bucket

    return make_settings(f"s3://{make_bucket(s3_env)}/home", audit_key_dir=tmp_path / "audit-keys")


@pytest.fixture(params=["local", "s3"])
def any_settings(request: pytest.FixtureRequest, tmp_path: Path) -> Settings:
    """The same scenario on a local home and on an S3 home."""
    if request.param == "local":
        return make_settings(tmp_path / "home")
    return request.getfixturevalue("s3_settings")  # type: ignore[no-any-return]


@pytest.fixture(scope="session")
def sample_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from pipelines.samples import write_sample_gallery

    folder = tmp_path_factory.mktemp("sample") / "images"
    write_sample_gallery(folder)
    return folder


@pytest.fixture(scope="session")
def sample_shards(sample_folder: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    shards = tmp_path_factory.mktemp("shards")
    pack_folder(sample_folder, shards, "archive", rows_per_shard=5, max_bytes=50 * 1024 * 1024, default_minor=False)
    return shards

"""Shared fixtures: every test makes its own data under tmp paths; models are the labelled untrained ids."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")

from lance_tables.sources import add_source
from lance_tables.store import Gallery
from pipelines.settings import Settings
from pipelines.shards import pack_folder

FACE = "facenet-untrained"
IMAGE = "clip-untrained"


def make_settings(home: Path, **overrides: object) -> Settings:
    keys = home.parent / f"{home.name}-audit-keys"  # the signing key lives outside the home it protects
    values: dict[str, object] = {
        "home": home,
        "model_downloads": False,
        "ray_num_cpus": 2,
        "audit_key_dir": keys,
    } | overrides
    return Settings(**values)  # type: ignore[arg-type]


def register(settings: Settings, source_id: str = "archive") -> None:
    add_source(Gallery(settings.lance_dir), source_id, "operator-owned", "test basis", "test terms", "tester")


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return make_settings(tmp_path / "home")


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

"""Bring-your-own embeddings: per-row validation, quarantine with reasons, refusals that store nothing."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import register
from helpers import table_rows

from jobs.import_embeddings import run_import
from lance_tables.store import Gallery
from pipelines.errors import Refused
from pipelines.settings import Settings


def unit(seed: int, dim: int = 512) -> list[float]:
    vec = np.random.default_rng(seed).standard_normal(dim)
    return list(vec / np.linalg.norm(vec))


def write(path: Path, rows: list[dict], embedding_type: pa.DataType | None = None) -> Path:
    """The contract's columns; every row declares its minor flag (not a minor unless the row says so)."""
    schema = pa.schema(
        [
            ("record_id", pa.string()),
            ("embedding", embedding_type or pa.list_(pa.float32())),
            ("subject_id", pa.string()),
            ("minor", pa.bool_()),
        ]
    )
    pq.write_table(pa.Table.from_pylist([{"minor": False} | row for row in rows], schema=schema), path)
    return path


def test_rows_are_validated_one_by_one(settings: Settings, tmp_path: Path) -> None:
    register(settings)
    rows = [
        {"record_id": "ok-1", "embedding": unit(1), "subject_id": "s-1"},
        {"record_id": "ok-2", "embedding": [v * 7 for v in unit(2)], "subject_id": None},
        {"record_id": "short", "embedding": unit(3, 128), "subject_id": None},
        {"record_id": "nan", "embedding": [math.nan, *unit(4)[1:]], "subject_id": None},
        {"record_id": "inf", "embedding": [math.inf, *unit(5)[1:]], "subject_id": None},
        {"record_id": "zero", "embedding": [0.0] * 512, "subject_id": None},
        {"record_id": None, "embedding": unit(6), "subject_id": None},
        {"record_id": "null-vector", "embedding": None, "subject_id": None},
        {"record_id": "ok-1", "embedding": unit(7), "subject_id": None},
    ]
    summary = run_import(settings, write(tmp_path / "e.parquet", rows), "archive", "vendor-face-v1", "face", None)
    assert summary["rows"] == 9 and summary["imported"] == 2 and summary["quarantined"] == 7
    assert summary["quarantine_reasons"] == {
        "DUPLICATE_RECORD": 1,
        "MISSING_FIELD": 2,
        "NON_FINITE": 2,
        "WRONG_DIMENSION": 1,
        "ZERO_VECTOR": 1,
    }
    faces = table_rows(settings, "faces")
    assert sorted(f["record_id"] for f in faces) == ["ok-1", "ok-2"]
    for face in faces:
        assert np.isclose(np.linalg.norm(face["vector"]), 1.0, atol=1e-5)
        assert face["model_id"] == "vendor-face-v1" and face["origin"] == "imported"
        assert face["weights_digest"].startswith("imported:sha256:")
    ok1 = next(f for f in faces if f["record_id"] == "ok-1")
    assert np.allclose(ok1["vector"], unit(1), atol=1e-6) and ok1["subject_id"] == "s-1"
    quarantined = {q["item_id"]: q["reason"] for q in table_rows(settings, "quarantine")}
    assert quarantined["short"] == "WRONG_DIMENSION" and quarantined["zero"] == "ZERO_VECTOR"
    again = run_import(settings, tmp_path / "e.parquet", "archive", "vendor-face-v1", "face", None)
    assert again["imported"] == 2 and len(table_rows(settings, "faces")) == 2  # idempotent


def test_fixed_size_lists_and_image_modality(settings: Settings, tmp_path: Path) -> None:
    register(settings)
    rows = [{"record_id": f"r{i}", "embedding": unit(i, 64), "subject_id": None} for i in range(3)]
    path = write(tmp_path / "e.parquet", rows, pa.list_(pa.float32(), 64))
    with pytest.raises(Refused, match="--dim"):
        run_import(settings, path, "archive", "my-image-model", "image", None)
    summary = run_import(settings, path, "archive", "my-image-model", "image", 64)
    assert summary["imported"] == 3 and summary["dim"] == 64
    with pytest.raises(Refused, match="holds 64-d vectors"):
        run_import(settings, path, "archive", "clip-untrained", "image", None)


@pytest.mark.parametrize(
    ("columns", "message"),
    [
        ({"id": ["a"], "embedding": [[1.0]]}, "record_id"),
        ({"record_id": ["a"], "vec": [[1.0]]}, "embedding"),
        ({"record_id": ["a"], "embedding": ["text"]}, "list of floats"),
    ],
)
def test_malformed_files_are_refused_and_store_nothing(
    settings: Settings, tmp_path: Path, columns: dict, message: str
) -> None:
    register(settings)
    path = tmp_path / "bad.parquet"
    pq.write_table(pa.table(columns), path)
    with pytest.raises(Refused, match=message):
        run_import(settings, path, "archive", "vendor-face-v1", "face", None)
    assert Gallery(settings.storage).names() == ["sources"]


def test_not_parquet_and_unregistered_source(settings: Settings, tmp_path: Path) -> None:
    path = tmp_path / "x.parquet"
    path.write_text("hello")
    with pytest.raises(Refused, match="unregistered source"):
        run_import(settings, path, "archive", "vendor-face-v1", "face", None)
    register(settings)
    with pytest.raises(Refused, match="not a readable Parquet"):
        run_import(settings, path, "archive", "vendor-face-v1", "face", None)
    with pytest.raises(Refused, match="faces table holds 512-d"):
        rows = [{"record_id": "a", "embedding": unit(1, 128), "subject_id": None}]
        run_import(settings, write(tmp_path / "y.parquet", rows), "archive", "vendor", "face", 128)

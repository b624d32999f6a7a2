"""Erasure is real: the vector's bytes are gone from every file under the home, for each index kind."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import make_settings, register
from helpers import another_writer
from test_match import write_embeddings

from jobs.erase import erase
from jobs.erase_steps import scan_for
from jobs.import_embeddings import run_import
from jobs.ingest import run_ingest
from jobs.match import run_match
from jobs.watchlist import Submission, submit
from lance_tables.erasure import vector_patterns
from lance_tables.store import Gallery
from pipelines import samples
from pipelines.audit import AuditLog
from pipelines.errors import Refused
from pipelines.results import list_runs, load_run
from pipelines.settings import Settings
from pipelines.shards import pack_folder

DIM = 32
N = 1200


def build(tmp_path: Path, index: str | None) -> tuple[Settings, np.ndarray, str]:
    """A gallery with one subject to erase, a result set that names it, and (optionally) a vector index."""
    settings = make_settings(tmp_path / "home")
    register(settings)
    vecs = np.random.default_rng(7).standard_normal((N, DIM))
    ids = [f"r{i:04d}" for i in range(N)]
    path = write_embeddings(tmp_path / "g.parquet", ids, vecs)
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pq.read_table(path).append_column(
        "subject_id", pa.array(["subj-target" if i == 5 else None for i in range(N)], pa.string())
    )
    pq.write_table(table, path)
    run_import(settings, path, "archive", "model-a", "image", DIM)
    if index is not None:
        from lancedb.index import HnswSq, IvfPq

        config = (
            IvfPq(distance_type="cosine", num_partitions=8, num_sub_vectors=8)
            if index == "IVF_PQ"
            else HnswSq(distance_type="cosine", num_partitions=2)
        )
        Gallery(settings.storage).open("image_embeddings").create_index("vector", config=config)
    near = vecs[[5, 9]] + 0.01 * np.random.default_rng(8).standard_normal((2, DIM))  # another photo of them
    probes = write_embeddings(tmp_path / "p.parquet", ["p0", "p1"], near, id_column="probe_id")
    wid = submit(
        settings,
        Submission(probes, "b", "CASE-3", "fraud-investigation", "basis", "unit-1", "image", "model-a", top_k=3),
    )["watchlist_id"]
    run_match(settings, wid)
    target = vecs[5] / np.linalg.norm(vecs[5])
    return settings, target, wid


@pytest.mark.parametrize("index", [None, "IVF_PQ", "IVF_HNSW_SQ"])
def test_erased_vector_bytes_are_gone_everywhere(tmp_path: Path, index: str | None) -> None:
    """On a local home; the same byte scan on S3 homes (with and without bucket versioning, a crashed writer's
    leftover included) is in test_erasure_s3, on a copy of one S3 world."""
    settings, target, _ = build(tmp_path, index)
    f32, f16 = vector_patterns([target])
    leftover = "lance/image_embeddings.lance/data/00ff-crashed-writer.lance"  # a crashed writer's leftover
    assert settings.store.create(leftover, b"junk" + f16 + f32)
    assert scan_for(settings.storage, [f32])  # negative control: the scan finds the float32 bytes...
    assert scan_for(settings.storage, [f16])  # ...and the float16 bytes, before the erasure
    runs = list_runs(settings.store)
    gid = next(
        r["gallery_id"]
        for r in load_run(settings.store, runs[0]["run_id"]).to_pylist()
        if r["rank"] == 1 and r["probe_id"] == "p0"
    )
    receipt = erase(settings, "data subject request 88", "dpo-1", subject_id="subj-target")
    assert receipt["ok"] and receipt["removed_rows"]["image_embeddings"] == 1
    assert receipt["object_versions"] == {"versioning": None}
    assert scan_for(settings.storage, [f32, f16]) == []
    assert settings.store.read(leftover) is None  # removed by the cleanup of unverified files
    assert all(c["passed"] for c in receipt["checks"])
    assert receipt["result_sets_rewritten"] == [runs[0]["run_id"]]
    rewritten = load_run(settings.store, runs[0]["run_id"])
    assert gid not in rewritten.column("gallery_id").to_pylist() and rewritten.num_rows == 2 * 3 - 1
    gallery = Gallery(settings.storage)
    assert gallery.count("image_embeddings") == N - 1
    assert all(len(gallery.open(n).list_versions()) == 1 for n in ("image_embeddings", "probes"))
    if index:
        assert gallery.open("image_embeddings").list_indices()  # rebuilt, not lost
    record = AuditLog.of(settings).records()[-1]
    assert record["action"] == "erase" and record["receipt_id"] == receipt["receipt_id"]
    stored = settings.store.read(f"erasure/receipts/{receipt['receipt_id']}.json")
    import hashlib

    assert stored is not None and hashlib.sha256(stored).hexdigest() == record["receipt_hash"]
    assert not [k for k in settings.store.list("") if "subj-target" in k]  # no object is named after the person


def test_refused_when_removal_cannot_be_guaranteed(tmp_path: Path) -> None:
    settings, _, _ = build(tmp_path, None)
    table = Gallery(settings.storage).open("image_embeddings")
    table.tags.create("keep-me", table.version)
    with pytest.raises(Refused, match="tagged versions"):
        erase(settings, "r", "dpo-1", subject_id="subj-target")
    assert Gallery(settings.storage).count("image_embeddings") == N  # nothing removed
    table.tags.delete("keep-me")
    with another_writer(settings), pytest.raises(Refused, match="another writer"):  # another writer runs
        erase(settings, "r", "dpo-1", subject_id="subj-target")
    assert Gallery(settings.storage).count("image_embeddings") == N
    with pytest.raises(Refused, match="exactly one"):
        erase(settings, "r", "dpo-1", subject_id="a", source_id="b")


def test_an_erased_image_is_never_ingested_again(tmp_path: Path) -> None:
    settings = make_settings(tmp_path / "home")
    register(settings)
    folder = tmp_path / "imgs"
    folder.mkdir()
    data = samples.encode(samples.astronaut(), "JPEG", quality=90)
    (folder / "a.jpg").write_bytes(data)
    pack_folder(folder, tmp_path / "s1", "archive", 10, 10**8, default_minor=False)
    run_ingest(settings, tmp_path / "s1", modality="face", face_model="facenet-untrained", progress=False)
    import hashlib

    image_id = hashlib.sha256(data).hexdigest()
    vector = np.array(Gallery(settings.storage).read("faces").column("vector").to_pylist()[0], np.float32)
    receipt = erase(settings, "erasure request", "dpo-1", image_id=image_id)
    assert receipt["removed_rows"]["faces"] == 1 and receipt["removed_rows"]["images"] == 1
    assert scan_for(settings.storage, vector_patterns([vector])) == []
    (folder / "b.jpg").write_bytes(samples.encode(samples.composite(2), "JPEG"))
    pack_folder(
        folder, tmp_path / "s2", "archive", 10, 10**8, default_minor=False
    )  # the same photo again, in a new shard
    summary = run_ingest(settings, tmp_path / "s2", modality="face", face_model="facenet-untrained", progress=False)
    assert summary["quarantine_reasons"] == {"ERASED": 1}
    assert image_id not in Gallery(settings.storage).read("faces").column("image_id").to_pylist()


def test_erase_cli(tmp_path: Path) -> None:
    settings, _, _ = build(tmp_path, None)
    import os

    env = os.environ | {
        "GALLERYMATCH_HOME": str(settings.home),
        "GALLERYMATCH_AUDIT_KEY_DIR": str(settings.audit_key_dir),
    }
    script = Path(sys.executable).parent / "gallerymatch"
    done = subprocess.run(
        [
            str(script),
            "erase",
            "--subject-id",
            "subj-target",
            "--reason",
            "request",
            "--requested-by",
            "dpo-2",
            "--json",
        ],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["ok"]
    verify = subprocess.run([str(script), "audit", "verify"], capture_output=True, text=True, env=env, check=False)
    assert verify.returncode == 0 and "intact" in verify.stdout

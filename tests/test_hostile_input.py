"""Attacks on the way in: ids erasure cannot reach, undeclared minors, hostile files, injection, tiny images."""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import FACE, IMAGE, register
from helpers import table_rows
from PIL import Image

from jobs.import_embeddings import run_import
from jobs.ingest import run_ingest
from lance_tables.store import Gallery
from pipelines import samples
from pipelines.embed import EmbedStage
from pipelines.errors import Refused
from pipelines.models import MAX_DIM, check_model_id
from pipelines.prepare import PreparedShard, PrepareStage
from pipelines.probes import probes_from_embeddings
from pipelines.schemas import QUARANTINE, SHARD_SCHEMA, image_embeddings_schema, to_arrow
from pipelines.settings import Settings
from pipelines.shards import check_id, find_shards, pack_folder, read_metadata_csv, shard_key
from pipelines.sql import sql_list, sql_str
from pipelines.storage import Storage
from pipelines.task import IngestTask, WorkItem

BAD_IDS = ["CASE-11\n", "Jane Doe", "s-1 ", " s-1", "x" * 65, "o'brien", "", "a/b", "CASE-\u0661", "\x00"]
CRAFTED_MODEL = "x' OR origin = 'embedded"
DIM = 8


# ---------------------------------------------------------------- one id grammar, matched in full


@pytest.mark.parametrize("value", BAD_IDS)
def test_check_id_refuses_every_id_outside_the_grammar(value: str) -> None:
    with pytest.raises(Refused, match="not a valid id"):
        check_id("case id", value)


def test_check_id_accepts_the_grammar() -> None:
    for value in ("CASE-11", "subj-8812", "a", "A.b_c-9", "x" * 64):
        assert check_id("id", value) == value


# ---------------------------------------------------------------- import-embeddings: every stored id erasable


def vectors(n: int, dim: int = DIM, seed: int = 1) -> list[list[float]]:
    return [list(v) for v in np.random.default_rng(seed).standard_normal((n, dim))]


def write_file(path: Path, columns: dict[str, object]) -> Path:
    pq.write_table(pa.table(columns), path)
    return path


def import_file(settings: Settings, path: Path, **kwargs: object) -> dict:
    return run_import(settings, path, "archive", "vendor-img-v1", "image", DIM, **kwargs)  # type: ignore[arg-type]


def test_import_quarantines_ids_erasure_could_never_reach(settings: Settings, tmp_path: Path) -> None:
    register(settings)
    subjects = ["Jane Doe", "s-1   ", "y" * 300, "o'brien", "CASE-11\n", "s-ok", None]
    records = [f"r{i}" for i in range(len(subjects))] + ["rec 9", "r\n"]
    path = write_file(
        tmp_path / "e.parquet",
        {
            "record_id": records,
            "embedding": vectors(len(records)),
            "subject_id": [*subjects, "s-ok", "s-ok"],
            "minor": [False] * len(records),
        },
    )
    summary = import_file(settings, path)
    assert summary["imported"] == 2 and summary["quarantine_reasons"] == {"INVALID_ID": 7}
    rows = table_rows(settings, "image_embeddings")
    assert sorted((r["record_id"], r["subject_id"]) for r in rows) == [("r5", "s-ok"), ("r6", None)]
    quarantine = table_rows(settings, "quarantine")
    assert_every_stored_id_is_erasable(settings)
    text = " ".join(str(v) for q in quarantine for v in q.values())
    assert "Jane" not in text and "brien" not in text and "rec 9" not in text  # the bad values are not stored
    by_item = {q["item_id"]: q for q in quarantine}
    assert by_item["r0"]["subject_id"] is None and by_item["r0"]["reason"] == "INVALID_ID"
    assert sum(item.startswith("row-") for item in by_item) == 2  # bad record ids give way to row numbers
    assert all(q["subject_id"] == "s-ok" for item, q in by_item.items() if item.startswith("row-"))


def assert_every_stored_id_is_erasable(settings: Settings) -> None:
    for name, columns in (
        ("images", ("image_id", "subject_id")),
        ("faces", ("image_id", "record_id", "subject_id")),
        ("image_embeddings", ("record_id", "subject_id")),
        ("quarantine", ("item_id", "subject_id")),
    ):
        for row in table_rows(settings, name):
            for column in columns:
                if row[column] is not None:
                    check_id(f"{name}.{column}", row[column])


def test_probe_files_with_bad_ids_are_refused_whole(tmp_path: Path) -> None:
    good = write_file(tmp_path / "ok.parquet", {"probe_id": ["p0", "p1"], "embedding": vectors(2)})
    assert len(probes_from_embeddings(good, DIM, model_id="vendor-img-v1").rows) == 2  # no minor column needed
    for columns in (
        {"probe_id": ["p0", "p 1"], "embedding": vectors(2)},
        {"probe_id": ["p0", "p1"], "embedding": vectors(2), "subject_id": ["s-1", "Jane Doe"]},
    ):
        path = write_file(tmp_path / "bad.parquet", columns)
        with pytest.raises(Refused, match=r"1 bad probe row.*nothing stored.*INVALID_ID"):
            probes_from_embeddings(path, DIM)
    with pytest.raises(Refused, match="not a valid model id"):
        probes_from_embeddings(good, DIM, model_id=CRAFTED_MODEL)


# ---------------------------------------------------------------- minors fail closed (import)


def test_import_without_a_minor_column_is_refused_unless_allowed(settings: Settings, tmp_path: Path) -> None:
    register(settings)
    path = write_file(tmp_path / "e.parquet", {"record_id": ["r0", "r1"], "embedding": vectors(2)})
    with pytest.raises(Refused, match=r"no 'minor' column.*allow_undeclared_minors") as info:
        import_file(settings, path)
    assert "\n" not in str(info.value)
    assert Gallery(settings.storage).names() == ["sources"]
    summary = import_file(settings, path, allow_undeclared_minors=True)
    assert summary["imported"] == 2
    assert [r["minor"] for r in table_rows(settings, "image_embeddings")] == [False, False]


def test_null_minors_are_quarantined_rows(settings: Settings, tmp_path: Path) -> None:
    register(settings)
    path = write_file(
        tmp_path / "e.parquet",
        {
            "record_id": ["adult", "child", "unknown"],
            "embedding": vectors(3),
            "subject_id": ["s-1", "s-2", "s-3"],
            "minor": pa.array([False, True, None], pa.bool_()),
        },
    )
    summary = import_file(settings, path)
    assert summary["imported"] == 2 and summary["quarantine_reasons"] == {"MINOR_UNKNOWN": 1}
    assert {r["record_id"]: r["minor"] for r in table_rows(settings, "image_embeddings")} == {
        "adult": False,
        "child": True,
    }
    (row,) = table_rows(settings, "quarantine")
    assert row["item_id"] == "unknown" and row["subject_id"] == "s-3"  # erasure by subject finds it


@pytest.mark.parametrize(
    ("columns", "message"),
    [
        ({"minor": ["yes", "no"]}, "'minor' is string; it must be bool"),
        ({"minor": [1, 0]}, "'minor' is int64; it must be bool"),
        ({"embedding": [["0.1"] * DIM, ["0.2"] * DIM]}, "'embedding' is list<.*string>.*list of floats"),
        ({"embedding": [[True] * DIM, [False] * DIM]}, "list of floats"),
        ({"embedding": ["text", "more"]}, "list of floats"),
        ({"subject_id": [[1], [2]]}, "'subject_id' is list<.*int64>; ids are strings"),
        ({"record_id": [b"r0", b"r1"]}, "'record_id' is binary; ids are strings"),
    ],
)
def test_hostile_embedding_files_get_a_one_line_refusal(
    settings: Settings, tmp_path: Path, columns: dict, message: str
) -> None:
    register(settings)
    base: dict[str, object] = {"record_id": ["r0", "r1"], "embedding": vectors(2), "minor": [False, False]}
    path = write_file(tmp_path / "e.parquet", base | columns)
    with pytest.raises(Refused, match=message) as info:
        import_file(settings, path)
    assert "\n" not in str(info.value) and "Traceback" not in str(info.value)
    assert Gallery(settings.storage).names() == ["sources"]


# ---------------------------------------------------------------- --dim is capped and must agree


def test_an_absurd_dim_never_fixes_the_table_width(settings: Settings, tmp_path: Path) -> None:
    register(settings)
    path = write_file(tmp_path / "e.parquet", {"record_id": ["r0"], "embedding": vectors(1), "minor": [False]})
    for dim in (100_000, MAX_DIM + 1, 0, -3):
        with pytest.raises(Refused, match="out of range"):
            run_import(settings, path, "archive", "vendor-img-v1", "image", dim)
    with pytest.raises(Refused, match="--dim 768 disagrees with model 'clip-untrained', which gives 512-d"):
        run_import(settings, path, "archive", IMAGE, "image", 768)
    with pytest.raises(Refused, match="--dim 128 disagrees"):
        run_import(settings, path, "archive", FACE, "face", 128)
    assert Gallery(settings.storage).open("image_embeddings") is None
    run_import(settings, path, "archive", "vendor-img-v1", "image", DIM)
    with pytest.raises(Refused, match=f"holds {DIM}-d vectors"):
        run_import(settings, path, "archive", "vendor-img-v2", "image", 16)


# ---------------------------------------------------------------- no injection


@pytest.mark.parametrize(
    "model_id",
    [
        CRAFTED_MODEL,
        "ViT-B-32/x' OR '1'='1",
        "a/b/c",
        "../etc",
        "ViT-B-32/..",
        "facenet-evil",
        "m" * 129,
        "vendor\n",
        "",
        "vendor v3",
    ],
)
def test_model_ids_have_a_closed_grammar(model_id: str) -> None:
    with pytest.raises(Refused, match="model id"):
        check_model_id(model_id)


def test_valid_model_ids_pass() -> None:
    for model_id in (FACE, "facenet-vggface2", IMAGE, "ViT-B-32/laion2b_s34b_b79k", "vendor-face-v3", "a.b_c"):
        assert check_model_id(model_id) == model_id


def test_sql_str_quotes_and_refuses_control_characters() -> None:
    assert sql_str("it's") == "'it''s'"
    assert sql_list(["a", "b'c"]) == "('a', 'b''c')"
    for bad in ("a\x00b", "a\nb", "\x7f"):
        with pytest.raises(Refused, match="control characters"):
            sql_str(bad)


def test_quoted_values_match_exactly_one_row_in_lance(tmp_path: Path) -> None:
    gallery = Gallery(Storage.at(tmp_path))
    values = ["plain", "a'b", "x' OR '1'='1", "back\\slash", "pct%_", 'dq"', "é"]
    gallery.upsert("ledger", ledger_rows(values))
    for value in values:
        assert gallery.count("ledger", f"shard_key = {sql_str(value)}") == 1, value
    assert gallery.count("ledger", f"shard_key IN {sql_list([])}") == 0


def ledger_rows(keys: list[str]) -> pa.Table:
    now = dt.datetime.now(dt.UTC)
    rows = [
        {"ledger_key": f"k{i}", "shard_key": k, "shard_uri": "u", "task": "t", "images": 0, "embedded": 0}
        | {"quarantined": 0, "finished_at": now}
        for i, k in enumerate(keys)
    ]
    from pipelines.schemas import LEDGER

    return to_arrow(rows, LEDGER)


def plant_embedded_rows(gallery: Gallery, model_id: str, n: int = 3) -> None:
    now = dt.datetime.now(dt.UTC)
    rows = [
        {"embedding_id": f"{model_id}-{i}", "image_id": f"img-{i}", "source_id": "archive", "minor": False}
        | {"model_id": model_id, "weights_digest": "sha256:x", "origin": "embedded", "shard_key": "s"}
        | {"ingested_at": now}
        for i in range(n)
    ]
    vecs = np.ones((n, 512), np.float32)
    gallery.upsert("image_embeddings", to_arrow(rows, image_embeddings_schema(512), vecs))


def test_a_crafted_model_id_in_a_commit_scope_deletes_nothing(tmp_path: Path) -> None:
    """The attack that worked: the model id pasted into the merge's delete predicate."""
    gallery = Gallery(Storage.at(tmp_path))
    plant_embedded_rows(gallery, IMAGE)
    empty = to_arrow([], image_embeddings_schema(512), np.zeros((0, 512), np.float32))
    quoted = f"image_id IN {sql_list(['img-0'])} AND model_id = {sql_str(CRAFTED_MODEL)} AND origin = 'embedded'"
    gallery.upsert("image_embeddings", empty, scope=quoted)
    assert gallery.count("image_embeddings") == 3  # the quoted id is one (unknown) model: nothing matches
    pasted = f"image_id IN {sql_list(['img-9'])} AND model_id = '{CRAFTED_MODEL}' AND origin = 'embedded'"
    gallery.upsert("image_embeddings", empty, scope=pasted)  # negative control: the old f-string
    assert gallery.count("image_embeddings") == 0


def test_a_crafted_model_id_is_refused_before_anything_is_written(
    settings: Settings, tmp_path: Path, sample_shards: Path
) -> None:
    register(settings)
    gallery = Gallery(settings.storage)
    plant_embedded_rows(gallery, IMAGE)
    versions = {name: gallery.version(name) for name in gallery.names()}
    with pytest.raises(Refused, match="not a valid model id"):
        run_ingest(settings, sample_shards, modality="image", image_model=CRAFTED_MODEL, progress=False)
    with pytest.raises(Refused, match="not a valid model id"):
        run_ingest(settings, sample_shards, modality="face", face_model=CRAFTED_MODEL, progress=False)
    path = write_file(tmp_path / "e.parquet", {"record_id": ["r0"], "embedding": vectors(1, 512), "minor": [False]})
    with pytest.raises(Refused, match="not a valid model id"):
        run_import(settings, path, "archive", CRAFTED_MODEL, "image", 512)
    assert gallery.count("image_embeddings") == 3  # the other model's rows survive
    assert {name: gallery.version(name) for name in gallery.names()} == versions
    with pytest.raises(Refused, match="not a valid model id"):
        dataclasses.replace(IngestTask.from_settings(settings, "image", FACE, IMAGE), image_model=CRAFTED_MODEL)


# ---------------------------------------------------------------- ingest: shards


def shard_row(data: bytes, **meta: object) -> dict[str, object]:
    row: dict[str, object] = {"image_id": hashlib.sha256(data).hexdigest(), "image": data, "uri": "photo.png"}
    return row | {"source_id": "archive", "minor": False, "subject_id": None, "num_bytes": len(data)} | meta


def png(width: int, height: int, seed: int = 0) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 255, (height, width, 3), dtype=np.uint8)
    return samples.encode(Image.fromarray(pixels), "PNG")


def write_shard(folder: Path, name: str, table: pa.Table) -> WorkItem:
    path = folder / "source_id=archive" / f"{name}.parquet"
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path)
    return WorkItem(str(path), shard_key(path), True, False)


def prepare(settings: Settings, item: WorkItem, **task: object) -> PreparedShard:
    base = IngestTask.from_settings(settings, "face", FACE, IMAGE)
    return PrepareStage(dataclasses.replace(base, **task)).process(item)  # type: ignore[arg-type]


def reasons(prep: PreparedShard) -> dict[str, str]:
    return {q["item_id"]: q["reason"] for q in prep.quarantine}


@pytest.fixture(scope="module")
def astronaut_jpg() -> bytes:
    return samples.encode(samples.astronaut(), "JPEG", quality=90)


def test_shard_rows_with_bad_ids_or_unknown_minors_are_quarantined(
    settings: Settings, tmp_path: Path, astronaut_jpg: bytes
) -> None:
    rows = [
        shard_row(astronaut_jpg, subject_id="s-1"),
        shard_row(png(40, 40, 1), subject_id="Jane Doe"),
        shard_row(png(40, 40, 2), subject_id="s-2\n"),
        shard_row(png(40, 40, 3), subject_id="s-3", minor=None),
        shard_row(png(40, 40, 4), subject_id="s-4") | {"image_id": "Jane Doe's photo"},
        shard_row(png(40, 40, 5), subject_id="s-5", pack_error="NOT_A_REASON"),
    ]
    item = write_shard(tmp_path, "s", pa.Table.from_pylist(rows, schema=SHARD_SCHEMA))
    prep = prepare(settings, item)
    ids = [r["image_id"] for r in rows]
    assert [f["image_id"] for f in prep.faces] == [ids[0]]
    got = reasons(prep)
    assert got[ids[1]] == got[ids[2]] == "INVALID_ID" and got[ids[3]] == "MINOR_UNKNOWN"
    assert got[ids[5]] == "BAD_SHARD"
    (fallback,) = [k for k in got if k.startswith("row-")]
    assert got[fallback] == "INVALID_ID"
    subjects = {q["item_id"]: q["subject_id"] for q in prep.quarantine}
    assert subjects[ids[1]] is None and subjects[ids[2]] is None and subjects[ids[3]] == "s-3"
    assert "Jane" not in " ".join(str(v) for q in prep.quarantine for v in q.values())


def test_a_shard_without_a_minor_column_is_quarantined_whole_unless_allowed(
    settings: Settings, tmp_path: Path, astronaut_jpg: bytes
) -> None:
    table = pa.Table.from_pylist([shard_row(astronaut_jpg)], schema=SHARD_SCHEMA).drop_columns(["minor"])
    item = write_shard(tmp_path, "s", table)
    prep = prepare(settings, item)
    (row,) = prep.quarantine
    assert row["reason"] == "MINORS_UNDECLARED" and row["stage"] == "shard" and row["item_id"] == item.shard_key
    assert "--minor-default" in row["detail"] and "allow_undeclared_minors" in row["detail"]
    assert not prep.images
    allowed = prepare(settings, item, allow_undeclared_minors=True)
    assert not allowed.quarantine and [i["minor"] for i in allowed.images] == [False]


@pytest.mark.parametrize(
    ("column", "values", "message"),
    [
        ("minor", ["yes"], "'minor' is string; a shard's minor must be bool"),
        ("minor", [1], "'minor' is int64"),
        ("captured_at", ["yesterday"], "'captured_at' is string"),
        ("image", ["not bytes"], "'image' is string"),
        ("subject_id", [[1, 2]], "'subject_id' is list"),
    ],
)
def test_shards_with_columns_of_the_wrong_kind_are_quarantined_whole(
    settings: Settings, tmp_path: Path, astronaut_jpg: bytes, column: str, values: list, message: str
) -> None:
    table = pa.Table.from_pylist([shard_row(astronaut_jpg)], schema=SHARD_SCHEMA)
    table = table.set_column(table.column_names.index(column), column, pa.array(values))
    (row,) = prepare(settings, write_shard(tmp_path, "s", table)).quarantine
    assert row["reason"] == "BAD_SHARD" and row["stage"] == "shard"
    assert message in row["detail"]


def test_ledger_part_names_change_only_with_the_minors_override(settings: Settings) -> None:
    task = IngestTask.from_settings(settings, "all", FACE, IMAGE)
    allowed = dataclasses.replace(task, allow_undeclared_minors=True)
    assert "minors" not in task.face_part() + task.image_part()  # existing ledgers keep their names
    assert allowed.face_part() != task.face_part() and allowed.image_part() != task.image_part()


# ---------------------------------------------------------------- tiny images, erased images


def test_tiny_images_have_no_face_and_never_reach_the_detector(
    settings: Settings, tmp_path: Path, astronaut_jpg: bytes
) -> None:
    tiny = {(1, 1): png(1, 1), (10, 10): png(10, 10), (256, 10): png(256, 10)}
    rows = [shard_row(data, subject_id=f"s-{w}x{h}") for (w, h), data in tiny.items()]
    rows.insert(1, shard_row(astronaut_jpg, subject_id="s-face"))
    prep = prepare(settings, write_shard(tmp_path, "s", pa.Table.from_pylist(rows, schema=SHARD_SCHEMA)))
    assert [f["image_id"] for f in prep.faces] == [rows[1]["image_id"]]
    by_id = {q["item_id"]: q for q in prep.quarantine}
    assert len(by_id) == 3 and {q["reason"] for q in by_id.values()} == {"NO_FACE"}
    for (w, h), data in tiny.items():
        q = by_id[hashlib.sha256(data).hexdigest()]
        assert q["detail"].startswith(f"image is {w} x {h} px, smaller than the minimum face size")
        assert q["subject_id"] == f"s-{w}x{h}" and "torch" not in q["detail"]


def test_a_re_ingested_erased_image_leaves_no_name_behind(
    settings: Settings, tmp_path: Path, astronaut_jpg: bytes
) -> None:
    row = shard_row(astronaut_jpg, subject_id="s-erased") | {"uri": "people/Jane Doe.jpg"}
    item = write_shard(tmp_path, "s", pa.Table.from_pylist([row], schema=SHARD_SCHEMA))
    (q,) = prepare(settings, item, erased=frozenset({row["image_id"]})).quarantine
    assert q["reason"] == "ERASED" and q["uri"] is None and q["subject_id"] is None
    assert "Jane" not in q["detail"]


# ---------------------------------------------------------------- end to end, and the quarantine schema


def test_ingest_end_to_end_stores_only_erasable_ids(settings: Settings, tmp_path: Path, astronaut_jpg: bytes) -> None:
    register(settings)
    rows = [
        shard_row(astronaut_jpg, subject_id="s-1"),
        shard_row(png(30, 30, 7), subject_id="Jane Doe"),
        shard_row(png(10, 10, 8), subject_id="s-2"),
        shard_row(png(30, 30, 9), subject_id="s-3", minor=None),
    ]
    write_shard(tmp_path / "shards", "a", pa.Table.from_pylist(rows, schema=SHARD_SCHEMA))
    no_minor = pa.Table.from_pylist([shard_row(png(30, 30, 10))], schema=SHARD_SCHEMA).drop_columns(["minor"])
    write_shard(tmp_path / "shards", "b", no_minor)
    summary = run_ingest(settings, tmp_path / "shards", modality="face", face_model=FACE, progress=False)
    assert summary["quarantine_reasons"] == {"INVALID_ID": 1, "MINORS_UNDECLARED": 1, "MINOR_UNKNOWN": 1, "NO_FACE": 1}
    assert summary["faces"] == 1
    assert_every_stored_id_is_erasable(settings)
    quarantine = {q["reason"]: q for q in table_rows(settings, "quarantine")}
    assert quarantine["NO_FACE"]["subject_id"] == "s-2" and quarantine["MINOR_UNKNOWN"]["subject_id"] == "s-3"
    assert quarantine["INVALID_ID"]["subject_id"] is None


def test_a_quarantine_table_from_before_subject_id_gets_the_column(tmp_path: Path) -> None:
    gallery = Gallery(Storage.at(tmp_path))
    old_schema = pa.schema([f for f in QUARANTINE if f.name != "subject_id"])
    gallery.ensure("quarantine", old_schema)
    gallery.add_declared_columns("quarantine")  # what erasure can call before selecting by subject
    assert "subject_id" in gallery.open("quarantine").schema.names
    gallery.db.drop_table("quarantine")
    gallery.ensure("quarantine", old_schema)
    now = dt.datetime.now(dt.UTC)
    row = {"quarantine_id": "q1", "item_id": "i1", "stage": "decode", "reason": "NO_FACE", "detail": "d"}
    row |= {"shard_key": "k", "quarantined_at": now, "subject_id": "s-1"}
    gallery.upsert("quarantine", to_arrow([row], QUARANTINE))
    assert gallery.read("quarantine").to_pylist()[0]["subject_id"] == "s-1"
    assert gallery.count("quarantine", f"subject_id = {sql_str('s-1')}") == 1


def test_embed_stage_writes_quarantine_rows_from_the_declared_schema(settings: Settings, tmp_path: Path) -> None:
    item = WorkItem("x", "k" * 64, False, False)
    prep = PreparedShard(item, quarantine=[{"quarantine_id": "q", "item_id": "i", "subject_id": "s-1"}])
    prep.quarantine[0] |= {"stage": "decode", "reason": "NO_FACE", "detail": "d", "source_id": "archive", "uri": None}
    out = EmbedStage(IngestTask.from_settings(settings, "face", FACE, IMAGE)).process(prep)
    assert out.tables["quarantine"].schema.equals(QUARANTINE)
    assert out.tables["quarantine"].column("subject_id").to_pylist() == ["s-1"]


# ---------------------------------------------------------------- pack: default_minor


def test_pack_default_minor_covers_what_the_metadata_does_not(tmp_path: Path) -> None:
    folder = tmp_path / "imgs"
    folder.mkdir()
    for name, seed in (("child.png", 1), ("blank.png", 2), ("other.png", 3)):
        (folder / name).write_bytes(png(8, 8, seed))
    csv_path = tmp_path / "meta.csv"
    csv_path.write_text("path,subject_id,minor\nchild.png,s-1,true\nblank.png,s-2,\n")
    meta = read_metadata_csv(csv_path)
    for default, expected in ((None, [None, True, None]), (False, [False, True, False]), (True, [True, True, True])):
        out = tmp_path / f"shards-{default}"
        pack_folder(folder, out, "archive", 10, 10**6, meta, default_minor=default)
        (shard,) = find_shards(out)
        rows = sorted(pq.read_table(shard).to_pylist(), key=lambda r: r["uri"])
        assert [r["minor"] for r in rows] == expected, default

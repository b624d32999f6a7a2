"""`gallerymatch results sheet`: the review sheet of a real run, opened in a real browser (headless chromium).

One card per candidate with its face cut from the shard, every image loaded, the notice on top, the two-person
rule's state, an audit record; erased candidates absent; a shard that is gone shows why; thumbnails removed with
the watchlist's probes (byte scan)."""

from __future__ import annotations

import datetime as dt
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest
from browser import dump_dom, ensure_chromium, screenshot
from conftest import FACE, IMAGE, make_settings, register
from PIL import Image, ImageOps

from jobs.erase import erase
from jobs.erase_steps import scan_for
from jobs.ingest import run_ingest
from jobs.match import run_match
from jobs.retention import run_retention
from jobs.review import review_candidate
from jobs.sheet import write_review_sheet
from jobs.watchlist import Submission, submit
from lance_tables.store import Gallery
from pipelines.audit import AuditLog
from pipelines.errors import Refused
from pipelines.samples import astronaut, composite, encode
from pipelines.settings import Settings
from pipelines.shards import pack_folder

NOTICE = "Candidate list for human review; not an identification."


@dataclass
class World:
    settings: Settings
    root: Path
    watchlist_id: str
    run: dict
    shards: Path


def build(root: Path) -> World:
    from skimage import data

    settings = make_settings(root / "home")
    register(settings)
    images = root / "images"
    images.mkdir(parents=True)
    (images / "astronaut.jpg").write_bytes(encode(astronaut(), "JPEG", quality=92))
    (images / "group.jpg").write_bytes(encode(composite(2), "JPEG", quality=92))
    Image.fromarray(data.camera()).convert("RGB").save(images / "camera.png")
    shards = root / "shards"
    pack_folder(images, shards, "archive", rows_per_shard=1, max_bytes=50 * 1024 * 1024, default_minor=False)
    run_ingest(settings, shards, modality="face", face_model=FACE, image_model=IMAGE, progress=False)
    probes = root / "probes"
    probes.mkdir()
    ImageOps.mirror(astronaut()).resize((400, 400)).save(probes / "probe-a.jpg", quality=85)
    Image.fromarray(data.camera()).convert("RGB").resize((300, 300)).save(probes / "probe-c.png")
    sub = Submission(probes, "sheet test", "CASE-9", "criminal-investigation", "test", "analyst-1", "face", FACE, 10)
    wl = submit(settings, sub)
    return World(settings, root, wl["watchlist_id"], run_match(settings, wl["watchlist_id"]), shards)


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> World:
    return build(tmp_path_factory.mktemp("sheet-world"))


@pytest.fixture
def world(template: World, tmp_path: Path) -> World:
    """A private copy of the built home (the shards stay where the ledger says they were read from)."""
    root = tmp_path / "world"
    shutil.copytree(template.root / "home", root / "home")
    shutil.copytree(template.root / "home-audit-keys", root / "home-audit-keys")
    settings = make_settings(root / "home")
    return World(settings, template.root, template.watchlist_id, template.run, template.shards)


PROBE = """<script>
window.addEventListener("load", function () {
  var b = document.body, imgs = Array.prototype.slice.call(document.images);
  var ok = imgs.filter(function (i) { return i.complete && i.naturalWidth > 0; }).length;
  b.dataset.imagesLoaded = ok + "/" + imgs.length;
  b.dataset.firstText = b.innerText.trim().split("\\n")[0];
});
</script>"""


def inspect(sheet: Path, work: Path) -> str:
    """The sheet's DOM after it loaded in chromium, with what a reviewer's browser saw: the images that loaded
    (a copy of the page gets a small script that writes it into the body's data attributes)."""
    work.mkdir(parents=True, exist_ok=True)
    page = work / "probed.html"
    page.write_text(sheet.read_text().replace("</body>", PROBE + "</body>"))
    return dump_dom(page)


def cards(dom: str) -> list[str]:
    return re.findall(r"<article[^>]*class=\"candidate[^\"]*\"[^>]*>", dom)


def loaded(dom: str) -> tuple[int, int]:
    match = re.search(r'data-images-loaded="(\d+)/(\d+)"', dom)
    assert match, "the page did not report its images"
    return int(match[1]), int(match[2])


def first_text(dom: str) -> str:
    match = re.search(r'data-first-text="([^"]*)"', dom)
    assert match
    return match[1]


@pytest.mark.slow
def test_the_sheet_shows_every_candidate_with_its_face_in_a_real_browser(world: World, tmp_path: Path) -> None:
    ensure_chromium()
    settings, run = world.settings, world.run
    review_candidate(settings, run["run_id"], sorted_probe(settings, run), 1, "potential_candidate", "reviewer-1")
    out = write_review_sheet(settings, run["run_id"], tmp_path / "sheet", "analyst-1")
    html_text = Path(out["path"]).read_text()
    assert NOTICE in html_text and "http://" not in html_text and "https://" not in html_text
    assert out["audit_record"] in html_text and out["crops_missing"] == 0
    dom = inspect(Path(out["path"]), tmp_path / "probe")
    assert len(cards(dom)) == run["candidates"] == out["candidates"]
    done, total = loaded(dom)
    assert done == total == run["candidates"] + 2 + 1  # crops, two probe thumbnails, the score plot
    assert NOTICE in first_text(dom)  # the first thing on the page
    assert 'data-review-status="potential_candidate"' in dom and "second, different reviewer" in dom
    assert dom.count('data-review-status="unreviewed"') == run["candidates"] - 1
    assert "not calibrated" in dom
    shot = screenshot(Path(out["path"]), tmp_path / "sheet.png")
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    zoomed = screenshot(Path(out["path"]), tmp_path / "sheet-200.png", scale=2.0)
    assert zoomed.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    records = [r for r in AuditLog.of(settings).records() if r["action"] == "results.sheet"]
    assert [r["phase"] for r in records] == ["intent", "outcome"] and records[1]["status"] == "ok"
    assert records[0]["case_id"] == "CASE-9" and records[0]["actor"] == "analyst-1"
    assert records[1]["counts"]["candidates_shown"] == run["candidates"]


def sorted_probe(settings: Settings, run: dict) -> str:
    from pipelines.results import load_run

    return sorted(load_run(settings.store, run["run_id"]).column("probe_id").to_pylist())[0]


@pytest.mark.slow
def test_erased_candidates_never_appear_and_the_sheet_says_the_run_was_rewritten(world: World, tmp_path: Path) -> None:
    ensure_chromium()
    settings, run = world.settings, world.run
    from pipelines.results import load_run

    rows = load_run(settings.store, run["run_id"]).to_pylist()
    victim = next(r for r in rows if r["rank"] == 1)
    erase(settings, "subject request", "dpo-1", image_id=victim["image_id"])
    out = write_review_sheet(settings, run["run_id"], tmp_path / "sheet", "analyst-1")
    html_text = Path(out["path"]).read_text()
    assert victim["image_id"] not in html_text and victim["gallery_id"] not in html_text
    assert "rewritten by erasure" in html_text
    kept = [r for r in rows if r["image_id"] != victim["image_id"]]
    dom = inspect(Path(out["path"]), tmp_path / "probe")
    assert len(cards(dom)) == len(kept)
    assert loaded(dom)[0] == loaded(dom)[1]


@pytest.mark.slow
def test_a_shard_that_is_gone_gives_a_placeholder_that_says_why(world: World, tmp_path: Path) -> None:
    ensure_chromium()
    settings, run = world.settings, world.run
    moved = tmp_path / "moved-shards"
    shutil.move(str(world.shards), moved)
    try:
        out = write_review_sheet(settings, run["run_id"], tmp_path / "sheet", "analyst-1")
    finally:
        shutil.move(str(moved), world.shards)
    assert out["crops_missing"] == run["candidates"]
    html_text = Path(out["path"]).read_text()
    assert "not readable" in html_text and "shards must stay where they were ingested from" in html_text
    dom = inspect(Path(out["path"]), tmp_path / "probe")
    assert len(cards(dom)) == run["candidates"] and loaded(dom)[0] == loaded(dom)[1]  # placeholders load too


@pytest.mark.slow
def test_probe_thumbnails_go_with_the_watchlists_probes(world: World, tmp_path: Path) -> None:
    settings = world.settings
    from lance_tables.watchlists import read_thumbnails

    thumbs = [t for t in read_thumbnails(Gallery(settings.storage), world.watchlist_id).values() if t]
    assert len(thumbs) == 2 and all(t[:2] == b"\xff\xd8" for t in thumbs)
    patterns = [t[200:264] for t in thumbs]  # 64 bytes from inside each JPEG's entropy-coded data
    assert scan_for(settings.storage, patterns)  # negative control: the scan finds them while they are kept
    later = dt.datetime.now(dt.UTC) + dt.timedelta(days=100)  # past the expiry (90 days), within results retention
    run_retention(settings, now=later)
    assert scan_for(settings.storage, patterns) == []  # physically gone, old versions included
    out = write_review_sheet(settings, world.run["run_id"], tmp_path / "sheet", "analyst-1")
    assert "removed with the watchlist" in Path(out["path"]).read_text()


def test_a_sheet_is_refused_inside_the_home_and_for_unknown_runs(world: World, tmp_path: Path) -> None:
    settings = world.settings
    with pytest.raises(Refused, match="inside GALLERYMATCH_HOME"):
        write_review_sheet(settings, world.run["run_id"], settings.local_home / "sheet", "analyst-1")
    with pytest.raises(Refused, match="no result set"):
        write_review_sheet(settings, "run-nope", tmp_path / "s", "analyst-1")
    with pytest.raises(Refused):
        write_review_sheet(settings, world.run["run_id"], tmp_path / "s", "bad id'")
    with pytest.raises(Refused, match="local folder"):
        write_review_sheet(settings, world.run["run_id"], "s3://bucket/x", "analyst-1")
    assert not [r for r in AuditLog.of(settings).records() if r["action"] == "results.sheet"]

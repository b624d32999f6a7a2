"""The review sheet renderer (`pipelines.sheet`): pure-Python checks, then the page in a real headless chromium.

The browser checks load a copy of the sheet with a small probe script added (the sheet's CSP allows inline
scripts and nothing else): after `load` it writes what the page looks like into data attributes of <body>,
which `--dump-dom` then shows: how many images really decoded, whether the page scrolls sideways, the first
line of the body text, what j / k do to the focus, and a summary of every candidate card as the browser sees it.
"""

from __future__ import annotations

import io
import json
import os
import re
from collections.abc import Callable
from dataclasses import replace
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from browser import PNG_MAGIC, dump_dom, ensure_chromium, screenshot
from PIL import Image
from skimage import data as skdata

from pipelines.sheet import (
    NOTICE,
    CandidateCard,
    ProbeCard,
    SheetRun,
    render_sheet,
    score_plot,
    write_sheet,
)

HOSTILE_SCRIPT = "<script>alert(1)</script>"
HOSTILE_ATTR = '"onerror=alert(1)'
HOSTILE_IMG = '"><img src=x onerror="document.body.dataset.pwned=1">'

PROBE_SCRIPT = """
<script>
window.addEventListener("load", function () {
  var b = document.body, root = document.documentElement;
  var imgs = Array.prototype.slice.call(document.images);
  var ok = imgs.filter(function (i) { return i.complete && i.naturalWidth > 0; }).length;
  b.dataset.imagesLoaded = ok + "/" + imgs.length;
  b.dataset.overflow = String(root.scrollWidth > window.innerWidth);
  b.dataset.widths = root.scrollWidth + "/" + window.innerWidth;
  b.dataset.firstText = b.innerText.trim().split("\\n")[0];
  var note = document.querySelector('[role="note"]'), box = note.getBoundingClientRect();
  b.dataset.noticeBox = Math.round(box.top) + "/" + Math.round(box.height);
  b.dataset.noticeVisible = String(getComputedStyle(note).visibility === "visible" && box.height > 0);
  b.dataset.onerror = String(document.querySelectorAll("[onerror]").length);
  b.dataset.scripts = String(document.querySelectorAll("script").length);
  var cards = Array.prototype.slice.call(document.querySelectorAll("article.candidate"));
  b.dataset.cards = JSON.stringify(cards.map(function (c) {
    var img = c.querySelector("img");
    return {rank: c.dataset.rank, gallery: c.dataset.galleryId, status: c.dataset.reviewStatus,
            above: c.dataset.aboveThreshold, isNew: c.dataset.new, tabindex: c.tabIndex,
            probe: c.closest("section.probe").dataset.probeId, alt: img.alt, text: c.innerText,
            outline: (function () { c.focus(); return getComputedStyle(c).outlineStyle; })()};
  }));
  if (cards.length) {
    document.activeElement.blur();
    var seen = [];
    ["j", "j", "k", "ArrowDown"].forEach(function (key) {
      document.dispatchEvent(new KeyboardEvent("keydown", {key: key, bubbles: true, cancelable: true}));
      var a = document.activeElement;
      seen.push(a && a.dataset.rank ? a.closest("section.probe").dataset.probeId + "#" + a.dataset.rank : "none");
    });
    b.dataset.keys = seen.join(",");
  }
  b.dataset.probeDone = "1";
});
</script>
"""


# ------------------------------------------------------------------------------------------------ fixtures


def _jpeg(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="JPEG", quality=85)
    return buf.getvalue()


def _png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


ASTRONAUT = skdata.astronaut()
CAMERA = skdata.camera()
FACE_A = _jpeg(ASTRONAUT[30:230, 140:340])  # the astronaut's face
FACE_B = _jpeg(CAMERA[40:240, 180:380])  # the cameraman's head
FACE_C = _png(ASTRONAUT[0:256, 256:512])
PROBE_A = _jpeg(ASTRONAUT[20:240, 130:350])
PROBE_B = _jpeg(CAMERA[30:250, 170:390])


def _card(rank: int, score: float, **kw: object) -> CandidateCard:
    values: dict[str, object] = {
        "rank": rank,
        "score": score,
        "above_threshold": score >= 0.6,
        "gallery_id": f"{rank:02d}" + "ab" * 15,
        "image_id": f"img{rank:04x}",
        "record_id": None,
        "source_id": "archive",
        "review_status": "unreviewed",
        "review_detail": "no reviews yet",
        "new_since_parent": None,
        "first_seen_run_id": None,
        "crop": FACE_A,
        "crop_missing": None,
    }
    values |= kw
    return CandidateCard(**values)  # type: ignore[arg-type]


def make_run(**kw: object) -> SheetRun:
    probe_a = ProbeCard(
        probe_id="probe-aaa1",
        thumbnail=PROBE_A,
        thumbnail_missing=None,
        candidates=(
            _card(
                1,
                0.8123456,
                review_status="potential_candidate",
                review_detail="1 of 2 reviewers: potential_candidate (a second, different reviewer is needed)",
                new_since_parent=True,
                first_seen_run_id="run-0002",
            ),
            _card(
                2, 0.6401, crop=FACE_B, source_id=HOSTILE_SCRIPT, review_status="no_candidate", new_since_parent=False
            ),
            _card(3, 0.41, crop=None, crop_missing="shard no longer readable: shards/00/ab.tar", record_id="rec-77"),
        ),
    )
    probe_b = ProbeCard(
        probe_id=HOSTILE_ATTR,
        thumbnail=PROBE_B,
        thumbnail_missing=None,
        candidates=(
            _card(1, 0.7, crop=FACE_C, source_id=HOSTILE_IMG, review_status="inconclusive", gallery_id="cd" * 16),
            _card(2, 0.55, crop=b"GIF89a not allowed", review_status="confirmed_candidate", new_since_parent=True),
            _card(3, 0.5, crop=None, crop_missing="imported vector: no image", record_id="imp-1"),
        ),
    )
    probe_c = ProbeCard(probe_id="probe-ccc3", thumbnail=None, thumbnail_missing="probe image erased", candidates=())
    values: dict[str, object] = {
        "run_id": "run-0003",
        "watchlist_id": "wl-01",
        "case_id": "case-2024-017",
        "purpose": "investigation of a reported offence",
        "model_id": "facenet-casia-webface",
        "matched_at": "2024-05-01T10:00:00Z",
        "top_k": 3,
        "threshold": 0.6,
        "calibration": "calibrated: cal-0123abcd for FPIR 0.001 (measured, N=1,000,000)",
        "threshold_warnings": ("threshold below the calibrated FPIR 0.001 operating point", HOSTILE_SCRIPT),
        "mode": "delta",
        "parent_run_id": "run-0002",
        "generation": 2,
        "erasure_note": "This run was rewritten by erasure (generation 2): erased candidates are not shown.",
        "audit_record": "audit-00000042",
        "new_only": False,
        "probes": (probe_a, probe_b, probe_c),
    }
    values |= kw
    return SheetRun(**values)  # type: ignore[arg-type]


N_CANDIDATES = 6
N_IMAGES = 1 + 3 + 6  # the plot, three probe thumbnails (one a placeholder), six crops (three placeholders)


class _Tags(HTMLParser):
    """Every start tag with its (unescaped) attributes."""

    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str | None]]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, dict(attrs)))


def tags_of(text: str) -> list[tuple[str, dict[str, str | None]]]:
    parser = _Tags()
    parser.feed(text)
    return parser.tags


def body_data(dom: str) -> dict[str, str]:
    body = next(attrs for tag, attrs in tags_of(dom) if tag == "body")
    return {k[len("data-") :]: v or "" for k, v in body.items() if k.startswith("data-")}


def write_probe_copy(html_path: Path) -> Path:
    text = html_path.read_text(encoding="utf-8")
    assert text.count("</body>") == 1
    probe = html_path.with_name("probe.html")
    probe.write_text(text.replace("</body>", PROBE_SCRIPT + "</body>"), encoding="utf-8")
    return probe


@pytest.fixture(scope="module")
def sheet_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = make_run()
    folder = tmp_path_factory.mktemp("sheet") / "run-0003"
    write_sheet(folder, render_sheet(run, score_plot(run)))
    write_probe_copy(folder / "index.html")
    return folder


@pytest.fixture(scope="module")
def browser_dom(sheet_dir: Path) -> Callable[..., dict[str, str]]:
    ensure_chromium()
    cache: dict[tuple[int, float], tuple[str, dict[str, str]]] = {}

    def get(width: int = 1280, scale: float = 1.0) -> dict[str, str]:
        if (width, scale) not in cache:
            dom = dump_dom(sheet_dir / "probe.html", width=width, height=900, scale=scale)
            data = body_data(dom)
            assert data.get("probe-done") == "1", dom[-2000:]
            cache[(width, scale)] = (dom, data)
        return cache[(width, scale)][1] | {"__dom__": cache[(width, scale)][0]}

    return get


# ------------------------------------------------------------------------------------------ pure Python


def test_every_text_is_escaped_and_nothing_is_fetched() -> None:
    run = make_run()
    text = render_sheet(run, score_plot(run))
    assert text.startswith("<!DOCTYPE html>")
    assert HOSTILE_SCRIPT not in text and HOSTILE_IMG not in text
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in text
    assert "&quot;onerror=alert(1)" in text
    assert text.count("<script>") == 1  # the sheet's own keyboard script, nothing injected
    tags = tags_of(text)
    assert not [t for t, a in tags if any(k.startswith("on") for k in a)]
    assert sum(1 for t, _ in tags if t == "img") == N_IMAGES
    assert not re.search(r"https?:", text, re.IGNORECASE)
    assert not re.search(r"(src|href)=\"(?!data:|#)", text)  # only data: images and in-page links
    csp = [a["content"] for t, a in tags if t == "meta" and a.get("http-equiv") == "Content-Security-Policy"]
    assert len(csp) == 1 and csp[0] is not None
    for directive in ("default-src 'none'", "img-src data:", "style-src 'unsafe-inline'", "script-src 'unsafe-inline'"):
        assert directive in csp[0]
    assert "<title>Candidate review sheet: run run-0003</title>" in text
    assert "Exported under audit record" in text and "audit-00000042" in text
    assert run.erasure_note is not None and run.erasure_note in text
    assert "calibrated: cal-0123abcd for FPIR 0.001 (measured, N=1,000,000)" in text
    assert "@media print" in text and "break-inside: avoid" in text and "@top-center" in text
    assert "repeat(auto-fill, minmax(min(12rem, 100%), 1fr))" in text


def test_cards_attributes_and_placeholders() -> None:
    run = make_run()
    tags = tags_of(render_sheet(run, None))
    articles = [a for t, a in tags if t == "article"]
    assert len(articles) == N_CANDIDATES
    assert all(a["class"] and "candidate" in a["class"] and a["tabindex"] == "0" for a in articles)
    assert [a["data-rank"] for a in articles] == ["1", "2", "3", "1", "2", "3"]
    assert [a["data-above-threshold"] for a in articles] == ["true", "true", "false", "true", "false", "false"]
    assert [a["data-new"] for a in articles] == ["true", "false", "unknown", "unknown", "true", "unknown"]
    assert articles[3]["data-gallery-id"] == "cd" * 16
    imgs = [a for t, a in tags if t == "img"]
    assert all((a["src"] or "").startswith("data:image/") for a in imgs)
    missing = [a for a in imgs if a.get("data-missing") == "true"]
    # the plot (None), the erased probe thumbnail, the unreadable shard, the GIF bytes, the imported vector
    assert len(missing) == 5
    alts = [a["alt"] or "" for a in missing]
    assert any("shard no longer readable: shards/00/ab.tar" in alt for alt in alts)
    assert any("crop is not a JPEG or PNG image" in alt for alt in alts)
    assert any("imported vector: no image" in alt for alt in alts)
    assert any(alt.startswith("probe probe-ccc3") and "probe image erased" in alt for alt in alts)
    captions = re.findall(r"<figcaption[^>]*>([^<]*)</figcaption>", render_sheet(run, None))
    for reason in ("shard no longer readable: shards/00/ab.tar", "imported vector: no image", "probe image erased"):
        assert reason in captions  # visible text too, not only the alt
    assert "crop is not a JPEG or PNG image" in captions
    text = render_sheet(run, None)
    assert "No candidates for this probe." in text
    assert "No score plot." in text


def test_header_variants() -> None:
    plain = render_sheet(make_run(calibration=None, generation=1, erasure_note=None, threshold_warnings=()), None)
    assert "not calibrated" in plain and "rewritten by erasure" not in plain and "Threshold warnings" not in plain
    assert "Only candidates new since the parent run" not in plain
    new_only = render_sheet(make_run(new_only=True), None)
    assert "Only candidates new since the parent run (run-0002) are shown" in new_only
    assert "Threshold warnings" in new_only


def test_score_plot_png_with_and_without_candidates() -> None:
    for run in (make_run(), make_run(probes=()), make_run(calibration=None, threshold=float("nan"))):
        png = score_plot(run)
        assert png.startswith(PNG_MAGIC)
        with Image.open(io.BytesIO(png)) as image:
            image.verify()
    with Image.open(io.BytesIO(score_plot(make_run(probes=())))) as image:
        assert image.size[0] > 600


def test_write_sheet_is_atomic(tmp_path: Path) -> None:
    folder = tmp_path / "deep" / "sheet"
    path = write_sheet(folder, "<!DOCTYPE html><p>one</p>")
    assert path == folder / "index.html" and path.read_text(encoding="utf-8") == "<!DOCTYPE html><p>one</p>"
    write_sheet(folder, "<!DOCTYPE html><p>two \u2713</p>")
    assert path.read_text(encoding="utf-8") == "<!DOCTYPE html><p>two \u2713</p>"
    assert sorted(os.listdir(folder)) == ["index.html"]  # no temp file left behind


def test_write_sheet_leaves_nothing_when_it_fails(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from pipelines import files

    def boom(src: str, dst: str) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(files.os, "replace", boom)
    with pytest.raises(OSError, match="disk full"):
        write_sheet(tmp_path, "<p>x</p>")
    assert os.listdir(tmp_path) == []


# --------------------------------------------------------------------------------------------- browser


def test_browser_sees_every_card_and_every_image(browser_dom: Callable[..., dict[str, str]]) -> None:
    data = browser_dom()
    assert data["images-loaded"] == f"{N_IMAGES}/{N_IMAGES}"
    assert data["first-text"] == NOTICE
    assert data["notice-visible"] == "true" and data["notice-box"].startswith("0/")
    assert data["onerror"] == "0" and data["scripts"] == "2"  # the sheet's and the probe's
    assert "pwned" not in data
    cards = json.loads(data["cards"])
    assert len(cards) == N_CANDIDATES
    assert [(c["probe"], c["rank"]) for c in cards] == [("probe-aaa1", str(r)) for r in (1, 2, 3)] + [
        (HOSTILE_ATTR, str(r)) for r in (1, 2, 3)
    ]
    assert [c["status"] for c in cards] == [
        "potential_candidate",
        "no_candidate",
        "unreviewed",
        "inconclusive",
        "confirmed_candidate",
        "unreviewed",
    ]
    assert all(c["tabindex"] == 0 and c["outline"] not in ("", "none") for c in cards)
    first = cards[0]
    assert first["alt"] == f"gallery face {'01' + 'ab' * 15}, candidate rank 1 for probe probe-aaa1"
    assert "0.8123" in first["text"] and "Above threshold" in first["text"] and "New since parent run" in first["text"]
    assert "Potential candidate" in first["text"] and "a second, different reviewer is needed" in first["text"]
    assert "Below threshold" in cards[2]["text"] and "shard no longer readable" in cards[2]["text"]
    assert HOSTILE_SCRIPT in cards[1]["text"]  # shown as text, never run
    assert HOSTILE_IMG in cards[3]["text"]
    assert "New since parent run" not in cards[1]["text"]
    # j, j, k, ArrowDown: first card, second, back to the first, second
    assert data["keys"] == "probe-aaa1#1,probe-aaa1#2,probe-aaa1#1,probe-aaa1#2"
    dom = data["__dom__"]
    assert not re.search(r"https?:", dom.split("<body", 1)[1].replace('xmlns="http://www.w3.org/', ""))


def test_browser_reflows_at_200_percent_zoom(browser_dom: Callable[..., dict[str, str]]) -> None:
    zoomed = browser_dom(width=640, scale=2.0)  # a 1280 px window at 200% zoom: 640 CSS px wide
    assert zoomed["overflow"] == "false", zoomed["widths"]
    assert zoomed["images-loaded"] == f"{N_IMAGES}/{N_IMAGES}"
    narrow = browser_dom(width=320, scale=1.0)  # WCAG reflow: 320 CSS px (400% of 1280)
    assert narrow["overflow"] == "false", narrow["widths"]


def test_screenshots(sheet_dir: Path, tmp_path: Path) -> None:
    ensure_chromium()
    normal = screenshot(sheet_dir / "index.html", tmp_path / "sheet.png", width=1280, height=1800)
    zoomed = screenshot(sheet_dir / "index.html", tmp_path / "sheet-200.png", width=640, height=1200, scale=2.0)
    with Image.open(normal) as image:
        assert image.size == (1280, 1800)
        pixels = np.asarray(image.convert("L"))
        assert pixels.std() > 10  # something was drawn
    with Image.open(zoomed) as image:
        assert image.size == (1280, 2400)


def test_browser_empty_sheet(tmp_path: Path) -> None:
    ensure_chromium()
    run = make_run(probes=(), new_only=True, calibration=None)
    write_sheet(tmp_path, render_sheet(run, score_plot(run)))
    data = body_data(dump_dom(write_probe_copy(tmp_path / "index.html")))
    assert data["images-loaded"] == "1/1" and data["first-text"] == NOTICE
    assert data["cards"] == "[]" and "keys" not in data


def test_screenshot_rejects_nothing_written(tmp_path: Path) -> None:
    """The helper's own contract: a valid PNG comes back, of the requested size."""
    ensure_chromium()
    page = tmp_path / "p.html"
    page.write_text("<!DOCTYPE html><p>hello</p>", encoding="utf-8")
    path = screenshot(page, tmp_path / "p.png", width=400, height=300)
    assert path.read_bytes().startswith(PNG_MAGIC)


def test_replace_keeps_records_frozen() -> None:
    run = make_run()
    with pytest.raises(AttributeError):
        run.run_id = "x"  # type: ignore[misc]
    assert replace(run, new_only=True).new_only


def test_missing_browser_skips_here_and_fails_under_ci(monkeypatch: pytest.MonkeyPatch) -> None:
    import browser

    monkeypatch.setattr(browser, "_cached", (None, "chromium is not on PATH (simulated)"))
    monkeypatch.delenv(browser.REQUIRE_ENV, raising=False)
    with pytest.raises(pytest.skip.Exception, match="GALLERYMATCH_REQUIRE_BROWSER=1"):
        browser.ensure_chromium()
    monkeypatch.setenv(browser.REQUIRE_ENV, "1")
    with pytest.raises(RuntimeError, match="forbids skipping"):
        browser.ensure_chromium()

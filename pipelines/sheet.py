"""The review sheet: one self-contained, offline HTML page of a run's candidate lists for human reviewers.

Engine-free: typed records in, text out. The job code reads a run (results, reviews, crops) and builds a
`SheetRun`; this module only renders it. Standard library and numpy only (matplotlib is imported lazily, by
`score_plot` alone); no storage, no engines, no network.

The page fetches nothing: every image is an inline `data:` URI (JPEG or PNG, told apart by their magic bytes;
anything else is shown as missing), the CSS and the small keyboard script are inline, and a Content-Security-
Policy meta forbids every fetch but `data:` images. Every piece of text from a record is HTML-escaped. The
notice that the page is a candidate list for human review, not an identification, opens the page and is
repeated at the top of every printed page (CSS page margin boxes).

Served pages (`gallerymatch serve`) are the same page with a `ReviewForm`: each card gets a small form whose buttons
post the reviewer's decision to the server (CSP `form-action 'self'` instead of `'none'`); the list of result sets
and the error pages (`render_run_list`, `render_message`) open with the same notice.
"""

from __future__ import annotations

import base64
import hashlib
import html
import io
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from pipelines.files import write_atomically

NOTICE = "Candidate list for human review; not an identification."
CSP = (
    "default-src 'none'; img-src data:; style-src 'unsafe-inline'; script-src 'unsafe-inline'; "
    "base-uri 'none'; form-action 'none'"
)
SERVED_CSP = (  # pages served by `gallerymatch serve`: forms may post back to the server, nowhere else
    "default-src 'none'; img-src data:; style-src 'unsafe-inline'; script-src 'unsafe-inline'; "
    "base-uri 'none'; form-action 'self'"
)
DECISIONS = ("potential_candidate", "no_candidate", "inconclusive")  # what a reviewer can post
JPEG_MAGIC = b"\xff\xd8\xff"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
REVIEW_LABELS = {
    "unreviewed": "Unreviewed",
    "potential_candidate": "Potential candidate",
    "no_candidate": "No candidate",
    "inconclusive": "Inconclusive",
    "confirmed_candidate": "Confirmed candidate",
}


@dataclass(frozen=True)
class CandidateCard:
    rank: int
    score: float
    above_threshold: bool
    gallery_id: str  # opaque id (hex)
    image_id: str | None  # opaque
    record_id: str | None  # importer's opaque id when the vector was imported
    source_id: str  # the registered source (never a person's name)
    review_status: (
        str  # effective status: unreviewed | potential_candidate | no_candidate | inconclusive | confirmed_candidate
    )
    review_detail: str  # e.g. "1 of 2 reviewers: potential_candidate (a second, different reviewer is needed)"
    new_since_parent: bool | None
    first_seen_run_id: str | None
    crop: bytes | None  # JPEG or PNG bytes of the gallery face crop (or whole-image thumbnail)
    crop_missing: str | None  # why there is no crop


@dataclass(frozen=True)
class ProbeCard:
    probe_id: str
    thumbnail: bytes | None  # JPEG/PNG bytes of the probe's face crop
    thumbnail_missing: str | None
    candidates: tuple[CandidateCard, ...]


@dataclass(frozen=True)
class SheetRun:
    run_id: str
    watchlist_id: str
    case_id: str
    purpose: str
    model_id: str
    matched_at: str
    top_k: int
    threshold: float
    calibration: str | None  # one line, e.g. "calibrated: cal-0123... for FPIR 0.001 (measured, N=1,000,000)"
    threshold_warnings: tuple[str, ...]
    mode: str  # full | delta
    parent_run_id: str | None
    generation: int  # > 1: the run was rewritten by erasure
    erasure_note: str | None
    audit_record: str  # the id of the audit record of this export, shown on the sheet
    new_only: bool
    probes: tuple[ProbeCard, ...]


@dataclass(frozen=True)
class ReviewForm:
    """A served page's review forms: where each card's decision posts, the session's CSRF token, who reviews."""

    action: str  # the URL (path) the forms post to, e.g. /runs/<run_id>/review
    csrf: str  # the session's CSRF token, sent back in every form
    reviewer: str  # the reviewer the server identified (shown; never taken from the page)
    home: str = "/"  # the list of result sets


@dataclass(frozen=True)
class RunSummary:
    """One line of the served list of result sets (ids and counts: no face is shown)."""

    run_id: str
    href: str  # the run's page
    case_id: str
    purpose: str
    watchlist_id: str
    candidates: int
    above_threshold: int
    matched_at: str


# --------------------------------------------------------------------------------------------------- helpers


def card_anchor(probe_id: str, rank: int) -> str:
    """The id of a candidate card on a served page (the server redirects back to it after a decision)."""
    return f"c-{hashlib.sha256(probe_id.encode()).hexdigest()[:16]}-{int(rank)}"


def esc(value: object) -> str:
    """Text (or a number) made safe for both element content and quoted attribute values."""
    return html.escape(str(value), quote=True)


def image_kind(data: bytes | None) -> str | None:
    """'image/jpeg' or 'image/png' by magic bytes; None for anything else (shown as missing)."""
    if not data:
        return None
    if data.startswith(JPEG_MAGIC):
        return "image/jpeg"
    if data.startswith(PNG_MAGIC):
        return "image/png"
    return None


def data_uri(data: bytes | None) -> str | None:
    """A `data:` URI of JPEG or PNG bytes; None when the bytes are neither."""
    kind = image_kind(data)
    if kind is None or data is None:
        return None
    return f"data:{kind};base64,{base64.b64encode(data).decode('ascii')}"


_PLACEHOLDER_SVG = (
    '<svg xmlns="http://www.w3.org/2000/svg" width="160" height="160" viewBox="0 0 160 160">'
    '<rect x="2" y="2" width="156" height="156" rx="8" fill="#f3f4f6" stroke="#6b7280" stroke-width="2"'
    ' stroke-dasharray="8 6"/>'
    '<circle cx="80" cy="62" r="22" fill="none" stroke="#6b7280" stroke-width="4"/>'
    '<path d="M38 128c6-22 22-34 42-34s36 12 42 34" fill="none" stroke="#6b7280" stroke-width="4"/>'
    '<path d="M30 30L130 130" stroke="#6b7280" stroke-width="4"/>'
    "</svg>"
)
PLACEHOLDER_URI = "data:image/svg+xml;base64," + base64.b64encode(_PLACEHOLDER_SVG.encode()).decode("ascii")


def _score(value: float) -> str:
    return f"{value:.4f}" if math.isfinite(value) else str(value)


def _css_string(text: str) -> str:
    """A CSS string literal: every character that is not a letter, digit or space is hex-escaped."""
    out = []
    for ch in text:
        out.append(ch if ch.isascii() and (ch.isalnum() or ch == " ") else f"\\{ord(ch):06x}")
    return '"' + "".join(out) + '"'


def _calibration_text(run: SheetRun) -> str:
    return run.calibration if run.calibration else "not calibrated"


def _all_scores(run: SheetRun) -> list[float]:
    return [c.score for p in run.probes for c in p.candidates if math.isfinite(c.score)]


# ------------------------------------------------------------------------------------------------ score plot


def score_plot(run: SheetRun) -> bytes:
    """A PNG histogram of every candidate's score on the sheet, with the threshold as a labelled vertical line.

    Standalone Figure on the Agg canvas (no pyplot, no global backend switch). Zero candidates: empty axes
    saying "no candidates".
    """
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    scores = np.asarray(_all_scores(run), dtype=np.float64)
    calibrated = "calibrated" if run.calibration else "not calibrated"
    fig = Figure(figsize=(8.0, 2.8), dpi=150)
    FigureCanvasAgg(fig)
    fig.subplots_adjust(left=0.08, right=0.76, bottom=0.18, top=0.86)
    ax = fig.add_subplot(1, 1, 1)
    ax.set_xlabel("score")
    ax.set_ylabel("candidates")
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)
    threshold = float(run.threshold)
    finite = math.isfinite(threshold)
    if scores.size == 0:
        ax.set_title("Scores of the candidates on this sheet", fontsize=10, loc="left", pad=8)
        ax.text(
            0.5,
            0.5,
            "no candidates",
            transform=ax.transAxes,
            ha="center",
            va="center",
            color="#374151",
            zorder=5,
            bbox={"facecolor": "white", "edgecolor": "#d1d5db", "boxstyle": "round,pad=0.4"},
        )
        ax.set_yticks([])
        if finite:
            ax.set_xlim(min(0.0, threshold - 0.1), max(1.0, threshold + 0.1))
    else:
        low = float(min(scores.min(), threshold if finite else scores.min()))
        high = float(max(scores.max(), threshold if finite else scores.max()))
        if high - low < 1e-6:
            low, high = low - 0.05, high + 0.05
        pad = (high - low) * 0.05
        edges = np.linspace(low - pad, high + pad, 31)
        below = scores[scores < threshold] if finite else scores
        above = scores[scores >= threshold] if finite else scores[:0]
        ax.hist(
            [below, above],
            bins=[float(e) for e in edges],
            stacked=True,
            color=["#9ca3af", "#1d4ed8"],
            label=[f"below threshold ({below.size})", f"at or above threshold ({above.size})"],
            edgecolor="white",
            linewidth=0.5,
        )
        ax.set_title(f"Scores of the {scores.size} candidates on this sheet", fontsize=10, loc="left", pad=8)
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylim(0, ax.get_ylim()[1] * 1.15)
    if finite:
        ax.axvline(
            threshold,
            color="#b91c1c",
            linestyle="--",
            linewidth=1.5,
            zorder=4,
            label=f"threshold {threshold:.4f}\n({calibrated})",
        )
        ax.annotate(  # the value on the line itself, too
            f"{threshold:.4f}",
            xy=(threshold, 1.0),
            xycoords=ax.get_xaxis_transform(),
            xytext=(3, -3),
            textcoords="offset points",
            ha="left",
            va="top",
            fontsize=8,
            color="#b91c1c",
        )
    else:
        ax.plot([], [], color="#b91c1c", linestyle="--", label=f"threshold not set ({calibrated})")
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)
    buf = io.BytesIO()
    try:
        fig.savefig(buf, format="png", metadata={"Software": None})
    finally:
        fig.clear()
    return buf.getvalue()


# ------------------------------------------------------------------------------------------------------ HTML

_STYLE = """
:root { --ink: #111827; --muted: #4b5563; --line: #d1d5db; --panel: #f9fafb; --accent: #1d4ed8;
  --above: #065f46; --above-bg: #ecfdf5; --below: #374151; --below-bg: #f3f4f6; --warn: #92400e;
  --warn-bg: #fffbeb; --focus: #1d4ed8; }
*, *::before, *::after { box-sizing: border-box; }
html { font-size: 100%; -webkit-text-size-adjust: 100%; }
body { margin: 0; color: var(--ink); background: #fff; line-height: 1.45;
  font-family: system-ui, -apple-system, "Segoe UI", Roboto, "Noto Sans", "DejaVu Sans", sans-serif; }
.notice { margin: 0; padding: 0.6rem 1rem; background: #fef3c7; color: #451a03; border-bottom: 0.2rem solid #b45309;
  font-weight: 700; text-align: center; }
.notice::before { content: "\\26A0"; margin-right: 0.5rem; }
.skip { position: absolute; left: 1rem; top: -10rem; background: #fff; color: var(--accent); padding: 0.5rem 1rem;
  border: 0.15rem solid var(--focus); border-radius: 0.3rem; z-index: 10; }
.skip:focus { top: 0.5rem; }
.page { max-width: 84rem; margin: 0 auto; padding: 1.25rem 1rem 3rem; }
a { color: var(--accent); }
a:focus, .candidate:focus, .probe:focus { outline: 0.2rem solid var(--focus); outline-offset: 0.15rem; }
.eyebrow { margin: 0; color: var(--muted); font-size: 0.85rem; letter-spacing: 0.06em; text-transform: uppercase; }
h1 { margin: 0.1rem 0 1rem; font-size: 1.6rem; line-height: 1.2; overflow-wrap: anywhere; }
h2 { font-size: 1.25rem; margin: 0 0 0.75rem; overflow-wrap: anywhere; }
h3 { font-size: 1rem; margin: 0; }
.facts { display: grid; grid-template-columns: repeat(auto-fill, minmax(min(15rem, 100%), 1fr));
  gap: 0.5rem 1.5rem; margin: 0 0 1rem; padding: 1rem; border: 0.0625rem solid var(--line); border-radius: 0.5rem;
  background: var(--panel); }
.facts div { min-width: 0; }
.facts dt { font-size: 0.78rem; color: var(--muted); text-transform: uppercase; letter-spacing: 0.04em; }
.facts dd { margin: 0; overflow-wrap: anywhere; }
.callout { margin: 0 0 1rem; padding: 0.6rem 1rem; border-left: 0.3rem solid var(--warn); background: var(--warn-bg);
  color: #451a03; border-radius: 0.25rem; overflow-wrap: anywhere; }
.callout ul { margin: 0.3rem 0 0; padding-left: 1.25rem; }
.callout.info { border-left-color: var(--accent); background: #eff6ff; color: #1e3a8a; }
.audit { color: var(--muted); margin: 0 0 1.25rem; overflow-wrap: anywhere; }
.plot { margin: 0 0 1.5rem; }
.plot img { display: block; width: 100%; max-width: 52rem; height: auto; border: 0.0625rem solid var(--line);
  border-radius: 0.5rem; }
.plot figcaption, .muted { color: var(--muted); font-size: 0.9rem; }
nav.index { margin: 0 0 1.5rem; }
nav.index ol { display: flex; flex-wrap: wrap; gap: 0.4rem; list-style: none; margin: 0.4rem 0 0; padding: 0; }
nav.index a { display: inline-block; padding: 0.2rem 0.6rem; border: 0.0625rem solid var(--line);
  border-radius: 1rem; text-decoration: none; overflow-wrap: anywhere; }
nav.index a:hover { background: #eff6ff; }
.probe { border-top: 0.15rem solid var(--ink); padding-top: 1rem; margin-top: 1.5rem; }
.probe-head { display: flex; flex-wrap: wrap; gap: 1rem; align-items: flex-start; margin-bottom: 1rem; }
.probe-head figure { margin: 0; width: 9rem; max-width: 100%; }
.probe-head img { width: 100%; aspect-ratio: 1; object-fit: contain; background: var(--below-bg);
  border: 0.15rem solid var(--ink); border-radius: 0.4rem; display: block; }
.probe-head .meta { flex: 1 1 14rem; min-width: 0; }
.cards { display: grid; grid-template-columns: repeat(auto-fill, minmax(min(12rem, 100%), 1fr)); gap: 1rem; }
.candidate { display: flex; flex-direction: column; min-width: 0; border: 0.0625rem solid var(--line);
  border-radius: 0.5rem; background: #fff; overflow: hidden; break-inside: avoid; page-break-inside: avoid; }
.candidate.above { border-top: 0.3rem solid var(--above); }
.candidate.below { border-top: 0.3rem dashed #9ca3af; }
.candidate figure { margin: 0; background: var(--below-bg); }
.candidate img { display: block; width: 100%; aspect-ratio: 1; object-fit: contain; }
.candidate figcaption { padding: 0.3rem 0.6rem; font-size: 0.8rem; color: var(--warn); background: var(--warn-bg);
  overflow-wrap: anywhere; }
.card-body { padding: 0.6rem 0.7rem 0.75rem; display: flex; flex-direction: column; gap: 0.35rem; }
.rank-row { display: flex; justify-content: space-between; align-items: baseline; gap: 0.5rem; flex-wrap: wrap; }
.score { font-variant-numeric: tabular-nums; font-weight: 700; font-size: 1.1rem; }
.marker { display: inline-block; font-size: 0.8rem; font-weight: 700; padding: 0.1rem 0.45rem; border-radius: 0.25rem; }
.marker.above { color: var(--above); background: var(--above-bg); border: 0.0625rem solid var(--above); }
.marker.below { color: var(--below); background: var(--below-bg); border: 0.0625rem dashed var(--below); }
.badge-new { display: inline-block; font-size: 0.78rem; font-weight: 700; color: #5b21b6; background: #f5f3ff;
  border: 0.0625rem solid #5b21b6; border-radius: 0.25rem; padding: 0.05rem 0.4rem; }
.review { font-size: 0.88rem; margin: 0; }
.review strong { display: inline-block; }
.review.status-potential_candidate strong, .review.status-confirmed_candidate strong { color: #1e3a8a; }
.review.status-no_candidate strong { color: #374151; }
.review.status-inconclusive strong { color: #92400e; }
.review .detail { display: block; color: var(--muted); font-size: 0.8rem; overflow-wrap: anywhere; }
.ids { margin: 0; font-size: 0.78rem; color: var(--muted); display: grid; grid-template-columns: auto 1fr;
  gap: 0.05rem 0.5rem; }
.ids dt { font-weight: 600; }
.ids dd { margin: 0; min-width: 0; overflow-wrap: anywhere; font-family: ui-monospace, "DejaVu Sans Mono", monospace; }
.empty { padding: 1rem; border: 0.0625rem dashed var(--line); border-radius: 0.5rem; color: var(--muted); }
.keys { color: var(--muted); font-size: 0.85rem; }
kbd { font-family: inherit; border: 0.0625rem solid var(--line); border-radius: 0.2rem; padding: 0 0.3rem; }
@page { size: A4; margin: 1.8cm 1.2cm 1.5cm; @top-center { content: NOTICE_CSS; font: 700 10pt sans-serif; }
  @bottom-right { content: "Page " counter(page) " of " counter(pages); font: 8pt sans-serif; } }
@media print {
  .skip, .keys, nav.index { display: none; }
  .notice { border: 0.1rem solid #000; background: none; color: #000; }
  .page { max-width: none; padding: 0; }
  .facts, .callout, .candidate, .plot img, .probe-head img { background: none; }
  .cards { grid-template-columns: repeat(4, 1fr); gap: 0.5rem; }
  .candidate, .probe-head, .plot, .facts { break-inside: avoid; page-break-inside: avoid; }
  .probe { break-before: auto; }
  h2 { break-after: avoid; }
  a { color: inherit; text-decoration: none; }
}
@media (prefers-reduced-motion: no-preference) { html { scroll-behavior: smooth; } }
"""

# j / k (and the down / up arrows while a card has the focus) move the focus between the cards in page order.
_SCRIPT = """
document.addEventListener("keydown", function (e) {
  if (e.altKey || e.ctrlKey || e.metaKey) return;
  var cards = Array.prototype.slice.call(document.querySelectorAll("article.candidate"));
  if (!cards.length) return;
  var i = cards.indexOf(document.activeElement), step = 0;
  if (e.key === "j" || (e.key === "ArrowDown" && i >= 0)) step = 1;
  else if (e.key === "k" || (e.key === "ArrowUp" && i >= 0)) step = -1;
  if (!step) return;
  e.preventDefault();
  var next = i < 0 ? (step > 0 ? 0 : cards.length - 1) : Math.min(cards.length - 1, Math.max(0, i + step));
  cards[next].focus();
});
"""


def _img(uri: str | None, alt: str, missing: str, css_class: str = "") -> tuple[str, str]:
    """An <img> (the image, or the placeholder with the reason in its alt) and the visible reason ('' if none)."""
    klass = f' class="{esc(css_class)}"' if css_class else ""
    if uri is not None:
        return f'<img{klass} src="{uri}" alt="{esc(alt)}">', ""
    return (
        f'<img{klass} src="{PLACEHOLDER_URI}" alt="{esc(f"{alt}: no image ({missing})")}" data-missing="true">',
        missing,
    )


def _missing_reason(data: bytes | None, stated: str | None, what: str) -> str:
    if data is not None and image_kind(data) is None:
        return f"{what} is not a JPEG or PNG image" + (f" ({stated})" if stated else "")
    return stated or f"no {what} available"


def _fact(label: str, value: str) -> str:
    return f"<div><dt>{esc(label)}</dt><dd>{esc(value)}</dd></div>"


def _header(run: SheetRun, n_candidates: int, n_above: int, review: ReviewForm | None = None) -> str:
    mode = run.mode
    if run.parent_run_id:
        mode = f"{run.mode} (parent run {run.parent_run_id})"
    threshold = f"{_score(run.threshold)} ({'calibrated' if run.calibration else 'not calibrated'})"
    facts = [
        ("Case", run.case_id),
        ("Purpose", run.purpose),
        ("Watchlist", run.watchlist_id),
        ("Model", run.model_id),
        ("Matched at", run.matched_at),
        ("Top K", str(run.top_k)),
        ("Threshold", threshold),
        ("Calibration", _calibration_text(run)),
        ("Mode", mode),
        ("Generation", str(run.generation)),
        ("Probes", str(len(run.probes))),
        ("Candidates shown", f"{n_candidates} ({n_above} at or above threshold)"),
    ]
    parts = [
        '<header class="run">',
        '<p class="eyebrow">Candidate review sheet</p>',
        f"<h1>Run {esc(run.run_id)}</h1>",
        '<dl class="facts">' + "".join(_fact(k, v) for k, v in facts) + "</dl>",
    ]
    if run.threshold_warnings:
        items = "".join(f"<li>{esc(w)}</li>" for w in run.threshold_warnings)
        parts.append(
            '<div class="callout warnings"><strong><span aria-hidden="true">&#9888; </span>Threshold warnings</strong>'
            f"<ul>{items}</ul></div>"
        )
    if run.generation > 1 or run.erasure_note:
        note = run.erasure_note or f"This run was rewritten by erasure (generation {run.generation})."
        parts.append(f'<p class="callout erasure">{esc(note)}</p>')
    if run.new_only:
        parent = f" ({run.parent_run_id})" if run.parent_run_id else ""
        parts.append(
            f'<p class="callout info new-only">Only candidates new since the parent run{esc(parent)} are shown; '
            "candidates already seen in the parent run are left out.</p>"
        )
    verb = "Viewed" if review is not None else "Exported"
    parts.append(f'<p class="audit">{verb} under audit record <code>{esc(run.audit_record)}</code></p>')
    parts.append("</header>")
    return "\n".join(parts)


def _plot(run: SheetRun, plot_png: bytes | None, n_candidates: int, n_above: int) -> str:
    calibrated = "calibrated" if run.calibration else "not calibrated"
    alt = (
        f"Histogram of the scores of the {n_candidates} candidates on this sheet; threshold "
        f"{_score(run.threshold)} ({calibrated}); {n_above} at or above the threshold."
    )
    uri = data_uri(plot_png) if image_kind(plot_png) == "image/png" else None
    if uri is None:
        img, _ = _img(None, "score histogram", "no score plot")
        return f'<figure class="plot">{img}<figcaption>No score plot.</figcaption></figure>'
    return f'<figure class="plot"><img src="{uri}" alt="{esc(alt)}"><figcaption>{esc(alt)}</figcaption></figure>'


def _candidate(card: CandidateCard, probe: ProbeCard, review: ReviewForm | None = None) -> str:
    above = "above" if card.above_threshold else "below"
    new = "unknown" if card.new_since_parent is None else ("true" if card.new_since_parent else "false")
    alt = f"gallery face {card.gallery_id}, candidate rank {card.rank} for probe {probe.probe_id}"
    uri = data_uri(card.crop)
    img, reason = _img(uri, alt, _missing_reason(card.crop, card.crop_missing, "crop") if uri is None else "")
    caption = f"<figcaption>{esc(reason)}</figcaption>" if reason else ""
    if card.above_threshold:
        marker = '<span class="marker above"><span aria-hidden="true">&#9650; </span>Above threshold</span>'
    else:
        marker = '<span class="marker below"><span aria-hidden="true">&#9661; </span>Below threshold</span>'
    badge = ""
    if card.new_since_parent:
        badge = '<span class="badge-new"><span aria-hidden="true">&#9733; </span>New since parent run</span>'
    status = REVIEW_LABELS.get(card.review_status, card.review_status)
    ids = [("Source", card.source_id), ("Gallery", card.gallery_id)]
    if card.image_id:
        ids.append(("Image", card.image_id))
    if card.record_id:
        ids.append(("Record", card.record_id))
    if card.first_seen_run_id:
        ids.append(("First seen", card.first_seen_run_id))
    id_list = "".join(f"<dt>{esc(k)}</dt><dd>{esc(v)}</dd>" for k, v in ids)
    label = f"Rank {card.rank}, score {_score(card.score)}, {above} threshold, review: {status}"
    anchor = f' id="{esc(card_anchor(probe.probe_id, card.rank))}"' if review is not None else ""
    form = _decision_form(card, probe, review) if review is not None else ""
    return (
        f'<article{anchor} class="candidate {above}" tabindex="0" data-rank="{esc(card.rank)}"'
        f' data-gallery-id="{esc(card.gallery_id)}" data-review-status="{esc(card.review_status)}"'
        f' data-above-threshold="{"true" if card.above_threshold else "false"}" data-new="{new}"'
        f' aria-label="{esc(label)}">'
        f"<figure>{img}{caption}</figure>"
        '<div class="card-body">'
        f'<div class="rank-row"><h3>Rank {esc(card.rank)}</h3>'
        f'<span class="score" title="score">{esc(_score(card.score))}</span></div>'
        f"<div>{marker} {badge}</div>"
        f'<p class="review status-{esc(card.review_status)}">Review: <strong>{esc(status)}</strong>'
        f'<span class="detail">{esc(card.review_detail)}</span></p>'
        f'<dl class="ids">{id_list}</dl>'
        f"{form}"
        "</div></article>"
    )


def _decision_form(card: CandidateCard, probe: ProbeCard, review: ReviewForm) -> str:
    """A served card's form: one button per decision; probe, rank and the CSRF token ride along hidden."""
    buttons = "".join(
        f'<button type="submit" name="status" value="{esc(d)}">{esc(REVIEW_LABELS[d])}</button>' for d in DECISIONS
    )
    label = f"Your decision on rank {card.rank} for probe {probe.probe_id}"
    return (
        f'<form class="decide" method="post" action="{esc(review.action)}" aria-label="{esc(label)}">'
        f'<input type="hidden" name="probe_id" value="{esc(probe.probe_id)}">'
        f'<input type="hidden" name="rank" value="{esc(card.rank)}">'
        f'<input type="hidden" name="csrf" value="{esc(review.csrf)}">'
        f'<span class="decide-label">Your decision:</span>{buttons}</form>'
    )


def _probe(index: int, probe: ProbeCard, review: ReviewForm | None = None) -> str:
    uri = data_uri(probe.thumbnail)
    reason = "" if uri is not None else _missing_reason(probe.thumbnail, probe.thumbnail_missing, "probe thumbnail")
    img, visible = _img(uri, f"probe {probe.probe_id}", reason)
    caption = f'<figcaption class="muted">{esc(visible)}</figcaption>' if visible else ""
    n = len(probe.candidates)
    n_above = sum(1 for c in probe.candidates if c.above_threshold)
    n_new = sum(1 for c in probe.candidates if c.new_since_parent)
    summary = f"{n} candidate{'s' if n != 1 else ''}, {n_above} at or above the threshold"
    if n_new:
        summary += f", {n_new} new since the parent run"
    if probe.candidates:
        body = '<div class="cards">' + "".join(_candidate(c, probe, review) for c in probe.candidates) + "</div>"
    else:
        body = '<p class="empty no-candidates">No candidates for this probe.</p>'
    return (
        f'<section class="probe" id="probe-{index}" aria-labelledby="probe-{index}-title" tabindex="-1"'
        f' data-probe-id="{esc(probe.probe_id)}">'
        f'<div class="probe-head"><figure>{img}{caption}</figure>'
        f'<div class="meta"><h2 id="probe-{index}-title">Probe {esc(probe.probe_id)}</h2>'
        f'<p class="muted">{esc(summary)}.</p></div></div>'
        f"{body}</section>"
    )


def render_sheet(run: SheetRun, plot_png: bytes | None, review: ReviewForm | None = None) -> str:
    """One self-contained HTML5 document (everything inline, nothing fetched) of a run's candidate lists.

    With `review` (served pages only): each card gets its decision form, the CSP lets forms post to the server
    (`form-action 'self'`), and a bar under the notice names the reviewer. Without it: the exported sheet."""
    n_candidates = sum(len(p.candidates) for p in run.probes)
    n_above = sum(1 for p in run.probes for c in p.candidates if c.above_threshold)
    first = "#probe-1" if run.probes else "#probes"
    index = "".join(
        f'<li><a href="#probe-{i}">{esc(p.probe_id)} <span class="muted">({len(p.candidates)})</span></a></li>'
        for i, p in enumerate(run.probes, start=1)
    )
    nav = (
        f'<nav class="index" aria-label="Probes"><strong>Probes</strong><ol>{index}</ol></nav>'
        if run.probes
        else '<p class="empty">This sheet has no probes.</p>'
    )
    sections = "\n".join(_probe(i, p, review) for i, p in enumerate(run.probes, start=1))
    style = _STYLE.replace("NOTICE_CSS", _css_string(NOTICE))
    csp, bar = CSP, []
    if review is not None:
        csp, style = SERVED_CSP, style + _SERVED_STYLE
        bar = [_reviewer_bar(review.reviewer, review.home)]
    return "\n".join(
        [
            "<!DOCTYPE html>",
            '<html lang="en">',
            "<head>",
            '<meta charset="utf-8">',
            f'<meta http-equiv="Content-Security-Policy" content="{esc(csp)}">',
            '<meta name="referrer" content="no-referrer">',
            '<meta name="viewport" content="width=device-width, initial-scale=1">',
            '<meta name="robots" content="noindex, nofollow">',
            f"<title>Candidate review sheet: run {esc(run.run_id)}</title>",
            f"<style>{style}</style>",
            "</head>",
            "<body>",
            f'<div class="notice" role="note">{esc(NOTICE)}</div>',
            f'<a class="skip" href="{first}">Skip to the first probe</a>',
            *bar,
            '<div class="page">',
            _header(run, n_candidates, n_above, review),
            "<main>",
            _plot(run, plot_png, n_candidates, n_above),
            nav,
            '<p class="keys">Keyboard: <kbd>Tab</kbd> or <kbd>j</kbd> / <kbd>k</kbd> move between candidates.</p>',
            f'<div id="probes" tabindex="-1">{sections}</div>',
            "</main>",
            "</div>",
            f"<script>{_SCRIPT}</script>",
            "</body>",
            "</html>",
            "",
        ]
    )


_SERVED_STYLE = """
.whoami { display: flex; flex-wrap: wrap; gap: 0.5rem 1.5rem; justify-content: space-between; max-width: 84rem;
  margin: 0 auto; padding: 0.5rem 1rem; color: var(--muted); overflow-wrap: anywhere; }
.decide { display: flex; flex-wrap: wrap; gap: 0.3rem; align-items: center; margin: 0.3rem 0 0;
  padding-top: 0.45rem; border-top: 0.0625rem solid var(--line); }
.decide-label { width: 100%; font-size: 0.8rem; color: var(--muted); }
.decide button { font: inherit; font-size: 0.8rem; padding: 0.25rem 0.5rem; border-radius: 0.3rem; cursor: pointer;
  border: 0.0625rem solid var(--accent); background: #fff; color: var(--accent); }
.decide button:hover { background: #eff6ff; }
.decide button:focus { outline: 0.2rem solid var(--focus); outline-offset: 0.1rem; }
table.runs { border-collapse: collapse; width: 100%; }
table.runs th, table.runs td { text-align: left; padding: 0.45rem 0.6rem; border-bottom: 0.0625rem solid var(--line); }
table.runs td { overflow-wrap: anywhere; }
table.runs td.num { text-align: right; font-variant-numeric: tabular-nums; }
.message { padding: 1rem; border-left: 0.3rem solid var(--warn); background: var(--warn-bg); overflow-wrap: anywhere; }
@media print { .whoami, .decide { display: none; } }
"""


def _reviewer_bar(reviewer: str, home: str = "/") -> str:
    return (
        f'<div class="whoami"><span>Reviewing as <strong>{esc(reviewer)}</strong> (views and decisions are audited)'
        f'</span><a href="{esc(home)}">All result sets</a></div>'
    )


def _served_page(title: str, body: str, reviewer: str | None = None) -> str:
    """A small served page (list, message) with the notice first and the served CSP."""
    style = _STYLE.replace("NOTICE_CSS", _css_string(NOTICE)) + _SERVED_STYLE
    return "\n".join(
        [
            "<!DOCTYPE html>",
            '<html lang="en">',
            "<head>",
            '<meta charset="utf-8">',
            f'<meta http-equiv="Content-Security-Policy" content="{esc(SERVED_CSP)}">',
            '<meta name="referrer" content="no-referrer">',
            '<meta name="viewport" content="width=device-width, initial-scale=1">',
            '<meta name="robots" content="noindex, nofollow">',
            f"<title>{esc(title)}</title>",
            f"<style>{style}</style>",
            "</head>",
            "<body>",
            f'<div class="notice" role="note">{esc(NOTICE)}</div>',
            *([_reviewer_bar(reviewer)] if reviewer is not None else []),
            f'<div class="page"><main>{body}</main></div>',
            "</body>",
            "</html>",
            "",
        ]
    )


def render_run_list(runs: Sequence[RunSummary], reviewer: str) -> str:
    """The served list of result sets, newest first: ids and counts, each run linked to its page."""
    head = (
        '<tr><th scope="col">Run</th><th scope="col">Case</th><th scope="col">Purpose</th>'
        '<th scope="col">Watchlist</th><th scope="col">Candidates</th><th scope="col">Above threshold</th>'
        '<th scope="col">Matched at</th></tr>'
    )
    rows = "".join(
        f'<tr data-run-id="{esc(r.run_id)}"><td><a href="{esc(r.href)}">{esc(r.run_id)}</a></td>'
        f"<td>{esc(r.case_id)}</td><td>{esc(r.purpose)}</td><td>{esc(r.watchlist_id)}</td>"
        f'<td class="num">{esc(r.candidates)}</td><td class="num">{esc(r.above_threshold)}</td>'
        f"<td>{esc(r.matched_at)}</td></tr>"
        for r in runs
    )
    table = (
        f'<table class="runs"><caption class="muted">{len(runs)} result set{"s" if len(runs) != 1 else ""}, '
        f"newest first</caption><thead>{head}</thead><tbody>{rows}</tbody></table>"
        if runs
        else '<p class="empty">No result sets yet.</p>'
    )
    body = '<p class="eyebrow">Candidate review</p><h1>Result sets</h1>' + table
    return _served_page("Candidate review: result sets", body, reviewer)


def render_message(title: str, message: str) -> str:
    """A served error or notice page: the notice first, then the message (escaped), nothing else."""
    body = f'<h1>{esc(title)}</h1><p class="message">{esc(message)}</p>'
    return _served_page(title, body)


def write_sheet(folder: Path, html_text: str) -> Path:
    """Write `index.html` into `folder` (created if needed) atomically: temp file beside it, fsync, replace."""
    data = html_text.encode("utf-8")
    return write_atomically(Path(folder) / "index.html", lambda handle: handle.write(data))

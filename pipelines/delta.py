"""Exact delta re-matching: whether a watchlist's last candidates can be merged with what the gallery gained
since, and the merge. Engine-free and storage-free.

Every candidate list is ordered by (score descending, gallery id ascending): a strict total order, because
scores are exact (`pipelines.matcher.exact_scores`) and gallery ids are unique. For any two sets of gallery
rows A and B, topK(A + B) = topK(topK(A) + topK(B)) under a strict order, with a row in both counted once
(it has the same score in both). So last night's top K over the gallery G, merged with tonight's top K over
the rows D written since, is tonight's top K over G + D, exactly, as long as last night's view of G is
still the gallery minus D: no row of it removed or replaced, the same model weights, the same probes, the
same minors rule, and K not raised (a lower K is a truncation; a threshold only re-flags). `full_reason`
says when that fails, and the watchlist then gets a full run.

Rows written since a version are found by a stamp every gallery write puts on its rows
(`written_after_version`, see `lance_tables.store.Gallery.upsert`): the table version the commit started
from. A row with stamp >= v was committed after version v; a row committed at or before v has stamp < v
(writers hold the lease, so no other commit falls between the stamp and the commit). Compaction (erasure)
rewrites files, never values, so the stamp survives it; a replaced row gets a new stamp.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from pipelines.matcher import ProbeSet, TopK, score_block

IMPORTED_WEIGHTS = "imported:"  # the weights digest of imported vectors starts so (their weights are unknown)
DELTA_BASIS = "written_after_version"  # the stamp column; manifests name it so older runs are told apart
Mode = Literal["delta", "full"]

# Why a watchlist got a full run instead of a delta (the manifest's `full_reason`).
FULL_REASONS = {
    "first_run": "the watchlist has no earlier result set",
    "parent_approximate": "the last run used an approximate index; only exact runs can be extended",
    "parent_untracked": "the last run predates delta tracking",
    "parent_rewritten": "the last run's result set was rewritten by an erasure",
    "parent_unreadable": "the last run's result set could not be read",
    "gallery_recreated": "the gallery table was re-created since the last run",
    "top_k_raised": "top_k was raised since the last run",
    "probes_changed": "the watchlist's probes changed since the last run",
    "minors_rule_changed": "the rule for rows flagged minor changed since the last run",
    "weights_changed": "gallery rows made with other model weights were added since the last run",
    "gallery_changed": "candidates of the last run were erased or replaced in the gallery since",
    "untracked_writes": "rows were written to the gallery without a write stamp since the last run",
}


@dataclass(frozen=True)
class RunBasis:
    """What a finished run's candidates were computed from (read from its manifest)."""

    run_id: str
    gallery_table: str
    gallery_version: int
    top_k: int
    threshold: float
    method: str
    probes_digest: str | None
    gallery_filter: str | None
    gallery_weights: tuple[str, ...] | None
    delta_basis: str | None
    rewritten: bool
    gallery_rows: int | None = None  # rows of the model in the table at gallery_version (all, minors too)
    unstamped_rows: int | None = None  # of which without a write stamp (written before stamps existed)

    @classmethod
    def from_manifest(cls, m: dict[str, Any]) -> RunBasis:
        weights = m.get("gallery_weights")
        return cls(
            run_id=str(m["run_id"]),
            gallery_table=str(m.get("gallery_table", "")),
            gallery_version=int(m.get("gallery_version", 0)),
            top_k=int(m.get("top_k", 0)),
            threshold=float(m.get("threshold", 0.0)),
            method=str(m.get("method", "exact")),
            probes_digest=m.get("probes_digest"),
            gallery_filter=m.get("gallery_filter"),
            gallery_weights=tuple(weights) if isinstance(weights, list) else None,
            delta_basis=m.get("delta_basis"),
            rewritten=bool(m.get("rewritten_after_erasure")) or int(m.get("generation", 1)) > 1,
            gallery_rows=int(m["gallery_rows"]) if m.get("gallery_rows") is not None else None,
            unstamped_rows=int(m["unstamped_rows"]) if m.get("unstamped_rows") is not None else None,
        )


@dataclass(frozen=True)
class Tonight:
    """The watchlist and its gallery as they are now."""

    gallery_table: str
    gallery_version: int
    top_k: int
    threshold: float
    probes_digest: str
    gallery_filter: str


def full_reason(parent: RunBasis | None, now: Tonight) -> str | None:
    """Why this watchlist cannot be extended from its last run (a key of FULL_REASONS), or None.

    The checks that need the gallery's rows (weights, removed candidates) come later, in the job."""
    if parent is None:
        return "first_run"
    if parent.method != "exact":
        return "parent_approximate"
    if parent.delta_basis != DELTA_BASIS or parent.probes_digest is None or parent.gallery_weights is None:
        return "parent_untracked"
    if parent.rewritten:
        return "parent_rewritten"
    if parent.gallery_table != now.gallery_table or parent.gallery_version > now.gallery_version:
        return "gallery_recreated"
    if now.top_k > parent.top_k:
        return "top_k_raised"
    if parent.probes_digest != now.probes_digest:
        return "probes_changed"
    if parent.gallery_filter != now.gallery_filter:
        return "minors_rule_changed"
    return None


def model_weights(digests: Any) -> set[str]:
    """The weights digests that name real weights (imported vectors carry their file's digest instead)."""
    return {str(d) for d in digests if d is not None and not str(d).startswith(IMPORTED_WEIGHTS)}


def probes_digest(probe_ids: list[str], vectors: np.ndarray, weights_digest: str) -> str:
    """Identifies a watchlist's probes: ids, the exact vector bytes, and the weights they were made with."""
    h = hashlib.sha256(weights_digest.encode())
    for probe_id, vector in zip(probe_ids, np.asarray(vectors, dtype=np.float32), strict=True):
        h.update(probe_id.encode() + b"\0" + np.ascontiguousarray(vector).tobytes())
    return h.hexdigest()


@dataclass(frozen=True)
class Candidate:
    """One ranked candidate of one probe, as a result row names it."""

    probe_id: str
    gallery_id: str
    score: float  # a float32 value (exact score)
    image_id: str | None
    record_id: str | None
    source_id: str
    subject_id: str | None
    first_seen_run_id: str | None = None  # the run that first listed this pair (None: not listed before)

    @property
    def key(self) -> tuple[float, str]:
        return (-self.score, self.gallery_id)


def top_candidates(candidates: list[Candidate], k: int) -> list[Candidate]:
    """The k first by (score desc, gallery id asc); a gallery id listed twice counts once."""
    seen: set[str] = set()
    out: list[Candidate] = []
    for c in sorted(candidates, key=lambda c: c.key):
        if c.gallery_id in seen:
            continue
        seen.add(c.gallery_id)
        out.append(c)
        if len(out) == k:
            break
    return out


def merge(parent: list[Candidate], delta: list[Candidate], k: int) -> list[Candidate]:
    """Tonight's top k of one probe from the last run's list and the delta's. A row in both (the delta may
    overlap the last run's view) has the same score in both; the last run's entry, listed first, is kept
    with the run it was first seen in."""
    return top_candidates(parent + delta, k)


def with_history(ranked: list[Candidate], first_seen: dict[tuple[str, str], str]) -> list[Candidate]:
    """Candidates of a full run, each with the run that first listed its (probe, gallery row) pair, if any."""
    from dataclasses import replace

    return [replace(c, first_seen_run_id=first_seen.get((c.probe_id, c.gallery_id))) for c in ranked]


@dataclass(frozen=True)
class DeltaBlock:
    """Rows of the delta: vectors with their row ids, minor flags, write stamps and weights digests."""

    vectors: np.ndarray
    rowids: np.ndarray
    minor: np.ndarray
    stamp: np.ndarray
    weights: np.ndarray


@dataclass
class DeltaGroup:
    """The watchlists of one model and one minors rule, scanned together: their probes stacked into one
    matrix, one k (the largest of theirs: each watchlist's own top K and its ties are within it)."""

    allow_minors: bool
    probes: np.ndarray
    k: int
    device: str = "cpu"
    top: TopK = field(init=False)
    _queries: ProbeSet = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.top = TopK(len(self.probes), self.k)
        from pipelines.kernels import worker_device

        self._queries = ProbeSet.build(self.probes, worker_device(self.device))

    def add(self, block: DeltaBlock) -> None:
        keep = slice(None) if self.allow_minors else ~block.minor
        vectors, rowids = block.vectors[keep], block.rowids[keep]
        if len(rowids) and len(self.probes):
            self.top.add(*score_block(self._queries, self.top, np.ascontiguousarray(vectors), rowids))

    def eligible(self, block: DeltaBlock) -> np.ndarray:
        """Which rows of the block this group's watchlists may see."""
        return np.ones(len(block.rowids), bool) if self.allow_minors else ~block.minor


def scan_delta(blocks: Any, groups: list[DeltaGroup], since: dict[str, tuple[int, int]]) -> dict[str, int]:
    """One pass over the delta for every group; returns, per watchlist, how many rows written after its own
    last run it may see (`since`: watchlist id -> (group index, from version)). 0 means nothing is new."""
    fresh = dict.fromkeys(since, 0)
    for block in blocks:
        for group in groups:
            group.add(block)
        for watchlist_id, (index, version) in since.items():
            seen = groups[index].eligible(block) & (block.stamp >= version)
            fresh[watchlist_id] += int(np.count_nonzero(seen))
    for group in groups:
        group.top.compact()
    return fresh

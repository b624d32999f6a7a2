"""The reviews table: human decisions on candidates, kept apart from the immutable result files."""

from __future__ import annotations

import datetime as dt
import hashlib
from collections import defaultdict
from typing import Any

import pyarrow as pa

from lance_tables.erasure import delete_keys
from lance_tables.store import Gallery
from pipelines.errors import Refused
from pipelines.schemas import REVIEWS
from pipelines.sql import sql_list

REVIEW_INPUTS = ("potential_candidate", "no_candidate", "inconclusive")
CONFIRMED = "confirmed_candidate"
UNREVIEWED = "unreviewed"


def add_review(gallery: Gallery, candidate: dict[str, Any], status: str, reviewer: str) -> dict[str, Any]:
    """Append one reviewer's decision (a later decision by the same reviewer supersedes theirs)."""
    if status not in REVIEW_INPUTS:
        raise Refused(
            f"--status must be one of {', '.join(REVIEW_INPUTS)}; {CONFIRMED!r} follows from two "
            "different reviewers marking potential_candidate, and there is no 'identified' status"
        )
    reviewer = normalise_reviewer(reviewer)
    now = dt.datetime.now(dt.UTC)
    key = f"{candidate['run_id']}|{candidate['probe_id']}|{candidate['rank']}|{reviewer}|{now.isoformat()}"
    row = {
        "review_id": hashlib.sha256(key.encode()).hexdigest()[:32],
        "run_id": candidate["run_id"],
        "probe_id": candidate["probe_id"],
        "rank": candidate["rank"],
        "gallery_id": candidate["gallery_id"],
        "status": status,
        "reviewer": reviewer,
        "reviewed_at": now,
    }
    gallery.ensure("reviews", REVIEWS).add(pa.Table.from_pylist([row], schema=REVIEWS))
    return row


def effective_statuses(gallery: Gallery) -> dict[tuple[str, str, int], str]:
    """(run_id, probe_id, rank) -> status under the two-person rule."""
    return {key: decide(statuses) for key, statuses in reviewer_decisions(gallery).items()}


def reviewer_decisions(gallery: Gallery) -> dict[tuple[str, str, int], list[str]]:
    """(run_id, probe_id, rank) -> each distinct reviewer's latest decision (who decided is not returned)."""
    table = gallery.open("reviews")
    if table is None:
        return {}
    latest: dict[tuple[str, str, int], dict[str, tuple[dt.datetime, str]]] = defaultdict(dict)
    for r in table.search().limit(None).to_arrow().to_pylist():
        key = (r["run_id"], r["probe_id"], r["rank"])
        who = normalise_reviewer(r["reviewer"])  # rows written before ids were normalised count once too
        seen = latest[key].get(who)
        if seen is None or r["reviewed_at"] >= seen[0]:
            latest[key][who] = (r["reviewed_at"], r["status"])
    return {key: sorted(s for _, s in by.values()) for key, by in latest.items()}


def two_person_state(statuses: list[str]) -> str:
    """The two-person rule's state of one candidate, in words, from its reviewers' latest decisions."""
    if not statuses:
        return "no review yet: two different reviewers are needed to confirm"
    status = decide(statuses)
    counts = ", ".join(f"{statuses.count(s)} {s}" for s in sorted(set(statuses)))
    who = f"{len(statuses)} reviewer{'s' if len(statuses) > 1 else ''} ({counts})"
    if status == CONFIRMED:
        return f"{who}: confirmed as a candidate by two different reviewers (still not an identification)"
    if status == "potential_candidate":
        return f"{who}: a second, different reviewer is needed to confirm"
    if status == "inconclusive":
        return f"{who}: reviewers disagree or are unsure; it stays open"
    return f"{who}"


def decide(statuses: list[str]) -> str:
    """Each reviewer's latest decision -> the candidate's status. Confirmation needs two different people."""
    distinct = set(statuses)
    if {"potential_candidate", "no_candidate"} <= distinct:
        return "inconclusive"  # reviewers disagree: the candidate stays open, never confirmed
    if statuses.count("potential_candidate") >= 2:
        return CONFIRMED
    if len(distinct) == 1:
        return statuses[0]
    return "inconclusive"


def normalise_reviewer(reviewer: str) -> str:
    """One person, one id: case and surrounding whitespace never make a second reviewer."""
    return reviewer.strip().casefold()


def delete_reviews(gallery: Gallery, gallery_ids: list[str], run_probes: list[tuple[str, str]]) -> int:
    """Erasure: decisions on erased candidates, and on erased probes as (run_id, probe_id) (idempotent)."""
    table = gallery.open("reviews")
    if table is None:
        return 0
    before = table.count_rows()
    delete_keys(gallery, "reviews", "gallery_id", gallery_ids)
    for start in range(0, len(run_probes), 100):
        pairs = run_probes[start : start + 100]
        table.delete(" OR ".join(f"(run_id IN {sql_list([r])} AND probe_id IN {sql_list([p])})" for r, p in pairs))
    return int(before - table.count_rows())

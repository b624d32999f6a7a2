"""`gallerymatch`: a thin command line over the library; --json prints exactly one JSON object."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, cast

import typer

from pipelines.errors import GalleryMatchError

if TYPE_CHECKING:
    from jobs.ingest import Engine
    from pipelines.task import Modality

if TYPE_CHECKING:
    from jobs.ingest import Engine
    from pipelines.task import Modality

app = typer.Typer(help=__doc__, no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)
sources_app = typer.Typer(help="Register and list gallery sources (provenance and legal basis).", no_args_is_help=True)
app.add_typer(sources_app, name="sources")

JsonOpt = Annotated[bool, typer.Option("--json", help="print one JSON object on stdout")]
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
    from lance_tables.sources import add_source
    from lance_tables.store import Gallery

    gallery = Gallery(_settings().lance_dir)
    row = add_source(gallery, source_id, channel, legal_basis, terms, registered_by)
    verb = "registered" if row["created"] else "already registered (same provenance)"
    _emit(row, as_json, lambda r: f"source {r['source_id']} {verb}: channel={r['channel']}")


@sources_app.command("list")
def sources_list(as_json: JsonOpt = False) -> None:
    """List registered sources."""
    from lance_tables.sources import list_sources
    from lance_tables.store import Gallery

    rows = list_sources(Gallery(_settings().lance_dir))
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
    shards_dir: Path,
    source: Annotated[str, typer.Option("--source", help="a registered source id")],
    rows_per_shard: Annotated[int | None, typer.Option(min=1, help="images per shard")] = None,
    metadata: Annotated[Path | None, typer.Option(help="CSV: path, subject_id, minor, captured_at")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Pack a folder of image files into Parquet image shards (bytes as-is, one row per distinct sha256)."""
    from dataclasses import asdict

    from lance_tables.sources import require_registered
    from lance_tables.store import Gallery
    from pipelines.shards import pack_folder, read_metadata_csv

    settings = _settings()
    require_registered(Gallery(settings.lance_dir), {source})
    meta = read_metadata_csv(metadata) if metadata else None
    report = pack_folder(
        images_dir, shards_dir, source, rows_per_shard or settings.rows_per_shard, settings.max_image_bytes, meta
    )
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
    shards_dir: Path,
    modality: ModalityOpt = "all",
    engine: Annotated[
        str, typer.Option(help="ray (default) | local (in-process reference) | modal (needs an account)")
    ] = "ray",
    face_model: Annotated[str | None, typer.Option(help="face model id (default from settings)")] = None,
    image_model: Annotated[str | None, typer.Option(help="image model id (default from settings)")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Embed image shards into the gallery (faces and whole images); resumable, reruns skip finished shards."""
    from jobs.ingest import run_ingest

    _choice("--modality", modality, ("face", "image", "all"))
    _choice("--engine", engine, ("local", "ray", "modal"))
    result = run_ingest(
        _settings(),
        shards_dir,
        cast("Modality", modality),
        cast("Engine", engine),
        face_model,
        image_model,
        progress=sys.stderr.isatty(),
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
    file: Path,
    source: Annotated[str, typer.Option("--source", help="a registered source id")],
    model_id: Annotated[str, typer.Option("--model-id", help="the model that made the vectors")],
    modality: Annotated[str, typer.Option(help="face | image: the table the vectors go to")] = "face",
    dim: Annotated[int | None, typer.Option(help="vector width, for a model gallerymatch does not know")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Import precomputed embeddings (Parquet: record_id, embedding, optional subject_id, minor)."""
    from jobs.import_embeddings import run_import

    _choice("--modality", modality, ("face", "image"))
    result = run_import(_settings(), file, source, model_id, modality, dim)  # type: ignore[arg-type]
    _emit(
        result,
        as_json,
        lambda r: (
            f"imported {r['imported']} of {r['rows']} rows; quarantined {r['quarantined']} {r['quarantine_reasons']}"
        ),
    )


@app.command()
def models(as_json: JsonOpt = False) -> None:
    """Known model ids, vector widths, and whether their weights are available here without a download."""
    from pipelines.models import model_catalogue

    settings = _settings()
    rows = model_catalogue(settings.resolved_models_dir, [settings.face_model, settings.image_model])
    _emit(
        {"models_dir": str(settings.resolved_models_dir), "models": rows},
        as_json,
        lambda r: "\n".join(
            f"{m['model_id']:<40} {m['kind']:<6} {m['dim']:>5}d  "
            + ("UNTRAINED (tests/demo only)" if m["untrained"] else ("weights: " + (m["weights"] or "MISSING")))
            for m in r["models"]
        ),
    )


@app.command()
def status(as_json: JsonOpt = False) -> None:
    """Tables, versions and counts of the gallery under GALLERYMATCH_HOME."""
    from jobs.status import gallery_status

    result = gallery_status(_settings())
    _emit(result, as_json, _lines)


def _choice(flag: str, value: str, valid: tuple[str, ...]) -> None:
    if value not in valid:
        raise GalleryMatchError(f"{flag} must be one of {', '.join(valid)}; got {value!r}")


def main() -> None:
    try:
        app(standalone_mode=False)
    except GalleryMatchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(exc.exit_code)
    except (typer.Exit, SystemExit) as exc:
        sys.exit(getattr(exc, "exit_code", None) or getattr(exc, "code", 0) or 0)
    except Exception as exc:  # click usage errors and the like
        import click

        if isinstance(exc, click.ClickException):
            exc.show()
            sys.exit(exc.exit_code)
        if isinstance(exc, click.exceptions.Abort):
            sys.exit(130)
        raise

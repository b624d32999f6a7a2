"""Accuracy commands: `evaluate` and `calibrate` (registered on the main `gallerymatch` app)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

JsonOpt = Annotated[bool, typer.Option("--json", help="print one JSON object on stdout")]
NOTICE = "Candidates for human review, never identifications: a threshold bounds false positives, it proves nothing."


def _settings() -> Any:
    from pipelines.settings import load_settings

    return load_settings()


def _rate(value: Any) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def evaluate(
    labelled_dir: Path,
    model_id: Annotated[str, typer.Option(help="the face model to evaluate")],
    gallery_size: Annotated[
        int | None, typer.Option(help="also estimate thresholds for an operational gallery of N (from the 1:1 FMR)")
    ] = None,
    plot: Annotated[Path | None, typer.Option(help="write a DET plot with score histograms (PNG)")] = None,
    requested_by: Annotated[
        str | None, typer.Option(help="keep the figures for `calibrate` (audited), under this requester id")
    ] = None,
    progress: Annotated[bool, typer.Option(help="a progress bar on stderr")] = True,
    as_json: JsonOpt = False,
) -> None:
    """NIST FRTE 1:N accuracy on LABELLED_DIR: one sub-folder of photos per identity (a set you hold)."""
    from jobs.accuracy import evaluate as run

    r = run(_settings(), labelled_dir, model_id, gallery_size, plot, requested_by, progress)
    if as_json:
        print(json.dumps(r, default=str, sort_keys=True))
        return
    lines = [
        f"{r['model_id']} ({r['weights_digest'][:23]}...) on {r['identities']} identities, {r['photos']} photos",
        f"  enrolled {r['enrolled']}; mated searches {r['mated_searches']} ({r['mated_failed']} without a face: "
        f"misses); non-mated searches {r['non_mated_searches']}; failed to enrol {r['failed_to_enrol']} "
        f"{r['failed_to_enrol_reasons'] or ''}",
        f"  rank-1 {_rate(r['rank1'])}  rank-5 {_rate(r['rank5'])}  (investigation mode, no threshold)",
    ]
    for key, threshold in r["threshold_at_fpir"].items():
        flag = "" if r["resolvable"][key] else "  (NOT resolvable: too few non-mated searches)"
        t = "n/a" if threshold is None else f"{threshold:.4f}"
        lines.append(f"  FPIR {key}: threshold {t}, FNIR {_rate(r['fnir_at_fpir'][key])}{flag}")
    lines.append(f"  1:1 EER {_rate(r['eer'])}  AUC {_rate(r['auc'])}")
    if "operational" in r:
        op = r["operational"]
        for key in r["threshold_at_fpir"]:
            e = op[key]
            t = "n/a" if e["threshold"] is None else f"{e['threshold']:.4f}"
            flag = "" if e["resolvable"] else "  (NOT resolvable from this set)"
            lines.append(f"  ESTIMATE at N={op['gallery_size']}: FPIR {key}: threshold {t}{flag}")
    if r.get("plot"):
        lines.append(f"  plot: {r['plot']}")
    lines.append(f"  kept as {r['evaluation_id']}" if r["evaluation_id"] else "  not kept (give --requested-by)")
    lines.append(r["notice"])
    print("\n".join(lines))


def calibrate(
    model_id: Annotated[str, typer.Option(help="the face model whose gallery rows are calibrated")],
    target_fpir: Annotated[float, typer.Option(help="the false-positive identification rate to hold, e.g. 0.001")],
    requested_by: Annotated[str, typer.Option(help="opaque id of who runs the calibration")],
    non_mated: Annotated[
        Path | None, typer.Option(help="photos of people known not to be in the gallery: measure, not estimate")
    ] = None,
    progress: Annotated[bool, typer.Option(help="a progress bar on stderr")] = True,
    as_json: JsonOpt = False,
) -> None:
    """A threshold for a target FPIR at the gallery's real size (measured, or estimated); recorded, audited."""
    from jobs.accuracy import calibrate as run

    r = run(_settings(), model_id, target_fpir, requested_by, non_mated, progress)
    if as_json:
        print(json.dumps(r, default=str, sort_keys=True))
        return
    fnir = "unknown" if r["fnir"] is None else f"{r['fnir']:.4f} (evaluation {r['fnir_source']})"
    lines = [
        f"calibration {r['calibration_id']} ({r['method']}): {r['model_id']} at N={r['gallery_rows']} "
        f"(faces v{r['gallery_version']})",
        f"  threshold {r['threshold']:.4f} for FPIR {r['target_fpir']:g}: FPIR {r['fpir']:.3g} "
        f"(95% CI {r['fpir_low']:.3g}-{r['fpir_high']:.3g}, {r['probe_count']} "
        + ("non-mated searches" if r["method"] == "measured" else "impostor pairs")
        + f"); FNIR {fnir}",
        f"  use it: gallerymatch watchlist submit ... --threshold calibrated:{r['calibration_id']}",
        *[f"WARNING: {w}" for w in r["warnings"]],
        NOTICE,
    ]
    print("\n".join(lines))


def register(app: typer.Typer) -> None:
    app.command()(evaluate)
    app.command()(calibrate)

"""The deployable Modal app: the Modal engine's workers, the nightly on a schedule, and retention on demand.

Nothing in the project imports this module; it imports the project. The workers, their image and the way a job
drives them belong to the engine (`pipelines/engines/modal.py`); this wrapper adds what a deployment needs:

- `modal deploy infra/modal_app.py`: the workers, and `nightly` every day at 02:00 UTC (`NIGHTLY_CRON`):
  retention, then every open watchlist re-matched against what the gallery gained since its last run
  (`gallerymatch nightly`). The home and its credentials come from the Modal secret `gallerymatch`:
  GALLERYMATCH_HOME=s3://bucket/prefix, the AWS_* variables (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY,
  AWS_REGION; AWS_ENDPOINT_URL for an S3-compatible store) and GALLERYMATCH_AUDIT_KEY_DIR=/audit-keys (the
  audit signing key and its witness, on a Modal Volume of their own, outside the home);
- `modal run infra/modal_app.py::nightly` or `::retention`: the same jobs once, now, in a container;
- `modal run infra/modal_app.py --shards-dir s3://...`: the ingest job with Modal as the engine (the same as
  `gallerymatch ingest SHARDS --engine modal`).

The nightly matches in its own container (`NIGHTLY_ENGINE = "local"`): it already runs inside Modal, so the
engine's workers would need a second, nested app run for nothing but a fan-out; most of a night is one pass
over the gallery's delta, done in this process whatever the engine. A gallery too large for one container's
full runs is matched from a driver outside Modal: `gallerymatch nightly --engine modal` (one app run for the
night, one `MatchWorker` call per fragment range) or `--engine ray`.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import modal

from pipelines.engines.modal import app as ingest_app
from pipelines.engines.modal import image as engine_image
from pipelines.errors import Refused
from pipelines.settings import Settings

app = modal.App("gallerymatch")
app.include(ingest_app)

jobs_image = engine_image.add_local_python_source("jobs", "lance_tables", "infra")
SECRET = "gallerymatch"
AUDIT_KEYS = "/audit-keys"
audit_keys = modal.Volume.from_name("gallerymatch-audit-keys", create_if_missing=True)

NIGHTLY_CRON = "0 2 * * *"  # 02:00 UTC every day; the nightly runs retention itself, first
NIGHTLY_ENGINE = "local"  # in this container: see the module's docstring
NIGHTLY_CPU = 8.0
NIGHTLY_MEMORY_MIB = 32 * 1024
NIGHTLY_TIMEOUT_S = 6 * 3600  # a night's budget; a killed night is finished by the next one (see jobs.nightly)


def deployment_problems(settings: Settings, audit_mount: str = AUDIT_KEYS) -> list[str]:
    """What makes a scheduled container's run useless or harmful: a home on the container's own disk (gone
    when it stops: every night would start an empty gallery), or an audit key outside the volume (a new key
    each night, so the chain's checkpoints could never be verified against each other)."""
    problems = []
    if not settings.home_uri.startswith("s3://"):
        problems.append(
            f"GALLERYMATCH_HOME is {settings.home_uri!r}: set it to an s3:// URI in the Modal secret {SECRET!r}"
        )
    keys = Path(settings.resolved_audit_key_dir)
    if keys != Path(audit_mount) and Path(audit_mount) not in keys.parents:
        problems.append(
            f"GALLERYMATCH_AUDIT_KEY_DIR is {str(keys)!r}: set it to {audit_mount} (the volume) in the Modal secret "
            f"{SECRET!r}"
        )
    return problems


def _in_container() -> bool:
    return not modal.is_local()


@contextmanager
def _deployed_settings() -> Iterator[Settings]:
    """The settings of a scheduled job. In a container: refused unless they point at durable places, and the
    audit-key volume reloaded before and committed after (also after a failure: the records written stay
    witnessed). In-process (`.local()`), the caller's settings as they are."""
    from pipelines.settings import load_settings

    settings = load_settings()
    in_container = _in_container()
    if in_container:
        problems = deployment_problems(settings, AUDIT_KEYS)
        if problems:
            raise Refused("; ".join(problems))
        audit_keys.reload()
    try:
        yield settings
    finally:
        if in_container:
            audit_keys.commit()


@app.function(
    image=jobs_image,
    schedule=modal.Cron(NIGHTLY_CRON, timezone="UTC"),
    secrets=[modal.Secret.from_name(SECRET)],
    volumes={AUDIT_KEYS: audit_keys},
    cpu=NIGHTLY_CPU,
    memory=NIGHTLY_MEMORY_MIB,
    timeout=NIGHTLY_TIMEOUT_S,
)
def nightly() -> dict[str, Any]:
    """`gallerymatch nightly`, on schedule: retention, then the night's re-matches; its JSON-ready summary."""
    from jobs.nightly import run_nightly

    with _deployed_settings() as settings:
        return run_nightly(settings, engine=NIGHTLY_ENGINE)


@app.function(
    image=jobs_image,
    secrets=[modal.Secret.from_name(SECRET)],
    volumes={AUDIT_KEYS: audit_keys},
    timeout=3600,
)
def retention() -> dict[str, Any]:
    """`gallerymatch retention run`, on demand (`modal run infra/modal_app.py::retention`). No schedule of its
    own: the nightly runs retention first, every night, under the same writer lease as its matches."""
    from jobs.retention import run_retention

    with _deployed_settings() as settings:
        return run_retention(settings)


@app.local_entrypoint()
def main(shards_dir: str, modality: str = "all") -> None:
    """`modal run infra/modal_app.py --shards-dir s3://...`: the ingest job with Modal as the engine."""
    from jobs.ingest import run_ingest
    from pipelines.settings import load_settings

    summary = run_ingest(load_settings(), shards_dir, modality, "modal")  # type: ignore[arg-type]
    print(summary)

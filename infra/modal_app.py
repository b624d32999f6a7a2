"""The deployable Modal app: the Modal engine's ingest workers plus a nightly retention run.

Nothing in the project imports this module; it imports the project. The ingest workers, their image and
the way an ingest drives them belong to the engine (`pipelines/engines/modal.py`); this wrapper adds what a
deployment needs on top:

- `modal run infra/modal_app.py --shards-dir s3://...`: the ingest job with Modal as the engine (the same
  as `gallerymatch ingest SHARDS --engine modal`);
- `modal deploy infra/modal_app.py`: the workers, and `retention` every night at 03:00 UTC against the home
  in the Modal secret `gallerymatch` (GALLERYMATCH_HOME=s3://..., the AWS_* variables, and
  GALLERYMATCH_AUDIT_KEY_DIR on a volume of its own, outside the home).
"""

from __future__ import annotations

from typing import Any

import modal

from pipelines.engines.modal import app as ingest_app
from pipelines.engines.modal import image as engine_image

app = modal.App("gallerymatch")
app.include(ingest_app)

jobs_image = engine_image.add_local_python_source("jobs", "lance_tables", "infra")
SECRET = "gallerymatch"
AUDIT_KEYS = "/audit-keys"


@app.function(
    image=jobs_image,
    schedule=modal.Cron("0 3 * * *"),
    secrets=[modal.Secret.from_name(SECRET)],
    volumes={AUDIT_KEYS: modal.Volume.from_name("gallerymatch-audit-keys", create_if_missing=True)},
    timeout=3600,
)
def retention() -> dict[str, Any]:
    """`gallerymatch retention run`, on schedule: expire watchlists and delete result sets past retention."""
    from jobs.retention import run_retention
    from pipelines.settings import load_settings

    return run_retention(load_settings())


@app.local_entrypoint()
def main(shards_dir: str, modality: str = "all") -> None:
    """`modal run infra/modal_app.py --shards-dir s3://...`: the ingest job with Modal as the engine."""
    from jobs.ingest import run_ingest
    from pipelines.settings import load_settings

    summary = run_ingest(load_settings(), shards_dir, modality, "modal")  # type: ignore[arg-type]
    print(summary)

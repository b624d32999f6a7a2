"""open_clip whole-image embeddings: a PIL half of the preprocessing (CPU stage) and the model half."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from pipelines.models import CLIP_UNTRAINED, UNTRAINED_CLIP_ARCH, image_spec


def clip_transform(model_id: str) -> Any:
    """The evaluation preprocessing of an image model, built from configs only (no weights)."""
    import open_clip

    image_spec(model_id)
    arch, _, tag = model_id.partition("/")
    if model_id == CLIP_UNTRAINED:
        arch, tag = UNTRAINED_CLIP_ARCH, ""
    size = open_clip.get_model_config(arch)["vision_cfg"]["image_size"]
    cfg = (open_clip.get_pretrained_cfg(arch, tag) or {}) if tag else {}
    return open_clip.image_transform(
        size,
        is_train=False,
        mean=cfg.get("mean"),
        std=cfg.get("std"),
        resize_mode=cfg.get("resize_mode"),
        interpolation=cfg.get("interpolation"),
    )


def split_transform(transform: Any) -> tuple[list[Any], list[Any]]:
    """Split a Compose at its ToTensor step: PIL steps (cheap to ship as uint8) and tensor steps."""
    steps = list(transform.transforms)
    cut = next(i for i, step in enumerate(steps) if "ToTensor" in type(step).__name__)
    return steps[:cut], steps[cut:]


class ClipPreparer:
    """CPU half: resize and crop a decoded RGB image to the model's input, as uint8 HWC."""

    def __init__(self, model_id: str):
        self.pil_steps, _ = split_transform(clip_transform(model_id))

    def prepare(self, image: Image.Image) -> np.ndarray:
        for step in self.pil_steps:
            image = step(image)
        return np.asarray(image.convert("RGB"), dtype=np.uint8)


class ImageEmbedder:
    """Model half: uint8 inputs -> L2-normalised float32 image embeddings."""

    def __init__(self, model_id: str, models_dir: Path, downloads: bool, batch_size: int, device: str = "cpu"):
        from pipelines.models import load_clip_model

        self.model_id = model_id
        self.batch_size = batch_size
        self.device = device
        self.dim = image_spec(model_id).dim
        self.model, _, self.weights_digest = load_clip_model(model_id, models_dir, downloads, device)
        _, self.tensor_steps = split_transform(clip_transform(model_id))

    def embed(self, inputs: list[np.ndarray]) -> np.ndarray:
        import torch
        import torch.nn.functional as F

        out = np.zeros((len(inputs), self.dim), dtype=np.float32)
        with torch.inference_mode():
            for start in range(0, len(inputs), self.batch_size):
                batch = torch.stack([self._tensor(a) for a in inputs[start : start + self.batch_size]])
                vectors = F.normalize(self.model.encode_image(batch.to(self.device)), p=2, dim=1)
                out[start : start + len(batch)] = vectors.float().cpu().numpy()
        return out

    def _tensor(self, array: np.ndarray) -> Any:
        value: Any = Image.fromarray(array)
        for step in self.tensor_steps:
            value = step(value)
        return value

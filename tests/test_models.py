"""Model ids, local weight resolution, clear failures, digests, and the labelled untrained ids."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipelines.errors import ModelWeightsUnavailable, Refused
from pipelines.models import (
    FACENET_FILES,
    clip_weights_file,
    ensure_weights,
    face_spec,
    image_spec,
    load_clip_model,
    load_face_model,
    weights_available,
)


def test_unknown_ids_are_refused_with_the_valid_choices() -> None:
    with pytest.raises(Refused, match="facenet-vggface2"):
        face_spec("arcface-r100")
    with pytest.raises(Refused, match="clip-untrained"):
        image_spec("NoSuchArch/tag")
    assert image_spec("ViT-B-32/laion2b_s34b_b79k").dim == 512
    assert face_spec("facenet-untrained").untrained


def test_missing_face_weights_name_the_file_and_the_remedy(tmp_path: Path) -> None:
    with pytest.raises(ModelWeightsUnavailable) as info:
        load_face_model("facenet-vggface2", tmp_path, downloads=False, device="cpu")
    message = str(info.value)
    assert "20180402-114759-vggface2.pt" in message
    assert str(tmp_path) in message and "GALLERYMATCH_MODELS_DIR" in message
    with pytest.raises(ModelWeightsUnavailable, match=r"20180408-102900-casia-webface\.pt"):
        ensure_weights("facenet-casia-webface", tmp_path, downloads=False)


def test_missing_clip_weights_name_the_folder(tmp_path: Path) -> None:
    with pytest.raises(ModelWeightsUnavailable, match=r"open_clip_model\.safetensors") as info:
        load_clip_model("ViT-B-32/laion2b_s34b_b79k", tmp_path, downloads=False, device="cpu")
    assert str(tmp_path / "open_clip" / "ViT-B-32" / "laion2b_s34b_b79k") in str(info.value)


def test_face_weights_are_read_from_the_models_dir_first(tmp_path: Path) -> None:
    """The real loading path: a state dict file under the upstream name in GALLERYMATCH_MODELS_DIR.

    The file here is written from the seeded untrained network (no real weights exist on this
    machine); what is tested is the resolution and loading path, and that the digest follows the file.
    """
    import torch

    untrained, untrained_digest = load_face_model("facenet-untrained", tmp_path, False, "cpu")
    state = {k: v * 0.5 for k, v in untrained.state_dict().items()}
    state["logits.weight"] = torch.zeros(3, 512)  # the published files carry a classifier head
    state["logits.bias"] = torch.zeros(3)
    torch.save(state, tmp_path / FACENET_FILES["facenet-vggface2"][1])
    assert weights_available("facenet-vggface2", tmp_path)
    model, digest = load_face_model("facenet-vggface2", tmp_path, downloads=False, device="cpu")
    assert digest.startswith("sha256:") and digest != untrained_digest
    name, tensor = next(iter(model.state_dict().items()))
    assert torch.equal(tensor, state[name])


def test_untrained_clip_is_labelled_and_reproducible(tmp_path: Path) -> None:
    import open_clip

    from pipelines.models import UNTRAINED_CLIP_ARCH

    spec = image_spec("clip-untrained")
    assert spec.untrained and spec.dim == open_clip.get_model_config(UNTRAINED_CLIP_ARCH)["embed_dim"]
    _, _, first = load_clip_model("clip-untrained", tmp_path, False, "cpu")
    _, _, second = load_clip_model("clip-untrained", tmp_path, False, "cpu")
    assert first == second


def test_image_model_tags_are_tokens_not_paths_or_sql(tmp_path: Path) -> None:
    """A known architecture used to accept any tag: the tag reaches weight paths and Lance predicates."""
    for model_id in ("ViT-B-32/x' OR origin = 'embedded", "ViT-B-32/../../etc", "ViT-B-32/a/b", "ViT-B-32/tag\n"):
        with pytest.raises(Refused, match="not a valid model id"):
            image_spec(model_id)
        with pytest.raises(Refused, match="not a valid model id"):
            clip_weights_file(model_id, tmp_path)
    with pytest.raises(Refused, match="reserved for the face models"):
        face_spec("facenet-mine")

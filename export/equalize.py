"""Cross-layer equalisation: the float graph's values, activations easier to hold in 8 bits.

INT8 activations have one scale per tensor. Where a convolution's output
channels span very different ranges (MobileNetV2's expand and depthwise
layers: a few channels reach 6, most stay far below), the small channels keep
only a few of the 256 levels, and the next layer sums their rounding errors.
For a pair ``A → [Relu | Clip(0, hi)] → B`` of convolutions, where B is the
only reader of A's output, output channel c of A can be scaled by s_c > 0 and
input channel c of B by 1 / s_c: the same function (ReLU commutes with a
positive scale), each channel's range brought towards the tensor's largest
(Nagel et al., "Data-Free Quantization Through Weight Equalization and Bias
Correction", ICCV 2019; here the ranges are measured on the calibration
images).

* B depthwise (one filter per channel, weights quantised per channel): the
  scale costs B nothing, so s_c = range / range_c;
* B ordinary: its weights lose what the activation gains (one weight scale per
  output channel covers every input channel), so the geometric mean,
  s_c = √(range / range_c).

s_c is at least 1 and at most :data:`MAX_SCALE` (a dead channel stays as it
is). A ``Clip`` with an upper bound is exact only up to hi / s_c: channels are
raised only as far as keeps ``HEADROOM`` × their measured maximum below that
bound, so that inputs beyond what calibration saw still clip where the float
model clips.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import onnx
from onnx import numpy_helper

MAX_SCALE = 32.0
HEADROOM = 2.0
_ACTIVATIONS = ("Relu", "Clip")


@dataclass(frozen=True)
class Pair:
    """A (producer, activation or None, consumer) chain of nodes, by index, and the tensor whose
    per-channel range is measured (the activation's output, else A's)."""

    a: int
    act: int | None
    b: int
    tensor: str
    upper: float | None  # the Clip's upper bound


def _const(inits: dict[str, onnx.TensorProto], name: str) -> np.ndarray | None:
    return numpy_helper.to_array(inits[name]) if name in inits else None


def _group(node: onnx.NodeProto) -> int:
    return next((a.i for a in node.attribute if a.name == "group"), 1)


def _clip_upper(node: onnx.NodeProto, inits: dict[str, onnx.TensorProto]) -> tuple[bool, float | None]:
    """(whether the activation commutes with a positive scale up to an upper bound, that bound)."""
    if node.op_type == "Relu":
        return True, None
    low = _const(inits, node.input[1]) if len(node.input) > 1 and node.input[1] else None
    high = _const(inits, node.input[2]) if len(node.input) > 2 and node.input[2] else None
    if low is None or float(low) != 0.0:
        return False, None
    return True, None if high is None else float(high)


def find_pairs(graph: onnx.GraphProto) -> list[Pair]:
    """Every A → [Relu | Clip(0, hi)] → B of 2-D convolutions with constant weights where
    B is the only reader of what A gives it, and B is ordinary or depthwise."""
    nodes = list(graph.node)  # by index: protobuf hands out a new wrapper object at each access
    inits = {t.name: t for t in graph.initializer}
    readers: dict[str, list[int]] = {}
    for i, node in enumerate(nodes):
        for name in node.input:
            readers.setdefault(name, []).append(i)
    outputs = {o.name for o in graph.output}
    pairs = []
    for i, a in enumerate(nodes):
        wa = _const(inits, a.input[1]) if a.op_type == "Conv" else None
        if wa is None or wa.ndim != 4 or len(a.input) < 3:
            continue
        tensor, act, upper = a.output[0], None, None
        nxt = readers.get(tensor, [])
        if len(nxt) == 1 and nodes[nxt[0]].op_type in _ACTIVATIONS and tensor not in outputs:
            ok, upper = _clip_upper(nodes[nxt[0]], inits)
            if not ok:
                continue
            act, tensor = nxt[0], nodes[nxt[0]].output[0]
            nxt = readers.get(tensor, [])
        if len(nxt) != 1 or tensor in outputs or nodes[nxt[0]].op_type != "Conv" or nodes[nxt[0]].input[0] != tensor:
            continue
        b = nodes[nxt[0]]
        wb = _const(inits, b.input[1])
        channels = wa.shape[0]
        ordinary = wb is not None and _group(b) == 1 and wb.shape[1] == channels
        depthwise = wb is not None and _group(b) == channels and wb.shape[:2] == (channels, 1)
        if wb is not None and wb.ndim == 4 and (ordinary or depthwise):
            pairs.append(Pair(i, act, nxt[0], tensor, upper))
    return pairs


def channel_ranges(model: onnx.ModelProto, tensors: Sequence[str], inputs: Sequence[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """The largest |value| of each channel (axis 1) of ``tensors`` over ``inputs``."""
    import onnxruntime as ort

    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    known = {o.name for o in probe.graph.output}
    probe.graph.output.extend(onnx.ValueInfoProto(name=t) for t in tensors if t not in known)
    session = ort.InferenceSession(probe.SerializeToString(), providers=["CPUExecutionProvider"])
    ranges: dict[str, np.ndarray] = {}
    for feed in inputs:
        for name, value in zip(tensors, session.run(list(tensors), feed)):
            peak = np.abs(value).max(axis=tuple(k for k in range(value.ndim) if k != 1))
            ranges[name] = np.maximum(ranges[name], peak) if name in ranges else peak
    return ranges


def _scales(peak: np.ndarray, depthwise_b: bool, upper: float | None) -> np.ndarray:
    """s_c for one pair from its channels' measured maxima (see the module docstring)."""
    top = float(peak.max())
    if top <= 0:
        return np.ones_like(peak)
    ratio = top / np.maximum(peak, top / MAX_SCALE**2)
    s = ratio if depthwise_b else np.sqrt(ratio)
    if upper is not None:
        s = np.minimum(s, upper / np.maximum(HEADROOM * peak, 1e-12))
    return np.clip(s, 1.0, MAX_SCALE).astype(np.float32)


def equalize(model: onnx.ModelProto, inputs: Sequence[dict[str, np.ndarray]]) -> int:
    """Equalise, in place, the pairs of :func:`find_pairs`, the ranges measured on ``inputs`` (the
    calibration feeds); return how many weight sets changed. Pairs that share their weights (a
    model run twice in one graph, on an image and its mirror) get one scale, from the ranges of
    them all; weights that another node shares too are left alone."""
    graph = model.graph
    pairs = find_pairs(graph)
    nodes = list(graph.node)
    inits = {t.name: t for t in graph.initializer}
    uses: dict[str, int] = {}
    for node in nodes:
        for name in node.input:
            uses[name] = uses.get(name, 0) + 1
    ranges = channel_ranges(model, [p.tensor for p in pairs], inputs)
    shared: dict[tuple[str, str, str], list[Pair]] = {}
    for pair in pairs:
        a, b = nodes[pair.a], nodes[pair.b]
        shared.setdefault((a.input[1], a.input[2], b.input[1]), []).append(pair)
    changed = 0
    for names, group in shared.items():
        b = nodes[group[0].b]
        if len(set(names)) != 3 or any(uses[n] != len(group) for n in names) or len({p.upper for p in group}) != 1:
            continue
        depthwise_b = _group(b) > 1
        s = _scales(np.max([ranges[p.tensor] for p in group], axis=0), depthwise_b, group[0].upper)
        if np.all(s == 1.0):
            continue
        wa, ba, wb = (numpy_helper.to_array(inits[n]).copy() for n in names)
        wa *= s[:, None, None, None]
        ba *= s
        wb /= s[:, None, None, None] if depthwise_b else s[None, :, None, None]
        for name, value in zip(names, (wa, ba, wb)):
            inits[name].CopyFrom(numpy_helper.from_array(value.astype(np.float32), name))
        changed += 1
    return changed

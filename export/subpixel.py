"""Strided ``ConvTranspose`` → the same values from a ``Conv`` and a ``DepthToSpace``.

ONNX Runtime's CPU provider has no INT8 kernel for ``ConvTranspose``: in an INT8
graph it stays float between a dequantize and a quantize and costs more than it
did in the float model. A transposed convolution of stride ``s`` and kernel
``k`` is, per spatial axis and output phase ``r`` (0 … s-1), an ordinary
convolution of its input::

    y[s·q + r] = Σ_m x[q - m] · w[r + s·m]      m = 0 … ⌈k/s⌉ - 1

so one ``Conv`` with s² × C_out output channels (kernel ⌈k/s⌉, each phase's taps
reversed, zero where a phase has fewer) followed by ``DepthToSpace`` (block s,
DCR) gives the transposed convolution's output, the same values up to float
rounding, and both run in INT8 (the "sub-pixel convolution").

What follows the ``ConvTranspose`` is folded in where it can be:

* the crop of its ``pads`` and a ``Slice`` that crops its output
  (:func:`export.onnx_export.symmetric_conv_transpose` writes one for Keras'
  ``padding="same"``): into the ``Conv``'s pads where the crop is a whole
  number of phases, else a ``Slice`` after ``DepthToSpace``;
* a per-channel ``Mul`` and ``Add`` (an unfused BatchNormalization): into the
  weights and bias;
* a ``Relu``: onto the ``Conv``, before ``DepthToSpace`` (the two commute),
  where an INT8 runtime fuses it with the convolution.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import helper, numpy_helper

_INT64_MAX = int(np.iinfo(np.int64).max)
_DEFAULT = ("", "ai.onnx")


@dataclass
class _Plan:
    """One ConvTranspose and what is folded into it.

    weight: (C_in, C_out, k, k); bias: (C_out,). crop: rows/columns removed from the
    unpadded output, (begin_h, begin_w, end_h, end_w). out: the name the rewritten
    nodes must produce. folded: the nodes after it that the rewrite replaces.
    """

    node: onnx.NodeProto
    stride: int
    weight: np.ndarray
    bias: np.ndarray
    crop: list[int]
    output_padding: list[int]
    out: str
    relu: bool = False
    folded: list[onnx.NodeProto] = field(default_factory=list)


def _constant(inits: dict[str, onnx.TensorProto], name: str) -> np.ndarray | None:
    return numpy_helper.to_array(inits[name]) if name in inits else None


def _plan(node: onnx.NodeProto, inits: dict[str, onnx.TensorProto]) -> _Plan | None:
    """The plan for a 2-D, ungrouped, undilated ConvTranspose with one stride s ≥ 2 on both
    axes, a square kernel and constant weights; None for any other node."""
    if node.op_type != "ConvTranspose" or node.domain not in _DEFAULT:
        return None
    weight = _constant(inits, node.input[1])
    if weight is None or weight.ndim != 4 or weight.dtype != np.float32:
        return None
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    strides = list(attrs.get("strides", [1, 1]))
    k = weight.shape[2]
    if (len(strides) != 2 or strides[0] != strides[1] or strides[0] < 2 or weight.shape[3] != k
            or attrs.get("group", 1) != 1 or "output_shape" in attrs
            or attrs.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET")
            or list(attrs.get("dilations", [1, 1])) != [1, 1]):
        return None
    cout = weight.shape[1]
    bias = _constant(inits, node.input[2]) if len(node.input) > 2 and node.input[2] else np.zeros(cout, np.float32)
    if bias is None:
        return None
    return _Plan(node, strides[0], weight.copy(), bias.astype(np.float32).reshape(cout),
                 list(attrs.get("pads", [0, 0, 0, 0])), list(attrs.get("output_padding", [0, 0])), node.output[0])


def _channel_vector(value: np.ndarray | None, channels: int) -> np.ndarray | None:
    """A constant that broadcasts over an NCHW tensor along the channel axis only → (channels,)."""
    if value is None or value.ndim > 4 or value.dtype != np.float32:
        return None
    shape = (1,) * (4 - value.ndim) + value.shape
    if shape[0] != 1 or shape[2:] != (1, 1) or shape[1] not in (1, channels):
        return None
    return np.broadcast_to(value.reshape(-1), (channels,)).astype(np.float32)


def _fold_crop(plan: _Plan, node: onnx.NodeProto, inits: dict[str, onnx.TensorProto]) -> bool:
    """A Slice of the two spatial axes, starts ≥ 0 and ends counted from the end: into the crop."""
    if node.op_type != "Slice" or len(node.input) not in (4, 5):
        return False
    starts, ends, axes = (_constant(inits, name) for name in node.input[1:4])
    steps = _constant(inits, node.input[4]) if len(node.input) == 5 and node.input[4] else np.ones(2, np.int64)
    if starts is None or ends is None or axes is None or steps is None or not (steps == 1).all():
        return False
    axes = axes % 4
    if sorted(axes.tolist()) != [2, 3] or (starts < 0).any() or ((ends >= 0) & (ends < _INT64_MAX)).any():
        return False
    for axis, start, end in zip(axes.tolist(), starts.tolist(), ends.tolist()):
        plan.crop[axis - 2] += start
        plan.crop[axis] += 0 if end >= _INT64_MAX else -end
    return True


def _fold_next(plan: _Plan, node: onnx.NodeProto, inits: dict[str, onnx.TensorProto]) -> bool:
    """Fold ``node``, the single consumer of the plan's output, into the plan if it can be."""
    if node.domain not in _DEFAULT or plan.relu:  # nothing after the Relu: it moves before DepthToSpace
        return False
    if node.op_type == "Slice":
        return not plan.folded and _fold_crop(plan, node, inits)
    if node.op_type == "Relu":
        plan.relu = True
        return True
    if node.op_type not in ("Mul", "Add"):
        return False
    other = [name for name in node.input if name != plan.out]
    vector = _channel_vector(_constant(inits, other[0]), plan.weight.shape[1]) if len(other) == 1 else None
    if vector is None:
        return False
    if node.op_type == "Mul":
        plan.weight *= vector[None, :, None, None]
        plan.bias *= vector
    else:
        plan.bias += vector
    return True


def phase_kernel(weight: np.ndarray, stride: int) -> np.ndarray:
    """ConvTranspose weights (C_in, C_out, k, k) → Conv weights (s²·C_out, C_in, m, m), m = ⌈k/s⌉,
    output channel (r_h·s + r_w)·C_out + c for phase (r_h, r_w): DepthToSpace's DCR order."""
    cin, cout, k, _ = weight.shape
    m = -(-k // stride)
    out = np.zeros((stride, stride, cout, cin, m, m), weight.dtype)
    for rh in range(stride):
        for rw in range(stride):
            for uh in range(m):
                th = rh + stride * (m - 1 - uh)
                for uw in range(m):
                    tw = rw + stride * (m - 1 - uw)
                    if th < k and tw < k:
                        out[rh, rw, :, :, uh, uw] = weight[:, :, th, tw].T
    return out.reshape(stride * stride * cout, cin, m, m)


def _replacement(plan: _Plan, graph: onnx.GraphProto) -> list[onnx.NodeProto] | None:
    """The Conv (+ Relu) → DepthToSpace (→ Slice) nodes of a plan, their constants added to
    ``graph``; None when the output padding reaches past what the phases produce."""
    s, k = plan.stride, plan.weight.shape[2]
    m = -(-k // s)
    pads, rest = [m - 1] * 4, [0] * 4
    for axis in range(2):
        # The phases give s·(H + m - 1) rows, the unpadded output s·(H - 1) + k + output_padding.
        tail = s * m - k - plan.output_padding[axis] + plan.crop[axis + 2]
        if s * m - k - plan.output_padding[axis] < 0:
            return None
        for side, cut in ((axis, plan.crop[axis]), (axis + 2, tail)):
            whole = min(cut // s, m - 1)  # whole phases leave through the Conv's pads
            pads[side] -= whole
            rest[side] = cut - whole * s
    base = plan.node.name or plan.node.output[0]
    names = {key: f"{base}__subpixel_{key}" for key in ("w", "b", "conv", "relu", "d2s", "starts", "ends", "axes")}
    graph.initializer.extend([numpy_helper.from_array(phase_kernel(plan.weight, s), names["w"]),
                              numpy_helper.from_array(np.tile(plan.bias, s * s), names["b"])])
    nodes = [helper.make_node("Conv", [plan.node.input[0], names["w"], names["b"]], [names["conv"]],
                              name=names["conv"], kernel_shape=[m, m], pads=pads)]
    if plan.relu:
        nodes.append(helper.make_node("Relu", [names["conv"]], [names["relu"]], name=names["relu"]))
    cropped = any(rest)
    nodes.append(helper.make_node("DepthToSpace", [nodes[-1].output[0]], [names["d2s"] if cropped else plan.out],
                                  name=names["d2s"], blocksize=s, mode="DCR"))
    if cropped:
        ends = [-cut if cut else _INT64_MAX for cut in rest[2:]]
        for key, values in (("starts", rest[:2]), ("ends", ends), ("axes", [2, 3])):
            graph.initializer.append(numpy_helper.from_array(np.asarray(values, np.int64), names[key]))
        nodes.append(helper.make_node("Slice", [names["d2s"], names["starts"], names["ends"], names["axes"]],
                                      [plan.out], name=f"{base}__subpixel_crop"))
    return nodes


def subpixel_conv_transpose(model: onnx.ModelProto) -> int:
    """Rewrite, in place, every strided ConvTranspose of the main graph as a sub-pixel
    convolution (see the module docstring); return how many were rewritten."""
    graph = model.graph
    nodes = list(graph.node)  # by index: protobuf hands out a new wrapper object at each access
    inits = {t.name: t for t in graph.initializer}
    consumers: dict[str, list[int]] = {}
    for i, node in enumerate(nodes):
        for name in node.input:
            consumers.setdefault(name, []).append(i)
    outputs = {o.name for o in graph.output}
    replaced: dict[int, list[onnx.NodeProto]] = {}
    dropped: set[int] = set()
    for i, node in enumerate(nodes):
        plan = _plan(node, inits)
        if plan is None:
            continue
        folded = []
        while True:
            after = consumers.get(plan.out, [])
            if len(after) != 1 or plan.out in outputs or not _fold_next(plan, nodes[after[0]], inits):
                break
            folded.append(after[0])
            plan.folded.append(nodes[after[0]])
            plan.out = nodes[after[0]].output[0]
        new = _replacement(plan, graph)
        if new is not None:
            replaced[i] = new
            dropped.update(folded)
    if not replaced:
        return 0
    kept = [n for i, old in enumerate(nodes) if i not in dropped for n in replaced.get(i, [old])]
    del graph.node[:]
    graph.node.extend(kept)
    used = {name for node in graph.node for name in node.input}
    initializers = [t for t in graph.initializer if t.name in used]
    del graph.initializer[:]
    graph.initializer.extend(initializers)
    return len(replaced)

"""Keras model → ONNX file with its model card embedded.

Conversion goes through a ``tf.function`` with a fixed ``input_signature``
(``tf2onnx.convert.from_function``): ``tf2onnx.convert.from_keras`` does not
handle Keras 3 models. The graph's input and outputs carry the card's names,
the batch dimension is fixed at 1 (the card's ``input.shape(1)`` is the ONNX
input shape exactly), and the file is checked with ONNX Runtime on the CPU
against TensorFlow on the given parity inputs before it is written.

The card (JSON, ``card.to_json()``) goes into the ONNX ``metadata_props``
under ``station.modelcard``.

CLI::

    python -m export.onnx_export show MODEL.onnx
    python -m export.onnx_export embed MODEL.onnx CARD.json [-o OUT.onnx]
    python -m export.onnx_export symmetric-pads MODEL.onnx [-o OUT.onnx]
    python -m export.onnx_export average A.onnx B.onnx [...] -o OUT.onnx

Keras' ``padding="same"`` transposed convolutions become ONNX ``ConvTranspose``
nodes with asymmetric pads, which ONNX Runtime's CUDA provider cannot run: it
moves each to the CPU with copies around it (20 in the U-Net), several times
the model's GPU time. :func:`symmetric_conv_transpose` rewrites them as an
unpadded ``ConvTranspose`` and a ``Slice`` that drops the same rows and columns
— the same values, on the GPU. ``convert`` applies it to every export;
``symmetric-pads`` applies it to a file exported before, checking on the CPU
that the outputs stay the same.

:func:`average_models` joins segmentation models that read the same input the
same way (same card input and preprocessing) into one graph whose mask is the
mean of theirs: an ensemble the line runs as one model, one input, one card.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import Sequence

import numpy as np
import onnx
from pydantic import ValidationError

from station.modelcard import METADATA_KEY, DetectionOutputs, ExportInfo, MaskOutput, ModelCard

from . import ExportError
from .card import MAX_OPSET

log = logging.getLogger(__name__)

# onnxruntime 1.31 reads IR versions up to 11; 10 is what ONNX 1.16+ writes for opset <= 21.
MAX_IR_VERSION = 10


# --- card ↔ ONNX -------------------------------------------------------------


def _dims(value_info: onnx.ValueInfoProto) -> list[int | str]:
    return [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?")
            for d in value_info.type.tensor_type.shape.dim]


_ONNX_DTYPE = {"float32": onnx.TensorProto.FLOAT, "uint8": onnx.TensorProto.UINT8}


def io_mismatches(model: onnx.ModelProto, card: ModelCard) -> list[str]:
    """Every way the graph's input/outputs differ from the card (empty list: they match)."""
    problems: list[str] = []
    inputs = [i for i in model.graph.input if i.name not in {t.name for t in model.graph.initializer}]
    spec = card.input
    if [i.name for i in inputs] != [spec.name]:
        problems.append(f"inputs {[i.name for i in inputs]} but the card names [{spec.name!r}]")
    else:
        got = _dims(inputs[0])
        if got != list(spec.shape(1)):
            problems.append(f"input {spec.name!r} has shape {got}, the card says {list(spec.shape(1))}")
        if inputs[0].type.tensor_type.elem_type != _ONNX_DTYPE[spec.dtype]:
            problems.append(f"input {spec.name!r} is not {spec.dtype}")
    outputs = {o.name: o for o in model.graph.output}
    want = card.output_names()
    if sorted(outputs) != sorted(want):
        problems.append(f"outputs {sorted(outputs)} but the card names {sorted(want)}")
    elif isinstance(card.output, MaskOutput):
        n = len(card.classes)
        expect: list[int | str] = (
            [1, spec.height, spec.width, n] if card.output.layout == "NHWC" else [1, n, spec.height, spec.width]
        )
        got = _dims(outputs[card.output.name])
        if got != expect:
            problems.append(f"output {card.output.name!r} has shape {got}, the card implies {expect}")
    return problems


def embed_card(model: onnx.ModelProto, card: ModelCard) -> None:
    """Put ``card`` into ``model.metadata_props[station.modelcard]``, replacing any earlier card.

    Raises ExportError when the graph's input/outputs do not match the card.
    """
    problems = io_mismatches(model, card)
    if problems:
        raise ExportError(f"model card {card.name!r} does not match the graph: " + "; ".join(problems))
    kept = [p for p in model.metadata_props if p.key != METADATA_KEY]
    del model.metadata_props[:]
    model.metadata_props.extend(kept)
    model.metadata_props.add(key=METADATA_KEY, value=card.to_json())
    model.doc_string = f"{card.name} {card.version}: {card.description}".strip()


def card_of(model: onnx.ModelProto, what: str = "model") -> ModelCard:
    """The card embedded in ``model``; ExportError when absent or invalid."""
    for prop in model.metadata_props:
        if prop.key == METADATA_KEY:
            try:
                return ModelCard.from_json(prop.value)
            except (ValidationError, ValueError) as exc:
                raise ExportError(f"{what}: invalid model card in metadata '{METADATA_KEY}': {exc}") from exc
    raise ExportError(f"{what}: no model card (metadata key '{METADATA_KEY}')")


def read_card(path: str | Path) -> ModelCard:
    """The card embedded in an ONNX file (weights are not loaded)."""
    path = Path(path)
    return card_of(_load(path, weights=False), str(path))


def _load(path: Path, weights: bool = True) -> onnx.ModelProto:
    try:
        return onnx.load(str(path), load_external_data=weights)
    except OSError as exc:
        raise ExportError(f"{path}: cannot read ({exc.strerror or exc})") from exc
    except Exception as exc:  # noqa: BLE001 - protobuf's decode errors have no common public type
        raise ExportError(f"{path}: not an ONNX model ({exc})") from exc


def save_model(model: onnx.ModelProto, out_path: str | Path) -> Path:
    """Check and write ``model`` atomically (a temporary file beside it, then a rename)."""
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    onnx.checker.check_model(model, full_check=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_bytes(model.SerializeToString())
    os.replace(tmp, out)
    return out


def embed_card_file(onnx_path: str | Path, card: ModelCard, out_path: str | Path | None = None) -> Path:
    """(Re)embed ``card`` into an existing ONNX file, in place or into ``out_path``."""
    src = Path(onnx_path)
    model = _load(src)
    try:
        embed_card(model, card)
    except ExportError as exc:
        raise ExportError(f"{src}: {exc}") from exc
    return save_model(model, out_path or src)


# --- conversion --------------------------------------------------------------


def _rename_value(graph: onnx.GraphProto, old: str, new: str) -> None:
    if old == new:
        return
    for node in graph.node:
        node.input[:] = [new if n == old else n for n in node.input]
        node.output[:] = [new if n == old else n for n in node.output]
    for vi in list(graph.input) + list(graph.output) + list(graph.value_info):
        if vi.name == old:
            vi.name = new


def _fix_names(model: onnx.ModelProto, input_name: str, output_names: Sequence[str]) -> None:
    """Give the graph's single input and its outputs (in order) the card's names."""
    graph = model.graph
    init = {t.name for t in graph.initializer}
    inputs = [i.name for i in graph.input if i.name not in init]
    if len(inputs) != 1:
        raise ExportError(f"converted graph has inputs {inputs}; expected one")
    _rename_value(graph, inputs[0], input_name)
    outputs = [o.name for o in graph.output]
    if len(outputs) != len(output_names):
        raise ExportError(f"converted graph has outputs {outputs}; expected {list(output_names)}")
    if sorted(outputs) != sorted(output_names):
        for old, new in zip(outputs, output_names):
            _rename_value(graph, old, new)


def symmetric_conv_transpose(model: onnx.ModelProto) -> int:
    """Rewrite, in place, each 2-D ``ConvTranspose`` with asymmetric ``pads`` as one without
    pads followed by a ``Slice`` that crops what the pads cropped; return how many.

    ConvTranspose pads remove output rows/columns (begin at the start, end at
    the end of each spatial axis), so the unpadded output sliced
    ``[begin : size - end]`` is the padded output exactly.
    """
    from onnx import helper, numpy_helper

    graph = model.graph
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    if opset < 10:  # Slice takes its bounds as inputs from opset 10 on
        return 0
    count = 0
    nodes = []
    for node in graph.node:
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        pads = list(attrs.get("pads", []))
        auto = attrs.get("auto_pad", b"NOTSET")
        if (node.op_type != "ConvTranspose" or node.domain not in ("", "ai.onnx") or len(pads) != 4
                or auto not in (b"NOTSET", "NOTSET") or "output_shape" in attrs or pads[:2] == pads[2:]):
            nodes.append(node)
            continue
        begin, end = pads[:2], pads[2:]
        count += 1
        base = node.name or node.output[0]
        full = f"{node.output[0]}__unpadded"
        starts, ends, axes = (f"{base}__slice_{k}" for k in ("starts", "ends", "axes"))
        big = np.iinfo(np.int64).max
        for name, values in ((starts, begin), (ends, [-e if e else big for e in end]), (axes, [2, 3])):
            graph.initializer.append(numpy_helper.from_array(np.asarray(values, np.int64), name))
        del node.attribute[:]
        node.attribute.extend(helper.make_attribute(k, [0, 0, 0, 0] if k == "pads" else v)
                              for k, v in attrs.items())
        out = node.output[0]
        node.output[0] = full
        nodes += [node, helper.make_node("Slice", [full, starts, ends, axes], [out], name=f"{base}__crop")]
    if count:
        del graph.node[:]
        graph.node.extend(nodes)
    return count


def symmetric_pads_file(path: Path, out_path: Path | None = None, seed: int = 0) -> tuple[int, float]:
    """Apply :func:`symmetric_conv_transpose` to an ONNX file (card kept) after checking on the
    CPU that the outputs do not change on random inputs; return (nodes rewritten, max |diff|)."""
    import onnxruntime as ort

    model = _load(path)
    before = model.SerializeToString()
    count = symmetric_conv_transpose(model)
    if count == 0:
        log.info("%s: no ConvTranspose with asymmetric pads; unchanged", path)
        return 0, 0.0
    onnx.checker.check_model(model)
    card = card_of(model, str(path))
    rng = np.random.default_rng(seed)
    worst = 0.0
    old = ort.InferenceSession(before, providers=["CPUExecutionProvider"])
    new = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    for _ in range(4):
        x = (rng.random(card.input.shape(1), dtype=np.float32) if card.input.dtype == "float32"
             else rng.integers(0, 256, card.input.shape(1), dtype=np.uint8))
        a = old.run(None, {card.input.name: x})
        b = new.run(None, {card.input.name: x})
        for u, v in zip(a, b):
            if u.shape != v.shape:
                raise ExportError(f"{path}: rewritten graph changes an output shape {u.shape} → {v.shape}")
            worst = max(worst, float(np.max(np.abs(u.astype(np.float64) - v))) if u.size else 0.0)
    if worst > 1e-4:
        raise ExportError(f"{path}: rewritten graph differs from the original by {worst:.2e}; not written")
    save_model(model, out_path or path)
    log.info("%s: %d ConvTranspose node(s) rewritten with symmetric pads + Slice; max |diff| %.2e on 4 random "
             "inputs", out_path or path, count, worst)
    return count, worst


def _as_batch(parity_inputs: np.ndarray | Sequence[np.ndarray], shape: tuple[int, ...], dtype: str) -> np.ndarray:
    arr = np.asarray(parity_inputs, dtype=np.dtype(dtype))
    if arr.shape == shape:
        arr = arr[None]
    if arr.ndim != 4 or arr.shape[1:] != shape or len(arr) == 0:
        raise ExportError(f"parity inputs have shape {arr.shape}; expected (N,) + {shape}")
    return arr


def convert(keras_model, card: ModelCard, opset: int) -> onnx.ModelProto:
    """Convert a Keras model whose input is (None, H, W, C) (NHWC) and whose outputs are
    ``card.output_names()`` in order; the ONNX batch dimension is fixed at 1."""
    import tensorflow as tf
    import tf2onnx

    spec = card.input
    if spec.layout != "NHWC":
        raise ExportError(f"card input layout {spec.layout}: Keras models are NHWC; only NHWC is exported")
    want = (spec.height, spec.width, spec.channels)
    got = tuple(keras_model.input.shape[1:])
    if got != want:
        raise ExportError(f"Keras model input {got} but card {card.name!r} says (H, W, C) = {want}")
    names = card.output_names()
    signature = [tf.TensorSpec(spec.shape(1), tf.as_dtype(spec.dtype), name=spec.name)]

    @tf.function(input_signature=signature)
    def serve(x):
        outs = keras_model(x, training=False)
        outs = outs if isinstance(outs, (list, tuple)) else [outs]
        if len(outs) != len(names):
            raise ExportError(f"Keras model has {len(outs)} output(s), card names {names}")
        return {n: tf.identity(o, name=n) for n, o in zip(names, outs)}

    model, _ = tf2onnx.convert.from_function(serve, input_signature=signature, opset=opset)
    _fix_names(model, spec.name, names)
    symmetric_conv_transpose(model)  # the CUDA provider runs no asymmetric ConvTranspose (module docstring)
    if model.ir_version > MAX_IR_VERSION:
        model.ir_version = MAX_IR_VERSION
    return model


def parity(keras_model, model: onnx.ModelProto, card: ModelCard, inputs: np.ndarray) -> dict[str, float]:
    """TF vs ONNX Runtime (CPU) on ``inputs`` (N, H, W, C), one at a time.

    max_abs_diff: largest |TF − ORT| over every output value. mask_agreement:
    fraction of mask values on the same side of the card's threshold (mask
    outputs only). n: how many inputs were compared.

    Detection outputs (after NMS) are compared as sets, since near-equal scores
    may come out in another order: see :func:`detection_parity` (its figures
    are added; max_abs_diff still covers the raw padded tensors).
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    names = card.output_names()
    max_diff = 0.0
    agree = total = 0
    pairs = []
    for x in inputs:
        ref = keras_model(x[None], training=False)
        ref = [np.asarray(r) for r in (ref if isinstance(ref, (list, tuple)) else [ref])]
        got = session.run(names, {card.input.name: x[None]})
        for r, g in zip(ref, got):
            max_diff = max(max_diff, float(np.max(np.abs(r.astype(np.float64) - g.astype(np.float64)))))
        if isinstance(card.output, MaskOutput):
            t = card.output.threshold
            agree += int(np.count_nonzero((ref[0] > t) == (got[0] > t)))
            total += ref[0].size
        elif isinstance(card.output, DetectionOutputs):
            pairs.append((dict(zip(names, ref)), dict(zip(names, got))))
    result = {"max_abs_diff": max_diff, "n": float(len(inputs))}
    if total:
        result["mask_agreement"] = agree / total
    if pairs:
        assert isinstance(card.output, DetectionOutputs)  # only a detection card adds pairs
        result.update(detection_parity(pairs, card.output))
    return result


def _valid(outputs: dict[str, np.ndarray], spec: DetectionOutputs) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    count = int(np.asarray(outputs[spec.count]).reshape(-1)[0])
    boxes = np.asarray(outputs[spec.boxes], np.float64).reshape(-1, 4)[:count]
    scores = np.asarray(outputs[spec.scores], np.float64).reshape(-1)[:count]
    classes = np.asarray(outputs[spec.classes]).reshape(-1)[:count].astype(np.int64)
    keep = scores >= spec.score_threshold
    return boxes[keep], scores[keep], classes[keep]


def detection_parity(pairs, spec: DetectionOutputs) -> dict[str, float]:
    """TF vs ORT NMS outputs, per input a (TF outputs, ORT outputs) pair of {name: array}.

    Only detections at or above the card's score threshold count (what station
    keeps). count_agreement: fraction of inputs with as many such detections on
    both sides. detection_match: fraction of all detections (both sides) that
    have a partner of the same class on the other side with box IoU ≥ 0.99 and
    |Δscore| ≤ 1e-3 (1.0 when neither side found anything). matched_max_box_diff
    and matched_max_score_diff: the largest differences over matched pairs
    (normalised box units; score).
    """
    same = 0
    matched = total = 0
    box_diff = score_diff = 0.0
    for ref, got in pairs:
        rb, rs, rc = _valid(ref, spec)
        gb, gs, gc = _valid(got, spec)
        same += int(len(rs) == len(gs))
        total += len(rs) + len(gs)
        if len(rs) == 0 or len(gs) == 0:
            continue
        x1 = np.maximum(rb[:, None, 0], gb[None, :, 0])
        y1 = np.maximum(rb[:, None, 1], gb[None, :, 1])
        x2 = np.minimum(rb[:, None, 2], gb[None, :, 2])
        y2 = np.minimum(rb[:, None, 3], gb[None, :, 3])
        inter = np.clip(x2 - x1, 0, None) * np.clip(y2 - y1, 0, None)
        area = lambda b: (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])  # noqa: E731
        iou = inter / np.maximum(area(rb)[:, None] + area(gb)[None, :] - inter, 1e-12)
        ok = (iou >= 0.99) & (np.abs(rs[:, None] - gs[None, :]) <= 1e-3) & (rc[:, None] == gc[None, :])
        matched += int(ok.any(axis=1).sum() + ok.any(axis=0).sum())
        for i, j in zip(*np.nonzero(ok)):
            box_diff = max(box_diff, float(np.max(np.abs(rb[i] - gb[j]))))
            score_diff = max(score_diff, float(abs(rs[i] - gs[j])))
    return {
        "count_agreement": same / len(pairs),
        "detection_match": matched / total if total else 1.0,
        "detections": float(total) / 2,
        "matched_max_box_diff": box_diff,
        "matched_max_score_diff": score_diff,
    }


def export_model(
    keras_model,
    card_draft: ModelCard,
    out_path: str | Path,
    parity_inputs: np.ndarray | Sequence[np.ndarray],
    *,
    opset: int | None = None,
) -> ModelCard:
    """Convert, check and write ``keras_model`` to ``out_path`` with its card; return the final card.

    card_draft: a complete card; its ``export`` section is replaced by the
    toolchain versions, the opset and the parity figures. parity_inputs:
    (N, H, W, C) or a list of (H, W, C) preprocessed inputs (e.g. validation
    images). opset: default ``card_draft.export.opset`` (at most 18).
    """
    import tensorflow as tf
    import tf2onnx

    opset = card_draft.export.opset if opset is None else opset
    if not 1 <= opset <= MAX_OPSET:
        raise ExportError(f"opset {opset}: must be between 1 and {MAX_OPSET}")
    spec = card_draft.input
    inputs = _as_batch(parity_inputs, (spec.height, spec.width, spec.channels), spec.dtype)
    model = convert(keras_model, card_draft, opset)
    used = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), opset)
    figures = parity(keras_model, model, card_draft, inputs)
    card = card_draft.model_copy(update={"export": ExportInfo(
        tensorflow=tf.__version__, tf2onnx=tf2onnx.__version__, onnx=onnx.__version__, opset=used, parity=figures,
    )})
    card = ModelCard.from_json(card.to_json())  # re-validated as station will read it
    embed_card(model, card)
    out = save_model(model, out_path)
    if isinstance(card.output, DetectionOutputs):
        log.info("wrote %s (%.2f MB, opset %d, IR %d): parity on %d input(s): detection match %.4f, count "
                 "agreement %.4f, matched max |Δbox| %.2e |Δscore| %.2e", out, out.stat().st_size / 1e6, used,
                 model.ir_version, len(inputs), figures["detection_match"], figures["count_agreement"],
                 figures["matched_max_box_diff"], figures["matched_max_score_diff"])
    else:
        log.info("wrote %s (%.2f MB, opset %d, IR %d): parity max |TF-ORT| %.2e, mask agreement %.6f on %d "
                 "input(s)", out, out.stat().st_size / 1e6, used, model.ir_version, figures["max_abs_diff"],
                 figures.get("mask_agreement", float("nan")), len(inputs))
    return card


# --- ensembles ----------------------------------------------------------------


def average_models(models: Sequence[onnx.ModelProto], cards: Sequence[ModelCard]) -> onnx.ModelProto:
    """One graph running every member on the shared input, its mask the members' mean
    probability (ONNX ``Mean``; a member whose mask is logits gets its ``Sigmoid`` first).

    The members must be segmentation models with the same card input (name, shape,
    dtype, colour), the same preprocessing and the same mask output name and
    classes, and the same default-domain opset. The result carries no card: the
    caller embeds one (its ``output.activation`` is ``none``).
    """
    from onnx import compose, helper

    if len(models) < 2 or len(models) != len(cards):
        raise ExportError(f"average needs two models or more with their cards (got {len(models)})")
    first = cards[0]
    if not isinstance(first.output, MaskOutput):
        raise ExportError(f"{first.name}: only segmentation models (mask output) can be averaged")
    opsets = []
    for i, (m, c) in enumerate(zip(models, cards)):
        what = f"member {i + 1} ({c.name})"
        if not isinstance(c.output, MaskOutput):
            raise ExportError(f"{what}: not a segmentation model; only masks can be averaged")
        if c.input != first.input or c.preprocess != first.preprocess:
            raise ExportError(f"{what}: its input or preprocessing differs from member 1's "
                              f"({c.input} {c.preprocess} vs {first.input} {first.preprocess})")
        if c.output.name != first.output.name or c.output.layout != first.output.layout or c.classes != first.classes:
            raise ExportError(f"{what}: mask output {c.output.name!r} ({c.output.layout}, classes {c.classes}) "
                              f"differs from member 1's {first.output.name!r} ({first.output.layout}, {first.classes})")
        mismatch = io_mismatches(m, c)
        if mismatch:
            raise ExportError(f"{what}: graph and card disagree: {'; '.join(mismatch)}")
        if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for n in m.graph.node
               for a in n.attribute):
            raise ExportError(f"{what}: has control flow (If/Loop/Scan subgraphs), which average does not join")
        opsets.append(next((o.version for o in m.opset_import if o.domain in ("", "ai.onnx")), 0))
    if len(set(opsets)) != 1:
        raise ExportError(f"members have different opsets {opsets}; export them with one opset")
    in_name, out_name = first.input.name, first.output.name
    nodes, inits, infos, means = [], [], [], []
    for i, (m, c) in enumerate(zip(models, cards)):
        prefix = f"m{i + 1}/"
        g = compose.add_prefix(m, prefix).graph
        _rename_value(g, prefix + in_name, in_name)
        nodes += g.node
        inits += g.initializer
        infos += [v for v in g.value_info if v.name != in_name]
        out = prefix + out_name
        assert isinstance(c.output, MaskOutput)  # checked in the loop above
        if c.output.activation == "sigmoid":
            nodes.append(helper.make_node("Sigmoid", [out], [out + "__prob"], name=prefix + "to_probability"))
            out += "__prob"
        means.append(out)
    nodes.append(helper.make_node("Mean", means, [out_name], name="ensemble_mean"))
    base = models[0].graph
    graph = helper.make_graph(nodes, "ensemble", [next(v for v in base.input if v.name == in_name)],
                              [next(v for v in base.output if v.name == out_name)], initializer=inits,
                              value_info=infos)
    merged = helper.make_model(graph, opset_imports=list(models[0].opset_import),
                               producer_name="station export.onnx_export average")
    merged.ir_version = min(max(m.ir_version for m in models), MAX_IR_VERSION)
    onnx.checker.check_model(merged)
    return merged


def average_files(paths: Sequence[Path], out_path: Path, card: ModelCard | None = None) -> Path:
    """:func:`average_models` on files; the result gets ``card`` or member 1's card with
    ``output.activation`` ``none``, and is checked on the CPU: its mask equals the mean of
    the members' on a random input."""
    import onnxruntime as ort

    models = [_load(Path(p)) for p in paths]
    cards = [card_of(m, str(p)) for m, p in zip(models, paths)]
    merged = average_models(models, cards)
    first = cards[0]
    if card is None:
        names = ", ".join(c.name for c in cards)
        card = first.model_copy(update={
            "description": f"{first.description} [mean probability of {len(cards)} models: {names}]".lstrip(),
            "output": first.output.model_copy(update={"activation": "none"})})
    elif not isinstance(card.output, MaskOutput) or card.output.activation != "none":
        raise ExportError(f"card {card.name!r}: the averaged mask holds probabilities, so its output must be a mask "
                          "with activation 'none'")
    embed_card(merged, card)
    x = np.random.default_rng(0).random(first.input.shape(1), dtype=np.float32)
    if first.input.dtype != "float32":
        x = (x * 255).astype(np.uint8)

    def prob(session_bytes: bytes, c: ModelCard) -> np.ndarray:
        s = ort.InferenceSession(session_bytes, providers=["CPUExecutionProvider"])
        assert isinstance(c.output, MaskOutput)  # the members' (average_models) and the card's were checked
        y = s.run([c.output.name], {c.input.name: x})[0].astype(np.float64)
        return 1 / (1 + np.exp(-y)) if c.output.activation == "sigmoid" else y

    want = np.mean([prob(m.SerializeToString(), c) for m, c in zip(models, cards)], axis=0)
    got = prob(merged.SerializeToString(), card)
    worst = float(np.max(np.abs(got - want)))
    if worst > 1e-5:
        raise ExportError(f"{out_path}: the averaged graph differs from the mean of its members by {worst:.2e}")
    save_model(merged, out_path)
    log.info("%s: mean of %d models (%s); max |diff| to the members' mean %.1e", out_path, len(models),
             ", ".join(str(p) for p in paths), worst)
    return Path(out_path)


# --- CLI ---------------------------------------------------------------------


def _card_file(path: Path) -> ModelCard:
    try:
        return ModelCard.from_json(path.read_text())
    except OSError as exc:
        raise ExportError(f"{path}: cannot read ({exc.strerror or exc})") from exc
    except (ValidationError, ValueError) as exc:
        raise ExportError(f"{path}: not a valid model card: {exc}") from exc


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m export.onnx_export", description="Show or (re)embed the "
                                     "model card of an ONNX file, rewrite transposed convolutions for the GPU, "
                                     "average segmentation models.")
    sub = parser.add_subparsers(dest="cmd", required=True)
    show = sub.add_parser("show", help="print the embedded card as JSON")
    show.add_argument("model", type=Path)
    emb = sub.add_parser("embed", help="embed a card (JSON file) into an ONNX file, checking names and shapes")
    emb.add_argument("model", type=Path)
    emb.add_argument("card", type=Path, help="model card JSON")
    emb.add_argument("-o", "--out", type=Path, help="write here instead of replacing MODEL")
    sym = sub.add_parser("symmetric-pads", help="rewrite asymmetric ConvTranspose pads as pads 0 + Slice, so the "
                         "CUDA provider runs them (outputs checked unchanged on the CPU)")
    sym.add_argument("model", type=Path)
    sym.add_argument("-o", "--out", type=Path, help="write here instead of replacing MODEL")
    avg = sub.add_parser("average", help="join segmentation models with the same input into one graph whose mask "
                         "is their mean (card: the first model's, or --card)")
    avg.add_argument("models", type=Path, nargs="+")
    avg.add_argument("-o", "--out", type=Path, required=True)
    avg.add_argument("--card", type=Path, help="model card JSON for the result")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stdout)
    try:
        if args.cmd == "show":
            print(read_card(args.model).model_dump_json(indent=2))
            return 0
        if args.cmd == "symmetric-pads":
            symmetric_pads_file(args.model, args.out)
            return 0
        if args.cmd == "average":
            average_files(args.models, args.out, _card_file(args.card) if args.card else None)
            return 0
        card = _card_file(args.card)
        out = embed_card_file(args.model, card, args.out)
        log.info("embedded card %r into %s", card.name, out)
        return 0
    except ExportError as exc:
        log.error("%s", exc)
        return 2


if __name__ == "__main__":
    sys.exit(main())

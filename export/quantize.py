"""An INT8 copy of a float model for CPUs: calibrated on real images, judged by ``station eval``.

::

    python -m export.quantize MODEL.onnx --data DIR [--split FILE] [-c CONFIG] [-o OUT.onnx] [--json OUT.json]

1. **Images.** With ``--split`` (a split file such as
   ``models/neu_det_detector.split.json``) the calibration images come from its
   ``train`` side and the figures from its ``val`` side. Without it the images
   of ``DIR`` (each with its mask) are cut into grouped folds as
   ``python -m export.magnetic_tile cv`` cuts them (``--groups``, default
   ``DIR/tile_groups.json``; 5 folds, stratified by folder, seed 7): fold
   ``--fold`` is evaluated, calibration images come from the other folds. The
   calibration sample is ``--calibration`` images (default 64) balanced over
   the classes (the image's folder, or the class of its first VOC box), drawn
   with ``--seed``.
2. **Graph.** Strided ``ConvTranspose`` nodes, which ONNX Runtime's CPU
   provider runs only in float, become sub-pixel convolutions
   (:mod:`export.subpixel`); ``quant_pre_process`` applies ONNX Runtime's graph
   optimisations (BatchNorm folding, constant folding) and shape inference;
   pairs of convolutions are equalised so that each activation's channels
   share its 8-bit range better (:mod:`export.equalize`). Each step is checked
   to give the float model's outputs on the calibration images.
3. **Quantisation.** ``quantize_static`` in QDQ format: activations uint8 per
   tensor, weights int8 per output channel (the u8 × s8 products of AVX-512
   VNNI / AVX2), calibrated on the images through the card's preprocessing —
   :func:`station.preprocess.preprocess`, the daemon's own code. Every node
   after the last convolution stays float: the detector's box decoding and
   NMS, the mask's sigmoid, resize and maximum.
4. **Judgement.** ``station eval`` (the line's :class:`~station.inspector.Inspector`,
   config ``-c``) on the evaluation images, once with the float model and once
   with the INT8 one: IoU, escapes and false rejects for masks, AP50 and mAP for
   boxes. The figures of both and their differences go into the INT8 model's
   card (``quantization``) and a JSON report (default: the output with ``.json``).
"""

from __future__ import annotations

import argparse
import json
import logging
import shlex
import sys
import tempfile
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import onnx

from station.errors import StationError
from station.infer import sha256_file
from station.modelcard import DetectionOutputs, ModelCard, QuantizationInfo

from . import ExportError
from .equalize import equalize
from .data import find_samples, fold_of_groups, load_groups, read_split_file
from .onnx_export import card_of, embed_card, save_model
from .subpixel import subpixel_conv_transpose

log = logging.getLogger(__name__)

REPORT_SCHEMA = "export.quantize/1"
GROUPS_FILE = "tile_groups.json"
FOLDS, FOLD_SEED = 5, 7  # the folds of `python -m export.magnetic_tile cv`
METHODS = ("minmax", "entropy", "percentile")
TARGETS = {"iou": 0.01, "ap50": 0.01, "escapes": 1.0}  # |INT8 - float| at most (escapes: INT8 - float)
PARITY_LIMIT = 1e-3  # the rewritten float graph against the original, max |Δ| on calibration inputs


# =============================================================================
# Images: which calibrate, which judge
# =============================================================================


@dataclass(frozen=True)
class ImageSets:
    """The calibration images and the evaluation images (disjoint), and how each was chosen."""

    data: Path
    calibration: tuple[Path, ...]
    evaluation: tuple[Path, ...]
    calibration_note: str
    evaluation_note: str


def image_class(path: Path) -> str:
    """The class of an image for a balanced sample: its first VOC box's class (the
    NEU-DET layout, one folder for every class), else its folder's name."""
    from station.evaluate import annotation_of, parse_voc

    annotation = annotation_of(path)
    if annotation is not None:
        names = parse_voc(annotation).class_name
        if len(names):
            return str(names[0])
    return path.parent.name


def balanced_sample(paths: Sequence[Path], n: int, seed: int,
                    key: Callable[[Path], str] = image_class) -> list[Path]:
    """At most ``n`` of ``paths``, taken in turn from each class (sorted by name), each class's
    images shuffled with ``seed``: every class gets n / classes images where it has that many."""
    by_class: dict[str, list[Path]] = defaultdict(list)
    for path in sorted(paths):
        by_class[key(path)].append(path)
    rng = np.random.default_rng(seed)
    queues = []
    for name in sorted(by_class):
        members = by_class[name]
        queues.append([members[i] for i in rng.permutation(len(members))])
    picked: list[Path] = []
    while len(picked) < n and any(queues):
        for queue in queues:
            if queue and len(picked) < n:
                picked.append(queue.pop(0))
    return picked


def sets_from_split(data: Path, split: Path, n: int, seed: int) -> ImageSets:
    """Calibration from the split file's ``train`` side, evaluation on its ``val`` side."""
    train = read_split_file(split, data, "train")
    val = read_split_file(split, data, "val")
    calibration = balanced_sample(train, n, seed)
    return ImageSets(
        data, tuple(calibration), tuple(val),
        f"{len(calibration)} of the {len(train)} training images of {split}, balanced over the classes "
        f"(first box's class), seed {seed}",
        f"the {len(val)} validation images of {split}")


def sets_from_folds(data: Path, groups: Path | None, fold: int, n: int, seed: int) -> ImageSets:
    """Evaluation on fold ``fold`` of the grouped, folder-stratified folds of
    :func:`export.data.fold_of_groups`; calibration from the other folds."""
    if not 0 <= fold < FOLDS:
        raise ExportError(f"--fold {fold}: must be between 0 and {FOLDS - 1}")
    listing = find_samples(data)
    grouping = load_groups(groups) if groups is not None else None
    folds = fold_of_groups(listing.samples, FOLDS, FOLD_SEED, grouping)
    held = [s.image for s in listing.samples if folds[s.key] == fold]
    rest = [s.image for s in listing.samples if folds[s.key] != fold]
    calibration = balanced_sample(rest, n, seed)
    unit = str(groups) if groups is not None else "image"
    return ImageSets(
        data, tuple(calibration), tuple(held),
        f"{len(calibration)} images balanced over the class folders (seed {seed}) from the {len(rest)} images "
        f"outside the evaluation fold",
        f"the {len(held)} images of fold {fold} of {FOLDS} (grouped by {unit}, stratified by folder, seed "
        f"{FOLD_SEED}: the folds of python -m export.magnetic_tile cv)")


# =============================================================================
# Calibration inputs: the card's preprocessing, as on the line
# =============================================================================


def calibration_tensors(paths: Sequence[Path], card: ModelCard) -> list[np.ndarray]:
    """Each image decoded and preprocessed as the daemon does (station.imageio,
    station.preprocess with the card's ops) → the model's input tensor, batch 1."""
    from station.imageio import read_image
    from station.preprocess import preprocess, to_tensor

    tensors = []
    for path in paths:
        try:
            x, _ = preprocess(read_image(path), card)
        except StationError as exc:
            raise ExportError(f"calibration image {path}: {exc}") from exc
        tensors.append(to_tensor(x, card.input))
    return tensors


def calibration_reader(tensors: Sequence[np.ndarray], input_name: str) -> Any:
    """An onnxruntime CalibrationDataReader over ``tensors`` (with ``set_range``, so that
    histogram calibrators can collect a few images at a time)."""
    from onnxruntime.quantization import CalibrationDataReader

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.end, self.next = len(tensors), 0

        def get_next(self) -> dict[str, np.ndarray] | None:
            if self.next >= self.end:
                return None
            self.next += 1
            return {input_name: tensors[self.next - 1]}

        def __len__(self) -> int:
            return len(tensors)

        def set_range(self, start_index: int, end_index: int) -> None:
            self.end, self.next = min(end_index, len(tensors)), start_index

    return Reader()


# =============================================================================
# The graph: rewritten for INT8, quantised
# =============================================================================


@dataclass(frozen=True)
class QuantOptions:
    """The settings of :func:`quantize_model`.

    method: calibration method (:data:`METHODS`); percentile: its percentile.
    per_channel: one weight scale per output channel (else per tensor).
    reduce_range: 7-bit weights (for CPUs without VNNI, whose u8 × s8 sums can saturate).
    last_conv: the last convolutions (whose outputs are decoded) left in float too.
    equalise: cross-layer equalisation before calibration (:mod:`export.equalize`).
    keep_float: node names or op types left in float beside the tail after the last convolution.
    """

    method: str = "minmax"
    percentile: float = 99.999
    per_channel: bool = True
    reduce_range: bool = False
    last_conv: bool = False
    equalise: bool = True
    keep_float: tuple[str, ...] = ()

    def describe(self) -> tuple[str, str]:
        """(method, calibration) as the card words them."""
        import onnxruntime

        weights = "per output channel" if self.per_channel else "per tensor"
        bits = ", 7-bit range" if self.reduce_range else ""
        method = (f"static INT8, QDQ format: activations uint8 per tensor (asymmetric), weights int8 {weights} "
                  f"(symmetric{bits}); onnxruntime.quantization {onnxruntime.__version__}")
        calibration = {"minmax": "MinMax (each activation's range over the calibration images)",
                       "entropy": "Entropy (KL divergence of each activation's histogram)",
                       "percentile": f"Percentile ({self.percentile:g} % of each activation's histogram)"}
        return method, calibration[self.method]


def _ancestors(nodes: Sequence[onnx.NodeProto], start: Sequence[int]) -> set[int]:
    """Indices of the nodes ``start`` and of every node they read from, directly or not."""
    producers = {out: i for i, node in enumerate(nodes) for out in node.output}
    seen: set[int] = set()
    stack = list(start)
    while stack:
        i = stack.pop()
        if i not in seen:
            seen.add(i)
            stack.extend(producers[name] for name in nodes[i].input if name in producers)
    return seen


def float_tail(graph: onnx.GraphProto, last_conv: bool = False) -> list[str]:
    """The names of the nodes after the last convolutions, from which no convolution can be
    reached (a detector's box decoding and NMS, a mask's sigmoid and resize), and with
    ``last_conv`` of those last convolutions too (their outputs are the scores, box
    distances and mask logits)."""
    nodes = list(graph.node)  # by index: protobuf hands out a new wrapper object at each access
    producers = {out: i for i, node in enumerate(nodes) for out in node.output}
    convs = [i for i, n in enumerate(nodes) if n.op_type in ("Conv", "ConvTranspose")]
    feeds_conv = _ancestors(nodes, convs)
    tail = [i for i in range(len(nodes)) if i not in feeds_conv]
    if last_conv:
        # a Conv that another Conv reads from is among the ancestors of that Conv's inputs
        inner = _ancestors(nodes, [producers[name] for c in convs for name in nodes[c].input if name in producers])
        tail += [c for c in convs if c not in inner]
    return [nodes[i].name for i in tail]


def _name_nodes(graph: onnx.GraphProto) -> None:
    """Give every nameless node a unique name (the quantiser excludes nodes by name)."""
    taken = {n.name for n in graph.node}
    for i, node in enumerate(graph.node):
        if not node.name:
            name = f"{node.op_type}__{i}"
            while name in taken:
                name += "_"
            node.name = name
            taken.add(name)


@dataclass(frozen=True)
class Prepared:
    """The float graph made ready for INT8: its file, how many ConvTranspose nodes became
    sub-pixel convolutions, how many convolution pairs were equalised."""

    path: Path
    conv_transpose: int
    equalised: int


def prepare_float(model: onnx.ModelProto, work: Path, inputs: Sequence[np.ndarray], card: ModelCard,
                  equalise: bool = True) -> Prepared:
    """The float graph made ready for INT8 in ``work``: sub-pixel convolutions for strided
    ConvTranspose, ONNX Runtime's pre-processing (BatchNorm folding), then (``equalise``)
    cross-layer equalisation on ``inputs`` (:mod:`export.equalize`). Each step's outputs are
    checked against the original model's on ``inputs``."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    rewritten = onnx.ModelProto()
    rewritten.CopyFrom(model)
    count = subpixel_conv_transpose(rewritten)
    if count:
        _check_same(model, rewritten, card, inputs, f"the sub-pixel rewrite of {count} ConvTranspose node(s)")
    _name_nodes(rewritten.graph)
    onnx.save(rewritten, work / "rewritten.onnx")
    path = work / "prepared.onnx"
    quant_pre_process(str(work / "rewritten.onnx"), str(path), skip_symbolic_shape=True)
    pairs = 0
    if equalise:
        optimised = onnx.load(str(path))
        pairs = equalize(optimised, [{card.input.name: x} for x in inputs])
        _check_same(model, optimised, card, inputs, f"equalising {pairs} pair(s) of convolutions")
        onnx.save(optimised, path)
    return Prepared(path, count, pairs)


def _check_same(model: onnx.ModelProto, changed: onnx.ModelProto, card: ModelCard, inputs: Sequence[np.ndarray],
                what: str) -> None:
    """ExportError unless ``changed`` gives ``model``'s outputs (to :data:`PARITY_LIMIT`) on a few inputs."""
    worst = _max_difference(model, changed, card, inputs[:4])
    if worst > PARITY_LIMIT:
        raise ExportError(f"{what} changes the outputs by {worst:.2e}; not quantised")
    log.info("%s: max |Δ| %.1e on %d input(s)", what, worst, len(inputs[:4]))


def _max_difference(a: onnx.ModelProto, b: onnx.ModelProto, card: ModelCard, inputs: Sequence[np.ndarray]) -> float:
    """The largest |a - b| over the outputs of two graphs on ``inputs``."""
    import onnxruntime as ort

    sessions = [ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]) for m in (a, b)]
    worst = 0.0
    for x in inputs:
        want, got = (s.run(card.output_names(), {card.input.name: x}) for s in sessions)
        for u, v in zip(want, got):
            if u.shape != v.shape:
                return float("inf")
            if u.size:
                worst = max(worst, float(np.max(np.abs(u.astype(np.float64) - v))))
    return worst


def quantize_model(prepared: Path, out: Path, tensors: Sequence[np.ndarray], input_name: str,
                   options: QuantOptions) -> list[str]:
    """``quantize_static`` of ``prepared`` into ``out`` (QDQ, see :class:`QuantOptions`); the
    names of the nodes left in float."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    graph = onnx.load(str(prepared), load_external_data=False).graph
    keep = set(options.keep_float)
    excluded = float_tail(graph, options.last_conv) + [n.name for n in graph.node if keep & {n.name, n.op_type}]
    method = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
              "percentile": CalibrationMethod.Percentile}[options.method]
    extra: dict[str, Any] = {"CalibPercentile": options.percentile}
    if options.method != "minmax":  # histograms keep every activation of the images collected at once
        extra["CalibStridedMinMax"] = 1
    quantize_static(str(prepared), str(out), calibration_reader(tensors, input_name), quant_format=QuantFormat.QDQ,
                    per_channel=options.per_channel, reduce_range=options.reduce_range,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                    nodes_to_exclude=sorted(set(excluded)), calibrate_method=method, extra_options=extra)
    return sorted(set(excluded))


def kept_float_text(model: onnx.ModelProto, kept: Sequence[str], options: QuantOptions) -> str:
    """The card's words for the nodes left in float."""
    ops = sorted({n.op_type for n in model.graph.node if n.name in set(kept)})
    what = "the last convolutions and the nodes after them" if options.last_conv else "the nodes after the last convolutions"
    text = f"{len(kept)} node(s), {what} ({', '.join(ops)}): the decoding of the outputs stays float"
    if options.keep_float:
        text += f"; and, asked for: {', '.join(options.keep_float)}"
    return text


def is_qdq_int8(model: onnx.ModelProto) -> bool:
    """Whether the graph holds QuantizeLinear / DequantizeLinear pairs and int8 weights."""
    ops = {n.op_type for n in model.graph.node}
    int8 = any(t.data_type == onnx.TensorProto.INT8 for t in model.graph.initializer)
    return {"QuantizeLinear", "DequantizeLinear"} <= ops and int8


# =============================================================================
# Judgement: station eval with the float and the INT8 model
# =============================================================================


def station_eval(model: Path, images: Sequence[Path], config: Path | None, progress: bool) -> dict[str, Any]:
    """``station eval IMAGES --seg-model|--det-model MODEL [-c CONFIG]``, in this process: the
    line's Inspector on images with truth; its report (station.evaluate.build_report)."""
    from station.config import ModelsConfig, load_config
    from station.evaluate import FREE_CLASS, build_report, check_box_classes, discover, evaluate, load_boxes
    from station.inspector import Inspector, open_models

    cfg = load_config(config)
    cfg = cfg.model_copy(update={"models": ModelsConfig()})  # only the model under test
    task = card_of(onnx.load(str(model), load_external_data=False), str(model)).task
    models = open_models(cfg, [model] if task == "segmentation" else None, model if task == "detection" else None)
    found = discover(images, FREE_CLASS)
    if found.no_truth or not found.items:
        raise ExportError(f"{len(found.no_truth)} of the {len(images)} evaluation images have no truth "
                          f"(first: {(found.no_truth or tuple(images))[0]})")
    boxes, errors = load_boxes(found.items)
    if "detection" in models:
        check_box_classes(boxes.values(), models["detection"].card.classes, str(model))
    run = evaluate(found.items, boxes, Inspector(models, cfg, keep_mask=True), progress=progress)
    errors += run.errors
    if errors:
        raise ExportError(f"station eval of {model}: {len(errors)} image(s) failed; first: {errors[0]['error']}")
    flag = "--seg-model" if task == "segmentation" else "--det-model"
    command = ["station", "eval", "IMAGES…", flag, str(model), *(["-c", str(config)] if config else [])]
    return build_report(run, found, found.items, models, cfg, FREE_CLASS, command, config)


def headline(report: dict[str, Any]) -> dict[str, float]:
    """The figures of a station eval report that the card keeps (those the report has)."""
    figures = {k: float(v) for k, v in report["card_figures"].items()}
    grades = report.get("grades")
    if grades:
        figures["escapes"] = float(grades["escapes"])
        figures["false_rejects"] = float(grades["false_rejects"])
    figures["images"] = float(report["counts"]["evaluated"])
    return figures


def compare(fp32: dict[str, Any], int8: dict[str, Any]) -> dict[str, float]:
    """fp32_*, int8_* and delta_* (INT8 - float) of both reports' headline figures, and
    grade_changes: images whose grade differs between the two."""
    a, b = headline(fp32), headline(int8)
    figures = {f"fp32_{k}": round(v, 4) for k, v in a.items()}
    figures.update({f"int8_{k}": round(v, 4) for k, v in b.items()})
    figures.update({f"delta_{k}": round(b[k] - a[k], 4) for k in a if k in b and k != "images"})
    grades = {row["source"]: row["grade"] for row in fp32["images"]}
    figures["grade_changes"] = float(sum(grades.get(row["source"]) != row["grade"] for row in int8["images"]))
    return figures


def targets(figures: dict[str, float]) -> dict[str, bool]:
    """Whether each accuracy target of :data:`TARGETS` holds (for the figures the task has)."""
    out = {}
    for key in ("iou", "ap50"):
        if f"delta_{key}" in figures:
            out[f"|Δ {key}| <= {TARGETS[key]:g}"] = abs(figures[f"delta_{key}"]) <= TARGETS[key]
    if "delta_escapes" in figures:
        out[f"Δ escapes <= {TARGETS['escapes']:g}"] = figures["delta_escapes"] <= TARGETS["escapes"]
    return out


# =============================================================================
# The command: quantise, judge, write the model and its report
# =============================================================================


@dataclass(frozen=True)
class Request:
    """One run of the command: the float model, where the INT8 copy and the report go,
    the images, the eval config and the quantisation settings; ``command`` reproduces it."""

    model: Path
    out: Path
    report: Path
    sets: ImageSets
    config: Path | None
    options: QuantOptions
    command: str
    progress: bool = True


def _load_model(path: Path) -> tuple[onnx.ModelProto, ModelCard]:
    if not path.is_file():
        raise ExportError(f"{path}: no such model file")
    try:
        model = onnx.load(str(path))
    except Exception as exc:  # noqa: BLE001 - protobuf's decode errors have no common public type
        raise ExportError(f"{path}: not an ONNX model ({exc})") from exc
    card = card_of(model, str(path))
    if card.quantization is not None:
        raise ExportError(f"{path}: already an INT8 model (quantised from {card.quantization.source}); "
                          "quantise the float model")
    return model, card


def quantize_file(req: Request) -> dict[str, Any]:
    """The whole command (module docstring): writes ``req.out`` and ``req.report``; returns the report."""
    t0 = time.perf_counter()
    model, card = _load_model(req.model)
    if not req.sets.calibration or not req.sets.evaluation:
        raise ExportError(f"{req.sets.data}: {len(req.sets.calibration)} calibration and {len(req.sets.evaluation)} "
                          "evaluation images: need at least one of each")
    log.info("%s: calibrating on %s", req.model, req.sets.calibration_note)
    tensors = calibration_tensors(req.sets.calibration, card)
    with tempfile.TemporaryDirectory(prefix="station-quantize-") as tmp:
        work = Path(tmp)
        prepared = prepare_float(model, work, tensors, card, req.options.equalise)
        kept = quantize_model(prepared.path, work / "int8.onnx", tensors, card.input.name, req.options)
        int8 = onnx.load(str(work / "int8.onnx"))
        if not is_qdq_int8(int8):
            raise ExportError(f"{req.model}: the quantiser left no INT8 node (nothing it could quantise)")
        embed_card(int8, card)  # the float model's card, so that station can open it to be judged
        trial = save_model(int8, work / "judged.onnx")
        log.info("station eval on %s: float, then INT8", req.sets.evaluation_note)
        fp32 = station_eval(req.model, req.sets.evaluation, req.config, req.progress)
        judged = station_eval(trial, req.sets.evaluation, req.config, req.progress)
    figures = compare(fp32, judged)
    final = int8_card(card, req, sha256_file(req.model), prepared, kept_float_text(int8, kept, req.options), figures)
    embed_card(int8, final)
    save_model(int8, req.out)
    report = {
        "schema": REPORT_SCHEMA, "command": req.command, "seconds": round(time.perf_counter() - t0, 1),
        "source": {"path": str(req.model), "sha256": sha256_file(req.model), "bytes": req.model.stat().st_size},
        "output": {"path": str(req.out), "sha256": sha256_file(req.out), "bytes": req.out.stat().st_size},
        "conv_transpose_rewritten": prepared.conv_transpose, "pairs_equalised": prepared.equalised,
        "quantization": final.quantization.model_dump(mode="json") if final.quantization else None,
        "calibration_images": [str(p) for p in req.sets.calibration],
        "evaluation_images": [str(p) for p in req.sets.evaluation],
        "figures": figures, "targets": targets(figures),
        "fp32": _summary(fp32), "int8": _summary(judged),
    }
    req.report.parent.mkdir(parents=True, exist_ok=True)
    req.report.write_text(json.dumps(report, indent=2) + "\n")
    return report


def _summary(report: dict[str, Any]) -> dict[str, Any]:
    """The parts of a station eval report worth keeping beside the card's figures."""
    keep = ("command_line", "config", "rules", "counts", "card_figures")
    out = {k: report[k] for k in keep}
    if report.get("grades"):
        out["grades"] = {k: report["grades"][k] for k in ("escapes", "false_rejects", "labels", "matrix")}
    if report.get("detection"):
        out["ap50_per_class"] = {k: v["ap50"] for k, v in report["detection"]["per_class"].items()}
    return out


def int8_card(card: ModelCard, req: Request, source_sha: str, prepared: Prepared, kept_float: str,
              figures: dict[str, float]) -> ModelCard:
    """The float model's card with version ``+int8`` and the ``quantization`` section."""
    method, calibration = req.options.describe()
    if prepared.conv_transpose:
        method += f"; {prepared.conv_transpose} ConvTranspose rewritten as sub-pixel convolutions (export.subpixel)"
    if prepared.equalised:
        method += f"; {prepared.equalised} convolution pair(s) equalised on the calibration images (export.equalize)"
    config = f"config {req.config}" if req.config else "the bundled default config"
    info = QuantizationInfo(
        source=f"{card.name} v{card.version} ({req.model.name})",
        source_sha256=source_sha,
        method=method,
        calibration=calibration,
        calibration_data=f"{req.sets.data}: {req.sets.calibration_note}; through the card's preprocessing "
                         "(station.preprocess, as on the line)",
        calibration_images=len(req.sets.calibration),
        kept_float=kept_float,
        evaluation=f"station eval (the line's Inspector, {config}) on {req.sets.evaluation_note} under "
                   f"{req.sets.data}, the float model and this one on the same images; the float model's own "
                   f"split: {card.training.split or 'not recorded'}",
        figures=figures,
        command=req.command,
    )
    kind = "boxes" if isinstance(card.output, DetectionOutputs) else "masks"
    return card.model_copy(update={
        "version": f"{card.version}+int8",
        "description": f"{card.description} [INT8 copy for CPUs, {kind} judged against the float model's: "
                       "see quantization]".lstrip(),
        "quantization": info,
    })


def format_table(report: dict[str, Any]) -> str:
    """The figures of both models side by side, with the targets."""
    f = report["figures"]
    keys = [k[len("fp32_"):] for k in f if k.startswith("fp32_")]
    lines = [f"{'figure':<22}{'float':>10}{'INT8':>10}{'Δ':>10}"]
    for key in keys:
        delta = f.get(f"delta_{key}")
        lines.append(f"{key:<22}{f[f'fp32_{key}']:>10.4f}{f[f'int8_{key}']:>10.4f}"
                     + (f"{delta:>+10.4f}" if delta is not None else ""))
    lines.append(f"{'grade changes':<22}{f['grade_changes']:>30.0f}")
    lines += [f"target {name}: {'met' if ok else 'NOT met'}" for name, ok in report["targets"].items()]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m export.quantize", description=__doc__.split("\n\n")[0])
    p.add_argument("model", type=Path, help="the float ONNX model (with its card)")
    p.add_argument("--data", type=Path, required=True, help="the images: a folder of images with masks beside "
                   "them, or the root of the paths of --split")
    p.add_argument("--split", type=Path, help="split file: calibrate on its train side, evaluate on its val side")
    p.add_argument("--groups", type=Path, help=f"image → group JSON for the folds (default DATA/{GROUPS_FILE} "
                   "when it exists)")
    p.add_argument("--fold", type=int, default=0, help=f"the fold of {FOLDS} evaluated (without --split; default 0)")
    p.add_argument("--calibration", type=int, default=64, metavar="N", help="calibration images (default 64)")
    p.add_argument("--seed", type=int, default=0, help="seed of the calibration sample (default 0)")
    p.add_argument("--method", choices=METHODS, default="minmax", help="calibration method (default minmax)")
    p.add_argument("--percentile", type=float, default=99.999, help="with --method percentile (default 99.999)")
    p.add_argument("--no-per-channel", action="store_true", help="one weight scale per tensor")
    p.add_argument("--reduce-range", action="store_true", help="7-bit weights (CPUs without VNNI)")
    p.add_argument("--float-last-conv", action="store_true", help="leave the last convolutions (whose outputs are "
                   "the scores, box distances and mask logits) in float as well")
    p.add_argument("--no-equalise", action="store_true", help="no cross-layer equalisation before calibration")
    p.add_argument("--keep-float", nargs="+", default=[], metavar="NODE",
                   help="node names or op types to leave in float as well")
    p.add_argument("-c", "--config", type=Path, help="station config for the evaluation (grading, min_area_px; "
                   "default: the bundled default)")
    p.add_argument("-o", "--out", type=Path, help="the INT8 model (default MODEL with .int8.onnx)")
    p.add_argument("--json", type=Path, help="the report (default OUT with .json)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    return p


def _command(args: argparse.Namespace, out: Path, report: Path) -> str:
    """The canonical command line of ``args``."""
    argv = [str(args.model), "--data", str(args.data)]
    argv += ["--split", str(args.split)] if args.split else (["--groups", str(args.groups)] if args.groups else [])
    argv += [] if args.split else ["--fold", str(args.fold)]
    argv += ["--calibration", str(args.calibration), "--seed", str(args.seed), "--method", args.method]
    argv += ["--percentile", f"{args.percentile:g}"] if args.method == "percentile" else []
    argv += ["--no-per-channel"] if args.no_per_channel else []
    argv += ["--reduce-range"] if args.reduce_range else []
    argv += ["--float-last-conv"] if args.float_last_conv else []
    argv += ["--no-equalise"] if args.no_equalise else []
    argv += ["--keep-float", *args.keep_float] if args.keep_float else []
    argv += ["-c", str(args.config)] if args.config else []
    return "python -m export.quantize " + shlex.join(argv + ["-o", str(out), "--json", str(report)])


def request(args: argparse.Namespace) -> Request:
    """The parsed command line → a :class:`Request` (the image sets chosen here)."""
    if args.calibration < 1:
        raise ExportError(f"--calibration {args.calibration}: need at least one image")
    if not args.data.is_dir():
        raise ExportError(f"--data {args.data}: no such folder")
    if args.split is not None:
        sets = sets_from_split(args.data, args.split, args.calibration, args.seed)
    else:
        default_groups = args.data / GROUPS_FILE
        groups = args.groups or (default_groups if default_groups.is_file() else None)
        args.groups = groups
        sets = sets_from_folds(args.data, groups, args.fold, args.calibration, args.seed)
    out = args.out or args.model.with_name(args.model.name.removesuffix(".onnx") + ".int8.onnx")
    report = args.json or out.with_suffix(".json")
    options = QuantOptions(method=args.method, percentile=args.percentile, per_channel=not args.no_per_channel,
                           reduce_range=args.reduce_range, last_conv=args.float_last_conv,
                           equalise=not args.no_equalise,
                           keep_float=tuple(args.keep_float))
    return Request(args.model, out, report, sets, args.config, options, _command(args, out, report), not args.quiet)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stdout)
    try:
        report = quantize_file(request(args))
    except StationError as exc:  # ExportError, and station's own (a model it refuses, an unreadable config)
        log.error("%s", exc)
        return 2
    print(format_table(report))
    log.info("wrote %s (%.1f MB) and %s", report["output"]["path"], report["output"]["bytes"] / 1e6,
             args.json or Path(report["output"]["path"]).with_suffix(".json"))
    return 0


if __name__ == "__main__":
    sys.exit(main())

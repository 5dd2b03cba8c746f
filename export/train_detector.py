"""Train the FCOS-style MobileNetV2 box detector and export it to ONNX with its card.

::

    python -m export.train_detector DATA_DIR --out RUN_DIR [--size 224] [--alpha 0.5]
        [--width 96] [--levels 8 [16 32]] [--epochs N] [--batch B] [--lr LR] [--seed S] [--val-fraction 0.2]
        [--max-minutes M] [--colour gray|rgb] [--resize-mode stretch|letterbox] ...

DATA_DIR is in the NEU-DET layout (``images/<stem>.jpg`` + ``annotations/<stem>.xml``,
see :mod:`export.voc`). The model card is drafted first; its preprocessing
ops build the training inputs through ``station.preprocess``, the code the
line daemon runs, and the boxes follow through the same geometry.

Split: near-duplicate groups (:func:`export.voc.near_duplicate_groups`) stay on
one side; groups are shuffled with the seed and moved to validation until it
holds ``--val-fraction`` of the images (:func:`export.data.split_samples`).

Training: Adam with a linear warm-up and cosine decay, the loss of
:func:`export.detector.make_loss`, augmentation by the 8 symmetries of the
square (4 flips when not square), optional zoom crops (``--crop-min``) and
gain/offset jitter (``--jitter``), all drawn from (seed, epoch, batch); fixed seeds
and deterministic TensorFlow ops. After every epoch the validation images go
through the inference graph (in-graph NMS), the outputs are decoded by
:func:`station.postprocess.detection_defects` (the daemon's code: card score
threshold, boxes back to source pixels) and scored with
:func:`station.evaluate.coco_detection_metrics` (pycocotools, as
``station eval``): AP50 and COCO mAP. The weights of the best validation mAP
are kept (``--keep last``: those of the last epoch, which the validation split
did not choose). ``--max-minutes`` stops training after the epoch that passes it (the
learning-rate schedule is not shortened).

RUN_DIR receives ``history.csv`` (epoch, loss, val_ap50, val_map, lr,
seconds), ``curves.png``, ``best.weights.h5`` (rewritten whenever validation
mAP improves), ``last.weights.h5`` (after every epoch), ``split.json``, ``groups.json``, ``val/images`` +
``val/annotations`` (symbolic links: ``station eval RUN_DIR/val/images
--det-model RUN_DIR/model.onnx`` re-measures the figures), ``card.json`` and
``model.onnx`` (best or, with ``--keep last``, last weights, card embedded, TF vs ONNX Runtime parity on the
NMS outputs recorded in the card).
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import math
import os
import shlex
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
from pydantic import ValidationError

from station.evaluate import BoxTable, coco_detection_metrics
from station.modelcard import DetectionOutputs, ExportInfo, InputSpec, ModelCard, PreprocessOp, TrainingInfo
from station.postprocess import detection_defects

from . import ExportError
from .alloc import loaded_allocator
from .card import DEFAULT_OPSET, MAX_OPSET, PreprocessOptions, clahe_arg, package_version, preprocess_ops
from .data import split_samples, write_split_file
from .detector_options import QUALITY_TARGETS, TTA_FLIPS, check_strides, check_tta
from .voc import BoxArrays, class_names, find_voc_samples, load_box_arrays, near_duplicate_groups

log = logging.getLogger(__name__)

HISTORY_FIELDS = ("epoch", "loss", "val_ap50", "val_map", "lr", "seconds")
DETECTION_PREPROCESS = PreprocessOptions(colour="gray", clahe=None, dilate=0, resize_mode="stretch",
                                         interpolation="area", normalize="symmetric")
DATA_CITATION = ("NEU surface defect database, detection version (Song & Yan 2013; He et al., IEEE TIM 2020), "
                 "copy of siddhartamukherjee/NEU-DET-Steel-Surface-Defect-Detection @351bee2")


@dataclass(frozen=True)
class DetTrainConfig:
    """Everything a detector run depends on. size: (height, width) of the model input, pixels."""

    data_dir: Path
    out_dir: Path
    preprocess: tuple[PreprocessOp, ...] = field(default_factory=lambda: tuple(preprocess_ops(DETECTION_PREPROCESS)))
    size: tuple[int, int] = (224, 224)
    alpha: float = 0.5
    width: int = 96
    head_depth: int = 2
    levels: tuple[int, ...] = (8,)  # FPN strides the head reads (check_strides)
    quality: str = "centreness"  # what the quality logit learns: "centreness" or "iou" (export.detector.make_loss)
    centre_radius: float | None = None  # FCOS centre sampling radius in strides (export.detector.encode_targets)
    box_weight: float = 1.0  # weight of the GIoU term against the focal one (export.detector.make_loss)
    tta: tuple[str, ...] = ()  # test-time flips in the exported graph ("h", "v", "hv"; export.detector.build_inference)
    weights: Path | None = None
    epochs: int = 60
    batch: int = 16
    lr: float = 2e-3
    warmup_epochs: float = 1.0
    weight_decay: float = 1e-4
    crop_min: float = 1.0  # zoom crops: each side at least this fraction of the input's (1: off)
    jitter: float = 0.0  # gain 1 ± jitter, offset ± jitter on the normalised input (0: off)
    seed: int = 0
    val_fraction: float = 0.2
    duplicate_ncc: float = 0.85
    limit: int | None = None  # use only the first N images (spread over the classes): tests, quick runs
    max_minutes: float | None = None
    keep: str = "best"  # "best": the best validation mAP epoch's weights; "last": the final epoch's
    score_threshold: float = 0.05
    nms_iou: float = 0.5
    max_detections: int = 100
    name: str = "neu_det_detector"
    version: str = "1"
    description: str = "FCOS-style box detector (MobileNetV2 from scratch) for steel surface defects"
    data_description: str = ""
    opset: int = DEFAULT_OPSET
    parity_count: int = 8
    eager: bool = False
    export_from: Path | None = None  # skip training: export these weights
    init_weights: Path | None = None  # start from these weights (a second, lower-rate stage)
    command: str = ""


@dataclass(frozen=True)
class DetTrainResult:
    card: ModelCard
    onnx_path: Path
    kept_epoch: int  # the epoch whose weights were exported
    seconds: float
    history: list[dict[str, float]]


# --- card --------------------------------------------------------------------


def draft_detection_card(cfg: DetTrainConfig, classes: Sequence[str], training: TrainingInfo) -> ModelCard:
    """A detection card: NHWC float32 input ``image``, combined-NMS outputs."""
    from station.modelcard import ColourOp

    colour = cfg.preprocess[0].to if cfg.preprocess and isinstance(cfg.preprocess[0], ColourOp) else "gray"
    try:
        return ModelCard(
            name=cfg.name, version=cfg.version, task="detection", classes=list(classes), description=cfg.description,
            input=InputSpec(name="image", layout="NHWC", height=cfg.size[0], width=cfg.size[1],
                            channels=1 if colour == "gray" else 3, dtype="float32", colour=colour),
            preprocess=list(cfg.preprocess),
            output=DetectionOutputs(boxes="boxes", scores="scores", classes="classes", count="count",
                                    box_format="yxyx_normalized", score_threshold=cfg.score_threshold,
                                    nms_iou=cfg.nms_iou, max_detections=cfg.max_detections),
            training=training,
            export=ExportInfo(tensorflow=package_version("tensorflow"), tf2onnx=package_version("tf2onnx"),
                              onnx=package_version("onnx"), opset=cfg.opset),
        )
    except ValidationError as exc:
        raise ExportError(f"model card {cfg.name!r}: {exc}") from exc


# --- data --------------------------------------------------------------------


def augment(x: np.ndarray, boxes: np.ndarray, flip_h: bool, flip_v: bool, turns: int) -> tuple[np.ndarray, np.ndarray]:
    """(H, W, C) input and its (n, 4) [x1, y1, x2, y2] pixel boxes, flipped and then
    turned by ``turns`` × 90° counter-clockwise (np.rot90's sense; H == W when turns)."""
    h, w = x.shape[:2]
    b = boxes.copy()
    if flip_h:
        x = x[:, ::-1]
        b[:, [0, 2]] = w - b[:, [2, 0]]
    if flip_v:
        x = x[::-1]
        b[:, [1, 3]] = h - b[:, [3, 1]]
    for _ in range(turns % 4):
        # rot90 CCW: new (x', y') = (y, W - x), the height becomes the width
        x = np.rot90(x)
        b = np.stack([b[:, 1], w - b[:, 2], b[:, 3], w - b[:, 0]], axis=1)
        h, w = w, h
    return np.ascontiguousarray(x), b


def zoom_crop(x: np.ndarray, boxes: np.ndarray, labels: np.ndarray, rng: np.random.Generator, min_side: float,
              keep: float = 0.4, tries: int = 10) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A random crop of ``x`` (each side a fraction in [min_side, 1] of the input's,
    aspect free) resized back to the input size, with its boxes clipped and rescaled.

    A crop is accepted only when every box keeps at least ``keep`` of its area or
    leaves the crop entirely (a defect cut to a sliver would be an unlabelled
    defect); after ``tries`` refused draws the input is returned unchanged. Boxes
    that leave the crop are dropped with their labels."""
    import cv2

    if min_side >= 1.0 or len(boxes) == 0:
        return x, boxes, labels
    h, w = x.shape[:2]
    area = np.maximum((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]), 1e-6)
    for _ in range(tries):
        ch = int(round(h * rng.uniform(min_side, 1.0)))
        cw = int(round(w * rng.uniform(min_side, 1.0)))
        y0 = int(rng.integers(0, h - ch + 1))
        x0 = int(rng.integers(0, w - cw + 1))
        b = boxes - np.array([x0, y0, x0, y0], np.float32)
        b[:, [0, 2]] = np.clip(b[:, [0, 2]], 0, cw)
        b[:, [1, 3]] = np.clip(b[:, [1, 3]], 0, ch)
        kept = np.maximum(b[:, 2] - b[:, 0], 0) * np.maximum(b[:, 3] - b[:, 1], 0) / area
        inside = kept >= keep
        if not inside.any() or np.any((kept > 0) & ~inside):
            continue
        out = cv2.resize(x[y0 : y0 + ch, x0 : x0 + cw], (w, h), interpolation=cv2.INTER_LINEAR)
        b = b[inside] * np.array([w / cw, h / ch, w / cw, h / ch], np.float32)
        return out.reshape(x.shape), b.astype(np.float32), labels[inside]
    return x, boxes, labels


def make_batches(arrays: BoxArrays, num_classes: int, batch: int, seed: int, crop_min: float = 1.0,
                 jitter: float = 0.0, strides: Sequence[int] = (8,), centre_radius: float | None = None):
    """A ``keras.utils.PyDataset`` of shuffled, augmented (x, targets) batches; order and
    transforms are functions of (seed, epoch, batch index) only.

    Each image: one of the 8 symmetries of the square (4 flips when not square);
    then, when ``crop_min`` < 1, with probability ½ a :func:`zoom_crop`; then, when
    ``jitter`` > 0, gain 1 ± jitter and offset ± jitter on the normalised input."""
    import keras

    from .detector import encode_targets

    n = len(arrays)
    in_h, in_w = arrays.x.shape[1:3]
    square = in_h == in_w

    class Batches(keras.utils.PyDataset):
        def __init__(self) -> None:
            super().__init__(workers=1, use_multiprocessing=False)
            self.epoch = 0

        def __len__(self) -> int:
            return math.ceil(n / batch)

        def on_epoch_end(self) -> None:
            self.epoch += 1

        def __getitem__(self, idx: int):
            order = np.random.default_rng([seed, self.epoch]).permutation(n)
            rows = order[idx * batch : (idx + 1) * batch]
            rng = np.random.default_rng([seed, self.epoch, idx])
            xb = np.empty((len(rows),) + arrays.x.shape[1:], arrays.x.dtype)
            yb = []
            for i, r in enumerate(rows):
                fh, fv = (bool(v) for v in rng.integers(0, 2, size=2))
                turns = int(rng.integers(0, 4)) if square else 0
                xi, b = augment(arrays.x[r], arrays.boxes[r], fh, fv, turns)
                labels = arrays.labels[r]
                if crop_min < 1.0 and rng.random() < 0.5:
                    xi, b, labels = zoom_crop(xi, b, labels, rng, crop_min)
                if jitter > 0:
                    gain, offset = rng.uniform(1 - jitter, 1 + jitter), rng.uniform(-jitter, jitter)
                    xi = xi * np.float32(gain) + np.float32(offset)
                xb[i] = xi
                yb.append(encode_targets(b, labels, in_h, in_w, num_classes, strides, centre_radius))
            return xb, np.stack(yb)

    return Batches()


def _spread(samples, limit: int | None):
    if limit is None or limit >= len(samples):
        return list(samples)
    picks = np.unique(np.round(np.linspace(0, len(samples) - 1, limit)).astype(np.int64))
    return [samples[i] for i in picks]


# --- evaluation --------------------------------------------------------------


def detect(infer_model, arrays: BoxArrays, card: ModelCard, batch: int = 32) -> list:
    """Run the inference graph on ``arrays.x`` and decode each image with the daemon's
    :func:`station.postprocess.detection_defects` → list of Defects (source pixels)."""
    spec = card.output
    assert isinstance(spec, DetectionOutputs)  # a detector's card
    found = []
    for start in range(0, len(arrays), batch):
        outs = infer_model(arrays.x[start : start + batch], training=False)
        outs = [np.asarray(o) for o in outs]
        for j in range(outs[0].shape[0]):
            named = {spec.boxes: outs[0][j : j + 1], spec.scores: outs[1][j : j + 1],
                     spec.classes: outs[2][j : j + 1], spec.count: outs[3][j : j + 1]}
            found.append(detection_defects(named, spec, card.classes, arrays.geometries[start + j]))
    return found


def score_detections(found: Sequence, arrays: BoxArrays, classes: Sequence[str]) -> dict:
    """COCO AP of ``found`` (one Defects per image) against the VOC truth, as ``station eval``."""
    index = {n: i for i, n in enumerate(classes)}
    truth_rows, det_rows = [], []
    for i, (t, d) in enumerate(zip(arrays.truths, found)):
        for box, name, hard in zip(t.xyxy, t.class_name.tolist(), t.difficult.tolist()):
            truth_rows.append((i, index[name], box, 1.0, hard))
        for box, name, score in zip(d.xyxy, d.class_name.tolist(), d.confidence.tolist()):
            det_rows.append((i, index[name], box, score, False))
    return coco_detection_metrics(BoxTable.build(truth_rows), BoxTable.build(det_rows), arrays.sizes, classes)


# --- run outputs -------------------------------------------------------------


def plot_curves(history: Sequence[dict[str, float]], path: Path, title: str = "") -> None:
    """Training loss and validation AP50 / mAP per epoch, to a PNG (matplotlib Agg)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [h["epoch"] for h in history]
    fig, (ax_loss, ax_ap) = plt.subplots(1, 2, figsize=(10, 4), dpi=110)
    ax_loss.plot(epochs, [h["loss"] for h in history], "o-", ms=3, label="train")
    ax_loss.set_xlabel("epoch")
    ax_loss.set_ylabel("loss (focal + GIoU + quality BCE)")
    ax_loss.grid(alpha=0.3)
    ax_loss.legend()
    ax_ap.plot(epochs, [h["val_ap50"] for h in history], "o-", ms=3, label="validation AP50")
    ax_ap.plot(epochs, [h["val_map"] for h in history], "o-", ms=3, label="validation mAP 0.50:0.95")
    best = max(history, key=lambda h: h["val_map"])
    ax_ap.axvline(best["epoch"], color="grey", ls=":", lw=1)
    ax_ap.annotate(f"best mAP {best['val_map']:.3f}, AP50 {best['val_ap50']:.3f} (epoch {best['epoch']:.0f})",
                   (best["epoch"], best["val_map"]), textcoords="offset points", xytext=(-10, -18), ha="right",
                   fontsize=8)
    ax_ap.set_ylim(0, 1)
    ax_ap.set_xlabel("epoch")
    ax_ap.set_ylabel("COCO AP (pycocotools)")
    ax_ap.grid(alpha=0.3)
    ax_ap.legend()
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def write_split_view(out_dir: Path, samples) -> Path:
    """``out_dir/images`` + ``out_dir/annotations`` of symbolic links to ``samples`` (what
    ``station eval`` expects); returns the images folder."""
    images, anns = out_dir / "images", out_dir / "annotations"
    for folder in (images, anns):
        folder.mkdir(parents=True, exist_ok=True)
        for old in folder.iterdir():
            old.unlink()
    for s in samples:
        os.symlink(s.image.resolve(), images / s.image.name)
        os.symlink(s.annotation.resolve(), anns / s.annotation.name)
    return images


def _epoch_callback(cfg: DetTrainConfig, infer_model, val: BoxArrays, card: ModelCard, rows: list, t_start: float):
    import keras

    history_path = cfg.out_dir / "history.csv"
    best_path = cfg.out_dir / "best.weights.h5"
    last_path = cfg.out_dir / "last.weights.h5"

    class EpochEval(keras.callbacks.Callback):
        """Validation AP after each epoch; history.csv row; best and last weights to disk."""

        def __init__(self) -> None:
            super().__init__()
            self.best = -math.inf
            self.best_epoch = 0

        def on_train_begin(self, logs=None):
            with history_path.open("w", newline="") as f:
                csv.writer(f).writerow(HISTORY_FIELDS)

        def on_epoch_begin(self, epoch, logs=None):
            self._t0 = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):
            logs = logs or {}
            metrics = score_detections(detect(infer_model, val, card), val, card.classes)
            lr = self.model.optimizer.learning_rate
            row = {"epoch": float(epoch + 1), "loss": float(logs.get("loss", float("nan"))),
                   "val_ap50": float(metrics["ap50"] or 0.0), "val_map": float(metrics["map"] or 0.0),
                   "lr": float(np.asarray(lr)), "seconds": time.perf_counter() - self._t0}
            rows.append(row)
            with history_path.open("a", newline="") as f:
                csv.writer(f).writerow([f"{row[k]:.6g}" if k != "epoch" else int(row[k]) for k in HISTORY_FIELDS])
            improved = row["val_map"] > self.best
            if improved:
                self.best, self.best_epoch = row["val_map"], epoch + 1
                self.model.save_weights(best_path)
            self.model.save_weights(last_path)
            elapsed = (time.perf_counter() - t_start) / 60
            log.info("epoch %d/%d: loss %.4f | val AP50 %.4f mAP %.4f%s | %.1f s (%.1f min in all)", epoch + 1,
                     cfg.epochs, row["loss"], row["val_ap50"], row["val_map"], " *best*" if improved else "",
                     row["seconds"], elapsed)
            if cfg.max_minutes is not None and elapsed >= cfg.max_minutes:
                log.warning("--max-minutes %g reached after epoch %d: stopping", cfg.max_minutes, epoch + 1)
                self.model.stop_training = True

    return EpochEval()


# --- the run -----------------------------------------------------------------


def _check(cfg: DetTrainConfig) -> None:
    if cfg.keep not in ("best", "last"):
        raise ExportError(f"--keep {cfg.keep!r}: must be 'best' or 'last'")
    if cfg.epochs < 1:
        raise ExportError(f"--epochs {cfg.epochs}: need at least 1")
    if cfg.batch < 1:
        raise ExportError(f"--batch {cfg.batch}: need at least 1")
    if not cfg.lr > 0:
        raise ExportError(f"--lr {cfg.lr}: must be positive")
    if not 0.2 <= cfg.crop_min <= 1.0:
        raise ExportError(f"--crop-min {cfg.crop_min}: must be between 0.2 and 1 (1 turns zoom crops off)")
    if not 0.0 <= cfg.jitter < 1.0:
        raise ExportError(f"--jitter {cfg.jitter}: must be in [0, 1)")
    if cfg.centre_radius is not None and not cfg.centre_radius > 0:
        raise ExportError(f"--centre-radius {cfg.centre_radius}: must be positive (omit it to use every cell in a box)")
    if not cfg.box_weight > 0:
        raise ExportError(f"--box-weight {cfg.box_weight}: must be positive")
    if any(v < 32 or v % 32 for v in cfg.size):
        raise ExportError(f"--size {cfg.size[0]} {cfg.size[1]}: height and width must be multiples of 32")
    if not 0 < cfg.alpha <= 1.4:
        raise ExportError(f"--alpha {cfg.alpha}: MobileNetV2 width multipliers are 0.35 … 1.4")
    if not 1 <= cfg.opset <= MAX_OPSET:
        raise ExportError(f"--opset {cfg.opset}: must be between 1 and {MAX_OPSET}")
    for flag, path in (("--weights", cfg.weights), ("--export-from", cfg.export_from),
                       ("--init-weights", cfg.init_weights)):
        if path is not None and not Path(path).is_file():
            raise ExportError(f"{flag} {path}: no such file")


def train(cfg: DetTrainConfig) -> DetTrainResult:
    """Load data, split, train, keep the best-validation-mAP weights and export them."""
    _check(cfg)
    command = cfg.command or command_of(cfg)
    log.info("memory allocator: %s (export/alloc.py)", loaded_allocator())
    cfg.out_dir.mkdir(parents=True, exist_ok=True)
    samples = _spread(find_voc_samples(cfg.data_dir), cfg.limit)

    from station.evaluate import parse_voc

    classes = class_names(parse_voc(s.annotation) for s in samples)
    draft = draft_detection_card(cfg, classes, TrainingInfo(data="(pending)"))

    t_groups = time.perf_counter()
    groups = near_duplicate_groups(samples, cfg.duplicate_ncc)
    n_linked = sum(1 for k, g in groups.items() if k != g or list(groups.values()).count(g) > 1)
    (cfg.out_dir / "groups.json").write_text(json.dumps(groups, indent=1) + "\n")
    split = split_samples([s.as_sample() for s in samples], cfg.val_fraction, cfg.seed, groups)
    by_key = {s.key: s for s in samples}
    train_s = [by_key[s.key] for s in split.train]
    val_s = [by_key[s.key] for s in split.val]
    n_groups = len({g for g in groups.values() if list(groups.values()).count(g) > 1})
    split_text = (f"{split.description}; near-duplicates (peak high-pass NCC > {cfg.duplicate_ncc:g}, "
                  f"same class: {n_linked} images in {n_groups} groups) kept on one side")
    log.info("data %s: %d images, classes %s; split %s (grouping took %.0f s)", cfg.data_dir, len(samples),
             classes, split_text, time.perf_counter() - t_groups)
    write_split_file(cfg.out_dir / "split.json", split_text, [s.key for s in train_s], [s.key for s in val_s])
    val_images = write_split_view(cfg.out_dir / "val", val_s)

    train_a = load_box_arrays(train_s, draft, progress=True)
    val_a = load_box_arrays(val_s, draft, progress=True)

    import keras
    import tensorflow as tf

    from .detector import build_detector, build_inference, describe, make_loss
    from .onnx_export import export_model

    keras.utils.set_random_seed(cfg.seed)
    tf.config.experimental.enable_op_determinism()
    h, w = cfg.size
    model = build_detector((h, w, draft.input.channels), len(classes), alpha=cfg.alpha, width=cfg.width,
                           head_depth=cfg.head_depth, weights=cfg.weights, name=cfg.name.replace("-", "_"),
                           strides=cfg.levels)
    if cfg.init_weights is not None:
        model.load_weights(cfg.init_weights)
        log.info("initial weights: %s", cfg.init_weights)
    infer_model = build_inference(model, len(classes), cfg.score_threshold, cfg.nms_iou,
                                  max_total=cfg.max_detections, strides=cfg.levels)
    # the exported graph: the same weights, with the test-time flips (the epochs are watched without them)
    shipped_graph = build_inference(model, len(classes), cfg.score_threshold, cfg.nms_iou,
                                    max_total=cfg.max_detections, strides=cfg.levels, tta=cfg.tta) if cfg.tta \
        else infer_model
    steps = math.ceil(len(train_a) / cfg.batch)
    warmup = int(round(cfg.warmup_epochs * steps))
    schedule = keras.optimizers.schedules.CosineDecay(
        cfg.lr / 10 if warmup else cfg.lr, decay_steps=max(1, steps * cfg.epochs - warmup), alpha=0.02,
        warmup_target=cfg.lr if warmup else None, warmup_steps=warmup)
    model.compile(optimizer=keras.optimizers.AdamW(schedule, weight_decay=cfg.weight_decay, clipnorm=10.0),
                  loss=make_loss(len(classes), h, w, box_weight=cfg.box_weight, strides=cfg.levels,
                                 quality=cfg.quality), run_eagerly=cfg.eager)
    log.info("%s; %d train / %d val images; %d epochs of %d steps", describe(model), len(train_a), len(val_a),
             cfg.epochs, steps)

    rows: list[dict[str, float]] = []
    t0 = time.perf_counter()
    kept_epoch = 0
    if cfg.export_from is None:
        callback = _epoch_callback(cfg, infer_model, val_a, draft, rows, t0)
        model.fit(make_batches(train_a, len(classes), cfg.batch, cfg.seed, cfg.crop_min, cfg.jitter, cfg.levels,
                               cfg.centre_radius),
                  epochs=cfg.epochs, shuffle=False, callbacks=[callback], verbose=1 if sys.stdout.isatty() else 2)
        kept_epoch = callback.best_epoch
        plot_curves(rows, cfg.out_dir / "curves.png", f"{cfg.name}: {len(train_a)} train / {len(val_a)} val "
                    f"images, {h}x{w}, MobileNetV2 alpha {cfg.alpha:g} from scratch")
        if cfg.keep == "best":
            model.load_weights(cfg.out_dir / "best.weights.h5")
        else:
            kept_epoch = len(rows)  # the final weights are in the model
    else:
        model.load_weights(cfg.export_from)
        if (cfg.out_dir / "history.csv").is_file():
            with (cfg.out_dir / "history.csv").open() as f:
                rows = [{k: float(v) for k, v in r.items()} for r in csv.DictReader(f)]
            if rows:
                kept_epoch = int(max(rows, key=lambda r: r["val_map"])["epoch"] if cfg.keep == "best"
                                 else rows[-1]["epoch"])
    seconds = time.perf_counter() - t0 if cfg.export_from is None else sum(r["seconds"] for r in rows)

    metrics = score_detections(detect(shipped_graph, val_a, draft), val_a, classes)
    figures = {"val_ap50": round(float(metrics["ap50"] or 0.0), 4), "val_map": round(float(metrics["map"] or 0.0), 4),
               "val_ap75": round(float(metrics["ap75"] or 0.0), 4), "kept_epoch": float(kept_epoch),
               "epochs_run": float(len(rows))}
    for name, per in metrics["per_class"].items():
        if per["ap50"] is not None:
            figures[f"val_ap50.{name}"] = round(float(per["ap50"]), 4)
    log.info("%s epoch %d: validation AP50 %.4f, mAP %.4f (%d images)", cfg.keep, kept_epoch, figures["val_ap50"],
             figures["val_map"], len(val_a))

    onnx_path = cfg.out_dir / "model.onnx"
    training = TrainingInfo(
        data=cfg.data_description or f"{DATA_CITATION}: {len(samples)} images from {cfg.data_dir}",
        split=split_text,
        command=command,
        epochs=len(rows) or cfg.epochs,
        seed=cfg.seed,
        seconds=round(seconds, 1),
        figures=figures,
        evaluated_by=f"station eval {val_images} --det-model {onnx_path} (validation split; "
                     + ("best-mAP epoch chosen on the same split" if cfg.keep == "best" else
                        "weights of the last epoch, chosen before training")
                     + f"; score threshold {cfg.score_threshold:g}"
                     + (f"; test-time flips {'/'.join(cfg.tta)} in the graph" if cfg.tta else "") + ")",
    )
    card = draft.model_copy(update={"training": training})
    card = export_model(shipped_graph, card, onnx_path, val_a.x[: max(1, cfg.parity_count)], opset=cfg.opset)
    (cfg.out_dir / "card.json").write_text(card.model_dump_json(indent=2) + "\n")
    return DetTrainResult(card, onnx_path, kept_epoch, seconds, rows)


# --- CLI ---------------------------------------------------------------------


def command_of(cfg: DetTrainConfig) -> str:
    """A command line reproducing ``cfg`` (preprocess flags as far as they go)."""
    argv = [str(cfg.data_dir), "--out", str(cfg.out_dir), "--size", str(cfg.size[0]), str(cfg.size[1]),
            "--alpha", f"{cfg.alpha:g}", "--width", str(cfg.width), "--head-depth", str(cfg.head_depth),
            "--epochs", str(cfg.epochs), "--batch", str(cfg.batch), "--lr", f"{cfg.lr:g}",
            "--crop-min", f"{cfg.crop_min:g}", "--jitter", f"{cfg.jitter:g}", "--seed", str(cfg.seed),
            "--val-fraction", f"{cfg.val_fraction:g}", "--score-threshold", f"{cfg.score_threshold:g}",
            "--nms-iou", f"{cfg.nms_iou:g}", "--name", cfg.name, "--version", cfg.version,
            "--opset", str(cfg.opset)]
    if cfg.levels != (8,):
        argv += ["--levels", *map(str, cfg.levels)]
    if cfg.quality != "centreness":
        argv += ["--quality", cfg.quality]
    if cfg.centre_radius is not None:
        argv += ["--centre-radius", f"{cfg.centre_radius:g}"]
    if cfg.box_weight != 1.0:
        argv += ["--box-weight", f"{cfg.box_weight:g}"]
    if cfg.tta:
        argv += ["--tta", *cfg.tta]
    if cfg.limit is not None:
        argv += ["--limit", str(cfg.limit)]
    if cfg.max_minutes is not None:
        argv += ["--max-minutes", f"{cfg.max_minutes:g}"]
    if cfg.keep != "best":
        argv += ["--keep", cfg.keep]
    if cfg.weights is not None:
        argv += ["--weights", str(cfg.weights)]
    if cfg.init_weights is not None:
        argv += ["--init-weights", str(cfg.init_weights)]
    if cfg.eager:
        argv.append("--eager")
    return "python -m export.train_detector " + shlex.join(argv)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m export.train_detector", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("data_dir", type=Path, help="folder with images/<stem>.jpg and annotations/<stem>.xml (VOC)")
    p.add_argument("--out", type=Path, required=True, help="run directory")
    p.add_argument("--size", type=int, nargs="+", default=[224], metavar="N",
                   help="model input: one side (square) or H W, multiples of 32")
    p.add_argument("--alpha", type=float, default=0.5, help="MobileNetV2 width multiplier")
    p.add_argument("--width", type=int, default=96, help="FPN and head channels")
    p.add_argument("--head-depth", type=int, default=2, help="conv layers per head tower")
    p.add_argument("--levels", type=int, nargs="+", default=[8], metavar="STRIDE",
                   help="FPN strides the head reads: 8 (one map) or e.g. 8 16 32 (boxes assigned to a level by size)")
    p.add_argument("--quality", choices=QUALITY_TARGETS, default="centreness",
                   help="what the score's quality logit learns on positive cells: FCOS centre-ness, or the IoU of "
                        "the cell's predicted box with its truth box (IoU-aware)")
    p.add_argument("--centre-radius", type=float, metavar="R",
                   help="FCOS centre sampling: a cell learns a box only within R x its stride of the box centre "
                        "(1.5 in FCOS; default: every cell inside the box)")
    p.add_argument("--box-weight", type=float, default=1.0, help="weight of the GIoU box loss against the focal loss")
    p.add_argument("--tta", nargs="+", default=[], choices=TTA_FLIPS, metavar="FLIP",
                   help="test-time flips in the exported graph: h (left-right), v (top-bottom), hv (both); the "
                        "outputs of all copies are averaged before NMS, one more model run per flip")
    p.add_argument("--weights", type=Path, help="local MobileNetV2 include_top=False weights (never downloaded)")
    p.add_argument("--epochs", type=int, default=60)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--lr", type=float, default=2e-3, help="peak AdamW learning rate (1 warm-up epoch, cosine decay)")
    p.add_argument("--crop-min", type=float, default=1.0,
                   help="augmentation: half the images are zoom crops, each side at least this fraction (1: off)")
    p.add_argument("--jitter", type=float, default=0.0,
                   help="augmentation: per-image gain 1±J and offset ±J on the normalised input (0: off)")
    p.add_argument("--seed", type=int, default=0, help="split, augmentation and initialisation seed")
    p.add_argument("--val-fraction", type=float, default=0.2)
    p.add_argument("--duplicate-ncc", type=float, default=0.85, help="near-duplicate link threshold")
    p.add_argument("--limit", type=int, help="use N images spread over the data set (quick runs)")
    p.add_argument("--max-minutes", type=float, help="stop after the epoch that passes this wall-clock time")
    p.add_argument("--keep", choices=("best", "last"), default="best",
                   help="export the weights of the best validation-mAP epoch (chosen on the split the figures are "
                        "measured on) or of the last epoch (chosen before training)")
    p.add_argument("--export-from", type=Path, help="skip training: export these weights (RUN_DIR/best.weights.h5)")
    p.add_argument("--init-weights", type=Path, help="start from these weights (e.g. a second stage at a lower "
                   "--lr, same split and seed)")
    p.add_argument("--eager", action="store_true", help="run eagerly (no graph tracing: tiny debug runs)")
    g = p.add_argument_group("preprocessing (written to the model card, applied by station at run time)")
    g.add_argument("--colour", choices=("gray", "rgb", "bgr"), default="gray")
    g.add_argument("--clahe", type=clahe_arg, metavar="CLIP,GRID", help="CLAHE (default: none)")
    g.add_argument("--equalize", action="store_true", help="global histogram equalisation")
    g.add_argument("--resize-mode", choices=("stretch", "letterbox"), default="stretch")
    g.add_argument("--interpolation", choices=("area", "linear", "nearest"), default="area")
    g.add_argument("--pad-value", type=int, default=0)
    g.add_argument("--normalize", choices=("unit", "symmetric"), default="symmetric")
    c = p.add_argument_group("model card")
    c.add_argument("--name", default="neu_det_detector")
    c.add_argument("--version", default="1")
    c.add_argument("--description", default=DetTrainConfig.description)
    c.add_argument("--data-description", default="")
    c.add_argument("--score-threshold", type=float, default=0.05, help="in-graph NMS and card score threshold")
    c.add_argument("--nms-iou", type=float, default=0.5)
    c.add_argument("--max-detections", type=int, default=100)
    c.add_argument("--opset", type=int, default=DEFAULT_OPSET, help=f"ONNX opset (at most {MAX_OPSET})")
    return p


def config_from_args(args: argparse.Namespace, command: str) -> DetTrainConfig:
    if len(args.size) not in (1, 2):
        raise ExportError(f"--size {' '.join(map(str, args.size))}: give one side or H W")
    size = (args.size[0], args.size[-1])
    opts = PreprocessOptions(colour=args.colour, clahe=args.clahe, equalize=args.equalize, dilate=0,
                             resize_mode=args.resize_mode, interpolation=args.interpolation,
                             pad_value=args.pad_value, normalize=args.normalize)
    return DetTrainConfig(
        data_dir=args.data_dir, out_dir=args.out, preprocess=tuple(preprocess_ops(opts)), size=size,
        alpha=args.alpha, width=args.width, head_depth=args.head_depth, levels=check_strides(args.levels),
        quality=args.quality, centre_radius=args.centre_radius, box_weight=args.box_weight, tta=check_tta(args.tta), weights=args.weights, epochs=args.epochs,
        batch=args.batch, lr=args.lr, crop_min=args.crop_min, jitter=args.jitter, seed=args.seed,
        val_fraction=args.val_fraction,
        duplicate_ncc=args.duplicate_ncc, limit=args.limit, max_minutes=args.max_minutes, keep=args.keep,
        score_threshold=args.score_threshold, nms_iou=args.nms_iou, max_detections=args.max_detections,
        name=args.name, version=args.version, description=args.description,
        data_description=args.data_description, opset=args.opset, eager=args.eager, export_from=args.export_from,
        init_weights=args.init_weights, command=command,
    )


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stdout)
    try:
        cfg = config_from_args(args, "python -m export.train_detector " + shlex.join(argv))
        result = train(cfg)
    except ExportError as exc:
        log.error("%s", exc)
        return 2
    f = result.card.training.figures
    log.info("%s: validation AP50 %.4f, mAP %.4f; parity %s", result.onnx_path, f["val_ap50"], f["val_map"],
             result.card.export.parity)
    return 0


if __name__ == "__main__":
    from .alloc import reexec_under_jemalloc

    reexec_under_jemalloc()
    sys.exit(main())

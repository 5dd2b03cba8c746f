"""Train a MobileNetV2 U-Net defect segmenter and export it to ONNX with its card.

::

    python -m export.train DATA_DIR --out RUN_DIR [--groups FILE] [--size H W]
        [--alpha 0.35] [--epochs N] [--batch B] [--seed S] [--val-fraction 0.2]
        [--clahe CLIP,GRID | --no-clahe | --equalize] [--dilate K] [--resize-mode stretch|letterbox]
        [--normalize unit|symmetric] [--weights local.h5] [--name NAME]

DATA_DIR holds ``<name>.jpg`` + ``<name>.png`` (mask) pairs, in sub-folders or
not (see :mod:`export.data`). The model card is drafted first; its
preprocessing ops build the training inputs through ``station.preprocess``,
the code the line daemon runs. All defect classes of the masks are one
``defect`` class.

Training: Adam with cosine learning-rate decay, loss = binary cross-entropy
(or binary focal cross-entropy, ``--loss focal``) + soft Dice (over the batch; or the
Tversky index, ``--tversky-beta``, which weighs missed and false defect pixels unequally),
augmentation by flips (and 90° rotations when the input is square) and an
optional gain/offset jitter drawn from the seed, optional oversampling of the
images with a defect (``--defect-repeat``) or training on windows of the
images, a share of them over a defect (``--crop``, ``--crop-defect``; drawn per class folder with
``--crop-balance folder``), ``keras.utils.set_random_seed`` and
deterministic TensorFlow ops. The figure tracked is the IoU of the defect class
on masks thresholded at 0.5, accumulated over the epoch (intersection and
union summed over all pixels of all batches, so batches without any defect
count; with no defect and no prediction in a whole epoch it is 1.0).

Optional: windows cut at random scales (``--zoom``), the network run at
further input scales and their masks merged by a pixel-wise maximum
(``--multiscale 2``: also at half size; validated and exported so), an exponential
moving average of the weights (``--ema``: validated each epoch and exported
instead of the raw weights), and BatchNorm statistics re-measured after
training on the whole training images (``--recompute-bn``: those training
leaves behind describe its last few batches of windows, not the whole
images the line feeds).

RUN_DIR receives ``history.csv`` (epoch, loss, iou, val_loss, val_iou,
seconds), ``curves.png``, ``best.weights.h5`` (best validation IoU) or, with
``--keep last``, ``last.weights.h5`` (after every epoch), ``split.json`` (the
images on each side), ``card.json`` and ``model.onnx`` (the kept weights,
card embedded).
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import math
import shlex
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Sequence

import numpy as np

from station.modelcard import (
    ClaheOp,
    ColourOp,
    DilateOp,
    EqualizeHistOp,
    ModelCard,
    NormalizeOp,
    PreprocessOp,
    ResizeOp,
    TrainingInfo,
)

from station.errors import StationError

from . import ExportError
from .alloc import loaded_allocator
from .card import (
    DEFAULT_OPSET,
    MAX_OPSET,
    NORMALIZATIONS,
    PreprocessOptions,
    clahe_arg,
    default_decoder_filters,
    draft_card,
    preprocess_ops,
)
from .data import (
    Arrays,
    all_data_split,
    auto_size,
    find_samples,
    fold_split,
    load_arrays,
    load_groups,
    read_split_file,
    split_samples,
    write_split_file,
)

AUTO_SIZE = (0, 0)  # TrainConfig.size: chosen from the data when training starts (--size auto)
RECIPE_DECODER = [128, 64, 48, 32]  # the CLI's decoder widths: narrow enough for two models at 25 frames/s

log = logging.getLogger(__name__)

HISTORY_FIELDS = ("epoch", "loss", "iou", "val_loss", "val_iou", "seconds")


@dataclass(frozen=True)
class TrainConfig:
    """Everything a training run depends on. size: (height, width) of the model input, pixels."""

    data_dir: Path
    out_dir: Path
    preprocess: tuple[PreprocessOp, ...] = field(default_factory=lambda: tuple(preprocess_ops(PreprocessOptions())))
    groups: Path | None = None
    size: tuple[int, int] = (128, 128)  # AUTO_SIZE: from the images' aspect ratio (export.data.auto_size)
    alpha: float = 0.35
    decoder_filters: tuple[int, ...] | None = None
    dropout: float = 0.0
    weights: Path | None = None
    epochs: int = 30
    batch: int = 16
    lr: float = 2e-3
    dice_weight: float = 1.0
    loss: str = "bce"  # pixel term next to Dice: "bce" or "focal" (binary focal cross-entropy)
    focal_gamma: float = 2.0
    tversky_beta: float = 0.5  # weight of missed defect pixels in the overlap term (0.5: Dice; above: recall first)
    defect_repeat: int = 1  # training images with any defect appear this many times per epoch
    jitter: float = 0.0  # per-image gain 1±jitter and offset ±jitter on the normalised input (training only)
    seed: int = 0
    val_fraction: float = 0.2
    folds: int = 0  # grouped k-fold cross-validation (0: the --val-fraction split)
    fold: int = 0  # with folds: the fold held out for validation
    all_data: bool = False  # every image trains, none validates (keep last; the shipped model after CV)
    freeze_epochs: int = 0  # the pretrained encoder frozen (BatchNorm included) for this many first epochs
    finetune_lr: float = 1.0  # after the frozen epochs: the learning rate scaled by this factor
    freeze_bn: bool = False  # the encoder's BatchNorm layers keep the pretrained statistics throughout
    missing_mask_is_free: bool = False
    name: str = "seg"
    version: str = "1"
    description: str = ""
    data_description: str = ""
    threshold: float = 0.5
    opset: int = DEFAULT_OPSET
    parity_count: int = 8
    crop: int | None = None  # train on crop×crop windows of the input-size images (None: whole images)
    crop_defect: float = 0.5  # share of crops placed over a defect pixel (crop training)
    crop_content: bool = False  # crop training: the other windows placed over the letterboxed part, not its padding
    crop_balance: str = "image"  # crop training: defect windows drawn per defective "image" or per class "folder"
    zoom: float = 1.0  # crop training: windows cut at a scale drawn log-uniformly from [1/zoom, zoom] (1: off)
    multiscale: tuple[int, ...] = ()  # the served network also runs at 1/k size for each k, masks merged by maximum
    ema: float = 0.0  # exponential moving average of the weights, momentum per step (0: off); validated and exported
    keep: str = "best"  # "best": the best validation IoU epoch's weights; "last": the final epoch's
    recompute_bn: bool = False  # BatchNorm statistics of the kept weights re-measured on whole training images
    steps: int | None = None  # crop training: batches per epoch (default: as many as one pass over the images)
    stop_after: int | None = None  # stop after this many epochs; the learning-rate schedule still spans `epochs`
    eager: bool = False  # run_eagerly: skips the ~20 s graph tracing of tiny runs (tests); slower per step
    command: str = ""  # recorded on the card; default: python -m export.train with these options


@dataclass(frozen=True)
class TrainResult:
    card: ModelCard
    onnx_path: Path
    best_epoch: int
    seconds: float  # wall-clock time of model.fit
    history: list[dict[str, float]]


# --- loss, metric, augmentation (TensorFlow imported lazily) -----------------


def make_loss(dice_weight: float = 1.0, smooth: float = 1.0, kind: str = "bce", gamma: float = 2.0,
              tversky_beta: float = 0.5):
    """Pixel term + ``dice_weight`` × (1 − soft Dice). The pixel term is binary
    cross-entropy (``kind="bce"``) or binary focal cross-entropy with focusing
    parameter ``gamma`` (``kind="focal"``: easy background pixels, the bulk of
    defect-free images, weigh less). Dice is over the whole batch and all
    channels: ``(2·Σ y·p + smooth) / (Σ y + Σ p + smooth)``; inputs (N, H, W, C).

    ``tversky_beta`` β ≠ 0.5 makes the overlap term the Tversky index
    ``(Σ y·p + smooth) / (Σ y·p + (1 − β)·Σ (1 − y)·p + β·Σ y·(1 − p) + smooth)``
    (Salehi et al. 2017; β 0.5 is Dice): above 0.5 a missed defect pixel costs
    more than a false one, for models that find defects too small."""
    import keras
    ops = keras.ops
    if kind not in ("bce", "focal"):
        raise ExportError(f"--loss {kind!r}: expected bce or focal")
    if not 0 < tversky_beta < 1:
        raise ExportError(f"--tversky-beta {tversky_beta}: must be in (0, 1) (0.5: Dice)")

    class BceDice(keras.losses.Loss):
        def __init__(self) -> None:
            super().__init__(name="bce_dice" if kind == "bce" else "focal_dice")

        def call(self, y_true, y_pred):
            y_true = ops.cast(y_true, y_pred.dtype)
            if kind == "focal":
                bce = ops.mean(keras.losses.binary_focal_crossentropy(y_true, y_pred, gamma=gamma))
            else:
                bce = ops.mean(keras.losses.binary_crossentropy(y_true, y_pred))
            inter = ops.sum(y_true * y_pred)
            if tversky_beta == 0.5:
                dice = (2.0 * inter + smooth) / (ops.sum(y_true) + ops.sum(y_pred) + smooth)
            else:
                false_px, missed_px = ops.sum(y_pred) - inter, ops.sum(y_true) - inter
                dice = (inter + smooth) / (inter + (1.0 - tversky_beta) * false_px + tversky_beta * missed_px
                                           + smooth)
            return bce + dice_weight * (1.0 - dice)

    return BceDice()


def make_iou_metric(threshold: float = 0.5, channel: int = 0, name: str = "iou"):
    """IoU of one class channel of thresholded predictions, accumulated over all
    batches since the last reset (an epoch): Σ|T∩P| / Σ|T∪P|, and 1.0 when the
    union is empty (nothing to find, nothing found). Truth T = y_true ≥ 0.5,
    prediction P = y_pred > threshold."""
    import keras
    ops = keras.ops

    class DefectIoU(keras.metrics.Metric):
        def __init__(self) -> None:
            super().__init__(name=name)
            self.intersection = self.add_variable(shape=(), initializer="zeros", name="intersection", dtype="float64")
            self.union = self.add_variable(shape=(), initializer="zeros", name="union", dtype="float64")

        def update_state(self, y_true, y_pred, sample_weight=None):
            t = ops.greater_equal(y_true[..., channel], 0.5)
            p = ops.greater(y_pred[..., channel], threshold)
            self.intersection.assign_add(ops.sum(ops.cast(ops.logical_and(t, p), "float64")))
            self.union.assign_add(ops.sum(ops.cast(ops.logical_or(t, p), "float64")))

        def result(self):
            return ops.cast(
                ops.where(self.union > 0, self.intersection / ops.maximum(self.union, 1.0), 1.0), "float32"
            )

        def reset_state(self):
            self.intersection.assign(0.0)
            self.union.assign(0.0)

    return DefectIoU()


def make_augmented(x: np.ndarray, y: np.ndarray, batch: int, seed: int, defect_repeat: int = 1,
                   jitter: float = 0.0):
    """A ``keras.utils.PyDataset`` of shuffled, randomly flipped (N, H, W, C) batches.

    Each epoch's order and each sample's transform (horizontal flip, vertical
    flip, and a 90° rotation when H == W: the 8 symmetries of the square, or
    the 4 of the rectangle) are functions of (seed, epoch, index) only, so the
    batches are the same whatever Keras prefetches.

    defect_repeat: rows whose label has any defect pixel are listed this many
    times per epoch (oversampling the rarer defective images). jitter: each
    sample's input becomes ``x · g + o`` with g in [1 − jitter, 1 + jitter] and
    o in [−jitter, jitter] (normalised units; 0: off).
    """
    square = x.shape[1] == x.shape[2]
    rows_all = np.arange(len(x))
    if defect_repeat > 1:
        defective = np.flatnonzero(y.reshape(len(y), -1).max(axis=1) > 0)
        rows_all = np.concatenate([rows_all] + [defective] * (defect_repeat - 1))

    def augmented(rng: np.random.Generator, epoch: int, idx: int) -> tuple[np.ndarray, np.ndarray]:
        order = rows_all[np.random.default_rng([seed, epoch]).permutation(len(rows_all))]
        rows = order[idx * batch : (idx + 1) * batch]
        xb, yb = x[rows].copy(), y[rows].copy()
        for i in range(len(rows)):
            flips = rng.integers(0, 2, size=2)
            turns = int(rng.integers(0, 4)) if square else 0
            if flips[0]:
                xb[i], yb[i] = xb[i][:, ::-1], yb[i][:, ::-1]
            if flips[1]:
                xb[i], yb[i] = xb[i][::-1], yb[i][::-1]
            if turns:
                xb[i], yb[i] = np.rot90(xb[i], turns), np.rot90(yb[i], turns)
            if jitter > 0:
                gain, offset = rng.uniform(-jitter, jitter, size=2)
                xb[i] = xb[i] * np.float32(1.0 + gain) + np.float32(offset)
        return xb, yb

    return seeded_batches(math.ceil(len(rows_all) / batch), seed, augmented)


def check_crop(crop: int, h: int, w: int) -> None:
    """A training window side must be a multiple of 32 (MobileNetV2's stride) within the input."""
    if not 32 <= crop <= min(h, w) or crop % 32:
        raise ExportError(f"--crop {crop}: must be a multiple of 32 between 32 and the input size {h}x{w}")


def seeded_batches(steps: int, seed: int, make_batch):
    """A ``keras.utils.PyDataset`` of ``steps`` batches an epoch: batch ``idx`` of epoch ``e`` is
    ``make_batch(rng, e, idx)`` with ``rng`` seeded by (seed, e, idx), so the batches are a
    function of the seed whatever Keras prefetches."""
    import keras

    class Batches(keras.utils.PyDataset):
        def __init__(self) -> None:
            super().__init__(workers=1, use_multiprocessing=False)
            self.epoch = 0

        def __len__(self) -> int:
            return steps

        def on_epoch_end(self) -> None:
            self.epoch += 1

        def __getitem__(self, idx: int):
            return make_batch(np.random.default_rng([seed, self.epoch, idx]), self.epoch, idx)

    return Batches()


def make_crops(x: np.ndarray, y: np.ndarray, batch: int, seed: int, crop: int, steps: int,
               defect_share: float = 0.5, jitter: float = 0.0, zoom: float = 1.0,
               content: np.ndarray | None = None, strata: Sequence[str] | None = None):
    """A ``keras.utils.PyDataset`` of ``steps`` batches of (batch, crop, crop, C) windows per epoch.

    The model is fully convolutional: it learns on windows of the input-size
    images (several times more updates per second than on whole images) and
    runs on whole images. A share ``defect_share`` of the windows is placed so
    that a defect pixel drawn at random lies inside it (at least crop/8 from
    the border), which balances the rare small defects against the defect-free
    bulk; the others are drawn uniformly from all images — or, given
    ``content`` (one ``(y0, y1, x0, x1)`` box per image, ``Arrays.content``),
    placed like the defect windows over a pixel drawn from the image's box,
    so that a letterbox's padding does not take the updates (a tile 115 px
    wide fills a fifth of a 256 x 512 input). Each window then gets one of the
    8 symmetries of the square and the gain/offset ``jitter`` (see
    :func:`make_augmented`). With ``zoom`` Z > 1 each window is cut at a scale
    s drawn log-uniformly from [1/Z, Z]: a side of crop/s input pixels (at most
    the image) resized to crop (linear; the mask re-thresholded at 0.5), so the
    network sees each defect at sizes it meets on larger and smaller parts.
    Given ``strata`` (one label per image, e.g. its defect class), a defect
    window first draws a label uniformly among those with a defective image,
    then an image of it, so that a class with few images (a frayed edge) gets
    as many windows as one with many (blowholes); otherwise each defective image
    is drawn alike. Everything is a function of (seed, epoch, index).
    """
    n, h, w = x.shape[:3]
    check_crop(crop, h, w)
    if not 0 <= defect_share <= 1:
        raise ExportError(f"--crop-defect {defect_share}: must be in [0, 1]")
    if not 1.0 <= zoom <= 4.0:
        raise ExportError(f"--zoom {zoom}: must be in [1, 4] (1: off)")
    if content is not None and content.shape != (n, 4):
        raise ExportError(f"content boxes {content.shape}: one (y0, y1, x0, x1) per image expected ({n})")
    if strata is not None and len(strata) != n:
        raise ExportError(f"strata: one label per image expected ({n}), got {len(strata)}")
    import cv2

    defect_pixels = [np.argwhere(y[i, ..., 0] >= 0.5) for i in range(n)]
    defective = np.array([i for i in range(n) if len(defect_pixels[i])], dtype=np.int64)
    # pools of defective images to draw from: one for all, or one per stratum (sorted labels: seed-stable)
    pools = [defective] if strata is None else [
        np.array([i for i in defective if strata[i] == label], dtype=np.int64)
        for label in sorted({strata[i] for i in defective})]
    log_zoom = math.log(zoom)

    def crops(rng: np.random.Generator, epoch: int, idx: int) -> tuple[np.ndarray, np.ndarray]:
        xb = np.empty((batch, crop, crop, x.shape[3]), x.dtype)
        yb = np.empty((batch, crop, crop, y.shape[3]), y.dtype)
        for k in range(batch):
            side = crop
            if log_zoom:
                side = min(h, w, int(round(crop / math.exp(rng.uniform(-log_zoom, log_zoom)))))
            margin = side // 8
            centre = None  # a pixel the window is placed over, or None: anywhere
            if len(defective) and rng.random() < defect_share:
                # one pool: no extra draw, so per-image runs keep the windows they always had for a seed
                pool = pools[rng.integers(len(pools))] if len(pools) > 1 else pools[0]
                i = int(pool[rng.integers(len(pool))])
                centre = defect_pixels[i][rng.integers(len(defect_pixels[i]))]
            else:
                i = int(rng.integers(n))
                if content is not None:
                    top, bottom, left, right = content[i]
                    centre = rng.integers(top, bottom), rng.integers(left, right)
            if centre is None:
                y0, x0 = int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))
            else:
                y0 = int(np.clip(centre[0] - rng.integers(margin, side - margin), 0, h - side))
                x0 = int(np.clip(centre[1] - rng.integers(margin, side - margin), 0, w - side))
            xi, yi = x[i, y0 : y0 + side, x0 : x0 + side], y[i, y0 : y0 + side, x0 : x0 + side]
            if side != crop:
                xi = cv2.resize(xi, (crop, crop), interpolation=cv2.INTER_LINEAR).reshape(crop, crop, -1)
                yi = cv2.resize(yi, (crop, crop), interpolation=cv2.INTER_LINEAR).reshape(crop, crop, -1)
                yi = (yi >= 0.5).astype(y.dtype)
            sym = int(rng.integers(8))
            if sym & 1:
                xi, yi = xi[:, ::-1], yi[:, ::-1]
            if sym & 2:
                xi, yi = xi[::-1], yi[::-1]
            if sym & 4:
                xi, yi = xi.transpose(1, 0, 2), yi.transpose(1, 0, 2)
            if jitter > 0:
                gain, offset = rng.uniform(-jitter, jitter, size=2)
                xi = xi * np.float32(1.0 + gain) + np.float32(offset)
            xb[k], yb[k] = xi, yi
        return xb, yb

    return seeded_batches(steps, seed, crops)


def letterboxes(preprocess: Sequence[PreprocessOp]) -> bool:
    """Whether the chain letterboxes (pads) its inputs."""
    return any(isinstance(op, ResizeOp) and op.mode == "letterbox" for op in preprocess)


# --- run outputs ---------------------------------------------------------------


def plot_curves(history: Sequence[dict[str, float]], path: Path, title: str = "",
                kept: tuple[float, float, str] | None = None) -> None:
    """Loss and IoU per epoch, train and validation, to a PNG (matplotlib Agg).

    kept: (epoch, validation IoU, what) of the exported weights, marked with a
    star (their IoU can differ from the curve's, e.g. after ``--recompute-bn``);
    without it the best validation epoch is marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [h["epoch"] for h in history]
    fig, (ax_loss, ax_iou) = plt.subplots(1, 2, figsize=(10, 4), dpi=110)
    for ax, key, label in ((ax_loss, "loss", "loss (BCE + Dice)"), (ax_iou, "iou", "defect IoU @ 0.5")):
        ax.plot(epochs, [h[key] for h in history], "o-", ms=3, label="train")
        ax.plot(epochs, [h["val_" + key] for h in history], "o-", ms=3, label="validation")
        ax.set_xlabel("epoch")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend()
    if kept is None and any(math.isfinite(h["val_iou"]) for h in history):
        best = max((h for h in history if math.isfinite(h["val_iou"])), key=lambda h: h["val_iou"])
        ax_iou.axvline(best["epoch"], color="grey", ls=":", lw=1)
        ax_iou.annotate(f"best {best['val_iou']:.3f} (epoch {best['epoch']:.0f})", (best["epoch"], best["val_iou"]),
                        textcoords="offset points", xytext=(-10, -18), ha="right", fontsize=8)
    elif kept is not None:
        epoch, iou, what = kept
        ax_iou.plot([epoch], [iou], "*", color="C3", ms=12, label="exported")
        ax_iou.annotate(f"{what}: validation {iou:.3f}", (epoch, iou), textcoords="offset points", xytext=(-10, 10),
                        ha="right", fontsize=8)
        ax_iou.legend()
    ax_iou.set_ylim(0, 1)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def curves_title(cfg: TrainConfig, n_train: int, n_val: int) -> str:
    """The title of ``curves.png``: data, input, encoder and, for crop training, what
    the training curve is measured on."""
    title = f"{cfg.name}: {n_train} train / {n_val} val images, {cfg.size[0]}x{cfg.size[1]}, alpha {cfg.alpha:g}"
    if cfg.crop:
        title += (f"\ntrain: {cfg.crop}x{cfg.crop} windows ({cfg.crop_defect:g} over a defect), augmented; "
                  f"validation: whole images")
    return title


def _history_callback(path: Path, rows: list[dict[str, float]]):
    import keras

    class EpochLog(keras.callbacks.Callback):
        """Appends one row per epoch to history.csv (flushed, so a running training can be watched)."""

        def on_train_begin(self, logs=None):
            if rows:  # a second stage (after the frozen-encoder epochs) goes on with the same file
                return
            with path.open("w", newline="") as f:
                csv.writer(f).writerow(HISTORY_FIELDS)

        def on_epoch_begin(self, epoch, logs=None):
            self._t0 = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):
            logs = logs or {}
            row = {"epoch": float(epoch + 1), "seconds": time.perf_counter() - self._t0}
            for key in ("loss", "iou", "val_loss", "val_iou"):
                row[key] = float(logs.get(key, float("nan")))
            rows.append(row)
            with path.open("a", newline="") as f:
                csv.writer(f).writerow([f"{row[k]:.6g}" if k != "epoch" else int(row[k]) for k in HISTORY_FIELDS])
            log.info("epoch %d: loss %.4f iou %.4f | val_loss %.4f val_iou %.4f | %.1f s", epoch + 1, row["loss"],
                     row["iou"], row["val_loss"], row["val_iou"], row["seconds"])

    return EpochLog()


def _stop_after(epochs: int):
    import keras

    class StopAfter(keras.callbacks.Callback):
        """Ends training after ``epochs`` epochs (the optimiser's schedule is unchanged)."""

        def on_epoch_end(self, epoch, logs=None):
            if epoch + 1 >= epochs:
                self.model.stop_training = True

    return StopAfter()


def _keep_best(monitor: str = "val_iou", path: Path | None = None, last: bool = False, save=None):
    import keras
    save = save or (lambda model, to: model.save_weights(to))

    class KeepBest(keras.callbacks.Callback):
        """Keeps a copy of the weights of the epoch with the highest ``monitor`` (the
        first such epoch on ties; with ``last``, of every epoch, so the final one is
        kept) in memory, and writes them to ``path`` (when given) each time, so an
        interrupted run leaves its weights behind."""

        def __init__(self) -> None:
            super().__init__()
            self.best = -math.inf
            self.epoch = 0
            self.weights: list[np.ndarray] | None = None

        def on_epoch_end(self, epoch, logs=None):
            value = (logs or {}).get(monitor)
            if value is not None and (last or float(value) > self.best):
                self.best, self.epoch = float(value), epoch + 1
                self.weights = self.model.get_weights()
                if path is not None:
                    save(self.model, path)

    return KeepBest()


def _validate_whole(full_model, x: np.ndarray, y: np.ndarray, batch: int):
    import keras

    class ValidateWhole(keras.callbacks.Callback):
        """Crop training: at each epoch's end the weights go into ``full_model`` (the same
        network at the input size) and ``val_loss``/``val_iou`` are measured on whole
        validation images, as Keras' own validation would."""

        def on_epoch_end(self, epoch, logs=None):
            full_model.set_weights(self.model.get_weights())
            result = full_model.evaluate(x, y, batch_size=batch, verbose=0, return_dict=True)
            if logs is not None:
                logs["val_loss"], logs["val_iou"] = float(result["loss"]), float(result["iou"])

    return ValidateWhole()


def recompute_bn(model, x: np.ndarray, batch: int) -> int:
    """Re-measure the moving statistics of every BatchNormalization in ``model``
    on ``x`` (whole, unaugmented training inputs, in order): the average of the
    batch statistics over all of ``x``, each batch weighted by its size. Returns
    the number of BatchNorm layers.

    The statistics a training run leaves behind describe its last few batches
    (momentum 0.9: about ten) of *training* inputs — windows, half of them over
    a defect — and the raw weights, not their moving average (``--ema``). The
    line feeds whole images through the kept weights; these are the statistics
    of exactly that.
    """
    from keras import layers

    norms = [layer for layer in model._flatten_layers() if isinstance(layer, layers.BatchNormalization)]
    momenta = [layer.momentum for layer in norms]
    seen = 0
    try:
        for start in range(0, len(x), batch):
            xb = x[start : start + batch]
            for layer in norms:  # moving = moving·seen/(seen+n) + batch·n/(seen+n): the running average
                layer.momentum = seen / (seen + len(xb))
            model(xb, training=True)
            seen += len(xb)
    finally:
        for layer, momentum in zip(norms, momenta):
            layer.momentum = momentum
    return len(norms)


# --- the run -----------------------------------------------------------------


def final_figures(model, train_arrays, val_arrays, batch: int, best_epoch: float) -> dict[str, float]:
    """The card's figures for the loaded weights: IoU on both sets without
    augmentation, validation loss, and the epoch the weights come from."""
    train = model.evaluate(train_arrays.x, train_arrays.y, batch_size=batch, verbose=0, return_dict=True)
    figures = {"train_iou": round(float(train["iou"]), 4), "best_epoch": float(best_epoch)}
    if len(val_arrays.x):
        val = model.evaluate(val_arrays.x, val_arrays.y, batch_size=batch, verbose=0, return_dict=True)
        figures.update(val_iou=round(float(val["iou"]), 4), val_loss=round(float(val["loss"]), 4))
    return figures


def _check(cfg: TrainConfig) -> None:
    if cfg.epochs < 1:
        raise ExportError(f"--epochs {cfg.epochs}: need at least 1")
    if cfg.batch < 1:
        raise ExportError(f"--batch {cfg.batch}: need at least 1")
    if cfg.loss not in ("bce", "focal"):
        raise ExportError(f"--loss {cfg.loss!r}: expected bce or focal")
    if cfg.stop_after is not None and cfg.stop_after < 1:
        raise ExportError(f"--stop-after {cfg.stop_after}: need at least 1")
    if cfg.crop is not None and (cfg.crop < 32 or cfg.crop % 32 or cfg.crop > min(cfg.size)):
        raise ExportError(f"--crop {cfg.crop}: must be a multiple of 32 between 32 and the input size "
                          f"{cfg.size[0]}x{cfg.size[1]}")
    if not 0 <= cfg.crop_defect <= 1:
        raise ExportError(f"--crop-defect {cfg.crop_defect}: must be in [0, 1]")
    if not 1.0 <= cfg.zoom <= 4.0:
        raise ExportError(f"--zoom {cfg.zoom}: must be in [1, 4] (1: off)")
    if any(k < 2 or cfg.size[0] % (32 * k) or cfg.size[1] % (32 * k) for k in cfg.multiscale):
        raise ExportError(f"--multiscale {' '.join(map(str, cfg.multiscale))}: each factor must be an integer >= 2 "
                          f"that leaves the input {cfg.size[0]}x{cfg.size[1]} a multiple of 32")
    if not 0 < cfg.tversky_beta < 1:
        raise ExportError(f"--tversky-beta {cfg.tversky_beta}: must be in (0, 1) (0.5: Dice)")
    if cfg.crop_balance not in ("image", "folder"):
        raise ExportError(f"--crop-balance {cfg.crop_balance!r}: must be 'image' or 'folder'")
    if cfg.crop_balance != "image" and not cfg.crop:
        raise ExportError(f"--crop-balance {cfg.crop_balance}: only with --crop (it draws the defect windows)")
    if cfg.crop_content and not (cfg.crop and letterboxes(cfg.preprocess)):
        raise ExportError("--crop-content: only with --crop and --resize-mode letterbox (windows kept off the padding)")
    if cfg.zoom != 1.0 and not cfg.crop:
        raise ExportError(f"--zoom {cfg.zoom}: only with --crop (windows are cut at random scales)")
    if not (cfg.ema == 0 or 0 < cfg.ema < 1):
        raise ExportError(f"--ema {cfg.ema}: must be 0 (off) or a momentum in (0, 1), e.g. 0.99")
    if cfg.all_data and (cfg.keep != "last" or cfg.folds):
        raise ExportError("--all-data: keeps the last epoch (--keep last), with no validation side (no --folds)")
    if cfg.folds and not 0 <= cfg.fold < cfg.folds:
        raise ExportError(f"--fold {cfg.fold}: must be between 0 and {cfg.folds - 1} (--folds {cfg.folds})")
    if not (cfg.freeze_epochs == 0 or 0 < cfg.freeze_epochs < cfg.epochs):
        raise ExportError(f"--freeze-epochs {cfg.freeze_epochs}: must be in [0, --epochs {cfg.epochs})")
    if cfg.freeze_epochs and cfg.weights is None:
        raise ExportError("--freeze-epochs: only with --weights (a random encoder is not worth freezing)")
    if cfg.freeze_epochs and cfg.ema:
        raise ExportError("--freeze-epochs: not with --ema")
    if cfg.freeze_bn and cfg.weights is None:
        raise ExportError("--freeze-bn: only with --weights (the statistics kept are the pretrained ones)")
    if not cfg.finetune_lr > 0:
        raise ExportError(f"--finetune-lr {cfg.finetune_lr}: must be positive")
    if cfg.keep not in ("best", "last"):
        raise ExportError(f"--keep {cfg.keep!r}: must be 'best' or 'last'")
    if cfg.steps is not None and cfg.steps < 1:
        raise ExportError(f"--steps {cfg.steps}: need at least 1")
    if cfg.steps is not None and not cfg.crop:
        raise ExportError(f"--steps {cfg.steps}: only with --crop (an epoch of whole images is one pass over them)")
    if cfg.crop and cfg.defect_repeat != 1:
        raise ExportError(f"--defect-repeat {cfg.defect_repeat}: not with --crop (--crop-defect sets the share of "
                          "windows over a defect)")
    if cfg.defect_repeat < 1:
        raise ExportError(f"--defect-repeat {cfg.defect_repeat}: need at least 1")
    if not 0 <= cfg.jitter < 1:
        raise ExportError(f"--jitter {cfg.jitter}: must be in [0, 1)")
    if not cfg.lr > 0:
        raise ExportError(f"--lr {cfg.lr}: must be positive")
    if any(v < 32 or v % 32 for v in cfg.size):
        raise ExportError(f"--size {cfg.size[0]} {cfg.size[1]}: height and width must be multiples of 32 "
                          "(MobileNetV2 has stride 32)")
    if not 0 < cfg.alpha <= 1.4:
        raise ExportError(f"--alpha {cfg.alpha}: MobileNetV2 width multipliers are 0.35 … 1.4")
    if cfg.groups is not None and not cfg.groups.is_file():
        raise ExportError(f"--groups {cfg.groups}: no such file")
    if cfg.weights is not None and not cfg.weights.is_file():
        raise ExportError(f"--weights {cfg.weights}: no such file")
    if not 1 <= cfg.opset <= MAX_OPSET:
        raise ExportError(f"--opset {cfg.opset}: must be between 1 and {MAX_OPSET}")


def train(cfg: TrainConfig) -> TrainResult:
    """Load data, train, keep the best-validation-IoU weights and export them (see the module docstring)."""
    if cfg.size == AUTO_SIZE:
        listed = find_samples(cfg.data_dir, cfg.missing_mask_is_free).samples
        cfg = replace(cfg, size=auto_size(listed, multiple=32 * max((1, *cfg.multiscale))))
        log.info("input size %dx%d, from the images' median aspect ratio (--size auto)", *cfg.size)
    _check(cfg)
    command = cfg.command or command_of(cfg)
    log.info("memory allocator: %s (export/alloc.py)", loaded_allocator())
    draft = draft_card(name=cfg.name, version=cfg.version, size=cfg.size, preprocess=cfg.preprocess,
                       training=TrainingInfo(data="(pending)"), threshold=cfg.threshold,
                       description=cfg.description, opset=cfg.opset)

    listing = find_samples(cfg.data_dir, cfg.missing_mask_is_free)
    groups = load_groups(cfg.groups) if cfg.groups is not None else None
    if cfg.all_data:
        split = all_data_split(listing.samples)
    elif cfg.folds:
        split = fold_split(listing.samples, cfg.folds, cfg.fold, cfg.seed, groups)
    else:
        split = split_samples(listing.samples, cfg.val_fraction, cfg.seed, groups)
    log.info("data %s: %d images (%d skipped without mask); split %s", cfg.data_dir, len(listing.samples),
             listing.skipped_no_mask, split.description)
    train_arrays = load_arrays(split.train, draft, progress=True)
    val_arrays = load_arrays(split.val, draft, progress=True)
    _log_arrays("train", train_arrays)
    _log_arrays("validation", val_arrays)

    cfg.out_dir.mkdir(parents=True, exist_ok=True)
    write_split_file(cfg.out_dir / "split.json", split.description, [s.key for s in split.train],
                     [s.key for s in split.val])

    import keras
    import tensorflow as tf

    from .onnx_export import export_model

    keras.utils.set_random_seed(cfg.seed)
    tf.config.experimental.enable_op_determinism()
    channels, classes = draft.input.channels, len(draft.classes)
    loss = make_loss(cfg.dice_weight, kind=cfg.loss, gamma=cfg.focal_gamma, tversky_beta=cfg.tversky_beta)
    model = build_served(cfg, channels, classes)  # the exported network, at the input size
    if cfg.crop:
        # Crop training: the same layers at crop size learn; `model` validates and is exported.
        learner = build_network(cfg, channels, classes, cfg.crop, cfg.crop)
        learner.set_weights(model.get_weights())
        steps = cfg.steps or math.ceil(len(train_arrays.x) / cfg.batch)
        content = train_arrays.content if cfg.crop_content else None
        strata = [key.rpartition("/")[0] for key in train_arrays.keys] if cfg.crop_balance == "folder" else None
        train_data = make_crops(train_arrays.x, train_arrays.y, cfg.batch, cfg.seed, cfg.crop, steps,
                                cfg.crop_defect, cfg.jitter, cfg.zoom, content, strata)
        model.compile(loss=loss, metrics=[make_iou_metric(cfg.threshold)])
    else:
        learner = model
        train_data = make_augmented(train_arrays.x, train_arrays.y, cfg.batch, cfg.seed, cfg.defect_repeat,
                                    cfg.jitter)
        steps = len(train_data)
    frozen = min(cfg.freeze_epochs, cfg.epochs)

    def compile_stage(first_epoch: int, lr: float) -> None:
        """Adam with cosine decay from ``lr`` over the epochs from ``first_epoch`` on."""
        schedule = keras.optimizers.schedules.CosineDecay(lr, decay_steps=steps * max(1, cfg.epochs - first_epoch),
                                                          alpha=0.05)
        optimizer = keras.optimizers.Adam(schedule, use_ema=cfg.ema > 0, ema_momentum=cfg.ema or 0.99)
        learner.compile(optimizer=optimizer, loss=loss, metrics=[make_iou_metric(cfg.threshold)],
                        run_eagerly=cfg.eager)

    if cfg.freeze_bn:
        # Small batches of windows, many over a defect, then whole letterboxed tiles on the
        # line: the pretrained statistics serve both alike; a frozen Keras BatchNormalization
        # normalises with its moving statistics in training too.
        from keras import layers as klayers

        norms = [la for la in learner.get_layer("encoder").layers if isinstance(la, klayers.BatchNormalization)]
        for layer in norms:
            layer.trainable = False
        log.info("%d encoder BatchNorm layers frozen at the pretrained statistics", len(norms))
    encoder = learner.get_layer("encoder") if frozen else None
    if encoder is not None:
        # A frozen Keras layer also runs its BatchNorm in inference mode: the pretrained
        # statistics stay while the random decoder learns to read the features.
        encoder.trainable = False
        compile_stage(0, cfg.lr)
        log.info("encoder frozen for the first %d epoch(s), then trained at %g x the learning rate", frozen,
                 cfg.finetune_lr)
    else:
        compile_stage(0, cfg.lr)
    log.info("model %s: %d parameters, input %s; %d epochs of %d steps%s", model.name, model.count_params(),
             tuple(model.input.shape[1:]), cfg.epochs, steps,
             f" of {cfg.batch} {cfg.crop}x{cfg.crop} crops ({cfg.crop_defect:g} over a defect)" if cfg.crop else "")

    best_path = cfg.out_dir / f"{cfg.keep}.weights.h5"
    rows: list[dict[str, float]] = []
    validating = len(val_arrays.x) > 0
    keep_best = _keep_best("val_iou" if validating else "loss", best_path, last=cfg.keep == "last",
                           save=lambda net, to: save_network_weights(net, cfg, channels, classes, to))
    callbacks = [_history_callback(cfg.out_dir / "history.csv", rows), keep_best]
    if cfg.crop and validating:
        callbacks.insert(0, _validate_whole(model, val_arrays.x, val_arrays.y, cfg.batch))
    if cfg.ema:  # first: from each epoch's end until the next begins the model holds the averaged weights
        callbacks.insert(0, keras.callbacks.SwapEMAWeights(swap_on_epoch=True))
    if cfg.stop_after is not None and cfg.stop_after < cfg.epochs:
        callbacks.append(_stop_after(cfg.stop_after))
    t0 = time.perf_counter()
    validation = None if cfg.crop or not validating else (val_arrays.x, val_arrays.y)
    verbose = 1 if sys.stdout.isatty() else 2
    stopped = False
    if encoder is not None:
        learner.fit(train_data, validation_data=validation, validation_batch_size=cfg.batch, epochs=frozen,
                    shuffle=False, callbacks=callbacks, verbose=verbose)
        stopped = bool(learner.stop_training)  # --stop-after within the frozen epochs (compile resets the flag)
        encoder.trainable = True  # sets every sub-layer's flag: the frozen BatchNorm layers again below
        if cfg.freeze_bn:
            for layer in norms:
                layer.trainable = False
        compile_stage(frozen, cfg.lr * cfg.finetune_lr)
    if not stopped and frozen < cfg.epochs:
        learner.fit(train_data, validation_data=validation, validation_batch_size=cfg.batch, epochs=cfg.epochs,
                    initial_epoch=frozen, shuffle=False, callbacks=callbacks, verbose=verbose)
    seconds = time.perf_counter() - t0

    if keep_best.weights is None:
        raise ExportError("training produced no validation IoU (empty validation set?)")
    model.set_weights(keep_best.weights)
    best = rows[keep_best.epoch - 1]
    figures = finish_kept(model, cfg, train_arrays, val_arrays, rows, best)
    save_network_weights(model, cfg, channels, classes, best_path)
    log.info("%s epoch %d of %d: val IoU %.4f, train IoU %.4f (no augmentation); fit took %.0f s",
             cfg.keep, best["epoch"], cfg.epochs, figures.get("val_iou", math.nan), figures["train_iou"], seconds)

    data_text = cfg.data_description or (
        f"{len(listing.samples)} images with masks from {cfg.data_dir}"
        + (f" ({listing.skipped_no_mask} without mask skipped)" if listing.skipped_no_mask else "")
    )
    training = TrainingInfo(
        data=data_text,
        split=split.description,
        command=command,
        epochs=len(rows),
        seed=cfg.seed,
        seconds=round(seconds, 1),
        figures=figures,
        evaluated_by=f"{command} ({kept_weights(cfg)}, thresholded at {cfg.threshold:g}; IoU accumulated "
                     f"over all pixels of each set)",
    )
    card = draft.model_copy(update={"training": training})
    parity = val_arrays.x if validating else train_arrays.x
    card = export_model(model, card, cfg.out_dir / "model.onnx", parity[: max(1, cfg.parity_count)],
                        opset=cfg.opset)
    (cfg.out_dir / "card.json").write_text(card.model_dump_json(indent=2) + "\n")
    return TrainResult(card, cfg.out_dir / "model.onnx", int(best["epoch"]), seconds, rows)


def calibrate(result: TrainResult, cfg: TrainConfig, config: Path | None, max_escape_rate: float) -> dict:
    """The exported model on the run's validation images through station's Inspector
    (:mod:`export.crossval`): the mask threshold and ``min_area_px`` with the fewest
    false rejects within the escape budget go into the card (threshold) and, with the
    figures at that pair, into ``RUN_DIR/eval.json``. Returns that report.

    The figures are those of the pair chosen on the same images: somewhat optimistic;
    a grouped k-fold run (``--folds``) gives figures no choice has seen."""
    from station.config import load_config
    from station.modelcard import MaskOutput

    from . import crossval
    from .onnx_export import embed_card_file

    station_cfg = load_config(config)
    images = crossval.predict_images(result.onnx_path, read_split_file(cfg.out_dir / "split.json", cfg.data_dir),
                                     cfg.data_dir, station_cfg)
    report = crossval.tune(images, station_cfg, crossval.DEFAULT_THRESHOLDS, crossval.DEFAULT_MIN_AREAS,
                           max_escape_rate)
    chosen, pooled = report["chosen"], report["pooled"]
    card = result.card
    assert isinstance(card.output, MaskOutput)
    figures = {f"val_{k}": round(float(pooled[k]), 4)
               for k in ("escape_rate", "false_reject_rate", "agreement_pct", "image_recall", "image_specificity")
               if pooled[k] is not None}
    figures["val_iou_calibrated"] = round(float(pooled["iou"] or 0.0), 4)
    card = card.model_copy(update={
        "output": card.output.model_copy(update={"threshold": float(chosen["threshold"])}),
        "training": card.training.model_copy(update={
            "figures": {**card.training.figures, **figures},
            "evaluated_by": card.training.evaluated_by + (
                f"; val_*_rate, val_agreement_pct, val_image_*, val_iou_calibrated: station's Inspector on the "
                f"validation images at mask threshold {chosen['threshold']:g} and min_area_px "
                f"{chosen['min_area_px']}, chosen there for the fewest false rejects with an escape rate <= "
                f"{max_escape_rate:g} (report eval.json)")}),
    })
    embed_card_file(result.onnx_path, card)
    (cfg.out_dir / "card.json").write_text(card.model_dump_json(indent=2) + "\n")
    report["model"] = str(result.onnx_path)
    (cfg.out_dir / "eval.json").write_text(json.dumps(report, indent=1) + "\n")
    for line in crossval.summary_lines(report):
        log.info("calibration: %s", line)
    log.info("mask threshold %g written into %s; set postprocess.min_area_px: %d in the station config",
             chosen["threshold"], result.onnx_path, chosen["min_area_px"])
    return report


def build_network(cfg: TrainConfig, channels: int, classes: int, height: int | None, width: int | None):
    """The U-Net of ``cfg`` at one input size (None, None: any size)."""
    from .unet import build_unet

    return build_unet((height, width, channels), num_classes=classes, alpha=cfg.alpha, weights=cfg.weights,
                      decoder_filters=cfg.decoder_filters, dropout=cfg.dropout, name=cfg.name.replace("-", "_"))


def build_served(cfg: TrainConfig, channels: int, classes: int):
    """The network the run validates and exports, at ``cfg.size``: the U-Net, or with
    ``cfg.multiscale`` the U-Net at full and reduced scales merged (:func:`export.unet.multiscale`).
    Either way its weights are the U-Net's, in the same order as :func:`build_network`'s."""
    from .unet import multiscale

    if not cfg.multiscale:
        return build_network(cfg, channels, classes, *cfg.size)
    core = build_network(cfg, channels, classes, None, None)
    return multiscale(core, cfg.size, cfg.multiscale, name=cfg.name.replace("-", "_") + "_multiscale")


def save_network_weights(served, cfg: TrainConfig, channels: int, classes: int, path: Path) -> None:
    """Save ``served``'s weights as the plain U-Net's (the layout the training checkpoints have,
    which :func:`load_served` reads), whether or not it is multi-scale."""
    net = served
    if any(layer.name.startswith("shrink") for layer in served.layers):  # the multi-scale wrapper
        net = build_network(cfg, channels, classes, *cfg.size)
        net.set_weights(served.get_weights())
    net.save_weights(path)


def load_served(cfg: TrainConfig, channels: int, classes: int, path: Path):
    """:func:`build_served` with the weights of a checkpoint ``path`` (a plain U-Net's)."""
    net = build_network(cfg, channels, classes, *cfg.size)
    net.load_weights(path)
    if not cfg.multiscale:
        return net
    served = build_served(cfg, channels, classes)
    served.set_weights(net.get_weights())
    return served


def finish_kept(model, cfg: TrainConfig, train_arrays: Arrays, val_arrays: Arrays, rows: Sequence[dict[str, float]],
                kept: dict[str, float], title_suffix: str = "") -> dict[str, float]:
    """The post-training steps on the kept weights (of history row ``kept``) in the compiled
    ``model``: BatchNorm statistics re-measured (``--recompute-bn``), the card's figures,
    ``curves.png``. Returns the figures."""
    if cfg.recompute_bn:
        t_bn = time.perf_counter()
        n_bn = recompute_bn(model, train_arrays.x, cfg.batch)
        log.info("BatchNorm statistics of %d layers re-measured on %d whole training images in %.0f s (validation "
                 "IoU before: %.4f)", n_bn, len(train_arrays.x), time.perf_counter() - t_bn, kept["val_iou"])
    figures = final_figures(model, train_arrays, val_arrays, cfg.batch, kept["epoch"])
    if cfg.recompute_bn:
        figures["val_iou_before_bn"] = round(float(kept["val_iou"]), 4)
    mark = None
    if (cfg.recompute_bn or cfg.keep == "last") and "val_iou" in figures:  # not the curve's best
        mark = (kept["epoch"], figures["val_iou"],
                f"exported ({cfg.keep} epoch{', BatchNorm re-measured' if cfg.recompute_bn else ''})")
    plot_curves(rows, cfg.out_dir / "curves.png",
                curves_title(cfg, len(train_arrays.x), len(val_arrays.x)) + title_suffix, kept=mark)
    return figures


def kept_weights(cfg: TrainConfig) -> str:
    """What the exported weights are, for the card."""
    kept = ("best-val-IoU epoch's weights (chosen on the validation split)" if cfg.keep == "best"
            else "last epoch's weights (the validation split chooses nothing)")
    return (kept + (f", exponential moving average of the weights (momentum {cfg.ema:g} per step)" if cfg.ema else "")
            + (", BatchNorm statistics re-measured on the whole training images" if cfg.recompute_bn else ""))


def _log_arrays(what: str, arrays: Arrays) -> None:
    defect = float(arrays.y.mean()) * 100 if arrays.y.size else 0.0
    log.info("%s: x %s %s, y %s; %.2f %% of label pixels are defect", what, arrays.x.shape, arrays.x.dtype,
             arrays.y.shape, defect)


# --- CLI ---------------------------------------------------------------------


def command_of(cfg: TrainConfig) -> str:
    """A command line reproducing ``cfg`` (for configs built in Python rather than from
    a command line). Preprocess settings the flags cannot express are named in a
    trailing ``# ...`` comment."""
    argv = [str(cfg.data_dir), "--out", str(cfg.out_dir),
            "--size", *(("auto",) if cfg.size == AUTO_SIZE else (str(cfg.size[0]), str(cfg.size[1]))),
            "--alpha", f"{cfg.alpha:g}", "--epochs", str(cfg.epochs), "--batch", str(cfg.batch),
            "--lr", f"{cfg.lr:g}", "--dice-weight", f"{cfg.dice_weight:g}", "--seed", str(cfg.seed),
            "--val-fraction", f"{cfg.val_fraction:g}", "--name", cfg.name, "--version", cfg.version,
            "--threshold", f"{cfg.threshold:g}", "--opset", str(cfg.opset)]
    for flag, value in (("--groups", cfg.groups), ("--weights", cfg.weights)):
        if value is not None:
            argv += [flag, str(value)]
    if cfg.folds:
        argv += ["--folds", str(cfg.folds), "--fold", str(cfg.fold)]
    if cfg.all_data:
        argv += ["--all-data"]
    if cfg.weights is not None:
        argv += ["--freeze-epochs", str(cfg.freeze_epochs), "--finetune-lr", f"{cfg.finetune_lr:g}"]
    if cfg.freeze_bn:
        argv += ["--freeze-bn"]
    argv += ["--decoder-filters", *map(str, cfg.decoder_filters or default_decoder_filters(cfg.alpha))]
    if cfg.dropout:
        argv += ["--dropout", f"{cfg.dropout:g}"]
    if cfg.loss != "bce":
        argv += ["--loss", cfg.loss, "--focal-gamma", f"{cfg.focal_gamma:g}"]
    if cfg.tversky_beta != 0.5:
        argv += ["--tversky-beta", f"{cfg.tversky_beta:g}"]
    if cfg.defect_repeat != 1:
        argv += ["--defect-repeat", str(cfg.defect_repeat)]
    argv += ["--crop", str(cfg.crop or 0)]
    if cfg.crop:
        argv += ["--crop-defect", f"{cfg.crop_defect:g}", "--crop-balance", cfg.crop_balance,
                 "--crop-content" if cfg.crop_content else "--no-crop-content"]
    if cfg.steps:
        argv += ["--steps", str(cfg.steps)]
    argv += ["--jitter", f"{cfg.jitter:g}", "--zoom", f"{cfg.zoom:g}", "--multiscale", *map(str, cfg.multiscale)]
    if cfg.ema:
        argv += ["--ema", f"{cfg.ema:g}"]
    argv += ["--keep", cfg.keep]
    if cfg.recompute_bn:
        argv.append("--recompute-bn")
    if cfg.missing_mask_is_free:
        argv.append("--missing-mask-is-free")
    if cfg.stop_after is not None and cfg.stop_after < cfg.epochs:
        argv += ["--stop-after", str(cfg.stop_after)]
    if cfg.eager:
        argv.append("--eager")
    kinds = {type(op) for op in cfg.preprocess}
    if ClaheOp not in kinds and EqualizeHistOp not in kinds:
        argv.append("--no-clahe")
    if DilateOp not in kinds:
        argv += ["--dilate", "0"]
    odd: list[str] = []
    for op in cfg.preprocess:
        if isinstance(op, ColourOp):
            argv += ["--colour", op.to]
        elif isinstance(op, ClaheOp):
            argv += ["--clahe", f"{op.clip_limit:g},{op.tile_grid}"]
        elif isinstance(op, EqualizeHistOp):
            argv.append("--equalize")
        elif isinstance(op, DilateOp):
            argv += ["--dilate", str(op.kernel), "--dilate-shape", op.shape]
            if op.iterations != 1:
                odd.append(f"dilate iterations {op.iterations}")
        elif isinstance(op, ResizeOp):
            argv += ["--resize-mode", op.mode, "--interpolation", op.interpolation, "--pad-value", str(op.pad_value)]
            if op.pad_mode != "constant":
                argv += ["--pad-mode", op.pad_mode]
        elif isinstance(op, NormalizeOp):
            named = [k for k, (m, s) in NORMALIZATIONS.items()
                     if op.scale == 1.0 / 255.0 and op.mean == [m] and op.std == [s]]
            if named:
                argv += ["--normalize", named[0]]
            else:
                odd.append(f"normalize {op.model_dump_json()}")
    command = "python -m export.train " + shlex.join(argv)
    return command + ("  # preprocess set in Python: " + "; ".join(odd) if odd else "")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m export.train", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("data_dir", type=Path, help="folder of <name>.jpg + <name>.png (mask) pairs, searched recursively")
    p.add_argument("--out", type=Path, required=True, help="run directory (history, curves, weights, model.onnx)")
    p.add_argument("--groups", type=Path, help="JSON {image path relative to DATA_DIR: group}; split by group")
    p.add_argument("--missing-mask-is-free", action="store_true", help="use images without mask as defect-free")
    p.add_argument("--size", nargs="+", default=["auto"], metavar="H W",
                   help="model input, pixels (multiples of 32), or auto: about 256 x 256 pixels in the images' median "
                        "aspect ratio, sides multiples of 64")
    p.add_argument("--alpha", type=float, default=1.0, help="MobileNetV2 width multiplier (the ImageNet weights: 1.0)")
    p.add_argument("--decoder-filters", type=int, nargs=4, metavar="F", default=RECIPE_DECODER,
                   help="decoder widths, deepest first")
    p.add_argument("--dropout", type=float, default=0.0, help="dropout in the decoder blocks")
    p.add_argument("--weights", type=Path, help="local MobileNetV2 include_top=False weights file (never downloaded)")
    p.add_argument("--epochs", type=int, default=16)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-3, help="initial Adam learning rate (cosine decay to 5 %%)")
    p.add_argument("--dice-weight", type=float, default=1.0, help="weight of the soft-Dice term next to BCE")
    p.add_argument("--loss", choices=("bce", "focal"), default="bce",
                   help="pixel loss next to Dice: binary cross-entropy or binary focal cross-entropy")
    p.add_argument("--focal-gamma", type=float, default=2.0, help="focusing parameter of --loss focal")
    p.add_argument("--tversky-beta", type=float, default=0.5, metavar="B",
                   help="weight of missed defect pixels in the overlap term, false ones 1-B (0.5: Dice; above: "
                        "recall weighs more)")
    p.add_argument("--defect-repeat", type=int, default=1, metavar="K",
                   help="training images with any defect appear K times per epoch (oversampling)")
    p.add_argument("--crop", type=int, metavar="C", default=128,
                   help="train on CxC windows of the input-size images (multiple of 32; 0: whole images); validate "
                        "and export whole")
    p.add_argument("--crop-defect", type=float, default=0.3, metavar="P",
                   help="with --crop: share of windows placed over a defect pixel")
    p.add_argument("--crop-content", action=argparse.BooleanOptionalAction, default=None,
                   help="with --crop and a letterbox: place the windows not over a defect over the image, "
                        "not its padding (default: on with both)")
    p.add_argument("--crop-balance", choices=("image", "folder"), default="folder",
                   help="with --crop: draw the windows over a defect per defective image, or first a class folder "
                        "(the image's parent folder) uniformly, then an image of it")
    p.add_argument("--steps", type=int, metavar="N", default=70,
                   help="with --crop: batches per epoch (0: as many as one pass over the training images)")
    p.add_argument("--jitter", type=float, default=0.1,
                   help="augmentation: per-image gain 1±J and offset ±J on the normalised input (0: off)")
    p.add_argument("--zoom", type=float, default=2.0, metavar="Z",
                   help="with --crop: cut windows at a scale drawn log-uniformly from [1/Z, Z] (1: off)")
    p.add_argument("--multiscale", type=int, nargs="*", default=[2], metavar="K",
                   help="also run the network on the input shrunk K times (area) and keep the pixel-wise maximum of "
                        "the masks scaled back (validated and exported so; K: integers >= 2, input/K a multiple of 32)")
    p.add_argument("--ema", type=float, default=0.0, metavar="M",
                   help="validate and export the exponential moving average of the weights, momentum M per step "
                        "(0: off)")
    p.add_argument("--keep", choices=("best", "last"), default="last",
                   help="export the best validation IoU epoch's weights, or the last epoch's")
    p.add_argument("--recompute-bn", action="store_true",
                   help="after training, re-measure the BatchNorm statistics of the kept weights on the whole "
                        "training images (the input the line feeds)")
    p.add_argument("--seed", type=int, default=0, help="split, augmentation and initialisation seed")
    p.add_argument("--val-fraction", type=float, default=0.2)
    p.add_argument("--folds", type=int, default=0, metavar="K",
                   help="grouped, folder-stratified K-fold split (with --groups: by group); --fold picks the held-out "
                        "fold (instead of --val-fraction)")
    p.add_argument("--fold", type=int, default=0, metavar="I", help="the fold held out for validation (0..K-1)")
    p.add_argument("--all-data", action="store_true",
                   help="train on every image, validate on none (needs --keep last): the model shipped after "
                        "cross-validation chose the recipe")
    p.add_argument("--freeze-epochs", type=int, metavar="N",
                   help="with --weights: the pretrained encoder frozen (its BatchNorm too) for the first N epochs "
                        "(default: 2 with --weights, else 0)")
    p.add_argument("--freeze-bn", action="store_true",
                   help="with --weights: the encoder's BatchNorm layers keep the pretrained statistics (and scale, "
                        "offset) throughout training")
    p.add_argument("--finetune-lr", type=float, default=0.5, metavar="F",
                   help="after the frozen epochs the learning rate restarts at F x --lr (cosine to the end)")
    p.add_argument("--stop-after", type=int, metavar="N",
                   help="stop after N epochs, the learning-rate schedule still spanning --epochs (the card "
                        "records the epochs run)")
    p.add_argument("--eager", action="store_true", help="run eagerly (no graph tracing: for tiny debug runs)")
    g = p.add_argument_group("preprocessing (written to the model card, applied by station at run time)")
    g.add_argument("--colour", choices=("gray", "rgb", "bgr"), default="gray", help="model input colour")
    g.add_argument("--clahe", type=clahe_arg, metavar="CLIP,GRID", help="CLAHE parameters (default: none)")
    g.add_argument("--no-clahe", action="store_true", help="no contrast op (the default)")
    g.add_argument("--equalize", action="store_true", help="global histogram equalisation instead of CLAHE")
    g.add_argument("--dilate", type=int, default=0, metavar="K", help="grey dilation kernel, source pixels; 0: none")
    g.add_argument("--dilate-shape", choices=("rect", "ellipse"), default="rect")
    g.add_argument("--resize-mode", choices=("stretch", "letterbox"), default="letterbox")
    g.add_argument("--interpolation", choices=("area", "linear", "nearest"), default="area")
    g.add_argument("--pad-value", type=int, default=0, help="letterbox padding gray level (--pad-mode constant)")
    g.add_argument("--pad-mode", choices=("constant", "replicate", "reflect"), default="constant",
                   help="letterbox padding: --pad-value, the edge pixels repeated, or the image mirrored at its edge")
    g.add_argument("--normalize", choices=tuple(("unit", "symmetric")), default="symmetric",
                   help="unit: x/255; symmetric: x/127.5 - 1 (MobileNetV2's range, for --weights)")
    c = p.add_argument_group("model card")
    c.add_argument("--name", default="seg", help="model name")
    c.add_argument("--version", default="1", help="model version")
    c.add_argument("--description", default="", help="one line on what the model is for")
    c.add_argument("--data-description", default="", help="where the data came from (default: folder and count)")
    c.add_argument("--threshold", type=float, default=0.5, help="mask probability threshold")
    c.add_argument("--opset", type=int, default=DEFAULT_OPSET, help=f"ONNX opset (at most {MAX_OPSET})")
    k = p.add_argument_group("calibration (after training, on the validation images, through station's Inspector)")
    k.add_argument("--max-escape-rate", type=float, default=0.05,
                   help="the mask threshold and min_area_px with the fewest false rejects among those letting at "
                        "most this share of not-PASS parts through are written into the card and eval.json")
    k.add_argument("--config", type=Path, help="station config whose grading rules calibrate (default: the bundled)")
    k.add_argument("--no-calibrate", action="store_true", help="keep --threshold; no eval.json")
    return p


def _size_arg(values: Sequence[str]) -> tuple[int, int]:
    if list(values) == ["auto"]:
        return AUTO_SIZE
    try:
        h, w = (int(v) for v in values)
    except ValueError:
        raise ExportError(f"--size {' '.join(values)}: expected H W (pixels) or auto") from None
    return h, w


def config_from_args(args: argparse.Namespace, command: str) -> TrainConfig:
    opts = PreprocessOptions(
        colour=args.colour,
        clahe=None if (args.no_clahe or args.equalize) else args.clahe,
        equalize=args.equalize,
        dilate=args.dilate,
        dilate_shape=args.dilate_shape,
        resize_mode=args.resize_mode,
        interpolation=args.interpolation,
        pad_value=args.pad_value,
        pad_mode=args.pad_mode,
        normalize=args.normalize,
    )
    crop = args.crop or None
    crop_content = args.crop_content if args.crop_content is not None else bool(crop and
                                                                                args.resize_mode == "letterbox")
    freeze = args.freeze_epochs if args.freeze_epochs is not None else (2 if args.weights is not None else 0)
    return TrainConfig(
        data_dir=args.data_dir, out_dir=args.out, preprocess=tuple(preprocess_ops(opts)), groups=args.groups,
        size=_size_arg(args.size), alpha=args.alpha,
        decoder_filters=tuple(args.decoder_filters) if args.decoder_filters else None, dropout=args.dropout,
        weights=args.weights, epochs=args.epochs, batch=args.batch, lr=args.lr, dice_weight=args.dice_weight,
        loss=args.loss, focal_gamma=args.focal_gamma, defect_repeat=args.defect_repeat, jitter=args.jitter,
        crop=crop, crop_defect=args.crop_defect, crop_content=crop_content, steps=(args.steps or None) if crop else None,
        crop_balance=args.crop_balance, tversky_beta=args.tversky_beta,
        zoom=args.zoom,
        multiscale=tuple(args.multiscale), ema=args.ema, keep=args.keep,
        recompute_bn=args.recompute_bn,
        seed=args.seed, val_fraction=args.val_fraction,
        folds=args.folds, fold=args.fold, all_data=args.all_data, freeze_epochs=freeze,
        finetune_lr=args.finetune_lr, freeze_bn=args.freeze_bn, missing_mask_is_free=args.missing_mask_is_free,
        name=args.name, version=args.version, description=args.description,
        data_description=args.data_description, threshold=args.threshold, opset=args.opset, command=command,
        eager=args.eager, stop_after=args.stop_after,
    )


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stdout)
    try:
        cfg = config_from_args(args, "python -m export.train " + shlex.join(argv))
        result = train(cfg)
        log.info("%s: val IoU %.4f (train %.4f)", result.onnx_path,
                 result.card.training.figures.get("val_iou", math.nan), result.card.training.figures["train_iou"])
        if not args.no_calibrate and "val_iou" in result.card.training.figures:
            calibrate(result, cfg, args.config, args.max_escape_rate)
    except StationError as exc:
        log.error("%s", exc)
        return 2
    return 0


if __name__ == "__main__":
    from .alloc import reexec_under_jemalloc

    reexec_under_jemalloc()
    sys.exit(main())

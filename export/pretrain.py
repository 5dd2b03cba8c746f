"""Pretrain a MobileNetV2 encoder on NEU-DET image classes, for a U-Net to start from.

::

    python -m export.pretrain --data ../shared/data/neu_det --split models/neu_det_detector.split.json \\
        --out runs/encoder/encoder.weights.h5 [--alpha 0.35] [--size 192] [--crop 128] [--epochs 30]
    python -m export.train ... --weights runs/encoder/encoder.weights.h5

No ImageNet weights can be downloaded at the line or here, and the segmenters
are trained on a few dozen physical parts. NEU-DET's 1,436 steel-surface images
each show one defect class (crazing, inclusion, patches, pitted surface,
rolled-in scale, scratches; the class of its VOC boxes), which makes a small
texture-classification task: the encoder learns on windows of the images
preprocessed with the *segmenter's* ops (``--preprocess-of``, default the
magnetic-tile recipe: gray, CLAHE, symmetric normalisation), so its first
layers see the statistics they will see later. Only the training side of the
detector's split file is used (``--split``), so the detector's validation
images stay unseen by anything initialised from this encoder.

The output is the encoder's weights alone (``MobileNetV2(include_top=False)``,
the input's channels), the file ``export.train --weights`` loads; the log
gives the validation accuracy per epoch (``history.csv`` beside the weights).
"""

from __future__ import annotations

import argparse
import csv
import logging
import math
import sys
import time
from pathlib import Path
from typing import Sequence

import numpy as np

from . import ExportError
from .card import TrainingInfo, draft_card
from .data import read_split_file
from .train import check_crop, seeded_batches
from .voc import VocSample, load_box_arrays

log = logging.getLogger(__name__)

CLASSES = ("crazing", "inclusion", "patches", "pitted_surface", "rolled-in_scale", "scratches")


def image_classes(labels: Sequence[np.ndarray], boxes: Sequence[np.ndarray], keys: Sequence[str]) -> np.ndarray:
    """One class per image: the class its boxes cover most area of (NEU-DET images
    show one kind of surface; a few carry a small box of a second class).

    An image without boxes is an ExportError naming it."""
    out = np.empty(len(labels), np.int64)
    for i, (lab, xyxy, key) in enumerate(zip(labels, boxes, keys)):
        if len(lab) == 0:
            raise ExportError(f"{key}: no boxes; image-class pretraining needs at least one per image")
        area = (xyxy[:, 2] - xyxy[:, 0]) * (xyxy[:, 3] - xyxy[:, 1])
        out[i] = int(np.argmax(np.bincount(lab, weights=area, minlength=int(lab.max()) + 1)))
    return out


def make_windows(x: np.ndarray, cls: np.ndarray, batch: int, crop: int, seed: int, steps: int):
    """A ``keras.utils.PyDataset`` of random ``crop`` windows with one of the 8 symmetries of
    the square and their images' classes; a function of (seed, epoch, index)."""
    n, h, w = x.shape[:3]
    check_crop(crop, h, w)

    def windows(rng: np.random.Generator, epoch: int, idx: int) -> tuple[np.ndarray, np.ndarray]:
        pick = rng.integers(n, size=batch)
        xb = np.empty((batch, crop, crop, x.shape[3]), x.dtype)
        for k, i in enumerate(pick):
            y0, x0 = int(rng.integers(0, h - crop + 1)), int(rng.integers(0, w - crop + 1))
            xi = x[i, y0 : y0 + crop, x0 : x0 + crop]
            sym = int(rng.integers(8))
            if sym & 1:
                xi = xi[:, ::-1]
            if sym & 2:
                xi = xi[::-1]
            if sym & 4:
                xi = xi.transpose(1, 0, 2)
            xb[k] = xi
        return xb, cls[pick]

    return seeded_batches(steps, seed, windows)


def build_classifier(channels: int, classes: int, alpha: float, crop: int):
    """(classifier, encoder): MobileNetV2 ``include_top=False`` with a pooled softmax head."""
    import keras

    encoder = keras.applications.MobileNetV2(input_shape=(crop, crop, channels), alpha=alpha, include_top=False,
                                             weights=None)
    x = keras.layers.GlobalAveragePooling2D()(encoder.output)
    x = keras.layers.Dropout(0.2)(x)
    out = keras.layers.Dense(classes, activation="softmax")(x)
    return keras.Model(encoder.input, out, name="encoder_pretrain"), encoder


def pretrain(data: Path, split: Path, out: Path, preprocess, alpha: float = 0.35, size: int = 192,
             crop: int = 128, epochs: int = 30, batch: int = 32, lr: float = 2e-3, seed: int = 7) -> float:
    """Train and write the encoder weights to ``out``; returns the last epoch's validation accuracy."""
    import keras
    import tensorflow as tf

    if out.suffixes[-2:] != [".weights", ".h5"]:
        raise ExportError(f"--out {out}: must end in .weights.h5 (Keras weights file)")
    card = draft_card(name="encoder-pretrain", version="0", size=(size, size), preprocess=preprocess,
                      training=TrainingInfo(data=str(data)), classes=CLASSES)
    sides = {}
    for side in ("train", "val"):
        paths = read_split_file(split, data, side)
        samples = [VocSample(p, data / "annotations" / (p.stem + ".xml"), p.relative_to(data).as_posix())
                   for p in paths]
        arrays = load_box_arrays(samples, card, progress=True)
        sides[side] = (arrays.x, image_classes(arrays.labels, arrays.boxes, arrays.keys))
    (x_tr, c_tr), (x_va, c_va) = sides["train"], sides["val"]
    log.info("pretraining on %d images (%s), validating on %d, %d classes", len(x_tr),
             np.bincount(c_tr, minlength=len(CLASSES)).tolist(), len(x_va), len(CLASSES))

    keras.utils.set_random_seed(seed)
    tf.config.experimental.enable_op_determinism()
    classifier, encoder = build_classifier(x_tr.shape[3], len(CLASSES), alpha, crop)
    for layer in encoder.layers:  # short training: the default 0.999 barely moves the statistics
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.momentum = 0.9
    steps = math.ceil(len(x_tr) / batch)
    schedule = keras.optimizers.schedules.CosineDecay(lr, decay_steps=steps * epochs, alpha=0.05)
    classifier.compile(keras.optimizers.Adam(schedule), loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    # Validation on centred crops of the whole images (the classifier is built at crop size).
    top, left = (x_va.shape[1] - crop) // 2, (x_va.shape[2] - crop) // 2
    val = (x_va[:, top : top + crop, left : left + crop], c_va)
    out.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    hist = classifier.fit(make_windows(x_tr, c_tr, batch, crop, seed, steps), epochs=epochs, validation_data=val,
                          verbose=2)
    encoder.save_weights(out)
    rows = [dict(epoch=i + 1, **{k: float(v[i]) for k, v in hist.history.items()}) for i in range(epochs)]
    with (out.parent / "history.csv").open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    acc = rows[-1]["val_accuracy"]
    log.info("%s: encoder weights (alpha %g, %d channel(s)); validation accuracy %.3f; %.0f s", out, alpha,
             x_tr.shape[3], acc, time.perf_counter() - t0)
    return acc


def main(argv: Sequence[str] | None = None) -> int:
    from .card import preprocess_ops
    from .magnetic_tile import PREPROCESS

    p = argparse.ArgumentParser(prog="python -m export.pretrain", description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, default=Path("../shared/data/neu_det"))
    p.add_argument("--split", type=Path, default=Path("models/neu_det_detector.split.json"))
    p.add_argument("--out", type=Path, default=Path("runs/encoder/encoder.weights.h5"))
    p.add_argument("--alpha", type=float, default=0.35)
    p.add_argument("--size", type=int, default=192)
    p.add_argument("--crop", type=int, default=128)
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--seed", type=int, default=7)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        pretrain(args.data, args.split, args.out, tuple(preprocess_ops(PREPROCESS)), args.alpha, args.size,
                 args.crop, args.epochs, args.batch, seed=args.seed)
    except ExportError as exc:
        log.error("%s", exc)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

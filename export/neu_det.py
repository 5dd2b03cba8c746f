"""The shipped NEU-DET box detector: one recipe, retrained and evaluated by command.

::

    python -m export.neu_det train [--data DIR] [--weights FILE] [--run RUN_DIR] [--epochs N]
    python -m export.neu_det eval  [--data DIR] [--split FILE] [--model FILE]
    python -m export.neu_det tta   [--data DIR] [--weights FILE] [--run RUN_DIR] [--split FILE]
    python -m export.neu_det export [--data DIR] [--weights FILE] [--run RUN_DIR]

``train`` runs :func:`export.train_detector.train` with the recipe below
(fixed seed: split, initialisation and augmentation), copies the exported
model to ``models/neu_det_detector.onnx``, its split (the image paths of
each side) to ``models/neu_det_detector.split.json`` and its training curves
to ``docs/neu_det_training.png`` (a trial, ``--epochs N``, leaves them as they
are: its model stays in its run directory). The weights exported are those of the last
epoch, so the validation split chose nothing about the model.

``eval`` runs ``station eval`` — the line's own ``Inspector`` with the ONNX
model — on the validation images of the committed split file (their VOC
annotations in the sibling ``annotations/`` folder), writes
``docs/neu_det_eval.json`` and ``docs/neu_det_eval.png``, and records the
figures (AP50, COCO mAP, AP per class) in the model's card.

``export`` exports a run's last weights under the recipe without training (the
recipe's export options — flips, NMS — changed after the run) and copies the
model and split as ``train`` does; the card names ``train``, which rebuilds it.

``tta`` compares the test-time flip sets of :data:`TTA_CHOICES` with the
run's last weights on the *training* images of the split, which is where the
recipe's ``tta`` was chosen.

Data: the NEU surface defect database, detection version (Song & Yan 2013;
He et al., IEEE TIM 2020), split so that near-duplicate images stay on one
side (:func:`export.voc.near_duplicate_groups`).
"""

from __future__ import annotations

import argparse
import json
import logging
import shlex
import shutil
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any, Sequence

from . import ExportError, run_commands, run_station_eval
from .data import read_split_file
from .onnx_export import embed_card_file, read_card
from .train_detector import DetTrainConfig, DetTrainResult, command_of, train

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parent.parent
SHARED = REPO.parent / "shared"
DEFAULT_DATA = SHARED / "data" / "neu_det"
DEFAULT_WEIGHTS = SHARED / "weights" / "mobilenet_v2_1.0_imagenet_no_top.weights.h5"
DEFAULT_RUN = Path("runs/neu_det_detector")
MODEL_PATH = Path("models/neu_det_detector.onnx")
SPLIT_PATH = Path("models/neu_det_detector.split.json")
DOCS = Path("docs")
SEED = 0

# The recipe. 192 px is just under the images' 200 px (a multiple of 32). The backbone is
# MobileNetV2 alpha 1.0 from ImageNet weights (a local file, the gray input repeated to
# three channels), with 64-channel FPN and heads (2.4 M parameters): it reaches in 40
# epochs (about 45-70 s each on two cores) what alpha 0.5 from random weights did not in
# 160. Augmentation beyond the 8 symmetries: half the images are zoom crops (sides
# 60-100 %), all get gain/offset jitter 0.1. One cosine schedule over all epochs at a peak
# rate of 1e-3 (the whole network, BatchNorm momentum 0.9); the last epoch's weights are kept.
# The FCOS refinements for localisation: centre sampling (radius 1.5 strides), GIoU at
# twice the focal loss's weight, and a quality score trained on the predicted box's IoU;
# NMS at IoU 0.6 (chosen on the training split). The exported graph averages the model
# over the image and its left-right mirror (`--tta h`, chosen on the training split by
# `python -m export.neu_det tta`): +0.015 mAP on validation at two detector runs a frame,
# which still end before the U-Net's beside them (docs/neu_det_detector.md).
RECIPE: dict[str, Any] = dict(size=(192, 192), alpha=1.0, width=64, head_depth=2, levels=(8, 16, 32), epochs=40,
              batch=16, lr=1e-3, crop_min=0.6, jitter=0.1, keep="last", seed=SEED, val_fraction=0.2,
              quality="iou", centre_radius=1.5, box_weight=2.0, nms_iou=0.6, tta=("h",))


def recipe(data: Path, run: Path, weights: Path, epochs: int | None = None) -> DetTrainConfig:
    """The DetTrainConfig of the shipped model (``epochs`` overrides the recipe's, for trials)."""
    if not weights.is_file():
        raise ExportError(f"--weights {weights}: no such file (ImageNet MobileNetV2 1.0 no-top Keras weights)")
    cfg = DetTrainConfig(data_dir=data, out_dir=run, weights=weights, **RECIPE)
    if epochs is not None:
        cfg = replace(cfg, epochs=epochs)
    argv = ["train", "--data", str(data), "--weights", str(weights), "--run", str(run)] + (
        ["--epochs", str(epochs)] if epochs else [])
    return replace(cfg, command="python -m export.neu_det " + shlex.join(argv) + "   # = " + command_of(cfg))


def cmd_train(args: argparse.Namespace) -> int:
    cfg = recipe(args.data, args.run, args.weights, args.epochs)
    result = train(cfg)
    if args.epochs is not None:  # a trial: the shipped files stay
        f = result.card.training.figures
        log.info("trial run (--epochs): %s left as it is; this run's model is %s (validation AP50 %.4f, mAP %.4f)",
                 MODEL_PATH, result.onnx_path, f["val_ap50"], f["val_map"])
        return 0
    _ship(cfg, result)
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    """The run's last weights exported once more under the recipe (no training): what ``train``
    would have exported, for a run made before a change of the recipe's export options
    (test-time flips, NMS) — the card names the recipe's ``train`` command, which rebuilds it."""
    cfg = recipe(args.data, args.run, args.weights)
    weights = args.run / "last.weights.h5"
    if not weights.is_file():
        raise ExportError(f"{weights}: no weights; train first")
    result = train(replace(cfg, export_from=weights))
    _ship(cfg, result)
    return 0


def _ship(cfg: DetTrainConfig, result: DetTrainResult) -> None:
    """The run's model and split to models/, its curves to docs/ (what the shipped files are)."""
    MODEL_PATH.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(result.onnx_path, MODEL_PATH)
    shutil.copyfile(cfg.out_dir / "split.json", SPLIT_PATH)
    if (cfg.out_dir / "curves.png").is_file():  # the run's training curves
        DOCS.mkdir(exist_ok=True)
        shutil.copyfile(cfg.out_dir / "curves.png", DOCS / "neu_det_training.png")
    f = result.card.training.figures
    log.info("%s: validation AP50 %.4f, mAP %.4f (epoch %d); now run: python -m export.neu_det eval", MODEL_PATH,
             f["val_ap50"], f["val_map"], result.kept_epoch)


def cmd_eval(args: argparse.Namespace) -> int:
    images = read_split_file(args.split, args.data)
    json_out, png_out = args.json, args.report
    log.info("station eval on the %d validation images of %s", len(images), args.split)
    report = run_station_eval(["--det-model", args.model, *images], json_out, png_out)
    det = report["detection"]
    figures = {f"eval_{k}": round(float(v), 4) for k, v in report["card_figures"].items()}
    for cls, per in sorted(det["per_class"].items()):
        if per.get("ap50") is not None:
            figures[f"eval_ap50.{cls}"] = round(float(per["ap50"]), 4)
    figures["eval_images"] = float(report["counts"]["evaluated"])
    log.info("%s: %s", args.model, json.dumps(figures))
    if args.no_card:
        return 0
    card = read_card(args.model)
    training = card.training
    kept = {k: v for k, v in training.figures.items() if not k.startswith("eval_")}
    base = training.evaluated_by.split(" [figures without a prefix]")[0]
    argv = ["eval", "--data", str(args.data), "--split", str(args.split), "--model", str(args.model),
            "--json", str(json_out), "--report", str(png_out)]
    evaluated_by = (f"{base} [figures without a prefix]; python -m export.neu_det {shlex.join(argv)} [eval_* "
                    f"figures: station eval with the ONNX model on the {det['images']} validation images, "
                    f"pycocotools; report {json_out}]")
    card = card.model_copy(update={"training": training.model_copy(
        update={"figures": {**kept, **figures}, "evaluated_by": evaluated_by})})
    embed_card_file(args.model, card)
    log.info("figures written into the card of %s", args.model)
    return 0


# The test-time flip sets `tta` compares: none, the left-right mirror, all three mirrors.
TTA_CHOICES: tuple[tuple[str, ...], ...] = ((), ("h",), ("h", "v", "hv"))


def cmd_tta(args: argparse.Namespace) -> int:
    """Test-time flips chosen on the *training* split (never on validation): the run's last
    weights in the inference graph with each flip set of :data:`TTA_CHOICES`, AP50 and mAP on
    the training images of the split file (the decoding and scoring of ``train``)."""
    import keras

    from station.evaluate import parse_voc
    from station.modelcard import TrainingInfo

    from .detector import build_detector, build_inference
    from .train_detector import detect, draft_detection_card, score_detections
    from .voc import class_names, find_voc_samples, load_box_arrays

    cfg = recipe(args.data, args.run, args.weights)
    weights = args.run / "last.weights.h5"
    if not weights.is_file():
        raise ExportError(f"{weights}: no weights; train first")
    samples = find_voc_samples(cfg.data_dir)
    classes = class_names(parse_voc(s.annotation) for s in samples)
    card = draft_detection_card(cfg, classes, TrainingInfo(data="(pending)"))
    keys = {p.relative_to(args.data).as_posix() for p in read_split_file(args.split, args.data, "train")}
    arrays = load_box_arrays([s for s in samples if s.key in keys], card, progress=True)
    h, w = cfg.size
    model = build_detector((h, w, card.input.channels), len(classes), alpha=cfg.alpha, width=cfg.width,
                           head_depth=cfg.head_depth, strides=cfg.levels, weights=cfg.weights)
    model.load_weights(weights)
    for flips in TTA_CHOICES:
        infer = build_inference(model, len(classes), cfg.score_threshold, cfg.nms_iou, max_total=cfg.max_detections,
                                strides=cfg.levels, tta=flips)
        m = score_detections(detect(infer, arrays, card), arrays, classes)
        log.info("training split (%d images), flips %-8s: AP50 %.4f, mAP %.4f", len(arrays),
                 "/".join(flips) or "none", m["ap50"], m["map"])
    keras.backend.clear_session()
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m export.neu_det", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train", help="train with the fixed recipe, export, copy to models/ and docs/")
    x = sub.add_parser("export", help="export the run's last weights under the recipe (no training); copy to models/")
    f = sub.add_parser("tta", help="compare test-time flip sets on the training split (the run's last weights)")
    f.add_argument("--data", type=Path, default=DEFAULT_DATA, help="neu_det folder (images/, annotations/)")
    f.add_argument("--run", type=Path, default=DEFAULT_RUN, help="run directory (last.weights.h5)")
    f.add_argument("--split", type=Path, default=SPLIT_PATH, help="split file whose training images to use")
    e = sub.add_parser("eval", help="station eval on the validation side of the split file; figures into the card")
    for s in (t, e, x):
        s.add_argument("--data", type=Path, default=DEFAULT_DATA, help="neu_det folder (images/, annotations/)")
    for s in (t, x):
        s.add_argument("--run", type=Path, default=DEFAULT_RUN, help="run directory")
    for s in (t, x, f):
        s.add_argument("--weights", type=Path, default=DEFAULT_WEIGHTS,
                       help="ImageNet MobileNetV2 1.0 no-top Keras weights (a local file, never downloaded)")
    t.add_argument("--epochs", type=int, help="override the recipe's epochs (a trial: the shipped model, split and "
                   "curves are left as they are)")
    e.add_argument("--model", type=Path, default=MODEL_PATH)
    e.add_argument("--split", type=Path, default=SPLIT_PATH, help="split file whose validation images to evaluate")
    e.add_argument("--json", type=Path, default=DOCS / "neu_det_eval.json", help="station eval JSON report")
    e.add_argument("--report", type=Path, default=DOCS / "neu_det_eval.png", help="station eval PNG report")
    e.add_argument("--no-card", action="store_true", help="do not write the figures into the card")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    commands = {"train": cmd_train, "export": cmd_export, "eval": cmd_eval, "tta": cmd_tta}
    return run_commands(build_parser(), commands, argv)


if __name__ == "__main__":
    from .alloc import reexec_under_jemalloc

    reexec_under_jemalloc()
    sys.exit(main())

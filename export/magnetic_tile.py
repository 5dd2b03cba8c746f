"""The shipped magnetic-tile segmentation model: a pretrained recipe, cross-validated, trained on all data.

::

    python -m export.magnetic_tile cv    [--data DIR] [--weights FILE] [--run DIR] [--folds 5] [--max-escape-rate 0.05]
    python -m export.magnetic_tile train [--data DIR] [--weights FILE] [--run DIR] [--cv-report FILE] [--epochs N]

``cv`` trains the recipe once per fold of a grouped, class-stratified k-fold
split by physical tile (``tile_groups.json``; :func:`export.data.fold_of_groups`),
each fold's model on the other folds' images (a finished fold is kept, so an
interrupted ``cv`` resumes), then predicts every image with the model that
never saw its tile and chooses the mask threshold and ``min_area_px`` with the
fewest false rejects within the escape budget (:mod:`export.crossval`, the
line's own Inspector and grading rules of ``config/magnetic_tile.yaml``). It
writes ``docs/magnetic_tile_cv.json``: the chosen pair, the out-of-fold figures
(pooled, per class, per fold with mean ± sd) and every image's fold.

``train`` trains the same recipe on all 1,076 images (nothing held out: the
recipe and the threshold were chosen by ``cv``), writes the chosen threshold
and the cross-validated figures into the model card, and copies the model to
``models/magnetic_tile_unet.onnx`` and its training curves to ``docs/``.
``--epochs`` makes a trial, whose model stays in its run directory.

Data: the Magnetic-tile defect data set (Huang, Qiu, Yuan, "Surface defect
saliency of magnetic tile", The Visual Computer, 2020; repository
abin24/Magnetic-tile-defect-datasets). Encoder: ImageNet MobileNetV2 (width
1.0) from a local weights file, never downloaded.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any, Sequence

from . import ExportError, run_commands
from .card import PreprocessOptions, preprocess_ops
from .onnx_export import embed_card_file, read_card
from .train import TrainConfig, TrainResult, command_of, train

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parent.parent
SHARED = REPO.parent / "shared"
DEFAULT_DATA = SHARED / "data" / "magnetic_tile"
DEFAULT_WEIGHTS = SHARED / "weights" / "mobilenet_v2_1.0_imagenet_no_top.weights.h5"
DEFAULT_RUN = Path("runs/magnetic_tile")
DEFAULT_CV_RUN = Path("runs/magnetic_tile_cv")
MODEL_PATH = Path("models/magnetic_tile_unet.onnx")
CONFIG_PATH = Path("config/magnetic_tile.yaml")
DOCS = Path("docs")
CV_REPORT = DOCS / "magnetic_tile_cv.json"
CURVES = "magnetic_tile_training.png"
SEED = 7
FOLDS = 5
CITATION = ('Magnetic-tile defect data set: Huang, Qiu, Yuan, "Surface defect saliency of magnetic tile", '
            "The Visual Computer, 2020 (repository abin24/Magnetic-tile-defect-datasets, commit cc4eb53)")

# The recipe (docs/magnetic_tile_unet.md has the trials behind it), chosen on fold 0 of
# the cross-validation. The tile letterboxed into 256 x 256 keeps its aspect ratio (widths
# 103-632, heights 222-403). No CLAHE: the "uneven" defects are large regions of another
# brightness, which local equalisation flattens. Training on 128 px windows cut at 1/2 to
# 2 times the scale (30 % over a defect, the class drawn first, the others over the tile,
# not its padding) with a second pass at half size in the served graph (masks merged by
# maximum): the half-size pass sees a whole tile, and so the edge of an uneven region. The
# ImageNet encoder is frozen for the first 2 epochs (the random decoder learns to read it),
# then everything trains at half the rate. A narrow decoder (128-64-48-32) keeps the pair
# of shipped models above 25 frames/s on two cores. The last epoch's weights are kept: no
# held-out image chooses them.
PREPROCESS = PreprocessOptions(colour="gray", clahe=None, dilate=0, resize_mode="letterbox", interpolation="area",
                               pad_value=0, normalize="symmetric")
RECIPE: dict[str, Any] = dict(size=(256, 256), alpha=1.0, decoder_filters=(128, 64, 48, 32), epochs=16, batch=16,
                              lr=1e-3, freeze_epochs=2, finetune_lr=0.5, crop=128, crop_defect=0.3,
                              crop_balance="folder", crop_content=True, zoom=2.0, multiscale=(2,), steps=70,
                              jitter=0.1, keep="last", seed=SEED, threshold=0.5)


def recipe(data: Path, run: Path, weights: Path, fold: int | None = None, epochs: int | None = None) -> TrainConfig:
    """The TrainConfig of the recipe: fold ``fold`` of :data:`FOLDS` held out, or (None) all data."""
    cfg = TrainConfig(
        data_dir=data, out_dir=run, preprocess=tuple(preprocess_ops(PREPROCESS)), groups=data / "tile_groups.json",
        weights=weights, name="magnetic-tile-unet", version="2",
        description="magnetic-tile surface defects (blowhole, break, crack, fray, uneven) as one 'defect' mask; "
                    "U-Net on an ImageNet MobileNetV2 encoder",
        data_description=CITATION + f"; {data}: 1,076 images (757 defect-free), masks beside the images",
        **RECIPE,
    )
    cfg = replace(cfg, all_data=True) if fold is None else replace(cfg, folds=FOLDS, fold=fold)
    if epochs is not None:
        cfg = replace(cfg, epochs=epochs)
    return replace(cfg, command=command_of(cfg))


def _check_inputs(data: Path, weights: Path) -> None:
    if not (data / "tile_groups.json").is_file():
        raise ExportError(f"--data {data}: no tile_groups.json (the magnetic_tile folder of the shared data)")
    if not weights.is_file():
        raise ExportError(f"--weights {weights}: no such file (ImageNet MobileNetV2 1.0 no-top Keras weights)")


def cmd_cv(args: argparse.Namespace) -> int:
    from station.config import load_config

    from . import crossval
    from .data import find_samples, fold_of_groups, load_groups

    _check_inputs(args.data, args.weights)
    for fold in range(FOLDS):
        run = args.run / f"fold{fold}"
        if (run / "model.onnx").is_file():
            log.info("fold %d: %s exists, kept", fold, run / "model.onnx")
            continue
        result = train(recipe(args.data, run, args.weights, fold=fold))
        log.info("fold %d: fit %.0f s", fold, result.seconds)
        import keras

        keras.backend.clear_session()
    cfg = load_config(args.config)
    images = crossval.predict_out_of_fold(args.run, args.data, cfg)
    report = crossval.tune(images, cfg, args.thresholds, args.min_areas, args.max_escape_rate)
    seconds = []
    for fold in range(FOLDS):
        card = read_card(args.run / f"fold{fold}" / "model.onnx")
        seconds.append(card.training.seconds or 0.0)
    samples = find_samples(args.data).samples
    report.update(
        command=f"python -m export.magnetic_tile cv --data {args.data} --run {args.run}",
        training_command=recipe(args.data, args.run / "fold<k>", args.weights, fold=0).command.replace(
            "--fold 0", "--fold <k>"),
        fit_seconds_per_fold=[round(s, 1) for s in seconds],
        config=str(args.config),
        folds=fold_of_groups(samples, FOLDS, SEED, load_groups(args.data / "tile_groups.json")),
    )
    CV_REPORT.parent.mkdir(parents=True, exist_ok=True)
    CV_REPORT.write_text(json.dumps(report, indent=1) + "\n")
    for line in crossval.summary_lines(report):
        print(line)
    print(f"report: {CV_REPORT}; now: python -m export.magnetic_tile train")
    return 0


def cv_figures(report: dict[str, Any]) -> dict[str, float]:
    """The card's figures from a ``cv`` report: out-of-fold pooled, and mean ± sd over the folds."""
    pooled = report["pooled"]
    out = {f"oof_{k}": round(float(pooled[k]), 4) for k in ("iou", "agreement_pct", "escape_rate",
                                                             "false_reject_rate") if pooled[k] is not None}
    out.update(oof_images=float(pooled["images"]), oof_escapes=float(pooled["escapes"]),
               oof_false_rejects=float(pooled["false_rejects"]))
    for key, v in report["fold_mean_sd"].items():
        if v["mean"] is not None:
            out[f"cv_{key}_mean"], out[f"cv_{key}_sd"] = round(v["mean"], 4), round(v["sd"], 4)
    return out


def _trained(cfg: TrainConfig) -> TrainResult:
    """The model of ``cfg``: trained, or the one its run folder already holds from the same
    recipe (an earlier ``train`` whose card is to be written again from a newer cv report)."""
    onnx_path = cfg.out_dir / "model.onnx"
    try:
        card = read_card(onnx_path) if onnx_path.is_file() else None
    except ExportError as exc:  # a run stopped while writing it: train again
        log.warning("%s", exc)
        card = None
    if card is not None and card.training.command.endswith(cfg.command):
        log.info("%s: trained by the same recipe, kept (delete it to train again)", onnx_path)
        return TrainResult(card=card, onnx_path=onnx_path, best_epoch=cfg.epochs,
                           seconds=card.training.seconds or 0.0, history=[])
    return train(cfg)


def cmd_train(args: argparse.Namespace) -> int:
    from station.config import load_config
    from station.modelcard import MaskOutput

    _check_inputs(args.data, args.weights)
    if not args.cv_report.is_file():
        raise ExportError(f"{args.cv_report}: no cross-validation report; run 'python -m export.magnetic_tile cv' "
                          "first (it chooses the threshold the model ships with)")
    cfg = recipe(args.data, args.run, args.weights, epochs=args.epochs)
    result = _trained(cfg)
    report = json.loads(args.cv_report.read_text())  # read after training: a cv run may have finished meanwhile
    chosen = report["chosen"]
    card = result.card
    assert isinstance(card.output, MaskOutput)  # the U-Net's
    training = card.training
    card = card.model_copy(update={
        "output": card.output.model_copy(update={"threshold": float(chosen["threshold"])}),
        "training": training.model_copy(update={
            "command": f"python -m export.magnetic_tile train --data {args.data}   # = {cfg.command}",
            "figures": {**{k: v for k, v in training.figures.items() if k != "best_epoch"}, **cv_figures(report)},
            "evaluated_by": (
                f"{report['command']}: {len(report['per_fold'])}-fold cross-validation grouped by physical tile, "
                f"each image predicted by the fold model that never saw its tile (station's Inspector, "
                f"{report['config']}); mask threshold {chosen['threshold']:g} and min_area_px "
                f"{chosen['min_area_px']} chosen on those predictions: "
                + (f"the fewest false rejects with an escape rate <= {report['max_escape_rate']:g}"
                   if report.get("budget_met", True) else
                   f"no pair had an escape rate <= {report['max_escape_rate']:g}, so the fewest escapes")
                + "; oof_* pooled over all images, cv_*_mean/_sd over the "
                "folds; train_iou: this model on its own training images (Keras, at 0.5)"),
        }),
    })
    embed_card_file(result.onnx_path, card)
    min_area = load_config(args.config).postprocess.min_area_px
    if min_area != chosen["min_area_px"]:
        log.warning("%s sets postprocess.min_area_px %d; cross-validation chose %d: set it there", args.config,
                    min_area, chosen["min_area_px"])
    if args.epochs is not None:
        log.info("trial run (--epochs): %s left as it is; this run's model is %s", MODEL_PATH, result.onnx_path)
        return 0
    MODEL_PATH.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(result.onnx_path, MODEL_PATH)
    DOCS.mkdir(exist_ok=True)
    shutil.copyfile(cfg.out_dir / "curves.png", DOCS / CURVES)
    log.info("%s: trained on all images in %.0f s, mask threshold %g (cross-validated)", MODEL_PATH, result.seconds,
             chosen["threshold"])
    return 0


def build_parser() -> argparse.ArgumentParser:
    from .crossval import DEFAULT_MIN_AREAS, DEFAULT_THRESHOLDS, MAX_ESCAPE_RATE

    p = argparse.ArgumentParser(prog="python -m export.magnetic_tile", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("cv", help="train the recipe per fold, choose threshold and min_area_px out of fold")
    t = sub.add_parser("train", help="train the recipe on all images, ship it with the cross-validated threshold")
    for s in (c, t):
        s.add_argument("--data", type=Path, default=DEFAULT_DATA, help="magnetic_tile folder (with tile_groups.json)")
        s.add_argument("--weights", type=Path, default=DEFAULT_WEIGHTS, help="ImageNet MobileNetV2 1.0 weights file")
        s.add_argument("--config", type=Path, default=CONFIG_PATH, help="station config: grading rules")
    c.add_argument("--run", type=Path, default=DEFAULT_CV_RUN, help="folder of the fold runs (fold0 …)")
    c.add_argument("--max-escape-rate", type=float, default=MAX_ESCAPE_RATE)
    c.add_argument("--thresholds", type=float, nargs="+", default=list(DEFAULT_THRESHOLDS))
    c.add_argument("--min-areas", type=int, nargs="+", default=list(DEFAULT_MIN_AREAS))
    t.add_argument("--run", type=Path, default=DEFAULT_RUN, help="run directory")
    t.add_argument("--cv-report", type=Path, default=CV_REPORT, help="the report of 'cv' (threshold, figures)")
    t.add_argument("--epochs", type=int, help="a trial: the shipped model stays as it is")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    return run_commands(build_parser(), {"cv": cmd_cv, "train": cmd_train}, argv)


if __name__ == "__main__":
    from .alloc import reexec_under_jemalloc

    reexec_under_jemalloc()
    sys.exit(main())

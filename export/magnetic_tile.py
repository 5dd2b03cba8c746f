"""The shipped magnetic-tile segmentation model: one recipe, retrained and evaluated by command.

::

    python -m export.magnetic_tile train [--member letterbox|stretch] [--data DIR] [--run RUN_DIR] [--epochs N]
    python -m export.magnetic_tile eval  [--data DIR] [--split FILE] [--model FILE]... [--config FILE]
    python -m export.magnetic_tile export-checkpoint [--member M] [--data DIR] [--run RUN_DIR]
    python -m export.magnetic_tile tune  [--split FILE] [--model FILE]... [--thresholds T…] [--min-areas A…]

The recipe has two members, one per geometry: ``letterbox`` (the tile scaled
into the square input, aspect ratio kept, the rest padded; the shipped model,
``config/magnetic_tile.yaml``) and ``stretch`` (the tile stretched over the
whole input; a trial, not shipped: docs/magnetic_tile_unet.md). A config
listing both under ``models.segmentation`` runs their mean.

``train`` runs :func:`export.train.train` with a member's recipe (fixed seeds:
split, initialisation and augmentation all from ``SEED``), copies the
exported model to ``models/magnetic_tile_unet.onnx`` (``letterbox``) or
``models/magnetic_tile_unet_stretch.onnx`` (``stretch``), its split (the image paths of
each side) beside it and its training curves to ``docs/`` — unless
``--epochs`` or ``--stop-after`` makes it a trial, whose model stays in its
run directory.

``eval`` runs ``station eval`` — the line's own ``Inspector`` with the ONNX
models and ``config/magnetic_tile.yaml`` — on exactly the validation images
of the committed split file (``models/magnetic_tile_unet.split.json``) and
writes ``docs/magnetic_tile_eval.json`` and ``docs/magnetic_tile_eval.png``.
Without ``--model`` it evaluates the config's models (several: their mean);
with one ``--model`` it evaluates that model alone and records its figures
(IoU overall and per class, pixel precision/recall, grade agreement) in the
model's card.

``export-checkpoint`` exports the checkpoint of a ``train`` run that was
stopped before its last epoch (the run writes its kept weights,
``best.weights.h5`` for this recipe), with the number of epochs really run
on the card, or re-exports a finished run with the recipe's post-training
steps (BatchNorm statistics re-measured, curves, card, parity).

Data: the Magnetic-tile defect data set (Huang, Qiu, Yuan, "Surface defect
saliency of magnetic tile", The Visual Computer, 2020; repository
abin24/Magnetic-tile-defect-datasets), split by physical tile
(``tile_groups.json``), never by image.
"""

from __future__ import annotations

import argparse
import json
import logging
import shlex
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from typing import NamedTuple, Sequence

from station.modelcard import MaskOutput

from . import ExportError, run_commands, run_station_eval
from .card import PreprocessOptions, preprocess_ops
from .data import read_split_file, write_split_file
from .onnx_export import embed_card_file, read_card
from .train import TrainConfig, train

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parent.parent
DEFAULT_DATA = Path("/work/shared/data/magnetic_tile")
DEFAULT_RUN = Path("runs/magnetic_tile")
MODEL_PATH = Path("models/magnetic_tile_unet.onnx")
SPLIT_PATH = Path("models/magnetic_tile_unet.split.json")
STRETCH_MODEL_PATH = Path("models/magnetic_tile_unet_stretch.onnx")
CONFIG_PATH = Path("config/magnetic_tile.yaml")
DOCS = Path("docs")
SEED = 7
CITATION = ('Magnetic-tile defect data set: Huang, Qiu, Yuan, "Surface defect saliency of magnetic tile", '
            "The Visual Computer, 2020 (repository abin24/Magnetic-tile-defect-datasets, commit cc4eb53)")

# The recipe. Letterbox keeps the tile's aspect ratio (widths 103-632, heights
# 222-403) and a square input allows all 8 flips/rotations; 256 px keeps the
# small blowholes and cracks (median 0.13 % / 0.29 % of the image) a few pixels
# wide. No grey dilation: the defects are dark, a max filter would erase thin cracks.
# CLAHE stays although it halves the contrast of "uneven" regions to the rest of
# the part (|mean difference| / std 0.67 → 0.36 on the validation images): without
# it the encoder, trained from scratch, hardly learns (validation IoU 0.025 after
# 20 epochs of whole images, 0.075 after 21 epochs of windows).
PREPROCESS = PreprocessOptions(colour="gray", clahe=(2.0, 8), dilate=0, resize_mode="letterbox",
                               interpolation="area", pad_value=0, normalize="symmetric")
# The mask threshold of this model alone (its card's output.threshold), chosen with
# `tune` on the training split, which ranks IoU first: above it the agreement there
# rises while IoU falls (0.95: IoU 0.489, agreement 92.6 %). Training figures use 0.5.
SERVE_THRESHOLD = 0.85
# Training on 128 px windows of the 256 px inputs makes ~4x more updates per minute
# than whole images; a third of them over a defect balances the rare small defects
# against the defect-free bulk without teaching a defect share far above a whole
# frame's (half over a defect flagged defect-free tiles). A defect window first draws
# one of the five classes, then an image of it, so the 12 frayed images weigh as much
# as the 67 blowholes; the other windows lie on the tile, not its letterbox padding,
# so they show the defect-free surface the line must leave alone. Windows cut at 1/2
# to 2x and a second pass at half size (masks merged by maximum) give it more of the
# tile around large frayed and uneven areas; it is fully convolutional and runs whole.
RECIPE = dict(size=(256, 256), alpha=0.35, epochs=180, batch=16, lr=2e-3, dice_weight=1.0, loss="bce",
              crop=128, crop_defect=0.3, steps=100, jitter=0.1, seed=SEED, val_fraction=0.2, threshold=0.5,
              zoom=2.0, multiscale=(2,), crop_balance="folder", crop_content=True)


# The second member: the same recipe with the tile stretched over the whole input
# (1.4x the input pixels of the letterbox on average, no padded edge, aspect ratio
# distorted up to 2.6 : 1 alike in training and on the line); with no padding there
# is nothing for the windows to keep off. Alone its threshold, chosen with `tune`
# on the training split, was 0.7, 0.85 and 0.95 in three runs; it errs on other
# tiles than the letterbox model (docs/magnetic_tile_unet.md). Not shipped.
STRETCH_PREPROCESS = replace(PREPROCESS, resize_mode="stretch")
STRETCH_RECIPE = dict(RECIPE, crop_content=False)
STRETCH_THRESHOLD = 0.85


class Member(NamedTuple):
    preprocess: PreprocessOptions
    recipe: dict
    model: Path  # where `train` puts its model (the letterbox's is the shipped one)
    split: Path  # its split file
    curves: str  # its training curves, in docs/
    threshold: float  # its mask threshold alone (`eval --model` writes it into the card)
    run: Path  # default run directory


MEMBERS = {
    "letterbox": Member(PREPROCESS, RECIPE, MODEL_PATH, SPLIT_PATH, "magnetic_tile_training.png", SERVE_THRESHOLD,
                        DEFAULT_RUN),
    "stretch": Member(STRETCH_PREPROCESS, STRETCH_RECIPE, STRETCH_MODEL_PATH,
                      Path("models/magnetic_tile_unet_stretch.split.json"), "magnetic_tile_stretch_training.png",
                      STRETCH_THRESHOLD, Path("runs/magnetic_tile_stretch")),
}


def recipe(data: Path, run: Path, epochs: int | None = None, stop_after: int | None = None,
           member: str = "letterbox") -> TrainConfig:
    """The TrainConfig of a member (``epochs`` overrides the recipe's, for trials;
    ``stop_after`` ends the run early with the recipe's learning-rate schedule)."""
    groups = data / "tile_groups.json"
    options, settings = MEMBERS[member].preprocess, MEMBERS[member].recipe
    cfg = TrainConfig(
        data_dir=data, out_dir=run, preprocess=tuple(preprocess_ops(options)), groups=groups,
        name="magnetic-tile-unet", version="1",
        description="magnetic-tile surface defects (blowhole, break, crack, fray, uneven) as one 'defect' mask"
        + ("" if member == "letterbox" else "; the tile stretched over the whole input (the letterboxed model's "
           "partner in a mean of the two)"),
        data_description=CITATION + f"; {data}: 1,076 images (757 defect-free), masks beside the images",
        **settings,
    )
    if epochs is not None:
        cfg = replace(cfg, epochs=epochs)
    if stop_after is not None:
        cfg = replace(cfg, stop_after=stop_after)
    argv = ["train"] + (["--member", member] if member != "letterbox" else []) + ["--data", str(data), "--run", str(run)] \
        + (["--epochs", str(epochs)] if epochs else []) + (["--stop-after", str(stop_after)] if stop_after else [])
    return replace(cfg, command="python -m export.magnetic_tile " + shlex.join(argv)
                   + "   # = " + _train_equivalent(cfg))


def _train_equivalent(cfg: TrainConfig) -> str:
    from .train import command_of

    return command_of(replace(cfg, command=""))


def cmd_train(args: argparse.Namespace) -> int:
    member = MEMBERS[args.member]
    cfg = recipe(args.data, args.run or member.run, args.epochs, args.stop_after, args.member)
    model_path, split_path, curves = member.model, member.split, member.curves
    result = train(cfg)
    if args.epochs is not None or args.stop_after is not None:  # a trial: the shipped files stay
        log.info("trial run (--epochs/--stop-after): %s left as it is; this run's model is %s (val IoU %.4f); "
                 "export-checkpoint ships a stopped run", model_path, result.onnx_path,
                 result.card.training.figures["val_iou"])
        return 0
    model_path.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(result.onnx_path, model_path)
    shutil.copyfile(cfg.out_dir / "split.json", split_path)
    DOCS.mkdir(exist_ok=True)
    shutil.copyfile(cfg.out_dir / "curves.png", DOCS / curves)
    log.info("%s: val IoU %.4f (Keras, input resolution); now choose its threshold with "
             "'python -m export.magnetic_tile tune --model %s' and run: python -m export.magnetic_tile eval",
             model_path, result.card.training.figures["val_iou"], model_path)
    return 0


def cmd_export_checkpoint(args: argparse.Namespace) -> int:
    """Export the kept weights (``RUN_DIR/best.weights.h5``) of an interrupted ``train``, or
    re-export a finished one (same recipe, same split, the recipe's post-training steps).

    The card records how many of the planned epochs ran (from ``history.csv``);
    the learning-rate schedule of such a run had not decayed to its end.
    """
    import csv
    import time

    from station.modelcard import TrainingInfo

    from .card import draft_card
    from .data import find_samples, load_arrays, load_groups, split_samples
    from .onnx_export import export_model
    from .train import finish_kept, kept_weights, load_served, make_iou_metric, make_loss

    member = MEMBERS[args.member]
    cfg = recipe(args.data, args.run or member.run, args.epochs, member=args.member)
    model_path, split_path, curves = member.model, member.split, member.curves
    weights = cfg.out_dir / f"{cfg.keep}.weights.h5"
    if not weights.is_file():
        raise ExportError(f"{weights}: no checkpoint")
    with (cfg.out_dir / "history.csv").open() as f:
        rows = [{k: float(v) for k, v in r.items()} for r in csv.DictReader(f)]
    if not rows:
        raise ExportError(f"{cfg.out_dir / 'history.csv'}: no epoch finished")
    best = max(rows, key=lambda r: r["val_iou"]) if cfg.keep == "best" else rows[-1]
    if len(rows) < cfg.epochs:  # the command that reproduces these weights stops where this run stopped
        cfg = recipe(args.data, cfg.out_dir, args.epochs, stop_after=len(rows), member=args.member)
    draft = draft_card(name=cfg.name, version=cfg.version, size=cfg.size, preprocess=cfg.preprocess,
                       training=TrainingInfo(data="(pending)"), threshold=cfg.threshold,
                       description=cfg.description, opset=cfg.opset)
    listing = find_samples(cfg.data_dir)
    assert cfg.groups is not None  # the recipe names tile_groups.json
    split = split_samples(listing.samples, cfg.val_fraction, cfg.seed, load_groups(cfg.groups))
    train_arrays = load_arrays(split.train, draft)
    val_arrays = load_arrays(split.val, draft)
    model = load_served(cfg, draft.input.channels, 1, weights)
    model.compile(loss=make_loss(cfg.dice_weight, kind=cfg.loss, gamma=cfg.focal_gamma,
                                 tversky_beta=cfg.tversky_beta),
                  metrics=[make_iou_metric(cfg.threshold)])
    stopped = len(rows) < cfg.epochs
    figures = {**finish_kept(model, cfg, train_arrays, val_arrays, rows, best,
                             f" ({len(rows)} of {cfg.epochs} epochs)" if stopped else ""),
               "epochs_run": float(len(rows))}
    seconds = sum(r["seconds"] for r in rows)
    training = TrainingInfo(
        data=cfg.data_description, split=split.description, command=cfg.command, epochs=len(rows), seed=cfg.seed,
        seconds=round(seconds, 1), figures=figures,
        evaluated_by=(f"python -m export.magnetic_tile export-checkpoint ({kept_weights(cfg)}: epoch "
                      f"{best['epoch']:.0f}, thresholded at {cfg.threshold:g}; IoU accumulated over all pixels of "
                      f"each set, at the model's input resolution)"
                      + (f"; training stopped by hand after {len(rows)} of the recipe's {cfg.epochs} epochs "
                         f"(time budget): the cosine learning-rate decay had not finished" if stopped else "")),
    )
    card = draft.model_copy(update={"training": training})
    t0 = time.perf_counter()
    card = export_model(model, card, cfg.out_dir / "model.onnx", val_arrays.x[: max(1, cfg.parity_count)],
                        opset=cfg.opset)
    (cfg.out_dir / "card.json").write_text(card.model_dump_json(indent=2) + "\n")
    model_path.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(cfg.out_dir / "model.onnx", model_path)
    write_split_file(split_path, split.description, [x.key for x in split.train], [x.key for x in split.val])
    DOCS.mkdir(exist_ok=True)
    shutil.copyfile(cfg.out_dir / "curves.png", DOCS / curves)
    log.info("%s from %s (epoch %d of %d run): val IoU %.4f; export %.0f s", model_path, weights,
             best["epoch"], len(rows), figures["val_iou"], time.perf_counter() - t0)
    return 0


def _mask_threshold_of(config: Path) -> float | None:
    from station.config import load_config

    return load_config(config).postprocess.mask_threshold


def _config_with(base: Path, out: Path, models: Sequence[Path] | None = None, threshold: float | None = None,
                 min_area: int | None = None, clear_threshold: bool = False) -> Path:
    """``base`` (a station config) written to ``out`` with its models (absolute paths),
    ``postprocess.mask_threshold`` or ``min_area_px`` replaced where given (the threshold
    removed with ``clear_threshold``: the card's applies)."""
    import yaml

    from station.config import load_config

    text = yaml.safe_load(base.read_text())
    loaded = load_config(base).models
    seg = [str(Path(m).resolve()) for m in models] if models else [str(m) for m in loaded.segmentation_files]
    post = dict(text.get("postprocess") or {})
    if clear_threshold:
        post.pop("mask_threshold", None)
    if threshold is not None:
        post["mask_threshold"] = threshold
    if min_area is not None:
        post["min_area_px"] = min_area
    text.update(models={"segmentation": seg if len(seg) > 1 else seg[0], "detection": None}, postprocess=post)
    out.write_text(yaml.safe_dump(text))
    return out


def cmd_eval(args: argparse.Namespace) -> int:
    import tempfile

    images = read_split_file(args.split, args.data)
    json_out, png_out = args.json, args.report
    models = args.model or []
    one = args.model[0] if len(models) == 1 else None  # one model alone: its figures go into its card
    if one is not None and args.threshold is None:  # a shipped member: its own threshold
        args.threshold = next((m.threshold for m in MEMBERS.values() if m.model.resolve() == one.resolve()), None)
    with tempfile.TemporaryDirectory(prefix="mt-eval-") as tmp:
        config, evaluated = args.config, list(models)
        if one is not None and args.threshold is not None:
            card = read_card(one)
            assert isinstance(card.output, MaskOutput)  # a segmentation model
            if card.output.threshold != args.threshold:
                # --no-card leaves the file as it is and evaluates a copy at the asked threshold
                evaluated = [one if not args.no_card else Path(tmp) / one.name]
                log.info("%s: mask threshold %g → %g (card output.threshold%s)", one, card.output.threshold,
                         args.threshold, ", of a copy: --no-card" if args.no_card else "")
                embed_card_file(one, card.model_copy(update={"output": card.output.model_copy(
                    update={"threshold": args.threshold})}), None if evaluated[0] == one else evaluated[0])
        if one is not None and _mask_threshold_of(args.config) is not None:
            # one model alone is thresholded at its card's threshold, not at the one set for the config's models
            config = _config_with(args.config, Path(tmp) / "station.yaml", evaluated, clear_threshold=True)
            evaluated = []
        elif one is None and args.threshold is not None:
            config = _config_with(args.config, Path(tmp) / "station.yaml", models, threshold=args.threshold)
            evaluated = []
        log.info("station eval on the %d validation images of %s", len(images), args.split)
        seg_flags = [a for m in evaluated for a in ("--seg-model", m)]
        report = run_station_eval(["-c", config, *seg_flags, *images], json_out, png_out)
    seg = report["segmentation"]
    if one is None:
        log.info("%s: IoU %.4f, grade agreement %.2f %% (mean of %s at mask threshold %g); model cards left as "
                 "they are", json_out, seg["all_defects"]["iou"], report["grades"]["agreement_pct"],
                 ", ".join(m["path"] for m in report["models"].values()), report["rules"]["mask_threshold"])
        return 0
    figures = {f"eval_{k}": round(float(v), 4) for k, v in report["card_figures"].items()}
    for cls, s in sorted(seg["per_class"].items()):
        if s["iou"] is not None:
            figures[f"eval_iou_{cls}"] = round(float(s["iou"]), 4)
    cm = report["grades"]["matrix"]
    for i, t in enumerate(report["grades"]["labels"]):
        for j, p in enumerate(report["grades"]["labels"]):
            figures[f"grades_true_{t}_pred_{p}"] = float(cm[i][j])
    figures["eval_images"] = float(report["counts"]["evaluated"])
    if args.no_card:
        return 0
    card = read_card(one)
    assert isinstance(card.output, MaskOutput)  # a segmentation model
    training = card.training
    argv = ["eval", "--data", str(args.data), "--split", str(args.split), "--model", str(one),
            "--config", str(args.config), "--json", str(json_out), "--report", str(png_out),
            "--threshold", f"{card.output.threshold:g}"]
    kept = {k: v for k, v in training.figures.items() if not (k.startswith("eval_") or k.startswith("grades_"))}
    base = training.evaluated_by.split(" [figures without a prefix]")[0]
    evaluated_by = (
        f"{base} [figures without a prefix]; "
        f"python -m export.magnetic_tile {shlex.join(argv)} [eval_* and grades_* figures: station eval with the "
        f"ONNX model alone (mask threshold {card.output.threshold:g}, chosen on the training split by "
        f"'python -m export.magnetic_tile tune') and {args.config} (min_area_px "
        f"{report['rules']['min_area_px']}, total area PASS <= 0.5 % < "
        f"DISCOUNT <= 2 % < REJECT) on the {len(images)} validation images, pixels counted at source resolution; "
        f"report {json_out}]"
    )
    card = card.model_copy(update={"training": training.model_copy(
        update={"figures": {**kept, **figures}, "evaluated_by": evaluated_by})})
    embed_card_file(one, card)
    log.info("figures written into the card of %s: %s", one, json.dumps(figures))
    return 0


def cmd_tune(args: argparse.Namespace) -> int:
    """Mask threshold × min_area_px chosen on the *training* split (never on validation):
    ``station eval`` on the run's training images for each pair, with the given models
    (several: their mean) or the config's; prints IoU and grade agreement, and the pair
    with the best IoU (to 3 decimals), then agreement."""
    import tempfile

    images = read_split_file(args.split, args.data, "train")
    results = []
    with tempfile.TemporaryDirectory(prefix="mt-tune-") as tmp:
        tmp_dir = Path(tmp)
        for threshold in args.thresholds:
            for min_area in args.min_areas:
                cfg_path = _config_with(args.config, tmp_dir / "station.yaml", args.model, threshold, min_area)
                out = tmp_dir / "eval.json"
                rc = subprocess.call([sys.executable, "-m", "station", "eval", "-c", str(cfg_path), "--json", str(out),
                                      "-q", *map(str, images)], stdout=subprocess.DEVNULL)
                if rc != 0:
                    log.error("station eval exited with %d", rc)
                    return rc
                report = json.loads(out.read_text())
                row = (report["grades"]["agreement_pct"], report["segmentation"]["all_defects"]["iou"], threshold,
                       min_area)
                results.append(row)
                log.info("train split: threshold %.2f min_area_px %3d: grade agreement %.2f %%, IoU %.4f",
                         threshold, min_area, row[0], row[1])
    # IoU first (to 3 decimals), then agreement: agreement alone rewards predicting nothing
    # (about 89 % of the images are PASS by their truth).
    best = max(results, key=lambda r: (round(r[1], 3), r[0]))
    log.info("best on the training split: threshold %.2f, min_area_px %d (agreement %.2f %%, IoU %.4f)",
             best[2], best[3], best[0], best[1])
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m export.magnetic_tile", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train", help="train with the fixed recipe, export, copy to models/ and docs/")
    e = sub.add_parser("eval", help="station eval on the validation side of the split file; figures into the card")
    x = sub.add_parser("export-checkpoint", help="export the checkpoint of an interrupted train run")
    x.add_argument("--epochs", type=int, help="the --epochs the run was started with (default: the recipe's)")
    u = sub.add_parser("tune", help="threshold x min_area_px on the training split (station eval)")
    u.add_argument("--model", type=Path, action="append", help="a model to tune (repeat it: their mean; "
                   "default: the config's models)")
    u.add_argument("--config", type=Path, default=CONFIG_PATH)
    u.add_argument("--thresholds", type=float, nargs="+", default=[0.3, 0.4, 0.5, 0.6])
    u.add_argument("--min-areas", type=int, nargs="+", default=[12, 32, 64])
    for s in (t, e, x, u):
        s.add_argument("--data", type=Path, default=DEFAULT_DATA, help="magnetic_tile folder (with tile_groups.json)")
    for s in (t, x):
        s.add_argument("--run", type=Path, help=f"run directory (default: {DEFAULT_RUN}, with --member stretch "
                       f"{MEMBERS['stretch'].run})")
        s.add_argument("--member", choices=sorted(MEMBERS), default="letterbox",
                       help="which of the two models: the letterboxed or the stretched input (default letterbox)")
    for s in (e, u):
        s.add_argument("--split", type=Path, default=SPLIT_PATH, help="split file (image paths of each side)")
    t.add_argument("--epochs", type=int, help="override the recipe's epochs (a trial: the shipped model, split and "
                   "curves are left as they are)")
    t.add_argument("--stop-after", type=int, metavar="N", help="stop after N epochs (learning-rate schedule of "
                   "the recipe's epochs; a trial, like --epochs)")
    e.add_argument("--model", type=Path, action="append", help="evaluate this model alone, its figures into its "
                   "card (repeat it: their mean, no card written; default: the config's models, their mean)")
    e.add_argument("--config", type=Path, default=CONFIG_PATH)
    e.add_argument("--json", type=Path, default=DOCS / "magnetic_tile_eval.json", help="station eval JSON report")
    e.add_argument("--report", type=Path, default=DOCS / "magnetic_tile_eval.png", help="station eval PNG report")
    e.add_argument("--threshold", type=float, help="the mask threshold: with one --model set in its card first "
                   "(default for a shipped model: its own, " + ", ".join(f"{m.model.name} {m.threshold:g}"
                   for m in MEMBERS.values()) + "); otherwise the config's postprocess.mask_threshold is "
                   "replaced (default: as configured)")
    e.add_argument("--no-card", action="store_true", help="leave the model file as it is (with --threshold: a copy "
                   "at that threshold is evaluated)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    return run_commands(build_parser(), {"train": cmd_train, "eval": cmd_eval,
                                         "export-checkpoint": cmd_export_checkpoint, "tune": cmd_tune}, argv)


if __name__ == "__main__":
    from .alloc import reexec_under_jemalloc

    reexec_under_jemalloc()
    sys.exit(main())

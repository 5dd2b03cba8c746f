"""Cross-validated figures and the line's thresholds, from out-of-fold predictions.

::

    python -m export.crossval RUN_DIR --data DATA [--config station.yaml] [--max-escape-rate 0.05]
        [--thresholds T…] [--min-areas A…] [--json report.json]

RUN_DIR holds one directory per fold (``fold0``, ``fold1``, …), each the
output of ``python -m export.train … --folds K --fold I``: its ``model.onnx``
and its ``split.json`` (the images it held out). Every image is predicted
once, by the model of the fold that held it out (out-of-fold), through the
line's own code: ``station.inspector.Inspector`` preprocesses, runs ONNX
Runtime and maps the probabilities back to the frame; the truth grade and
the predicted grade are :func:`station.evaluate.true_grade` and
:func:`station.grade.grade` with the config's rules, as ``station eval``
computes them.

**Tuning.** For each mask threshold × ``min_area_px`` pair the pooled
out-of-fold predictions give the escape rate (parts graded milder than their
truth / parts whose truth is not PASS) and the false-reject rate (parts truly
PASS graded worse / parts truly PASS). The pair chosen has the fewest false
rejects among those whose escape rate is within ``--max-escape-rate``; ties
go to the lower escape rate, then the higher defect IoU. When no pair meets
the budget the one with the fewest escapes is chosen and the report says so.
No figure of a fold's own training images enters the choice.

**Figures.** For the chosen pair: pooled figures (IoU, agreement, escape and
false-reject rates, grade confusion matrix, per class) and each figure's mean
± standard deviation over the folds. The pooled figures of a pair chosen on
the same predictions are optimistic by the choice of two numbers; the
recipe itself was not chosen on them.
"""

from __future__ import annotations

import argparse
import json
import logging
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from station.config import StationConfig, load_config
from station.errors import StationError
from station.evaluate import (
    confusion_matrix,
    grade_agreement,
    grades_per_class,
    read_truth_mask,
    true_grade,
)
from station.grade import grade
from station.imageio import read_image
from station.inspector import Inspector, open_models
from station.postprocess import mask_defects
from station.preprocess import Geometry
from station.types import Frame

from . import ExportError
from .data import read_split_file

log = logging.getLogger(__name__)

DEFAULT_THRESHOLDS = (0.1, 0.15, 0.2, 0.25, 0.3, 0.35, 0.4, 0.45, 0.5, 0.6, 0.7)
DEFAULT_MIN_AREAS = (0, 32, 64, 100, 150, 250, 400)
MAX_ESCAPE_RATE = 0.05


@dataclass(frozen=True)
class OutOfFold:
    """One image's prediction by the model that never trained on it.

    prob: (h, w, C) float16, the model's probabilities at its input resolution;
    geometry maps them to the (height, width) frame. truth: (height, width) bool.
    """

    key: str
    cls: str
    fold: int
    prob: np.ndarray
    geometry: Geometry
    truth: np.ndarray


def fold_dirs(run: Path) -> list[Path]:
    """``fold0``, ``fold1``, … of a run directory, each with a model and its split; at least two."""
    dirs = sorted((p for p in run.glob("fold*") if p.is_dir() and p.name[4:].isdigit()), key=lambda p: int(p.name[4:]))
    if len(dirs) < 2:
        raise ExportError(f"{run}: needs at least two fold directories (fold0, fold1, …), found {len(dirs)}")
    for d in dirs:
        for name in ("model.onnx", "split.json"):
            if not (d / name).is_file():
                raise ExportError(f"{d / name}: missing (is fold {d.name[4:]} still training?)")
    return dirs


def predict_images(model: Path, paths: Sequence[Path], data: Path, cfg: StationConfig, fold: int = 0,
                   progress: bool = True) -> list[OutOfFold]:
    """``paths`` (images under ``data``, each with its ``<name>.png`` mask beside it, or
    none: defect-free) predicted by ``model`` through the line's Inspector."""
    from tqdm import tqdm

    inspector = Inspector(open_models(cfg, seg=[model]), cfg)
    images = []
    for path in tqdm(paths, desc=f"fold {fold}", unit="image", disable=not progress, file=sys.stderr):
        frame = Frame(read_image(path), str(path))
        prob, geometry = inspector.segmentation_probabilities(inspector.infer(inspector.prepare(frame)))
        mask_path = path.with_suffix(".png")
        truth = (read_truth_mask(mask_path, frame.height, frame.width) if mask_path.is_file()
                 else np.zeros((frame.height, frame.width), bool))
        images.append(OutOfFold(path.relative_to(data).as_posix(), path.parent.name, fold, prob.astype(np.float16),
                                geometry, truth))
    return images


def predict_out_of_fold(run: Path, data: Path, cfg: StationConfig, progress: bool = True) -> list[OutOfFold]:
    """Every held-out image of every fold, predicted by its fold's model (see the module docstring)."""
    images: list[OutOfFold] = []
    seen: dict[str, int] = {}
    for d in fold_dirs(run):
        fold = int(d.name[4:])
        paths = read_split_file(d / "split.json", data, "val")
        for path in paths:
            key = path.relative_to(data).as_posix()
            if key in seen:
                raise ExportError(f"{key}: held out by fold {seen[key]} and fold {fold}: not a k-fold run")
            seen[key] = fold
        images += predict_images(d / "model.onnx", paths, data, cfg, fold, progress)
    return images


def true_grades(images: Sequence[OutOfFold], cfg: StationConfig, min_area_px: int) -> np.ndarray:
    """(N,) severity of each image's true grade (truth regions under ``min_area_px``
    dropped, as ``station eval`` does)."""
    return np.asarray([true_grade(im.truth.shape[0], im.truth.shape[1], cfg.grading, min_area_px, im.truth,
                                  im.cls)[0].severity for im in images], np.int64)


def score(images: Sequence[OutOfFold], cfg: StationConfig, threshold: float, min_area_px: int,
          true: np.ndarray | None = None, classes: Sequence[str] = ("defect",)) -> dict[str, np.ndarray]:
    """Per image at one threshold × min_area_px: true and predicted grade index, and
    the pixel counts (tp, fp, fn) of the defect mask against the truth. ``true``: the
    images' :func:`true_grades` at ``min_area_px`` when already known."""
    n = len(images)
    true = true_grades(images, cfg, min_area_px) if true is None else true
    pred = np.zeros(n, np.int64)
    tp, fp, fn = np.zeros(n, np.int64), np.zeros(n, np.int64), np.zeros(n, np.int64)
    found, defective = np.zeros(n, bool), np.zeros(n, bool)
    for i, im in enumerate(images):
        h, w = im.truth.shape
        defects, mask = mask_defects(im.prob.astype(np.float32), im.geometry, threshold, list(classes), min_area_px,
                                     cfg.postprocess.min_score)
        area_pct = 100.0 * np.count_nonzero(mask) / (h * w)
        pred[i] = grade(defects, area_pct, h * w, cfg.grading).grade.severity
        tp[i] = np.count_nonzero(mask & im.truth)
        fp[i] = np.count_nonzero(mask & ~im.truth)
        fn[i] = np.count_nonzero(~mask & im.truth)
        found[i], defective[i] = bool(len(defects)), bool(im.truth.any())
    return {"true": true, "pred": pred, "tp": tp, "fp": fp, "fn": fn, "found": found, "defective": defective}


def figures(scored: dict[str, np.ndarray], classes: Sequence[str] | None = None) -> dict[str, Any]:
    """Defect IoU (pixels summed over the images), the grade figures of
    :func:`station.evaluate.grade_agreement` (per class too when ``classes`` are given), and
    the image-level ones: ``image_recall`` (images with any truth defect pixel in which a
    region was found / such images), ``image_specificity`` (images without one in which
    none was found / such images)."""
    tp, fp, fn = (int(scored[k].sum()) for k in ("tp", "fp", "fn"))
    grades = grade_agreement(confusion_matrix(scored["true"], scored["pred"]))
    found, defective = scored["found"], scored["defective"]
    out = {"iou": tp / (tp + fp + fn) if tp + fp + fn else None, **grades,
           "image_recall": float(found[defective].mean()) if defective.any() else None,
           "image_specificity": float((~found[~defective]).mean()) if (~defective).any() else None}
    if classes is not None:
        out["per_class"] = grades_per_class(classes, scored["true"], scored["pred"])
    return out


def choose(table: Sequence[dict[str, Any]], max_escape_rate: float) -> tuple[dict[str, Any], bool]:
    """The row with the fewest false rejects among those within the escape budget (ties:
    lower escape rate, then higher IoU); with none within it, the fewest escapes.
    Returns (row, budget met)."""
    def rate(row: dict[str, Any], key: str) -> float:
        return row[key] if row[key] is not None else 0.0

    within = [r for r in table if rate(r, "escape_rate") <= max_escape_rate + 1e-12]
    if within:
        return min(within, key=lambda r: (rate(r, "false_reject_rate"), rate(r, "escape_rate"),
                                          -(r["iou"] or 0.0))), True
    return min(table, key=lambda r: (rate(r, "escape_rate"), rate(r, "false_reject_rate"), -(r["iou"] or 0.0))), False


def mean_sd(values: Sequence[float | None]) -> dict[str, float | None]:
    v = np.asarray([x for x in values if x is not None], np.float64)
    if not v.size:
        return {"mean": None, "sd": None}
    return {"mean": float(v.mean()), "sd": float(v.std(ddof=1)) if v.size > 1 else 0.0}


FOLD_FIGURES = ("iou", "agreement_pct", "escape_rate", "false_reject_rate")


def tune(images: Sequence[OutOfFold], cfg: StationConfig, thresholds: Sequence[float], min_areas: Sequence[int],
         max_escape_rate: float = MAX_ESCAPE_RATE) -> dict[str, Any]:
    """The report of the module docstring: every pair's pooled figures, the chosen pair,
    its pooled figures per class and its figures per fold (with mean ± sd)."""
    if not images:
        raise ExportError("no out-of-fold image to tune on")
    if not 0 <= max_escape_rate <= 1:
        raise ExportError(f"--max-escape-rate {max_escape_rate}: must be in [0, 1]")
    table, scores = [], {}
    truths = {a: true_grades(images, cfg, a) for a in min_areas}
    for t in thresholds:
        for a in min_areas:
            s = score(images, cfg, t, a, truths[a])
            scores[(t, a)] = s
            f = figures(s)
            table.append({"threshold": t, "min_area_px": a, **{k: f[k] for k in (*FOLD_FIGURES, "escapes",
                                                                                   "false_rejects", "image_recall",
                                                                                   "image_specificity")}})
            log.info("threshold %.2f min_area_px %3d: escapes %3d (%.1f %%), false rejects %3d (%.1f %%), "
                     "agreement %.1f %%, IoU %.3f", t, a, f["escapes"], 100 * (f["escape_rate"] or 0),
                     f["false_rejects"], 100 * (f["false_reject_rate"] or 0), f["agreement_pct"] or 0, f["iou"] or 0)
    chosen, met = choose(table, max_escape_rate)
    s = scores[(chosen["threshold"], chosen["min_area_px"])]
    folds = np.asarray([im.fold for im in images])
    per_fold = []
    for k in sorted(set(folds.tolist())):
        sel = folds == k
        f = figures({key: v[sel] for key, v in s.items()})
        per_fold.append({"fold": k, "images": int(sel.sum()), **{key: f[key] for key in FOLD_FIGURES},
                         "escapes": f["escapes"], "false_rejects": f["false_rejects"]})
    pooled = figures(s, [im.cls for im in images])
    misgraded = [{"image": im.key, "true_grade": _grade_name(s["true"][i]), "grade": _grade_name(s["pred"][i])}
                 for i, im in enumerate(images) if s["true"][i] != s["pred"][i]]
    return {
        "max_escape_rate": max_escape_rate,
        "budget_met": met,
        "chosen": {"threshold": chosen["threshold"], "min_area_px": chosen["min_area_px"]},
        "pooled": pooled,
        "per_fold": per_fold,
        "fold_mean_sd": {key: mean_sd([f[key] for f in per_fold]) for key in FOLD_FIGURES},
        "grid": table,
        "misgraded": misgraded,
    }


def _grade_name(severity: int) -> str:
    return ("PASS", "DISCOUNT", "REJECT")[int(severity)]


def summary_lines(report: dict[str, Any]) -> list[str]:
    """The report's headline for a terminal."""
    c, p, m = report["chosen"], report["pooled"], report["fold_mean_sd"]

    def pm(key: str, scale: float = 1.0, unit: str = "") -> str:
        v = m[key]
        return "—" if v["mean"] is None else f"{scale * v['mean']:.3g}{unit} ± {scale * v['sd']:.2g}{unit}"

    lines = [
        f"chosen: mask threshold {c['threshold']:g}, min_area_px {c['min_area_px']} "
        f"(escape budget {100 * report['max_escape_rate']:g} %: {'met' if report['budget_met'] else 'NOT met'})",
        f"out-of-fold, {p['images']} images: escapes {p['escapes']}/{p['truly_defective']} "
        f"({100 * (p['escape_rate'] or 0):.1f} %), false rejects {p['false_rejects']}/{p['truly_pass']} "
        f"({100 * (p['false_reject_rate'] or 0):.1f} %), agreement {p['agreement_pct']:.1f} %, IoU {p['iou']:.3f}",
        f"per fold (mean ± sd over {len(report['per_fold'])}): IoU {pm('iou')}, agreement {pm('agreement_pct', 1, ' %')}, "
        f"escape rate {pm('escape_rate', 100, ' %')}, false-reject rate {pm('false_reject_rate', 100, ' %')}",
    ]
    return lines


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m export.crossval", description=__doc__.split("\n\n")[0])
    p.add_argument("run", type=Path, help="directory of fold0, fold1, … (export.train --folds K --fold I runs)")
    p.add_argument("--data", type=Path, required=True, help="the data root the folds' split files are relative to")
    p.add_argument("--config", type=Path, help="station config whose grading and postprocess rules apply "
                                               "(default: the bundled one)")
    p.add_argument("--max-escape-rate", type=float, default=MAX_ESCAPE_RATE,
                   help="escape budget: the largest share of not-PASS parts that may be graded milder")
    p.add_argument("--thresholds", type=float, nargs="+", default=list(DEFAULT_THRESHOLDS))
    p.add_argument("--min-areas", type=int, nargs="+", default=list(DEFAULT_MIN_AREAS))
    p.add_argument("--json", type=Path, help="write the whole report here")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stdout)
    try:
        cfg = load_config(args.config)
        t0 = time.perf_counter()
        images = predict_out_of_fold(args.run, args.data, cfg)
        report = tune(images, cfg, args.thresholds, args.min_areas, args.max_escape_rate)
    except (ExportError, StationError) as exc:
        log.error("%s", exc)
        return 2
    report["command"] = "python -m export.crossval " + shlex.join(argv)
    report["seconds"] = round(time.perf_counter() - t0, 1)
    for line in summary_lines(report):
        print(line)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""``station eval``: the deployed models, through the same :class:`Inspector` as
``station replay``, scored against ground truth.

Three layers, kept apart so the figures can be tested with tables:

* **truth** (file I/O): which inputs are images, where their truth lies, and
  reading it (:func:`discover`, :func:`parse_voc`);
* **metrics** (pure, vectorised numpy; pycocotools for AP): pixel counts →
  IoU / Dice / precision / recall, the per-image IoU distribution, the grade
  confusion matrix, COCO AP;
* **the run and the report**: inspect every image with truth, accumulate
  per-image counts, then the JSON report, the PNG report and the stdout table.

Ground truth
------------
Two layouts are recognised, per image ``<dir>/<stem>.<ext>``:

* **mask**: ``<dir>/<stem>.png`` beside a non-PNG image (the magnetic-tile
  layout): defect where the mask is > 127. *Folder-as-class rule*: every defect
  pixel of that mask belongs to the class named by the image's folder
  (``<dir>``'s name, e.g. ``Crack``). The folder named by ``--free-class``
  (default ``Free``) holds defect-free parts: an image there without a mask is
  defect-free by declaration (an empty truth mask); ``--free-class ''`` turns
  the declaration off. A ``.png`` that has a same-stem non-PNG image in its
  folder is a truth mask and is never inspected, even when named on the
  command line.
* **boxes**: ``<dir>/../annotations/<stem>.xml``, Pascal VOC (the NEU-DET
  layout): one box per ``<object>``, ``<name>`` the class, ``<bndbox>``
  ``xmin ymin xmax ymax`` in pixels, taken as written as station boxes
  ``[x1, y1, x2, y2]`` (no 1-based shift). ``<difficult>1</difficult>``
  objects are ignored by AP (as in the VOC protocol) but still count for the
  true grade. Class names must be the detection model card's classes.

An image may have both. An image with neither is reported and skipped
(counted under ``no_truth``), never taken as defect-free.

Definitions
-----------
* Pixel metrics use the truth mask as it is and the Inspector's union mask at
  source resolution (``InspectionResult.mask``; regions under ``min_area_px``
  already dropped). "All defects" IoU is Σ intersection / Σ union over every
  pixel of the set (defect-free images included, so their false alarms count);
  per class, the same sums over the images of that class. Precision, recall
  and Dice are pixel figures over the same sums. A ratio with a zero
  denominator is ``null``.
* Per-image IoU is defined where truth or prediction has a defect pixel. An
  image where both are empty is a correct negative: it is counted under
  ``both_empty`` and left out of the distribution (it has no IoU; counting it
  as 1 would let defect-free images inflate the mean).
* True grade: :func:`station.grade.grade` with the config's rules on the
  truth as Defects — the truth mask's 8-connected regions, each of the
  folder's class, regions under ``postprocess.min_area_px`` dropped exactly as
  the Inspector drops predicted ones, area % = the kept mask's pixels; plus
  the truth boxes as detection Defects, area % = their union (used when the
  image has no mask truth, as the Inspector does without a segmentation
  model). Per-class grading rules therefore see folder names for mask truth.
* Grade confusion matrix: rows true grade, columns predicted, order PASS,
  DISCOUNT, REJECT. ``escapes``: predicted milder than true (a defective part
  let through); ``over_graded``: predicted harsher. The two the line pays for:
  ``escape_rate`` = escapes / parts whose true grade is not PASS, and
  ``false_reject_rate`` = parts truly PASS graded worse / parts truly PASS.
  The same figures per class (the image's folder), under ``per_class``.
* Detection: COCO AP (pycocotools) over the images with box truth; AP50 at IoU
  0.5, mAP over 0.50:0.95, per class, and the precision/recall curve at IoU 0.5
  (101 recall points, area "all", 100 detections) per class.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import logging
import math
import os
import shlex
import sys
import time
import xml.etree.ElementTree as ET
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
from tqdm import tqdm

from . import __version__
from .camera.files import FileSource, expand_inputs, is_video
from .config import GradingConfig, StationConfig
from .errors import EXIT_INPUT_ERRORS, EXIT_OK, EXIT_USAGE, ConfigError, InputError
from .grade import grade
from .imageio import IMAGE_EXTENSIONS, read_mask
from .messages import iso_time
from .postprocess import box_union_area, mask_defects
from .preprocess import Geometry
from .types import Defects, Frame, FrameError, Grade, InspectionResult

log = logging.getLogger(__name__)

FREE_CLASS = "Free"
MASK_SUFFIX = ".png"
ANNOTATIONS_DIR = "annotations"
GRADES = (Grade.PASS, Grade.DISCOUNT, Grade.REJECT)  # index = severity
REPORT_SCHEMA = "station.eval/1"
IOU_BINS = np.linspace(0.0, 1.0, 11)  # per-image IoU histogram: 10 bins of 0.1


# =============================================================================
# Truth: discovery and reading (file I/O)
# =============================================================================


@dataclass(frozen=True)
class TruthFiles:
    """An image and where its truth is.

    mask: the ``.png`` mask beside it, or None.
    annotation: the VOC ``.xml`` in the sibling ``annotations/`` folder, or None.
    declared_free: no mask, but the image sits in the defect-free folder.
    cls: the class of its mask's defect pixels (the folder name); "" without mask truth.
    """

    image: Path
    mask: Path | None
    annotation: Path | None
    declared_free: bool
    cls: str

    @property
    def has_mask_truth(self) -> bool:
        return self.mask is not None or self.declared_free

    @property
    def kind(self) -> str:
        parts = []
        if self.mask is not None:
            parts.append("mask")
        elif self.declared_free:
            parts.append("free")
        if self.annotation is not None:
            parts.append("voc")
        return "+".join(parts)


@dataclass(frozen=True)
class Discovery:
    """What the command-line paths hold.

    items: images with truth, in input order.
    no_truth: images (and videos) with no truth: reported, not evaluated.
    missing: named paths that are not files (errors).
    masks: truth masks found among the inputs (not inspected).
    """

    items: tuple[TruthFiles, ...]
    no_truth: tuple[Path, ...]
    masks: int
    missing: tuple[Path, ...] = ()


class _FolderIndex:
    """stem → {lower-case suffix: file name} per folder, listed once."""

    def __init__(self) -> None:
        self._dirs: dict[Path, dict[str, dict[str, str]]] = {}

    def get(self, folder: Path) -> dict[str, dict[str, str]]:
        if folder not in self._dirs:
            index: dict[str, dict[str, str]] = defaultdict(dict)
            try:
                names = sorted(os.listdir(folder))
            except OSError:
                names = []
            for name in names:
                stem, suffix = os.path.splitext(name)
                index[stem].setdefault(suffix.lower(), name)
            self._dirs[folder] = index
        return self._dirs[folder]

    def is_truth_mask(self, path: Path) -> bool:
        """A ``.png`` with a same-stem non-PNG image in its folder."""
        if path.suffix.lower() != MASK_SUFFIX:
            return False
        siblings = self.get(path.parent).get(path.stem, {})
        return any(s in IMAGE_EXTENSIONS and s != MASK_SUFFIX for s in siblings)

    def mask_of(self, image: Path) -> Path | None:
        if image.suffix.lower() == MASK_SUFFIX:
            return None
        name = self.get(image.parent).get(image.stem, {}).get(MASK_SUFFIX)
        return image.parent / name if name else None


def annotation_of(image: Path) -> Path | None:
    """``<dir>/../annotations/<stem>.xml`` if it is a file."""
    xml = image.parent.parent / ANNOTATIONS_DIR / f"{image.stem}.xml"
    return xml if xml.is_file() else None


def discover(paths: Sequence[str | Path], free_class: str = FREE_CLASS) -> Discovery:
    """Command-line paths → images with truth, images without, truth masks skipped.

    Folders are expanded as by ``station replay`` (recursive, sorted); then the
    truth masks are taken out (see the module docstring for the rules).
    """
    index = _FolderIndex()
    items: list[TruthFiles] = []
    no_truth: list[Path] = []
    missing: list[Path] = []
    masks = 0
    for path in expand_inputs(paths):
        if not path.is_file():
            missing.append(path)
            continue
        if is_video(path):
            log.warning("%s: a video has no truth; skipped", path)
            no_truth.append(path)
            continue
        if index.is_truth_mask(path):
            masks += 1
            continue
        mask = index.mask_of(path)
        annotation = annotation_of(path)
        cls = path.parent.name
        declared_free = mask is None and bool(free_class) and cls == free_class
        if mask is None and annotation is None and not declared_free:
            no_truth.append(path)
            continue
        items.append(TruthFiles(path, mask, annotation, declared_free, cls if mask or declared_free else ""))
    return Discovery(tuple(items), tuple(no_truth), masks, tuple(missing))


def spread(items: Sequence[Any], limit: int | None) -> list[Any]:
    """At most ``limit`` items, evenly spaced over the sequence (first and last
    included) so that every folder of a sorted data set is represented."""
    if limit is None or limit >= len(items):
        return list(items)
    if limit <= 0:
        return []
    picks = np.unique(np.round(np.linspace(0, len(items) - 1, limit)).astype(np.int64))
    return [items[i] for i in picks]


@dataclass(frozen=True)
class BoxTruth:
    """The boxes of one VOC file.

    xyxy: (N, 4) float64 [x1, y1, x2, y2] pixels, as written in the file.
    class_name: (N,) str. difficult: (N,) bool.
    size: (width, height) from ``<size>``, or None when absent or zero.
    """

    path: Path
    xyxy: np.ndarray
    class_name: np.ndarray
    difficult: np.ndarray
    size: tuple[int, int] | None = None

    def __len__(self) -> int:
        return int(self.xyxy.shape[0])


def _text(node: ET.Element, tag: str, where: str) -> str:
    child = node.find(tag)
    if child is None or child.text is None or not child.text.strip():
        raise InputError(f"{where}: missing <{tag}>")
    return child.text.strip()


def _number(node: ET.Element, tag: str, where: str) -> float:
    text = _text(node, tag, where)
    try:
        value = float(text)
    except ValueError:
        raise InputError(f"{where}: <{tag}> is not a number: {text!r}") from None
    if not math.isfinite(value):
        raise InputError(f"{where}: <{tag}> is not finite: {text!r}")
    return value


def parse_voc(path: str | Path, text: str | bytes | None = None) -> BoxTruth:
    """Read a Pascal VOC annotation. InputError names the file (and the object)."""
    path = Path(path)
    if text is None:
        try:
            text = path.read_bytes()
        except OSError as exc:
            raise InputError(f"{path}: cannot read ({exc.strerror or exc})") from exc
    try:
        root = ET.fromstring(text)
    except ET.ParseError as exc:
        raise InputError(f"{path}: not valid XML ({exc})") from exc
    if root.tag != "annotation":
        raise InputError(f"{path}: not a Pascal VOC file (root element <{root.tag}>, expected <annotation>)")
    size = None
    size_node = root.find("size")
    if size_node is not None and size_node.find("width") is not None and size_node.find("height") is not None:
        w = _number(size_node, "width", f"{path}: <size>")
        h = _number(size_node, "height", f"{path}: <size>")
        size = (int(w), int(h)) if w > 0 and h > 0 else None
    boxes, names, difficult = [], [], []
    for i, obj in enumerate(root.findall("object")):
        name = obj.findtext("name", "").strip()
        where = f"{path}: object {i + 1}" + (f" ({name})" if name else "")
        if not name:
            raise InputError(f"{where}: missing <name>")
        bnd = obj.find("bndbox")
        if bnd is None:
            raise InputError(f"{where}: missing <bndbox>")
        box = [_number(bnd, tag, where) for tag in ("xmin", "ymin", "xmax", "ymax")]
        if box[2] <= box[0] or box[3] <= box[1]:
            raise InputError(f"{where}: empty box xmin={box[0]:g} ymin={box[1]:g} xmax={box[2]:g} ymax={box[3]:g}")
        boxes.append(box)
        names.append(name)
        flag = obj.findtext("difficult", "0").strip() or "0"
        difficult.append(flag not in ("0", "false", "False"))
    return BoxTruth(
        path=path,
        xyxy=np.asarray(boxes, np.float64).reshape(-1, 4),
        class_name=np.asarray(names, dtype=str) if names else np.zeros((0,), "<U1"),
        difficult=np.asarray(difficult, bool),
        size=size,
    )


def check_box_classes(truths: Iterable[BoxTruth], classes: Sequence[str], model: str) -> None:
    """Every truth class must be a class of the detection model's card."""
    known = set(classes)
    bad: dict[str, list[str]] = defaultdict(list)
    for t in truths:
        for name in sorted(set(t.class_name.tolist()) - known):
            bad[name].append(str(t.path))
    if bad:
        lines = [
            f"{files[0]}: class {name!r} is not a class of the detection model {model} "
            f"({len(files)} file(s) use it)"
            for name, files in sorted(bad.items())
        ]
        raise InputError("\n".join(lines) + f"\nthe model's classes are: {', '.join(classes)}")


def read_truth_mask(path: Path, height: int, width: int) -> np.ndarray:
    """A truth mask file → (H, W) bool, defect where > 127; it must match the image size."""
    mask = read_mask(path)
    if mask.shape != (height, width):
        raise InputError(f"{path}: mask is {mask.shape[1]}x{mask.shape[0]} but its image is {width}x{height}")
    return mask > 127


# =============================================================================
# Metrics: pure and vectorised
# =============================================================================


def pixel_counts(truth: np.ndarray, pred: np.ndarray) -> tuple[int, int, int]:
    """Two (H, W) bool masks → (true positive, false positive, false negative) pixels."""
    if truth.shape != pred.shape:
        raise ValueError(f"truth {truth.shape} and prediction {pred.shape} differ in shape")
    tp = int(np.count_nonzero(truth & pred))
    return tp, int(np.count_nonzero(pred)) - tp, int(np.count_nonzero(truth)) - tp


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """num / den elementwise, NaN where den == 0."""
    num = np.asarray(num, np.float64)
    den = np.asarray(den, np.float64)
    out = np.full(np.broadcast(num, den).shape, np.nan)
    np.divide(num, den, out=out, where=den != 0)
    return out


def overlap_scores(tp: Any, fp: Any, fn: Any) -> dict[str, np.ndarray]:
    """Pixel counts (scalars or arrays, elementwise) → iou, dice, precision,
    recall; NaN where a denominator is 0."""
    tp, fp, fn = (np.asarray(v, np.float64) for v in (tp, fp, fn))
    return {
        "iou": _ratio(tp, tp + fp + fn),
        "dice": _ratio(2 * tp, 2 * tp + fp + fn),
        "precision": _ratio(tp, tp + fp),
        "recall": _ratio(tp, tp + fn),
    }


def segmentation_summary(tp: Any, fp: Any, fn: Any) -> dict[str, Any]:
    """Per-image counts (N,) → the set's figures from the summed counts."""
    tp, fp, fn = (np.asarray(v, np.int64).reshape(-1) for v in (tp, fp, fn))
    sums = {"tp_px": int(tp.sum()), "fp_px": int(fp.sum()), "fn_px": int(fn.sum())}
    scores = {k: _float(v) for k, v in overlap_scores(sums["tp_px"], sums["fp_px"], sums["fn_px"]).items()}
    return {
        **scores,
        "images": int(tp.size),
        "images_with_truth": int(np.count_nonzero(tp + fn)),
        "images_with_prediction": int(np.count_nonzero(tp + fp)),
        **sums,
    }


def per_class_summary(classes: Sequence[str], tp: Any, fp: Any, fn: Any) -> dict[str, dict[str, Any]]:
    """Per-image counts grouped by the image's class → :func:`segmentation_summary` per class."""
    labels = np.asarray(classes, dtype=str).reshape(-1)
    tp, fp, fn = (np.asarray(v, np.int64).reshape(-1) for v in (tp, fp, fn))
    names, inverse = np.unique(labels, return_inverse=True)
    return {str(n): segmentation_summary(tp[inverse == i], fp[inverse == i], fn[inverse == i]) for i, n in enumerate(names)}


def iou_distribution(tp: Any, fp: Any, fn: Any, bins: np.ndarray = IOU_BINS) -> dict[str, Any]:
    """Per-image IoU over the images where truth or prediction has a defect.

    Images where both are empty have no IoU: counted as ``both_empty``, left
    out of the statistics. The last histogram bin includes 1.0.
    """
    iou = overlap_scores(tp, fp, fn)["iou"].reshape(-1)
    defined = iou[~np.isnan(iou)]
    counts, edges = np.histogram(defined, bins=bins)
    stats: dict[str, Any] = {"images": int(defined.size), "both_empty": int(iou.size - defined.size)}
    if defined.size:
        q = np.percentile(defined, [10, 25, 50, 75, 90])
        stats.update(
            mean=float(defined.mean()),
            p10=float(q[0]), p25=float(q[1]), median=float(q[2]), p75=float(q[3]), p90=float(q[4]),
            zero=int(np.count_nonzero(defined == 0)),
        )
    else:
        stats.update(mean=None, p10=None, p25=None, median=None, p75=None, p90=None, zero=0)
    stats["histogram"] = {"edges": [float(e) for e in edges], "counts": [int(c) for c in counts]}
    return stats


def grade_index(grades: Iterable[Grade | str]) -> np.ndarray:
    """Grades → (N,) int64 severity (PASS 0, DISCOUNT 1, REJECT 2)."""
    return np.asarray([Grade(g).severity for g in grades], np.int64).reshape(-1)


def confusion_matrix(true: Any, pred: Any, n: int = len(GRADES)) -> np.ndarray:
    """(N,) true and predicted class indices → (n, n) int64 counts, rows true, columns predicted."""
    true = np.asarray(true, np.int64).reshape(-1)
    pred = np.asarray(pred, np.int64).reshape(-1)
    if true.shape != pred.shape:
        raise ValueError(f"{true.size} true and {pred.size} predicted labels")
    if true.size and (min(true.min(), pred.min()) < 0 or max(true.max(), pred.max()) >= n):
        raise ValueError(f"labels must be in 0..{n - 1}")
    return np.bincount(true * n + pred, minlength=n * n).reshape(n, n)


def grade_agreement(cm: np.ndarray) -> dict[str, Any]:
    """A grade confusion matrix (rows true, columns predicted, PASS first) → agreement,
    its two kinds of disagreement, and the two rates the line pays for:

    * ``escape_rate``: parts graded milder than their truth / parts whose truth is not
      PASS (a defective part let through, or let through at a discount);
    * ``false_reject_rate``: parts truly PASS graded worse / parts truly PASS.

    A rate with no part to count over is None."""
    cm = np.asarray(cm, np.int64)
    total = int(cm.sum())
    agree = int(np.trace(cm))
    escapes = int(np.tril(cm, -1).sum())
    defective = int(cm[1:].sum())
    good = int(cm[0].sum())
    false_rejects = int(cm[0, 1:].sum())
    return {
        "images": total,
        "agree": agree,
        "agreement_pct": 100.0 * agree / total if total else None,
        "escapes": escapes,
        "over_graded": total - agree - escapes,
        "truly_defective": defective,
        "escape_rate": escapes / defective if defective else None,
        "truly_pass": good,
        "false_rejects": false_rejects,
        "false_reject_rate": false_rejects / good if good else None,
        "labels": [g.value for g in GRADES],
        "matrix": cm.tolist(),
    }


def grades_per_class(classes: Sequence[str], true: Any, pred: Any) -> dict[str, dict[str, Any]]:
    """:func:`grade_agreement` of the images of each class (e.g. the folder), sorted by class."""
    labels = np.asarray(list(classes), dtype=object)
    true, pred = np.asarray(true, np.int64), np.asarray(pred, np.int64)
    return {str(c): grade_agreement(confusion_matrix(true[labels == c], pred[labels == c]))
            for c in sorted(set(labels.tolist()))}


def truth_mask_defects(mask: np.ndarray, cls: str, min_area_px: int) -> tuple[Defects, np.ndarray]:
    """A (H, W) bool truth mask → its 8-connected regions as segmentation
    Defects of class ``cls`` (confidence 1) and the mask of the kept regions.

    The very function the Inspector uses on predictions (identity geometry),
    so regions under ``min_area_px`` are dropped the same way.
    """
    h, w = mask.shape
    prob = mask.astype(np.float32)[:, :, None]
    return mask_defects(prob, Geometry.identity(h, w), 0.5, [cls], min_area_px, 0.0)


def truth_box_defects(boxes: BoxTruth, height: int, width: int) -> Defects:
    """VOC boxes → detection Defects (confidence 1), clipped to the image."""
    n = len(boxes)
    if n == 0:
        return Defects.empty()
    xyxy = boxes.xyxy.copy()
    xyxy[:, [0, 2]] = np.clip(xyxy[:, [0, 2]], 0, width)
    xyxy[:, [1, 3]] = np.clip(xyxy[:, [1, 3]], 0, height)
    area = np.clip(xyxy[:, 2] - xyxy[:, 0], 0, None) * np.clip(xyxy[:, 3] - xyxy[:, 1], 0, None)
    return Defects(
        xyxy=xyxy.astype(np.float32),
        confidence=np.ones(n, np.float32),
        class_name=boxes.class_name.copy(),
        area_px=area.astype(np.float64),
        kind=np.full(n, "detection"),
    )


def true_grade(
    height: int,
    width: int,
    rules: GradingConfig,
    min_area_px: int,
    mask: np.ndarray | None = None,
    cls: str = "defect",
    boxes: BoxTruth | None = None,
) -> tuple[Grade, str, float]:
    """The grade the truth earns: (grade, rule, defect area %). See the module docstring."""
    frame_px = height * width
    parts = []
    kept = None
    if mask is not None:
        regions, kept = truth_mask_defects(mask, cls, min_area_px)
        parts.append(regions)
    box_defects = truth_box_defects(boxes, height, width) if boxes is not None else Defects.empty()
    parts.append(box_defects)
    defects = Defects.concat(parts)
    area_px = np.count_nonzero(kept) if kept is not None else box_union_area(box_defects.xyxy, height, width)
    area_pct = 100.0 * float(area_px) / frame_px
    decision = grade(defects, area_pct, frame_px, rules)
    return decision.grade, decision.rule, area_pct


@dataclass(frozen=True)
class BoxTable:
    """N boxes over a set of images, for COCO evaluation.

    image: (N,) int64 image index. class_id: (N,) int64 index into the class list.
    xyxy: (N, 4) float64 pixels. score: (N,) float64 (1 for truth).
    ignore: (N,) bool (truth only: VOC "difficult").
    """

    image: np.ndarray
    class_id: np.ndarray
    xyxy: np.ndarray
    score: np.ndarray
    ignore: np.ndarray

    @classmethod
    def build(cls, rows: Sequence[tuple[int, int, Sequence[float], float, bool]]) -> "BoxTable":
        if not rows:
            return cls(np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros((0, 4)), np.zeros(0), np.zeros(0, bool))
        image, class_id, xyxy, score, ignore = zip(*rows)
        return cls(
            np.asarray(image, np.int64), np.asarray(class_id, np.int64),
            np.asarray(xyxy, np.float64).reshape(-1, 4), np.asarray(score, np.float64), np.asarray(ignore, bool),
        )

    def __len__(self) -> int:
        return int(self.image.size)


def _coco_annotations(table: BoxTable, truth: bool) -> list[dict]:
    x1, y1, x2, y2 = table.xyxy.T
    w, h = x2 - x1, y2 - y1
    out = []
    for i in range(len(table)):
        ann = {
            "id": i + 1,
            "image_id": int(table.image[i]) + 1,
            "category_id": int(table.class_id[i]) + 1,
            "bbox": [float(x1[i]), float(y1[i]), float(w[i]), float(h[i])],
            "area": float(w[i] * h[i]),
            "iscrowd": int(truth and table.ignore[i]),
        }
        if not truth:
            ann["score"] = float(table.score[i])
        out.append(ann)
    return out


def coco_detection_metrics(
    truth: BoxTable, detections: BoxTable, sizes: Sequence[tuple[int, int]], classes: Sequence[str]
) -> dict[str, Any]:
    """COCO box AP with pycocotools.

    sizes: (width, height) per image index (every image evaluated, with or
    without boxes). Returns AP50, mAP (0.50:0.95), AP per class, and the
    precision/recall curve at IoU 0.5 per class; a figure is ``None`` where no
    truth box exists to define it. VOC "difficult" truth is COCO "crowd":
    ignored, and detections on it are not false positives.
    """
    images = [{"id": i + 1, "width": int(w), "height": int(h)} for i, (w, h) in enumerate(sizes)]
    ev = _coco_eval(images, classes, _coco_annotations(truth, truth=True), _coco_annotations(detections, truth=False))
    precision = ev.eval["precision"]  # (T iou, R recall, K class, A area, M maxDets); -1: undefined
    iou_thrs = ev.params.iouThrs
    t50 = int(np.argmin(np.abs(iou_thrs - 0.5)))
    p_all = precision[:, :, :, 0, -1]  # area "all", the most detections

    def mean_defined(p: np.ndarray) -> float | None:
        p = p[p > -1]
        return float(p.mean()) if p.size else None

    per_class = {}
    for k, name in enumerate(classes):
        per_class[name] = {
            "truth_boxes": int(np.count_nonzero((truth.class_id == k) & ~truth.ignore)),
            "detections": int(np.count_nonzero(detections.class_id == k)),
            "ap50": mean_defined(p_all[t50, :, k]),
            "ap": mean_defined(p_all[:, :, k]),
        }
    curves = {
        name: [None if v < 0 else float(v) for v in p_all[t50, :, k]]
        for k, name in enumerate(classes)
        if per_class[name]["ap50"] is not None
    }
    return {
        "images": len(images),
        "truth_boxes": int(np.count_nonzero(~truth.ignore)),
        "ignored_truth_boxes": int(np.count_nonzero(truth.ignore)),
        "detections": len(detections),
        "ap50": mean_defined(p_all[t50]),
        "map": mean_defined(p_all),
        "ap75": _float(ev.stats[2]) if ev.stats[2] >= 0 else None,
        "max_detections": int(ev.params.maxDets[-1]),
        "per_class": per_class,
        "pr_iou50": {"recall": [float(r) for r in ev.params.recThrs], "precision": curves},
    }


def _coco_eval(images: list[dict], classes: Sequence[str], gt_anns: list[dict], dt_anns: list[dict]) -> Any:
    """pycocotools' box evaluation of ``dt_anns`` against ``gt_anns``, evaluated,
    accumulated and summarised (its COCOeval)."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    categories = [{"id": k + 1, "name": name} for k, name in enumerate(classes)]
    quiet = io.StringIO()  # pycocotools prints progress on stdout, which carries our table
    with contextlib.redirect_stdout(quiet):
        gt = COCO()
        gt.dataset = {"images": images, "categories": categories, "annotations": gt_anns}
        gt.createIndex()
        dt = COCO()  # built directly: loadRes() fails on an empty list
        dt.dataset = {"images": images, "categories": categories, "annotations": dt_anns}
        dt.createIndex()
        ev = COCOeval(gt, dt, iouType="bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return ev


def _float(v: Any) -> float | None:
    v = float(v)
    return None if math.isnan(v) else v


# =============================================================================
# The run: inspect every image with truth and keep per-image counts
# =============================================================================


@dataclass
class ImageRow:
    """One evaluated image. Pixel counts are None without mask truth or a
    segmentation model."""

    source: str
    truth: str
    cls: str
    width: int
    height: int
    true_grade: str
    true_rule: str
    true_area_pct: float
    grade: str
    rule: str
    area_pct: float
    tp_px: int | None = None
    fp_px: int | None = None
    fn_px: int | None = None
    truth_boxes: int | None = None
    detections: int | None = None

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["true_area_pct"] = round(self.true_area_pct, 4)
        d["area_pct"] = round(self.area_pct, 4)
        if self.tp_px is not None:
            d["iou"] = _float(overlap_scores(self.tp_px, self.fp_px, self.fn_px)["iou"])
        return d


@dataclass
class EvalRun:
    """What :func:`evaluate` collected."""

    rows: list[ImageRow] = field(default_factory=list)
    errors: list[dict[str, str]] = field(default_factory=list)
    det_truth: list[tuple[int, int, Sequence[float], float, bool]] = field(default_factory=list)
    det_found: list[tuple[int, int, Sequence[float], float, bool]] = field(default_factory=list)
    det_sizes: list[tuple[int, int]] = field(default_factory=list)
    seconds: float = 0.0

    def error(self, source: str, message: str) -> None:
        self.errors.append({"source": source, "error": message})


def load_boxes(items: Sequence[TruthFiles]) -> tuple[dict[Path, BoxTruth], list[dict[str, str]]]:
    """Parse every VOC file of ``items`` up front (they are small), so class
    names can be checked before any image is inspected. A file that cannot be
    parsed is an error for its image."""
    boxes: dict[Path, BoxTruth] = {}
    errors = []
    for item in items:
        if item.annotation is None:
            continue
        try:
            boxes[item.image] = parse_voc(item.annotation)
        except InputError as exc:
            errors.append({"source": str(item.image), "error": str(exc)})
    return boxes, errors


def evaluate(
    items: Sequence[TruthFiles],
    boxes: Mapping[Path, BoxTruth],
    inspector: Any,
    progress: bool = True,
) -> EvalRun:
    """Inspect each image (decoded by the same FileSource as ``station replay``)
    and score it against its truth. One bad image is an error, not the end.

    boxes: the parsed VOC truth per image (:func:`load_boxes`); an item whose
    annotation is not in it is skipped (its parse error is already reported).
    """
    cfg: StationConfig = inspector.cfg
    det_model = inspector.models.get("detection")
    det_classes = {name: k for k, name in enumerate(det_model.card.classes)} if det_model else {}
    run = EvalRun()
    t0 = time.perf_counter()
    source = FileSource([item.image for item in items])
    bar = tqdm(total=len(items), unit="image", disable=not progress, dynamic_ncols=True, file=sys.stderr)
    try:
        for item, frame in zip(items, source):
            if isinstance(frame, FrameError):
                run.error(frame.source, frame.error)
            else:
                _score_one(item, frame, boxes.get(item.image), inspector, cfg, det_classes, run)
            bar.update(1)
            bar.set_postfix_str(f"{len(run.errors)} err", refresh=False)
    finally:
        bar.close()
    run.seconds = time.perf_counter() - t0
    return run


def _score_one(
    item: TruthFiles,
    frame: Frame,
    box_truth: BoxTruth | None,
    inspector: Any,
    cfg: StationConfig,
    det_classes: Mapping[str, int],
    run: EvalRun,
) -> None:
    h, w = frame.height, frame.width
    if item.annotation is not None and box_truth is None:
        return  # its VOC file failed to parse: already an error
    try:
        if box_truth is not None and box_truth.size is not None and box_truth.size != (w, h):
            raise InputError(f"{box_truth.path}: annotation is for a {box_truth.size[0]}x{box_truth.size[1]} "
                             f"image but {item.image} is {w}x{h}")
        truth_mask = None
        if item.mask is not None:
            truth_mask = read_truth_mask(item.mask, h, w)
        elif item.declared_free:
            truth_mask = np.zeros((h, w), bool)
    except InputError as exc:
        run.error(str(item.image), str(exc))
        return
    try:
        result: InspectionResult = inspector.inspect(frame)
    except Exception as exc:  # one bad frame must not end the run
        log.exception("%s: inspection failed", frame.source)
        run.error(frame.source, f"inspection failed: {exc}")
        return
    t_grade, t_rule, t_area = true_grade(h, w, cfg.grading, cfg.postprocess.min_area_px, truth_mask, item.cls, box_truth)
    row = ImageRow(
        source=str(item.image), truth=item.kind, cls=item.cls, width=w, height=h,
        true_grade=t_grade.value, true_rule=t_rule, true_area_pct=t_area,
        grade=result.decision.grade.value, rule=result.decision.rule, area_pct=result.defect_area_pct,
    )
    if truth_mask is not None and result.mask is not None:
        row.tp_px, row.fp_px, row.fn_px = pixel_counts(truth_mask, result.mask)
    if box_truth is not None and det_classes:
        index = len(run.det_sizes)
        run.det_sizes.append((w, h))
        for xyxy, name, difficult in zip(box_truth.xyxy, box_truth.class_name, box_truth.difficult):
            run.det_truth.append((index, det_classes[str(name)], xyxy.tolist(), 1.0, bool(difficult)))
        d = result.defects
        found = np.flatnonzero(d.kind == "detection")
        for i in found:
            run.det_found.append((index, det_classes[str(d.class_name[i])], d.xyxy[i].tolist(), float(d.confidence[i]), False))
        row.truth_boxes = len(box_truth)
        row.detections = int(found.size)
    run.rows.append(row)


# =============================================================================
# The report: JSON, PNG, stdout table
# =============================================================================


def _segmentation_figures(run: EvalRun, evaluated: Sequence[TruthFiles], free_class: str,
                          notes: list[str]) -> dict[str, Any] | None:
    """The pixel figures of the images with mask truth and a segmentation model (a note
    when there is mask truth but no such model)."""
    seg_rows = [r for r in run.rows if r.tp_px is not None]
    if not seg_rows:
        if any(i.has_mask_truth for i in evaluated):
            notes.append("mask truth found but no segmentation model ran: no pixel metrics")
        return None
    tp = np.array([r.tp_px for r in seg_rows], np.int64)
    fp = np.array([r.fp_px for r in seg_rows], np.int64)
    fn = np.array([r.fn_px for r in seg_rows], np.int64)
    return {
        "all_defects": segmentation_summary(tp, fp, fn),
        "per_class": per_class_summary([r.cls for r in seg_rows], tp, fp, fn),
        "per_image_iou": iou_distribution(tp, fp, fn),
        "free_class": free_class or None,
    }


def _detection_figures(run: EvalRun, evaluated: Sequence[TruthFiles], models: Mapping[str, Any],
                       notes: list[str]) -> dict[str, Any] | None:
    """COCO box AP of the detection model on the images with box truth (a note when
    either is missing)."""
    det_model = models.get("detection")
    if det_model is not None and run.det_sizes:
        return coco_detection_metrics(
            BoxTable.build(run.det_truth), BoxTable.build(run.det_found), run.det_sizes, det_model.card.classes
        )
    if det_model is None and any(i.annotation is not None for i in evaluated):
        notes.append("box truth found but no detection model ran: no AP")
    elif det_model is not None:
        notes.append("a detection model ran but no image has box truth: no AP")
    return None


def _grade_figures(rows: Sequence[ImageRow]) -> dict[str, Any] | None:
    """Grade agreement of the evaluated images, overall and per class (None without any)."""
    if not rows:
        return None
    true, pred = grade_index(r.true_grade for r in rows), grade_index(r.grade for r in rows)
    grades = grade_agreement(confusion_matrix(true, pred))
    grades["per_class"] = grades_per_class([r.cls or "(no class)" for r in rows], true, pred)
    return grades


def _counts(run: EvalRun, discovery: Discovery, evaluated: Sequence[TruthFiles], limit: int | None) -> dict[str, Any]:
    """How many images were found, with which truth, selected, evaluated and failed."""
    kinds: dict[str, int] = defaultdict(int)
    for item in discovery.items:
        kinds[item.kind] += 1
    return {
        "images": len(discovery.items) + len(discovery.no_truth) + len(discovery.missing),
        "truth_masks_in_inputs": discovery.masks,
        "with_truth": len(discovery.items),
        "truth_kinds": dict(sorted(kinds.items())),
        "no_truth": len(discovery.no_truth),
        "limit": limit,
        "selected": len(evaluated),
        "evaluated": len(run.rows),
        "errors": len(run.errors),
    }


def build_report(
    run: EvalRun,
    discovery: Discovery,
    evaluated: Sequence[TruthFiles],
    models: Mapping[str, Any],
    cfg: StationConfig,
    free_class: str,
    command: Sequence[str] = (),
    config_path: Path | None = None,
    limit: int | None = None,
) -> dict[str, Any]:
    """Every figure of the run as one JSON-ready dict (NaN → null)."""
    rows = run.rows
    notes: list[str] = []
    segmentation = _segmentation_figures(run, evaluated, free_class, notes)
    grades = _grade_figures(rows)
    detection = _detection_figures(run, evaluated, models, notes)
    card_figures = {
        "iou": segmentation and segmentation["all_defects"]["iou"],
        "dice": segmentation and segmentation["all_defects"]["dice"],
        "pixel_precision": segmentation and segmentation["all_defects"]["precision"],
        "pixel_recall": segmentation and segmentation["all_defects"]["recall"],
        "grade_agreement_pct": grades and grades["agreement_pct"],
        "escape_rate": grades and grades["escape_rate"],
        "false_reject_rate": grades and grades["false_reject_rate"],
        "ap50": detection and detection["ap50"],
        "map": detection and detection["map"],
    }
    from .inspector import mask_threshold

    return {
        "schema": REPORT_SCHEMA,
        "station_version": __version__,
        "finished_at": iso_time(time.time()),
        "command": list(command),
        "command_line": shlex.join(command),
        "config": str(config_path) if config_path else "bundled default",
        "models": {
            role: {
                "path": str(m.path), "sha256": m.sha256, "card_name": m.card.name, "card_version": m.card.version,
                "classes": list(m.card.classes), "providers": list(m.providers),
            }
            for role, m in models.items()
        },
        "rules": {"min_area_px": cfg.postprocess.min_area_px, "mask_threshold": mask_threshold(models, cfg),
                  "grading": cfg.grading.model_dump(mode="json")},
        "counts": _counts(run, discovery, evaluated, limit),
        "seconds": round(run.seconds, 3),
        # flat, for a model card's training.figures (with command_line as evaluated_by)
        "card_figures": {k: v for k, v in card_figures.items() if v is not None},
        "segmentation": segmentation,
        "grades": grades,
        "detection": detection,
        "notes": notes,
        "no_truth": [str(p) for p in discovery.no_truth],
        "errors": list(run.errors),
        "images": [r.as_dict() for r in rows],
    }


def _clean(value: Any) -> Any:
    """NaN/inf → None, numpy scalars → Python, recursively (strict JSON)."""
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        v = float(value)
        return v if math.isfinite(v) else None
    return value


def write_json(report: Mapping[str, Any], path: Path) -> None:
    import json

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(_clean(report), indent=2, allow_nan=False) + "\n", encoding="utf-8")


def _fmt(v: Any, spec: str = ".3f") -> str:
    return "—" if v is None else format(v, spec)


def _pct(rate: float | None) -> str:
    return "—" if rate is None else f"{100.0 * rate:.1f} %"


def headline(report: Mapping[str, Any]) -> list[tuple[str, str]]:
    """The few figures worth a glance, as (label, value) rows."""
    c = report["counts"]
    rows = [("images evaluated", f"{c['evaluated']} ({c['no_truth']} no truth, {c['errors']} errors)")]
    seg = report.get("segmentation")
    if seg:
        a = seg["all_defects"]
        rows += [
            ("IoU (all defects)", _fmt(a["iou"])),
            ("Dice", _fmt(a["dice"])),
            ("pixel precision / recall", f"{_fmt(a['precision'])} / {_fmt(a['recall'])}"),
            ("per-image IoU median", _fmt(seg["per_image_iou"]["median"])),
        ]
    g = report.get("grades")
    if g:
        rows.append(("grade agreement", f"{_fmt(g['agreement_pct'], '.1f')} % ({g['agree']}/{g['images']})"))
        rows.append(("escape rate", f"{_pct(g['escape_rate'])} ({g['escapes']}/{g['truly_defective']} "
                                    "not-PASS parts graded milder)"))
        rows.append(("false-reject rate", f"{_pct(g['false_reject_rate'])} ({g['false_rejects']}/{g['truly_pass']} "
                                          "PASS parts graded worse)"))
    det = report.get("detection")
    if det:
        rows += [("AP50", _fmt(det["ap50"])), ("mAP 0.50:0.95", _fmt(det["map"]))]
    return rows


def format_table(report: Mapping[str, Any]) -> str:
    """The short stdout summary."""
    lines = []
    width = max(len(k) for k, _ in headline(report))
    for label, value in headline(report):
        lines.append(f"{label:<{width}}  {value}")
    seg = report.get("segmentation")
    if seg and seg["per_class"]:
        cw = max(5, *(len(k) for k in seg["per_class"]))
        lines.append("")
        lines.append(f"{'class':<{cw}}  {'images':>6}  {'IoU':>6}  {'prec':>6}  {'recall':>6}  {'w/ pred':>7}")
        for name, s in seg["per_class"].items():
            lines.append(f"{name:<{cw}}  {s['images']:>6}  {_fmt(s['iou']):>6}  {_fmt(s['precision']):>6}  "
                         f"{_fmt(s['recall']):>6}  {s['images_with_prediction']:>7}")
    g = report.get("grades")
    if g:
        lines.append("")
        lines.append("true \\ predicted  " + "  ".join(f"{x:>8}" for x in g["labels"]))
        for label, row in zip(g["labels"], g["matrix"]):
            lines.append(f"{label:<16}  " + "  ".join(f"{v:>8}" for v in row))
        per_class = g.get("per_class") or {}
        if len(per_class) > 1:
            cw = max(5, *(len(k) for k in per_class))
            lines.append("")
            lines.append(f"{'class':<{cw}}  {'images':>6}  {'agree':>7}  {'escapes':>11}  {'false rejects':>13}")
            for name, c in per_class.items():
                lines.append(f"{name:<{cw}}  {c['images']:>6}  {_fmt(c['agreement_pct'], '.1f'):>5} %  "
                             f"{c['escapes']:>4}/{c['truly_defective']:<4}  {c['false_rejects']:>6}/{c['truly_pass']:<4}")
    det = report.get("detection")
    if det:
        cw = max(5, *(len(k) for k in det["per_class"]))
        lines.append("")
        lines.append(f"{'class':<{cw}}  {'truth':>6}  {'found':>6}  {'AP50':>6}  {'AP':>6}")
        for name, s in det["per_class"].items():
            lines.append(f"{name:<{cw}}  {s['truth_boxes']:>6}  {s['detections']:>6}  {_fmt(s['ap50']):>6}  {_fmt(s['ap']):>6}")
    for note in report.get("notes", []):
        lines.append(f"note: {note}")
    return "\n".join(lines)


def write_png(report: Mapping[str, Any], path: Path) -> None:
    """The report as one PNG: headline table, grade confusion heatmap, per-image
    IoU histogram, PR curves at IoU 0.5. Drawn from the report dict alone, so it
    can be redrawn from the JSON. matplotlib (Agg, no pyplot) is imported here
    only: the daemon does not need it."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(13, 9.5), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    ax_table, ax_cm, ax_hist, ax_pr = fig.subplots(2, 2).ravel()
    names = ", ".join(f"{role}: {m['card_name']} v{m['card_version']}" for role, m in report["models"].items())
    fig.suptitle(f"station eval — {names}", fontsize=11)

    ax_table.axis("off")
    table = ax_table.table(cellText=[list(r) for r in headline(report)], colLabels=["figure", "value"],
                           loc="center", cellLoc="left", colLoc="left")
    table.auto_set_font_size(False)
    table.set_fontsize(10)
    table.scale(1.0, 1.5)
    ax_table.set_title("headline")

    _draw_grades(ax_cm, report.get("grades"))
    _draw_iou(ax_hist, report.get("segmentation"))
    _draw_pr(ax_pr, report.get("detection"))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)


def _draw_grades(ax: Any, g: Mapping[str, Any] | None) -> None:
    """The grade confusion heatmap, true × predicted."""
    if not g:
        _empty(ax, "grades", "no image evaluated")
        return
    cm = np.asarray(g["matrix"])
    ax.imshow(cm, cmap="Blues", vmin=0, vmax=max(1, int(cm.max())))
    for (i, j), v in np.ndenumerate(cm):
        ax.text(j, i, str(v), ha="center", va="center", color="white" if v > cm.max() / 2 else "black")
    ax.set_xticks(range(3), g["labels"])
    ax.set_yticks(range(3), g["labels"])
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(f"grades: {_fmt(g['agreement_pct'], '.1f')} % agree")


def _draw_iou(ax: Any, seg: Mapping[str, Any] | None) -> None:
    """The histogram of per-image IoU."""
    if not (seg and seg["per_image_iou"]["images"]):
        _empty(ax, "per-image IoU", "no mask truth with a segmentation model")
        return
    hist = seg["per_image_iou"]["histogram"]
    edges = np.asarray(hist["edges"])
    ax.bar(edges[:-1], hist["counts"], width=np.diff(edges), align="edge", edgecolor="black", color="#4c72b0")
    ax.set_xlim(0, 1)
    ax.set_xlabel("IoU")
    ax.set_ylabel("images")
    d = seg["per_image_iou"]
    ax.set_title(f"per-image IoU ({d['images']} images, median {_fmt(d['median'], '.2f')}; "
                 f"{d['both_empty']} both empty not shown)", fontsize=10)


def _draw_pr(ax: Any, det: Mapping[str, Any] | None) -> None:
    """The precision/recall curve at IoU 0.5 of each class."""
    if not (det and det["pr_iou50"]["precision"]):
        _empty(ax, "PR curves", "no box truth with a detection model")
        return
    recall = np.asarray(det["pr_iou50"]["recall"])
    for name, prec in det["pr_iou50"]["precision"].items():
        p = np.array([np.nan if v is None else v for v in prec], float)
        ax.plot(recall, p, label=f"{name} (AP50 {_fmt(det['per_class'][name]['ap50'], '.2f')})")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("recall")
    ax.set_ylabel("precision")
    ax.legend(fontsize=8, loc="lower left")
    ax.set_title(f"PR at IoU 0.5 — AP50 {_fmt(det['ap50'])}, mAP {_fmt(det['map'])}")


def _empty(ax: Any, title: str, text: str) -> None:
    ax.axis("off")
    ax.set_title(title)
    ax.text(0.5, 0.5, text, ha="center", va="center", color="gray")


# =============================================================================
# Command line (wired into station/cli.py)
# =============================================================================


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def add_eval_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``station eval`` to the CLI's subparsers."""
    e = subparsers.add_parser(
        "eval",
        help="score the models against ground truth",
        description="Run the inspection pipeline on images with ground truth (mask <stem>.png beside the image, "
        "class = folder name; or Pascal VOC ../annotations/<stem>.xml) and report IoU, grade agreement and AP.",
    )
    e.add_argument("paths", nargs="+", metavar="PATH", help="image file or folder (recursive)")
    e.add_argument("-c", "--config", type=Path, help="config YAML (default: the bundled default)")
    e.add_argument("--seg-model", type=Path, action="append", metavar="FILE",
                   help="segmentation ONNX model (overrides the config); repeat it to average several")
    e.add_argument("--det-model", type=Path, help="detection ONNX model (overrides the config)")
    e.add_argument("--json", type=Path, metavar="OUT.json", help="write the full report as JSON")
    e.add_argument("--report", type=Path, metavar="OUT.png", help="write the report as a PNG")
    e.add_argument("--free-class", default=FREE_CLASS, metavar="NAME",
                   help=f"folder of defect-free images; an image there without a mask is defect-free "
                        f"(default {FREE_CLASS!r}; '' for none)")
    e.add_argument("--limit", type=_positive, metavar="N",
                   help="evaluate at most N images with truth, evenly spread over the input order")
    e.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    e.set_defaults(func=cmd_eval)
    return e


def _require(module: str, why: str) -> None:
    """Fail before any inspection when an optional dependency is missing."""
    import importlib.util

    if importlib.util.find_spec(module) is None:
        raise ConfigError(f"{why} needs {module}, which is not installed: pip install 'station[eval]'")


def command_line(args: argparse.Namespace) -> list[str]:
    """The canonical command line that reproduces this run."""
    argv = ["station", "eval", *map(str, args.paths)]
    for flag, value in (("-c", args.config), *(("--seg-model", p) for p in args.seg_model or ()),
                        ("--det-model", args.det_model), ("--json", args.json), ("--report", args.report)):
        if value is not None:
            argv += [flag, str(value)]
    argv += ["--free-class", args.free_class]
    if args.limit is not None:
        argv += ["--limit", str(args.limit)]
    return argv


def cmd_eval(args: argparse.Namespace) -> int:
    """``station eval``. Exit 0: every selected image evaluated; 1: some could not
    be (their errors are in the report); 2: usage, config, model or truth-class
    error, or no image with truth."""
    from .config import load_config
    from .inspector import Inspector, open_models

    cfg = load_config(args.config)
    models = open_models(cfg, args.seg_model, args.det_model)
    if "detection" in models:
        _require("pycocotools", "detection AP")
    if args.report is not None:
        _require("matplotlib", "--report")
    for role, model in models.items():
        print(f"{role}: {model.path} ({model.card.name} v{model.card.version}) [{', '.join(model.providers)}]",
              file=sys.stderr)
    found = discover(args.paths, args.free_class)
    missing = [{"source": str(p), "error": f"{p}: no such file"} for p in found.missing]
    if found.no_truth:
        shown = ", ".join(str(p) for p in found.no_truth[:3]) + (" …" if len(found.no_truth) > 3 else "")
        print(f"{len(found.no_truth)} image(s) without truth skipped: {shown}", file=sys.stderr)
    if not found.items:
        for err in missing:
            print(f"error: {err['error']}", file=sys.stderr)
        print("no image with ground truth found (a <stem>.png mask beside the image, or "
              f"../{ANNOTATIONS_DIR}/<stem>.xml)", file=sys.stderr)
        return EXIT_USAGE
    items = spread(found.items, args.limit)
    boxes, box_errors = load_boxes(items)
    if "detection" in models:
        check_box_classes(boxes.values(), models["detection"].card.classes, str(models["detection"].path))
    inspector = Inspector(models, cfg, keep_mask=True)
    run = evaluate(items, boxes, inspector, progress=not args.quiet)
    run.errors[:0] = missing + box_errors
    report = build_report(run, found, items, models, cfg, args.free_class, command_line(args), args.config, args.limit)
    if args.json is not None:
        write_json(report, args.json)
    if args.report is not None:
        write_png(report, args.report)
    print(format_table(report))
    for err in run.errors[:10]:
        print(f"error: {err['error']}", file=sys.stderr)
    if len(run.errors) > 10:
        print(f"… and {len(run.errors) - 10} more error(s)", file=sys.stderr)
    return EXIT_INPUT_ERRORS if run.errors else EXIT_OK

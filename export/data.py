"""Segmentation training data: ``<name>.<ext>`` images with ``<name>.png`` masks.

The layout is that of the magnetic-tile data set (and of :mod:`export.synth`):
a folder tree where ``Crack/exp1_num_1.jpg`` has its truth mask in
``Crack/exp1_num_1.png`` (defect where > 127). A ``.png`` file with no image of
the same stem beside it is an image itself (with no mask).

Images are decoded with :func:`station.imageio.read_image` and turned into
model inputs with :func:`station.preprocess.preprocess` and the model card —
the very code the line daemon runs — and masks into labels with
:func:`station.preprocess.prepare_mask`. Nothing here imports TensorFlow.

Splits are by group (a physical part photographed several times) when a
groups file is given, so near-identical photos never sit on both sides.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import numpy as np

from station.errors import InputError
from station.imageio import IMAGE_EXTENSIONS, read_image, read_mask
from station.modelcard import ModelCard
from station.preprocess import Geometry, preprocess, prepare_mask

from . import ExportError

log = logging.getLogger(__name__)

MASK_SUFFIX = ".png"


@dataclass(frozen=True)
class Sample:
    """One image file and its mask file (None: defect-free by declaration).

    key: the image path relative to the data root, '/'-separated — the key of
    a groups file.
    """

    image: Path
    mask: Path | None
    key: str


@dataclass(frozen=True)
class Listing:
    """What :func:`find_samples` found under a root."""

    root: Path
    samples: tuple[Sample, ...]
    skipped_no_mask: int  # images without a mask that were left out


@dataclass(frozen=True)
class Split:
    train: tuple[Sample, ...]
    val: tuple[Sample, ...]
    description: str  # one line for the model card


@dataclass(frozen=True)
class Arrays:
    """Model inputs and labels, ready for Keras.

    x: (N, H, W, C) in the card's input dtype (float32 after 'normalize').
    y: (N, H, W, 1) float32, 1 where defective, else 0.
    keys: the sample key of each row.
    content: (N, 4) int ``(y0, y1, x0, x1)`` (end exclusive), where each image lies in
    its input plane: the whole plane unless a letterbox padded it.
    """

    x: np.ndarray
    y: np.ndarray
    keys: tuple[str, ...]
    content: np.ndarray


def find_samples(root: str | Path, missing_mask_is_free: bool = False) -> Listing:
    """List image/mask pairs under ``root`` recursively, sorted by key.

    An image without a mask is skipped (and counted) unless
    ``missing_mask_is_free``, in which case it is a defect-free sample.
    """
    root = Path(root)
    if not root.is_dir():
        raise ExportError(f"{root}: data directory does not exist or is not a directory")
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
    stems_with_image = {p.with_suffix("") for p in files if p.suffix.lower() != MASK_SUFFIX}
    samples: list[Sample] = []
    skipped = 0
    for path in files:
        if path.suffix.lower() == MASK_SUFFIX and path.with_suffix("") in stems_with_image:
            continue  # the mask of an image beside it
        mask = path.with_suffix(MASK_SUFFIX) if path.suffix.lower() != MASK_SUFFIX else None
        if mask is not None and not mask.is_file():
            mask = None
        if mask is None and not missing_mask_is_free:
            skipped += 1
            continue
        samples.append(Sample(path, mask, path.relative_to(root).as_posix()))
    if skipped:
        log.warning("%s: %d image(s) without a %s mask skipped (pass --missing-mask-is-free to use them "
                    "as defect-free)", root, skipped, MASK_SUFFIX)
    if not samples:
        raise ExportError(f"{root}: no image with a {MASK_SUFFIX} mask found")
    return Listing(root, tuple(samples), skipped)


def _read_json(path: Path, label: str):
    """``path`` parsed as JSON, or an ExportError naming it by ``label``."""
    try:
        return json.loads(path.read_text())
    except OSError as exc:
        raise ExportError(f"{label}: cannot read ({exc.strerror or exc})") from exc
    except json.JSONDecodeError as exc:
        raise ExportError(f"{label}: not JSON (line {exc.lineno}: {exc.msg})") from exc


def load_groups(path: str | Path) -> dict[str, str]:
    """Read a groups file: JSON object {image key: group id}, both strings."""
    path = Path(path)
    data = _read_json(path, f"--groups {path}")
    if not isinstance(data, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in data.items()):
        raise ExportError(f"--groups {path}: expected a JSON object of \"image path\": \"group id\" strings")
    return data


def split_samples(
    samples: Sequence[Sample],
    val_fraction: float,
    seed: int,
    groups: Mapping[str, str] | None = None,
) -> Split:
    """Deterministic train/validation split.

    With ``groups`` (image key → group id), whole groups go to one side; an
    image missing from ``groups`` is a group of its own (and counted in the
    log). Groups (or images) are shuffled with ``seed`` and moved to validation
    until it holds at least ``val_fraction`` of the images; training keeps at
    least one group.
    """
    if not 0.0 < val_fraction < 1.0:
        raise ExportError(f"--val-fraction {val_fraction}: must be between 0 and 1 (exclusive)")
    by_group = _grouped(samples, groups)
    if len(by_group) < 2:
        raise ExportError(f"{len(samples)} image(s) in {len(by_group)} group(s): need at least 2 groups to split")
    order = sorted(by_group)
    np.random.default_rng(seed).shuffle(order)
    target = val_fraction * len(samples)
    val_ids: list[str] = []
    n_val = 0
    for gid in order[:-1]:
        if n_val >= target:
            break
        val_ids.append(gid)
        n_val += len(by_group[gid])
    val_set = set(val_ids)
    train = tuple(sorted((s for g in order if g not in val_set for s in by_group[g]), key=lambda s: s.key))
    val = tuple(sorted((s for g in val_ids for s in by_group[g]), key=lambda s: s.key))
    unit = "group" if groups is not None else "image"
    description = (
        f"by {unit}: {len(train)} train / {len(val)} validation images "
        f"({len(by_group) - len(val_ids)} / {len(val_ids)} {unit}s), "
        f"validation fraction {val_fraction:g}, seed {seed}"
    )
    return Split(train, val, description)


def _grouped(samples: Sequence[Sample], groups: Mapping[str, str] | None) -> dict[str, list[Sample]]:
    """Samples by group id (``g:<group>``; an image missing from ``groups`` is ``i:<key>``, its own group)."""
    by_group: dict[str, list[Sample]] = {}
    ungrouped = 0
    for s in samples:
        if groups is not None and s.key in groups:
            gid = "g:" + groups[s.key]
        else:
            gid = "i:" + s.key
            if groups is not None:
                ungrouped += 1
        by_group.setdefault(gid, []).append(s)
    if ungrouped:
        log.warning("%d image(s) missing from the groups file: each is its own group", ungrouped)
    return by_group


def fold_of_groups(samples: Sequence[Sample], folds: int, seed: int,
                   groups: Mapping[str, str] | None = None) -> dict[str, int]:
    """Grouped, stratified k-fold assignment: sample key → fold index 0..folds-1.

    A group (a physical part; an image without a group is its own) lies in one
    fold. Strata are the samples' folders (the defect classes of a data set laid
    out ``<Class>/<name>``): within each folder the groups are shuffled with
    ``seed`` and each goes, largest first, to the fold that holds the fewest
    images of that folder so far, so every fold gets its share of every class.
    """
    if folds < 2:
        raise ExportError(f"--folds {folds}: need at least 2")
    by_group = _grouped(samples, groups)
    if len(by_group) < folds:
        raise ExportError(f"{len(samples)} image(s) in {len(by_group)} group(s): cannot make {folds} folds")
    rng = np.random.default_rng(seed)
    strata: dict[str, list[str]] = {}
    for gid, members in sorted(by_group.items()):
        strata.setdefault(members[0].key.rpartition("/")[0], []).append(gid)
    assignment: dict[str, int] = {}
    totals = np.zeros(folds, np.int64)
    for stratum in sorted(strata):
        gids = strata[stratum]
        rng.shuffle(gids)
        gids.sort(key=lambda g: -len(by_group[g]))  # stable: equal sizes keep the shuffled order
        counts = np.zeros(folds, np.int64)
        for gid in gids:
            # fewest of this folder first, then fewest overall, then a seeded tie-break
            fold = int(min(range(folds), key=lambda k: (counts[k], totals[k], rng.random())))
            counts[fold] += len(by_group[gid])
            totals[fold] += len(by_group[gid])
            for s in by_group[gid]:
                assignment[s.key] = fold
    return assignment


def fold_split(samples: Sequence[Sample], folds: int, fold: int, seed: int,
               groups: Mapping[str, str] | None = None) -> Split:
    """Fold ``fold`` of :func:`fold_of_groups` held out for validation, the other folds train."""
    if not 0 <= fold < folds:
        raise ExportError(f"--fold {fold}: must be between 0 and {folds - 1} (--folds {folds})")
    assignment = fold_of_groups(samples, folds, seed, groups)
    train = tuple(s for s in samples if assignment[s.key] != fold)
    val = tuple(s for s in samples if assignment[s.key] == fold)
    unit = "group" if groups is not None else "image"
    description = (f"grouped {folds}-fold by {unit}, stratified by folder, seed {seed}: fold {fold} held out "
                   f"({len(train)} train / {len(val)} validation images)")
    return Split(tuple(sorted(train, key=lambda s: s.key)), tuple(sorted(val, key=lambda s: s.key)), description)


def all_data_split(samples: Sequence[Sample]) -> Split:
    """Every image trains, none validates (the shipped model after cross-validation chose its recipe)."""
    return Split(tuple(sorted(samples, key=lambda s: s.key)), (),
                 f"all {len(samples)} images train (no validation: the recipe was chosen by cross-validation)")


def auto_size(samples: Sequence[Sample], pixels: int = 256 * 256, multiple: int = 64,
              smallest: int = 128, largest: int = 512) -> tuple[int, int]:
    """A model input (H, W) of about ``pixels`` pixels in the images' median aspect ratio,
    each side a multiple of ``multiple`` within [``smallest``, ``largest``] (``--size auto``).

    Square tiles get 256 x 256; images about 1250 x 500 (tall) get 384 x 192, so that a
    letterbox spends its pixels on the part, not on padding."""
    if not samples:
        raise ExportError("no images to size the model input from")
    ratios = []
    for s in samples:
        image = read_image(s.image)
        ratios.append(image.shape[0] / image.shape[1])
    ratio = float(np.median(ratios))
    height = (pixels * ratio) ** 0.5

    def side(v: float) -> int:
        return int(min(largest, max(smallest, multiple * round(v / multiple))))

    return side(height), side(height / ratio)


def write_split_file(path: Path, description: str, train_keys: Sequence[str], val_keys: Sequence[str]) -> None:
    """``{"description", "train", "val"}``: the image keys of each side (paths relative to the data root)."""
    path.write_text(json.dumps({"description": description, "train": list(train_keys), "val": list(val_keys)},
                               indent=1) + "\n")


def read_split_file(path: Path, data: Path, side: str = "val") -> list[Path]:
    """The images of one side of a split file, as paths under ``data``; every one must exist."""
    split = _read_json(path, f"split file {path}")
    keys = split.get(side) if isinstance(split, dict) else None
    if not isinstance(keys, list) or not keys or not all(isinstance(k, str) for k in keys):
        raise ExportError(f"{path}: expected a JSON object whose \"{side}\" is a non-empty list of image paths")
    images = [data / key for key in keys]
    missing = [str(p) for p in images if not p.is_file()]
    if missing:
        raise ExportError(f"{path}: {len(missing)} of its {len(images)} {side} images are not under {data} "
                          f"(first: {missing[0]})")
    return images


def load_sample(sample: Sample, card: ModelCard) -> tuple[np.ndarray, np.ndarray, Geometry]:
    """One sample → (input (H, W, C) in the card's dtype, label (H, W, 1) float32 0/1,
    where the image lies in the input plane)."""
    image = read_image(sample.image)
    x, geometry = preprocess(image, card)
    if sample.mask is None:
        y = np.zeros((card.input.height, card.input.width), np.float32)
    else:
        mask = read_mask(sample.mask)
        try:
            y = prepare_mask(mask, card, geometry)
        except ValueError as exc:
            raise ExportError(f"{sample.mask}: {exc}") from exc
    return x, y[:, :, None], geometry


def load_arrays(samples: Iterable[Sample], card: ModelCard, progress: bool = False) -> Arrays:
    """Decode and preprocess samples into stacked arrays (see :class:`Arrays`)."""
    samples = list(samples)
    spec = card.input
    x = np.empty((len(samples), spec.height, spec.width, spec.channels), np.dtype(spec.dtype))
    y = np.empty((len(samples), spec.height, spec.width, 1), np.float32)
    content = np.empty((len(samples), 4), np.int64)
    it: Iterable[tuple[int, Sample]] = enumerate(samples)
    if progress:
        from tqdm import tqdm

        it = tqdm(it, total=len(samples), unit="img", desc="load", disable=None)
    for i, sample in it:
        try:
            x[i], y[i], g = load_sample(sample, card)
        except InputError as exc:
            raise ExportError(str(exc)) from exc
        content[i] = (g.top, g.top + g.content_h, g.left, g.left + g.content_w)
    return Arrays(x, y, tuple(s.key for s in samples), content)

"""Detection training data: images with Pascal VOC boxes (the NEU-DET layout).

``DATA_DIR/images/<stem>.jpg`` has its boxes in ``DATA_DIR/annotations/<stem>.xml``
(``xmin ymin xmax ymax`` in source pixels, parsed by
:func:`station.evaluate.parse_voc`, the reader ``station eval`` uses).

Images are decoded with :func:`station.imageio.read_image` and turned into
model inputs with :func:`station.preprocess.preprocess` and the model card —
the very code the line daemon runs; boxes follow the image through the same
:class:`station.preprocess.Geometry` (:func:`boxes_to_input`, the inverse of
``Geometry.boxes_to_source``). Nothing here imports TensorFlow.

Near-duplicates: NEU-DET holds a few images that are (shifted) copies of
others. :func:`near_duplicate_groups` finds them by the peak of the normalised
cross-correlation of their high-pass content over all shifts, and the split
keeps each group on one side (:func:`export.data.split_samples`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import cv2
import numpy as np

from station.errors import InputError
from station.evaluate import BoxTruth, parse_voc
from station.imageio import IMAGE_EXTENSIONS, read_image
from station.modelcard import ModelCard
from station.preprocess import Geometry, preprocess

from . import ExportError
from .data import Sample

log = logging.getLogger(__name__)

IMAGES_DIR = "images"
ANNOTATIONS_DIR = "annotations"

# Peak normalised cross-correlation of two images' high-pass planes (64x64,
# any shift) above which they are one group. On NEU-DET, within a class, the
# median pair peaks at 0.08 and 99 % of pairs below 0.52; the one exact copy
# (patches_101/105) gives 1.0 and overlapping crops of one strip (mostly
# scratches) 0.85-0.96. 0.85 links about 35 pairs: more than the ~10 groups the
# data notes mention, erring towards keeping look-alikes together.
DUPLICATE_NCC = 0.85


@dataclass(frozen=True)
class VocSample:
    """One image and its VOC annotation. key: the image path relative to the data root."""

    image: Path
    annotation: Path
    key: str

    def as_sample(self) -> Sample:
        return Sample(self.image, None, self.key)


@dataclass(frozen=True)
class BoxArrays:
    """Model inputs and boxes, ready for training.

    x: (N, H, W, C) in the card's input dtype. boxes[i]: (n_i, 4) float32
    [x1, y1, x2, y2] in input-tensor pixels; labels[i]: (n_i,) int32 class
    index. geometries[i]: how image i landed in the tensor; sizes[i]: its
    (width, height) in source pixels; truths[i]: its VOC boxes as read.
    """

    x: np.ndarray
    boxes: tuple[np.ndarray, ...]
    labels: tuple[np.ndarray, ...]
    geometries: tuple[Geometry, ...]
    truths: tuple[BoxTruth, ...]
    keys: tuple[str, ...]

    @property
    def sizes(self) -> list[tuple[int, int]]:
        return [(g.src_w, g.src_h) for g in self.geometries]

    def __len__(self) -> int:
        return int(self.x.shape[0])


def find_voc_samples(root: str | Path) -> tuple[VocSample, ...]:
    """Images under ``root/images`` that have ``root/annotations/<stem>.xml``, sorted by key."""
    root = Path(root)
    images_dir = root / IMAGES_DIR
    if not images_dir.is_dir():
        raise ExportError(f"{root}: no {IMAGES_DIR}/ folder (expected {IMAGES_DIR}/<stem>.jpg + "
                          f"{ANNOTATIONS_DIR}/<stem>.xml)")
    out, missing = [], 0
    for path in sorted(p for p in images_dir.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS):
        ann = root / ANNOTATIONS_DIR / (path.stem + ".xml")
        if not ann.is_file():
            missing += 1
            continue
        out.append(VocSample(path, ann, path.relative_to(root).as_posix()))
    if missing:
        log.warning("%s: %d image(s) without an annotation skipped", root, missing)
    if not out:
        raise ExportError(f"{root}: no image with a VOC annotation found")
    return tuple(out)


def class_names(truths: Iterable[BoxTruth]) -> list[str]:
    """Sorted class names found in the annotations."""
    names: set[str] = set()
    for t in truths:
        names.update(t.class_name.tolist())
    return sorted(names)


def boxes_to_input(xyxy: np.ndarray, geometry: Geometry) -> np.ndarray:
    """(N, 4) [x1, y1, x2, y2] source pixels → input-tensor pixels (the inverse of
    :meth:`Geometry.boxes_to_source`), clipped to the content area."""
    xyxy = np.asarray(xyxy, np.float64).reshape(-1, 4)
    sx = geometry.content_w / geometry.src_w
    sy = geometry.content_h / geometry.src_h
    out = np.empty_like(xyxy)
    out[:, [0, 2]] = np.clip(xyxy[:, [0, 2]], 0, geometry.src_w) * sx + geometry.left
    out[:, [1, 3]] = np.clip(xyxy[:, [1, 3]], 0, geometry.src_h) * sy + geometry.top
    return out.astype(np.float32)


def load_box_arrays(samples: Sequence[VocSample], card: ModelCard, progress: bool = False) -> BoxArrays:
    """Decode, preprocess (the card's ops) and map the boxes of ``samples``.

    VOC "difficult" boxes are kept for training (NEU-DET has none). A class not
    in ``card.classes`` is an ExportError naming the file.
    """
    spec = card.input
    index = {name: i for i, name in enumerate(card.classes)}
    x = np.empty((len(samples), spec.height, spec.width, spec.channels), np.dtype(spec.dtype))
    boxes, labels, geoms, truths = [], [], [], []
    it: Iterable[tuple[int, VocSample]] = enumerate(samples)
    if progress:
        from tqdm import tqdm

        it = tqdm(it, total=len(samples), unit="img", desc="load", disable=None)
    for i, s in it:
        try:
            image = read_image(s.image)
            truth = parse_voc(s.annotation)
        except InputError as exc:
            raise ExportError(str(exc)) from exc
        unknown = sorted(set(truth.class_name.tolist()) - set(index))
        if unknown:
            raise ExportError(f"{s.annotation}: class(es) {unknown} not among {card.classes}")
        x[i], geometry = preprocess(image, card)
        boxes.append(boxes_to_input(truth.xyxy, geometry))
        labels.append(np.asarray([index[n] for n in truth.class_name.tolist()], np.int32))
        geoms.append(geometry)
        truths.append(truth)
    return BoxArrays(x, tuple(boxes), tuple(labels), tuple(geoms), tuple(truths), tuple(s.key for s in samples))


# --- near-duplicate groups ---------------------------------------------------


def _highpass(path: Path, side: int = 64) -> np.ndarray:
    image = read_image(path)
    gray = image if image.ndim == 2 else cv2.cvtColor(image, cv2.COLOR_BGR2GRAY)
    g = cv2.resize(gray, (side, side), interpolation=cv2.INTER_AREA).astype(np.float32)
    h = g - cv2.GaussianBlur(g, (0, 0), 2)
    h -= h.mean()
    return h / (np.linalg.norm(h) + 1e-6)


def near_duplicate_groups(samples: Sequence[VocSample], threshold: float = DUPLICATE_NCC,
                          same_class_only: bool = True) -> dict[str, str]:
    """{image key: group id} where images are (shifted) near-copies of each other.

    Each image is reduced to a 64×64 high-pass plane (gray − Gaussian blur σ 2,
    zero mean, unit norm); two images are linked when the peak of their circular
    cross-correlation over all shifts (zero-padded to 128², so shifts do not
    wrap) exceeds ``threshold``; groups are the connected components. Compared
    within one class (the file-name prefix before the last ``_``) unless
    ``same_class_only`` is False. Images with no near-copy are their own group.
    """
    feats = np.stack([_highpass(s.image) for s in samples])
    spectra = np.fft.rfft2(feats, s=(128, 128))
    prefix = np.array([s.image.stem.rsplit("_", 1)[0] for s in samples])
    parent = list(range(len(samples)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    blocks = [np.flatnonzero(prefix == p) for p in sorted(set(prefix))] if same_class_only \
        else [np.arange(len(samples))]
    for ix in blocks:
        for a in ix:
            rest = ix[ix > a]
            if rest.size == 0:
                continue
            cc = np.fft.irfft2(spectra[a][None] * np.conj(spectra[rest]), s=(128, 128))
            peak = cc.reshape(len(rest), -1).max(axis=1)
            for b in rest[peak > threshold]:
                parent[find(int(b))] = find(int(a))
    return {s.key: samples[find(i)].key for i, s in enumerate(samples)}

"""Frame → input tensor, exactly as named in the model card. Pure functions.

The same functions build the training inputs in ``export/`` so that the line
sees what the model was trained on. Each op takes and returns an image array:
uint8 (H, W) or (H, W, C) until ``normalize``, float32 after it.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from functools import lru_cache

import cv2
import numpy as np

from .modelcard import (
    ClaheOp,
    ColourOp,
    DilateOp,
    EqualizeHistOp,
    InputSpec,
    ModelCard,
    NormalizeOp,
    ResizeOp,
)

_INTERP = {"area": cv2.INTER_AREA, "linear": cv2.INTER_LINEAR, "nearest": cv2.INTER_NEAREST}
_BORDER = {"replicate": cv2.BORDER_REPLICATE, "reflect": cv2.BORDER_REFLECT_101}


@dataclass(frozen=True)
class Geometry:
    """How a source frame maps onto the input tensor.

    The source (src_h × src_w) was scaled to (content_h × content_w) and placed
    at (top, left) inside the (in_h × in_w) tensor; the rest is padding.
    """

    src_h: int
    src_w: int
    in_h: int
    in_w: int
    content_h: int
    content_w: int
    top: int = 0
    left: int = 0

    @classmethod
    def identity(cls, h: int, w: int) -> "Geometry":
        return cls(h, w, h, w, h, w)

    def crop(self, arr: np.ndarray) -> np.ndarray:
        """The content part of an (in_h, in_w, ...) array."""
        return arr[self.top : self.top + self.content_h, self.left : self.left + self.content_w]

    def to_source(self, arr: np.ndarray, interpolation: int = cv2.INTER_LINEAR) -> np.ndarray:
        """An (in_h, in_w[, C]) map resized back to (src_h, src_w[, C])."""
        content = self.crop(arr)
        if content.shape[:2] == (self.src_h, self.src_w):
            return content
        out = cv2.resize(content, (self.src_w, self.src_h), interpolation=interpolation)
        if content.ndim == 3 and out.ndim == 2:  # OpenCV drops a single channel axis
            out = out[:, :, None]
        return out

    def boxes_to_source(self, xyxy: np.ndarray) -> np.ndarray:
        """(N, 4) boxes in input-tensor pixels → source pixels, clipped to the frame."""
        sx = self.src_w / self.content_w
        sy = self.src_h / self.content_h
        out = np.empty_like(xyxy, dtype=np.float32)
        out[:, [0, 2]] = (xyxy[:, [0, 2]] - self.left) * sx
        out[:, [1, 3]] = (xyxy[:, [1, 3]] - self.top) * sy
        np.clip(out[:, [0, 2]], 0, self.src_w, out=out[:, [0, 2]])
        np.clip(out[:, [1, 3]], 0, self.src_h, out=out[:, [1, 3]])
        return out


# --- ops ---------------------------------------------------------------------


def to_colour(image: np.ndarray, to: str) -> np.ndarray:
    """Gray (H, W) or BGR (H, W, 3) uint8 → ``to`` ('gray' (H, W), 'rgb' or 'bgr' (H, W, 3))."""
    gray_in = image.ndim == 2
    if to == "gray":
        return image if gray_in else cv2.cvtColor(image, cv2.COLOR_BGR2GRAY)
    if to == "rgb":
        return cv2.cvtColor(image, cv2.COLOR_GRAY2RGB if gray_in else cv2.COLOR_BGR2RGB)
    if to == "bgr":
        return cv2.cvtColor(image, cv2.COLOR_GRAY2BGR) if gray_in else image
    raise ValueError(f"unknown colour space {to!r}")


_local = threading.local()


def _clahe(clip_limit: float, tile_grid: int) -> cv2.CLAHE:
    # One CLAHE object per thread and setting: its apply() keeps state and is not thread-safe.
    cache = _local.__dict__.setdefault("clahe", {})
    key = (clip_limit, tile_grid)
    if key not in cache:
        cache[key] = cv2.createCLAHE(clipLimit=clip_limit, tileGridSize=(tile_grid, tile_grid))
    return cache[key]


def _per_channel(image: np.ndarray, fn) -> np.ndarray:
    if image.ndim == 2:
        return fn(image)
    return cv2.merge([fn(np.ascontiguousarray(image[:, :, c])) for c in range(image.shape[2])])


def clahe(image: np.ndarray, clip_limit: float = 2.0, tile_grid: int = 8) -> np.ndarray:
    engine = _clahe(float(clip_limit), int(tile_grid))
    return _per_channel(image, engine.apply)


def equalize_hist(image: np.ndarray) -> np.ndarray:
    return _per_channel(image, cv2.equalizeHist)


@lru_cache(maxsize=16)
def _kernel(size: int, shape: str) -> np.ndarray:
    kind = cv2.MORPH_RECT if shape == "rect" else cv2.MORPH_ELLIPSE
    return cv2.getStructuringElement(kind, (size, size))


def dilate(image: np.ndarray, kernel: int = 3, shape: str = "rect", iterations: int = 1) -> np.ndarray:
    return cv2.dilate(image, _kernel(int(kernel), shape), iterations=int(iterations))


def fit(src_h: int, src_w: int, in_h: int, in_w: int, mode: str) -> Geometry:
    """Where a (src_h, src_w) frame lands in an (in_h, in_w) tensor."""
    if mode == "stretch":
        return Geometry(src_h, src_w, in_h, in_w, in_h, in_w)
    scale = min(in_h / src_h, in_w / src_w)
    ch = max(1, min(in_h, round(src_h * scale)))
    cw = max(1, min(in_w, round(src_w * scale)))
    return Geometry(src_h, src_w, in_h, in_w, ch, cw, (in_h - ch) // 2, (in_w - cw) // 2)


def resize(image: np.ndarray, geometry: Geometry, interpolation: str = "area", pad_value: int = 0,
           pad_mode: str = "constant") -> np.ndarray:
    """Place ``image`` into the tensor plane as ``geometry`` says; the padding is
    ``pad_value`` (pad_mode constant) or the content's edge repeated or mirrored."""
    content = image
    if image.shape[:2] != (geometry.content_h, geometry.content_w):
        content = cv2.resize(image, (geometry.content_w, geometry.content_h), interpolation=_INTERP[interpolation])
    if (geometry.content_h, geometry.content_w) == (geometry.in_h, geometry.in_w):
        return content
    if pad_mode != "constant":
        bottom = geometry.in_h - geometry.top - geometry.content_h
        right = geometry.in_w - geometry.left - geometry.content_w
        out = cv2.copyMakeBorder(content, geometry.top, bottom, geometry.left, right, _BORDER[pad_mode])
        return out.reshape((geometry.in_h, geometry.in_w) + image.shape[2:])
    out = np.full((geometry.in_h, geometry.in_w) + image.shape[2:], pad_value, dtype=image.dtype)
    geometry.crop(out)[...] = content
    return out


def normalize(image: np.ndarray, scale: float, mean: list[float], std: list[float]) -> np.ndarray:
    x = image.astype(np.float32) * np.float32(scale)
    mean_a = np.asarray(mean, np.float32)
    std_a = np.asarray(std, np.float32)
    if image.ndim == 2:
        mean_a, std_a = mean_a[0], std_a[0]
    x -= mean_a
    x /= std_a
    return x


# --- the card-driven chain ---------------------------------------------------


def preprocess(image: np.ndarray, card: ModelCard) -> tuple[np.ndarray, Geometry]:
    """Decoded frame → (H, W, C) array in the dtype of ``card.input``, and its Geometry.

    image: uint8 gray (H, W) or BGR (H, W, 3), any size. The result has no batch axis
    and is always channels-last; :func:`to_tensor` applies the card's layout.
    """
    spec = card.input
    geometry = Geometry.identity(image.shape[0], image.shape[1])
    x = image
    for op in card.preprocess:
        if isinstance(op, ColourOp):
            x = to_colour(x, op.to)
        elif isinstance(op, ClaheOp):
            x = clahe(x, op.clip_limit, op.tile_grid)
        elif isinstance(op, EqualizeHistOp):
            x = equalize_hist(x)
        elif isinstance(op, DilateOp):
            x = dilate(x, op.kernel, op.shape, op.iterations)
        elif isinstance(op, ResizeOp):
            geometry = fit(x.shape[0], x.shape[1], spec.height, spec.width, op.mode)
            x = resize(x, geometry, op.interpolation, op.pad_value, op.pad_mode)
        elif isinstance(op, NormalizeOp):
            x = normalize(x, op.scale, op.mean, op.std)
        else:  # pragma: no cover - the card schema admits no other op
            raise TypeError(f"unknown preprocess op {op!r}")
    if x.ndim == 2:
        x = x[:, :, None]
    return x, geometry


def to_tensor(x: np.ndarray, spec: InputSpec) -> np.ndarray:
    """(H, W, C) → (1, H, W, C) or (1, C, H, W), contiguous."""
    if spec.layout == "NCHW":
        x = x.transpose(2, 0, 1)
    return np.ascontiguousarray(x[None])


def prepare_mask(mask: np.ndarray, card: ModelCard, geometry: Geometry) -> np.ndarray:
    """A truth mask (H, W) at source resolution → (in_h, in_w) float32 0/1 label.

    The mask follows the same geometry as the image (area-averaged, then
    thresholded at half so thin defects keep their pixels as long as they cover
    half of one); intensity ops do not apply to masks. Padding that repeats or
    mirrors the image repeats or mirrors the mask with it, so the label stays
    true to what the input shows; constant padding is no defect.
    """
    m = (mask > 127).astype(np.uint8) * 255 if mask.dtype != bool else mask.astype(np.uint8) * 255
    if mask.shape[:2] != (geometry.src_h, geometry.src_w):
        raise ValueError(f"mask {mask.shape[:2]} and image {(geometry.src_h, geometry.src_w)} differ in size")
    plane = resize(m, geometry, "area", 0, card.resize.pad_mode)
    return (plane >= 128).astype(np.float32)

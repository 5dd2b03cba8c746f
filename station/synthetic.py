"""Synthetic light-guide-plate (LGP) images with pixel-exact truth masks.

Used by the ``fake`` camera (plates at a set rate for demos and tests) and by
``export/synth.py`` (training data). numpy + OpenCV only. Everything is a pure
function of the random generator passed in: the same seed gives identical
images.

A plate is a lattice of bright light-extraction dots (square or staggered,
slightly rotated and jittered) on a darker background that falls off away from
the LED edge and towards the corners (vignetting), seen through slightly soft
optics and a noisy sensor. Defects, each drawn together with its mask:

* ``bright_spot`` — bright blobs (one to three overlapping elliptic lobes);
* ``impurity``    — dark particles, alone or in small clusters;
* ``scratch``     — thin bright or dark lines, straight or curved.

Defect sizes are drawn per plate from a *severity* so that graded by total
defect area (default rules: PASS <= 0.5 %, DISCOUNT <= 2 %, REJECT above) all
three grades occur: ``free`` (no defect), ``small`` (PASS), ``medium``
(DISCOUNT) and ``large`` (REJECT). Sizes scale with the image so that the area
fractions hold for any size; the dot pitch is physical and does not.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import NamedTuple, Sequence

import cv2
import numpy as np

log = logging.getLogger(__name__)

CLASSES: tuple[str, ...] = ("bright_spot", "impurity", "scratch")
SEVERITIES: tuple[str, ...] = ("free", "small", "medium", "large")

# Total defect area per severity, % of the image. The gaps around the grading
# thresholds (0.5 % and 2 %) keep a plate's grade unambiguous after resizing.
AREA_RANGE: dict[str, tuple[float, float]] = {
    "free": (0.0, 0.0),
    "small": (0.02, 0.42),
    "medium": (0.6, 1.8),
    "large": (2.4, 9.0),
}
# Share of each severity in a generated data set.
TRAIN_MIX: dict[str, float] = {"free": 0.2, "small": 0.3, "medium": 0.25, "large": 0.25}


@dataclass(frozen=True)
class _SizeRange:
    """Defect dimensions for one severity, in pixels of a 256 × 256 plate."""

    count: tuple[int, int]  # defects per plate, inclusive
    spot_radius: tuple[float, float]
    particle_radius: tuple[float, float]
    scratch_length: tuple[float, float]
    scratch_width: tuple[float, float]


_SIZES: dict[str, _SizeRange] = {
    "small": _SizeRange((1, 3), (2.5, 5.5), (1.0, 3.0), (15.0, 60.0), (1.0, 1.6)),
    "medium": _SizeRange((1, 3), (6.0, 12.0), (3.0, 6.5), (60.0, 150.0), (1.6, 3.2)),
    "large": _SizeRange((1, 4), (12.0, 30.0), (6.0, 13.0), (130.0, 300.0), (2.8, 5.5)),
}
_MAX_ATTEMPTS = 60  # redraws of a plate's defects to land in its severity's area range


class Plate(NamedTuple):
    """One captured plate.

    image: uint8 (H, W) gray. mask: uint8 (H, W), 255 where defective, else 0.
    classes: the defect classes present, sorted (empty for a defect-free plate).
    """

    image: np.ndarray
    mask: np.ndarray
    classes: tuple[str, ...]

    @property
    def area_pct(self) -> float:
        """Total defect area, % of the image."""
        return 100.0 * float(np.count_nonzero(self.mask)) / self.mask.size


@dataclass(frozen=True)
class Scene:
    """A plate before capture: noise-free radiance and its truth.

    radiance: float32 (H, W) in gray levels (0..255 and above before clipping).
    mask: uint8 (H, W) 0/255. primary: the class the plate is filed under
    (None when defect-free).
    """

    radiance: np.ndarray
    mask: np.ndarray
    classes: tuple[str, ...]
    primary: str | None
    severity: str


@dataclass(frozen=True)
class _Defect:
    kind: str
    mask: np.ndarray  # bool (H, W)
    add: np.ndarray | None  # float32 (H, W), added to the radiance
    mul: np.ndarray | None  # float32 (H, W), multiplies the radiance


# --- background and dot lattice ---------------------------------------------


def _grid(h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates, float32 (H, W) each, in pixels."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    return yy + 0.5, xx + 0.5


def _illumination(rng: np.random.Generator, h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    """(light, distance): float32 (H, W) relative illumination (about 0.6..1.3) and the
    normalised distance from the LED edge (0 at the edge, 1 at the far edge)."""
    yy, xx = _grid(h, w)
    edge = int(rng.integers(4))
    distance = [xx / w, 1.0 - xx / w, yy / h, 1.0 - yy / h][edge]
    falloff = 1.0 + np.float32(rng.uniform(0.05, 0.3)) * (1.0 - distance)
    cy = h * (0.5 + rng.uniform(-0.1, 0.1))
    cx = w * (0.5 + rng.uniform(-0.1, 0.1))
    r2 = ((yy - cy) ** 2 + (xx - cx) ** 2) / ((h / 2) ** 2 + (w / 2) ** 2)
    vignette = 1.0 - np.float32(rng.uniform(0.1, 0.35)) * r2
    return (falloff * vignette).astype(np.float32), distance.astype(np.float32)


def _dots(rng: np.random.Generator, h: int, w: int, distance: np.ndarray) -> np.ndarray:
    """float32 (H, W): the dot lattice's added gray levels (peaks of 20..70)."""
    pitch = rng.uniform(7.0, 12.0)
    staggered = bool(rng.random() < 0.5)
    angle = math.radians(rng.uniform(-4.0, 4.0))
    jitter = rng.uniform(0.0, 0.12) * pitch
    sigma = rng.uniform(0.8, 1.3)
    peak = rng.uniform(20.0, 45.0)

    row_step = pitch * (math.sqrt(3.0) / 2.0 if staggered else 1.0)
    n = int(math.ceil(math.hypot(h, w) / min(pitch, row_step))) // 2 + 2
    i, j = np.mgrid[-n : n + 1, -n : n + 1]
    ly = i * row_step
    lx = j * pitch + (np.mod(i, 2) * pitch / 2.0 if staggered else 0.0)
    cos, sin = math.cos(angle), math.sin(angle)
    ys = (h / 2.0 + lx * sin + ly * cos).ravel()
    xs = (w / 2.0 + lx * cos - ly * sin).ravel()
    ys = ys + rng.normal(0.0, jitter, ys.shape) if jitter > 0 else ys
    xs = xs + rng.normal(0.0, jitter, xs.shape) if jitter > 0 else xs
    keep = (ys > -1) & (ys < h) & (xs > -1) & (xs < w)
    ys, xs = ys[keep] - 0.5, xs[keep] - 0.5  # to pixel-index coordinates

    # Dots grow away from the LED so that the plate looks uniform in use.
    y0 = np.floor(ys).astype(np.int64)
    x0 = np.floor(xs).astype(np.int64)
    gain = 0.6 + 0.8 * distance[np.clip(y0, 0, h - 1), np.clip(x0, 0, w - 1)]
    amp = peak * gain * rng.uniform(0.85, 1.15, ys.shape)
    fy, fx = ys - y0, xs - x0
    acc = np.zeros((h, w), np.float64)
    for dy, dx, wt in ((0, 0, (1 - fy) * (1 - fx)), (0, 1, (1 - fy) * fx), (1, 0, fy * (1 - fx)), (1, 1, fy * fx)):
        yi, xi = y0 + dy, x0 + dx
        ok = (yi >= 0) & (yi < h) & (xi >= 0) & (xi < w)
        np.add.at(acc, (yi[ok], xi[ok]), (amp * wt)[ok])
    dots = cv2.GaussianBlur(acc.astype(np.float32), (0, 0), sigma) * np.float32(2.0 * math.pi * sigma * sigma)
    return dots


# --- defects -----------------------------------------------------------------


def _lobe(yy: np.ndarray, xx: np.ndarray, cy: float, cx: float, a: float, b: float, theta: float) -> np.ndarray:
    """Super-Gaussian elliptic profile, float32 (H, W): 1 at the centre, 0.5 on the
    ellipse with semi-axes (a, b) rotated by theta (radians), ~0 beyond."""
    c, s = math.cos(theta), math.sin(theta)
    u = ((xx - cx) * c + (yy - cy) * s) / a
    v = (-(xx - cx) * s + (yy - cy) * c) / b
    d2 = u * u + v * v
    return np.exp(np.float32(-math.log(2.0)) * d2 * d2)


def _centre(rng: np.random.Generator, h: int, w: int, margin: float) -> tuple[float, float]:
    m_y, m_x = min(margin, h / 3), min(margin, w / 3)
    return float(rng.uniform(m_y, h - m_y)), float(rng.uniform(m_x, w - m_x))


def _bright_spot(rng: np.random.Generator, h: int, w: int, radius: float) -> _Defect:
    yy, xx = _grid(h, w)
    cy, cx = _centre(rng, h, w, radius)
    profile = np.zeros((h, w), np.float32)
    for _ in range(int(rng.integers(1, 4))):
        a = radius * rng.uniform(0.6, 1.0)
        b = a * rng.uniform(0.5, 1.0)
        oy, ox = rng.uniform(-0.5, 0.5, 2) * radius
        profile = np.maximum(profile, _lobe(yy, xx, cy + oy, cx + ox, a, b, rng.uniform(0, math.pi)))
    amp = np.float32(rng.uniform(60.0, 130.0))
    return _Defect("bright_spot", profile >= 0.5, amp * profile, None)


def _impurity(rng: np.random.Generator, h: int, w: int, radius: float) -> _Defect:
    yy, xx = _grid(h, w)
    cy, cx = _centre(rng, h, w, 3 * radius)
    profile = np.zeros((h, w), np.float32)
    for k in range(int(rng.integers(1, 6))):
        r = radius * (1.0 if k == 0 else rng.uniform(0.4, 0.9))
        a = max(0.7, r)
        b = max(0.7, a * rng.uniform(0.45, 1.0))
        oy, ox = (0.0, 0.0) if k == 0 else tuple(rng.uniform(-2.5, 2.5, 2) * radius)
        profile = np.maximum(profile, _lobe(yy, xx, cy + oy, cx + ox, a, b, rng.uniform(0, math.pi)))
    depth = np.float32(rng.uniform(0.45, 0.8))
    return _Defect("impurity", profile >= 0.5, None, 1.0 - depth * profile)


_SUPERSAMPLE = 4


def _scratch(rng: np.random.Generator, h: int, w: int, length: float, width: float) -> _Defect:
    """A quadratic Bézier stroke, rasterised at 4× and area-averaged to a coverage map."""
    cy, cx = _centre(rng, h, w, 0.0)
    angle = rng.uniform(0, math.pi)
    dy, dx = math.sin(angle) * length / 2, math.cos(angle) * length / 2
    p0 = np.array([cx - dx, cy - dy])
    p2 = np.array([cx + dx, cy + dy])
    bend = rng.uniform(-0.25, 0.25) * length if rng.random() < 0.5 else 0.0
    p1 = np.array([cx, cy]) + bend * np.array([-math.sin(angle), math.cos(angle)])
    t = np.linspace(0.0, 1.0, 64)[:, None]
    pts = (1 - t) ** 2 * p0 + 2 * (1 - t) * t * p1 + t**2 * p2
    canvas = np.zeros((h * _SUPERSAMPLE, w * _SUPERSAMPLE), np.uint8)
    poly = np.round(pts * _SUPERSAMPLE).astype(np.int32).reshape(-1, 1, 2)
    thickness = max(1, int(round(width * _SUPERSAMPLE)))
    cv2.polylines(canvas, [poly], False, 255, thickness=thickness, lineType=cv2.LINE_8)
    coverage = cv2.resize(canvas, (w, h), interpolation=cv2.INTER_AREA).astype(np.float32) / 255.0
    mask = coverage >= 0.5
    if rng.random() < 0.6:
        return _Defect("scratch", mask, np.float32(rng.uniform(45.0, 100.0)) * coverage, None)
    return _Defect("scratch", mask, None, 1.0 - np.float32(rng.uniform(0.4, 0.7)) * coverage)


def _draw_defects(rng: np.random.Generator, h: int, w: int, severity: str, primary: str) -> list[_Defect]:
    sizes = _SIZES[severity]
    scale = math.sqrt(h * w) / 256.0
    kinds = [primary]
    for _ in range(int(rng.integers(sizes.count[0], sizes.count[1] + 1)) - 1):
        kinds.append(primary if rng.random() < 0.65 else CLASSES[int(rng.integers(len(CLASSES)))])
    defects: list[_Defect] = []
    for kind in kinds:
        if kind == "bright_spot":
            defects.append(_bright_spot(rng, h, w, scale * rng.uniform(*sizes.spot_radius)))
        elif kind == "impurity":
            defects.append(_impurity(rng, h, w, scale * rng.uniform(*sizes.particle_radius)))
        else:
            length = scale * rng.uniform(*sizes.scratch_length)
            defects.append(_scratch(rng, h, w, length, max(1.0, scale * rng.uniform(*sizes.scratch_width))))
    return defects


# --- scene and capture ------------------------------------------------------


def check_size(height: int, width: int) -> None:
    if height < 16 or width < 16:
        raise ValueError(f"plate size {height}x{width}: height and width must be at least 16 pixels")


def make_scene(rng: np.random.Generator, height: int = 256, width: int = 256, severity: str | None = None) -> Scene:
    """Draw one plate and its defects (no sensor noise yet).

    severity: one of :data:`SEVERITIES`, or None to draw it from :data:`TRAIN_MIX`.
    The defects are redrawn (up to 60 times) until their total area falls in
    :data:`AREA_RANGE` for the severity; the closest draw is kept otherwise.
    """
    check_size(height, width)
    if severity is None:
        names = list(TRAIN_MIX)
        severity = names[int(rng.choice(len(names), p=np.array([TRAIN_MIX[n] for n in names])))]
    elif severity not in SEVERITIES:
        raise ValueError(f"severity {severity!r}: expected one of {', '.join(SEVERITIES)}")
    h, w = height, width
    light, distance = _illumination(rng, h, w)
    base = np.float32(rng.uniform(45.0, 80.0))
    radiance = (base + _dots(rng, h, w, distance)) * light

    defects: list[_Defect] = []
    primary: str | None = None
    if severity != "free":
        primary = CLASSES[int(rng.integers(len(CLASSES)))]
        lo, hi = AREA_RANGE[severity]
        best: tuple[float, list[_Defect]] | None = None
        for _ in range(_MAX_ATTEMPTS):
            candidate = _draw_defects(rng, h, w, severity, primary)
            union = np.logical_or.reduce([d.mask for d in candidate])
            area = 100.0 * float(np.count_nonzero(union)) / union.size
            miss = max(lo - area, area - hi, 0.0)
            if best is None or miss < best[0]:
                best = (miss, candidate)
            if miss == 0.0:
                break
        assert best is not None
        defects = best[1]
        if best[0] > 0:
            log.debug("plate %dx%d %s: defect area off its range by %.3f %%", h, w, severity, best[0])

    for d in defects:
        if d.add is not None:
            radiance = radiance + d.add
    for d in defects:
        if d.mul is not None:
            radiance = radiance * d.mul
    radiance = cv2.GaussianBlur(radiance.astype(np.float32), (0, 0), 0.6)  # soft optics
    mask = np.zeros((h, w), np.uint8)
    for d in defects:
        mask[d.mask] = 255
    classes = tuple(sorted({d.kind for d in defects if d.mask.any()}))
    if primary is not None and primary not in classes:
        primary = classes[0] if classes else None
    return Scene(radiance, mask, classes, primary, severity)


def capture(scene: Scene, rng: np.random.Generator) -> Plate:
    """Photograph a scene: exposure gain 0.92..1.08, read and shot noise, 8-bit clipping."""
    x = scene.radiance * np.float32(rng.uniform(0.92, 1.08))
    read_sigma = rng.uniform(1.5, 3.5)
    shot = rng.uniform(0.2, 0.45)
    sigma = np.sqrt(read_sigma**2 + shot * np.maximum(x, 0.0))
    x = x + rng.standard_normal(x.shape).astype(np.float32) * sigma.astype(np.float32)
    image = np.clip(np.rint(x), 0, 255).astype(np.uint8)
    return Plate(image, scene.mask.copy(), scene.classes)


def make_plate(rng: np.random.Generator, height: int = 256, width: int = 256, severity: str | None = None) -> Plate:
    """One captured plate (see :class:`Plate`): :func:`make_scene` then :func:`capture`."""
    return capture(make_scene(rng, height, width, severity), rng)


def to_bgr(gray: np.ndarray, tint: Sequence[float] = (1.0, 0.96, 0.88)) -> np.ndarray:
    """A gray plate (H, W) seen by a colour camera: uint8 BGR (H, W, 3), bluish white light."""
    planes = [np.clip(np.rint(gray.astype(np.float32) * np.float32(k)), 0, 255).astype(np.uint8) for k in tint]
    return cv2.merge(planes)

"""Decoding image files into the frame format every stage expects.

Accepted: 8- and 16-bit, grayscale, BGR/RGB colour, with or without alpha,
CMYK JPEG (OpenCV converts it), any size. The result is uint8 gray (H, W) or
BGR (H, W, 3). 16-bit samples keep their top 8 bits (so 12-bit data stored in
16-bit files must be shifted up by the camera software first); alpha is
dropped (the colour planes of an image with alpha are inspected as they are).
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from . import MAX_PIXELS

from .errors import InputError

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".pgm", ".ppm", ".pbm", ".jp2"})
VIDEO_EXTENSIONS = frozenset({".mp4", ".avi", ".mkv", ".mov", ".m4v", ".webm", ".mpg", ".mpeg", ".wmv"})


def to_frame_image(image: np.ndarray, what: str = "image") -> np.ndarray:
    """Any decoded array → uint8 gray (H, W) or BGR (H, W, 3)."""
    if image is None or image.size == 0:
        raise InputError(f"{what}: empty image")
    if image.dtype == np.uint16:
        image = (image >> 8).astype(np.uint8)
    elif image.dtype != np.uint8:
        raise InputError(f"{what}: unsupported sample type {image.dtype} (8- or 16-bit integers are accepted)")
    if image.ndim == 3:
        channels = image.shape[2]
        if channels == 1:
            image = image[:, :, 0]
        elif channels == 4:
            image = cv2.cvtColor(image, cv2.COLOR_BGRA2BGR)
        elif channels == 2:  # gray + alpha
            image = image[:, :, 0]
        elif channels != 3:
            raise InputError(f"{what}: unsupported channel count {channels}")
    elif image.ndim != 2:
        raise InputError(f"{what}: unsupported array shape {image.shape}")
    return np.ascontiguousarray(image)


def decode_image(data: bytes | np.ndarray, what: str = "image") -> np.ndarray:
    """Encoded bytes → uint8 gray (H, W) or BGR (H, W, 3); InputError if undecodable."""
    buf = np.frombuffer(data, np.uint8) if isinstance(data, (bytes, bytearray, memoryview)) else data
    if buf.size == 0:
        raise InputError(f"{what}: empty file")
    try:
        image = cv2.imdecode(buf, cv2.IMREAD_UNCHANGED)
    except cv2.error as exc:
        if "CV_IO_MAX_IMAGE_PIXELS" in str(exc):
            raise InputError(f"{what}: image exceeds {MAX_PIXELS} pixels") from exc
        raise InputError(f"{what}: cannot decode ({str(exc).strip().splitlines()[-1]})") from exc
    if image is None:
        raise InputError(f"{what}: cannot decode as an image (corrupt, truncated or not an image)")
    if image.shape[0] * image.shape[1] > MAX_PIXELS:
        raise InputError(f"{what}: image exceeds {MAX_PIXELS} pixels ({image.shape[1]}x{image.shape[0]})")
    return to_frame_image(image, what)


def read_image(path: str | Path) -> np.ndarray:
    """Read and decode one image file (see :func:`decode_image`)."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise InputError(f"{path}: cannot read ({exc.strerror or exc})") from exc
    return decode_image(data, str(path))


def read_mask(path: str | Path) -> np.ndarray:
    """Read a truth mask: uint8 (H, W), defect where > 127. A colour mask counts
    a pixel as defect if any channel is > 127 (a pure red annotation is a defect)."""
    image = read_image(path)
    return image if image.ndim == 2 else image.max(axis=2)

"""Decoding image files into the frame format every stage expects.

Accepted: 8- and 16-bit, grayscale, BGR/RGB colour, with or without alpha,
CMYK JPEG (OpenCV converts it), any size within the limits. The result is
uint8 gray (H, W) or BGR (H, W, 3). 16-bit samples keep their top 8 bits (so
12-bit data stored in 16-bit files must be shifted up by the camera software
first); alpha is dropped (the colour planes of an image with alpha are
inspected as they are).

Limits (:class:`~station.config.InputLimits`) are checked before anything is
decoded: the file's size from ``fstat``, then the width x height, channels and
sample size its header declares (read by Pillow, which parses headers only).
What the decoder then allocates is the declared array, and converting it to a
frame costs one frame more: the peak memory of one input is bounded by the
limits. A header Pillow cannot read is left to OpenCV, whose decode refuses it
or (for formats Pillow does not know) is bounded by the file size and
``MAX_PIXELS``.
"""

from __future__ import annotations

import io
import os
import re
import stat
import sys
import warnings
from pathlib import Path
from typing import BinaryIO, Callable

import cv2
import numpy as np
from PIL import Image

from . import MAX_PIXELS
from .config import InputLimits
from .errors import InputError
from .messages import text

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".pgm", ".ppm", ".pbm", ".jp2"})
VIDEO_EXTENSIONS = frozenset({".mp4", ".avi", ".mkv", ".mov", ".m4v", ".webm", ".mpg", ".mpeg", ".wmv"})

DEFAULT_LIMITS = InputLimits()
# Where a limit is configured, for error messages (the folder camera's section;
# `station replay` applies the same one).
_WHERE = "camera.limits"
# Formats OpenCV decodes whose headers Pillow reads: only these Pillow plugins are consulted.
_HEADER_FORMATS = ("PNG", "JPEG", "TIFF", "BMP", "WEBP", "PPM", "JPEG2000", "GIF", "SUN", "AVIF")


def to_frame_image(image: np.ndarray, what: str = "image") -> np.ndarray:
    """Any decoded array → uint8 gray (H, W) or BGR (H, W, 3).

    Samples and channels are selected as views and copied once, so the
    conversion costs one output frame (a 16-bit or 4-channel input is not
    copied at its own size)."""
    if image is None or image.size == 0:
        raise InputError(f"{what}: empty image")
    if image.dtype == np.uint16:
        # The top byte of each native-order sample, as a strided view.
        top = 1 if sys.byteorder == "little" else 0
        image = np.ascontiguousarray(image).view(np.uint8)[..., top::2]
    elif image.dtype != np.uint8:
        raise InputError(f"{what}: unsupported sample type {image.dtype} (8- or 16-bit integers are accepted)")
    if image.ndim == 3:
        channels = image.shape[2]
        if channels in (1, 2):  # gray, gray + alpha
            image = image[:, :, 0]
        elif channels == 4:  # BGRA: the colour planes
            image = image[:, :, :3]
        elif channels != 3:
            raise InputError(f"{what}: unsupported channel count {channels}")
    elif image.ndim != 2:
        raise InputError(f"{what}: unsupported array shape {image.shape}")
    return np.ascontiguousarray(image)


def _check_file_size(size: int, what: str, limits: InputLimits) -> None:
    if size > limits.max_file_bytes:
        raise InputError(f"{what}: file of {size} bytes exceeds the {limits.max_file_bytes}-byte limit "
                         f"({_WHERE}.max_file_bytes)")


def _declared_layout(im: Image.Image, head: bytes) -> tuple[int, int]:
    """(channels, bytes per sample) of the array OpenCV will decode ``im`` into,
    from its header: never less than OpenCV allocates (a palette counts as BGRA)."""
    mode = im.mode
    channels = 4 if mode in ("P", "PA") else len(im.getbands())
    sample = 2 if mode.startswith("I;16") else 4 if mode in ("I", "F") else 1
    if im.format == "PNG" and head[12:16] == b"IHDR" and head[24] == 16:
        sample = 2  # Pillow shows 16-bit colour PNGs as 8-bit modes
    elif im.format == "PPM":
        sample = 2 if _pnm_maxval(head) > 255 else 1  # Pillow's mode I (32-bit) is 16-bit in OpenCV
    elif im.format == "JPEG2000":
        sample = max(sample, 2)  # its modes do not show 16-bit colour either
    elif im.format == "TIFF":
        tags = getattr(im, "tag_v2", {})
        bits = tags.get(258, 8)
        bits = max(bits) if isinstance(bits, tuple) else int(bits)
        sample = max(sample, (bits + 7) // 8)
        channels = max(channels, int(tags.get(277, 1)))
    return channels, sample


def _pnm_maxval(head: bytes) -> int:
    """The largest sample value a P2/P3/P5/P6 header declares; 255 when the
    header does not fit ``head`` (its file size then bounds it: PNM is not compressed)."""
    tokens = re.sub(rb"#[^\n]*", b" ", head).split()
    if len(tokens) > 4 and tokens[0] in (b"P2", b"P3", b"P5", b"P6") and tokens[3].isdigit():
        return int(tokens[3])
    return 255


def check_header(f: BinaryIO, what: str, limits: InputLimits = DEFAULT_LIMITS) -> None:
    """Refuse an image whose header declares more pixels, or a larger decoded
    array, than ``limits`` allow (InputError naming the limit). Reads the header
    only and leaves ``f`` at its start; a header Pillow cannot read passes."""
    head = f.read(256)
    f.seek(0)
    if head.startswith((b"#?RADIANCE", b"#?RGBE")):  # compressed floats: small file, huge array, always refused
        raise InputError(f"{what}: Radiance HDR is a floating-point format (8- or 16-bit integers are accepted)")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            im = Image.open(f, formats=_HEADER_FORMATS)
        except Image.DecompressionBombError as exc:  # Pillow's own ceiling, far above MAX_PIXELS
            declared = (f"{int.from_bytes(head[16:20], 'big')}x{int.from_bytes(head[20:24], 'big')}"
                        if head[12:16] == b"IHDR" else f"more than {2 * (Image.MAX_IMAGE_PIXELS or 0)} pixels")
            raise InputError(f"{what}: image exceeds {limits.max_pixels} pixels ({declared} declared; "
                             f"{_WHERE}.max_pixels)") from exc
        except Exception:  # a header Pillow cannot parse, however it fails, is OpenCV's to refuse
            f.seek(0)
            return
    with im:
        width, height = im.size
        try:
            channels, sample = _declared_layout(im, head)
        except (TypeError, ValueError):  # odd tags: assume the largest array OpenCV makes
            channels, sample = 4, 8
    f.seek(0)
    pixels = width * height
    if pixels > limits.max_pixels:
        raise InputError(f"{what}: image exceeds {limits.max_pixels} pixels ({width}x{height} declared; "
                         f"{_WHERE}.max_pixels)")
    decoded = pixels * channels * sample
    if decoded > limits.max_decoded_bytes:
        raise InputError(
            f"{what}: image would decode to {decoded} bytes ({width}x{height}, {channels} channel(s) of "
            f"{8 * sample} bits declared), over the {limits.max_decoded_bytes}-byte limit ({_WHERE}.max_decoded_bytes)"
        )


def _decoded(decode: Callable[[], np.ndarray | None], what: str, limits: InputLimits) -> np.ndarray:
    """Run one OpenCV decode call → the decoded array as OpenCV returns it; InputError if it fails."""
    try:
        image = decode()
    except cv2.error as exc:
        if "CV_IO_MAX_IMAGE_PIXELS" in str(exc):
            raise InputError(f"{what}: image exceeds {MAX_PIXELS} pixels") from exc
        raise InputError(f"{what}: cannot decode ({str(exc).strip().splitlines()[-1]})") from exc
    if image is None or image.size == 0:
        raise InputError(f"{what}: cannot decode as an image (corrupt, truncated or not an image)")
    if image.shape[0] * image.shape[1] > limits.max_pixels:  # a header Pillow could not read
        raise InputError(f"{what}: image exceeds {limits.max_pixels} pixels ({image.shape[1]}x{image.shape[0]}; "
                         f"{_WHERE}.max_pixels)")
    return image


def decode_image(data: bytes | np.ndarray, what: str = "image", limits: InputLimits = DEFAULT_LIMITS) -> np.ndarray:
    """Encoded bytes → uint8 gray (H, W) or BGR (H, W, 3); InputError if
    undecodable or over ``limits`` (checked before decoding).

    OpenCV's Python binding copies the array ``cv2.imdecode`` returns (a peak
    of twice the decoded size): :func:`read_image` does not, prefer it for files."""
    buf = np.frombuffer(data, np.uint8) if isinstance(data, (bytes, bytearray, memoryview)) else data
    if buf.size == 0:
        raise InputError(f"{what}: empty file")
    _check_file_size(buf.size, what, limits)
    check_header(io.BytesIO(data if isinstance(data, bytes) else buf.tobytes()), what, limits)
    return to_frame_image(_decoded(lambda: cv2.imdecode(buf, cv2.IMREAD_UNCHANGED), what, limits), what)


# OpenCV reads an open file through this link (Linux): the encoded bytes are not
# held in memory, the path is plain ASCII whatever the file's name, and it is
# the file whose size and header were checked.
_FD_LINKS = Path("/proc/self/fd")


def _decode_open(f: BinaryIO, size: int, what: str, limits: InputLimits) -> np.ndarray:
    if not _FD_LINKS.is_dir():
        buf = np.frombuffer(f.read(size), np.uint8)
        return _decoded(lambda: cv2.imdecode(buf, cv2.IMREAD_UNCHANGED), what, limits)
    link = str(_FD_LINKS / str(f.fileno()))
    # With ``dst`` the binding decodes into an array numpy owns: no copy of it.
    return _decoded(lambda: cv2.imread(link, None, cv2.IMREAD_UNCHANGED), what, limits)


def read_image(path: str | Path, limits: InputLimits = DEFAULT_LIMITS) -> np.ndarray:
    """Read and decode one image file (see :func:`decode_image`).

    The file's size (``fstat`` of the opened file) and its header are checked
    before it is decoded; a FIFO or device is refused unread. The peak memory is
    the decoded array plus the frame made of it. Errors name the file as valid
    UTF-8 text, whatever bytes its name holds."""
    what = text(os.fspath(path))
    try:
        # O_NONBLOCK: opening a FIFO must not wait for a writer (it is refused below).
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
        with os.fdopen(fd, "rb") as f:
            st = os.fstat(f.fileno())
            if not stat.S_ISREG(st.st_mode):
                raise InputError(f"{what}: not a regular file")
            if st.st_size == 0:
                raise InputError(f"{what}: empty file")
            _check_file_size(st.st_size, what, limits)
            check_header(f, what, limits)
            image = _decode_open(f, st.st_size, what, limits)
    except OSError as exc:
        raise InputError(f"{what}: cannot read ({exc.strerror or exc})") from exc
    return to_frame_image(image, what)


def read_mask(path: str | Path) -> np.ndarray:
    """Read a truth mask: uint8 (H, W), defect where > 127. A colour mask counts
    a pixel as defect if any channel is > 127 (a pure red annotation is a defect)."""
    image = read_image(path)
    return image if image.ndim == 2 else image.max(axis=2)

"""Decoding every image form a line or an archive produces; bad files give an
InputError naming the file."""

from __future__ import annotations

import os

import cv2
import numpy as np
import pytest

from station.config import InputLimits
from station.errors import InputError
from station.imageio import decode_image, read_image


def encoded(image: np.ndarray, ext: str) -> bytes:
    ok, buf = cv2.imencode(ext, image)
    assert ok
    return buf.tobytes()


rng = np.random.default_rng(0)
GRAY = rng.integers(0, 255, (37, 91), dtype=np.uint8)
BGR = rng.integers(0, 255, (40, 30, 3), dtype=np.uint8)


@pytest.mark.parametrize(
    "image, ext, shape",
    [
        (GRAY, ".png", (37, 91)),
        (BGR, ".png", (40, 30, 3)),
        (BGR, ".jpg", (40, 30, 3)),
        (GRAY, ".bmp", (37, 91)),
        (GRAY.astype(np.uint16) * 257, ".png", (37, 91)),  # 16-bit
        (np.dstack([BGR, np.full(BGR.shape[:2], 128, np.uint8)]), ".png", (40, 30, 3)),  # alpha
        (np.zeros((1, 1), np.uint8), ".png", (1, 1)),
        (GRAY, ".tiff", (37, 91)),
    ],
)
def test_decodes_to_gray_or_bgr_uint8(image, ext, shape):
    out = decode_image(encoded(image, ext))
    assert out.dtype == np.uint8 and out.shape == shape


def test_sixteen_bit_keeps_the_top_byte():
    img16 = (GRAY.astype(np.uint16) << 8) | 0xFF
    assert np.array_equal(decode_image(encoded(img16, ".png")), GRAY)


@pytest.mark.parametrize(
    "data, message",
    [
        (b"", "empty file"),
        (b"this is a text file, not an image", "cannot decode"),
        (encoded(BGR, ".jpg")[:60], "cannot decode"),  # truncated header
    ],
)
def test_undecodable_bytes(data, message):
    with pytest.raises(InputError, match=message):
        decode_image(data, "x.jpg")


def test_read_errors_name_the_file(tmp_path):
    with pytest.raises(InputError, match="nope.png: cannot read"):
        read_image(tmp_path / "nope.png")
    bad = tmp_path / "bad.png"
    bad.write_text("hello")
    with pytest.raises(InputError, match="bad.png: cannot decode"):
        read_image(bad)


def test_cmyk_jpeg(tmp_path):
    Image = pytest.importorskip("PIL.Image")
    path = tmp_path / "cmyk.jpg"
    Image.fromarray(BGR[:, :, ::-1].copy()).convert("CMYK").save(path, "JPEG", quality=95)
    out = read_image(path)
    assert out.dtype == np.uint8 and out.shape == (40, 30, 3)
    assert np.abs(out.astype(int) - BGR.astype(int)).mean() < 40  # colours survive the CMYK round trip


def test_huge_image_is_refused_before_decoding():
    from station import MAX_PIXELS

    side = int(MAX_PIXELS**0.5) + 1
    with pytest.raises(InputError, match=f"huge.png: image exceeds {MAX_PIXELS} pixels"):
        decode_image(encoded(np.zeros((side, side), np.uint8), ".png"), "huge.png")


def test_sixteen_bit_colour_with_alpha_keeps_the_top_byte_and_drops_alpha():
    bgra16 = (np.dstack([BGR, BGR[:, :, :1]]).astype(np.uint16) << 8) | 0x7F
    out = decode_image(encoded(bgra16, ".png"))
    assert out.shape == BGR.shape and np.array_equal(out, BGR)


# 16-bit colour hides in Pillow's 8-bit modes for PNG and TIFF: the declared size
# must still count two bytes a sample.
@pytest.mark.parametrize(
    "image, ext, declared",
    [
        (np.zeros((100, 100, 3), np.uint16), ".png", 60_000),
        (np.zeros((100, 100, 3), np.uint16), ".tiff", 60_000),
        (np.zeros((100, 100, 4), np.uint8), ".png", 40_000),
        (np.zeros((100, 100), np.uint16), ".pgm", 20_000),
        (np.zeros((100, 100, 3), np.uint8), ".jpg", 30_000),
    ],
)
def test_the_decoded_size_is_checked_from_the_header(image, ext, declared):
    data = encoded(image, ext)
    decode_image(data, "ok" + ext, InputLimits(max_decoded_bytes=declared))
    with pytest.raises(InputError, match=rf"x{ext}: image would decode to {declared} bytes .*max_decoded_bytes"):
        decode_image(data, "x" + ext, InputLimits(max_decoded_bytes=declared - 1))


def test_file_size_and_pixel_limits_name_their_setting(tmp_path):
    path = tmp_path / "a.png"
    path.write_bytes(encoded(GRAY, ".png"))
    with pytest.raises(InputError, match=r"a.png: file of \d+ bytes exceeds the 100-byte limit \(camera.limits.max_file_bytes\)"):
        read_image(path, InputLimits(max_file_bytes=100))
    with pytest.raises(InputError, match=r"image exceeds 3000 pixels \(91x37 declared; camera.limits.max_pixels\)"):
        read_image(path, InputLimits(max_pixels=3000))
    assert read_image(path, InputLimits(max_pixels=91 * 37)).shape == GRAY.shape


def test_a_fifo_or_a_device_is_refused_without_waiting(tmp_path):
    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)  # opening it for reading would wait for a writer
    with pytest.raises(InputError, match="pipe.png: not a regular file"):
        read_image(fifo)
    with pytest.raises(InputError, match="not a regular file"):
        read_image("/dev/zero")

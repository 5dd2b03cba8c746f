"""tuning.steady_malloc: glibc's mallopt settings for a steady frame loop (station/memory.py)."""

from __future__ import annotations

import ctypes
import logging
import platform

import pytest

from station import memory
from station.config import load_config


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's; this machine has another libc")
def test_glibc_accepts_the_settings(caplog) -> None:
    caplog.set_level(logging.DEBUG, logger="station.memory")
    assert memory.steady_malloc() is True
    assert "mmap threshold 32 MiB, trim threshold 128 MiB, top pad 64 MiB" in caplog.text
    # what it is for: a frame-sized block (8 MiB: glibc maps anything above 128 KiB at first)
    # now comes from the heap, not from a fresh mapping of its own
    libc = ctypes.CDLL("libc.so.6")
    libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    libc.mallinfo2.restype = Mallinfo2
    mapped = libc.mallinfo2().hblks
    block = libc.malloc(8 * memory.MIB)
    try:
        assert block and libc.mallinfo2().hblks == mapped
    finally:
        libc.free(block)


class Mallinfo2(ctypes.Structure):
    """glibc's struct mallinfo2 (2.33+): ``hblks`` counts the blocks served by their own mmap."""

    _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                      "fsmblks", "uordblks", "fordblks", "keepcost")]


def test_another_c_library_is_left_alone(monkeypatch, caplog) -> None:
    def no_glibc(name):
        raise OSError(f"{name}: cannot open shared object file")

    monkeypatch.setattr(memory.ctypes, "CDLL", no_glibc)
    with caplog.at_level(logging.INFO, logger="station.memory"):
        assert memory.steady_malloc() is False
    assert "not glibc" in caplog.text


def test_a_refused_setting_is_logged(monkeypatch, caplog) -> None:
    class Libc:
        class gnu_get_libc_version:  # noqa: N801 - a C function's name
            restype = None

            def __new__(cls):
                return b"2.99"

        class mallopt:  # noqa: N801
            argtypes = restype = None

            def __new__(cls, param, value):
                return 0 if param == memory.M_TRIM_THRESHOLD else 1

    monkeypatch.setattr(memory.ctypes, "CDLL", lambda name: Libc)
    assert memory.steady_malloc() is False
    assert "glibc 2.99 refused the trim threshold" in caplog.text


def test_the_setting_is_off_by_default_and_can_be_turned_on(tmp_path) -> None:
    path = tmp_path / "s.yaml"
    path.write_text("station: {id: s}\n")
    assert load_config(path).tuning.steady_malloc is False
    path.write_text("station: {id: s}\ntuning: {steady_malloc: true}\n")
    assert load_config(path).tuning.steady_malloc is True

"""The detector's structural options, checked where they are parsed (``export.train_detector``)
and where they are built (``export.detector``); no TensorFlow here."""

from __future__ import annotations

from typing import Sequence

from . import ExportError

LEVEL_STRIDES: tuple[int, ...] = (8, 16, 32)  # the FPN levels a detector head may read (export.detector)


def check_strides(strides: Sequence[int]) -> tuple[int, ...]:
    """``strides`` as a tuple, or ExportError: increasing values from 8, 16, 32, starting at 8."""
    out = tuple(int(v) for v in strides)
    if not out or out[0] != LEVEL_STRIDES[0] or any(v not in LEVEL_STRIDES for v in out) \
            or list(out) != sorted(set(out)):
        raise ExportError(f"--levels {' '.join(map(str, strides))}: strides must increase, start at 8 "
                          f"and come from {' '.join(map(str, LEVEL_STRIDES))}")
    return out


TTA_FLIPS: tuple[str, ...] = ("h", "v", "hv")  # test-time flips: left-right, top-bottom, both (export.detector)


QUALITY_TARGETS: tuple[str, ...] = ("centreness", "iou")  # what the quality logit learns (detector.make_loss)


def check_tta(flips: Sequence[str]) -> tuple[str, ...]:
    """``flips`` as a tuple, or ExportError: each of h, v, hv at most once."""
    out = tuple(flips)
    if any(f not in TTA_FLIPS for f in out) or len(set(out)) != len(out):
        raise ExportError(f"--tta {' '.join(out)}: each of {', '.join(TTA_FLIPS)} at most once")
    return out

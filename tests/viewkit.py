"""Parts whose defects all sit in one corner, inspected for real: images with bright
blobs in the top-left quadrant, graded by the threshold model of onnx_builders.py
(bright pixels are defects) through the same Inspector as the daemon. For the
operator view's and ``station report``'s heatmap tests.

    parts = corner_parts(threshold_model, 12)     # [(Frame, InspectionResult, record)]
"""

from __future__ import annotations

import time
from pathlib import Path

import cv2
import numpy as np

from station.config import parse_config
from station.inspector import Inspector, open_models
from station.messages import result_record
from station.types import Frame, InspectionResult

SIZE = 128


def corner_image(rng: np.random.Generator, defects: bool = True) -> np.ndarray:
    """A dark SIZE × SIZE plate; with ``defects``, one to three bright blobs, all within
    the top-left quadrant (x and y below SIZE / 2)."""
    image = np.full((SIZE, SIZE), 40, np.uint8)
    image += rng.integers(0, 12, image.shape, dtype=np.uint8)
    for _ in range(int(rng.integers(1, 4)) if defects else 0):
        radius = int(rng.integers(3, 8))
        cx, cy = (int(v) for v in rng.integers(radius + 2, SIZE // 2 - radius - 2, 2))
        cv2.circle(image, (cx, cy), radius, 255, -1)
    return image


def corner_parts(model: Path, n: int, seed: int = 3, start: float | None = None,
                 period_s: float = 60.0) -> list[tuple[Frame, InspectionResult, dict]]:
    """``n`` parts (every fourth without defect) captured ``period_s`` apart from ``start``
    (default: now minus the span), inspected with the threshold ``model``."""
    cfg = parse_config(f"models: {{segmentation: {model}}}\n")
    inspector = Inspector(open_models(cfg), cfg, keep_mask=True)
    rng = np.random.default_rng(seed)
    t0 = time.time() - n * period_s if start is None else start
    out = []
    for i in range(n):
        frame = Frame(corner_image(rng, defects=i % 4 != 3), f"corner/{i}.png", seq=i, captured_at=t0 + i * period_s)
        result = inspector.inspect(frame)
        out.append((frame, result, result_record(result)))
    return out

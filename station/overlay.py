"""Drawing a result onto its frame for people: mask tint, boxes, labels, grade."""

from __future__ import annotations

import cv2
import numpy as np

from .types import Grade, InspectionResult

_GRADE_BGR = {Grade.PASS: (60, 170, 60), Grade.DISCOUNT: (0, 165, 255), Grade.REJECT: (40, 40, 220)}
_MASK_BGR = np.array([0, 0, 255], np.float32)
_KIND_BGR = {"segmentation": (0, 220, 255), "detection": (255, 160, 0)}


def draw_overlay(image: np.ndarray, result: InspectionResult, alpha: float = 0.45) -> np.ndarray:
    """image: the source frame (gray (H, W) or BGR (H, W, 3)) → BGR (H, W, 3) annotated copy."""
    out = cv2.cvtColor(image, cv2.COLOR_GRAY2BGR) if image.ndim == 2 else image.copy()
    h, w = out.shape[:2]
    if result.mask is not None and result.mask.any():
        m = result.mask
        tinted = out[m].astype(np.float32) * (1 - alpha) + _MASK_BGR * alpha
        out[m] = tinted.astype(np.uint8)
    scale = max(0.35, min(w, h) / 600)
    thick = max(1, round(min(w, h) / 400))
    d = result.defects
    for i in range(len(d)):
        x1, y1, x2, y2 = (int(round(v)) for v in d.xyxy[i])
        colour = _KIND_BGR[str(d.kind[i])]
        cv2.rectangle(out, (x1, y1), (max(x1, x2 - 1), max(y1, y2 - 1)), colour, thick)
        label = f"{d.class_name[i]} {d.confidence[i]:.2f}"
        cv2.putText(out, label, (x1, max(10, y1 - 3)), cv2.FONT_HERSHEY_SIMPLEX, 0.8 * scale, colour, thick, cv2.LINE_AA)
    grade = result.decision.grade
    banner = f"{grade.value}  {result.defect_area_pct:.2f}%  [{result.decision.rule}]"
    (tw, th), base = cv2.getTextSize(banner, cv2.FONT_HERSHEY_SIMPLEX, scale, thick)
    cv2.rectangle(out, (0, 0), (min(w, tw + 8), th + base + 8), _GRADE_BGR[grade], -1)
    cv2.putText(out, banner, (4, th + 4), cv2.FONT_HERSHEY_SIMPLEX, scale, (255, 255, 255), thick, cv2.LINE_AA)
    return out

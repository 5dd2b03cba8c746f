"""Typed values passed between the stages. Frozen; arrays have fixed names and
shapes checked on construction; "nothing found" is an empty value, never None.

Coordinates are source-image pixels, x to the right, y down, boxes as
``[x1, y1, x2, y2]`` with x2/y2 exclusive.
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True)
class Frame:
    """One decoded image as it left the source.

    image: uint8, (H, W) for grayscale or (H, W, 3) BGR (OpenCV order).
    source: where it came from (a path, ``path#frame=N`` for a video, a camera URL).
    seq: sequence number within the source run, from 0.
    captured_at: UNIX time in seconds when the frame was captured or read.
    part_id: the part this frame shows, when a trigger named one.
    camera_timestamp_ns: the camera's own timestamp of the frame (its clock, in
    ns; GenICam cameras), when the source has one.
    """

    image: np.ndarray
    source: str
    seq: int = 0
    captured_at: float = field(default_factory=time.time)
    part_id: str | None = None
    camera_timestamp_ns: int | None = None

    def __post_init__(self) -> None:
        img = self.image
        if img.dtype != np.uint8:
            raise ValueError(f"Frame.image must be uint8, got {img.dtype}")
        if not (img.ndim == 2 or (img.ndim == 3 and img.shape[2] == 3)):
            raise ValueError(f"Frame.image must be (H, W) or (H, W, 3), got {img.shape}")
        if img.shape[0] < 1 or img.shape[1] < 1:
            raise ValueError(f"Frame.image is empty: {img.shape}")

    @property
    def height(self) -> int:
        return int(self.image.shape[0])

    @property
    def width(self) -> int:
        return int(self.image.shape[1])


KINDS = ("segmentation", "detection")


@dataclass(frozen=True)
class Defects:
    """N defects in source-pixel coordinates.

    xyxy: (N, 4) float32 boxes [x1, y1, x2, y2].
    confidence: (N,) float32 in [0, 1] (mean mask probability, or detector score).
    class_name: (N,) str.
    area_px: (N,) float64, pixels covered (mask pixels, or box area for detections).
    kind: (N,) str, "segmentation" or "detection".
    """

    xyxy: np.ndarray
    confidence: np.ndarray
    class_name: np.ndarray
    area_px: np.ndarray
    kind: np.ndarray

    def __post_init__(self) -> None:
        n = self.xyxy.shape[0]
        if self.xyxy.shape != (n, 4):
            raise ValueError(f"Defects.xyxy must be (N, 4), got {self.xyxy.shape}")
        for name in ("confidence", "class_name", "area_px", "kind"):
            arr = getattr(self, name)
            if arr.shape != (n,):
                raise ValueError(f"Defects.{name} must be ({n},), got {arr.shape}")
        bad = set(np.unique(self.kind).tolist()) - set(KINDS)
        if bad:
            raise ValueError(f"Defects.kind has unknown values {sorted(bad)}")

    @classmethod
    def empty(cls) -> "Defects":
        return cls(
            xyxy=np.zeros((0, 4), np.float32),
            confidence=np.zeros((0,), np.float32),
            class_name=np.zeros((0,), dtype="<U1"),
            area_px=np.zeros((0,), np.float64),
            kind=np.zeros((0,), dtype="<U1"),
        )

    @classmethod
    def concat(cls, parts: list["Defects"]) -> "Defects":
        parts = [p for p in parts if len(p)]
        if not parts:
            return cls.empty()
        if len(parts) == 1:
            return parts[0]
        return cls(
            xyxy=np.concatenate([p.xyxy for p in parts]),
            confidence=np.concatenate([p.confidence for p in parts]),
            class_name=np.concatenate([p.class_name for p in parts]),
            area_px=np.concatenate([p.area_px for p in parts]),
            kind=np.concatenate([p.kind for p in parts]),
        )

    def __len__(self) -> int:
        return int(self.xyxy.shape[0])


class Grade(str, enum.Enum):
    PASS = "PASS"
    DISCOUNT = "DISCOUNT"
    REJECT = "REJECT"

    @property
    def severity(self) -> int:
        return _SEVERITY[self]


_SEVERITY = {Grade.PASS: 0, Grade.DISCOUNT: 1, Grade.REJECT: 2}


@dataclass(frozen=True)
class GradeDecision:
    """The grade and the rule that decided it.

    rule: a stable identifier, e.g. ``total_area_pct`` or ``class.crack.count``.
    reason: a sentence for people, e.g. ``total defect area 3.10 % > 2.00 %``.
    """

    grade: Grade
    rule: str
    reason: str


@dataclass(frozen=True)
class InspectionResult:
    """Everything the Inspector found on one frame.

    id: unique per inspection (a UUID), kept when the result is re-sent.

    defect_area_px / defect_area_pct: the union of defective pixels (segmentation
    mask, plus detection boxes where no segmentation model runs), in source pixels
    and in % of the frame area.
    mask: (H, W) bool union mask at source resolution, or None when no
    segmentation model ran.
    latency_ms: stage name → milliseconds (preprocess, infer.<role>, postprocess, grade).
    camera_timestamp_ns: the frame's camera timestamp (Frame.camera_timestamp_ns), when it has one.
    """

    id: str
    station_id: str
    source: str
    seq: int
    part_id: str | None
    captured_at: float
    width: int
    height: int
    decision: GradeDecision
    defects: Defects
    defect_area_px: float
    defect_area_pct: float
    models: dict[str, str]
    latency_ms: dict[str, float] = field(default_factory=dict)
    mask: np.ndarray | None = None
    camera_timestamp_ns: int | None = None


@dataclass(frozen=True)
class FrameError:
    """A frame a source could not deliver (undecodable file, broken video frame).

    It travels through the pipeline in place of a Frame so that it becomes an
    error record instead of vanishing.
    """

    source: str
    seq: int
    error: str
    part_id: str | None = None

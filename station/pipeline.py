"""The Inspector: preprocess → infer → postprocess → grade for one frame.

No threads, no network, no files: ``station run`` and ``station replay`` both
call :meth:`Inspector.inspect`, so live and offline results agree bit for bit.
Models are opened by :func:`open_models` (file I/O) and handed in.
"""

from __future__ import annotations

import logging
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import postprocess
from .config import DEMO_MODEL, StationConfig
from .errors import ConfigError
from .grade import grade
from .infer import OnnxModel
from .modelcard import DetectionOutputs, MaskOutput
from .preprocess import Geometry, preprocess, to_tensor
from .types import Defects, Frame, InspectionResult

log = logging.getLogger(__name__)

ROLES = ("segmentation", "detection")


def open_models(cfg: StationConfig, seg: Path | None = None, det: Path | None = None) -> dict[str, OnnxModel]:
    """Open the configured models (command-line paths override the config).

    With no model anywhere, the bundled demo segmentation model is used.
    Each model's card task must match its slot. A sha256 pinned in the config
    (``models.<role>_sha256``) applies to the config's file, not to an override.
    """
    paths = {"segmentation": seg or cfg.models.segmentation, "detection": det or cfg.models.detection}
    pins = {"segmentation": None if seg else cfg.models.segmentation_sha256,
            "detection": None if det else cfg.models.detection_sha256}
    if paths["segmentation"] is None and paths["detection"] is None:
        log.info("no model configured: using the bundled demo model %s", DEMO_MODEL)
        paths["segmentation"] = DEMO_MODEL
    models = {}
    for role, path in paths.items():
        if path is None:
            continue
        model = OnnxModel(path, cfg.inference.providers, cfg.inference.intra_op_threads, sha256=pins[role],
                          settings=cfg.inference)
        if model.task != role:
            raise ConfigError(f"{path}: is a {model.task} model but was given as the {role} model")
        log.info("%s model %s (%s v%s) on %s", role, path, model.card.name, model.card.version, ", ".join(model.providers))
        models[role] = model
    return models


class Inspector:
    """Inspects frames with up to one segmentation and one detection model.

    keep_mask: keep the (H, W) bool union mask in the result (needed for mask
    files, overlays and mask payloads; costs one frame-sized array per result).
    """

    def __init__(self, models: dict[str, OnnxModel], cfg: StationConfig, keep_mask: bool = True):
        unknown = set(models) - set(ROLES)
        if unknown or not models:
            raise ValueError(f"models must be a non-empty subset of {ROLES}, got {sorted(models)}")
        self.models = models
        self.cfg = cfg
        self.keep_mask = keep_mask
        self.model_ids = {role: m.sha256 for role, m in models.items()}

    def inspect(self, frame: Frame) -> InspectionResult:
        """All stages on this thread: preprocess → infer → postprocess → grade."""
        return self.finish(self.infer(self.prepare(frame)))

    # The three stages, for callers that overlap them on threads (the daemon):
    # the same functions in the same order, so the results are the same.

    def prepare(self, frame: Frame) -> "Work":
        """Preprocess the frame for every model (pure CPU work)."""
        work = Work(frame, self)
        for role, model in self.models.items():
            t = time.perf_counter()
            x, geometry = preprocess(frame.image, model.card)
            work.tensors[role] = to_tensor(x, model.card.input)
            work.geometries[role] = geometry
            work.latency[f"preprocess.{role}"] = (time.perf_counter() - t) * 1e3
        return work

    def infer(self, work: "Work") -> "Work":
        """Run every model (ONNX Runtime; releases the GIL)."""
        for role, model in self.models.items():
            t = time.perf_counter()
            work.outputs[role] = model.run(work.tensors.pop(role))
            work.latency[f"infer.{role}"] = (time.perf_counter() - t) * 1e3
        return work

    def finish(self, work: "Work") -> InspectionResult:
        """Postprocess every model's outputs, merge the defects and grade."""
        frame = work.frame
        latency = work.latency
        parts: list[Defects] = []
        mask: np.ndarray | None = None
        post = self.cfg.postprocess
        for role, model in self.models.items():
            card = model.card
            t = time.perf_counter()
            outputs, geometry = work.outputs[role], work.geometries[role]
            if isinstance(card.output, MaskOutput):
                prob = postprocess.mask_probabilities(outputs[card.output.name], card.output)
                found, m = postprocess.mask_defects(
                    prob, geometry, card.output.threshold, card.classes, post.min_area_px, post.min_score
                )
                mask = m if mask is None else (mask | m)
            else:
                assert isinstance(card.output, DetectionOutputs)
                found = postprocess.detection_defects(outputs, card.output, card.classes, geometry, post.min_score)
            parts.append(found)
            latency[f"postprocess.{role}"] = (time.perf_counter() - t) * 1e3

        t = time.perf_counter()
        defects = Defects.concat(parts)
        frame_px = frame.width * frame.height
        if mask is not None:
            area_px = float(np.count_nonzero(mask))
        else:  # detection only: the union of the boxes
            area_px = float(postprocess.box_union_area(defects.xyxy, frame.height, frame.width))
        area_pct = 100.0 * area_px / frame_px
        decision = grade(defects, area_pct, frame_px, self.cfg.grading)
        latency["grade"] = (time.perf_counter() - t) * 1e3
        latency["total"] = sum(latency.values())  # the stages' own time, without waits between them
        return InspectionResult(
            id=str(uuid.uuid4()),
            station_id=self.cfg.station.id,
            source=frame.source,
            seq=frame.seq,
            part_id=frame.part_id,
            captured_at=frame.captured_at,
            width=frame.width,
            height=frame.height,
            decision=decision,
            defects=defects,
            defect_area_px=area_px,
            defect_area_pct=area_pct,
            models=dict(self.model_ids),
            latency_ms=latency,
            mask=mask if self.keep_mask else None,
        )


@dataclass
class Work:
    """One frame between the Inspector's stages: the tensors prepared for each
    model (role → array), their geometries, the raw outputs, and the stage
    latencies so far (ms). ``inspector`` is the one that prepared it, so a
    reload in between cannot mix two model sets on one frame."""

    frame: Frame
    inspector: Inspector
    tensors: dict[str, np.ndarray] = field(default_factory=dict)
    geometries: dict[str, Geometry] = field(default_factory=dict)
    outputs: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)
    latency: dict[str, float] = field(default_factory=dict)

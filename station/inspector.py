"""The Inspector: preprocess → infer → postprocess → grade for one frame.

No threads, no network, no files: ``station run`` and ``station replay`` both
call :meth:`Inspector.inspect`, so live and offline results agree bit for bit.
Models are opened by :func:`open_models` (file I/O) and handed in. The daemon
runs the same stages on threads of its own (station/pipeline.py), and a frame's
models at the same time with ``tuning.parallel_models`` (station/parallel.py).
"""

from __future__ import annotations

import logging
import os
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import cast

import numpy as np

from . import postprocess, synthetic
from .config import DEMO_MODEL, StationConfig
from .errors import ConfigError, StationError
from .grade import grade
from .infer import OnnxModel
from .modelcard import DetectionOutputs, MaskOutput
from .preprocess import Geometry, preprocess, to_tensor
from .types import Defects, Frame, InspectionResult

log = logging.getLogger(__name__)

WARM_PARTS = 5  # synthetic parts through every stage before the first real one (Inspector.warm_up)


def role_of(key: str) -> str:
    """The role of a model key: ``segmentation``, ``segmentation.2``… → ``segmentation``."""
    return key.split(".", 1)[0]


def segmentation_keys(n: int) -> list[str]:
    """The keys of ``n`` segmentation models: ``segmentation``, then ``segmentation.2``…"""
    return ["segmentation"][:n] + [f"segmentation.{i}" for i in range(2, n + 1)]


def open_models(cfg: StationConfig, seg: Sequence[Path] | Path | None = None,
                det: Path | None = None) -> dict[str, OnnxModel]:
    """Open the configured models (command-line paths override the config).

    With no model anywhere, the bundled demo segmentation model is used.
    Several segmentation models (a list in the config, or several paths given)
    are keyed ``segmentation``, ``segmentation.2``…; the Inspector averages
    their probabilities. Each model's card task must match its slot. A sha256
    pinned in the config (``models.<role>_sha256``) applies to the config's
    files, not to an override.
    """
    if isinstance(seg, Path):
        seg = [seg]
    seg_paths = list(seg) if seg else cfg.models.segmentation_files
    seg_pins = [None] * len(seg_paths) if seg else cfg.models.segmentation_pins
    if len(set(map(Path, seg_paths))) != len(seg_paths):
        raise ConfigError(f"a segmentation model is given twice: {', '.join(map(str, seg_paths))}")
    det_path = det or cfg.models.detection
    if not seg_paths and det_path is None:
        log.info("no model configured: using the bundled demo model %s", DEMO_MODEL)
        seg_paths, seg_pins = [DEMO_MODEL], [None]
    slots = [(key, path, pin) for key, path, pin in zip(segmentation_keys(len(seg_paths)), seg_paths, seg_pins)]
    if det_path is not None:
        slots.append(("detection", det_path, None if det else cfg.models.detection_sha256))
    threads = model_threads(cfg, len(slots))
    models = {}
    for key, path, pin in slots:
        role = role_of(key)
        model = OnnxModel(path, cfg.inference.providers, threads, sha256=pin, settings=cfg.inference,
                          spin=cfg.tuning.spin)
        if model.task != role:
            raise ConfigError(f"{path}: is a {model.task} model but was given as the {role} model")
        log.info("%s model %s (%s v%s) on %s", key, path, model.card.name, model.card.version, ", ".join(model.providers))
        models[key] = model
    return models


def model_threads(cfg: StationConfig, n_models: int) -> int:
    """ONNX Runtime intra-op threads per model: ``tuning.intra_op_threads``, or
    with 0 and ``parallel_models``, this process's cores shared out among the models
    (0 otherwise: ONNX Runtime's default, one per core)."""
    threads = cfg.tuning.intra_op_threads
    if threads == 0 and cfg.tuning.parallel_models and n_models > 1:
        threads = max(1, len(os.sched_getaffinity(0)) // n_models)
    return threads


def mask_threshold(models: Mapping[str, OnnxModel], cfg: StationConfig) -> float | None:
    """The segmentation probability threshold: ``postprocess.mask_threshold``, or the
    card's ``output.threshold`` (the mean of the cards' with several models); None
    without a segmentation model."""
    # a segmentation slot holds a segmentation card (open_models), whose output is a mask (ModelCard's validator)
    cards = [cast(MaskOutput, m.card.output).threshold for k, m in models.items() if role_of(k) == "segmentation"]
    if not cards:
        return None
    return cfg.postprocess.mask_threshold if cfg.postprocess.mask_threshold is not None else float(np.mean(cards))


class Inspector:
    """Inspects frames with segmentation models (one, or several averaged) and up
    to one detection model.

    Several segmentation models (keys ``segmentation``, ``segmentation.2``…, as
    :func:`open_models` names them) must have the same classes; each is fed its
    own card's preprocessing, and their probability maps meet at source
    resolution, where their mean is thresholded (``postprocess.mask_threshold``,
    by default the mean of their cards' thresholds) and cut into regions as one
    model's would be.

    keep_mask: keep the (H, W) bool union mask in the result (needed for mask
    files, overlays and mask payloads; costs one frame-sized array per result).
    """

    def __init__(self, models: dict[str, OnnxModel], cfg: StationConfig, keep_mask: bool = True):
        seg = [k for k in models if role_of(k) == "segmentation"]
        wanted = segmentation_keys(len(seg)) + ["detection"]
        if not models or any(k not in wanted for k in models) or seg != segmentation_keys(len(seg)):
            raise ValueError("models must be keyed segmentation, segmentation.2, … (in order), then detection; "
                             f"got {list(models)}")
        for key in seg[1:]:
            first, other = models[seg[0]], models[key]
            if list(other.card.classes) != list(first.card.classes):
                raise ConfigError(f"{other.path}: its classes {list(other.card.classes)} are not those of "
                                  f"{first.path} ({list(first.card.classes)}): segmentation models are averaged "
                                  "class by class")
        self.models = models
        self.cfg = cfg
        self.keep_mask = keep_mask
        self.model_ids = {key: m.sha256 for key, m in models.items()}
        self.segmentation = seg
        self.mask_threshold = mask_threshold(models, cfg)

    def warm_up(self, infer: "Callable[[Work], Work] | None" = None, parts: int = WARM_PARTS) -> None:
        """Inspect ``parts`` synthetic plates, results discarded, through the stages
        the caller will use (``infer``: the daemon's infer stage, a ParallelInfer; default: this
        thread). A model's first runs after its load-time warm-up run, and the first
        post-processing calls, are still slower than the later ones (figures in
        docs/lab/benchmarks.md, sitting 4); the line's first parts should not pay
        for that."""
        first = next(iter(self.models.values())).card.input
        h, w = max(first.height, 16), max(first.width, 16)
        rng = np.random.default_rng(0)
        for i in range(parts):
            plate = synthetic.make_plate(rng, h, w, severity="large")
            try:
                self.finish((infer or self.infer)(self.prepare(Frame(plate.image, "warm-up", seq=i))))
            except Exception as exc:
                raise StationError(f"warm-up: a synthetic {h}x{w} part failed to inspect: {exc}") from exc

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

    def infer(self, work: "Work", roles: Sequence[str] | None = None) -> "Work":
        """Run every model, or those of ``roles`` (ONNX Runtime; releases the GIL).
        Calls for different roles of one Work may run on different threads."""
        for role in self.models if roles is None else roles:
            model = self.models[role]
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
        if self.segmentation:
            t = time.perf_counter()
            prob, geometry = self.segmentation_probabilities(work)
            classes = self.models["segmentation"].card.classes
            assert self.mask_threshold is not None  # set whenever there is a segmentation model
            found, mask = postprocess.mask_defects(
                prob, geometry, self.mask_threshold, classes, post.min_area_px, post.min_score
            )
            parts.append(found)
            latency["postprocess.segmentation"] = (time.perf_counter() - t) * 1e3
        if "detection" in self.models:
            card = self.models["detection"].card
            assert isinstance(card.output, DetectionOutputs)
            t = time.perf_counter()
            found = postprocess.detection_defects(work.outputs["detection"], card.output, card.classes,
                                                  work.geometries["detection"], post.min_score)
            parts.append(found)
            latency["postprocess.detection"] = (time.perf_counter() - t) * 1e3

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
        # The stages' own time, without waits between them; models run at the same
        # time (ParallelInfer) count with the wall time of the infer stage ("infer").
        together = "infer" in latency
        latency["total"] = sum(v for k, v in latency.items() if not (together and k.startswith("infer.")))
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
            camera_timestamp_ns=frame.camera_timestamp_ns,
        )


    def segmentation_probabilities(self, work: "Work") -> tuple[np.ndarray, Geometry]:
        """The segmentation probabilities to threshold and their geometry: one model's
        at its input resolution (mapped to the frame by ``mask_defects``), or the mean
        of several models' at source resolution (each mapped there by its own geometry)."""
        maps = []
        for key in self.segmentation:
            out = self.models[key].card.output
            assert isinstance(out, MaskOutput)
            maps.append((postprocess.mask_probabilities(work.outputs[key][out.name], out), work.geometries[key]))
        if len(maps) == 1:
            return maps[0]
        frame = work.frame
        identity = Geometry.identity(frame.height, frame.width)
        # The mean cannot exceed the mean of the models' maxima (bilinear resizing
        # cannot raise a maximum): below the threshold, no map needs resizing, and a
        # 1 x 1 map of zeros stands for the frame (most good parts).
        if np.mean([g.crop(p).max() for p, g in maps]) <= self.mask_threshold:
            return np.zeros((1, 1, maps[0][0].shape[2]), np.float32), Geometry(frame.height, frame.width, 1, 1, 1, 1)
        total = np.zeros((frame.height, frame.width, maps[0][0].shape[2]), np.float32)
        for p, g in maps:
            total += g.to_source(p)
        return total / len(maps), identity


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

"""``station replay``: recorded images and videos → the same Inspector → JSONL,
mask files and overlays, with a summary at the end."""

from __future__ import annotations

import logging
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, TextIO

import cv2
import numpy as np
from tqdm import tqdm

from .camera.files import FileSource
from .config import FolderCamera, InputLimits
from .messages import dumps, error_record, result_record
from .overlay import draw_overlay
from .inspector import Inspector
from .types import Frame, FrameError, Grade

log = logging.getLogger(__name__)


@dataclass
class ReplaySummary:
    """What a replay run did: results per grade, errors, and per-stage latencies (ms)."""

    grades: Counter = field(default_factory=Counter)
    errors: int = 0
    latencies: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    seconds: float = 0.0

    @property
    def inspected(self) -> int:
        return sum(self.grades.values())

    def add(self, record: dict) -> None:
        if "error" in record:
            self.errors += 1
            return
        self.grades[record["grade"]] += 1
        for stage, ms in record["latency_ms"].items():
            self.latencies[stage].append(ms)

    def latency_table(self) -> dict[str, dict[str, float]]:
        return {
            stage: {"p50": float(np.percentile(v, 50)), "p99": float(np.percentile(v, 99))}
            for stage, v in self.latencies.items()
        }

    def as_dict(self) -> dict:
        return {
            "inspected": self.inspected,
            "errors": self.errors,
            "grades": {g.value: self.grades.get(g.value, 0) for g in Grade},
            "latency_ms": self.latency_table(),
            "seconds": round(self.seconds, 3),
        }

    def format(self) -> str:
        lines = [
            f"inspected {self.inspected} frame(s), {self.errors} error(s) in {self.seconds:.1f} s",
            "  " + "   ".join(f"{g.value} {self.grades.get(g.value, 0)}" for g in Grade),
        ]
        table = self.latency_table()
        if table:
            width = max(len(s) for s in table)
            lines.append(f"  {'stage':<{width}}  {'p50 ms':>8}  {'p99 ms':>8}")
            for stage, q in table.items():
                lines.append(f"  {stage:<{width}}  {q['p50']:8.2f}  {q['p99']:8.2f}")
        return "\n".join(lines)


class _Names:
    """Unique artifact file names: ``<stem>.png``, video frames ``<stem>_f<N>.png``;
    a stem seen twice (same name in two folders) gets ``__2``, ``__3``…"""

    def __init__(self) -> None:
        self.seen: Counter = Counter()

    def __call__(self, source: str) -> str:
        path, _, frame = source.partition("#frame=")
        stem = Path(path).stem + (f"_f{int(frame):06d}" if frame else "")
        self.seen[stem] += 1
        n = self.seen[stem]
        if n > 1:
            log.warning("%s: another input has the same name; writing it as %s__%d", source, stem, n)
            stem = f"{stem}__{n}"
        return stem


def _write_png(path: Path, image: np.ndarray) -> None:
    ok, buf = cv2.imencode(".png", image)
    if not ok:  # pragma: no cover - encoding a uint8 array does not fail
        raise OSError(f"{path}: PNG encoding failed")
    path.write_bytes(buf.tobytes())


def replay(
    inputs: Iterable[str | Path],
    inspector: Inspector,
    out: TextIO,
    masks_dir: Path | None = None,
    overlays_dir: Path | None = None,
    progress: bool = True,
) -> ReplaySummary:
    """Inspect every frame of ``inputs``, writing one JSON line per frame to ``out``.

    Image files are held to the folder camera's ``limits`` when the config has
    a folder camera, to the default limits otherwise: a file over them, or one
    that cannot be decoded, gets an error record and the run goes on."""
    camera = inspector.cfg.camera
    limits = camera.limits if isinstance(camera, FolderCamera) else InputLimits()
    source = FileSource(list(inputs), limits=limits)
    for d in (masks_dir, overlays_dir):
        if d is not None:
            d.mkdir(parents=True, exist_ok=True)
    names = _Names()
    summary = ReplaySummary()
    station_id = inspector.cfg.station.id
    t0 = time.perf_counter()
    bar = tqdm(total=len(source), unit="file", disable=not progress, dynamic_ncols=True)
    last_file = None
    try:
        for item in source:
            if isinstance(item, FrameError):
                record = error_record(item.source, item.error, item.seq, station_id)
            else:
                record = _inspect_one(item, inspector, names, masks_dir, overlays_dir, station_id)
            out.write(dumps(record) + "\n")
            summary.add(record)
            file = record["source"].partition("#frame=")[0]
            if file != last_file:
                bar.update(1)
                last_file = file
            bar.set_postfix_str(f"{summary.grades.get('REJECT', 0)} reject, {summary.errors} err", refresh=False)
    finally:
        bar.close()
        out.flush()
    summary.seconds = time.perf_counter() - t0
    return summary


def _inspect_one(
    frame: Frame,
    inspector: Inspector,
    names: _Names,
    masks_dir: Path | None,
    overlays_dir: Path | None,
    station_id: str,
) -> dict:
    try:
        result = inspector.inspect(frame)
    except Exception as exc:  # one bad frame must not end the run
        log.exception("%s: inspection failed", frame.source)
        return error_record(frame.source, f"inspection failed: {exc}", frame.seq, station_id)
    record = result_record(result)
    if masks_dir is not None or overlays_dir is not None:
        stem = names(frame.source)
        try:
            if masks_dir is not None and result.mask is not None:
                _write_png(masks_dir / f"{stem}.png", result.mask.view(np.uint8) * 255)
            if overlays_dir is not None:
                _write_png(overlays_dir / f"{stem}.png", draw_overlay(frame.image, result))
        except OSError as exc:
            log.error("%s: cannot write mask/overlay: %s", frame.source, exc)
    return record

"""Live frame sources for the line daemon.

A live source is opened, read frame by frame, and closed. ``read(timeout)``
returns a Frame, a FrameError for a frame it got but cannot decode, or None
when nothing arrived within the timeout (an empty folder, a paced video
between frames). It raises CameraError when the source is lost — the daemon
then reopens it with capped backoff — and EndOfSource when a finite source
(a video without loop) has delivered everything.

``done(frame)`` is called once the frame's result is stored durably; sources
that must dispose of their input (the folder source) do it then, so a crash in
between re-inspects the file instead of losing it.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from pathlib import Path
from typing import Callable, Protocol, Sequence

import cv2
import numpy as np

from ..config import CameraConfig
from ..errors import CameraError, InputError
from ..imageio import IMAGE_EXTENSIONS, read_image, to_frame_image
from ..types import Frame, FrameError

log = logging.getLogger(__name__)


class EndOfSource(Exception):
    """A finite source has delivered its last frame (not an error)."""


class LiveSource(Protocol):
    name: str
    # True for sources whose frames are parts that wait for us (files in a
    # folder, an unpaced video): the daemon never drops their frames, it
    # lets them wait. Camera streams are not: a full queue drops their frames.
    lossless: bool

    def open(self) -> None: ...

    def read(self, timeout: float) -> Frame | FrameError | None: ...

    def done(self, frame: Frame | FrameError) -> None: ...

    def close(self) -> None: ...


_BACKENDS = {"any": cv2.CAP_ANY, "v4l2": cv2.CAP_V4L2, "gstreamer": cv2.CAP_GSTREAMER, "ffmpeg": cv2.CAP_FFMPEG}


class _CaptureSource:
    """What the OpenCV-backed sources share: a cv2.VideoCapture, turning a
    captured array into a Frame (or a FrameError), nothing to dispose of."""

    name: str
    _cap: cv2.VideoCapture | None

    def _frame(self, image, source: str, seq: int) -> Frame | FrameError:
        try:
            return Frame(to_frame_image(image, source), source, seq, time.time())
        except InputError as exc:
            return FrameError(source, seq, str(exc))

    def done(self, frame: Frame | FrameError) -> None:
        pass

    def close(self) -> None:
        if self._cap is not None:
            self._cap.release()
            self._cap = None


class OpenCVSource(_CaptureSource):
    """A camera through OpenCV: a device index (V4L2), a URL (RTSP/HTTP) or a
    GStreamer pipeline ending in ``appsink``. ``read`` blocks for as long as
    the driver does; a failed read means the camera is lost."""

    def __init__(self, device: int | str, backend: str = "any", width: int | None = None,
                 height: int | None = None, fps: float | None = None):
        self.device = device
        self.backend = backend
        self.size = (width, height)
        self.fps = fps
        self.name = f"opencv:{device}"
        self.lossless = False
        self._cap: cv2.VideoCapture | None = None
        self._seq = 0

    def open(self) -> None:
        cap = cv2.VideoCapture(self.device, _BACKENDS[self.backend])
        if not cap.isOpened():
            cap.release()
            raise CameraError(f"{self.name}: cannot open (backend {self.backend})")
        w, h = self.size
        if w:
            cap.set(cv2.CAP_PROP_FRAME_WIDTH, w)
        if h:
            cap.set(cv2.CAP_PROP_FRAME_HEIGHT, h)
        if self.fps:
            cap.set(cv2.CAP_PROP_FPS, self.fps)
        self._cap = cap

    def read(self, timeout: float) -> Frame | FrameError | None:
        if self._cap is None:
            raise CameraError(f"{self.name}: not open")
        ok, image = self._cap.read()
        if not ok:
            raise CameraError(f"{self.name}: no frame (camera lost)")
        seq, self._seq = self._seq, self._seq + 1
        return self._frame(image, self.name, seq)


class VideoSource(_CaptureSource):
    """A video file, optionally looped and paced at its own frame rate (to
    replay a recording as if it were the line camera)."""

    def __init__(self, path: str | Path, loop: bool = False, realtime: bool = False):
        self.path = Path(path)
        self.loop = loop
        self.realtime = realtime
        self.name = f"video:{self.path}"
        self.lossless = not realtime
        self._cap: cv2.VideoCapture | None = None
        self._index = 0
        self._seq = 0
        self._period = 0.0
        self._next_due = 0.0

    def open(self) -> None:
        if not self.path.is_file():
            raise CameraError(f"{self.path}: video file not found")
        cap = cv2.VideoCapture(str(self.path))
        if not cap.isOpened():
            cap.release()
            raise CameraError(f"{self.path}: cannot open as a video")
        fps = cap.get(cv2.CAP_PROP_FPS) or 0.0
        self._period = 1.0 / fps if (self.realtime and fps > 0) else 0.0
        self._next_due = time.monotonic()
        self._index = 0
        self._cap = cap

    def read(self, timeout: float) -> Frame | FrameError | None:
        if self._cap is None:
            raise CameraError(f"{self.name}: not open")
        if self._period:
            wait = self._next_due - time.monotonic()
            if wait > timeout:
                time.sleep(max(0.0, timeout))
                return None
            if wait > 0:
                time.sleep(wait)
            self._next_due = max(self._next_due + self._period, time.monotonic() - self._period)
        ok, image = self._cap.read()
        if not ok:
            if self._index == 0:
                raise CameraError(f"{self.path}: no decodable frame")
            if not self.loop:
                raise EndOfSource(f"{self.path}: end of video after {self._index} frames")
            self._cap.set(cv2.CAP_PROP_POS_FRAMES, 0)
            self._index = 0
            ok, image = self._cap.read()
            if not ok:
                raise CameraError(f"{self.path}: cannot rewind")
        source = f"{self.path}#frame={self._index}"
        self._index += 1
        seq, self._seq = self._seq, self._seq + 1
        return self._frame(image, source, seq)


class FolderSource:
    """Watches a folder for new image files, the way vendor camera SDKs hand
    frames to line PCs. A file is taken once its modification time is at
    least ``settle_s`` old (so half-written files are left alone), oldest
    first. After its result is stored, the file is deleted, moved to
    ``move_to`` or kept (``after``); kept files are remembered by name, size
    and mtime so they are not inspected twice while the daemon runs.
    """

    def __init__(self, path: str | Path, after: str = "delete", move_to: str | Path | None = None,
                 extensions: Sequence[str] | None = None, poll_interval: float = 0.05, settle_s: float = 0.2):
        if after == "move" and move_to is None:
            raise ValueError("after='move' needs move_to")
        self.path = Path(path)
        self.after = after
        self.move_to = Path(move_to) if move_to is not None else None
        self.extensions = frozenset(e.lower() for e in (extensions or IMAGE_EXTENSIONS))
        self.poll_interval = poll_interval
        self.settle_s = settle_s
        self.name = f"folder:{self.path}"
        self.lossless = True
        self._taken: set[tuple[str, int, int]] = set()
        self._in_flight: dict[int, Path] = {}
        self._queue: list[Path] = []
        self._seq = 0

    def open(self) -> None:
        if not self.path.is_dir():
            raise CameraError(f"{self.path}: watched folder does not exist")
        if self.move_to is not None:
            self.move_to.mkdir(parents=True, exist_ok=True)

    def _scan(self) -> None:
        now = time.time()
        ready = []
        present: set[tuple[str, int, int]] = set()
        try:
            with os.scandir(self.path) as it:
                for entry in it:
                    if not entry.is_file() or Path(entry.name).suffix.lower() not in self.extensions:
                        continue
                    st = entry.stat()
                    if now - st.st_mtime < self.settle_s:
                        continue
                    key = (entry.name, st.st_size, st.st_mtime_ns)
                    present.add(key)
                    if key in self._taken:
                        continue
                    ready.append((st.st_mtime_ns, entry.name, key))
        except OSError as exc:
            raise CameraError(f"{self.path}: cannot list the watched folder ({exc.strerror or exc})") from exc
        self._taken &= present  # forget files that are gone: the set stays as small as the folder
        for _, name, key in sorted(ready):
            self._taken.add(key)
            self._queue.append(self.path / name)

    def read(self, timeout: float) -> Frame | FrameError | None:
        deadline = time.monotonic() + timeout
        while not self._queue:
            self._scan()
            if self._queue:
                break
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            time.sleep(min(self.poll_interval, left))
        path = self._queue.pop(0)
        seq, self._seq = self._seq, self._seq + 1
        self._in_flight[seq] = path
        try:
            return Frame(read_image(path), str(path), seq, time.time())
        except InputError as exc:
            return FrameError(str(path), seq, str(exc))

    def done(self, frame: Frame | FrameError) -> None:
        path = self._in_flight.pop(frame.seq, None)
        if path is None or self.after == "keep":
            return
        try:
            if self.after == "delete":
                path.unlink(missing_ok=True)
            else:
                assert self.move_to is not None
                shutil.move(str(path), str(self.move_to / path.name))
        except OSError as exc:
            log.error("%s: cannot %s processed file: %s", path, self.after, exc)

    def close(self) -> None:
        pass


class FakeSource:
    """Synthetic light-guide plates (station.synthetic): a first-class camera
    for demos, tests and benchmarks.

    fps: frames per second, or None for as fast as they are taken (then the
    source is lossless: the daemon waits for inspection instead of dropping).
    distinct: make that many plates at open and cycle through them, so frames
    cost nothing to produce (benchmarks); None makes a new plate per frame.
    frames: end after that many frames. fail_after_frames: lose the camera
    after that many frames, refuse to reopen for ``fail_for_s``, then come
    back (once).
    """

    def __init__(self, fps: float | None = 10.0, height: int = 256, width: int = 256, seed: int = 0,
                 frames: int | None = None, fail_after_frames: int | None = None, fail_for_s: float = 1.0,
                 distinct: int | None = None):
        self.fps = fps
        self.size = (height, width)
        self.seed = seed
        self.frames = frames
        self.fail_after = fail_after_frames
        self.fail_for_s = fail_for_s
        self.distinct = distinct
        self.name = f"fake:{seed}"
        self.lossless = fps is None
        self._seq = 0
        self._open = False
        self._failed_at: float | None = None
        self._next_due = 0.0
        self._plates: list[np.ndarray] = []

    def _plate(self, index: int) -> np.ndarray:
        from ..synthetic import make_plate

        return make_plate(np.random.default_rng([self.seed, index]), *self.size).image

    def open(self) -> None:
        if self._failed_at is not None and time.monotonic() - self._failed_at < self.fail_for_s:
            raise CameraError(f"{self.name}: camera not responding (simulated loss)")
        if self.distinct and not self._plates:
            self._plates = [self._plate(i) for i in range(self.distinct)]
        self._open = True
        self._next_due = time.monotonic()

    def read(self, timeout: float) -> Frame | FrameError | None:
        if not self._open:
            raise CameraError(f"{self.name}: not open")
        if self.frames is not None and self._seq >= self.frames:
            raise EndOfSource(f"{self.name}: {self.frames} frames delivered")
        if self.fail_after is not None and self._failed_at is None and self._seq >= self.fail_after:
            self._failed_at = time.monotonic()
            self._open = False
            raise CameraError(f"{self.name}: camera lost after {self._seq} frames (simulated)")
        if self.fps is not None:
            wait = self._next_due - time.monotonic()
            if wait > timeout:
                time.sleep(max(0.0, timeout))
                return None
            if wait > 0:
                time.sleep(wait)
            self._next_due = max(self._next_due + 1.0 / self.fps, time.monotonic() - 1.0 / self.fps)
        seq, self._seq = self._seq, self._seq + 1
        image = self._plates[seq % len(self._plates)] if self._plates else self._plate(seq)
        return Frame(image, f"{self.name}#frame={seq}", seq, time.time())

    def done(self, frame: Frame | FrameError) -> None:
        pass

    def close(self) -> None:
        self._open = False


# The registry: camera.type → frame source. Fakes are sources like the others.
SOURCES: dict[str, Callable[..., LiveSource]] = {
    "folder": lambda c: FolderSource(c.path, c.after, c.move_to, c.extensions, c.poll_interval_s, c.settle_s),
    "video": lambda c: VideoSource(c.path, c.loop, c.realtime),
    "opencv": lambda c: OpenCVSource(c.device, c.backend, c.width, c.height, c.fps),
    "fake": lambda c: FakeSource(c.fps, c.height, c.width, c.seed, c.frames, c.fail_after_frames, c.fail_for_s, c.distinct),
}


def make_source(cfg: CameraConfig) -> LiveSource:
    """The frame source for a ``camera`` config section, chosen by its ``type``."""
    return SOURCES[cfg.type](cfg)

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
from typing import Callable, Protocol, Sequence, runtime_checkable

import cv2
import numpy as np

from ..config import CameraConfig, InputLimits
from ..errors import CameraError, InputError
from ..imageio import DEFAULT_LIMITS, IMAGE_EXTENSIONS, read_image, to_frame_image
from ..messages import text
from ..types import Frame, FrameError
from .genicam import GenICamSource

log = logging.getLogger(__name__)


class EndOfSource(Exception):
    """A finite source has delivered its last frame (not an error)."""


@runtime_checkable
class SoftwareTriggered(Protocol):
    """A source that takes a frame only when told to (a GenICam camera with
    ``trigger_mode: software``): while ``wants_software_trigger`` is true, the
    station's trigger calls ``fire()`` once for every part it accepts, from any
    thread; ``fire`` returns at once."""

    wants_software_trigger: bool

    def fire(self) -> None: ...


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
        if isinstance(self.device, str) and text(self.device) != self.device:
            raise CameraError(f"{text(self.name)}: not valid UTF-8 (OpenCV cannot open it)")
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
        if text(str(self.path)) != str(self.path):  # OpenCV's bindings crash on such a path
            raise CameraError(f"{text(str(self.path))}: the name is not valid UTF-8 (OpenCV cannot open it)")
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
    frames to line PCs.

    A file is taken once its size and modification time have been seen
    unchanged for ``settle_s`` by this process's clock (a writer's clock, or a
    file server's, does not matter: a modification time in the future is
    taken, with a warning), oldest first. Names starting with '.' are never
    taken: write under such a name, or an extension not taken, then rename.

    After its result is stored, the file is deleted, moved to ``move_to`` or
    kept (``after``); kept files are remembered by name, size and mtime so they
    are not inspected twice while the daemon runs. A file that could not be
    read or decoded (a FrameError: unreadable, corrupt, over a limit) is moved
    to ``rejected_to`` (default ``<path>/rejected``) once its error record is
    stored, whatever ``after`` says: it is never taken again, after a restart
    either, and never holds up the files behind it. A file the process died
    decoding twice in a row (the marker ``.station-decoding`` tells the next
    start) is refused unread.
    """

    MARKER = ".station-decoding"

    def __init__(self, path: str | Path, after: str = "delete", move_to: str | Path | None = None,
                 extensions: Sequence[str] | None = None, poll_interval: float = 0.05, settle_s: float = 0.2,
                 rejected_to: str | Path | None = None, limits: InputLimits = DEFAULT_LIMITS):
        if after == "move" and move_to is None:
            raise ValueError("after='move' needs move_to")
        self.path = Path(path)
        self.after = after
        self.move_to = Path(move_to) if move_to is not None else None
        self.rejected_to = Path(rejected_to) if rejected_to is not None else self.path / "rejected"
        self.extensions = frozenset(e.lower() for e in (extensions or IMAGE_EXTENSIONS))
        self.poll_interval = poll_interval
        self.settle_s = settle_s
        self.limits = limits
        self.name = f"folder:{self.path}"
        self.lossless = True
        self._marker = self.path / self.MARKER
        self._crashed: tuple[str, int] | None = None  # (name, decodes the process died in) from the marker
        self._seen: dict[str, tuple[int, int, float]] = {}  # name → size, mtime_ns, when first seen so (monotonic)
        self._taken: set[tuple[str, int, int]] = set()
        self._in_flight: dict[int, Path] = {}
        self._queue: list[Path] = []
        self._seq = 0

    def open(self) -> None:
        if not self.path.is_dir():
            raise CameraError(f"{self.path}: watched folder does not exist")
        if self.move_to is not None:
            self.move_to.mkdir(parents=True, exist_ok=True)
        try:
            attempts, _, name = self._marker.read_bytes().partition(b"\n")
        except FileNotFoundError:
            return
        except OSError as exc:
            log.error("%s: cannot read: %s", self._marker, exc)
            return
        if attempts.isdigit() and name:
            self._crashed = (os.fsdecode(name), int(attempts))
            log.warning("%s: the last run stopped while decoding it (%s time(s))", text(name), int(attempts))

    def _scan(self) -> None:
        now = time.monotonic()
        ready = []
        seen: dict[str, tuple[int, int, float]] = {}
        present: set[tuple[str, int, int]] = set()
        try:
            with os.scandir(self.path) as it:
                for entry in it:
                    if entry.name.startswith(".") or Path(entry.name).suffix.lower() not in self.extensions:
                        continue
                    try:
                        if not entry.is_file():
                            continue
                        st = entry.stat()
                    except FileNotFoundError:  # renamed or removed since it was listed
                        continue
                    key = (entry.name, st.st_size, st.st_mtime_ns)
                    present.add(key)
                    if key in self._taken:
                        continue
                    prev = self._seen.get(entry.name)
                    since = prev[2] if prev is not None and prev[:2] == key[1:] else now
                    seen[entry.name] = (st.st_size, st.st_mtime_ns, since)
                    if now - since >= self.settle_s:
                        ready.append((st.st_mtime_ns, entry.name, key))
        except OSError as exc:
            raise CameraError(f"{self.path}: cannot list the watched folder ({exc.strerror or exc})") from exc
        self._seen = seen  # files gone or taken are forgotten: both stay as small as the folder
        self._taken &= present
        wall_ns = time.time_ns()
        for mtime_ns, name, key in sorted(ready):
            if mtime_ns > wall_ns + 1_000_000_000:
                log.warning("%s: modified %.0f s in the future (clocks out of step?); taken, as it is stable",
                            text(str(self.path / name)), (mtime_ns - wall_ns) / 1e9)
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
        source = text(str(path))
        return self._decode(path, source, seq)

    def _decode(self, path: Path, source: str, seq: int) -> Frame | FrameError:
        """Decode one file between writes of the marker, so that a file that kills
        the process (a decoder crash, the OOM killer) is refused after two tries."""
        crashed = self._crashed[1] if self._crashed is not None and self._crashed[0] == path.name else 0
        if crashed >= 2:
            self._crashed = None
            self._mark(None)
            return FrameError(source, seq, f"{source}: the station stopped twice while decoding this file: refused")
        marked = self._mark(f"{crashed + 1}\n".encode() + os.fsencode(path.name))
        try:
            return Frame(read_image(path, self.limits), source, seq, time.time())
        except InputError as exc:
            return FrameError(source, seq, str(exc))
        except Exception as exc:  # one hostile file must not stop the line: its error record, then the next file
            log.exception("%s: decoding failed", source)
            return FrameError(source, seq, f"{source}: cannot decode ({type(exc).__name__}: {exc})")
        finally:
            if marked:
                self._mark(None)
            if crashed:
                self._crashed = None

    def _mark(self, content: bytes | None) -> bool:
        """Write (or, None, remove) the marker; False when the folder refuses it."""
        try:
            if content is None:
                self._marker.unlink(missing_ok=True)
            else:
                self._marker.write_bytes(content)
            return True
        except OSError as exc:
            log.debug("%s: %s", self._marker, exc)
            return False

    def done(self, frame: Frame | FrameError) -> None:
        path = self._in_flight.pop(frame.seq, None)
        if path is None:
            return
        try:
            if isinstance(frame, FrameError):
                self._reject(path)
            elif self.after == "delete":
                path.unlink(missing_ok=True)
            elif self.after == "move":
                assert self.move_to is not None
                shutil.move(str(path), str(self.move_to / path.name))
        except OSError as exc:
            log.error("%s: cannot %s processed file: %s", text(str(path)),
                      "reject" if isinstance(frame, FrameError) else self.after, exc)

    def _reject(self, path: Path) -> None:
        """Move a file that could not be inspected aside, under a name not yet taken there."""
        self.rejected_to.mkdir(parents=True, exist_ok=True)
        target = self.rejected_to / path.name
        n = 1
        while target.exists():
            n += 1
            target = self.rejected_to / f"{path.stem}__{n}{path.suffix}"
        shutil.move(str(path), str(target))
        log.warning("%s: could not be inspected; moved to %s", text(str(path)), text(str(target)))

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
    "folder": lambda c: FolderSource(c.path, c.after, c.move_to, c.extensions, c.poll_interval_s, c.settle_s,
                                     c.rejected_to, c.limits),
    "video": lambda c: VideoSource(c.path, c.loop, c.realtime),
    "opencv": lambda c: OpenCVSource(c.device, c.backend, c.width, c.height, c.fps),
    "fake": lambda c: FakeSource(c.fps, c.height, c.width, c.seed, c.frames, c.fail_after_frames, c.fail_for_s, c.distinct),
    "genicam": GenICamSource,
}


def make_source(cfg: CameraConfig) -> LiveSource:
    """The frame source for a ``camera`` config section, chosen by its ``type``."""
    return SOURCES[cfg.type](cfg)

"""Recorded inputs: image files, folders of them (recursive) and video files."""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Iterator, Sequence

import cv2

from ..config import InputLimits
from ..errors import InputError
from ..imageio import DEFAULT_LIMITS, IMAGE_EXTENSIONS, VIDEO_EXTENSIONS, read_image, to_frame_image
from ..messages import text
from ..types import Frame, FrameError

log = logging.getLogger(__name__)


def expand_inputs(paths: Sequence[str | Path]) -> list[Path]:
    """Command-line paths → files in a stable order.

    A folder contributes its image and video files (by extension, recursively,
    sorted); a named file is taken whatever its extension, so a mislabelled
    file still gets an error record rather than being skipped. A path that does
    not exist is kept: it yields an error record.
    """
    out: list[Path] = []
    known = IMAGE_EXTENSIONS | VIDEO_EXTENSIONS
    for raw in paths:
        p = Path(raw)
        if p.is_dir():
            found: list[Path] = []
            for root, dirs, files in os.walk(p):
                dirs.sort()
                found.extend(Path(root) / f for f in sorted(files) if Path(f).suffix.lower() in known)
            if not found:
                log.warning("%s: no image or video files in this folder", p)
            out.extend(found)
        else:
            out.append(p)
    return out


def is_video(path: Path) -> bool:
    return path.suffix.lower() in VIDEO_EXTENSIONS


class FileSource:
    """Frames from image and video files, in order; ``seq`` counts every frame.

    Videos yield one frame per decoded video frame, ``source`` being
    ``path#frame=N``. A video that cannot be opened, or an image that cannot be
    decoded or is over ``limits``, yields a FrameError and the run goes on.
    Sources and errors name files as valid UTF-8 text (see
    :func:`station.messages.text`), whatever bytes their names hold.
    """

    def __init__(self, paths: Sequence[str | Path], every_nth_video_frame: int = 1,
                 limits: InputLimits = DEFAULT_LIMITS):
        self.files = expand_inputs(paths)
        self.every_nth = max(1, every_nth_video_frame)
        self.limits = limits
        self._seq = 0

    def __len__(self) -> int:
        return len(self.files)

    def _next_seq(self) -> int:
        seq = self._seq
        self._seq += 1
        return seq

    def __iter__(self) -> Iterator[Frame | FrameError]:
        for path in self.files:
            if is_video(path):
                yield from self._video(path)
                continue
            source = text(str(path))
            try:
                image = read_image(path, self.limits)
            except InputError as exc:
                yield FrameError(source, self._next_seq(), str(exc))
                continue
            except Exception as exc:  # one hostile file must not end the run: its error record, then the next
                log.exception("%s: decoding failed", source)
                yield FrameError(source, self._next_seq(), f"{source}: cannot decode ({type(exc).__name__}: {exc})")
                continue
            yield Frame(image=image, source=source, seq=self._next_seq(), captured_at=time.time())

    def _video(self, path: Path) -> Iterator[Frame | FrameError]:
        name = text(str(path))
        if not path.is_file():
            yield FrameError(name, self._next_seq(), f"{name}: no such file")
            return
        if name != str(path):  # OpenCV's bindings crash (SIGSEGV) on a path that is not valid UTF-8
            yield FrameError(name, self._next_seq(), f"{name}: cannot open as a video: its name is not valid UTF-8 "
                             "(rename the file)")
            return
        cap = cv2.VideoCapture(str(path))
        try:
            if not cap.isOpened():
                yield FrameError(name, self._next_seq(), f"{name}: cannot open as a video")
                return
            expected = int(cap.get(cv2.CAP_PROP_FRAME_COUNT) or 0)
            index = 0
            while True:
                ok, image = cap.read()
                if not ok:
                    break
                if index % self.every_nth == 0:
                    source = f"{name}#frame={index}"
                    try:
                        yield Frame(to_frame_image(image, source), source, self._next_seq(), time.time())
                    except InputError as exc:
                        yield FrameError(source, self._next_seq(), str(exc))
                index += 1
            if index == 0:
                yield FrameError(name, self._next_seq(), f"{name}: video has no decodable frame")
            elif expected and index < expected:
                yield FrameError(
                    f"{name}#frame={index}", self._next_seq(), f"{name}: decoding stopped at frame {index} of {expected}"
                )
        finally:
            cap.release()

    def close(self) -> None:
        pass

"""Frame sources: where frames come from.

A source yields :class:`~station.types.Frame` values, or
:class:`~station.types.FrameError` for a frame it could not decode, so that a
bad input becomes an error record instead of stopping the run.
"""

from __future__ import annotations

from typing import Iterator, Protocol

from ..types import Frame, FrameError


class FrameSource(Protocol):
    def __iter__(self) -> Iterator[Frame | FrameError]: ...

    def close(self) -> None: ...


from .files import FileSource, expand_inputs  # noqa: E402

__all__ = ["FrameSource", "FileSource", "expand_inputs"]

"""Thread priorities: the models keep the cores.

On a small edge CPU the station's Python threads (capture, pre- and
post-processing, the outbox, MQTT) and ONNX Runtime compete for the same cores.
Every millisecond the scheduler gives a Python thread on the core of a running
model stretches that model's run, and the line slows down although the cores
were never idle. The daemon therefore raises the nice value of every thread but
inference by ``run.nice_non_inference``: ONNX Runtime runs whenever it can, and
the rest of a frame's work fills the time the models leave free.

Linux keeps a nice value per thread (``setpriority(PRIO_PROCESS, tid)``) and a
new thread inherits its creator's, so lowering a thread also lowers the threads
it starts (paho's network thread). OpenCV starts its worker pool once, from
the first thread that needs it, so the preprocessing thread re-creates the
pool after lowering itself (:func:`adopt_opencv_pool`). Raising a nice value
back needs privileges: a lowered thread stays lowered until it ends.
"""

from __future__ import annotations

import logging
import os
import threading

import cv2

log = logging.getLogger(__name__)

MAX_NICE = 19


def lower_this_thread(increment: int) -> int | None:
    """Raise the calling thread's nice value by ``increment`` (capped at 19).

    Returns the new nice value, or None when nothing was changed (``increment``
    0, or a platform or sandbox that refuses per-thread priorities: logged).
    """
    if increment <= 0:
        return None
    tid = threading.get_native_id()
    try:
        nice = min(MAX_NICE, os.getpriority(os.PRIO_PROCESS, tid) + increment)
        os.setpriority(os.PRIO_PROCESS, tid, nice)
    except (AttributeError, OSError) as exc:  # no setpriority (not POSIX) or refused
        log.warning("thread %s keeps its priority: %s", threading.current_thread().name, exc)
        return None
    return nice


def adopt_opencv_pool() -> None:
    """Re-create OpenCV's worker threads from the calling thread, so that they
    run at its priority (they inherit it when they start)."""
    n = cv2.getNumThreads()
    if n > 1:
        cv2.setNumThreads(1)  # ends the current workers
        cv2.setNumThreads(n)  # the next parallel call starts new ones from this thread

"""Thread priorities and CPUs: the ``tuning`` section (docs/tuning.md).

Every knob here is off by default: the plain setup (every thread at the
process's priority, on any CPU) is what wins on a typical host. Each one helped
on some host and cost on another; set one where ``station bench`` shows it helps.

On a small edge CPU the station's Python threads (capture, pre- and
post-processing, the outbox, MQTT) and ONNX Runtime compete for the same cores.
``tuning.nice_non_inference`` raises the nice value of every thread but
inference: ONNX Runtime runs whenever it can, and the rest of a frame's work
fills the time the models leave free.

Linux keeps a nice value per thread (``setpriority(PRIO_PROCESS, tid)``) and a
new thread inherits its creator's, so lowering a thread also lowers the threads
it starts (paho's network thread). OpenCV starts its worker pool once, from
the first thread that needs it, so the preprocessing thread re-creates the
pool after lowering itself (:func:`adopt_opencv_pool`). Raising a nice value
back needs privileges: a lowered thread stays lowered until it ends.

``tuning.realtime_inference`` puts the threads that run the models under
``SCHED_FIFO`` at that priority (:func:`realtime_this_thread`): no ordinary
thread of the machine preempts them, and they give their core up only when a
run ends. The kernel keeps 5 % of every second for ordinary threads
(``kernel.sched_rt_runtime_us``), so the rest of the station still runs. It
needs ``CAP_SYS_NICE`` or an ``RLIMIT_RTPRIO`` of at least that priority
(systemd: ``LimitRTPRIO=``); where both are missing the threads keep their
ordinary policy, and the log says so. A model given more than one ONNX Runtime
thread also runs on ONNX Runtime's own pool, whose threads keep the ordinary
policy: the setting serves models of one thread each (``tuning.parallel_models``
on a small CPU, or ``tuning.intra_op_threads: 1``). Beside ``SCHED_FIFO`` models
a ``nice_non_inference`` above 0 only puts a frame's own Python work behind
every other process of the machine.

A thread woken while both cores run models (paho's network thread on a PUBACK,
the broker on a PUBLISH) may wait on the core of the longest run even when the
other core goes idle meanwhile. With ``tuning.infer_cpu`` the infer thread,
which runs the frame's first model, is pinned to that CPU and every other
thread of the station to the rest (:func:`split_cpus`). The broker, a process
of its own, is kept off that CPU by its own unit (docs/mqtt.md); ``station
bench`` does it for the broker it starts.

Alone on its CPU under ``SCHED_FIFO``, the infer thread meets the kernel's
real-time limit when a queue of frames keeps it busy: a real-time thread that
has used 950 ms of a second on its CPU is stopped for the rest of that second.
``tuning.infer_nice`` runs it under the ordinary policy at that nice value
instead (:func:`nice_this_thread`), never stopped, but other processes' threads
may take its CPU for a moment, which lengthens a paced line's latency tail. The
other models' threads keep ``tuning.realtime_inference``.

:class:`ThreadPolicy` holds these decisions, taken once from the ``tuning``
section; every thread of the daemon applies its part of it to itself as it
starts.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import threading
from collections.abc import Iterator
from typing import TYPE_CHECKING

import cv2

from .errors import ConfigError

if TYPE_CHECKING:
    from .config import TuningConfig

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


def nice_this_thread(nice: int) -> bool:
    """Set the calling thread's nice value to ``nice`` (-20 to 19) under the ordinary policy.

    Returns True when set; False for a platform or process that refuses it (a value below
    the current one needs ``CAP_SYS_NICE`` or an ``RLIMIT_NICE`` that allows it: logged).
    """
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), nice)
    except (AttributeError, OSError) as exc:
        log.warning("thread %s keeps its nice value (tuning.infer_nice %d refused: %s)",
                    threading.current_thread().name, nice, exc)
        return False
    return True


def realtime_this_thread(priority: int) -> bool:
    """Run the calling thread under ``SCHED_FIFO`` at ``priority`` (1-99).

    Returns True when the policy was set; False for ``priority`` 0 (off), or for a
    platform or process that refuses it (no privilege, no ``RLIMIT_RTPRIO``: logged).
    """
    if priority <= 0:
        return False
    try:
        # pid 0: the calling thread (Linux keeps a scheduling policy per thread)
        os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(priority))
    except (AttributeError, OSError) as exc:
        log.warning("thread %s keeps its ordinary scheduling policy (tuning.realtime_inference %d refused: %s)",
                    threading.current_thread().name, priority, exc)
        return False
    return True


def infer_policy_this_thread(realtime: int, nice: int | None) -> str | None:
    """The infer thread's policy, as the daemon's infer stage and the bench's bare runs
    take it: ``nice`` under the ordinary policy when set (``tuning.infer_nice``), else
    ``SCHED_FIFO`` at ``realtime`` (``tuning.realtime_inference``). Returns "nice" or
    "fifo" for the one granted, None when neither was asked or it was refused (logged)."""
    if nice is not None:
        return "nice" if nice_this_thread(nice) else None
    return "fifo" if realtime_this_thread(realtime) else None


def split_cpus(infer_cpu: int | None) -> tuple[set[int], set[int]] | None:
    """``tuning.infer_cpu`` → (the infer thread's CPUs, every other thread's), or None
    when it is not set. ConfigError when this process may not run on that CPU or
    has no other CPU left, or the platform cannot pin threads."""
    if infer_cpu is None:
        return None
    if not hasattr(os, "sched_getaffinity"):
        raise ConfigError(f"tuning.infer_cpu {infer_cpu}: this platform cannot pin threads to CPUs")
    allowed = os.sched_getaffinity(0)
    if infer_cpu not in allowed:
        raise ConfigError(f"tuning.infer_cpu {infer_cpu}: this process may run on CPUs {sorted(allowed)} only")
    others = allowed - {infer_cpu}
    if not others:
        raise ConfigError(f"tuning.infer_cpu {infer_cpu}: this process may run on that CPU only, "
                          "and every other thread needs one more")
    return {infer_cpu}, others


def pin_this_thread(cpus: set[int] | None) -> None:
    """Run the calling thread (and the threads it starts from now on) on ``cpus``; None: leave it."""
    if cpus is not None:
        os.sched_setaffinity(0, cpus)  # pid 0: the calling thread (Linux keeps an affinity per thread)


def adopt_opencv_pool() -> None:
    """Re-create OpenCV's worker threads from the calling thread, so that they
    run at its priority (they inherit it when they start)."""
    n = cv2.getNumThreads()
    if n > 1:
        cv2.setNumThreads(1)  # ends the current workers
        cv2.setNumThreads(n)  # the next parallel call starts new ones from this thread


@dataclasses.dataclass(frozen=True)
class ThreadPolicy:
    """Where and at what priority each thread of the station runs, decided once.

    nice: the increment of every thread but inference (``tuning.nice_non_inference``);
    realtime: ``tuning.realtime_inference``;
    infer_nice: ``tuning.infer_nice``; cpus: (the infer thread's CPUs, every other
    thread's) with ``tuning.infer_cpu`` (:func:`split_cpus`), else None. The default
    changes nothing: every thread keeps its creator's priority and CPUs.

    Each thread applies its part to itself as it starts: :meth:`background` (every
    thread but inference), :meth:`infer` (the infer stage), :meth:`helper` (the
    threads that run a frame's other models at the same time), :meth:`main` (the
    thread that starts the others).
    """

    nice: int = 0
    realtime: int = 0
    infer_nice: int | None = None
    cpus: tuple[set[int], set[int]] | None = None

    @classmethod
    def from_tuning(cls, tuning: TuningConfig) -> "ThreadPolicy":
        """The policy of a ``tuning`` section; ConfigError for a ``tuning.infer_cpu`` this process cannot use."""
        return cls(tuning.nice_non_inference, tuning.realtime_inference, tuning.infer_nice,
                   split_cpus(tuning.infer_cpu))

    def background(self, opencv: bool = False) -> None:
        """Every thread but inference: ``nice`` steps below its creator. ``opencv``: the
        thread preprocesses, and OpenCV's workers follow it (:func:`adopt_opencv_pool`)."""
        if lower_this_thread(self.nice) is not None and opencv:
            adopt_opencv_pool()

    def infer(self) -> str | None:
        """The infer thread: on its own CPU, under :func:`infer_policy_this_thread`;
        "nice", "fifo" or None as that returns."""
        pin_this_thread(self.cpus[0] if self.cpus is not None else None)
        return infer_policy_this_thread(self.realtime, self.infer_nice)

    def helper(self) -> None:
        """A thread that runs one of a frame's other models: off the infer thread's CPU,
        under ``SCHED_FIFO`` at ``realtime`` when set."""
        pin_this_thread(self.cpus[1] if self.cpus is not None else None)
        realtime_this_thread(self.realtime)

    @contextlib.contextmanager
    def main(self) -> Iterator[None]:
        """The calling thread, while it starts and runs the others: off the infer thread's
        CPU, so that every thread started from it (paho's, the models' helpers, the
        stages) is too; its CPUs are given back at the end."""
        if self.cpus is None:
            yield
            return
        before = os.sched_getaffinity(0)
        pin_this_thread(self.cpus[1])
        try:
            yield
        finally:
            pin_this_thread(before)

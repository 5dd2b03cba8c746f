"""A frame's models at the same time (``tuning.parallel_models``).

:class:`ParallelInfer` is the daemon's infer stage then: the frame's first model
runs on the infer thread, each other model on a helper thread of its own.
:class:`Settling` is what those helpers yield to with
``tuning.helper_yield_ms``: the frames before, until they are finished and
acknowledged.
"""

from __future__ import annotations

import collections
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, wait

from .inspector import Work
from .priority import ThreadPolicy


class ParallelInfer:
    """The infer stage with ``tuning.parallel_models``: a frame's first model runs
    on the calling thread and each other model on a helper thread of its own, at
    the same time (ONNX Runtime releases the GIL). Without the setting, or with one
    model, it is ``Inspector.infer``. The Inspector itself starts no threads. The
    helpers take their part of ``policy`` as they start (:meth:`ThreadPolicy.helper`:
    off the infer thread's CPU, under ``SCHED_FIFO`` when set; the calling thread's
    policy is its own).

    ``yield_to(timeout_s)``, when given, is called by each helper before its run with
    ``yield_s`` (``tuning.helper_yield_ms``): the daemon's wait for the frames
    before this one to be finished and acknowledged (:meth:`Settling.wait`). The
    first model, a frame's longest, starts at once; a helper model that ends earlier
    spends part of that margin letting the earlier frames' Python work run first,
    which a real-time helper would otherwise hold off its core
    (docs/lab/benchmarks.md, sitting 14)."""

    def __init__(self, name: str = "infer", policy: ThreadPolicy | None = None,
                 yield_to: Callable[[float], object] | None = None, yield_s: float = 0.0):
        self._name = name
        self._policy = policy if policy is not None else ThreadPolicy()
        self._yield_to = yield_to if yield_s > 0 else None
        self._yield_s = yield_s
        self._pool: ThreadPoolExecutor | None = None
        self._pool_size = 0

    def __call__(self, work: Work) -> Work:
        inspector = work.inspector
        roles = list(inspector.models)
        if len(roles) < 2 or not inspector.cfg.tuning.parallel_models:
            return inspector.infer(work)
        if self._pool is None or self._pool_size < len(roles) - 1:  # first use, or a reload added a model
            if self._pool is not None:
                self._pool.shutdown(wait=False)
            self._pool_size = len(roles) - 1
            self._pool = ThreadPoolExecutor(self._pool_size, thread_name_prefix=self._name,
                                            initializer=self._policy.helper)
        t = time.perf_counter()
        others = [self._pool.submit(self._helper, work, role) for role in roles[1:]]
        try:
            inspector.infer(work, roles[:1])
        except BaseException:
            wait(others)  # no helper may still write into this Work
            raise
        for f in others:
            f.result()  # raises a helper's error
        work.latency["infer"] = (time.perf_counter() - t) * 1e3  # all models, together
        return work

    def _helper(self, work: Work, role: str) -> Work:
        if self._yield_to is not None:
            self._yield_to(self._yield_s)
        return work.inspector.infer(work, (role,))

    def close(self) -> None:
        """Let the helper threads end (without waiting for a model run still going)."""
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None


class Settling:
    """The frames whose inference ended and whose result is not yet finished and,
    when it went to the outbox, acknowledged by the broker: what a frame's second
    model waits for with ``tuning.helper_yield_ms`` (:class:`ParallelInfer`).
    The infer stage counts :meth:`inferred`, the finish stage :meth:`finished`, and
    the durable sink's acknowledgements come through :meth:`acked`.

    An acknowledgement can arrive before the finish stage has counted its seq
    (paho's thread takes the PUBACK while the stage returns from the send); it is
    kept and matched then. Both sets stay bounded: a broker outage leaves results
    unacknowledged, and the wait is bounded by its timeout all the same."""

    def __init__(self, keep: int = 64):
        self._cond = threading.Condition()
        self._finishing = 0
        self._keep = keep
        self._unacked: collections.OrderedDict[int, None] = collections.OrderedDict()
        self._early: collections.OrderedDict[int, None] = collections.OrderedDict()

    def _remember(self, seqs: collections.OrderedDict[int, None], seq: int) -> None:
        seqs[seq] = None
        while len(seqs) > self._keep:
            seqs.popitem(last=False)

    def _settled(self) -> bool:
        return self._finishing <= 0 and not self._unacked

    def inferred(self) -> None:
        """A frame left the infer stage for the finish stage."""
        with self._cond:
            self._finishing += 1

    def finished(self, seq: int | None) -> None:
        """Its finish stage ended; ``seq``: the outbox seq it was stored under (None: not sent)."""
        with self._cond:
            self._finishing -= 1
            if seq is not None and seq in self._early:
                del self._early[seq]
            elif seq is not None:
                self._remember(self._unacked, seq)
            if self._settled():
                self._cond.notify_all()

    def acked(self, seq: int) -> None:
        """The broker acknowledged outbox ``seq``."""
        with self._cond:
            if seq in self._unacked:
                del self._unacked[seq]
            else:
                self._remember(self._early, seq)  # before finished() counted it
            if self._settled():
                self._cond.notify_all()

    def wait(self, timeout: float) -> bool:
        """Until every frame before is settled, at most ``timeout`` s; whether they are."""
        with self._cond:
            return self._cond.wait_for(self._settled, timeout)

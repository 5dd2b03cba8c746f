"""The stage threads of ``station run``: every frame's way from the camera to the sinks.

    capture + prepare ──▶ FrameQueue ──▶ infer ──▶ FrameQueue ──▶ finish ──▶ sinks
    (source, trigger,      (bounded,      (ONNX     (2 items,      (postprocess, grade,
     reopen w/ backoff,     drop policy)   Runtime)  blocking)      the record to every sink)
     preprocess)

The capture thread preprocesses each frame itself: a hand-over to a thread
of its own would cost a thread wake-up for every frame (``station bench``
measures it; on a virtual machine its p99 is many milliseconds,
docs/lab/benchmarks.md, sitting 3), and preprocessing still overlaps the inference of the
frame before. Infer (ONNX Runtime, which releases the GIL) hands over to finish
through a small blocking queue, so that postprocessing overlaps the next
frame's inference too. Each frame goes through the same Inspector functions as
``station replay``.

:class:`Pipeline` owns these threads (and the infer stage's helpers): it starts
them, and stops them at the stop once they finished what they hold. Each thread
takes its part of one :class:`~station.priority.ThreadPolicy` as it starts: the
infer thread keeps the cores for the models, every other thread runs
``tuning.nice_non_inference`` steps below. The finish stage hands each record to
the sinks (station/sinks.py) and knows none of them.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import threading
import time
from collections.abc import Callable

from .backoff import Backoff
from .camera.live import EndOfSource, LiveSource
from .config import StationConfig
from .errors import CameraError
from .inspector import Inspector, Work
from .messages import error_record, result_record
from .metrics import Metrics
from .parallel import ParallelInfer, Settling
from .priority import ThreadPolicy
from .sinks import Delivery, Sink
from .trigger import Trigger
from .types import Frame, FrameError, InspectionResult

log = logging.getLogger(__name__)

Item = Frame | FrameError


@dataclasses.dataclass(frozen=True)
class _Failed:
    """A frame whose inspection raised: it becomes an error record."""

    frame: Item  # a FrameError too, should a stage fail on one (Pipeline._stage_loop)
    error: str


Queued = Item | Work | _Failed  # what the pipeline's queues carry


class FrameQueue:
    """Bounded hand-over between two pipeline threads (of frames, prepared or not).

    policy: what a full queue does with a free-run frame — ``drop_oldest``
    (the default: the line moves on, the newest frame matters), ``drop_newest``
    or ``block``. Triggered parts and frames of lossless sources (folder files,
    unpaced videos) always block: a part someone asked for, or a file waiting
    in a folder, is never dropped. Every drop is counted.
    """

    def __init__(self, size: int, policy: str):
        self.size = size
        self.policy = policy
        self._items: collections.deque[Queued] = collections.deque()
        self._cond = threading.Condition()
        self.dropped = 0

    def put(self, item: Queued, must_keep: bool, stop: threading.Event) -> Queued | None:
        """Queue ``item``; returns the item dropped to make room (or ``item``
        itself under drop_newest), None if nothing was dropped."""
        with self._cond:
            if len(self._items) >= self.size:
                if must_keep or self.policy == "block":
                    while len(self._items) >= self.size and not stop.is_set():
                        self._cond.wait(0.1)
                elif self.policy == "drop_newest":
                    self.dropped += 1
                    return item
                else:
                    dropped = self._items.popleft()
                    self.dropped += 1
                    self._items.append(item)
                    self._cond.notify_all()
                    return dropped
            self._items.append(item)
            self._cond.notify_all()
            return None

    def get(self, timeout: float) -> Queued | None:
        with self._cond:
            if not self._items:
                self._cond.wait(timeout)
            if not self._items:
                return None
            item = self._items.popleft()
            self._cond.notify_all()
            return item

    def __len__(self) -> int:
        return len(self._items)


class Pipeline:
    """The stage threads of one camera: :meth:`start` starts them, :meth:`drain`
    stops them, :meth:`close` lets the infer stage's helpers go.

    stop: set to stop capture (the supervisor's flag). on_camera(state): the frame
    source's state changed ("connected", "reconnecting", "lost"). crashed(): a
    thread died; the daemon must stop and exit non-zero. ``inspector`` may be
    replaced between frames (a reload): each frame keeps the one that prepared it.
    """

    def __init__(self, cfg: StationConfig, source: LiveSource, trigger: Trigger, inspector: Inspector,
                 sinks: Sink, policy: ThreadPolicy, metrics: Metrics, stop: threading.Event,
                 on_camera: Callable[[str], None], crashed: Callable[[], None]):
        self.cfg = cfg
        self.source = source
        self.trigger = trigger
        self.inspector = inspector
        self.sinks = sinks
        self.policy = policy
        self.metrics = metrics
        self.stop_event = stop
        self._on_camera = on_camera
        self._crashed = crashed
        self.queue = FrameQueue(cfg.run.queue_size, cfg.run.overflow)
        self._inferred = FrameQueue(2, "block")
        # Frames between inference and their acknowledgement, counted only for
        # tuning.helper_yield_ms (what the second model waits for).
        inf = cfg.tuning
        self.settling = Settling() if inf.parallel_models and inf.helper_yield_ms > 0 else None
        self.infer_stage = ParallelInfer("infer", policy, self.settling.wait if self.settling is not None else None,
                                         inf.helper_yield_ms / 1e3)
        self.camera_state = "starting"
        self.capture_done = threading.Event()
        self.end_of_source = threading.Event()
        self.finished = threading.Event()  # the finish stage ended: every frame captured is through
        self._inferred_done = threading.Event()
        self._heartbeat = time.monotonic()
        self._busy: dict[str, float | None] = {}
        self._abort = threading.Event()  # set when the stop deadline passed with parts in the pipeline
        self._threads: list[threading.Thread] = []

    # --- the supervisor's side --------------------------------------------------------

    def warm_up(self) -> None:
        """A few synthetic parts through the models and post-processing, on the infer
        stage the frames will use, so that their first, slower runs are not the line's
        first parts' (Inspector.warm_up). Before :meth:`start`."""
        self.inspector.warm_up(self.infer_stage)

    def start(self) -> None:
        """Start the stage threads, the last stage first."""
        self._threads = [
            threading.Thread(target=self._capture_loop, name="capture", daemon=True),
            threading.Thread(target=self._stage_loop, name="infer", daemon=True,
                             args=("infer", self.queue, self.capture_done, self._infer, self._inferred,
                                   self._inferred_done)),
            threading.Thread(target=self._stage_loop, name="finish", daemon=True,
                             args=("finish", self._inferred, self._inferred_done, self._finish, None, self.finished)),
        ]
        for t in reversed(self._threads):
            t.start()

    def drain(self, deadline: float) -> None:
        """At the stop (``stop`` is set): capture ends, then each stage once it finished
        what it holds, by ``deadline`` (time.monotonic()); past it, what is left is
        abandoned and logged."""
        capture, *stages = self._threads
        capture.join(max(0.0, deadline - time.monotonic()))
        self.capture_done.set()
        for t in stages:  # each finishes what it holds once its upstream is done
            t.join(max(0.0, deadline - time.monotonic()))
        if not self.finished.is_set():
            log.error("stop: %d parts were still in the pipeline at the deadline", self.in_flight())
            self._abort.set()

    def close(self) -> None:
        """Let the infer stage's helper threads end."""
        self.infer_stage.close()

    def acked(self, seq: int) -> None:
        """The broker acknowledged outbox ``seq`` (paho's network thread): to the frames
        settling, and to every sink."""
        if self.settling is not None:
            self.settling.acked(seq)
        self.sinks.acked(seq)

    def healthy(self, stall_s: float) -> bool:
        """Frames make progress: the capture loop turned, and no stage has held one
        item, within ``stall_s``."""
        now = time.monotonic()
        stuck = any(t is not None and now - t > stall_s for t in list(self._busy.values()))
        return now - self._heartbeat < stall_s and not stuck

    def in_flight(self) -> int:
        """Frames captured and not yet finished."""
        return len(self.queue) + len(self._inferred)

    # --- capture ------------------------------------------------------------------------

    def _capture_loop(self) -> None:
        # Triggered parts and files waiting in a folder are never dropped.
        must_keep = self.trigger.triggered or self.source.lossless
        self.policy.background(opencv=True)  # preprocessing's OpenCV workers at this thread's priority too
        backoff = Backoff(self.cfg.run.reconnect_min_s, self.cfg.run.reconnect_max_s)
        opened = False
        try:
            while not self.stop_event.is_set():
                self._heartbeat = time.monotonic()
                if not opened:
                    opened = self._open(backoff)
                    continue
                try:
                    item = self.source.read(0.2)
                except EndOfSource as exc:
                    log.info("%s", exc)
                    self.end_of_source.set()
                    return
                except CameraError as exc:
                    log.error("%s", exc)
                    self.source.close()
                    opened = False
                    self._set_camera("lost")
                    continue
                if item is not None:
                    self._take(item, must_keep)
        except Exception:  # the top of the worker loop: a crash here must stop the daemon visibly
            log.exception("capture thread failed")
            self._crashed()
        finally:
            self.source.close()
            self.capture_done.set()

    def _open(self, backoff: Backoff) -> bool:
        """Open the source: True when it is open, else False after waiting as ``backoff`` says."""
        try:
            self.source.open()
        except CameraError as exc:
            self._set_camera("reconnecting")
            wait = backoff.next()
            log.warning("%s; retrying in %.1f s", exc, wait)
            self.stop_event.wait(wait)
            return False
        backoff.reset()
        self._set_camera("connected")
        return True

    def _take(self, item: Item, must_keep: bool) -> None:
        """One captured frame (or frame error): a part (trigger), prepared and queued."""
        self.metrics.frame_captured()
        if isinstance(item, Frame):
            taken = self.trigger.take(item)
            if taken is None:
                self.source.done(item)
                return
            item = taken
        dropped = self.queue.put(self._prepare(item), must_keep, self.stop_event)
        if dropped is not None:
            frame = dropped if isinstance(dropped, (Frame, FrameError)) else dropped.frame
            log.debug("queue full: dropped frame %s", frame.source)
            self.metrics.frame_dropped("queue_full")
            self.source.done(frame)
        self.metrics.set_queue_depth(len(self.queue))

    def _set_camera(self, state: str) -> None:
        if state != self.camera_state:
            self.camera_state = state
            log.info("camera %s: %s", self.source.name, state)
            self._on_camera(state)

    def _prepare(self, item: Item) -> Work | FrameError | _Failed:
        if isinstance(item, FrameError):
            return item
        try:
            return self.inspector.prepare(item)
        except Exception as exc:
            log.exception("%s: preprocessing failed", item.source)
            return _Failed(item, f"inspection failed: {exc}")

    # --- infer and finish ---------------------------------------------------------------

    def _stage_loop(self, name: str, inq: FrameQueue, upstream: threading.Event, step: Callable,
                    outq: FrameQueue | None, done: threading.Event) -> None:
        if name == "infer":  # the models keep the cores (station/priority.py)
            self._take_infer_policy()
        else:
            self.policy.background()
        try:
            while True:
                item = inq.get(0.2)
                if item is None:
                    if upstream.is_set() and len(inq) == 0:
                        return
                    continue
                self._busy[name] = time.monotonic()
                try:
                    out = step(item)
                except Exception as exc:  # one bad part must not stop the line: log, count, go on
                    log.exception("%s: %s failed", getattr(item, "source", "?"), name)
                    self.metrics.error(name)
                    out = _Failed(item.frame if isinstance(item, (Work, _Failed)) else item, f"{name} failed: {exc}")
                finally:
                    self._busy[name] = None
                if outq is not None:
                    outq.put(out, True, self._abort)
        finally:
            done.set()

    def _take_infer_policy(self) -> None:
        policy = self.policy
        granted = policy.infer()
        if granted == "nice":
            log.info("the infer thread runs at nice %+d under the ordinary policy (tuning.infer_nice)%s",
                     policy.infer_nice, f"; the other models' helper threads, if any, under SCHED_FIFO "
                                        f"{policy.realtime}" if policy.realtime else "")
        elif granted == "fifo":
            log.info("the models' threads run under SCHED_FIFO %d (tuning.realtime_inference)", policy.realtime)

    def _infer(self, item: Work | FrameError | _Failed) -> Work | FrameError | _Failed:
        try:
            if not isinstance(item, Work):
                return item
            try:
                return self.infer_stage(item)
            except Exception as exc:
                log.exception("%s: inference failed", item.frame.source)
                return _Failed(item.frame, f"inspection failed: {exc}")
        finally:
            if self.settling is not None:
                self.settling.inferred()  # every item goes on to the finish stage

    def _finish(self, item: Work | FrameError | _Failed) -> None:
        seq = None
        try:
            seq = self._finish_one(item)
        finally:
            if self.settling is not None:
                self.settling.finished(seq)

    def _finish_one(self, item: Work | FrameError | _Failed) -> int | None:
        """Postprocess and grade one item and hand its record to the sinks; the outbox seq
        the broker will acknowledge (None: not stored, or no MQTT)."""
        record, frame, result = self._record(item)
        ctx = Delivery(frame, result)
        self.sinks.deliver(record, ctx)
        if ctx.stored:  # a folder file whose result was not stored stays, for the next start to inspect
            self.source.done(frame)
        return ctx.seq if ctx.acked else None

    def _record(self, item: Work | FrameError | _Failed) -> tuple[dict, Item, InspectionResult | None]:
        """The record of one item: its graded result's, or an error record; with its frame."""
        station_id = self.cfg.station.id
        if isinstance(item, FrameError):
            return error_record(item.source, item.error, max(item.seq, 0), station_id, item.part_id), item, None
        if isinstance(item, _Failed):
            f = item.frame
            return error_record(f.source, item.error, f.seq, station_id, f.part_id), f, None
        frame = item.frame
        result = None
        try:
            result = item.inspector.finish(item)
            record = result_record(result, self.cfg.run.include_mask)
        except Exception as exc:
            log.exception("%s: postprocessing failed", frame.source)
            record = error_record(frame.source, f"inspection failed: {exc}", frame.seq, station_id, frame.part_id)
        return record, frame, result

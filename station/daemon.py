"""``station run``: the line daemon. The only module that owns threads.

    capture + prepare ──▶ FrameQueue ──▶ infer ──▶ finish ──▶ outbox ──▶ MQTT sender
    (source, trigger,      (bounded,      (ONNX     (postprocess, grade,   (PUBACK deletes)
     reopen w/ backoff,     drop policy)   Runtime)  archive, metrics)
     preprocess)

The capture thread preprocesses each frame itself: a hand-over to a thread
of its own would cost a thread wake-up for every frame (``station bench``
measures it; on a virtual machine its p99 is many milliseconds,
docs/benchmarks.md), and preprocessing still overlaps the inference of the
frame before.

A background thread copies the outbox's write-ahead log into its file every
``outbox.checkpoint_s`` (sooner at high result rates), so that no result's
write waits for that copy and the log stays bounded.

With an MQTT trigger, each message names a part (Trigger, on paho's network
thread), and a message that makes no part (an invalid payload, an overflow of
``trigger.max_pending``, a part with no frame in time, the stop) becomes an
error record, delivered by a thread of its own (``trigger-errors``) at the pace
the broker takes results: a flood of triggers neither holds up capture nor
queues its errors ahead of the next genuine part's result.

Every thread but infer (and ONNX Runtime's own) runs ``run.nice_non_inference``
steps below the process's priority, so the models keep the cores and the rest
of a frame's work fills the time they leave (station/priority.py); with
``run.realtime_inference`` the threads that run the models are under
``SCHED_FIFO``, so that no other process of the machine stretches a run, and
the rest then stays at the process's priority unless told otherwise.

The main thread handles signals, the systemd notifications (READY after the
models are warm, WATCHDOG only while frames make progress), periodic stats,
archive pruning and reloads. SIGTERM/SIGINT stop capture, finish the parts
already queued, flush MQTT, publish the "stopped" status and exit within
``run.stop_timeout_s``; a second signal exits at once. SIGHUP reloads the
config: models, grading, postprocessing and trigger rates take effect for the
next frame; other sections need a restart (logged).
"""

from __future__ import annotations

import collections
import dataclasses
import faulthandler
import gc
import json
import logging
import os
import re
import signal
import threading
import time
from pathlib import Path
from typing import Callable

import numpy as np

from . import sdnotify
from .archive import Archive
from .camera.live import EndOfSource, LiveSource, make_source
from .config import StationConfig, load_config
from .errors import CameraError, PublishError, StationError
from .memory import steady_malloc
from .messages import error_record, result_record, stats_record, text, topics_for
from .metrics import TRIGGER_OUTCOMES, Metrics, MetricsServer
from .outbox import WAL_LIMIT, Outbox, OutboxFull
from .pipeline import Inspector, ParallelInfer, Work, open_models
from .preflight import check_for_run
from .priority import (adopt_opencv_pool, infer_policy_this_thread, lower_this_thread, non_inference_increment,
                       pin_this_thread, split_cpus)
from .publish import MqttPublisher
from .types import Frame, FrameError, InspectionResult

log = logging.getLogger(__name__)

Item = Frame | FrameError


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


# How much of a refused trigger payload its error record quotes (characters; bytes
# before decoding): enough to recognise it, never a megabyte.
_QUOTE = 64
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f]")
_SURROGATE = re.compile("[\ud800-\udfff]")


def _quote(data: bytes | str) -> str:
    """The start of a payload in quotes, as printable text on one line (bytes that are
    not UTF-8 and control characters as ``\\xNN`` escapes), "…" when cut."""
    shown = _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", text(data[:_QUOTE]))
    return f'"{shown}"' + ("…" if len(data) > _QUOTE else "")


def _json_kind(value: object) -> str:
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if value is None:
        return "null"
    return "a list" if isinstance(value, list) else "an object"


def parse_trigger(payload: bytes, max_chars: int) -> tuple[str | None, str | None]:
    """A trigger payload → (its part id, None), or (None, why it names no part).

    payload: UTF-8 text that is the part id (white space around it dropped), or a
    JSON object whose ``part_id`` is a string. A part id has 1 to ``max_chars``
    characters, none of them a control character or a lone surrogate. The reason
    quotes at most the payload's first 64 characters.
    """
    # The longest spelling of a valid JSON trigger (\uXXXX escapes, other keys) is far
    # shorter: a longer payload is refused before it is decoded or parsed.
    if len(payload) > 12 * max_chars + 1024:
        return None, f"payload too long ({len(payload)} bytes; trigger.max_part_id_chars is {max_chars}): {_quote(payload)}"
    try:
        body = payload.decode("utf-8").strip()
    except UnicodeDecodeError:
        return None, f"payload is not UTF-8 text: {_quote(payload)}"
    part: object = body
    if body.startswith("{"):
        try:
            doc = json.loads(body)
        except ValueError as exc:
            return None, f"payload is not valid JSON ({str(exc)[:100]}): {_quote(body)}"
        except RecursionError:
            return None, f"payload is not valid JSON (nested too deep): {_quote(body)}"
        if "part_id" not in doc:
            return None, f"JSON without a part_id: {_quote(body)}"
        part = doc["part_id"]
        if not isinstance(part, str):
            return None, f"part_id is {_json_kind(part)}, not a string: {_quote(body)}"
    assert isinstance(part, str)  # the plain text, or a JSON string
    if not part:
        return None, f"empty part id: {_quote(body)}"
    if len(part) > max_chars:
        return None, f"part id too long ({len(part)} characters; trigger.max_part_id_chars is {max_chars}): {_quote(part)}"
    if _CONTROL.search(part):
        return None, f"part id with control characters: {_quote(part)}"
    if _SURROGATE.search(part):
        return None, f"part id with a lone surrogate (not Unicode text): {_quote(part)}"
    return part, None


@dataclasses.dataclass(slots=True)
class _Pending:
    part_id: str
    deadline: float  # time.monotonic()
    topic: str


@dataclasses.dataclass(frozen=True, slots=True)
class TriggerError:
    """A trigger message that names no part, or a part that got no frame: the fields
    of its error record."""

    source: str  # the trigger topic
    part_id: str | None  # None: the message named no valid part
    error: str


class Trigger:
    """Decides which captured frames become parts.

    free-run: every ``every_nth`` frame, at most ``max_fps`` per second; the
    part id is a counter. mqtt: each message on ``…/trigger`` names a part
    (:func:`parse_trigger`); the next frame is tagged with it, oldest part first.

    Every mqtt message yields one record: a graded result, or an error record
    (a :class:`TriggerError`, handed out by :meth:`errors`) when its payload names
    no valid part, when it is the oldest of more than ``max_pending`` parts
    waiting (reported at once: overflow), when no frame came within
    ``timeout_s`` (expired), or when the station stopped first. Retained
    messages are ignored, logged and counted, unless ``accept_retained``. Each
    message costs its parsing and O(1) under one lock, so a flood is cheap here;
    whoever delivers the errors decides how fast they go out.
    """

    def __init__(self, cfg: StationConfig):
        self.cfg = cfg.trigger
        self.mode = self.cfg.type
        self._lock = threading.Condition(threading.Lock())
        self._pending: collections.deque[_Pending] = collections.deque()
        self._errors: collections.deque[TriggerError] = collections.deque()
        self._counts: collections.Counter[str] = collections.Counter()
        self._logged_at: dict[str, float] = {}
        self._unlogged: collections.Counter[str] = collections.Counter()
        self._closed = False  # the station stops: no part will be taken any more
        self._seen = 0
        self._last_t = 0.0
        self._count = 0

    def reconfigure(self, cfg: StationConfig) -> None:
        with self._lock:
            self.cfg = cfg.trigger.model_copy(update={"type": self.mode})

    def on_message(self, topic: str, payload: bytes, retained: bool = False) -> None:
        """One message on the trigger topic (paho's network thread)."""
        if retained and not self.cfg.accept_retained:
            with self._lock:
                self._tally("retained", f"trigger on {topic} ignored: a retained message (the broker hands it over "
                                        f"at every connect; trigger.accept_retained takes it): {_quote(payload)}")
            return
        part, why = parse_trigger(payload, self.cfg.max_part_id_chars)
        with self._lock:
            if part is None:
                self._refuse(TriggerError(topic, None, f"trigger refused: {why}"), "invalid")
                return
            self._tally("accepted")
            if self._closed:
                self._refuse(TriggerError(topic, part, f"part {part}: the station stopped before a frame came"), "stopped")
                return
            self._pending.append(_Pending(part, time.monotonic() + self.cfg.timeout_s, topic))
            while len(self._pending) > self.cfg.max_pending:
                old = self._pending.popleft()
                self._refuse(TriggerError(old.topic, old.part_id, f"trigger overflow: part {old.part_id} dropped, the "
                                          f"oldest of more than {self.cfg.max_pending} parts waiting for a frame "
                                          "(trigger.max_pending)"), "overflow")

    def take(self, frame: Frame) -> Frame | None:
        """The frame as a part (tagged with its part id), or None if not inspected."""
        if self.mode == "mqtt":
            with self._lock:
                self._expire(time.monotonic())
                if not self._pending:
                    return None
                part = self._pending.popleft().part_id
            return dataclasses.replace(frame, part_id=part)
        with self._lock:
            self._seen += 1
            if (self._seen - 1) % self.cfg.every_nth:
                return None
            if self.cfg.max_fps is not None:
                now = time.monotonic()
                if now - self._last_t < 1.0 / self.cfg.max_fps:
                    return None
                self._last_t = now
            self._count += 1
            return dataclasses.replace(frame, part_id=str(self._count))

    def errors(self, limit: int) -> list[TriggerError]:
        """Up to ``limit`` trigger errors, oldest first (parts past their timeout included)."""
        with self._lock:
            self._expire(time.monotonic())
            return [self._errors.popleft() for _ in range(min(limit, len(self._errors)))]

    def wait(self, timeout: float) -> None:
        """Until a trigger error waits (or the oldest part's timeout passes), at most ``timeout`` s."""
        with self._lock:
            if not self._errors:
                if self._pending:
                    timeout = min(timeout, max(0.0, self._pending[0].deadline - time.monotonic()))
                self._lock.wait(timeout)

    def backlog(self) -> int:
        """Trigger errors waiting to be taken by :meth:`errors`."""
        with self._lock:
            return len(self._errors)

    def close(self) -> None:
        """The station stops: every part still waiting for a frame becomes an error, and
        so does every part named from now on."""
        with self._lock:
            self._closed = True
            self._lock.notify()  # the deliverer's wait() ends now, with or without errors
            while self._pending:
                p = self._pending.popleft()
                self._refuse(TriggerError(p.topic, p.part_id, f"part {p.part_id}: the station stopped before a frame "
                                          "came"), "stopped")

    def counts(self) -> dict[str, int]:
        """Messages and parts by outcome since start (metrics.TRIGGER_OUTCOMES)."""
        with self._lock:
            return {k: self._counts[k] for k in TRIGGER_OUTCOMES}

    def _expire(self, now: float) -> None:
        while self._pending and self._pending[0].deadline <= now:
            p = self._pending.popleft()
            self._refuse(TriggerError(p.topic, p.part_id, f"part {p.part_id}: no frame within {self.cfg.timeout_s} s "
                                      "of its trigger"), "expired")

    def _refuse(self, err: TriggerError, outcome: str) -> None:
        if not self._errors:
            self._lock.notify()  # wait() waits only while there is none
        self._errors.append(err)
        self._tally(outcome, err.error)

    def _tally(self, outcome: str, message: str | None = None) -> None:
        """Count one outcome; log ``message`` as a warning, at most one line a second
        per outcome (a flood is counted, and each one is in its error record)."""
        self._counts[outcome] += 1
        if message is None:
            return
        now = time.monotonic()
        if now - self._logged_at.get(outcome, -1e9) < 1.0:
            self._unlogged[outcome] += 1
            return
        self._logged_at[outcome] = now
        more = self._unlogged.pop(outcome, 0)
        log.warning("%s%s", message, f" (and {more} more {outcome} since the last such line)" if more else "")


@dataclasses.dataclass(frozen=True)
class _Failed:
    """A frame whose inspection raised: it becomes an error record."""

    frame: Item  # a FrameError too, should a stage fail on one (_stage_loop)
    error: str


Queued = Item | Work | _Failed  # what the pipeline's queues carry


class Settling:
    """The frames whose inference ended and whose result is not yet finished and,
    when it went to the outbox, acknowledged by the broker: what a frame's second
    model waits for with ``inference.helper_yield_ms`` (pipeline.ParallelInfer).

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

    def _remember(self, seqs: "collections.OrderedDict[int, None]", seq: int) -> None:
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


class RollingStats:
    """Counters since start and a window of recent latencies (ms) per stage."""

    def __init__(self, window: int = 1000):
        self.started = time.time()
        self.grades: collections.Counter = collections.Counter()
        self.errors = 0
        self.latency: dict[str, collections.deque] = collections.defaultdict(lambda: collections.deque(maxlen=window))
        self._times: collections.deque = collections.deque(maxlen=window)
        self._lock = threading.Lock()

    def add(self, record: dict) -> None:
        with self._lock:
            self._times.append(time.monotonic())
            if "error" in record:
                self.errors += 1
                return
            self.grades[record["grade"]] += 1
            for stage, ms in record["latency_ms"].items():
                self.latency[stage].append(ms)

    def snapshot(self) -> dict:
        with self._lock:
            times = list(self._times)
            fps = (len(times) - 1) / (times[-1] - times[0]) if len(times) > 1 and times[-1] > times[0] else 0.0
            lat = {
                stage: {"p50": round(float(np.percentile(v, 50)), 3), "p99": round(float(np.percentile(v, 99)), 3)}
                for stage, v in self.latency.items()
                if v
            }
            return {"grades": dict(self.grades), "errors": self.errors, "fps": round(fps, 2), "latency_ms": lat}


class Daemon:
    """One camera, its models, its publisher. ``run()`` blocks until stopped
    and returns the process exit code."""

    def __init__(self, cfg: StationConfig, config_path: Path | None = None, state_dir: Path | None = None,
                 sink: Callable[[dict], None] | None = None):
        check_for_run(cfg, str(config_path) if config_path is not None else "config")
        self.cfg = cfg
        self.config_path = config_path
        self.state_dir = state_dir or cfg.run.state_dir or _env_state_dir()
        self.sink = sink
        self.stop_event = threading.Event()
        # The nice increment of every thread but inference: as set, or by the models' policy.
        self.nice_non_inference = non_inference_increment(cfg.run.nice_non_inference, cfg.run.realtime_inference)
        # run.infer_cpu: (the infer thread's CPUs, every other thread's), or None.
        self.cpus = split_cpus(cfg.run.infer_cpu)
        assert cfg.camera is not None  # check_for_run refused a config without one
        self.source: LiveSource = make_source(cfg.camera)
        self.queue = FrameQueue(cfg.run.queue_size, cfg.run.overflow)
        self.trigger = Trigger(cfg)
        self.stats = RollingStats()
        self.camera_state = "starting"
        self.capture_done = threading.Event()
        self.end_of_source = threading.Event()
        self._heartbeat = time.monotonic()
        self._busy: dict[str, float | None] = {}
        self._abort = threading.Event()  # set when the stop deadline passed with parts in the pipeline
        self._reload = threading.Event()
        self._reloading: threading.Thread | None = None
        self._signals = 0
        self.outbox: Outbox | None = None
        self.publisher: MqttPublisher | None = None
        self.outbox_refused = 0
        # A worker thread that died: run() then exits 1, so that systemd's
        # Restart=on-failure restarts the daemon (exit 0 would not).
        self.failed = False
        # Hooks for station bench: the broker's acknowledgement of an outbox seq,
        # and each record with the seq it was stored under (None without MQTT) and
        # its frame's capture time (UNIX s, unrounded; None for an error without a frame).
        self.on_ack: Callable[[int], None] | None = None
        self.on_published: Callable[[dict, int | None, float | None], None] | None = None
        # Frames between inference and their acknowledgement, counted only for
        # inference.helper_yield_ms (what the second model waits for).
        inf = cfg.inference
        self.settling = Settling() if inf.parallel_models and inf.helper_yield_ms > 0 else None
        self.metrics = Metrics()
        self._triggers_counted = dict.fromkeys(TRIGGER_OUTCOMES, 0)  # what metrics counts of self.trigger.counts()
        # The thread that delivers the error records of triggers that made no part
        # (mqtt trigger only); _triggers_closed: no more parts will be taken (the stop).
        self._trigger_errors: threading.Thread | None = None
        self._triggers_closed = threading.Event()
        self._triggers_deadline = float("inf")  # the stop's (time.monotonic()), once closed
        self._delivering = threading.Lock()  # the sink and on_published, one record at a time
        self._metrics_server: MetricsServer | None = None
        self.archive = Archive(cfg.archive, self._archive_root(cfg)) if cfg.archive.enabled else None
        models = open_models(cfg)
        self.inspector = Inspector(models, cfg, keep_mask=self._keep_mask(cfg))
        self.providers = {role: m.providers for role, m in models.items()}
        self.metrics.set_models({role: m.describe() for role, m in models.items()})

    def _archive_root(self, cfg: StationConfig) -> Path:
        path = cfg.archive.path
        if path.is_absolute():
            return path
        if self.state_dir is None:
            raise StationError(f"archive.path: {path} is relative but no state directory is set (--state-dir, run.state_dir or $STATE_DIRECTORY)")
        return Path(self.state_dir) / path

    @staticmethod
    def _keep_mask(cfg: StationConfig) -> bool:
        # The frame-sized mask is kept only when something uses it.
        archived = cfg.archive.enabled and bool({"mask", "overlay"} & set(cfg.archive.what))
        return cfg.run.include_mask or archived

    # --- threads ----------------------------------------------------------------------

    def _set_camera(self, state: str) -> None:
        if state != self.camera_state:
            self.camera_state = state
            log.info("camera %s: %s", self.source.name, state)
            self.metrics.set_camera_state(state)
            if self.publisher is not None:
                self.publisher.set_status(camera=state)

    def _capture_loop(self) -> None:
        run = self.cfg.run
        delay = run.reconnect_min_s
        opened = False
        # Triggered parts and files waiting in a folder are never dropped.
        must_keep = self.trigger.mode == "mqtt" or self.source.lossless
        if lower_this_thread(self.nice_non_inference) is not None:
            adopt_opencv_pool()  # preprocessing's OpenCV workers at this thread's priority
        try:
            while not self.stop_event.is_set():
                self._heartbeat = time.monotonic()
                if not opened:
                    try:
                        self.source.open()
                    except CameraError as exc:
                        self._set_camera("reconnecting")
                        log.warning("%s; retrying in %.1f s", exc, delay)
                        self.stop_event.wait(delay)
                        delay = min(delay * 2, run.reconnect_max_s)
                        continue
                    opened = True
                    delay = run.reconnect_min_s
                    self._set_camera("connected")
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
                if item is None:
                    continue
                self.metrics.frame_captured()
                if isinstance(item, Frame):
                    taken = self.trigger.take(item)
                    if taken is None:
                        self.source.done(item)
                        continue
                    item = taken
                dropped = self.queue.put(self._prepare(item), must_keep, self.stop_event)
                if dropped is not None:
                    frame = dropped if isinstance(dropped, (Frame, FrameError)) else dropped.frame
                    log.debug("queue full: dropped frame %s", frame.source)
                    self.metrics.frame_dropped("queue_full")
                    self.source.done(frame)
                self.metrics.set_queue_depth(len(self.queue))
        except Exception:  # the top of the worker loop: a crash here must stop the daemon visibly
            log.exception("capture thread failed")
            self.failed = True
            self.stop_event.set()
        finally:
            self.source.close()
            self.capture_done.set()

    # After capture (which preprocesses), two stages on their own threads: infer
    # (ONNX Runtime, which releases the GIL) reads the frame queue and hands
    # over to finish (postprocess, grade, store, publish) through a small
    # blocking queue. Preprocessing and postprocessing of neighbouring frames
    # overlap with inference; each frame goes through the same Inspector
    # functions as `station replay`.

    def _stage_loop(self, name: str, inq: FrameQueue, upstream: threading.Event, step: Callable,
                    outq: FrameQueue | None, done: threading.Event) -> None:
        if name == "infer":  # the models keep the cores (station/priority.py)
            pin_this_thread(self.cpus[0] if self.cpus is not None else None)
            run = self.cfg.run
            policy = infer_policy_this_thread(run.realtime_inference, run.infer_nice)
            if policy == "nice":
                log.info("the infer thread runs at nice %+d under the ordinary policy (run.infer_nice)%s",
                         run.infer_nice, f"; the other models' helper threads, if any, under SCHED_FIFO "
                                         f"{run.realtime_inference}" if run.realtime_inference else "")
            elif policy == "fifo":
                log.info("the models' threads run under SCHED_FIFO %d (run.realtime_inference)",
                         run.realtime_inference)
        else:
            lower_this_thread(self.nice_non_inference)
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

    def _checkpoint_loop(self) -> None:
        """Copies the outbox's WAL into its database file every ``outbox.checkpoint_s``,
        off the path of puts and acks (Outbox.take_over_checkpoints), until the stop.
        Sooner when results come so fast that the WAL would grow past a quarter of
        WAL_LIMIT between two copies: at WAL_LIMIT a result's commit would copy it."""
        lower_this_thread(self.nice_non_inference)
        period = self.cfg.outbox.checkpoint_s
        assert self.outbox is not None  # the thread is started only with an outbox
        shortest = min(period, 0.05)
        wait = shortest  # the rate is not known yet: the first wait finds it out
        while not self.stop_event.wait(wait):
            try:
                pages, _ = self.outbox.checkpoint()
            except PublishError as exc:  # e.g. disk full: the WAL keeps the results; retried next period
                log.warning("%s", exc)
                self.metrics.error("outbox_checkpoint")
                wait = period
                continue
            # pages: what the WAL grew by since the last checkpoint (each one starts it over)
            grown = pages * self.outbox.page_size
            wait = period if grown <= 0 else min(period, max(shortest, wait * WAL_LIMIT / 4 / grown))

    def _prepare(self, item: Item) -> "Work | FrameError | _Failed":
        if isinstance(item, FrameError):
            return item
        try:
            return self.inspector.prepare(item)
        except Exception as exc:
            log.exception("%s: preprocessing failed", item.source)
            return _Failed(item, f"inspection failed: {exc}")

    def _infer(self, item: "Work | FrameError | _Failed") -> "Work | FrameError | _Failed":
        try:
            if not isinstance(item, Work):
                return item
            try:
                return self._parallel_infer(item)
            except Exception as exc:
                log.exception("%s: inference failed", item.frame.source)
                return _Failed(item.frame, f"inspection failed: {exc}")
        finally:
            if self.settling is not None:
                self.settling.inferred()  # every item goes on to the finish stage

    def _finish(self, item: "Work | FrameError | _Failed") -> None:
        seq = None
        try:
            seq = self._finish_one(item)
        finally:
            if self.settling is not None:
                self.settling.finished(seq)

    def _acked(self, seq: int) -> None:
        if self.settling is not None:
            self.settling.acked(seq)
        if self.on_ack is not None:
            self.on_ack(seq)

    def _finish_one(self, item: "Work | FrameError | _Failed") -> int | None:
        """Postprocess, grade, store and archive one item; its outbox seq (None: not stored)."""
        station_id = self.cfg.station.id
        result = None
        if isinstance(item, FrameError):
            record = error_record(item.source, item.error, max(item.seq, 0), station_id, item.part_id)
            frame: Item = item
        elif isinstance(item, _Failed):
            f = item.frame
            record = error_record(f.source, item.error, f.seq, station_id, f.part_id)
            frame = f
        else:
            frame = item.frame
            try:
                result = item.inspector.finish(item)
                record = result_record(result, self.cfg.run.include_mask)
            except Exception as exc:
                log.exception("%s: postprocessing failed", frame.source)
                record = error_record(frame.source, f"inspection failed: {exc}", frame.seq, station_id, frame.part_id)
        stored, seq = self._deliver(record, frame.captured_at if isinstance(frame, Frame) else None)
        self._archive(frame, result, record)
        if stored:  # a folder file whose result was not stored stays, for the next start to inspect
            self.source.done(frame)
        return seq

    def _archive(self, item: Item, result: InspectionResult | None, record: dict) -> None:
        if self.archive is None:
            return
        if result is not None:
            assert isinstance(item, Frame)  # a result is a frame's
            if self.archive.wants(result):
                self.archive.save(item.image, result, record)
        else:
            self.archive.save_error(record, item.image if isinstance(item, Frame) else None)

    def _deliver(self, record: dict, captured_at: float | None) -> tuple[bool, int | None]:
        """Store (outbox), count and sink one record; False when MQTT is configured
        and the outbox did not store it (full, or the disk refused the write), with
        the outbox seq it was stored under (None without MQTT or when not stored)."""
        stored = True
        seq = None
        if self.publisher is not None:
            try:
                seq = self.publisher.publish_result(record)
            except OutboxFull as exc:
                # refuse_new: the outbox keeps what it has; this result is logged and counted.
                stored = False
                self.outbox_refused += 1
                self.metrics.error("outbox_full")
                log.error("result %s not stored: %s", record.get("id"), exc)
            except PublishError as exc:
                stored = False
                self.metrics.error("outbox_write")
                log.error("result %s not stored: %s", record.get("id"), exc)
        # Counted once the record is on its way: the broker's round trip overlaps this.
        self.stats.add(record)
        self.metrics.observe_result(record)
        with self._delivering:  # from the finish thread and the trigger errors' thread
            if self.sink is not None:
                self.sink(record)
            if self.on_published is not None:
                self.on_published(record, seq, captured_at)
        return stored, seq

    # --- trigger errors ---------------------------------------------------------------

    def _start_trigger_errors(self) -> None:
        """The thread of :meth:`_trigger_errors_loop`; it ends at the stop (:meth:`_close_triggers`)."""
        self._trigger_errors = threading.Thread(target=self._trigger_errors_loop, name="trigger-errors", daemon=True)
        self._trigger_errors.start()

    def _trigger_errors_loop(self) -> None:
        """Delivers the error records of the triggers that made no part (Trigger.errors)
        off the capture thread, which a flood of them would hold up, until the stop.

        While the broker is connected, a batch goes to the outbox only when it holds at
        most two windows of results (2 × ``mqtt.max_inflight``): a flood's errors
        (thousands a second, more than the broker link acknowledges) then go out after
        the results of the genuine parts that come meanwhile, not before them. They wait
        in memory, at most ``outbox.max_rows`` of them; beyond that, while disconnected
        and at the stop they go to the outbox as they come."""
        lower_this_thread(self.nice_non_inference)
        try:
            while True:
                closing = self._triggers_closed.is_set()
                if closing and time.monotonic() > self._triggers_deadline:
                    return  # what is left is reported by _store_last_trigger_errors
                if not closing:
                    self.trigger.wait(0.5)
                    self._pace_trigger_errors()
                if not self._deliver_trigger_errors() and closing:
                    return
        except Exception:  # the top of the worker loop: a crash here must stop the daemon visibly
            log.exception("trigger errors thread failed")
            self.failed = True
            self.stop_event.set()

    def _pace_trigger_errors(self) -> None:
        """Until the outbox has room for the next batch of trigger errors (see above)."""
        pub, mqtt = self.publisher, self.cfg.mqtt
        if pub is None or mqtt is None:
            return
        room, hold = 2 * mqtt.max_inflight, self.cfg.outbox.max_rows
        # Polled every 10 ms rather than woken by each acknowledgement (pub.wait_until):
        # in a flood that would be a thousand wake-ups a second, each taking the GIL
        # from paho's network thread, which is reading the flood.
        while not (self._triggers_closed.is_set() or not pub.connected or pub.outbox_depth <= room
                   or self.trigger.backlog() >= hold):
            self._triggers_closed.wait(0.01)

    def _deliver_trigger_errors(self) -> int:
        """One batch of trigger errors as error records, stored, counted and sunk like
        any record (not archived: there is no frame); how many."""
        batch = self.trigger.errors(self.cfg.mqtt.max_inflight if self.cfg.mqtt is not None else 1000)
        station_id = self.cfg.station.id
        for e in batch:
            self._deliver(error_record(e.source, e.error, 0, station_id, e.part_id), None)
        return len(batch)

    def _close_triggers(self, deadline: float) -> None:
        """At the stop, once the pipeline is done: the parts still waiting for a frame
        become errors, and every trigger error is delivered, as they come (by the deadline)."""
        if self._trigger_errors is None:
            return
        self.trigger.close()
        self._triggers_deadline = deadline
        self._triggers_closed.set()
        self._trigger_errors.join(max(0.0, deadline - time.monotonic()))

    def _store_last_trigger_errors(self, deadline: float) -> None:
        """At the stop, after MQTT: the errors of the triggers that came while it was
        flushed go to the outbox, for the next start (by the deadline)."""
        if self._trigger_errors is None or self._trigger_errors.is_alive():
            return
        while time.monotonic() < deadline and self._deliver_trigger_errors():
            pass
        if self.trigger.backlog():
            log.error("stop: %d trigger errors were not stored by the deadline (run.stop_timeout_s)",
                      self.trigger.backlog())

    # --- main thread ------------------------------------------------------------------

    def _on_signal(self, signum: int, frame) -> None:
        if signum == signal.SIGHUP:
            self._reload.set()
            return
        self._signals += 1
        if self._signals > 1:
            log.error("second signal: exiting now; %d parts in the pipeline are not finished", self.in_flight())
            os._exit(1)
        log.info("%s: stopping", signal.Signals(signum).name)
        self.stop_event.set()

    def _healthy(self) -> bool:
        now = time.monotonic()
        stuck = any(t is not None and now - t > self.cfg.run.stall_s for t in list(self._busy.values()))
        capture_alive = now - self._heartbeat < self.cfg.run.stall_s
        return capture_alive and not stuck

    def stats_payload(self) -> dict:
        snap = self.stats.snapshot()
        outbox = self.outbox.stats() if self.outbox is not None else None
        return stats_record(
            station_id=self.cfg.station.id,
            uptime_s=time.time() - self.stats.started,
            grades=snap["grades"],
            errors=snap["errors"],
            fps=snap["fps"],
            latency_ms=snap["latency_ms"],
            dropped=self.queue.dropped,
            queue_depth=len(self.queue),
            outbox_depth=outbox["depth"] if outbox else 0,
            outbox_alarm=bool(outbox and outbox["alarm"]),
            providers=self.providers,
            camera=self.camera_state,
            triggers=self.trigger.counts() if self.trigger.mode == "mqtt" else None,
        )

    def _reload_in_background(self) -> None:
        """:meth:`reload` off the main thread, which goes on feeding the watchdog and
        sending stats while a config is parsed and models are loaded and warmed up.
        A SIGHUP during a reload is kept and runs the next reload after this one."""
        sdnotify.notify("RELOADING=1")
        try:
            self.reload()
        finally:
            sdnotify.notify("READY=1")

    def reload(self) -> None:
        """Re-read the config: models, grading, postprocessing and trigger rates
        apply to the next frame; an invalid config or model keeps the running one."""
        if self.config_path is None:
            log.warning("reload: no config file to re-read")
            return
        try:
            cfg = load_config(self.config_path)
            models = open_models(cfg)
            inspector = Inspector(models, cfg, keep_mask=self._keep_mask(cfg))
            inspector.warm_up()  # on this thread: the running models keep the infer stage
        except StationError as exc:
            log.error("reload refused, keeping the running config and models: %s", exc)
            return
        except Exception as exc:  # noqa: BLE001 - MemoryError and the like: a reload never stops the line
            log.error("reload failed, keeping the running config and models: %s: %s", type(exc).__name__, exc)
            return
        restart = [k for k in ("camera", "mqtt", "outbox", "run", "station") if getattr(cfg, k) != getattr(self.cfg, k)]
        if cfg.trigger.type != self.cfg.trigger.type:
            restart.append("trigger.type")
        if restart:
            log.warning("reload: changes to %s take effect after a restart", ", ".join(restart))
        self.inspector = inspector
        self.providers = {role: m.providers for role, m in models.items()}
        self.trigger.reconfigure(cfg)
        log.info("reloaded %s: models %s", self.config_path, ", ".join(f"{r}={m.card.name}" for r, m in models.items()))

    def run(self, install_signals: bool = True) -> int:
        """Run until stopped (signal, end of a finite source, or ``stop_event``)."""
        if self.cpus is None:
            return self._run(install_signals)
        # run.infer_cpu: every thread started from here on (paho's, the models' helper,
        # the stages) runs off the infer thread's CPU; the infer thread moves there.
        # The calling thread gets its CPUs back at the end.
        before = os.sched_getaffinity(0)
        pin_this_thread(self.cpus[1])
        log.info("the infer thread runs on CPU %s, every other thread on CPUs %s (run.infer_cpu)",
                 ", ".join(map(str, sorted(self.cpus[0]))), ", ".join(map(str, sorted(self.cpus[1]))))
        try:
            return self._run(install_signals)
        finally:
            pin_this_thread(before)

    def _run(self, install_signals: bool) -> int:
        cfg = self.cfg
        if cfg.run.steady_malloc:
            steady_malloc()
        log.info("threads but inference at nice +%d (run.nice_non_inference)", self.nice_non_inference)
        if cfg.mqtt is not None:
            self.outbox = Outbox.from_config(cfg.outbox, self.state_dir)
            self.publisher = MqttPublisher(cfg.mqtt, cfg.station.id, self.outbox, nice=self.nice_non_inference)
            self.publisher.on_ack = self._acked
            self.publisher.set_status(camera=self.camera_state, providers=self.providers)
            if self.trigger.mode == "mqtt":
                self.publisher.subscribe(topics_for(cfg.mqtt, cfg.station.id).trigger, self.trigger.on_message)
                self._start_trigger_errors()
            self.publisher.start()
        if cfg.metrics.enabled:
            self._metrics_server = self.metrics.start_server(cfg.metrics.host, cfg.metrics.port)
            log.info("metrics on %s", self._metrics_server.url)
        if install_signals:
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                signal.signal(sig, self._on_signal)
            # `kill -USR1 PID`: every thread's stack to stderr (the journal), for a station that seems stuck.
            faulthandler.register(signal.SIGUSR1, all_threads=True)
        if self.outbox is not None:
            self.outbox.take_over_checkpoints()
        self._parallel_infer = ParallelInfer(
            "infer", cfg.run.realtime_inference,
            self.settling.wait if self.settling is not None else None, cfg.inference.helper_yield_ms / 1e3,
            helper_cpus=self.cpus[1] if self.cpus is not None else None)
        # A few synthetic parts through the models and post-processing, so that their
        # first, slower runs are not the line's first parts' (Inspector.warm_up).
        self.inspector.warm_up(self._parallel_infer)
        # What start-up made (modules, the models' cards, the config) lives as long as the
        # process: out of the cyclic collector's sight, a full collection no longer scans
        # it, which stopped every Python thread for 22-29 ms (docs/benchmarks.md).
        gc.collect()
        gc.freeze()
        inferred = FrameQueue(2, "block")
        self._stage_queues = (inferred,)
        inferred_done, self.finished = threading.Event(), threading.Event()
        threads = [
            threading.Thread(target=self._capture_loop, name="capture", daemon=True),
            threading.Thread(target=self._stage_loop, name="infer", daemon=True,
                             args=("infer", self.queue, self.capture_done, self._infer, inferred, inferred_done)),
            threading.Thread(target=self._stage_loop, name="finish", daemon=True,
                             args=("finish", inferred, inferred_done, self._finish, None, self.finished)),
        ]
        if self.outbox is not None:  # ends with the stop; Outbox.close waits for a checkpoint under way
            threading.Thread(target=self._checkpoint_loop, name="outbox-checkpoint", daemon=True).start()
        for t in reversed(threads):
            t.start()
        sdnotify.notify("READY=1")
        log.info("station %s running: camera %s, trigger %s, models %s", cfg.station.id, self.source.name,
                 self.trigger.mode, ", ".join(f"{r} on {p[0]}" for r, p in self.providers.items()))
        watchdog = sdnotify.watchdog_period()
        next_stats = time.monotonic() + cfg.run.stats_interval_s
        next_prune = time.monotonic()
        try:
            while not self.stop_event.is_set():
                if self.end_of_source.is_set() and self.finished.is_set():
                    break
                self.stop_event.wait(min(watchdog or 1.0, 1.0) / 2)
                if watchdog and self._healthy():
                    sdnotify.notify("WATCHDOG=1")
                if self._reload.is_set() and not (self._reloading and self._reloading.is_alive()):
                    self._reload.clear()
                    self._reloading = threading.Thread(target=self._reload_in_background, name="reload", daemon=True)
                    self._reloading.start()
                self._update_gauges()
                if self.archive is not None and time.monotonic() >= next_prune:
                    next_prune = time.monotonic() + 60.0
                    self.archive.prune()
                if time.monotonic() >= next_stats:
                    next_stats += cfg.run.stats_interval_s
                    if self.publisher is not None:
                        self.publisher.publish_stats(self.stats_payload())
        finally:
            self._shutdown(threads)
        return 1 if self.failed else 0

    def _update_gauges(self) -> None:
        self.metrics.set_queue_depth(len(self.queue))
        if self.outbox is not None:
            self.metrics.set_outbox(self.outbox.depth(), self.outbox.alarm)
        if self.publisher is not None:
            self.metrics.set_mqtt_connected(self.publisher.connected)
        if self.trigger.mode == "mqtt":  # copied here, not counted per message: a flood pays for each count
            counts = self.trigger.counts()
            for outcome, n in counts.items():
                if n > self._triggers_counted[outcome]:
                    self.metrics.trigger(outcome, n - self._triggers_counted[outcome])
            self._triggers_counted = counts

    def in_flight(self) -> int:
        """Frames captured and not yet finished."""
        return len(self.queue) + sum(len(q) for q in getattr(self, "_stage_queues", ()))

    def _shutdown(self, threads: list[threading.Thread]) -> None:
        deadline = time.monotonic() + self.cfg.run.stop_timeout_s
        sdnotify.notify("STOPPING=1")
        self.stop_event.set()
        capture, *stages = threads
        capture.join(max(0.0, deadline - time.monotonic()))
        self.capture_done.set()
        for t in stages:  # each finishes what it holds once its upstream is done
            t.join(max(0.0, deadline - time.monotonic()))
        if not self.finished.is_set():
            log.error("stop: %d parts were still in the pipeline at the deadline", self.in_flight())
            self._abort.set()
        self._close_triggers(deadline)
        if self.publisher is not None:
            flushed = self.publisher.stop(max(0.5, deadline - time.monotonic()))
            if not flushed:
                assert self.outbox is not None  # made with the publisher
                log.warning("stop: %d results stay in the outbox for the next start", self.outbox.depth())
        self._store_last_trigger_errors(deadline)
        self._parallel_infer.close()
        if self.outbox is not None:
            self.outbox.close()
        if self._metrics_server is not None:
            self._metrics_server.stop()
        snap = self.stats.snapshot()
        log.info("stopped: %s, %d errors, %d dropped", snap["grades"], snap["errors"], self.queue.dropped)


def _env_state_dir() -> Path | None:
    value = os.environ.get("STATE_DIRECTORY")  # set by systemd's StateDirectory=
    return Path(value.split(":")[0]) if value else None

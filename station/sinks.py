"""Where the records go: the sinks.

The pipeline hands every record (a graded result, or an error record) to one
:class:`Fanout` and knows none of the sinks behind it. Each sink is a class of
its own behind one small interface (:class:`Sink`); :func:`build_sinks` makes
them from the config, in the order they are fed:

* :class:`MqttSink`, the durable one: the outbox (SQLite) and the MQTT sender
  behind it. It comes first: whether it stored a record decides whether a
  folder file may go (``Delivery.stored``); it tells the sinks after it the
  outbox seq (``Delivery.seq``) and, later, the broker's acknowledgement of that
  seq (:meth:`Sink.acked`). A sink that must confirm delivery is fed from the
  outbox in the same way, and retried after a restart.
* :class:`MetricsSink`: the Prometheus metrics and the ``…/stats`` figures.
* :class:`JsonlSink`: every record as a line of JSON (``station run --jsonl``).
* the caller's own (``station bench`` observes through one);
* :class:`ArchiveSink`: graded frames and errors on disk.

A new output (OPC UA to the PLC, Sparkplug B to SCADA, an operator's live page)
is one more class with the four methods of :class:`Sink` and one more line in
:func:`build_sinks`; no stage changes. Sinks are called from the finish thread
and from the trigger-errors thread: each guards its own state, and one that can
be slow hands records to a thread of its own rather than slow the line.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Protocol, runtime_checkable

from .archive import Archive
from .config import StationConfig
from .errors import PublishError, StationError
from .messages import dumps
from .metrics import Metrics, RollingStats
from .outbox import WAL_LIMIT, Outbox, OutboxFull
from .priority import ThreadPolicy
from .publish import MqttPublisher
from .types import Frame, FrameError, InspectionResult

log = logging.getLogger(__name__)


@dataclasses.dataclass(slots=True)
class Delivery:
    """What a sink is told of a record besides the record itself.

    frame: the frame (or frame error) the record is about; None for the error of a
    trigger that made no part. result: the graded result; None for an error record.
    seq: the outbox seq the durable sink stored the record under (None: no MQTT, or
    not stored). stored: False when the durable sink could not store it (outbox
    full, or the disk refused the write): a folder file then stays, for the next
    start to inspect.
    """

    frame: Frame | FrameError | None
    result: InspectionResult | None = None
    seq: int | None = None
    stored: bool = True

    @property
    def captured_at(self) -> float | None:
        """The frame's capture time (UNIX s, unrounded; the record's is rounded to the
        millisecond); None without a frame."""
        return self.frame.captured_at if isinstance(self.frame, Frame) else None


class Sink(Protocol):
    """One output of the records, from :meth:`start` to :meth:`close`."""

    def start(self) -> None:
        """Before the first record: start what the sink runs (its threads, connections)."""

    def deliver(self, record: dict, ctx: Delivery) -> None:
        """One record (``messages.result_record`` or ``error_record``), in the order made."""

    def acked(self, seq: int) -> None:
        """The broker acknowledged the record stored under outbox ``seq`` (paho's network thread)."""

    def close(self) -> None:
        """The stop, after the last record: release what the sink holds."""


@runtime_checkable
class CameraAware(Protocol):
    """A sink that also reports the camera's state (Sparkplug B's ``Camera/State`` metric)."""

    def set_camera_state(self, state: str) -> None: ...


class Fanout:
    """The sinks of one daemon, fed in order: each record, and each acknowledgement,
    to every sink. ``mqtt``: the durable sink, which the supervisor also starts,
    asks about and flushes (None without MQTT); ``archive``: the archive the
    supervisor prunes (None when off)."""

    def __init__(self, sinks: Sequence[Sink], mqtt: MqttSink | None = None, archive: Archive | None = None):
        self.sinks = list(sinks)
        self.mqtt = mqtt
        self.archive = archive

    def start(self) -> None:
        for sink in self.sinks:
            sink.start()

    def deliver(self, record: dict, ctx: Delivery) -> None:
        for sink in self.sinks:
            sink.deliver(record, ctx)

    def acked(self, seq: int) -> None:
        for sink in self.sinks:
            sink.acked(seq)

    def close(self) -> None:
        for sink in self.sinks:
            sink.close()


class MqttSink:
    """The durable sink: each record is stored in the outbox before it is sent over
    MQTT (QoS 1), and deleted only once the broker acknowledged it
    (station/publish.py); ``on_ack(seq)`` then hears of it, on paho's network thread.

    A thread of its own (``outbox-checkpoint``, from :meth:`start` until ``stop`` is
    set) copies the outbox's write-ahead log into its file every
    ``outbox.checkpoint_s`` (sooner at high result rates), so that no result's write
    waits for that copy and the log stays bounded.
    """

    def __init__(self, cfg: StationConfig, state_dir: Path | None, metrics: Metrics, policy: ThreadPolicy,
                 on_ack: Callable[[int], None], stop: threading.Event):
        assert cfg.mqtt is not None  # build_sinks makes it only with an mqtt section
        self._mqtt = cfg.mqtt
        self._checkpoint_s = cfg.outbox.checkpoint_s
        self._metrics = metrics
        self._policy = policy
        self._stop = stop
        self.outbox = Outbox.from_config(cfg.outbox, state_dir)
        self.publisher = MqttPublisher(cfg.mqtt, cfg.station.id, self.outbox, policy, on_ack)
        self._checkpoints: threading.Thread | None = None

    def start(self) -> None:
        """Take the outbox's checkpoints over and start sending."""
        self.outbox.take_over_checkpoints()
        self._checkpoints = threading.Thread(target=self._checkpoint_loop, name="outbox-checkpoint", daemon=True)
        self._checkpoints.start()
        self.publisher.start()

    def deliver(self, record: dict, ctx: Delivery) -> None:
        try:
            ctx.seq = self.publisher.publish_result(record)
        except OutboxFull as exc:
            # refuse_new: the outbox keeps what it has; this result is logged and counted.
            ctx.stored = False
            self._metrics.error("outbox_full")
            log.error("result %s not stored: %s", record.get("id"), exc)
        except PublishError as exc:
            ctx.stored = False
            self._metrics.error("outbox_write")
            log.error("result %s not stored: %s", record.get("id"), exc)

    def acked(self, seq: int) -> None:
        """Its own acknowledgements: it reported them to ``on_ack`` already."""

    def has_room(self) -> bool:
        """False while the broker is connected and the outbox holds more than two
        windows of results (2 × ``mqtt.max_inflight``): records that can wait (the
        errors of a flood of triggers) should."""
        pub = self.publisher
        return not pub.connected or pub.outbox_depth <= 2 * self._mqtt.max_inflight

    def flush(self, timeout: float) -> None:
        """Send what the outbox holds for up to ``timeout`` s, publish the "stopped"
        status and disconnect; what is left stays for the next start, and records
        delivered from now on are stored for it."""
        if not self.publisher.stop(timeout):
            log.warning("stop: %d results stay in the outbox for the next start", self.outbox.depth())

    def close(self) -> None:
        """Close the outbox (once the checkpoint thread, ended by the stop, is done)."""
        if self._checkpoints is not None:
            self._checkpoints.join()
        self.outbox.close()

    def _checkpoint_loop(self) -> None:
        """Copies the outbox's WAL into its database file every ``outbox.checkpoint_s``,
        off the path of puts and acks (Outbox.take_over_checkpoints), until the stop.
        Sooner when results come so fast that the WAL would grow past a quarter of
        WAL_LIMIT between two copies: at WAL_LIMIT a result's commit would copy it."""
        self._policy.background()
        period = self._checkpoint_s
        shortest = min(period, 0.05)
        wait = shortest  # the rate is not known yet: the first wait finds it out
        while not self._stop.wait(wait):
            try:
                pages, _ = self.outbox.checkpoint()
            except PublishError as exc:  # e.g. disk full: the WAL keeps the results; retried next period
                log.warning("%s", exc)
                self._metrics.error("outbox_checkpoint")
                wait = period
                continue
            # pages: what the WAL grew by since the last checkpoint (each one starts it over)
            grown = pages * self.outbox.page_size
            wait = period if grown <= 0 else min(period, max(shortest, wait * WAL_LIMIT / 4 / grown))


class MetricsSink:
    """Counts each record once it is on its way (the broker's round trip overlaps
    this): the Prometheus metrics and the figures of the ``…/stats`` message."""

    def __init__(self, metrics: Metrics, stats: RollingStats):
        self._metrics = metrics
        self._stats = stats

    def start(self) -> None:
        pass

    def deliver(self, record: dict, ctx: Delivery) -> None:
        self._stats.add(record)
        self._metrics.observe_result(record)

    def acked(self, seq: int) -> None:
        pass

    def close(self) -> None:
        pass


class JsonlSink:
    """Every record as one line of JSON appended to ``path`` (created with its
    folder), flushed line by line: ``station run --jsonl``."""

    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self._out = open(path, "a", encoding="utf-8")
        self._lock = threading.Lock()  # one line at a time, from the finish and trigger-errors threads

    def start(self) -> None:
        pass

    def deliver(self, record: dict, ctx: Delivery) -> None:
        with self._lock:
            self._out.write(dumps(record) + "\n")
            self._out.flush()

    def acked(self, seq: int) -> None:
        pass

    def close(self) -> None:
        with self._lock:
            self._out.close()


class ArchiveSink:
    """Graded frames as ``archive.grades`` selects them, and error records with their
    frame when ``archive.errors`` (station/archive.py). A trigger's error has no
    frame and is not archived."""

    def __init__(self, archive: Archive):
        self._archive = archive

    def start(self) -> None:
        pass

    def deliver(self, record: dict, ctx: Delivery) -> None:
        frame, result = ctx.frame, ctx.result
        if frame is None:
            return
        if result is not None:
            assert isinstance(frame, Frame)  # a result is a frame's
            if self._archive.wants(result):
                self._archive.save(frame.image, result, record)
        else:
            self._archive.save_error(record, frame.image if isinstance(frame, Frame) else None)

    def acked(self, seq: int) -> None:
        pass

    def close(self) -> None:
        pass


def archive_root(cfg: StationConfig, state_dir: Path | None) -> Path:
    """``archive.path``, relative to the state directory unless absolute."""
    path = cfg.archive.path
    if path.is_absolute():
        return path
    if state_dir is None:
        raise StationError(f"archive.path: {path} is relative but no state directory is set (--state-dir, run.state_dir or $STATE_DIRECTORY)")
    return Path(state_dir) / path


def build_sinks(cfg: StationConfig, state_dir: Path | None, metrics: Metrics, stats: RollingStats,
                policy: ThreadPolicy, on_ack: Callable[[int], None], stop: threading.Event,
                jsonl: Path | None = None, extra: Sequence[Sink] = ()) -> Fanout:
    """The daemon's sinks, in the order they are fed (see above): the durable one with
    an ``mqtt`` section (``on_ack`` hears its acknowledgements; its checkpoints end
    when ``stop`` is set), the metrics, the JSONL file when ``jsonl`` is given,
    ``extra``, the archive when enabled. They start with :meth:`Fanout.start`."""
    mqtt = MqttSink(cfg, state_dir, metrics, policy, on_ack, stop) if cfg.mqtt is not None else None
    archive = Archive(cfg.archive, archive_root(cfg, state_dir)) if cfg.archive.enabled else None
    sinks: list[Sink] = [mqtt] if mqtt is not None else []
    sinks.append(MetricsSink(metrics, stats))
    if jsonl is not None:
        sinks.append(JsonlSink(jsonl))
    if cfg.plc is not None:  # the optional extras are imported only when configured
        from .plc import OpcUaSink

        sinks.append(OpcUaSink(cfg.plc, cfg.station.id, policy=policy))
    if cfg.sparkplug is not None:
        from .sparkplug import SparkplugSink

        sinks.append(SparkplugSink(cfg.sparkplug, cfg.station.id, state_dir, policy))
    sinks += extra
    if archive is not None:
        sinks.append(ArchiveSink(archive))
    return Fanout(sinks, mqtt, archive)

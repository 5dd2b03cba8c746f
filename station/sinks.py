"""Where the records go: the sinks.

The pipeline hands every record (a graded result, or an error record) to one
:class:`Fanout` and knows none of the sinks behind it. Each sink is a class of
its own behind one small interface (:class:`Sink`); :func:`build_sinks` makes
them from the config, in the order they are fed:

* :class:`OutboxSink`, the durable store (SQLite), with an ``mqtt``, ``plc`` or
  ``sparkplug`` section. It comes first: it stores each record for every sink
  that confirms delivery, and whether it stored it decides whether a folder file
  may go (``Delivery.stored``); it tells the sinks after it the outbox seq
  (``Delivery.seq``).
* :class:`MqttSink`: the MQTT sender, which sends what the outbox holds for it;
  the sinks after it hear of the broker's acknowledgements (:meth:`Sink.acked`).
* the PLC (station/plc.py ``OpcUaSink``) and Sparkplug B (station/sparkplug.py
  ``SparkplugSink``), when configured: like MQTT, each is fed from the outbox
  (:class:`Confirming`), acknowledges each result there once its delivery was
  confirmed, and is handed what it had not confirmed after a restart. A row of
  the outbox goes once all of them confirmed it.
* :class:`MetricsSink`: the Prometheus metrics and the ``…/stats`` figures.
* :class:`JsonlSink`: every record as a line of JSON (``station run --jsonl``).
* the caller's own (``station bench`` observes through one);
* :class:`ArchiveSink`: graded frames and errors on disk.
* ``OperatorView`` (station/view/): the operator's live page, when configured.

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
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from .archive import Archive
from .config import StationConfig
from .errors import PublishError, StationError
from .messages import dumps, topics_for
from .metrics import Metrics, RollingStats
from .outbox import WAL_LIMIT, Outbox, OutboxFull
from .priority import ThreadPolicy
from .publish import MqttPublisher, store_record
from .types import Frame, FrameError, InspectionResult

log = logging.getLogger(__name__)


@dataclasses.dataclass(slots=True)
class Delivery:
    """What a sink is told of a record besides the record itself.

    frame: the frame (or frame error) the record is about; None for the error of a
    trigger that made no part. result: the graded result; None for an error record.
    seq: the outbox seq the durable store stored the record under (None: no outbox,
    or not stored). stored: False when the durable store could not store it (outbox
    full, or the disk refused the write): a folder file then stays, for the next
    start to inspect, and no sink fed from the outbox gets it. acked: the broker
    will acknowledge ``seq`` (:meth:`Sink.acked`): the MQTT sink sends it.
    """

    frame: Frame | FrameError | None
    result: InspectionResult | None = None
    seq: int | None = None
    stored: bool = True
    acked: bool = False

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


@runtime_checkable
class ModelsAware(Protocol):
    """A sink that also names the models in use (the operator's live page): role →
    ``OnnxModel.describe()``, told at the start and after each reload."""

    def set_models(self, models: Mapping[str, Mapping[str, Any]]) -> None: ...


@runtime_checkable
class PartSignals(Protocol):
    """A sink whose peer also signals parts (the PLC's part-present edges: ``trigger.type: plc``)."""

    def signal_parts(self, on_part: Callable[[str | None], None]) -> None: ...


@runtime_checkable
class Confirming(Protocol):
    """A sink fed from the outbox: it acknowledges there each result whose delivery was
    confirmed (``outbox.ack(seq, sink)``), and is handed what it had not after a restart.
    ``sink``: its name in the outbox (its config section: mqtt, plc, sparkplug)."""

    sink: str

    def link_state(self) -> tuple[str, bool]:
        """Its connection: (its state in a word, e.g. "connected", "online", "disconnected";
        whether it can deliver now)."""


class Fanout:
    """The sinks of one daemon, fed in order: each record, and each acknowledgement,
    to every sink, and closed in the reverse order (the outbox last, once the sinks it
    feeds have stopped). ``store``: the durable store, whose outbox the supervisor
    reports on (None without one); ``mqtt``: the MQTT sink, which the supervisor also
    asks about and flushes (None without MQTT); ``archive``: the archive the supervisor
    prunes (None when off)."""

    def __init__(self, sinks: Sequence[Sink], mqtt: MqttSink | None = None, archive: Archive | None = None,
                 store: OutboxSink | None = None):
        self.sinks = list(sinks)
        self.mqtt = mqtt
        self.archive = archive
        self.store = store

    def confirming(self) -> list[Confirming]:
        """The sinks fed from the outbox, in order."""
        return [sink for sink in self.sinks if isinstance(sink, Confirming)]

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
        for sink in reversed(self.sinks):
            sink.close()


class OutboxSink:
    """The durable store: each record is stored in the outbox (station/outbox.py) for
    every sink that confirms delivery (``sinks``: their names, the config sections
    mqtt, plc, sparkplug) before any of them sends it; each deletes its part of it
    once its delivery was confirmed, and the row goes with the last one.

    A thread of its own (``outbox-checkpoint``, from :meth:`start` until ``stop`` is
    set) copies the outbox's write-ahead log into its file every
    ``outbox.checkpoint_s`` (sooner at high result rates), so that no result's write
    waits for that copy and the log stays bounded.
    """

    def __init__(self, cfg: StationConfig, state_dir: Path | None, metrics: Metrics, policy: ThreadPolicy,
                 stop: threading.Event, sinks: Sequence[str]):
        self._checkpoint_s = cfg.outbox.checkpoint_s
        self._metrics = metrics
        self._policy = policy
        self._stop = stop
        self._topic = topics_for(cfg.mqtt, cfg.station.id).result if cfg.mqtt is not None else ""
        self.outbox = Outbox.from_config(cfg.outbox, state_dir, sinks)
        self._checkpoints: threading.Thread | None = None

    def start(self) -> None:
        """Take the outbox's checkpoints over."""
        self.outbox.take_over_checkpoints()
        self._checkpoints = threading.Thread(target=self._checkpoint_loop, name="outbox-checkpoint", daemon=True)
        self._checkpoints.start()

    def deliver(self, record: dict, ctx: Delivery) -> None:
        try:
            ctx.seq = store_record(self.outbox, record, self._topic)
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
        """The sinks acknowledge in the outbox themselves."""

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


class MqttSink:
    """MQTT: sends over MQTT (QoS 1) what the outbox holds for it (``sink``), each
    record as soon as :class:`OutboxSink` stored it; an entry is acknowledged there
    once the broker acknowledged it (station/publish.py), and ``on_ack(seq)`` then
    hears of it, on paho's network thread. The outbox is the store's: this sink
    neither opens nor closes it."""

    def __init__(self, cfg: StationConfig, outbox: Outbox, policy: ThreadPolicy, on_ack: Callable[[int], None],
                 sink: str = "mqtt"):
        assert cfg.mqtt is not None  # build_sinks makes it only with an mqtt section
        self._mqtt = cfg.mqtt
        self.sink = sink
        self.outbox = outbox
        self.publisher = MqttPublisher(cfg.mqtt, cfg.station.id, outbox, policy, on_ack, sink)

    def start(self) -> None:
        """Start sending (what waits from before first)."""
        self.publisher.start()

    def deliver(self, record: dict, ctx: Delivery) -> None:
        if ctx.seq is not None:
            ctx.acked = True
            self.publisher.send_now()

    def acked(self, seq: int) -> None:
        """Its own acknowledgements: it reported them to ``on_ack`` already."""

    def link_state(self) -> tuple[str, bool]:
        return self.publisher.state.value, self.publisher.connected

    def has_room(self) -> bool:
        """False while the broker is connected and the outbox holds more than two
        windows of results for it (2 × ``mqtt.max_inflight``): records that can wait
        (the errors of a flood of triggers) should."""
        pub = self.publisher
        return not pub.connected or pub.outbox_depth <= 2 * self._mqtt.max_inflight

    def flush(self, timeout: float) -> None:
        """Send what the outbox holds for up to ``timeout`` s, publish the "stopped"
        status and disconnect; what is left stays for the next start, and records
        delivered from now on are stored for it."""
        if not self.publisher.stop(timeout):
            log.warning("stop: %d results stay in the outbox for MQTT's next start", self.publisher.outbox_depth)

    def close(self) -> None:
        """Stopped by :meth:`flush` already."""


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
    """The daemon's sinks, in the order they are fed (see above): the durable store with
    an ``mqtt``, ``plc`` or ``sparkplug`` section (its checkpoints end when ``stop`` is
    set), MQTT (``on_ack`` hears its acknowledgements), the metrics, the JSONL file
    when ``jsonl`` is given, the PLC, Sparkplug B, ``extra``, the archive when enabled,
    the operator's live page when enabled (station/view/). They start with :meth:`Fanout.start`."""
    confirming = [name for name in ("mqtt", "plc", "sparkplug") if getattr(cfg, name) is not None]
    store = OutboxSink(cfg, state_dir, metrics, policy, stop, confirming) if confirming else None
    sinks: list[Sink] = [store] if store is not None else []
    mqtt = MqttSink(cfg, store.outbox, policy, on_ack) if store is not None and cfg.mqtt is not None else None
    archive = Archive(cfg.archive, archive_root(cfg, state_dir)) if cfg.archive.enabled else None
    sinks += [mqtt] if mqtt is not None else []
    sinks.append(MetricsSink(metrics, stats))
    if jsonl is not None:
        sinks.append(JsonlSink(jsonl))
    if store is not None and cfg.plc is not None:  # the optional extras are imported only when configured
        from .plc import OpcUaSink

        sinks.append(OpcUaSink(cfg.plc, cfg.station.id, store.outbox, policy=policy))
    if store is not None and cfg.sparkplug is not None:
        from .sparkplug import SparkplugSink

        sinks.append(SparkplugSink(cfg.sparkplug, cfg.station.id, store.outbox, state_dir, policy))
    sinks += extra
    if archive is not None:
        sinks.append(ArchiveSink(archive))
    if cfg.operator_view.enabled:  # last: it shows the health of those before it
        from .view import OperatorView

        view = OperatorView(cfg.operator_view, cfg.station.id, mqtt, store.outbox if store is not None else None, policy)
        view.peers = list(sinks)
        sinks.append(view)
    return Fanout(sinks, mqtt, archive, store)

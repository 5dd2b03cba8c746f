"""Prometheus metrics of one daemon, served over HTTP at ``/metrics``.

Each :class:`Metrics` owns a private ``CollectorRegistry`` (not the process-wide
default one), so several instances (tests, one per camera in one process) do not
collide. The daemon calls the small methods below from its threads; they are
thread-safe and cheap (no I/O).

Exposed series (all prefixed ``station_``; times in seconds, as Prometheus expects):

=====================================================  ===================================================
``frames_captured_total``                              frames the source delivered
``frames_dropped_total{reason}``                       frames not inspected, by reason (e.g. queue_full)
``results_total{grade}``                               results per grade (PASS / DISCOUNT / REJECT)
``errors_total{kind}``                                 error records (kind="inspection") and other errors
``triggers_total{outcome}``                            MQTT trigger messages by outcome (see TRIGGER_OUTCOMES)
``stage_latency_seconds{stage}``                       histogram per pipeline stage (latency_ms of a result)
``end_to_end_latency_seconds``                         histogram, capture → result observed (queueing included)
``outbox_depth`` / ``outbox_alarm``                    results held in the outbox; 1 while it is full
``outbox_waiting{sink}``                               results in the outbox not yet confirmed by that output
``sink_connected{sink}``                               1 while that output (mqtt, plc, sparkplug) can deliver
``camera_state{camera_state}``                         enum: connected / reconnecting / lost
``mqtt_connected``                                     1 while connected to the broker
``queue_depth{queue}``                                 frames waiting in a bounded queue
``model_info{model,name,version,sha256}``              1 per loaded model
``model_provider_info{model,provider}``                1 per execution provider a model's session uses
``build_info{version}``                                1
=====================================================  ===================================================

:class:`RollingStats` keeps the figures of the periodic ``…/stats`` message:
counts since start and a window of recent latencies.
"""

from __future__ import annotations

import collections
import logging
import socket
import threading
import time
from datetime import datetime
from socketserver import ThreadingMixIn
from typing import Any, Mapping
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

import numpy as np
from prometheus_client import CollectorRegistry, Counter, Enum, Gauge, Histogram, generate_latest, make_wsgi_app

from . import __version__
from .errors import StationError
from .types import Grade

log = logging.getLogger(__name__)

NAMESPACE = "station"
CAMERA_STATES = ("connected", "reconnecting", "lost")
# What became of the MQTT trigger messages (trigger.Trigger): taken as a part (accepted),
# refused as invalid, ignored as retained; and of the accepted parts that got no frame:
# reported as the oldest beyond trigger.max_pending (overflow), after trigger.timeout_s
# (expired), or at the stop (stopped).
TRIGGER_OUTCOMES = ("accepted", "invalid", "retained", "overflow", "expired", "stopped")

# Stage latencies run from ~0.5 ms (grading) to ~2 s (a large model on a CPU).
STAGE_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0)
# End to end adds queueing: up to the bounded queue's length times the frame time.
E2E_BUCKETS = STAGE_BUCKETS + (5.0, 10.0)


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


class Metrics:
    """The daemon's counters, gauges and histograms in a private registry."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r, ns = self.registry, NAMESPACE
        self._frames = Counter("frames_captured", "Frames delivered by the frame source", namespace=ns, registry=r)
        self._dropped = Counter(
            "frames_dropped", "Frames not inspected, by reason", ["reason"], namespace=ns, registry=r
        )
        self._results = Counter("results", "Inspection results by grade", ["grade"], namespace=ns, registry=r)
        self._errors = Counter(
            "errors", "Errors: error records (kind=inspection) and others the daemon counts", ["kind"], namespace=ns, registry=r
        )
        self._triggers = Counter(
            "triggers", "MQTT trigger messages and their parts, by outcome", ["outcome"], namespace=ns, registry=r
        )
        self._stage = Histogram(
            "stage_latency_seconds", "Pipeline stage latency", ["stage"], buckets=STAGE_BUCKETS, namespace=ns, registry=r
        )
        self._e2e = Histogram(
            "end_to_end_latency_seconds", "From frame capture to the result being observed (queueing included)",
            buckets=E2E_BUCKETS, namespace=ns, registry=r,
        )
        self._outbox_depth = Gauge("outbox_depth", "Results waiting in the outbox", namespace=ns, registry=r)
        self._outbox_alarm = Gauge("outbox_alarm", "1 while the outbox is full or dropping results", namespace=ns, registry=r)
        self._outbox_waiting = Gauge("outbox_waiting", "Results in the outbox not yet confirmed by an output", ["sink"],
                                     namespace=ns, registry=r)
        self._sink = Gauge("sink_connected", "1 while an output fed from the outbox can deliver", ["sink"],
                           namespace=ns, registry=r)
        self._camera = Enum("camera_state", "Frame source state", states=list(CAMERA_STATES), namespace=ns, registry=r)
        self._mqtt = Gauge("mqtt_connected", "1 while connected to the MQTT broker", namespace=ns, registry=r)
        self._queue = Gauge("queue_depth", "Items waiting in a bounded queue", ["queue"], namespace=ns, registry=r)
        self._model = Gauge(
            "model_info", "Loaded models (value 1)", ["model", "name", "version", "sha256"], namespace=ns, registry=r
        )
        self._provider = Gauge(
            "model_provider_info", "Execution providers of each model's session (value 1)", ["model", "provider"],
            namespace=ns, registry=r,
        )
        Gauge("build_info", "station version (value 1)", ["version"], namespace=ns, registry=r).labels(__version__).set(1)
        # Series that exist from the start, so rates and alerts see 0 rather than nothing.
        for grade in Grade:
            self._results.labels(grade.value)
        self._errors.labels("inspection")
        for outcome in TRIGGER_OUTCOMES:
            self._triggers.labels(outcome)
        self._camera.state("reconnecting")  # until the daemon reports the source open

    # --- what the daemon calls -------------------------------------------------------

    def frame_captured(self, n: int = 1) -> None:
        self._frames.inc(n)

    def frame_dropped(self, reason: str, n: int = 1) -> None:
        """reason: a short fixed word (queue_full, decode_error, …), not free text: it is a label."""
        self._dropped.labels(reason).inc(n)

    def error(self, kind: str, n: int = 1) -> None:
        """Count an error other than an error record (kind: archive, publish, …; a fixed word)."""
        self._errors.labels(kind).inc(n)

    def trigger(self, outcome: str, n: int = 1) -> None:
        """Count trigger messages or parts by outcome (one of TRIGGER_OUTCOMES: a label)."""
        self._triggers.labels(outcome).inc(n)

    def observe_result(self, record: dict, now: float | None = None) -> None:
        """Count one result payload (``messages.result_record``) or error record.

        A result counts under its grade, each ``latency_ms`` entry (milliseconds)
        feeds ``stage_latency_seconds{stage=<key>}`` (``total`` included, as the
        whole pipeline), and capture → ``now`` (UNIX seconds, default the current
        time) feeds ``end_to_end_latency_seconds``. An error record counts under
        ``errors_total{kind="inspection"}``.
        """
        grade = record.get("grade")
        if grade is None:
            self._errors.labels("inspection").inc()
            return
        self._results.labels(str(grade)).inc()
        for stage, ms in (record.get("latency_ms") or {}).items():
            if isinstance(ms, (int, float)) and ms >= 0:
                self._stage.labels(stage).observe(ms / 1000.0)
        captured = _parse_time(record.get("captured_at"))
        if captured is not None:
            e2e = (time.time() if now is None else now) - captured
            if e2e >= 0:  # a clock step backwards would give nonsense
                self._e2e.observe(e2e)

    def set_outbox(self, depth: int, alarm: bool, waiting: Mapping[str, int] | None = None) -> None:
        """depth: results held; waiting: results not yet confirmed, by output (sink name: a label)."""
        self._outbox_depth.set(depth)
        self._outbox_alarm.set(1 if alarm else 0)
        for sink, n in (waiting or {}).items():
            self._outbox_waiting.labels(sink).set(n)

    def set_sink_connected(self, sink: str, connected: bool) -> None:
        self._sink.labels(sink).set(1 if connected else 0)

    def set_camera_state(self, state: str) -> None:
        """state: connected, reconnecting or lost (ValueError otherwise: a bug in the caller)."""
        if state not in CAMERA_STATES:
            raise ValueError(f"camera state must be one of {CAMERA_STATES}, got {state!r}")
        self._camera.state(state)

    def set_mqtt_connected(self, connected: bool) -> None:
        self._mqtt.set(1 if connected else 0)

    def set_queue_depth(self, n: int, queue: str = "inspect") -> None:
        self._queue.labels(queue).set(n)

    def set_models(self, models_info: Mapping[str, Mapping[str, Any]]) -> None:
        """Replace the model series.

        models_info: role → ``OnnxModel.describe()`` (``sha256``, ``providers``,
        ``card.name``, ``card.version``), or role → a flat mapping with ``name``,
        ``version``, ``sha256`` and ``providers`` (list of provider names).
        """
        self._model.clear()
        self._provider.clear()
        for role, info in models_info.items():
            card = info.get("card") or {}
            name = info.get("name", card.get("name", ""))
            version = info.get("version", card.get("version", ""))
            self._model.labels(role, str(name), str(version), str(info.get("sha256", ""))).set(1)
            for provider in info.get("providers") or ():
                self._provider.labels(role, str(provider)).set(1)

    # --- exposition -------------------------------------------------------------------

    def render(self) -> bytes:
        """The current metrics in the Prometheus text format."""
        return generate_latest(self.registry)

    def start_server(self, host: str = "127.0.0.1", port: int = 9108) -> "MetricsServer":
        """Serve ``/metrics`` on ``host:port`` from a background thread; ``port`` 0 picks a free one.

        Raises StationError when the address cannot be bound (in use, no such address).
        """
        return MetricsServer(self, host, port)


class _Server(ThreadingMixIn, WSGIServer):
    daemon_threads = True  # a slow scraper never holds up shutdown
    allow_reuse_address = True


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # one line per scrape is noise
        log.debug("metrics %s: " + format, self.address_string(), *args)


class MetricsServer:
    """A running ``/metrics`` endpoint; ``stop()`` ends it (within ~0.1 s) and frees the port."""

    def __init__(self, metrics: Metrics, host: str, port: int):
        try:
            family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        except socket.gaierror as exc:
            raise StationError(f"metrics: cannot listen on {host}:{port}: {exc.strerror}") from None

        class Server(_Server):
            address_family = family

        try:
            self._httpd = make_server(host, port, make_wsgi_app(metrics.registry), Server, handler_class=_QuietHandler)
        except OSError as exc:
            raise StationError(f"metrics: cannot listen on {host}:{port}: {exc.strerror or exc}") from None
        self.host = host
        self.port: int = self._httpd.server_port
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.1}, name="metrics-http", daemon=True
        )
        self._thread.start()
        log.info("metrics served at %s", self.url)

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/metrics"

    def stop(self, timeout: float = 2.0) -> None:
        """Stop serving and close the socket. Idempotent."""
        if self._thread.is_alive():
            self._httpd.shutdown()
            self._thread.join(timeout)
        self._httpd.server_close()

    def __enter__(self) -> "MetricsServer":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()


def _parse_time(value: Any) -> float | None:
    """An ISO 8601 time as written by ``messages.iso_time`` → UNIX seconds; None if absent or unreadable."""
    if not isinstance(value, str):
        return None
    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None

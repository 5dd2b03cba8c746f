"""The operator view as a sink: what the page shows, kept up to date from the records.

:meth:`OperatorView.deliver` runs on the line's finish thread and does only what is
cheap and must not be lost: the shift's counts and heatmap (a few array additions
under a lock), and a reference to the frame in a bounded queue (the oldest dropped
when full, counted). A thread of its own (``operator-view``) draws the latest parts'
frames with mask and boxes, encodes them as JPEG, and hands events to the browsers
(station/view/server.py), which it never waits for.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np

from ..config import OperatorViewConfig
from ..messages import dumps
from ..overlay import draw_overlay
from ..priority import ThreadPolicy
from ..publish import read_password
from ..outbox import Outbox
from ..sinks import Confirming, Delivery, MqttSink, Sink
from ..trends import GRADES, GRID, GradeCounts, Heatmap, hour_start, local_label, shift_bounds
from ..types import Frame, InspectionResult
from .server import Clients, Content, ViewServer, sse_event

log = logging.getLogger(__name__)

STATE_EVERY_S = 0.5  # the state event at most this often while parts flow (and every second when idle)
JPEG_QUALITY = 80
# What the page calls the other sinks (their class names otherwise).
SINK_NAMES = {"OutboxSink": "outbox (durable)", "MqttSink": "MQTT", "MetricsSink": "metrics", "JsonlSink": "JSONL file",
              "ArchiveSink": "archive", "OpcUaSink": "PLC (OPC UA)", "SparkplugSink": "Sparkplug B"}


class ShiftState:
    """The current shift's counts per grade, per hour and its heatmap; starts over when
    a record comes at or after the shift's end (``shifts``: local ``HH:MM`` starts)."""

    def __init__(self, shifts: Sequence[str], now: float):
        self._shifts = list(shifts)
        self._start(now, now)

    def _start(self, ts: float, since: float) -> None:
        self.begin, self.end = shift_bounds(ts, self._shifts)
        self.since = since  # the shift's first record, or the daemon's start in its first shift
        self.hours = GradeCounts()
        self.heatmap = Heatmap()

    def add(self, record: dict, ts: float) -> None:
        if ts >= self.end:
            self._start(ts, ts)
        self.hours.add(hour_start(ts), record)
        self.heatmap.add(record)

    def as_dict(self) -> dict:
        rows = self.hours.rows()
        totals = {k: sum(counts[k] for _, counts in rows) for k in (*GRADES, "errors")}
        return {
            "start": local_label(self.begin), "end": local_label(self.end), "since": local_label(self.since),
            "grades": totals,
            "hours": [{"hour": local_label(h, with_date=False), **counts} for h, counts in rows],
            "heatmap": self.heatmap.as_dict(),
            "grid": GRID,
        }


@dataclass
class _Job:
    record: dict
    frame: np.ndarray | None
    result: InspectionResult | None


def part_summary(record: dict, image_url: str | None) -> dict:
    """What the page lists of one record (result or error)."""
    ts = record.get("captured_at")
    out: dict[str, Any] = {"id": record.get("id"), "seq": record.get("seq"), "part_id": record.get("part_id"),
                           "source": record.get("source"), "captured_at": ts, "image": image_url}
    if "error" in record:
        out["error"] = record["error"]
        return out
    out.update({k: record[k] for k in ("grade", "rule", "reason", "defect_area_pct")})
    out["defects"] = [{k: d[k] for k in ("class", "score", "area_pct", "kind")} for d in record["defects"]]
    return out


class OperatorView:
    """The operator's live page as one sink (``operator_view`` in the config)."""

    def __init__(self, cfg: OperatorViewConfig, station_id: str, mqtt: MqttSink | None, outbox: Outbox | None,
                 policy: ThreadPolicy):
        self.cfg = cfg
        self._station_id = station_id
        self._mqtt = mqtt
        self._outbox = outbox
        self._policy = policy
        self.peers: list[Sink] = []  # the daemon's other sinks, whose health the page shows
        self.clients = Clients(cfg.max_clients)
        self.server: ViewServer | None = None
        self.dropped = 0  # frames not drawn: the drawing thread was behind by ``cfg.latest`` parts
        self._lock = threading.Lock()
        self._shift = ShiftState(cfg.shifts, time.time())
        self._jobs: collections.deque[_Job] = collections.deque()
        self._latest: collections.deque[dict] = collections.deque(maxlen=cfg.latest)
        self._images: dict[str, bytes] = {}
        self._camera = "starting"
        self._models: dict[str, Mapping[str, Any]] = {}
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # --- the Sink -------------------------------------------------------------------------

    def start(self) -> None:
        """Read the secret (ConfigError naming ``operator_view.auth``), serve, start drawing."""
        secret = read_password(self.cfg.auth, "operator_view.auth")
        content = Content(self.state, self._hello, self._image, self.clients)
        self.server = ViewServer(self.cfg, content, secret, self._policy, lambda data: dumps(data).encode())
        self._thread = threading.Thread(target=self._run, name="operator-view", daemon=True)
        self._thread.start()
        log.info("operator view at %s", self.server.url)

    def deliver(self, record: dict, ctx: Delivery) -> None:
        frame = ctx.frame.image if isinstance(ctx.frame, Frame) else None
        ts = ctx.captured_at if ctx.captured_at is not None else time.time()
        with self._lock:
            self._shift.add(record, ts)
            if len(self._jobs) >= self.cfg.latest:
                self._jobs.popleft()
                self.dropped += 1
            self._jobs.append(_Job(record, frame, ctx.result))
        self._wake.set()

    def acked(self, seq: int) -> None:
        """The broker's acknowledgements: the page shows the outbox's depth instead."""

    def set_camera_state(self, state: str) -> None:
        self._camera = state

    def set_models(self, models: Mapping[str, Mapping[str, Any]]) -> None:
        """role → ``OnnxModel.describe()``: the models the page names (at start and each reload)."""
        self._models = dict(models)

    def close(self) -> None:
        self._stop.set()
        self._wake.set()
        self.clients.close()
        if self.server is not None:
            self.server.stop()
        if self._thread is not None:
            self._thread.join(5.0)

    # --- what the server serves -------------------------------------------------------------

    def state(self) -> dict:
        """Everything the page shows but the images: JSON-ready."""
        with self._lock:
            shift = self._shift.as_dict()
            latest = list(self._latest)
        return {"station": self._station_id, "shift": shift, "health": self._health(),
                "models": self._model_list(), "latest_max": self.cfg.latest, "latest": latest}

    def _hello(self) -> list[bytes]:
        """A new stream's first events: the state, then the latest parts, oldest first."""
        state = self.state()
        latest = state.pop("latest")
        return [sse_event("state", dumps(state))] + [sse_event("part", dumps(p)) for p in latest]

    def _image(self, result_id: str) -> bytes | None:
        with self._lock:
            return self._images.get(result_id)

    def _health(self) -> dict:
        mqtt: dict[str, Any] = {"configured": self._mqtt is not None}
        if self._mqtt is not None:
            mqtt["state"], mqtt["connected"] = self._mqtt.link_state()
        outbox: dict[str, Any] = {"configured": self._outbox is not None}
        if self._outbox is not None:
            outbox.update(depth=self._outbox.depth(), alarm=self._outbox.alarm, waiting=self._outbox.waiting())
        sinks = []
        for sink in self.peers:
            state, ok = sink.link_state() if isinstance(sink, Confirming) else ("running", True)
            sinks.append({"name": SINK_NAMES.get(type(sink).__name__, type(sink).__name__), "state": state, "ok": ok})
        view = {"browsers": len(self.clients), "browsers_dropped": self.clients.dropped, "frames_not_drawn": self.dropped}
        return {"camera": self._camera, "mqtt": mqtt, "outbox": outbox, "sinks": sinks, "view": view}

    def _model_list(self) -> list[dict]:
        out = []
        for role, info in self._models.items():
            card = info.get("card") or {}
            out.append({"role": role, "name": card.get("name"), "version": card.get("version"),
                        "providers": list(info.get("providers") or ()), "sha256": str(info.get("sha256", ""))[:12]})
        return out

    # --- the drawing thread -------------------------------------------------------------------

    def _run(self) -> None:
        self._policy.background()
        last_state = 0.0
        while not self._stop.is_set():
            self._wake.wait(1.0)
            self._wake.clear()
            while True:
                with self._lock:
                    job = self._jobs.popleft() if self._jobs else None
                if job is None:
                    break
                try:
                    self._show(job)
                except Exception:  # the top of the worker loop: the next part is shown all the same
                    log.exception("operator view: part %s could not be shown", job.record.get("id"))
            if len(self.clients) and time.monotonic() - last_state >= STATE_EVERY_S:
                last_state = time.monotonic()
                state = self.state()
                del state["latest"]
                self.clients.broadcast(sse_event("state", dumps(state)))

    def _show(self, job: _Job) -> None:
        """Draw and encode one part's frame, keep it among the latest, tell the browsers."""
        rid = str(job.record.get("id"))
        jpeg = self._draw(job) if job.frame is not None else None
        summary = part_summary(job.record, f"/image/{rid}.jpg" if jpeg is not None else None)
        with self._lock:
            if len(self._latest) == self._latest.maxlen:
                self._images.pop(str(self._latest[0]["id"]), None)
            self._latest.append(summary)
            if jpeg is not None:
                self._images[rid] = jpeg
        self.clients.broadcast(sse_event("part", dumps(summary)))

    def _draw(self, job: _Job) -> bytes | None:
        assert job.frame is not None
        image = draw_overlay(job.frame, job.result) if job.result is not None else job.frame
        h, w = image.shape[:2]
        if w > self.cfg.image_width:
            size = (self.cfg.image_width, max(1, round(h * self.cfg.image_width / w)))
            image = cv2.resize(image, size, interpolation=cv2.INTER_AREA)
        ok, buf = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY])
        return buf.tobytes() if ok else None

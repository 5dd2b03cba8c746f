"""The only place that defines topics and payloads (JSONL records, MQTT messages).

A payload is a JSON object with ``schema_version``; results and error records
are described by the JSON Schema in ``station/schemas/result.schema.json``.
Publishers serialise these dicts; they never compute.

Topics, under a prefix ``<enterprise>/<site>/<area>/<line>/<station>`` by default:

* ``<prefix>/result``  QoS 1, not retained, one message per inspected frame;
* ``<prefix>/status``  QoS 1, retained: online / offline (the Last Will) / stopped;
* ``<prefix>/stats``   QoS 0, not retained, periodic counters;
* ``<prefix>/trigger`` subscribed by the daemon with an mqtt trigger: a part id
  (plain text, or JSON ``{"part_id": "…"}``) for the next frame; a payload that
  names no valid part id (``trigger.parse_trigger``) gets an error record.
"""

from __future__ import annotations

import base64
import json
import re
import time
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Literal

import cv2
import numpy as np

from .config import MqttConfig
from .errors import ConfigError
from .types import InspectionResult

SCHEMA_VERSION = 1
SCHEMA_PATH = Path(__file__).resolve().parent / "schemas" / "result.schema.json"


def iso_time(ts: float) -> str:
    """UNIX seconds → ISO 8601 UTC with milliseconds."""
    return datetime.fromtimestamp(ts, timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def encode_mask(mask: np.ndarray) -> dict:
    """(H, W) bool mask → ``{"encoding": "png-base64", "width", "height", "data"}``:
    an 8-bit grayscale PNG (0/255) in base64 — a few hundred bytes for a
    typical defect mask, decodable by any image library."""
    ok, buf = cv2.imencode(".png", mask.view(np.uint8) * np.uint8(255), [cv2.IMWRITE_PNG_COMPRESSION, 9])
    if not ok:  # pragma: no cover - encoding a uint8 plane does not fail
        raise ValueError("PNG encoding of the mask failed")
    return {
        "encoding": "png-base64",
        "width": int(mask.shape[1]),
        "height": int(mask.shape[0]),
        "data": base64.b64encode(buf.tobytes()).decode("ascii"),
    }


def result_record(result: InspectionResult, include_mask: bool = False) -> dict:
    """An InspectionResult → the JSON-ready payload. Figures are rounded to what
    a consumer can use (scores 4 decimals, areas 4 decimals of a %, boxes 0.1 px).
    include_mask: add the union mask (``mask``, see :func:`encode_mask`) when the
    result has one. ``camera_timestamp_ns`` is present only when the camera gave one."""
    d = result.defects
    frame_px = result.width * result.height
    # Rounded as whole arrays, then turned into Python lists once (vectorised:
    # a detector can report a hundred boxes per frame).
    boxes = np.round(d.xyxy.astype(np.float64), 1).tolist()
    scores = np.round(d.confidence.astype(np.float64), 4).tolist()
    areas = np.round(d.area_px, 1).tolist()
    pcts = np.round(d.area_px * (100.0 / frame_px), 4).tolist()
    defects = [
        {"class": c, "score": sc, "bbox": b, "area_px": a, "area_pct": pc, "kind": k}
        for c, sc, b, a, pc, k in zip(d.class_name.tolist(), scores, boxes, areas, pcts, d.kind.tolist())
    ]
    record = {
        "schema_version": SCHEMA_VERSION,
        "id": result.id,
        "station_id": result.station_id,
        "source": result.source,
        "seq": result.seq,
        "part_id": result.part_id,
        "captured_at": iso_time(result.captured_at),
        "image": {"width": result.width, "height": result.height},
        "grade": result.decision.grade.value,
        "rule": result.decision.rule,
        "reason": result.decision.reason,
        "defect_area_pct": round(result.defect_area_pct, 4),
        "defect_area_px": round(result.defect_area_px, 1),
        "defects": defects,
        "models": dict(result.models),
        "latency_ms": {k: round(v, 3) for k, v in result.latency_ms.items()},
    }
    if result.camera_timestamp_ns is not None:
        record["camera_timestamp_ns"] = result.camera_timestamp_ns
    if include_mask and result.mask is not None:
        record["mask"] = encode_mask(result.mask)
    return record


def text(value: str | bytes) -> str:
    """Any file name, payload or message → text that encodes as valid UTF-8.

    Bytes that are not UTF-8 (a file name from another code page, a binary
    trigger payload) and the lone surrogates ``os.fsdecode`` makes of them are
    written as ``\\xNN`` escapes, so a record names what arrived and stays
    valid JSON for every consumer."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
            return value
        except UnicodeEncodeError:
            value = value.encode("utf-8", "surrogateescape" if _only_escapes(value) else "surrogatepass")
    return bytes(value).decode("utf-8", "backslashreplace")


def _only_escapes(value: str) -> bool:
    """Whether every surrogate in ``value`` is one of surrogateescape's (U+DC80–U+DCFF)."""
    return all(not 0xD800 <= ord(c) <= 0xDFFF or 0xDC80 <= ord(c) <= 0xDCFF for c in value)


def error_record(source: str, error: str, seq: int = 0, station_id: str | None = None, part_id: str | None = None) -> dict:
    """A frame or file that could not be inspected: no grade, the reason in ``error``."""
    return {
        "schema_version": SCHEMA_VERSION,
        "id": str(uuid.uuid4()),
        "station_id": station_id,
        "part_id": part_id,
        "source": source,
        "seq": seq,
        "error": error,
    }


def dumps(record: dict) -> str:
    """One record as compact JSON on one line (JSONL, MQTT payload)."""
    return json.dumps(record, ensure_ascii=False, separators=(",", ":"), allow_nan=False)


def load_schema() -> dict:
    return json.loads(SCHEMA_PATH.read_text(encoding="utf-8"))


# --- MQTT topics and transport payloads ------------------------------------------

StatusState = Literal["online", "offline", "stopped"]
STATES: tuple[StatusState, ...] = ("online", "offline", "stopped")

# Fields the publisher adds to a result payload at send time (optional in the
# schema: JSONL records written by replay do not have them).
SENT_FIELDS = ("sent_at", "late")

_LEVEL = re.compile(r"^[^/+#\x00]+$")


@dataclass(frozen=True)
class Topics:
    prefix: str

    @property
    def result(self) -> str:
        return f"{self.prefix}/result"

    @property
    def status(self) -> str:
        return f"{self.prefix}/status"

    @property
    def stats(self) -> str:
        return f"{self.prefix}/stats"

    @property
    def trigger(self) -> str:
        return f"{self.prefix}/trigger"


def topics_for(cfg: MqttConfig, station_id: str) -> Topics:
    """The topics of one station: ``cfg.topic_prefix`` or the ISA-95 default."""
    if cfg.topic_prefix is not None:
        return Topics(cfg.topic_prefix)
    if not _LEVEL.match(station_id):
        raise ConfigError(f"station.id: {station_id!r} cannot be a topic level (no '/', '+', '#'); set mqtt.topic_prefix")
    return Topics("/".join((cfg.enterprise, cfg.site, cfg.area, cfg.line, station_id)))


def status_record(state: StatusState, station_id: str, timestamp: float | None = None) -> dict:
    """The retained ``…/status`` payload.

    timestamp: UNIX seconds when the state was entered. For the Last Will
    ("offline") it is the time the will was registered, i.e. the connect time,
    because the broker publishes the will verbatim.
    """
    if state not in STATES:
        raise ValueError(f"state must be one of {STATES}, got {state!r}")
    return {
        "schema_version": SCHEMA_VERSION,
        "state": state,
        "station_id": station_id,
        "timestamp": iso_time(time.time() if timestamp is None else timestamp),
    }


def stamp_sent(payload: bytes, sent_at: float, late: bool) -> bytes:
    """A stored result payload with ``sent_at`` and ``late`` appended.

    payload: one JSON object as written by :func:`dumps` (compact, without these
    two keys). The fields are spliced in before the closing brace instead of
    parsing and re-serialising the record: this runs once per result on the
    sender thread, beside inference.
    """
    body = payload.rstrip()
    if not body.startswith(b"{") or not body.endswith(b"}"):
        raise ValueError("stamp_sent: payload is not a JSON object")
    sep = b"," if body != b"{}" else b""
    stamp = f'"sent_at":"{iso_time(sent_at)}","late":{"true" if late else "false"}'.encode()
    return body[:-1] + sep + stamp + b"}"


def stats_record(
    station_id: str,
    uptime_s: float,
    grades: dict[str, int],
    errors: int,
    fps: float,
    latency_ms: dict[str, dict[str, float]],
    dropped: int,
    queue_depth: int,
    outbox_depth: int,
    outbox_alarm: bool,
    providers: dict[str, list[str]],
    camera: str,
    triggers: dict[str, int] | None = None,
    sinks: dict[str, dict] | None = None,
) -> dict:
    """The periodic ``…/stats`` payload: counts since start, recent rate and latencies.

    triggers: with an MQTT or PLC trigger, its messages and parts by outcome since start
    (``metrics.TRIGGER_OUTCOMES``); absent otherwise. sinks: the outputs fed from the
    outbox (mqtt, plc, sparkplug) by name: their link's ``state`` and the results
    ``waiting`` for them in the outbox; absent without any."""
    record = {
        "schema_version": SCHEMA_VERSION,
        "station_id": station_id,
        "timestamp": iso_time(time.time()),
        "uptime_s": round(uptime_s, 1),
        "grades": {g: int(grades.get(g, 0)) for g in ("PASS", "DISCOUNT", "REJECT")},
        "errors": errors,
        "fps": fps,
        "latency_ms": latency_ms,
        "dropped_frames": dropped,
        "queue_depth": queue_depth,
        "outbox_depth": outbox_depth,
        "outbox_alarm": outbox_alarm,
        "providers": providers,
        "camera": camera,
    }
    if triggers is not None:
        record["triggers"] = dict(triggers)
    if sinks:
        record["sinks"] = {name: dict(state) for name, state in sinks.items()}
    return record

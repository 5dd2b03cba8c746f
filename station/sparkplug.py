"""Sparkplug B edge node: the station's results to SCADA (Ignition and the like).

The payloads are the Eclipse Tahu schema (``sparkplug_b.proto``, Sparkplug 3.0) compiled
with protoc into ``sparkplug_b_pb2.py`` and encoded by ``protobuf``; the MQTT side is paho 2,
as for ``mqtt:``. (pysparkplug and mqtt-spb-wrapper, the maintained Python libraries, both
pin paho-mqtt below 2, so neither can live beside the publisher.)

Topics, with namespace ``spBv1.0`` (:class:`SparkplugTopics`)::

    spBv1.0/<group_id>/NBIRTH|NDEATH|NCMD/<edge_node_id>             the node: the station
    spBv1.0/<group_id>/DBIRTH|DDATA|DDEATH|DCMD/<edge_node_id>/<device_id>   its camera

Each connection is one Sparkplug session:

* ``bdSeq`` (0–255, wrapping) goes up by one at every MQTT CONNECT (an attempt the
  network refused before the CONNECT went out does not count); the last one is kept
  in ``sparkplug.state_file`` (:class:`BdSeqFile`), so that a restart goes on from it
  rather than from 0 and a host never takes an old session's death for the new one's;
* the CONNECT registers the NDEATH (``bdSeq`` only, QoS 1, not retained) as the Last
  Will: the broker publishes it when the station vanishes;
* once the broker accepted the connection and the NCMD/DCMD subscriptions, the node
  publishes NBIRTH (seq 0: ``bdSeq``, ``Node Control/Rebirth`` and the node's info)
  and DBIRTH (seq 1: every device metric with its current value, :data:`DEVICE_METRICS`);
* then one DDATA per inspected part: the record's fields as metrics, stamped with the
  capture time (ms), ``is_historical`` on a part sent late;
* an NCMD ``Node Control/Rebirth`` = true repeats NBIRTH (same ``bdSeq``: the Will
  cannot change within a connection) and DBIRTH, the seq starting again at 0;
* a clean stop publishes DDEATH and NDEATH, then disconnects (which cancels the Will).

Every message but NDEATH carries ``seq``, one more than the node's previous message
of the session, 255 followed by 0; one lock (``_send_lock``) assigns it and hands the
message to paho, so that the order of the seq numbers is the order on the wire.
Births, data and deaths are QoS 0 and not retained, as the specification requires
(the NDEATH, Will or not, QoS 1).

What "sent" means here: QoS 0 has no acknowledgement. :meth:`SparkplugNode.publish_part`
returns True once paho wrote the whole DDATA into the TCP connection of a session whose
births went out before it; a DDATA lost with that connection is not sent again. The
host sees that loss (the NDEATH, or a gap in ``seq``, after which it asks for a
rebirth), and the durable copy of every result is the MQTT outbox's, not this sink's.

Threads: the owner thread (``sparkplug``, :meth:`SparkplugNode.start` to
:meth:`SparkplugNode.close`) connects, publishes the births, answers rebirths,
reconnects with capped backoff and makes the clean stop; paho's network thread (one
per connection) runs the callbacks; the callers' threads publish parts.
:class:`SparkplugSink` is the node behind the pipeline's sink interface, with a thread
of its own, so that a broker that is away never slows the line.
"""

from __future__ import annotations

import collections
import enum
import json
import logging
import os
import random
import ssl
import threading
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import paho.mqtt.client as mqtt
from google.protobuf.message import DecodeError
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.reasoncodes import ReasonCode

from . import __version__
from . import sparkplug_b_pb2 as spb
from .config import SparkplugConfig
from .errors import ConfigError
from .priority import ThreadPolicy
from .publish import read_password, shut_socket, tls_context

if TYPE_CHECKING:  # sinks.py builds the sinks, this one among them
    from .sinks import Delivery, Sink

log = logging.getLogger(__name__)

NAMESPACE = "spBv1.0"
BDSEQ = "bdSeq"
REBIRTH = "Node Control/Rebirth"
SEQ_MODULO = 256  # bdSeq and seq both run 0..255 and wrap

# The grade as a number for PLC-minded clients, the codes the PLC gets (station/plc.py);
# null for a part that could not be inspected.
GRADE_CODES = {"PASS": 0, "DISCOUNT": 1, "REJECT": 2}
COUNT_KEYS = ("PASS", "DISCOUNT", "REJECT", "Error")

# CONNACK reason codes that mean "these credentials will not work": retry slowly.
# 134 bad user name or password, 135 not authorized, 138 banned, 140 bad authentication method.
_AUTH_REFUSALS = frozenset({134, 135, 138, 140})

# Sparkplug data types (the schema's DataType enum), by the value field that carries them.
_INT32 = frozenset({spb.Int8, spb.Int16, spb.Int32, spb.UInt8, spb.UInt16, spb.UInt32})
_INT64 = frozenset({spb.Int64, spb.UInt64, spb.DateTime})
_TEXT = frozenset({spb.String, spb.Text, spb.UUID})

# The device's metrics, in DBIRTH order: the last part, its counts, the camera.
PART_METRICS: tuple[tuple[str, int], ...] = (
    ("Inspection/Record Id", spb.String),       # the record's id: stable across re-sends
    ("Inspection/Sequence", spb.UInt64),        # the record's seq
    ("Inspection/Part Id", spb.String),
    ("Inspection/Source", spb.String),
    ("Inspection/Captured At", spb.DateTime),   # ms since the epoch
    ("Inspection/Grade", spb.String),           # PASS / DISCOUNT / REJECT; null for an error
    ("Inspection/Grade Code", spb.Int32),       # GRADE_CODES; null for an error
    ("Inspection/Rule", spb.String),
    ("Inspection/Defect Area %", spb.Double),   # % of the inspected surface
    ("Inspection/Defect Count", spb.UInt32),
    ("Inspection/Error", spb.String),           # why a part could not be inspected; null when graded
)
COUNT_METRICS: tuple[tuple[str, int], ...] = tuple((f"Counts/{k}", spb.UInt64) for k in COUNT_KEYS)
CAMERA_STATE = "Camera/State"
DEVICE_METRICS: tuple[tuple[str, int], ...] = PART_METRICS + COUNT_METRICS + ((CAMERA_STATE, spb.String),)

MetricValue = str | int | float | bool | None


@dataclass(frozen=True, slots=True)
class Metric:
    """One metric value: ``datatype`` a Sparkplug DataType, ``timestamp`` ms since the epoch,
    ``historical`` a value of the past (sent late: it must not update the live tag)."""

    name: str
    datatype: int
    value: MetricValue
    timestamp: int
    historical: bool = False


@dataclass(frozen=True)
class SparkplugTopics:
    """The topics of one edge node and its one device."""

    group_id: str
    edge_node_id: str
    device_id: str

    @classmethod
    def for_config(cls, cfg: SparkplugConfig, station_id: str) -> "SparkplugTopics":
        """``device_id`` defaults to the station id, which must then be one topic level."""
        device = cfg.device_id if cfg.device_id is not None else station_id
        if not device or any(c in device for c in "/+#\x00"):
            raise ConfigError(f"sparkplug.device_id: the station id {device!r} cannot be a Sparkplug id "
                              "(no '/', '+', '#'); set sparkplug.device_id")
        return cls(cfg.group_id, cfg.edge_node_id, device)

    def node(self, verb: str) -> str:
        """NBIRTH, NDEATH, NDATA, NCMD."""
        return f"{NAMESPACE}/{self.group_id}/{verb}/{self.edge_node_id}"

    def device(self, verb: str) -> str:
        """DBIRTH, DDEATH, DDATA, DCMD."""
        return f"{NAMESPACE}/{self.group_id}/{verb}/{self.edge_node_id}/{self.device_id}"


# --- payloads -------------------------------------------------------------------------


def now_ms() -> int:
    return int(time.time() * 1000)


def _ms(ts: float) -> int:
    return int(round(ts * 1000))


def _record_time(record: dict) -> float | None:
    """The record's ``captured_at`` (ISO 8601, UTC) as UNIX seconds; None without one."""
    text = record.get("captured_at")
    if not isinstance(text, str):
        return None
    try:
        return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


def part_metrics(record: dict, at: float | None = None, historical: bool = False) -> list[Metric]:
    """A result or error record (``messages.result_record`` / ``error_record``) → the
    :data:`PART_METRICS`, stamped with its capture time (else ``at``, UNIX s, else now)."""
    captured = _record_time(record)
    stamp = _ms(captured if captured is not None else at if at is not None else time.time())
    grade = record.get("grade")
    defects = record.get("defects")
    area = record.get("defect_area_pct")
    seq = record.get("seq")
    values: dict[str, MetricValue] = {
        "Inspection/Record Id": _text(record.get("id")),
        "Inspection/Sequence": seq if isinstance(seq, int) and seq >= 0 else None,
        "Inspection/Part Id": _text(record.get("part_id")),
        "Inspection/Source": _text(record.get("source")),
        "Inspection/Captured At": _ms(captured) if captured is not None else None,
        "Inspection/Grade": grade if isinstance(grade, str) else None,
        "Inspection/Grade Code": GRADE_CODES.get(grade) if isinstance(grade, str) else None,
        "Inspection/Rule": _text(record.get("rule")),
        "Inspection/Defect Area %": float(area) if isinstance(area, (int, float)) else None,
        "Inspection/Defect Count": len(defects) if isinstance(defects, list) else None,
        "Inspection/Error": _text(record.get("error")),
    }
    return [Metric(name, datatype, values[name], stamp, historical) for name, datatype in PART_METRICS]


def count_key(record: dict) -> str:
    """The :data:`COUNT_KEYS` entry a record counts under."""
    grade = record.get("grade")
    return grade if grade in GRADE_CODES else "Error"


def _text(value: Any) -> str | None:
    return None if value is None else str(value)


def _set_value(m: Any, datatype: int, value: MetricValue) -> None:
    """The value in the field its data type names; None as ``is_null``. Signed integers
    go in as their two's complement, as the specification says."""
    if value is None:
        m.is_null = True
    elif datatype in _INT32:
        m.int_value = int(value) & 0xFFFF_FFFF
    elif datatype in _INT64:
        m.long_value = int(value) & 0xFFFF_FFFF_FFFF_FFFF
    elif datatype == spb.Float:
        m.float_value = float(value)
    elif datatype == spb.Double:
        m.double_value = float(value)
    elif datatype == spb.Boolean:
        m.boolean_value = bool(value)
    elif datatype in _TEXT:
        m.string_value = str(value)
    else:  # pragma: no cover - the metrics above use the types handled here
        raise ValueError(f"metric data type {datatype} is not supported")


def encode(metrics: list[Metric], seq: int | None, *, birth: bool = False, timestamp: int | None = None) -> bytes:
    """One Sparkplug B payload: ``timestamp`` (ms, default now), ``seq`` (None for an
    NDEATH) and the metrics, each with its name, timestamp and ``is_historical`` when
    set; the data type only in a birth (the specification asks DATA messages to leave
    it out)."""
    payload = spb.Payload()
    payload.timestamp = timestamp if timestamp is not None else now_ms()
    if seq is not None:
        payload.seq = seq
    for metric in metrics:
        m = payload.metrics.add()
        m.name = metric.name
        m.timestamp = metric.timestamp
        if birth:
            m.datatype = metric.datatype
        if metric.historical:
            m.is_historical = True
        _set_value(m, metric.datatype, metric.value)
    return payload.SerializeToString()


# --- bdSeq across restarts --------------------------------------------------------------


def state_path(cfg: SparkplugConfig, state_dir: str | Path | None = None) -> Path:
    """``cfg.state_file`` if absolute, else under the state directory: ``state_dir`` if
    given, else systemd's ``$STATE_DIRECTORY`` (its first entry); never the current directory."""
    if cfg.state_file.is_absolute():
        return cfg.state_file
    base = state_dir if state_dir is not None else (os.environ.get("STATE_DIRECTORY", "").split(":")[0] or None)
    if base is None:
        raise ConfigError(
            f"sparkplug.state_file: {cfg.state_file} is relative and no state directory is known "
            "(run under systemd with StateDirectory=, pass a state directory, or give an absolute path)"
        )
    return Path(base) / cfg.state_file


class BdSeqFile:
    """The ``bdSeq`` of the node's last MQTT CONNECT, kept as ``{"bdSeq": n}`` in ``path``.

    :meth:`next` is the one for the next CONNECT: 0 the first time (no file), then one
    more than the last, 255 followed by 0. It is written (atomically, flushed to disk)
    before the CONNECT goes out, so that a station that dies right after it does not
    use it twice; :meth:`take_back` undoes it when the network refused the connection
    before any CONNECT went out. An unreadable file is logged and taken as absent; a
    write that fails is logged and the value used all the same (the next start may
    then repeat one bdSeq).
    """

    def __init__(self, path: Path):
        self.path = Path(path)
        self.last = self._read()
        self._before = self.last  # what take_back() restores

    def _read(self) -> int | None:
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None
        except (OSError, UnicodeDecodeError, ValueError) as exc:
            log.warning("%s: cannot read the Sparkplug bdSeq (%s): starting again at 0", self.path, exc)
            return None
        value = data.get("bdSeq") if isinstance(data, dict) else None
        if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < SEQ_MODULO:
            log.warning("%s: no bdSeq 0..255 in it: starting again at 0", self.path)
            return None
        return value

    def next(self) -> int:
        value = 0 if self.last is None else (self.last + 1) % SEQ_MODULO
        self._keep(value)
        self._before, self.last = self.last, value
        return value

    def take_back(self) -> None:
        """The last :meth:`next` was never sent in a CONNECT: the next one is the same again."""
        self.last = self._before
        self._keep(self.last)

    def _keep(self, value: int | None) -> None:
        try:
            if value is None:
                self.path.unlink(missing_ok=True)
            else:
                self._write(value)
        except OSError as exc:
            log.error("%s: cannot keep the Sparkplug bdSeq %s (%s): a restart may repeat it", self.path, value, exc)

    def _write(self, value: int) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + ".tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(json.dumps({"bdSeq": value}) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)


# --- the node ---------------------------------------------------------------------------


class NodeState(str, enum.Enum):
    IDLE = "idle"  # not started
    CONNECTING = "connecting"  # CONNECT sent, waiting for CONNACK and SUBACK
    ONLINE = "online"  # births published: parts are sent
    OFFLINE = "offline"  # lost or unreachable; retrying with backoff
    AUTH_FAILED = "auth_failed"  # the broker refused the credentials; retrying every reconnect_max_s
    STOPPED = "stopped"


class _Sent:
    """One message handed to paho: ``done`` is set once it was written (``written``:
    QoS 0 into the socket, QoS 1 acknowledged) or its connection ended first."""

    __slots__ = ("done", "written")

    def __init__(self) -> None:
        self.done = threading.Event()
        self.written = False


class _Session:
    """One MQTT connection (one ``bdSeq``): its paho client and paho's callbacks for it,
    on paho's network thread.

    waiting: paho mid → message not yet written. early: mids whose on_publish came
    before publish() returned the mid (paho's network thread can be that quick); each
    is taken by the send that made it, right after.
    """

    def __init__(self, node: SparkplugNode, bd_seq: int):
        self.node = node
        self.bd_seq = bd_seq
        self.client: mqtt.Client | None = None
        self.lock = threading.Lock()
        self.waiting: dict[int, _Sent] = {}
        self.early: set[int] = set()
        self.connack = threading.Event()
        self.refused: ReasonCode | None = None
        self.suback = threading.Event()
        self.lost = threading.Event()
        self.lost_reason = ""

    def send(self, topic: str, payload: bytes, qos: int = 0) -> _Sent | None:
        """client.publish() (never retained); None when paho did not take it."""
        assert self.client is not None  # made before the connect
        info = self.client.publish(topic, payload, qos=qos, retain=False)
        if info.rc != mqtt.MQTT_ERR_SUCCESS:
            return None
        sent = _Sent()
        with self.lock:
            if info.mid in self.early:
                self.early.discard(info.mid)
                sent.written = True
                sent.done.set()
            elif self.lost.is_set():
                sent.done.set()
            else:
                self.waiting[info.mid] = sent
        return sent

    def abort(self) -> None:
        """End paho's network thread without a DISCONNECT (so the Will stays armed) even
        when the broker does not answer: the loop sees the shut socket and exits."""
        shut_socket(self.client)

    # --- paho callbacks (paho's network thread; an exception would end it) -----------------

    def on_connect(self, client, userdata, flags, reason_code: ReasonCode, properties) -> None:
        if reason_code.is_failure:
            self.refused = reason_code
        self.connack.set()
        self.node._wake()

    def on_subscribe(self, client, userdata, mid, reason_codes, properties) -> None:
        self.suback.set()
        self.node._wake()

    def on_disconnect(self, client, userdata, flags, reason_code: ReasonCode, properties) -> None:
        with self.lock:
            self.lost_reason = str(reason_code)
            self.lost.set()
            pending = list(self.waiting.values())
            self.waiting.clear()
        for sent in pending:  # never written: their waiters learn it now
            sent.done.set()
        self.node._wake()

    def on_publish(self, client, userdata, mid: int, reason_code: ReasonCode, properties) -> None:
        with self.lock:
            sent = self.waiting.pop(mid, None)
            if sent is None:
                self.early.add(mid)
                return
        sent.written = not reason_code.is_failure
        sent.done.set()

    def on_message(self, client, userdata, msg: mqtt.MQTTMessage) -> None:
        try:
            self.node._on_command(msg.topic, bytes(msg.payload))
        except Exception:  # a command must never end paho's network thread
            log.exception("Sparkplug command on %s not handled", msg.topic)
            self.node._count("bad_commands")


_COUNTERS = ("connect_attempts", "connects", "births", "rebirths", "ddata_sent", "ddata_unsent", "commands",
             "bad_commands")


class SparkplugNode:
    """A Sparkplug B edge node with one device, its own MQTT connection and its owner thread.

    cfg: the ``sparkplug`` config section; station_id: ``station.id`` (the device id
    when ``cfg.device_id`` is null); state_dir: where ``cfg.state_file`` lives when
    relative (default ``$STATE_DIRECTORY``); policy: the station's thread policy, whose
    background part the owner thread (and paho's) takes. Raises ConfigError at
    construction when the state file's place, the password or the TLS files cannot be had.

    Thread-safe: :meth:`publish_part`, :meth:`set_camera_state` and :meth:`state` may be
    called from any thread, any time between :meth:`start` and :meth:`close`.
    """

    def __init__(self, cfg: SparkplugConfig, station_id: str, state_dir: str | Path | None = None,
                 policy: ThreadPolicy | None = None):
        self.cfg = cfg
        self.topics = SparkplugTopics.for_config(cfg, station_id)
        self.station_id = station_id
        self.client_id = cfg.client_id or f"spb-{cfg.group_id}-{cfg.edge_node_id}"
        self.bd_seq = BdSeqFile(state_path(cfg, state_dir))
        try:
            self._password = read_password(cfg.auth, "sparkplug.auth")
            self._tls = tls_context(cfg.tls)
        except ConfigError as exc:  # the helpers name the mqtt section's fields; these are ours
            text = str(exc)
            raise ConfigError("sparkplug." + text[len("mqtt."):] if text.startswith("mqtt.") else text) from None
        self._protocol = mqtt.MQTTv5 if cfg.protocol == "5" else mqtt.MQTTv311
        self._policy = policy
        # _send_lock: seq numbers in wire order, births before data, nothing after the deaths;
        # it guards _seq and the device's values (_values, _counts, _counted, _camera).
        self._send_lock = threading.Lock()
        self._seq = 0
        self._values: dict[str, Metric] = {}
        self._counts = dict.fromkeys(COUNT_KEYS, 0)
        self._counted: collections.OrderedDict[str, None] = collections.OrderedDict()  # record ids counted, the latest
        self._camera = Metric(CAMERA_STATE, spb.String, None, now_ms())
        # _cond: the session, the state and the owner thread's requests (stop, rebirth).
        self._cond = threading.Condition()
        self._session: _Session | None = None  # the current connection
        self._online: _Session | None = None  # the connection whose births went out
        self._state = NodeState.IDLE
        self._error: str | None = None
        self._stopping = False
        self._rebirth = False
        self._stats = dict.fromkeys(_COUNTERS, 0)
        self._thread: threading.Thread | None = None

    # --- the callers' side ------------------------------------------------------------

    def start(self) -> None:
        """Start the owner thread; it connects in the background (see :meth:`wait_online`)."""
        if self._thread is not None:
            raise RuntimeError("SparkplugNode.start() called twice")
        self._thread = threading.Thread(target=self._run, name="sparkplug", daemon=True)
        self._thread.start()

    @property
    def online(self) -> bool:
        """True while a session is up and its births went out."""
        with self._cond:
            return self._online is not None

    def wait_online(self, timeout: float) -> bool:
        """Wait up to ``timeout`` s for the births of a session; False when stopping or at the timeout."""
        with self._cond:
            return self._cond.wait_for(lambda: self._online is not None or self._stopping, timeout) and not self._stopping

    def publish_part(self, record: dict, historical: bool = False, timeout: float | None = None,
                     at: float | None = None) -> bool:
        """Publish one record (a result or an error record) as a DDATA: :data:`PART_METRICS`
        stamped with the capture time (else ``at``, UNIX s, else now) and the part's count
        under :data:`COUNT_METRICS`; ``historical``: a part sent late, its metrics marked
        ``is_historical`` (they then leave the device's current values as they are).

        Waits up to ``timeout`` s (default ``sparkplug.send_timeout_s``) for the node to be
        online and for paho to write the DDATA into the connection. True once written
        (QoS 0: the broker acknowledges nothing, see the module's docstring); False when
        the node was not online in time, or the connection ended or the time ran out
        before the DDATA was written: the caller may send it again, historical.
        """
        deadline = time.monotonic() + (self.cfg.send_timeout_s if timeout is None else timeout)
        metrics = part_metrics(record, at, historical)
        with self._cond:
            self._cond.wait_for(lambda: self._online is not None or self._stopping, deadline - time.monotonic())
            s = self._online
        if s is None:
            self._count("ddata_unsent")
            return False
        key = count_key(record)
        record_id = str(record.get("id", ""))
        with self._send_lock:
            if s is not self._online or s.lost.is_set():  # the session ended meanwhile
                sent = None
            else:
                if record_id and record_id not in self._counted:  # a part sent again is counted once
                    self._counts[key] += 1
                    self._counted[record_id] = None
                    if len(self._counted) > 4096:
                        self._counted.popitem(last=False)
                # the live total, also with a part sent late: it is not a value of the past
                count = Metric(f"Counts/{key}", spb.UInt64, self._counts[key], now_ms())
                payload = encode(metrics + [count], self._next_seq())
                sent = s.send(self.topics.device("DDATA"), payload)
                if sent is not None and not historical:
                    self._values.update((m.name, m) for m in metrics)
                self._values[count.name] = count
        if sent is None or not sent.done.wait(max(0.0, deadline - time.monotonic())) or not sent.written:
            self._count("ddata_unsent")
            return False
        self._count("ddata_sent")
        return True

    def set_camera_state(self, state: str) -> None:
        """The camera's state (connected / reconnecting / lost …): kept for the births, and
        sent at once as a DDATA of ``Camera/State`` while online."""
        metric = Metric(CAMERA_STATE, spb.String, state, now_ms())
        with self._send_lock:
            if self._camera.value == state:
                return
            self._camera = metric
            s = self._online
            if s is not None and not s.lost.is_set():
                s.send(self.topics.device("DDATA"), encode([metric], self._next_seq()))

    def state(self) -> dict:
        """What the node is doing, for people and tests: state, the session's bdSeq, the
        next seq, the last connection problem, the counts, and counters."""
        with self._send_lock:
            seq, counts, camera = self._seq, dict(self._counts), self._camera.value
        with self._cond:
            session = self._session
            return {
                "state": self._state.value,
                "online": self._online is not None,
                "bd_seq": session.bd_seq if session is not None else self.bd_seq.last,
                "seq": seq,
                "group_id": self.topics.group_id,
                "edge_node_id": self.topics.edge_node_id,
                "device_id": self.topics.device_id,
                "last_error": self._error,
                "counts": counts,
                "camera": camera,
                **self._stats,
            }

    def close(self, timeout: float | None = None) -> None:
        """The clean stop: DDEATH and NDEATH, then disconnect; returns once the owner
        thread ended, or after ``timeout`` s (default: twice ``connect_timeout_s``)."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(2 * self.cfg.connect_timeout_s if timeout is None else timeout)
            if self._thread.is_alive():
                log.warning("Sparkplug node did not stop in time")

    # --- helpers ----------------------------------------------------------------------

    def _next_seq(self) -> int:
        """The seq of the next message (under _send_lock)."""
        seq = self._seq
        self._seq = (seq + 1) % SEQ_MODULO
        return seq

    def _count(self, name: str) -> None:
        with self._cond:
            self._stats[name] += 1

    def _wake(self) -> None:
        with self._cond:
            self._cond.notify_all()

    def _set_state(self, state: NodeState, error: str | None) -> None:
        with self._cond:
            self._state = state
            self._error = error
            self._cond.notify_all()

    def _wait(self, pred: Callable[[], bool], timeout: float) -> bool:
        """Wait up to ``timeout`` s for ``pred`` or the stop; pred's value."""
        with self._cond:
            self._cond.wait_for(lambda: pred() or self._stopping, timeout)
        return pred()

    def _node_birth(self, bd_seq: int) -> list[Metric]:
        ts = now_ms()
        return [
            Metric(BDSEQ, spb.Int64, bd_seq, ts),
            Metric(REBIRTH, spb.Boolean, False, ts),
            Metric("Node Info/Station Id", spb.String, self.station_id, ts),
            Metric("Node Info/Software Version", spb.String, f"station {__version__}", ts),
        ]

    def _ndeath(self, bd_seq: int) -> bytes:
        """The NDEATH payload: the bdSeq only, no seq."""
        return encode([Metric(BDSEQ, spb.Int64, bd_seq, now_ms())], None, birth=True)

    def _device_birth(self) -> list[Metric]:
        """Every device metric with its current value (under _send_lock); null before the first part."""
        ts = now_ms()
        out = [self._values.get(name) or Metric(name, datatype, None, ts) for name, datatype in PART_METRICS]
        out += [self._values.get(name) or Metric(name, datatype, 0, ts) for name, datatype in COUNT_METRICS]
        out.append(self._camera)
        return out

    # --- the owner thread ----------------------------------------------------------------

    def _run(self) -> None:
        if self._policy is not None:
            self._policy.background()  # paho's network thread, started from here, inherits it
        delay = self.cfg.reconnect_min_s
        failures = 0
        while True:
            try:
                outcome, error, connected = self._serve()
            except Exception:  # the top of the worker loop: log, count, retry after a pause
                log.exception("Sparkplug node failed; reconnecting")
                outcome, error, connected = "lost", "internal error (see the log)", False
            with self._cond:
                if outcome == "stopped" or self._stopping:
                    break
            if connected:  # a connection that got in resets the backoff
                delay, failures = self.cfg.reconnect_min_s, 0
            failures += 1
            if outcome == "auth":
                wait = self.cfg.reconnect_max_s
            else:
                wait = delay
                delay = min(delay * 2, self.cfg.reconnect_max_s)
            wait *= random.uniform(0.8, 1.0)  # nodes behind one broker do not retry in lock-step
            state = NodeState.AUTH_FAILED if outcome == "auth" else NodeState.OFFLINE
            self._set_state(state, error)
            level = logging.ERROR if outcome == "auth" else logging.WARNING if failures == 1 else logging.INFO
            log.log(level, "Sparkplug %s: %s; retrying in %.1f s", state.value, error, wait)
            with self._cond:
                if self._cond.wait_for(lambda: self._stopping, wait):
                    break
        self._set_state(NodeState.STOPPED, None)
        log.info("Sparkplug node %s/%s stopped", self.topics.group_id, self.topics.edge_node_id)

    def _client(self, s: _Session) -> mqtt.Client:
        """A fresh paho client for the connection ``s``, with the NDEATH of its bdSeq as the Will."""
        kwargs: dict[str, Any] = {}
        if self._protocol != mqtt.MQTTv5:
            kwargs["clean_session"] = True  # Sparkplug: no broker session (MQTT 5: clean start, expiry 0)
        client = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2, client_id=self.client_id,
                             protocol=self._protocol, userdata=s, reconnect_on_failure=False, **kwargs)
        client.connect_timeout = self.cfg.connect_timeout_s
        if self._tls is not None:
            client.tls_set_context(self._tls)
        if self.cfg.auth is not None:
            client.username_pw_set(self.cfg.auth.username, self._password)
        client.will_set(self.topics.node("NDEATH"), self._ndeath(s.bd_seq), qos=1, retain=False)
        client.on_connect = s.on_connect
        client.on_subscribe = s.on_subscribe
        client.on_disconnect = s.on_disconnect
        client.on_publish = s.on_publish
        client.on_message = s.on_message
        return client

    def _serve(self) -> tuple[str, str | None, bool]:
        """Run one connection until it ends: (outcome, why, whether the broker accepted it);
        outcome "stopped", "auth" (credentials refused) or "lost"."""
        cfg = self.cfg
        host, port = cfg.host, cfg.effective_port
        s = _Session(self, self.bd_seq.next())
        client = s.client = self._client(s)
        with self._cond:
            self._session = s
            self._state = NodeState.CONNECTING
            self._stats["connect_attempts"] += 1
        try:
            if self._protocol == mqtt.MQTTv5:
                client.connect(host, port, keepalive=cfg.keepalive_s, clean_start=True)
            else:
                client.connect(host, port, keepalive=cfg.keepalive_s)
        except (OSError, ssl.SSLError, ValueError) as exc:  # refused, unreachable, TLS handshake
            self.bd_seq.take_back()  # no CONNECT went out: bdSeq counts CONNECTs
            return "lost", f"cannot connect to {host}:{port}: {exc}", False
        client.loop_start()
        try:
            if not self._wait(lambda: s.connack.is_set() or s.lost.is_set(), cfg.connect_timeout_s):
                if self._stopping:
                    return "stopped", None, False
                return "lost", f"broker {host}:{port}: no CONNACK within {cfg.connect_timeout_s} s", False
            if s.refused is not None:
                if s.refused.value in _AUTH_REFUSALS:
                    user = cfg.auth.username if cfg.auth else None
                    return "auth", f"broker {host}:{port} refused the credentials ({s.refused}; user {user!r}): " \
                                   "check sparkplug.auth", False
                return "lost", f"broker {host}:{port} refused the connection: {s.refused}", False
            if s.lost.is_set():
                return "lost", f"connection to {host}:{port} lost: {s.lost_reason}", False
            self._count("connects")
            # Commands first, so that a rebirth asked for right after the births is heard.
            client.subscribe([(self.topics.node("NCMD"), 1), (self.topics.device("DCMD"), 1)])
            if not self._wait(lambda: s.suback.is_set() or s.lost.is_set(), cfg.connect_timeout_s):
                if self._stopping:
                    self._finish(s)
                    return "stopped", None, True
                return "lost", f"broker {host}:{port}: no SUBACK within {cfg.connect_timeout_s} s", True
            log.info("Sparkplug connected to %s:%d as %s (MQTT %s%s), bdSeq %d", host, port, self.client_id,
                     cfg.protocol, ", TLS" if self._tls else "", s.bd_seq)
            return self._connected(s)
        finally:
            with self._cond:
                self._session = None
                if self._online is s:
                    self._online = None
            if not s.lost.is_set():
                s.abort()
            client.loop_stop()

    def _connected(self, s: _Session) -> tuple[str, str | None, bool]:
        """Births, then rebirths on request, until the connection ends or the stop."""
        rebirth = False
        while True:
            if s.lost.is_set():
                return "lost", f"connection to {self.cfg.host}:{self.cfg.effective_port} lost: {s.lost_reason}", True
            with self._cond:
                if self._stopping:
                    stop = True
                else:
                    stop = False
                    rebirth = self._rebirth
                    self._rebirth = False
            if stop:
                self._finish(s)
                return "stopped", None, True
            if rebirth or not self.online:
                self._births(s, rebirth)
            with self._cond:
                self._cond.wait_for(lambda: self._stopping or self._rebirth or s.lost.is_set())

    def _births(self, s: _Session, rebirth: bool) -> None:
        """NBIRTH (seq 0) and DBIRTH (seq 1), nothing between them; then the node is online."""
        with self._send_lock:  # held until both are queued: no DDATA comes before them
            if s.lost.is_set():
                return
            with self._cond:
                self._online = s
                self._state = NodeState.ONLINE
                self._error = None
                self._stats["rebirths" if rebirth else "births"] += 1
                self._cond.notify_all()
            self._seq = 0
            s.send(self.topics.node("NBIRTH"), encode(self._node_birth(s.bd_seq), self._next_seq(), birth=True))
            s.send(self.topics.device("DBIRTH"), encode(self._device_birth(), self._next_seq(), birth=True))
        if rebirth:
            log.info("Sparkplug rebirth (bdSeq %d)", s.bd_seq)

    def _finish(self, s: _Session) -> None:
        """The clean stop: DDEATH and NDEATH (QoS 1: its acknowledgement says the broker has
        both), then DISCONNECT, which cancels the Will."""
        with self._send_lock:
            with self._cond:
                born = self._online is s
                self._online = None
            if born:
                s.send(self.topics.device("DDEATH"), encode([], self._next_seq()))
            ndeath = s.send(self.topics.node("NDEATH"), self._ndeath(s.bd_seq), qos=1)
        if ndeath is None or not ndeath.done.wait(self.cfg.connect_timeout_s) or not ndeath.written:
            log.warning("Sparkplug NDEATH not acknowledged; the broker publishes the Will instead")
            return  # no DISCONNECT: the Will stays armed and says the same
        assert s.client is not None  # made before the connect
        s.client.disconnect()
        s.lost.wait(1.0)  # on_disconnect: the DISCONNECT was written

    def _on_command(self, topic: str, payload: bytes) -> None:
        """An NCMD or DCMD (paho's network thread): ``Node Control/Rebirth`` = true asks the
        owner thread for the births again; anything else is logged and left alone."""
        try:
            message = spb.Payload.FromString(payload)
        except DecodeError as exc:
            log.warning("Sparkplug command on %s is not a Sparkplug B payload (%s): ignored", topic, exc)
            self._count("bad_commands")
            return
        self._count("commands")
        for m in message.metrics:
            if topic == self.topics.node("NCMD") and m.name == REBIRTH and m.WhichOneof("value") == "boolean_value":
                if m.boolean_value:
                    with self._cond:
                        self._rebirth = True
                        self._cond.notify_all()
            else:
                log.info("Sparkplug command %r on %s is not one this node takes: ignored", m.name, topic)


# --- the sink -----------------------------------------------------------------------------


@dataclass(slots=True)
class _Pending:
    """A record waiting for its DDATA: ``historical`` once it missed its time (it came while
    the node was offline, or a try failed); ``at``: UNIX s it was delivered."""

    record: dict
    historical: bool
    at: float


class SparkplugSink:
    """The Sparkplug node behind the pipeline's :class:`~station.sinks.Sink` interface.

    :meth:`deliver` only queues the record (never blocks the line); the thread
    ``sparkplug-sink`` sends the queue in order with :meth:`SparkplugNode.publish_part`.
    A record that arrives while the node is offline, or whose DDATA was not written, is
    kept (at most ``sparkplug.backlog``, the oldest dropped beyond, logged and counted)
    and sent after the next births, marked historical. The queue is memory: what it
    holds at the stop is logged and lost (the MQTT outbox has every result).
    It confirms nothing to the outbox, so :meth:`acked` has nothing to do.

    ``start()`` after construction; :meth:`close` stops both threads.
    """

    def __init__(self, cfg: SparkplugConfig, station_id: str, state_dir: str | Path | None = None,
                 policy: ThreadPolicy | None = None):
        self.node = SparkplugNode(cfg, station_id, state_dir, policy)
        self._limit = cfg.backlog
        self._policy = policy
        self._queue: collections.deque[_Pending] = collections.deque()
        self._cond = threading.Condition()
        self._closing = False
        self._deadline = float("inf")  # monotonic: the close's limit for sending what is queued
        self.dropped = 0
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Start the node (it connects in the background) and the sending thread."""
        self.node.start()
        self._thread = threading.Thread(target=self._run, name="sparkplug-sink", daemon=True)
        self._thread.start()

    def deliver(self, record: dict, ctx: Delivery) -> None:
        pending = _Pending(record, not self.node.online, time.time())
        with self._cond:
            if len(self._queue) >= self._limit:
                dropped = self._queue.popleft()
                self.dropped += 1
                if self.dropped == 1 or self.dropped % 1000 == 0:
                    log.warning("Sparkplug backlog full (%d parts): dropped part %s (%d dropped so far)",
                                self._limit, dropped.record.get("id"), self.dropped)
            self._queue.append(pending)
            self._cond.notify_all()

    def acked(self, seq: int) -> None:
        """Fed live, not from the outbox: the MQTT broker's acknowledgements are not ours."""

    def set_camera_state(self, state: str) -> None:
        """See :meth:`SparkplugNode.set_camera_state`."""
        self.node.set_camera_state(state)

    def state(self) -> dict:
        """The node's :meth:`~SparkplugNode.state`, with the queue's depth and the parts dropped."""
        with self._cond:
            extra = {"backlog": len(self._queue), "backlog_dropped": self.dropped}
        return {**self.node.state(), **extra}

    def close(self, timeout: float | None = None) -> None:
        """Send what is queued while the node is online, for up to ``timeout`` s (default
        ``sparkplug.send_timeout_s``), then the node's clean stop."""
        limit = self.node.cfg.send_timeout_s if timeout is None else timeout
        with self._cond:
            self._closing = True
            self._deadline = time.monotonic() + limit
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(limit + self.node.cfg.send_timeout_s)
        self.node.close()
        with self._cond:
            left = len(self._queue)
        if left:
            log.warning("Sparkplug: %d parts not sent at the stop", left)

    def _run(self) -> None:
        if self._policy is not None:
            self._policy.background()
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._queue or self._closing)
                remaining = self._deadline - time.monotonic()
                if not self._queue or (self._closing and (remaining <= 0 or not self.node.online)):
                    return
                pending = self._queue[0]
            timeout = min(self.node.cfg.send_timeout_s, remaining)
            try:
                sent = self.node.publish_part(pending.record, pending.historical, timeout, pending.at)
            except Exception:  # the top of the worker loop: this record is dropped, the next goes on
                log.exception("Sparkplug: part %s could not be encoded: dropped", pending.record.get("id"))
                sent = True
            with self._cond:
                if sent:
                    if self._queue and self._queue[0] is pending:  # not dropped meanwhile by a full backlog
                        self._queue.popleft()
                else:
                    pending.historical = True


if TYPE_CHECKING:
    def _is_a_sink(sink: SparkplugSink) -> Sink:  # mypy checks SparkplugSink against the Sink protocol
        return sink

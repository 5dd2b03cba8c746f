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
* once the broker accepted the connection and the NCMD/DCMD subscriptions (and, with
  ``sparkplug.primary_host_id``, once that host's retained STATE says online), the node
  publishes NBIRTH (seq 0: ``bdSeq``, ``Node Control/Rebirth`` and the node's info)
  and DBIRTH (seq 1: every device metric with its current value, :data:`DEVICE_METRICS`);
* then one DDATA per inspected part: the record's fields as metrics, stamped with the
  capture time (ms), ``is_historical`` on a part sent late;
* an NCMD ``Node Control/Rebirth`` = true repeats NBIRTH (same ``bdSeq``: the Will
  cannot change within a connection) and DBIRTH, the seq starting again at 0;
* a clean stop publishes DDEATH and NDEATH, then disconnects (which cancels the Will);
  so does a primary host going offline (Sparkplug 3.0), after which the node connects
  again and waits for the host.

Every message but NDEATH carries ``seq``, one more than the node's previous message
of the session, 255 followed by 0; one lock (``_Outgoing.lock``) assigns it and hands the
message to paho, so that the order of the seq numbers is the order on the wire.
Births, data and deaths are QoS 0 and not retained, as the specification requires
(the NDEATH, Will or not, QoS 1).

What "confirmed" means here: a DDATA is QoS 0 and has no acknowledgement of its own.
After a batch of them the node sends an UNSUBSCRIBE of a topic it never subscribed to
(``…/NCMD/<edge_node_id>/station-confirm``); the broker answers it (UNSUBACK) only once
it read everything sent before it on that connection, so the answer confirms the batch
(:meth:`SparkplugNode.publish_parts`) without a QoS the specification forbids. A batch
not confirmed (the connection ended, no answer in time) stays in the outbox and is sent
again, historical: the host may see a part twice (``Inspection/Record Id`` tells), and
never misses one.

Threads: the owner thread (``sparkplug``, :meth:`SparkplugNode.start` to
:meth:`SparkplugNode.close`) connects, publishes the births, answers rebirths,
reconnects with capped backoff and makes the clean stop; paho's network thread (one
per connection) runs the callbacks; the callers' threads publish parts.
:class:`SparkplugSink` is the node behind the pipeline's sink interface, fed from the
durable outbox by a thread of its own, so that a broker that is away never slows the
line and what it had not confirmed at a stop is sent after the restart.
"""

from __future__ import annotations

import collections
import enum
import json
import logging
import os
import ssl
import threading
import time
from collections.abc import Sequence
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
from .backoff import Backoff
from .config import SparkplugConfig
from .errors import ConfigError, PublishError
from .outbox import Entry, Outbox
from .priority import ThreadPolicy
from .publish import no_delay, read_password, shut_socket, tls_context

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


def node_birth(bd_seq: int, station_id: str) -> list[Metric]:
    """The NBIRTH's metrics: the session's bdSeq, the rebirth control and the node's info."""
    ts = now_ms()
    return [
        Metric(BDSEQ, spb.Int64, bd_seq, ts),
        Metric(REBIRTH, spb.Boolean, False, ts),
        Metric("Node Info/Station Id", spb.String, station_id, ts),
        Metric("Node Info/Software Version", spb.String, f"station {__version__}", ts),
    ]


def ndeath(bd_seq: int) -> bytes:
    """The NDEATH payload: the bdSeq only, no seq."""
    return encode([Metric(BDSEQ, spb.Int64, bd_seq, now_ms())], None, birth=True)


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
    WAITING_HOST = "waiting_host"  # connected; sparkplug.primary_host_id is not online: no births yet
    ONLINE = "online"  # births published: parts are sent
    OFFLINE = "offline"  # lost or unreachable; retrying with backoff
    AUTH_FAILED = "auth_failed"  # the broker refused the credentials; retrying every reconnect_max_s
    STOPPED = "stopped"


class _Sent:
    """One message handed to paho: ``done`` is set once it was written (``written``:
    QoS 0 into the socket, QoS 1 acknowledged, an UNSUBSCRIBE answered) or its
    connection ended first."""

    __slots__ = ("done", "written")

    def __init__(self) -> None:
        self.done = threading.Event()
        self.written = False


class _Session:
    """One MQTT connection (one ``bdSeq``): its paho client and paho's callbacks for it,
    on paho's network thread.

    waiting: paho mid → message not yet written. early: mids whose callback came before
    publish() returned the mid (paho's network thread can be that quick), with whether
    it was written; each is taken by the send that made it, right after.
    born_at: UNIX s of this session's births; a part stored before them is sent late.
    """

    def __init__(self, node: SparkplugNode, bd_seq: int):
        self.node = node
        self.bd_seq = bd_seq
        self.client: mqtt.Client | None = None
        self.lock = threading.Lock()
        self.waiting: dict[int, _Sent] = {}
        self.early: dict[int, bool] = {}
        self.connack = threading.Event()
        self.refused: ReasonCode | None = None
        self.suback = threading.Event()
        self.lost = threading.Event()
        self.lost_reason = ""
        self.born_at = float("inf")

    def send(self, topic: str, payload: bytes, qos: int = 0) -> _Sent | None:
        """client.publish() (never retained); None when paho did not take it."""
        assert self.client is not None  # made before the connect
        info = self.client.publish(topic, payload, qos=qos, retain=False)
        return self._track(info.mid) if info.rc == mqtt.MQTT_ERR_SUCCESS else None

    def barrier(self, topic: str) -> _Sent | None:
        """An UNSUBSCRIBE of ``topic``, a filter nobody subscribes to: the broker answers
        it (UNSUBACK) only once it read everything sent before it on this connection
        (see :meth:`SparkplugNode.publish_parts`); None when paho did not take it."""
        assert self.client is not None  # made before the connect
        rc, mid = self.client.unsubscribe(topic)
        return self._track(mid) if rc == mqtt.MQTT_ERR_SUCCESS and mid is not None else None

    def _track(self, mid: int) -> _Sent:
        sent = _Sent()
        with self.lock:
            if mid in self.early:
                sent.written = self.early.pop(mid)
                sent.done.set()
            elif self.lost.is_set():
                sent.done.set()
            else:
                self.waiting[mid] = sent
        return sent

    def _answered(self, mid: int, written: bool) -> None:
        with self.lock:
            sent = self.waiting.pop(mid, None)
            if sent is None:
                self.early[mid] = written
                return
        sent.written = written
        sent.done.set()

    def disconnect_after(self, death: _Sent | None, timeout: float) -> None:
        """The clean stop's end: DISCONNECT, which cancels the Will, once the broker
        acknowledged the NDEATH (``death``) within ``timeout`` s; else no DISCONNECT: the
        Will stays armed and says the same."""
        if death is None or not death.done.wait(timeout) or not death.written:
            log.warning("Sparkplug NDEATH not acknowledged; the broker publishes the Will instead")
            return
        assert self.client is not None  # made before the connect
        self.client.disconnect()
        self.lost.wait(1.0)  # on_disconnect: the DISCONNECT was written

    def abort(self) -> None:
        """End paho's network thread without a DISCONNECT (so the Will stays armed) even
        when the broker does not answer: the loop sees the shut socket and exits."""
        shut_socket(self.client)

    # --- paho callbacks (paho's network thread; an exception would end it) -----------------

    def on_connect(self, client, userdata, flags, reason_code: ReasonCode, properties) -> None:
        if reason_code.is_failure:
            self.refused = reason_code
        self.connack.set()
        self.node.wake()

    def on_subscribe(self, client, userdata, mid, reason_codes, properties) -> None:
        self.suback.set()
        self.node.wake()

    def on_unsubscribe(self, client, userdata, mid, reason_codes, properties) -> None:
        self._answered(mid, True)  # whatever the reason code: the broker answered

    def on_disconnect(self, client, userdata, flags, reason_code: ReasonCode, properties) -> None:
        with self.lock:
            self.lost_reason = str(reason_code)
            self.lost.set()
            pending = list(self.waiting.values())
            self.waiting.clear()
        for sent in pending:  # never written: their waiters learn it now
            sent.done.set()
        self.node.wake()

    def on_publish(self, client, userdata, mid: int, reason_code: ReasonCode, properties) -> None:
        self._answered(mid, not reason_code.is_failure)

    def on_message(self, client, userdata, msg: mqtt.MQTTMessage) -> None:
        try:
            self.node._on_message(msg.topic, bytes(msg.payload))
        except Exception:  # a command must never end paho's network thread
            log.exception("Sparkplug message on %s not handled", msg.topic)
            self.node._count("bad_commands")


class _Device:
    """The device's values, for its births and its DDATA: the last live part's metrics,
    the counts per grade (each record id counted once: a part sent again is not counted
    twice), the camera's state. The node's send lock guards it."""

    def __init__(self) -> None:
        self.values: dict[str, Metric] = {}
        self.counts = dict.fromkeys(COUNT_KEYS, 0)
        self._counted: collections.OrderedDict[str, None] = collections.OrderedDict()  # record ids, the latest
        self.camera = Metric(CAMERA_STATE, spb.String, None, now_ms())

    def count(self, record: dict) -> Metric:
        """Count ``record`` (once per id): the live total of its kind, to send with it (it
        is not a value of the past, even with a part sent late)."""
        key = count_key(record)
        record_id = str(record.get("id", ""))
        if record_id and record_id not in self._counted:
            self.counts[key] += 1
            self._counted[record_id] = None
            if len(self._counted) > 4096:
                self._counted.popitem(last=False)
        return Metric(f"Counts/{key}", spb.UInt64, self.counts[key], now_ms())

    def keep(self, metrics: list[Metric]) -> None:
        self.values.update((m.name, m) for m in metrics)

    def birth(self) -> list[Metric]:
        """Every device metric with its current value; null before the first part."""
        ts = now_ms()
        out = [self.values.get(name) or Metric(name, datatype, None, ts) for name, datatype in PART_METRICS]
        out += [self.values.get(name) or Metric(name, datatype, 0, ts) for name, datatype in COUNT_METRICS]
        out.append(self.camera)
        return out


class _Broker:
    """Where and how the node connects: the ``sparkplug`` section, with the password and
    the TLS context read once (ConfigError naming the field when they cannot be)."""

    def __init__(self, cfg: SparkplugConfig, client_id: str):
        self.cfg = cfg
        self.client_id = client_id
        try:
            self._password = read_password(cfg.auth, "sparkplug.auth")
            self.tls = tls_context(cfg.tls)
        except ConfigError as exc:  # the helpers name the mqtt section's fields; these are ours
            text = str(exc)
            raise ConfigError("sparkplug." + text[len("mqtt."):] if text.startswith("mqtt.") else text) from None
        self._protocol = mqtt.MQTTv5 if cfg.protocol == "5" else mqtt.MQTTv311

    def client(self, s: _Session, will_topic: str, will: bytes) -> mqtt.Client:
        """A fresh paho client for the connection ``s``, with ``will`` (the NDEATH) as its Last Will."""
        kwargs: dict[str, Any] = {}
        if self._protocol != mqtt.MQTTv5:
            kwargs["clean_session"] = True  # Sparkplug: no broker session (MQTT 5: clean start, expiry 0)
        client = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2, client_id=self.client_id,
                             protocol=self._protocol, userdata=s, reconnect_on_failure=False, **kwargs)
        client.connect_timeout = self.cfg.connect_timeout_s
        if self.tls is not None:
            client.tls_set_context(self.tls)
        if self.cfg.auth is not None:
            client.username_pw_set(self.cfg.auth.username, self._password)
        client.will_set(will_topic, will, qos=1, retain=False)
        client.on_connect = s.on_connect
        client.on_subscribe = s.on_subscribe
        client.on_unsubscribe = s.on_unsubscribe
        client.on_disconnect = s.on_disconnect
        client.on_publish = s.on_publish
        client.on_message = s.on_message
        client.on_socket_open = no_delay
        return client

    def refusal(self, refused: ReasonCode) -> tuple[str, str]:
        """("auth" when the credentials were refused, else "lost"; why) for a CONNACK's refusal."""
        host, port = self.cfg.host, self.cfg.effective_port
        if refused.value in _AUTH_REFUSALS:
            user = self.cfg.auth.username if self.cfg.auth else None
            return "auth", f"broker {host}:{port} refused the credentials ({refused}; user {user!r}): check sparkplug.auth"
        return "lost", f"broker {host}:{port} refused the connection: {refused}"

    def connect(self, client: mqtt.Client) -> None:
        """Send the CONNECT (OSError, ssl.SSLError or ValueError when it cannot be)."""
        cfg = self.cfg
        if self._protocol == mqtt.MQTTv5:
            client.connect(cfg.host, cfg.effective_port, keepalive=cfg.keepalive_s, clean_start=True)
        else:
            client.connect(cfg.host, cfg.effective_port, keepalive=cfg.keepalive_s)


class _Outgoing:
    """What the node publishes, in the order of its seq numbers: ``lock`` is held while a
    message gets its seq and goes to paho, so that the order of the seq numbers is the
    order on the wire; it guards the device's values too. Callers hold ``lock``."""

    def __init__(self, topics: SparkplugTopics, station_id: str):
        self.topics = topics
        self.station_id = station_id
        self.lock = threading.Lock()
        self.seq = 0  # the next message's
        self.device = _Device()

    def births(self, s: _Session) -> None:
        """NBIRTH (seq 0) and DBIRTH (seq 1)."""
        self.seq = 0
        s.send(self.topics.node("NBIRTH"), encode(node_birth(s.bd_seq, self.station_id), self._next(), birth=True))
        s.send(self.topics.device("DBIRTH"), encode(self.device.birth(), self._next(), birth=True))

    def part(self, s: _Session, record: dict, metrics: list[Metric], historical: bool) -> _Sent | None:
        """One part's DDATA: its metrics and its count; a live one's metrics are kept for the births."""
        count = self.device.count(record)
        sent = s.send(self.topics.device("DDATA"), encode(metrics + [count], self._next()))
        self.device.keep(([] if sent is None or historical else metrics) + [count])
        return sent

    def camera(self, s: _Session | None, metric: Metric) -> None:
        """The camera's state, kept for the births and sent at once on ``s`` (the session born, if any)."""
        self.device.camera = metric
        if s is not None and not s.lost.is_set():
            s.send(self.topics.device("DDATA"), encode([metric], self._next()))

    def deaths(self, s: _Session, born: bool) -> _Sent | None:
        """DDEATH (when the births went out on ``s``) and NDEATH, QoS 1: the NDEATH's handle."""
        if born:
            s.send(self.topics.device("DDEATH"), encode([], self._next()))
        return s.send(self.topics.node("NDEATH"), ndeath(s.bd_seq), qos=1)

    def _next(self) -> int:
        seq = self.seq
        self.seq = (seq + 1) % SEQ_MODULO
        return seq


_COUNTERS = ("connect_attempts", "connects", "births", "rebirths", "ddata_sent", "ddata_unsent", "commands",
             "bad_commands")
CONFIRM_LEVEL = "station-confirm"  # the topic level under NCMD that the node unsubscribes from (_Session.barrier)


class SparkplugNode:
    """A Sparkplug B edge node with one device, its own MQTT connection and its owner thread.

    cfg: the ``sparkplug`` config section; station_id: ``station.id`` (the device id
    when ``cfg.device_id`` is null); state_dir: where ``cfg.state_file`` lives when
    relative (default ``$STATE_DIRECTORY``); policy: the station's thread policy, whose
    background part the owner thread (and paho's) takes. Raises ConfigError at
    construction when the state file's place, the password or the TLS files cannot be had.

    Thread-safe: :meth:`publish_parts`, :meth:`set_camera_state` and :meth:`state` may be
    called from any thread, any time between :meth:`start` and :meth:`close`.
    """

    def __init__(self, cfg: SparkplugConfig, station_id: str, state_dir: str | Path | None = None,
                 policy: ThreadPolicy | None = None):
        self.cfg = cfg
        self.topics = SparkplugTopics.for_config(cfg, station_id)
        self.station_id = station_id
        self.client_id = cfg.client_id or f"spb-{cfg.group_id}-{cfg.edge_node_id}"
        self.bd_seq = BdSeqFile(state_path(cfg, state_dir))
        self._broker = _Broker(cfg, self.client_id)
        self._policy = policy
        # its lock: seq numbers in wire order, births before data, nothing after the deaths
        self._out = _Outgoing(self.topics, station_id)
        # _cond: the session, the state, the primary host's and the owner thread's requests (stop, rebirth).
        self._cond = threading.Condition()
        self._session: _Session | None = None  # the current connection
        self._online: _Session | None = None  # the connection whose births went out
        self._state = NodeState.IDLE
        self._error: str | None = None
        self._stopping = False
        self._rebirth = False
        self._host = _PrimaryHost(cfg.primary_host_id)
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
        return self.wait_until(lambda: self._online is not None or self._stopping, timeout) and not self._stopping

    def wait_until(self, predicate: Callable[[], bool], timeout: float | None) -> bool:
        """Block until ``predicate()`` is true (re-checked on every change of the node's
        state and at :meth:`wake`) or ``timeout`` s passed; its last value."""
        with self._cond:
            return self._cond.wait_for(predicate, timeout)

    def wake(self) -> None:
        """Have the waiters of :meth:`wait_until` (and the owner thread) look again."""
        with self._cond:
            self._cond.notify_all()

    def publish_parts(self, parts: Sequence[tuple[dict, float]], timeout: float | None = None) -> bool:
        """Publish records (results or error records) as one DDATA each (:data:`PART_METRICS`
        stamped with the capture time, else the time stored, and the part's count), all on
        one session, and confirm them: True once the broker answered a request sent after
        them on that connection (an UNSUBSCRIBE, :meth:`_Session.barrier`): it has them all.

        parts: (record, UNIX s it was stored); one stored before the session's births is
        sent late, its metrics ``is_historical`` (the device's current values stay). Waits
        up to ``timeout`` s (default ``sparkplug.send_timeout_s``) in all. False when the
        node was not online in time, or the connection ended or the time ran out before the
        broker answered: the caller sends them again (late, then)."""
        deadline = time.monotonic() + (self.cfg.send_timeout_s if timeout is None else timeout)
        with self._cond:
            self._cond.wait_for(lambda: self._online is not None or self._stopping, deadline - time.monotonic())
            s = self._online
        done: _Sent | None = None
        if s is not None and all(self._send_part(s, record, stored_at < s.born_at, stored_at) is not None
                                 for record, stored_at in parts):
            done = s.barrier(f"{self.topics.node('NCMD')}/{CONFIRM_LEVEL}")
        confirmed = done is not None and done.done.wait(max(0.0, deadline - time.monotonic())) and done.written
        self._count("ddata_sent" if confirmed else "ddata_unsent", len(parts))
        return confirmed

    def set_camera_state(self, state: str) -> None:
        """The camera's state (connected / reconnecting / lost …): kept for the births, and
        sent at once as a DDATA of ``Camera/State`` while online."""
        metric = Metric(CAMERA_STATE, spb.String, state, now_ms())
        with self._out.lock:
            if self._out.device.camera.value != state:
                self._out.camera(self._online, metric)

    def state(self) -> dict:
        """What the node is doing, for people and tests: state, the session's bdSeq, the
        next seq, the last connection problem, the counts, the primary host (when one is
        configured: its id and whether it is online), and counters."""
        with self._out.lock:
            seq, counts, camera = self._out.seq, dict(self._out.device.counts), self._out.device.camera.value
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
                **self._host.describe(),
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

    def _send_part(self, s: _Session, record: dict, historical: bool, at: float | None) -> _Sent | None:
        """One record's DDATA on the session ``s``; None when ``s`` ended meanwhile or paho did not take it."""
        metrics = part_metrics(record, at, historical)
        with self._out.lock:
            if s is not self._online or s.lost.is_set():
                return None
            return self._out.part(s, record, metrics, historical)

    def _count(self, name: str, n: int = 1) -> None:
        with self._cond:
            self._stats[name] += n

    def _set_state(self, state: NodeState, error: str | None) -> None:
        with self._cond:
            self._state = state
            self._error = error
            self._cond.notify_all()

    # --- the owner thread ----------------------------------------------------------------

    def _run(self) -> None:
        if self._policy is not None:
            self._policy.background()  # paho's network thread, started from here, inherits it
        backoff = Backoff(self.cfg.reconnect_min_s, self.cfg.reconnect_max_s)
        while True:
            try:
                outcome, error, connected = self._serve()
            except Exception:  # the top of the worker loop: log, count, retry after a pause
                log.exception("Sparkplug node failed; reconnecting")
                outcome, error, connected = "lost", "internal error (see the log)", False
            with self._cond:
                if outcome == "stopped" or self._stopping:
                    break
            refused = outcome == "auth"
            wait = backoff.after(connected, refused)
            state = NodeState.AUTH_FAILED if refused else NodeState.OFFLINE
            self._set_state(state, error)
            log.log(backoff.level(refused), "Sparkplug %s: %s; retrying in %.1f s", state.value, error, wait)
            with self._cond:
                if self._cond.wait_for(lambda: self._stopping, wait):
                    break
        self._set_state(NodeState.STOPPED, None)
        log.info("Sparkplug node %s/%s stopped", self.topics.group_id, self.topics.edge_node_id)

    def _serve(self) -> tuple[str, str | None, bool]:
        """Run one connection until it ends: (outcome, why, whether the broker accepted it);
        outcome "stopped", "auth" (credentials refused) or "lost"."""
        cfg = self.cfg
        host, port = cfg.host, cfg.effective_port
        s = _Session(self, self.bd_seq.next())
        client = s.client = self._broker.client(s, self.topics.node("NDEATH"), ndeath(s.bd_seq))
        with self._cond:
            self._session = s
            self._state = NodeState.CONNECTING
            self._stats["connect_attempts"] += 1
            self._host.online = self._host.id is None  # a primary host's state comes anew with each session
        try:
            self._broker.connect(client)
        except (OSError, ssl.SSLError, ValueError) as exc:  # refused, unreachable, TLS handshake
            self.bd_seq.take_back()  # no CONNECT went out: bdSeq counts CONNECTs
            return "lost", f"cannot connect to {host}:{port}: {exc}", False
        client.loop_start()
        try:
            self.wait_until(lambda: s.connack.is_set() or s.lost.is_set() or self._stopping, cfg.connect_timeout_s)
            if not (s.connack.is_set() or s.lost.is_set()):
                if self._stopping:
                    return "stopped", None, False
                return "lost", f"broker {host}:{port}: no CONNACK within {cfg.connect_timeout_s} s", False
            if s.refused is not None:
                return self._broker.refusal(s.refused) + (False,)
            if s.lost.is_set():
                return "lost", f"connection to {host}:{port} lost: {s.lost_reason}", False
            return self._subscribed(s)
        finally:
            with self._cond:
                self._session = None
                if self._online is s:
                    self._online = None
            if not s.lost.is_set():
                s.abort()
            client.loop_stop()

    def _subscribed(self, s: _Session) -> tuple[str, str | None, bool]:
        """Subscribe to the commands (and the primary host's state), then serve the session."""
        cfg = self.cfg
        host, port = cfg.host, cfg.effective_port
        self._count("connects")
        # Commands first, so that a rebirth asked for right after the births is heard.
        assert s.client is not None  # made before the connect
        s.client.subscribe([(self.topics.node("NCMD"), 1), (self.topics.device("DCMD"), 1)] + self._host.subscriptions())
        self.wait_until(lambda: s.suback.is_set() or s.lost.is_set() or self._stopping, cfg.connect_timeout_s)
        if not (s.suback.is_set() or s.lost.is_set()):
            if self._stopping:
                self._finish(s)
                return "stopped", None, True
            return "lost", f"broker {host}:{port}: no SUBACK within {cfg.connect_timeout_s} s", True
        log.info("Sparkplug connected to %s:%d as %s (MQTT %s%s), bdSeq %d", host, port, self.client_id,
                 cfg.protocol, ", TLS" if self._broker.tls else "", s.bd_seq)
        return self._connected(s)

    def _connected(self, s: _Session) -> tuple[str, str | None, bool]:
        """Births once the primary host (if any) is online, then rebirths on request, until
        the connection ends, the primary host goes offline, or the stop."""
        while True:
            if s.lost.is_set():
                return "lost", f"connection to {self.cfg.host}:{self.cfg.effective_port} lost: {s.lost_reason}", True
            with self._cond:
                stop, host_online = self._stopping, self._host.online
                rebirth, self._rebirth = (False, self._rebirth) if stop else (self._rebirth, False)
                born = self._online is s
            if stop or (born and not host_online):
                self._finish(s)  # Sparkplug: a node whose primary host went offline ends its session
                return ("stopped", None, True) if stop else ("lost", f"primary host {self._host.id} offline", True)
            if host_online and (rebirth or not born):
                self._births(s, rebirth)
            elif not host_online:
                self._set_state(NodeState.WAITING_HOST, f"primary host {self._host.id} not online: no births yet")
            with self._cond:
                self._cond.wait_for(lambda: self._stopping or self._rebirth or s.lost.is_set()
                                    or self._host.online != host_online)  # noqa: B023 - waited for here

    def _births(self, s: _Session, rebirth: bool) -> None:
        """NBIRTH (seq 0) and DBIRTH (seq 1), nothing between them; then the node is online."""
        with self._out.lock:  # held until both are queued: no DDATA comes before them
            if s.lost.is_set():
                return
            with self._cond:
                self._online = s
                self._state = NodeState.ONLINE
                self._error = None
                self._stats["rebirths" if rebirth else "births"] += 1
                self._cond.notify_all()
            if not rebirth:
                s.born_at = time.time()
            self._out.births(s)
        if rebirth:
            log.info("Sparkplug rebirth (bdSeq %d)", s.bd_seq)

    def _finish(self, s: _Session) -> None:
        """The clean stop: DDEATH and NDEATH (QoS 1: its acknowledgement says the broker has
        both), then DISCONNECT, which cancels the Will."""
        with self._out.lock:
            with self._cond:
                born = self._online is s
                self._online = None
            death = self._out.deaths(s, born)
        s.disconnect_after(death, self.cfg.connect_timeout_s)

    def _on_message(self, topic: str, payload: bytes) -> None:
        """A message on a subscribed topic (paho's network thread): the primary host's
        state, or a command."""
        if topic == self._host.topic:  # subscribed only with a primary host
            with self._cond:
                if self._host.update(payload):
                    self._cond.notify_all()
            return
        self._on_command(topic, payload)

    def _on_command(self, topic: str, payload: bytes) -> None:
        """An NCMD or DCMD: ``Node Control/Rebirth`` = true asks the owner thread for the
        births again; anything else is logged and left alone."""
        rebirth = rebirth_asked(topic, payload, self.topics.node("NCMD"))
        self._count("bad_commands" if rebirth is None else "commands")
        if rebirth:
            with self._cond:
                self._rebirth = True
                self._cond.notify_all()


def rebirth_asked(topic: str, payload: bytes, ncmd: str) -> bool | None:
    """Whether a command message on ``topic`` asks for a rebirth (``Node Control/Rebirth``
    = true on the node's NCMD topic ``ncmd``); None when it is not a Sparkplug B payload.
    What else it holds is logged and left alone."""
    try:
        message = spb.Payload.FromString(payload)
    except DecodeError as exc:
        log.warning("Sparkplug command on %s is not a Sparkplug B payload (%s): ignored", topic, exc)
        return None
    rebirth = False
    for m in message.metrics:
        if topic == ncmd and m.name == REBIRTH and m.WhichOneof("value") == "boolean_value":
            rebirth = rebirth or m.boolean_value
        else:
            log.info("Sparkplug command %r on %s is not one this node takes: ignored", m.name, topic)
    return rebirth


class _PrimaryHost:
    """The state of ``sparkplug.primary_host_id`` (Sparkplug 3.0): the retained JSON
    ``{"online": true|false, "timestamp": ms}`` on ``spBv1.0/STATE/<id>``. A message
    older than the newest one seen is ignored. Without an id, it is always online. The
    node's condition guards it."""

    def __init__(self, host_id: str | None):
        self.id = host_id
        self.topic = f"{NAMESPACE}/STATE/{host_id}"
        self.online = host_id is None
        self._timestamp = -1

    def subscriptions(self) -> list[tuple[str, int]]:
        """(topic, QoS) of its STATE, when there is a primary host."""
        return [(self.topic, 1)] if self.id is not None else []

    def describe(self) -> dict:
        """For the node's state: ``primary_host`` (its id, whether it is online), when there is one."""
        return {"primary_host": {"id": self.id, "online": self.online}} if self.id is not None else {}

    def update(self, payload: bytes) -> bool:
        """Take a STATE message: whether ``online`` changed."""
        try:
            doc = json.loads(payload)
        except ValueError:
            doc = None
        online = doc.get("online") if isinstance(doc, dict) else None
        stamp = doc.get("timestamp") if isinstance(doc, dict) else None
        if not isinstance(online, bool) or not isinstance(stamp, int) or isinstance(stamp, bool):
            log.warning("Sparkplug STATE of %s is not {\"online\": bool, \"timestamp\": ms}: ignored", self.id)
            return False
        if stamp < self._timestamp:
            return False
        self._timestamp = stamp
        changed, self.online = online != self.online, online
        if changed:
            log.info("Sparkplug primary host %s is %s", self.id, "online" if online else "offline")
        return changed


# --- the sink -----------------------------------------------------------------------------

_BATCH = 100  # outbox entries the sink sends and confirms at a time


class SparkplugSink:
    """The Sparkplug node behind the pipeline's :class:`~station.sinks.Sink` interface,
    fed from the outbox (``Confirming``).

    :meth:`deliver` only wakes the thread ``sparkplug-sink`` (never blocks the line); it
    sends what the outbox holds for it (``sink``), oldest first, in batches, with
    :meth:`SparkplugNode.publish_parts`, and acknowledges each batch in the outbox once
    the broker confirmed it. A part stored while the node was offline (the broker away,
    the primary host offline, the station stopped) goes after the next births, marked
    historical; so does a batch not confirmed, sent again. At a restart, what waited is
    sent first.

    ``start()`` after construction; :meth:`close` stops both threads; what is left
    waits in the outbox for the next start.
    """

    def __init__(self, cfg: SparkplugConfig, station_id: str, outbox: Outbox, state_dir: str | Path | None = None,
                 policy: ThreadPolicy | None = None, sink: str = "sparkplug"):
        self.node = SparkplugNode(cfg, station_id, state_dir, policy)
        self.sink = sink
        self._outbox = outbox
        self._policy = policy
        self._new = True  # the outbox may hold parts for the node (at the start: those from before)
        self._closing = False
        self._deadline = float("inf")  # monotonic: the close's limit for sending what waits
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Start the node (it connects in the background) and the sending thread."""
        self.node.start()
        self._thread = threading.Thread(target=self._run, name="sparkplug-sink", daemon=True)
        self._thread.start()

    def deliver(self, record: dict, ctx: Delivery) -> None:
        if ctx.seq is not None:  # stored for Sparkplug too: the thread reads it from the outbox
            self._new = True
            self.node.wake()

    def acked(self, seq: int) -> None:
        """The MQTT broker's acknowledgements are not Sparkplug's."""

    def set_camera_state(self, state: str) -> None:
        """See :meth:`SparkplugNode.set_camera_state`."""
        self.node.set_camera_state(state)

    def link_state(self) -> tuple[str, bool]:
        return self.node.state()["state"], self.node.online

    def state(self) -> dict:
        """The node's :meth:`~SparkplugNode.state`, with ``waiting``: the parts in the outbox for it."""
        return {**self.node.state(), "waiting": self._outbox.depth(self.sink)}

    def close(self, timeout: float | None = None) -> None:
        """Send what waits while the node is online, for up to ``timeout`` s (default
        ``sparkplug.send_timeout_s``), then the node's clean stop."""
        limit = self.node.cfg.send_timeout_s if timeout is None else timeout
        self._deadline = time.monotonic() + limit
        self._closing = True
        self.node.wake()
        if self._thread is not None:
            self._thread.join(limit + self.node.cfg.send_timeout_s)
        self.node.close()
        left = self._outbox.depth(self.sink)
        if left:
            log.warning("Sparkplug: %d parts wait in the outbox for the next start", left)

    def _run(self) -> None:
        if self._policy is not None:
            self._policy.background()
        backoff = Backoff(self.node.cfg.reconnect_min_s, self.node.cfg.reconnect_max_s)
        after = 0  # the last seq acknowledged: the outbox holds nothing older for the node
        while self._wait_for_work():
            self._new = False
            try:
                entries = self._outbox.pending(_BATCH, after, self.sink)
                if not entries:
                    continue
                if self._send(entries):
                    backoff.reset()
                    self._outbox.ack_many([e.seq for e in entries], self.sink)
                    after = entries[-1].seq
                else:
                    self.node.wait_until(lambda: self._closing, backoff.next())
            except PublishError as exc:  # the outbox cannot be read or written (disk): tried again later
                log.error("Sparkplug: %s", exc)
                self.node.wait_until(lambda: self._closing, backoff.next())
            self._new = True  # more may wait, or that batch again

    def _wait_for_work(self) -> bool:
        """Until the outbox may hold parts for the node and it is online; False at the
        stop once the time is up, the node is offline or nothing waits."""
        self.node.wait_until(lambda: self._closing or (self._new and self.node.online), None)
        if not self._closing:
            return True
        return time.monotonic() < self._deadline and self.node.online and self._outbox.depth(self.sink) > 0

    def _send(self, entries: list[Entry]) -> bool:
        """One batch as DDATA, confirmed (True), or not (False: it is sent again)."""
        parts: list[tuple[dict, float]] = []
        for e in entries:
            try:
                record = json.loads(e.payload)
            except ValueError:
                record = None
            if isinstance(record, dict):
                parts.append((record, e.created_at))
            else:  # acknowledged with the batch: sending it again would not help
                log.error("Sparkplug: outbox entry %d (%s) is not a record: not sent", e.seq, e.result_id)
        timeout = min(self.node.cfg.send_timeout_s, max(0.0, self._deadline - time.monotonic()))
        try:
            return self.node.publish_parts(parts, timeout)
        except Exception:  # the top of the worker loop: the batch is sent again
            log.exception("Sparkplug: parts %d..%d could not be sent", entries[0].seq, entries[-1].seq)
            return False


if TYPE_CHECKING:
    def _is_a_sink(sink: SparkplugSink) -> Sink:  # mypy checks SparkplugSink against the Sink protocol
        return sink

"""MQTT publisher with a durable outbox.

Every result is written to the :class:`~station.outbox.Outbox` first and
deleted only when the broker acknowledged it (PUBACK, QoS 1), so a broker
outage or a daemon restart loses nothing. The publisher serialises; it never
computes inspection data.

Three parts: :class:`MqttPublisher` sends the outbox (its entries that wait for
the ``mqtt`` sink, in seq order, at most ``max_inflight`` unacknowledged; a PUBACK
acknowledges its entry for MQTT, which deletes it unless another sink still waits);
:class:`MqttLink` keeps the connection it sends on (connect, retained status,
subscriptions, reconnect with capped backoff, the clean stop); a
:class:`_Session` is one connection (its paho client and callbacks).

Threads:

* the caller (the daemon's finish thread): :meth:`MqttPublisher.publish_result`
  stores the record and, while connected, hands it to paho itself; it never
  waits for the network.
* the sender thread (``mqtt-sender``, the link's): connects, publishes
  ``online``, sends what the caller did not, reconnects with capped exponential
  backoff, and runs the clean stop.
* paho's network thread (``loop_start``, one per connection): socket I/O and
  callbacks; a PUBACK acknowledges its entry in the outbox.

Each connection uses a fresh paho client with ``reconnect_on_failure=False``.
When a connection ends, that client and whatever paho still holds for it are
dropped, and the next connection sends again from the outbox, marking what it
sends ``late``. (paho's own reconnect would re-send its queued copies verbatim,
without the mark, interleaved with the outbox drain.) Consumers drop duplicates
by the result ``id``.

The broker keeps no session by default (clean session / clean start): the
outbox is what persists. With ``mqtt.persistent_session`` it keeps one for the
fixed client id (MQTT 5: for ``mqtt.session_expiry_s``), with the subscriptions
(the trigger topic, QoS 1) and the QoS 1 messages sent to them while the
station is away, delivered when it connects again.

Payloads sent on ``…/result`` are the stored record plus ``sent_at`` (when this
copy was handed to the broker) and ``late`` (true for a re-send, or for a result
stored before the current connection was established).
"""

from __future__ import annotations

import enum
import logging
import os
import socket
import ssl
import threading
import time
import uuid
from pathlib import Path
from collections import Counter
from typing import Any, Callable, Protocol

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from .backoff import Backoff
from .config import MqttConfig, MqttTlsConfig, warn_if_exposed
from .errors import ConfigError, PublishError
from .messages import StatusState, Topics, dumps, stamp_sent, status_record, topics_for
from .outbox import DEFAULT_SINK, Outbox
from .priority import ThreadPolicy

log = logging.getLogger(__name__)
_paho_log = logging.getLogger(__name__ + ".paho")

# CONNACK reason codes that mean "these credentials will not work": retry slowly.
# (paho maps MQTT 3.1.1 return codes 4 and 5 onto 134 and 135.)
# 134 bad user name or password, 135 not authorized, 138 banned, 140 bad authentication method.
_AUTH_REFUSALS = frozenset({134, 135, 138, 140})

# stats(): sent/acked/late results, broker_rejected (MQTT 5 PUBACK with an error),
# connects (CONNACK success), connect_attempts, stats_sent/stats_dropped, errors.
_COUNTERS = ("sent", "acked", "late", "broker_rejected", "connects", "connect_attempts", "stats_sent", "stats_dropped", "errors")


class LinkState(str, enum.Enum):
    IDLE = "idle"  # not started
    CONNECTING = "connecting"
    CONNECTED = "connected"
    DISCONNECTED = "disconnected"  # lost or unreachable; retrying with backoff
    AUTH_FAILED = "auth_failed"  # the broker refused the credentials; retrying every reconnect_max_s
    STOPPED = "stopped"


def shut_socket(client: "mqtt.Client | None") -> None:
    """Shut a paho client's socket without a DISCONNECT (a Last Will stays armed): its
    network loop sees the shut socket and ends, even when the broker does not answer."""
    sock = client.socket() if client is not None else None
    if sock is not None:
        try:
            sock.shutdown(socket.SHUT_RDWR)  # type: ignore[attr-defined]  # paho's SocketLike type lacks shutdown()
        except OSError:
            pass


class PasswordSource(Protocol):
    """An ``auth`` section that names where its password is (``mqtt.auth``, ``plc.auth``, …)."""

    @property
    def password_file(self) -> Path | None: ...

    @property
    def password_env(self) -> str | None: ...


def read_password(auth: PasswordSource | None, field: str = "mqtt.auth") -> str | None:
    """The password from ``auth.password_file`` (first line) or ``auth.password_env``.

    Raises ConfigError naming the field (``field``, e.g. ``plc.auth``), never the value.
    """
    if auth is None:
        return None
    if auth.password_file is not None:
        warn_if_exposed(auth.password_file, f"{field}.password_file", secret=True)
        try:
            text = auth.password_file.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            reason = getattr(exc, "strerror", None) or type(exc).__name__
            raise ConfigError(f"{field}.password_file: {auth.password_file}: cannot read ({reason})") from None
        lines = text.splitlines()
        if not lines or not lines[0]:
            raise ConfigError(f"{field}.password_file: {auth.password_file}: empty first line")
        return lines[0]
    if auth.password_env is not None:
        value = os.environ.get(auth.password_env)
        if not value:
            raise ConfigError(f"{field}.password_env: environment variable {auth.password_env} is not set or empty")
        return value
    return None


def store_record(outbox: Outbox, record: dict, topic: str) -> int:
    """Store one result (or error) record in ``outbox`` for every sink; its seq.

    The outbox key is ``record["id"]`` (a record already waiting is not stored twice);
    a record without an id (an error record) gets a fresh key. ``topic``: the MQTT
    topic it is sent on ("" without MQTT). Raises OutboxFull (a PublishError) when the
    outbox refuses it, PublishError when it cannot be serialised or written."""
    key = str(record.get("id") or uuid.uuid4())
    try:
        payload = dumps(record).encode("utf-8")
    except (TypeError, ValueError) as exc:
        raise PublishError(f"result {key}: cannot serialise ({exc})") from exc
    return outbox.put(key, topic, payload, time.time())


def tls_context(tls: MqttTlsConfig | None) -> ssl.SSLContext | None:
    """An SSL context for the broker: CA file (or the system store), optional client
    certificate, TLS ≥ 1.2, host name checked unless ``insecure``."""
    if tls is None:
        return None
    try:
        ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(tls.ca_file) if tls.ca_file else None)
        if tls.cert_file is not None:
            assert tls.key_file is not None  # the config takes cert_file and key_file only together
            warn_if_exposed(tls.key_file, "mqtt.tls.key_file", secret=True)
            ctx.load_cert_chain(str(tls.cert_file), str(tls.key_file))
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"mqtt.tls: {exc}") from exc
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if tls.insecure:
        ctx.check_hostname = False  # the certificate chain is still verified
    return ctx


class _PahoLog(logging.Logger):
    """paho's own messages, formatted only when they are emitted. (Given ``on_log``,
    paho formats a line for every packet, MQTT 5 properties included: ~20 µs per
    message received, which a flood of triggers pays thousands of times a second.)
    They are detail (packets sent and received; "not connected" after every clean
    disconnect, "connection reset" on every outage, both of which this module
    reports itself): DEBUG, except a callback's exception."""

    def log(self, level: int, msg: object, *args: object, **kwargs: Any) -> None:
        if level >= logging.ERROR and isinstance(msg, str) and msg.startswith("Caught exception"):
            _paho_log.error(msg, *args)
        elif _paho_log.isEnabledFor(logging.DEBUG):
            _paho_log.debug(msg, *args)


_PAHO_LOG = _PahoLog(_paho_log.name)


class _Broker:
    """Where and how the link connects: the ``mqtt`` section, with the password and
    the TLS context read once (ConfigError when they cannot be)."""

    def __init__(self, cfg: MqttConfig, station_id: str):
        self.cfg = cfg
        self.client_id = cfg.client_id or f"station-{station_id}"
        self._password = read_password(cfg.auth)
        self.tls = tls_context(cfg.tls)
        self._protocol = mqtt.MQTTv5 if cfg.protocol == "5" else mqtt.MQTTv311

    def client(self, s: _Session, will_topic: str, will: bytes) -> mqtt.Client:
        """A fresh paho client for the connection ``s``, with its callbacks and Last Will."""
        kwargs: dict[str, Any] = {}
        if self._protocol != mqtt.MQTTv5:
            # No broker session by default: the outbox is the persistence of what is sent.
            # A persistent one keeps the subscriptions, and the QoS 1 messages (triggers)
            # published to them while the station is away.
            kwargs["clean_session"] = not self.cfg.persistent_session
        client = mqtt.Client(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=self.client_id,
            protocol=self._protocol,
            userdata=s,
            reconnect_on_failure=False,
            **kwargs,
        )
        client.enable_logger(_PAHO_LOG)
        client.connect_timeout = self.cfg.connect_timeout_s
        client.max_inflight_messages_set(self.cfg.max_inflight + 1)  # + the status message
        if self.tls is not None:
            client.tls_set_context(self.tls)
        if self.cfg.auth is not None:
            client.username_pw_set(self.cfg.auth.username, self._password)
        client.will_set(will_topic, will, qos=1, retain=True)
        client.on_connect = s.on_connect
        client.on_disconnect = s.on_disconnect
        client.on_publish = s.on_publish
        client.on_message = s.on_message
        client.on_socket_open = no_delay
        return client

    def connect(self, client: mqtt.Client) -> None:
        """Send the CONNECT (OSError, ssl.SSLError or ValueError when it cannot be)."""
        cfg = self.cfg
        if self._protocol == mqtt.MQTTv5:
            client.connect(cfg.host, cfg.effective_port, keepalive=cfg.keepalive_s,
                           clean_start=not cfg.persistent_session, properties=self._connect_properties())
        else:
            client.connect(cfg.host, cfg.effective_port, keepalive=cfg.keepalive_s)

    def _connect_properties(self) -> Properties | None:
        """MQTT 5 CONNECT properties: the session expiry of a persistent session
        (without it the broker ends the session at the disconnect)."""
        if not self.cfg.persistent_session:
            return None
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = self.cfg.session_expiry_s
        return props


def no_delay(client, userdata, sock) -> None:
    """paho's on_socket_open: TCP_NODELAY. Each MQTT packet is one write: Nagle's algorithm
    would hold a packet back until the broker's TCP acknowledged the previous segment (a
    delayed ACK away, up to 40 ms), for nothing."""
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except (AttributeError, OSError):  # not a TCP socket (e.g. a websocket wrapper)
        pass


class _Session:
    """One connection: its paho client, the messages sent on it, and paho's callbacks
    for it (on paho's network thread), which report to the link.

    inflight: paho mid → outbox seq (None for status/stats) of messages sent and
    not yet acknowledged. early: acknowledgements that arrived before publish()
    returned the mid (paho's network thread can be that quick).
    """

    def __init__(self, link: MqttLink, window: int):
        self.link = link
        self.client: mqtt.Client | None = None
        self.lock = threading.Lock()
        self.inflight: dict[int, int | None] = {}
        self.early: dict[int, ReasonCode] = {}
        self.window = window
        self.cursor = 0  # highest outbox seq handed to this client
        self.connack = threading.Event()
        self.refused: ReasonCode | None = None
        self.connected_at: float | None = None  # UNIX seconds of the CONNACK
        self.session_present = False  # the broker resumed a session kept from before (mqtt.persistent_session)
        self.lost = threading.Event()
        self.lost_reason: str = ""

    @property
    def accepted(self) -> bool:
        """The broker answered the CONNECT and took it: results may be sent. (A refusal
        sets ``connack`` too, with ``refused`` and no ``connected_at``.)"""
        return self.connack.is_set() and self.refused is None

    def send(self, topic: str, payload: bytes, qos: int, retain: bool, seq: int | None) -> mqtt.MQTTMessageInfo | None:
        """client.publish() and remember mid → seq; None when paho did not take it."""
        assert self.client is not None  # the link made it before connecting
        info = self.client.publish(topic, payload, qos=qos, retain=retain)
        if info.rc != mqtt.MQTT_ERR_SUCCESS:
            return None
        with self.lock:
            early = self.early.pop(info.mid, None)
            if early is None:
                self.inflight[info.mid] = seq
        if early is not None:
            self.link.acked(seq, early)
        return info

    def abort(self) -> None:
        """End paho's network thread even when the broker is frozen and a polite
        DISCONNECT could not be written: the loop sees the shut socket and exits."""
        shut_socket(self.client)

    # --- paho callbacks (paho's network thread) --------------------------------------

    def on_connect(self, client, userdata, flags, reason_code: ReasonCode, properties) -> None:
        if reason_code.is_failure:
            self.refused = reason_code
        else:
            self.connected_at = time.time()
            self.session_present = bool(getattr(flags, "session_present", False))
            receive_max = getattr(properties, "ReceiveMaximum", None) if properties is not None else None
            if receive_max:  # MQTT 5: the broker disconnects a client that exceeds it
                self.window = max(1, min(self.window, int(receive_max)))
        self.connack.set()
        self.link.wake()

    def on_disconnect(self, client, userdata, flags, reason_code: ReasonCode, properties) -> None:
        self.lost_reason = str(reason_code)
        self.lost.set()
        self.link.wake()

    def on_publish(self, client, userdata, mid: int, reason_code: ReasonCode, properties) -> None:
        try:
            with self.lock:
                if mid not in self.inflight:
                    self.early[mid] = reason_code
                    return
                seq = self.inflight.pop(mid)
            self.link.acked(seq, reason_code)
        except PublishError as exc:  # e.g. disk full: the entry stays and is sent again on the next connection
            log.error("acknowledgement of mid %d not recorded: %s", mid, exc)
            self.link.count("errors")
        except Exception:  # never let an outbox error kill paho's network thread
            log.exception("handling the acknowledgement of mid %d failed", mid)
            self.link.count("errors")

    def on_message(self, client, userdata, message: mqtt.MQTTMessage) -> None:
        self.link.received(message.topic, bytes(message.payload), bool(message.retain))


class _Sender(Protocol):
    """What a link's connection is for (MqttPublisher)."""

    def pump(self, s: _Session) -> None:
        """Send what waits on the accepted session ``s`` (the sender thread, woken)."""

    def flush(self, s: _Session, deadline: float) -> None:
        """At the clean stop: send what waits until it is acknowledged or ``deadline`` (monotonic) passes."""

    def acked(self, seq: int, reason: ReasonCode) -> None:
        """The broker answered the message sent for outbox ``seq`` (paho's network thread)."""

    def backlog(self) -> int:
        """Results waiting to be sent or acknowledged (for the log)."""


class MqttLink:
    """The connection to the broker, kept by the sender thread (``mqtt-sender``).

    Each connection is a fresh paho client (:class:`_Session`) with the Last Will
    "offline"; once the broker accepted it the link publishes the retained status
    "online", subscribes, and hands the connection to its ``sender`` until it ends;
    then it reconnects with capped exponential backoff (slowly after refused
    credentials). :meth:`stop` runs the clean stop. The link's state and counters
    are for people (:meth:`stats`) and for callers that wait (:meth:`wait_until`).

    Raises ConfigError at construction when the password or the TLS files cannot be read.
    """

    def __init__(self, cfg: MqttConfig, station_id: str, sender: _Sender, policy: ThreadPolicy | None = None):
        self.cfg = cfg
        self._policy = policy if policy is not None else ThreadPolicy()  # the sender thread's part: background
        self.station_id = station_id
        self.topics: Topics = topics_for(cfg, station_id)
        self.broker = _Broker(cfg, station_id)
        self._sender = sender
        self._cond = threading.Condition()  # guards the fields below; notified on every change
        self._state = LinkState.IDLE
        self._last_error: str | None = None
        self._counts: Counter = Counter()
        self._retry_at: float | None = None
        self._session: _Session | None = None
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._stop_deadline = 0.0
        self._thread: threading.Thread | None = None
        self._subscriptions: dict[str, Callable[[str, bytes, bool], None]] = {}
        self._status_details: dict = {}

    # --- the callers' side --------------------------------------------------------

    def publish_stats(self, stats: dict) -> bool:
        """Send one stats message (QoS 0, not retained) if connected.

        Stats are periodic and superseded by the next ones, so while disconnected
        they are dropped, counted in ``stats_dropped``, and False is returned.
        """
        try:
            payload = dumps(stats).encode("utf-8")
        except (TypeError, ValueError) as exc:
            raise PublishError(f"stats: cannot serialise ({exc})") from exc
        s = self._session
        if s is None or not self.connected or s.send(self.topics.stats, payload, 0, False, None) is None:
            self.count("stats_dropped")
            return False
        self.count("stats_sent")
        return True

    def subscribe(self, topic: str, callback: Callable[[str, bytes, bool], None]) -> None:
        """Call ``callback(topic, payload, retained)`` (on paho's network thread) for
        every message on ``topic``; subscribed at QoS 1 on every (re)connect.
        ``retained``: the broker kept the message and hands it over because of the
        subscription (again at every connect), rather than as it was published."""
        with self._cond:
            self._subscriptions[topic] = callback
            s = self._session
        if s is not None and s.client is not None and self.connected:
            s.client.subscribe(topic, qos=1)

    def set_status(self, **details) -> None:
        """Extra fields of the retained "online" status (e.g. camera state),
        republished now if connected and on every reconnect."""
        with self._cond:
            if details == {k: self._status_details.get(k) for k in details}:
                return
            self._status_details.update(details)
            s = self._session
        if s is not None and self.connected:
            s.send(self.topics.status, self._status("online"), 1, True, None)

    @property
    def connected(self) -> bool:
        return self._state is LinkState.CONNECTED

    @property
    def state(self) -> LinkState:
        return self._state

    @property
    def last_error(self) -> str | None:
        """The last connection problem, for people (no secrets)."""
        return self._last_error

    @property
    def session(self) -> _Session | None:
        """The connection being made or up, None between two."""
        with self._cond:
            return self._session

    def stats(self) -> dict:
        """Link state and counters (see _COUNTERS)."""
        with self._cond:
            out: dict[str, Any] = {
                "state": self._state.value,
                "connected": self._state is LinkState.CONNECTED,
                "last_error": self._last_error,
                "retry_in_s": None if self._retry_at is None else round(max(0.0, self._retry_at - time.monotonic()), 3),
            }
            for name in _COUNTERS:
                out[name] = self._counts[name]
        return out

    def wait_until(self, predicate: Callable[[], bool], timeout: float) -> bool:
        """Block until ``predicate()`` is true (re-checked on every state or counter
        change) or ``timeout`` seconds passed; returns the last result."""
        with self._cond:
            return self._cond.wait_for(predicate, timeout)

    # --- lifetime -------------------------------------------------------------------

    def start(self) -> None:
        """Start the sender thread; it connects in the background and keeps retrying."""
        if self._thread is not None:
            raise RuntimeError("MqttPublisher.start() called twice")
        self._thread = threading.Thread(target=self._run, name="mqtt-sender", daemon=True)
        self._thread.start()

    def stop(self, timeout: float) -> None:
        """The clean stop (see MqttPublisher.stop); returns within about timeout + 1 s
        (+ connect_timeout_s if a TCP/TLS connect is in progress)."""
        if self._thread is None:
            return
        self._stop_deadline = time.monotonic() + max(0.0, timeout)
        self._stopping.set()
        self._wake.set()
        self._thread.join(timeout + self.cfg.connect_timeout_s + 3.0)
        if self._thread.is_alive():
            log.error("MQTT sender thread did not stop in time")

    # --- what the sessions report ---------------------------------------------------

    def acked(self, seq: int | None, reason: ReasonCode) -> None:
        """The broker answered a message sent with ``seq`` (None: status or stats)."""
        if seq is not None:
            self._sender.acked(seq, reason)

    def received(self, topic: str, payload: bytes, retained: bool) -> None:
        callback = self._subscriptions.get(topic)
        if callback is None:
            return
        try:
            callback(topic, payload, retained)
        except Exception:  # never let a subscriber's error kill paho's network thread
            log.exception("handling a message on %s failed", topic)
            self.count("errors")

    def wake(self) -> None:
        """Wake the sender thread (new result, ack, connection event, stop)."""
        self._wake.set()

    def sleep(self, timeout: float) -> bool:
        """Wait for a wake-up or ``timeout``; False if it timed out."""
        if timeout <= 0:
            return False
        woke = self._wake.wait(timeout)
        self._wake.clear()
        return woke

    def count(self, name: str, n: int = 1, **more: int) -> None:
        with self._cond:
            self._counts[name] += n
            for k, v in more.items():
                self._counts[k] += v
            self._cond.notify_all()

    # --- the sender thread ----------------------------------------------------------

    def _run(self) -> None:
        self._policy.background()  # paho's network thread, started from here, inherits it
        backoff = Backoff(self.cfg.reconnect_min_s, self.cfg.reconnect_max_s)
        while not self._stopping.is_set():
            s = _Session(self, self.cfg.max_inflight)
            try:
                outcome, error = self._serve(s)
            except Exception:  # the top of the worker loop: log, count, retry after a pause
                log.exception("MQTT sender failed; reconnecting")
                self.count("errors")
                outcome, error = "lost", "internal error (see the log)"
            if outcome == "stopped" or self._stopping.is_set():
                break
            refused = outcome == "auth"
            wait = backoff.after(s.connected_at is not None, refused)
            state = LinkState.AUTH_FAILED if refused else LinkState.DISCONNECTED
            self._set_state(state, error, retry_at=time.monotonic() + wait)
            log.log(backoff.level(refused), "MQTT %s: %s; %d results wait in the outbox; retrying in %.1f s",
                    state.value, error, self._sender.backlog(), wait)
            if self._stopping.wait(wait):
                break
        self._set_state(LinkState.STOPPED, None)
        log.info("MQTT publisher stopped; %d results remain in the outbox", self._sender.backlog())

    def _serve(self, s: _Session) -> tuple[str, str | None]:
        """Run one connection until it ends: ("stopped", None), ("auth", why) when the
        credentials were refused, or ("lost", why)."""
        host, port = self.cfg.host, self.cfg.effective_port
        client = s.client = self.broker.client(s, self.topics.status, self._status("offline"))
        self._set_state(LinkState.CONNECTING, self._last_error)
        self.count("connect_attempts")
        try:
            self.broker.connect(client)
        except (OSError, ssl.SSLError, ValueError) as exc:  # refused, unreachable, TLS handshake
            return "lost", f"cannot connect to {host}:{port}: {exc}"
        with self._cond:
            self._session = s
        client.loop_start()
        try:
            deadline = time.monotonic() + self.cfg.connect_timeout_s
            while not s.connack.is_set() and not s.lost.is_set() and not self._stopping.is_set():
                if not self.sleep(deadline - time.monotonic()):
                    break
            if s.refused is not None:
                code = s.refused.value
                if code in _AUTH_REFUSALS:
                    user = self.cfg.auth.username if self.cfg.auth else None
                    return "auth", f"broker {host}:{port} refused the credentials ({s.refused}; user {user!r}): check mqtt.auth"
                return "lost", f"broker {host}:{port} refused the connection: {s.refused}"
            if not s.connack.is_set():
                if self._stopping.is_set():
                    return "stopped", None
                return "lost", f"broker {host}:{port}: {s.lost_reason or f'no CONNACK within {self.cfg.connect_timeout_s} s'}"
            return self._connected(s)
        finally:
            with self._cond:
                self._session = None
            if not s.lost.is_set():
                s.abort()
            client.loop_stop()

    def _connected(self, s: _Session) -> tuple[str, str | None]:
        host, port = self.cfg.host, self.cfg.effective_port
        self.count("connects")
        self._set_state(LinkState.CONNECTED, None)
        session = ""
        if self.cfg.persistent_session:
            session = ", session resumed" if s.session_present else ", new persistent session"
        log.info("MQTT connected to %s:%d as %s (MQTT %s%s%s); %d results wait in the outbox", host, port,
                 self.broker.client_id, self.cfg.protocol, ", TLS" if self.broker.tls else "", session,
                 self._sender.backlog())
        s.send(self.topics.status, self._status("online"), 1, True, None)
        with self._cond:
            topics = list(self._subscriptions)
        assert s.client is not None  # _serve set it before connecting
        for topic in topics:
            s.client.subscribe(topic, qos=1)
        while True:
            if s.lost.is_set():
                return "lost", f"connection to {host}:{port} lost: {s.lost_reason}"
            if self._stopping.is_set():
                self._finish(s)
                return "stopped", None
            self._sender.pump(s)
            self.sleep(1.0)

    def _finish(self, s: _Session) -> None:
        """The clean stop: flush until the deadline, publish "stopped", disconnect."""
        self._sender.flush(s, self._stop_deadline)
        if s.lost.is_set():
            return
        info = s.send(self.topics.status, self._status("stopped"), 1, True, None)
        if info is not None:
            try:
                info.wait_for_publish(1.0)
            except (RuntimeError, ValueError):
                pass  # the connection went; the broker publishes the Last Will instead
        assert s.client is not None  # _serve set it before connecting
        s.client.disconnect()
        s.lost.wait(1.0)  # on_disconnect: the DISCONNECT was written

    def _status(self, state: StatusState) -> bytes:
        record = status_record(state, self.station_id)
        if state == "online":
            record.update(self._status_details)
        return dumps(record).encode("utf-8")

    def _set_state(self, state: LinkState, error: str | None, retry_at: float | None = None) -> None:
        """State, error and (while disconnected) the monotonic time of the next attempt, at once."""
        with self._cond:
            self._state = state
            self._last_error = error
            self._retry_at = retry_at
            self._cond.notify_all()


class MqttPublisher:
    """Publishes results (QoS 1, via the outbox), status (retained) and stats (QoS 0).

    cfg: the ``mqtt`` config section; station_id: ``station.id``.
    outbox: an open Outbox; the publisher never closes it (its owner does).
    policy: the station's thread policy, of which the sender thread (and paho's)
    takes the background part (station/priority.py); default: none.
    on_ack: called with the outbox seq of each result the broker acknowledged, on
    paho's network thread.
    sink: the outbox's name for MQTT: the entries the publisher sends and acknowledges
    are those waiting for it (the outbox may hold others, for other sinks).

    It sends the outbox on the connection its :class:`MqttLink` keeps (``link``).
    Raises ConfigError at construction when the password or the TLS files cannot be read.
    """

    def __init__(self, cfg: MqttConfig, station_id: str, outbox: Outbox, policy: ThreadPolicy | None = None,
                 on_ack: Callable[[int], None] | None = None, sink: str = DEFAULT_SINK):
        self.outbox = outbox
        self.sink = sink
        self._on_ack = on_ack
        self._pumping = threading.Lock()  # one thread at a time hands outbox entries to paho
        self.link = MqttLink(cfg, station_id, self, policy)

    # --- the caller's side --------------------------------------------------------

    def publish_result(self, record: dict) -> int:
        """Store one result (or error) record durably and queue it for sending; returns its outbox seq.

        See :func:`store_record`; then, while connected, the calling thread hands it
        to paho itself (:meth:`send_now`). Never blocks on the network.
        Raises OutboxFull (a PublishError) when the outbox refuses it.
        """
        seq = store_record(self.outbox, record, self.link.topics.result)
        self.send_now()
        return seq

    def publish_stats(self, stats: dict) -> bool:
        """See :meth:`MqttLink.publish_stats`."""
        return self.link.publish_stats(stats)

    def subscribe(self, topic: str, callback: Callable[[str, bytes, bool], None]) -> None:
        """See :meth:`MqttLink.subscribe`."""
        self.link.subscribe(topic, callback)

    def set_status(self, **details) -> None:
        """See :meth:`MqttLink.set_status`."""
        self.link.set_status(**details)

    @property
    def connected(self) -> bool:
        return self.link.connected

    @property
    def state(self) -> LinkState:
        return self.link.state

    @property
    def last_error(self) -> str | None:
        """The last connection problem, for people (no secrets)."""
        return self.link.last_error

    @property
    def outbox_depth(self) -> int:
        """Results waiting to be sent or acknowledged."""
        return self.outbox.depth(self.sink)

    def stats(self) -> dict:
        """Link state and counters: sent, acked, late, broker_rejected, connects,
        connect_attempts, stats_sent, stats_dropped, errors; plus the outbox's."""
        out = self.link.stats()
        out["outbox"] = self.outbox.stats()
        return out

    def wait_until(self, predicate: Callable[["MqttPublisher"], bool], timeout: float) -> bool:
        """Block until ``predicate(self)`` is true (re-checked on every state or
        counter change) or ``timeout`` seconds passed; returns the last result."""
        return self.link.wait_until(lambda: predicate(self), timeout)

    def wait_connected(self, timeout: float) -> bool:
        return self.wait_until(lambda p: p.connected, timeout)

    # --- lifetime -------------------------------------------------------------------

    def start(self) -> None:
        """Start the sender thread; it connects in the background and keeps retrying."""
        self.link.start()

    def stop(self, timeout: float = 5.0) -> bool:
        """Flush and disconnect cleanly; returns True when the outbox is empty.

        While connected: wait up to ``timeout`` s until every stored result is
        acknowledged, publish the retained status "stopped" (waiting ≤ 1 s for its
        acknowledgement) and disconnect, so the broker discards the Last Will.
        While disconnected: stop at once; stored results stay in the outbox for
        the next start. Returns within about timeout + 1 s (+ connect_timeout_s
        if a TCP/TLS connect is in progress).
        """
        self.link.stop(timeout)
        return self.outbox.depth(self.sink) == 0

    # --- sending (the link calls these) ---------------------------------------------

    def pump(self, s: _Session) -> None:
        with self._pumping:
            self._pump(s)

    def flush(self, s: _Session, deadline: float) -> None:
        while self.outbox.depth(self.sink) and not s.lost.is_set():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                log.warning("MQTT stop: %d results not acknowledged in time; they stay in the outbox",
                            self.outbox.depth(self.sink))
                break
            self.pump(s)
            self.link.sleep(min(remaining, 0.5))

    def acked(self, seq: int, reason: ReasonCode) -> None:
        if reason.is_failure:
            # MQTT 5 only: the broker refused this message (e.g. not authorised on the
            # topic). It stays in the outbox and is tried again on the next connection.
            self.link.count("broker_rejected")
            log.error("broker rejected result seq %d on %s: %s; it stays in the outbox", seq,
                      self.link.topics.result, reason)
        else:
            self.outbox.ack(seq, self.sink)
            self.link.count("acked")
            if self._on_ack is not None:
                self._on_ack(seq)
        self.link.wake()

    def backlog(self) -> int:
        return self.outbox.depth(self.sink)

    def send_now(self) -> None:
        """Hand what waits in the outbox to paho from the calling thread, when a
        connection is up and no other thread is doing it; else (or should it fail)
        wake the sender thread to do it. A wake-up on every result would add the
        host's thread wake-up latency (``station bench``) to each one."""
        s = self.link.session
        if s is not None and s.accepted and self._pumping.acquire(blocking=False):
            try:
                self._pump(s)
                return
            except Exception:  # stored already: the sender thread sends it
                log.exception("sending from the caller's thread failed; the sender thread takes over")
                self.link.count("errors")
            finally:
                self._pumping.release()
        self.link.wake()

    def _pump(self, s: _Session) -> None:
        """Send outbox entries after ``s.cursor`` while the window has room; the
        caller holds ``_pumping``."""
        while s.accepted and not s.lost.is_set():
            with s.lock:
                room = s.window - len(s.inflight)
            if room <= 0:
                return
            entries = self.outbox.pending(limit=room, after=s.cursor, sink=self.sink)
            if not entries:
                return
            now = time.time()
            assert s.connected_at is not None  # s.accepted: _on_connect set it before the CONNACK event
            # Counted before sending: should the daemon die before the PUBACK, the
            # next run knows these were sent once. A count that cannot be written
            # (disk full) does not hold the results back: a re-send after a restart
            # is still marked late, as the entry is older than that connection.
            try:
                self.outbox.mark_attempted([e.seq for e in entries], now)
            except PublishError as exc:
                log.warning("%s; sending anyway", exc)
            for e in entries:
                late = e.attempts > 0 or e.created_at < s.connected_at
                try:
                    payload = stamp_sent(e.payload, time.time(), late)
                except (ValueError, TypeError):
                    log.error("outbox entry %d (%s) is not a JSON object; sent as stored", e.seq, e.result_id)
                    payload = e.payload
                if s.send(e.topic, payload, 1, False, e.seq) is None:
                    return  # the connection is going; the next one sends from the outbox
                s.cursor = e.seq
                self.link.count("sent", late=int(late))

    def __repr__(self) -> str:
        link = self.link
        return f"MqttPublisher({link.cfg.host}:{link.cfg.effective_port}, {link.topics.prefix!r}, {link.state.value})"

"""The line PLC over OPC UA: each part's result written to PLC variables, confirmed.

:class:`OpcUaWriter` is a client of the PLC's OPC UA server (asyncua, the ``opcua``
extra). For each part it writes the part id (String), the grade code (0 PASS,
1 DISCOUNT, 2 REJECT), the defect area (Double, % of the surface) and the sequence
number in one Write request, the sequence last, and counts the part written only
when the server answered Good for every variable (:meth:`OpcUaWriter.write_part`).
While connected it writes a heartbeat every ``plc.heartbeat_s`` and follows
``plc.nodes.part_present``: each rising edge calls :attr:`OpcUaWriter.on_part`.

OPC UA has no transactions: a server applies the variables of one Write one by one
and answers each. So a part is all-or-nothing as far as the station reports it: if
one variable was refused, the part is reported as not written, naming the variable
and the status, although the server may have taken the others. A PLC program that
takes a part when the sequence number changes (written last), and watches the
heartbeat, sees whole parts from a working station.

Threads: the writer's own (``opcua-writer``) runs an asyncio event loop that holds
the connection, the heartbeat and the subscription; the callers' methods are
synchronous, thread-safe, and hand their work to that loop. Each connection is a
fresh asyncua ``Client`` (its own reconnection is off): when one ends, the writer
connects again with capped exponential backoff (station/backoff.py), as the MQTT
publisher does.
:class:`OpcUaSink` is the daemon's sink (station/sinks.py): fed from the durable
outbox, it writes from a thread of its own (``opcua-sink``), so that a slow or absent
PLC never slows the line, and acknowledges each part in the outbox once the PLC
confirmed it: a part the PLC did not confirm, before an outage or a restart, is
written again when it is back (the PLC may then see a part twice, with the same
sequence number).
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import enum
import hashlib
import json
import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

try:
    from asyncua import Client, ua
    from asyncua.crypto import security_policies, uacrypto
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa
except ImportError as exc:  # the optional dependency, named for whoever configured plc
    raise ImportError(f"plc.type opcua needs the opcua extra (pip install 'station[opcua]'): {exc}") from exc

from .backoff import Backoff
from .config import OpcUaConfig, OpcUaSecurityConfig, warn_if_exposed
from .publish import read_password
from .errors import ConfigError, PublishError
from .outbox import Entry, Outbox
from .priority import ThreadPolicy

if TYPE_CHECKING:
    from .sinks import Delivery

log = logging.getLogger(__name__)

GRADE_CODES = {"PASS": 0, "DISCOUNT": 1, "REJECT": 2}
ERROR_AREA_PCT = -1.0  # the defect area written for a part that could not be inspected

# state(): parts confirmed / not confirmed (refused, timed out, not connected) / not
# written (error records with plc.error_code null); heartbeats written or refused; rising
# edges of part_present (counted once on_part returned), part ids that could not be read
# there, on_part callbacks that raised; connections made and tried.
_COUNTERS = ("confirmed", "not_confirmed", "skipped", "heartbeats", "heartbeats_failed", "part_edges",
             "part_id_reads_failed", "callback_errors", "connects", "connect_attempts")

_POLICIES: dict[str, type[security_policies.SecurityPolicy]] = {
    "Basic256Sha256": security_policies.SecurityPolicyBasic256Sha256,
    "Aes128Sha256RsaOaep": security_policies.SecurityPolicyAes128Sha256RsaOaep,
    "Aes256Sha256RsaPss": security_policies.SecurityPolicyAes256Sha256RsaPss,
}
_MODES = {"Sign": ua.MessageSecurityMode.Sign, "SignAndEncrypt": ua.MessageSecurityMode.SignAndEncrypt}
_TYPES = {name: getattr(ua.VariantType, name) for name in ("Boolean", "Int16", "Int32", "UInt32", "Int64")}
_INT_MAX = {"Int16": 2**15 - 1, "Int32": 2**31 - 1, "UInt32": 2**32 - 1, "Int64": 2**63 - 1}

_S = ua.StatusCodes
# Status codes of a whole request that mean the session or the connection is gone.
_SESSION_GONE = frozenset({
    _S.BadSessionIdInvalid, _S.BadSessionClosed, _S.BadSessionNotActivated, _S.BadSecureChannelIdInvalid,
    _S.BadSecureChannelClosed, _S.BadConnectionClosed, _S.BadServerNotConnected, _S.BadNotConnected,
    _S.BadShutdown, _S.BadCommunicationError,
})
# Refusals that retrying soon will not cure: the writer then waits reconnect_max_s.
_AUTH_REFUSALS = frozenset({_S.BadUserAccessDenied, _S.BadIdentityTokenInvalid, _S.BadIdentityTokenRejected,
                            _S.BadUserSignatureInvalid})
_SECURITY_REFUSALS = frozenset({
    _S.BadCertificateUntrusted, _S.BadCertificateInvalid, _S.BadSecurityChecksFailed, _S.BadCertificateRevoked,
    _S.BadCertificateTimeInvalid, _S.BadCertificateUriInvalid, _S.BadCertificateUseNotAllowed,
    _S.BadCertificateHostNameInvalid, _S.BadSecurityPolicyRejected, _S.BadSecurityModeRejected,
})
# The session the station asks for, ms: a station that vanished (power cut, cable)
# frees its session on the PLC, which holds only a few, within this; the heartbeat
# and asyncua's watchdog (a read every second) keep a live one open.
_SESSION_TIMEOUT_MS = 30_000
_PART_PRESENT_QUEUE = 16  # changes the server keeps between two notifications: fast pulses are not merged
_BATCH = 64  # outbox entries the sink reads at a time


class Written(str, enum.Enum):
    """What became of one record written to the PLC (:meth:`OpcUaWriter.write_part`)."""

    CONFIRMED = "confirmed"  # the server answered Good for every variable of the part
    FAILED = "failed"  # not confirmed (refused, no answer, not connected): worth another try
    SKIPPED = "skipped"  # never written: an error record with plc.error_code null, or no part at all


class PlcState(str, enum.Enum):
    IDLE = "idle"  # not started
    CONNECTING = "connecting"
    CONNECTED = "connected"
    DISCONNECTED = "disconnected"  # lost or unreachable; retrying with backoff
    REFUSED = "refused"  # credentials, certificate or a configured variable refused; retrying every reconnect_max_s
    STOPPED = "stopped"


def _read_bytes(path: Path, field: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"{field}: {path}: cannot read ({exc.strerror or exc})") from None


def _read_certificate(path: Path, field: str) -> x509.Certificate:
    data = _read_bytes(path, field)
    try:
        if b"-----BEGIN" in data:
            return x509.load_pem_x509_certificate(data)
        return x509.load_der_x509_certificate(data)
    except ValueError:
        raise ConfigError(f"{field}: {path}: not a certificate (PEM or DER)") from None


def _read_private_key(path: Path, field: str) -> rsa.RSAPrivateKey:
    warn_if_exposed(path, field, secret=True)
    data = _read_bytes(path, field)
    try:
        if b"-----BEGIN" in data:
            key = serialization.load_pem_private_key(data, password=None)
        else:
            key = serialization.load_der_private_key(data, password=None)
    except TypeError:
        raise ConfigError(f"{field}: {path}: the key is encrypted: give it unencrypted (mode 0600)") from None
    except ValueError:
        raise ConfigError(f"{field}: {path}: not a private key (PEM or DER)") from None
    if not isinstance(key, rsa.RSAPrivateKey):
        raise ConfigError(f"{field}: {path}: an OPC UA application key is RSA, not {type(key).__name__}")
    return key


class _Security:
    """The certificate, key and trusted server certificate of ``plc.security``, read
    and checked once (ConfigError naming the field), handed to asyncua as DER."""

    def __init__(self, sec: OpcUaSecurityConfig):
        self.policy = _POLICIES[sec.policy]
        self.mode = _MODES[sec.mode]
        cert = _read_certificate(sec.certificate, "plc.security.certificate")
        key = _read_private_key(sec.private_key, "plc.security.private_key")
        spki = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        if cert.public_key().public_bytes(*spki) != key.public_key().public_bytes(*spki):
            raise ConfigError(f"plc.security.private_key: {sec.private_key} is not the key of {sec.certificate}")
        server = _read_certificate(sec.server_certificate, "plc.security.server_certificate")
        der = serialization.Encoding.DER
        self.certificate = cert.public_bytes(der)
        self.private_key = key.private_bytes(der, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
        self.server_certificate = server.public_bytes(der)
        try:
            uris = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
            self.application_uri: str | None = next(iter(uris.get_values_for_type(x509.UniformResourceIdentifier)), None)
        except x509.ExtensionNotFound:
            self.application_uri = None


class _Status:
    """The writer's connection state, last errors and counters (see _COUNTERS), under one
    condition notified on every change: for status, stats and metrics, and for the
    callers that wait on them (:meth:`wait_until`)."""

    def __init__(self, endpoint: str):
        self.endpoint = endpoint
        self._cond = threading.Condition()  # guards the fields below; notified on every change
        self.state = PlcState.IDLE
        self.last_error: str | None = None  # the last connection problem (None while connected)
        self._last_write_error: str | None = None
        self._retry_at: float | None = None
        self._counts: collections.Counter[str] = collections.Counter()

    def snapshot(self) -> dict:
        """Connection state, last errors and counters. last_error: the last connection
        problem (None while connected); last_write_error: the last part or heartbeat
        not confirmed."""
        with self._cond:
            out: dict[str, Any] = {
                "type": "opcua",
                "endpoint": self.endpoint,
                "state": self.state.value,
                "connected": self.state is PlcState.CONNECTED,
                "last_error": self.last_error,
                "last_write_error": self._last_write_error,
                "retry_in_s": None if self._retry_at is None else round(max(0.0, self._retry_at - time.monotonic()), 3),
            }
            for name in _COUNTERS:
                out[name] = self._counts[name]
        return out

    def wait_until(self, predicate: Callable[[dict], bool], timeout: float | None) -> bool:
        """Block until ``predicate(self.snapshot())`` is true (re-checked on every change
        and :meth:`wake`) or ``timeout`` seconds passed; returns the last result."""
        with self._cond:
            return self._cond.wait_for(lambda: predicate(self.snapshot()), timeout)

    def wake(self) -> None:
        """Have the waiters of :meth:`wait_until` look again (their predicate may depend on more)."""
        with self._cond:
            self._cond.notify_all()

    def count(self, name: str, n: int = 1) -> None:
        with self._cond:
            self._counts[name] += n
            self._cond.notify_all()

    def write_failed(self, counter: str, message: str) -> None:
        """A part or heartbeat not confirmed (or a record that is no part): counted under
        ``counter``, kept as ``last_write_error`` and logged."""
        with self._cond:
            self._counts[counter] += 1
            self._last_write_error = message
            self._cond.notify_all()
        log.warning("PLC: not written: %s", message)

    def set(self, state: PlcState, error: str | None, retry_at: float | None = None) -> None:
        """State, error and (while disconnected) the monotonic time of the next attempt, at once."""
        with self._cond:
            self.state = state
            self.last_error = error
            self._retry_at = retry_at
            self._cond.notify_all()


class _PartPresent:
    """``plc.nodes.part_present`` followed, on the writer's loop: the subscription's
    handler (asyncua calls it in order) queues each rising edge, and :meth:`hand_out`
    reads the part's id (``plc.nodes.part_present_id``, when configured) and calls the
    writer's ``on_part`` (looked up at each edge). The first value after each
    subscription is where it starts from, not an edge."""

    def __init__(self, cfg: OpcUaConfig, status: _Status, on_part: Callable[[], Callable[[str | None], None] | None]):
        self.cfg = cfg
        self.status = status
        self._on_part = on_part
        self._queue: asyncio.Queue[float] = asyncio.Queue()
        self._last: bool | None = None

    async def subscribe(self, client: Client) -> None:
        assert self.cfg.nodes.part_present is not None
        self._last = None
        interval = self.cfg.part_present_interval_ms
        subscription = await client.create_subscription(interval, self)
        await subscription.subscribe_data_change(client.get_node(self.cfg.nodes.part_present),
                                                 queuesize=_PART_PRESENT_QUEUE, sampling_interval=ua.Double(interval))

    def datachange_notification(self, node: Any, val: Any, data: Any) -> None:
        present = bool(val)
        if self._last is False and present:
            self._queue.put_nowait(time.monotonic())
        self._last = present

    async def hand_out(self, current: Callable[[], Client | None]) -> None:
        """Each rising edge: read the part id on the ``current()`` connection and call on_part."""
        id_node = self.cfg.nodes.part_present_id
        while True:
            await self._queue.get()
            part_id: str | None = None
            client = current()
            if id_node is not None:
                try:
                    if client is None:
                        raise ConnectionError("not connected")
                    value = await client.get_node(id_node).read_value()
                    part_id = None if value is None else str(value)
                except Exception as exc:  # the part is there all the same: it goes on without its id
                    self.status.count("part_id_reads_failed")
                    log.warning("PLC part present, but its id (%s) could not be read: %s", id_node, _describe(exc))
            callback = self._on_part()
            try:
                if callback is not None:
                    callback(part_id)
            except Exception:  # the daemon's hook: never let it end the edges
                self.status.count("callback_errors")
                log.exception("PLC part present: on_part(%r) failed", part_id)
            self.status.count("part_edges")  # counted once handed out: who waits on it finds on_part called


class _Heartbeat:
    """``plc.nodes.heartbeat``, written every ``plc.heartbeat_s`` while connected: a
    counter (1, 2, … wrapping at the type's largest value) or a toggled Boolean."""

    def __init__(self, cfg: OpcUaConfig, status: _Status):
        self.cfg = cfg
        self.status = status
        self._beat = 0

    async def beat(self, client: Client) -> str | None:
        """Write one beat: None, or why the connection is gone. Refused, it is counted."""
        node = self.cfg.nodes.heartbeat
        assert node is not None
        kind = self.cfg.heartbeat_type
        value: bool | int = self._beat % 2 == 0 if kind == "Boolean" else (self._beat + 1) % (_INT_MAX[kind] + 1)
        dv = ua.DataValue(ua.Variant(value, _TYPES[kind]))
        try:
            [status] = await client.write_values([client.get_node(node)], [dv], raise_on_partial_error=False)
        except (ConnectionError, OSError) as exc:
            return f"heartbeat: connection lost: {_describe(exc)}"
        except (asyncio.TimeoutError, ua.UaError) as exc:
            if isinstance(exc, ua.UaStatusCodeError) and exc.code in _SESSION_GONE:
                return f"heartbeat: {_describe(exc)}"
            self.status.write_failed("heartbeats_failed", f"heartbeat {node}: {_describe(exc)}")
            return None
        if not status.is_good():
            self.status.write_failed("heartbeats_failed", f"heartbeat {node}: the server answered {status.name}")
            return None
        self._beat = self._beat + 1 if kind == "Boolean" else int(value)
        self.status.count("heartbeats")
        return None


class _Endpoint:
    """Where and how the writer connects: the ``plc`` section, with the password and the
    certificates read once (ConfigError when they cannot be)."""

    def __init__(self, cfg: OpcUaConfig, station_id: str):
        self.cfg = cfg
        self._session_name = f"station {station_id}"
        self._password = read_password(cfg.auth, "plc.auth")
        self._security = _Security(cfg.security) if cfg.security is not None else None
        self._application_uri = cfg.application_uri or (self._security.application_uri if self._security else None) \
            or f"urn:station:{station_id}"

    async def new_client(self) -> Client:
        client = Client(self.cfg.endpoint, timeout=self.cfg.request_timeout_s)
        client.name = client.description = self._session_name
        client.application_uri = self._application_uri
        client.product_uri = "urn:station"
        client.session_timeout = _SESSION_TIMEOUT_MS
        if self._security is not None:
            sec = self._security
            await client.set_security(sec.policy, sec.certificate, sec.private_key,
                                      server_certificate=sec.server_certificate, mode=sec.mode)
        if self.cfg.auth is not None:
            assert self._password is not None  # read_password gives one for an auth section
            client.set_user(self.cfg.auth.username)
            client.set_password(self._password)
        return client

    async def connect(self, client: Client) -> str | None:
        """Connect ``client``, once the server's endpoints showed one of the configured
        security whose certificate is the one trusted; else why not (nothing connected).

        The endpoints come over a channel without security, as OPC UA discovery does:
        they only serve to name the problem (a server that presents another certificate
        could not read what the station encrypts for the trusted one in any case)."""
        probe = Client(self.cfg.endpoint, timeout=self.cfg.request_timeout_s)
        endpoints = await probe.connect_and_get_server_endpoints()
        sec = self._security
        mode = sec.mode if sec is not None else ua.MessageSecurityMode.None_
        uri = sec.policy.URI if sec is not None else security_policies.SecurityPolicyNone.URI
        matching = [ep for ep in endpoints if ep.SecurityMode == mode and ep.SecurityPolicyUri == uri]
        if not matching:
            offered = ", ".join(sorted({_security_name(ep.SecurityMode, ep.SecurityPolicyUri) for ep in endpoints}))
            return (f"{self.cfg.endpoint} offers no endpoint with security {_security_name(mode, uri)} (it offers "
                    f"{offered or 'none'}): check plc.security")
        if sec is not None:
            presented = uacrypto.x509_from_der(matching[0].ServerCertificate)
            der = presented.public_bytes(serialization.Encoding.DER) if presented is not None else b""
            if der != sec.server_certificate:
                return (f"{self.cfg.endpoint} presents a certificate other than plc.security.server_certificate "
                        f"(thumbprint {_thumbprint(der)}, trusted {_thumbprint(sec.server_certificate)}): export "
                        "the server's certificate again if it was renewed")
        await client.connect()
        return None

    def describe_error(self, exc: Exception, what: str | None = None) -> tuple[str, str]:
        """("refused" or "lost", a sentence for people) for an exception of connect or subscribe."""
        where = self.cfg.endpoint if what is None else f"{self.cfg.endpoint}: {what}"
        if isinstance(exc, ua.UaStatusCodeError):
            name = ua.StatusCode(exc.code).name
            if exc.code in _AUTH_REFUSALS:
                user = self.cfg.auth.username if self.cfg.auth else None
                return "refused", f"{where} refused the credentials ({name}; user {user!r}): check plc.auth"
            if exc.code in _SECURITY_REFUSALS:
                return "refused", (f"{where} refused the security settings ({name}): check plc.security, and that "
                                   "the server trusts plc.security.certificate")
            if what is not None and exc.code not in _SESSION_GONE:
                return "refused", f"{where}: {name}"
            return "lost", f"{where}: {name}"
        if isinstance(exc, OSError):
            return "lost", f"cannot connect to {where}: {exc.strerror or exc}"
        if isinstance(exc, ua.UaError) and "certificate mismatch" in str(exc).lower():  # asyncua's create_session
            return "refused", f"{where} presented a certificate other than plc.security.server_certificate"
        return "lost", f"{where}: {_describe(exc)}"


def part_fields(cfg: OpcUaConfig) -> list[tuple[str, str, ua.VariantType]]:
    """A part's variables in request order, the sequence last (see the module's text):
    (its name, its NodeId, its type)."""
    nodes = cfg.nodes
    return [("part_id", nodes.part_id, ua.VariantType.String), ("grade", nodes.grade, _TYPES[cfg.grade_type]),
            ("defect_area_pct", nodes.defect_area_pct, ua.VariantType.Double),
            ("sequence", nodes.sequence, _TYPES[cfg.sequence_type])]


def part_values(cfg: OpcUaConfig, record: dict) -> list[Any] | None:
    """The part's values in the order of _part_fields; None when not written (an
    error record with plc.error_code null). ValueError for a record that is not one."""
    grade = record.get("grade")
    if grade is None:
        if "error" not in record:
            raise ValueError("a record with neither a grade nor an error")
        if cfg.error_code is None:
            return None
        code, area = cfg.error_code, ERROR_AREA_PCT
    else:
        if grade not in GRADE_CODES:
            raise ValueError(f"unknown grade {grade!r}")
        code, area = GRADE_CODES[grade], float(record["defect_area_pct"])
    seq = record.get("seq")
    if not isinstance(seq, int) or isinstance(seq, bool) or seq < 0:
        raise ValueError(f"seq {seq!r} is not a sequence number")
    if cfg.sequence_type == "UInt32":
        seq %= 2**32
    elif seq > _INT_MAX["Int64"]:
        raise ValueError(f"seq {seq} does not fit an Int64")
    part_id = record.get("part_id")
    if part_id is not None and not isinstance(part_id, str):
        raise ValueError(f"part_id {part_id!r} is not text")
    return [part_id or "", code, area, seq]


class OpcUaWriter:
    """Writes parts to the PLC's OPC UA server and confirms them (see the module's text).

    cfg: the ``plc`` section; station_id: ``station.id`` (the session's name, and the
    application URI when neither ``plc.application_uri`` nor the certificate gives one).
    on_part: called with the part id (``plc.nodes.part_present_id``'s value, or None)
    at each rising edge of ``plc.nodes.part_present``, on the writer's thread; it must
    return quickly (hand the part to the trigger). An attribute: set it before
    :meth:`start`, or later.

    Raises ConfigError at construction when the password, the certificate or a key
    cannot be read.
    """

    def __init__(self, cfg: OpcUaConfig, station_id: str = "station",
                 on_part: Callable[[str | None], None] | None = None, policy: ThreadPolicy | None = None):
        self.cfg = cfg
        self.on_part = on_part
        self._policy = policy if policy is not None else ThreadPolicy()
        self._endpoint = _Endpoint(cfg, station_id)
        self._part_fields = part_fields(cfg)
        self.status = _Status(cfg.endpoint)
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._started = threading.Event()
        # the loop's own, made on it (see _main)
        self._stopping: asyncio.Event | None = None
        self._wake: asyncio.Event | None = None  # stop or loss: the serving loop looks again
        self._up: asyncio.Event | None = None  # set while a connection is established
        self._client: Client | None = None
        self._lost: asyncio.Event | None = None
        self._lost_reason: str | None = None
        self._connecting: asyncio.Future[str | None] | None = None  # the connect under way
        self._parts = _PartPresent(cfg, self.status, lambda: self.on_part)
        self._heartbeat = _Heartbeat(cfg, self.status)

    # --- the callers' side ----------------------------------------------------------

    def start(self) -> None:
        """Start the writer's thread; it connects in the background and keeps retrying."""
        if self._thread is not None:
            raise RuntimeError("OpcUaWriter.start() called twice")
        self._thread = threading.Thread(target=self._thread_main, name="opcua-writer", daemon=True)
        self._thread.start()
        self._started.wait()

    def write_part(self, record: dict, timeout: float) -> Written:
        """Write one record (``messages.result_record`` or ``error_record``) to the PLC:
        CONFIRMED only when the server answered Good for every variable of the part
        within ``timeout`` seconds (waiting for the connection included). FAILED
        otherwise, logged, counted (``not_confirmed``) and in ``last_write_error``, naming
        the variable and the status the server gave, or why nothing was written. SKIPPED,
        counted ``skipped``, for what is never written: an error record when
        ``plc.error_code`` is null, and a record that is not a part (logged, and in
        ``last_write_error``).
        Thread-safe; blocks up to about ``timeout``; never call it from ``on_part``."""
        if threading.current_thread() is self._thread:
            raise RuntimeError("write_part() called on the writer's own thread (from on_part?): it would wait for itself")
        loop = self._loop
        if loop is None or self.status.state is PlcState.STOPPED:
            return self._not_written(record, "the PLC writer is not running")
        try:
            future = asyncio.run_coroutine_threadsafe(self._write(record, timeout), loop)
        except RuntimeError:  # the loop closed in between
            return self._not_written(record, "the PLC writer is not running")
        try:
            return future.result(timeout + 1.0)  # _write keeps to timeout; the second is slack
        except concurrent.futures.CancelledError:  # the writer stopped meanwhile
            return self._not_written(record, "the PLC writer stopped")
        except concurrent.futures.TimeoutError:
            future.cancel()
            return self._not_written(record, f"no result within {timeout} s")

    def state(self) -> dict:
        """See :meth:`_Status.snapshot`."""
        return self.status.snapshot()

    @property
    def connected(self) -> bool:
        return self.status.state is PlcState.CONNECTED

    def wait_until(self, predicate: Callable[[dict], bool], timeout: float) -> bool:
        """See :meth:`_Status.wait_until`."""
        return self.status.wait_until(predicate, timeout)

    def close(self, timeout: float = 5.0) -> None:
        """Close the session and stop the thread, within about ``timeout`` seconds.
        Parts written meanwhile are not confirmed."""
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            self.status.set(PlcState.STOPPED, None)
            return
        try:
            loop.call_soon_threadsafe(self._stop_now)
        except RuntimeError:  # the loop is closed: the thread ended already
            pass
        thread.join(timeout)
        if thread.is_alive():
            log.error("OPC UA writer thread did not stop within %.1f s", timeout)

    # --- the writer's thread ----------------------------------------------------------

    def _thread_main(self) -> None:
        loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)
        self._loop = loop
        try:
            self._policy.background()
            loop.run_until_complete(self._main())
        finally:
            self._started.set()  # start() returns even when _main failed before it set this
            # what is left (a part's write when the stop came): cancelled, so its caller hears of it
            rest = [t for t in asyncio.all_tasks(loop) if not t.done()]
            for task in rest:
                task.cancel()
            loop.run_until_complete(asyncio.gather(*rest, return_exceptions=True))
            loop.run_until_complete(loop.shutdown_asyncgens())
            asyncio.set_event_loop(None)
            loop.close()
            self.status.set(PlcState.STOPPED, None)

    def _stop_now(self) -> None:
        assert self._stopping is not None and self._wake is not None
        self._stopping.set()
        self._wake.set()
        if self._connecting is not None:
            self._connecting.cancel()

    async def _main(self) -> None:
        self._stopping, self._wake, self._up = asyncio.Event(), asyncio.Event(), asyncio.Event()
        self._started.set()
        part_present = asyncio.create_task(self._parts.hand_out(lambda: self._client))
        backoff = Backoff(self.cfg.reconnect_min_s, self.cfg.reconnect_max_s)
        try:
            while not self._stopping.is_set():
                try:
                    outcome, error, got_in = await self._session()
                except Exception:  # the top of the worker loop: log, count, retry after a pause
                    log.exception("OPC UA writer failed; reconnecting")
                    outcome, error, got_in = "lost", "internal error (see the log)", False
                if outcome == "stopped" or self._stopping.is_set():
                    break
                refused = outcome == "refused"
                wait = backoff.after(got_in, refused)
                state = PlcState.REFUSED if refused else PlcState.DISCONNECTED
                self.status.set(state, error, retry_at=time.monotonic() + wait)
                log.log(backoff.level(refused), "PLC %s: %s; retrying in %.1f s", state.value, error, wait)
                try:
                    await asyncio.wait_for(self._stopping.wait(), wait)
                except asyncio.TimeoutError:
                    pass
        finally:
            part_present.cancel()
        log.info("PLC writer stopped")

    async def _session(self) -> tuple[str, str | None, bool]:
        """One connection, from connect to its end: (outcome, why, whether it got in);
        outcome "stopped", "refused" (retried slowly) or "lost"."""
        assert self._stopping is not None and self._wake is not None and self._up is not None
        endpoint = self.cfg.endpoint
        client = await self._endpoint.new_client()
        lost = asyncio.Event()
        self.status.set(PlcState.CONNECTING, self.status.last_error)
        self.status.count("connect_attempts")
        # a task of its own, which the stop cancels: close() need not wait for connect_timeout_s
        self._connecting = asyncio.ensure_future(asyncio.wait_for(self._endpoint.connect(client), self.cfg.connect_timeout_s))
        try:
            refused = await self._connecting
        except asyncio.CancelledError:
            client.disconnect_socket()
            if self._stopping.is_set():
                return "stopped", None, False
            raise
        except asyncio.TimeoutError:
            client.disconnect_socket()  # the connect was cancelled half-way
            return "lost", f"{endpoint}: no session within {self.cfg.connect_timeout_s} s (plc.connect_timeout_s)", False
        except Exception as exc:  # refused, unreachable, security, credentials
            outcome, why = self._endpoint.describe_error(exc)
            return outcome, why, False
        finally:
            self._connecting = None
        if refused is not None:
            return "refused", refused, False

        async def connection_lost(exc: Exception) -> None:
            self._lose(lost, f"connection to {endpoint} lost: {_describe(exc)}")

        client.connection_lost_callback = connection_lost
        self._client, self._lost, self._lost_reason = client, lost, None
        try:
            if self.cfg.nodes.part_present is not None:
                try:
                    await self._parts.subscribe(client)
                except Exception as exc:
                    outcome, why = self._endpoint.describe_error(
                        exc, f"plc.nodes.part_present {self.cfg.nodes.part_present}")
                    return outcome, why, False
            self.status.count("connects")
            self._up.set()
            self.status.set(PlcState.CONNECTED, None)
            log.info("PLC connected: %s (security %s, %s)", endpoint,
                     "None" if self.cfg.security is None else f"{self.cfg.security.mode} {self.cfg.security.policy}",
                     f"user {self.cfg.auth.username!r}" if self.cfg.auth else "anonymous")
            return await self._serve(client, lost) + (True,)
        finally:
            self._up.clear()
            self._client = self._lost = None
            await _disconnect(client, lost, self.cfg.request_timeout_s)

    async def _serve(self, client: Client, lost: asyncio.Event) -> tuple[str, str | None]:
        """Heartbeats until the connection is lost or the writer stops."""
        assert self._stopping is not None and self._wake is not None
        loop = asyncio.get_running_loop()
        beat_s = self.cfg.heartbeat_s
        next_beat = loop.time()
        while True:
            if self._stopping.is_set():
                return "stopped", None
            if lost.is_set():
                return "lost", self._lost_reason
            if self.cfg.nodes.heartbeat is not None and loop.time() >= next_beat:
                gone = await self._heartbeat.beat(client)
                if gone is not None:
                    self._lose(lost, gone)
                next_beat += beat_s
                if next_beat <= loop.time():  # late (a slow reply): the cadence starts again from now
                    next_beat = loop.time() + beat_s
            wait = next_beat - loop.time() if self.cfg.nodes.heartbeat is not None else 1.0
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), max(0.0, wait))
            except asyncio.TimeoutError:
                pass

    async def _write(self, record: dict, timeout: float) -> Written:
        """One part (see write_part), on the loop."""
        assert self._up is not None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        try:
            values = part_values(self.cfg, record)
        except ValueError as exc:  # never a part: retrying would not make it one
            self.status.write_failed("skipped", f"record {record.get('id')!r} (seq {record.get('seq')}): {exc}")
            return Written.SKIPPED
        if values is None:
            self.status.count("skipped")
            return Written.SKIPPED
        if not self._up.is_set():
            try:
                await asyncio.wait_for(self._up.wait(), max(0.0, deadline - loop.time()))
            except asyncio.TimeoutError:
                why = self.status.last_error or self.status.state.value
                return self._not_written(record, f"not connected to {self.cfg.endpoint} ({why})")
        client, lost = self._client, self._lost
        if client is None or lost is None:  # up, and lost again before this task ran
            return self._not_written(record, f"connection to {self.cfg.endpoint} lost ({self._lost_reason})")
        nodes = [client.get_node(node) for _, node, _ in self._part_fields]
        dvs = [ua.DataValue(ua.Variant(v, vtype)) for v, (_, _, vtype) in zip(values, self._part_fields)]
        try:
            statuses = await asyncio.wait_for(client.write_values(nodes, dvs, raise_on_partial_error=False),
                                              max(0.0, deadline - loop.time()))
        except asyncio.TimeoutError:
            return self._not_written(record, f"no answer from {self.cfg.endpoint} within {timeout} s")
        except (ConnectionError, OSError) as exc:
            self._lose(lost, f"connection to {self.cfg.endpoint} lost: {_describe(exc)}")
            return self._not_written(record, f"connection lost: {_describe(exc)}")
        except ua.UaError as exc:
            if isinstance(exc, ua.UaStatusCodeError) and exc.code in _SESSION_GONE:
                self._lose(lost, f"{self.cfg.endpoint}: {_describe(exc)}")
            return self._not_written(record, f"the server refused the write: {_describe(exc)}")
        refused = [f"{field} ({node}): {status.name}"
                   for (field, node, _), status in zip(self._part_fields, statuses) if not status.is_good()]
        if refused:
            return self._not_written(record, "the server refused " + ", ".join(refused))
        self.status.count("confirmed")
        log.debug("part %r (seq %s) written to the PLC", record.get("part_id"), record.get("seq"))
        return Written.CONFIRMED

    def _not_written(self, record: dict, why: str) -> Written:
        self.status.write_failed("not_confirmed", f"part {record.get('part_id')!r} (seq {record.get('seq')}): {why}")
        return Written.FAILED

    def _lose(self, lost: asyncio.Event, why: str) -> None:
        """The connection ``lost`` is gone: the serving loop ends it and connects again."""
        if not lost.is_set():
            self._lost_reason = why
            lost.set()
        if self._up is not None:
            self._up.clear()
        if self._wake is not None:
            self._wake.set()

async def _disconnect(client: Client, lost: asyncio.Event, timeout: float) -> None:
    """Close the session (when the connection still stands) and the socket; never raises."""
    try:
        if lost.is_set():
            client.disconnect_socket()
        else:
            await asyncio.wait_for(client.disconnect(), timeout)
    except Exception as exc:  # the session goes with the connection all the same
        log.debug("PLC disconnect: %s", _describe(exc))
        client.disconnect_socket()


def _security_name(mode: ua.MessageSecurityMode, policy_uri: str) -> str:
    """E.g. "SignAndEncrypt Basic256Sha256", "None"."""
    policy = policy_uri.rsplit("#", 1)[-1]
    return "None" if mode == ua.MessageSecurityMode.None_ else f"{mode.name} {policy}"


def _thumbprint(der: bytes) -> str:
    """A certificate's SHA-1 thumbprint, as OPC UA tools (and PLC web pages) show it."""
    return hashlib.sha1(der).hexdigest().upper() if der else "none"


def _describe(exc: BaseException) -> str:
    """An exception in a few words: an OPC UA status by its name, else the message."""
    if isinstance(exc, ua.UaStatusCodeError) and isinstance(getattr(exc, "code", None), int):
        return ua.StatusCode(exc.code).name
    if isinstance(exc, asyncio.TimeoutError):
        return "no answer in time"
    text = str(exc) or type(exc).__name__
    return text if isinstance(exc, (OSError, ua.UaError)) else f"{type(exc).__name__}: {text}"


class OpcUaSink:
    """The PLC as one of the daemon's sinks (station/sinks.py ``Sink``, ``Confirming``),
    fed from the outbox: a thread of its own (``opcua-sink``) writes what the outbox
    holds for it (``sink``), oldest first, with :meth:`OpcUaWriter.write_part`
    (``plc.write_timeout_s`` each), and acknowledges each part there once the PLC
    confirmed it, or once it is a record never written (``Written.SKIPPED``). A part
    not confirmed is written again, and the parts after it wait, so that the PLC gets
    them in order: at once when the connection is back, after ``plc.reconnect_min_s``
    doubling up to ``reconnect_max_s`` while the server refuses it. What waited at a
    restart is written first. :meth:`deliver` only wakes the thread: a slow or absent
    PLC never slows the line.

    :meth:`signal_parts` hands the part-present edges on (the trigger); :meth:`stats`
    is the writer's state with ``waiting``, the parts in the outbox for the PLC.
    :meth:`close` writes what waits while the PLC is connected, for at most
    ``2 × plc.write_timeout_s``; the rest waits in the outbox for the next start.
    """

    def __init__(self, cfg: OpcUaConfig, station_id: str, outbox: Outbox,
                 on_part: Callable[[str | None], None] | None = None, policy: ThreadPolicy | None = None,
                 sink: str = "plc"):
        self.cfg = cfg
        self.sink = sink
        self._outbox = outbox
        self._policy = policy if policy is not None else ThreadPolicy()
        self.writer = OpcUaWriter(cfg, station_id, on_part, self._policy)
        self._new = True  # the outbox may hold parts for the PLC (at the start: those from before)
        self._closing_at: float | None = None  # monotonic deadline of the last writes, once closing
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Start the writer and the sink's thread."""
        self.writer.start()
        self._thread = threading.Thread(target=self._run, name="opcua-sink", daemon=True)
        self._thread.start()

    def deliver(self, record: dict, ctx: Delivery) -> None:
        if ctx.seq is not None:  # stored for the PLC too: the thread reads it from the outbox
            self._new = True
            self.writer.status.wake()

    def acked(self, seq: int) -> None:
        """The broker's acknowledgements do not concern the PLC."""

    def signal_parts(self, on_part: Callable[[str | None], None]) -> None:
        """Call ``on_part(part id or None)`` at each rising edge of ``plc.nodes.part_present``
        (the writer's thread; it must return quickly)."""
        self.writer.on_part = on_part

    def link_state(self) -> tuple[str, bool]:
        return self.writer.status.state.value, self.writer.connected

    def close(self) -> None:
        thread = self._thread
        self._closing_at = time.monotonic() + 2 * self.cfg.write_timeout_s
        self.writer.status.wake()
        if thread is not None:
            thread.join(2 * self.cfg.write_timeout_s + 2.0)
        self.writer.close()
        left = self._outbox.depth(self.sink)
        if left:
            log.warning("PLC: %d parts wait in the outbox for the next start", left)

    def stats(self) -> dict:
        """The writer's state (OpcUaWriter.state) with ``waiting``: parts in the outbox for the PLC."""
        out = self.writer.state()
        out["waiting"] = self._outbox.depth(self.sink)
        return out

    def _run(self) -> None:
        self._policy.background()
        backoff = Backoff(self.cfg.reconnect_min_s, self.cfg.reconnect_max_s)
        after = 0  # the last seq acknowledged: the outbox holds nothing older for the PLC
        while self._wait_for_work():
            self._new = False
            try:
                after = self._write_in_order(self._outbox.pending(_BATCH, after, self.sink), after, backoff)
            except PublishError as exc:  # the outbox cannot be read or written (disk): tried again later
                log.error("PLC: %s", exc)
                self._pause(backoff.next())
                self._new = True

    def _write_in_order(self, entries: list[Entry], after: int, backoff: Backoff) -> int:
        """Write ``entries`` and acknowledge each, until one is not confirmed (then pause
        as ``backoff`` says); the last seq acknowledged."""
        for entry in entries:
            if self._write(entry) is Written.FAILED:
                self._pause(backoff.next())
                self._new = True  # that one again
                return after
            backoff.reset()
            self._outbox.ack(entry.seq, self.sink)
            after = entry.seq
        if entries:
            self._new = True  # more may wait than one batch
        return after

    def _wait_for_work(self) -> bool:
        """Until the outbox may hold parts for the PLC and it is connected; False at the
        stop once the time for the last writes is up, the PLC is away or nothing waits."""
        self.writer.status.wait_until(lambda s: self._closing_at is not None or (self._new and s["connected"]), None)
        closing_at = self._closing_at
        if closing_at is None:
            return True
        return time.monotonic() < closing_at and self.writer.connected and self._outbox.depth(self.sink) > 0

    def _pause(self, wait: float) -> None:
        """``wait`` seconds before the next try, or until the stop."""
        self.writer.status.wait_until(lambda s: self._closing_at is not None, wait)

    def _write(self, entry: Entry) -> Written:
        """One outbox entry to the PLC."""
        try:
            record = json.loads(entry.payload)
        except ValueError as exc:
            log.error("PLC: outbox entry %d (%s) is not JSON (%s): not written", entry.seq, entry.result_id, exc)
            return Written.SKIPPED
        if not isinstance(record, dict):
            log.error("PLC: outbox entry %d (%s) is not a record: not written", entry.seq, entry.result_id)
            return Written.SKIPPED
        timeout = self.cfg.write_timeout_s
        closing_at = self._closing_at
        if closing_at is not None:
            timeout = max(0.0, min(timeout, closing_at - time.monotonic()))
        try:
            return self.writer.write_part(record, timeout)
        except Exception:  # the top of the worker loop: tried again
            log.exception("PLC: writing part %r failed", record.get("part_id"))
            return Written.FAILED

"""MqttPublisher against a real Mosquitto on a free loopback port: QoS 1 results
that validate against the shipped schema, a broker outage losing nothing, the
Last Will, the clean stop, refused credentials, TLS, and no password in logs.

Every wait is on a broker message, a publisher state or counter, or a process;
none is a fixed sleep.
"""

from __future__ import annotations

import json
import logging
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from datetime import datetime
from pathlib import Path

import jsonschema
import numpy as np
import pytest

from mosquitto import Mosquitto, Subscriber, have_mosquitto, write_password_file
from certs import have_openssl, make_pki, tls_listener
from station.config import MqttAuthConfig, MqttConfig, MqttTlsConfig, parse_config
from station.errors import ConfigError
from station.messages import error_record, load_schema, result_record
from station.outbox import Outbox
from station.publish import LinkState, MqttPublisher
from station.messages import SENT_FIELDS, topics_for
from station.types import Defects, Grade, GradeDecision, InspectionResult

pytestmark = pytest.mark.skipif(not have_mosquitto(), reason="mosquitto is not installed")

ROOT = Path(__file__).resolve().parent.parent
STATION = "st-test"
PASSWORD = "s3cr3t-Pw-9f2c"  # must never show up in a log


# --- helpers ------------------------------------------------------------------------


def make_record(i: int) -> dict:
    """A result record built the daemon's way: InspectionResult → messages.result_record."""
    defects = Defects(
        xyxy=np.array([[10, 20, 30, 44]], np.float32),
        confidence=np.array([0.91], np.float32),
        class_name=np.array(["scratch"]),
        area_px=np.array([480.0]),
        kind=np.array(["detection"]),
    )
    result = InspectionResult(
        id=uuid.uuid4().hex,
        station_id=STATION,
        source="camera:line3",
        seq=i,
        part_id=f"P{i:05d}",
        captured_at=time.time(),
        width=640,
        height=480,
        decision=GradeDecision(Grade.DISCOUNT, "total_area_pct", "total defect area 0.156 % > 0.100 %"),
        defects=defects,
        defect_area_px=480.0,
        defect_area_pct=0.15625,
        models={"detection": "ab" * 32},
        latency_ms={"infer.detection": 4.2, "total": 6.0},
    )
    return result_record(result)


def mqtt_cfg(broker: Mosquitto, **kw) -> MqttConfig:
    base = dict(host=broker.host, port=broker.port, reconnect_min_s=0.1, reconnect_max_s=0.5, connect_timeout_s=2.0)
    base.update(kw)
    return MqttConfig(**base)


def records_on(sub: Subscriber, topic: str) -> list[dict]:
    return [json.loads(m.payload) for m in sub.on_topic(topic)]


@pytest.fixture
def outbox(tmp_path):
    with Outbox(tmp_path / "outbox.sqlite3") as ob:
        yield ob


@pytest.fixture
def publishers():
    """Started publishers, stopped at teardown whatever happened."""
    started: list[MqttPublisher] = []

    def start(cfg: MqttConfig, outbox: Outbox) -> MqttPublisher:
        pub = MqttPublisher(cfg, STATION, outbox)
        started.append(pub)
        pub.start()
        return pub

    yield start
    for pub in started:
        pub.stop(1.0)


def nodelay(pub: MqttPublisher) -> bool:
    """TCP_NODELAY on the publisher's current connection."""
    sock = pub.link.session.client.socket()
    return bool(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))


# --- (a) results: QoS 1, schema-valid --------------------------------------------------


@pytest.mark.parametrize("protocol", ["3.1.1", "5"])
def test_results_arrive_at_qos1_and_validate(broker, outbox, publishers, protocol):
    cfg = mqtt_cfg(broker, protocol=protocol, enterprise="acme", site="plant1", area="assembly", line="line3")
    topics = topics_for(cfg, STATION)
    assert topics.result == f"acme/plant1/assembly/line3/{STATION}/result"
    n = 45  # more than mosquitto's MQTT 5 Receive Maximum (20): the window must respect it
    with Subscriber(broker.port, topics.result, topics.status) as sub:
        pub = publishers(cfg, outbox)
        assert pub.wait_connected(5), pub.stats()
        assert nodelay(pub)  # each packet leaves at once (no Nagle delay)
        records = [make_record(i) for i in range(n)]
        for r in records:
            pub.publish_result(r)
        pub.publish_result(error_record("camera:line3", "frame 7: CRC error", seq=7, station_id=STATION))
        assert sub.wait_for(lambda m: len([x for x in m if x.topic == topics.result]) >= n + 1, 5)
        assert pub.wait_until(lambda p: p.outbox_depth == 0, 5), pub.stats()

    validator = jsonschema.Draft202012Validator(load_schema())
    got = sub.on_topic(topics.result)
    assert all(m.qos == 1 and not m.retain for m in got)
    payloads = [json.loads(m.payload) for m in got]
    for p in payloads:
        validator.validate(p)
        datetime.fromisoformat(p["sent_at"].replace("Z", "+00:00"))
        assert p["late"] is False
    assert [p["id"] for p in payloads[:n]] == [r["id"] for r in records]  # in order
    assert payloads[n]["error"] == "frame 7: CRC error"
    for p, r in zip(payloads, records):
        assert {k: v for k, v in p.items() if k not in SENT_FIELDS} == r  # serialised, not recomputed
    status = records_on(sub, topics.status)
    assert status[0]["state"] == "online" and status[0]["station_id"] == STATION and status[0]["schema_version"] == 1
    stats = pub.stats()
    assert stats["sent"] == stats["acked"] == n + 1 and stats["late"] == 0


def test_a_result_is_sent_by_the_calling_thread_unless_another_is_sending(broker, outbox, publishers, monkeypatch):
    """While connected, publish_result hands the result to paho itself (no wake-up of
    the sender thread on the way); when another thread holds the outbox's sending, the
    sender thread sends it once that is over. Either way: once, in order, acknowledged."""
    import threading

    from station.publish import MqttLink, _Session

    senders: list[tuple[int | None, str]] = []
    real = _Session.send

    def send(self, topic, payload, qos, retain, seq):
        senders.append((seq, threading.current_thread().name))
        return real(self, topic, payload, qos, retain, seq)

    idle = threading.Event()  # the sender thread is between two rounds of sending (it waits up to 1 s)
    real_sleep = MqttLink.sleep

    def sleep(self, timeout):
        if threading.current_thread().name == "mqtt-sender":
            idle.set()
        return real_sleep(self, timeout)

    monkeypatch.setattr(_Session, "send", send)
    monkeypatch.setattr(MqttLink, "sleep", sleep)
    cfg = mqtt_cfg(broker)
    with Subscriber(broker.port, topics_for(cfg, STATION).result) as sub:
        pub = publishers(cfg, outbox)
        assert pub.wait_connected(5), pub.stats()
        idle.clear()
        assert idle.wait(5)  # right after connecting, the sender thread itself may be sending
        records = [make_record(0), make_record(1)]
        first = pub.publish_result(records[0])
        assert (first, "MainThread") in senders
        with pub._pumping:  # as if the sender thread were sending
            second = pub.publish_result(records[1])
            time.sleep(0.05)
            assert second not in [seq for seq, _ in senders]
        assert pub.wait_until(lambda p: p.outbox_depth == 0, 5), pub.stats()
        assert sub.wait_for(lambda m: len(m) >= 2, 5)
    assert (second, "mqtt-sender") in senders
    assert [json.loads(m.payload)["id"] for m in sub.messages] == [r["id"] for r in records]
    assert pub.stats()["sent"] == pub.stats()["acked"] == 2


def test_stats_are_qos0_and_dropped_while_disconnected(broker, outbox, publishers):
    cfg = mqtt_cfg(broker)
    topics = topics_for(cfg, STATION)
    pub = MqttPublisher(cfg, STATION, outbox)
    assert pub.publish_stats({"frames": 1}) is False  # not started: dropped and counted
    with Subscriber(broker.port, topics.stats) as sub:
        pub = publishers(cfg, outbox)
        assert pub.wait_connected(5)
        assert pub.publish_stats({"frames": 10, "outbox_depth": pub.outbox_depth})
        assert sub.wait_for(lambda m: len(m) >= 1, 5)
    (msg,) = sub.messages
    assert msg.qos == 0 and not msg.retain and json.loads(msg.payload) == {"frames": 10, "outbox_depth": 0}


# --- (b) broker outage -----------------------------------------------------------------


@pytest.mark.parametrize("protocol", ["3.1.1", "5"])
def test_broker_outage_loses_nothing_and_marks_late(broker, outbox, publishers, protocol):
    # Reconnect attempts every 1.2-1.5 s: after the broker is back, the test's
    # subscriber has that long to subscribe before the publisher returns.
    cfg = mqtt_cfg(broker, protocol=protocol, reconnect_min_s=1.5, reconnect_max_s=1.5)
    topic = topics_for(cfg, STATION).result
    sub = Subscriber(broker.port, topic).connect()
    pub = publishers(cfg, outbox)
    assert pub.wait_connected(5)
    batches: dict[str, list[dict]] = {}

    def publish(name: str, n: int = 15) -> None:
        batches[name] = [make_record(i) for i in range(n)]
        for r in batches[name]:
            pub.publish_result(r)

    def received_ids() -> set[str]:
        return {json.loads(m.payload)["id"] for m in sub.on_topic(topic)}

    try:
        publish("before")  # sent and acknowledged normally
        assert pub.wait_until(lambda p: p.outbox_depth == 0, 5)
        # A PUBACK means the broker took the message, not that it reached the
        # subscriber: let the broker deliver before killing it.
        assert sub.wait_for(lambda m: received_ids() >= {r["id"] for r in batches["before"]}, 5)
        broker.freeze()  # the broker reads nothing more: the next batch stays in flight
        sent = pub.stats()["sent"]
        publish("in_flight")
        assert pub.wait_until(lambda p: p.stats()["sent"] >= sent + 10, 5)  # handed to paho, unacknowledged
        broker.kill()  # the connection drops with those messages unacknowledged
        assert pub.wait_until(lambda p: p.state is LinkState.DISCONNECTED, 5)
        assert pub.outbox_depth == 15
        publish("while_down")  # stored in the outbox only
        attempts = pub.stats()["connect_attempts"]
        # a reconnect attempt failed against the dead broker and the next one is scheduled
        assert pub.wait_until(lambda p: p.stats()["connect_attempts"] > attempts and p.stats()["retry_in_s"] is not None, 5)
        broker.start()  # same port, persistence off: nothing survived in the broker
        sub.reconnect()
        assert pub.wait_connected(5), pub.stats()
        publish("after")
        everything = {r["id"] for b in batches.values() for r in b}
        assert sub.wait_for(lambda m: received_ids() >= everything, 5), {
            name: len({r["id"] for r in b} - received_ids()) for name, b in batches.items()
        }
        assert pub.wait_until(lambda p: p.outbox_depth == 0, 5)
    finally:
        sub.close()

    validator = jsonschema.Draft202012Validator(load_schema())
    by_id: dict[str, list[dict]] = {}
    for m in sub.on_topic(topic):
        record = json.loads(m.payload)
        validator.validate(record)
        by_id.setdefault(record["id"], []).append(record)
    for name, expect_late in [("before", False), ("in_flight", True), ("while_down", True), ("after", False)]:
        for r in batches[name]:
            copies = by_id[r["id"]]  # duplicates are allowed: same id, same data
            assert all({k: v for k, v in c.items() if k not in SENT_FIELDS} == r for c in copies)
            assert copies[-1]["late"] is expect_late, (name, copies)
    stats = pub.stats()
    assert stats["connects"] == 2 and stats["late"] >= 30


# --- (c) Last Will and clean stop ------------------------------------------------------

KILLED_PUBLISHER = r"""
import sys
from station.config import MqttConfig
from station.outbox import Outbox
from station.publish import MqttPublisher

port, path = int(sys.argv[1]), sys.argv[2]
pub = MqttPublisher(MqttConfig(host="127.0.0.1", port=port, protocol=sys.argv[3]), "st-kill", Outbox(path))
pub.start()
if not pub.wait_connected(5):
    sys.exit(3)
print("connected", flush=True)
sys.stdin.read()  # until killed
"""


@pytest.mark.parametrize("protocol", ["3.1.1", "5"])
def test_last_will_offline_when_the_process_is_killed(broker, tmp_path, protocol):
    status = topics_for(mqtt_cfg(broker), "st-kill").status
    with Subscriber(broker.port, status) as sub:
        proc = subprocess.Popen(
            [sys.executable, "-c", KILLED_PUBLISHER, str(broker.port), str(tmp_path / "kill.sqlite3"), protocol],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=ROOT,
        )
        try:
            assert proc.stdout.readline().strip() == "connected"
            assert sub.wait_for(lambda m: any(json.loads(x.payload)["state"] == "online" for x in m), 5)
            proc.send_signal(signal.SIGKILL)
            proc.wait(5)
        finally:
            proc.kill()
            proc.wait(5)
        assert sub.wait_for(lambda m: json.loads(m[-1].payload)["state"] == "offline", 5)
    with Subscriber(broker.port, status) as late_joiner:  # retained for whoever comes later
        assert late_joiner.wait_for(lambda m: len(m) >= 1, 5)
    (msg,) = late_joiner.messages
    record = json.loads(msg.payload)
    assert msg.retain and msg.qos == 1
    assert record == {"schema_version": 1, "state": "offline", "station_id": "st-kill", "timestamp": record["timestamp"]}


def test_clean_stop_flushes_then_publishes_stopped(broker, outbox):
    cfg = mqtt_cfg(broker)
    topics = topics_for(cfg, STATION)
    pub = MqttPublisher(cfg, STATION, outbox)
    pub.start()
    assert pub.wait_connected(5)
    with Subscriber(broker.port, topics.result) as sub:
        for i in range(50):
            pub.publish_result(make_record(i))
        assert pub.stop(5) is True  # returns once everything was acknowledged
        assert pub.state is LinkState.STOPPED and not pub.connected and outbox.depth() == 0
        assert sub.wait_for(lambda m: len(m) >= 50, 5)
    with Subscriber(broker.port, topics.status) as late_joiner:
        assert late_joiner.wait_for(lambda m: len(m) >= 1, 5)
    (msg,) = late_joiner.messages
    assert msg.retain and json.loads(msg.payload)["state"] == "stopped"  # the will was discarded


def test_stop_while_the_broker_is_down_keeps_the_results(tmp_path, outbox):
    broker = Mosquitto(tmp_path / "never-started")  # a free port nobody listens on
    pub = MqttPublisher(mqtt_cfg(broker, reconnect_min_s=5, reconnect_max_s=5), STATION, outbox)
    pub.start()
    assert pub.wait_until(lambda p: p.state is LinkState.DISCONNECTED, 5)
    assert "cannot connect to 127.0.0.1" in pub.last_error
    pub.publish_result(make_record(0))
    t0 = time.monotonic()
    assert pub.stop(5) is False
    assert time.monotonic() - t0 < 3.0  # no flush attempt without a broker (that would wait out stop(5))
    assert outbox.depth() == 1 and pub.state is LinkState.STOPPED


# --- (f, g) credentials ---------------------------------------------------------------


@pytest.fixture
def auth_broker(tmp_path):
    pwfile = write_password_file(tmp_path / "passwd", {"station": PASSWORD})
    with Mosquitto(tmp_path / "auth-broker", listener_extra=f"password_file {pwfile}\nallow_anonymous false") as b:
        yield b


def test_a_result_stored_while_the_broker_refuses_the_connection_waits_in_the_outbox(outbox, caplog):
    """A refused CONNACK sets the session's connack as an accepted one does: a result stored
    in that moment is not sent from the caller's thread (the connection has no connected_at
    and no client to send on), nothing is logged as an error, and it waits in the outbox."""
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.reasoncodes import ReasonCode

    from station.publish import _Session

    pub = MqttPublisher(MqttConfig(host="127.0.0.1", port=1), STATION, outbox)  # never started
    refused = _Session(pub.link, 10)
    refused.refused = ReasonCode(PacketTypes.CONNACK, "Bad user name or password")
    refused.connack.set()
    pub.link._session = refused
    assert not refused.accepted
    with caplog.at_level(logging.ERROR, logger="station.publish"):
        pub.publish_result(make_record(0))
    assert [r for r in caplog.records if r.levelno >= logging.ERROR] == []
    assert outbox.depth() == 1 and refused.cursor == 0


@pytest.mark.parametrize("protocol", ["3.1.1", "5"])
def test_bad_password_is_reported_without_a_tight_loop(auth_broker, outbox, publishers, tmp_path, protocol, caplog):
    wrong = tmp_path / "wrong.pw"
    wrong.write_text("not-the-password\n")
    cfg = mqtt_cfg(
        auth_broker, protocol=protocol, reconnect_min_s=0.05, reconnect_max_s=3.0,
        auth=MqttAuthConfig(username="station", password_file=wrong),
    )
    pub = publishers(cfg, outbox)
    pub.publish_result(make_record(0))
    assert pub.wait_until(lambda p: p.state is LinkState.AUTH_FAILED, 5), pub.stats()
    assert "refused the credentials" in pub.last_error and "'station'" in pub.last_error
    assert "check mqtt.auth" in pub.last_error
    assert 2.0 <= pub.stats()["retry_in_s"] <= 3.0  # the slow retry, not the 0.05 s backoff floor
    # With the 0.05 s floor a tight loop would make ~20 attempts in this second.
    assert not pub.wait_until(lambda p: p.stats()["connect_attempts"] > 1, 1.0)
    assert outbox.depth() == 1  # nothing lost while refused
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR and r.name == "station.publish"]
    assert len(errors) == 1 and "refused the credentials" in errors[0].getMessage()


@pytest.mark.parametrize("source", ["file", "env"])
def test_password_never_appears_in_logs(auth_broker, outbox, publishers, tmp_path, monkeypatch, caplog, source):
    caplog.set_level(logging.DEBUG)  # paho's packet log included
    if source == "file":
        pw = tmp_path / "mqtt.pw"
        pw.write_text(PASSWORD + "\n")
        auth = MqttAuthConfig(username="station", password_file=pw)
    else:
        monkeypatch.setenv("STATION_MQTT_PASSWORD", PASSWORD)
        auth = MqttAuthConfig(username="station", password_env="STATION_MQTT_PASSWORD")
    cfg = mqtt_cfg(auth_broker, auth=auth)
    topics = topics_for(cfg, STATION)
    with Subscriber(auth_broker.port, topics.result, username="station", password=PASSWORD) as sub:
        pub = publishers(cfg, outbox)
        assert pub.wait_connected(5), pub.stats()
        pub.publish_result(make_record(0))
        assert sub.wait_for(lambda m: len(m) >= 1, 5)
        assert pub.stop(2)
    logging.getLogger("test").info("config %r publisher %r stats %s", cfg, pub, pub.stats())
    assert "Sending CONNECT" in caplog.text  # the CONNECT packet really was logged
    assert PASSWORD not in caplog.text
    for record in caplog.records:
        assert PASSWORD not in str(record.args)
    assert PASSWORD not in repr(cfg) and PASSWORD not in cfg.model_dump_json()


def test_missing_password_source_names_the_field(tmp_path, outbox, monkeypatch):
    monkeypatch.delenv("NO_SUCH_PW", raising=False)
    cfg = MqttConfig(host="127.0.0.1", auth=MqttAuthConfig(username="u", password_env="NO_SUCH_PW"))
    with pytest.raises(ConfigError, match="mqtt.auth.password_env: environment variable NO_SUCH_PW is not set"):
        MqttPublisher(cfg, STATION, outbox)
    cfg = MqttConfig(host="127.0.0.1", auth=MqttAuthConfig(username="u", password_file=tmp_path / "absent.pw"))
    with pytest.raises(ConfigError, match="mqtt.auth.password_file: .*absent.pw: cannot read"):
        MqttPublisher(cfg, STATION, outbox)


# --- TLS ---------------------------------------------------------------------------


@pytest.fixture
def pki(tmp_path):
    """A throw-away CA, a server certificate for 127.0.0.1 and a client certificate (tests/certs.py)."""
    if not have_openssl():
        pytest.skip("openssl is not installed")
    return make_pki(tmp_path / "pki")


def test_mutual_tls(pki, tmp_path, outbox, publishers):
    with Mosquitto(tmp_path / "tls-broker", listener_extra=tls_listener(pki, require_certificate=True)) as broker:
        cfg = parse_config(
            f"mqtt:\n  host: 127.0.0.1\n  port: {broker.port}\n  reconnect_min_s: 0.1\n  reconnect_max_s: 0.5\n"
            "  tls:\n    ca_file: pki/ca.crt\n    cert_file: pki/client.crt\n    key_file: pki/client.key\n",
            "station.yaml",
        ).mqtt.with_base_dir(tmp_path)
        assert cfg.tls.ca_file == tmp_path / "pki" / "ca.crt"
        pub = publishers(cfg, outbox)
        assert pub.wait_connected(5), pub.stats()
        assert nodelay(pub)  # set on the TCP socket under TLS as well
        pub.publish_result(make_record(0))
        assert pub.wait_until(lambda p: p.outbox_depth == 0, 5)

        # without a client certificate the broker refuses the handshake: reported, retried
        no_cert = MqttConfig(host="127.0.0.1", port=broker.port, tls=MqttTlsConfig(ca_file=cfg.tls.ca_file),
                             reconnect_min_s=5, reconnect_max_s=5)
        with Outbox(tmp_path / "other.sqlite3") as other:
            refused = publishers(no_cert, other)
            assert refused.wait_until(lambda p: p.state is LinkState.DISCONNECTED, 5)
            assert refused.last_error


def test_unreadable_tls_files_are_config_errors(tmp_path, outbox):
    cfg = MqttConfig(host="127.0.0.1", tls=MqttTlsConfig(ca_file=tmp_path / "absent-ca.crt"))
    assert cfg.effective_port == 8883
    with pytest.raises(ConfigError, match="mqtt.tls:"):
        MqttPublisher(cfg, STATION, outbox)


# --- (f) subscriptions: the retained flag, persistent sessions ---------------------------


class _Inbox:
    """What a subscription's callback got: (payload, retained), in order."""

    def __init__(self) -> None:
        self.got: list[tuple[bytes, bool]] = []
        self._cond = threading.Condition()

    def __call__(self, topic: str, payload: bytes, retained: bool) -> None:
        with self._cond:
            self.got.append((payload, retained))
            self._cond.notify_all()

    def wait_for(self, payload: bytes, timeout: float) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: any(p == payload for p, _ in self.got), timeout)


def _subscribed(pub: MqttPublisher, inbox: _Inbox, broker: Mosquitto, topic: str, probe: bytes) -> None:
    """Until the broker has the subscription: a probe sent until it arrives (SUBACK is not reported)."""
    assert pub.wait_connected(5), pub.stats()
    with Subscriber(broker.port, "unused/#") as sender:
        for _ in range(50):
            sender.client.publish(topic, probe, qos=1)
            if inbox.wait_for(probe, 0.2):
                return
    raise AssertionError(f"{probe!r} never arrived on {topic}")


def test_a_subscription_says_whether_the_message_was_retained(broker, outbox, publishers):
    cfg = mqtt_cfg(broker)
    topic = f"{topics_for(cfg, STATION).prefix}/trigger"
    with Subscriber(broker.port, "unused/#") as sender:
        sender.client.publish(topic, b"KEPT", qos=1, retain=True).wait_for_publish(5)
    inbox = _Inbox()
    pub = MqttPublisher(cfg, STATION, outbox)
    pub.subscribe(topic, inbox)
    pub.start()
    try:
        _subscribed(pub, inbox, broker, topic, b"LIVE")
    finally:
        pub.stop(1.0)
    assert (b"KEPT", True) in inbox.got and (b"LIVE", False) in inbox.got


@pytest.mark.parametrize("protocol", ["3.1.1", "5"])
@pytest.mark.parametrize("persistent", [True, False])
def test_a_persistent_session_gets_the_messages_sent_while_stopped(broker, tmp_path, protocol, persistent):
    """mqtt.persistent_session: the broker keeps the subscription and the QoS 1 messages
    sent to it while the station is away; by default (clean session) they are gone."""
    cfg = mqtt_cfg(broker, protocol=protocol, persistent_session=persistent)
    topic = f"{topics_for(cfg, STATION).prefix}/trigger"
    for run, probe in enumerate((b"FIRST", b"SECOND")):
        inbox = _Inbox()
        with Outbox(tmp_path / "outbox.sqlite3") as box:
            pub = MqttPublisher(cfg, STATION, box)
            pub.subscribe(topic, inbox)
            pub.start()
            try:
                _subscribed(pub, inbox, broker, topic, probe)
            finally:
                assert pub.stop(2.0)
        if run == 0:  # the station is away: a QoS 1 message for it
            with Subscriber(broker.port, "unused/#") as sender:
                sender.client.publish(topic, b"WHILE-AWAY", qos=1).wait_for_publish(5)
    assert (b"WHILE-AWAY", False) in inbox.got if persistent else all(p != b"WHILE-AWAY" for p, _ in inbox.got)


def test_paho_lines_are_debug_except_a_callbacks_exception(caplog):
    """paho's log goes through a logger (formatted only when emitted, not per packet):
    its lines are DEBUG, including its "errors" about a closed socket, except the
    exception of a callback."""
    from station.publish import _PAHO_LOG

    with caplog.at_level(logging.DEBUG, logger="station.publish.paho"):
        _PAHO_LOG.log(logging.DEBUG, "Received PUBLISH (d%d, q%d)", 0, 1)
        _PAHO_LOG.log(logging.ERROR, "Client is not connected. Socket: None")
        _PAHO_LOG.log(logging.ERROR, "Caught exception in on_message: %s", ValueError("boom"))
    assert [(r.levelno, r.getMessage()) for r in caplog.records] == [
        (logging.DEBUG, "Received PUBLISH (d0, q1)"),
        (logging.DEBUG, "Client is not connected. Socket: None"),
        (logging.ERROR, "Caught exception in on_message: boom"),
    ]

"""Hostile MQTT triggers. Every trigger message yields exactly one record: a
graded result, or an error record that names why it made no part. A flood
overflows the bounded list of waiting parts cheaply and leaves the line free for
the next genuine part; a retained trigger is not a part; a persistent session
delivers the triggers sent while the station was down.

In process: the payload table and a hypothesis fuzz of ``Trigger.on_message``.
End to end: ``station run`` processes against a real Mosquitto on loopback, as in
test_daemon.py, synchronised on messages."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from mosquitto import Mosquitto, Subscriber, free_port, have_mosquitto
from daemonkit import Station
from test_daemon import PREFIX, VALIDATOR, mqtt_section, payloads

from station.config import parse_config
from station.trigger import Trigger, parse_trigger
from station.messages import dumps, error_record
from station.types import Frame

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

TOPIC = f"{PREFIX}/trigger"
RESULT = f"{PREFIX}/result"
MB = 1 << 20

# payload → what its error record's "error" says (after "trigger refused: ").
HOSTILE = [
    (b'{"part_id": 12}', "part_id is a number, not a string"),
    (b'{"part_id": 1e999}', "part_id is a number, not a string"),
    (b'{"part_id": NaN}', "part_id is a number, not a string"),
    (b'{"part_id": true}', "part_id is a boolean, not a string"),
    (b'{"part_id": null}', "part_id is null, not a string"),
    (b'{"part_id": {"id": "P-1"}}', "part_id is an object, not a string"),
    (b'{"part_id": ["P-1"]}', "part_id is a list, not a string"),
    (b'{"id": "P-1"}', "JSON without a part_id"),
    (b'{"part_id": "P-1"', "payload is not valid JSON"),
    (b'{"a":' + b"[" * 1500 + b"]" * 1500 + b"}", "payload is not valid JSON (nested too deep)"),
    (b"", "empty part id"),
    (b" \t\r\n", "empty part id"),
    (b'{"part_id": ""}', "empty part id"),
    (b"\xff\xfeP-1", "payload is not UTF-8 text"),
    (b"P" * 300, "part id too long (300 characters; trigger.max_part_id_chars is 256)"),
    (b"P" * MB, f"payload too long ({MB} bytes"),
    (b'{"part_id": "\\ud800"}', "part id with a lone surrogate"),
    (b"P-1\x00\nforged log line", "part id with control characters"),
]


def _frame() -> Frame:
    return Frame(np.zeros((4, 4), np.uint8), "test")


def _as_json(record: dict) -> dict:
    """A record the way a consumer gets it: UTF-8 JSON, parsed back."""
    return json.loads(dumps(record).encode("utf-8").decode("utf-8"))


# --- in process ------------------------------------------------------------------------


@pytest.mark.parametrize(("payload", "why"), HOSTILE)
def test_a_hostile_payload_names_no_part_and_says_why(payload, why):
    part, reason = parse_trigger(payload, 256)
    assert part is None and reason is not None and why in reason
    assert len(reason) < 300  # quotes at most the payload's start, never a megabyte
    assert "None" not in reason and "True" not in reason and "inf" not in reason


@pytest.mark.parametrize(("payload", "part"), [
    (b"P-1", "P-1"), (b"  P-1\r\n", "P-1"), (b'{"part_id": "P-2", "line": 3}', "P-2"),
    ("Teil-Ü€😀".encode(), "Teil-Ü€😀"), (b"P" * 256, "P" * 256), (b"null", "null"), (b"[1]", "[1]"),
])
def test_a_string_part_id_is_taken_as_it_is(payload, part):
    assert parse_trigger(payload, 256) == (part, None)


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=40),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=8,
)
PAYLOADS = st.one_of(
    st.binary(max_size=120),
    st.text(max_size=60).map(lambda s: s.encode("utf-8", "surrogatepass")),
    JSON_VALUES.map(lambda v: json.dumps({"part_id": v}).encode()),
    st.dictionaries(st.text(max_size=10), JSON_VALUES, max_size=3).map(lambda d: json.dumps(d).encode()),
    st.integers(0, 0xDFFF).map(lambda c: b'{"part_id": "P\\u%04x"}' % c),
)


@settings(max_examples=400, deadline=None)
@given(st.lists(PAYLOADS, min_size=1, max_size=8))
def test_every_payload_yields_one_part_or_one_error_record(messages):
    """Fed any bytes, the trigger holds one part or one error per message (overflow
    turns the oldest part into an error: still one each); at the stop every part left
    becomes an error; every record is valid UTF-8 JSON and a part id is text: the
    payload's own, or a JSON part_id that is a string, never another value made text."""
    cfg = parse_config("trigger: {type: mqtt, max_pending: 3, max_part_id_chars: 16, timeout_s: 3600}\n")
    trigger = Trigger(cfg)
    for i, payload in enumerate(messages, 1):
        part, _ = parse_trigger(payload, 16)
        if part is not None and payload.strip().startswith(b"{"):
            assert json.loads(payload)["part_id"] == part  # a JSON string, as it was
        trigger.on_message(TOPIC, payload)
        counts = trigger.counts()
        assert counts["accepted"] + counts["invalid"] == i
        assert min(counts["accepted"], 3) + trigger.backlog() == i
    taken = trigger.take(_frame())
    trigger.close()
    errors = trigger.errors(len(messages) + 1)
    assert len(errors) + (taken is not None) == len(messages)
    records = [error_record(e.source, e.error, 0, "cam1", e.part_id) for e in errors]
    if taken is not None:
        records.append(error_record("test", "stand-in for its graded result", 0, "cam1", taken.part_id))
    for record in records:
        back = _as_json(record)
        part = back["part_id"]
        assert part is None or (isinstance(part, str) and 0 < len(part) <= 16), back
        assert len(back["error"]) < 300


def test_a_retained_trigger_is_ignored_unless_accepted():
    ignoring = Trigger(parse_config("trigger: {type: mqtt}\n"))
    ignoring.on_message(TOPIC, b"PHANTOM", retained=True)
    assert ignoring.take(_frame()) is None and ignoring.backlog() == 0
    assert ignoring.counts()["retained"] == 1 and ignoring.counts()["accepted"] == 0
    accepting = Trigger(parse_config("trigger: {type: mqtt, accept_retained: true}\n"))
    accepting.on_message(TOPIC, b"KEPT", retained=True)
    taken = accepting.take(_frame())
    assert taken is not None and taken.part_id == "KEPT"


def test_overflow_reports_the_oldest_parts_at_once():
    trigger = Trigger(parse_config("trigger: {type: mqtt, max_pending: 2, timeout_s: 60}\n"))
    for i in range(5):
        trigger.on_message(TOPIC, f"P{i}".encode())
    errors = trigger.errors(10)
    assert [e.part_id for e in errors] == ["P0", "P1", "P2"]
    assert all(e.error.startswith("trigger overflow:") and "trigger.max_pending" in e.error for e in errors)
    assert [trigger.take(_frame()).part_id for _ in range(2)] == ["P3", "P4"]
    assert trigger.counts()["overflow"] == 3


def test_the_parts_left_at_the_stop_and_those_named_after_it_get_error_records():
    trigger = Trigger(parse_config("trigger: {type: mqtt, timeout_s: 60}\n"))
    trigger.on_message(TOPIC, b"WAITING")
    trigger.close()
    trigger.on_message(TOPIC, b"LATE")
    assert trigger.take(_frame()) is None
    errors = trigger.errors(10)
    assert [(e.part_id, "the station stopped before a frame came" in e.error) for e in errors] == [
        ("WAITING", True), ("LATE", True)]
    assert trigger.counts()["stopped"] == 2 and trigger.counts()["accepted"] == 2


def test_a_part_past_its_timeout_is_not_taken_by_a_late_frame():
    trigger = Trigger(parse_config("trigger: {type: mqtt, timeout_s: 0.001}\n"))
    trigger.on_message(TOPIC, b"SLOW")
    trigger.wait(5.0)  # returns at the part's deadline
    assert trigger.take(_frame()) is None
    errors = trigger.errors(10)
    assert [e.part_id for e in errors] == ["SLOW"] and "no frame within 0.001 s" in errors[0].error
    assert trigger.counts()["expired"] == 1


# --- end to end: station run and Mosquitto -----------------------------------------------

needs_broker = pytest.mark.skipif(not have_mosquitto(), reason="mosquitto binary not installed")


def _start(stations, workdir: Path, config: str) -> Station:
    """A `station run` that also appends every record to ``state/records.jsonl``."""
    return stations(workdir, config, "--jsonl", str(workdir / "state" / "records.jsonl"))


def _config(broker: Mosquitto, trigger: str = "", run: str = "", **mqtt) -> str:
    # Cheap frames (plates made once), so the frame source does not hold the GIL the
    # MQTT thread needs; 25 frames a second.
    return (f"station: {{id: cam1}}\n"
            f"camera: {{type: fake, fps: 25, height: 96, width: 128, distinct: 4}}\n"
            f"trigger: {{type: mqtt{', ' + trigger if trigger else ''}}}\n"
            f"run: {{stats_interval_s: 0.5{', ' + run if run else ''}}}\n" + mqtt_section(broker, **mqtt))


def _running(sub: Subscriber, station: Station, after: int = 0) -> None:
    """Until the station's first stats message after message ``after``: it is warmed up
    and subscribed ("online" comes as MQTT connects, before the trigger subscription)."""
    assert sub.wait_for(lambda msgs: any(m.topic.endswith("/stats") for m in msgs[after:]), 60), station.text()[-3000:]


@needs_broker
def test_each_hostile_trigger_yields_one_error_record_and_a_retained_one_none(tmp_path, broker, stations):
    with Subscriber(broker.port, TOPIC) as setter:  # a retained trigger left at the broker
        setter.client.publish(TOPIC, "PHANTOM", qos=1, retain=True).wait_for_publish(5)
    sub = Subscriber(broker.port, f"{PREFIX}/#").connect()
    station = _start(stations, tmp_path, _config(broker))
    try:
        _running(sub, station)
        for i, (payload, why) in enumerate([*HOSTILE, (b"GENUINE", None)], 1):
            sub.client.publish(TOPIC, payload, qos=1)
            assert sub.wait_for(lambda m, i=i: len(payloads(sub, RESULT)) >= i, 15), (payload[:40], station.text()[-3000:])
            record = payloads(sub, RESULT)[-1]
            VALIDATOR.validate(record)
            if why is None:
                assert record["part_id"] == "GENUINE" and record["grade"] in ("PASS", "DISCOUNT", "REJECT")
            else:
                assert record["part_id"] is None and record["error"].startswith("trigger refused: "), record
                assert why in record["error"], (payload[:40], record["error"])
                assert len(dumps(record)) < 1024
        assert sub.wait_for(lambda m: (payloads(sub, f"{PREFIX}/stats") or [{}])[-1].get("triggers", {})
                            .get("accepted") == 1, 5)
        station.signal(signal.SIGTERM)
        assert station.wait(20) == 0
    finally:
        sub.close()
    assert len(payloads(sub, RESULT)) == len(HOSTILE) + 1  # one each, and none for the retained PHANTOM
    triggers = payloads(sub, f"{PREFIX}/stats")[-1]["triggers"]
    assert triggers == {"accepted": 1, "invalid": len(HOSTILE), "retained": 1, "overflow": 0, "expired": 0,
                        "stopped": 0}
    assert "ignored: a retained message" in station.text()
    for m in sub.on_topic(RESULT):
        m.payload.decode("utf-8")  # strict: every record is valid UTF-8


@needs_broker
def test_a_persistent_session_delivers_a_trigger_sent_while_the_station_was_down(tmp_path, broker, stations):
    config = _config(broker, persistent_session="true")
    sub = Subscriber(broker.port, f"{PREFIX}/#").connect()
    try:
        first = _start(stations, tmp_path, config)
        _running(sub, first)
        first.signal(signal.SIGTERM)
        assert first.wait(20) == 0
        # The station is down: QoS 1, not retained. The broker keeps it for the session.
        sub.client.publish(TOPIC, "WHILE-DOWN", qos=1).wait_for_publish(5)
        seen = len(sub.messages)
        second = _start(stations, tmp_path, config)
        _running(sub, second, seen)

        def graded(msgs) -> bool:
            return any(r.get("part_id") == "WHILE-DOWN" and "grade" in r for r in payloads(sub, RESULT))

        assert sub.wait_for(graded, 20), second.text()[-3000:]
        second.signal(signal.SIGTERM)
        assert second.wait(20) == 0
    finally:
        sub.close()
    assert "new persistent session" in first.text() and "session resumed" in second.text()


def _metric(port: int, name: str) -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    return float(next(line.split()[-1] for line in text.splitlines() if line.startswith(name)))


def _flood(broker: Mosquitto, n: int, rate: float) -> float:
    """n triggers F0…F{n-1} at QoS 0 at about ``rate`` a second (mosquitto_pub reading
    lines, so the sender costs little CPU); returns the rate reached."""
    pub = subprocess.Popen(["mosquitto_pub", "-h", broker.host, "-p", str(broker.port), "-t", TOPIC, "-q", "0", "-l"],
                           stdin=subprocess.PIPE)
    assert pub.stdin is not None
    t0, chunk = time.monotonic(), 500
    for i in range(0, n, chunk):
        pub.stdin.write("".join(f"F{j}\n" for j in range(i, min(n, i + chunk))).encode())
        pub.stdin.flush()
        ahead = t0 + (i + chunk) / rate - time.monotonic()
        if ahead > 0:
            time.sleep(ahead)  # pacing the sender, not waiting for the daemon
    pub.stdin.close()
    assert pub.wait(30) == 0
    return n / (time.monotonic() - t0)


@needs_broker
@pytest.mark.skipif(shutil.which("mosquitto_pub") is None, reason="mosquitto_pub not installed")
def test_a_flood_overflows_and_the_next_genuine_trigger_is_graded(tmp_path, broker, stations):
    """20,000 triggers at ~10,000/s, then 1 s later a genuine one: graded (over MQTT)
    within 2 s. Every trigger the daemon received yields exactly one record."""
    n, metrics_port = 20_000, free_port()
    config = _config(broker, run="stop_timeout_s: 60") + (
        f"metrics: {{enabled: true, port: {metrics_port}}}\n")
    sub = Subscriber(broker.port, RESULT, f"{PREFIX}/status", f"{PREFIX}/stats").connect()
    station = _start(stations, tmp_path, config)
    try:
        _running(sub, station)
        rate = _flood(broker, n, 10_000)
        time.sleep(1.0)  # the scenario: the genuine trigger comes 1 s after the flood
        sent = time.monotonic()
        sub.client.publish(TOPIC, "GENUINE", qos=1)

        checked = 0

        def graded(msgs) -> bool:  # looks at each message once: thousands come meanwhile
            nonlocal checked
            new, checked = msgs[checked:], len(msgs)
            return any(m.topic == RESULT and b'"GENUINE"' in m.payload and b'"grade"' in m.payload for m in new)

        assert sub.wait_for(graded, 10), station.text()[-3000:]
        took = time.monotonic() - sent
        # The counts once the genuine trigger is in them: the next stats message (and the
        # metrics, copied from the trigger just before it) has them.
        seen = len(sub.messages)
        assert sub.wait_for(lambda msgs: any(m.topic.endswith("/stats") for m in msgs[seen:]), 10)
        counts = payloads(sub, f"{PREFIX}/stats")[-1]["triggers"]
        accepted, overflow = counts["accepted"], counts["overflow"]
        assert _metric(metrics_port, 'station_triggers_total{outcome="accepted"}') == accepted
        assert _metric(metrics_port, 'station_triggers_total{outcome="overflow"}') == overflow
        print(f"flood {n} at {rate:.0f}/s; genuine graded after {took:.2f} s; {counts}")
        # Graded at all means its frame came within trigger.timeout_s (2 s) of its arrival; the
        # 2 s on the wire is the target, printed above (docs/reliability.md), and bounded loosely
        # here: a test asserts the behaviour, not this shared host's speed.
        assert took < 5.0, f"the genuine trigger's result came {took:.2f} s after it"
        assert accepted >= 0.9 * n + 1 and overflow >= accepted - 1000
        station.signal(signal.SIGTERM)
        assert station.wait(90) == 0, station.text()[-3000:]
    finally:
        sub.close()
    # Stopped: every part is in the JSONL copy (those the broker had not yet been sent
    # wait in the outbox), once each.
    records = [json.loads(line) for line in (tmp_path / "state" / "records.jsonl").read_text("utf-8").splitlines()]
    parts = [r["part_id"] for r in records]
    assert len(parts) == len(set(parts)) == accepted
    errors = [r["error"] for r in records if "error" in r]
    assert sum(e.startswith("trigger overflow:") for e in errors) == overflow
    assert len(records) - len(errors) >= 1

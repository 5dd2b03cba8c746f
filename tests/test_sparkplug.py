"""The Sparkplug B edge node against a real Mosquitto on a free loopback port.

Every message is decoded here by a protobuf wire-format reader of its own, keyed by the
field numbers of the Sparkplug B specification (Payload: timestamp 1, metrics 2, seq 3;
Metric: name 1, timestamp 3, datatype 4, is_historical 5, is_null 7, values 10–15), not
by the generated code the node encodes with: births with their bdSeq, the Last Will,
one DDATA per part with seq wrapping after 255, historical parts, rebirth on NCMD, the
clean stop, bdSeq across restarts and reconnects.

Every wait is on a broker message, a node state or a process; none is a fixed sleep.
"""

from __future__ import annotations

import json
import os
import signal
import struct
import subprocess
import sys
import time
import uuid
from datetime import datetime
from pathlib import Path
from typing import Any, Callable

import jsonschema
import numpy as np
import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from inprocess import Running
from mosquitto import Mosquitto, Received, Subscriber, have_mosquitto, write_password_file
from station.config import MqttAuthConfig, SparkplugConfig, load_config, parse_config
from station.errors import ConfigError
from station.messages import error_record, load_schema, result_record
from station.outbox import Outbox
from station.publish import store_record
from station.sinks import Delivery
from station.sparkplug import BdSeqFile, SparkplugNode, SparkplugSink, state_path
from station.types import Defects, Grade, GradeDecision, InspectionResult

pytestmark = pytest.mark.skipif(not have_mosquitto(), reason="mosquitto is not installed")

ROOT = Path(__file__).resolve().parent.parent
STATION = "st-spb"
GROUP, NODE, DEVICE = "plant", "node-1", "cam"
PREFIX = f"spBv1.0/{GROUP}"
NBIRTH, NDEATH, NCMD = (f"{PREFIX}/{v}/{NODE}" for v in ("NBIRTH", "NDEATH", "NCMD"))
DBIRTH, DDATA, DDEATH = (f"{PREFIX}/{v}/{NODE}/{DEVICE}" for v in ("DBIRTH", "DDATA", "DDEATH"))
# Sparkplug data types (specification, "Data Types")
INT32, INT64, UINT32, UINT64, DOUBLE, BOOLEAN, STRING, DATETIME = 3, 4, 7, 8, 10, 11, 12, 13


# --- an independent Sparkplug B decoder (protobuf wire format) -------------------------------


def _varint(buf: bytes, i: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        b = buf[i]
        i += 1
        value |= (b & 0x7F) << shift
        shift += 7
        if not b & 0x80:
            return value, i


def _fields(buf: bytes):
    """(field number, wire type, value): an int for varint and fixed, bytes for length-delimited."""
    i = 0
    while i < len(buf):
        key, i = _varint(buf, i)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, i = _varint(buf, i)
        elif wire == 1:
            value, i = buf[i:i + 8], i + 8
        elif wire == 2:
            n, i = _varint(buf, i)
            value, i = buf[i:i + n], i + n
        elif wire == 5:
            value, i = buf[i:i + 4], i + 4
        else:
            raise ValueError(f"wire type {wire}")
        yield number, wire, value


def decode_metric(buf: bytes) -> dict:
    m: dict[str, Any] = {"datatype": None, "is_historical": False, "is_null": False, "value": None}
    for number, _, value in _fields(buf):
        if number == 1:
            m["name"] = value.decode()
        elif number == 3:
            m["timestamp"] = value
        elif number == 4:
            m["datatype"] = value
        elif number == 5:
            m["is_historical"] = bool(value)
        elif number == 7:
            m["is_null"] = bool(value)
        elif number in (10, 11):  # int_value (uint32), long_value (uint64)
            m["value"] = value
        elif number == 12:
            m["value"] = struct.unpack("<f", value)[0]
        elif number == 13:
            m["value"] = struct.unpack("<d", value)[0]
        elif number == 14:
            m["value"] = bool(value)
        elif number == 15:
            m["value"] = value.decode()
    return m


def decode(buf: bytes) -> dict:
    """A Sparkplug B Payload: {"timestamp", "seq" (None when absent), "metrics": [...]}."""
    p: dict[str, Any] = {"timestamp": None, "seq": None, "metrics": []}
    for number, _, value in _fields(buf):
        if number == 1:
            p["timestamp"] = value
        elif number == 2:
            p["metrics"].append(decode_metric(value))
        elif number == 3:
            p["seq"] = value
    return p


def _key(number: int, wire: int) -> bytes:
    return bytes([number << 3 | wire])


def _uvarint(value: int) -> bytes:
    out = bytearray()
    while True:
        b, value = value & 0x7F, value >> 7
        out.append(b | (0x80 if value else 0))
        if not value:
            return bytes(out)


def rebirth_command() -> bytes:
    """An NCMD payload as a host sends it: Node Control/Rebirth = true."""
    name = b"Node Control/Rebirth"
    metric = (_key(1, 2) + _uvarint(len(name)) + name + _key(3, 0) + _uvarint(int(time.time() * 1000))
              + _key(4, 0) + _uvarint(BOOLEAN) + _key(14, 0) + _uvarint(1))
    return _key(1, 0) + _uvarint(int(time.time() * 1000)) + _key(2, 2) + _uvarint(len(metric)) + metric


def metrics(payload: dict) -> dict[str, dict]:
    return {m["name"]: m for m in payload["metrics"]}


# --- helpers -------------------------------------------------------------------------------


def make_record(i: int, grade: Grade = Grade.PASS, captured_at: float | None = None) -> dict:
    """A result record built the daemon's way: InspectionResult → messages.result_record."""
    defects = Defects(
        xyxy=np.array([[10, 20, 30, 44], [1, 2, 3, 4]], np.float32),
        confidence=np.array([0.9, 0.8], np.float32),
        class_name=np.array(["scratch", "dent"]),
        area_px=np.array([480.0, 4.0]),
        kind=np.array(["detection", "detection"]),
    )
    return result_record(InspectionResult(
        id=uuid.uuid4().hex, station_id=STATION, source="camera:line3", seq=i, part_id=f"P{i:05d}",
        captured_at=time.time() if captured_at is None else captured_at, width=640, height=480,
        decision=GradeDecision(grade, "total_area_pct", "why"), defects=defects, defect_area_px=484.0,
        defect_area_pct=0.1576, models={"detection": "ab" * 32}, latency_ms={"total": 6.0},
    ))


def spb_cfg(port: int, **kw) -> SparkplugConfig:
    base: dict[str, Any] = dict(group_id=GROUP, edge_node_id=NODE, device_id=DEVICE, host="127.0.0.1", port=port,
                                connect_timeout_s=2.0, reconnect_min_s=0.05, reconnect_max_s=0.2, send_timeout_s=2.0)
    base.update(kw)
    return SparkplugConfig(**base)


def on(sub: Subscriber, topic: str) -> list[dict]:
    return [decode(m.payload) for m in sub.on_topic(topic)]


def node_messages(sub: Subscriber) -> list[Received]:
    """What the node published (everything but the test's own commands), in the order received."""
    with sub._cond:
        return [m for m in sub.messages if "/NCMD/" not in m.topic and "/DCMD/" not in m.topic]


def wait_count(sub: Subscriber, topic: str, n: int, timeout: float = 10.0) -> list[dict]:
    assert sub.wait_for(lambda msgs: sum(m.topic == topic for m in msgs) >= n, timeout), \
        f"{n} × {topic} not received: {[m.topic for m in sub.messages]}"
    return on(sub, topic)


def wait_until(pred: Callable[[], bool], timeout: float = 10.0) -> None:
    """For states that have no event to wait on from outside the node (a lost connection)."""
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.01)


def command(port: int, topic: str, payload: bytes) -> None:
    """Publish one command (QoS 0, as hosts do) and wait until it was written."""
    c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"host-{uuid.uuid4().hex[:6]}", protocol=mqtt.MQTTv311)
    c.connect("127.0.0.1", port)
    c.loop_start()
    try:
        c.publish(topic, payload, qos=1).wait_for_publish(5)
    finally:
        c.disconnect()
        c.loop_stop()


def check_payload_rules(msg: Received) -> dict:
    """What every message of the node obeys: QoS 0 and not retained (the NDEATH: QoS 1),
    a payload timestamp, a timestamp on every metric, a datatype only in births."""
    p = decode(msg.payload)
    assert not msg.retain, msg.topic
    assert msg.qos == (1 if "/NDEATH/" in msg.topic else 0), msg.topic
    assert p["timestamp"] and abs(p["timestamp"] / 1000 - time.time()) < 60
    birth = "BIRTH" in msg.topic or "/NDEATH/" in msg.topic
    for m in p["metrics"]:
        assert m["timestamp"], m
        assert (m["datatype"] is not None) == birth, m
    return p


def check_seqs(sub: Subscriber) -> list[int]:
    """Within a session every message but NDEATH has seq = previous + 1 mod 256; NBIRTH has 0."""
    seqs = []
    for msg in node_messages(sub):
        p = decode(msg.payload)
        if "/NDEATH/" in msg.topic:
            assert p["seq"] is None
            continue
        if "/NBIRTH/" in msg.topic:
            assert p["seq"] == 0
        else:
            assert seqs and p["seq"] == (seqs[-1] + 1) % 256, (msg.topic, p["seq"], seqs[-3:])
        seqs.append(p["seq"])
    return seqs


@pytest.fixture
def nodes():
    made: list[SparkplugNode | SparkplugSink] = []
    yield made
    for n in made:
        n.close(2.0)


# --- a session: births, parts, historical, camera, rebirth, clean stop -------------------------


@pytest.mark.parametrize("protocol", ["3.1.1", "5"])
def test_session(broker, tmp_path, nodes, protocol):
    schema = load_schema()
    with Subscriber(broker.port, "spBv1.0/#") as sub:
        node = SparkplugNode(spb_cfg(broker.port, protocol=protocol), STATION, tmp_path)
        nodes.append(node)
        node.start()
        assert node.wait_online(5)
        nbirth = check_payload_rules(sub.on_topic(NBIRTH)[0]) if wait_count(sub, DBIRTH, 1) else None
        assert nbirth is not None and nbirth["seq"] == 0
        n = metrics(nbirth)
        assert n["bdSeq"]["datatype"] == INT64 and n["bdSeq"]["value"] == 0  # first connection, no state file yet
        assert n["Node Control/Rebirth"]["datatype"] == BOOLEAN and n["Node Control/Rebirth"]["value"] is False
        assert n["Node Info/Station Id"]["value"] == STATION
        dbirth = check_payload_rules(sub.on_topic(DBIRTH)[0])
        assert dbirth["seq"] == 1
        d = metrics(dbirth)
        assert d["Inspection/Part Id"]["datatype"] == STRING and d["Inspection/Part Id"]["is_null"]
        assert d["Inspection/Grade Code"]["datatype"] == INT32
        assert d["Inspection/Defect Area %"]["datatype"] == DOUBLE
        assert d["Inspection/Captured At"]["datatype"] == DATETIME
        assert d["Inspection/Defect Count"]["datatype"] == UINT32
        assert {k: (v["datatype"], v["value"]) for k, v in d.items() if k.startswith("Counts/")} == \
            {f"Counts/{g}": (UINT64, 0) for g in ("PASS", "DISCOUNT", "REJECT", "Error")}
        assert d["Camera/State"]["is_null"]
        assert json.loads((tmp_path / "sparkplug.json").read_text()) == {"bdSeq": 0}

        # 300 parts: the seq runs 2..255, 0..45 (NBIRTH 0 and DBIRTH 1 came first)
        grades = [Grade.PASS, Grade.DISCOUNT, Grade.REJECT]
        records = [make_record(i, grades[i % 3]) for i in range(299)]
        records.append(error_record("camera:line3", "frame lost", 299, STATION, "P00299"))
        for r in records[:3] + records[-1:]:  # the records are the daemon's (one of each kind checked)
            jsonschema.validate(r, schema)
        for r in records:
            assert node.publish_parts([(r, time.time())])
        ddata = wait_count(sub, DDATA, 300)
        assert [p["seq"] for p in ddata] == [(2 + i) % 256 for i in range(300)]
        for r, msg in zip(records, sub.on_topic(DDATA)):
            m = metrics(check_payload_rules(msg))
            assert m["Inspection/Record Id"]["value"] == r["id"]
            assert m["Inspection/Part Id"]["value"] == r["part_id"]
            assert m["Inspection/Sequence"]["value"] == r["seq"]
            assert not any(v["is_historical"] for v in m.values())
            if "error" in r:
                assert m["Inspection/Grade"]["is_null"] and m["Inspection/Grade Code"]["is_null"]
                assert m["Inspection/Error"]["value"] == "frame lost"
                assert m["Counts/Error"]["value"] == 1
            else:
                captured = round(datetime.fromisoformat(r["captured_at"].replace("Z", "+00:00")).timestamp() * 1000)
                assert m["Inspection/Captured At"]["value"] == captured == m["Inspection/Grade"]["timestamp"]
                assert m["Inspection/Grade"]["value"] == r["grade"]
                assert m["Inspection/Grade Code"]["value"] == {"PASS": 0, "DISCOUNT": 1, "REJECT": 2}[r["grade"]]
                assert m["Inspection/Defect Area %"]["value"] == pytest.approx(r["defect_area_pct"])
                assert m["Inspection/Defect Count"]["value"] == 2
                assert m["Inspection/Error"]["is_null"]
                assert m[f"Counts/{r['grade']}"]["value"] == records.index(r) // 3 + 1
        assert node.state()["counts"] == {"PASS": 100, "DISCOUNT": 100, "REJECT": 99, "Error": 1}

        # a part sent late: every Inspection metric historical, with its own (old) capture time
        old = make_record(1000, Grade.REJECT, captured_at=time.time() - 3600)
        assert node.publish_parts([(old, 0.0)])  # stored before the births: late
        late = metrics(wait_count(sub, DDATA, 301)[-1])
        assert all(v["is_historical"] for k, v in late.items() if k.startswith("Inspection/"))
        assert late["Inspection/Part Id"]["value"] == "P01000"
        assert late["Inspection/Grade"]["timestamp"] < (time.time() - 3000) * 1000
        assert not late["Counts/REJECT"]["is_historical"] and late["Counts/REJECT"]["value"] == 100

        node.set_camera_state("connected")
        assert metrics(wait_count(sub, DDATA, 302)[-1]) .keys() == {"Camera/State"}

        # garbage and unknown commands are ignored; a rebirth repeats the births, same bdSeq
        command(broker.port, NCMD, b"\xff\xff not protobuf")
        command(broker.port, f"{PREFIX}/DCMD/{NODE}/{DEVICE}", rebirth_command())
        command(broker.port, NCMD, rebirth_command())
        wait_count(sub, DBIRTH, 2)
        nb2, db2 = on(sub, NBIRTH)[1], on(sub, DBIRTH)[1]
        assert nb2["seq"] == 0 and db2["seq"] == 1 and metrics(nb2)["bdSeq"]["value"] == 0
        d2 = metrics(db2)
        assert d2["Inspection/Part Id"]["value"] == "P00299"  # the last live part, not the historical one
        assert d2["Inspection/Error"]["value"] == "frame lost"
        assert d2["Counts/REJECT"]["value"] == 100 and d2["Counts/PASS"]["value"] == 100
        assert d2["Camera/State"]["value"] == "connected"
        assert node.state()["bad_commands"] == 1 and node.state()["rebirths"] == 1

        assert node.publish_parts([(make_record(2000), time.time())])
        assert wait_count(sub, DDATA, 303)[-1]["seq"] == 2

        node.close()
        ndeath = check_payload_rules(sub.on_topic(NDEATH)[0]) if wait_count(sub, NDEATH, 1) else None
        assert ndeath is not None and ndeath["seq"] is None
        assert [(m["name"], m["datatype"], m["value"]) for m in ndeath["metrics"]] == [("bdSeq", INT64, 0)]
        assert on(sub, DDEATH)[0]["seq"] == 3
        topics = [m.topic for m in node_messages(sub)]
        assert topics[-2:] == [DDEATH, NDEATH]
        check_seqs(sub)
        state = node.state()
        assert state["state"] == "stopped" and not state["online"] and state["ddata_sent"] == 302
        assert not node.publish_parts([(make_record(3000), time.time())], timeout=0.1)


# --- the Last Will, and bdSeq across restarts --------------------------------------------------

NODE_PROCESS = """
import sys
from station.config import SparkplugConfig
from station.sparkplug import SparkplugNode
node = SparkplugNode(SparkplugConfig.model_validate_json(sys.argv[1]), "st-spb", sys.argv[2])
node.start()
assert node.wait_online(10)
print("online", flush=True)
sys.stdin.read()  # until the test closes stdin (or kills the process)
node.close()
"""


def start_node_process(cfg: SparkplugConfig, state_dir: Path) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", NODE_PROCESS, cfg.model_dump_json(), str(state_dir)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, cwd=ROOT,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.stdout is not None and proc.stdout.readline() == b"online\n"
    return proc


def test_last_will_and_bdseq_across_restarts(broker, tmp_path):
    cfg = spb_cfg(broker.port, keepalive_s=5)
    with Subscriber(broker.port, "spBv1.0/#") as sub:
        proc = start_node_process(cfg, tmp_path)
        wait_count(sub, DBIRTH, 1)
        os.kill(proc.pid, signal.SIGKILL)  # no DDEATH, no NDEATH of its own: the broker's Will says it
        proc.wait(5)
        will = sub.on_topic(NDEATH)[0] if wait_count(sub, NDEATH, 1) else None
        assert will is not None
        p = check_payload_rules(will)
        assert p["seq"] is None and [(m["name"], m["value"]) for m in p["metrics"]] == [("bdSeq", 0)]
        assert metrics(on(sub, NBIRTH)[0])["bdSeq"]["value"] == 0
        assert sub.on_topic(DDEATH) == []

        proc = start_node_process(cfg, tmp_path)  # the restart goes on from the kept bdSeq
        births = wait_count(sub, NBIRTH, 2)
        assert metrics(births[1])["bdSeq"]["value"] == 1
        assert proc.stdin is not None
        proc.stdin.close()  # the clean stop
        assert proc.wait(10) == 0
        deaths = wait_count(sub, NDEATH, 2)
        assert metrics(deaths[1])["bdSeq"]["value"] == 1
        assert len(on(sub, DDEATH)) == 1
        check_seqs(sub)
    assert json.loads((tmp_path / "sparkplug.json").read_text()) == {"bdSeq": 1}


# --- the sink: fed from the outbox, across broker outages and restarts ---------------------------


def stored(box: Outbox, sink: SparkplugSink, record: dict) -> int:
    """Store ``record`` as the daemon's outbox sink does and tell ``sink`` of it."""
    seq = store_record(box, record, "")
    sink.deliver(record, Delivery(None, seq=seq))
    return seq


def part_ids(payloads: list[dict]) -> list[str]:
    return [metrics(p)["Inspection/Part Id"]["value"] for p in payloads]


def all_historical(payload: dict) -> bool:
    return all(m["is_historical"] for m in payload["metrics"] if m["name"].startswith("Inspection/"))


def test_sink_sends_what_waited_as_historical_across_an_outage_and_a_restart(tmp_path, nodes, monkeypatch):
    """The node is kept out by its credentials (deterministic: it cannot be online) while
    parts arrive, and the station restarted meanwhile; then let in: the births, then
    those parts, historical, then live ones. The broker is then killed and restarted:
    the new session's bdSeq is one more, and the part stored meanwhile comes after its
    births, historical. Every part once, none lost."""
    pwfile = tmp_path / "passwd"
    monkeypatch.setenv("SPB_TEST_PASSWORD", "node-pw")

    def users(node_password: str) -> None:
        write_password_file(pwfile, {"node": node_password, "sub": "sub-pw"})

    users("not-yet")
    outbox = tmp_path / "outbox.sqlite3"
    with Mosquitto(tmp_path / "broker", listener_extra=f"password_file {pwfile}\nallow_anonymous false") as broker:
        cfg = spb_cfg(broker.port, auth=MqttAuthConfig(username="node", password_env="SPB_TEST_PASSWORD"))
        with Subscriber(broker.port, "spBv1.0/#", username="sub", password="sub-pw") as sub:
            with Outbox(outbox, sinks=("sparkplug",)) as box:  # the first run: nothing gets through
                sink = SparkplugSink(cfg, STATION, box, tmp_path)
                sink.start()
                wait_until(lambda: sink.state()["state"] == "auth_failed")
                for r in [make_record(i) for i in range(2)]:
                    stored(box, sink, r)
                assert sink.state()["waiting"] == 2
                sink.close()
            box = Outbox(outbox, sinks=("sparkplug",))  # the station restarted
            sink = SparkplugSink(cfg, STATION, box, tmp_path)
            nodes.append(sink)
            sink.start()
            stored(box, sink, make_record(2))
            assert sink.state()["waiting"] == 3 and sub.on_topic(NBIRTH) == []

            users("node-pw")
            assert broker.proc is not None
            broker.proc.send_signal(signal.SIGHUP)  # mosquitto reloads its password file
            ddata = wait_count(sub, DDATA, 3)
            assert part_ids(ddata) == ["P00000", "P00001", "P00002"] and all(map(all_historical, ddata))
            bd1 = metrics(on(sub, NBIRTH)[0])["bdSeq"]["value"]
            assert [m.topic for m in node_messages(sub)][:2] == [NBIRTH, DBIRTH]
            wait_until(lambda: box.depth("sparkplug") == 0)  # confirmed, then acknowledged

            stored(box, sink, make_record(3))
            p = wait_count(sub, DDATA, 4)[-1]
            assert part_ids([p]) == ["P00003"] and not any(m["is_historical"] for m in p["metrics"])
            check_seqs(sub)
            wait_until(lambda: box.depth("sparkplug") == 0)  # else it is sent again after the outage: late

            broker.kill()
            wait_until(lambda: not sink.node.online)
            stored(box, sink, make_record(4))
            users("not-yet")  # kept out again until the subscriber is back
            broker.start()
            sub.reconnect()
            users("node-pw")
            broker.proc.send_signal(signal.SIGHUP)
            p = wait_count(sub, DDATA, 5)[-1]  # the subscriber keeps what it received before
            assert part_ids([p]) == ["P00004"] and all_historical(p)
            nb = on(sub, NBIRTH)[1]
            assert metrics(nb)["bdSeq"]["value"] > bd1  # the CONNECTs the broker refused counted too
            wait_until(lambda: box.depth("sparkplug") == 0)
            assert sink.state()["counts"]["PASS"] == 5  # those of the first run too: this run sent them
            assert part_ids(on(sub, DDATA)) == [f"P{i:05d}" for i in range(5)]

            sink.close()
            box.close()
            assert metrics(wait_count(sub, NDEATH, 1)[0])["bdSeq"]["value"] == metrics(nb)["bdSeq"]["value"]


def test_sink_waits_for_the_primary_host(tmp_path, broker, nodes):
    """sparkplug.primary_host_id: no births until the host's STATE says online; parts
    wait in the outbox meanwhile and go historical after the births; the host going
    offline ends the session (NDEATH), and it starts again once the host is back."""
    state_topic = f"spBv1.0/STATE/{HOST_ID}"
    with Subscriber(broker.port, "spBv1.0/#") as sub, Outbox(tmp_path / "outbox.sqlite3", sinks=("sparkplug",)) as box:
        sink = SparkplugSink(spb_cfg(broker.port, primary_host_id=HOST_ID), STATION, box, tmp_path)
        nodes.append(sink)
        sink.start()
        wait_until(lambda: sink.state()["state"] == "waiting_host")
        stored(box, sink, make_record(0))
        host_state(broker.port, state_topic, True, 1000)
        ddata = wait_count(sub, DDATA, 1)
        assert part_ids(ddata) == ["P00000"] and all_historical(ddata[0])
        assert [m.topic for m in node_messages(sub) if "STATE" not in m.topic][:2] == [NBIRTH, DBIRTH]
        assert sink.state()["primary_host"] == {"id": HOST_ID, "online": True}

        host_state(broker.port, state_topic, False, 500)  # older than the last: ignored
        stored(box, sink, make_record(1))
        assert part_ids(wait_count(sub, DDATA, 2))[-1] == "P00001"
        host_state(broker.port, state_topic, False, 2000)
        wait_count(sub, NDEATH, 1)
        wait_until(lambda: sink.state()["state"] == "waiting_host")
        stored(box, sink, make_record(2))
        host_state(broker.port, state_topic, True, 3000)
        wait_count(sub, NBIRTH, 2)
        p = wait_count(sub, DDATA, 3)[-1]
        assert part_ids([p]) == ["P00002"] and all_historical(p)


def test_parts_survive_a_broker_outage_and_a_daemon_restart(tmp_path):
    """The daemon with Sparkplug B (and no MQTT output): the broker is killed while parts
    arrive, the daemon restarted meanwhile; once the broker and the primary host are back
    (the host waited for, so that the test's subscriber is there first), every part of
    both runs reaches SCADA, those stored meanwhile historical, none lost."""
    with Mosquitto(tmp_path / "broker") as broker:
        state_topic = f"spBv1.0/STATE/{HOST_ID}"
        text = (f"station: {{id: {STATION}}}\ncamera: {{type: fake, fps: 20, height: 64, width: 64}}\n"
                f"run: {{state_dir: {tmp_path / 'state'}, stop_timeout_s: 5}}\n"
                f"sparkplug: {{group_id: {GROUP}, edge_node_id: {NODE}, device_id: {DEVICE}, host: 127.0.0.1, "
                f"port: {broker.port}, reconnect_min_s: 0.05, reconnect_max_s: 0.2, primary_host_id: {HOST_ID}}}\n")
        cfg = parse_config(text)
        with Subscriber(broker.port, "spBv1.0/#") as sub:
            host_state(broker.port, state_topic, True, 1)
            first = Running(cfg)
            try:
                first.sink.wait(2)
                wait_count(sub, DDATA, 2)
                broker.kill()  # its retained STATE goes with it: the node waits for the host again
                first.sink.wait(len(first.sink.records) + 4)
            finally:
                first.stop()
            second = Running(cfg)
            try:
                second.sink.wait(3)
                broker.start()
                sub.reconnect()
                host_state(broker.port, state_topic, True, 2)
                ids = [r["id"] for r in first.sink.records + second.sink.records]
                assert sub.wait_for(lambda msgs: set(ids) <= received_ids(sub), 30), ids
                stats = second.daemon.stats_payload()["sinks"]["sparkplug"]
                assert stats["state"] == "online"
            finally:
                second.stop()
            ids = [r["id"] for r in first.sink.records + second.sink.records]
            assert set(ids) <= received_ids(sub)
            late = [metrics(p)["Inspection/Record Id"]["value"] for p in on(sub, DDATA)
                    if "Inspection/Record Id" in metrics(p) and all_historical(p)]
            assert set(r["id"] for r in second.sink.records[:3]) <= set(late)  # stored while the broker was away
    with Outbox(tmp_path / "state" / "outbox.sqlite3", sinks=("sparkplug",)) as box:
        assert box.depth() == 0


def received_ids(sub: Subscriber) -> set[str]:
    return {metrics(p)["Inspection/Record Id"]["value"] for p in on(sub, DDATA) if "Inspection/Record Id" in metrics(p)}


HOST_ID = "scada-1"


def host_state(port: int, topic: str, online: bool, timestamp: int) -> None:
    """The primary host's STATE, retained at QoS 1, as Sparkplug 3.0 host applications publish it."""
    c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"host-{uuid.uuid4().hex[:6]}", protocol=mqtt.MQTTv311)
    c.connect("127.0.0.1", port)
    c.loop_start()
    try:
        c.publish(topic, json.dumps({"online": online, "timestamp": timestamp}), qos=1, retain=True).wait_for_publish(5)
    finally:
        c.disconnect()
        c.loop_stop()


# --- config and state file ----------------------------------------------------------------------


def test_example_config_and_errors(tmp_path, monkeypatch):
    cfg = load_config(ROOT / "config" / "sparkplug.yaml")
    assert cfg.sparkplug is not None and cfg.sparkplug.effective_port == 1883
    assert (cfg.sparkplug.group_id, cfg.sparkplug.edge_node_id, cfg.sparkplug.device_id) == \
        ("plant-1", "line-3-cam-1", "camera")
    with pytest.raises(ConfigError, match=r"x.yaml:3: sparkplug.group_id: String should match pattern"):
        parse_config("sparkplug:\n  host: h\n  group_id: a/b\n  edge_node_id: n\n", "x.yaml")
    with pytest.raises(ConfigError, match=r"x.yaml:1: sparkplug.edge_node_id: Field required"):
        parse_config("sparkplug: {host: h, group_id: g}\n", "x.yaml")
    cfg5 = parse_config("sparkplug: {host: h, group_id: g, edge_node_id: n, protocol: 5, auth: {username: u, "
                        "password_file: pw}}\n", "x.yaml", tmp_path)
    assert cfg5.sparkplug is not None and cfg5.sparkplug.protocol == "5"
    assert cfg5.sparkplug.auth is not None and cfg5.sparkplug.auth.password_file == tmp_path / "pw"
    monkeypatch.delenv("STATE_DIRECTORY", raising=False)
    with pytest.raises(ConfigError, match="sparkplug.state_file: sparkplug.json is relative"):
        state_path(cfg.sparkplug)
    with pytest.raises(ConfigError, match=r"sparkplug.auth.password_file: .*pw: cannot read"):
        SparkplugNode(cfg5.sparkplug, STATION, tmp_path)
    with pytest.raises(ConfigError, match="sparkplug.device_id"):
        SparkplugNode(spb_cfg(1883, device_id=None), "a/b", tmp_path)


def test_bdseq_file_wraps_and_recovers(tmp_path, caplog):
    path = tmp_path / "state" / "spb.json"
    f = BdSeqFile(path)
    assert f.next() == 0 and f.next() == 1
    f.take_back()
    assert json.loads(path.read_text()) == {"bdSeq": 0} and BdSeqFile(path).next() == 1
    path.write_text('{"bdSeq": 255}')
    assert BdSeqFile(path).next() == 0
    path.write_text("{torn")
    assert BdSeqFile(path).next() == 0 and "cannot read the Sparkplug bdSeq" in caplog.text
    fresh = BdSeqFile(tmp_path / "new.json")
    fresh.next()
    fresh.take_back()
    assert not (tmp_path / "new.json").exists()

"""``station listen`` against a real Mosquitto on a free loopback port: the table
and JSONL outputs, status changes, wildcards over stations, --validate, --count,
--timeout, and the exit codes of refused connections and credentials.

The listener runs in a thread of the test process; the test waits for its
"listening on" line (printed after the broker's SUBACK) before anything is
published, and for the thread to end. No fixed sleeps.
"""

from __future__ import annotations

import argparse
import io
import json
import shutil
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import numpy as np
import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from mosquitto import Mosquitto, free_port, have_mosquitto, write_password_file
from station.config import MqttConfig, MqttTlsConfig
from station.listen import add_listen_parser, cmd_listen
from station.messages import dumps, error_record, result_record
from station.outbox import Outbox
from station.publish import MqttPublisher
from station.types import Defects, Grade, GradeDecision, InspectionResult

pytestmark = pytest.mark.skipif(not have_mosquitto(), reason="mosquitto is not installed")

ROOT = Path(__file__).resolve().parent.parent


# --- helpers -----------------------------------------------------------------------------


def make_record(i: int, station: str, grade: Grade = Grade.DISCOUNT) -> dict:
    defects = Defects(
        xyxy=np.array([[10, 20, 30, 44], [50, 50, 60, 60]], np.float32),
        confidence=np.array([0.91, 0.7], np.float32),
        class_name=np.array(["scratch", "dent"]),
        area_px=np.array([480.0, 100.0]),
        kind=np.array(["detection", "detection"]),
    )
    result = InspectionResult(
        id=uuid.uuid4().hex, station_id=station, source="camera", seq=i, part_id=f"P{i:05d}",
        captured_at=time.time(), width=640, height=480,
        decision=GradeDecision(grade, "total_area_pct", "total defect area 0.189 % > 0.100 %"),
        defects=defects, defect_area_px=580.0, defect_area_pct=100 * 580 / (640 * 480),
        models={"detection": "ab" * 32}, latency_ms={"total": 6.0},
    )
    return result_record(result)


class Stream(io.TextIOBase):
    """A text stream the test can wait on."""

    def __init__(self) -> None:
        self._parts: list[str] = []
        self._cond = threading.Condition()

    def writable(self) -> bool:
        return True

    def write(self, s: str) -> int:
        with self._cond:
            self._parts.append(s)
            self._cond.notify_all()
        return len(s)

    @property
    def text(self) -> str:
        with self._cond:
            return "".join(self._parts)

    def wait_for(self, needle: str, timeout: float = 5.0) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: needle in "".join(self._parts), timeout)


def parse(argv: list[str]) -> argparse.Namespace:
    """As the station CLI would: ``station listen …`` through add_listen_parser."""
    p = argparse.ArgumentParser(prog="station")
    sub = p.add_subparsers(dest="command", required=True)
    add_listen_parser(sub)
    args = p.parse_args(["listen", *argv])
    assert args.func is cmd_listen
    return args


class Listener:
    """cmd_listen on a thread; ``listening()`` waits for the subscription."""

    def __init__(self, argv: list[str]):
        self.out, self.err = Stream(), Stream()
        self.rc: int | None = None
        self._thread = threading.Thread(target=self._run, args=(parse(argv),), daemon=True)
        self._thread.start()

    def _run(self, args):
        self.rc = cmd_listen(args, self.out, self.err)

    def listening(self, timeout: float = 5.0) -> "Listener":
        assert self.err.wait_for("listening on", timeout), self.err.text
        return self

    def wait(self, timeout: float = 10.0) -> int:
        self._thread.join(timeout)
        assert not self._thread.is_alive(), f"listen did not exit\n{self.err.text}"
        return self.rc

    def json_lines(self) -> list[dict]:
        return [json.loads(line) for line in self.out.text.splitlines()]


def publish_raw(port: int, messages: list[tuple[str, bytes]], retain: bool = False) -> None:
    """Publish with plain paho at QoS 1 and wait for every PUBACK."""
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"test-pub-{uuid.uuid4().hex[:8]}")
    client.connect("127.0.0.1", port)
    client.loop_start()
    try:
        infos = [client.publish(topic, payload, qos=1, retain=retain) for topic, payload in messages]
        for info in infos:
            info.wait_for_publish(5)
            assert info.is_published()
    finally:
        client.disconnect()
        client.loop_stop()


def station_yaml(path: Path, port: int, station: str, line: str = "line3", extra: str = "") -> Path:
    path.write_text(
        f"station:\n  id: {station}\n"
        f"mqtt:\n  host: 127.0.0.1\n  port: {port}\n  enterprise: acme\n  site: plant1\n  area: assembly\n"
        f"  line: {line}\n  reconnect_min_s: 0.1\n  reconnect_max_s: 0.5\n{extra}"
    )
    return path


@pytest.fixture
def publishers(tmp_path, broker):
    """Start MqttPublishers for station ids (ISA-95 acme/plant1/assembly/<line>/<id>); stopped at teardown."""
    started: list[tuple[MqttPublisher, Outbox]] = []

    def start(station: str, line: str = "line3") -> MqttPublisher:
        cfg = MqttConfig(host="127.0.0.1", port=broker.port, enterprise="acme", site="plant1", area="assembly",
                         line=line, reconnect_min_s=0.1, reconnect_max_s=0.5)
        outbox = Outbox(tmp_path / f"outbox-{station}-{len(started)}.sqlite3")
        pub = MqttPublisher(cfg, station, outbox)
        started.append((pub, outbox))
        pub.start()
        assert pub.wait_connected(5), pub.stats()
        return pub

    yield start
    for pub, outbox in started:
        pub.stop(1.0)
        outbox.close()


# --- output ----------------------------------------------------------------------------------


def test_table_rows_and_status_changes_of_one_station(tmp_path, broker, publishers):
    config = station_yaml(tmp_path / "station.yaml", broker.port, "st-7")
    earlier = publishers("st-7")
    assert earlier.stop(2)  # the retained status is now "stopped"
    listener = Listener(["-c", str(config), "--count", "3", "--timeout", "10"]).listening()
    assert listener.out.wait_for("status: stopped")
    pub = publishers("st-7")
    records = [make_record(i, "st-7", g) for i, g in enumerate([Grade.DISCOUNT, Grade.REJECT, Grade.PASS])]
    records[2]["defects"] = []
    for r in records:
        pub.publish_result(r)
    assert listener.wait() == 0, listener.err.text
    assert "listening on 127.0.0.1:%d: acme/plant1/assembly/line3/st-7/result, acme/plant1/assembly/line3/st-7/status" % broker.port in listener.err.text

    header, stopped, online, *rows = listener.out.text.splitlines()
    assert header.split() == ["captured_at", "(UTC)", "station", "part", "grade", "rule", "area", "%", "defects", "late"]
    assert stopped.split()[2:] == ["st-7", "--", "status:", "stopped"]
    assert online.split()[2:] == ["st-7", "--", "status:", "online"]
    assert len(rows) == 3
    for row, r in zip(rows, records):
        cells = row.split()
        date, clock = r["captured_at"].rstrip("Z").split("T")
        assert cells == [date, clock, "st-7", r["part_id"], r["grade"], "total_area_pct",
                         f"{r['defect_area_pct']:.3f}", str(len(r["defects"])), "no"]


def test_jsonl_over_every_station_of_a_line_with_validation(tmp_path, broker, publishers):
    config = station_yaml(tmp_path / "station.yaml", broker.port, "st-1")
    listener = Listener(["-c", str(config), "--all-stations", "--json", "--validate", "--count", "4",
                         "--timeout", "10"]).listening()
    assert "acme/plant1/assembly/line3/+/result" in listener.err.text
    a, b, other_line = publishers("st-1"), publishers("st-2"), publishers("st-9", line="line4")
    assert listener.out.wait_for('"st-1"') and listener.out.wait_for('"st-2"')  # their "online" status
    other_line.publish_result(make_record(0, "st-9"))  # not on this line: not shown
    sent = [make_record(0, "st-1"), make_record(0, "st-2"), make_record(1, "st-1"),
            error_record("camera", "frame 3: CRC error", seq=3, station_id="st-2")]
    for r in sent:
        (a if r["station_id"] == "st-1" else b).publish_result(r)
    assert listener.wait() == 0, listener.err.text
    assert "INVALID" not in listener.err.text

    lines = listener.json_lines()
    status = [x for x in lines if "state" in x]
    results = [x for x in lines if "state" not in x]
    assert sorted((s["station_id"], s["state"]) for s in status) == [("st-1", "online"), ("st-2", "online")]
    assert sorted(r["id"] for r in results) == sorted(r["id"] for r in sent)
    by_id = {r["id"]: r for r in results}
    for r in sent:
        got = by_id[r["id"]]
        assert got["late"] is False and "sent_at" in got  # the payload as sent, not reformatted
        assert {k: v for k, v in got.items() if k not in ("sent_at", "late")} == r


def test_default_topic_is_every_isa95_station(broker):
    listener = Listener(["--host", "127.0.0.1", "--port", str(broker.port), "--count", "2", "--timeout", "10",
                         "--protocol", "3.1.1"]).listening()
    assert "+/+/+/+/+/result, +/+/+/+/+/status" in listener.err.text
    publish_raw(broker.port, [
        ("x/y/z/l1/s1/result", dumps(make_record(0, "s1")).encode()),
        ("a/b/result", dumps(make_record(0, "wrong-depth")).encode()),  # not ISA-95 depth: not matched
        ("x/y/z/l2/s2/result", dumps(error_record("cam", "boom", station_id=None)).encode()),
    ])
    assert listener.wait() == 0, listener.err.text
    header, first, second = listener.out.text.splitlines()
    assert first.split()[2:5] == ["s1", "P00000", "DISCOUNT"]
    assert second.split() == ["-", "s2", "-", "ERROR", "boom", "-", "-", "-"]  # station from the topic


def test_invalid_messages_are_reported_not_fatal(broker):
    good, bad = make_record(1, "st"), make_record(2, "st")
    bad["defects"][0]["score"] = 1.5
    del bad["rule"]
    listener = Listener(["--host", "127.0.0.1", "--port", str(broker.port), "--topic", "f/+",
                         "--validate", "--count", "4", "--timeout", "10"]).listening()
    publish_raw(broker.port, [
        ("f/st/result", dumps(bad).encode()),
        ("f/st/result", b"\xff not json"),
        ("f/st/result", b"[1, 2]"),
        ("f/st/status", b'{"state": "asleep"}'),
        ("f/st/result", dumps(good).encode()),
    ])
    assert listener.wait() == 1  # every message counted toward --count; invalid ones make it 1
    err = listener.err.text
    assert f"INVALID result on f/st/result (id {bad['id']}): " in err
    assert "$.defects[0].score: 1.5 is greater than the maximum of 1" in err
    assert "$: 'rule' is a required property" in err
    assert "not JSON on f/st/result (10 bytes)" in err
    assert "$: not a JSON object but list" in err
    assert "INVALID status on f/st/status: $.schema_version" in err and "'asleep' is not one of" in err
    assert "4 invalid messages" in err
    rows = listener.out.text.splitlines()[1:]
    assert [r.split()[3] for r in rows if "status" not in r] == ["P00002", "P00001"]  # parsed ones still shown


# --- --count / --timeout -------------------------------------------------------------------------


def test_count_not_reached_before_timeout_exits_1(broker):
    t0 = time.monotonic()
    listener = Listener(["--host", "127.0.0.1", "--port", str(broker.port), "--topic", "q/+", "--count", "2",
                         "--timeout", "0.5", "--no-status"]).listening()
    publish_raw(broker.port, [("q/s/result", dumps(make_record(0, "s")).encode()),
                              ("q/s/status", b'{"state": "online"}')])  # not subscribed with --no-status
    assert listener.wait() == 1
    assert 0.5 <= time.monotonic() - t0 < 5
    assert "1 of 2 results received within 0.5 s" in listener.err.text
    assert len(listener.out.text.splitlines()) == 2 and "status" not in listener.out.text


def test_timeout_without_count_is_success(broker):
    listener = Listener(["--host", "127.0.0.1", "--port", str(broker.port), "--timeout", "0.2"]).listening()
    assert listener.wait() == 0, listener.err.text


# --- connection and usage errors -----------------------------------------------------------------


def test_connection_refused_exits_2_without_a_traceback(tmp_path):
    port = free_port()  # nothing listens there
    proc = subprocess.run(
        [sys.executable, "-m", "station.listen", "--host", "127.0.0.1", "--port", str(port), "--timeout", "5"],
        cwd=ROOT, capture_output=True, text=True, timeout=30,
    )
    assert proc.returncode == 2
    assert f"cannot connect to 127.0.0.1:{port}: connection refused" in proc.stderr
    assert "Traceback" not in proc.stderr and proc.stdout == ""


@pytest.fixture
def auth_broker(tmp_path):
    pwfile = write_password_file(tmp_path / "passwd", {"reader": "right-password"})
    with Mosquitto(tmp_path / "auth-broker", listener_extra=f"password_file {pwfile}\nallow_anonymous false") as b:
        yield b


@pytest.mark.parametrize("protocol", ["3.1.1", "5"])
def test_bad_credentials_exit_2(auth_broker, monkeypatch, protocol):
    monkeypatch.setenv("LISTEN_PW", "wrong-password")
    base = ["--host", "127.0.0.1", "--port", str(auth_broker.port), "--protocol", protocol, "--timeout", "5"]
    listener = Listener([*base, "--username", "reader", "--password-env", "LISTEN_PW"])
    assert listener.wait() == 2
    err = listener.err.text
    assert f"the broker at 127.0.0.1:{auth_broker.port} refused the connection" in err
    assert "user 'reader': check the username and password" in err and "wrong-password" not in err
    anonymous = Listener(base)
    assert anonymous.wait() == 2 and "anonymous access" in anonymous.err.text


def test_good_credentials_from_the_station_config(tmp_path, auth_broker):
    (tmp_path / "pw").write_text("right-password\n")
    config = station_yaml(tmp_path / "station.yaml", auth_broker.port, "st-a",
                          extra="  auth:\n    username: reader\n    password_file: pw\n")
    listener = Listener(["-c", str(config), "--timeout", "0.2"]).listening()
    assert listener.wait() == 0, listener.err.text


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--all-stations"], "--all-stations needs -c CONFIG"),
        (["--topic", "a/#"], "'+' only as a whole level, no '#'"),
        (["--topic", "a/b+/c"], "'+' only as a whole level"),
        (["--topic", "a//c"], "non-empty levels"),
        (["--password-env", "X"], "need --username"),
        (["--cert-file", "c.pem"], "cert_file and key_file must be given together"),
        (["--username", "u", "--password-env", "NO_SUCH_VARIABLE_HERE"], "NO_SUCH_VARIABLE_HERE is not set"),
        (["-c", "/nonexistent/station.yaml"], "/nonexistent/station.yaml: cannot read config"),
    ],
)
def test_usage_errors_exit_2(argv, message):
    listener = Listener(["--port", str(free_port()), *argv])
    assert listener.wait() == 2
    assert message in listener.err.text and "Traceback" not in listener.err.text


def test_config_without_mqtt_or_with_a_fixed_prefix(tmp_path):
    plain = tmp_path / "plain.yaml"
    plain.write_text("station:\n  id: s\n")
    listener = Listener(["-c", str(plain)])
    assert listener.wait() == 2 and "no mqtt section" in listener.err.text
    fixed = station_yaml(tmp_path / "fixed.yaml", free_port(), "s", extra="  topic_prefix: plant/cell7\n")
    listener = Listener(["-c", str(fixed), "--all-stations"])
    assert listener.wait() == 2 and "sets mqtt.topic_prefix" in listener.err.text


def test_reconnects_after_a_broker_restart(broker):
    listener = Listener(["--host", "127.0.0.1", "--port", str(broker.port), "--topic", "r/+", "--count", "2",
                         "--timeout", "10", "--no-status"]).listening()
    publish_raw(broker.port, [("r/s/result", dumps(make_record(0, "s")).encode())])
    assert listener.out.wait_for("P00000")
    broker.restart()  # same port; the broker forgot every session and subscription
    assert listener.err.wait_for("lost") and listener.err.wait_for("subscribed again", 10), listener.err.text
    publish_raw(broker.port, [("r/s/result", dumps(make_record(1, "s")).encode())])
    assert listener.wait() == 0, listener.err.text
    assert [row.split()[3] for row in listener.out.text.splitlines()[1:]] == ["P00000", "P00001"]


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


@pytest.fixture
def tls_broker(tmp_path):
    """A broker with a server certificate for 127.0.0.1 from a throw-away CA (in tmp_path/pki)."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed")
    d = tmp_path / "pki"
    d.mkdir()
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    for ca in ("ca", "other-ca"):
        _openssl("req", "-x509", *ec, "-keyout", f"{ca}.key", "-out", f"{ca}.crt", "-days", "2", "-subj", f"/CN={ca}", cwd=d)
    (d / "san.ext").write_text("subjectAltName=IP:127.0.0.1\n")
    _openssl("req", *ec, "-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=server", cwd=d)
    _openssl("x509", "-req", "-in", "server.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
             "-out", "server.crt", "-days", "2", "-extfile", "san.ext", cwd=d)
    extra = f"cafile {d / 'ca.crt'}\ncertfile {d / 'server.crt'}\nkeyfile {d / 'server.key'}\n"
    with Mosquitto(tmp_path / "tls-broker", listener_extra=extra) as b:
        yield b


def test_tls_from_the_station_config(tmp_path, tls_broker):
    config = station_yaml(tmp_path / "station.yaml", tls_broker.port, "st-t", extra="  tls:\n    ca_file: pki/ca.crt\n")
    listener = Listener(["-c", str(config), "--count", "1", "--timeout", "10"]).listening()
    cfg = MqttConfig(host="127.0.0.1", port=tls_broker.port, enterprise="acme", site="plant1", area="assembly",
                     line="line3", tls=MqttTlsConfig(ca_file=tmp_path / "pki" / "ca.crt"))
    with Outbox(tmp_path / "outbox.sqlite3") as outbox:
        pub = MqttPublisher(cfg, "st-t", outbox)
        pub.start()
        try:
            pub.publish_result(make_record(0, "st-t"))
            assert listener.wait() == 0, listener.err.text
        finally:
            pub.stop(1.0)
    assert "status: online" in listener.out.text and "P00000" in listener.out.text


def test_tls_with_the_wrong_ca_exits_2(tmp_path, tls_broker):
    argv = ["--host", "127.0.0.1", "--port", str(tls_broker.port), "--ca-file", str(tmp_path / "pki" / "other-ca.crt")]
    listener = Listener(argv)
    assert listener.wait() == 2
    assert f"cannot connect to 127.0.0.1:{tls_broker.port}: TLS handshake failed" in listener.err.text
    assert "certificate verify failed" in listener.err.text

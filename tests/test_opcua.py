"""The PLC over OPC UA (station/plc.py) against a real asyncua server on a free loopback
port (tests/opcua_server.py): what arrives, with which types, in how many requests;
confirmation and refusal; the heartbeat; part-present edges; the server going away and
coming back; Sign / SignAndEncrypt with certificates made here, and username/password."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("asyncua", reason="the opcua extra (part of dev) is not installed")

from asyncua import ua  # noqa: E402
from inprocess import Running, wait_for_metric  # noqa: E402
from opcua_server import VARIABLES, PlcServer, make_certificates, node  # noqa: E402

from station.config import OpcUaConfig, parse_config  # noqa: E402
from station.outbox import Outbox  # noqa: E402
from station.publish import store_record  # noqa: E402
from station.sinks import Delivery  # noqa: E402
from station.errors import ConfigError  # noqa: E402
from station.messages import error_record  # noqa: E402
from station.plc import OpcUaSink, OpcUaWriter, Written  # noqa: E402

VT = ua.VariantType
PART_NODES = {"part_id": node("PartId"), "grade": node("Grade"), "sequence": node("Sequence"),
              "defect_area_pct": node("DefectAreaPct")}


def plc_config(endpoint: str, nodes: dict | None = None, **fields: Any) -> OpcUaConfig:
    data: dict[str, Any] = {"type": "opcua", "endpoint": endpoint, "nodes": {**PART_NODES, **(nodes or {})},
                            "reconnect_min_s": 0.05, "reconnect_max_s": 0.5, "write_timeout_s": 2.0}
    data.update(fields)
    return OpcUaConfig.model_validate(data)


def result(seq: int, grade: str = "REJECT", part_id: str | None = None, area: float = 2.5) -> dict:
    return {"schema_version": 1, "id": f"r{seq}", "seq": seq, "part_id": part_id if part_id is not None else f"P-{seq}",
            "grade": grade, "defect_area_pct": area}


@pytest.fixture(scope="module")
def plc():
    with PlcServer() as server:
        yield server


@pytest.fixture
def writers():
    """Makes started writers (``make(cfg, on_part=None)``) and closes them after the test."""
    made: list[OpcUaWriter] = []

    def make(cfg: OpcUaConfig, on_part=None, connected: bool = True) -> OpcUaWriter:
        w = OpcUaWriter(cfg, "test", on_part)
        made.append(w)
        w.start()
        if connected:
            assert w.wait_until(lambda s: s["connected"], 10), w.state()
        return w

    yield make
    for w in made:
        w.close()


# --- config ---------------------------------------------------------------------------


@pytest.mark.parametrize("text, expected", [
    ("plc: {type: s7, endpoint: 'opc.tcp://h:4840'}\n", "x.yaml:1: plc.type: Input should be 'opcua'"),
    ("plc:\n  type: opcua\n  endpoint: http://h:4840\n  nodes: {part_id: i=1, grade: i=2, sequence: i=3, defect_area_pct: i=4}\n",
     "x.yaml:3: plc.endpoint: String should match pattern"),
    ("plc:\n  type: opcua\n  endpoint: opc.tcp://h:4840\n  nodes:\n    part_id: Line3.PartId\n    grade: i=2\n    sequence: i=3\n"
     "    defect_area_pct: i=4\n", "x.yaml:5: plc.nodes.part_id: String should match pattern"),
    ("plc:\n  type: opcua\n  endpoint: opc.tcp://h:4840\n  nodes: {part_id: i=1, grade: i=1, sequence: i=3, defect_area_pct: i=4}\n",
     "x.yaml:4: plc.nodes: Value error, a NodeId is named twice"),
    ("plc:\n  type: opcua\n  endpoint: opc.tcp://h:4840\n  nodes: {part_id: i=1, grade: i=2, sequence: i=3, defect_area_pct: i=4, "
     "part_present_id: i=5}\n", "x.yaml:4: plc.nodes: Value error, part_present_id is read at the edges of part_present"),
    ("plc:\n  type: opcua\n  endpoint: opc.tcp://h:4840\n  nodes: {part_id: i=1, grade: i=2, sequence: i=3, defect_area_pct: i=4}\n"
     "  auth: {username: plc}\n", "x.yaml:5: plc.auth: Value error, give one of password_file and password_env"),
    ("plc:\n  type: opcua\n  endpoint: opc.tcp://h:4840\n  nodes: {part_id: i=1, grade: i=2, sequence: i=3, defect_area_pct: i=4}\n"
     "  security: {mode: SignAndEncrypt, certificate: c.der, private_key: c.pem}\n",
     "x.yaml:5: plc.security.server_certificate: Field required"),
    ("plc:\n  type: opcua\n  endpoint: opc.tcp://h:4840\n  nodes: {part_id: i=1, grade: i=2, sequence: i=3, defect_area_pct: i=4}\n"
     "  grade_type: Int8\n", "x.yaml:5: plc.grade_type: Input should be 'Int16' or 'Int32'"),
])
def test_config_errors_name_the_field(text, expected):
    with pytest.raises(ConfigError) as info:
        parse_config(text, "x.yaml")
    assert str(info.value).startswith(expected), str(info.value)


def test_relative_files_are_relative_to_the_config(tmp_path):
    cfg = parse_config("plc:\n  type: opcua\n  endpoint: opc.tcp://h:4840\n"
                       "  nodes: {part_id: i=1, grade: i=2, sequence: i=3, defect_area_pct: i=4}\n"
                       "  security: {certificate: pki/c.der, private_key: pki/c.pem, server_certificate: /etc/plc.der}\n"
                       "  auth: {username: u, password_file: secret}\n", "x.yaml", tmp_path)
    assert cfg.plc is not None and cfg.plc.security is not None and cfg.plc.auth is not None
    assert cfg.plc.security.certificate == tmp_path / "pki/c.der"
    assert cfg.plc.security.server_certificate.as_posix() == "/etc/plc.der"
    assert cfg.plc.auth.password_file == tmp_path / "secret"


def test_unreadable_secrets_are_refused_at_construction(tmp_path):
    certs = make_certificates(tmp_path / "pki")
    base = {"endpoint": "opc.tcp://127.0.0.1:1"}
    with pytest.raises(ConfigError, match="plc.auth.password_file: .*nothing: cannot read"):
        OpcUaWriter(plc_config(**base, auth={"username": "u", "password_file": str(tmp_path / "nothing")}))
    with pytest.raises(ConfigError, match="plc.auth.password_env: environment variable STATION_NO_SUCH_VAR"):
        OpcUaWriter(plc_config(**base, auth={"username": "u", "password_env": "STATION_NO_SUCH_VAR"}))
    security = {"certificate": str(certs.client_cert), "private_key": str(certs.server_key),
                "server_certificate": str(certs.server_cert)}
    with pytest.raises(ConfigError, match="plc.security.private_key: .*server.pem is not the key of"):
        OpcUaWriter(plc_config(**base, security=security))
    with pytest.raises(ConfigError, match="plc.security.server_certificate: .*client.pem: not a certificate"):
        OpcUaWriter(plc_config(**base, security={**security, "private_key": str(certs.client_key),
                                                  "server_certificate": str(certs.client_key)}))


# --- writes -----------------------------------------------------------------------------


def test_a_part_arrives_with_its_types_in_one_request(plc, writers):
    w = writers(plc_config(plc.endpoint))
    plc.writes.clear()
    assert w.write_part(result(41, "DISCOUNT", "LGP-0041", 0.8125), timeout=2.0) is Written.CONFIRMED
    assert plc.read("PartId") == ("LGP-0041", VT.String)
    assert plc.read("Grade") == (1, VT.Int16)
    assert plc.read("DefectAreaPct") == (0.8125, VT.Double)
    assert plc.read("Sequence") == (41, VT.UInt32)
    # one Write of the four variables, the sequence last
    assert plc.writes == [[node("PartId"), node("Grade"), node("DefectAreaPct"), node("Sequence")]]
    s = w.state()
    assert (s["confirmed"], s["not_confirmed"], s["last_write_error"]) == (1, 0, None)


@pytest.mark.parametrize("record, expected", [
    (result(1, "PASS", area=0.0), ("P-1", 0, 0.0, 1)),
    (result(2, "REJECT", part_id=""), ("", 2, 2.5, 2)),
    ({**result(3, "PASS"), "part_id": None}, ("", 0, 2.5, 3)),  # a part without an id: empty text
    (result(2**32 + 5, "PASS"), ("P-4294967301", 0, 2.5, 5)),  # UInt32 wraps
    (error_record("folder:a.png", "cannot decode", seq=9, part_id="P-9"), ("P-9", 2, -1.0, 9)),  # error_code 2
])
def test_values_written(plc, writers, record, expected):
    w = writers(plc_config(plc.endpoint))
    assert w.write_part(record, timeout=2.0) is Written.CONFIRMED
    assert tuple(plc.read(n)[0] for n in ("PartId", "Grade", "DefectAreaPct", "Sequence")) == expected


def test_wider_types_as_configured(plc, writers):
    w = writers(plc_config(plc.endpoint, {"grade": node("Grade32"), "sequence": node("Sequence64")},
                           grade_type="Int32", sequence_type="Int64", error_code=3))
    assert w.write_part(result(2**40, "REJECT"), timeout=2.0) is Written.CONFIRMED
    assert plc.read("Grade32") == (2, VT.Int32) and plc.read("Sequence64") == (2**40, VT.Int64)
    assert w.write_part(error_record("trigger", "no frame", seq=7), timeout=2.0) is Written.CONFIRMED
    assert plc.read("Grade32") == (3, VT.Int32) and plc.read("DefectAreaPct") == (-1.0, VT.Double)


def test_error_records_are_skipped_when_error_code_is_null(plc, writers):
    w = writers(plc_config(plc.endpoint, error_code=None))
    assert w.write_part(error_record("trigger", "no frame", seq=7), timeout=1.0) is Written.SKIPPED
    assert (w.state()["skipped"], w.state()["not_confirmed"]) == (1, 0)


@pytest.mark.parametrize("nodes, fields, refused", [
    ({"grade": node("ReadOnlyGrade")}, {}, f"grade ({node('ReadOnlyGrade')}): BadUserAccessDenied"),
    ({"grade": node("Grade32")}, {}, f"grade ({node('Grade32')}): BadTypeMismatch"),  # Int16 sent to an Int32
    ({"sequence": node("Sequence64")}, {"sequence_type": "UInt32"}, f"sequence ({node('Sequence64')}): BadTypeMismatch"),
    ({"part_id": "ns=2;s=Line3.Cam1.NoSuchVariable"}, {}, "part_id (ns=2;s=Line3.Cam1.NoSuchVariable): Bad"),  # asyncua: BadUserAccessDenied
])
def test_a_refused_variable_means_not_confirmed_and_is_named(plc, writers, nodes, fields, refused):
    w = writers(plc_config(plc.endpoint, nodes, **fields))
    assert w.write_part(result(5, part_id="P-5"), timeout=2.0) is Written.FAILED
    s = w.state()
    assert (s["confirmed"], s["not_confirmed"]) == (0, 1)
    assert s["last_write_error"].startswith("part 'P-5' (seq 5): the server refused "), s["last_write_error"]
    assert refused in s["last_write_error"]
    assert s["connected"]  # a refusal is about the part, not the connection


def test_a_record_that_is_not_a_part_is_not_written(plc, writers):
    w = writers(plc_config(plc.endpoint))
    assert w.write_part({"seq": 1, "part_id": "x"}, timeout=1.0) is Written.SKIPPED  # never a part: not retried
    assert w.write_part({**result(1), "grade": "MAYBE"}, timeout=1.0) is Written.SKIPPED
    assert "unknown grade 'MAYBE'" in w.state()["last_write_error"]
    assert (w.state()["skipped"], w.state()["not_confirmed"]) == (2, 0)


# --- heartbeat and part present -----------------------------------------------------------


def test_heartbeat_counts(plc, writers):
    w = writers(plc_config(plc.endpoint, {"heartbeat": node("Heartbeat")}, heartbeat_s=0.05))
    assert w.wait_until(lambda s: s["heartbeats"] >= 4, 5), w.state()
    value, vtype = plc.read("Heartbeat")
    assert vtype == VT.UInt32 and value >= 4
    w.close()
    assert plc.read("Heartbeat")[0] == w.state()["heartbeats"]  # 1, 2, 3, … one per beat


def test_heartbeat_toggles(plc, writers):
    w = writers(plc_config(plc.endpoint, {"heartbeat": node("Alive")}, heartbeat_type="Boolean", heartbeat_s=0.05))
    seen = set()
    assert w.wait_until(lambda s: s["heartbeats"] >= 1, 5)
    for n in (2, 3):
        assert w.wait_until(lambda s, n=n: s["heartbeats"] >= n, 5)
        seen.add(plc.read("Alive"))
    assert seen == {(True, VT.Boolean), (False, VT.Boolean)}


def test_a_refused_heartbeat_is_counted(plc, writers):
    w = writers(plc_config(plc.endpoint, {"heartbeat": node("ReadOnlyGrade")}, heartbeat_type="Int16", heartbeat_s=0.05))
    assert w.wait_until(lambda s: s["heartbeats_failed"] >= 2, 5)
    s = w.state()
    assert s["heartbeats"] == 0 and s["connected"]
    assert s["last_write_error"] == f"heartbeat {node('ReadOnlyGrade')}: the server answered BadUserAccessDenied"


def test_each_rising_edge_of_part_present_is_one_part(plc, writers):
    plc.set("PartPresent", True)  # present at connect: where it starts from, not a part
    parts: list[str | None] = []
    got = threading.Condition()

    def on_part(part_id: str | None) -> None:
        with got:
            parts.append(part_id)
            got.notify_all()

    w = writers(plc_config(plc.endpoint, {"part_present": node("PartPresent"), "part_present_id": node("PresentPartId")},
                           part_present_interval_ms=5), on_part)

    def edge(part_id: str, count: int) -> None:
        plc.set("PresentPartId", part_id)
        plc.set("PartPresent", True)
        with got:
            assert got.wait_for(lambda: len(parts) >= count, 5), parts
        plc.set("PartPresent", False)

    plc.set("PartPresent", False)
    edge("A-1", 1)
    edge("A-2", 2)
    plc.set("PartPresent", False)  # no change: no part
    edge("A-3", 3)
    assert parts == ["A-1", "A-2", "A-3"]
    assert w.state()["part_edges"] == 3


def test_part_present_without_an_id_node_gives_none(plc, writers):
    plc.set("PartPresent", False)
    parts: list[str | None] = []
    w = writers(plc_config(plc.endpoint, {"part_present": node("PartPresent")}, part_present_interval_ms=5),
                parts.append)
    plc.set("PartPresent", True)  # after the subscription's first value (false), in order
    assert w.wait_until(lambda s: s["part_edges"] >= 1, 5)
    plc.set("PartPresent", False)
    assert parts == [None]


def test_a_failing_on_part_is_counted_and_the_next_edge_still_comes(plc, writers):
    plc.set("PartPresent", False)
    calls: list[str | None] = []
    holder: list[OpcUaWriter] = []

    def on_part(part_id: str | None) -> None:
        calls.append(part_id)
        holder[0].write_part(result(1), timeout=1.0)  # on the writer's own thread: refused at once

    w = writers(plc_config(plc.endpoint, {"part_present": node("PartPresent")}, part_present_interval_ms=5), on_part)
    holder.append(w)
    for n in (1, 2):
        plc.set("PartPresent", True)
        assert w.wait_until(lambda s, n=n: s["part_edges"] >= n, 5)
        plc.set("PartPresent", False)
    s = w.state()
    assert calls == [None, None] and s["callback_errors"] == 2 and s["connected"]


def test_a_missing_part_present_variable_refuses_the_connection(plc, writers):
    w = writers(plc_config(plc.endpoint, {"part_present": "ns=2;s=Nope"}), connected=False)
    assert w.wait_until(lambda s: s["state"] == "refused", 5), w.state()
    assert "plc.nodes.part_present ns=2;s=Nope: BadNodeIdUnknown" in w.state()["last_error"]


# --- the server going away -------------------------------------------------------------------


def test_server_gone_then_back():
    with PlcServer() as server:
        w = OpcUaWriter(plc_config(server.endpoint, {"heartbeat": node("Heartbeat")}, heartbeat_s=0.1,
                                   reconnect_min_s=0.05, reconnect_max_s=0.2))
        w.start()
        try:
            assert w.wait_until(lambda s: s["connected"], 10)
            assert w.write_part(result(1), timeout=2.0) is Written.CONFIRMED
            server.stop()
            assert w.wait_until(lambda s: not s["connected"], 10), w.state()
            t0 = time.monotonic()
            assert w.write_part(result(2), timeout=0.3) is Written.FAILED
            assert time.monotonic() - t0 < 1.5
            s = w.state()
            assert s["state"] in ("disconnected", "connecting") and s["not_confirmed"] == 1
            assert "not connected to" in s["last_write_error"] or "connection lost" in s["last_write_error"]
            assert s["last_error"] is None or server.endpoint in s["last_error"]
            server.start()
            assert w.wait_until(lambda s: s["connected"], 10), w.state()
            assert w.write_part(result(3), timeout=2.0) is Written.CONFIRMED
            assert server.read("Sequence")[0] == 3
            s = w.state()
            assert s["connects"] == 2 and s["confirmed"] == 2 and s["last_error"] is None
            # the heartbeat goes on after the reconnect
            beats = s["heartbeats"]
            assert w.wait_until(lambda s: s["heartbeats"] >= beats + 2, 5)
        finally:
            w.close()
        assert w.state()["state"] == "stopped"
        assert w.write_part(result(4), timeout=1.0) is Written.FAILED


def test_nothing_listening_retries_with_backoff():
    w = OpcUaWriter(plc_config(f"opc.tcp://127.0.0.1:{_closed_port()}", reconnect_min_s=0.05, reconnect_max_s=0.1))
    w.start()
    try:
        assert w.wait_until(lambda s: s["connect_attempts"] >= 3, 5), w.state()
        s = w.state()
        assert s["connects"] == 0 and "cannot connect to opc.tcp://127.0.0.1" in s["last_error"]
        assert w.write_part(result(1), timeout=0.2) is Written.FAILED
    finally:
        w.close()


def test_close_does_not_wait_for_a_connect_that_hangs():
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as silent:  # takes the connection, never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(4)
        w = OpcUaWriter(plc_config(f"opc.tcp://127.0.0.1:{silent.getsockname()[1]}", connect_timeout_s=60,
                                   request_timeout_s=60))
        w.start()
        assert w.wait_until(lambda s: s["state"] == "connecting", 5)
        t0 = time.monotonic()
        w.close()
        assert time.monotonic() - t0 < 2.0
        assert w.state()["state"] == "stopped"


def _closed_port() -> int:
    from opcua_server import free_port

    return free_port()


# --- security -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def secure_plc(tmp_path_factory):
    certs = make_certificates(tmp_path_factory.mktemp("pki"))
    with PlcServer(secure=certs, users={"station": "s3cret pass"}) as server:
        yield server, certs


@pytest.mark.parametrize("mode", ["SignAndEncrypt", "Sign"])
def test_secure_endpoint_with_username_and_password(secure_plc, writers, tmp_path, mode):
    server, certs = secure_plc
    secret = tmp_path / "password"
    secret.write_text("s3cret pass\n")
    secret.chmod(0o600)
    cfg = plc_config(server.endpoint, {"heartbeat": node("Heartbeat")}, heartbeat_s=0.05,
                     security={"mode": mode, "certificate": str(certs.client_cert), "private_key": str(certs.client_key),
                               "server_certificate": str(certs.server_cert)},
                     auth={"username": "station", "password_file": str(secret)})
    w = writers(cfg)
    assert w.write_part(result(77, "PASS", "S-77", 0.1), timeout=3.0) is Written.CONFIRMED
    assert server.read("PartId") == ("S-77", VT.String) and server.read("Sequence") == (77, VT.UInt32)
    assert w.wait_until(lambda s: s["heartbeats"] >= 2, 5)


@pytest.mark.parametrize("change, refused", [
    ("password", "refused the credentials (BadUserAccessDenied; user 'station'): check plc.auth"),
    ("no_security", "offers no endpoint with security None (it offers Sign Basic256Sha256, SignAndEncrypt "
                    "Basic256Sha256): check plc.security"),
    ("client_cert", "refused the security settings (BadCertificateUntrusted)"),  # the server trusts another
    ("server_pin", "presents a certificate other than plc.security.server_certificate (thumbprint "),
])
def test_secure_endpoint_refusals_are_named(secure_plc, writers, tmp_path, monkeypatch, change, refused):
    server, certs = secure_plc
    monkeypatch.setenv("STATION_TEST_PLC_PASSWORD", "wrong" if change == "password" else "s3cret pass")
    security = {"certificate": str(certs.client_cert), "private_key": str(certs.client_key),
                "server_certificate": str(certs.server_cert)}
    if change == "client_cert":  # the server's own pair: a valid certificate that the server does not trust
        security.update(certificate=str(certs.server_cert), private_key=str(certs.server_key))
    if change == "server_pin":
        security["server_certificate"] = str(certs.other_cert)
    cfg = plc_config(server.endpoint, security=None if change == "no_security" else security,
                     auth={"username": "station", "password_env": "STATION_TEST_PLC_PASSWORD"},
                     connect_timeout_s=3.0, reconnect_max_s=5.0)
    w = writers(cfg, connected=False)
    assert w.wait_until(lambda s: s["connect_attempts"] >= 1 and s["state"] in ("refused", "disconnected"), 10), w.state()
    s = w.state()
    assert not s["connected"] and refused in s["last_error"], s
    assert w.write_part(result(1), timeout=0.2) is Written.FAILED


# --- the sink: fed from the outbox, across outages and restarts --------------------------------


def stored(box: Outbox, sink: OpcUaSink, record: dict) -> int:
    """Store ``record`` as the daemon's outbox sink does and tell ``sink`` of it."""
    seq = store_record(box, record, "")
    sink.deliver(record, Delivery(None, seq=seq))
    return seq


def test_sink_writes_each_part_from_the_outbox_in_order(plc, tmp_path):
    with Outbox(tmp_path / "outbox.sqlite3", sinks=("plc",)) as box:
        sink = OpcUaSink(plc_config(plc.endpoint), "test", box)
        sink.start()
        try:
            assert sink.writer.wait_until(lambda s: s["connected"], 10)
            plc.written.clear()
            for seq in range(1, 6):
                stored(box, sink, result(seq, part_id=f"Q-{seq}"))
            sink.deliver(error_record("trigger", "no frame", seq=6), Delivery(None))  # not stored: not for the PLC
            assert sink.writer.wait_until(lambda s: s["confirmed"] >= 5, 10), sink.stats()
            assert [w["Sequence"] for w in plc.written] == [1, 2, 3, 4, 5]
            assert [w["PartId"] for w in plc.written] == [f"Q-{seq}" for seq in range(1, 6)]
            assert sink.writer.wait_until(lambda s: box.depth("plc") == 0, 5)  # acknowledged after the write
            stats = sink.stats()
            assert (stats["waiting"], stats["not_confirmed"]) == (0, 0)
        finally:
            sink.close()
        assert sink.stats()["state"] == "stopped" and box.depth() == 0


def test_sink_skips_what_is_never_written_and_retries_what_is_refused(plc, tmp_path):
    """An error record with plc.error_code null is acknowledged unwritten; a part the
    server refuses stays (and the parts after it wait) until the server takes it."""
    cfg = plc_config(plc.endpoint, {"grade": node("Grade32")}, error_code=None, reconnect_min_s=0.05,
                     reconnect_max_s=0.1)  # Int16 sent to an Int32: refused
    with Outbox(tmp_path / "outbox.sqlite3", sinks=("plc",)) as box:
        sink = OpcUaSink(cfg, "test", box)
        sink.start()
        try:
            stored(box, sink, error_record("trigger", "no frame", seq=1))
            stored(box, sink, result(2))
            assert sink.writer.wait_until(lambda s: s["not_confirmed"] >= 3, 10), sink.stats()
            assert box.depth("plc") == 1 and sink.stats()["skipped"] == 1  # the error record went, the part waits
        finally:
            sink.close()
        assert box.depth("plc") == 1  # for the next start


def _closed_port_endpoint() -> str:
    return f"opc.tcp://127.0.0.1:{_closed_port()}"


def test_sink_stops_in_bounded_time_with_the_plc_away_and_keeps_the_parts(tmp_path):
    cfg = plc_config(_closed_port_endpoint(), write_timeout_s=0.3)
    with Outbox(tmp_path / "outbox.sqlite3", sinks=("plc",)) as box:
        sink = OpcUaSink(cfg, "test", box)
        sink.start()
        for seq in range(1, 7):
            stored(box, sink, result(seq))
        t0 = time.monotonic()
        sink.close()
        assert time.monotonic() - t0 < 3.0
        stats = sink.stats()
        assert stats["confirmed"] == 0 and stats["not_confirmed"] == 0  # nothing tried while the PLC was away
        assert stats["waiting"] == 6 == box.depth("plc")


# --- the daemon: the PLC away while parts arrive, the daemon restarted, the PLC back -----------


def daemon_config(state: Path, endpoint: str, camera: str, **extra: str) -> Any:
    text = (f"station: {{id: cam1}}\ncamera: {camera}\nrun: {{state_dir: {state}, stop_timeout_s: 5}}\n"
            f"plc:\n  type: opcua\n  endpoint: {endpoint}\n  reconnect_min_s: 0.05\n  reconnect_max_s: 0.2\n"
            f"  nodes: {{part_id: '{node('PartId')}', grade: '{node('Grade')}', sequence: '{node('Sequence')}', "
            f"defect_area_pct: '{node('DefectAreaPct')}'{extra.get('nodes', '')}}}\n" + extra.get("more", ""))
    return parse_config(text)


def _part(record: dict) -> tuple:
    """A record as the PLC gets it (OpcUaWriter's values)."""
    return (record["part_id"], {"PASS": 0, "DISCOUNT": 1, "REJECT": 2}[record["grade"]], record["seq"])


def test_parts_survive_a_plc_outage_and_a_daemon_restart(tmp_path):
    """Parts keep coming while the PLC is away; the daemon is stopped and started again
    meanwhile; once the PLC is back, every part of both runs is written to it, the older
    first, none lost."""
    from collections import Counter

    with PlcServer() as server:
        cfg = daemon_config(tmp_path / "state", server.endpoint, "{type: fake, fps: 20, height: 64, width: 64}")
        first = Running(cfg)
        try:
            first.sink.wait(2)
            server.stop()  # the PLC goes away while parts keep coming
            before = len(server.written)
            n = len(first.sink.records)
            first.sink.wait(n + 4)
            stats = first.daemon.stats_payload()["sinks"]["plc"]  # what waits shows in stats and metrics
            assert stats["state"] != "connected" and stats["waiting"] >= 3, stats
            assert wait_for_metric(first.daemon, 'station_outbox_waiting{sink="plc"}', lambda v: v >= 3)
            assert wait_for_metric(first.daemon, 'station_sink_connected{sink="plc"}', lambda v: v == 0)
        finally:
            first.stop()
        second = Running(cfg)
        try:
            second.sink.wait(3)
            server.start()
            second.sink.wait(len(second.sink.records) + 3)  # and parts come on while it catches up
        finally:
            second.stop()  # the stop writes what waits while the PLC is there
        delivered = [_part(r) for r in first.sink.records + second.sink.records if "grade" in r]
        written = [(w["PartId"], w["Grade"], w["Sequence"]) for w in server.written]
        assert not Counter(delivered) - Counter(written), (delivered, written)
        # after the outage: what the first run left, then the second run's, each in order
        seqs = [seq for _, _, seq in written[before:]]
        assert sum(b <= a for a, b in zip(seqs, seqs[1:])) <= 1, seqs
    with Outbox(tmp_path / "state" / "outbox.sqlite3", sinks=("plc",)) as box:
        assert box.depth() == 0


def test_a_rising_edge_of_part_present_is_one_graded_part(tmp_path, plc):
    """trigger.type plc: each false→true edge of the part-present variable is one part
    (the id the PLC wrote), graded and written back; holding it true makes no more."""
    plc.set("PartPresent", False)
    cfg = daemon_config(tmp_path / "state", plc.endpoint, "{type: fake, fps: 20, height: 64, width: 64}",
                        nodes=f", part_present: '{node('PartPresent')}', part_present_id: '{node('PresentPartId')}'",
                        more="  part_present_interval_ms: 5\ntrigger: {type: plc, timeout_s: 5}\n")
    run = Running(cfg)
    try:
        writer = next(s for s in run.daemon.sinks.sinks if isinstance(s, OpcUaSink)).writer
        assert writer.wait_until(lambda s: s["connected"], 30)
        for i, part in enumerate(["E-1", "E-2", "E-3"], start=1):
            plc.set("PresentPartId", part)
            plc.set("PartPresent", True)
            run.sink.wait(i)
            assert writer.wait_until(lambda s, i=i: s["part_edges"] >= i, 5)
            if i == 2:  # held true: no part more, however many frames come meanwhile
                assert not writer.wait_until(lambda s: s["part_edges"] > 2, 0.5)
            plc.set("PartPresent", False)
        assert writer.wait_until(lambda s: s["confirmed"] >= 3, 10)
        assert plc.read("PartId")[0] == "E-3"
    finally:
        run.stop()
    assert [r["part_id"] for r in run.sink.records] == ["E-1", "E-2", "E-3"]
    assert all("grade" in r for r in run.sink.records)
    assert run.daemon.trigger.counts()["accepted"] == 3


def test_variables_of_the_test_server_are_as_declared(plc):
    # the types the tests above rely on (a change to opcua_server.VARIABLES shows here first)
    for name, (_, vtype, _) in VARIABLES.items():
        assert plc.read(name)[1] == vtype, name

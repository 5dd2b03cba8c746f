"""Metrics: what the daemon's calls produce, scraped over HTTP from a free
loopback port and parsed with prometheus_client's own parser; private registries
that do not collide; a server that stops and frees its port."""

from __future__ import annotations

import socket
import time
import urllib.error
import urllib.request
import uuid

import pytest
from prometheus_client.parser import text_string_to_metric_families
from pydantic import ValidationError

from station.errors import StationError
from station.messages import error_record, iso_time, result_record
from station.config import MetricsConfig
from station.metrics import STAGE_BUCKETS, Metrics
from station.types import Defects, Grade, GradeDecision, InspectionResult


def make_record(grade: Grade, captured_at: float, latency_ms: dict[str, float]) -> dict:
    result = InspectionResult(
        id=uuid.uuid4().hex, station_id="st-1", source="camera", seq=0, part_id=None, captured_at=captured_at,
        width=64, height=48, decision=GradeDecision(grade, "total_area_pct", "r"), defects=Defects.empty(),
        defect_area_px=0.0, defect_area_pct=0.0, models={"segmentation": "ab" * 32}, latency_ms=latency_ms,
    )
    return result_record(result)


def scrape(url: str) -> dict[str, dict[tuple, float]]:
    """GET /metrics → sample name → {sorted label items: value}."""
    with urllib.request.urlopen(url, timeout=5) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/plain")
        text = resp.read().decode("utf-8")
    out: dict[str, dict[tuple, float]] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out.setdefault(s.name, {})[tuple(sorted(s.labels.items()))] = s.value
    return out


@pytest.fixture
def served():
    m = Metrics()
    server = m.start_server("127.0.0.1", 0)
    yield m, server
    server.stop()


def test_config_defaults_and_strictness():
    c = MetricsConfig()
    assert (c.enabled, c.host, c.port) == (False, "127.0.0.1", 9108)
    assert MetricsConfig.model_validate({"enabled": True, "host": "0.0.0.0", "port": 9200}).port == 9200
    for bad in ({"port": 70000}, {"prot": 1}, {"host": ""}):
        with pytest.raises(ValidationError):
            MetricsConfig.model_validate(bad)
    assert all(f.description for f in MetricsConfig.model_fields.values())


def test_fresh_instance_exposes_zeros(served):
    m, server = served
    assert server.port > 0 and server.url == f"http://127.0.0.1:{server.port}/metrics"
    got = scrape(server.url)
    assert got["station_frames_captured_total"] == {(): 0.0}
    assert got["station_results_total"] == {(("grade", g.value),): 0.0 for g in Grade}
    assert got["station_errors_total"] == {(("kind", "inspection"),): 0.0}
    assert got["station_camera_state"][(("station_camera_state", "reconnecting"),)] == 1.0
    assert got["station_build_info"] == {(("version", __import__("station").__version__),): 1.0}


def test_daemon_calls_show_up_in_a_scrape(served):
    m, server = served
    now = time.time()
    for _ in range(5):
        m.frame_captured()
    m.frame_dropped("queue_full")
    m.frame_dropped("queue_full")
    m.frame_dropped("decode_error")
    m.observe_result(make_record(Grade.REJECT, now - 0.25, {"preprocess.segmentation": 0.8, "infer.segmentation": 12.0, "total": 14.0}), now=now)
    m.observe_result(make_record(Grade.PASS, now - 0.03, {"infer.segmentation": 1500.0, "total": 1502.0}), now=now)
    m.observe_result(error_record("camera", "inspection failed: boom"))
    m.error("archive")
    m.set_outbox(17, True)
    m.set_camera_state("connected")
    m.set_mqtt_connected(True)
    m.set_queue_depth(3)
    m.set_models({
        "segmentation": {"sha256": "ab" * 32, "providers": ["CUDAExecutionProvider", "CPUExecutionProvider"],
                         "card": {"name": "seg", "version": "1.2"}, "path": "/m/seg.onnx"},
        "detection": {"name": "det", "version": "3", "sha256": "cd" * 32, "providers": ["CPUExecutionProvider"]},
    })

    got = scrape(server.url)
    assert got["station_frames_captured_total"] == {(): 5.0}
    assert got["station_frames_dropped_total"] == {(("reason", "queue_full"),): 2.0, (("reason", "decode_error"),): 1.0}
    assert got["station_results_total"] == {(("grade", "PASS"),): 1.0, (("grade", "DISCOUNT"),): 0.0, (("grade", "REJECT"),): 1.0}
    assert got["station_errors_total"] == {(("kind", "inspection"),): 1.0, (("kind", "archive"),): 1.0}

    infer = (("stage", "infer.segmentation"),)
    counts = got["station_stage_latency_seconds_count"]
    assert counts[infer] == 2.0 and counts[(("stage", "total"),)] == 2.0 and counts[(("stage", "preprocess.segmentation"),)] == 1.0
    assert got["station_stage_latency_seconds_sum"][infer] == pytest.approx(1.512)
    buckets = got["station_stage_latency_seconds_bucket"]
    assert buckets[(("le", "0.02"), ("stage", "infer.segmentation"))] == 1.0  # 12 ms
    assert buckets[(("le", "1.0"), ("stage", "infer.segmentation"))] == 1.0
    assert buckets[(("le", "2.0"), ("stage", "infer.segmentation"))] == 2.0  # 1.5 s
    assert buckets[(("le", "0.001"), ("stage", "preprocess.segmentation"))] == 1.0  # 0.8 ms
    assert {k[0][1] for k in buckets if k[1] == ("stage", "total")} == {str(b) for b in STAGE_BUCKETS} | {"+Inf"}

    assert got["station_end_to_end_latency_seconds_count"] == {(): 2.0}
    assert got["station_end_to_end_latency_seconds_sum"][()] == pytest.approx(0.28, abs=0.002)  # ms-rounded capture times

    assert got["station_outbox_depth"] == {(): 17.0} and got["station_outbox_alarm"] == {(): 1.0}
    assert got["station_mqtt_connected"] == {(): 1.0}
    assert got["station_queue_depth"] == {(("queue", "inspect"),): 3.0}
    camera = got["station_camera_state"]
    assert camera[(("station_camera_state", "connected"),)] == 1.0 and sum(camera.values()) == 1.0
    assert got["station_model_info"] == {
        (("model", "segmentation"), ("name", "seg"), ("sha256", "ab" * 32), ("version", "1.2")): 1.0,
        (("model", "detection"), ("name", "det"), ("sha256", "cd" * 32), ("version", "3")): 1.0,
    }
    assert set(got["station_model_provider_info"]) == {
        (("model", "segmentation"), ("provider", "CUDAExecutionProvider")),
        (("model", "segmentation"), ("provider", "CPUExecutionProvider")),
        (("model", "detection"), ("provider", "CPUExecutionProvider")),
    }

    # later calls replace gauges and model series
    m.set_outbox(0, False)
    m.set_mqtt_connected(False)
    m.set_camera_state("lost")
    m.set_models({"segmentation": {"name": "seg", "version": "2", "sha256": "ef" * 32, "providers": ["CPUExecutionProvider"]}})
    got = scrape(server.url)
    assert got["station_outbox_depth"] == {(): 0.0} and got["station_outbox_alarm"] == {(): 0.0}
    assert got["station_mqtt_connected"] == {(): 0.0}
    assert got["station_camera_state"][(("station_camera_state", "lost"),)] == 1.0
    assert len(got["station_model_info"]) == 1 and len(got["station_model_provider_info"]) == 1


def test_unknown_camera_state_is_a_bug():
    with pytest.raises(ValueError, match="connected"):
        Metrics().set_camera_state("sleeping")


def test_odd_records_do_not_raise():
    m = Metrics()
    m.observe_result({"grade": "PASS"})  # no latencies, no capture time
    m.observe_result({"grade": "PASS", "captured_at": "yesterday", "latency_ms": {"x": "fast", "y": -1}})
    m.observe_result({"grade": "PASS", "captured_at": iso_time(time.time() + 60)})  # clock ahead: skipped
    text = m.render().decode()
    assert 'station_results_total{grade="PASS"} 3.0' in text
    assert "station_end_to_end_latency_seconds_count 0.0" in text


def test_instances_do_not_collide():
    a, b = Metrics(), Metrics()  # a shared (global) registry would refuse the second
    a.frame_captured()
    assert b"station_frames_captured_total 1.0" in a.render()
    assert b"station_frames_captured_total 0.0" in b.render()


def test_stop_frees_the_port_and_ends_serving():
    m = Metrics()
    server = m.start_server("127.0.0.1", 0)
    url, port = server.url, server.port
    assert "station_frames_captured_total" in scrape(url)
    server.stop()
    server.stop()  # idempotent
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(url, timeout=2)
    again = m.start_server("127.0.0.1", port)  # the same port can be bound again at once
    try:
        assert "station_frames_captured_total" in scrape(again.url)
    finally:
        again.stop()


def test_port_in_use_is_a_clear_error():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        port = s.getsockname()[1]
        with pytest.raises(StationError, match=f"metrics: cannot listen on 127.0.0.1:{port}"):
            Metrics().start_server("127.0.0.1", port)

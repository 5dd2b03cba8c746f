"""station bench runs end to end (figures are for docs/benchmarks.md, not asserted here)."""

from __future__ import annotations

import json

import pytest
from mosquitto import have_mosquitto

from station.cli import main


@pytest.mark.skipif(not have_mosquitto(), reason="mosquitto binary not installed")
def test_bench_writes_every_figure(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert main(["bench", "--frames", "40", "--latency-frames", "10", "--size", "240", "320", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    for key in ("bare", "pipeline", "latency", "outbox", "ratios", "targets"):
        assert key in report
    assert report["bare"]["fps"] > 0 and report["pipeline"]["fps"] > 0
    assert report["pipeline"]["dropped"] == 0  # the throughput run's camera is lossless
    assert report["latency"]["p99_ms"] >= report["latency"]["p50_ms"] > 0
    assert report["outbox"]["store_ack_per_s"] > 0 and report["outbox"]["through_broker_per_s"] > 0
    assert set(report["pipeline"]["stage_ms"]) >= {"preprocess.segmentation", "infer.segmentation", "postprocess.segmentation"}
    assert "pipeline (to PUBACK)" in capsys.readouterr().out

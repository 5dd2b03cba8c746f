"""station bench runs end to end (figures are for docs/benchmarks.md, not asserted here)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest
from mosquitto import have_mosquitto
from onnx_builders import write_detection_model, write_threshold_model
from test_priority import FIFO_REFUSED, NICE_REFUSED

from station.cli import main


def _shorter_probes(monkeypatch) -> None:
    """The bench's fixed probes on fewer samples, for tests that check a setting or that a figure is
    written, not its value: the same functions, 30 thread wake-ups instead of 300, 500 results
    through the outbox and through the broker instead of 5,000 (together about 4 s a bench)."""
    from functools import partial

    from station import bench

    monkeypatch.setattr(bench, "wake_latency", partial(bench.wake_latency, n=30))
    monkeypatch.setattr(bench, "outbox_throughput", partial(bench.outbox_throughput, n=500))
    monkeypatch.setattr(bench, "publisher_throughput", partial(bench.publisher_throughput, n=500))


@pytest.mark.skipif(not have_mosquitto(), reason="mosquitto binary not installed")
def test_bench_writes_every_figure(tmp_path, capsys, monkeypatch):
    _shorter_probes(monkeypatch)
    out = tmp_path / "bench.json"
    assert main(["bench", "--frames", "20", "--latency-frames", "10", "--latency-load", "0.8", "0.5",
                 "--size", "240", "320", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    for key in ("host", "bare", "pipeline", "latency", "outbox", "ratios", "targets"):
        assert key in report
    assert report["machine"]["nice"] == os.getpriority(os.PRIO_PROCESS, 0)  # runs at another priority show it
    assert report["machine"]["nice_non_inference"] == 0  # tuning off: every thread at the process's priority
    assert report["machine"]["gpu"] is None  # the demo model runs on the CPU here
    wake = report["host"]["wake_ms"]  # the machine's floor under each hand-over between threads
    assert wake["n"] == 30 and 0 < wake["p50"] <= wake["p99"] and wake["gap_ms"] == 10
    assert report["bare"]["fps"] > 0 and report["pipeline"]["fps"] > 0
    assert report["pipeline"]["dropped"] == 0  # the throughput run's camera is lossless
    assert report["latency"]["p99_ms"] >= report["latency"]["p50_ms"] > 0
    assert report["outbox"]["store_ack_per_s"] > 0 and report["outbox"]["through_broker_per_s"] > 0
    assert set(report["pipeline"]["stage_ms"]) >= {"preprocess.segmentation", "infer.segmentation", "postprocess.segmentation"}
    assert [run["load"] for run in report["latency_by_load"]] == [0.8, 0.5]
    assert report["latency"] == report["latency_by_load"][0]  # the targets are judged at the first load
    assert report["ratios"]["p99_over_bare_median"] == report["latency"]["p99_over_bare_median"] == pytest.approx(
        report["latency"]["p99_ms"] / report["bare"]["median_ms"])
    # the hypervisor's share of the CPUs during each phase (Linux: /proc/stat)
    # and every other process's CPU time (the broker's counts as the bench's own)
    for phase in (report["host"], report["bare"], report["pipeline"], *report["latency_by_load"]):
        assert 0.0 <= phase["host_steal_pct"] <= 100.0
        assert 0.0 <= phase["others_cpu_pct"] <= 100.0 * os.cpu_count()
    for run in report["latency_by_load"]:  # the models alone at the same pace: 0 < p50 <= p99
        alone = run["models_alone"]
        assert 0 < alone["p50_ms"] <= alone["p99_ms"]
        assert alone["p99_over_bare_median"] == pytest.approx(alone["p99_ms"] / report["bare"]["median_ms"])
        # this run's own model runs queued at that pace: the floor on the host as it was then
        own = run["models_in_run"]
        assert 0 < own["p50_ms"] <= own["p99_ms"] <= run["p99_ms"] + 1e-9
        assert own["p99_over_bare_median"] == pytest.approx(own["p99_ms"] / report["bare"]["median_ms"])
        # the two legs of each result's way: capture → stored in the outbox → PUBACK
        legs = run["legs_ms"]
        assert 0 < legs["capture_to_stored"]["p50"] <= legs["capture_to_stored"]["p99"]
        assert 0 < legs["stored_to_puback"]["p50"] <= legs["stored_to_puback"]["p99"]
        assert legs["capture_to_stored"]["p50"] <= run["p99_ms"]
        assert "infer.segmentation" in run["stage_ms"]
    printed = capsys.readouterr().out
    assert "pipeline (to PUBACK)" in printed and "end-to-end at  80% load" in printed and "at  50% load" in printed
    assert printed.count("this run's model runs queued") == 2
    assert printed.count("models alone at that pace") == 2 and printed.count("capture → stored") == 2 and printed.count("host steal") == 5
    assert printed.count("other processes") == 5
    assert "thread wake-up" in printed


def test_queue_floor_is_lindleys_recursion():
    from station.bench import queue_floor

    assert queue_floor([8.0] * 5, 10.0) == [8.0] * 5  # never waits when each run fits its period
    # one 40 ms run: the next frames wait 30, 28, 26 … ms, the backlog draining by 10 - 8 ms a frame
    lat = queue_floor([8.0, 40.0] + [8.0] * 20, 10.0)
    assert lat[:5] == [8.0, 40.0, 38.0, 36.0, 34.0]
    assert lat[-1] == 8.0 and all(a >= b for a, b in zip(lat[1:], lat[2:]))
    assert queue_floor([12.0] * 4, 10.0) == [12.0, 14.0, 16.0, 18.0]  # over capacity: grows without end
    with pytest.raises(ValueError, match="period_ms 0"):
        queue_floor([1.0], 0)


def test_a_frames_model_time_is_both_models_together_or_their_sum():
    """The model time behind ``models_in_run``: the infer stage's wall time when the models
    ran at once (tuning.parallel_models), else the sum of the runs; no other stage."""
    from station import bench

    parallel = {"preprocess.segmentation": 0.5, "infer.segmentation": 10.0, "infer.detection": 4.0, "infer": 10.2,
                "postprocess.segmentation": 0.8, "total": 11.7}
    assert bench._Run._models_of(parallel) == 10.2
    in_turn = {"preprocess.segmentation": 0.5, "infer.segmentation": 10.0, "infer.detection": 4.0, "grade": 0.1}
    assert bench._Run._models_of(in_turn) == 14.0


def test_the_in_run_floor_queues_each_frames_model_time_from_its_capture():
    """``models_in_run``: Lindley's recursion on the frames' real capture times, so a slow
    run delays the frames after it and a gap the camera left (dropped frames) drains the
    queue; on regular arrivals it is ``queue_floor``."""
    from station import bench

    run = object.__new__(bench._Run)  # only the series the floor is computed from
    run.model_ms = [(100.000, 8.0), (100.010, 40.0), (100.020, 8.0), (100.050, 8.0)]
    assert run.models_floor_ms() == pytest.approx([8.0, 40.0, 38.0, 16.0])
    times = [8.0, 40.0] + [8.0] * 20
    run.model_ms = [(50.0 + i * 0.010, ms) for i, ms in enumerate(times)]
    assert run.models_floor_ms() == pytest.approx(bench.queue_floor(times, 10.0))


def test_bench_refuses_a_load_outside_0_1(capsys):
    assert main(["bench", "--latency-load", "0.8", "1.5"]) == 2
    assert "--latency-load 1.5: must be in (0, 1]" in capsys.readouterr().err


def _burn(seconds: float) -> None:
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


@pytest.mark.skipif(not os.path.exists("/proc/stat"), reason="needs Linux /proc")
def test_other_processes_cpu_counts_every_process_but_the_bench_and_its_broker():
    """others_cpu_pct names load from outside the station: a process that spins
    shows as the CPU it got, unless it is one of the bench's own (the broker).
    Both views are read over the same second, so whatever else the machine runs
    is in both and drops out of their difference."""
    from station.bench import _host_figures, _host_ticks

    cpus = os.cpu_count() or 1
    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.2)  # started
        a_all, a_own = _host_ticks(), _host_ticks([spinner.pid])
        time.sleep(1.0)
        b_all, b_own = _host_ticks(), _host_ticks([spinner.pid])
    finally:
        spinner.kill()
        spinner.wait()
    foreign = _host_figures(a_all, b_all)["others_cpu_pct"]
    own = _host_figures(a_own, b_own)["others_cpu_pct"]
    spun = 100.0 * cpus * ((b_own.ours - b_all.ours) - (a_own.ours - a_all.ours)) / (b_all.total - a_all.total)
    assert spun >= 30.0, spun  # it ran (about one CPU on a quiet machine, less on a busy one)
    assert foreign - own == pytest.approx(spun, abs=10.0), (foreign, own, spun)
    a = _host_ticks()
    _burn(0.5)  # this process's own CPU time is the bench's, not another's
    b = _host_ticks()
    assert 100.0 * cpus * (b.ours - a.ours) / (b.total - a.total) >= 30.0
    assert _host_figures(None, a) == {"host_steal_pct": None, "others_cpu_pct": None}


def _short_bench(tmp_path, monkeypatch, config: str) -> dict:
    """The report of a 20-frame bench (the least it takes) of the demo model under ``config`` (YAML
    text), its probes shortened."""
    _shorter_probes(monkeypatch)
    cfg = tmp_path / "bench.yaml"
    cfg.write_text(config)
    out = tmp_path / "bench.json"
    assert main(["bench", "-c", str(cfg), "--frames", "20", "--latency-frames", "10", "--size", "240", "320",
                 "--json", str(out)]) == 0
    return json.loads(out.read_text())


@pytest.mark.skipif(not have_mosquitto(), reason="mosquitto binary not installed")
@pytest.mark.parametrize("allowed", [True, False])
def test_bench_says_whether_the_models_ran_under_sched_fifo(tmp_path, capsys, monkeypatch, allowed):
    """tuning.realtime_inference: the bare phase runs the models under SCHED_FIFO as the infer
    thread does, and the report says whether the policy was granted or refused."""
    if allowed and FIFO_REFUSED:
        pytest.skip(FIFO_REFUSED)
    if not allowed:
        def refuse(*args):
            raise PermissionError(1, "Operation not permitted")

        monkeypatch.setattr(os, "sched_setscheduler", refuse)
    report = _short_bench(tmp_path, monkeypatch, "tuning: {realtime_inference: 3}\n")
    assert report["machine"]["realtime_inference"] == 3
    assert report["bare"]["realtime"] is allowed
    printed = capsys.readouterr().out
    if allowed:
        assert "models under SCHED_FIFO 3" in printed
    else:
        assert "SCHED_FIFO 3 refused here: models under the ordinary policy" in printed


@pytest.mark.skipif(not have_mosquitto(), reason="mosquitto binary not installed")
@pytest.mark.skipif(FIFO_REFUSED is not None, reason=str(FIFO_REFUSED))
@pytest.mark.skipif(NICE_REFUSED is not None, reason=str(NICE_REFUSED))
def test_bench_runs_the_first_model_at_infer_nice_without_resting(tmp_path, capsys, monkeypatch):
    """tuning.infer_nice: the bare runs' first model runs under the ordinary policy at that nice
    value, as the infer thread does, so they need no rest against the kernel's real-time limit
    (bare.realtime false); the report names the setting."""
    report = _short_bench(tmp_path, monkeypatch, "tuning: {realtime_inference: 3, infer_nice: -4}\n")
    assert report["machine"]["infer_nice"] == -4 and report["bare"]["realtime"] is False
    assert "infer thread at nice -4, other models under SCHED_FIFO 3" in capsys.readouterr().out


@pytest.mark.skipif(not have_mosquitto(), reason="mosquitto binary not installed")
@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="tuning.infer_cpu needs a process allowed on two CPUs")
def test_bench_keeps_its_broker_and_the_helper_off_the_infer_cpu(tmp_path, capsys, monkeypatch):
    """tuning.infer_cpu: the bench's Mosquitto and the second model's helper run on the other
    CPUs and the bare runs' first model on that one, as in the daemon; the report says so."""
    allowed = os.sched_getaffinity(0)
    cpu = max(allowed)
    calls: list[tuple[int, set[int]]] = []
    real = os.sched_setaffinity

    def recording(pid, cpus):
        calls.append((pid, set(cpus)))
        return real(pid, cpus)

    monkeypatch.setattr(os, "sched_setaffinity", recording)
    _shorter_probes(monkeypatch)
    cfg = tmp_path / "bench.yaml"
    # two models, so that a helper runs the second: tiny ones, since where threads run is the question
    seg = write_threshold_model(tmp_path / "seg.onnx")
    det = write_detection_model(tmp_path / "det.onnx", [[0.1, 0.1, 0.5, 0.5]], [0.9], [0], ["scratch"])
    cfg.write_text(f"models: {{segmentation: {seg}, detection: {det}}}\n"
                   f"tuning: {{parallel_models: true, infer_cpu: {cpu}}}\n")
    out = tmp_path / "bench.json"
    assert main(["bench", "-c", str(cfg), "--frames", "20", "--latency-frames", "10", "--size", "96", "128",
                 "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["machine"]["infer_cpu"] == cpu
    others = allowed - {cpu}
    assert any(pid > 0 and cpus == others for pid, cpus in calls), calls  # the broker
    assert (0, {cpu}) in calls, calls  # the first model's thread, in the bare runs and the daemon
    assert calls.count((0, others)) >= 3, calls  # the bare runs' helper, the daemon's caller and its helper
    assert f"infer thread on CPU {cpu}" in capsys.readouterr().out
    assert os.sched_getaffinity(0) == allowed


def test_the_gpu_the_models_run_on_is_named(tmp_path, monkeypatch):
    """On a GPU provider the report names the card (nvidia-smi); on the CPU, or when nvidia-smi
    is missing or fails, it says nothing rather than guessing."""
    from types import SimpleNamespace

    from station.bench import gpu_description

    smi = tmp_path / "nvidia-smi"
    smi.write_text('#!/bin/sh\n[ "$2" = 1 ] || exit 9\necho "NVIDIA H200, 580.159.04, 143771 MiB"\n')
    smi.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")
    cuda = {"segmentation": SimpleNamespace(providers=["CUDAExecutionProvider", "CPUExecutionProvider"])}
    cpu = {"segmentation": SimpleNamespace(providers=["CPUExecutionProvider"])}
    assert gpu_description(cuda, 1) == "NVIDIA H200, driver 580.159.04, 143771 MiB"
    assert gpu_description(cpu, 1) is None
    assert gpu_description(cuda, 0) is None  # nvidia-smi failed for that device
    monkeypatch.setenv("PATH", "/nonexistent")
    assert gpu_description(cuda, 1) is None

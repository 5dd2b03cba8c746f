"""The one-off probe behind docs/lab/benchmarks.md, sitting 17: does a model
run wait for anything but its CPU? The sixteenth sitting's timeline
(docs/lab/bench_cpu_16/paced_timeline.py, loaded and used as it is) with each
``OnnxModel.run`` timed twice: its wall time and its thread's CPU time
(``time.thread_time``). The difference is the time the thread spent off its CPU
during the run: waiting to take the GIL back when ONNX Runtime returns, page
faults served from disk, preemption. It measures the shipped code from outside;
it is a record of how the sitting's figures were measured, not part of the station.

    .venv/bin/python docs/lab/bench_cpu_17/model_wait.py FPS FRAMES OUT.json ['{run: {...}}']

config/bench.yaml pins the infer thread to CPU 0 (``run.infer_cpu``); the broker
is kept off it here as ``station bench`` keeps its own; ``DETECTOR`` sets the
detector's thread policy as in the fourteenth sitting's script. Prints the
end-to-end p50/p99 beside the floor ``station bench`` reports as "this run's
model runs queued", then, per model, the wall and CPU time per run (p50, p99)
and their difference (p50, p90, p99, max); adds ``runs`` (model, end (UNIX s),
wall ms, CPU ms) to OUT.json.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

_spec = importlib.util.spec_from_file_location(
    "paced_timeline_16", Path(__file__).resolve().parents[1] / "bench_cpu_16" / "paced_timeline.py")
timeline = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(timeline)  # its patches of the daemon, the publisher and the bench apply from here

from station import bench, infer  # noqa: E402

_broker_init = bench.Broker.__init__


def _broker_off_cpu0(self, *args, **kwargs):
    _broker_init(self, *args, **kwargs)
    os.sched_setaffinity(self.proc.pid, os.sched_getaffinity(0) - {0})


bench.Broker.__init__ = _broker_off_cpu0

RUNS: list[tuple[str, float, float, float]] = []  # model task, end, wall ms, thread CPU ms
_run = infer.OnnxModel.run


def _timed_run(self, tensor):
    wall, cpu = time.perf_counter(), time.thread_time()
    out = _run(self, tensor)
    RUNS.append((self.card.task, time.time(), (time.perf_counter() - wall) * 1e3, (time.thread_time() - cpu) * 1e3))
    return out


infer.OnnxModel.run = _timed_run


def main() -> None:
    timeline.main()
    frames, out = int(sys.argv[2]), Path(sys.argv[3])
    report = json.loads(out.read_text())
    report["runs"] = RUNS
    out.write_text(json.dumps(report))
    frames_ = report["frames"]
    latency = np.array([(f["acked"] - f["captured"]) * 1e3 for f in frames_])
    run = object.__new__(bench._Run)  # the bench's in-run floor, on this run's frames
    run.model_ms = [(f["captured"], ms) for f, ms in zip(frames_, report["stage_ms"]["infer"])]
    floor = np.array(run.models_floor_ms())
    print(f"end to end p50 {np.median(latency):.2f} p99 {np.percentile(latency, 99):.2f} ms; this run's model runs "
          f"queued p50 {np.median(floor):.2f} p99 {np.percentile(floor, 99):.2f} ms")
    for task in ("segmentation", "detection"):
        runs = np.array([(w, c) for t, _, w, c in RUNS[-2 * frames:] if t == task])
        if not len(runs):
            continue
        off = runs[:, 0] - runs[:, 1]
        print(f"{task}: wall p50 {np.median(runs[:, 0]):.2f} p99 {np.percentile(runs[:, 0], 99):.2f} ms, "
              f"CPU p50 {np.median(runs[:, 1]):.2f} p99 {np.percentile(runs[:, 1], 99):.2f} ms, "
              f"wall - CPU p50 {np.median(off):.3f} p90 {np.percentile(off, 90):.3f} "
              f"p99 {np.percentile(off, 99):.3f} max {off.max():.3f} ms")


if __name__ == "__main__":
    main()

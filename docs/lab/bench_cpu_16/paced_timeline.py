"""The one-off timeline behind docs/lab/benchmarks.md, sitting 16: the
fourteenth sitting's script (docs/lab/bench_cpu_14/paced_timeline.py, loaded and
used as it is: its stage, send and PUBACK timings and its ``DETECTOR`` option)
with more events and trials. It measures the shipped code from outside; it is a
record of how the sitting's figures were measured, not part of the station.

    .venv/bin/python docs/lab/bench_cpu_16/paced_timeline.py FPS FRAMES OUT.json ['{run: {...}}']

Added here: paho's socket writes and reads (``io``: kind, start, end, bytes),
the detector's waits for the frames before it (``waits``: start, end, whether
they settled in time), the threads' names by native id (``threads``) and
``wall_minus_mono`` to line the events up with ``perf sched record -k
CLOCK_MONOTONIC``. Trials, each off unless set: ``BROKER=fifo`` and
``PAHO=fifo`` put Mosquitto or paho's network thread under SCHED_FIFO 20 (above
the models); ``SWITCH=S`` sets ``sys.setswitchinterval(S)``; ``HELPER=demote``
makes the detector's run after a wait that ran out under SCHED_OTHER (restored
after); ``PIN=1`` pins the infer thread to CPU 0 and every other thread of the
process, and the broker, to CPU 1 (what ``run.infer_cpu: 0`` now does). Since
6a50bd5 config/bench.yaml sets ``infer_cpu: 0``: runs without it, and every run
with ``PIN=1``, need the override ``'{run: {infer_cpu: null}}'``.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import paho.mqtt.client as paho_client
import yaml

_spec = importlib.util.spec_from_file_location(
    "paced_timeline_14", Path(__file__).resolve().parents[1] / "bench_cpu_14" / "paced_timeline.py")
base = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(base)  # its patches of the daemon, the publisher and the bench apply from here

from station import bench, daemon, pipeline  # noqa: E402
from station.config import load_config  # noqa: E402

IO: list[tuple[str, float, float, int]] = []  # paho's socket: ("w" | "r", start, end, bytes)
_sock_send, _sock_recv = paho_client.Client._sock_send, paho_client.Client._sock_recv


def _timed_sock_send(self, buf):
    t = time.time()
    n = _sock_send(self, buf)
    IO.append(("w", t, time.time(), n))
    return n


def _timed_sock_recv(self, bufsize):
    t = time.time()
    data = _sock_recv(self, bufsize)
    IO.append(("r", t, time.time(), len(data)))
    return data


paho_client.Client._sock_send, paho_client.Client._sock_recv = _timed_sock_send, _timed_sock_recv

WAITS: list[tuple[float, float, bool]] = []  # the detector's waits: start, end, settled in time
_wait = daemon.Settling.wait


def _timed_wait(self, timeout):
    t = time.time()
    settled = _wait(self, timeout)
    WAITS.append((t, time.time(), settled))
    return settled


daemon.Settling.wait = _timed_wait

if os.environ.get("HELPER") == "demote":
    def _demoting_helper(self, work, role):
        if self._yield_to is not None and not self._yield_to(self._yield_s):
            policy, param = os.sched_getscheduler(0), os.sched_getparam(0)
            os.sched_setscheduler(0, os.SCHED_OTHER, os.sched_param(0))
            try:
                return work.inspector.infer(work, (role,))
            finally:
                os.sched_setscheduler(0, policy, param)
        return work.inspector.infer(work, (role,))

    pipeline.ParallelInfer._helper = _demoting_helper

THREADS: dict[str, str] = {}  # native id → thread name


def _every(period_s: float, step) -> None:
    threading.Thread(target=lambda: [(step(), time.sleep(period_s)) for _ in iter(int, 1)], daemon=True).start()


def _names() -> None:
    for t in threading.enumerate():
        THREADS[str(t.native_id)] = t.name


def _realtime_paho() -> None:
    """Put paho's network threads of this process under SCHED_FIFO 20."""
    for t in threading.enumerate():
        if t.name.startswith("paho") and t.native_id:
            os.sched_setscheduler(t.native_id, os.SCHED_FIFO, os.sched_param(20))


def _pin(broker_pid: int) -> None:
    infer = {t.native_id for t in threading.enumerate() if t.name == "infer"}
    for tid in [*map(int, os.listdir("/proc/self/task")), broker_pid]:
        try:
            os.sched_setaffinity(tid, {0} if tid in infer else {1})
        except OSError:
            pass  # a thread that ended meanwhile


def main() -> None:
    _every(0.5, _names)
    if os.environ.get("SWITCH"):
        sys.setswitchinterval(float(os.environ["SWITCH"]))
    fps, frames, out = float(sys.argv[1]), int(sys.argv[2]), Path(sys.argv[3])
    cfg = load_config(base.ROOT / "config" / "bench.yaml")
    for section, values in (yaml.safe_load(sys.argv[4]) if len(sys.argv) > 4 else {}).items():
        cfg = cfg.model_copy(update={section: getattr(cfg, section).model_copy(update=values)})
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        broker = bench.Broker(work)
        if os.environ.get("PIN") == "1":
            _every(0.2, lambda: _pin(broker.proc.pid))
        if os.environ.get("BROKER") == "fifo":
            os.sched_setscheduler(broker.proc.pid, os.SCHED_FIFO, os.sched_param(20))
        if os.environ.get("PAHO") == "fifo":
            _every(0.2, _realtime_paho)
        try:
            camera = bench._camera(cfg, frames, fps, (256, 256))
            run = bench._Run(bench._configure(cfg, camera, broker.port), work / "state", 1, (broker.proc.pid,))
            run.run(300)
        finally:
            broker.stop()
    rows = []
    for seq, captured in sorted(run.captured.items()):
        if seq not in run.acks:
            continue
        events = dict(base.EVENTS.get(base.FRAME_OF[seq], {}), captured=captured, stored=run.stored[seq],
                      acked=run.acks[seq])
        if seq in base.SENT:
            events["sent"] = base.SENT[seq]
        if seq in base.CALLBACK:
            events["puback_callback"] = base.CALLBACK[seq]
        rows.append(events)
    out.write_text(json.dumps({"fps": fps, "detector": base.DETECTOR, "dropped": run.daemon.queue.dropped,
                               "frames": rows, "stage_ms": run.stages, "io": IO, "waits": WAITS,
                               "wall_minus_mono": time.time() - time.monotonic(), "threads": THREADS}))
    lat = np.array([(e["acked"] - e["captured"]) * 1e3 for e in rows])
    print(f"p50 {np.percentile(lat, 50):.2f} p99 {np.percentile(lat, 99):.2f} max {lat.max():.2f} "
          f"dropped {run.daemon.queue.dropped} waits timed out {sum(1 for w in WAITS if not w[2])}")


if __name__ == "__main__":
    main()

"""The one-off timeline behind docs/benchmarks.md's sixteenth sitting (the
fourteenth sitting's script, docs/bench_cpu_14/paced_timeline.py, with more events).

Runs the paced phase of ``station bench`` alone (config/bench.yaml, frames
256 x 256, a local Mosquitto) and times every frame at each hand-over:
capture, preprocessing, inference, finish, the send, paho's PUBACK callback,
the acknowledgement. It wraps the daemon's stage methods from outside, so it
measures the shipped code; it is a record of how the sitting's pairs were
measured, not part of the station.

    .venv/bin/python docs/bench_cpu_14/paced_timeline.py FPS FRAMES OUT.json ['{run: {...}}']

Added here: paho's socket writes and reads (``io``: kind, start, end, bytes)
and the detector's waits for the frames before it (``waits``: start, end,
whether they settled in time). Trials, each off unless set: ``BROKER=fifo``
and ``PAHO=fifo`` put Mosquitto or paho's network thread under SCHED_FIFO 20
(above the models); ``SWITCH=S`` sets ``sys.setswitchinterval(S)``;
``HELPER=demote`` makes the detector's run after a wait that ran out under
SCHED_OTHER (restored after); ``PIN=1`` pins the infer thread to CPU 0 and
every other thread of the process, and the broker, to CPU 1 (what
``run.infer_cpu: 0`` now does; config/bench.yaml sets that since 6a50bd5, so
the unpinned runs need the override ``'{run: {infer_cpu: null}}'``). The output also names the threads by native id
(``threads``) and gives ``wall_minus_mono`` to line the events up with
``perf sched record -k CLOCK_MONOTONIC``. ``DETECTOR=fifo|idle|nice:N`` sets the policy of
the helper thread that runs the detector (fifo: as shipped). The optional YAML overrides sections of the
config (e.g. ``'{run: {nice_non_inference: 10}}'``). It prints p50/p99/max
end-to-end latency and writes each frame's events (UNIX s) and stage times.
"""

from __future__ import annotations

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

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import station.pipeline as pipeline  # noqa: E402
from station import bench, daemon, publish  # noqa: E402
from station.config import load_config  # noqa: E402

EVENTS: dict[int, dict[str, float]] = {}  # frame seq → event → time


def _mark(seq: int, event: str) -> None:
    EVENTS.setdefault(seq, {})[event] = time.time()


def _timed(method, before: str, after: str):
    def wrapper(self, item):
        seq = getattr(getattr(item, "frame", item), "seq", -1)
        _mark(seq, before)
        out = method(self, item)
        _mark(seq, after)
        return out
    return wrapper


daemon.Daemon._prepare = _timed(daemon.Daemon._prepare, "prep0", "prep1")
daemon.Daemon._infer = _timed(daemon.Daemon._infer, "infer0", "infer1")
daemon.Daemon._finish = _timed(daemon.Daemon._finish, "finish0", "finish1")

SENT: dict[int, float] = {}  # outbox seq → handed to paho
CALLBACK: dict[int, float] = {}  # outbox seq → paho's PUBACK callback entered
_send, _on_publish = publish.MqttPublisher._send, publish.MqttPublisher._on_publish


def _timed_send(self, s, topic, payload, qos, retain, seq):
    t = time.time()
    out = _send(self, s, topic, payload, qos, retain, seq)
    if seq is not None:
        SENT[seq] = t
    return out


def _timed_on_publish(self, client, s, mid, reason_code, properties):
    t = time.time()
    seq = s.inflight.get(mid)
    out = _on_publish(self, client, s, mid, reason_code, properties)
    if seq is not None:
        CALLBACK[seq] = t
    return out


publish.MqttPublisher._send, publish.MqttPublisher._on_publish = _timed_send, _timed_on_publish

FRAME_OF: dict[int, int] = {}  # outbox seq → frame seq
_on_published = bench._Run._on_published


def _remember(self, record, seq, captured):
    if seq is not None:
        FRAME_OF[seq] = int(record["source"].rsplit("=", 1)[1])
    return _on_published(self, record, seq, captured)


bench._Run._on_published = _remember

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

_realtime = pipeline.realtime_this_thread
DETECTOR = os.environ.get("DETECTOR", "fifo")


def _helper_policy(priority: int) -> bool:
    """The policy of ParallelInfer's helper thread (the detector)."""
    if DETECTOR == "fifo":
        return _realtime(priority)
    if DETECTOR == "idle":
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
    elif DETECTOR.startswith("nice:"):
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), int(DETECTOR[5:]))
    else:
        raise SystemExit(f"DETECTOR={DETECTOR}: fifo, idle or nice:N")
    return False


pipeline.realtime_this_thread = _helper_policy


def _realtime_paho() -> None:
    """Put paho's network threads of this process under SCHED_FIFO 20 as they appear."""
    done: set[int] = set()
    while True:
        for t in threading.enumerate():
            if t.name.startswith("paho") and t.native_id and t.native_id not in done:
                os.sched_setscheduler(t.native_id, os.SCHED_FIFO, os.sched_param(20))
                done.add(t.native_id)
        time.sleep(0.2)


THREADS = {}


def _names() -> None:
    while True:
        for t in threading.enumerate():
            THREADS[str(t.native_id)] = t.name
        time.sleep(0.5)


def _pin(broker_pid: int) -> None:
    if os.environ.get("PIN") != "1":
        return
    while True:
        infer = {t.native_id for t in threading.enumerate() if t.name == "infer"}
        for tid in map(int, os.listdir("/proc/self/task")):
            try:
                os.sched_setaffinity(tid, {0} if tid in infer else {1})
            except OSError:
                pass
        try:
            os.sched_setaffinity(broker_pid, {1})
        except OSError:
            pass
        time.sleep(0.2)


def main() -> None:
    threading.Thread(target=_names, name="names", daemon=True).start()
    if os.environ.get("SWITCH"):
        sys.setswitchinterval(float(os.environ["SWITCH"]))
    fps, frames, out = float(sys.argv[1]), int(sys.argv[2]), Path(sys.argv[3])
    cfg = load_config(ROOT / "config" / "bench.yaml")
    for section, values in (yaml.safe_load(sys.argv[4]) if len(sys.argv) > 4 else {}).items():
        cfg = cfg.model_copy(update={section: getattr(cfg, section).model_copy(update=values)})
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        broker = bench.Broker(work)
        threading.Thread(target=_pin, args=(broker.proc.pid,), daemon=True).start()
        if os.environ.get("BROKER") == "fifo":
            os.sched_setscheduler(broker.proc.pid, os.SCHED_FIFO, os.sched_param(20))
        if os.environ.get("PAHO") == "fifo":
            threading.Thread(target=_realtime_paho, daemon=True).start()
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
        events = dict(EVENTS.get(FRAME_OF[seq], {}), captured=captured, stored=run.stored[seq], acked=run.acks[seq])
        if seq in SENT:
            events["sent"] = SENT[seq]
        if seq in CALLBACK:
            events["puback_callback"] = CALLBACK[seq]
        rows.append(events)
    out.write_text(json.dumps({"fps": fps, "detector": DETECTOR, "dropped": run.daemon.queue.dropped,
                               "frames": rows, "stage_ms": run.stages, "io": IO, "waits": WAITS, "wall_minus_mono": time.time() - time.monotonic(), "threads": THREADS}))
    lat = np.array([(e["acked"] - e["captured"]) * 1e3 for e in rows])
    print(f"p50 {np.percentile(lat, 50):.2f} p99 {np.percentile(lat, 99):.2f} max {lat.max():.2f} "
          f"dropped {run.daemon.queue.dropped} waits timed out {sum(1 for w in WAITS if not w[2])}")


if __name__ == "__main__":
    main()

"""The one-off timeline behind docs/lab/benchmarks.md, sitting 14.

Runs the paced phase of ``station bench`` alone (config/bench.yaml, frames
256 x 256, a local Mosquitto) and times every frame at each hand-over:
capture, preprocessing, inference, finish, the send, paho's PUBACK callback,
the acknowledgement. It wraps the daemon's stage methods from outside, so it
measures the shipped code; it is a record of how the sitting's pairs were
measured, not part of the station.

    .venv/bin/python docs/lab/bench_cpu_14/paced_timeline.py FPS FRAMES OUT.json ['{run: {...}}']

``DETECTOR=fifo|idle|nice:N`` sets the policy of the helper thread that runs
the detector (fifo: as shipped). The optional YAML overrides sections of the
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
import yaml

ROOT = Path(__file__).resolve().parents[3]
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


def main() -> None:
    fps, frames, out = float(sys.argv[1]), int(sys.argv[2]), Path(sys.argv[3])
    cfg = load_config(ROOT / "config" / "bench.yaml")
    for section, values in (yaml.safe_load(sys.argv[4]) if len(sys.argv) > 4 else {}).items():
        cfg = cfg.model_copy(update={section: getattr(cfg, section).model_copy(update=values)})
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        broker = bench.Broker(work)
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
                               "frames": rows, "stage_ms": run.stages}))
    lat = np.array([(e["acked"] - e["captured"]) * 1e3 for e in rows])
    print(f"p50 {np.percentile(lat, 50):.2f} p99 {np.percentile(lat, 99):.2f} max {lat.max():.2f} "
          f"dropped {run.daemon.queue.dropped}")


if __name__ == "__main__":
    main()

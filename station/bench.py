"""``station bench``: how close the whole station comes to its models alone.

One run measures, on this machine and with the configured models:

1. **bare**: ``InferenceSession.run`` of every model, one frame after the
   other, on tensors prepared beforehand — the limit of any pipeline;
2. **pipeline**: the daemon in this process, from a synthetic camera (plates
   made once and cycled, so producing a frame costs nothing) through
   preprocessing, inference, postprocessing, grading, the SQLite outbox and a
   local Mosquitto until the broker acknowledged each result. Throughput is
   measured with an unpaced, lossless camera (the pipeline's own limit),
   end-to-end latency (capture → PUBACK) with the camera paced at
   each of ``latency_loads`` × that throughput, as on a line the station keeps up with
   (several loads: one paced run each, the first judged against the target);
3. **outbox**: store + acknowledge throughput of the durable outbox alone, and
   results/s through the publisher and the broker;
4. **host**: how long this machine takes to wake a thread that waits for a
   hand-over from another (:func:`wake_latency`), with the CPU idle between
   hand-overs as at a line's pace: a floor under every hand-over in the
   pipeline, and on a virtual machine often the largest part of the p99.

Beside each phase stand the hypervisor's steal share and the CPU time of every
other process on the machine (:func:`_host_figures`), so that a figure bounded
by the host rather than the station shows as such.

It prints a table and writes JSON with the ratios the targets are stated in.
``--compare CONFIG`` instead times the bare runs of two model sets side by side
(station/bench_compare.py).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple, cast

import numpy as np

from . import __version__
from .broker import Mosquitto
from .config import FakeCamera, MqttConfig, StationConfig, load_config
from .errors import StationError
from .inspector import Inspector, Work, open_models
from .messages import result_record
from .outbox import Outbox
from .parallel import ParallelInfer
from .priority import ThreadPolicy, split_cpus
from .types import Frame

if TYPE_CHECKING:
    from .sinks import Delivery

log = logging.getLogger(__name__)

TARGETS = {"ratio": 0.90, "p99_over_bare_median": 2.0, "rss_growth_mb": 10.0, "outbox_per_s": 2000.0}


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


class _Ticks(NamedTuple):
    """CPU clock ticks since boot (/proc/stat, /proc/PID/stat; one unit)."""

    steal: int  # the hypervisor gave this VM's CPUs to other machines
    total: int  # every tick of every CPU
    busy: int  # some process or the kernel ran (not idle, iowait or steal)
    ours: int  # this process's and the bench's broker's


def _proc_ticks(pid: int | str) -> int:
    """utime + stime of a process, 0 where it is gone or unreadable."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()  # after the command name, which may hold spaces
        return int(fields[11]) + int(fields[12])
    except (OSError, IndexError, ValueError):
        return 0


def _host_ticks(pids: Sequence[int] = ()) -> _Ticks | None:
    """The machine's CPU ticks since boot, with those of this process and of
    ``pids`` (the broker); None where /proc/stat is unknown."""
    try:
        with open("/proc/stat") as f:
            fields = f.readline().split()
    except OSError:
        return None
    if not fields or fields[0] != "cpu" or len(fields) < 9:
        return None
    user, nice, system, idle, iowait, irq, softirq, steal = (int(v) for v in fields[1:9])
    ours = _proc_ticks("self") + sum(_proc_ticks(p) for p in pids)
    return _Ticks(steal, user + nice + system + idle + iowait + irq + softirq + steal,
                  user + nice + system + irq + softirq, ours)


def _host_figures(a: _Ticks | None, b: _Ticks | None) -> dict[str, float | None]:
    """What else ran on the machine between two samples:

    * ``host_steal_pct``: the hypervisor's share of the CPUs (given to other
      machines); a run under heavy steal measures the host, not the station;
    * ``others_cpu_pct``: the CPU time of every other process and of the kernel's
      own threads, in % of one CPU like the pipeline's CPU figure. Background
      services that wake up for a few tens of milliseconds stretch the models'
      runs and make most of a p99 on a small machine; this names them as the cause.
    """
    if a is None or b is None or b.total <= a.total:
        return {"host_steal_pct": None, "others_cpu_pct": None}
    total = b.total - a.total
    others = (b.busy - a.busy) - (b.ours - a.ours)
    return {"host_steal_pct": 100.0 * (b.steal - a.steal) / total,
            "others_cpu_pct": max(0.0, 100.0 * (os.cpu_count() or 1) * others / total)}


def _pct(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def _floor_figures(floor: list[float], bare_median_ms: float) -> dict[str, float]:
    return {"p50_ms": _pct(floor, 50), "p99_ms": _pct(floor, 99), "p99_over_bare_median": _pct(floor, 99) / bare_median_ms}


def queue_floor(service_ms: list[float], period_ms: float) -> list[float]:
    """End-to-end latencies (ms) of a pipeline that adds nothing to its models:
    frames arrive every ``period_ms`` and each takes, in order, the next measured
    model time of ``service_ms``, after waiting for the frames before it (Lindley's
    recursion, with the series' own order, so a burst of slow runs stays a burst).

    With the bare runs as ``service_ms`` this is what the models alone reach at a
    paced load on this machine: the floor under the measured end-to-end figures.
    (A paced run's own model times give the floor on the host as it was during
    that run: :meth:`_Run.models_floor_ms`, on the frames' real arrival times.)"""
    if period_ms <= 0:
        raise ValueError(f"period_ms {period_ms}: must be positive")
    out: list[float] = []
    wait = 0.0
    for s_ms in service_ms:
        out.append(wait + s_ms)
        wait = max(0.0, wait + s_ms - period_ms)
    return out


def wake_latency(n: int = 300, gap_s: float = 0.01) -> dict[str, float]:
    """Hand-over from one thread to another that waits on a condition, as the
    pipeline's queues do, ``n`` times ``gap_s`` apart (the CPU idles between):
    ms from the notify to the waiter running, p50/p99."""
    cond = threading.Condition()
    sent: list[float] = []
    woke: list[float] = []

    def waiter() -> None:
        for i in range(n):
            with cond:
                while len(sent) <= i:
                    cond.wait(1.0)
            woke.append(time.perf_counter() - sent[i])

    t = threading.Thread(target=waiter, name="bench-wake", daemon=True)
    t.start()
    for _ in range(n):
        time.sleep(gap_s)
        with cond:
            sent.append(time.perf_counter())
            cond.notify()
    t.join(10.0)
    ms = [w * 1e3 for w in woke]
    return {"n": len(ms), "gap_ms": gap_s * 1e3, "p50": _pct(ms, 50), "p99": _pct(ms, 99)}


BARE_REALTIME_REST = 0.1  # bare runs under SCHED_FIFO: pause after each, as a fraction of its time


def bare(inspector: Inspector, frames: list[Frame], runs: int,
         per_model_ms: dict[str, list[float]] | None = None) -> tuple[dict, list[float]]:
    """The models alone on prepared tensors, run as the daemon's infer stage runs
    them (one after the other, or at the same time with ``tuning.parallel_models``,
    on a thread under ``tuning.realtime_inference``, or at ``tuning.infer_nice``, as the infer thread is): the figures
    (per-frame ms, frames/s from the runs' own times) and the per-frame times in the
    order measured; ``per_model_ms``, when given, gathers each model's run times (ms) by role."""
    prepared = [inspector.prepare(f) for f in frames]
    policy = ThreadPolicy.from_tuning(inspector.cfg.tuning)  # and on the CPUs the daemon gives them
    infer = ParallelInfer("bare", policy)

    def one_frame(i: int) -> Work:
        w = prepared[i % len(prepared)]
        return infer(Work(w.frame, inspector, tensors=dict(w.tensors)))

    per_model: dict[str, list[float]] = {role: [] for role in inspector.models}
    per_frame: list[float] = []

    def measure() -> tuple[bool, bool]:  # on a thread of its own, under the infer stage's policy
        realtime = policy.infer() == "fifo"
        for i in range(4):  # warm-up beyond the load-time one
            one_frame(i)
        for i in range(runs):
            t0 = time.perf_counter()
            work = one_frame(i)
            took = time.perf_counter() - t0
            per_frame.append(took * 1e3)
            for role in per_model:
                per_model[role].append(work.latency[f"infer.{role}"])
            if realtime:
                # Back-to-back SCHED_FIFO runs would use 100 % of a core, and the kernel
                # stops such threads for 50 ms a second (kernel.sched_rt_runtime_us):
                # a pause of a tenth of each run keeps them under that limit, as a
                # line's pace does. The pauses are not counted.
                time.sleep(took * BARE_REALTIME_REST)
        return "infer" in work.latency, realtime

    try:
        with ThreadPoolExecutor(1, thread_name_prefix="bare-runs") as pool:
            parallel, realtime = pool.submit(measure).result()
    finally:
        infer.close()
    if per_model_ms is not None:
        for role, ms in per_model.items():
            per_model_ms.setdefault(role, []).extend(ms)
    elapsed = sum(per_frame) / 1e3
    return {
        "runs": runs,
        "parallel_models": parallel,
        "realtime": realtime,  # whether the models' threads were under SCHED_FIFO
        "fps": runs / elapsed,
        "median_ms": _pct(per_frame, 50),
        "p99_ms": _pct(per_frame, 99),
        "models": {role: {"median_ms": _pct(v, 50), "fps": 1e3 / _pct(v, 50)} for role, v in per_model.items()},
    }, per_frame


class _Run:
    """One daemon run in this process, with its acknowledgements timed: a sink of the
    daemon (station/sinks.py), told of each record as it is stored and of each
    acknowledgement of the broker."""

    def __init__(self, cfg: StationConfig, state_dir: Path, warm: int, pids: Sequence[int] = ()):
        from .daemon import Daemon

        self.acks: dict[int, float] = {}
        self.captured: dict[int, float] = {}
        self.stored: dict[int, float] = {}  # seq → when the finish stage had stored it in the outbox
        self.stages: dict[str, list[float]] = {}
        self.model_ms: list[tuple[float, float]] = []  # each published frame's (capture time, model time ms), in order
        self.warm = warm
        self.marks: dict[str, tuple[float, float, float]] = {}  # name → (wall, cpu, rss)
        self.host: dict[str, _Ticks | None] = {}  # name → the machine's CPU ticks
        self.pids = pids  # other processes of the bench (the broker), counted as its own CPU time
        self._lock = threading.Lock()
        self.daemon = Daemon(cfg, state_dir=state_dir, sinks=[self])
        self.done = threading.Event()
        assert isinstance(cfg.camera, FakeCamera)  # _configure put one there
        self.expected = cfg.camera.frames or 0

    def _mark(self, name: str) -> None:
        self.marks[name] = (time.perf_counter(), _cpu_s(), _rss_mb())
        self.host[name] = _host_ticks(self.pids)

    def deliver(self, record: dict, ctx: Delivery) -> None:
        """A record stored in the outbox under ``ctx.seq`` (the finish thread)."""
        seq, captured = ctx.seq, ctx.captured_at
        if seq is None or "error" in record or captured is None:
            return
        stored = time.time()
        # The frame's own capture time: the record's captured_at is rounded to the
        # millisecond, which would add 0-1 ms (0.5 on average) to every latency.
        with self._lock:
            self.captured[seq] = captured
            self.stored[seq] = stored
            for stage, ms in record["latency_ms"].items():
                self.stages.setdefault(stage, []).append(ms)
            self.model_ms.append((captured, self._models_of(record["latency_ms"])))

    @staticmethod
    def _models_of(latency_ms: dict[str, float]) -> float:
        """A frame's model time: both models together when they ran at once (``infer``,
        tuning.parallel_models), else the sum of their runs."""
        if "infer" in latency_ms:
            return latency_ms["infer"]
        return sum(ms for stage, ms in latency_ms.items() if stage.startswith("infer."))

    def acked(self, seq: int) -> None:
        """The broker acknowledged ``seq`` (paho's network thread)."""
        now = time.time()
        with self._lock:
            self.acks[seq] = now
            n = len(self.acks)
        if n == self.warm:
            self._mark("warm")
        if n == self.expected:
            self._mark("end")
            self.done.set()

    def start(self) -> None:
        pass

    def close(self) -> None:
        pass

    def run(self, timeout: float) -> None:
        self._mark("start")
        thread = threading.Thread(target=self.daemon.run, kwargs={"install_signals": False}, name="bench-daemon")
        thread.start()
        # A finite camera ends the daemon by itself once every part is flushed;
        # frames a paced camera dropped are never acknowledged.
        deadline = time.monotonic() + timeout
        while thread.is_alive() and not self.done.is_set() and time.monotonic() < deadline:
            thread.join(0.2)
        self.daemon.stop_event.set()
        thread.join(60)
        if "end" not in self.marks:
            self._mark("end")
        if len(self.acks) + self.daemon.pipeline.queue.dropped < self.expected:
            raise StationError(f"bench: only {len(self.acks)} of {self.expected} results acknowledged within {timeout:.0f} s")

    def models_floor_ms(self) -> list[float]:
        """Each published frame's latency had the station added nothing to its model run:
        the frames arrive when they were captured and take, in order, the model time this
        run measured for them, each after the one before it (Lindley's recursion on the
        real arrival times, so frames the camera dropped leave their gap). Never above a
        frame's measured latency: its models started after its capture and after the
        frame before it."""
        out: list[float] = []
        free = float("-inf")  # when the models finished the frame before
        for captured, ms in self.model_ms:
            free = max(captured * 1e3, free) + ms
            out.append(free - captured * 1e3)
        return out

    def latencies_ms(self) -> list[float]:
        return [(self.acks[s] - c) * 1e3 for s, c in self.captured.items() if s in self.acks]

    def legs_ms(self) -> dict[str, dict[str, float]]:
        """The end-to-end latency in two legs, p50/p99 each: capture → stored in the
        outbox (queues, the three stages, the record, the SQLite insert) and stored →
        PUBACK (the sender, paho, the broker's round trip, the outbox delete)."""
        acked = [s for s in self.captured if s in self.acks]
        legs = {"capture_to_stored": [(self.stored[s] - self.captured[s]) * 1e3 for s in acked],
                "stored_to_puback": [(self.acks[s] - self.stored[s]) * 1e3 for s in acked]}
        return {k: {"p50": _pct(v, 50), "p99": _pct(v, 99)} for k, v in legs.items()}

    def stage_ms(self) -> dict[str, dict[str, float]]:
        return {k: {"p50": _pct(v, 50), "p99": _pct(v, 99)} for k, v in self.stages.items()}


def _camera(cfg: StationConfig, frames: int, fps: float | None, size: tuple[int, int] | None) -> FakeCamera:
    if size is None:
        cam = cfg.camera
        size = (cam.height, cam.width) if isinstance(cam, FakeCamera) else (480, 640)
    return FakeCamera(type="fake", fps=fps, height=size[0], width=size[1], seed=1, distinct=32, frames=frames)


def _configure(cfg: StationConfig, camera: FakeCamera, port: int) -> StationConfig:
    mqtt = MqttConfig(host="127.0.0.1", port=port, reconnect_min_s=0.2, reconnect_max_s=1.0, max_inflight=1000)
    run = cfg.run.model_copy(update={"stats_interval_s": 3600.0, "state_dir": None})
    return cfg.model_copy(update={"camera": camera, "mqtt": mqtt, "run": run,
                                  "archive": cfg.archive.model_copy(update={"enabled": False}),
                                  "metrics": cfg.metrics.model_copy(update={"enabled": False})})


def outbox_throughput(workdir: Path, record: dict, n: int = 5000) -> float:
    """put + ack of real result payloads, results/s."""
    from .messages import dumps

    payload = dumps(record).encode()
    with Outbox(workdir / "outbox-bench.sqlite3", max_rows=n + 10, max_bytes=len(payload) * (n + 10)) as box:
        t0 = time.perf_counter()
        for i in range(n):
            seq = box.put(f"r{i}", "bench/result", payload, time.time())
            box.ack(seq)
        return n / (time.perf_counter() - t0)


def publisher_throughput(workdir: Path, port: int, record: dict, n: int = 5000) -> float:
    """Results stored, sent and acknowledged through Mosquitto, results/s."""
    from .publish import MqttPublisher

    cfg = MqttConfig(host="127.0.0.1", port=port, max_inflight=1000)
    with Outbox(workdir / "outbox-pub.sqlite3") as box:
        pub = MqttPublisher(cfg, "bench-pub", box)
        pub.start()
        try:
            if not pub.wait_connected(10):
                raise StationError(f"bench: cannot connect to 127.0.0.1:{port}")
            t0 = time.perf_counter()
            for i in range(n):
                pub.publish_result({**record, "id": f"bench-{i}"})
            if not pub.wait_until(lambda p: p.outbox_depth == 0, 120):
                raise StationError("bench: publisher did not drain its outbox")
            return n / (time.perf_counter() - t0)
        finally:
            pub.stop(5)


def gpu_description(models: dict, device_id: int) -> str | None:
    """'NAME, driver D, M MiB' of the GPU the models run on (nvidia-smi), or None when no model
    runs on a GPU provider or nvidia-smi cannot tell."""
    if not any(m.providers and m.providers[0] != "CPUExecutionProvider" for m in models.values()):
        return None
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return None
    try:
        out = subprocess.run([exe, "-i", str(device_id), "--query-gpu=name,driver_version,memory.total",
                              "--format=csv,noheader"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    fields = [f.strip() for f in out.stdout.strip().split(",")]
    if out.returncode != 0 or len(fields) != 3:
        return None
    return f"{fields[0]}, driver {fields[1]}, {fields[2]}"


# set_tcp_nodelay: PUBACKs leave at once instead of waiting behind Nagle's algorithm for
# the TCP acknowledgement of the previous one.
BROKER_OPTIONS = ("max_queued_messages 100000", "set_tcp_nodelay true")


def run_bench(cfg: StationConfig, frames: int, latency_frames: int, latency_loads: tuple[float, ...],
              size: tuple[int, int] | None = None, timeout: float = 3600.0) -> dict:
    with tempfile.TemporaryDirectory(prefix="station-bench-") as tmp:
        work = Path(tmp)
        with Mosquitto(work / "broker", options=BROKER_OPTIONS) as broker:
            return _bench(cfg, frames, latency_frames, latency_loads, size, timeout, work, broker)


def _bench(cfg, frames, latency_frames, latency_loads, size, timeout, work: Path, broker: Mosquitto) -> dict:
    cpus = split_cpus(cfg.tuning.infer_cpu)
    if cpus is not None:  # the broker off the infer thread's CPU, as its unit would keep it (README)
        os.sched_setaffinity(broker.pid, cpus[1])
    models = open_models(cfg)
    inspector = Inspector(models, cfg, keep_mask=False)
    cam = _camera(cfg, frames, None, size)
    from .camera.live import FakeSource

    src = FakeSource(None, cam.height, cam.width, cam.seed, distinct=8)
    src.open()
    sample = cast(list[Frame], [src.read(1.0) for _ in range(8)])  # unpaced, endless: every read is a frame
    report: dict = {
        "station": __version__,
        "machine": _machine(cfg, models),
        "frame": {"height": cam.height, "width": cam.width},
        "models": {r: {"name": m.card.name, "input": [m.card.input.height, m.card.input.width],
                       "providers": m.providers, "sha256": m.sha256} for r, m in models.items()},
    }
    pids = (broker.pid,)
    h0 = _host_ticks(pids)
    report["host"] = {"wake_ms": wake_latency()}
    report["host"].update(_host_figures(h0, _host_ticks(pids)))
    log.info("bare ONNX Runtime runs")
    h0 = _host_ticks(pids)
    report["bare"], bare_ms = bare(inspector, sample, max(50, min(frames // 4, 1000)))
    report["bare"].update(_host_figures(h0, _host_ticks(pids)))

    log.info("pipeline: %d frames, unpaced", frames)
    report["pipeline"] = _throughput_run(_configure(cfg, cam, broker.port), frames, work, timeout, pids)
    runs = []
    for i, load in enumerate(latency_loads):
        pace = load * report["pipeline"]["fps"]
        log.info("latency: %d frames at %.1f frames/s (%.0f %% load)", latency_frames, pace, 100 * load)
        lat_cam = _camera(cfg, latency_frames, pace, (cam.height, cam.width))
        lrun = _Run(_configure(cfg, lat_cam, broker.port), work / f"state-latency-{i}", 1, pids)
        lrun.run(timeout)
        runs.append({"frames": latency_frames, "load": load, "fps": pace,
                     **_latency_figures(lrun, bare_ms, report["bare"]["median_ms"], pace)})
    report["latency"] = runs[0]  # the first load is the one the target is judged at
    report["latency_by_load"] = runs

    record = result_record(inspector.inspect(sample[0]))
    report["outbox"] = {
        "store_ack_per_s": outbox_throughput(work, record),
        "through_broker_per_s": publisher_throughput(work, broker.port, record),
    }
    _judge(report)
    return report


def _machine(cfg: StationConfig, models: dict) -> dict:
    """The machine and the scheduling settings the figures were measured with."""
    return {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
            "onnxruntime": __import__("onnxruntime").__version__,
            "nice": os.getpriority(os.PRIO_PROCESS, 0),  # the bench's own priority (`nice -n`)
            "realtime_inference": cfg.tuning.realtime_inference,
            "nice_non_inference": cfg.tuning.nice_non_inference,
            "helper_yield_ms": cfg.tuning.helper_yield_ms,
            "infer_cpu": cfg.tuning.infer_cpu,  # the broker runs off it too
            "infer_nice": cfg.tuning.infer_nice,  # the infer thread's policy instead of FIFO
            "gpu": gpu_description(models, cfg.inference.device_id)}


def _throughput_run(cfg: StationConfig, frames: int, work: Path, timeout: float, pids: Sequence[int]) -> dict:
    """The unpaced pipeline run: frames/s, CPU and memory from the warm-up's end."""
    warm = min(50, max(1, frames // 10))
    run = _Run(cfg, work / "state-throughput", warm, pids)
    run.run(timeout)
    (w0, c0, r0), (w1, c1, r1) = run.marks["warm"], run.marks["end"]
    return {
        "frames": frames,
        "fps": (frames - warm) / (w1 - w0),
        "cpu_pct": 100.0 * (c1 - c0) / (w1 - w0),
        "rss_mb_start": r0,
        "rss_mb_end": r1,
        "rss_growth_mb": r1 - r0,
        "dropped": run.daemon.pipeline.queue.dropped,
        **_host_figures(run.host["warm"], run.host["end"]),
        "stage_ms": run.stage_ms(),
    }


def _latency_figures(lrun: _Run, bare_ms: list[float], bare_median_ms: float, pace: float) -> dict:
    """The figures of one paced run, beside what the models alone reach at its pace."""
    lat = lrun.latencies_ms()
    floor = queue_floor(bare_ms, 1e3 / pace)
    return {
        "p50_ms": _pct(lat, 50),
        "p99_ms": _pct(lat, 99),
        "p99_over_bare_median": _pct(lat, 99) / bare_median_ms,
        "dropped": lrun.daemon.pipeline.queue.dropped,
        **_host_figures(lrun.host["start"], lrun.host["end"]),
        "legs_ms": lrun.legs_ms(),
        "stage_ms": lrun.stage_ms(),
        # the bare runs queued at the same pace: what the models alone reach here
        "models_alone": _floor_figures(floor, bare_median_ms),
        # this run's own model runs queued at that pace: what a station adding nothing to
        # them would have reached, on the host as it was during this run
        "models_in_run": _floor_figures(lrun.models_floor_ms(), bare_median_ms),
    }


def _judge(report: dict) -> None:
    """The ratios the targets are stated in, and whether each target is met."""
    report["ratios"] = {
        "pipeline_over_bare": report["pipeline"]["fps"] / report["bare"]["fps"],
        "p99_over_bare_median": report["latency"]["p99_over_bare_median"],
    }
    report["targets"] = {
        "pipeline_over_bare >= 0.90": report["ratios"]["pipeline_over_bare"] >= TARGETS["ratio"],
        "p99_e2e <= 2 x bare median": report["ratios"]["p99_over_bare_median"] <= TARGETS["p99_over_bare_median"],
        "rss_growth <= 10 MB": report["pipeline"]["rss_growth_mb"] <= TARGETS["rss_growth_mb"],
        "outbox >= 2000 results/s": report["outbox"]["store_ack_per_s"] >= TARGETS["outbox_per_s"],
    }


def _host_text(d: dict) -> str:
    if d.get("host_steal_pct") is None:
        return ""
    return f"   host steal {d['host_steal_pct']:.0f} %, other processes {d['others_cpu_pct']:.0f} % CPU"


def _realtime_text(r: dict) -> str:
    asked = r["machine"].get("realtime_inference", 0)
    nice = r["machine"].get("infer_nice")
    if nice is not None:
        return f", infer thread at nice {nice:+d}" + (f", other models under SCHED_FIFO {asked}" if asked else "")
    if not asked:
        return ""
    if r["bare"].get("realtime"):
        return f", models under SCHED_FIFO {asked}"
    return f", SCHED_FIFO {asked} refused here: models under the ordinary policy"


def format_report(r: dict) -> str:
    b, p, o = r["bare"], r["pipeline"], r["outbox"]
    lines = [
        f"station bench — {r['machine']['cpus']} CPUs, onnxruntime {r['machine']['onnxruntime']}, "
        f"frames {r['frame']['width']}x{r['frame']['height']}, nice {r['machine']['nice']}"
        + (f" (+{r['machine']['nice_non_inference']} but inference)" if r["machine"].get("nice_non_inference") is not None else "")
        + (f", GPU {r['machine']['gpu']}" if r["machine"].get("gpu") else "")
        + _realtime_text(r)
        + (f", infer thread on CPU {r['machine']['infer_cpu']}" if r["machine"].get("infer_cpu") is not None else ""),
    ]
    for role, m in r["models"].items():
        lines.append(f"  {role}: {m['name']} {m['input'][1]}x{m['input'][0]} on {', '.join(m['providers'])}: "
                     f"bare median {b['models'][role]['median_ms']:.2f} ms")
    lines += [
        f"{'bare (in parallel)' if b['parallel_models'] else 'bare (in turn)':24s}{b['fps']:8.1f} frames/s   "
        f"median {b['median_ms']:.2f} ms   p99 {b['p99_ms']:.2f} ms{_host_text(b)}",
        f"pipeline (to PUBACK)    {p['fps']:8.1f} frames/s   ratio {r['ratios']['pipeline_over_bare']:.3f}   "
        f"CPU {p['cpu_pct']:.0f} %   dropped {p['dropped']}{_host_text(p)}",
        *(f"end-to-end at {run['load']:4.0%} load p50 {run['p50_ms']:.2f} ms   p99 {run['p99_ms']:.2f} ms   "
          f"= {run['p99_over_bare_median']:.2f} x bare median   dropped {run['dropped']}"
          f"{_host_text(run)}\n"
          f"  capture → stored             p50 {run['legs_ms']['capture_to_stored']['p50']:.2f} ms   "
          f"p99 {run['legs_ms']['capture_to_stored']['p99']:.2f} ms;   stored → PUBACK p50 "
          f"{run['legs_ms']['stored_to_puback']['p50']:.2f} ms   p99 {run['legs_ms']['stored_to_puback']['p99']:.2f} ms\n"
          f"  models alone at that pace    p50 {run['models_alone']['p50_ms']:.2f} ms   "
          f"p99 {run['models_alone']['p99_ms']:.2f} ms   = {run['models_alone']['p99_over_bare_median']:.2f} x\n"
          f"  this run's model runs queued p50 {run['models_in_run']['p50_ms']:.2f} ms   "
          f"p99 {run['models_in_run']['p99_ms']:.2f} ms   = {run['models_in_run']['p99_over_bare_median']:.2f} x"
          for run in r["latency_by_load"]),
        f"RSS                     {p['rss_mb_start']:.1f} → {p['rss_mb_end']:.1f} MB over {p['frames']} frames "
        f"({p['rss_growth_mb']:+.1f} MB)",
        f"outbox                  {o['store_ack_per_s']:8.0f} store+ack/s   {o['through_broker_per_s']:8.0f} results/s through the broker",
        f"thread wake-up           p50 {r['host']['wake_ms']['p50']:.3f} ms   p99 {r['host']['wake_ms']['p99']:.3f} ms   "
        f"(a hand-over between threads after {r['host']['wake_ms']['gap_ms']:.0f} ms idle)"
        f"{_host_text(r['host'])}",
        "stages (ms, pipeline run):",
    ]
    for stage, q in p["stage_ms"].items():
        lines.append(f"  {stage:<28} p50 {q['p50']:8.3f}   p99 {q['p99']:8.3f}")
    lines.append("targets: " + "   ".join(f"{k}: {'yes' if v else 'NO'}" for k, v in r["targets"].items()))
    return "\n".join(lines)


def add_bench_parser(sub) -> None:
    b = sub.add_parser("bench", help="measure the pipeline against bare ONNX Runtime",
                       description=__doc__.split("\n\n")[0])
    b.add_argument("-c", "--config", type=Path, help="config YAML: models, inference and postprocess settings")
    b.add_argument("--frames", type=int, default=2000, help="frames through the pipeline (default 2000)")
    b.add_argument("--latency-frames", type=int, default=500, help="frames of the paced latency run (default 500)")
    b.add_argument("--latency-load", type=float, nargs="+", default=[0.8], metavar="LOAD",
                   help="pace of the latency run, × pipeline throughput; several values: one latency run each "
                        "(the targets are judged at the first)")
    b.add_argument("--size", type=int, nargs=2, metavar=("H", "W"), help="camera frame size (default: the fake camera's, else 480 640)")
    b.add_argument("--json", type=Path, metavar="FILE", help="write the report as JSON")
    b.add_argument("--compare", type=Path, metavar="CONFIG", help="instead: the bare runs of -c's models and of "
                   "CONFIG's, interleaved in one run, and their ratio (e.g. float against INT8 models)")
    b.set_defaults(func=cmd_bench, log_level=logging.INFO)


def cmd_bench(args: argparse.Namespace) -> int:
    if args.frames < 20 or args.latency_frames < 10:
        raise StationError("--frames must be at least 20 and --latency-frames at least 10")
    bad = [load for load in args.latency_load if not 0 < load <= 1]
    if bad:
        raise StationError(f"--latency-load {bad[0]:g}: must be in (0, 1]")
    cfg = load_config(args.config)
    if args.compare is not None:
        from .bench_compare import cmd_compare

        return cmd_compare(args, cfg)
    report = run_bench(cfg, args.frames, args.latency_frames, tuple(args.latency_load),
                       tuple(args.size) if args.size else None)
    report["command"] = " ".join(["station", *sys.argv[1:]])
    print(format_report(report))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0

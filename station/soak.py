"""Soak test: run ``station run`` at full rate for a while and watch it for leaks.

    python -m station.soak [-c CONFIG] --minutes 30 --out soak.json [--plot soak.png]

The daemon runs as a child process (the same command line systemd uses) with
a fake camera by default, publishing to a local Mosquitto that the soak tool
starts on a free loopback port unless the config names a broker
(``--broker HOST:PORT`` overrides it). A collecting MQTT subscriber counts the
results that arrive. Every ``--interval`` seconds the tool samples, from
``/proc/<pid>``: resident memory (VmRSS, VmHWM), open file descriptors,
threads and CPU time; plus the state directory's size (everything the
daemon keeps there), the outbox's files and its write-ahead log's, and the
results received.

At the end the daemon is stopped with SIGTERM (its exit code is recorded) and
the tool writes JSON (samples + summary), optionally a PNG plot (matplotlib,
if installed), and prints a summary: growth of RSS, fds and threads between
the end of the warm-up and the end, and the RSS slope over the second half
(MiB per hour, least squares). Exit code 0 when the daemon ran to the end and
stopped cleanly, 1 otherwise (the JSON is written either way).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import yaml

from .broker import Mosquitto
from .config import load_config

DEFAULT_CONFIG = """\
# The soak default: synthetic plates as fast as the daemon inspects them
# (fps null: lossless, never dropped), cycling through 64 distinct plates.
station: {id: soak}
camera: {type: fake, fps: null, distinct: 64}
run: {queue_size: 8, stats_interval_s: 5}
"""

PAGE = os.sysconf("SC_PAGE_SIZE")
TICKS = os.sysconf("SC_CLK_TCK")


# --- /proc sampling -------------------------------------------------------------------


def proc_sample(pid: int) -> dict[str, Any]:
    """RSS and peak RSS (KiB), threads, open fds and CPU seconds of ``pid``."""
    status: dict[str, str] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        status[key] = value.strip()
    stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return {
        "rss_kib": int(status["VmRSS"].split()[0]),
        "hwm_kib": int(status["VmHWM"].split()[0]),
        "threads": int(status["Threads"]),
        "fds": len(os.listdir(f"/proc/{pid}/fd")),
        "cpu_s": (int(stat[11]) + int(stat[12])) / TICKS,  # utime + stime
    }


def state_sizes(state: Path) -> dict[str, int]:
    """Bytes under the state directory (all files), in the outbox's files and in its WAL."""
    sizes = {"state_bytes": 0, "outbox_bytes": 0, "wal_bytes": 0}
    for path in state.rglob("*") if state.is_dir() else ():
        try:
            size = path.stat().st_size if path.is_file() else 0
        except OSError:
            continue  # removed meanwhile (archive pruning)
        sizes["state_bytes"] += size
        if path.parent == state and path.name.startswith("outbox.sqlite3"):
            sizes["outbox_bytes"] += size
            sizes["wal_bytes"] += size if path.name == "outbox.sqlite3-wal" else 0
    return sizes


# --- a counting subscriber ---------------------------------------------------------------


class ResultCounter:
    """Counts results (and distinct ids) on ``<prefix>/result``."""

    def __init__(self, host: str, port: int, topic: str):
        import paho.mqtt.client as mqtt
        from paho.mqtt.enums import CallbackAPIVersion

        self.count = 0
        self.errors = 0
        self.ids: set[str] = set()
        self._lock = threading.Lock()
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"soak-{os.getpid()}")
        self.client.on_connect = lambda c, u, f, rc, p: c.subscribe(topic, 1)
        self.client.on_message = self._on_message
        self.client.connect_async(host, port, keepalive=30)
        self.client.loop_start()

    def _on_message(self, client, userdata, msg) -> None:
        try:
            record = json.loads(msg.payload)
        except ValueError:
            return
        with self._lock:
            self.count += 1
            self.ids.add(record.get("id") or f"{record.get('source')}@{record.get('seq')}")
            self.errors += "error" in record

    def snapshot(self) -> tuple[int, int, int]:
        with self._lock:
            return self.count, len(self.ids), self.errors

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


# --- the run --------------------------------------------------------------------------


def _slope_per_hour(ts: list[float], ys: list[float]) -> float:
    """Least-squares slope of ys over ts (seconds), per hour; 0 for < 3 points."""
    n = len(ts)
    if n < 3:
        return 0.0
    mt, my = sum(ts) / n, sum(ys) / n
    var = sum((t - mt) ** 2 for t in ts)
    if var == 0:
        return 0.0
    return sum((t - mt) * (y - my) for t, y in zip(ts, ys)) / var * 3600.0


def summarize(samples: list[dict], warmup_s: float) -> dict[str, Any]:
    """Growth of RSS / fds / threads from the first sample after ``warmup_s`` to the last,
    and the RSS slope over the second half of the run."""
    if not samples:
        return {}
    steady = [s for s in samples if s["t"] >= warmup_s] or samples
    first, last = steady[0], samples[-1]
    half = [s for s in samples if s["t"] >= samples[-1]["t"] / 2] or samples
    duration = last["t"] - samples[0]["t"]
    return {
        "duration_s": round(last["t"], 1),
        "samples": len(samples),
        "warmup_s": warmup_s,
        "rss_mib": {"start": round(samples[0]["rss_kib"] / 1024, 1), "after_warmup": round(first["rss_kib"] / 1024, 1),
                    "end": round(last["rss_kib"] / 1024, 1), "peak": round(max(s["hwm_kib"] for s in samples) / 1024, 1),
                    "growth_after_warmup": round((last["rss_kib"] - first["rss_kib"]) / 1024, 1),
                    "slope_second_half_mib_per_h": round(_slope_per_hour([s["t"] for s in half],
                                                                         [s["rss_kib"] / 1024 for s in half]), 2)},
        "fds": {"after_warmup": first["fds"], "end": last["fds"], "max": max(s["fds"] for s in samples),
                "growth_after_warmup": last["fds"] - first["fds"]},
        "threads": {"after_warmup": first["threads"], "end": last["threads"], "max": max(s["threads"] for s in samples),
                    "growth_after_warmup": last["threads"] - first["threads"]},
        "results_received": last["received"],
        "distinct_ids": last["distinct"],
        "error_records": last["error_records"],
        "results_per_s": round(last["received"] / duration, 1) if duration > 0 else 0.0,
        "cpu_s": round(last["cpu_s"], 1),
        "outbox_bytes_end": last["outbox_bytes"],
        "outbox_bytes_max": max(s["outbox_bytes"] for s in samples),
        "wal_bytes_max": max(s["wal_bytes"] for s in samples),
        "state_bytes_max": max(s["state_bytes"] for s in samples),
    }


def _prepare_config(config: Path | None, workdir: Path, broker: str | None) -> tuple[Path, tuple[str, int, str] | None, Mosquitto | None]:
    """The config the daemon runs with: the given one (paths made absolute) or
    the soak default, pointed at ``broker`` or at a local Mosquitto."""
    if config is not None:
        cfg = load_config(config)
        # Every field, None included: an explicit null (camera fps: null, unpaced)
        # left out would come back as the field's default.
        data = cfg.model_dump(mode="json")
    else:
        data = yaml.safe_load(DEFAULT_CONFIG)
    local = None
    mqtt = data.get("mqtt")
    if broker is not None:
        host, _, port = broker.rpartition(":")
        mqtt = {**(mqtt or {}), "host": host or "127.0.0.1", "port": int(port)}
    elif mqtt is None:
        local = Mosquitto(workdir, start_timeout=10).start()
        mqtt = {"host": "127.0.0.1", "port": local.port}
    data["mqtt"] = mqtt
    path = workdir / "soak.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    cfg = load_config(path)  # validated as the daemon will read it
    assert cfg.mqtt is not None  # written above
    from .messages import topics_for

    topic = topics_for(cfg.mqtt, cfg.station.id).result
    counted = None if cfg.mqtt.tls is not None or cfg.mqtt.auth is not None else (cfg.mqtt.host, cfg.mqtt.effective_port, topic)
    return path, counted, local


def soak(config: Path | None, minutes: float, out: Path, plot: Path | None = None, interval: float = 5.0,
         broker: str | None = None, workdir: Path | None = None, warmup_s: float | None = None,
         quiet: bool = False) -> dict[str, Any]:
    workdir = Path(workdir or tempfile.mkdtemp(prefix="station-soak-"))
    workdir.mkdir(parents=True, exist_ok=True)
    duration = minutes * 60.0
    warmup_s = min(60.0, duration / 10) if warmup_s is None else warmup_s
    cfg_path, counted, local = _prepare_config(config, workdir, broker)
    state = workdir / "state"
    log_path = workdir / "daemon.log"
    counter = ResultCounter(*counted) if counted else None
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "station", "run", "-c", str(cfg_path), "--state-dir", str(state)],
                            stdout=open(log_path, "ab"), stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env)
    samples: list[dict] = []
    try:
        died = _sample(proc, counter, state, duration, interval, quiet, samples)
    finally:
        exit_code = _stop(proc)
        if counter is not None:
            _last_counts(counter, log_path, samples)
        if local is not None:
            local.stop()
    summary = summarize(samples, warmup_s)
    summary["daemon_results"] = _daemon_count(log_path)
    summary.update({"exit_code": exit_code, "died_early": died, "config": str(config) if config else "(soak default)",
                    "daemon_log": str(log_path), "interval_s": interval, "requested_minutes": minutes})
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"summary": summary, "samples": samples}, indent=1) + "\n")
    if plot is not None:
        write_plot(samples, plot)
    return summary


def _sample(proc: subprocess.Popen, counter: ResultCounter | None, state: Path, duration: float, interval: float,
            quiet: bool, samples: list[dict]) -> bool:
    """A sample of the daemon into ``samples`` every ``interval`` s for ``duration`` s; True
    when it died early."""
    t0 = next_t = time.monotonic()
    while True:
        now = time.monotonic()
        if now - t0 >= duration:
            return False
        if proc.poll() is not None:
            return True
        if now >= next_t:
            next_t += interval
            try:
                s = proc_sample(proc.pid)
            except (OSError, KeyError, IndexError):
                continue  # the process is exiting; poll() tells next turn
            received, distinct, errors = counter.snapshot() if counter else (0, 0, 0)
            samples.append({"t": round(now - t0, 2), **s, "received": received, "distinct": distinct,
                            "error_records": errors, **state_sizes(state)})
            if not quiet:
                print(f"soak t={now - t0:7.1f}s rss={s['rss_kib'] / 1024:7.1f} MiB fds={s['fds']:3d} "
                      f"threads={s['threads']:3d} results={received}", file=sys.stderr, flush=True)
        time.sleep(min(0.2, max(0.0, next_t - time.monotonic())))


def _stop(proc: subprocess.Popen) -> int | None:
    """SIGTERM (then SIGKILL after 60 s) unless it ended already: its exit code."""
    if proc.poll() is not None:
        return proc.returncode
    proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.wait(5)


def _last_counts(counter: ResultCounter, log_path: Path, samples: list[dict]) -> None:
    """Wait up to 5 s for the results flushed at the stop, put the final counts into the last sample."""
    deadline = time.monotonic() + 5.0
    inspected = _daemon_count(log_path)
    while counter.snapshot()[1] < inspected and time.monotonic() < deadline:
        time.sleep(0.1)
    received, distinct, errors = counter.snapshot()
    if samples:
        samples[-1].update(received=received, distinct=distinct, error_records=errors)
    counter.close()


def _daemon_count(log_path: Path) -> int:
    """Results + error records the daemon counted, from its last ``stopped:`` log line (0 if none)."""
    import ast
    import re

    try:
        lines = [ln for ln in log_path.read_text(errors="replace").splitlines() if "station.daemon: stopped: {" in ln]
    except OSError:
        return 0
    if not lines:
        return 0
    m = re.search(r"stopped: (\{.*?\}), (\d+) errors", lines[-1])
    return sum(ast.literal_eval(m.group(1)).values()) + int(m.group(2)) if m else 0


def write_plot(samples: list[dict], path: Path) -> bool:
    """RSS, fds and threads over time as a PNG; False when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("soak: matplotlib not installed, no plot", file=sys.stderr)
        return False
    t = [s["t"] / 60 for s in samples]
    fig, axes = plt.subplots(3, 1, figsize=(8, 7), sharex=True)
    axes[0].plot(t, [s["rss_kib"] / 1024 for s in samples])
    axes[0].set_ylabel("RSS (MiB)")
    axes[1].plot(t, [s["fds"] for s in samples])
    axes[1].set_ylabel("open fds")
    axes[2].plot(t, [s["threads"] for s in samples])
    axes[2].set_ylabel("threads")
    axes[2].set_xlabel("minutes")
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.suptitle("station run soak")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return True


def format_summary(s: dict) -> str:
    if not s.get("samples"):
        return f"soak: no samples (exit code {s.get('exit_code')}, see {s.get('daemon_log')})"
    r, f, th = s["rss_mib"], s["fds"], s["threads"]
    return "\n".join([
        f"soak: {s['duration_s'] / 60:.1f} min, {s['samples']} samples, daemon exit code {s['exit_code']}"
        + (" (DIED EARLY)" if s["died_early"] else ""),
        f"  results received: {s['results_received']} ({s['results_per_s']}/s), distinct ids {s['distinct_ids']}, "
        f"error records {s['error_records']}; the daemon counted {s.get('daemon_results', 0)}",
        f"  RSS MiB: start {r['start']}, after warm-up {r['after_warmup']}, end {r['end']}, peak {r['peak']}; "
        f"growth {r['growth_after_warmup']:+}; slope (2nd half) {r['slope_second_half_mib_per_h']:+} MiB/h",
        f"  fds: {f['after_warmup']} -> {f['end']} (max {f['max']}, growth {f['growth_after_warmup']:+})",
        f"  threads: {th['after_warmup']} -> {th['end']} (max {th['max']}, growth {th['growth_after_warmup']:+})",
        f"  outbox bytes: end {s['outbox_bytes_end']}, max {s['outbox_bytes_max']} (its WAL max {s['wal_bytes_max']}); "
        f"state directory max {s['state_bytes_max']}; CPU {s['cpu_s']} s",
    ])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m station.soak", description=__doc__.split("\n\n")[0])
    p.add_argument("-c", "--config", type=Path, help="daemon config (default: fake camera, unpaced, 64 distinct plates)")
    p.add_argument("--minutes", type=float, required=True, help="how long to run")
    p.add_argument("--out", type=Path, default=Path("soak.json"), help="JSON samples and summary")
    p.add_argument("--plot", type=Path, help="PNG plot of RSS, fds and threads (needs matplotlib)")
    p.add_argument("--interval", type=float, default=5.0, help="seconds between samples")
    p.add_argument("--warmup", type=float, help="seconds excluded from growth figures (default: min(60, 10%% of the run))")
    p.add_argument("--broker", metavar="HOST:PORT", help="use this broker instead of the config's or a local one")
    p.add_argument("--workdir", type=Path, help="folder for the derived config, state and logs (default: a temp folder)")
    p.add_argument("-q", "--quiet", action="store_true", help="no per-sample progress lines")
    args = p.parse_args(argv)
    from .errors import StationError

    try:
        summary = soak(args.config, args.minutes, args.out, args.plot, args.interval, args.broker, args.workdir,
                       args.warmup, args.quiet)
    except StationError as exc:
        print(f"station.soak: error: {exc}", file=sys.stderr)
        return 2
    print(format_summary(summary))
    return 0 if summary.get("exit_code") == 0 and not summary.get("died_early") else 1


if __name__ == "__main__":
    sys.exit(main())

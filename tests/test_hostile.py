"""Hostile configs, and reloads that cannot finish: `station check-config` exits 2 at once with
bounded memory; a SIGHUP never stalls the line nor the watchdog, and a failed reload keeps the
running config. (Hostile files: test_hostile_files.py; triggers: test_hostile_triggers.py; the
state directory at full rate: test_hostile_state.py.)"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from daemonkit import wait_until
from test_bad_input import PEAK

from station.cli import main
from station.config import load_config
from station.errors import StationError
from station.preflight import check_for_run

BOMB = "".join(f"{k}: &{k} [" + ", ".join([f"*{p}"] * 9 if p else ["lol"] * 9) + "]\n"
               for p, k in zip([None, *"abcdefgh"], "abcdefghi"))

# (name, file content, what the error names): built to take time or memory, each checked in a fresh
# interpreter whose wall time and peak memory are measured
BOMBS = [
    ("billion laughs", BOMB.encode(), "aliases are expanded"),
    ("2 MiB of comment", b"#" * (2 << 20), "a config is at most"),
    ("100,000 nested flow lists", b"station: {id: a}\nx: " + b"[" * 100_000, "nested more than 32 levels"),
    ("100,000 nested flow maps", b"x: " + b"{a: " * 100_000, "nested more than 32 levels"),
    ("deep block nesting", "".join("  " * i + f"k{i}:\n" for i in range(200)).encode(), "nested more than 32 levels"),
]
# and the other hostile configs, small: checked by the same command in this process
HOSTILE_CONFIGS = [
    ("binary garbage", bytes(range(256)) * 64, "config"),
    ("not UTF-8", b"station: {id: \xff\xfe}\n", "config"),
    ("a Python object tag", b"station: !!python/object/apply:os.system ['true']\n", "invalid YAML"),
    ("a station id that cannot be a topic level", b"station: {id: 'cam#1'}\ncamera: {type: fake}\n"
     b"mqtt: {host: 127.0.0.1}\n", "cannot be an MQTT topic level"),
    ("an mqtt trigger without mqtt", b"station: {id: a}\ncamera: {type: fake}\ntrigger: {type: mqtt}\n",
     "trigger.type: mqtt needs an mqtt section"),
    ("the inference thread on a CPU this host lacks", b"station: {id: a}\ncamera: {type: fake}\ntuning: {infer_cpu: 4095}\n",
     "tuning.infer_cpu 4095"),
    ("a password file that is not there", b"station: {id: a}\ncamera: {type: fake}\n"
     b"mqtt: {host: 127.0.0.1, auth: {username: u, password_file: /nonexistent/pw}}\n", "mqtt.auth.password_file"),
    ("a null byte", b"station: {id: \"a\\0b\"}\n", "station"),
]


def _check_config(path: Path) -> tuple[int, str, float, float]:
    """`station check-config --no-models` on ``path`` in a fresh interpreter: exit code, stderr,
    wall seconds and the child's own peak RSS in MiB (VmHWM, see test_bad_input.PEAK)."""
    t0 = time.perf_counter()
    run = subprocess.run([sys.executable, "-c", PEAK, "check-config", "--no-models", str(path)], capture_output=True,
                         text=True, timeout=60)
    wall = time.perf_counter() - t0
    line = next((ln for ln in run.stderr.splitlines() if ln.startswith("PEAK_RSS_KIB")), None)
    assert line is not None, run.stderr[-3000:]
    return run.returncode, run.stderr, wall, int(line.split()[1]) / 1024


@pytest.mark.parametrize("name,content,names", HOSTILE_CONFIGS, ids=[c[0] for c in HOSTILE_CONFIGS])
def test_a_hostile_config_is_refused_with_exit_2_naming_the_problem(tmp_path, capsys, name, content, names):
    path = tmp_path / "hostile.yaml"
    path.write_bytes(content)
    assert main(["check-config", "--no-models", str(path)]) == 2
    err = capsys.readouterr().err
    assert names in err and str(path) in err, err
    assert "Traceback" not in err
    with pytest.raises(StationError):
        check_for_run(load_config(path))


@pytest.mark.parametrize("name,content,names", BOMBS, ids=[c[0] for c in BOMBS])
def test_a_hostile_config_exits_2_at_once_with_bounded_memory(tmp_path, name, content, names):
    path = tmp_path / "hostile.yaml"
    path.write_bytes(content)
    code, err, wall, rss = _check_config(path)
    t0 = time.perf_counter()
    with pytest.raises(StationError):
        check_for_run(load_config(path))
    print(f"{name}: exit {code}, {wall:.2f} s, {rss:.0f} MiB; parse and checks in process {1e3 * (time.perf_counter() - t0):.1f} ms")
    assert code == 2, err
    assert names in err and str(path) in err, err
    assert "Traceback" not in err
    # minutes and gigabytes before the limits; now the interpreter's start and station's imports
    # (0.5-1 s, about 100 MiB) and a few ms of parsing. A loose bound: this machine is shared.
    assert wall < _startup_s() + 3.0, (wall, _startup_s())
    assert rss < 400, rss


_STARTUP: list[float] = []


def _startup_s() -> float:
    """What this machine takes to start `station --version` (the floor of any CLI run), measured once."""
    if not _STARTUP:
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-m", "station", "check-config", "--no-models", os.devnull],
                       capture_output=True, timeout=60)
        _STARTUP.append(time.perf_counter() - t0)
    return _STARTUP[0]


# --- reloads that cannot finish, or fail ------------------------------------------------------


class _NotifySocket:
    """A systemd notify socket: collects the daemon's READY/WATCHDOG/RELOADING datagrams with their times."""

    def __init__(self, path: Path):
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.2)
        self.messages: list[tuple[float, str]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._collect, daemon=True)
        self._thread.start()

    def _collect(self) -> None:
        while not self._stop.is_set():
            try:
                data = self.sock.recv(4096)
            except socket.timeout:
                continue
            for line in data.decode().splitlines():
                self.messages.append((time.monotonic(), line))

    def since(self, t: float, what: str) -> int:
        return sum(1 for ts, m in list(self.messages) if ts >= t and m == what)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2)
        self.sock.close()


def test_a_reload_that_never_finishes_stalls_neither_the_line_nor_the_watchdog(tmp_path, stations):
    """The config file replaced by a FIFO nobody writes: the reload's read blocks for good.
    Results and watchdog pings go on; a bomb written into the FIFO is refused; the daemon
    keeps its config, reloads a good one after that, and stops at once on SIGTERM."""
    out = tmp_path / "results.jsonl"
    good = "station: {id: cam1}\ncamera: {type: fake, fps: 40}\n"
    notify = _NotifySocket(tmp_path / "notify.sock")
    env = {"NOTIFY_SOCKET": str(notify.path), "WATCHDOG_USEC": "1000000", "WATCHDOG_PID": ""}
    station = stations(tmp_path, good, "--jsonl", str(out), state=False, env=env)
    cfg = station.cfg

    def results() -> int:
        return out.read_text().count("\n") if out.exists() else 0

    try:
        wait_until(lambda: results() >= 5, 60, "first results")
        cfg.unlink()
        os.mkfifo(cfg)
        t0 = time.monotonic()
        n = results()
        station.signal(signal.SIGHUP)
        wait_until(lambda: notify.since(t0, "RELOADING=1") >= 1, 10, "RELOADING=1")
        time.sleep(3.0)  # the reload is blocked on the FIFO all this time
        assert results() >= n + 40, "the line stalled during the reload"
        assert notify.since(t0 + 0.5, "WATCHDOG=1") >= 4, notify.messages[-10:]
        with open(cfg, "wb") as fifo:  # the blocked reload reads a bomb now
            fifo.write(BOMB.encode())
        wait_until(lambda: "reload refused" in station.text(), 10, "the refused reload")
        os.unlink(cfg)
        cfg.write_text(good + "grading: {total_area_pct: {discount: null, reject: 0.0}, defect_area_pct: null}\n")
        station.signal(signal.SIGHUP)
        wait_until(lambda: "reloaded" in station.text(), 10, "the good reload")
        n = results()
        wait_until(lambda: results() >= n + 5, 10, "results after it")
        station.signal(signal.SIGTERM)
        assert station.wait(15) == 0
    finally:
        notify.close()
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert all("grade" in r for r in records)
    assert "aliases are expanded" in station.text()

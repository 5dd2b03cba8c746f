"""The shipped units pass `systemd-analyze verify` and keep their exposure low, and
the daemon, traced with strace, makes no system call their filter denies.

The units name /opt/station/.venv/bin/station (the install path in the README);
the test points them at this checkout's console script, which verify needs to
find, and changes nothing else."""

from __future__ import annotations

import functools
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

UNITS = Path(__file__).resolve().parent.parent / "systemd"
INSTALLED = "/opt/station/.venv/bin/station"

pytestmark = pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed")


@pytest.fixture
def units(tmp_path) -> list[Path]:
    station = Path(sys.executable).parent / "station"
    if not station.exists():
        pytest.skip(f"{station} not installed (pip install -e .)")
    out = []
    for unit in sorted(UNITS.glob("*.service")):
        text = unit.read_text()
        assert INSTALLED in text, f"{unit.name} should run {INSTALLED}"
        copy = tmp_path / unit.name
        copy.write_text(text.replace(INSTALLED, str(station)))
        out.append(copy)
    assert [u.name for u in out] == ["station.service", "station@.service"]
    return out


def test_verify_is_clean(units):
    proc = subprocess.run(["systemd-analyze", "verify", *map(str, units)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and proc.stdout.strip() == "" and proc.stderr.strip() == "", proc.stderr


@pytest.mark.parametrize("index", [0, 1])
def test_security_exposure_at_most_3(units, index):
    unit = units[index]
    if unit.name.endswith("@.service"):  # an instance of the template
        unit = unit.rename(unit.with_name("station@cam1.service"))
    proc = subprocess.run(["systemd-analyze", "security", "--offline=true", str(unit)],
                          capture_output=True, text=True, timeout=60)
    m = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", proc.stdout + proc.stderr)
    assert m, proc.stdout + proc.stderr
    assert float(m.group(1)) <= 3.0


def test_units_are_notify_with_watchdog_and_hardened():
    for unit in UNITS.glob("*.service"):
        text = unit.read_text()
        for line in ("Type=notify", "WatchdogSec=", "Restart=on-failure", "StartLimitBurst=", "NoNewPrivileges=yes",
                     "ProtectSystem=strict", "ProtectHome=yes", "PrivateTmp=yes", "SupplementaryGroups=video",
                     "DeviceAllow=char-video4linux rw", "StateDirectory="):
            assert line in text, f"{unit.name}: {line} missing"
        # ProcSubset=pid hides /proc/cpuinfo, which ONNX Runtime reads to learn the CPU's cores.
        assert not re.search(r"^ProcSubset=pid", text, re.M), f"{unit.name}: ProcSubset=pid hides /proc/cpuinfo"


def test_units_allow_the_model_thread_priorities_the_config_allows():
    """tuning.realtime_inference and tuning.infer_nice need no capability under the units: they allow
    SCHED_FIFO up to 10 and nice values down to -20."""
    for unit in UNITS.glob("*.service"):
        text = unit.read_text()
        for line in ("RestrictRealtime=no", "LimitRTPRIO=10", "LimitNICE=-20"):
            assert re.search(rf"^{line}$", text, re.M), f"{unit.name}: {line} missing"


# --- the daemon inside the units' system-call filter ---------------------------------------------------------------

STRACE = shutil.which("strace")
REPO = UNITS.parent


@functools.cache
def syscall_group(name: str) -> frozenset[str]:
    """The system calls of a systemd filter group (``@system-service`` …), nested groups expanded."""
    out = subprocess.run(["systemd-analyze", "syscall-filter", name], capture_output=True, text=True,
                         timeout=60, check=True).stdout
    calls: set[str] = set()
    for line in out.splitlines()[1:]:
        entry = line.strip()
        if entry and not entry.startswith("#"):
            calls |= syscall_group(entry) if entry.startswith("@") else {entry}
    return frozenset(calls)


def allowed_syscalls(unit_text: str) -> set[str]:
    """The allow-list that a unit's ``SystemCallFilter=`` lines make, in systemd's order: the first
    line (without ``~``) is the list, later lines add to it or, with ``~``, take away from it."""
    allowed: set[str] = set()
    for i, value in enumerate(re.findall(r"^SystemCallFilter=(.*)$", unit_text, re.M)):
        deny = value.startswith("~")
        assert i > 0 or not deny, "the first SystemCallFilter= line should be an allow-list"
        names = value.lstrip("~").split()
        calls = set().union(*(syscall_group(n) if n.startswith("@") else {n} for n in names))
        allowed = allowed - calls if deny else allowed | calls
    return allowed


def traced_syscalls(trace: str) -> set[str]:
    """System call names in ``strace -f`` output (``PID name(args…`` lines)."""
    return set(re.findall(r"^\d+\s+([a-z0-9_]+)\(", trace, re.M))


# Both shipped models at once, one ONNX Runtime thread each, under SCHED_FIFO, the other threads
# lowered all the same (by default they stay at the process's priority); the embedded default
# (the demo model, ONNX Runtime's own thread pool, which pins its threads to cores).
MODEL_SETUPS = {
    "shipped-parallel": "models: {{segmentation: {repo}/models/magnetic_tile_unet.onnx, "
                        "detection: {repo}/models/neu_det_detector.onnx}}\n"
                        "tuning: {{parallel_models: true, realtime_inference: 5, nice_non_inference: 10}}\n",
    "embedded-default": "",
}


@pytest.mark.skipif(STRACE is None, reason="strace not installed: cannot list the daemon's system calls")
@pytest.mark.parametrize("setup", sorted(MODEL_SETUPS))
def test_the_daemon_makes_no_system_call_the_units_filter_denies(tmp_path, setup):
    """`station run` under strace, as systemd starts it (notify socket, watchdog), tuned (lowered
    non-inference threads, real-time models) or as it comes, the fake camera, a real Mosquitto, the metrics endpoint, a reload (SIGHUP)
    and a stop (SIGTERM). Every system call it makes must pass the units' SystemCallFilter=: a denied
    one fails (SystemCallErrorNumber=EPERM), or without that setting kills the service with SIGSYS."""
    from daemonkit import wait_until
    from mosquitto import Mosquitto, Subscriber, free_port, have_mosquitto
    from test_daemon import PREFIX, mqtt_section

    if not have_mosquitto():
        pytest.skip("mosquitto binary not installed")
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(tmp_path / "notify.sock"))
    notify.settimeout(0.1)
    with Mosquitto(tmp_path / "broker") as broker, Subscriber(broker.port, "#") as sub:
        cfg, metrics_port = tmp_path / "station.yaml", free_port()
        cfg.write_text(f"""
station: {{id: cam1}}
camera: {{type: fake, fps: 30, width: 128, height: 96}}
metrics: {{enabled: true, port: {metrics_port}}}
""" + MODEL_SETUPS[setup].format(repo=REPO) + mqtt_section(broker))
        trace = tmp_path / "strace.txt"
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "NOTIFY_SOCKET": str(tmp_path / "notify.sock"),
               "WATCHDOG_USEC": "4000000"}
        env.pop("WATCHDOG_PID", None)
        log = tmp_path / "station.log"
        tracer = subprocess.Popen(
            [STRACE, "-f", "-qq", "-o", str(trace), sys.executable, "-m", "station", "run", "-c", str(cfg),
             "--state-dir", str(tmp_path / "state")],
            stdout=open(log, "ab"), stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env)
        daemon = None
        try:
            messages: list[bytes] = []

            def notified(what: bytes) -> bool:
                try:
                    messages.append(notify.recv(4096))
                except TimeoutError:
                    pass
                return any(what in m for m in messages)

            wait_until(lambda: notified(b"READY=1") or tracer.poll() is not None, 120, "READY=1")
            if tracer.poll() is not None and "ptrace" in log.read_text():
                pytest.skip(f"strace cannot trace here: {log.read_text()[-300:]}")
            assert tracer.poll() is None, log.read_text()
            daemon = int(Path(f"/proc/{tracer.pid}/task/{tracer.pid}/children").read_text().split()[0])
            wait_until(lambda: len(sub.on_topic(f"{PREFIX}/result")) >= 5, 60, "5 results")
            assert b"station_results_total" in urllib.request.urlopen(
                f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).read()
            wait_until(lambda: notified(b"WATCHDOG=1"), 10, "a watchdog ping")
            os.kill(daemon, signal.SIGHUP)
            wait_until(lambda: "reloaded" in log.read_text(), 60, "the reload")
            os.kill(daemon, signal.SIGTERM)
            assert tracer.wait(60) == 0, log.read_text()[-3000:]
        finally:
            if tracer.poll() is None:
                if daemon is not None:
                    os.kill(daemon, signal.SIGKILL)
                tracer.kill()
                tracer.wait(10)
            notify.close()
    used = traced_syscalls(trace.read_text())
    assert {"sendto", "accept4"} <= used, sorted(used)  # the paths ran
    if setup == "shipped-parallel":
        # the other threads lowered, the models' threads asked for SCHED_FIFO
        assert {"setpriority", "sched_setscheduler"} <= used, sorted(used)
    if setup == "embedded-default" and (os.cpu_count() or 1) > 1:
        assert "sched_setaffinity" in used  # ONNX Runtime's own pool pinned its threads
    unit_texts = {unit.name: unit.read_text() for unit in sorted(UNITS.glob("*.service"))}
    for name, text in unit_texts.items():
        denied = used - allowed_syscalls(text)
        if os.geteuid() == 0:
            # SQLite hands the files it creates (WAL, shared memory) to the database's owner only
            # when it runs as root; the units run as User=station.
            denied.discard("fchown")
        assert not denied, f"{name}: the daemon calls {sorted(denied)}, which its SystemCallFilter= denies"

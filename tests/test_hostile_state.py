"""The state directory under a line at full rate (issue 46, bounded state): the real
daemon (`python -m station run`) inspecting small synthetic frames as fast as it can,
a real Mosquitto acknowledging every result, and the state directory sampled from
outside. The outbox stays nearly empty, but each result writes ~25 KB of pages to
its write-ahead log; the log must start over, not grow with the results."""

from __future__ import annotations

import errno
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from daemonkit import rss_mib
from mosquitto import Subscriber, have_mosquitto
from station.outbox import WAL_LIMIT
from test_daemon import PREFIX, mqtt_section

pytestmark = pytest.mark.skipif(not have_mosquitto(), reason="mosquitto binary not installed")

RUN_S = 15.0
# The WAL is cut back to WAL_LIMIT at most; the database file of an empty outbox (its
# free pages for results in flight included) and the WAL index are small beside it.
BOUND = WAL_LIMIT + 8 * 1024 * 1024


def mount_tmpfs(path: Path, size: str) -> bool:
    path.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0 or shutil.which("mount") is None:
        return False
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                          capture_output=True).returncode == 0


def fill_up(path: Path) -> None:
    """Write zeros into ``path`` until its file system has no byte left."""
    with open(path, "wb", buffering=0) as f:
        for chunk in (b"\0" * 65536, b"\0" * 4096):
            try:
                while True:
                    f.write(chunk)
            except OSError as exc:
                assert exc.errno == errno.ENOSPC, exc


def full_rate_config(broker) -> str:
    return f"""
station: {{id: cam1}}
camera: {{type: fake, fps: null, height: 64, width: 64, distinct: 16}}
run: {{queue_size: 8, stats_interval_s: 5}}
{mqtt_section(broker)}"""


def state_bytes(state: Path) -> tuple[int, int]:
    """(bytes of every file under the state directory, bytes of the outbox's WAL)."""
    total = wal = 0
    for path in state.rglob("*"):
        try:
            size = path.stat().st_size if path.is_file() else 0
        except FileNotFoundError:  # the WAL, deleted by the last connection's close
            continue
        total += size
        wal += size if path.name.endswith("-wal") else 0
    return total, wal


@pytest.mark.soak
def test_state_directory_stays_bounded_at_full_rate(tmp_path, broker, stations):
    state = tmp_path / "state"
    with Subscriber(broker.port, f"{PREFIX}/result") as sub:
        station = stations(tmp_path, full_rate_config(broker))
        assert sub.wait_for(lambda m: len(m) > 0, 60), station.text()[-3000:]
        samples = []  # (s since the first result, results received, state bytes, WAL bytes)
        t0 = time.monotonic()
        while time.monotonic() - t0 < RUN_S:
            assert station.proc.poll() is None, station.text()[-3000:]
            samples.append((round(time.monotonic() - t0, 2), len(sub.messages), *state_bytes(state)))
            time.sleep(0.25)
        peak_rss = rss_mib(station.proc.pid)[1]
        station.signal(signal.SIGTERM)
        assert station.wait(30) == 0, station.text()[-3000:]
        received = len(sub.messages)
    worst = max(samples, key=lambda s: s[2])
    figures = (f"{received} results ({samples[-1][1] / RUN_S:.0f}/s), state directory at most {worst[2]} bytes "
               f"(at {worst[0]} s), WAL at most {max(s[3] for s in samples)} bytes, peak RSS {peak_rss:.0f} MiB")
    print(figures)
    assert worst[2] <= BOUND, figures
    assert samples[-1][1] >= 100, figures  # results came all along, not just at the start
    assert samples[len(samples) // 2][1] < samples[-1][1], figures
    text = station.text()
    assert "Traceback" not in text and "stay in the outbox" not in text, text[-3000:]
    assert state_bytes(state)[0] <= BOUND  # closed: the WAL is in the file and gone


def test_a_disk_that_fills_up_at_full_rate_costs_no_result(tmp_path, broker, stations):
    """The state directory on a 16 MiB file system (tmpfs, needs root) that another
    file fills to the last byte while the line runs at full rate: the outbox's WAL
    starts over in its own space, the results in flight take free pages the database
    file already has, and a write that finds the disk full copies the WAL into the
    file first; so results keep coming and none is refused, and after the space comes
    back nothing needed a restart."""
    state = tmp_path / "state"
    if not mount_tmpfs(state, "16m"):
        pytest.skip("cannot mount a tmpfs here (needs root)")
    ballast = state / "ballast"
    log_dir = tmp_path / "logs"  # the daemon's log is not on the small file system
    log_dir.mkdir()
    try:
        with Subscriber(broker.port, f"{PREFIX}/result") as sub:
            station = stations(log_dir, full_rate_config(broker), "--state-dir", str(state), state=False)
            assert sub.wait_for(lambda m: len(m) >= 200, 60), station.text()[-3000:]  # steady: checkpoints ran
            fill_up(ballast)
            full_at = len(sub.messages)
            assert sub.wait_for(lambda m: len(m) >= full_at + 500, 30), station.text()[-3000:]
            ballast.unlink()
            back_at = len(sub.messages)
            assert sub.wait_for(lambda m: len(m) >= back_at + 200, 30), station.text()[-3000:]
            station.signal(signal.SIGTERM)
            assert station.wait(30) == 0, station.text()[-3000:]
        text = station.text()
        assert "Traceback" not in text and "not stored" not in text, text[-3000:]
    finally:
        subprocess.run(["umount", "-l", str(state)], capture_output=True)

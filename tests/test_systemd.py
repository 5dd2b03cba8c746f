"""The shipped units pass `systemd-analyze verify` and keep their exposure low.

The units name /opt/station/.venv/bin/station (the install path in the README);
the test points them at this checkout's console script, which verify needs to
find, and changes nothing else."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
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

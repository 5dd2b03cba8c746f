"""Helpers shared by the fault, bad-input and security tests: the daemon as a
process with any arguments (tests/test_daemon.py's Station), its JSONL output,
and what /proc says about it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from test_daemon import Station


def start_station(workdir: Path, config: str, *args: str, verbose: int = 0, env: dict | None = None,
                  state: bool = True, preexec_fn=None) -> Station:
    """``python -m station [-v…] run -c workdir/station.yaml [--state-dir workdir/state] ARGS…``."""
    s = Station(workdir, config)
    cmd = [sys.executable, "-m", "station"] + (["-" + "v" * verbose] if verbose else []) + ["run", "-c", str(s.cfg)]
    if state:
        cmd += ["--state-dir", str(workdir / "state")]
    s.proc = subprocess.Popen(
        cmd + list(args), stdout=open(s.log, "ab"), stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}, preexec_fn=preexec_fn,
    )
    return s


def jsonl(path: Path) -> list[dict]:
    """The complete lines of a JSONL file being appended to (a partial last line is skipped)."""
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            pass
    return out


def rss_mib(pid: int) -> tuple[float, float]:
    """(VmRSS, VmHWM) of a process in MiB."""
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
    return int(fields["VmRSS"].split()[0]) / 1024, int(fields["VmHWM"].split()[0]) / 1024

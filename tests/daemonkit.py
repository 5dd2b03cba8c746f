"""The daemon as a process, for the end-to-end tests: ``station run`` with any
arguments and its log (the ``stations`` fixture of conftest.py starts them and
kills what a test left running), its JSONL output, and what /proc says about it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path


class Station:
    """A `station run` process with its config and log in ``workdir``."""

    def __init__(self, workdir: Path, config: str):
        self.workdir = workdir
        self.cfg = workdir / "station.yaml"
        self.cfg.write_text(config)
        self.log = workdir / "station.log"
        self.proc: subprocess.Popen | None = None

    def start(self, *args: str, verbose: int = 0, env: dict | None = None, state: bool = True,
              preexec_fn=None) -> "Station":
        """``python -m station [-v…] run -c workdir/station.yaml [--state-dir workdir/state] ARGS…``."""
        cmd = [sys.executable, "-m", "station"] + (["-" + "v" * verbose] if verbose else []) + ["run", "-c", str(self.cfg)]
        if state:
            cmd += ["--state-dir", str(self.workdir / "state")]
        self.proc = subprocess.Popen(
            cmd + list(args), stdout=open(self.log, "ab"), stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}, preexec_fn=preexec_fn,
        )
        return self

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def wait(self, timeout: float) -> int:
        return self.proc.wait(timeout)

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def stacks(self, tail: int = 12000) -> str:
        """The end of the log after asking a running daemon for its thread stacks (SIGUSR1)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGUSR1)
            time.sleep(1.0)  # the daemon writes its stacks asynchronously; this is a failure message only
        return self.text()[-tail:]

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)


def wait_until(pred, timeout: float, what: str) -> None:
    """Poll ``pred`` (a file, a log line: nothing to wait on) until true; AssertionError naming ``what`` at ``timeout``."""
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


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

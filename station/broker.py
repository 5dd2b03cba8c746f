"""A throw-away Mosquitto on a free loopback port: the broker ``station bench`` and
``station soak`` publish to when none is given (the tests start theirs with it too).

    with Mosquitto(workdir) as broker:     # started, accepting connections
        ... broker.port ...
                                           # stopped (SIGTERM) and waited for

Persistence is off, so a restart forgets sessions, queued and retained messages.
The port is chosen once and kept across stop()/start()/restart(). Nothing here
sleeps for a fixed time: start() polls until the port accepts a TCP connection,
stop()/kill() wait for the process.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType

from .errors import StationError

HOST = "127.0.0.1"


def mosquitto_binary() -> str:
    """``$MOSQUITTO``, else ``mosquitto`` on the PATH, else Debian's /usr/sbin/mosquitto."""
    return os.environ.get("MOSQUITTO") or shutil.which("mosquitto") or "/usr/sbin/mosquitto"


def have_mosquitto() -> bool:
    binary = mosquitto_binary()
    return Path(binary).is_file() and os.access(binary, os.X_OK)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


class Mosquitto:
    """One mosquitto process on ``127.0.0.1:port`` with its config and log in ``workdir``.

    listener_extra: lines under the listener (e.g. ``password_file …`` and
    ``allow_anonymous false``, or TLS ``cafile``/``certfile``/``keyfile``).
    options: general lines before it (e.g. ``set_tcp_nodelay true``).
    log_all: log every packet (``log_type all``), as a test reading the log needs;
    else Mosquitto's default types.
    """

    def __init__(self, workdir: Path, listener_extra: str = "", port: int | None = None, start_timeout: float = 5.0,
                 options: Sequence[str] = (), log_all: bool = False):
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.host = HOST
        self.start_timeout = start_timeout
        self.conf = self.workdir / f"mosquitto-{self.port}.conf"
        self.log = self.workdir / f"mosquitto-{self.port}.log"
        self.proc: subprocess.Popen | None = None
        extra = listener_extra if "allow_anonymous" in listener_extra else listener_extra + "\nallow_anonymous true"
        # As root, mosquitto would switch to the "mosquitto" user and then fail to read
        # files in private temp folders; as anyone else it ignores this.
        lines = (["user root"] if os.geteuid() == 0 else []) + [
            "persistence false", f"log_dest file {self.log}", *(["log_type all"] if log_all else []),
            "connection_messages true", *options, f"listener {self.port} {HOST}", extra.strip()]
        self.conf.write_text("\n".join(lines) + "\n")

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def pid(self) -> int:
        """The started broker's process id."""
        if self.proc is None:
            raise StationError("mosquitto is not started")
        return self.proc.pid

    def start(self) -> "Mosquitto":
        """Start (unless running) and wait until the port accepts connections; StationError
        when the binary is missing, or it exits or does not listen within ``start_timeout``."""
        if self.running:
            return self
        if not have_mosquitto():
            raise StationError(f"{mosquitto_binary()}: no mosquitto binary (apt install mosquitto)")
        # stderr (what it says before its log file is open) into the log file too: nothing
        # reads a pipe of a broker that runs for hours
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen([mosquitto_binary(), "-c", str(self.conf)], stdin=subprocess.DEVNULL,
                                         stdout=subprocess.DEVNULL, stderr=log)
        deadline = time.monotonic() + self.start_timeout
        while True:
            if self.proc.poll() is not None:
                raise StationError(f"mosquitto exited with {self.proc.returncode}: {self.log_text().strip()}")
            try:
                with socket.create_connection((HOST, self.port), timeout=0.2):
                    return self
            except OSError:
                if time.monotonic() > deadline:
                    self.kill()
                    raise StationError(f"mosquitto did not accept connections on {HOST}:{self.port} "
                                       f"within {self.start_timeout} s") from None
                time.sleep(0.01)  # the process is starting: poll the port again shortly

    def stop(self, timeout: float = 5.0) -> None:
        """SIGTERM (a clean broker shutdown) and wait for the process."""
        self._signal_and_wait(signal.SIGTERM, timeout)

    def kill(self) -> None:
        """SIGKILL: the broker vanishes without closing anything cleanly."""
        self._signal_and_wait(signal.SIGKILL, 5.0)

    def restart(self) -> "Mosquitto":
        """Stop if running, then start again on the same port with the same config."""
        self.stop()
        return self.start()

    def _signal_and_wait(self, sig: int, timeout: float) -> None:
        proc = self.proc
        if proc is None:
            return
        if proc.poll() is None:
            proc.send_signal(sig)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        self.proc = None

    def log_text(self) -> str:
        try:
            return self.log.read_text(errors="replace")
        except OSError:
            return ""

    def __enter__(self) -> "Mosquitto":
        return self.start()

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()

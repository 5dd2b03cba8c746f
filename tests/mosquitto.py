"""A real Mosquitto broker for tests, on a free loopback port, and a subscriber
that collects what it receives.

    with Mosquitto(tmp_path) as broker:            # started, accepting connections
        with Subscriber(broker.port, "a/#") as sub:
            ...
            sub.wait_for(lambda msgs: len(msgs) >= 3, timeout=5)
        broker.restart()                           # same port, same config

The broker runs with persistence off, so a restart forgets sessions, queued
and retained messages. Nothing here sleeps for a fixed time: start() waits
until the port accepts a TCP connection, stop()/kill() wait for the process.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

MOSQUITTO = os.environ.get("MOSQUITTO", shutil.which("mosquitto") or "/usr/sbin/mosquitto")
MOSQUITTO_PASSWD = shutil.which("mosquitto_passwd") or "/usr/bin/mosquitto_passwd"
HOST = "127.0.0.1"


def have_mosquitto() -> bool:
    return Path(MOSQUITTO).is_file() and os.access(MOSQUITTO, os.X_OK)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def write_password_file(path: Path, users: dict[str, str]) -> Path:
    """A Mosquitto password file (hashed) made with ``mosquitto_passwd -b``."""
    path.write_text("")
    for user, password in users.items():
        subprocess.run([MOSQUITTO_PASSWD, "-b", str(path), user, password], check=True, capture_output=True)
    return path


class Mosquitto:
    """One mosquitto process on ``127.0.0.1:port`` with a config in ``workdir``.

    listener_extra: lines added under the listener (e.g. ``password_file …`` and
    ``allow_anonymous false``, or TLS ``cafile``/``certfile``/``keyfile``).
    The port is chosen once and kept across stop()/start()/restart().
    """

    def __init__(self, workdir: Path, listener_extra: str = "", port: int | None = None, start_timeout: float = 5.0):
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.host = HOST
        self.start_timeout = start_timeout
        self.listener_extra = listener_extra
        self.conf = self.workdir / f"mosquitto-{self.port}.conf"
        self.log = self.workdir / f"mosquitto-{self.port}.log"
        self.proc: subprocess.Popen | None = None
        self._write_conf()

    def _write_conf(self) -> None:
        extra = self.listener_extra
        if "allow_anonymous" not in extra:
            extra += "\nallow_anonymous true"
        # As root, mosquitto would switch to the "mosquitto" user and then fail to
        # read files in pytest's private temp folders; as anyone else it ignores this.
        user = "user root\n" if os.geteuid() == 0 else ""
        self.conf.write_text(
            f"{user}"
            "persistence false\n"
            f"log_dest file {self.log}\n"
            "log_type all\n"
            "connection_messages true\n"
            f"listener {self.port} {HOST}\n"
            f"{extra.strip()}\n"
        )

    # --- lifecycle --------------------------------------------------------------

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self) -> "Mosquitto":
        if self.running:
            return self
        self.proc = subprocess.Popen(
            [MOSQUITTO, "-c", str(self.conf)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        self._wait_accepting()
        return self

    def _wait_accepting(self) -> None:
        deadline = time.monotonic() + self.start_timeout
        while True:
            if self.proc.poll() is not None:
                err = self.proc.stderr.read().decode(errors="replace") if self.proc.stderr else ""
                raise RuntimeError(f"mosquitto exited with {self.proc.returncode}: {err.strip()}\n{self.log_text()}")
            try:
                with socket.create_connection((HOST, self.port), timeout=0.2):
                    return
            except OSError:
                if time.monotonic() > deadline:
                    self.kill()
                    raise RuntimeError(
                        f"mosquitto did not accept connections on {HOST}:{self.port} within {self.start_timeout} s"
                    ) from None
                # the process is starting: poll the port again shortly
                time.sleep(0.01)

    def stop(self, timeout: float = 5.0) -> None:
        """SIGTERM (a clean broker shutdown) and wait for the process."""
        self.thaw()  # a frozen process would not act on SIGTERM
        self._signal_and_wait(signal.SIGTERM, timeout)

    def kill(self) -> None:
        """SIGKILL: the broker vanishes without closing anything cleanly (also when frozen:
        it is not resumed first, so it acknowledges nothing more)."""
        self._signal_and_wait(signal.SIGKILL, 5.0)

    def freeze(self, timeout: float = 5.0) -> None:
        """SIGSTOP: connections stay open, nothing is read or acknowledged.

        Returns once the kernel reports the process stopped (signals are
        delivered asynchronously; a broker on another core would go on briefly).
        """
        if not self.running:
            return
        self.proc.send_signal(signal.SIGSTOP)
        stat = Path(f"/proc/{self.proc.pid}/stat")
        deadline = time.monotonic() + timeout
        while stat.exists() and stat.read_text().rsplit(")", 1)[1].split()[0] not in ("T", "t"):
            if time.monotonic() > deadline:
                raise RuntimeError(f"mosquitto {self.proc.pid} did not stop within {timeout} s")
            time.sleep(0.001)  # polling the process state, which has no event to wait on

    def thaw(self) -> None:
        if self.running:
            self.proc.send_signal(signal.SIGCONT)

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
        if proc.stderr:
            proc.stderr.close()
        self.proc = None

    def log_text(self) -> str:
        try:
            return self.log.read_text(errors="replace")
        except OSError:
            return ""

    def __enter__(self) -> "Mosquitto":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.kill()


# --- a collecting subscriber ---------------------------------------------------------


@dataclass(frozen=True)
class Received:
    topic: str
    payload: bytes
    qos: int
    retain: bool


class Subscriber:
    """A paho client subscribed to ``topics`` (QoS 1) that keeps every message.

    wait_for(pred, timeout) blocks until pred(list of Received) is true.
    After a broker restart call reconnect() (it waits for the new SUBACK).
    """

    def __init__(self, port: int, *topics: str, host: str = HOST, username: str | None = None, password: str | None = None):
        self.host, self.port, self.topics = host, port, topics or ("#",)
        self.username, self.password = username, password
        self.messages: list[Received] = []
        self._cond = threading.Condition()
        self._subscribed = threading.Event()
        self.client: mqtt.Client | None = None
        self.disconnects: list[str] = []  # reasons, for a test's failure message

    def connect(self, timeout: float = 5.0) -> "Subscriber":
        self._subscribed.clear()
        client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"test-sub-{uuid.uuid4().hex[:8]}", protocol=mqtt.MQTTv311,
            reconnect_on_failure=False,  # the test decides when to reconnect (reconnect())
        )
        if self.username:
            client.username_pw_set(self.username, self.password)
        client.on_connect = self._on_connect
        client.on_subscribe = lambda *a: self._subscribed.set()
        client.on_message = self._on_message
        client.on_disconnect = lambda c, u, f, rc, p: self.disconnects.append(str(rc))
        client.connect(self.host, self.port, keepalive=30)
        client.loop_start()
        self.client = client
        if not self._subscribed.wait(timeout):
            raise TimeoutError(f"no SUBACK from {self.host}:{self.port} within {timeout} s")
        return self

    def _on_connect(self, client, userdata, flags, reason_code, properties):
        if not reason_code.is_failure:
            client.subscribe([(t, 1) for t in self.topics])

    def _on_message(self, client, userdata, msg):
        with self._cond:
            self.messages.append(Received(msg.topic, bytes(msg.payload), msg.qos, bool(msg.retain)))
            self._cond.notify_all()

    def reconnect(self, timeout: float = 5.0) -> "Subscriber":
        self.close()
        return self.connect(timeout)

    def close(self) -> None:
        if self.client is not None:
            self.client.disconnect()
            self.client.loop_stop()
            self.client = None

    def wait_for(self, pred: Callable[[list[Received]], bool], timeout: float = 5.0) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: pred(self.messages), timeout)

    def on_topic(self, topic: str) -> list[Received]:
        with self._cond:
            return [m for m in self.messages if m.topic == topic]

    def __enter__(self) -> "Subscriber":
        return self.connect()

    def __exit__(self, *exc) -> None:
        self.close()

"""A real Mosquitto broker for tests (station/broker.py's, able to freeze), and a
subscriber that collects what it receives.

    with Mosquitto(tmp_path) as broker:            # started, accepting connections
        with Subscriber(broker.port, "a/#") as sub:
            ...
            sub.wait_for(lambda msgs: len(msgs) >= 3, timeout=5)
        broker.restart()                           # same port, same config
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from station import broker
from station.broker import HOST, free_port, have_mosquitto

__all__ = ["HOST", "Mosquitto", "Received", "Subscriber", "free_port", "have_mosquitto", "write_password_file"]

MOSQUITTO_PASSWD = shutil.which("mosquitto_passwd") or "/usr/bin/mosquitto_passwd"


def write_password_file(path: Path, users: dict[str, str]) -> Path:
    """A Mosquitto password file (hashed) made with ``mosquitto_passwd -b``."""
    path.write_text("")
    for user, password in users.items():
        subprocess.run([MOSQUITTO_PASSWD, "-b", str(path), user, password], check=True, capture_output=True)
    return path


class Mosquitto(broker.Mosquitto):
    """station's throw-away broker logging every packet (tests count PUBLISH lines), which
    a test can also freeze (SIGSTOP) and thaw; leaving the ``with`` kills it."""

    def __init__(self, workdir: Path, listener_extra: str = "", port: int | None = None, start_timeout: float = 5.0):
        super().__init__(workdir, listener_extra, port, start_timeout, log_all=True)

    def stop(self, timeout: float = 5.0) -> None:
        """SIGTERM (a clean broker shutdown) and wait for the process."""
        self.thaw()  # a frozen process would not act on SIGTERM
        super().stop(timeout)

    def freeze(self, timeout: float = 5.0) -> None:
        """SIGSTOP: connections stay open, nothing is read or acknowledged.

        Returns once the kernel reports the process stopped (signals are
        delivered asynchronously; a broker on another core would go on briefly).
        """
        if self.proc is None or not self.running:
            return
        self.proc.send_signal(signal.SIGSTOP)
        stat = Path(f"/proc/{self.proc.pid}/stat")
        deadline = time.monotonic() + timeout
        while stat.exists() and stat.read_text().rsplit(")", 1)[1].split()[0] not in ("T", "t"):
            if time.monotonic() > deadline:
                raise RuntimeError(f"mosquitto {self.proc.pid} did not stop within {timeout} s")
            time.sleep(0.001)  # polling the process state, which has no event to wait on

    def thaw(self) -> None:
        if self.proc is not None and self.running:
            self.proc.send_signal(signal.SIGCONT)

    def __exit__(self, *exc) -> None:
        self.kill()  # also when frozen: it is not resumed first, so it acknowledges nothing more


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

"""The daemon in this process: ``Running(cfg)`` runs a :class:`station.daemon.Daemon` on a
thread of its own, with a sink that keeps every record (``.sink``), until ``stop()``."""

from __future__ import annotations

import threading
import time
from typing import Any


class Records:
    """A sink of the daemon that keeps each record it is handed."""

    def __init__(self) -> None:
        self.records: list[dict] = []
        self.cond = threading.Condition()

    def start(self) -> None:
        pass

    def deliver(self, record: dict, ctx: Any) -> None:
        with self.cond:
            self.records.append(record)
            self.cond.notify_all()

    def acked(self, seq: int) -> None:
        pass

    def close(self) -> None:
        pass

    def wait(self, n: int, timeout: float = 30.0) -> None:
        with self.cond:
            assert self.cond.wait_for(lambda: len(self.records) >= n, timeout), len(self.records)


class Running:
    """A Daemon run on a thread of its own until :meth:`stop`."""

    def __init__(self, cfg: Any):
        from station.daemon import Daemon

        self.sink = Records()
        self.daemon = Daemon(cfg, sinks=[self.sink])
        self.thread = threading.Thread(target=self.daemon.run, kwargs={"install_signals": False})
        self.thread.start()

    def stop(self) -> None:
        self.daemon.stop_event.set()
        self.thread.join(30)
        assert not self.thread.is_alive()


def wait_for_metric(daemon: Any, series: str, ok: Any, timeout: float = 10.0) -> bool:
    """Until the daemon's Prometheus ``series`` has a value ``ok`` accepts (the supervisor
    updates its gauges twice a second: there is no event to wait on)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for line in daemon.metrics.render().decode().splitlines():
            if line.startswith(series + " ") and ok(float(line.split()[-1])):
                return True
        time.sleep(0.1)
    return False

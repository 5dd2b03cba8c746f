"""Capped exponential backoff between reconnection attempts, one for every link.

The MQTT publisher (station/publish.py), the PLC writer (station/plc.py) and the
Sparkplug node (station/sparkplug.py) each keep one :class:`Backoff`: the first
wait after a failure is ``min_s``, each further failure in a row doubles it up to
``max_s``, and a connection that got in starts it over. A refusal that retrying
soon will not cure (credentials, certificates) waits ``max_s`` at once. Every wait
is cut by up to a fifth at random, so that the stations behind one broker or one
PLC, which lost it at the same moment, do not come back in lock-step.
"""

from __future__ import annotations

import logging
import random

JITTER = 0.2  # a wait is cut by up to this fraction at random


class Backoff:
    """The waits of one link between its connection attempts (see the module's text).

    min_s / max_s: the first wait and the cap, seconds (0 < min_s <= max_s).
    Not thread-safe: the thread that connects owns it.
    """

    def __init__(self, min_s: float, max_s: float):
        if not 0 < min_s <= max_s:
            raise ValueError(f"backoff needs 0 < min_s <= max_s, got {min_s} and {max_s}")
        self.min_s = min_s
        self.max_s = max_s
        self._delay = min_s
        self.failures = 0  # failed attempts since the last connection that got in

    def reset(self) -> None:
        """A connection got in: the next failure waits ``min_s`` again."""
        self._delay = self.min_s
        self.failures = 0

    def next(self, refused: bool = False) -> float:
        """One more failure: how long to wait before the next attempt, seconds.
        ``refused``: retrying soon will not help (credentials, certificates): ``max_s``."""
        self.failures += 1
        if refused:
            wait = self.max_s
        else:
            wait = self._delay
            self._delay = min(self._delay * 2, self.max_s)
        return wait * random.uniform(1.0 - JITTER, 1.0)

    def after(self, got_in: bool, refused: bool = False) -> float:
        """A connection ended (``got_in``: it had been accepted, which starts the backoff
        over) or an attempt failed: how long to wait before the next attempt, seconds."""
        if got_in:
            self.reset()
        return self.next(refused)

    def level(self, refused: bool = False) -> int:
        """The log level of the failure just counted: ERROR for a refusal, WARNING for the
        first failure in a row, INFO for the repeats of an outage."""
        if refused:
            return logging.ERROR
        return logging.WARNING if self.failures <= 1 else logging.INFO

"""Which captured frames become parts, and what becomes of a trigger that makes none.

free-run: every ``trigger.every_nth`` frame, at most ``trigger.max_fps`` a second.
mqtt: each message on ``…/trigger`` names a part (:func:`parse_trigger`, on paho's
network thread), and a message that makes no part (an invalid payload, an
overflow of ``trigger.max_pending``, a part with no frame in time, the stop)
becomes an error record, delivered by a thread of its own (:class:`TriggerErrors`)
at the pace the broker takes results: a flood of triggers neither holds up
capture nor queues its errors ahead of the next genuine part's result.
plc: each rising edge of the PLC's part-present signal is a part
(:meth:`Trigger.on_signal`, on the PLC writer's thread), the same way from there.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import logging
import re
import threading
import time
from collections.abc import Callable

from .config import StationConfig
from .messages import error_record, text
from .metrics import TRIGGER_OUTCOMES
from .priority import ThreadPolicy
from .types import Frame

log = logging.getLogger(__name__)


# How much of a refused trigger payload its error record quotes (characters; bytes
# before decoding): enough to recognise it, never a megabyte.
_QUOTE = 64
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f]")
_SURROGATE = re.compile("[\ud800-\udfff]")


def _quote(data: bytes | str) -> str:
    """The start of a payload in quotes, as printable text on one line (bytes that are
    not UTF-8 and control characters as ``\\xNN`` escapes), "…" when cut."""
    shown = _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", text(data[:_QUOTE]))
    return f'"{shown}"' + ("…" if len(data) > _QUOTE else "")


def _json_kind(value: object) -> str:
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if value is None:
        return "null"
    return "a list" if isinstance(value, list) else "an object"


def parse_trigger(payload: bytes, max_chars: int) -> tuple[str | None, str | None]:
    """A trigger payload → (its part id, None), or (None, why it names no part).

    payload: UTF-8 text that is the part id (white space around it dropped), or a
    JSON object whose ``part_id`` is a string. A part id has 1 to ``max_chars``
    characters, none of them a control character or a lone surrogate. The reason
    quotes at most the payload's first 64 characters.
    """
    # The longest spelling of a valid JSON trigger (\uXXXX escapes, other keys) is far
    # shorter: a longer payload is refused before it is decoded or parsed.
    if len(payload) > 12 * max_chars + 1024:
        return None, f"payload too long ({len(payload)} bytes; trigger.max_part_id_chars is {max_chars}): {_quote(payload)}"
    try:
        body = payload.decode("utf-8").strip()
    except UnicodeDecodeError:
        return None, f"payload is not UTF-8 text: {_quote(payload)}"
    part: object = body
    if body.startswith("{"):
        try:
            doc = json.loads(body)
        except ValueError as exc:
            return None, f"payload is not valid JSON ({str(exc)[:100]}): {_quote(body)}"
        except RecursionError:
            return None, f"payload is not valid JSON (nested too deep): {_quote(body)}"
        if "part_id" not in doc:
            return None, f"JSON without a part_id: {_quote(body)}"
        part = doc["part_id"]
        if not isinstance(part, str):
            return None, f"part_id is {_json_kind(part)}, not a string: {_quote(body)}"
    assert isinstance(part, str)  # the plain text, or a JSON string
    if not part:
        return None, f"empty part id: {_quote(body)}"
    why = check_part_id(part, max_chars)
    return (part, None) if why is None else (None, why)


def check_part_id(part: str, max_chars: int) -> str | None:
    """Why ``part`` (not empty) cannot be a part id, or None: at most ``max_chars``
    characters, none a control character or a lone surrogate."""
    if len(part) > max_chars:
        return f"part id too long ({len(part)} characters; trigger.max_part_id_chars is {max_chars}): {_quote(part)}"
    if _CONTROL.search(part):
        return f"part id with control characters: {_quote(part)}"
    if _SURROGATE.search(part):
        return f"part id with a lone surrogate (not Unicode text): {_quote(part)}"
    return None


@dataclasses.dataclass(slots=True)
class _Pending:
    part_id: str
    deadline: float  # time.monotonic()
    topic: str


@dataclasses.dataclass(frozen=True, slots=True)
class TriggerError:
    """A trigger message that names no part, or a part that got no frame: the fields
    of its error record."""

    source: str  # the trigger topic, or the PLC's part-present variable
    part_id: str | None  # None: the message named no valid part
    error: str


class Trigger:
    """Decides which captured frames become parts.

    free-run: every ``every_nth`` frame, at most ``max_fps`` per second; the
    part id is a counter. mqtt: each message on ``…/trigger`` names a part
    (:func:`parse_trigger`); the next frame is tagged with it, oldest part first.
    plc: each rising edge of the PLC's part-present signal is a part
    (:meth:`on_signal`), named as the PLC names it, else by a counter.

    Every mqtt message yields one record: a graded result, or an error record
    (a :class:`TriggerError`, handed out by :meth:`errors`) when its payload names
    no valid part, when it is the oldest of more than ``max_pending`` parts
    waiting (reported at once: overflow), when no frame came within
    ``timeout_s`` (expired), or when the station stopped first. Retained
    messages are ignored, logged and counted, unless ``accept_retained``. Each
    message costs its parsing and O(1) under one lock, so a flood is cheap here;
    whoever delivers the errors decides how fast they go out.
    """

    def __init__(self, cfg: StationConfig):
        self.cfg = cfg.trigger
        self.mode = self.cfg.type
        # where a part comes from, in its error record: the PLC's part-present variable
        self._signal_source = f"plc:{cfg.plc.nodes.part_present}" if cfg.plc is not None else "plc"
        # Called once for every part accepted (outside the lock): a software-triggered camera's fire().
        self.on_part: Callable[[], None] | None = None
        self._lock = threading.Condition(threading.Lock())
        self._pending: collections.deque[_Pending] = collections.deque()
        self._errors: collections.deque[TriggerError] = collections.deque()
        self._counts: collections.Counter[str] = collections.Counter()
        self._logged_at: dict[str, float] = {}
        self._unlogged: collections.Counter[str] = collections.Counter()
        self._closed = False  # the station stops: no part will be taken any more
        self._seen = 0
        self._last_t = 0.0
        self._count = 0

    def reconfigure(self, cfg: StationConfig) -> None:
        with self._lock:
            self.cfg = cfg.trigger.model_copy(update={"type": self.mode})

    def on_message(self, topic: str, payload: bytes, retained: bool = False) -> None:
        """One message on the trigger topic (paho's network thread)."""
        if retained and not self.cfg.accept_retained:
            with self._lock:
                self._tally("retained", f"trigger on {topic} ignored: a retained message (the broker hands it over "
                                        f"at every connect; trigger.accept_retained takes it): {_quote(payload)}")
            return
        part, why = parse_trigger(payload, self.cfg.max_part_id_chars)
        with self._lock:
            if part is None:
                self._refuse(TriggerError(topic, None, f"trigger refused: {why}"), "invalid")
                return
            self._accept(part, topic)
        if self.on_part is not None:  # a camera that takes a frame only when told (GenICam software trigger)
            self.on_part()

    def on_signal(self, part_id: str | None) -> None:
        """A part the PLC signalled (a rising edge of ``plc.nodes.part_present``, on the PLC
        writer's thread): ``part_id`` as the PLC names it, or None (a counter names it)."""
        source = self._signal_source
        with self._lock:
            why = check_part_id(part_id, self.cfg.max_part_id_chars) if part_id else None
            if why is not None:
                self._refuse(TriggerError(source, None, f"part signalled, its id refused: {why}"), "invalid")
                return
            if not part_id:
                self._count += 1
                part_id = str(self._count)
            self._accept(part_id, source)
        if self.on_part is not None:
            self.on_part()

    def _accept(self, part: str, source: str) -> None:
        """A part named: it waits for its frame (the oldest beyond ``max_pending`` is
        refused); refused at once after the stop. Callers hold the lock."""
        self._tally("accepted")
        if self._closed:
            self._refuse(TriggerError(source, part, f"part {part}: the station stopped before a frame came"), "stopped")
            return
        self._pending.append(_Pending(part, time.monotonic() + self.cfg.timeout_s, source))
        while len(self._pending) > self.cfg.max_pending:
            old = self._pending.popleft()
            self._refuse(TriggerError(old.topic, old.part_id, f"trigger overflow: part {old.part_id} dropped, the "
                                      f"oldest of more than {self.cfg.max_pending} parts waiting for a frame "
                                      "(trigger.max_pending)"), "overflow")

    @property
    def triggered(self) -> bool:
        """Parts come from a trigger (mqtt, plc), not from every frame (free-run)."""
        return self.mode != "free-run"

    def take(self, frame: Frame) -> Frame | None:
        """The frame as a part (tagged with its part id), or None if not inspected."""
        if self.triggered:
            with self._lock:
                self._expire(time.monotonic())
                if not self._pending:
                    return None
                part = self._pending.popleft().part_id
            return dataclasses.replace(frame, part_id=part)
        with self._lock:
            self._seen += 1
            if (self._seen - 1) % self.cfg.every_nth:
                return None
            if self.cfg.max_fps is not None:
                now = time.monotonic()
                if now - self._last_t < 1.0 / self.cfg.max_fps:
                    return None
                self._last_t = now
            self._count += 1
            return dataclasses.replace(frame, part_id=str(self._count))

    def errors(self, limit: int) -> list[TriggerError]:
        """Up to ``limit`` trigger errors, oldest first (parts past their timeout included)."""
        with self._lock:
            self._expire(time.monotonic())
            return [self._errors.popleft() for _ in range(min(limit, len(self._errors)))]

    def wait(self, timeout: float) -> None:
        """Until a trigger error waits (or the oldest part's timeout passes), at most ``timeout`` s."""
        with self._lock:
            if not self._errors:
                if self._pending:
                    timeout = min(timeout, max(0.0, self._pending[0].deadline - time.monotonic()))
                self._lock.wait(timeout)

    def backlog(self) -> int:
        """Trigger errors waiting to be taken by :meth:`errors`."""
        with self._lock:
            return len(self._errors)

    def close(self) -> None:
        """The station stops: every part still waiting for a frame becomes an error, and
        so does every part named from now on."""
        with self._lock:
            self._closed = True
            self._lock.notify()  # the deliverer's wait() ends now, with or without errors
            while self._pending:
                p = self._pending.popleft()
                self._refuse(TriggerError(p.topic, p.part_id, f"part {p.part_id}: the station stopped before a frame "
                                          "came"), "stopped")

    def counts(self) -> dict[str, int]:
        """Messages and parts by outcome since start (metrics.TRIGGER_OUTCOMES)."""
        with self._lock:
            return {k: self._counts[k] for k in TRIGGER_OUTCOMES}

    def _expire(self, now: float) -> None:
        while self._pending and self._pending[0].deadline <= now:
            p = self._pending.popleft()
            self._refuse(TriggerError(p.topic, p.part_id, f"part {p.part_id}: no frame within {self.cfg.timeout_s} s "
                                      "of its trigger"), "expired")

    def _refuse(self, err: TriggerError, outcome: str) -> None:
        if not self._errors:
            self._lock.notify()  # wait() waits only while there is none
        self._errors.append(err)
        self._tally(outcome, err.error)

    def _tally(self, outcome: str, message: str | None = None) -> None:
        """Count one outcome; log ``message`` as a warning, at most one line a second
        per outcome (a flood is counted, and each one is in its error record)."""
        self._counts[outcome] += 1
        if message is None:
            return
        now = time.monotonic()
        if now - self._logged_at.get(outcome, -1e9) < 1.0:
            self._unlogged[outcome] += 1
            return
        self._logged_at[outcome] = now
        more = self._unlogged.pop(outcome, 0)
        log.warning("%s%s", message, f" (and {more} more {outcome} since the last such line)" if more else "")


class TriggerErrors:
    """The thread (``trigger-errors``) that delivers the error records of the triggers
    that made no part (:meth:`Trigger.errors`) off the capture thread, which a flood
    of them would hold up, from :meth:`start` until the stop (:meth:`close`).

    While the broker is connected, a batch goes out only when ``has_room()`` says the
    outbox holds at most two windows of results (2 × ``mqtt.max_inflight``): a
    flood's errors (thousands a second, more than the broker link acknowledges) then
    go out after the results of the genuine parts that come meanwhile, not before
    them. They wait in memory, at most ``hold`` of them (``outbox.max_rows``); beyond
    that, while disconnected and at the stop they go out as they come.

    deliver: hands one error record to the sinks, stored, counted and sunk like any
    record (not archived: there is no frame); batch: errors taken at a time.
    """

    def __init__(self, trigger: Trigger, station_id: str, deliver: Callable[[dict], object],
                 has_room: Callable[[], bool], batch: int, hold: int):
        self.trigger = trigger
        self._station_id = station_id
        self._deliver = deliver
        self._has_room = has_room
        self._batch = batch
        self._hold = hold
        self._closed = threading.Event()  # no more parts will be taken (the stop)
        self._deadline = float("inf")  # the stop's (time.monotonic()), once closed
        self._thread: threading.Thread | None = None

    def start(self, policy: ThreadPolicy, crashed: Callable[[], None]) -> None:
        """Start the thread, at ``policy``'s background priority; ``crashed()`` if it fails."""
        self._thread = threading.Thread(target=self._loop, args=(policy, crashed), name="trigger-errors",
                                        daemon=True)
        self._thread.start()

    def _loop(self, policy: ThreadPolicy, crashed: Callable[[], None]) -> None:
        policy.background()
        try:
            while True:
                closing = self._closed.is_set()
                if closing and time.monotonic() > self._deadline:
                    return  # what is left is reported by store_rest
                if not closing:
                    self.trigger.wait(0.5)
                    self._pace()
                if not self._deliver_batch() and closing:
                    return
        except Exception:  # the top of the worker loop: a crash here must stop the daemon visibly
            log.exception("trigger errors thread failed")
            crashed()

    def _pace(self) -> None:
        """Until the outbox has room for the next batch of trigger errors (see above)."""
        # Polled every 10 ms rather than woken by each acknowledgement: in a flood that
        # would be a thousand wake-ups a second, each taking the GIL from paho's
        # network thread, which is reading the flood.
        while not (self._closed.is_set() or self._has_room() or self.trigger.backlog() >= self._hold):
            self._closed.wait(0.01)

    def _deliver_batch(self) -> int:
        """One batch of trigger errors as error records; how many."""
        batch = self.trigger.errors(self._batch)
        for e in batch:
            self._deliver(error_record(e.source, e.error, 0, self._station_id, e.part_id))
        return len(batch)

    def close(self, deadline: float) -> None:
        """At the stop, once the pipeline is done: the parts still waiting for a frame
        become errors, and every trigger error is delivered, as they come (by the deadline)."""
        if self._thread is None:
            return
        self.trigger.close()
        self._deadline = deadline
        self._closed.set()
        self._thread.join(max(0.0, deadline - time.monotonic()))

    def store_rest(self, deadline: float) -> None:
        """At the stop, after MQTT: the errors of the triggers that came while it was
        flushed go to the outbox, for the next start (by the deadline)."""
        if self._thread is None or self._thread.is_alive():
            return
        while time.monotonic() < deadline and self._deliver_batch():
            pass
        if self.trigger.backlog():
            log.error("stop: %d trigger errors were not stored by the deadline (run.stop_timeout_s)",
                      self.trigger.backlog())

"""The durable outbox: results on disk until every sink that confirms delivery confirmed them.

A result is ``put`` before it is sent, waiting for each of the outbox's *sinks*
(named at open: ``mqtt``, ``plc``, ``sparkplug``: the outputs that confirm what
they deliver), and each sink ``ack``-s it once its delivery was confirmed (the
broker's PUBACK, the PLC's Good status). The row goes when the last one did, so
a broker or PLC outage, a daemon crash or a restart loses nothing: whatever a
sink has not confirmed is still here, and is handed to it again, oldest first.
Each sink reads and acknowledges only its own (``sink=``); the default sink is
``mqtt``, the only one a file of schema 1 knew.

A sink named when the file was last open and not now is no longer configured:
what waited only for it is deleted at open (logged), so the outbox stays bounded.
A sink named for the first time gets the results stored from then on.

Storage is one SQLite file in WAL mode with one connection guarded by one lock
(the daemon puts from the inspect thread and acks from paho's network thread and
the sinks' own). Every put and every ack is its own committed transaction, so a
SIGKILL at any moment leaves every put that returned in the file. Which sinks a
row still waits for is one integer column of bits (one bit per sink, table
``sinks``): an ack of the last one deletes the row in one statement, as before
there were several.

Bounds and overflow (``OutboxConfig.policy``):

* ``refuse_new`` (default): a put that would exceed ``max_rows`` or
  ``max_bytes`` raises :class:`OutboxFull`; nothing already stored is touched.
  The caller still holds the record and must report it (the daemon counts it
  and logs it as an error; ``alarm`` turns on).
* ``drop_oldest``: the oldest entries are deleted to make room; each one is
  counted in ``dropped`` and logged; ``alarm`` turns on.

``alarm`` stays on until the outbox has drained below 90 % of both bounds.
A put that SQLite cannot write (disk full, I/O error) raises PublishError
naming the file and also turns ``alarm`` on, until a put succeeds and the WAL
could be copied into the database file (``write_errors`` in stats counts
them); the caller handles the record as under ``refuse_new``. A put that
finds the disk full first copies the WAL into the file and tries once more:
a WAL that took the disk's last bytes costs no result.
The counters (``refused``, ``dropped``) count since this Outbox was opened.
A single payload larger than ``max_bytes`` is refused under either policy.
The bounds count the rows held, whichever sinks they wait for: a sink that is
away for long fills the outbox for all of them, and the policy decides then.

The write-ahead log is bounded too, at any result rate: each result appends
~25 KB of pages to it (put, mark, ack) however empty the outbox stays, and
SQLite starts it over only after a checkpoint that copied all of it, which a
checkpoint running beside a steady stream of commits never does.
:meth:`Outbox.checkpoint` therefore ends with a short one that holds the
writers back while it copies the rest; after :meth:`take_over_checkpoints` the
commits themselves checkpoint once the log reaches ``WAL_LIMIT`` bytes (when
nobody else did), and a log that starts over is cut back to ``WAL_LIMIT``.

A full disk costs no result while the broker acknowledges them: the WAL
starts over in the space it already has, the database file keeps ``RESERVE``
bytes of free pages for the results in flight (a checkpoint that needed new
pages would fail, and the WAL could not start over), and a write that finds
the disk full copies the WAL into the file and tries once more.
"""

from __future__ import annotations

import fcntl
import logging
import os
import sqlite3
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence, TypeVar

from .config import OutboxConfig, OverflowPolicy
from .errors import ConfigError, PublishError

log = logging.getLogger(__name__)

_T = TypeVar("_T")

SCHEMA_VERSION = 2  # PRAGMA user_version of the file (1: no sinks, every row was MQTT's)
DEFAULT_SINK = "mqtt"  # the sink of the callers that name none, and of every row of a schema 1 file
_MAX_SINKS = 62  # bits of the waiting column
POLICIES = ("refuse_new", "drop_oldest")
_LOW_WATER = 0.9  # the alarm clears below this fraction of both bounds
WAL_LIMIT = 16 * 1024 * 1024  # bytes of write-ahead log at which a commit checkpoints; the file's size after a restart
RESERVE = 1024 * 1024  # bytes of free pages kept in the database file, for results in flight (_keep_reserve)
_RESERVE_SEQ = 0  # the row that writes them: no result's (seqs start at 1), never pending (seq > 0)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS outbox (
    -- AUTOINCREMENT: a seq is never reused, even after the newest rows were acked,
    -- so "after seq N" stays meaningful for a sender walking the queue.
    seq             INTEGER PRIMARY KEY AUTOINCREMENT,
    result_id       TEXT    NOT NULL UNIQUE,
    topic           TEXT    NOT NULL,
    payload         BLOB    NOT NULL,
    created_at      REAL    NOT NULL,  -- UNIX seconds, when put
    attempts        INTEGER NOT NULL DEFAULT 0,
    last_attempt_at REAL,              -- UNIX seconds, or NULL when never sent
    waiting         INTEGER NOT NULL DEFAULT 1  -- the bits (table sinks) of the sinks yet to confirm it
);
CREATE TABLE IF NOT EXISTS sinks (
    name TEXT PRIMARY KEY,
    bit  INTEGER NOT NULL UNIQUE  -- a power of two
);
"""


class OutboxFull(PublishError):
    """The outbox is at its bound and its policy refuses new results."""


@dataclass(frozen=True)
class Entry:
    """One stored result.

    seq: position in the queue (increasing, never reused).
    result_id: the result's id (the idempotency key of put).
    payload: the serialised record, as put.
    created_at: UNIX seconds when it was put.
    attempts: how many times it was handed to the broker before (0 = never sent; the
    MQTT sender's count, :meth:`Outbox.mark_attempted`).
    """

    seq: int
    result_id: str
    topic: str
    payload: bytes
    created_at: float
    attempts: int


class OutboxFile:
    """The outbox's SQLite file: the lock that keeps it to one process, the WAL and its
    checkpoints, the free pages kept for results in flight, and the write transactions
    that survive a full disk (see the module's text). :class:`Outbox` keeps its queue in it.

    path: the SQLite file (created with its folder if absent). Only one process may
    hold it: a second open raises PublishError. synchronous: "normal" or "full" (see _prepare).
    """

    def __init__(self, path: str | Path, synchronous: str = "normal"):
        if synchronous not in ("normal", "full"):
            raise ValueError(f"synchronous must be 'normal' or 'full', got {synchronous!r}")
        self.path = Path(path)
        self._lock = threading.Lock()  # guards the connection and the subclass's counters
        self._ckpt_lock = threading.Lock()  # guards _ckpt_db, the checkpoints' own connection
        self._ckpt_db: sqlite3.Connection | None = None
        # A write that SQLite cannot do (disk full, I/O error) raises the alarm;
        # it clears with the next result stored (and the WAL reclaimed).
        self._io_alarm = False
        self._write_errors = 0
        self._lockfile = self._take_file_lock()
        try:
            self._db: sqlite3.Connection | None = self._open(synchronous)
            self.page_size = int(self._db.execute("PRAGMA page_size").fetchone()[0])  # bytes; a WAL frame holds one
            self._keep_reserve()
        except sqlite3.Error as exc:
            os.close(self._lockfile)
            raise PublishError(f"{self.path}: cannot open the outbox ({exc})") from exc

    def _take_file_lock(self) -> int:
        # Two daemons draining one outbox would send everything twice; the lock is
        # released by the kernel when the holder dies, even by SIGKILL.
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(str(self.path) + ".lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            raise PublishError(f"{self.path}: the outbox is in use by another process") from exc
        return fd

    def _open(self, synchronous: str) -> sqlite3.Connection:
        # isolation_level=None: no implicit transactions; each statement commits on
        # its own and multi-statement changes use an explicit BEGIN IMMEDIATE.
        # check_same_thread=False: the one connection is shared under self._lock.
        db = sqlite3.connect(str(self.path), isolation_level=None, check_same_thread=False, timeout=5.0)
        try:
            self._prepare(db, synchronous)
        except BaseException:
            db.close()
            raise
        return db

    @staticmethod
    def _prepare(db: sqlite3.Connection, synchronous: str) -> None:
        version = db.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise sqlite3.DatabaseError(f"written by a newer station (schema {version} > {SCHEMA_VERSION})")
        mode = db.execute("PRAGMA journal_mode=WAL").fetchone()[0]
        if mode.lower() != "wal":
            raise sqlite3.DatabaseError(f"cannot switch to WAL mode (got {mode})")
        # WAL + synchronous=NORMAL: a commit is appended to the WAL without fsync and
        # fsync happens at checkpoints. A process crash or SIGKILL loses nothing
        # (the OS holds the written pages); a power cut or kernel panic may lose the
        # last commits but never corrupts the file. That covers what the outbox is
        # for (daemon crashes and restarts, broker outages) at tens of µs per commit
        # (~14,000 put+mark+ack per second on a 2-core dev VM). FULL adds an fsync
        # per commit and also survives a power cut (~2,000 per second there, bound
        # by the disk): choose it with `outbox.synchronous: full` where the storage
        # keeps up with the line rate.
        db.execute(f"PRAGMA synchronous={synchronous.upper()}")
        # A write that starts the log over cuts the file back to this size: what a
        # burst (or a broker outage with its mark/ack traffic after) made it grow to
        # does not stay on the disk.
        db.execute(f"PRAGMA journal_size_limit={WAL_LIMIT}")
        db.executescript(_SCHEMA)
        if version == 1:  # every row was waiting for MQTT, the only sink there was
            _transaction(db, _schema_1_to_2)
        db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")

    def _keep_reserve(self) -> None:
        """Make sure the database file holds RESERVE bytes of free pages, written.

        Results in flight (put, not yet acknowledged) then take these pages rather
        than new ones past the end of the file. On a full disk a checkpoint cannot
        add pages to the file, so the WAL could not start over and every write would
        fail until someone made room. Written, not merely counted: a page SQLite
        only counts is a hole in the file, and filling a hole takes space too.
        Best effort: with no room for it now, the outbox works without it."""
        db = self._conn()
        try:
            db.execute("DELETE FROM outbox WHERE seq = ?", (_RESERVE_SEQ,))  # left by a crash below
            missing = RESERVE - int(db.execute("PRAGMA freelist_count").fetchone()[0]) * self.page_size
            if missing <= 0:
                return
            db.execute("INSERT INTO outbox (seq, result_id, topic, payload, created_at) VALUES (?, ?, '', zeroblob(?), 0)",
                       (_RESERVE_SEQ, "station.outbox.reserve", missing))
            db.execute("DELETE FROM outbox WHERE seq = ?", (_RESERVE_SEQ,))
            db.execute("PRAGMA wal_checkpoint(TRUNCATE)")  # the zeros into the file now
        except sqlite3.Error as exc:
            log.warning("outbox %s: no room for its %d KiB of free pages (%s): a full disk may stop it until "
                        "there is room again", self.path, RESERVE // 1024, exc)
            self._reclaim_wal()  # the space the failed write took in the WAL file goes back to the disk

    # --- writing ----------------------------------------------------------------------

    def _conn(self) -> sqlite3.Connection:
        if self._db is None:
            raise PublishError(f"outbox {self.path} is closed")
        return self._db

    @contextmanager
    def _guard(self, op: str) -> Iterator[None]:
        """SQLite failures (disk full, I/O error) as PublishError naming the file.
        A failed put raises the alarm (logged once per episode); callers hold self._lock."""
        try:
            yield
        except sqlite3.Error as exc:
            if op == "put":
                self._write_errors += 1
                if not self._io_alarm:
                    log.error("outbox %s: cannot store results (%s): alarm raised; results are not stored "
                              "until writing works again (disk full?)", self.path, exc)
                self._io_alarm = True
            raise PublishError(f"outbox {self.path}: {op} failed ({exc})") from exc

    def _write(self, body: Callable[[sqlite3.Connection], _T]) -> _T:
        """``body`` in one write transaction, rolled back on any error. Out of space
        (often because the WAL took the disk's last bytes), the WAL is copied into the
        database file and ``body`` tried once more: a full disk that the WAL's own
        space can serve costs no write. Callers hold self._lock."""
        db = self._conn()
        try:
            return _transaction(db, body)
        except sqlite3.Error as exc:
            if not (_out_of_space(exc) and self._reclaim_wal()):
                raise
        return _transaction(db, body)

    def _reclaim_wal(self) -> bool:
        """Copy the WAL into the database and truncate it, so that its space (up to
        WAL_LIMIT) serves the next writes: after a write failed for lack of space, and
        at the first write that works after failed ones (while there is room for the
        copy). True when that worked; with no room for the database to grow either,
        it does not. Callers hold self._lock."""
        try:
            busy = self._conn().execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()[0]
        except sqlite3.Error as exc:
            log.debug("outbox %s: checkpoint after a failed write failed too (%s)", self.path, exc)
            return False
        if not busy:
            log.debug("outbox %s: WAL checkpointed and truncated to free space", self.path)
        return not busy

    # --- checkpoints ------------------------------------------------------------------

    def take_over_checkpoints(self) -> None:
        """Leave the WAL's checkpoints to :meth:`checkpoint`, called by the caller's own thread.

        By default the commit that brings the WAL to 1,000 pages copies it into the
        database file: with put, mark and ack of a result ≈ 6 pages, every ~170th
        result's put or ack waits for that copy (docs/lab/benchmarks.md, sitting 2). After this a
        commit checkpoints only once the WAL reaches ``WAL_LIMIT`` bytes, i.e. when
        :meth:`checkpoint` is not called often enough for the rate: that keeps the
        log bounded even then. The daemon calls this and checkpoints from a
        background thread of its own."""
        with self._lock, self._guard("checkpoint"):
            self._conn().execute(f"PRAGMA wal_autocheckpoint={max(1, WAL_LIMIT // self.page_size)}")

    def checkpoint(self) -> tuple[int, int]:
        """Copy the WAL into the database file so that the next commit starts it over.

        First a PASSIVE checkpoint on a connection of its own copies what is
        committed, while puts and acks go on (it never waits for nor blocks them);
        they append meanwhile, so it rarely copies all of it, and SQLite starts the
        log over only after a checkpoint that did. Then one under the outbox's lock
        copies the few pages appended since: the puts and acks of that moment wait
        for it (usually a few milliseconds: two fsyncs), and the next commit writes
        the WAL from its beginning (one fsync of its header, the price of starting
        over). Returns (WAL pages, pages copied) of the first. Raises PublishError."""
        with self._ckpt_lock:
            if self._db is None:
                raise PublishError(f"outbox {self.path} is closed")
            try:
                if self._ckpt_db is None:
                    self._ckpt_db = sqlite3.connect(str(self.path), isolation_level=None, check_same_thread=False,
                                                    timeout=5.0)
                _busy, log_pages, copied = self._ckpt_db.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
            except sqlite3.Error as exc:
                raise PublishError(f"outbox {self.path}: checkpoint failed ({exc})") from exc
            with self._lock, self._guard("checkpoint"):
                # RESTART: no other connection reads or writes while self._lock is held,
                # so it neither waits nor leaves a reader on the old log.
                self._conn().execute("PRAGMA wal_checkpoint(RESTART)").fetchone()
            return int(log_pages), int(copied)

    # --- lifetime -------------------------------------------------------------------

    @property
    def closed(self) -> bool:
        return self._db is None

    def close(self) -> None:
        with self._ckpt_lock:
            if self._ckpt_db is not None:
                self._ckpt_db.close()
                self._ckpt_db = None
        with self._lock:
            if self._db is None:
                return
            self._db.close()  # the last connection checkpoints the WAL into the file
            self._db = None
            os.close(self._lockfile)


class Outbox(OutboxFile):
    """A bounded, durable FIFO of results waiting for their sinks' confirmation.

    path, synchronous: see :class:`OutboxFile`.
    max_rows / max_bytes: bounds on entries and on summed payload bytes.
    policy: "refuse_new" (default) or "drop_oldest", see the module docstring.
    sinks: the names of the sinks each result waits for (default: ``mqtt`` alone).
    The methods that read or acknowledge for one sink take ``sink=`` (default ``mqtt``).
    """

    def __init__(
        self,
        path: str | Path,
        max_rows: int = 100_000,
        max_bytes: int = 256 * 1024 * 1024,
        policy: OverflowPolicy = "refuse_new",
        synchronous: str = "normal",
        sinks: Sequence[str] = (DEFAULT_SINK,),
    ):
        if policy not in POLICIES:
            raise ValueError(f"policy must be one of {POLICIES}, got {policy!r}")
        if max_rows < 1 or max_bytes < 1:
            raise ValueError("max_rows and max_bytes must be positive")
        if not sinks or len(set(sinks)) != len(sinks) or len(sinks) > _MAX_SINKS:
            raise ValueError(f"sinks must be 1 to {_MAX_SINKS} distinct names, got {list(sinks)}")
        self.max_rows = max_rows
        self.max_bytes = max_bytes
        self.policy = policy
        self._refused = 0
        self._dropped = 0
        self._alarm = False
        super().__init__(path, synchronous)
        try:
            with self._lock:
                self._bits: dict[str, int] = self._write(lambda db: _register_sinks(db, list(sinks), self.path))
                self._count_rows()
        except sqlite3.Error as exc:
            self.close()
            raise PublishError(f"{self.path}: cannot open the outbox ({exc})") from exc
        self._every = sum(self._bits.values())  # the waiting bits of a new row
        if self._depth:
            log.info("outbox %s holds %d results (%d bytes) from before; waiting for %s", self.path, self._depth,
                     self._bytes, ", ".join(f"{name}: {n}" for name, n in self._waiting.items()))

    @classmethod
    def from_config(cls, cfg: OutboxConfig, state_dir: str | Path | None = None,
                    sinks: Sequence[str] = (DEFAULT_SINK,)) -> "Outbox":
        return cls(outbox_path(cfg, state_dir), cfg.max_rows, cfg.max_bytes, cfg.policy, cfg.synchronous, sinks)

    def _count_rows(self) -> None:
        """The counters of what the file holds (at open; callers hold self._lock)."""
        db = self._conn()
        self._depth, self._bytes, last = db.execute(
            "SELECT COUNT(*), COALESCE(SUM(LENGTH(payload)), 0), COALESCE(MAX(seq), 0) FROM outbox").fetchone()
        self._last_seq = int(last)
        self._waiting = {name: int(db.execute("SELECT COUNT(*) FROM outbox WHERE waiting & ?", (bit,)).fetchone()[0])
                         for name, bit in self._bits.items()}
        # the lowest seq that may still wait for each sink: where pending() starts looking
        # (below it lie only rows that wait for other sinks)
        self._floor = dict.fromkeys(self._bits, 1)

    @property
    def sinks(self) -> tuple[str, ...]:
        return tuple(self._bits)

    def _bit(self, sink: str) -> int:
        try:
            return self._bits[sink]
        except KeyError:
            raise ValueError(f"outbox {self.path} has no sink {sink!r} (it has {', '.join(self._bits)})") from None

    # --- writing --------------------------------------------------------------------

    def put(self, result_id: str, topic: str, payload: bytes, created_at: float | None = None) -> int:
        """Store one result, waiting for every sink, and return its seq. Idempotent: a
        result_id already waiting here returns its existing seq and stores nothing.

        Raises OutboxFull when the bound is reached and the policy is refuse_new
        (or the payload alone exceeds max_bytes).
        """
        payload = bytes(payload)
        size = len(payload)
        created_at = time.time() if created_at is None else created_at
        with self._lock, self._guard("put"):
            db = self._conn()
            row = db.execute("SELECT seq FROM outbox WHERE result_id = ?", (result_id,)).fetchone()
            if row is not None:
                return int(row[0])
            over_rows = self._depth + 1 - self.max_rows
            over_bytes = self._bytes + size - self.max_bytes
            if size > self.max_bytes or ((over_rows > 0 or over_bytes > 0) and self.policy == "refuse_new"):
                self._refuse(result_id, size)
            row = (result_id, topic, payload, created_at, self._every)
            seq, dropped = self._write(lambda db: self._insert(db, row, over_rows, over_bytes))
            # The first write after failed ones: the WAL that filled the disk goes into the
            # file now, while there is room for that, not at the next checkpoint, by which
            # time it may have filled the disk again. The alarm stays until that worked.
            if self._io_alarm and self._reclaim_wal():
                self._io_alarm = False
                log.warning("outbox %s: storing results again after %d failed writes", self.path, self._write_errors)
                self._keep_reserve()  # the open may have found no room for it
            self._depth += 1
            self._bytes += size
            self._last_seq = seq
            for name in self._waiting:
                self._waiting[name] += 1
            if dropped:
                self._forget(dropped)
            return seq

    def _refuse(self, result_id: str, size: int) -> None:
        """Count and raise the refusal of a put (callers hold self._lock)."""
        self._refused += 1
        if not self._alarm:
            log.error("outbox %s is full (%d results, %d bytes): refusing new results", self.path, self._depth,
                      self._bytes)
        self._alarm = True
        raise OutboxFull(
            f"outbox {self.path} is full ({self._depth}/{self.max_rows} results, "
            f"{self._bytes + size}/{self.max_bytes} bytes): result {result_id} refused"
        )

    def _insert(self, db: sqlite3.Connection, row: tuple[str, str, bytes, float, int], over_rows: int,
                over_bytes: int) -> tuple[int, list[tuple[int, int]]]:
        """Drop what the bounds ask for, insert ``row`` (result_id, topic, payload,
        created_at, waiting). Returns (seq, (bytes, waiting) of each row dropped)."""
        dropped = self._drop_oldest(db, over_rows, over_bytes) if over_rows > 0 or over_bytes > 0 else []
        seq = db.execute("INSERT INTO outbox (result_id, topic, payload, created_at, waiting) VALUES (?, ?, ?, ?, ?)",
                         row).lastrowid
        assert seq is not None  # an INSERT always sets lastrowid
        return int(seq), dropped

    @staticmethod
    def _drop_oldest(db: sqlite3.Connection, over_rows: int, over_bytes: int) -> list[tuple[int, int]]:
        """Delete the oldest entries until ``over_rows`` rows and ``over_bytes`` bytes are
        freed; (bytes, waiting) of each."""
        dropped: list[tuple[int, int]] = []
        freed = 0
        last = None
        cur = db.execute("SELECT seq, LENGTH(payload), waiting FROM outbox ORDER BY seq")
        for seq, size, waiting in cur:
            if len(dropped) >= over_rows and freed >= over_bytes:
                break
            dropped.append((int(size), int(waiting)))
            freed, last = freed + size, seq
        cur.close()
        if last is not None:
            db.execute("DELETE FROM outbox WHERE seq <= ?", (last,))
        return dropped

    def _forget(self, dropped: list[tuple[int, int]]) -> None:
        """The counters without the rows drop_oldest deleted (callers hold self._lock)."""
        self._depth -= len(dropped)
        self._bytes -= sum(size for size, _ in dropped)
        for name, bit in self._bits.items():
            self._waiting[name] -= sum(1 for _, waiting in dropped if waiting & bit)
        self._dropped += len(dropped)
        self._alarm = True
        log.error("outbox %s is full: dropped the %d oldest results (%d dropped in all)", self.path, len(dropped),
                  self._dropped)

    def ack(self, seq: int, sink: str = DEFAULT_SINK) -> bool:
        """``sink`` confirmed one entry; it is deleted once every sink did. False if it
        was not waiting for ``sink`` (confirmed before, or dropped)."""
        return self.ack_many((seq,), sink) == 1

    def ack_many(self, seqs: Iterable[int], sink: str = DEFAULT_SINK) -> int:
        """``sink`` confirmed several entries, in one transaction; how many waited for it."""
        keys = [int(s) for s in seqs]
        bit = self._bit(sink)
        if not keys:
            return 0

        def confirm(db: sqlite3.Connection) -> tuple[int, int, int]:
            n = gone = size = 0
            for seq in keys:
                # the last sink it waited for: the row goes (the one statement of a single sink)
                row = db.execute("DELETE FROM outbox WHERE seq = ? AND waiting = ? RETURNING LENGTH(payload)",
                                 (seq, bit)).fetchone()
                if row is not None:
                    n, gone, size = n + 1, gone + 1, size + row[0]
                elif db.execute("UPDATE outbox SET waiting = waiting & ~? WHERE seq = ? AND waiting & ? RETURNING seq",
                                (bit, seq, bit)).fetchone() is not None:
                    n += 1
            return n, gone, size

        with self._lock, self._guard("ack"):
            n, gone, size = self._write(confirm)
            self._waiting[sink] -= n
            self._depth -= gone
            self._bytes -= size
            if self._alarm and self._depth < _LOW_WATER * self.max_rows and self._bytes < _LOW_WATER * self.max_bytes:
                self._alarm = False
                log.warning("outbox %s drained to %d results: alarm cleared", self.path, self._depth)
            return n

    def mark_attempted(self, seqs: int | Iterable[int], at: float | None = None) -> None:
        """Count one send attempt for each entry (before handing it to the broker),
        so that a later re-send is known to be one."""
        seqs = [seqs] if isinstance(seqs, int) else list(seqs)
        if not seqs:
            return
        at = time.time() if at is None else at
        rows = [(at, int(s)) for s in seqs]
        with self._lock, self._guard("mark_attempted"):
            self._write(lambda db: db.executemany(
                "UPDATE outbox SET attempts = attempts + 1, last_attempt_at = ? WHERE seq = ?", rows))

    # --- reading --------------------------------------------------------------------

    def pending(self, limit: int = 100, after: int = 0, sink: str = DEFAULT_SINK) -> list[Entry]:
        """Up to ``limit`` entries with seq > ``after`` that wait for ``sink``, oldest first."""
        bit = self._bit(sink)
        with self._lock, self._guard("pending"):
            floor = self._floor[sink]
            start = max(int(after), floor - 1)
            rows = self._conn().execute(
                "SELECT seq, result_id, topic, payload, created_at, attempts FROM outbox "
                "WHERE seq > ? AND waiting & ? ORDER BY seq LIMIT ?", (start, bit, int(limit))).fetchall()
            if start == floor - 1:  # looked from the floor: the first found is the new one
                self._floor[sink] = int(rows[0][0]) if rows else self._last_seq + 1
        return [Entry(int(r[0]), r[1], r[2], bytes(r[3]), float(r[4]), int(r[5])) for r in rows]

    def depth(self, sink: str | None = None) -> int:
        """Entries held (None), or those waiting for ``sink``."""
        with self._lock:
            return self._depth if sink is None else self._waiting[sink]

    def bytes(self) -> int:
        """Payload bytes held."""
        with self._lock:
            return self._bytes

    def waiting(self) -> dict[str, int]:
        """Entries waiting for each sink, by name."""
        with self._lock:
            return dict(self._waiting)

    @property
    def alarm(self) -> bool:
        """True after an overflow (refused or dropped) until drained below 90 % of both
        bounds, and after a failed write (disk full, I/O error) until a put succeeds
        and the WAL could be copied into the file."""
        with self._lock:
            return self._alarm or self._io_alarm

    @property
    def refused(self) -> int:
        with self._lock:
            return self._refused

    @property
    def dropped(self) -> int:
        with self._lock:
            return self._dropped

    def stats(self) -> dict:
        """Depth, bytes, bounds, overflow counters, the alarm and what waits for each
        sink (``waiting``), for ``…/stats`` and status."""
        with self._lock:
            return {
                "depth": self._depth,
                "bytes": self._bytes,
                "max_rows": self.max_rows,
                "max_bytes": self.max_bytes,
                "policy": self.policy,
                "refused": self._refused,
                "dropped": self._dropped,
                "alarm": self._alarm or self._io_alarm,
                "write_errors": self._write_errors,
                "waiting": dict(self._waiting),
            }

    def __enter__(self) -> "Outbox":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Outbox({str(self.path)!r}, depth={self._depth}, policy={self.policy!r}, sinks={list(self._bits)})"


def _schema_1_to_2(db: sqlite3.Connection) -> None:
    """A schema 1 file: its rows wait for the sink ``mqtt`` (bit 1), the only one then."""
    db.execute("ALTER TABLE outbox ADD COLUMN waiting INTEGER NOT NULL DEFAULT 1")
    db.execute("INSERT OR IGNORE INTO sinks (name, bit) VALUES (?, 1)", (DEFAULT_SINK,))
    db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")


def _register_sinks(db: sqlite3.Connection, names: list[str], path: Path) -> dict[str, int]:
    """The bit of each sink in ``names``: the one it had, else a free one. A sink the file
    knew and ``names`` does not is no longer configured: nothing waits for it any more,
    and the rows that waited only for it go (logged)."""
    known = {str(name): int(bit) for name, bit in db.execute("SELECT name, bit FROM sinks")}
    for name, bit in known.items():
        if name in names:
            continue
        n = db.execute("UPDATE outbox SET waiting = waiting & ~? WHERE waiting & ?", (bit, bit)).rowcount
        db.execute("DELETE FROM sinks WHERE name = ?", (name,))
        if n:
            log.warning("outbox %s: %d results were waiting for %s, which is no longer configured: they are not "
                        "delivered there", path, n, name)
    db.execute("DELETE FROM outbox WHERE waiting = 0 AND seq != ?", (_RESERVE_SEQ,))
    bits = {name: bit for name, bit in known.items() if name in names}
    for name in names:
        if name not in bits:
            bits[name] = next(1 << i for i in range(_MAX_SINKS) if (1 << i) not in bits.values())
            db.execute("INSERT INTO sinks (name, bit) VALUES (?, ?)", (name, bits[name]))
    return {name: bits[name] for name in names}


def _transaction(db: sqlite3.Connection, body: Callable[[sqlite3.Connection], _T]) -> _T:
    """``body(db)`` between BEGIN IMMEDIATE and COMMIT; ROLLBACK on any error."""
    db.execute("BEGIN IMMEDIATE")
    try:
        out = body(db)
        db.execute("COMMIT")
    except BaseException:
        if db.in_transaction:
            db.execute("ROLLBACK")
        raise
    return out


def _out_of_space(exc: sqlite3.Error) -> bool:
    """SQLITE_FULL (disk full) or SQLITE_IOERR_WRITE (e.g. EFBIG past RLIMIT_FSIZE)."""
    code = getattr(exc, "sqlite_errorcode", None)  # Python ≥ 3.11
    if code is not None:
        return code in (13, 778)
    return "full" in str(exc) or "disk I/O error" in str(exc)


def outbox_path(cfg: OutboxConfig, state_dir: str | Path | None = None) -> Path:
    """The outbox file: ``cfg.path`` if absolute, else under the state directory:
    ``state_dir`` if given, else systemd's ``$STATE_DIRECTORY`` (its first entry).
    Never the current directory."""
    if cfg.path.is_absolute():
        return cfg.path
    base = state_dir if state_dir is not None else (os.environ.get("STATE_DIRECTORY", "").split(":")[0] or None)
    if base is None:
        raise ConfigError(
            f"outbox.path: {cfg.path} is relative and no state directory is known "
            "(run under systemd with StateDirectory=, pass a state directory, or give an absolute path)"
        )
    return Path(base) / cfg.path

"""The durable outbox: order, idempotence, bounds and their policies, threads,
and a writer killed with SIGKILL (everything it stored is there and drains)."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from mosquitto import Mosquitto, Subscriber, have_mosquitto
from station.config import MqttConfig, OutboxConfig
from station.errors import ConfigError, PublishError
import station.outbox as outbox_module
from station.outbox import Outbox, OutboxFull, outbox_path
from station.publish import MqttPublisher

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def box(tmp_path):
    with Outbox(tmp_path / "state" / "outbox.sqlite3") as ob:
        yield ob


def test_put_pending_ack_in_order(box):
    seqs = [box.put(f"r{i}", "p/result", b'{"i":%d}' % i, created_at=100.0 + i) for i in range(5)]
    assert seqs == sorted(seqs)
    assert box.depth() == 5 and box.bytes() == sum(len(b'{"i":%d}' % i) for i in range(5))
    entries = box.pending(10)
    assert [e.result_id for e in entries] == [f"r{i}" for i in range(5)]
    assert entries[2].topic == "p/result" and entries[2].payload == b'{"i":2}' and entries[2].created_at == 102.0
    assert entries[0].attempts == 0
    assert [e.seq for e in box.pending(2, after=seqs[1])] == seqs[2:4]
    assert box.ack(seqs[0]) and not box.ack(seqs[0])
    assert box.ack_many(seqs[1:3] + [999]) == 2
    assert [e.result_id for e in box.pending(10)] == ["r3", "r4"]
    assert box.depth() == 2 and box.bytes() == 2 * len(b'{"i":3}')


def test_put_is_idempotent_on_result_id(box):
    a = box.put("same", "t", b"first")
    assert box.put("same", "t", b"second") == a
    assert box.depth() == 1 and box.pending()[0].payload == b"first"
    box.ack(a)
    assert box.put("same", "t", b"again") > a  # once acknowledged, the id is new again


def test_attempts_are_counted(box):
    s1, s2 = box.put("a", "t", b"1"), box.put("b", "t", b"2")
    box.mark_attempted([s1, s2])
    box.mark_attempted(s1)
    assert [(e.result_id, e.attempts) for e in box.pending()] == [("a", 2), ("b", 1)]


def test_seq_is_never_reused(box):
    last = box.put("a", "t", b"1")
    box.ack(last)
    assert box.depth() == 0
    assert box.put("b", "t", b"2") > last


def test_reopen_keeps_entries_and_counts(tmp_path):
    path = tmp_path / "o.sqlite3"
    with Outbox(path) as ob:
        for i in range(3):
            ob.put(f"r{i}", "t", b"xx")
        ob.mark_attempted(ob.pending(1)[0].seq)
    with Outbox(path) as ob:
        assert ob.depth() == 3 and ob.bytes() == 6
        assert [e.attempts for e in ob.pending()] == [1, 0, 0]
        assert ob._db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_a_second_process_cannot_open_it(tmp_path, box):
    with pytest.raises(PublishError, match="in use by another process"):
        Outbox(box.path)


def test_closed_outbox_raises(tmp_path):
    ob = Outbox(tmp_path / "o.sqlite3")
    ob.close()
    ob.close()  # twice is fine
    with pytest.raises(PublishError, match="closed"):
        ob.put("a", "t", b"1")


def test_not_a_database_is_refused_with_the_path(tmp_path):
    path = tmp_path / "o.sqlite3"
    path.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(PublishError, match="o.sqlite3: cannot open the outbox"):
        Outbox(path)


# --- several sinks -------------------------------------------------------------------


def test_a_row_goes_once_every_sink_acknowledged_it(tmp_path):
    with Outbox(tmp_path / "o.sqlite3", sinks=("mqtt", "plc", "sparkplug")) as ob:
        seqs = [ob.put(f"r{i}", "t", b"x" * 10) for i in range(4)]
        assert ob.waiting() == {"mqtt": 4, "plc": 4, "sparkplug": 4} and ob.depth() == 4
        assert ob.ack_many(seqs, "mqtt") == 4 and not ob.ack(seqs[0], "mqtt")  # MQTT is done with them
        assert ob.depth() == 4 and ob.depth("mqtt") == 0 and ob.pending(10, sink="mqtt") == []
        assert [e.seq for e in ob.pending(10, sink="plc")] == seqs
        assert ob.ack(seqs[0], "plc") and ob.ack(seqs[0], "sparkplug")
        assert ob.depth() == 3 and ob.bytes() == 30  # the last sink's acknowledgement deletes it
        assert [e.seq for e in ob.pending(10, after=seqs[1], sink="sparkplug")] == seqs[2:]
        assert ob.stats()["waiting"] == {"mqtt": 0, "plc": 3, "sparkplug": 3}
        with pytest.raises(ValueError, match="has no sink 'opcua'"):
            ob.ack(seqs[1], "opcua")


def test_what_waits_for_each_sink_survives_a_restart(tmp_path):
    path = tmp_path / "o.sqlite3"
    with Outbox(path, sinks=("mqtt", "plc")) as ob:
        seqs = [ob.put(f"r{i}", "t", b"x") for i in range(3)]
        ob.ack_many(seqs, "mqtt")
        ob.ack(seqs[0], "plc")
    with Outbox(path, sinks=("mqtt", "plc")) as ob:
        assert ob.waiting() == {"mqtt": 0, "plc": 2} and ob.depth() == 2
        assert [e.result_id for e in ob.pending(10, sink="plc")] == ["r1", "r2"]


def test_a_sink_no_longer_configured_holds_nothing_back(tmp_path, caplog):
    """A sink named before and not now: what waited only for it goes (logged); what still
    waits for another stays. A sink named for the first time gets what is stored from then on."""
    path = tmp_path / "o.sqlite3"
    with Outbox(path, sinks=("mqtt", "plc")) as ob:
        a, b = ob.put("a", "t", b"x"), ob.put("b", "t", b"x")
        ob.ack(a, "mqtt")  # a waits for the PLC alone, b for both
    with Outbox(path, sinks=("mqtt", "sparkplug")) as ob:
        assert "2 results were waiting for plc, which is no longer configured" in caplog.text
        assert [e.seq for e in ob.pending(10)] == [b] and ob.depth() == 1
        assert ob.waiting() == {"mqtt": 1, "sparkplug": 0}
        c = ob.put("c", "t", b"x")
        assert [e.seq for e in ob.pending(10, sink="sparkplug")] == [c]


def test_pending_skips_what_other_sinks_hold_without_reading_it_again(tmp_path):
    """One sink far behind (a PLC away) leaves many rows that the others are done with:
    a sink that is up to date finds its next entry without scanning them at every call."""
    with Outbox(tmp_path / "o.sqlite3", sinks=("mqtt", "plc")) as ob:
        seqs = [ob.put(f"r{i}", "t", b"x") for i in range(500)]
        ob.ack_many(seqs, "mqtt")
        assert ob.pending(10) == []  # looked once: nothing waits for MQTT up to the newest row
        steps: list[int] = []
        ob._conn().set_progress_handler(lambda: steps.append(1), 10)
        assert ob.pending(10) == []
        new = ob.put("new", "t", b"x")
        assert [e.seq for e in ob.pending(10)] == [new]
        ob._conn().set_progress_handler(None, 0)
        assert len(steps) < 10, len(steps)  # a few VM steps, not 500 rows


def test_drop_oldest_counts_what_each_sink_lost(tmp_path):
    with Outbox(tmp_path / "o.sqlite3", max_rows=3, policy="drop_oldest", sinks=("mqtt", "plc")) as ob:
        seqs = [ob.put(f"r{i}", "t", b"x") for i in range(3)]
        ob.ack(seqs[0], "mqtt")  # r0 waits for the PLC alone
        ob.put("r3", "t", b"x")  # r0 dropped
        assert ob.waiting() == {"mqtt": 3, "plc": 3} and ob.dropped == 1 and ob.alarm


def test_a_file_of_schema_1_is_mqtts(tmp_path):
    """The outbox of a station before the sinks had names: every row waited for MQTT."""
    path = tmp_path / "o.sqlite3"
    db = sqlite3.connect(path)
    db.executescript("""
        CREATE TABLE outbox (seq INTEGER PRIMARY KEY AUTOINCREMENT, result_id TEXT NOT NULL UNIQUE,
            topic TEXT NOT NULL, payload BLOB NOT NULL, created_at REAL NOT NULL,
            attempts INTEGER NOT NULL DEFAULT 0, last_attempt_at REAL);
        INSERT INTO outbox (result_id, topic, payload, created_at) VALUES ('old1', 't', x'7b7d', 1.0);
        INSERT INTO outbox (result_id, topic, payload, created_at) VALUES ('old2', 't', x'7b7d', 2.0);
        PRAGMA user_version = 1;
    """)
    db.close()
    with Outbox(path, sinks=("mqtt", "plc")) as ob:
        assert ob.waiting() == {"mqtt": 2, "plc": 0}
        assert [e.result_id for e in ob.pending(10)] == ["old1", "old2"]
        assert ob.ack_many([e.seq for e in ob.pending(10)]) == 2 and ob.depth() == 0
    assert sqlite3.connect(path).execute("PRAGMA user_version").fetchone()[0] == outbox_module.SCHEMA_VERSION


# --- bounds and policies --------------------------------------------------------------


@pytest.mark.parametrize(
    "policy, max_rows, max_bytes, sizes, refused, dropped, kept",
    [
        # rows bound
        ("refuse_new", 3, 10_000, [10, 10, 10, 10], 1, 0, ["r0", "r1", "r2"]),
        ("drop_oldest", 3, 10_000, [10, 10, 10, 10], 0, 1, ["r1", "r2", "r3"]),
        # bytes bound
        ("refuse_new", 100, 35, [10, 10, 10, 10], 1, 0, ["r0", "r1", "r2"]),
        ("drop_oldest", 100, 35, [10, 10, 10, 30], 0, 3, ["r3"]),
        # one payload larger than the whole bound is refused under either policy
        ("refuse_new", 100, 35, [10, 40], 1, 0, ["r0"]),
        ("drop_oldest", 100, 35, [10, 40], 1, 0, ["r0"]),
    ],
)
def test_bounds_and_policies(tmp_path, policy, max_rows, max_bytes, sizes, refused, dropped, kept):
    with Outbox(tmp_path / "o.sqlite3", max_rows=max_rows, max_bytes=max_bytes, policy=policy) as ob:
        assert not ob.alarm
        n_refused = 0
        for i, size in enumerate(sizes):
            try:
                ob.put(f"r{i}", "t", b"x" * size)
            except OutboxFull as exc:
                n_refused += 1
                assert "is full" in str(exc) and f"r{i}" in str(exc)
        assert n_refused == refused == ob.refused
        assert ob.dropped == dropped
        assert [e.result_id for e in ob.pending(100)] == kept
        assert ob.depth() == len(kept) and ob.bytes() == sum(len(e.payload) for e in ob.pending(100))
        assert ob.alarm  # every case above overflowed once
        assert ob.stats()["alarm"] and ob.stats()["policy"] == policy


def test_default_policy_refuses_and_alarm_clears_after_draining(tmp_path):
    assert OutboxConfig().policy == "refuse_new"
    with Outbox(tmp_path / "o.sqlite3", max_rows=10) as ob:
        seqs = [ob.put(f"r{i}", "t", b"x") for i in range(10)]
        with pytest.raises(OutboxFull):
            ob.put("r10", "t", b"x")
        assert ob.alarm and ob.depth() == 10
        ob.ack(seqs[0])  # 9 of 10: still above 90 %
        assert ob.alarm
        ob.ack(seqs[1])  # 8 of 10: below
        assert not ob.alarm
        ob.put("r10", "t", b"x")


def test_put_and_ack_from_two_threads(box):
    n = 2000
    stored: list[int] = []
    cond = threading.Condition()
    errors: list[BaseException] = []

    def producer():
        try:
            for i in range(n):
                seq = box.put(f"r{i}", "t", b"payload-%d" % i)
                with cond:
                    stored.append(seq)
                    cond.notify()
        except BaseException as exc:  # surfaced by the assertion below
            errors.append(exc)

    def acker():
        done = 0
        try:
            while done < n:
                with cond:
                    cond.wait_for(lambda seen=done: len(stored) > seen, timeout=10)
                    batch = stored[done:]
                for seq in batch:
                    assert box.ack(seq)
                done += len(batch)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=producer), threading.Thread(target=acker)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not errors
    assert box.depth() == 0 and box.bytes() == 0 and box.pending() == []


# --- the state directory ----------------------------------------------------------------


def test_outbox_path_is_under_the_state_directory(tmp_path, monkeypatch):
    monkeypatch.delenv("STATE_DIRECTORY", raising=False)
    assert outbox_path(OutboxConfig(path=Path("/abs/o.db"))) == Path("/abs/o.db")
    assert outbox_path(OutboxConfig(), tmp_path) == tmp_path / "outbox.sqlite3"
    with pytest.raises(ConfigError, match="outbox.path: outbox.sqlite3 is relative"):
        outbox_path(OutboxConfig())
    monkeypatch.setenv("STATE_DIRECTORY", f"{tmp_path}/a:{tmp_path}/b")
    assert outbox_path(OutboxConfig()) == tmp_path / "a" / "outbox.sqlite3"
    ob = Outbox.from_config(OutboxConfig(max_rows=5, policy="drop_oldest"))
    assert ob.path == tmp_path / "a" / "outbox.sqlite3" and ob.max_rows == 5 and ob.policy == "drop_oldest"
    ob.close()


# --- SIGKILL ----------------------------------------------------------------------------

WRITER = r"""
import sys
from station.outbox import Outbox

ob = Outbox(sys.argv[1])
i = 0
while True:
    seq = ob.put(f"r{i}", "test/kill/result", b'{"id":"r%d","seq":%d}' % (i, i))
    if i % 3 == 0:  # some acks too, so the kill may land in either kind of write
        ob.ack(seq)
    print(i, seq, flush=True)  # printed only after the commit returned
    i += 1
"""


def _kill_writer_midway(path: Path, at_least: int) -> dict[str, int]:
    """Run WRITER, SIGKILL it once it reported ``at_least`` puts; the puts it reported."""
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(path)], stdout=subprocess.PIPE, text=True, cwd=ROOT)
    reported: dict[str, int] = {}

    def take(line: str) -> None:
        if line.endswith("\n"):  # the kill may cut the last line short: not reported
            i, seq = map(int, line.split())
            reported[f"r{i}"] = seq

    try:
        for line in proc.stdout:
            take(line)
            if len(reported) >= at_least:
                proc.send_signal(signal.SIGKILL)
                break
        for line in proc.stdout.read().splitlines(keepends=True):  # written before the kill landed
            take(line)
    finally:
        proc.kill()
        proc.wait(10)
    assert proc.returncode == -signal.SIGKILL
    return reported


def test_everything_put_survives_sigkill(tmp_path):
    path = tmp_path / "o.sqlite3"
    reported = _kill_writer_midway(path, at_least=1500)
    with Outbox(path) as ob:  # the kernel released the dead writer's lock
        assert ob._db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        stored = {e.result_id: e.seq for e in ob.pending(100_000)}
    expected = {rid: seq for rid, seq in reported.items() if int(rid[1:]) % 3 != 0}
    missing = set(expected) - set(stored)
    assert not missing, f"{len(missing)} committed puts lost, e.g. {sorted(missing)[:5]}"
    assert all(stored[rid] == seq for rid, seq in expected.items())
    assert not any(int(rid[1:]) % 3 == 0 for rid in stored if rid in reported)  # acked ones stay acked


@pytest.mark.skipif(not have_mosquitto(), reason="mosquitto is not installed")
def test_outbox_of_a_killed_writer_drains_after_reopening(tmp_path):
    path = tmp_path / "o.sqlite3"
    reported = _kill_writer_midway(path, at_least=300)
    waiting = {rid for rid in reported if int(rid[1:]) % 3 != 0}
    with Mosquitto(tmp_path / "broker") as broker, Subscriber(broker.port, "test/kill/result") as sub, Outbox(path) as ob:
        depth = ob.depth()
        assert depth >= len(waiting)
        cfg = MqttConfig(host=broker.host, port=broker.port, reconnect_min_s=0.1, reconnect_max_s=0.5)
        pub = MqttPublisher(cfg, "st-kill", ob)
        pub.start()
        try:
            assert pub.wait_until(lambda p: p.outbox_depth == 0, 10), pub.stats()
            assert sub.wait_for(lambda msgs: len(msgs) >= depth, 5)
        finally:
            pub.stop(2)
        got = {}
        for m in sub.messages:
            record = json.loads(m.payload)
            got[record["id"]] = record
        assert waiting <= set(got)
        assert all(r["late"] for r in got.values())  # stored before this connection: late
        assert pub.stats()["late"] == depth


def test_wal_file_is_used(tmp_path):
    path = tmp_path / "o.sqlite3"
    with Outbox(path) as ob:
        ob.put("a", "t", b"1")
        assert os.path.exists(str(path) + "-wal")
        other = sqlite3.connect(path)  # a reader sees the committed row while the writer is open
        assert other.execute("SELECT result_id FROM outbox").fetchall() == [("a",)]
        other.close()


def test_checkpoints_taken_over_leave_puts_and_acks_alone(tmp_path):
    """take_over_checkpoints: no commit copies the WAL any more (it grows past SQLite's
    1,000-page automatic checkpoint); checkpoint() copies it from another thread while
    puts and acks go on, and the next commit starts the WAL from its beginning."""
    path = tmp_path / "o.sqlite3"
    payload = b"x" * 1500
    with Outbox(path) as ob:
        ob.take_over_checkpoints()
        for i in range(400):
            ob.ack(ob.put(f"r{i}", "t", payload))
        wal_pages, copied = ob.checkpoint()
        assert wal_pages > 1000 and copied == wal_pages  # nothing was checkpointed by a commit
        stop = threading.Event()
        seqs: list[int] = []

        def writer():
            i = 0
            while not stop.is_set() or i < 200:
                seqs.append(ob.put(f"w{i}", "t", payload))
                i += 1

        t = threading.Thread(target=writer)
        t.start()
        for _ in range(20):  # checkpoints while the writer puts
            ob.checkpoint()
        stop.set()
        t.join()
        assert ob.depth() == len(seqs) and [e.seq for e in ob.pending(limit=len(seqs) + 1)] == seqs
        ob.checkpoint()
        ob.put("after", "t", payload)
        assert ob.checkpoint()[0] < 20  # the WAL started over after the complete checkpoint
        n = ob.depth()
    with Outbox(path) as again:  # everything stored is in the file
        assert again.depth() == n


def test_checkpoint_of_a_closed_outbox_raises(tmp_path):
    ob = Outbox(tmp_path / "o.sqlite3")
    ob.close()
    with pytest.raises(PublishError, match="closed"):
        ob.checkpoint()


def _wal_bytes(path: Path) -> int:
    try:
        return os.path.getsize(str(path) + "-wal")
    except FileNotFoundError:
        return 0


def _cycle(ob: Outbox, key: str, payload: bytes) -> None:
    """One result's life in the outbox: stored, handed to the broker, acknowledged."""
    seq = ob.put(key, "t", payload)
    ob.mark_attempted(seq)
    ob.ack(seq)


def test_commits_checkpoint_the_wal_at_its_limit_when_nobody_else_does(tmp_path, monkeypatch):
    """take_over_checkpoints and no checkpoint() at all (a stuck or slow thread): the
    WAL still stops at WAL_LIMIT, and the file is cut back to it, whatever went through."""
    monkeypatch.setattr(outbox_module, "WAL_LIMIT", 1024 * 1024)
    path = tmp_path / "o.sqlite3"
    payload = b"x" * 1500
    sizes = []
    with Outbox(path) as ob:
        ob.take_over_checkpoints()
        for i in range(600):  # ~6 WAL pages a result: ~14 MiB through the WAL
            _cycle(ob, f"r{i}", payload)
            sizes.append(_wal_bytes(path))
        assert ob.depth() == 0
    assert sizes[-1] > 0 and max(sizes) <= 1024 * 1024 + 64 * 1024, max(sizes)  # one commit's pages over, at most


def test_checkpoints_keep_the_wal_small_while_a_writer_never_pauses(tmp_path, monkeypatch):
    """The WAL starts over after every checkpoint() even though puts, marks and acks
    go on meanwhile (a line at up to 1,000 results/s): it holds what came since the
    last one, not everything since the start (WAL_LIMIT raised out of the way: the
    checkpoints alone bound it here)."""
    monkeypatch.setattr(outbox_module, "WAL_LIMIT", 1 << 30)
    path = tmp_path / "o.sqlite3"
    payload = b"x" * 1500
    stop = threading.Event()
    done = [0]
    with Outbox(path) as ob:
        ob.take_over_checkpoints()

        def writer():
            while not stop.wait(0.001):
                _cycle(ob, f"r{done[0]}", payload)
                done[0] += 1

        t = threading.Thread(target=writer)
        t.start()
        sizes = []
        try:
            while done[0] < 1000 and t.is_alive():  # ~20 MiB through the WAL
                stop.wait(0.02)
                ob.checkpoint()
                sizes.append(_wal_bytes(path))
        finally:
            stop.set()
            t.join()
        assert done[0] >= 1000 and ob.depth() == 0
    assert max(sizes) < 4 * 1024 * 1024, f"WAL reached {max(sizes)} bytes over {done[0]} results"


_FILL_THE_DISK = """
import json, logging, resource, sys
from station.outbox import Outbox

logging.basicConfig(level=logging.DEBUG, stream=sys.stderr, format="%(message)s")
resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))  # no file past 1 MiB: SQLite gets EFBIG
with Outbox(sys.argv[1]) as ob:
    ob.take_over_checkpoints()  # and no checkpoint(): only the full disk stops the WAL
    for i in range(1000):
        seq = ob.put(f"r{i}", "t", b"x" * 1500)
        ob.mark_attempted(seq)
        if i % 10:
            ob.ack(seq)
    print(json.dumps(ob.stats()))
"""


def test_a_wal_that_fills_the_disk_costs_no_write(tmp_path):
    """Out of space, a write copies the WAL into the database file, which frees the
    WAL's own space, and tries again: 1,000 results through a WAL that the disk (here
    RLIMIT_FSIZE in a child process) stops every ~40 results, and none refused or lost."""
    path = tmp_path / "o.sqlite3"
    run = subprocess.run([sys.executable, "-c", _FILL_THE_DISK, str(path)], capture_output=True, text=True,
                         timeout=120, cwd=ROOT)
    assert run.returncode == 0, run.stderr[-3000:]
    stats = json.loads(run.stdout)
    assert stats["write_errors"] == 0 and stats["depth"] == 100 and not stats["alarm"], stats
    assert run.stderr.count("truncated to free space") >= 5  # the disk was full, again and again
    with Outbox(path) as ob:
        assert [e.result_id for e in ob.pending(1000)] == [f"r{i}" for i in range(0, 1000, 10)]


def test_the_file_keeps_free_pages_for_results_in_flight(tmp_path):
    """A new outbox writes RESERVE bytes of free pages into its file (blocks on the disk,
    not a hole): results in flight take them, so the file does not grow and a checkpoint
    needs no new space. Reopening keeps them and writes nothing more; seqs still start at 1."""
    path = tmp_path / "o.sqlite3"
    with Outbox(path) as ob:
        assert ob._db.execute("PRAGMA freelist_count").fetchone()[0] * ob.page_size >= outbox_module.RESERVE
        size = path.stat().st_size
        assert path.stat().st_blocks * 512 >= size
        ob.take_over_checkpoints()
        seqs = [ob.put(f"r{i}", "t", b"x" * 1500) for i in range(200)]  # ~300 KB in flight
        assert seqs[0] == 1
        ob.ack_many(seqs)
        ob.checkpoint()
        assert path.stat().st_size == size
    with Outbox(path) as again:
        assert path.stat().st_size == size and again.depth() == 0 and again.put("next", "t", b"x") == 201

"""station run end to end: the daemon as a process, a real Mosquitto, real
images and the bundled model. Synchronised on messages and files, not sleeps."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import time
from functools import partial
from pathlib import Path

import cv2
import jsonschema
import pytest
from daemonkit import jsonl, wait_until
from mosquitto import Mosquitto, Subscriber, have_mosquitto
from test_priority import FIFO_REFUSED, NICE_REFUSED

from station.messages import load_schema

pytestmark = pytest.mark.skipif(not have_mosquitto(), reason="mosquitto binary not installed")

ROOT = Path(__file__).resolve().parent.parent
SAMPLES = sorted(p for p in (ROOT / "samples").iterdir() if p.suffix in (".png", ".jpg"))
PREFIX = "acme/plant1/press/line3/cam1"
VALIDATOR = jsonschema.Draft202012Validator(load_schema())


class RecordSink:
    """A sink of the daemon (station/sinks.py) that hands each record to ``fn``."""

    def __init__(self, fn):
        self.fn = fn

    def start(self) -> None:
        pass

    def deliver(self, record: dict, ctx) -> None:
        self.fn(record)

    def acked(self, seq: int) -> None:
        pass

    def close(self) -> None:
        pass


class AckSink(RecordSink):
    """A sink that also keeps each record's (record, outbox seq, unrounded capture time)
    and the seqs the broker acknowledged."""

    def __init__(self):
        super().__init__(lambda record: None)
        self.published: list[tuple[dict, int | None, float | None]] = []
        self.acks: list[int] = []

    def deliver(self, record: dict, ctx) -> None:
        self.published.append((record, ctx.seq, ctx.captured_at))

    def acked(self, seq: int) -> None:
        self.acks.append(seq)


def mqtt_section(broker: Mosquitto, **extra) -> str:
    lines = [
        "mqtt:",
        f"  host: {broker.host}",
        f"  port: {broker.port}",
        "  enterprise: acme",
        "  site: plant1",
        "  area: press",
        "  line: line3",
        "  reconnect_min_s: 1.5",
        "  reconnect_max_s: 1.5",
    ]
    lines += [f"  {k}: {v}" for k, v in extra.items()]
    return "\n".join(lines) + "\n"


def payloads(sub: Subscriber, topic: str) -> list[dict]:
    return [json.loads(m.payload) for m in sub.on_topic(topic)]


def result_ids(sub: Subscriber) -> set[str]:
    return {r["id"] for r in payloads(sub, f"{PREFIX}/result")}


def states(sub: Subscriber) -> list[str]:
    return [r["state"] for r in payloads(sub, f"{PREFIX}/status")]


def drop_images(folder: Path, start: int, n: int) -> list[str]:
    """Write n sample images into the watched folder (temp name, then rename,
    as camera SDKs do)."""
    names = []
    for i in range(start, start + n):
        src = SAMPLES[i % len(SAMPLES)]
        name = f"part{i:04d}{src.suffix}"
        tmp = folder / f".{name}.tmp"
        shutil.copyfile(src, tmp)
        os.replace(tmp, folder / name)
        names.append(name)
    return names


def folder_empty(folder: Path) -> bool:
    return not any(p for p in folder.iterdir() if not p.name.startswith("."))


def test_folder_results_survive_a_broker_restart_and_status_follows_the_lifecycle(tmp_path, broker, stations):
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    config = f"""
station: {{id: cam1}}
camera: {{type: folder, path: {inbox}, after: delete, settle_s: 0.05}}
{mqtt_section(broker)}
"""
    sub = Subscriber(broker.port, f"{PREFIX}/#").connect()
    station = stations(tmp_path, config)
    try:
        assert sub.wait_for(lambda m: "online" in states(sub), 30), station.text()
        drop_images(inbox, 0, 10)
        assert sub.wait_for(lambda m: len(result_ids(sub)) >= 10, 20), station.text()

        broker.stop()  # a clean broker shutdown in the middle of the run
        drop_images(inbox, 10, 10)
        wait_until(lambda: folder_empty(inbox), 20, "the daemon to store the parts inspected while the broker is down")
        broker.start()
        sub.reconnect()
        drop_images(inbox, 20, 10)
        assert sub.wait_for(lambda m: len(result_ids(sub)) >= 30, 20), (len(result_ids(sub)), station.text())

        station.signal(signal.SIGTERM)
        assert station.wait(15) == 0
        assert sub.wait_for(lambda m: states(sub)[-1:] == ["stopped"], 5), states(sub)
    finally:
        sub.close()

    records = payloads(sub, f"{PREFIX}/result")
    by_id: dict[str, list[dict]] = {}
    for r in records:
        VALIDATOR.validate(r)
        by_id.setdefault(r["id"], []).append(r)
    assert len(by_id) == 30  # every part, duplicates only under the same id
    sources = sorted(Path(copies[0]["source"]).name for copies in by_id.values())
    assert sources == sorted(f"part{i:04d}{SAMPLES[i % len(SAMPLES)].suffix}" for i in range(30))
    late = {Path(c[-1]["source"]).name for c in by_id.values() if c[-1]["late"]}
    assert {f"part{i:04d}" for i in range(10, 20)} <= {Path(n).stem for n in late}
    assert all(r["station_id"] == "cam1" and r["grade"] in ("PASS", "DISCOUNT", "REJECT") for r in records)


def test_sigkill_leaves_the_last_will(tmp_path, broker, stations):
    config = f"""
station: {{id: cam1}}
camera: {{type: fake, fps: 20}}
{mqtt_section(broker)}
"""
    sub = Subscriber(broker.port, f"{PREFIX}/status").connect()
    station = stations(tmp_path, config)
    try:
        assert sub.wait_for(lambda m: "online" in states(sub), 30), station.text()
        station.signal(signal.SIGKILL)
        station.wait(5)
        assert sub.wait_for(lambda m: states(sub)[-1:] == ["offline"], 10), states(sub)
    finally:
        sub.close()
    # retained: a consumer connecting later sees it too
    late_sub = Subscriber(broker.port, f"{PREFIX}/status").connect()
    try:
        assert late_sub.wait_for(lambda m: len(m) >= 1, 5)
        assert late_sub.messages[0].retain and json.loads(late_sub.messages[0].payload)["state"] == "offline"
    finally:
        late_sub.close()


def test_mqtt_trigger_tags_the_next_frame_and_times_out(tmp_path, broker, stations):
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    config = f"""
station: {{id: cam1}}
camera: {{type: folder, path: {inbox}, settle_s: 0.05}}
trigger: {{type: mqtt, timeout_s: 1.0}}
{mqtt_section(broker)}
"""
    sub = Subscriber(broker.port, f"{PREFIX}/#").connect()
    station = stations(tmp_path, config)
    try:
        assert sub.wait_for(lambda m: "online" in states(sub), 30), station.text()
        # a part with no frame: an error result for it after the timeout
        sub.client.publish(f"{PREFIX}/trigger", "P-100", qos=1)
        assert sub.wait_for(lambda m: any(r.get("part_id") == "P-100" for r in payloads(sub, f"{PREFIX}/result")), 10)
        # a part and then its frame
        sub.client.publish(f"{PREFIX}/trigger", json.dumps({"part_id": "P-101"}), qos=1)
        time.sleep(0.3)  # the trigger travels through the broker before the frame appears
        drop_images(inbox, 0, 1)
        assert sub.wait_for(lambda m: any(r.get("part_id") == "P-101" for r in payloads(sub, f"{PREFIX}/result")), 10)
        # a frame with no trigger is not inspected
        drop_images(inbox, 1, 1)
        wait_until(lambda: folder_empty(inbox), 10, "the untriggered frame to be taken")
        station.signal(signal.SIGTERM)
        assert station.wait(15) == 0
    finally:
        sub.close()
    results = {r["part_id"]: r for r in payloads(sub, f"{PREFIX}/result")}
    assert set(results) == {"P-100", "P-101"}
    assert "no frame within 1.0 s" in results["P-100"]["error"]
    assert results["P-101"]["grade"] in ("PASS", "DISCOUNT", "REJECT")
    for r in results.values():
        VALIDATOR.validate(r)


def test_fake_camera_lost_and_recovered(tmp_path, broker, stations):
    config = f"""
station: {{id: cam1}}
camera: {{type: fake, fps: 30, fail_after_frames: 5, fail_for_s: 1.0}}
run: {{reconnect_min_s: 0.2, reconnect_max_s: 0.4}}
{mqtt_section(broker)}
"""
    sub = Subscriber(broker.port, f"{PREFIX}/#").connect()
    station = stations(tmp_path, config)
    try:
        assert sub.wait_for(lambda m: len(result_ids(sub)) >= 12, 30), station.text()
        station.signal(signal.SIGTERM)
        assert station.wait(15) == 0
    finally:
        sub.close()
    cameras = [r.get("camera") for r in payloads(sub, f"{PREFIX}/status") if r["state"] == "online"]
    assert "connected" in cameras and ("lost" in cameras or "reconnecting" in cameras), cameras
    assert cameras.index("connected") < len(cameras) - 1 - cameras[::-1].index("connected")  # connected again later
    assert "camera lost after 5 frames" in station.text()


def write_video(path: Path, frames: int) -> None:
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 25, (256, 256))
    plate = cv2.imread(str(SAMPLES[0]), cv2.IMREAD_GRAYSCALE)
    for _ in range(frames):
        writer.write(cv2.cvtColor(cv2.resize(plate, (256, 256)), cv2.COLOR_GRAY2BGR))
    writer.release()


def test_video_source_appearing_late_then_ending(tmp_path, stations):
    video = tmp_path / "line.avi"
    out = tmp_path / "results.jsonl"
    config = f"""
station: {{id: cam1}}
camera: {{type: video, path: {video}}}
run: {{reconnect_min_s: 0.2, reconnect_max_s: 0.2}}
"""
    station = stations(tmp_path, config, "--jsonl", str(out), state=False)
    wait_until(lambda: "video file not found" in station.text(), 30, "the daemon to report the missing video")
    tmp = tmp_path / "tmp.avi"
    write_video(tmp, 12)
    os.replace(tmp, video)
    assert station.wait(30) == 0, station.text()  # a finite video ends the run cleanly
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["source"] for r in records] == [f"{video}#frame={i}" for i in range(12)]
    assert "camera video:" in station.text() and "connected" in station.text()


def test_sighup_reloads_grading_and_keeps_running_on_a_bad_config(tmp_path, stations):
    out = tmp_path / "results.jsonl"
    base = "station: {id: cam1}\ncamera: {type: fake, fps: 40}\n"
    station = stations(tmp_path, base, "--jsonl", str(out), state=False)
    records = partial(jsonl, out)  # the complete lines: the daemon is still appending
    wait_until(lambda: len(records()) >= 5, 30, "first results")
    station.cfg.write_text(base + "grading:\n  total_area_pct: {discount: null, reject: 0.0}\n  defect_area_pct: null\n")
    station.signal(signal.SIGHUP)
    wait_until(lambda: "reloaded" in station.text(), 10, "the reload")
    n = len(records())
    wait_until(lambda: len(records()) >= n + 10, 10, "results after the reload")
    after = records()[n + 2 :]
    assert all(r["grade"] == "REJECT" or r["defect_area_pct"] == 0 for r in after)
    station.cfg.write_text(base + "grading: {total_area_pct: {discount: 3, reject: 1}}\n")
    station.signal(signal.SIGHUP)
    wait_until(lambda: "reload refused" in station.text(), 10, "the refused reload")
    n = len(records())
    wait_until(lambda: len(records()) >= n + 5, 10, "results after the refused reload")
    station.signal(signal.SIGTERM)
    assert station.wait(15) == 0
    assert "discount (3.0) must not exceed reject (1.0)" in station.text()


def test_archive_and_metrics(tmp_path, stations):
    import urllib.request

    from mosquitto import free_port
    from prometheus_client.parser import text_string_to_metric_families

    port = free_port()
    out = tmp_path / "results.jsonl"
    config = f"""
station: {{id: cam1}}
camera: {{type: fake, fps: 25}}
archive: {{enabled: true, grades: [PASS, DISCOUNT, REJECT], what: [image, mask, overlay]}}
metrics: {{enabled: true, port: {port}}}
"""
    station = stations(tmp_path, config, "--jsonl", str(out))
    wait_until(lambda: len(jsonl(out)) >= 8, 30, "results")
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    station.signal(signal.SIGTERM)
    assert station.wait(15) == 0
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for fam in text_string_to_metric_families(text) for s in fam.samples}
    results = sum(v for (name, labels), v in samples.items() if name == "station_results_total")
    assert results >= 8
    assert samples[("station_frames_captured_total", ())] >= results
    assert any(name == "station_stage_latency_seconds_bucket" for name, _ in samples)
    records = [json.loads(line) for line in out.read_text().splitlines()]
    entries = sorted((tmp_path / "state" / "archive").rglob("*_record.json"))
    assert len(entries) == len(records)
    first = records[0]
    stem = next(p for p in entries if first["id"] in p.name).name.replace("_record.json", "")
    folder = entries[0].parent
    for part in ("image", "mask", "overlay"):
        assert (folder / f"{stem}_{part}.png").is_file()


def test_sd_notify_ready_watchdog_stopping(tmp_path, stations):
    import socket

    sock_path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(sock_path))
    sock.settimeout(30)
    env = {"NOTIFY_SOCKET": str(sock_path), "WATCHDOG_USEC": "1000000"}
    station = stations(tmp_path, "station: {id: cam1}\ncamera: {type: fake, fps: 20}\n", state=False, env=env)
    messages: list[str] = []
    try:
        while messages.count("WATCHDOG=1") < 3:
            messages.append(sock.recv(4096).decode())
        station.signal(signal.SIGTERM)
        while "STOPPING=1" not in messages:
            messages.append(sock.recv(4096).decode())
        assert station.wait(15) == 0
    finally:
        sock.close()
    assert messages[0] == "READY=1", messages  # after the models were loaded and warmed up


def test_watchdog_health_follows_progress(tmp_path):
    from station.config import parse_config
    from station.daemon import Daemon

    d = Daemon(parse_config("camera: {type: fake}\nrun: {stall_s: 2}\n"))
    assert d._healthy()
    d.pipeline._busy["infer"] = time.monotonic() - 3  # one inspection stuck for 3 s
    assert not d._healthy()
    d.pipeline._busy["infer"] = None
    d.pipeline._heartbeat = time.monotonic() - 3  # the capture loop stopped turning
    assert not d._healthy()


def _nice(tid: int) -> int:
    return os.getpriority(os.PRIO_PROCESS, tid)


@pytest.mark.parametrize("increment", [7, None])
def test_threads_but_inference_run_at_the_lower_priority(tmp_path, broker, increment):
    """tuning.nice_non_inference: capture (which preprocesses), finish and the MQTT threads
    give the cores to ONNX Runtime; the infer thread keeps the process's priority.
    Unset (tuning off), every thread keeps the process's priority."""
    import threading

    from station.config import parse_config
    from station.daemon import Daemon

    base = _nice(threading.get_native_id())
    seen: dict[str, int] = {}

    def sink(record: dict) -> None:  # on the finish thread, with every other thread alive
        for t in threading.enumerate():
            if t.native_id is not None and t.is_alive():
                seen.setdefault(t.name.split("-station")[0], _nice(t.native_id))

    text = ("camera: {type: fake, frames: 6, height: 96, width: 128}\n"
            + ("" if increment is None else f"tuning: {{nice_non_inference: {increment}}}\n")
            + f"run: {{state_dir: {tmp_path / 'state'}}}\n" + mqtt_section(broker))
    daemon = Daemon(parse_config(text), sinks=[RecordSink(sink)])
    assert daemon.run(install_signals=False) == 0
    lowered = min(19, base + (increment or 0))
    for name in ("capture", "finish", "mqtt-sender", "paho-mqtt-client", "outbox-checkpoint"):
        assert seen[name] == lowered, (name, seen)
    assert "prepare" not in seen  # preprocessing runs on the capture thread
    assert seen["infer"] == base, seen
    assert _nice(threading.get_native_id()) == base  # the caller's thread is left alone


def _threads_of_a_run(tmp_path, broker, run: str, probe) -> dict:
    """Run the daemon on both shipped models in parallel (4 fake frames, MQTT to ``broker``,
    ``run`` more of the tuning section) and return {thread name: probe(native id)} for
    every thread alive when the first result reaches the sink (on the finish thread)."""
    import threading

    from station.config import parse_config
    from station.daemon import Daemon

    seen: dict = {}

    def sink(record: dict) -> None:
        for t in threading.enumerate():
            if t.native_id is not None and t.is_alive():
                seen.setdefault(t.name.split("-station")[0], probe(t.native_id))

    text = (f"models: {{segmentation: {ROOT / 'models/magnetic_tile_unet.onnx'}, "
            f"detection: {ROOT / 'models/neu_det_detector.onnx'}}}\n"
            f"tuning: {{parallel_models: true, {run}}}\n"
            "camera: {type: fake, frames: 4, height: 96, width: 128}\n"
            f"run: {{state_dir: {tmp_path / 'state'}}}\n" + mqtt_section(broker))
    assert Daemon(parse_config(text), sinks=[RecordSink(sink)]).run(install_signals=False) == 0
    return seen


@pytest.mark.skipif(FIFO_REFUSED is not None, reason=str(FIFO_REFUSED))
def test_the_threads_that_run_the_models_are_realtime_when_asked(tmp_path, broker, caplog):
    """tuning.realtime_inference: the infer thread and the helper that runs the second model
    at the same time (tuning.parallel_models) are under SCHED_FIFO at that priority,
    every other thread keeps the ordinary policy and, tuning.nice_non_inference being
    unset, the process's nice value."""
    import threading

    caplog.set_level("INFO", logger="station.daemon")
    caplog.set_level("INFO", logger="station.pipeline")
    base = _nice(threading.get_native_id())
    found = _threads_of_a_run(tmp_path, broker, "realtime_inference: 3", lambda tid: (
        os.sched_getscheduler(tid), os.sched_getparam(tid).sched_priority, _nice(tid)))
    seen = {name: (policy, priority) for name, (policy, priority, _) in found.items()}
    nices = {name: nice for name, (_, _, nice) in found.items()}
    realtime = {name for name, policy in seen.items() if policy == (os.SCHED_FIFO, 3)}
    assert realtime == {"infer", "infer_0"}, seen
    assert {policy for name, policy in seen.items() if name not in realtime} == {(os.SCHED_OTHER, 0)}, seen
    assert os.sched_getscheduler(0) == os.SCHED_OTHER  # the caller's thread is left alone
    assert "the models' threads run under SCHED_FIFO 3 (tuning.realtime_inference)" in caplog.text
    for name in ("capture", "finish", "mqtt-sender", "paho-mqtt-client", "outbox-checkpoint"):
        assert nices[name] == base, (name, nices)
    assert "threads but inference at nice +0 (tuning.nice_non_inference)" in caplog.text


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="tuning.infer_cpu needs a process allowed on two CPUs")
def test_the_infer_thread_runs_alone_on_its_cpu_when_asked(tmp_path, broker, caplog):
    """tuning.infer_cpu: the infer thread (the frame's first model) runs on that CPU and every
    other thread of the station (the second model's helper, capture, finish, the MQTT
    threads, the checkpoints) on the others; the caller's thread gets its CPUs back."""
    caplog.set_level("INFO", logger="station.daemon")
    allowed = os.sched_getaffinity(0)
    cpu = max(allowed)
    seen = _threads_of_a_run(tmp_path, broker, f"infer_cpu: {cpu}", os.sched_getaffinity)
    assert seen.pop("infer") == {cpu}, seen
    for name in ("infer_0", "capture", "finish", "mqtt-sender", "paho-mqtt-client", "outbox-checkpoint"):
        assert seen[name] == allowed - {cpu}, (name, seen)
    assert os.sched_getaffinity(0) == allowed  # the caller's thread is given its CPUs back
    assert f"the infer thread runs on CPU {cpu}, every other thread on CPUs" in caplog.text


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="tuning.infer_cpu needs a process allowed on two CPUs")
@pytest.mark.skipif(FIFO_REFUSED is not None, reason=str(FIFO_REFUSED))
@pytest.mark.skipif(NICE_REFUSED is not None, reason=str(NICE_REFUSED))
def test_the_infer_thread_alone_on_its_cpu_can_run_at_a_nice_value_instead_of_fifo(tmp_path, broker, caplog):
    """tuning.infer_nice: the infer thread, alone on its CPU (tuning.infer_cpu), runs under the
    ordinary policy at that nice value, which the kernel's real-time limit never stops; the helper
    that runs the second model stays under SCHED_FIFO (tuning.realtime_inference), the station's
    other threads at the process's priority."""
    import threading

    caplog.set_level("INFO", logger="station.pipeline")
    base = _nice(threading.get_native_id())
    cpu = max(os.sched_getaffinity(0))
    seen = _threads_of_a_run(tmp_path, broker, f"infer_cpu: {cpu}, infer_nice: -6, realtime_inference: 3",
                             lambda tid: (os.sched_getscheduler(tid), _nice(tid), os.sched_getaffinity(tid)))
    assert seen["infer"] == (os.SCHED_OTHER, -6, {cpu}), seen
    assert seen["infer_0"][0] == os.SCHED_FIFO, seen
    for name in ("capture", "finish", "mqtt-sender", "paho-mqtt-client", "outbox-checkpoint"):
        assert seen[name][:2] == (os.SCHED_OTHER, base), (name, seen)
    assert ("the infer thread runs at nice -6 under the ordinary policy (tuning.infer_nice); "
            "the other models' helper threads, if any, under SCHED_FIFO 3") in caplog.text


def test_an_infer_cpu_this_process_may_not_use_is_refused_at_start(tmp_path):
    """tuning.infer_cpu names a CPU outside the process's affinity: the daemon does not start,
    and the error names the CPU and the ones it may use."""
    from station.config import parse_config
    from station.daemon import Daemon
    from station.errors import ConfigError

    allowed = sorted(os.sched_getaffinity(0))
    text = ("camera: {type: fake, frames: 1}\n"
            f"tuning: {{infer_cpu: {max(allowed) + 1}}}\nrun: {{state_dir: {tmp_path / 'state'}}}\n")
    with pytest.raises(ConfigError, match=re.escape(f"tuning.infer_cpu {max(allowed) + 1}: this process may run "
                                                    f"on CPUs {allowed} only")):
        Daemon(parse_config(text))


def test_the_outbox_is_checkpointed_by_its_own_thread(tmp_path, broker, monkeypatch):
    """No result's put or ack copies the WAL (SQLite's automatic checkpoint is only a
    backstop at WAL_LIMIT); a background thread checkpoints every outbox.checkpoint_s,
    and the outbox holds nothing once every result was acknowledged."""
    import threading

    from station.config import parse_config
    from station.daemon import Daemon
    from station.outbox import WAL_LIMIT, Outbox

    calls: list[str] = []
    real = Outbox.checkpoint

    def checkpoint(self):
        calls.append(threading.current_thread().name)
        return real(self)

    monkeypatch.setattr(Outbox, "checkpoint", checkpoint)
    autocheckpoint: list[int] = []

    def sink(record: dict) -> None:
        autocheckpoint.append(daemon.mqtt.outbox._conn().execute("PRAGMA wal_autocheckpoint").fetchone()[0])

    text = (f"camera: {{type: fake, frames: 40, fps: 50, height: 96, width: 128}}\n"
            f"outbox: {{checkpoint_s: 0.05}}\nrun: {{state_dir: {tmp_path / 'state'}}}\n" + mqtt_section(broker))
    daemon = Daemon(parse_config(text), sinks=[RecordSink(sink)])
    assert daemon.run(install_signals=False) == 0
    assert set(autocheckpoint) == {WAL_LIMIT // daemon.mqtt.outbox.page_size}
    assert len(calls) >= 5 and set(calls) == {"outbox-checkpoint"}
    with Outbox(tmp_path / "state" / "outbox.sqlite3") as box:
        assert box.depth() == 0


def test_a_sink_gets_the_stored_seq_the_unrounded_capture_time_and_the_acks(tmp_path, broker):
    """A sink's Delivery gives the outbox seq and the frame's own capture time (the
    record carries it rounded down to the millisecond, which would add 0-1 ms to every
    latency station bench measures); acked() then reports each of those seqs."""
    from datetime import datetime

    from station.config import parse_config
    from station.daemon import Daemon

    sink = AckSink()
    text = (f"camera: {{type: fake, frames: 8, fps: null, height: 96, width: 128}}\n"
            f"run: {{state_dir: {tmp_path / 'state'}}}\n" + mqtt_section(broker))
    daemon = Daemon(parse_config(text), sinks=[sink])
    assert daemon.run(install_signals=False) == 0
    published = sink.published
    assert len(published) == 8 and sorted(sink.acks) == sorted(seq for _, seq, _ in published)
    lost = []
    for record, _, captured in published:
        rounded = datetime.fromisoformat(record["captured_at"].replace("Z", "+00:00")).timestamp()
        lost.append(captured - rounded)
    assert all(-1e-6 <= d < 1e-3 + 1e-6 for d in lost), lost
    assert max(lost) > 1e-5  # the sub-millisecond part is there


def test_the_daemon_warms_its_stages_up_before_the_first_frame(tmp_path, monkeypatch):
    """Before its threads start (and READY), the daemon sends synthetic parts through
    the infer stage its frames will use, so the models' and post-processing's first,
    slower runs do not land on the line's first parts."""
    import threading

    from station.config import parse_config
    from station.daemon import Daemon
    from station.inspector import WARM_PARTS, Inspector

    calls = []
    warmed: list[int] = []  # seq of each synthetic part prepared
    real_warm_up, real_prepare = Inspector.warm_up, Inspector.prepare

    def warm_up(self, *args, **kwargs):
        names = {t.name for t in threading.enumerate()}
        calls.append((args, kwargs, {"capture", "infer", "finish"} & names, len(records)))
        return real_warm_up(self, *args, **kwargs)

    def prepare(self, frame):
        if frame.source == "warm-up":
            warmed.append(frame.seq)
        return real_prepare(self, frame)

    monkeypatch.setattr(Inspector, "warm_up", warm_up)
    monkeypatch.setattr(Inspector, "prepare", prepare)
    records: list[dict] = []
    text = f"camera: {{type: fake, frames: 3, fps: null, height: 96, width: 128}}\nrun: {{state_dir: {tmp_path / 'state'}}}\n"
    daemon = Daemon(parse_config(text), sinks=[RecordSink(records.append)])
    assert daemon.run(install_signals=False) == 0
    assert len(calls) == 1
    args, kwargs, threads, before = calls[0]
    assert args == (daemon.pipeline.infer_stage,) and kwargs == {}  # the infer stage the frames use
    assert WARM_PARTS == 5 and warmed == list(range(WARM_PARTS))  # five parts, as the README says
    assert threads == set() and before == 0  # before any stage thread, before any frame
    assert len(records) == 3 and all(r["source"] != "warm-up" for r in records)
    assert daemon.stats.snapshot()["grades"] and sum(daemon.stats.snapshot()["grades"].values()) == 3


@pytest.mark.parametrize("on", [True, False])
def test_the_daemon_applies_steady_malloc_when_asked(tmp_path, monkeypatch, on):
    """tuning.steady_malloc: the daemon sets glibc's allocator up once at start, before any frame."""
    from station import daemon as daemon_mod
    from station.config import parse_config

    calls = []
    monkeypatch.setattr(daemon_mod, "steady_malloc", lambda: calls.append("set") or True)
    text = ("camera: {type: fake, frames: 2, height: 64, width: 64}\n"
            f"tuning: {{steady_malloc: {str(on).lower()}}}\nrun: {{state_dir: {tmp_path / 'state'}}}\n")
    assert daemon_mod.Daemon(parse_config(text), sinks=[RecordSink(lambda record: None)]).run(install_signals=False) == 0
    assert calls == (["set"] if on else [])


def test_settling_counts_frames_until_finished_and_acknowledged():
    """Settling, what a frame's second model waits for (tuning.helper_yield_ms):
    settled once every inferred frame is finished and each stored one acknowledged, in
    whichever order the acknowledgement and the finish stage's count arrive."""
    import threading

    from station.parallel import Settling

    s = Settling(keep=4)
    assert s.wait(0)
    s.inferred()
    assert not s.wait(0.01)  # in the finish stage
    s.finished(None)  # not stored (no MQTT): settled at once
    assert s.wait(0)
    s.inferred()
    s.finished(5)
    assert not s.wait(0.01)  # stored, not yet acknowledged
    s.acked(5)
    assert s.wait(0)
    s.inferred()
    s.acked(7)  # paho's thread took the PUBACK before the finish stage counted the seq
    s.finished(7)
    assert s.wait(0)
    # a waiter wakes when the last frame settles, not at its timeout
    s.inferred()
    s.finished(8)
    threading.Timer(0.05, s.acked, (8,)).start()
    t0 = time.monotonic()
    assert s.wait(5.0)
    assert time.monotonic() - t0 < 2.0
    # an outage leaves results unacknowledged: the sets stay bounded, the wait times out
    for seq in range(100, 200):
        s.inferred()
        s.finished(seq)
    assert len(s._unacked) == 4 and not s.wait(0.01)
    for seq in range(300, 400):
        s.acked(seq)
    assert len(s._early) == 4


def test_the_daemon_with_helper_yield_delivers_every_result_and_settles(tmp_path, broker):
    """tuning.helper_yield_ms with both shipped models in parallel and MQTT: every frame
    is published and acknowledged, and no frame is left counted once the daemon stops."""
    from station.config import parse_config
    from station.daemon import Daemon

    sink = AckSink()
    text = (f"models: {{segmentation: {ROOT / 'models/magnetic_tile_unet.onnx'}, "
            f"detection: {ROOT / 'models/neu_det_detector.onnx'}}}\n"
            "tuning: {parallel_models: true, helper_yield_ms: 3}\n"
            "camera: {type: fake, frames: 12, height: 96, width: 128}\n"
            f"run: {{state_dir: {tmp_path / 'state'}}}\n" + mqtt_section(broker))
    daemon = Daemon(parse_config(text), sinks=[sink])
    assert daemon.run(install_signals=False) == 0
    assert len(sink.acks) == 12
    assert daemon.pipeline.settling.wait(0)
    # off (the default), nothing is counted on the frames' path
    assert Daemon(parse_config(text.replace("helper_yield_ms: 3", "helper_yield_ms: 0"))).pipeline.settling is None

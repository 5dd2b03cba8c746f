"""camera.type genicam: the conversion of every pixel format as a table, and the
source against Aravis's fake GigE Vision camera (``arv-fake-gv-camera-0.8``, the
real protocol on loopback): selection, features, pixel formats, the software
trigger, lost packets, a camera lost and back, and `station run` end to end."""

from __future__ import annotations

import dataclasses
import logging
import shutil
import signal
import subprocess
import sys
import threading
import time
from functools import partial
from pathlib import Path

import jsonschema
import numpy as np
import pytest
from daemonkit import jsonl, wait_until

from station.camera.genicam import LAYOUTS, GenICamSource, binding, convert
from station.camera.live import SoftwareTriggered, make_source
from station.config import GenICamCamera, parse_config
from station.errors import CameraError, ConfigError, InputError
from station.messages import load_schema
from station.preflight import problems_for_run
from station.types import Frame

FAKE_BIN = "arv-fake-gv-camera-0.8"
ADDRESS = "127.0.0.1"
GVCP_PORT = 3956  # the GigE Vision control port the fake camera listens on
ROOT = Path(__file__).resolve().parent.parent


def _binding_missing() -> str | None:
    try:
        binding()
    except ConfigError as exc:
        return str(exc)
    return None


needs_camera = pytest.mark.skipif(
    shutil.which(FAKE_BIN) is None or _binding_missing() is not None,
    reason=f"{FAKE_BIN} (Debian package aravis-tools) is not installed" if shutil.which(FAKE_BIN) is None
    else f"the Aravis binding is missing: {_binding_missing()}",
)


# --- conversion: pure, no camera ----------------------------------------------------------


# The 2x2 cells the GenICam names mean, read row by row: BayerRG = R G / G B, …
CELLS = {"RG": "RGGB", "GR": "GRBG", "GB": "GBRG", "BG": "BGGR"}


def mosaic(bgr: np.ndarray, cell: str) -> np.ndarray:
    """A BGR image sampled through a Bayer filter whose top-left 2x2 cell reads ``cell`` (e.g. RGGB)."""
    channel = {"B": 0, "G": 1, "R": 2}
    out = np.empty(bgr.shape[:2], bgr.dtype)
    for (dy, dx), colour in zip([(0, 0), (0, 1), (1, 0), (1, 1)], cell):
        out[dy::2, dx::2] = bgr[dy::2, dx::2, channel[colour]]
    return out


def test_mono8_is_viewed_and_padding_is_skipped():
    data = bytes(range(12))
    image = convert(data, 4, 3, "Mono8")
    assert image.dtype == np.uint8 and image.shape == (3, 4) and image.tolist()[1] == [4, 5, 6, 7]
    padded = convert(bytes(range(18)), 4, 3, "Mono8", x_padding=2)
    assert padded.tolist() == [[0, 1, 2, 3], [6, 7, 8, 9], [12, 13, 14, 15]]


@pytest.mark.parametrize("fmt, sample, expected", [
    ("Mono16", 0xABCD, 0xAB),
    ("Mono14", 0x2BCD, 0xAF),
    ("Mono12", 0x0ABC, 0xAB),
    ("Mono10", 0x02BC, 0xAF),
])
def test_deep_samples_keep_their_top_8_bits(fmt, sample, expected):
    data = np.full((2, 3), sample, "<u2").tobytes()
    image = convert(data, 3, 2, fmt)
    assert image.dtype == np.uint8 and image.shape == (2, 3) and (image == expected).all()


@pytest.mark.parametrize("pattern", list(CELLS))
@pytest.mark.parametrize("bits", [8, 12, 16])
def test_bayer_mosaics_become_the_colour_they_sampled(pattern, bits):
    colour = (30, 140, 220)  # BGR
    bgr = np.empty((16, 20, 3), np.uint8)
    bgr[:] = colour
    raw = mosaic(bgr, CELLS[pattern])
    if bits == 8:
        data = raw.tobytes()
    else:
        data = (raw.astype("<u2") << (bits - 8)).tobytes()
    image = convert(data, 20, 16, f"Bayer{pattern}{bits}")
    assert image.shape == (16, 20, 3) and image.dtype == np.uint8
    assert np.abs(image[4:-4, 4:-4].astype(int) - colour).max() <= 1


@pytest.mark.parametrize("pattern", list(CELLS))
def test_a_red_plate_stays_red_in_every_bayer_pattern(pattern):
    bgr = np.zeros((8, 8, 3), np.uint8)
    bgr[..., 2] = 200
    image = convert(mosaic(bgr, CELLS[pattern]).tobytes(), 8, 8, f"Bayer{pattern}8")
    assert tuple(image[4, 4]) == (0, 0, 200)


def test_rgb8_becomes_bgr_and_bgr8_stays():
    rgb = np.array([[[10, 20, 30], [40, 50, 60]]], np.uint8)
    assert convert(rgb.tobytes(), 2, 1, "RGB8").tolist() == [[[30, 20, 10], [60, 50, 40]]]
    assert convert(rgb.tobytes(), 2, 1, "BGR8").tolist() == rgb.tolist()


@pytest.mark.parametrize("fmt, data, why", [
    ("Mono12Packed", b"\0" * 64, "not converted"),
    ("Mono8", b"\0" * 11, "too short"),
    ("Mono16", b"\0" * 23, "too short"),
    ("Mono8", b"", "too short"),
])
def test_unconvertible_buffers_are_input_errors(fmt, data, why):
    with pytest.raises(InputError, match=why):
        convert(data, 4, 3, fmt)


def test_every_configurable_format_is_converted():
    from typing import get_args

    from station.config import GenICamPixelFormat

    assert set(get_args(GenICamPixelFormat)) == set(LAYOUTS)


# --- config --------------------------------------------------------------------------------


@pytest.mark.parametrize("section, error", [
    ("{type: genicam}", "set exactly one of serial and device"),
    ("{type: genicam, serial: A, device: 10.0.0.2}", "set exactly one of serial and device"),
    ("{type: genicam, serial: A, trigger_mode: hardware}", "needs trigger_source"),
    ("{type: genicam, serial: A, trigger_source: Line1}", "apply to trigger_mode hardware"),
    ("{type: genicam, serial: A, pixel_format: Mono12Packed}", "camera.pixel_format"),
    ("{type: genicam, serial: A, buffers: 1}", "camera.buffers"),
    ("{type: genicam, serial: A, features: {'Bad Name': 1}}", "camera.features"),
    ("{type: genicam, serial: A, exposre_us: 5}", "camera.exposre_us: unknown key"),
])
def test_config_refusals(section, error):
    with pytest.raises(ConfigError, match=error):
        parse_config(f"camera: {section}\n", "x.yaml")


def test_feature_values_keep_their_yaml_types_and_order():
    cfg = parse_config("camera:\n  type: genicam\n  serial: A\n  features:\n    Z: 'Off'\n    A: Off\n"
                       "    M: 3\n    B: 2.5\n    C: true\n", "x.yaml").camera
    assert isinstance(cfg, GenICamCamera)
    assert list(cfg.features.items()) == [("Z", "Off"), ("A", False), ("M", 3), ("B", 2.5), ("C", True)]
    assert [type(v) for v in cfg.features.values()] == [str, bool, int, float, bool]


def test_a_missing_binding_is_a_config_error_naming_the_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "gi", None)  # `import gi` raises ImportError
    with pytest.raises(ConfigError, match="gir1.2-aravis-0.8 .*station\\[genicam\\]"):
        binding()
    problems = problems_for_run(parse_config("camera: {type: genicam, serial: A}\n", "x.yaml"))
    assert any("camera.type genicam needs Aravis" in p for p in problems)


def test_software_trigger_needs_parts_from_mqtt():
    text = "camera: {type: genicam, serial: A, trigger_mode: software}\n"
    problems = problems_for_run(parse_config(text, "x.yaml"))
    assert any("camera.trigger_mode: software" in p and "trigger.type mqtt" in p for p in problems)
    ok = parse_config(text + "trigger: {type: mqtt}\nmqtt: {host: 127.0.0.1}\n", "x.yaml")
    assert not [p for p in problems_for_run(ok) if "trigger" in p]


# --- the fake GigE Vision camera --------------------------------------------------------------


def _listening(address: str, port: int) -> bool:
    """Whether a UDP socket is bound to address:port (from /proc/net/udp)."""
    a, b, c, d = (int(x) for x in address.split("."))
    local = f"{d:02X}{c:02X}{b:02X}{a:02X}:{port:04X}"
    with open("/proc/net/udp") as f:
        return any(line.split()[1] == local for line in f.readlines()[1:])


class FakeCamera:
    """``arv-fake-gv-camera-0.8`` on loopback: started, killed and started again."""

    def __init__(self, serial: str, lost_per_thousand: int = 0):
        self.serial = serial
        self.lost = lost_per_thousand
        self.proc: subprocess.Popen | None = None

    def start(self) -> "FakeCamera":
        if _listening(ADDRESS, GVCP_PORT):
            pytest.fail(f"{ADDRESS}:{GVCP_PORT} is taken: another GigE Vision (fake) camera runs here")
        args = [FAKE_BIN, "-i", ADDRESS, "-s", self.serial] + (["-r", str(self.lost)] if self.lost else [])
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while not _listening(ADDRESS, GVCP_PORT):
            if self.proc.poll() is not None:
                pytest.fail(f"{FAKE_BIN} exited with {self.proc.returncode}: {self.proc.stderr.read().decode()}")
            if time.monotonic() > deadline:
                pytest.fail(f"{FAKE_BIN} did not listen on {ADDRESS}:{GVCP_PORT} within 10 s")
            time.sleep(0.02)
        return self

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self.proc = None


@pytest.fixture
def fake_camera():
    """Start a fake camera (serial, lost packets per thousand); killed after the test."""
    started: list[FakeCamera] = []

    def start(serial: str = "GV01", lost_per_thousand: int = 0) -> FakeCamera:
        cam = FakeCamera(serial, lost_per_thousand)
        started.append(cam)
        return cam.start()

    yield start
    for cam in started:
        cam.kill()


@pytest.fixture
def sources():
    """GenICam sources made from config sections, closed after the test."""
    made: list[GenICamSource] = []

    def make(**fields) -> GenICamSource:
        cfg = GenICamCamera(type="genicam", **fields)
        src = make_source(cfg)
        assert isinstance(src, GenICamSource)
        made.append(src)
        return src

    yield make
    for src in made:
        src.close()


def frames(src: GenICamSource, n: int, timeout: float = 5.0) -> list[Frame]:
    out = []
    deadline = time.monotonic() + timeout
    while len(out) < n:
        item = src.read(0.5)
        if isinstance(item, Frame):
            out.append(item)
        assert item is None or isinstance(item, Frame), item
        assert time.monotonic() < deadline, f"{len(out)} of {n} frames within {timeout} s"
    return out


@needs_camera
def test_open_by_serial_applies_the_features_in_order(fake_camera, sources):
    fake_camera("GV17")
    src = sources(serial="GV17", pixel_format="Mono16", width=160, height=120, offset_x=32, offset_y=8,
                  exposure_us=2500, gain=4, frame_rate=25,
                  features={"TestBoolean": True, "TestStringReg": "line 3", "GainAuto": "Continuous",
                            "BinningHorizontal": 1})
    before = time.time()
    src.open()
    cam = src._camera
    assert cam.get_pixel_format_as_string() == "Mono16"
    r = cam.get_region()
    assert (r.x, r.y, r.width, r.height) == (32, 8, 160, 120)
    assert cam.get_exposure_time() == pytest.approx(2500)
    assert cam.get_gain() == pytest.approx(4)
    assert cam.get_frame_rate() == pytest.approx(25, rel=1e-3)
    assert cam.get_string("TriggerMode") == "Off"
    assert cam.get_boolean("TestBoolean") is True
    assert cam.get_string("TestStringReg") == "line 3"
    assert cam.get_string("GainAuto") == "Continuous"  # features come last: after gain switched auto gain off
    first, second = frames(src, 2)
    assert first.image.shape == (120, 160) and first.image.dtype == np.uint8
    assert first.source.startswith("genicam:GV17#frame=") and second.seq == first.seq + 1
    assert before - 1 < first.captured_at < time.time() + 1
    assert first.camera_timestamp_ns and second.camera_timestamp_ns > first.camera_timestamp_ns
    assert not isinstance(src, SoftwareTriggered) or not src.wants_software_trigger


@needs_camera
def test_open_by_address_and_refusals_name_the_field(fake_camera, sources):
    fake_camera("GV02")
    src = sources(device=ADDRESS, pixel_format="Mono8")
    src.open()
    assert frames(src, 1)[0].image.shape == (512, 512)
    src.close()
    for fields, error in [
        ({"serial": "NOPE"}, "no camera with serial NOPE found .*GV02"),
        ({"device": ADDRESS, "features": {"NoSuchFeature": 1}}, "camera.features.NoSuchFeature: no such feature"),
        ({"device": ADDRESS, "features": {"TriggerMode": False}}, "quote the entry"),
        ({"device": ADDRESS, "features": {"Width": "wide"}}, "camera.features.Width: an integer"),
        ({"device": ADDRESS, "pixel_format": "Mono12"}, "camera.pixel_format: .*Mono12"),
        ({"device": ADDRESS, "trigger_mode": "hardware", "trigger_source": "Line9"}, "camera.trigger_mode"),
    ]:
        with pytest.raises(CameraError, match=error):
            sources(**fields).open()


def _ramp(row: np.ndarray) -> bool:
    """The fake camera's test pattern: each pixel one more than its left neighbour (mod 256)."""
    return bool((np.diff(row.astype(np.int64)) % 256 == 1).all())


@needs_camera
@pytest.mark.parametrize("fmt, shape", [
    ("Mono8", (48, 64)), ("Mono16", (48, 64)),
    ("BayerRG8", (48, 64, 3)), ("BayerGR8", (48, 64, 3)), ("BayerGB8", (48, 64, 3)), ("BayerBG8", (48, 64, 3)),
    ("RGB8", (48, 64, 3)),
])
def test_pixel_formats_become_frames(fake_camera, sources, fmt, shape):
    fake_camera()
    src = sources(serial="GV01", pixel_format=fmt, width=64, height=48, frame_rate=50)
    src.open()
    image = frames(src, 1)[0].image
    assert image.shape == shape and image.dtype == np.uint8 and image.flags.c_contiguous
    if fmt.startswith("Mono"):  # Mono16's low byte is constant on the fake camera: the ramp is the top byte
        assert _ramp(image[0]) and _ramp(image[-1])


@needs_camera
def test_software_trigger_yields_one_frame_per_fire(fake_camera, sources):
    fake_camera()
    src = sources(serial="GV01", pixel_format="Mono8", width=64, height=48, trigger_mode="software")
    assert isinstance(src, SoftwareTriggered) and src.wants_software_trigger
    src.fire()  # not open: no frame for that part, logged; it does not raise
    src.open()
    assert src._camera.get_string("TriggerMode") == "On" and src._camera.get_string("TriggerSource") == "Software"
    assert src.read(0.5) is None  # nothing without a trigger
    for burst in (1, 5):  # a burst from another thread: each part gets its frame (not one for the lot)
        sender = threading.Thread(target=lambda n=burst: [src.fire() for _ in range(n)])
        sender.start()
        got = frames(src, burst)
        sender.join()
        assert src.read(0.5) is None, f"more than {burst} frame(s) for {burst} trigger(s)"
        assert [f.seq for f in got] == sorted(f.seq for f in got)
    assert src._trigger is not None and src._trigger.sent == 6 and src._trigger.failed == 0


@needs_camera
def test_hardware_trigger_waits_for_its_line(fake_camera, sources):
    fake_camera()
    src = sources(serial="GV01", pixel_format="Mono8", width=64, height=48, frame_rate=50,
                  trigger_mode="hardware", trigger_source="Line0", trigger_activation="RisingEdge")
    src.open()
    cam = src._camera
    assert (cam.get_string("TriggerMode"), cam.get_string("TriggerSource"), cam.get_string("TriggerActivation")) \
        == ("On", "Line0", "RisingEdge")
    assert src.read(1.0) is None  # no edge on Line0, no frame
    assert not src.wants_software_trigger


@needs_camera
def test_incomplete_frames_are_counted_dropped_and_logged_once(fake_camera, sources, caplog):
    fake_camera(lost_per_thousand=100)  # a 512 x 512 frame is hundreds of packets: none arrives whole
    src = sources(serial="GV01", pixel_format="Mono8", frame_rate=50)
    src.open()
    caplog.set_level(logging.WARNING, logger="station.camera.genicam")
    deadline = time.monotonic() + 10
    while sum(src.dropped.values()) < 10:
        item = src.read(0.5)
        assert item is None or isinstance(item, Frame)  # a frame that came whole is delivered
        assert time.monotonic() < deadline, f"only {src.dropped} dropped within 10 s"
    assert src.dropped["missing-packets"] >= 1
    lines = [r.getMessage() for r in caplog.records if "incomplete frame" in r.getMessage()]
    assert len(lines) == 1 and "missing-packets" in lines[0]


@needs_camera
def test_a_lost_camera_raises_and_reopens_when_back(fake_camera, sources):
    cam = fake_camera()
    src = sources(serial="GV01", pixel_format="Mono8", width=64, height=48, frame_rate=20)
    src.open()
    frames(src, 2)
    cam.kill()
    deadline = time.monotonic() + 20
    with pytest.raises(CameraError, match="camera lost"):
        while True:  # the heartbeat notices within a few seconds
            src.read(0.5)
            assert time.monotonic() < deadline, "no CameraError within 20 s of the camera's loss"
    src.close()
    with pytest.raises(CameraError, match="no camera with serial GV01"):
        src.open()
    cam.start()
    src.open()
    assert len(frames(src, 2)) == 2


# --- station run ---------------------------------------------------------------------------


@needs_camera
def test_station_run_grades_genicam_frames(fake_camera, tmp_path, stations):
    fake_camera()
    config = ("station: {id: cam3}\n"
              "camera: {type: genicam, serial: GV01, pixel_format: BayerRG8, width: 256, height: 256, "
              "frame_rate: 10}\n")
    cfg = tmp_path / "check.yaml"
    cfg.write_text(config)
    assert subprocess.run([sys.executable, "-m", "station", "check-config", "--no-models", str(cfg)],
                          capture_output=True).returncode == 0
    out = tmp_path / "results.jsonl"
    station = stations(tmp_path, config, "--jsonl", str(out))
    records = partial(jsonl, out)
    wait_until(lambda: len(records()) >= 5 or station.proc.poll() is not None, 60, "5 records")
    assert station.proc.poll() is None, station.text()[-3000:]
    station.signal(signal.SIGTERM)
    assert station.wait(30) == 0, station.text()[-3000:]
    validator = jsonschema.Draft202012Validator(load_schema())
    got = records()
    for r in got:
        validator.validate(r)
    assert all(r["grade"] in ("PASS", "DISCOUNT", "REJECT") for r in got)
    assert all(r["source"].startswith("genicam:GV01#frame=") for r in got)
    assert {(r["image"]["width"], r["image"]["height"]) for r in got} == {(256, 256)}
    assert "camera genicam:GV01: connected" in station.text()


def test_the_camera_timestamp_survives_the_triggers_tagging():
    frame = Frame(np.zeros((2, 2), np.uint8), "genicam:x", 0, 1.0, camera_timestamp_ns=123)
    assert dataclasses.replace(frame, part_id="P1").camera_timestamp_ns == 123
    assert Frame(np.zeros((2, 2), np.uint8), "x").camera_timestamp_ns is None

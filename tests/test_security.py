"""Security checks: TLS with CA verification and client certificates for the
daemon, refused credentials, no password in any log (daemon at -vv,
check-config), warnings for exposed config/secret files, and sha256 pinning of
model files.

Reused rather than repeated: the publisher-level tests in tests/test_publish.py
(mutual TLS, a refused handshake without a client certificate, refused
credentials reported once and retried every reconnect_max_s, the password kept
out of paho's packet log) and the `systemd-analyze security` exposure bound in
tests/test_systemd.py. This file runs the same checks through `station run`.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from certs import have_openssl, make_pki, tls_listener
from daemonkit import wait_until
from mosquitto import Mosquitto, Subscriber, free_port, have_mosquitto, write_password_file
from station.config import DEMO_MODEL, load_config, parse_config
from station.errors import ConfigError, ModelError
from test_daemon import PREFIX, mqtt_section, result_ids

PASSWORD = "Zq8-never-in-a-log-41c"
ROOT = Path(__file__).resolve().parent.parent

needs_broker = pytest.mark.skipif(not have_mosquitto(), reason="mosquitto binary not installed")


@pytest.fixture
def pki(tmp_path):
    if not have_openssl():
        pytest.skip("openssl is not installed")
    return make_pki(tmp_path / "pki")


def _dual_broker(tmp_path: Path, pki: Path) -> tuple[Mosquitto, int]:
    """A TLS listener that requires a client certificate, plus a plain loopback
    listener for the test's subscriber."""
    plain = free_port()
    extra = tls_listener(pki, require_certificate=True) + f"listener {plain} 127.0.0.1\n"
    broker = Mosquitto(tmp_path / "tls-broker", listener_extra=extra).start()  # waits for the first listener
    deadline = time.monotonic() + 5
    while True:
        try:
            socket.create_connection(("127.0.0.1", plain), timeout=0.2).close()
            return broker, plain
        except OSError:
            if time.monotonic() > deadline:
                broker.kill()
                raise
            time.sleep(0.01)  # the second listener opens just after the first


# --- TLS ----------------------------------------------------------------------------


@needs_broker
def test_daemon_over_mutual_tls_and_a_broker_with_an_unknown_ca_is_refused(tmp_path, pki, stations):
    broker, plain = _dual_broker(tmp_path, pki)
    tls = (f"  tls: {{ca_file: {pki / 'ca.crt'}, cert_file: {pki / 'client.crt'}, key_file: {pki / 'client.key'}}}\n")
    good = tmp_path / "good"
    good.mkdir()
    bad = tmp_path / "bad"
    bad.mkdir()
    try:
        with Subscriber(plain, f"{PREFIX}/#") as sub:
            station = stations(good, f"station: {{id: cam1}}\ncamera: {{type: fake, fps: 20}}\n"
                                     f"{mqtt_section(broker)}{tls}")
            assert sub.wait_for(lambda m: len(result_ids(sub)) >= 3, 40), station.text()
            assert "TLS" in station.text()  # "MQTT connected to … (MQTT 5, TLS)"

            # The same daemon trusting another CA: the handshake fails on the broker's
            # certificate, is reported, and retried with backoff (not in a loop).
            wrong = tls.replace(str(pki / "ca.crt"), str(pki / "other-ca.crt"))
            other = stations(bad, "station: {id: cam2}\ncamera: {type: fake, fps: 20}\n"
                             + mqtt_section(broker).replace("reconnect_min_s: 1.5", "reconnect_min_s: 1.0")
                             .replace("reconnect_max_s: 1.5", "reconnect_max_s: 2.0") + wrong)
            wait_until(lambda: "certificate verify failed" in other.text(), 40, "the refused broker certificate")
            wait_until(lambda: other.text().count("certificate verify failed") >= 2, 10, "a second attempt")
            assert other.text().count("certificate verify failed") <= 4  # backoff, not a tight loop
            assert not any('"station_id": "cam2"' in m.payload.decode() for m in sub.on_topic(f"{PREFIX}/result"))
            for s in (station, other):
                s.signal(signal.SIGTERM)
                assert s.wait(20) == 0, s.text()
    finally:
        broker.kill()


# --- credentials and logs ----------------------------------------------------------------


@pytest.fixture
def auth_broker(tmp_path):
    pwfile = write_password_file(tmp_path / "passwd", {"station": PASSWORD, "reader": PASSWORD})
    with Mosquitto(tmp_path / "auth-broker", listener_extra=f"password_file {pwfile}\nallow_anonymous false") as b:
        yield b


@needs_broker
def test_daemon_debug_log_and_check_config_never_show_the_password(tmp_path, auth_broker, stations):
    pw = tmp_path / "mqtt.pw"
    pw.write_text(PASSWORD + "\n")
    pw.chmod(0o600)
    config = ("station: {id: cam1}\ncamera: {type: fake, fps: 20}\n" + mqtt_section(auth_broker)
              + f"  auth: {{username: station, password_file: {pw}}}\n")
    with Subscriber(auth_broker.port, f"{PREFIX}/#", username="reader", password=PASSWORD) as sub:
        station = stations(tmp_path, config, verbose=2)
        assert sub.wait_for(lambda m: len(result_ids(sub)) >= 3, 40), station.text()
        station.signal(signal.SIGTERM)
        assert station.wait(20) == 0
    text = station.text()
    assert "Sending CONNECT" in text and "DEBUG" in text  # paho's packet log really was on
    assert PASSWORD not in text
    check = subprocess.run([sys.executable, "-m", "station", "-vv", "check-config", str(station.cfg)],
                           capture_output=True, text=True, env={**os.environ, "STATION_MQTT_PASSWORD": PASSWORD})
    assert check.returncode == 0, check.stderr
    assert PASSWORD not in check.stdout + check.stderr


@needs_broker
def test_daemon_with_refused_credentials_reports_once_and_retries_slowly(tmp_path, auth_broker, stations):
    config = ("station: {id: cam1}\ncamera: {type: fake, fps: 20}\n"
              + mqtt_section(auth_broker).replace("reconnect_max_s: 1.5", "reconnect_max_s: 30")
              .replace("reconnect_min_s: 1.5", "reconnect_min_s: 0.1")
              + "  auth: {username: station, password_env: STATION_MQTT_PASSWORD}\n")
    station = stations(tmp_path, config, env={"STATION_MQTT_PASSWORD": "wrong-" + PASSWORD})
    wait_until(lambda: "refused the credentials" in station.text(), 40, "the refused credentials")
    wait_until(lambda: "camera fake:0: connected" in station.text(), 20, "inspection to run")
    attempts = auth_broker.log_text().count("not authorised")
    # With the 0.1 s backoff floor a tight loop would try ~20 times in 2 s; a refusal waits reconnect_max_s.
    time.sleep(2.0)  # observing that nothing happens for a while: there is no event to wait for
    assert station.proc.poll() is None
    assert auth_broker.log_text().count("not authorised") == attempts <= 1, auth_broker.log_text()
    errors = [line for line in station.text().splitlines() if line.startswith("ERROR") and "credentials" in line]
    assert len(errors) == 1 and "user 'station'" in errors[0] and "check mqtt.auth" in errors[0], errors
    assert PASSWORD not in station.text()
    station.signal(signal.SIGTERM)
    assert station.wait(20) == 0


# --- exposed files --------------------------------------------------------------------------


def _warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and r.name == "station.config"]


@pytest.mark.parametrize(
    "auth, mode, expected",
    [
        (True, 0o644, ["world-readable (mode 0644)"]),
        (True, 0o640, []),
        (True, 0o600, []),
        (False, 0o644, []),  # no credentials configured: nothing secret to read
        (False, 0o666, ["world-writable (mode 0666)"]),
        (True, 0o666, ["world-writable (mode 0666)", "world-readable (mode 0666)"]),
    ],
)
def test_exposed_config_file_is_warned_about_never_refused(tmp_path, caplog, auth, mode, expected):
    path = tmp_path / "station.yaml"
    text = "station: {id: cam1}\n"
    if auth:
        text += "mqtt:\n  host: 127.0.0.1\n  auth: {username: station, password_env: PW}\n"
    path.write_text(text)
    path.chmod(mode)
    caplog.set_level(logging.WARNING)
    cfg = load_config(path)  # never fails
    assert cfg.station.id == "cam1"
    got = _warnings(caplog)
    assert len(got) == len(expected)
    for message, part in zip(got, expected):
        assert message.startswith(f"{path}: config file is ") and part in message


@pytest.mark.parametrize("section, named", [
    ("mqtt:\n  host: h\n  auth: {username: u, password_env: PW}\n", "mqtt.auth"),
    ("plc:\n  type: opcua\n  endpoint: opc.tcp://h:4840\n  auth: {username: u, password_file: pw}\n"
     "  nodes: {part_id: i=1, grade: i=2, sequence: i=3, defect_area_pct: i=4}\n", "plc.auth"),
    ("plc:\n  type: opcua\n  endpoint: opc.tcp://h:4840\n  nodes: {part_id: i=1, grade: i=2, sequence: i=3, "
     "defect_area_pct: i=4}\n  security: {certificate: c.der, private_key: c.pem, server_certificate: s.der}\n",
     "plc.security.private_key"),
    ("sparkplug: {host: h, group_id: g, edge_node_id: n, auth: {username: u, password_env: PW}}\n", "sparkplug.auth"),
])
def test_every_section_with_credentials_makes_a_readable_config_a_warning(tmp_path, caplog, section, named):
    path = tmp_path / "station.yaml"
    path.write_text(section)
    path.chmod(0o644)
    caplog.set_level(logging.WARNING)
    load_config(path)
    got = _warnings(caplog)
    assert len(got) == 1 and got[0].startswith(f"{path}: config file is world-readable (mode 0644)"), got
    assert f"it configures credentials ({named})" in got[0]


def test_exposed_password_and_key_files_are_warned_about(tmp_path, caplog, pki):
    from station.config import MqttAuthConfig, MqttTlsConfig
    from station.publish import read_password, tls_context

    pw = tmp_path / "mqtt.pw"
    pw.write_text(PASSWORD + "\n")
    pw.chmod(0o644)
    caplog.set_level(logging.WARNING)
    assert read_password(MqttAuthConfig(username="u", password_file=pw)) == PASSWORD
    (pki / "client.key").chmod(0o644)
    tls_context(MqttTlsConfig(ca_file=pki / "ca.crt", cert_file=pki / "client.crt", key_file=pki / "client.key"))
    got = _warnings(caplog)
    assert any(m.startswith(f"{pw}: mqtt.auth.password_file is world-readable (mode 0644)") for m in got), got
    assert any(m.startswith(f"{pki / 'client.key'}: mqtt.tls.key_file is world-readable (mode 0644)") for m in got), got
    assert all(PASSWORD not in m for m in got)


def test_check_config_prints_the_warning(tmp_path):
    path = tmp_path / "station.yaml"
    path.write_text("mqtt:\n  host: 127.0.0.1\n  auth: {username: station, password_env: PW}\n")
    path.chmod(0o644)
    # PW set: check-config refuses, as run does, a password_env that is not set
    run = subprocess.run([sys.executable, "-m", "station", "check-config", "--no-models", str(path)],
                         capture_output=True, text=True, env={**os.environ, "PW": "secret"})
    assert run.returncode == 0, run.stderr
    assert f"WARNING station.config: {path}: config file is world-readable (mode 0644)" in run.stderr


# --- sha256 pinning of model files ----------------------------------------------------------


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_pinned_model_loads_and_a_mismatch_names_file_expected_and_actual(tmp_path):
    from station.infer import OnnxModel

    model = tmp_path / "seg.onnx"
    shutil.copyfile(DEMO_MODEL, model)
    good = _sha(model)
    assert OnnxModel(model, ("cpu",), sha256=good.upper()).sha256 == good
    wrong = "0" * 64
    with pytest.raises(ModelError) as info:
        OnnxModel(model, ("cpu",), sha256=wrong)
    message = str(info.value)
    assert message.startswith(f"{model}: sha256 mismatch") and f"expected {wrong}" in message and f"actual {good}" in message


def test_pins_in_the_config(tmp_path, capsys):
    from station.cli import main
    from station.inspector import open_models

    model = tmp_path / "seg.onnx"
    shutil.copyfile(DEMO_MODEL, model)
    good = _sha(model)
    cfg_path = tmp_path / "station.yaml"
    cfg_path.write_text(f"models:\n  segmentation: seg.onnx\n  segmentation_sha256: {good}\n")
    assert main(["check-config", str(cfg_path)]) == 0
    cfg_path.write_text(f"models:\n  segmentation: seg.onnx\n  segmentation_sha256: {'ab' * 32}\n")
    assert main(["check-config", str(cfg_path)]) == 2
    err = capsys.readouterr().err
    assert f"{model}: sha256 mismatch: expected {'ab' * 32}" in err and f"actual {good}" in err
    # a command-line override is not the pinned file: the pin does not apply to it
    assert set(open_models(load_config(cfg_path), seg=model)) == {"segmentation"}


@pytest.mark.parametrize(
    "text, expected",
    [
        ("models:\n  segmentation: a.onnx\n  segmentation_sha256: xyz\n", "x.yaml:3: models.segmentation_sha256: Value error, 'xyz' is not a sha256: 64 hex digits expected"),
        ("models:\n  segmentation: a.onnx\n  segmentation_sha256: " + "0" * 64 + "\n", "x.yaml:3: models.segmentation_sha256: Value error, YAML read this hash as a number: put it in quotes"),
        ("models:\n  detection_sha256: " + "a" * 64 + "\n", "x.yaml:1: models: Value error, detection_sha256 pins a model but detection names no file"),
    ],
)
def test_malformed_pins_are_config_errors(text, expected):
    with pytest.raises(ConfigError) as info:
        parse_config(text, "x.yaml")
    assert str(info.value).startswith(expected), str(info.value)


# --- nothing calls out of the plant -----------------------------------------------------------------------------------


def _replay_with_home(tmp_path, name, telemetry):
    """Run `station replay` on one sample with its own empty HOME; return what was written under it."""
    home = tmp_path / name
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("ORT_DISABLE_TELEMETRY", "XDG_CACHE_HOME")}
    env["HOME"] = str(home)
    if telemetry is not None:
        env["ORT_DISABLE_TELEMETRY"] = telemetry
    sample = sorted((ROOT / "samples").glob("*.png"))[0]
    proc = subprocess.run([sys.executable, "-m", "station", "replay", "--out", str(tmp_path / f"{name}.jsonl"), str(sample)],
                          capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr
    return sorted(str(p.relative_to(home)) for p in home.rglob("*"))


def test_onnx_runtime_telemetry_is_off_unless_asked_for(tmp_path):
    """ONNX Runtime's Linux builds report usage to Microsoft, starting with a device id under
    ~/.cache/Microsoft the moment it loads. The station turns that off before ONNX Runtime loads.
    The control (ORT_DISABLE_TELEMETRY=0) runs first: ONNX Runtime decides by itself, from the
    machine it finds, whether to start its telemetry at all, and where it does not, nothing here
    can tell the station's setting from ONNX Runtime's own choice."""
    control = _replay_with_home(tmp_path, "control", "0")
    if ".cache/Microsoft/DeveloperTools/.onnxruntime/deviceid" not in control:
        pytest.skip(f"ONNX Runtime started no telemetry on this machine even with ORT_DISABLE_TELEMETRY=0 "
                    f"(it wrote {control}), so there is nothing for the station to turn off here")
    assert _replay_with_home(tmp_path, "station", None) == []


def test_the_station_sets_the_telemetry_switch_before_onnx_runtime_loads():
    """The switch itself, wherever ONNX Runtime runs: set by `import station`, before onnxruntime is
    imported, and an operator's own value is kept."""
    probe = ("import os, sys; import station; loaded = 'onnxruntime' in sys.modules; "
             "import station.cli, onnxruntime; print(os.environ.get('ORT_DISABLE_TELEMETRY'), loaded)")
    for given, expected in ((None, "1 False"), ("0", "0 False")):
        env = {k: v for k, v in os.environ.items() if k != "ORT_DISABLE_TELEMETRY"}
        if given is not None:
            env["ORT_DISABLE_TELEMETRY"] = given
        out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, env=env, check=True)
        assert out.stdout.split() == expected.split(), (given, out.stdout, out.stderr)

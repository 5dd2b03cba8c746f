"""The operator view (station/view/): its config rules, its secret, the shift's
heatmap of parts whose defects sit in one corner, and a browser that stops
reading, which must never hold up ``deliver``. Real HTTP on loopback, real
inspections (tests/viewkit.py); the page in a real browser: test_view_browser.py."""

from __future__ import annotations

import base64
import http.client
import json
import socket
import time

import cv2
import numpy as np
import pytest

from station.cli import main
from station.config import OperatorViewConfig, ViewAuthConfig, parse_config
from station.errors import ConfigError
from station.priority import ThreadPolicy
from station.sinks import Delivery
from station.view import OperatorView, server
from viewkit import corner_parts

SECRET = "s3cret; with=odd chars"


@pytest.fixture
def view_factory():
    views: list[OperatorView] = []

    def make(**settings) -> OperatorView:
        view = OperatorView(OperatorViewConfig(enabled=True, port=0, **settings), "test-station", None, None,
                            ThreadPolicy())
        view.start()
        views.append(view)
        return view

    yield make
    for view in views:
        view.close()


def get(view: OperatorView, path: str, headers: dict[str, str] | None = None) -> http.client.HTTPResponse:
    assert view.server is not None
    conn = http.client.HTTPConnection("127.0.0.1", view.server.port, timeout=10)
    conn.request("GET", path, headers=headers or {})
    response = conn.getresponse()
    response.read()
    conn.close()
    return response


def basic(user: str, password: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


# --- config ---------------------------------------------------------------------------------


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.0.2.10", "station.example"])
def test_a_non_loopback_bind_without_auth_is_refused_naming_the_field(host):
    with pytest.raises(ConfigError) as err:
        parse_config(f"operator_view:\n  enabled: true\n  host: '{host}'\n", "view.yaml")
    assert "view.yaml:1: operator_view.auth:" in str(err.value)  # a missing key: its section's line
    assert "loopback" in str(err.value)


@pytest.mark.parametrize("host", ["127.0.0.1", "127.8.0.1", "::1", "localhost"])
def test_loopback_needs_no_auth(host):
    assert parse_config(f"operator_view: {{enabled: true, host: '{host}'}}").operator_view.host == host


def test_auth_takes_exactly_one_secret_source_and_reads_it_at_check_config(tmp_path, capsys):
    with pytest.raises(ConfigError, match="operator_view.auth: .*exactly one"):
        parse_config("operator_view: {enabled: true, host: 0.0.0.0, auth: {username: op}}")
    cfg = tmp_path / "view.yaml"
    cfg.write_text("camera: {type: fake}\noperator_view:\n  enabled: true\n  host: 0.0.0.0\n"
                   "  auth: {password_file: missing.secret}\n")
    assert parse_config(cfg.read_text(), str(cfg), tmp_path).operator_view.auth == ViewAuthConfig(
        password_file=tmp_path / "missing.secret")
    assert main(["check-config", str(cfg), "--no-models"]) == 2  # the daemon would refuse it too
    assert "operator_view.auth.password_file" in capsys.readouterr().err


# --- the secret -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def guarded():
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("STATION_TEST_VIEW_SECRET", SECRET)
        cfg = OperatorViewConfig(enabled=True, port=0,
                                 auth=ViewAuthConfig(password_env="STATION_TEST_VIEW_SECRET", username="op"))
        view = OperatorView(cfg, "test-station", None, None, ThreadPolicy())
        view.start()
    yield view
    view.close()


@pytest.mark.parametrize("path", ["/", "/state.json", "/events", "/static/view.js", "/image/x.jpg"])
@pytest.mark.parametrize("headers", [
    {},
    {"Authorization": "Bearer wrong"},
    basic("op", "wrong"),
    basic("someone", SECRET),
    {"Cookie": f"station_view={SECRET}"},  # the cookie holds a digest, never the secret
])
def test_with_a_secret_requests_without_it_get_401(guarded, path, headers):
    response = get(guarded, path, headers)
    assert response.status == 401
    assert response.getheader("WWW-Authenticate") == 'Basic realm="station"'


@pytest.mark.parametrize("headers", [{"Authorization": f"Bearer {SECRET}"}, basic("op", SECRET)])
def test_with_the_secret_the_page_is_served(guarded, headers):
    response = get(guarded, "/", headers)
    assert response.status == 200
    assert response.getheader("Content-Type").startswith("text/html")


def test_a_token_in_the_url_becomes_a_cookie(guarded):
    from urllib.parse import quote

    response = get(guarded, f"/?token={quote(SECRET)}")
    assert response.status == 303 and response.getheader("Location") == "/"
    cookie = response.getheader("Set-Cookie").split(";")[0]
    assert SECRET not in cookie and "HttpOnly" in response.getheader("Set-Cookie")
    assert get(guarded, "/state.json", {"Cookie": cookie}).status == 200


def test_on_loopback_without_auth_the_page_is_open(view_factory):
    view = view_factory()
    for path, kind in [("/", "text/html"), ("/static/view.js", "text/javascript"), ("/static/view.css", "text/css")]:
        response = get(view, path)
        assert response.status == 200 and response.getheader("Content-Type").startswith(kind)
        assert "script-src 'self'" in response.getheader("Content-Security-Policy")
    assert get(view, "/nothing").status == 404


# --- what the page shows --------------------------------------------------------------------


def state(view: OperatorView) -> dict:
    assert view.server is not None
    conn = http.client.HTTPConnection("127.0.0.1", view.server.port, timeout=10)
    conn.request("GET", "/state.json")
    data = json.loads(conn.getresponse().read())
    conn.close()
    return data


def wait_for(predicate, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def test_parts_with_defects_in_one_corner_make_that_corner_hot(view_factory, threshold_model):
    parts = corner_parts(threshold_model, 12, period_s=1.0)
    view = view_factory(latest=4, image_width=96)
    for frame, result, record in parts:
        view.deliver(record, Delivery(frame, result))
    wait_for(lambda: len(state(view)["latest"]) == 4)
    s = state(view)
    shift = s["shift"]
    assert shift["grades"]["PASS"] + shift["grades"]["DISCOUNT"] + shift["grades"]["REJECT"] == 12
    assert sum(h["PASS"] + h["DISCOUNT"] + h["REJECT"] for h in shift["hours"]) == 12
    defect = shift["heatmap"]["defect"]
    row, col = defect["hot"]
    assert row < shift["grid"] // 2 and col < shift["grid"] // 2  # the top-left quadrant
    assert defect["where"] == "defect: 100 % of defect area in the top-left quadrant"
    assert [p["id"] for p in s["latest"]] == [r["id"] for _, _, r in parts[-4:]]
    newest = s["latest"][-1]
    response = get(view, newest["image"])
    assert response.status == 200 and response.getheader("Content-Type") == "image/jpeg"
    assert get(view, parts[0][2]["id"].join(("/image/", ".jpg"))).status == 404  # no longer among the latest


def test_a_browser_that_stops_reading_is_dropped_and_never_holds_up_deliver(view_factory, threshold_model, monkeypatch):
    monkeypatch.setattr(server, "CLIENT_QUEUE", 8)
    view = view_factory(latest=8)
    assert view.server is not None
    stuck = socket.socket()
    stuck.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 2048)  # fills after a few events
    stuck.connect(("127.0.0.1", view.server.port))
    stuck.sendall(b"GET /events HTTP/1.1\r\nHost: x\r\n\r\n")
    wait_for(lambda: len(view.clients) == 1)
    frame, result, record = corner_parts(threshold_model, 1)[0]
    slowest, sent = 0.0, 0
    try:
        while view.clients.dropped == 0:
            assert sent < 5000, "the stuck browser was never dropped"
            t = time.perf_counter()
            view.deliver({**record, "id": f"part-{sent}"}, Delivery(frame, result))
            slowest = max(slowest, time.perf_counter() - t)
            sent += 1
            if sent % 20 == 0:
                time.sleep(0.01)  # let the drawing thread keep up: events, not frames, fill the browser's queue
        assert slowest < 0.25, f"deliver took {slowest:.3f} s with a stuck browser"
        health = state(view)["health"]["view"]
        assert health["browsers_dropped"] == 1 and health["browsers"] == 0
    finally:
        stuck.close()


def test_the_frames_are_drawn_at_the_configured_width(view_factory, threshold_model):
    frame, result, record = corner_parts(threshold_model, 1)[0]
    view = view_factory(image_width=64)
    view.deliver(record, Delivery(frame, result))
    wait_for(lambda: bool(state(view)["latest"]))
    assert view.server is not None
    conn = http.client.HTTPConnection("127.0.0.1", view.server.port, timeout=10)
    conn.request("GET", state(view)["latest"][0]["image"])
    image = cv2.imdecode(np.frombuffer(conn.getresponse().read(), np.uint8), cv2.IMREAD_COLOR)
    conn.close()
    assert image.shape == (64, 64, 3)

"""The operator view in a real browser: Debian's Chromium (package chromium, which
.ci/run installs) driven by Playwright; no browser is ever downloaded. Skipped,
saying why, where either is missing.

* ``station run -c config/operator-view.yaml`` serves the page within 10 s of its
  start, and the counts on the page rise as parts pass;
* parts whose defects sit in the top-left corner light that corner of the page's
  heatmap, on a panel and on a phone alike.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml

from mosquitto import free_port, have_mosquitto
from station.config import OperatorViewConfig
from station.priority import ThreadPolicy
from station.sinks import Delivery
from station.view import OperatorView
from viewkit import corner_parts

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"

if not Path(CHROMIUM).is_file():
    pytest.skip("Debian's Chromium is not installed (apt-get install chromium; .ci/run installs it)",
                allow_module_level=True)
sync_api = pytest.importorskip("playwright.sync_api", reason="Playwright is not installed (the dev extra)")


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield chromium
        chromium.close()


def count(page, grade: str = "total") -> int:
    return int(page.inner_text(f"#count-{grade}"))


def watched(browser, viewport: dict) -> tuple:
    """A new page, and the list its script errors and console errors go to."""
    page = browser.new_page(viewport=viewport)
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.on("console", lambda msg: errors.append(msg.text) if msg.type == "error" else None)
    return page, errors


def until(page, script: str, timeout: float = 20.0) -> None:
    """Poll ``script`` (a JavaScript expression) until it is true. Not wait_for_function:
    its string predicates are evaluated in the page, which the page's CSP forbids."""
    deadline = time.monotonic() + timeout
    while not page.evaluate(script):
        assert time.monotonic() < deadline, f"timed out waiting for {script}"
        page.wait_for_timeout(50)


def served(url: str, deadline: float, proc: subprocess.Popen) -> bool:
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            with urllib.request.urlopen(url, timeout=1) as response:
                return response.status == 200
        except (urllib.error.URLError, OSError):
            time.sleep(0.05)
    return False


@pytest.mark.skipif(not have_mosquitto(), reason="mosquitto is not installed")
def test_station_run_serves_the_live_page_and_the_counts_rise(tmp_path, broker, browser):
    cfg = yaml.safe_load((ROOT / "config" / "operator-view.yaml").read_text())
    cfg["operator_view"]["port"] = port = free_port()
    cfg["mqtt"]["port"] = broker.port
    path = tmp_path / "operator-view.yaml"
    path.write_text(yaml.safe_dump(cfg))
    url = f"http://127.0.0.1:{port}/"
    log = (tmp_path / "station.log").open("w")
    started = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-m", "station", "run", "-c", str(path), "--state-dir", str(tmp_path / "state")],
                            stdout=log, stderr=subprocess.STDOUT)
    try:
        assert served(url, started + 10, proc), f"no page within 10 s: {(tmp_path / 'station.log').read_text()}"
        page, errors = watched(browser, {"width": 1280, "height": 800})
        page.goto(url)
        until(page, "Number(document.getElementById('count-total').textContent) > 0")
        first = count(page)
        until(page, f"Number(document.getElementById('count-total').textContent) > {first}")
        assert sum(count(page, g) for g in ("PASS", "DISCOUNT", "REJECT")) == count(page)
        until(page, "document.querySelector('#current img') !== null && document.querySelector('#current img').naturalWidth > 0")
        assert page.inner_text("#current-grade") in ("PASS", "DISCOUNT", "REJECT")
        until(page, "document.getElementById('health').innerText.includes('MQTT connected')")
        assert "camera connected" in page.inner_text("#health")
        assert "demo-lgp-seg" in page.inner_text("#models")
        assert not errors
    finally:
        proc.terminate()
        proc.wait(20)
        log.close()
    assert proc.returncode == 0


@pytest.mark.parametrize("viewport", [{"width": 1280, "height": 800}, {"width": 390, "height": 844}])
def test_the_heatmap_shows_the_corner_the_defects_sit_in(browser, threshold_model, viewport):
    view = OperatorView(OperatorViewConfig(enabled=True, port=0), "corner-station", None, None, ThreadPolicy())
    view.start()
    try:
        assert view.server is not None
        for frame, result, record in corner_parts(threshold_model, 8):
            view.deliver(record, Delivery(frame, result))
        page, errors = watched(browser, viewport)
        page.goto(view.server.url)
        until(page, "Number(document.getElementById('count-total').textContent) === 8")
        hot = page.locator('.heatmap[data-class="defect"] rect.hot')
        grid = page.locator('.heatmap[data-class="defect"] rect.cell').count()
        side = round(grid ** 0.5)
        assert side * side == grid
        assert int(hot.get_attribute("data-row")) < side // 2 and int(hot.get_attribute("data-col")) < side // 2
        assert "defect: 100 % of defect area in the top-left quadrant" in page.inner_text("#where")
        # usable on a phone: nothing wider than the screen
        assert page.evaluate("document.documentElement.scrollWidth") <= viewport["width"]
        assert not errors
    finally:
        view.close()

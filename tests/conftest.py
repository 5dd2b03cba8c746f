from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SHARED_DATA = ROOT.parent / "shared" / "data"
sys.path.insert(0, str(Path(__file__).resolve().parent))


@pytest.fixture
def threshold_model(tmp_path):
    from onnx_builders import write_threshold_model

    return write_threshold_model(tmp_path / "threshold.onnx")


def shared_data(name: str) -> Path:
    path = SHARED_DATA / name
    if not path.is_dir():
        pytest.skip(f"{path} is absent: the shared datasets are not beside this checkout")
    return path


@pytest.fixture
def broker(tmp_path):
    """A real Mosquitto on a free loopback port, killed after the test."""
    from mosquitto import Mosquitto

    with Mosquitto(tmp_path / "broker") as b:
        yield b


@pytest.fixture
def stations():
    """Start ``station run`` processes: ``stations(workdir, config, *args, **kw)`` takes
    daemonkit.Station.start's arguments; each is killed after the test if still running."""
    from daemonkit import Station

    started: list[Station] = []

    def start(workdir: Path, config: str, *args: str, **kw) -> Station:
        station = Station(workdir, config)
        started.append(station)
        return station.start(*args, **kw)

    yield start
    for station in started:
        station.kill()

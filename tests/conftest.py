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

"""Offline side of station: synthetic data, U-Net training and ONNX export.

Run the modules as ``python -m export.<module>`` from the repository root:

* ``export.synth``       synthetic light-guide-plate images with truth masks
* ``export.train``       train a MobileNetV2 U-Net and export it with its model card
* ``export.onnx_export`` (re)embed or show the model card of an ONNX file
* ``export.make_demo``   reproduce ``station/assets/demo_seg.onnx`` and ``samples/``
* ``export.train_detector`` train the FCOS-style box detector and export it with its card
* ``export.crossval``    out-of-fold predictions of k fold runs → threshold and min_area_px under an escape budget
* ``export.magnetic_tile`` / ``export.neu_det``  the shipped models' recipes (``cv``, ``train``; ``train``, ``eval``)
* ``export.alloc``      the memory allocator training runs get (they restart under jemalloc where installed)
* ``export.quantize``   an INT8 copy of a model for CPUs, calibrated on real images and judged by station eval

Library modules: ``card`` (model-card drafts, preprocessing flags → ops),
``data`` (image/mask pairs → arrays through ``station.preprocess``), ``unet``
(the Keras model), ``crossval`` (out-of-fold figures and thresholds), ``subpixel`` and
``equalize`` (float graph rewrites that keep the outputs, for INT8). TensorFlow is imported only by ``unet``, by ``train`` and
``onnx_export`` when they train or convert, and by ``make_demo`` through them;
``synth``, ``data`` and ``card`` need numpy and OpenCV alone, like ``station``.
"""

from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys
from pathlib import Path
from typing import Callable, Mapping, Sequence

from station.errors import StationError


class ExportError(StationError):
    """Training data, a training option or an exported model is unusable; the message names it."""


def run_commands(parser: argparse.ArgumentParser, commands: Mapping[str, Callable[[argparse.Namespace], int]],
                 argv: Sequence[str] | None = None) -> int:
    """Parse ``argv``, log to stdout and run ``commands[args.cmd]``; an ExportError is
    logged (the message names what was wrong) and exits 2."""
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stdout)
    try:
        return commands[args.cmd](args)
    except ExportError as exc:
        logging.getLogger(parser.prog).error("%s", exc)
        return 2


def run_station_eval(station_args: Sequence[str | Path], json_out: Path, png_out: Path) -> dict:
    """``station eval STATION_ARGS --json JSON_OUT --report PNG_OUT`` in a child process
    (the line's own code and ONNX Runtime, as an operator runs it); its JSON report."""
    json_out.parent.mkdir(parents=True, exist_ok=True)
    png_out.parent.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "station", "eval", *map(str, station_args), "--json", str(json_out),
           "--report", str(png_out), "-q"]
    rc = subprocess.call(cmd)
    if rc != 0:
        raise ExportError(f"station eval exited with {rc}: {' '.join(cmd[1:])}")
    return json.loads(json_out.read_text())

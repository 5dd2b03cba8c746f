"""``station bench -c A.yaml --compare B.yaml``: two model sets side by side, in one run.

The bare runs of :func:`station.bench.bare` (the models alone on prepared
tensors, run as the daemon's infer stage runs them) for the models of both
configs, on the same frames, interleaved in rounds whose order alternates (A B,
B A, …) so that a host that slows down or speeds up during the run weighs on
both alike. It prints each model's bare median under each config and their
ratio (A's time / B's, and for frames/s B's / A's: above 1, B is faster), and
the same for whole frames. Made for a
float model set against its INT8 copy (``config/bench.yaml`` against
``config/bench-int8.yaml``); no pipeline, broker or latency run.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any, cast

import numpy as np

from .config import StationConfig, load_config
from .errors import StationError
from .inspector import Inspector, open_models
from .types import Frame

ROUNDS = 10  # blocks of runs per config


def _median(values: list[float]) -> float:
    return float(np.median(values))


def _frames(cfg: StationConfig, size: tuple[int, int] | None) -> list[Frame]:
    """Eight distinct synthetic frames of the bench's camera."""
    from .bench import _camera
    from .camera.live import FakeSource

    cam = _camera(cfg, 8, None, size)
    src = FakeSource(None, cam.height, cam.width, cam.seed, distinct=8)
    src.open()
    return cast(list[Frame], [src.read(1.0) for _ in range(8)])  # unpaced, endless: every read is a frame


def _figures(per_model: dict[str, list[float]], per_frame: list[float], inspector: Inspector) -> dict[str, Any]:
    return {
        "runs": len(per_frame),
        "fps": len(per_frame) / (sum(per_frame) / 1e3),
        "median_ms": _median(per_frame),
        "p99_ms": float(np.percentile(per_frame, 99)),
        "models": {role: {"name": inspector.models[role].card.name, "version": inspector.models[role].card.version,
                          "path": str(inspector.models[role].path), "sha256": inspector.models[role].sha256,
                          "median_ms": _median(ms)} for role, ms in per_model.items()},
    }


def compare_bare(configs: dict[str, StationConfig], runs: int, size: tuple[int, int] | None,
                 rounds: int = ROUNDS) -> dict[str, Any]:
    """The bare runs of each config's models, ``runs`` frames each, interleaved in ``rounds``
    blocks (alternating order); per config the figures, and the ratios first / second."""
    from .bench import _machine, bare

    labels = list(configs)
    inspectors = {label: Inspector(open_models(cfg), cfg, keep_mask=False) for label, cfg in configs.items()}
    roles = [list(i.models) for i in inspectors.values()]
    if roles[0] != roles[1]:
        raise StationError(f"--compare: the configs' models differ in role: {roles[0]} and {roles[1]}")
    frames = _frames(configs[labels[0]], size)
    per_model: dict[str, dict[str, list[float]]] = {label: {} for label in labels}
    per_frame: dict[str, list[float]] = {label: [] for label in labels}
    block = max(1, runs // rounds)
    for r in range(rounds):
        for label in labels if r % 2 == 0 else labels[::-1]:
            _, ms = bare(inspectors[label], frames, block, per_model_ms=per_model[label])
            per_frame[label] += ms
    figures = {label: _figures(per_model[label], per_frame[label], inspectors[label]) for label in labels}
    a, b = (figures[label] for label in labels)
    return {
        "machine": _machine(configs[labels[0]], inspectors[labels[0]].models),
        "frame": {"height": frames[0].height, "width": frames[0].width},
        "rounds": rounds,
        "configs": figures,
        "ratios": {"fps": b["fps"] / a["fps"], "median_ms": a["median_ms"] / b["median_ms"],
                   "models": {role: a["models"][role]["median_ms"] / b["models"][role]["median_ms"]
                              for role in roles[0]}},
    }


def format_compare(r: dict[str, Any]) -> str:
    labels = list(r["configs"])
    a, b = (r["configs"][label] for label in labels)
    width = max(26, *(len(label) + 2 for label in labels))
    lines = [f"station bench --compare — {r['machine']['cpus']} CPUs, onnxruntime {r['machine']['onnxruntime']}, "
             f"frames {r['frame']['width']}x{r['frame']['height']}, {a['runs']} bare runs each in {r['rounds']} "
             "interleaved rounds",
             f"{'bare median, ms':<26}{labels[0]:>{width}}{labels[1]:>{width}}{'ratio':>8}"]
    for role, ratio in r["ratios"]["models"].items():
        ma, mb = a["models"][role], b["models"][role]
        lines.append(f"  {role:<24}{ma['median_ms']:>{width}.2f}{mb['median_ms']:>{width}.2f}{ratio:>7.2f}×"
                     f"   ({ma['name']} v{ma['version']} / v{mb['version']})")
    lines.append(f"{'frame (all models)':<26}{a['median_ms']:>{width}.2f}{b['median_ms']:>{width}.2f}"
                 f"{r['ratios']['median_ms']:>7.2f}×")
    lines.append(f"{'frames/s':<26}{a['fps']:>{width}.1f}{b['fps']:>{width}.1f}{r['ratios']['fps']:>7.2f}×")
    return "\n".join(lines)


def cmd_compare(args: argparse.Namespace, cfg: StationConfig) -> int:
    """``station bench … --compare CONFIG``: prints the comparison, writes ``--json``."""
    if args.config is not None and args.compare.resolve() == args.config.resolve():
        raise StationError(f"--compare {args.compare}: the same file as -c")
    labels = [str(args.config) if args.config else "bundled default", str(args.compare)]
    runs = max(50, min(args.frames // 4, 1000))
    report = compare_bare(dict(zip(labels, (cfg, load_config(args.compare)))), runs,
                          tuple(args.size) if args.size else None)
    report["command"] = " ".join(["station", *sys.argv[1:]])
    print(format_compare(report))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0

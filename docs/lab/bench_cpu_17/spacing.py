"""The one-off probe behind docs/lab/benchmarks.md, sitting 17: does a model run
take longer when runs are spaced out, as at a line's pace, than back to back? The
shipped U-Net on one ONNX Runtime thread, 150 runs after 10 warm-up runs, with no
gap or a gap of 4 or 16 ms after each run, in which the thread sleeps or spins
(busy-waits); two rounds. Run on one CPU, on an otherwise idle machine:

    taskset -c 0 .venv/bin/python docs/lab/bench_cpu_17/spacing.py

It is a record of how the sitting's figures were measured, not part of the station.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

MODEL = Path(__file__).resolve().parents[3] / "models" / "magnetic_tile_unet.onnx"


def main() -> None:
    options = ort.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = 1
    session = ort.InferenceSession(str(MODEL), options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    x = np.random.default_rng(0).random((1, 256, 256, 1), dtype=np.float32)
    for _ in range(10):
        session.run(None, {name: x})

    def runs(gap_ms: float, spin: bool, n: int = 150) -> list[float]:
        took = []
        for _ in range(n):
            t0 = time.perf_counter()
            session.run(None, {name: x})
            took.append((time.perf_counter() - t0) * 1e3)
            if spin:
                end = time.perf_counter() + gap_ms / 1e3
                while time.perf_counter() < end:
                    pass
            elif gap_ms:
                time.sleep(gap_ms / 1e3)
        return took

    for _ in range(2):
        for gap_ms, spin in ((0, False), (4, False), (4, True), (16, False), (16, True)):
            took = runs(gap_ms, spin)
            print(f"gap {gap_ms:2d} ms {'spin ' if spin else 'sleep'}: median {np.median(took):.2f} "
                  f"p99 {np.percentile(took, 99):.2f} ms")


if __name__ == "__main__":
    main()

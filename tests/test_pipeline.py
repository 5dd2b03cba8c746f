"""The daemon's infer stage with ``tuning.parallel_models``: both shipped
models (U-Net and detector) on each frame at the same time give exactly the
results of running them one after the other, with the same sessions."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from station.config import StationConfig
from station.imageio import read_image
from station.inspector import Inspector, model_threads, open_models
from station.parallel import ParallelInfer
from station.types import Frame

ROOT = Path(__file__).resolve().parent.parent
MODELS = {"segmentation": ROOT / "models" / "magnetic_tile_unet.onnx", "detection": ROOT / "models" / "neu_det_detector.onnx"}


def config(**tuning) -> StationConfig:
    return StationConfig.model_validate({
        "models": {role: str(path) for role, path in MODELS.items()},
        "inference": {"providers": ["cpu"]},
        "tuning": tuning,
        "postprocess": {"min_score": 0.05},
    })


def frames() -> list[Frame]:
    out = []
    for i, path in enumerate(sorted((ROOT / "samples").glob("plate*"))):
        image = read_image(path)
        out.append(Frame(image=image, source=str(path), seq=i, captured_at=1.0e9 + i))
    return out


def comparable(result) -> tuple:
    d = result.defects
    return (result.decision.grade, result.decision.rule, result.defect_area_px, tuple(d.class_name), tuple(d.kind),
            d.xyxy.tobytes(), d.confidence.tobytes(), d.area_px.tobytes())


def test_models_in_parallel_give_the_results_of_models_in_turn():
    cfg = config(parallel_models=True)
    inspector = Inspector(open_models(cfg), cfg)
    parallel = ParallelInfer("test-infer")
    try:
        for frame in frames():
            work = parallel(inspector.prepare(frame))
            together = inspector.finish(work)
            in_turn = inspector.inspect(frame)
            assert comparable(together) == comparable(in_turn), frame.source
            assert np.array_equal(together.mask, in_turn.mask)
            lat = together.latency_ms
            assert {"infer", "infer.segmentation", "infer.detection"} <= set(lat)
            assert lat["infer"] >= max(lat["infer.segmentation"], lat["infer.detection"])  # encloses both
            stages = sum(v for k, v in lat.items() if k != "total" and not k.startswith("infer."))
            assert lat["total"] == pytest.approx(stages)  # per-model times are inside "infer"
            assert "infer" not in in_turn.latency_ms
    finally:
        parallel.close()


def test_with_the_models_in_turn_it_is_the_inspectors_infer():
    cfg = config(parallel_models=False)
    inspector = Inspector(open_models(cfg), cfg)
    work = ParallelInfer()(inspector.prepare(frames()[0]))
    assert "infer" not in work.latency and set(work.outputs) == set(MODELS)


def test_threads_are_shared_out_among_parallel_models(monkeypatch):
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: {0, 1, 2, 3, 4})
    assert model_threads(config(parallel_models=True), 2) == 2
    assert model_threads(config(parallel_models=True), 1) == 0  # one model: ONNX Runtime's default
    assert model_threads(config(parallel_models=True, intra_op_threads=3), 2) == 3  # set explicitly: kept
    assert model_threads(config(parallel_models=False), 2) == 0
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: {0})
    assert model_threads(config(parallel_models=True), 2) == 1


def test_a_failing_model_fails_the_frame_after_both_have_finished():
    cfg = config(parallel_models=True)
    inspector = Inspector(open_models(cfg), cfg)
    work = inspector.prepare(frames()[0])
    work.tensors["detection"] = np.zeros((1, 7, 7, 3), np.float32)  # not the detector's input shape
    parallel = ParallelInfer()
    try:
        with pytest.raises(Exception, match="."):  # ONNX Runtime's own error type
            parallel(work)
        assert "segmentation" in work.outputs  # the other model ran to its end
    finally:
        parallel.close()


def test_the_daemon_runs_both_models_in_parallel(tmp_path, stations):
    """`station run` with a fake camera of 10 frames and parallel_models: every frame
    gets a record from both models, timed as models running together."""
    from daemonkit import jsonl

    out = tmp_path / "records.jsonl"
    config = f"""
station: {{id: cam1}}
models: {{segmentation: {MODELS['segmentation']}, detection: {MODELS['detection']}}}
inference: {{providers: [cpu]}}
tuning: {{parallel_models: true}}
camera: {{type: fake, height: 240, width: 320, frames: 10, fps: null}}
"""
    # fps null: the camera waits for the station, so a slow host drops no frame
    station = stations(tmp_path, config, "--jsonl", str(out), state=False)
    assert station.wait(120) == 0, station.text()[-3000:]
    records = jsonl(out)
    assert len(records) == 10 and all("grade" in r for r in records), station.text()[-3000:]
    for r in records:
        assert set(r["models"]) == set(MODELS)
        assert {"infer", "infer.segmentation", "infer.detection"} <= set(r["latency_ms"])
    assert "Traceback" not in station.text()


def test_warm_up_sends_synthetic_parts_through_the_given_infer_stage():
    """Inspector.warm_up runs each part through prepare, the caller's infer stage
    and finish; the default infer stage is the Inspector's own."""
    cfg = config(parallel_models=True)
    inspector = Inspector(open_models(cfg), cfg)
    parallel = ParallelInfer("test-warm")
    seen = []

    def infer(work):
        assert set(work.tensors) == set(MODELS)  # prepared for both models
        seen.append(parallel(work))
        return seen[-1]

    try:
        inspector.warm_up(infer, parts=3)
    finally:
        parallel.close()
    assert len(seen) == 3
    assert all(set(w.outputs) == set(MODELS) and "infer" in w.latency for w in seen)  # models ran together
    assert all(w.frame.source == "warm-up" for w in seen)
    assert [w.frame.seq for w in seen] == [0, 1, 2]
    inspector.warm_up(parts=1)  # on this thread


def test_a_part_that_fails_the_warm_up_is_an_error_naming_it():
    from station.errors import StationError

    cfg = config(parallel_models=True)
    inspector = Inspector(open_models(cfg), cfg)

    def infer(work):
        work.tensors["detection"] = np.zeros((1, 7, 7, 3), np.float32)  # not the detector's input shape
        return inspector.infer(work)

    with pytest.raises(StationError, match=r"warm-up: a synthetic 256x256 part failed to inspect: .*"):
        inspector.warm_up(infer, parts=1)


def test_a_helper_model_yields_before_its_run_and_the_first_model_does_not():
    """tuning.helper_yield_ms: the second model's thread calls the daemon's wait (with
    the configured timeout) before its run; the first model starts at once; the results
    are those of the models in turn. Without a timeout the wait is never called."""
    import threading
    import time

    cfg = config(parallel_models=True)
    inspector = Inspector(open_models(cfg), cfg)
    frame = frames()[0]
    reference = inspector.finish(inspector.infer(inspector.prepare(frame)))
    calls: list[tuple[str, float]] = []
    pending: list[bool] = []  # whether the detector's input was still unread when the wait began
    prepared = inspector.prepare(frame)

    def wait(timeout: float) -> bool:
        calls.append((threading.current_thread().name, timeout))
        pending.append("detection" in prepared.tensors)
        time.sleep(0.05)
        return True

    parallel = ParallelInfer("test-yield", yield_to=wait, yield_s=0.004)
    try:
        work = parallel(prepared)
    finally:
        parallel.close()
    assert [(name.split("_")[0], timeout) for name, timeout in calls] == [("test-yield", 0.004)]  # the helper only
    assert comparable(inspector.finish(work)) == comparable(reference)
    assert pending == [True]  # the helper waited before its run, not after
    # ... inside the frame's infer stage
    assert work.latency["infer"] >= 50 + work.latency["infer.detection"]

    calls.clear()
    off = ParallelInfer("test-no-yield", yield_to=wait, yield_s=0.0)
    try:
        off(inspector.prepare(frame))
    finally:
        off.close()
    assert calls == []

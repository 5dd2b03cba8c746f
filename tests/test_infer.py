"""Model cards: a model is refused at load when its card is missing or does not
match its tensors, with a message naming the file and the field."""

from __future__ import annotations

import numpy as np
import pytest
from onnx_builders import threshold_card, write_threshold_model

from station.errors import ModelError
from station.infer import OnnxModel


def test_loads_and_reports_providers(threshold_model):
    model = OnnxModel(threshold_model, providers=("cuda", "cpu"))
    assert model.providers[-1] == "CPUExecutionProvider"
    assert len(model.sha256) == 64
    out = model.run(np.ones((1, 64, 64, 1), np.float32))
    assert set(out) == {"mask"} and out["mask"].shape == (1, 64, 64, 1)


def card_with(**changes):
    base = threshold_card().model_dump(mode="json")
    for dotted, value in changes.items():
        node = base
        keys = dotted.split("__")
        for k in keys[:-1]:
            node = node[k]
        node[keys[-1]] = value
    return base


@pytest.mark.parametrize(
    "card_json, message",
    [
        ("", "no model card"),
        ("{not json", "model card is not valid JSON"),
        ('{"name": "x"}', "invalid model card: version: Field required"),
    ],
)
def test_missing_or_broken_card_is_refused(tmp_path, card_json, message):
    path = write_threshold_model(tmp_path / "m.onnx", card_json=card_json)
    with pytest.raises(ModelError, match=message) as info:
        OnnxModel(path)
    assert str(path) in str(info.value)


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"input__name": "pixels"}, "card input.name 'pixels' does not match the model inputs \\['image'\\]"),
        ({"input__height": 128, "input__width": 128}, "card input shape \\[1, 128, 128, 1\\]"),
        ({"input__dtype": "uint8", "preprocess": [{"op": "colour", "to": "gray"}, {"op": "resize"}]}, "card input.dtype 'uint8'"),
        ({"output__name": "probabilities"}, "card output 'probabilities' is not a model output"),
        ({"classes": ["a", "b"]}, "card output 'mask' should be \\[1, 64, 64, 2\\]"),
        ({"input__layout": "NCHW"}, "card input shape \\[1, 1, 64, 64\\] \\(NCHW\\)"),
    ],
)
def test_card_mismatch_is_refused(tmp_path, changes, message):
    import json

    path = write_threshold_model(tmp_path / "m.onnx", card_json=json.dumps(card_with(**changes)))
    with pytest.raises(ModelError, match=message) as info:
        OnnxModel(path)
    assert str(info.value).startswith(str(path))


def test_inconsistent_card_names_the_field(tmp_path):
    import json

    bad = card_with(preprocess=[{"op": "resize"}, {"op": "normalize"}])  # no colour op first
    path = write_threshold_model(tmp_path / "m.onnx", card_json=json.dumps(bad))
    with pytest.raises(ModelError, match="preprocess must start with exactly one 'colour' op"):
        OnnxModel(path)


def test_unknown_padding_names_the_field(tmp_path):
    import json

    bad = card_with(preprocess=[{"op": "colour", "to": "gray"}, {"op": "resize", "mode": "letterbox", "pad_mode": "wrap"},
                                {"op": "normalize"}])
    path = write_threshold_model(tmp_path / "m.onnx", card_json=json.dumps(bad))
    with pytest.raises(ModelError, match=r"preprocess\.1\.resize\.pad_mode: Input should be 'constant', 'replicate' or 'reflect'"):
        OnnxModel(path)


def test_missing_and_corrupt_files(tmp_path):
    with pytest.raises(ModelError, match="model file not found"):
        OnnxModel(tmp_path / "nope.onnx")
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"\x08\x07garbage" * 10)
    with pytest.raises(ModelError, match="junk.onnx: ONNX Runtime cannot load the model"):
        OnnxModel(junk)


def test_io_binding_gives_the_same_outputs(threshold_model):
    """The GPU path binds a fixed input buffer; the same code on a CPU buffer
    must give what a plain run gives (no GPU here to run it on CUDA)."""
    plain = OnnxModel(threshold_model, providers=("cpu",))
    bound = OnnxModel(threshold_model, providers=("cpu",))
    bound._bind("cpu", 0)
    rng = np.random.default_rng(0)
    for _ in range(3):
        x = rng.random((1, 64, 64, 1), dtype=np.float32)
        assert np.array_equal(bound.run(x)["mask"], plain.run(x)["mask"])


def test_provider_options_from_config():
    from station.config import parse_config
    from station.infer import _provider_options

    inf = parse_config("inference:\n  providers: [tensorrt, cuda, cpu]\n  device_id: 1\n"
                       "  tensorrt: {fp16: true, engine_cache: /var/cache/station/trt}\n").inference
    trt = _provider_options("TensorrtExecutionProvider", inf)
    assert trt["trt_fp16_enable"] is True and trt["trt_engine_cache_path"] == "/var/cache/station/trt" and trt["device_id"] == 1
    assert _provider_options("CUDAExecutionProvider", inf)["device_id"] == 1
    assert _provider_options("CPUExecutionProvider", inf) == {}


def test_a_provider_that_cannot_start_is_skipped_quietly(threshold_model, capfd, caplog):
    """TensorRT without its libraries fails at session creation; ONNX Runtime's Python API then
    prints an "EP Error" banner and retries with default CUDA options. OnnxModel keeps the
    banner off stdout (a command's own output), logs why, and retries itself with the next
    providers and their options; CUDA without a GPU is left out silently; CPU runs."""
    import onnxruntime as ort

    if "TensorrtExecutionProvider" not in ort.get_available_providers():
        pytest.skip("this onnxruntime build has no TensorRT provider (CPU-only package)")
    model = OnnxModel(threshold_model, providers=("tensorrt", "cuda", "cpu"))
    assert model.providers == ["CPUExecutionProvider"]
    out = capfd.readouterr().out
    assert "EP Error" not in out and "Failed to load" not in out
    assert "TensorrtExecutionProvider cannot start here" in caplog.text
    assert model.run(np.ones((1, 64, 64, 1), np.float32))["mask"].shape == (1, 64, 64, 1)

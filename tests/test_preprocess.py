"""Preprocessing follows the card: each op against a direct OpenCV/numpy
reference, letterbox geometry, and the Inspector feeding the model exactly
that tensor."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
from onnx_builders import threshold_card

from station.modelcard import ModelCard
from station.preprocess import fit, prepare_mask, preprocess, to_tensor

rng = np.random.default_rng(1)
BGR = rng.integers(0, 255, (90, 160, 3), dtype=np.uint8)


def reference(image: np.ndarray, card: ModelCard) -> np.ndarray:
    """The card's ops spelt out with plain OpenCV calls (stretch resize only)."""
    x = image
    for op in card.preprocess:
        d = op.model_dump()
        if op.op == "colour":
            x = cv2.cvtColor(x, {"gray": cv2.COLOR_BGR2GRAY, "rgb": cv2.COLOR_BGR2RGB}[d["to"]]) if d["to"] != "bgr" else x
        elif op.op == "clahe":
            c = cv2.createCLAHE(clipLimit=d["clip_limit"], tileGridSize=(d["tile_grid"],) * 2)
            x = c.apply(x) if x.ndim == 2 else cv2.merge([c.apply(x[:, :, i].copy()) for i in range(3)])
        elif op.op == "equalize_hist":
            x = cv2.equalizeHist(x)
        elif op.op == "dilate":
            x = cv2.dilate(x, np.ones((d["kernel"], d["kernel"]), np.uint8), iterations=d["iterations"])
        elif op.op == "resize":
            x = cv2.resize(x, (card.input.width, card.input.height), interpolation=cv2.INTER_AREA)
        elif op.op == "normalize":
            x = (x.astype(np.float32) * np.float32(d["scale"]) - np.float32(d["mean"][0])) / np.float32(d["std"][0])
    return x.reshape(card.input.height, card.input.width, card.input.channels)


@pytest.mark.parametrize(
    "ops",
    [
        [{"op": "colour", "to": "gray"}, {"op": "resize"}, {"op": "normalize"}],
        [{"op": "colour", "to": "gray"}, {"op": "clahe", "clip_limit": 2.0, "tile_grid": 8}, {"op": "dilate", "kernel": 3}, {"op": "resize"}, {"op": "normalize"}],
        [{"op": "colour", "to": "gray"}, {"op": "resize"}, {"op": "equalize_hist"}, {"op": "normalize", "scale": 1.0, "mean": [127.5], "std": [127.5]}],
        [{"op": "colour", "to": "gray"}, {"op": "dilate", "kernel": 5, "iterations": 2}, {"op": "resize"}, {"op": "clahe", "clip_limit": 3.0, "tile_grid": 4}, {"op": "normalize"}],
    ],
)
def test_ops_match_reference(ops):
    card = threshold_card(preprocess=[{**o} for o in ops])
    card = card.model_copy(update={"preprocess": ModelCard.model_validate({**card.model_dump(), "preprocess": ops}).preprocess})
    x, geometry = preprocess(BGR, card)
    assert x.dtype == np.float32 and x.shape == (64, 64, 1)
    assert np.array_equal(x, reference(BGR, card))
    assert (geometry.content_h, geometry.content_w) == (64, 64)


def test_rgb_card_converts_colour_and_layout():
    card = ModelCard.model_validate({
        **threshold_card().model_dump(),
        "input": {"name": "image", "layout": "NCHW", "height": 64, "width": 64, "channels": 3, "dtype": "float32", "colour": "rgb"},
        "preprocess": [{"op": "colour", "to": "rgb"}, {"op": "resize"}, {"op": "normalize", "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}],
    })
    x, _ = preprocess(BGR, card)
    t = to_tensor(x, card.input)
    assert t.shape == (1, 3, 64, 64) and t.flags.c_contiguous
    small = cv2.resize(BGR, (64, 64), interpolation=cv2.INTER_AREA)
    expected_r = (small[:, :, 2].astype(np.float32) / 255 - 0.485) / 0.229
    assert np.allclose(t[0, 0], expected_r, atol=1e-6)


@pytest.mark.parametrize("h, w", [(100, 200), (200, 100), (64, 64), (3, 500), (1, 1)])
def test_letterbox_keeps_aspect_and_centres(h, w):
    g = fit(h, w, 64, 64, "letterbox")
    assert g.content_h <= 64 and g.content_w <= 64
    assert max(g.content_h, g.content_w) == 64
    scale = min(64 / h, 64 / w)
    assert abs(g.content_h - h * scale) <= 1 and abs(g.content_w - w * scale) <= 1
    assert g.top == (64 - g.content_h) // 2 and g.left == (64 - g.content_w) // 2


def test_letterbox_pads_with_the_pad_value():
    card = threshold_card()  # letterbox, pad 0
    image = np.full((50, 100), 200, np.uint8)
    x, g = preprocess(image, card)
    assert (g.top, g.content_h) == (16, 32)
    assert np.all(x[:16] == 0) and np.all(x[48:] == 0) and np.allclose(x[16:48], 200 / 255)


@pytest.mark.parametrize("mode", ["replicate", "reflect"])
def test_letterbox_pads_with_the_edge_repeated_or_mirrored(mode):
    card = threshold_card(preprocess=[
        {"op": "colour", "to": "gray"},
        {"op": "resize", "mode": "letterbox", "interpolation": "area", "pad_mode": mode},
        {"op": "normalize", "scale": 1 / 255, "mean": [0.0], "std": [1.0]},
    ])
    image = np.tile(np.arange(100, 150, dtype=np.uint8)[:, None], (1, 100))  # rows 100..149, top to bottom
    x, g = preprocess(image, card)
    rows = x[:, 0, 0] * 255
    assert (g.top, g.content_h, g.left) == (16, 32, 0)
    assert np.allclose(x[16:48], cv2.resize(image, (64, 32), interpolation=cv2.INTER_AREA)[:, :, None] / 255)
    if mode == "replicate":
        assert np.allclose(rows[:16], rows[16]) and np.allclose(rows[48:], rows[47])
    else:  # mirrored about the edge row, which is not repeated (OpenCV's BORDER_REFLECT_101)
        assert np.allclose(rows[15::-1], rows[17:33]) and np.allclose(rows[48:], rows[46:30:-1])
    mask = np.zeros((50, 100), np.uint8)
    mask[:4, 10:30] = 255  # a defect at the top edge is repeated or mirrored into the padding with the image
    label = prepare_mask(mask, card, g)
    assert label[16:19, 8:14].all() and label[:16, 8:14].any() and not label[:16, 20:].any()
    assert label[:16, 8:14].all() if mode == "replicate" else not label[:12].any()
    # where the source lands is unchanged: outputs map back through the same geometry
    assert g == preprocess(image, threshold_card())[1]


def test_mask_follows_the_image_geometry():
    card = threshold_card()
    mask = np.zeros((50, 100), np.uint8)
    mask[10:20, 50:100] = 255
    _, g = preprocess(np.zeros((50, 100), np.uint8), card)
    label = prepare_mask(mask, card, g)
    assert label.shape == (64, 64) and set(np.unique(label)) == {0.0, 1.0}
    assert label[23:28, 32:64].all() and not label[29:].any() and not label[:16].any() and not label[:, :32].any()


def test_inspector_counts_no_defect_pixel_of_mirrored_padding(tmp_path):
    """A defect at the padded edge is mirrored into the padding the model sees; the
    line's mask and area come from the source frame alone, as with constant padding."""
    from onnx_builders import write_threshold_model

    from station.config import load_config
    from station.infer import OnnxModel
    from station.inspector import Inspector
    from station.types import Frame

    image = np.full((100, 200), 60, np.uint8)
    image[:10, 40:80] = 250  # bright (the threshold model's "defect") along the top edge: 2 % of the frame
    areas = {}
    for mode in ("constant", "reflect"):
        card = threshold_card(preprocess=[
            {"op": "colour", "to": "gray"},
            {"op": "resize", "mode": "letterbox", "interpolation": "area", "pad_mode": mode},
            {"op": "normalize", "scale": 1 / 255, "mean": [0.0], "std": [1.0]},
        ])
        model = OnnxModel(write_threshold_model(tmp_path / f"{mode}.onnx", card=card))
        seen = []
        real_run = model.run
        model.run = lambda t, real_run=real_run, seen=seen: seen.append(t.copy()) or real_run(t)
        result = Inspector({"segmentation": model}, load_config(None)).inspect(Frame(image, "x"))
        bright_rows = np.flatnonzero((seen[0][0, :, 20:40, 0] > 0.75).any(axis=1))
        areas[mode] = (result.defect_area_pct, bright_rows.min())
    assert areas["constant"][1] == 16 and areas["reflect"][1] < 16  # the model saw the mirror in the padding
    assert areas["reflect"][0] == pytest.approx(areas["constant"][0]) and 1.5 < areas["reflect"][0] < 2.5


@pytest.mark.parametrize("which", ["threshold", "bundled demo"])
def test_inspector_feeds_the_model_exactly_the_card_tensor(which, threshold_model, monkeypatch):
    from station.config import DEMO_MODEL, load_config
    from station.infer import OnnxModel
    from station.inspector import Inspector
    from station.types import Frame

    model = OnnxModel(threshold_model if which == "threshold" else DEMO_MODEL)
    seen = []
    real_run = model.run
    monkeypatch.setattr(model, "run", lambda t: seen.append(t.copy()) or real_run(t))
    Inspector({"segmentation": model}, load_config(None)).inspect(Frame(BGR, "x"))
    # the bundled model's card (stretch resize) is checked against the plain-OpenCV reference
    expected = reference(BGR, model.card) if model.card.resize.mode == "stretch" else preprocess(BGR, model.card)[0]
    assert len(seen) == 1 and np.array_equal(seen[0], to_tensor(expected, model.card.input))

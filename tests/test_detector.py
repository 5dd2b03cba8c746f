"""The detection side of export/: VOC data through the card's preprocessing, box
mapping through letterbox/stretch geometry, targets, and the ONNX round trip
(a tiny FCOS-style model, one eager epoch on a dozen synthetic images) into
``station`` (OnnxModel, ``station replay --det-model``, ``station eval``).

Tests marked ``slow`` import TensorFlow."""

from __future__ import annotations

import csv
import json
import shlex
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest

from export import ExportError
from export.voc import boxes_to_input, find_voc_samples, load_box_arrays, near_duplicate_groups
from station.modelcard import ModelCard
from station.preprocess import Geometry, fit

CLASSES = ("dent", "scratch")


def _voc(stem: str, size: tuple[int, int], objects) -> str:
    objs = "".join(
        f"<object><name>{n}</name><difficult>0</difficult><bndbox><xmin>{b[0]}</xmin><ymin>{b[1]}</ymin>"
        f"<xmax>{b[2]}</xmax><ymax>{b[3]}</ymax></bndbox></object>" for n, b in objects
    )
    return (f"<annotation><filename>{stem}.jpg</filename><size><width>{size[0]}</width><height>{size[1]}</height>"
            f"<depth>1</depth></size>{objs}</annotation>")


def write_voc_dataset(root: Path, n: int, size: tuple[int, int] = (100, 80), seed: int = 0) -> Path:
    """``n`` gray images (W × H = ``size``) with bright rectangles ('dent') and dark bars
    ('scratch'), and their VOC files, in the NEU-DET layout."""
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True)
    (root / "annotations").mkdir()
    w, h = size
    for i in range(n):
        img = rng.normal(120, 8, (h, w)).clip(0, 255).astype(np.uint8)
        objects = []
        x1, y1 = int(rng.integers(2, w // 2)), int(rng.integers(2, h // 2))
        x2, y2 = x1 + int(rng.integers(12, w // 2)), y1 + int(rng.integers(12, h // 2))
        img[y1:y2, x1:x2] = 220
        objects.append(("dent", (x1, y1, x2, y2)))
        if i % 2:
            sx = int(rng.integers(2, w - 10))
            img[2 : h - 2, sx : sx + 4] = 20
            objects.append(("scratch", (sx, 2, sx + 4, h - 2)))
        stem = f"{CLASSES[i % 2]}_{i}"
        cv2.imwrite(str(root / "images" / f"{stem}.jpg"), img)
        (root / "annotations" / f"{stem}.xml").write_text(_voc(stem, size, objects))
    return root


def _card(size=(64, 64), mode="stretch") -> ModelCard:
    from export.card import PreprocessOptions, preprocess_ops
    from export.train_detector import DetTrainConfig, draft_detection_card
    from station.modelcard import TrainingInfo

    ops = preprocess_ops(PreprocessOptions(colour="gray", clahe=None, dilate=0, resize_mode=mode))
    cfg = DetTrainConfig(data_dir=Path("."), out_dir=Path("."), preprocess=tuple(ops), size=size)
    return draft_detection_card(cfg, CLASSES, TrainingInfo(data="test"))


def test_find_and_load_voc(tmp_path: Path) -> None:
    root = write_voc_dataset(tmp_path / "data", 4)
    (root / "images" / "orphan.jpg").write_bytes((root / "images" / "dent_0.jpg").read_bytes())
    samples = find_voc_samples(root)
    assert [s.key for s in samples] == ["images/dent_0.jpg", "images/dent_2.jpg", "images/scratch_1.jpg",
                                        "images/scratch_3.jpg"]
    card = _card((64, 96), "letterbox")
    arrays = load_box_arrays(samples, card)
    assert arrays.x.shape == (4, 64, 96, 1) and arrays.x.dtype == np.float32
    assert [len(b) for b in arrays.boxes] == [1, 1, 2, 2]
    assert [list(lab) for lab in arrays.labels] == [[0], [0], [0, 1], [0, 1]]
    assert arrays.sizes == [(100, 80)] * 4
    g = arrays.geometries[0]
    assert (g.content_h, g.content_w, g.top, g.left) == (64, 80, 0, 8)
    # boxes land on the drawn rectangles: the bright area inside the first box
    x1, y1, x2, y2 = np.round(arrays.boxes[0][0]).astype(int)
    assert arrays.x[0, y1 + 2 : y2 - 2, x1 + 2 : x2 - 2].mean() > 0.5  # symmetric normalisation: 220 → 0.73

    bad = tmp_path / "bad"
    write_voc_dataset(bad, 1)
    (bad / "annotations" / "dent_0.xml").write_text(_voc("dent_0", (100, 80), [("rust", (1, 1, 9, 9))]))
    with pytest.raises(ExportError, match=r"dent_0.xml: class\(es\) \['rust'\]"):
        load_box_arrays(find_voc_samples(bad), card)
    with pytest.raises(ExportError, match="no images/ folder"):
        find_voc_samples(tmp_path)


@pytest.mark.parametrize(
    "src, size, mode",
    [((200, 200), (224, 224), "stretch"), ((200, 200), (64, 96), "letterbox"), ((80, 100), (64, 64), "letterbox"),
     ((80, 100), (96, 64), "stretch"), ((300, 120), (64, 64), "letterbox")],
)
def test_boxes_round_trip_through_geometry(src, size, mode) -> None:
    geometry = fit(src[0], src[1], size[0], size[1], mode)
    rng = np.random.default_rng(1)
    xy1 = rng.uniform(0, 0.5, (20, 2)) * [src[1], src[0]]
    xy2 = xy1 + rng.uniform(0.05, 0.5, (20, 2)) * [src[1], src[0]]
    boxes = np.concatenate([xy1, xy2], axis=1)
    inp = boxes_to_input(boxes, geometry)
    xs, ys = inp[:, [0, 2]], inp[:, [1, 3]]
    assert (xs >= geometry.left - 1e-4).all() and (xs <= geometry.left + geometry.content_w + 1e-4).all()
    assert (ys >= geometry.top - 1e-4).all() and (ys <= geometry.top + geometry.content_h + 1e-4).all()
    np.testing.assert_allclose(geometry.boxes_to_source(inp), boxes, atol=1e-3)


def test_identity_geometry_keeps_boxes() -> None:
    boxes = np.array([[2, 3, 50, 60]], np.float32)
    np.testing.assert_array_equal(boxes_to_input(boxes, Geometry.identity(100, 100)), boxes)


def test_near_duplicates_are_grouped(tmp_path: Path) -> None:
    root = write_voc_dataset(tmp_path / "data", 6)
    images, anns = root / "images", root / "annotations"
    img = cv2.imread(str(images / "dent_0.jpg"), cv2.IMREAD_GRAYSCALE)
    cv2.imwrite(str(images / "dent_10.png"), cv2.add(img, 12))  # a brighter copy
    cv2.imwrite(str(images / "dent_12.png"), np.roll(img, (3, 5), axis=(0, 1)))  # a shifted copy
    for stem in ("dent_10", "dent_12"):
        (anns / f"{stem}.xml").write_text((anns / "dent_0.xml").read_text())
    samples = find_voc_samples(root)
    groups = near_duplicate_groups(samples)
    assert groups["images/dent_10.png"] == groups["images/dent_0.jpg"] != groups["images/dent_12.png"]
    assert len(set(groups.values())) == 7
    loose = near_duplicate_groups(samples, threshold=0.75)  # shifted, resampled and wrapped: NCC ~0.85
    assert loose["images/dent_12.png"] == loose["images/dent_0.jpg"] and len(set(loose.values())) == 6


@pytest.mark.parametrize("flip_h, flip_v, turns", [(0, 0, 0), (1, 0, 0), (0, 1, 0), (0, 0, 1), (1, 1, 3), (0, 1, 2)])
def test_augment_moves_boxes_with_the_image(flip_h, flip_v, turns) -> None:
    from export.train_detector import augment

    x = np.zeros((48, 48, 1), np.float32)
    box = np.array([[5, 10, 20, 40]], np.float32)
    x[10:40, 5:20] = 1
    y, b = augment(x, box, bool(flip_h), bool(flip_v), turns)
    ys, xs = np.nonzero(y[..., 0])
    np.testing.assert_array_equal(b[0], [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])


def test_zoom_crop_moves_boxes_with_the_image_and_never_cuts_a_defect_to_a_sliver() -> None:
    from export.train_detector import zoom_crop

    x = np.zeros((64, 64, 1), np.float32)
    boxes = np.array([[8, 8, 24, 24], [40, 36, 60, 62]], np.float32)
    for b in boxes.astype(int):
        x[b[1] : b[3], b[0] : b[2]] = 1
    labels = np.array([2, 5])
    seen = set()
    for seed in range(40):
        y, b, lab = zoom_crop(x, boxes, labels, np.random.default_rng(seed), min_side=0.5)
        assert y.shape == x.shape and y.dtype == x.dtype and len(b) == len(lab) >= 1
        seen.add(len(b))
        for box, k in zip(b, lab):
            assert k in (2, 5)
            # the box covers the bright block it was drawn on (resampling blurs the edges by a pixel)
            x1, y1, x2, y2 = np.round(box).astype(int)
            assert y[y1 + 1 : y2 - 1, x1 + 1 : x2 - 1].min() > 0.4
        # what the boxes leave out is dark: no defect lost its label
        outside = np.ones(y.shape[:2], bool)
        for x1, y1, x2, y2 in np.round(b).astype(int):
            outside[max(y1 - 2, 0) : y2 + 2, max(x1 - 2, 0) : x2 + 2] = False
        assert y[..., 0][outside].max() < 0.5
    assert seen == {1, 2}  # some crops drop a box entirely, others keep both
    same = zoom_crop(x, boxes, labels, np.random.default_rng(0), min_side=1.0)
    assert same[0] is x


@pytest.mark.slow
def test_encode_targets() -> None:
    from export.detector import encode_targets

    boxes = np.array([[0, 0, 64, 64], [8, 8, 24, 24], [40, 40, 43, 43]], np.float32)
    t = encode_targets(boxes, np.array([0, 1, 1]), 64, 64, 2)
    assert t.shape == (64, 2 + 6)  # one stride-8 level: the 8 x 8 cells row by row
    t = t.reshape(8, 8, 2 + 6)
    pos = t[..., -1] > 0
    # the small box owns the cells whose centres it holds (12 and 20: cells 1, 2); the tiny one its nearest cell
    assert t[1, 1, 1] == 1 and t[2, 2, 1] == 1 and t[5, 5, 1] == 1 and t[5, 5, 0] == 0
    assert pos.sum() == 64 and t[0, 0, 0] == 1
    np.testing.assert_array_equal(t[1, 1, 2:6], boxes[1])
    assert 0 < t[..., 6][pos].min() and t[..., 6].max() <= 1
    assert not encode_targets(np.zeros((0, 4)), np.zeros(0, int), 64, 64, 2).any()


@pytest.mark.slow
def test_encode_targets_assigns_boxes_to_levels_by_size() -> None:
    from export.detector import cell_grid, encode_targets, size_ranges

    assert size_ranges((8, 16, 32)) == [(0.0, 64.0), (64.0, 128.0), (128.0, np.inf)]
    assert size_ranges((8,)) == [(0.0, np.inf)]
    cx, cy, stride = cell_grid(128, 128, (8, 16, 32))
    assert cx.shape == (256 + 64 + 16,) and list(np.unique(stride)) == [8, 16, 32]
    assert (cx[256], cy[256], cx[257], cy[256 + 8]) == (8, 8, 24, 24)  # level 16 starts after the 16 x 16 cells

    # the whole input: every cell centre is 68-124 px from its farthest side → all of stride 16, nothing else;
    # a 32 px box: its 16 stride-8 cells (farthest side ≤ 28 px); a 2 px box holds no cell centre → nearest cell
    boxes = np.array([[0, 0, 128, 128], [8, 8, 40, 40], [100, 100, 102, 102]], np.float32)
    t = encode_targets(boxes, np.array([0, 1, 1]), 128, 128, 2, (8, 16, 32))
    assert t.shape == (336, 8)
    pos = t[:, -1] > 0
    big = pos & (t[:, 0] == 1)
    assert big.sum() == 64 and set(stride[big]) == {16}
    small = pos & (t[:, 1] == 1) & (t[:, 2] == 8)
    assert small.sum() == 16 and set(stride[small]) == {8}
    tiny = pos & (t[:, 2] == 100)
    assert tiny.sum() == 1 and stride[tiny] == 8 and (cx[tiny], cy[tiny]) == (100, 100)
    assert pos.sum() == 81 and not (pos & (stride == 32)).any()
    np.testing.assert_array_equal(t[big][0, 2:6], boxes[0])

    # centre sampling: of the whole-input box only the cells within 1.5 strides of its centre (64, 64):
    # the stride-16 centres 56 and 72 on each axis; the 32 px box keeps its 4 stride-8 cells within 12 px
    # of (24, 24); the 2 px box, which holds no cell centre, still takes its nearest cell
    c = encode_targets(boxes, np.array([0, 1, 1]), 128, 128, 2, (8, 16, 32), centre_radius=1.5)
    cpos = c[:, -1] > 0
    assert not (cpos & ~pos).any()  # a subset of the cells without sampling
    big = cpos & (c[:, 0] == 1)
    assert big.sum() == 4 and set(stride[big]) == {16} and set(cx[big]) == set(cy[big]) == {56, 72}
    small = cpos & (c[:, 2] == 8)
    assert small.sum() == 4 and set(cx[small]) == set(cy[small]) == {20, 28}
    assert (cpos & (c[:, 2] == 100)).sum() == 1 and cpos.sum() == 9

    from export.train_detector import check_strides

    assert check_strides([8, 16, 32]) == (8, 16, 32)
    for bad in ([16, 32], [8, 8], [8, 32, 16], [8, 64], []):
        with pytest.raises(ExportError, match="--levels"):
            check_strides(bad)


THREE_LEVELS = (8, 16, 32)


@pytest.fixture(scope="module")
def three_level_model():
    """A tiny three-level detector (64 x 96) after four steps of training towards an off-centre
    box and the whole input (positive cells on the stride-8 and stride-16 levels), so that its
    outputs depend on where things are: (model, inputs, targets, loss, the four losses). Shared
    by the decoding / export test and the test-time flip test, which only read it.
    The steps run eagerly: tracing Keras' training step costs more than these few steps."""
    import keras

    from export.detector import build_detector, encode_targets, make_loss

    keras.utils.set_random_seed(1)
    model = build_detector((64, 96, 1), 2, alpha=0.35, width=16, head_depth=1, strides=THREE_LEVELS)
    x = np.random.default_rng(1).normal(0, 0.5, (2, 64, 96, 1)).astype(np.float32)
    boxes = np.array([[4, 6, 40, 30], [0, 0, 96, 64]], np.float32)
    y = np.stack([encode_targets(boxes, np.array([1, 0]), 64, 96, 2, THREE_LEVELS)] * 2)
    loss = make_loss(2, 64, 96, strides=THREE_LEVELS)
    model.compile(optimizer=keras.optimizers.Adam(1e-2), loss=loss, run_eagerly=True)
    losses = [float(model.train_on_batch(x, y)) for _ in range(4)]
    return model, x, y, loss, losses


@pytest.fixture(scope="module")
def three_level_export(three_level_model, tmp_path_factory):
    """:func:`three_level_model` with the flip of both axes in its graph, exported once for the decoding
    test and the test-time flip test (each copy of the model in a graph costs its conversion as much
    as the model; a graph without flips is exported by :func:`tiny_det_run`): (graph, card, file)."""
    from export.detector import build_inference
    from export.onnx_export import export_model

    model, x, _, _, _ = three_level_model
    graph = build_inference(model, 2, score_threshold=0.001, strides=THREE_LEVELS, tta=("hv",))
    path = tmp_path_factory.mktemp("det3") / "det3.onnx"
    return graph, export_model(graph, _card((64, 96)), path, x), path


@pytest.mark.slow
def test_three_level_detector_decodes_each_level_and_exports(three_level_model, three_level_export) -> None:
    import tensorflow as tf

    from export.detector import DecodeNms, build_inference, cell_grid
    from station.infer import OnnxModel

    model, x, y, loss, losses = three_level_model
    assert model.output.shape[1:] == (96 + 24 + 6, 2 + 5)
    # a stride-16 cell's distances are in units of 16 px, a stride-32 cell's of 32 px
    cx, cy, stride = cell_grid(64, 64, (8, 16, 32))
    raw = np.full((1, 84, 7), -20.0, np.float32)
    raw[0, :, 2:6] = 0.0
    for cell in (64 + 5, 80 + 3):  # level 16, row 1 col 1 (centre 24, 24); level 32, row 1 col 1 (48, 48)
        raw[0, cell, 1] = raw[0, cell, 6] = 10.0
        raw[0, cell, 2:6] = np.log([0.5, 0.25, 0.75, 1.0])  # l t r b, × the cell's stride
    boxes, scores, classes, count = DecodeNms(64, 64, 2, 0.5, 0.5, 10, 10, (8, 16, 32))(raw)
    assert int(np.asarray(count)[0]) == 2 and set(np.asarray(classes)[0, :2].tolist()) == {1.0}
    got = sorted(np.asarray(boxes)[0, :2].tolist())
    want = sorted([[(y - 0.25 * s) / 64, (x - 0.5 * s) / 64, min(1.0, (y + s) / 64), min(1.0, (x + 0.75 * s) / 64)]
                   for x, y, s in ((cx[69], cy[69], 16), (cx[83], cy[83], 32))])
    np.testing.assert_allclose(got, want, atol=1e-6)

    # the targets are on two levels; their loss is finite and falls with training
    pos = y[0, :, -1] > 0
    assert set(cell_grid(64, 96, THREE_LEVELS)[2][pos]) == {8, 16}
    assert all(np.isfinite(losses)) and losses[-1] < losses[0]
    # the loss traces into a graph (as Keras' compiled training step runs it) to the eager value
    out = model(x, training=False)
    assert float(tf.function(lambda t, p: loss(t, p))(tf.constant(y), out)) == pytest.approx(float(loss(y, out)),
                                                                                            rel=1e-5)

    with pytest.raises(ExportError, match="cells"):
        build_inference(model, 2, strides=(8,))
    _, card, path = three_level_export
    assert card.export.parity["count_agreement"] == 1.0 and card.export.parity["detection_match"] > 0.99
    outs = OnnxModel(path, providers=("cpu",)).run(x[:1])
    assert outs["boxes"].shape == (1, 100, 4) and int(outs["count"][0]) > 0


@pytest.mark.slow
def test_iou_quality_target_is_the_predicted_box_iou() -> None:
    """``quality="iou"``: the quality logit learns the IoU of each positive cell's predicted
    box with its truth (no gradient into the box); "centreness" the cell's centre-ness."""
    import tensorflow as tf

    from export.detector import cell_grid, encode_targets, make_loss

    strides = (8, 16, 32)
    cx, cy, stride = cell_grid(64, 64, strides)
    y = encode_targets(np.array([[4, 4, 60, 60], [30, 30, 38, 38]], np.float32), np.array([0, 1]), 64, 64, 2,
                       strides)[None]
    pos = y[0, :, 7] > 0
    t = y[0, :, 2:6]  # the assigned truth box of each positive cell
    truth_d = np.stack([cx - t[:, 0], cy - t[:, 1], t[:, 2] - cx, t[:, 3] - cy], -1)
    z = np.where(pos, 3.0, -3.0).astype(np.float32)  # quality logits

    def raw(scale: float) -> np.ndarray:
        out = np.full((1, cx.size, 7), -20.0, np.float32)
        out[0, :, [0, 1]] = np.where(y[0, :, :2].T > 0, 20.0, -20.0)  # the right class, sure
        out[0, :, 2:6] = np.log(np.maximum(truth_d * scale, 1e-3) / stride[:, None])
        out[0, :, 6] = z
        return out

    def bce(logit, target):
        return np.maximum(logit, 0) - logit * target + np.log1p(np.exp(-np.abs(logit)))

    centre, iou = make_loss(2, 64, 64, strides=strides), make_loss(2, 64, 64, strides=strides, quality="iou")
    for scale in (1.0, 1.5):  # boxes 1.5 times the truth's distances: IoU 1/2.25 where no side is clipped
        d = truth_d[pos] * scale
        px1, py1, px2, py2 = cx[pos] - d[:, 0], cy[pos] - d[:, 1], cx[pos] + d[:, 2], cy[pos] + d[:, 3]
        tb = t[pos]
        inter = (np.clip(np.minimum(px2, tb[:, 2]) - np.maximum(px1, tb[:, 0]), 0, None)
                 * np.clip(np.minimum(py2, tb[:, 3]) - np.maximum(py1, tb[:, 1]), 0, None))
        union = (px2 - px1) * (py2 - py1) + (tb[:, 2] - tb[:, 0]) * (tb[:, 3] - tb[:, 1]) - inter
        want = (bce(z[pos], inter / union).sum() - bce(z[pos], y[0, pos, 6]).sum()) / pos.sum()
        got = float(iou(y, raw(scale))) - float(centre(y, raw(scale)))
        assert got == pytest.approx(want, rel=1e-4, abs=1e-5)
    assert (inter / union).max() < 0.5  # the scaled case did test IoUs below 1
    # the quality target carries no gradient into the box distances: only the box loss moves them
    r = tf.Variable(raw(1.5))
    with tf.GradientTape(persistent=True) as tape:
        gi, gc = iou(y, r), centre(y, r)
    d_iou, d_centre = tape.gradient(gi, r).numpy(), tape.gradient(gc, r).numpy()
    np.testing.assert_allclose(d_iou[..., 2:6], d_centre[..., 2:6], atol=1e-7)
    assert not np.allclose(d_iou[..., 6], d_centre[..., 6])
    with pytest.raises(ExportError, match="quality 'area'"):
        make_loss(2, 64, 64, quality="area")


@pytest.mark.slow
def test_test_time_flips_mirror_back_and_export(three_level_model, three_level_export) -> None:
    import keras

    from export.detector import FlipImage, UnflipCells, build_inference
    from station.infer import OnnxModel

    strides = THREE_LEVELS
    # trained a few steps towards an off-centre box: its outputs depend on where things are
    model, x, _, _, _ = three_level_model
    # a raw output of a mirrored image, mirrored back, is that of the image: each level's grid, and l↔r / t↔b
    raw = np.random.default_rng(2).normal(0, 1, (1, 8 * 12 + 4 * 6 + 2 * 3, 7)).astype(np.float32)
    level8 = raw[0, :96].reshape(8, 12, 7)
    for flip, mirrored in (("h", level8[:, ::-1][..., [0, 1, 4, 3, 2, 5, 6]]),
                           ("v", level8[::-1][..., [0, 1, 2, 5, 4, 3, 6]]),
                           ("hv", level8[::-1, ::-1][..., [0, 1, 4, 5, 2, 3, 6]])):
        back = np.asarray(UnflipCells(64, 96, 2, strides, flip)(raw))
        np.testing.assert_array_equal(back[0, :96].reshape(8, 12, 7), mirrored)
        np.testing.assert_array_equal(np.asarray(UnflipCells(64, 96, 2, strides, flip)(back)), raw)  # an involution
    # the averaged graph sees a mirrored image as the mirror of the image (its raw outputs, before NMS)
    infer = build_inference(model, 2, score_threshold=0.001, strides=strides, tta=("h", "v", "hv"))
    averaged = keras.Model(infer.input, infer.get_layer("tta_mean").output)

    def plain(t):
        return model(t, training=False)

    averaged_x, plain_x = np.asarray(averaged(x)), np.asarray(plain(x))
    for flip in ("h", "v", "hv"):
        mirrored_x = np.asarray(FlipImage(flip)(x))
        unflip = UnflipCells(64, 96, 2, strides, flip)
        np.testing.assert_allclose(np.asarray(unflip(averaged(mirrored_x))), averaged_x, atol=1e-4)
        # the model alone is not (so the check above can fail)
        assert np.abs(np.asarray(unflip(plain(mirrored_x))) - plain_x).max() > 1e-2
    # exported with the flip of both axes: ONNX Runtime finds what Keras does
    both, card, path = three_level_export
    assert card.export.parity["count_agreement"] == 1.0 and card.export.parity["detection_match"] > 0.99
    assert int(OnnxModel(path, providers=("cpu",)).run(x[:1])["count"][0]) == int(np.asarray(both(x[:1])[3])[0])
    with pytest.raises(ExportError, match="--tta h h"):
        build_inference(model, 2, strides=strides, tta=("h", "h"))


@pytest.fixture(scope="module")
def tiny_det_run(tmp_path_factory):
    from export.train_detector import DetTrainConfig, train

    root = tmp_path_factory.mktemp("tinydet")
    data = write_voc_dataset(root / "data", 12)
    # batch 9: the 9 training images make one (eager, slow) step an epoch
    cfg = DetTrainConfig(data_dir=data, out_dir=root / "run", size=(64, 64), alpha=0.35, width=16, head_depth=1,
                         epochs=2, batch=9, seed=3, val_fraction=0.25, score_threshold=0.001, name="tinydet",
                         eager=True, parity_count=3, crop_min=0.6, jitter=0.1, keep="last")
    return cfg, train(cfg)


@pytest.mark.slow
def test_detector_export_round_trip(tiny_det_run, tmp_path: Path, monkeypatch) -> None:
    from dataclasses import replace

    import onnx

    import export.onnx_export
    from export.onnx_export import io_mismatches, read_card
    from export.train_detector import train
    from station.cli import main
    from station.imageio import read_image
    from station.infer import OnnxModel
    from station.preprocess import preprocess, to_tensor

    cfg, result = tiny_det_run
    card = read_card(result.onnx_path)
    assert card == result.card and card.task == "detection" and card.classes == list(CLASSES)
    assert card.output.boxes == "boxes" and card.output.score_threshold == 0.001
    assert "--tta" not in card.training.command and "test-time flips" not in card.training.evaluated_by
    model = onnx.load(str(result.onnx_path))
    assert io_mismatches(model, card) == [] and card.export.opset <= 18 and model.ir_version <= 10
    assert {"NonMaxSuppression"} <= {n.op_type for n in model.graph.node}
    parity = card.export.parity
    assert parity["n"] == 3 and parity["count_agreement"] == 1.0 and parity["detection_match"] > 0.99
    t = card.training
    assert t.epochs == 2 and t.seed == 3 and {"val_ap50", "val_map"} <= set(t.figures)
    assert t.figures["kept_epoch"] == 2 and "last epoch" in t.evaluated_by  # --keep last
    assert t.command.startswith("python -m export.train_detector ") and "by group" in t.split
    assert "--crop-min 0.6 --jitter 0.1" in t.command and "--keep last" in t.command

    onnx_model = OnnxModel(result.onnx_path, providers=("cpu",))
    assert onnx_model.card.task == "detection"
    image = read_image(next((cfg.data_dir / "images").glob("*.jpg")))
    x, _ = preprocess(image, onnx_model.card)
    outs = onnx_model.run(to_tensor(x, onnx_model.card.input))
    assert outs["boxes"].shape == (1, 100, 4) and outs["count"].shape == (1,)

    out = tmp_path / "replay.jsonl"
    assert main(["replay", str(cfg.data_dir / "images"), "--det-model", str(result.onnx_path), "--out", str(out),
                 "-q"]) == 0
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(records) == 12
    defects = [d for r in records for d in r["defects"]]
    assert defects and {d["kind"] for d in defects} == {"detection"} and {d["class"] for d in defects} <= set(CLASSES)
    assert all(0 <= d["bbox"][0] <= d["bbox"][2] <= 100 and 0 <= d["bbox"][1] <= d["bbox"][3] <= 80 for d in defects)

    report = tmp_path / "eval.json"
    assert main(["eval", str(cfg.out_dir / "val" / "images"), "--det-model", str(result.onnx_path), "--json",
                 str(report), "-q"]) == 0
    det = json.loads(report.read_text())["detection"]
    assert det["images"] == 3 and det["detections"] > 0 and 0.0 <= det["ap50"] <= 1.0

    with (cfg.out_dir / "history.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["epoch", "loss", "val_ap50", "val_map", "lr", "seconds"] and len(rows) == 2
    assert (cfg.out_dir / "curves.png").stat().st_size > 0
    assert (cfg.out_dir / "best.weights.h5").is_file() and (cfg.out_dir / "last.weights.h5").is_file()
    split = json.loads((cfg.out_dir / "split.json").read_text())
    assert len(split["val"]) == 3 and not set(split["val"]) & set(split["train"])

    # The run's weights with the left-right flip in the graph: the card's command and figures say so
    # (the graph's conversion left out here: a graph with flips is three_level_export's).
    monkeypatch.setattr(export.onnx_export, "export_model", lambda model, card, path, parity, opset=None: card)
    flipped = train(replace(cfg, out_dir=tmp_path / "flipped", tta=("h",),
                            export_from=cfg.out_dir / "last.weights.h5")).card.training
    assert "--tta h" in flipped.command and "test-time flips h in the graph" in flipped.evaluated_by


def test_neu_det_recipe_is_the_command_on_its_card(tmp_path: Path) -> None:
    from export.neu_det import recipe
    from export.train_detector import build_parser, config_from_args

    weights = tmp_path / "imagenet.weights.h5"
    with pytest.raises(ExportError, match="no such file"):
        recipe(Path("/data/neu_det"), Path("runs/x"), weights)
    weights.write_bytes(b"")  # recipe() only checks that it is there
    cfg = recipe(Path("/data/neu_det"), Path("runs/x"), weights)
    assert cfg.keep == "last" and cfg.crop_min < 1 and cfg.jitter > 0 and cfg.seed == 0 and cfg.weights == weights
    head, equivalent = cfg.command.split("   # = ")
    assert head == f"python -m export.neu_det train --data /data/neu_det --weights {weights} --run runs/x"
    # the train_detector command on the card rebuilds the very same configuration
    argv = shlex.split(equivalent)[3:]
    again = config_from_args(build_parser().parse_args(argv), cfg.command)
    assert again == cfg
    assert {"--quality", "--centre-radius", "--box-weight", "--nms-iou", "--tta"} <= set(argv)
    # so does a command with those options at their defaults (left off the command line)
    from dataclasses import replace

    from export.train_detector import command_of

    trial = replace(cfg, quality="centreness", centre_radius=None, box_weight=1.0, tta=(), command="")
    argv = shlex.split(command_of(trial))[3:]
    assert not {"--quality", "--centre-radius", "--box-weight", "--tta"} & set(argv)
    assert config_from_args(build_parser().parse_args(argv), "") == trial
    from export.train_detector import _check

    for bad, flag in ((dict(centre_radius=0.0), "--centre-radius 0.0"), (dict(box_weight=-1.0), "--box-weight -1.0")):
        with pytest.raises(ExportError, match=flag):
            _check(replace(cfg, **bad))


@pytest.mark.slow
def test_neu_det_eval_writes_reports_and_card_figures(tiny_det_run, tmp_path: Path, caplog) -> None:
    from export.neu_det import main
    from export.onnx_export import read_card

    cfg, result = tiny_det_run
    model = tmp_path / "det.onnx"
    shutil.copyfile(result.onnx_path, model)
    report, png = tmp_path / "eval.json", tmp_path / "eval.png"
    split = cfg.out_dir / "split.json"  # what `train` copies beside the shipped model
    assert main(["eval", "--data", str(cfg.data_dir), "--split", str(split), "--model", str(model), "--json",
                 str(report), "--report", str(png)]) == 0
    det = json.loads(report.read_text())["detection"]
    assert png.stat().st_size > 0 and det["images"] == 3
    t = read_card(model).training
    assert t.figures["eval_ap50"] == round(det["ap50"], 4) and t.figures["eval_images"] == 3
    assert t.figures["val_ap50"] == result.card.training.figures["val_ap50"]  # training figures kept
    assert f"python -m export.neu_det eval --data {cfg.data_dir} --split {split}" in t.evaluated_by
    # clear errors: no split file; a split naming images the data folder does not hold
    assert main(["eval", "--data", str(cfg.data_dir), "--split", str(tmp_path / "none.json"), "--model", str(model)]) == 2
    assert "split file" in caplog.text and "none.json: cannot read" in caplog.text
    assert main(["eval", "--data", str(tmp_path), "--split", str(split), "--model", str(model)]) == 2
    assert f"{split}: 3 of its 3 val images are not under {tmp_path}" in caplog.text


def _save_recipe_weights(path: Path, backbone: Path) -> None:
    """Random weights of the shipped recipe's detector (its backbone loaded from ``backbone``),
    saved as a run's weights file."""
    import keras

    from export.detector import build_detector
    from export.neu_det import RECIPE

    keras.utils.set_random_seed(0)
    size = RECIPE["size"]
    model = build_detector((size[0], size[1], 1), len(CLASSES), alpha=RECIPE["alpha"], width=RECIPE["width"],
                           head_depth=RECIPE["head_depth"], strides=RECIPE["levels"], weights=backbone)
    model.save_weights(path)


# The shipped recipe's network at the tiny sizes of the other tests: the commands' wiring (the
# recipe's flips, NMS and card) is what these tests check, and the full-size graph costs its
# conversion many times over.
SMALL_RECIPE = {"size": (64, 64), "alpha": 0.35, "width": 16, "head_depth": 1}


@pytest.fixture
def small_recipe(monkeypatch) -> None:
    from export.neu_det import RECIPE

    for key, value in SMALL_RECIPE.items():
        monkeypatch.setitem(RECIPE, key, value)


@pytest.fixture(scope="module")
def backbone_weights(tmp_path_factory) -> Path:
    """A MobileNetV2 no-top weights file of the (small) recipe's width, as the ImageNet file is laid
    out (random values: made here, never the file in ../shared)."""
    import keras

    keras.utils.set_random_seed(1)
    path = tmp_path_factory.mktemp("backbone") / "mobilenet_v2_no_top.weights.h5"
    keras.applications.MobileNetV2(input_shape=(96, 96, 3), alpha=SMALL_RECIPE["alpha"], include_top=False,
                                   weights=None).save_weights(path)
    return path


@pytest.fixture(scope="module")
def recipe_weights(tmp_path_factory, backbone_weights) -> Path:
    """:func:`_save_recipe_weights` of the small recipe once, for the tests of the commands that
    read a run's weights."""
    from export.neu_det import RECIPE

    path = tmp_path_factory.mktemp("recipe") / "last.weights.h5"
    with pytest.MonkeyPatch.context() as patch:
        for key, value in SMALL_RECIPE.items():
            patch.setitem(RECIPE, key, value)
        _save_recipe_weights(path, backbone_weights)
    return path


@pytest.mark.slow
def test_neu_det_export_ships_a_runs_last_weights_under_the_recipe(small_recipe, recipe_weights, backbone_weights,
                                                                  tmp_path: Path, monkeypatch, caplog) -> None:
    """`python -m export.neu_det export`: no training; the run's last weights in the recipe's
    graph (its test-time flips, its NMS), copied to models/ with the recipe's train command on
    the card."""
    from export.neu_det import MODEL_PATH, RECIPE, SPLIT_PATH, main
    from export.onnx_export import read_card

    data = write_voc_dataset(tmp_path / "data", 12)
    run = tmp_path / "run"
    run.mkdir()
    monkeypatch.chdir(tmp_path)
    args = ["export", "--data", str(data), "--weights", str(backbone_weights), "--run", str(run)]
    assert main(args) == 2
    assert f"{run / 'last.weights.h5'}: no weights; train first" in caplog.text
    shutil.copyfile(recipe_weights, run / "last.weights.h5")
    assert main(args) == 0
    card = read_card(tmp_path / MODEL_PATH)
    assert card.training.command.startswith(
        f"python -m export.neu_det train --data {data} --weights {backbone_weights} --run {run}")
    assert f"--tta {' '.join(RECIPE['tta'])}" in card.training.command
    assert f"test-time flips {'/'.join(RECIPE['tta'])} in the graph" in card.training.evaluated_by
    assert (tmp_path / SPLIT_PATH).is_file()


@pytest.mark.slow
def test_neu_det_tta_compares_flip_sets_on_the_training_side(small_recipe, recipe_weights, backbone_weights,
                                                            tmp_path: Path, caplog) -> None:
    """`python -m export.neu_det tta`: the recipe's model with a run's last weights, each flip set
    of TTA_CHOICES scored on the split's training images (never its validation ones)."""
    import logging

    from export.data import write_split_file
    from export.neu_det import TTA_CHOICES, main

    caplog.set_level(logging.INFO)
    data = write_voc_dataset(tmp_path / "data", 12)
    keys = sorted(p.relative_to(data).as_posix() for p in (data / "images").iterdir())
    split = tmp_path / "split.json"
    write_split_file(split, "test", keys[:8], keys[8:])
    run = tmp_path / "run"
    run.mkdir()
    args = ["tta", "--data", str(data), "--weights", str(backbone_weights), "--run", str(run), "--split", str(split)]
    assert main(args) == 2
    assert f"{run / 'last.weights.h5'}: no weights; train first" in caplog.text
    shutil.copyfile(recipe_weights, run / "last.weights.h5")
    caplog.clear()
    assert main(args) == 0
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("training split")]
    assert [line.split("flips ")[1].split(":")[0].strip() for line in lines] == \
        ["/".join(f) or "none" for f in TTA_CHOICES]
    assert all("training split (8 images)" in line for line in lines)

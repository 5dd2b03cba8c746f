"""export.quantize and export.subpixel: INT8 copies of models made by export/, opened and run
by station as the float ones are, their cards saying where they came from; station bench
--compare timing a float model set against its INT8 copy.

The segmentation model is the bundled demo U-Net (export.make_demo), calibrated and judged on
synthetic plates (export.synth); the detector is the shipped NEU-DET model on real NEU-DET
images (skipped without ../shared/data)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from conftest import ROOT, shared_data
from onnx import TensorProto, helper, numpy_helper

from export import synth
from export.onnx_export import card_of, embed_card, save_model
from export.quantize import (
    QuantOptions,
    balanced_sample,
    calibration_tensors,
    is_qdq_int8,
    main,
    prepare_float,
    quantize_model,
)
from export.subpixel import subpixel_conv_transpose
from station.config import load_config
from station.imageio import read_image
from station.infer import OnnxModel, sha256_file
from station.inspector import Inspector
from station.types import Frame

DEMO = ROOT / "station" / "assets" / "demo_seg.onnx"
DETECTOR = ROOT / "models" / "neu_det_detector.onnx"
DET_SPLIT = ROOT / "models" / "neu_det_detector.split.json"


@pytest.fixture(scope="module")
def plates(tmp_path_factory) -> Path:
    """24 synthetic plates with masks and a groups file, in the magnetic-tile layout."""
    root = tmp_path_factory.mktemp("plates") / "data"
    synth.write_dataset(root, 24, seed=3, size=(96, 128))
    return root


@pytest.fixture(scope="module")
def demo_int8(plates, tmp_path_factory) -> tuple[Path, Path]:
    """The demo U-Net quantised by the command: (INT8 model, JSON report)."""
    out = tmp_path_factory.mktemp("int8") / "demo.int8.onnx"
    assert main([str(DEMO), "--data", str(plates), "--groups", str(plates / synth.GROUPS_FILE), "--calibration", "8",
                 "-o", str(out), "-q"]) == 0
    return out, out.with_suffix(".json")


def test_the_int8_copy_is_qdq_with_a_card_naming_its_source_and_calibration(demo_int8, plates):
    out, report_path = demo_int8
    model = onnx.load(str(out))
    assert is_qdq_int8(model)
    ops = {n.op_type for n in model.graph.node}
    assert "ConvTranspose" not in ops and "DepthToSpace" in ops  # rewritten so that it runs in INT8
    card, float_card = card_of(model), card_of(onnx.load(str(DEMO)))
    q = card.quantization
    assert q is not None and card.version == f"{float_card.version}+int8"
    assert card.input == float_card.input and card.preprocess == float_card.preprocess
    assert q.source_sha256 == sha256_file(DEMO) and DEMO.name in q.source and float_card.name in q.source
    assert q.calibration_images == 8 and str(plates) in q.calibration_data and "MinMax" in q.calibration
    assert "QDQ" in q.method and q.command.startswith(f"python -m export.quantize {DEMO} --data {plates}")
    for key in ("iou", "escapes", "false_rejects"):
        assert {f"fp32_{key}", f"int8_{key}", f"delta_{key}"} <= set(q.figures)
    assert q.figures["delta_iou"] == pytest.approx(q.figures["int8_iou"] - q.figures["fp32_iou"], abs=2e-4)
    report = json.loads(report_path.read_text())
    assert report["quantization"] == q.model_dump(mode="json") and report["output"]["sha256"] == sha256_file(out)
    assert len(report["calibration_images"]) == 8 and report["fp32"]["counts"]["evaluated"] > 0
    assert set(report["targets"]) == {"|Δ iou| <= 0.01", "Δ escapes <= 1"}
    # calibration images and evaluated images are different plates (groups)
    groups = json.loads((plates / synth.GROUPS_FILE).read_text())
    group = lambda p: groups[Path(p).relative_to(plates).as_posix()]  # noqa: E731
    assert report["evaluation_images"] and len(report["evaluation_images"]) == report["fp32"]["counts"]["evaluated"]
    assert not {group(p) for p in report["evaluation_images"]} & {group(p) for p in report["calibration_images"]}


def _inspect(model: Path, images: list[Path]) -> list:
    cfg = load_config(None)
    inspector = Inspector({"segmentation" if card_of(onnx.load(str(model))).task == "segmentation" else "detection":
                           OnnxModel(model, providers=("cpu",))}, cfg, keep_mask=True)
    return [inspector.inspect(Frame(read_image(p), str(p))) for p in images]


def test_the_int8_masks_agree_with_the_float_ones_in_the_inspector(demo_int8, plates):
    images = sorted(plates.rglob("*.jpg"))[:6]
    for a, b in zip(_inspect(DEMO, images), _inspect(demo_int8[0], images)):
        assert a.mask.shape == b.mask.shape
        disagree = np.count_nonzero(a.mask != b.mask)
        assert disagree <= max(20, 0.1 * max(np.count_nonzero(a.mask), 1)), (a.source, disagree)
        assert a.decision.grade == b.decision.grade or abs(a.defect_area_pct - b.defect_area_pct) < 0.2


def test_the_int8_detector_finds_the_float_ones_boxes(tmp_path):
    """The shipped detector quantised on a few real NEU-DET training images: on validation
    images its confident boxes are the float model's (same class, IoU ≥ 0.5)."""
    data = shared_data("neu_det")
    split = json.loads(DET_SPLIT.read_text())
    model = onnx.load(str(DETECTOR))
    card = card_of(model)
    tensors = calibration_tensors(balanced_sample([data / k for k in split["train"]], 6, 0), card)
    prepared = prepare_float(model, tmp_path, tensors, card)
    quantize_model(prepared.path, tmp_path / "int8.onnx", tensors, card.input.name, QuantOptions())
    int8 = onnx.load(str(tmp_path / "int8.onnx"))
    assert is_qdq_int8(int8) and "NonMaxSuppression" in {n.op_type for n in int8.graph.node}
    embed_card(int8, card)
    path = save_model(int8, tmp_path / "det.int8.onnx")
    images = [data / k for k in split["val"][::72]]
    found = matched = 0
    for a, b in zip(_inspect(DETECTOR, images), _inspect(path, images)):
        keep_a, keep_b = a.defects.confidence >= 0.3, b.defects.confidence >= 0.2
        for box, cls in zip(a.defects.xyxy[keep_a], a.defects.class_name[keep_a]):
            found += 1
            same = b.defects.xyxy[keep_b][b.defects.class_name[keep_b] == cls]
            matched += bool(len(same)) and _iou(box, same).max() >= 0.5
    assert found and matched >= 0.8 * found, (matched, found)


def _iou(box: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    x1, y1 = np.maximum(box[0], boxes[:, 0]), np.maximum(box[1], boxes[:, 1])
    x2, y2 = np.minimum(box[2], boxes[:, 2]), np.minimum(box[3], boxes[:, 3])
    inter = np.clip(x2 - x1, 0, None) * np.clip(y2 - y1, 0, None)
    area = lambda b: (b[..., 2] - b[..., 0]) * (b[..., 3] - b[..., 1])  # noqa: E731
    return inter / (area(box) + area(boxes) - inter)


@pytest.mark.parametrize("name, config", [("magnetic_tile_unet", "config/magnetic_tile.int8.yaml"),
                                          ("neu_det_detector", "config/bench-int8.yaml")])
def test_each_shipped_int8_model_is_small_loads_and_was_made_from_the_shipped_float_model(name, config):
    from station.inspector import open_models

    int8, source = ROOT / "models" / f"{name}.int8.onnx", ROOT / "models" / f"{name}.onnx"
    assert int8.stat().st_size <= 30 * 2**20
    card = card_of(onnx.load(str(int8)))
    assert card.quantization is not None and is_qdq_int8(onnx.load(str(int8)))
    assert card.quantization.source_sha256 == sha256_file(source), (
        f"{int8} was made from another {source.name}: run {card.quantization.command}")
    cfg = load_config(ROOT / config)
    models = open_models(cfg)
    assert int8.resolve() in [m.path.resolve() for m in models.values()]
    Inspector(models, cfg).warm_up(parts=1)


# --- the sub-pixel rewrite -----------------------------------------------------


def _conv_transpose_graph(rng, cin, cout, k, s, pads, out_pad, bias, after) -> onnx.ModelProto:
    """x (1, cin, 7, 9) → ConvTranspose → the nodes named in ``after`` (Slice [1:-1] / Mul /
    Add per channel / Relu) → y."""
    inits = [numpy_helper.from_array(rng.normal(0, 0.5, (cin, cout, k, k)).astype(np.float32), "w")]
    inputs = ["x", "w"]
    if bias:
        inits.append(numpy_helper.from_array(rng.normal(0, 0.5, cout).astype(np.float32), "b"))
        inputs.append("b")
    nodes = [helper.make_node("ConvTranspose", inputs, ["t0"], strides=[s, s], pads=pads, output_padding=out_pad)]
    for i, op in enumerate(after):
        src, dst = f"t{i}", f"t{i + 1}"
        if op == "Slice":
            for name, v in (("st", [1, 1]), ("en", [-1, -1]), ("ax", [2, 3])):
                inits.append(numpy_helper.from_array(np.asarray(v, np.int64), name))
            nodes.append(helper.make_node("Slice", [src, "st", "en", "ax"], [dst]))
        elif op in ("Mul", "Add"):
            inits.append(numpy_helper.from_array(rng.normal(1, 0.3, (1, cout, 1, 1)).astype(np.float32), f"c{i}"))
            nodes.append(helper.make_node(op, [src, f"c{i}"], [dst]))
        else:
            nodes.append(helper.make_node(op, [src], [dst]))
    nodes.append(helper.make_node("Identity", [f"t{len(after)}"], ["y"]))
    graph = helper.make_graph(nodes, "ct", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, cin, 7, 9])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", "c", "h", "w"])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)


@pytest.mark.parametrize("k, s, pads, out_pad, bias, after, rewritten", [
    (3, 2, [0, 0, 0, 0], [0, 0], False, ("Slice", "Mul", "Add", "Relu"), 1),  # Keras 'same' + BatchNorm + ReLU
    (3, 2, [0, 0, 1, 1], [0, 0], True, (), 1),
    (3, 2, [1, 1, 1, 1], [1, 1], True, ("Relu",), 1),
    (4, 2, [1, 1, 1, 1], [0, 0], True, ("Add", "Relu"), 1),
    (2, 2, [0, 0, 0, 0], [0, 0], False, ("Mul",), 1),
    (5, 2, [2, 1, 2, 1], [0, 0], True, ("Slice",), 1),
    (3, 3, [0, 0, 0, 0], [0, 0], True, (), 1),
    (3, 3, [0, 0, 0, 0], [1, 1], False, (), 0),  # output padding past the phases: left as it is
    (3, 1, [1, 1, 1, 1], [0, 0], False, (), 0),  # stride 1: an ordinary convolution already
])
def test_the_sub_pixel_rewrite_gives_the_transposed_convolutions_values(k, s, pads, out_pad, bias, after, rewritten):
    rng = np.random.default_rng(k * 10 + s)
    model = _conv_transpose_graph(rng, 3, 4, k, s, pads, out_pad, bias, after)
    onnx.checker.check_model(model)
    new = onnx.ModelProto()
    new.CopyFrom(model)
    assert subpixel_conv_transpose(new) == rewritten
    onnx.checker.check_model(new)
    ops = [n.op_type for n in new.graph.node]
    assert ("ConvTranspose" in ops) == (not rewritten)
    if rewritten:  # what followed it is folded in: no Mul or Add left, the Relu before DepthToSpace
        assert not {"Mul", "Add"} & set(ops) and ops.index("DepthToSpace") > ops.index("Conv")
        assert "Relu" not in ops or ops.index("Relu") < ops.index("DepthToSpace")
    x = rng.normal(0, 1, (1, 3, 7, 9)).astype(np.float32)
    want, got = (ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
                 for m in (model, new))
    assert got.shape == want.shape and np.abs(got - want).max() < 1e-5


def test_the_demo_u_nets_rewrite_keeps_its_masks():
    model = onnx.load(str(DEMO))
    new = onnx.ModelProto()
    new.CopyFrom(model)
    assert subpixel_conv_transpose(new) == sum(n.op_type == "ConvTranspose" for n in model.graph.node) > 0
    card = card_of(model)
    x = np.random.default_rng(0).uniform(-1, 1, card.input.shape()).astype(np.float32)
    want, got = (ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(
        ["mask"], {"image": x})[0] for m in (model, new))
    assert np.abs(got - want).max() < 1e-4


# --- choosing images, bad inputs ------------------------------------------------------


def test_the_calibration_sample_is_balanced_over_classes_and_seeded():
    paths = [Path(f"{c}/{i}.jpg") for c, n in (("A", 30), ("B", 4), ("C", 10)) for i in range(n)]
    pick = balanced_sample(paths, 12, seed=1, key=lambda p: p.parent.name)
    counts = {c: sum(p.parent.name == c for p in pick) for c in "ABC"}
    assert counts == {"A": 4, "B": 4, "C": 4} and len(set(pick)) == 12
    assert pick == balanced_sample(paths, 12, seed=1, key=lambda p: p.parent.name)
    assert pick != balanced_sample(paths, 12, seed=2, key=lambda p: p.parent.name)
    assert len(balanced_sample(paths, 100, seed=1, key=lambda p: p.parent.name)) == 44
    uneven = balanced_sample(paths, 20, seed=1, key=lambda p: p.parent.name)  # B runs out: the others share
    assert sum(p.parent.name == "B" for p in uneven) == 4 and len(uneven) == 20


def test_bad_inputs_are_refused_naming_what_was_wrong(tmp_path, plates, caplog):
    empty = tmp_path / "empty"
    empty.mkdir()
    (tmp_path / "notes.txt").write_text("no model")
    cases = [
        ([str(tmp_path / "missing.onnx"), "--data", str(plates)], "missing.onnx: no such model file"),
        ([str(DEMO), "--data", str(empty)], f"{empty}: no image with a .png mask found"),
        ([str(DEMO), "--data", str(tmp_path / "nowhere")], "--data"),
        ([str(tmp_path / "notes.txt"), "--data", str(plates)], "notes.txt: not an ONNX model"),
        ([str(DEMO), "--data", str(plates), "--calibration", "0"], "--calibration 0"),
        ([str(DEMO), "--data", str(empty), "--split", str(tmp_path / "split.json")], "split.json"),
    ]
    for argv, message in cases:
        caplog.clear()
        assert main([*argv, "-o", str(tmp_path / "out.onnx"), "-q"]) == 2, argv
        assert message in caplog.text, (argv, caplog.text)
        assert not (tmp_path / "out.onnx").exists()


def test_an_int8_model_is_not_quantised_again(demo_int8, plates, tmp_path, caplog):
    assert main([str(demo_int8[0]), "--data", str(plates), "-o", str(tmp_path / "again.onnx"), "-q"]) == 2
    assert "already an INT8 model" in caplog.text


# --- station bench --compare -------------------------------------------------------------


def test_bench_compare_times_both_model_sets_interleaved(demo_int8, tmp_path, capsys):
    from station.cli import main as station

    shutil.copy(DEMO, tmp_path / "demo.onnx")
    for name, model in (("float.yaml", tmp_path / "demo.onnx"), ("int8.yaml", demo_int8[0])):
        (tmp_path / name).write_text(f"models: {{segmentation: {model}}}\ninference: {{providers: [cpu]}}\n")
    out = tmp_path / "compare.json"
    assert station(["bench", "-c", str(tmp_path / "float.yaml"), "--compare", str(tmp_path / "int8.yaml"),
                    "--frames", "200", "--size", "96", "128", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    a, b = (report["configs"][str(tmp_path / n)] for n in ("float.yaml", "int8.yaml"))
    assert a["runs"] == b["runs"] == 50 and report["rounds"] == 10
    assert a["models"]["segmentation"]["sha256"] == sha256_file(DEMO)
    assert b["models"]["segmentation"]["version"].endswith("+int8")
    ratio = report["ratios"]["models"]["segmentation"]
    assert ratio == pytest.approx(a["models"]["segmentation"]["median_ms"] / b["models"]["segmentation"]["median_ms"])
    assert report["ratios"]["fps"] == pytest.approx(b["fps"] / a["fps"])
    printed = capsys.readouterr().out
    assert "segmentation" in printed and "frames/s" in printed and f"{ratio:.2f}×" in printed
    assert station(["bench", "-c", str(tmp_path / "float.yaml"), "--compare", str(tmp_path / "float.yaml")]) == 2


# --- cross-layer equalisation --------------------------------------------------------


def _conv_pair_graph(rng, act: str | None, depthwise: bool, shared: bool = False) -> onnx.ModelProto:
    """x (1, 3, 8, 8) → Conv A (6 channels, ranges 1 to 1/100) → act → Conv B (ordinary or
    depthwise) → y; ``shared``: A's weights are read by a second Conv as well."""
    spread = np.array([1.0, 0.01, 0.1, 1.0, 0.05, 0.5], np.float32)
    wa = rng.normal(0, 1, (6, 3, 3, 3)).astype(np.float32) * spread[:, None, None, None]
    wb = rng.normal(0, 1, (6, 1, 3, 3) if depthwise else (4, 6, 3, 3)).astype(np.float32)
    inits = [numpy_helper.from_array(v, n) for v, n in ((wa, "wa"), (0.1 * spread, "ba"), (wb, "wb"),
                                                         (np.zeros(len(wb), np.float32), "bb"))]
    nodes = [helper.make_node("Conv", ["x", "wa", "ba"], ["a"], pads=[1, 1, 1, 1])]
    src = "a"
    if act == "Relu":
        nodes.append(helper.make_node("Relu", ["a"], ["r"]))
        src = "r"
    elif act == "Clip":
        inits += [numpy_helper.from_array(np.float32(0), "lo"), numpy_helper.from_array(np.float32(6), "hi")]
        nodes.append(helper.make_node("Clip", ["a", "lo", "hi"], ["r"]))
        src = "r"
    nodes.append(helper.make_node("Conv", [src, "wb", "bb"], ["y"], pads=[1, 1, 1, 1], group=6 if depthwise else 1))
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)]
    if shared:
        nodes.append(helper.make_node("Conv", ["x", "wa", "ba"], ["z"], pads=[1, 1, 1, 1]))
        outputs.append(helper.make_tensor_value_info("z", TensorProto.FLOAT, None))
    graph = helper.make_graph(nodes, "pair", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
                              outputs, inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)


@pytest.mark.parametrize("act", [None, "Relu", "Clip"])
@pytest.mark.parametrize("depthwise", [False, True])
def test_equalisation_keeps_the_outputs_and_evens_the_channels(act, depthwise):
    from export.equalize import channel_ranges, equalize

    rng = np.random.default_rng(7)
    model = _conv_pair_graph(rng, act, depthwise)
    feeds = [{"x": rng.normal(0, 1, (1, 3, 8, 8)).astype(np.float32)} for _ in range(4)]
    new = onnx.ModelProto()
    new.CopyFrom(model)
    assert equalize(new, feeds) == 1
    tensor = "a" if act is None else "r"
    before, after = (channel_ranges(m, [tensor], feeds)[tensor] for m in (model, new))
    assert after.max() / after.min() < 0.5 * before.max() / before.min()  # the small channels were raised
    for feed in feeds:
        want, got = (ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(["y"], feed)[0]
                     for m in (model, new))
        assert np.abs(got - want).max() < 1e-4 * np.abs(want).max()


def test_equalisation_leaves_weights_that_another_node_reads():
    from export.equalize import equalize

    rng = np.random.default_rng(8)
    model = _conv_pair_graph(rng, "Relu", False, shared=True)
    before = model.SerializeToString()
    assert equalize(model, [{"x": rng.normal(0, 1, (1, 3, 8, 8)).astype(np.float32)}]) == 0
    assert model.SerializeToString() == before

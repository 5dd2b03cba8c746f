"""station eval: the pure metrics as tables, VOC parsing, truth discovery, and
the command end to end on synthetic data whose figures are known by
construction, on real magnetic-tile images, and on VOC boxes for AP."""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from station import cli
from station.config import ClassRule, GradingConfig, Thresholds
from station.errors import InputError, StationError
from station.evaluate import (
    BoxTable,
    add_eval_parser,
    check_box_classes,
    coco_detection_metrics,
    confusion_matrix,
    discover,
    grade_agreement,
    grade_index,
    grades_per_class,
    iou_distribution,
    overlap_scores,
    parse_voc,
    per_class_summary,
    pixel_counts,
    segmentation_summary,
    spread,
    true_grade,
    truth_mask_defects,
)
from station.types import Grade

NAN = float("nan")


def _subcommands(parser: argparse.ArgumentParser) -> argparse._SubParsersAction:
    return next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))


def eval_is_wired() -> bool:
    return "eval" in _subcommands(cli.build_parser()).choices


def run_eval(*argv: str) -> int:
    """``station eval ARGV`` through cli.main once cli.py wires it; until then
    the same parser plus add_eval_parser, with cli.main's error edge."""
    argv = ("eval", *map(str, argv))
    if eval_is_wired():
        return cli.main(list(argv))
    parser = cli.build_parser()
    add_eval_parser(_subcommands(parser))
    args = parser.parse_args(list(argv))
    try:
        return args.func(args)
    except StationError as exc:
        print(f"station: error: {exc}", file=sys.stderr)
        return cli.EXIT_USAGE


def same(got, want) -> bool:
    if isinstance(want, float) and math.isnan(want):
        return got is None or (isinstance(got, float) and math.isnan(got))
    return got == pytest.approx(want)


def mask(shape, *rects) -> np.ndarray:
    """A bool mask with the given [y0:y1, x0:x1] rectangles set."""
    m = np.zeros(shape, bool)
    for y0, y1, x0, x1 in rects:
        m[y0:y1, x0:x1] = True
    return m


def write(path: Path, image: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    ok, buf = cv2.imencode(path.suffix, image)
    assert ok
    path.write_bytes(buf.tobytes())
    return path


# --- pure metrics --------------------------------------------------------------------


PIXEL_CASES = [
    # name,             truth,                         prediction,                                  (tp, fp, fn), iou, precision, recall, dice
    ("both empty",      mask((4, 4)),                  mask((4, 4)),                                (0, 0, 0), NAN, NAN, NAN, NAN),
    ("false alarm",     mask((4, 4)),                  mask((4, 4), (0, 1, 0, 2)),                  (0, 2, 0), 0.0, 0.0, NAN, 0.0),
    ("missed",          mask((4, 4), (0, 1, 0, 2)),    mask((4, 4)),                                (0, 0, 2), 0.0, NAN, 0.0, 0.0),
    ("exact",           mask((4, 4), (1, 2, 0, 3)),    mask((4, 4), (1, 2, 0, 3)),                  (3, 0, 0), 1.0, 1.0, 1.0, 1.0),
    ("half shifted",    mask((4, 4), (0, 1, 0, 4)),    mask((4, 4), (0, 1, 2, 4), (1, 2, 0, 2)),    (2, 2, 2), 1 / 3, 0.5, 0.5, 0.5),
    ("inside truth",    mask((4, 4), (0, 4, 0, 4)),    mask((4, 4), (1, 3, 1, 3)),                  (4, 0, 12), 0.25, 1.0, 0.25, 0.4),
]


@pytest.mark.parametrize("name, truth, pred, counts, iou, precision, recall, dice", PIXEL_CASES, ids=[c[0] for c in PIXEL_CASES])
def test_pixel_counts_and_scores(name, truth, pred, counts, iou, precision, recall, dice):
    assert pixel_counts(truth, pred) == counts
    scores = overlap_scores(*counts)
    for key, want in (("iou", iou), ("precision", precision), ("recall", recall), ("dice", dice)):
        assert same(float(scores[key]), want), (name, key, scores[key], want)


def test_scores_are_elementwise_on_arrays():
    counts = np.array([c[3] for c in PIXEL_CASES]).T
    iou = overlap_scores(*counts)["iou"]
    want = np.array([c[4] for c in PIXEL_CASES])
    np.testing.assert_allclose(iou, want, equal_nan=True)


def test_pixel_counts_refuse_different_shapes():
    with pytest.raises(ValueError, match="differ in shape"):
        pixel_counts(np.zeros((2, 3), bool), np.zeros((3, 2), bool))


def test_set_figures_are_ratios_of_sums_not_means():
    # image 1: IoU 1/3; image 2: both empty; image 3: 4 false-alarm pixels.
    s = segmentation_summary([2, 0, 0], [2, 0, 4], [2, 0, 0])
    assert s["iou"] == pytest.approx(2 / 10) and s["precision"] == pytest.approx(2 / 8) and s["recall"] == 0.5
    assert s["dice"] == pytest.approx(4 / 12)
    assert (s["images"], s["images_with_truth"], s["images_with_prediction"]) == (3, 1, 2)
    assert (s["tp_px"], s["fp_px"], s["fn_px"]) == (2, 6, 2)
    empty = segmentation_summary([0], [0], [0])
    assert empty["iou"] is None and empty["precision"] is None and empty["recall"] is None


def test_per_class_sums_over_the_images_of_each_class():
    got = per_class_summary(["Crack", "Free", "Crack", "Free"], [5, 0, 3, 0], [1, 0, 1, 2], [2, 0, 0, 0])
    assert sorted(got) == ["Crack", "Free"]
    assert got["Crack"]["iou"] == pytest.approx(8 / 12) and got["Crack"]["images"] == 2
    assert got["Free"]["iou"] == 0.0 and got["Free"]["recall"] is None and got["Free"]["images_with_prediction"] == 1


def test_per_image_iou_leaves_out_images_where_both_are_empty():
    d = iou_distribution([1, 0, 0, 3, 0], [1, 0, 2, 0, 0], [0, 0, 0, 0, 0])  # IoU 0.5, -, 0, 1, -
    assert d["images"] == 3 and d["both_empty"] == 2 and d["zero"] == 1
    assert d["mean"] == pytest.approx(0.5) and d["median"] == pytest.approx(0.5)
    assert d["histogram"]["counts"] == [1, 0, 0, 0, 0, 1, 0, 0, 0, 1]  # 1.0 falls in the last bin
    none = iou_distribution([0], [0], [0])
    assert none["images"] == 0 and none["both_empty"] == 1 and none["mean"] is None


@pytest.mark.parametrize(
    "true, pred, escape_rate, false_reject_rate",
    [
        ([], [], None, None),
        (["PASS", "PASS"], ["PASS", "DISCOUNT"], None, 0.5),  # no defective part: no escape rate
        (["REJECT", "DISCOUNT"], ["REJECT", "PASS"], 0.5, None),  # no good part: no false-reject rate
        (["REJECT", "REJECT", "DISCOUNT", "PASS"], ["DISCOUNT", "PASS", "DISCOUNT", "PASS"], 2 / 3, 0.0),
        (["REJECT", "DISCOUNT", "PASS", "PASS", "PASS"], ["REJECT", "REJECT", "REJECT", "DISCOUNT", "PASS"], 0.0, 2 / 3),
        # over-grading a defective part is neither an escape nor a false reject
        (["DISCOUNT", "PASS"], ["REJECT", "PASS"], 0.0, 0.0),
    ],
)
def test_escape_and_false_reject_rates(true, pred, escape_rate, false_reject_rate):
    a = grade_agreement(confusion_matrix(grade_index(true), grade_index(pred)))
    assert a["escape_rate"] == (None if escape_rate is None else pytest.approx(escape_rate))
    assert a["false_reject_rate"] == (None if false_reject_rate is None else pytest.approx(false_reject_rate))
    assert a["truly_defective"] == sum(t != "PASS" for t in true) and a["truly_pass"] == true.count("PASS")


def test_grades_per_class_split_the_matrix_by_class():
    true = grade_index(["PASS", "REJECT", "PASS", "DISCOUNT"])
    pred = grade_index(["PASS", "PASS", "REJECT", "DISCOUNT"])
    per = grades_per_class(["Free", "Crack", "Free", "Crack"], true, pred)
    assert list(per) == ["Crack", "Free"]
    assert per["Crack"]["escape_rate"] == 0.5 and per["Crack"]["false_reject_rate"] is None
    assert per["Free"]["false_reject_rate"] == 0.5 and per["Free"]["escape_rate"] is None
    assert sum(np.array(c["matrix"]) for c in per.values()).tolist() == confusion_matrix(true, pred).tolist()


@pytest.mark.parametrize(
    "true, pred, matrix, agreement, escapes, over",
    [
        ([], [], [[0, 0, 0], [0, 0, 0], [0, 0, 0]], None, 0, 0),
        (["PASS", "REJECT"], ["PASS", "REJECT"], [[1, 0, 0], [0, 0, 0], [0, 0, 1]], 100.0, 0, 0),
        (["REJECT", "DISCOUNT", "PASS", "PASS"], ["PASS", "DISCOUNT", "REJECT", "DISCOUNT"],
         [[0, 1, 1], [0, 1, 0], [1, 0, 0]], 25.0, 1, 2),
    ],
)
def test_grade_confusion_matrix(true, pred, matrix, agreement, escapes, over):
    cm = confusion_matrix(grade_index(true), grade_index(pred))
    assert cm.tolist() == matrix
    a = grade_agreement(cm)
    assert a["agreement_pct"] == agreement and a["escapes"] == escapes and a["over_graded"] == over
    assert a["labels"] == ["PASS", "DISCOUNT", "REJECT"] and a["images"] == len(true)


def test_confusion_matrix_refuses_bad_labels():
    with pytest.raises(ValueError):
        confusion_matrix([0, 3], [0, 0])
    with pytest.raises(ValueError):
        confusion_matrix([0], [0, 1])


def test_truth_regions_under_min_area_are_dropped_like_predictions():
    m = mask((20, 20), (0, 3, 0, 3), (10, 15, 10, 15))  # 9 px and 25 px
    defects, kept = truth_mask_defects(m, "Crack", min_area_px=16)
    assert len(defects) == 1 and defects.class_name.tolist() == ["Crack"] and defects.area_px.tolist() == [25.0]
    assert defects.xyxy.tolist() == [[10, 10, 15, 15]] and kept.sum() == 25
    assert len(truth_mask_defects(m, "Crack", min_area_px=0)[0]) == 2


RULES = GradingConfig()  # total area: DISCOUNT above 0.5 %, REJECT above 2 %


@pytest.mark.parametrize(
    "rects, grade",
    [
        ([], Grade.PASS),
        ([(0, 5, 0, 8)], Grade.PASS),  # 40 px = 0.4 %
        ([(0, 10, 0, 10)], Grade.DISCOUNT),  # 100 px = 1 %
        ([(0, 10, 0, 30)], Grade.REJECT),  # 300 px = 3 %
        ([(0, 3, 0, 3), (10, 13, 10, 13), (20, 23, 20, 23), (30, 33, 30, 33), (40, 43, 40, 43), (50, 53, 50, 53)],
         Grade.PASS),  # 54 px = 0.54 %, but in specks of 9 px under min_area_px 16
    ],
)
def test_true_grade_from_a_mask(rects, grade):
    got, rule, area = true_grade(100, 100, RULES, 16, mask((100, 100), *rects), "Crack")
    assert got is grade and rule == "total_area_pct"


def test_true_grade_applies_class_rules_to_the_folder_class():
    rules = GradingConfig(classes={"Crack": ClassRule(count=Thresholds(reject=0))})
    m = mask((100, 100), (0, 5, 0, 5))  # 0.25 %: PASS by area, but any Crack rejects
    assert true_grade(100, 100, rules, 16, m, "Crack")[:2] == (Grade.REJECT, "class.Crack.count")
    assert true_grade(100, 100, rules, 16, m, "Blowhole")[0] is Grade.PASS


def test_true_grade_from_boxes_uses_their_union(tmp_path):
    xml = voc(tmp_path / "a.xml", [("crazing", 0, 0, 10, 10), ("crazing", 5, 5, 15, 15)])
    # union 175 px = 1.75 % of 100x100 (the sum of the boxes, 200 px, would reject)
    got, _, area = true_grade(100, 100, RULES, 16, boxes=parse_voc(xml))
    assert got is Grade.DISCOUNT and area == pytest.approx(1.75)


# --- VOC -------------------------------------------------------------------------------


def voc(path: Path, objects, size=(100, 100), difficult=()) -> Path:
    objs = "".join(
        f"<object><name>{n}</name><difficult>{int(i in difficult)}</difficult>"
        f"<bndbox><xmin>{x1}</xmin><ymin>{y1}</ymin><xmax>{x2}</xmax><ymax>{y2}</ymax></bndbox></object>"
        for i, (n, x1, y1, x2, y2) in enumerate(objects)
    )
    size_xml = f"<size><width>{size[0]}</width><height>{size[1]}</height><depth>1</depth></size>" if size else ""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"<annotation><filename>{path.stem}.jpg</filename>{size_xml}{objs}</annotation>")
    return path


def test_parse_voc(tmp_path):
    t = parse_voc(voc(tmp_path / "a.xml", [("crazing", 2, 3, 193, 194), ("scratches", 10, 10, 20, 40)], difficult=(1,)))
    assert t.xyxy.tolist() == [[2, 3, 193, 194], [10, 10, 20, 40]]
    assert t.class_name.tolist() == ["crazing", "scratches"] and t.difficult.tolist() == [False, True]
    assert t.size == (100, 100) and len(t) == 2
    empty = parse_voc(voc(tmp_path / "b.xml", [], size=None))
    assert len(empty) == 0 and empty.xyxy.shape == (0, 4) and empty.size is None


@pytest.mark.parametrize(
    "text, message",
    [
        ("<annotation><object>", "not valid XML"),
        ("<labels/>", "root element <labels>"),
        ("<annotation><object><name>x</name></object></annotation>", "object 1 (x): missing <bndbox>"),
        ("<annotation><object><bndbox/></object></annotation>", "object 1: missing <name>"),
        ("<annotation><object><name>x</name><bndbox><xmin>a</xmin><ymin>0</ymin><xmax>1</xmax><ymax>1</ymax>"
         "</bndbox></object></annotation>", "<xmin> is not a number: 'a'"),
        ("<annotation><object><name>x</name><bndbox><xmin>0</xmin><ymin>0</ymin><xmax>1</xmax></bndbox>"
         "</object></annotation>", "missing <ymax>"),
        ("<annotation><object><name>x</name><bndbox><xmin>5</xmin><ymin>0</ymin><xmax>5</xmax><ymax>1</ymax>"
         "</bndbox></object></annotation>", "empty box xmin=5"),
    ],
)
def test_bad_voc_files_name_the_file(tmp_path, text, message):
    path = tmp_path / "bad.xml"
    path.write_text(text)
    with pytest.raises(InputError) as err:
        parse_voc(path)
    assert str(err.value).startswith(str(path)) and message in str(err.value)


def test_unknown_truth_classes_name_the_file(tmp_path):
    good = parse_voc(voc(tmp_path / "good.xml", [("crazing", 0, 0, 5, 5)]))
    bad = parse_voc(voc(tmp_path / "bad.xml", [("rust", 0, 0, 5, 5)]))
    check_box_classes([good], ["crazing"], "det.onnx")
    with pytest.raises(InputError, match=r"bad\.xml: class 'rust' is not a class of the detection model det\.onnx"):
        check_box_classes([good, bad], ["crazing"], "det.onnx")


# --- truth discovery -----------------------------------------------------------------


@pytest.fixture
def truth_tree(tmp_path) -> Path:
    d = tmp_path / "data"
    img = np.full((8, 8), 40, np.uint8)
    for rel in ("Crack/a.jpg", "Crack/b.jpg", "Free/c.jpg", "Free/d.jpg", "lone.png", "neu/images/x.jpg",
                "neu/images/y.jpg"):
        write(d / rel, img)
    for rel in ("Crack/a.png", "Free/d.png"):
        write(d / rel, np.zeros((8, 8), np.uint8))
    voc(d / "neu/annotations/x.xml", [("crazing", 0, 0, 4, 4)], size=(8, 8))
    (d / "clip.mp4").write_bytes(b"\x00" * 10)
    return d


def test_discover_truth_beside_and_in_annotations(truth_tree):
    found = discover([truth_tree])
    kinds = {item.image.relative_to(truth_tree).as_posix(): (item.kind, item.cls) for item in found.items}
    assert kinds == {
        "Crack/a.jpg": ("mask", "Crack"),
        "Free/c.jpg": ("free", "Free"),  # defect-free by its folder
        "Free/d.jpg": ("mask", "Free"),
        "neu/images/x.jpg": ("voc", ""),  # the folder names a class only for mask truth
    }
    assert found.masks == 2  # a.png and d.png are truth, never inspected
    assert sorted(p.relative_to(truth_tree).as_posix() for p in found.no_truth) == [
        "Crack/b.jpg", "clip.mp4", "lone.png", "neu/images/y.jpg"]
    a = next(i for i in found.items if i.image.name == "a.jpg")
    assert a.mask == truth_tree / "Crack/a.png" and a.annotation is None
    x = next(i for i in found.items if i.image.name == "x.jpg")
    assert x.annotation == truth_tree / "neu/annotations/x.xml" and x.mask is None


def test_a_mask_named_on_the_command_line_is_not_inspected(truth_tree):
    found = discover([truth_tree / "Crack/a.png", truth_tree / "Crack/a.jpg", truth_tree / "nope.jpg"])
    assert [i.image.name for i in found.items] == ["a.jpg"] and found.masks == 1
    assert found.missing == (truth_tree / "nope.jpg",)


def test_free_class_option(truth_tree):
    none = discover([truth_tree / "Free"], free_class="")
    assert [i.image.name for i in none.items] == ["d.jpg"] and [p.name for p in none.no_truth] == ["c.jpg"]
    other = discover([truth_tree / "Crack"], free_class="Crack")
    assert {i.image.name: i.kind for i in other.items} == {"a.jpg": "mask", "b.jpg": "free"}


@pytest.mark.parametrize("n, limit, picks", [(5, None, [0, 1, 2, 3, 4]), (5, 9, [0, 1, 2, 3, 4]), (10, 3, [0, 4, 9]),
                                             (10, 1, [0]), (3, 2, [0, 2])])
def test_limit_spreads_over_the_inputs(n, limit, picks):
    assert spread(list(range(n)), limit) == picks


# --- end to end: synthetic segmentation with known figures -----------------------------

# 64x64 images, the threshold model's input size: no resampling, so the
# prediction is exactly the pixels brighter than 0.75 (min_area_px 16).
SHAPE = (64, 64)
SYNTH = {
    # name:        (bright rectangles,   truth rectangles or None for no mask file)
    "Crack/c1":    ([(10, 20, 10, 20)], [(10, 20, 15, 25)]),  # tp 50, fp 50, fn 50
    "Crack/c2":    ([(30, 40, 30, 46)], [(30, 40, 30, 46)]),  # tp 160
    "Crack/c3":    ([], [(5, 9, 5, 13)]),                     # fn 32: an escape (DISCOUNT → PASS)
    "Free/f1":     ([], []),                                  # both empty
    "Free/f2":     ([(50, 55, 50, 55)], []),                  # fp 25: over-graded (PASS → DISCOUNT)
    "Free/f3":     ([], None),                                # no mask: defect-free by its folder
    "Free/f4":     ([(40, 43, 40, 43)], []),                  # 9 px bright: under min_area_px, both empty
}


@pytest.fixture
def synthetic(tmp_path) -> Path:
    d = tmp_path / "tiles"
    for name, (bright, truth) in SYNTH.items():
        img = np.full(SHAPE, 20, np.uint8)
        img[mask(SHAPE, *bright)] = 255
        write(d / f"{name}.bmp", img)  # lossless: the bright pixels stay exact
        if truth is not None:
            write(d / f"{name}.png", mask(SHAPE, *truth).astype(np.uint8) * 255)
    write(d / "Crack/unlabelled.bmp", np.full(SHAPE, 20, np.uint8))
    return d


def test_eval_synthetic_segmentation_figures_known_by_construction(tmp_path, synthetic, threshold_model, capsys):
    out_json, out_png = tmp_path / "r/eval.json", tmp_path / "r/eval.png"
    code = run_eval(synthetic, "--seg-model", threshold_model, "--json", out_json, "--report", out_png, "-q")
    captured = capsys.readouterr()
    assert code == 0, captured.err
    r = json.loads(out_json.read_text())

    c = r["counts"]
    assert (c["with_truth"], c["evaluated"], c["no_truth"], c["truth_masks_in_inputs"], c["errors"]) == (7, 7, 1, 6, 0)
    assert c["truth_kinds"] == {"free": 1, "mask": 6}
    assert r["no_truth"] == [str(synthetic / "Crack/unlabelled.bmp")]
    assert "1 image(s) without truth skipped" in captured.err

    seg = r["segmentation"]
    a = seg["all_defects"]
    assert (a["tp_px"], a["fp_px"], a["fn_px"]) == (210, 75, 82)
    assert a["iou"] == pytest.approx(210 / 367)
    assert a["precision"] == pytest.approx(210 / 285) and a["recall"] == pytest.approx(210 / 292)
    assert a["dice"] == pytest.approx(420 / 577)
    assert seg["per_class"]["Crack"]["iou"] == pytest.approx(210 / 342)
    free = seg["per_class"]["Free"]
    assert free["iou"] == 0.0 and free["recall"] is None and free["images"] == 4 and free["images_with_prediction"] == 1
    d = seg["per_image_iou"]
    assert d["images"] == 4 and d["both_empty"] == 3  # f1, f3, f4
    assert d["mean"] == pytest.approx((1 / 3 + 1 + 0 + 0) / 4) and d["median"] == pytest.approx(1 / 6)

    g = r["grades"]
    assert g["matrix"] == [[3, 1, 0], [1, 0, 0], [0, 0, 2]]
    assert g["agreement_pct"] == pytest.approx(500 / 7) and g["escapes"] == 1 and g["over_graded"] == 1
    assert g["escape_rate"] == pytest.approx(1 / 3) and g["false_reject_rate"] == pytest.approx(1 / 4)
    rows = {Path(i["source"]).stem: i for i in r["images"]}
    assert (rows["c3"]["true_grade"], rows["c3"]["grade"]) == ("DISCOUNT", "PASS")
    assert rows["c1"]["iou"] == pytest.approx(1 / 3) and rows["f1"]["iou"] is None

    assert r["detection"] is None
    m = r["models"]["segmentation"]
    assert m["card_name"] == "bright-threshold" and len(m["sha256"]) == 64 and m["path"] == str(threshold_model)
    assert r["command"][:3] == ["station", "eval", str(synthetic)] and "--seg-model" in r["command"]
    assert r["rules"]["min_area_px"] == 16
    assert r["card_figures"] == {"iou": a["iou"], "dice": a["dice"], "pixel_precision": a["precision"],
                                 "pixel_recall": a["recall"], "grade_agreement_pct": g["agreement_pct"],
                                 "escape_rate": g["escape_rate"], "false_reject_rate": g["false_reject_rate"]}

    png = cv2.imread(str(out_png))
    assert png is not None and png.shape[0] > 400
    assert "IoU (all defects)" in captured.out and "0.572" in captured.out  # 210 / 367


def test_eval_errors_name_the_file_and_exit_1(tmp_path, synthetic, threshold_model, capsys):
    write(synthetic / "Crack/small.bmp", np.zeros((32, 32), np.uint8))
    write(synthetic / "Crack/small.png", np.zeros((16, 16), np.uint8))  # wrong size
    (synthetic / "Crack/broken.bmp").write_bytes(b"BM not really")
    write(synthetic / "Crack/broken.png", np.zeros(SHAPE, np.uint8))
    out = tmp_path / "e.json"
    code = run_eval(synthetic, synthetic / "Crack/gone.jpg", "--seg-model", threshold_model, "--json", out, "-q")
    err = capsys.readouterr().err
    assert code == 1
    r = json.loads(out.read_text())
    errors = {Path(e["source"]).name: e["error"] for e in r["errors"]}
    assert set(errors) == {"small.bmp", "broken.bmp", "gone.jpg"}
    assert f"{synthetic / 'Crack/small.png'}: mask is 16x16 but its image is 32x32" == errors["small.bmp"]
    assert str(synthetic / "Crack/broken.bmp") in errors["broken.bmp"]
    assert r["counts"]["evaluated"] == 7 and r["counts"]["errors"] == 3
    assert "small.png: mask is 16x16" in err


def test_eval_usage_errors_exit_2(tmp_path, threshold_model, capsys):
    write(tmp_path / "plain/a.jpg", np.zeros((8, 8), np.uint8))
    assert run_eval(tmp_path / "plain", "--seg-model", threshold_model, "-q") == 2
    assert "no image with ground truth found" in capsys.readouterr().err
    assert run_eval(tmp_path / "plain", "--seg-model", tmp_path / "none.onnx") == 2
    assert "none.onnx: model file not found" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        run_eval(tmp_path, "--limit", "0")


# --- end to end: real magnetic-tile images ---------------------------------------------


def test_eval_real_magnetic_tiles_agrees_with_the_inspector(tmp_path, threshold_model, capsys):
    """A few real tiles of every class: eval's pixel counts and grades equal
    those of the Inspector run directly on the same files."""
    from conftest import shared_data

    from station.config import load_config
    from station.imageio import read_image, read_mask
    from station.inspector import Inspector, open_models
    from station.types import Frame

    root = shared_data("magnetic_tile")
    images = [p for cls in sorted(root.iterdir()) if cls.is_dir() for p in sorted(cls.glob("*.jpg"))[:2]]
    assert {p.parent.name for p in images} >= {"Blowhole", "Crack", "Free", "Uneven"}
    out = tmp_path / "tiles.json"
    assert run_eval(*images, "--seg-model", threshold_model, "--json", out, "-q") == 0
    r = json.loads(out.read_text())
    assert r["counts"]["evaluated"] == len(images) and r["counts"]["no_truth"] == 0
    assert set(r["segmentation"]["per_class"]) == {p.parent.name for p in images}

    cfg = load_config(None)
    inspector = Inspector(open_models(cfg, threshold_model), cfg, keep_mask=True)
    rows = {i["source"]: i for i in r["images"]}
    tp = fp = fn = 0
    for path in images:
        result = inspector.inspect(Frame(read_image(path), str(path)))
        truth = read_mask(path.with_suffix(".png")) > 127
        counts = (int((truth & result.mask).sum()), int((~truth & result.mask).sum()), int((truth & ~result.mask).sum()))
        row = rows[str(path)]
        assert (row["tp_px"], row["fp_px"], row["fn_px"]) == counts and row["grade"] == result.decision.grade.value
        assert row["cls"] == path.parent.name
        tp, fp, fn = tp + counts[0], fp + counts[1], fn + counts[2]
    a = r["segmentation"]["all_defects"]
    assert a["iou"] == pytest.approx(tp / (tp + fp + fn)) and 0.0 <= a["iou"] <= 1.0
    assert sum(map(sum, r["grades"]["matrix"])) == len(images)


# --- end to end: detection AP on VOC truth -----------------------------------------------

CLASSES = ["crazing", "scratches"]
PRED = (20, 10, 60, 50)  # the fixed detector's box on a 100x100 image: x 0.2–0.6, y 0.1–0.5


@pytest.fixture
def detector(tmp_path) -> Path:
    from onnx_builders import write_detection_model

    return write_detection_model(tmp_path / "det.onnx", [[0.1, 0.2, 0.5, 0.6]], [0.9], [0], CLASSES)


def steel(tmp_path: Path, truth_box, cls="crazing", n=2) -> Path:
    d = tmp_path / "neu"
    for i in range(n):
        write(d / "images" / f"s{i}.jpg", np.full((100, 100, 3), 90, np.uint8))
        voc(d / "annotations" / f"s{i}.xml", [(cls, *truth_box)])
    return d / "images"


@pytest.mark.parametrize(
    "truth_box, ap50, ap",
    [
        (PRED, 1.0, 1.0),  # equal: matched at every IoU threshold
        ((28, 10, 68, 50), 1.0, 0.4),  # IoU 1280/1920 = 0.667: matched at 0.50–0.65, 4 of 10 thresholds
        ((70, 70, 95, 95), 0.0, 0.0),  # disjoint
    ],
    ids=["equal", "iou-0.67", "disjoint"],
)
def test_eval_detection_ap_known_by_construction(tmp_path, detector, truth_box, ap50, ap):
    out, png = tmp_path / "d.json", tmp_path / "d.png"
    assert run_eval(steel(tmp_path, truth_box), "--det-model", detector, "--json", out, "--report", png, "-q") == 0
    r = json.loads(out.read_text())
    det = r["detection"]
    assert (det["images"], det["truth_boxes"], det["detections"]) == (2, 2, 2)
    assert det["ap50"] == pytest.approx(ap50, abs=1e-6) and det["map"] == pytest.approx(ap, abs=1e-6)
    crazing = det["per_class"]["crazing"]
    assert crazing["ap50"] == pytest.approx(ap50, abs=1e-6) and crazing["ap"] == pytest.approx(ap, abs=1e-6)
    assert det["per_class"]["scratches"] == {"truth_boxes": 0, "detections": 0, "ap50": None, "ap": None}
    curve = det["pr_iou50"]
    assert len(curve["recall"]) == 101 and set(curve["precision"]) == {"crazing"}
    assert set(curve["precision"]["crazing"]) == {ap50}
    assert r["segmentation"] is None and r["models"]["detection"]["card_name"] == "fixed-boxes"
    assert r["counts"]["truth_kinds"] == {"voc": 2}
    if truth_box == PRED:
        assert r["grades"]["agreement_pct"] == 100.0  # same boxes, same box-union area
    assert cv2.imread(str(png)) is not None


def test_coco_metrics_with_no_detections_and_ignored_truth():
    truth = BoxTable.build([(0, 0, [0, 0, 10, 10], 1.0, False), (1, 0, [0, 0, 10, 10], 1.0, True)])
    m = coco_detection_metrics(truth, BoxTable.build([]), [(20, 20), (20, 20)], ["a", "b"])
    assert m["ap50"] == 0.0 and m["map"] == 0.0 and m["truth_boxes"] == 1 and m["ignored_truth_boxes"] == 1
    assert m["per_class"]["b"]["ap"] is None
    # a detection on the ignored (difficult) box is no false positive
    found = BoxTable.build([(0, 0, [0, 0, 10, 10], 0.9, False), (1, 0, [0, 0, 10, 10], 0.95, False)])
    assert coco_detection_metrics(truth, found, [(20, 20), (20, 20)], ["a", "b"])["ap50"] == pytest.approx(1.0)


def test_eval_unknown_truth_class_exits_2_naming_the_file(tmp_path, detector, capsys):
    images = steel(tmp_path, PRED, cls="rust", n=1)
    assert run_eval(images, "--det-model", detector, "-q") == 2
    err = capsys.readouterr().err
    assert f"{images.parent / 'annotations' / 's0.xml'}: class 'rust' is not a class of the detection model" in err


def test_eval_is_wired_into_the_cli():
    if not eval_is_wired():
        pytest.skip("station/cli.py does not call station.evaluate.add_eval_parser yet")
    assert cli.build_parser().parse_args(["eval", "x", "--limit", "3"]).limit == 3

"""station replay end to end: the CLI on files, folders and videos; error records
for undecodable inputs; golden records on the committed samples."""

from __future__ import annotations

import json
import os
from pathlib import Path

import cv2
import jsonschema
import numpy as np
import pytest

from station.cli import main
from station.config import DEMO_MODEL
from station.messages import load_schema

ROOT = Path(__file__).resolve().parent.parent
SAMPLES = ROOT / "samples"
GOLDEN = Path(__file__).resolve().parent / "golden" / "replay_samples.jsonl"
VALIDATOR = jsonschema.Draft202012Validator(load_schema())
# Fields that differ between runs of the same inspection.
VOLATILE = ("id", "captured_at", "latency_ms")


def read_records(path: Path) -> list[dict]:
    records = [json.loads(line) for line in path.read_text().splitlines()]
    for r in records:
        VALIDATOR.validate(r)
    return records


def stable(record: dict) -> dict:
    return {k: v for k, v in record.items() if k not in VOLATILE}


def assert_matches(got, want, where="records"):
    """Equal structure and strings; numbers within what another CPU's float
    rounding can move (1 % + 0.002, boxes and pixel areas 1 % + 2 px)."""
    if isinstance(want, dict):
        assert isinstance(got, dict) and got.keys() == want.keys(), f"{where}: keys {sorted(got)} != {sorted(want)}"
        for k in want:
            assert_matches(got[k], want[k], f"{where}.{k}")
    elif isinstance(want, list):
        assert isinstance(got, list) and len(got) == len(want), f"{where}: {got} != {want}"
        for i, (g, w) in enumerate(zip(got, want)):
            assert_matches(g, w, f"{where}[{i}]")
    elif isinstance(want, float) or (isinstance(want, int) and not isinstance(want, bool) and isinstance(got, float)):
        pixels = any(k in where for k in ("bbox", "area_px", "defect_area_px"))
        tol = 0.01 * abs(want) + (2.0 if pixels else 0.002)
        assert abs(got - want) <= tol, f"{where}: {got} != {want} ± {tol}"
    else:
        assert got == want, f"{where}: {got!r} != {want!r}"


def write(path: Path, image: np.ndarray) -> Path:
    ok, buf = cv2.imencode(path.suffix, image)
    assert ok
    path.write_bytes(buf.tobytes())
    return path


@pytest.fixture
def mixed_inputs(tmp_path) -> Path:
    """Images of every accepted form, a corrupt one and a text file among them."""
    d = tmp_path / "in"
    (d / "sub").mkdir(parents=True)
    rng = np.random.default_rng(3)
    plate = rng.integers(0, 120, (300, 700), dtype=np.uint8)
    plate[100:160, 200:300] = 255  # bright: a defect for the threshold model
    write(d / "gray_wide.png", plate)
    write(d / "colour_tall.jpg", cv2.cvtColor(plate.T.copy(), cv2.COLOR_GRAY2BGR))
    write(d / "sub" / "sixteen.png", plate.astype(np.uint16) * 257)
    write(d / "sub" / "alpha.png", np.dstack([cv2.cvtColor(plate, cv2.COLOR_GRAY2BGR), np.full_like(plate, 200)]))
    write(d / "big.jpg", cv2.resize(plate, (2000, 857)))
    write(d / "tiny.png", np.zeros((1, 1), np.uint8))
    good = (d / "gray_wide.png").read_bytes()
    (d / "truncated.png").write_bytes(good[: len(good) // 3])
    (d / "notes.jpg").write_text("not an image")
    (d / "empty.png").write_bytes(b"")
    (d / "readme.txt").write_text("ignored: not an image extension")
    return d


def test_mixed_folder_gives_one_record_per_file(tmp_path, mixed_inputs, threshold_model):
    out = tmp_path / "r.jsonl"
    code = main(["replay", str(mixed_inputs), "--seg-model", str(threshold_model), "--out", str(out),
                 "--masks", str(tmp_path / "m"), "--overlays", str(tmp_path / "o"), "-q"])
    assert code == 1  # some inputs could not be inspected
    records = {Path(r["source"]).name: r for r in read_records(out)}
    assert set(records) == {"gray_wide.png", "colour_tall.jpg", "sixteen.png", "alpha.png", "big.jpg", "tiny.png",
                            "truncated.png", "notes.jpg", "empty.png"}
    for name in ("truncated.png", "notes.jpg", "empty.png"):
        assert "grade" not in records[name] and name in records[name]["error"]
    for name in ("gray_wide.png", "colour_tall.jpg", "sixteen.png", "alpha.png", "big.jpg"):
        r = records[name]
        assert r["grade"] == "REJECT", r  # 6,000 of 210,000 px bright: 2.9 %
        assert r["defect_area_pct"] == pytest.approx(100 * 6000 / 210000, abs=0.6)  # 64 px model input
        assert r["defects"][0]["kind"] == "segmentation"
        mask = cv2.imread(str(tmp_path / "m" / f"{Path(name).stem}.png"), cv2.IMREAD_UNCHANGED)
        assert mask.shape == (r["image"]["height"], r["image"]["width"])
        assert set(np.unique(mask)) <= {0, 255}
        assert (tmp_path / "o" / f"{Path(name).stem}.png").is_file()
    assert records["colour_tall.jpg"]["image"] == {"width": 300, "height": 700}
    assert records["big.jpg"]["image"] == {"width": 2000, "height": 857}
    assert records["tiny.png"]["grade"] == "PASS"


def test_video_frames_and_a_broken_video(tmp_path, threshold_model):
    video = tmp_path / "line.avi"
    writer = cv2.VideoWriter(str(video), cv2.VideoWriter_fourcc(*"MJPG"), 10, (160, 120))
    assert writer.isOpened()
    for i in range(5):
        frame = np.full((120, 160, 3), 30, np.uint8)
        if i % 2:
            frame[10:60, 10:80] = 255
        writer.write(frame)
    writer.release()
    broken = tmp_path / "broken.mp4"
    broken.write_bytes(b"\x00\x00\x00\x18ftypmp42" + b"\x00" * 100)
    out = tmp_path / "r.jsonl"
    code = main(["replay", str(video), str(broken), "--seg-model", str(threshold_model), "--out", str(out), "-q"])
    records = read_records(out)
    assert [r["source"] for r in records[:5]] == [f"{video}#frame={i}" for i in range(5)]
    assert [r["grade"] for r in records[:5]] == ["PASS", "REJECT", "PASS", "REJECT", "PASS"]
    assert [r["seq"] for r in records] == list(range(len(records)))
    assert len(records) == 6 and "error" in records[5] and records[5]["source"] == str(broken)
    assert code == 1


def test_missing_path_is_an_error_record(tmp_path, threshold_model):
    out = tmp_path / "r.jsonl"
    assert main(["replay", str(tmp_path / "nope.png"), "--seg-model", str(threshold_model), "--out", str(out), "-q"]) == 1
    (record,) = read_records(out)
    assert "cannot read" in record["error"]


def test_bad_config_or_model_exits_2_and_names_it(tmp_path, capsys):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("grading:\n  total_area: 3\n")
    assert main(["replay", str(tmp_path), "-c", str(cfg)]) == 2
    assert f"{cfg}:2: grading.total_area: unknown key" in capsys.readouterr().err
    assert main(["replay", str(tmp_path), "--seg-model", str(tmp_path / "none.onnx")]) == 2
    assert "none.onnx: model file not found" in capsys.readouterr().err


def test_a_detection_model_in_the_segmentation_slot_is_refused(tmp_path, capsys):
    from onnx_builders import write_detection_model

    det = write_detection_model(tmp_path / "det.onnx", [[0, 0, 1, 1]], [0.9], [0], ["scratch"])
    assert main(["replay", str(tmp_path), "--seg-model", str(det)]) == 2
    assert "is a detection model but was given as the segmentation model" in capsys.readouterr().err


def test_segmentation_and_detection_in_one_pass(tmp_path, threshold_model):
    from onnx_builders import write_detection_model

    det = write_detection_model(tmp_path / "det.onnx", [[0.0, 0.0, 0.5, 0.5]], [0.8], [0], ["scratch"])
    img = np.full((100, 100), 20, np.uint8)
    img[60:70, 60:70] = 255
    write(tmp_path / "p.png", img)
    out = tmp_path / "r.jsonl"
    assert main(["replay", str(tmp_path / "p.png"), "--seg-model", str(threshold_model), "--det-model", str(det),
                 "--out", str(out), "-q"]) == 0
    (r,) = read_records(out)
    assert sorted(d["kind"] for d in r["defects"]) == ["detection", "segmentation"]
    assert set(r["models"]) == {"segmentation", "detection"}
    det_defect = next(d for d in r["defects"] if d["kind"] == "detection")
    assert det_defect["bbox"] == [0.0, 0.0, 50.0, 50.0] and det_defect["class"] == "scratch"


@pytest.mark.skipif(not DEMO_MODEL.is_file(), reason="bundled demo model not built")
def test_bundled_demo_matches_golden_records(tmp_path):
    out = tmp_path / "r.jsonl"
    assert main(["replay", str(SAMPLES), "--out", str(out), "-q"]) == 0
    got = [stable(r) for r in read_records(out)]
    for r in got:
        r["source"] = Path(r["source"]).relative_to(ROOT).as_posix()
    if os.environ.get("STATION_UPDATE_GOLDEN"):  # after retraining the demo model
        GOLDEN.parent.mkdir(exist_ok=True)
        GOLDEN.write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in got))
    want = [json.loads(line) for line in GOLDEN.read_text().splitlines()]
    assert_matches(got, want)
    assert {r["grade"] for r in got} == {"PASS", "DISCOUNT", "REJECT"}


def test_unseen_real_images_each_get_a_grade_or_an_error(tmp_path):
    """Real photographs the demo model never saw: grayscale non-square magnetic
    tiles, NEU-DET steel (grey stored as colour), one scaled to 2,000 px, and a
    corrupt file among them."""
    from conftest import shared_data

    tiles = sorted(shared_data("magnetic_tile").glob("*/*.jpg"))[::150]
    steel = sorted((shared_data("neu_det") / "images").glob("*.jpg"))[::300]
    d = tmp_path / "in"
    d.mkdir()
    big = cv2.imread(str(tiles[0]), cv2.IMREAD_UNCHANGED)
    write(d / "tile_2000px.png", cv2.resize(big, (2000, round(2000 * big.shape[0] / big.shape[1]))))
    (d / "corrupt.jpg").write_bytes(steel[0].read_bytes()[:500])
    out = tmp_path / "r.jsonl"
    code = main(["replay", *map(str, tiles + steel), str(d), "--out", str(out), "--masks", str(tmp_path / "m"), "-q"])
    assert code == 1
    records = read_records(out)
    assert len(records) == len(tiles) + len(steel) + 2
    by_name = {Path(r["source"]).name: r for r in records}
    assert "error" in by_name["corrupt.jpg"]
    graded = [r for r in records if "grade" in r]
    assert len(graded) == len(records) - 1
    assert by_name["tile_2000px.png"]["image"]["width"] == 2000
    for r in graded:
        mask = cv2.imread(str(tmp_path / "m" / f"{Path(r['source']).stem}.png"), cv2.IMREAD_UNCHANGED)
        assert mask.shape == (r["image"]["height"], r["image"]["width"])


def test_the_shipped_models_together_on_both_datasets(tmp_path):
    """The acceptance command: `station replay --seg-model models/magnetic_tile_unet.onnx --det-model
    models/neu_det_detector.onnx --masks D --out F.jsonl IMAGES` on magnetic tiles and NEU-DET steel."""
    from conftest import shared_data

    tiles = [p for cls in ("Fray", "Uneven", "Free") for p in sorted(shared_data("magnetic_tile").glob(f"{cls}/*.jpg"))[:2]]
    steel = [sorted((shared_data("neu_det") / "images").glob(f"{c}_*.jpg"))[0]
             for c in ("patches", "scratches", "pitted_surface")]
    out, masks = tmp_path / "r.jsonl", tmp_path / "masks"
    assert main(["replay", "--seg-model", str(ROOT / "models" / "magnetic_tile_unet.onnx"),
                 "--det-model", str(ROOT / "models" / "neu_det_detector.onnx"), "--masks", str(masks),
                 "--out", str(out), "-q", *map(str, tiles + steel)]) == 0
    records = read_records(out)
    assert [Path(r["source"]).name for r in records] == [p.name for p in tiles + steel]
    for r in records:
        assert r["grade"] in ("PASS", "DISCOUNT", "REJECT")
        mask = cv2.imread(str(masks / f"{Path(r['source']).stem}.png"), cv2.IMREAD_UNCHANGED)
        assert mask.shape == (r["image"]["height"], r["image"]["width"])
    kinds = {d["kind"] for r in records for d in r["defects"]}
    assert kinds == {"segmentation", "detection"}, kinds  # defects from both models, each with its kind
    on_steel = [d for r in records[len(tiles):] for d in r["defects"] if d["kind"] == "detection"]
    assert {d["class"] for d in on_steel} >= {"patches", "scratches"}

"""Several segmentation models averaged on each frame: config, Inspector, replay and eval.

Each model is fed its own card's preprocessing; their probability maps meet at
source resolution, where the mean is thresholded and cut into regions as one
model's map would be. The models are the shipped U-Net and a copy of it whose
card stretches the frame instead of letterboxing it (the same weights fed
another geometry: a second model that errs differently).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import cv2
import jsonschema
import numpy as np
import pytest

from conftest import ROOT, shared_data
from onnx_builders import threshold_card, write_threshold_model
from export.onnx_export import embed_card_file, read_card
from station.cli import main
from station.config import parse_config
from station.errors import ConfigError
from station.imageio import read_image
from station.messages import load_schema
from station.modelcard import ResizeOp
from station.inspector import Inspector, open_models
from station.parallel import ParallelInfer
from station.postprocess import mask_probabilities
from station.preprocess import preprocess, to_tensor
from station.types import Frame

UNET = ROOT / "models" / "magnetic_tile_unet.onnx"
DETECTOR = ROOT / "models" / "neu_det_detector.onnx"


@pytest.fixture(scope="module")
def stretched(tmp_path_factory) -> Path:
    """The shipped U-Net with a card that stretches the frame to its input (threshold 0.7)."""
    card = read_card(UNET)
    ops = [op.model_copy(update={"mode": "stretch"}) if isinstance(op, ResizeOp) else op for op in card.preprocess]
    card = card.model_copy(update={"name": "stretched-copy", "preprocess": ops,
                                   "output": card.output.model_copy(update={"threshold": 0.7})})
    return embed_card_file(UNET, card, tmp_path_factory.mktemp("stretched") / "stretched.onnx")


def tiles(n: int = 6) -> list[Path]:
    """Defective and defect-free tiles of several shapes."""
    data = shared_data("magnetic_tile")
    return [sorted((data / cls).glob("*.jpg"))[k] for cls in ("Break", "Fray", "Uneven") for k in range(n // 3)] + \
        sorted((data / "Free").glob("*.jpg"))[:2]


def cfg_for(models: dict, **postprocess):
    lines = "".join(f"  {k}: {json.dumps(v)}\n" for k, v in models.items())
    post = "".join(f"  {k}: {v}\n" for k, v in postprocess.items())
    return parse_config("models:\n" + lines + "inference: {providers: [cpu]}\n" + (f"postprocess:\n{post}" if post else ""),
                        "station.yaml")


def comparable(result) -> tuple:
    d = result.defects
    return (result.decision.grade, result.defect_area_px, tuple(d.class_name), d.xyxy.tobytes(),
            d.confidence.tobytes(), d.area_px.tobytes())


def test_a_model_averaged_with_itself_gives_its_own_results(tmp_path):
    copy = tmp_path / "copy.onnx"
    shutil.copyfile(UNET, copy)
    one = Inspector(open_models(cfg_for({"segmentation": str(UNET)})), cfg_for({"segmentation": str(UNET)}))
    cfg = cfg_for({"segmentation": [str(UNET), str(copy)]})
    two = Inspector(open_models(cfg), cfg)
    assert list(two.models) == ["segmentation", "segmentation.2"]
    assert two.mask_threshold == one.mask_threshold == read_card(UNET).output.threshold
    found = 0
    for i, path in enumerate(tiles()):
        frame = Frame(read_image(path), str(path), seq=i)
        a, b = one.inspect(frame), two.inspect(frame)
        assert comparable(a) == comparable(b), path.name
        assert np.array_equal(a.mask, b.mask)
        assert b.models == {"segmentation": one.model_ids["segmentation"], "segmentation.2": one.model_ids["segmentation"]}
        found += len(b.defects)
    assert found > 0  # the comparison saw defects, not only empty frames


def test_the_mean_of_two_geometries_is_thresholded_at_source_resolution(stretched):
    """The Inspector's mask is the mean of each model's probabilities mapped back to the
    frame by its own geometry, above the threshold, regions under min_area_px dropped."""
    cfg = cfg_for({"segmentation": [str(UNET), str(stretched)]}, mask_threshold=0.5, min_area_px=100)
    inspector = Inspector(open_models(cfg), cfg)
    assert [m.card.name for m in inspector.models.values()] == [read_card(UNET).name, "stretched-copy"]
    differ = 0
    for i, path in enumerate(tiles()):
        image = read_image(path)
        h, w = image.shape[:2]
        maps = []
        for model in inspector.models.values():
            x, geometry = preprocess(image, model.card)
            raw = model.session.run(None, {model.card.input.name: to_tensor(x, model.card.input)})[0]
            prob = mask_probabilities(raw, model.card.output)[:, :, 0]
            content = prob[geometry.top:geometry.top + geometry.content_h, geometry.left:geometry.left + geometry.content_w]
            maps.append(cv2.resize(content, (w, h), interpolation=cv2.INTER_LINEAR))
        above = ((maps[0] + maps[1]) / 2 > 0.5).astype(np.uint8)
        n, labels, stats, _ = cv2.connectedComponentsWithStats(above, connectivity=8)
        expected = np.isin(labels, np.flatnonzero(stats[:, cv2.CC_STAT_AREA] >= 100)) & (labels > 0)
        result = inspector.inspect(Frame(image, str(path), seq=i))
        assert np.array_equal(result.mask, expected), path.name
        assert result.defect_area_px == expected.sum()
        assert sorted(result.defects.area_px) == sorted(stats[1:, cv2.CC_STAT_AREA][stats[1:, cv2.CC_STAT_AREA] >= 100])
        differ += not np.array_equal(maps[0] > 0.5, maps[1] > 0.5)
    assert differ >= 3  # the two geometries really disagree on these tiles


def test_the_default_threshold_is_the_mean_of_the_cards(stretched):
    cfg = cfg_for({"segmentation": [str(UNET), str(stretched)]})
    expected = (read_card(UNET).output.threshold + 0.7) / 2
    assert Inspector(open_models(cfg), cfg).mask_threshold == pytest.approx(expected)


def test_two_segmentation_models_and_a_detector_in_parallel_give_the_results_in_turn(stretched):
    """Also after a reload from two models to three: the infer stage's helper threads grow."""
    parallel = ParallelInfer("test-ensemble")
    try:
        for seg in (f"{UNET}", f"[{UNET}, {stretched}]"):
            cfg = parse_config(f"models:\n  segmentation: {seg}\n  detection: {DETECTOR}\n"
                               "inference: {providers: [cpu]}\ntuning: {parallel_models: true}\npostprocess: {min_score: 0.05}\n",
                               "s.yaml")
            inspector = Inspector(open_models(cfg), cfg)
            for i, path in enumerate(tiles(3)):
                frame = Frame(read_image(path), str(path), seq=i)
                together, in_turn = inspector.finish(parallel(inspector.prepare(frame))), inspector.inspect(frame)
                assert comparable(together) == comparable(in_turn) and np.array_equal(together.mask, in_turn.mask)
                assert {f"infer.{k}" for k in inspector.models} | {"infer"} <= set(together.latency_ms)
        assert list(inspector.models) == ["segmentation", "segmentation.2", "detection"]
    finally:
        parallel.close()


def test_models_of_other_classes_are_refused_naming_both(tmp_path):
    other = write_threshold_model(tmp_path / "two.onnx", card=threshold_card(classes=["scratch"]))
    cfg = cfg_for({"segmentation": [str(UNET), str(other)]})
    with pytest.raises(ConfigError, match=rf"{other}: its classes \['scratch'\] are not those of {UNET}"):
        Inspector(open_models(cfg), cfg)


def test_each_file_of_a_list_has_its_own_pin(tmp_path, stretched, capsys):
    from station.infer import sha256_file

    for src in (UNET, stretched):
        shutil.copyfile(src, tmp_path / src.name)
    pins = [sha256_file(UNET), sha256_file(stretched)]
    cfg_path = tmp_path / "station.yaml"
    cfg_path.write_text(f"models:\n  segmentation: [{UNET.name}, {stretched.name}]\n  segmentation_sha256: {pins}\n")
    assert main(["check-config", str(cfg_path)]) == 0
    cfg_path.write_text(f"models:\n  segmentation: [{UNET.name}, {stretched.name}]\n  segmentation_sha256: {pins[::-1]}\n")
    assert main(["check-config", str(cfg_path)]) == 2
    err = capsys.readouterr().err
    assert f"{tmp_path / UNET.name}: sha256 mismatch: expected {pins[1]}" in err


def test_replay_and_eval_average_repeated_seg_models(tmp_path, stretched, capsys):
    images = [str(p) for p in tiles()]
    out = tmp_path / "r.jsonl"
    assert main(["replay", "-q", "--seg-model", str(UNET), "--seg-model", str(stretched), "--out", str(out), *images]) == 0
    records = [json.loads(line) for line in out.read_text().splitlines()]
    validator = jsonschema.Draft202012Validator(load_schema())
    assert len(records) == len(images)
    for r in records:
        validator.validate(r)
        assert set(r["models"]) == {"segmentation", "segmentation.2"}
    assert main(["replay", "-q", "--seg-model", str(UNET), "--seg-model", str(UNET), *images]) == 2
    assert "a segmentation model is given twice" in capsys.readouterr().err

    cfg = tmp_path / "s.yaml"
    cfg.write_text("postprocess: {mask_threshold: 0.5, min_area_px: 100}\n")
    report = tmp_path / "eval.json"
    assert main(["eval", "-q", "-c", str(cfg), "--seg-model", str(UNET), "--seg-model", str(stretched),
                 "--json", str(report), *images]) == 0
    r = json.loads(report.read_text())
    assert [m["card_name"] for m in r["models"].values()] == [read_card(UNET).name, "stretched-copy"]
    assert r["rules"]["mask_threshold"] == 0.5 and r["counts"]["evaluated"] == len(images)
    assert r["command"].count("--seg-model") == 2

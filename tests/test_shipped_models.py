"""The shipped models as a user gets them: loadable, small, configured, and carrying their figures.

The figures themselves come from commands that train for an hour or more
(``python -m export.magnetic_tile cv``, ``python -m export.neu_det train``);
these tests check what a fresh checkout can check cheaply: the files, their
cards and the artefacts those commands wrote agree with one another.
"""

from __future__ import annotations

import json

import pytest

from conftest import ROOT
from export.onnx_export import read_card
from station.config import load_config
from station.modelcard import MaskOutput
from station.inspector import Inspector, open_models

MODELS = {"magnetic_tile_unet": "config/magnetic_tile.yaml", "neu_det_detector": "config/neu_det.yaml"}


@pytest.mark.parametrize("name, config", sorted(MODELS.items()))
def test_each_shipped_model_is_small_loads_and_is_its_config_s(name, config):
    path = ROOT / "models" / f"{name}.onnx"
    assert path.stat().st_size <= 30 * 2**20
    cfg = load_config(ROOT / config)
    models = open_models(cfg)
    assert [m.path.resolve() for m in models.values()] == [path.resolve()]
    Inspector(models, cfg).warm_up(parts=1)
    card = read_card(path)
    assert card.training.command.startswith("python -m export.") and card.training.evaluated_by


def test_the_unet_ships_the_threshold_and_figures_its_cross_validation_chose():
    report = json.loads((ROOT / "docs" / "magnetic_tile_cv.json").read_text())
    card = read_card(ROOT / "models" / "magnetic_tile_unet.onnx")
    assert isinstance(card.output, MaskOutput)
    assert card.output.threshold == report["chosen"]["threshold"]
    assert load_config(ROOT / MODELS["magnetic_tile_unet"]).postprocess.min_area_px == report["chosen"]["min_area_px"]
    figures = card.training.figures
    pooled = report["pooled"]
    assert figures["oof_escape_rate"] == round(pooled["escape_rate"], 4)
    assert figures["oof_false_reject_rate"] == round(pooled["false_reject_rate"], 4)
    assert figures["cv_iou_mean"] == round(report["fold_mean_sd"]["iou"]["mean"], 4)
    assert "all 1076 images train" in card.training.split and "--all-data" in card.training.command
    # every image was predicted by exactly one fold model, and the folds kept each tile on one side
    folds = report["folds"]
    assert len(folds) == pooled["images"] == 1076 == sum(f["images"] for f in report["per_fold"])

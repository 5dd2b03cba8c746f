"""export/crossval.py: the threshold and min_area_px chosen on out-of-fold predictions under an escape budget."""

from __future__ import annotations

import numpy as np
import pytest

from export import ExportError
from export.crossval import OutOfFold, choose, figures, score, tune
from station.config import parse_config
from station.preprocess import Geometry

H = W = 100  # 10,000 px frames: 0.5 % = 50 px (PASS up to it), 2 % = 200 px (DISCOUNT up to it)
CFG = parse_config("grading:\n  total_area_pct: {discount: 0.5, reject: 2.0}\n")


def part(key: str, fold: int, truth_px: int, prob_in_truth: float, cls: str = "Crack",
         speck_px: int = 0, speck_prob: float = 0.0) -> OutOfFold:
    """A frame whose truth is a ``truth_px``-pixel block; the model gives it
    ``prob_in_truth`` and a separate ``speck_px`` block ``speck_prob``."""
    truth = np.zeros((H, W), bool)
    prob = np.zeros((H, W, 1), np.float32)
    if truth_px:
        side = int(np.sqrt(truth_px))
        truth[:side, : truth_px // side] = True
        prob[:side, : truth_px // side, 0] = prob_in_truth
    if speck_px:
        side = int(np.sqrt(speck_px))
        prob[60 : 60 + side, 60 : 60 + speck_px // side, 0] = speck_prob
    return OutOfFold(key, cls if truth_px else "Free", fold, prob.astype(np.float16), Geometry.identity(H, W), truth)


def parts() -> list[OutOfFold]:
    return [
        part("reject_sure", 0, 400, 0.9),  # REJECT, found at any threshold
        part("reject_faint", 1, 400, 0.3),  # REJECT, found only below 0.3
        part("discount_faint", 0, 100, 0.25),  # DISCOUNT, found only below 0.25
        part("good_clean", 1, 0, 0.0),
        part("good_speck", 0, 0, 0.0, speck_px=100, speck_prob=0.2),  # 100 px at 0.2: a false DISCOUNT below 0.2
        part("good_dust", 1, 0, 0.0, speck_px=64, speck_prob=0.6),  # 64 px at 0.6: a false DISCOUNT unless min_area > 64
    ]


def test_score_grades_each_part_as_the_line_would() -> None:
    s = score(parts(), CFG, 0.5, 0)
    assert s["true"].tolist() == [2, 2, 1, 0, 0, 0]
    assert s["pred"].tolist() == [2, 0, 0, 0, 0, 1]
    f = figures(s)
    assert f["escapes"] == 2 and f["escape_rate"] == pytest.approx(2 / 3)
    assert f["false_rejects"] == 1 and f["false_reject_rate"] == pytest.approx(1 / 3)
    assert s["tp"][0] == 400 and s["fn"][1] == 400 and s["fp"][5] == 64
    # image level: a region found in 1 of the 3 defective frames, in 1 of the 3 good ones (the dust)
    assert f["image_recall"] == pytest.approx(1 / 3) and f["image_specificity"] == pytest.approx(2 / 3)


@pytest.mark.parametrize(
    "budget, threshold, min_area, met",
    [
        # No escape allowed: only 0.15 finds the faint discount; it also finds the 100-px speck
        # (kept at min_area 100, a region of exactly that size); min_area 100 drops the 64-px dust.
        (0.0, 0.15, 100, True),
        # One escape in three allowed: 0.25 finds the faint reject, misses the faint discount, and
        # min_area 100 drops the 64-px dust: no false reject at all.
        (0.34, 0.25, 100, True),
        # Everything may escape: the fewest false rejects, then the fewest escapes.
        (1.0, 0.25, 100, True),
    ],
)
def test_tune_minimises_false_rejects_within_the_escape_budget(budget, threshold, min_area, met) -> None:
    report = tune(parts(), CFG, [0.15, 0.25, 0.5], [0, 100], max_escape_rate=budget)
    assert report["chosen"] == {"threshold": threshold, "min_area_px": min_area}
    assert report["budget_met"] is met
    assert report["pooled"]["escape_rate"] <= budget
    grid = {(r["threshold"], r["min_area_px"]): r for r in report["grid"]}
    within = [r for r in grid.values() if r["escape_rate"] <= budget]
    assert grid[(threshold, min_area)]["false_reject_rate"] == min(r["false_reject_rate"] for r in within)


def test_tune_reports_figures_per_fold_and_per_class() -> None:
    report = tune(parts(), CFG, [0.25], [100], max_escape_rate=0.5)
    folds = report["per_fold"]
    assert [f["fold"] for f in folds] == [0, 1] and [f["images"] for f in folds] == [3, 3]
    assert folds[0]["escapes"] == 1 and folds[1]["escapes"] == 0  # the faint discount is in fold 0
    m = report["fold_mean_sd"]["escape_rate"]
    assert m["mean"] == pytest.approx((1 / 2 + 0) / 2) and m["sd"] == pytest.approx(np.std([0.5, 0.0], ddof=1))
    per_class = report["pooled"]["per_class"]
    assert set(per_class) == {"Crack", "Free"} and per_class["Free"]["escape_rate"] is None
    assert [m["image"] for m in report["misgraded"]] == ["discount_faint"]


def test_no_pair_within_the_budget_takes_the_fewest_escapes_and_says_so() -> None:
    report = tune(parts(), CFG, [0.5, 0.7], [0], max_escape_rate=0.1)
    # both miss the faint reject and discount; 0.7 also leaves the dust alone
    assert report["budget_met"] is False and report["chosen"]["threshold"] == 0.7
    with pytest.raises(ExportError, match="--max-escape-rate 2"):
        tune(parts(), CFG, [0.5], [0], max_escape_rate=2)


def test_choose_breaks_ties_by_escapes_then_iou() -> None:
    rows = [
        {"threshold": 0.3, "escape_rate": 0.05, "false_reject_rate": 0.01, "iou": 0.5},
        {"threshold": 0.4, "escape_rate": 0.02, "false_reject_rate": 0.01, "iou": 0.4},
        {"threshold": 0.5, "escape_rate": 0.02, "false_reject_rate": 0.01, "iou": 0.6},
        {"threshold": 0.6, "escape_rate": 0.08, "false_reject_rate": 0.00, "iou": 0.7},
    ]
    assert choose(rows, 0.05) == (rows[2], True)
    assert choose(rows, 0.01) == (rows[2], False)

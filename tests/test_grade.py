"""Grading tables: thresholds are exclusive ("above"), the worst grade wins, the
first rule reaching it decides."""

from __future__ import annotations

import numpy as np
import pytest

from station.config import parse_config
from station.grade import grade
from station.types import Defects, Grade

FRAME = 100 * 100  # px; 1 % = 100 px


def defects(*items: tuple[str, float, str]) -> Defects:
    """(class, area_px, kind) triples."""
    if not items:
        return Defects.empty()
    n = len(items)
    return Defects(
        xyxy=np.zeros((n, 4), np.float32),
        confidence=np.full(n, 0.9, np.float32),
        class_name=np.array([c for c, _, _ in items]),
        area_px=np.array([a for _, a, _ in items], np.float64),
        kind=np.array([k for _, _, k in items]),
    )


RULES = parse_config(
    """
grading:
  total_area_pct: {discount: 0.5, reject: 2.0}
  defect_area_pct: {reject: 1.5}
  classes:
    crack: {count: {reject: 0}}
    spot: {total_area_pct: {discount: 0.1}, count: {discount: 2, reject: 4}}
"""
).grading


@pytest.mark.parametrize(
    "found, total_pct, want, rule",
    [
        ((), 0.0, Grade.PASS, "total_area_pct"),
        ((("dent", 50, "segmentation"),), 0.5, Grade.PASS, "total_area_pct"),  # at the threshold: not above
        ((("dent", 51, "segmentation"),), 0.51, Grade.DISCOUNT, "total_area_pct"),
        ((("dent", 100, "segmentation"), ("dent", 100, "segmentation")), 2.0, Grade.DISCOUNT, "total_area_pct"),
        ((("dent", 100, "segmentation"), ("dent", 101, "segmentation")), 2.01, Grade.REJECT, "total_area_pct"),
        ((("dent", 160, "segmentation"),), 1.6, Grade.REJECT, "defect_area_pct"),  # one big defect
        ((("crack", 1, "detection"),), 0.0, Grade.REJECT, "class.crack.count"),  # any crack
        ((("spot", 11, "segmentation"),), 0.11, Grade.DISCOUNT, "class.spot.total_area_pct"),
        ((("spot", 1, "detection"),) * 3, 0.03, Grade.DISCOUNT, "class.spot.count"),
        ((("spot", 1, "detection"),) * 5, 0.05, Grade.REJECT, "class.spot.count"),
        # total area reaches DISCOUNT first, but a crack REJECTs: the worst grade wins
        ((("dent", 60, "segmentation"), ("crack", 5, "segmentation")), 0.65, Grade.REJECT, "class.crack.count"),
    ],
)
def test_grading_table(found, total_pct, want, rule):
    decision = grade(defects(*found), total_pct, FRAME, RULES)
    assert decision.grade is want, decision
    assert decision.rule == rule
    assert decision.reason


def test_reason_states_value_and_limit():
    decision = grade(defects(("dent", 300, "segmentation")), 3.0, FRAME, parse_config("").grading)
    assert decision.reason == "total defect area 3.000 % > 2.000 %"


def test_disabled_levels():
    rules = parse_config("grading:\n  total_area_pct: {discount: null, reject: 5}\n").grading
    assert grade(defects(), 4.0, FRAME, rules).grade is Grade.PASS
    assert grade(defects(), 5.5, FRAME, rules).grade is Grade.REJECT

"""Defects + rules → Grade and the rule that decided it. Pure.

Every rule compares a value with two thresholds: above ``discount`` the part
is at least DISCOUNT, above ``reject`` it is REJECT. The worst grade wins; among
rules giving it, the first in this order decides: total area, single-defect
area, then each class in config order (its total area, single-defect area,
count).
"""

from __future__ import annotations

import numpy as np

from .config import GradingConfig, Thresholds
from .types import Defects, Grade, GradeDecision


def _level(value: float, th: Thresholds | None) -> tuple[Grade, float | None]:
    """The grade a value earns against ``th`` and the threshold it exceeded."""
    if th is None:
        return Grade.PASS, None
    if th.reject is not None and value > th.reject:
        return Grade.REJECT, th.reject
    if th.discount is not None and value > th.discount:
        return Grade.DISCOUNT, th.discount
    return Grade.PASS, None


def _fmt(value: float, unit: str) -> str:
    return f"{value:.0f}" if unit == "" else f"{value:.3f} {unit}"


def grade(defects: Defects, total_area_pct: float, frame_area_px: int, rules: GradingConfig) -> GradeDecision:
    """Grade one frame.

    total_area_pct: the union of defective pixels, % of the frame.
    frame_area_px: width × height of the source frame, to turn defect areas into %.
    """
    area_pct = defects.area_px * (100.0 / frame_area_px) if len(defects) else np.zeros(0)
    checks: list[tuple[str, str, float, Thresholds | None, str]] = [
        ("total_area_pct", "total defect area", total_area_pct, rules.total_area_pct, "%"),
    ]
    if rules.defect_area_pct is not None:
        biggest = float(area_pct.max()) if area_pct.size else 0.0
        checks.append(("defect_area_pct", "largest defect", biggest, rules.defect_area_pct, "%"))
    for name, rule in rules.classes.items():
        of_class = defects.class_name == name
        pct = area_pct[of_class]
        if rule.total_area_pct is not None:
            checks.append((f"class.{name}.total_area_pct", f"{name} area", float(pct.sum()), rule.total_area_pct, "%"))
        if rule.defect_area_pct is not None:
            checks.append(
                (f"class.{name}.defect_area_pct", f"largest {name}", float(pct.max()) if pct.size else 0.0, rule.defect_area_pct, "%")
            )
        if rule.count is not None:
            checks.append((f"class.{name}.count", f"{name} count", float(of_class.sum()), rule.count, ""))

    worst: GradeDecision | None = None
    for rule_id, label, value, th, unit in checks:
        level, limit = _level(value, th)
        if level is Grade.PASS:
            continue
        assert limit is not None  # a level above PASS comes with the threshold it exceeded
        if worst is None or level.severity > worst.grade.severity:
            worst = GradeDecision(level, rule_id, f"{label} {_fmt(value, unit)} > {_fmt(limit, unit)}")
    if worst is not None:
        return worst
    th = rules.total_area_pct
    bound = th.discount if th.discount is not None else th.reject
    within = f" ≤ {_fmt(bound, '%')}" if bound is not None else ""
    return GradeDecision(Grade.PASS, "total_area_pct", f"total defect area {_fmt(total_area_pct, '%')}{within}; no rule exceeded")

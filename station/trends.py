"""Where defects sit and how counts go over time: the arithmetic shared by the
operator's live page (station/view/) and ``station report`` (station/report.py).

Pure: result records (``messages.result_record``) in, figures out; no threads,
no I/O. Positions are normalised to the frame the record was made from
(``record["image"]``: the camera frames the part), so frames of any size add
up: a heatmap cell is a fraction of the part, not a pixel.

Times are UNIX seconds; hours and shifts follow the host's local time (``TZ``),
as the people on the line read a clock.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Sequence
from datetime import date, datetime, time, timedelta

import numpy as np

GRID = 12  # heatmap cells per side: the part's halves and thirds fall on cell edges
GRADES = ("PASS", "DISCOUNT", "REJECT")
QUADRANTS = ("top-left", "top-right", "bottom-left", "bottom-right")
# A class whose largest quadrant holds at least this share of its area "clusters" there.
CLUSTER_SHARE = 0.5


def record_time(record: dict) -> float | None:
    """A record's ``captured_at`` (ISO 8601, as ``messages.iso_time`` writes it) as UNIX
    seconds; None when absent or unreadable (an error record has none)."""
    value = record.get("captured_at")
    if not isinstance(value, str):
        return None
    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


def _spread(lo: float, hi: float) -> np.ndarray:
    """(GRID,) share of the interval [lo, hi) (fractions of the side, clipped to [0, 1])
    falling in each cell; a zero-width interval is all in the cell holding it."""
    lo, hi = min(max(lo, 0.0), 1.0), min(max(hi, 0.0), 1.0)
    edges = np.arange(GRID + 1) / GRID
    if hi - lo <= 1e-9:
        out = np.zeros(GRID)
        out[min(int(lo * GRID), GRID - 1)] = 1.0
        return out
    overlap = np.clip(np.minimum(hi, edges[1:]) - np.maximum(lo, edges[:-1]), 0.0, None)
    return overlap / (hi - lo)


def box_cells(bbox: Sequence[float], width: int, height: int) -> np.ndarray:
    """(GRID, GRID) share of a box ``[x1, y1, x2, y2]`` (pixels of a ``width`` × ``height``
    frame) in each cell, row 0 at the top; sums to 1."""
    x1, y1, x2, y2 = (float(v) for v in bbox)
    return np.outer(_spread(y1 / height, y2 / height), _spread(x1 / width, x2 / width))


class Heatmap:
    """Defect area per class over a GRID × GRID grid of the part.

    Each defect adds its ``area_pct`` (% of the frame) spread evenly over its box, so a
    cell holds the defect area seen there, in % of a part, summed over the parts."""

    def __init__(self) -> None:
        self.grids: dict[str, np.ndarray] = {}
        self.defects: Counter[str] = Counter()  # defects per class

    def add(self, record: dict) -> None:
        """One result record's defects; an error record, or one without ``image``, adds nothing."""
        image = record.get("image")
        if not isinstance(image, dict) or "grade" not in record:
            return
        width, height = int(image["width"]), int(image["height"])
        for defect in record.get("defects") or ():
            grid = self.grids.get(defect["class"])
            if grid is None:
                grid = self.grids[defect["class"]] = np.zeros((GRID, GRID))
            grid += box_cells(defect["bbox"], width, height) * float(defect["area_pct"])
            self.defects[defect["class"]] += 1

    def classes(self) -> list[str]:
        """The classes seen, the most defect area first."""
        return sorted(self.grids, key=lambda c: (-float(self.grids[c].sum()), c))

    def hot_cell(self, cls: str) -> tuple[int, int]:
        """(row, column) of the class's cell with the most defect area, row 0 at the top."""
        row, col = np.unravel_index(int(np.argmax(self.grids[cls])), (GRID, GRID))
        return int(row), int(col)

    def quadrant_shares(self, cls: str) -> dict[str, float]:
        """Share (0-1) of the class's defect area in each quadrant of the part."""
        grid, h = self.grids[cls], GRID // 2
        total = float(grid.sum())
        sums = (grid[:h, :h].sum(), grid[:h, h:].sum(), grid[h:, :h].sum(), grid[h:, h:].sum())
        return {q: (float(s) / total if total > 0 else 0.0) for q, s in zip(QUADRANTS, sums)}

    def where(self, cls: str) -> str:
        """Where the class's defects cluster, in words, e.g. ``crack: 92 % of defect area in
        the top-left quadrant``; or that they spread, naming the largest quadrant."""
        shares = self.quadrant_shares(cls)
        top = max(QUADRANTS, key=lambda q: shares[q])
        pct = math.floor(shares[top] * 100 + 0.5)
        if shares[top] >= CLUSTER_SHARE:
            return f"{cls}: {pct} % of defect area in the {top} quadrant"
        return f"{cls}: spread over the part (at most {pct} % of defect area in one quadrant, the {top})"

    def as_dict(self) -> dict[str, dict]:
        """JSON-ready: per class (most area first) the grid (rows of % of a part, 4 decimals),
        the number of defects, the hot cell and :meth:`where`."""
        return {
            cls: {
                "grid": np.round(self.grids[cls], 4).tolist(),
                "defects": self.defects[cls],
                "hot": list(self.hot_cell(cls)),
                "where": self.where(cls),
            }
            for cls in self.classes()
        }


# --- time buckets ---------------------------------------------------------------------


def _at(day: date, hhmm: str) -> float:
    hour, minute = (int(v) for v in hhmm.split(":"))
    return datetime.combine(day, time(hour, minute)).timestamp()  # naive: the host's local time


def shift_bounds(ts: float, starts: Sequence[str]) -> tuple[float, float]:
    """(start, end) in UNIX seconds of the shift holding ``ts``; ``starts``: the local
    times (``HH:MM``) at which shifts begin, every day."""
    today = datetime.fromtimestamp(ts).date()
    times = sorted(_at(today + timedelta(days=d), s) for d in (-1, 0, 1) for s in starts)
    begin = max(t for t in times if t <= ts)
    return begin, min(t for t in times if t > ts)


def hour_start(ts: float) -> float:
    """The start of the local hour holding ``ts``, UNIX seconds."""
    return datetime.fromtimestamp(ts).replace(minute=0, second=0, microsecond=0).timestamp()


def local_label(ts: float, with_date: bool = True) -> str:
    """``2026-11-21 14:00`` (or ``14:00``) in local time."""
    return datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M" if with_date else "%H:%M")


class GradeCounts:
    """Counts per grade (and error records) in time buckets keyed by their start (UNIX s)."""

    def __init__(self) -> None:
        self.buckets: dict[float, Counter[str]] = {}

    def add(self, bucket: float, record: dict) -> None:
        counts = self.buckets.setdefault(bucket, Counter())
        counts[str(record["grade"]) if "grade" in record else "errors"] += 1

    def rows(self) -> list[tuple[float, dict[str, int]]]:
        """(bucket start, {PASS, DISCOUNT, REJECT, errors}) in time order."""
        keys = (*GRADES, "errors")
        return [(b, {k: self.buckets[b][k] for k in keys}) for b in sorted(self.buckets)]


def grade_totals(records: Iterable[dict]) -> dict[str, int]:
    """{PASS, DISCOUNT, REJECT, errors}: how many records of each."""
    counts = Counter(str(r["grade"]) if "grade" in r else "errors" for r in records)
    return {k: counts[k] for k in (*GRADES, "errors")}

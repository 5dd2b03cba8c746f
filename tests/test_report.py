"""``station report`` over real records: parts inspected by ``station replay`` with
their defects in one corner must be reported there, in words and in the heatmap;
archived parts bring their images; the file stands alone. And the arithmetic of
station/trends.py that the report and the live page share."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

from station.archive import Archive
from station.cli import main
from station.config import ArchiveConfig
from station.trends import GRID, Heatmap, box_cells, shift_bounds
from viewkit import corner_image, corner_parts


@pytest.fixture
def utc(monkeypatch):
    """Local time is UTC, so hours and shifts are the records' own."""
    monkeypatch.setenv("TZ", "UTC")
    time.tzset()
    yield
    monkeypatch.undo()
    time.tzset()


def defect(cls: str, bbox: list[float], area_pct: float) -> dict:
    return {"class": cls, "score": 0.9, "bbox": bbox, "area_px": 1.0, "area_pct": area_pct, "kind": "detection"}


def record(rid: str, grade: str, defects: list[dict], at: str = "2026-11-21T10:02:11.532Z", size=(200, 100)) -> dict:
    return {"schema_version": 1, "id": rid, "station_id": "s", "source": f"{rid}.png", "seq": 0, "part_id": None,
            "captured_at": at, "image": {"width": size[0], "height": size[1]}, "grade": grade, "rule": "total_area_pct",
            "reason": "r", "defect_area_pct": sum(d["area_pct"] for d in defects), "defect_area_px": 1.0,
            "defects": defects, "models": {"segmentation": "0" * 64}, "latency_ms": {}}


# --- the command on a real run --------------------------------------------------------------


def test_report_of_a_replayed_run_names_the_corner_and_the_class(tmp_path, threshold_model, capsys):
    images = tmp_path / "parts"
    images.mkdir()
    rng = np.random.default_rng(5)
    for i in range(10):
        cv2.imwrite(str(images / f"p{i:02d}.png"), corner_image(rng, defects=i % 5 != 4))
    results = tmp_path / "run.jsonl"
    assert main(["replay", str(images), "--seg-model", str(threshold_model), "--out", str(results), "-q"]) == 0
    out = tmp_path / "report" / "report.html"
    capsys.readouterr()
    assert main(["report", str(results), "--out", str(out)]) == 0
    said = capsys.readouterr().out
    assert "defect: 100 % of defect area in the top-left quadrant" in said
    page = out.read_text(encoding="utf-8")
    assert "defect: 100 % of defect area in the top-left quadrant" in page
    # one file: nothing fetched, no script
    assert not re.search(r'(src|href)="(?!data:)', page) and "<script" not in page
    hot = re.search(r'<rect x="(\d+)" y="(\d+)" width="1" height="1" fill="none"', page)
    assert hot is not None and int(hot.group(1)) < GRID // 2 and int(hot.group(2)) < GRID // 2


def test_report_shows_the_worst_archived_parts_with_their_images(tmp_path, threshold_model, capsys):
    archive = Archive(ArchiveConfig(enabled=True, grades=["PASS", "DISCOUNT", "REJECT"], what=["image", "overlay"]),
                      tmp_path / "archive")
    parts = corner_parts(threshold_model, 6)
    for frame, result, rec in parts:
        archive.save(frame.image, result, rec)
    jsonl = tmp_path / "run.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for _, _, r in parts) + "not json\n", encoding="utf-8")
    out = tmp_path / "r.html"
    assert main(["report", str(jsonl), "--archive", str(tmp_path / "archive"), "--out", str(out), "--worst", "3"]) == 0
    page = out.read_text(encoding="utf-8")
    assert page.count('class="part"') == 3 and page.count("data:image/jpeg;base64,") == 3
    assert "1 lines that are not records were skipped" in page
    worst = max((r for _, _, r in parts), key=lambda r: r["defect_area_pct"])
    assert page.index(worst["source"]) < page.index("</div></div>")  # the largest defect area comes first
    # the archive folder alone is a source too: its records, and its images
    assert main(["report", str(tmp_path / "archive"), "--out", str(out)]) == 0
    assert "6 parts" in capsys.readouterr().out.splitlines()[-2]
    with_defects = sum(1 for _, _, r in parts if r["defects"])  # a part without one is not among the worst
    assert out.read_text(encoding="utf-8").count("data:image/jpeg;base64,") == with_defects == 5


def test_trend_per_hour_counts_each_grade_and_errors_are_counted_apart(tmp_path, utc, capsys):
    records = [record(f"a{i}", "PASS", []) for i in range(3)]
    records += [record("b", "REJECT", [defect("crack", [150, 60, 200, 100], 5.0)], at="2026-11-21T12:30:00.000Z")]
    records += [record("a0", "PASS", [])]  # a re-send: counted once
    records += [{"schema_version": 1, "id": "e", "source": "x", "seq": 1, "error": "cannot decode"}]
    path = tmp_path / "r.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    out = tmp_path / "r.html"
    assert main(["report", str(path), "--out", str(out), "--per", "hour"]) == 0
    said = capsys.readouterr().out
    assert said.startswith(f"{out}: 4 parts (3 PASS, 0 DISCOUNT, 1 REJECT), 1 errors")
    assert "crack: 100 % of defect area in the bottom-right quadrant" in said
    page = out.read_text(encoding="utf-8")
    assert "<tr><td>2026-11-21 10:00</td><td>3</td><td>0</td><td>0</td>" in page
    assert "<tr><td>2026-11-21 12:00</td><td>0</td><td>0</td><td>1</td>" in page
    assert "1 duplicate records" in page


@pytest.mark.parametrize("argv, message", [
    (["report", "missing.jsonl", "--out", "r.html"], "no such file"),
    (["report", "empty.jsonl", "--out", "r.html"], "no records"),
])
def test_report_refuses_what_it_cannot_read(tmp_path, monkeypatch, capsys, argv, message):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "empty.jsonl").write_text("\n")
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_bad_shift_starts_are_a_usage_error(tmp_path):
    with pytest.raises(SystemExit) as exc:
        main(["report", str(tmp_path), "--out", "r.html", "--shifts", "6:00"])
    assert exc.value.code == 2


# --- the shared arithmetic ------------------------------------------------------------------


@pytest.mark.parametrize("bbox, where", [
    ([0, 0, 20, 10], "top-left"),
    ([180, 0, 200, 10], "top-right"),
    ([0, 90, 20, 100], "bottom-left"),
    ([150, 60, 200, 100], "bottom-right"),
    ([10, 10, 10, 10], "top-left"),  # a box of no size is a point
])
def test_a_defect_lands_in_its_quadrant(bbox, where):
    cells = box_cells(bbox, 200, 100)
    assert cells.shape == (GRID, GRID) and cells.sum() == pytest.approx(1.0)
    heatmap = Heatmap()
    heatmap.add(record("r", "REJECT", [defect("crack", bbox, 2.0)]))
    assert heatmap.where("crack") == f"crack: 100 % of defect area in the {where} quadrant"


def test_defects_spread_over_the_part_are_said_to_be_spread():
    heatmap = Heatmap()
    boxes = [[0, 0, 100, 50], [100, 0, 200, 50], [0, 50, 100, 100], [100, 50, 200, 100]]
    heatmap.add(record("r", "REJECT", [defect("dent", b, a) for b, a in zip(boxes, (1.0, 1.0, 1.0, 1.2))]))
    assert heatmap.where("dent") == "dent: spread over the part (at most 29 % of defect area in one quadrant, the bottom-right)"
    assert heatmap.hot_cell("dent")[0] >= GRID // 2


def test_frames_of_any_size_add_up_on_the_part():
    heatmap = Heatmap()
    heatmap.add(record("a", "REJECT", [defect("pit", [0, 0, 10, 10], 1.0)], size=(120, 120)))
    heatmap.add(record("b", "REJECT", [defect("pit", [0, 0, 100, 100], 1.0)], size=(1200, 1200)))
    assert heatmap.hot_cell("pit") == (0, 0)
    assert float(heatmap.grids["pit"][0, 0]) == pytest.approx(2.0)  # both fill the same cell of the part


@pytest.mark.parametrize("clock, shift", [
    ("05:59", ("22:00", "06:00")),
    ("06:00", ("06:00", "14:00")),
    ("21:59", ("14:00", "22:00")),
    ("23:30", ("22:00", "06:00")),
])
def test_shifts_run_from_one_start_to_the_next_across_midnight(utc, clock, shift):
    from datetime import datetime, timezone

    ts = datetime.fromisoformat(f"2026-11-21T{clock}:00").replace(tzinfo=timezone.utc).timestamp()
    begin, end = shift_bounds(ts, ["06:00", "14:00", "22:00"])
    assert (time.strftime("%H:%M", time.gmtime(begin)), time.strftime("%H:%M", time.gmtime(end))) == shift
    assert begin <= ts < end


def test_paths_in_the_report_are_escaped(tmp_path):
    rec = record("x", "REJECT", [defect("<b>", [0, 0, 5, 5], 1.0)])
    rec["source"] = "<img src=x onerror=alert(1)>"
    path = tmp_path / "r.jsonl"
    path.write_text(json.dumps(rec) + "\n")
    out = tmp_path / "r.html"
    assert main(["report", str(path), "--out", str(out)]) == 0
    page = Path(out).read_text(encoding="utf-8")
    assert "<img src=x" not in page and "&lt;b&gt;" in page

"""Archive: which results are kept, the files and names written, atomic writes,
pruning by age and size from an index built once, and disk errors that never
reach the caller."""

from __future__ import annotations

import errno
import json
import logging
import os
import uuid
from datetime import datetime, timezone
from pathlib import Path

import cv2
import numpy as np
import pytest
import yaml
from pydantic import ValidationError

from station import archive as archive_mod
from station.archive import Archive
from station.config import ArchiveConfig
from station.messages import error_record, result_record
from station.overlay import draw_overlay
from station.types import Defects, Grade, GradeDecision, InspectionResult

T0 = datetime(2025, 6, 1, 10, 11, 12, 500_000, tzinfo=timezone.utc).timestamp()
DAY = 86400.0


def make_result(grade: Grade = Grade.REJECT, captured_at: float = T0, with_mask: bool = True, rid: str | None = None,
                size: tuple[int, int] = (48, 64)) -> tuple[np.ndarray, InspectionResult, dict]:
    h, w = size
    rng = np.random.default_rng(7)
    image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    mask = np.zeros((h, w), bool)
    mask[10:20, 12:30] = True
    defects = Defects(
        xyxy=np.array([[12, 10, 30, 20]], np.float32),
        confidence=np.array([0.9], np.float32),
        class_name=np.array(["scratch"]),
        area_px=np.array([180.0]),
        kind=np.array(["segmentation"]),
    )
    result = InspectionResult(
        id=rid or uuid.uuid4().hex,
        station_id="st-1",
        source="camera",
        seq=3,
        part_id="P1",
        captured_at=captured_at,
        width=w,
        height=h,
        decision=GradeDecision(grade, "total_area_pct", "because"),
        defects=defects,
        defect_area_px=180.0,
        defect_area_pct=100 * 180.0 / (h * w),
        models={"segmentation": "ab" * 32},
        latency_ms={"total": 3.0},
        mask=mask if with_mask else None,
    )
    return image, result, result_record(result)


def cfg(**kw) -> ArchiveConfig:
    base = dict(enabled=True, max_age_days=None, max_total_mb=None)
    base.update(kw)
    return ArchiveConfig(**base)


def files_under(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


# --- config ------------------------------------------------------------------------------


def test_config_defaults_and_yaml_shape():
    c = ArchiveConfig()
    assert c.enabled is False and c.grades == [Grade.REJECT, Grade.DISCOUNT] and c.errors is False
    assert c.what == ["image", "mask", "overlay"] and c.max_age_days == 30 and c.max_total_mb == 2048
    text = """
enabled: true
path: /var/lib/station/archive
grades: [REJECT]
errors: true
what: [image, overlay]
max_age_days: 7
max_total_mb: 512
"""
    c = ArchiveConfig.model_validate(yaml.safe_load(text))
    assert c.grades == [Grade.REJECT] and c.what == ["image", "overlay"] and c.path == Path("/var/lib/station/archive")
    for field in ArchiveConfig.model_fields.values():
        assert field.description


@pytest.mark.parametrize(
    "data, message",
    [
        ({"grade": ["REJECT"]}, "Extra inputs are not permitted"),
        ({"grades": ["BROKEN"]}, "grades"),
        ({"grades": ["REJECT", "REJECT"]}, "listed twice"),
        ({"what": ["image", "thumbnail"]}, "what"),
        ({"what": ["mask", "mask"]}, "listed twice"),
        ({"max_age_days": 0}, "greater than 0"),
        ({"max_total_mb": -1}, "greater than 0"),
    ],
)
def test_config_rejects(data, message):
    with pytest.raises(ValidationError, match=message):
        ArchiveConfig.model_validate(data)


def test_config_is_frozen():
    with pytest.raises(ValidationError):
        ArchiveConfig().enabled = True


# --- saving ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "grade, grades, archived",
    [
        (Grade.REJECT, None, True),
        (Grade.DISCOUNT, None, True),
        (Grade.PASS, None, False),
        (Grade.DISCOUNT, [Grade.REJECT], False),
        (Grade.PASS, [Grade.PASS], True),
    ],
)
def test_which_grades_are_archived(tmp_path, grade, grades, archived):
    a = Archive(cfg(**({} if grades is None else {"grades": grades})), tmp_path)
    image, result, record = make_result(grade)
    assert a.wants(result) is archived
    paths = a.save(image, result, record)
    assert bool(paths) is archived
    assert bool(files_under(tmp_path)) is archived


def test_files_names_and_contents(tmp_path):
    a = Archive(cfg(), tmp_path)
    image, result, record = make_result(Grade.REJECT, rid="r-1")
    paths = a.save(image, result, record)
    # 10:11:12.5 UTC on 2025-06-01
    assert [str(p.relative_to(tmp_path)) for p in paths] == [
        "2025-06-01/101112_r-1_image.png",
        "2025-06-01/101112_r-1_mask.png",
        "2025-06-01/101112_r-1_overlay.png",
        "2025-06-01/101112_r-1_record.json",
    ]
    assert files_under(tmp_path) == sorted(str(p.relative_to(tmp_path)) for p in paths)  # no temporaries left
    saved_image, mask, overlay = (cv2.imread(str(p), cv2.IMREAD_UNCHANGED) for p in paths[:3])
    assert np.array_equal(saved_image, image)
    assert mask.dtype == np.uint8 and set(np.unique(mask).tolist()) == {0, 255}
    assert np.array_equal(mask > 0, result.mask)
    assert np.array_equal(overlay, draw_overlay(image, result))
    assert json.loads(paths[3].read_text(encoding="utf-8")) == record
    assert a.total_bytes == sum(p.stat().st_size for p in paths) and len(a) == 1
    assert a.stats()["saved"] == 1 and a.stats()["files_written"] == 4


def test_gray_frames_and_ids_that_are_not_filenames(tmp_path):
    a = Archive(cfg(what=["image"]), tmp_path)
    image, result, record = make_result(rid="../a_b/c d")
    gray = cv2.cvtColor(image, cv2.COLOR_BGR2GRAY)
    paths = a.save(gray, result, record)
    assert [p.name for p in paths] == ["101112_a-b-c-d_image.png", "101112_a-b-c-d_record.json"]
    assert all(p.parent == tmp_path / "2025-06-01" for p in paths)
    assert np.array_equal(cv2.imread(str(paths[0]), cv2.IMREAD_UNCHANGED), gray)


@pytest.mark.parametrize(
    "what, with_mask, parts",
    [
        (["image", "mask", "overlay"], False, ["image", "overlay", "record"]),  # no mask: none written
        (["mask"], True, ["mask", "record"]),
        ([], True, ["record"]),
    ],
)
def test_what_is_written(tmp_path, what, with_mask, parts):
    a = Archive(cfg(what=what), tmp_path)
    image, result, record = make_result(with_mask=with_mask)
    paths = a.save(image, result, record)
    assert [p.stem.rsplit("_", 1)[1] for p in paths] == parts


def test_error_records_only_when_configured(tmp_path):
    image, _, _ = make_result()
    record = error_record("camera", "inspection failed: boom", seq=4, station_id="st-1")
    assert Archive(cfg(), tmp_path / "off").save_error(record, image, T0) == []
    a = Archive(cfg(errors=True), tmp_path / "on")
    paths = a.save_error(record, image, T0)
    assert [p.name for p in paths] == [f"101112_{record['id']}_image.png", f"101112_{record['id']}_record.json"]
    assert [p.name for p in a.save_error(error_record("x.png", "cannot decode"), None, T0)][0].endswith("_record.json")


def test_disabled_touches_nothing(tmp_path):
    root = tmp_path / "archive"
    a = Archive(ArchiveConfig(grades=[Grade.PASS, Grade.DISCOUNT, Grade.REJECT], errors=True), root)
    image, result, record = make_result()
    assert a.save(image, result, record) == [] and a.save_error(record, image) == []
    assert a.prune() == (0, 0)
    assert not root.exists()


def test_utc_date_from_captured_at(tmp_path):
    a = Archive(cfg(what=[]), tmp_path)
    late = datetime(2025, 12, 31, 23, 59, 59, tzinfo=timezone.utc).timestamp()
    image, result, record = make_result(captured_at=late, rid="x")
    assert a.save(image, result, record)[0].relative_to(tmp_path) == Path("2025-12-31/235959_x_record.json")


# --- disk errors ---------------------------------------------------------------------------


def test_unwritable_root_is_logged_and_counted(tmp_path, caplog):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("x")
    with caplog.at_level(logging.ERROR, logger="station.archive"):
        a = Archive(cfg(), blocker)
    image, result, record = make_result(rid="r-9")
    with caplog.at_level(logging.ERROR, logger="station.archive"):
        assert a.save(image, result, record) == []
        assert a.save(image, result, record) == []
    assert a.stats()["errors"] == 1 + 2 and len(a) == 0  # the start-up scan, then each save
    assert "r-9" in caplog.text and str(blocker) in caplog.text


def test_a_failure_mid_entry_leaves_no_files(tmp_path, monkeypatch):
    a = Archive(cfg(), tmp_path)
    real_replace = os.replace
    calls = []

    def replace(src, dst):
        calls.append(dst)
        if len(calls) == 3:  # the overlay: the disk filled up
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_replace(src, dst)

    monkeypatch.setattr(archive_mod.os, "replace", replace)
    image, result, record = make_result()
    assert a.save(image, result, record) == []
    assert files_under(tmp_path) == []  # the two renamed files and the temporary are gone
    assert a.stats()["errors"] == 1 and a.total_bytes == 0
    monkeypatch.setattr(archive_mod.os, "replace", real_replace)
    assert len(a.save(image, result, record)) == 4  # the next one works again


def test_unencodable_record_is_an_error_not_an_exception(tmp_path):
    a = Archive(cfg(), tmp_path)
    image, result, record = make_result()
    assert a.save(image, result, {**record, "bad": float("nan")}) == []
    assert a.stats()["errors"] == 1 and files_under(tmp_path) == []


# --- pruning ---------------------------------------------------------------------------------


def fill(a: Archive, times: list[float]) -> list[list[Path]]:
    out = []
    for i, t in enumerate(times):
        image, result, record = make_result(captured_at=t, rid=f"e{i}")
        paths = a.save(image, result, record)
        assert paths
        out.append(paths)
    return out


def test_prune_by_age_removes_whole_entries_and_empty_days(tmp_path):
    a = Archive(cfg(max_age_days=2), tmp_path)
    times = [T0 - 5 * DAY, T0 - 3 * DAY, T0 - 3 * DAY + 60, T0 - 1 * DAY, T0]
    entries = fill(a, times)
    old_bytes = sum(p.stat().st_size for e in entries[:3] for p in e)
    assert a.prune(now=T0) == (12, old_bytes)
    assert sorted(os.listdir(tmp_path)) == ["2025-05-31", "2025-06-01"]  # 2025-05-27 and -29 folders went
    assert all(not p.exists() for e in entries[:3] for p in e)
    assert all(p.exists() for e in entries[3:] for p in e)
    assert a.prune(now=T0) == (0, 0)
    assert len(a) == 2 and a.total_bytes == sum(p.stat().st_size for e in entries[3:] for p in e)
    assert a.stats()["pruned_entries"] == 3 and a.stats()["bytes_freed"] == old_bytes


def test_prune_by_size_keeps_the_newest(tmp_path):
    one = Archive(cfg(), tmp_path / "probe")
    entry_bytes = sum(p.stat().st_size for p in fill(one, [T0])[0])
    limit_mb = 2.5 * entry_bytes / (1024 * 1024)  # room for two entries and a half
    a = Archive(cfg(max_total_mb=limit_mb), tmp_path / "a")
    entries = fill(a, [T0 + i for i in range(5)])
    removed, freed = a.prune(now=T0)
    assert (removed, freed) == (12, 3 * entry_bytes)
    assert [all(p.exists() for p in e) for e in entries] == [False, False, False, True, True]
    assert a.total_bytes == 2 * entry_bytes <= limit_mb * 1024 * 1024


def test_prune_goes_by_capture_time_not_save_order(tmp_path):
    a = Archive(cfg(max_age_days=1), tmp_path)
    late, early = fill(a, [T0, T0 - 2 * DAY])  # an old result archived late (e.g. from the outbox)
    early_bytes = sum(p.stat().st_size for p in early)
    assert a.prune(now=T0) == (4, early_bytes)
    assert all(p.exists() for p in late)


def test_restart_indexes_what_is_there(tmp_path):
    a = Archive(cfg(), tmp_path)
    entries = fill(a, [T0 - 3 * DAY, T0 - 2 * DAY, T0])
    total = a.total_bytes
    day = tmp_path / "2025-06-01"
    (day / ".101112_e2_image.png.1234abcd.tmp").write_bytes(b"half a file")  # a crash mid-write
    (day / "notes.txt").write_text("someone else's file")
    (tmp_path / "2025-01-01").mkdir()  # an empty day folder
    (tmp_path / "unrelated").mkdir()

    b = Archive(cfg(max_age_days=1), tmp_path)
    assert len(b) == 3 and b.total_bytes == total
    assert not (day / ".101112_e2_image.png.1234abcd.tmp").exists()
    assert not (tmp_path / "2025-01-01").exists()
    assert (day / "notes.txt").exists() and (tmp_path / "unrelated").is_dir()
    removed, _ = b.prune(now=T0 + 1)
    assert removed == 8
    assert all(p.exists() for p in entries[2])
    assert (tmp_path / "2025-06-01").is_dir()


def test_prune_does_not_rescan(tmp_path, monkeypatch):
    a = Archive(cfg(max_age_days=1), tmp_path)
    fill(a, [T0 - 3 * DAY + i for i in range(20)] + [T0])

    def no_scan(*args, **kw):
        raise AssertionError("prune must not list folders")

    monkeypatch.setattr(archive_mod.os, "listdir", no_scan)
    monkeypatch.setattr(archive_mod.os, "scandir", no_scan)
    monkeypatch.setattr(Path, "iterdir", no_scan)
    monkeypatch.setattr(Path, "rglob", no_scan)
    monkeypatch.setattr(Path, "stat", no_scan)
    for _ in range(100):
        assert a.prune(now=T0 - 2 * DAY) == (0, 0)  # nothing due: no disk access at all
    removed, _ = a.prune(now=T0)
    assert removed == 80 and len(a) == 1


def test_files_deleted_behind_its_back(tmp_path):
    a = Archive(cfg(max_age_days=1), tmp_path)
    (entry,) = fill(a, [T0 - 2 * DAY])
    entry[0].unlink()
    remaining = sum(p.stat().st_size for p in entry[1:])
    assert a.prune(now=T0) == (3, remaining)  # the missing file is neither an error nor counted
    assert a.total_bytes == 0 and not any(tmp_path.iterdir()) and a.stats()["errors"] == 0


def test_resaving_the_same_result_replaces_its_entry(tmp_path):
    a = Archive(cfg(), tmp_path)
    image, result, record = make_result(rid="same")
    first = a.save(image, result, record)
    second = a.save(image, result, record)
    assert first == second and len(a) == 1
    assert a.total_bytes == sum(p.stat().st_size for p in second)
    assert a.prune(now=T0 + 400 * DAY) == (0, 0)  # no limits configured

"""Payloads: every record validates against the shipped schema; the mask
encoding round-trips."""

from __future__ import annotations

import base64
import dataclasses
import json

import cv2
import jsonschema
import numpy as np
import pytest

from station.messages import (
    dumps,
    encode_mask,
    error_record,
    load_schema,
    result_record,
    stamp_sent,
    stats_record,
    status_record,
)
from station.types import Defects, Grade, GradeDecision, InspectionResult

VALIDATOR = jsonschema.Draft202012Validator(load_schema())


def result(mask: np.ndarray | None) -> InspectionResult:
    return InspectionResult(
        id="0b8e5a1e-0000-4000-8000-000000000001", station_id="cam1", source="cam", seq=3, part_id="P1",
        captured_at=1_700_000_000.25, width=40, height=30,
        decision=GradeDecision(Grade.DISCOUNT, "total_area_pct", "total defect area 1.000 % > 0.500 %"),
        defects=Defects(np.array([[1, 2, 5, 6]], np.float32), np.array([0.87654], np.float32), np.array(["spot"]),
                        np.array([12.0]), np.array(["segmentation"])),
        defect_area_px=12.0, defect_area_pct=1.0, models={"segmentation": "a" * 64},
        latency_ms={"total": 1.23456}, mask=mask,
    )


@pytest.mark.parametrize("shape", [(30, 40), (1, 1), (300, 2000)])
def test_mask_round_trip(shape):
    rng = np.random.default_rng(0)
    mask = rng.random(shape) > 0.9
    enc = encode_mask(mask)
    assert (enc["width"], enc["height"]) == (shape[1], shape[0])
    back = cv2.imdecode(np.frombuffer(base64.b64decode(enc["data"]), np.uint8), cv2.IMREAD_UNCHANGED)
    assert np.array_equal(back > 0, mask)


def test_records_validate_and_round():
    mask = np.zeros((30, 40), bool)
    mask[2:6, 1:4] = True
    with_mask = result_record(result(mask), include_mask=True)
    without = result_record(result(mask))
    for record in (with_mask, without, error_record("x.png", "cannot decode", 4, "cam1", "P2")):
        VALIDATOR.validate(record)
        VALIDATOR.validate(json.loads(stamp_sent(dumps(record).encode(), 1_700_000_001.0, True)))
    assert "mask" in with_mask and "mask" not in without
    assert without["defects"][0]["score"] == 0.8765 and without["captured_at"] == "2023-11-14T22:13:20.250Z"
    assert result_record(result(None), include_mask=True).get("mask") is None


def test_the_camera_timestamp_is_in_the_record_only_when_the_camera_gave_one():
    stamped = result_record(dataclasses.replace(result(None), camera_timestamp_ns=1_700_000_000_250_000_123))
    VALIDATOR.validate(stamped)
    assert stamped["camera_timestamp_ns"] == 1_700_000_000_250_000_123
    assert "camera_timestamp_ns" not in result_record(result(None))


def test_status_and_stats_payloads_are_json():
    assert status_record("online", "cam1")["state"] == "online"
    with pytest.raises(ValueError):
        status_record("sleeping", "cam1")
    stats = stats_record("cam1", 1.0, {"PASS": 2}, 0, 9.5, {"total": {"p50": 1.0, "p99": 2.0}}, 1, 0, 0, False,
                         {"segmentation": ["CPUExecutionProvider"]}, "connected")
    assert json.loads(dumps(stats))["grades"] == {"PASS": 2, "DISCOUNT": 0, "REJECT": 0}

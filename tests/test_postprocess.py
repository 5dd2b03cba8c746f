"""Mask → regions and detections → boxes, in source-frame pixels."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from station.modelcard import DetectionOutputs
from station.postprocess import detection_defects, mask_defects
from station.preprocess import Geometry, fit


def blobs(h: int, w: int, rects: list[tuple[int, int, int, int]], p: float = 0.9) -> np.ndarray:
    prob = np.full((h, w, 1), 0.05, np.float32)
    for x1, y1, x2, y2 in rects:
        prob[y1:y2, x1:x2, 0] = p
    return prob


@pytest.mark.parametrize(
    "rects, min_area, boxes, areas",
    [
        ([], 0, [], []),
        ([(10, 20, 30, 25)], 0, [[10, 20, 30, 25]], [100]),
        ([(10, 20, 30, 25), (50, 50, 52, 52)], 0, [[10, 20, 30, 25], [50, 50, 52, 52]], [100, 4]),
        ([(10, 20, 30, 25), (50, 50, 52, 52)], 5, [[10, 20, 30, 25]], [100]),  # the 4 px speck is dropped
        ([(0, 0, 64, 64)], 0, [[0, 0, 64, 64]], [4096]),
    ],
)
def test_regions_table(rects, min_area, boxes, areas):
    prob = blobs(64, 64, rects)
    defects, mask = mask_defects(prob, Geometry.identity(64, 64), 0.5, ["defect"], min_area)
    order = np.argsort(defects.xyxy[:, 0]) if len(defects) else []
    assert defects.xyxy[order].tolist() == boxes
    assert defects.area_px[order].tolist() == areas
    assert mask.sum() == sum(areas)  # dropped regions leave the mask too
    assert np.allclose(defects.confidence, 0.9)
    assert set(defects.kind.tolist()) <= {"segmentation"}


def test_letterboxed_mask_maps_back_to_the_source():
    # a 200 x 100 (w x h) frame letterboxed into 64 x 64: content 64 x 32 at top 16
    g = fit(100, 200, 64, 64, "letterbox")
    assert (g.content_h, g.content_w, g.top, g.left) == (32, 64, 16, 0)
    prob = np.zeros((64, 64, 1), np.float32)
    prob[16 + 8 : 16 + 16, 32:48, 0] = 1.0  # content rows 8..16, cols 32..48 → source rows 25..50, cols 100..150
    defects, mask = mask_defects(prob, g, 0.5, ["defect"])
    assert mask.shape == (100, 200)
    x1, y1, x2, y2 = defects.xyxy[0]
    assert abs(x1 - 100) <= 2 and abs(x2 - 150) <= 2 and abs(y1 - 25) <= 2 and abs(y2 - 50) <= 2


def test_multi_class_masks_keep_their_class():
    prob = np.zeros((32, 32, 2), np.float32)
    prob[0:4, 0:4, 0] = 1
    prob[10:20, 10:20, 1] = 1
    defects, mask = mask_defects(prob, Geometry.identity(32, 32), 0.5, ["spot", "scratch"])
    assert sorted(zip(defects.class_name.tolist(), defects.area_px.tolist())) == [("scratch", 100.0), ("spot", 16.0)]
    assert mask.sum() == 116


def test_min_score_drops_faint_regions():
    prob = blobs(32, 32, [(0, 0, 5, 5)], p=0.55)
    assert len(mask_defects(prob, Geometry.identity(32, 32), 0.5, ["d"], 0, 0.6)[0]) == 0
    assert len(mask_defects(prob, Geometry.identity(32, 32), 0.5, ["d"], 0, 0.5)[0]) == 1


def test_detections_to_source_pixels():
    spec = DetectionOutputs(boxes="b", scores="s", classes="c", count="n", score_threshold=0.3)
    outputs = {
        "b": np.array([[[0.0, 0.0, 0.5, 0.5], [0.5, 0.25, 1.0, 0.75], [0.1, 0.1, 0.2, 0.2], [0, 0, 0, 0]]], np.float32),
        "s": np.array([[0.9, 0.6, 0.1, 0.0]], np.float32),
        "c": np.array([[1, 0, 0, 0]], np.float32),
        "n": np.array([3], np.int32),
    }
    g = fit(100, 200, 64, 64, "stretch")
    d = detection_defects(outputs, spec, ["crazing", "patches"], g)
    assert d.class_name.tolist() == ["patches", "crazing"]  # the 0.1 score is under the threshold
    assert d.xyxy.tolist() == [[0, 0, 100, 50], [50, 50, 150, 100]]
    assert d.area_px.tolist() == [5000, 5000]
    assert d.kind.tolist() == ["detection", "detection"]


def _regions_over_the_whole_frame(p, threshold, min_area, min_score):
    """The reference: connected regions labelled over the whole frame."""
    binary = p > threshold
    n, labels, stats, _ = cv2.connectedComponentsWithStats(binary.view(np.uint8), connectivity=8)
    out, union = [], np.zeros_like(binary)
    for i in range(1, n):
        region = labels == i
        mean = float(p[region].mean())
        if stats[i, cv2.CC_STAT_AREA] >= max(min_area, 1) and mean >= min_score:
            x, y, w, h = stats[i, :4]
            out.append((x, y, x + w, y + h, stats[i, cv2.CC_STAT_AREA], round(mean, 5)))
            union |= region
    return sorted(out), union


@pytest.mark.parametrize("seed", range(6))
def test_regions_labelled_in_their_box_equal_the_whole_frame(seed):
    """mask_defects labels only the box around the pixels above the threshold: the
    same boxes, areas, scores and mask as labelling the whole frame, for regions
    anywhere, the frame's edges included."""
    rng = np.random.default_rng(seed)
    p = cv2.GaussianBlur(rng.random((120, 90)).astype(np.float32), (0, 0), 3)
    p = (p - p.min()) / (p.max() - p.min())
    if seed % 2:
        p[:, :3] = 0.95  # a region along the left edge
        p[-2:, 40:] = 0.9  # and one along the bottom
    geom = Geometry(120, 90, 120, 90, 120, 90, 0, 0)
    for threshold, min_area, min_score in ((0.6, 1, 0.0), (0.7, 5, 0.75), (0.99, 1, 0.0)):
        found, mask = mask_defects(p[:, :, None], geom, threshold, ["d"], min_area, min_score)
        want, union = _regions_over_the_whole_frame(p, threshold, min_area, min_score)
        got = sorted((int(a), int(b), int(c), int(d), int(area), round(float(s), 5))
                     for (a, b, c, d), area, s in zip(found.xyxy, found.area_px, found.confidence))
        assert got == want
        assert np.array_equal(mask, union)


def test_region_means_in_boxes_equal_one_bincount():
    """The two ways mask_defects takes each region's mean probability (in each
    region's box for a few regions, one bincount for many) agree, for regions
    that share boxes with others and planes that are views of a multi-class map."""
    from station.postprocess import _MEANS_IN_BOXES, _region_means

    rng = np.random.default_rng(3)
    prob = cv2.GaussianBlur(rng.random((120, 90, 2)).astype(np.float32), (0, 0), 1.5)
    plane = prob[:, :, 1]  # not contiguous in its last axis
    n, labels, stats, _ = cv2.connectedComponentsWithStats((plane > np.median(plane)).view(np.uint8), connectivity=8)
    assert n - 1 > _MEANS_IN_BOXES
    everyone = np.arange(1, n)
    few = everyone[:: max(1, (n - 1) // _MEANS_IN_BOXES + 1)]
    assert few.size <= _MEANS_IN_BOXES
    want = np.array([plane[labels == k].mean() for k in range(n)])
    assert np.allclose(_region_means(plane, labels, stats, everyone, n)[1:], want[1:], rtol=0, atol=1e-6)
    got = _region_means(plane, labels, stats, few, n)
    assert np.allclose(got[few], want[few], rtol=0, atol=1e-6)
    assert not np.delete(got, few).any()

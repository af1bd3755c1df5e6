"""Detection filters: score, area (fraction of frame), aspect, masks (feet inside polygon)."""

from __future__ import annotations

import numpy as np
import pytest
from pydantic import ValidationError

from camera.detections import Detections
from camera.filters import FilterSpec, MaskSpec, apply_filters

W, H = 1000, 500  # frame area 500_000


def dets(*rows: tuple[float, float, float, float, float]) -> Detections:
    arr = np.array(rows, np.float32).reshape(-1, 5)
    return Detections(arr[:, :4], arr[:, 4], np.zeros(len(arr), np.int32))


def kept(d: Detections) -> list[float]:
    return [round(float(x), 1) for x in d.xyxy[:, 0]]


def test_min_score():
    d = dets((1, 0, 11, 20, 0.3), (2, 0, 12, 20, 0.5), (3, 0, 13, 20, 0.7))
    assert kept(apply_filters(d, FilterSpec(min_score=0.5), [], W, H)) == [2.0, 3.0]


def test_area_is_a_fraction_of_the_frame():
    small = (0, 0, 10, 25, 0.9)  # 250 px = 0.0005
    medium = (100, 0, 200, 100, 0.9)  # 10_000 px = 0.02
    huge = (300, 0, 1000, 500, 0.9)  # 350_000 px = 0.7
    d = dets(small, medium, huge)
    assert kept(apply_filters(d, FilterSpec(min_area=0.001, max_area=0.5), [], W, H)) == [100.0]
    assert kept(apply_filters(d, FilterSpec(), [], W, H)) == [0.0, 100.0, 300.0]
    # The same config at double the resolution keeps the same (scaled) boxes.
    d2 = Detections(d.xyxy * 2, d.confidence, d.class_id)
    assert kept(apply_filters(d2, FilterSpec(min_area=0.001, max_area=0.5), [], 2 * W, 2 * H)) == [200.0]


def test_aspect_is_width_over_height():
    standing = (0, 0, 40, 100, 0.9)  # 0.4
    lying = (100, 0, 300, 50, 0.9)  # 4.0
    square = (400, 0, 450, 50, 0.9)  # 1.0
    d = dets(standing, lying, square)
    assert kept(apply_filters(d, FilterSpec(min_aspect=0.2, max_aspect=1.0), [], W, H)) == [0.0, 400.0]
    assert kept(apply_filters(d, FilterSpec(max_aspect=0.9), [], W, H)) == [0.0]


def test_masks_use_the_feet_and_accept_normalized_points():
    tv = MaskSpec(name="tv", points=[[0.5, 0], [1, 0], [1, 0.5], [0.5, 0.5]])  # top-right quarter
    in_front_of_tv = (600, 100, 660, 400, 0.9)  # head in the mask, feet (630, 400) below it: kept
    on_tv = (700, 50, 760, 200, 0.9)  # feet (730, 200) inside the mask: dropped
    left = (100, 50, 160, 200, 0.9)
    d = dets(in_front_of_tv, on_tv, left)
    assert kept(apply_filters(d, FilterSpec(), [tv], W, H)) == [600.0, 100.0]
    pixel_tv = MaskSpec(name="tv_px", points=[[500, 0], [1000, 0], [1000, 250], [500, 250]])
    assert kept(apply_filters(d, FilterSpec(), [pixel_tv], W, H)) == [600.0, 100.0]
    poster = MaskSpec(name="poster", points=[[50, 150], [200, 150], [120, 260]])  # triangle around (130, 200)
    assert kept(apply_filters(d, FilterSpec(), [tv, poster], W, H)) == [600.0]


def test_empty_input_and_all_filtered():
    assert len(apply_filters(Detections.empty(), FilterSpec(min_score=0.5), [], W, H)) == 0
    out = apply_filters(dets((0, 0, 10, 10, 0.1)), FilterSpec(min_score=0.5), [], W, H)
    assert len(out) == 0 and out.xyxy.shape == (0, 4)


def test_spec_validation():
    with pytest.raises(ValidationError):
        FilterSpec(min_area=0.5, max_area=0.1)
    with pytest.raises(ValidationError):
        FilterSpec(min_aspect=2, max_aspect=1)
    with pytest.raises(ValidationError):
        FilterSpec(threshold=0.7)  # unknown key
    with pytest.raises(ValidationError):
        FilterSpec(max_area=5000)  # pixels are not accepted: areas are fractions
    with pytest.raises(ValidationError):
        MaskSpec(name="m", points=[[0, 0], [1, 1]])
    with pytest.raises(ValidationError):
        MaskSpec(name="a b", points=[[0, 0], [1, 0], [1, 1]])

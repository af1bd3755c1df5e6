"""Geometry: anchors, point in polygon, signed side of a line, segment intersection, spec validation."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError

from camera.zones import (
    LineSpec,
    ZoneSpec,
    box_anchor,
    line_side,
    points_in_polygon,
    segments_intersect,
    to_pixels,
)

SQUARE = np.array([[10, 10], [20, 10], [20, 20], [10, 20]], float)
L_SHAPE = np.array([[0, 0], [30, 0], [30, 10], [10, 10], [10, 30], [0, 30]], float)  # concave


def test_anchor_rules():
    box = np.array([10, 20, 30, 60])
    assert box_anchor(box).tolist() == [20, 60]
    assert box_anchor(box, "center").tolist() == [20, 40]
    with pytest.raises(ValueError, match="anchor"):
        box_anchor(box, "top")


def test_points_in_convex_and_concave_polygons():
    pts = np.array([[15, 15], [5, 15], [25, 15], [15, 5], [15, 25]])
    assert points_in_polygon(pts, SQUARE).tolist() == [True, False, False, False, False]
    pts = np.array([[5, 5], [25, 5], [5, 25], [20, 20], [15, 15]])
    assert points_in_polygon(pts, L_SHAPE).tolist() == [True, True, True, False, False]
    assert points_in_polygon(np.zeros((0, 2)), SQUARE).shape == (0,)


@given(st.floats(0, 100), st.floats(0, 100))
def test_point_in_rectangle_matches_bounds(x, y):
    rect = np.array([[20, 30], [70, 30], [70, 80], [20, 80]], float)
    inside = bool(points_in_polygon(np.array([[x, y]]), rect)[0])
    if 20 < x < 70 and 30 < y < 80:
        assert inside
    elif not (20 <= x <= 70 and 30 <= y <= 80):
        assert not inside


def test_normalized_points_scale_with_the_frame():
    assert to_pixels([[0.5, 0.5], [1, 0]], 640, 480).tolist() == [[320, 240], [640, 0]]
    assert to_pixels([[0.5, 2], [1, 0]], 640, 480).tolist() == [[0.5, 2], [1, 0]]  # any value > 1: pixels


def test_line_side_sign_is_left_of_direction_on_screen():
    left_to_right = np.array([[0, 50], [100, 50]], float)
    d = line_side(left_to_right, np.array([[50, 40], [50, 70], [50, 50]]))
    assert d.tolist() == pytest.approx([10, -20, 0])  # above the line (on screen) is its left
    top_to_bottom = np.array([[50, 0], [50, 100]], float)
    d = line_side(top_to_bottom, np.array([[60, 10], [40, 10]]))
    assert d.tolist() == pytest.approx([10, -10])  # walking down the screen, the viewer's right (x+) is left


def test_segments_intersect():
    a, b = np.array([0.0, 0.0]), np.array([10.0, 10.0])
    assert segments_intersect(a, b, np.array([0.0, 10.0]), np.array([10.0, 0.0]))
    assert not segments_intersect(a, b, np.array([20.0, 0.0]), np.array([30.0, 10.0]))
    assert not segments_intersect(a, np.array([4.0, 4.0]), np.array([0.0, 10.0]), np.array([10.0, 0.0]))
    assert segments_intersect(a, b, np.array([5.0, 5.0]), np.array([20.0, 0.0]))  # touching


def test_line_travel_and_in_sign():
    line = LineSpec(name="gate", points=[[0, 0.5], [1, 0.5]], min_travel=0.02)
    assert line.travel_px(300, 400) == pytest.approx(10.0)  # 2 % of the 500 px diagonal
    assert LineSpec(name="g", points=[[0, 0], [5, 5]], min_travel=12).travel_px(300, 400) == 12
    assert line.in_sign == 1 and LineSpec(name="g", points=[[0, 0], [5, 5]], in_side="right").in_sign == -1


def test_spec_validation_errors():
    with pytest.raises(ValidationError, match="at least 3"):
        ZoneSpec(name="z", points=[[0, 0], [1, 1]])
    with pytest.raises(ValidationError, match="name"):
        ZoneSpec(name="z/1", points=[[0, 0], [1, 0], [1, 1]])
    with pytest.raises(ValidationError):
        ZoneSpec(name="z", points=[[0, 0], [1, 0], [1, 1]], inertia=3)
    with pytest.raises(ValidationError, match="exactly 2"):
        LineSpec(name="l", points=[[0, 0], [1, 0], [1, 1]])
    with pytest.raises(ValidationError, match="differ"):
        LineSpec(name="l", points=[[1, 1], [1, 1]])
    with pytest.raises(ValidationError):
        LineSpec(name="l", points=[[0, 0], [1, 1]], in_side="north")

"""Zones and counting lines: their config and the geometry behind them (pure numpy, no I/O).

Coordinates are pixels of the source frame, or normalized 0..1 when *every* coordinate of a shape is <= 1
(so one config works at any resolution). A person is placed by an *anchor* point of its box: the bottom centre
(where the feet are) by default, or the centre.

>>> zone = ZoneSpec(name="door", points=[[0, 0], [1, 0], [1, 1], [0, 1]])
>>> bool(points_in_polygon(np.array([[5.0, 5.0]]), zone.pixel_points(10, 10))[0])
True
>>> line = LineSpec(name="gate", points=[[0, 5], [10, 5]], in_side="left")
>>> float(line_side(line.pixel_points(100, 100), np.array([[5.0, 0.0]]))[0]) > 0  # above a left-to-right line
True
"""

from __future__ import annotations

from typing import Literal

import numpy as np
from pydantic import BaseModel, Field, field_validator

from camera.detections import Anchor, box_anchors
from contract.topics import is_valid_name


def _check_name(value: str) -> str:
    if not is_valid_name(value):
        raise ValueError(f"name {value!r} must be 1-64 chars of A-Z a-z 0-9 _ . - (one MQTT topic level)")
    return value


def _check_points(points: list[list[float]], minimum: int) -> list[list[float]]:
    if len(points) < minimum:
        raise ValueError(f"needs at least {minimum} points, got {len(points)}")
    for p in points:
        if len(p) != 2:
            raise ValueError(f"each point is [x, y], got {p!r}")
        if min(p) < 0:
            raise ValueError(f"coordinates must be >= 0, got {p!r}")
    return points


def to_pixels(points: list[list[float]], frame_w: int, frame_h: int) -> np.ndarray:
    """(K, 2) float64 pixel coordinates: normalized points (all <= 1) are scaled by the frame size."""
    arr = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    if arr.size and float(arr.max()) <= 1.0:
        arr = arr * np.array([frame_w, frame_h], dtype=np.float64)
    return arr


class ZoneSpec(BaseModel, extra="forbid"):
    """A named polygon. A person is *in* it once the anchor has stayed inside ``min_inside_s`` seconds
    (inertia against boxes flickering on the border) and *out* once it has stayed outside ``min_outside_s``."""

    name: str
    points: list[list[float]]
    anchor: Anchor = "bottom_center"
    min_inside_s: float = Field(0.0, ge=0)
    min_outside_s: float = Field(0.0, ge=0)
    loiter_s: float | None = Field(None, gt=0)

    _name = field_validator("name")(_check_name)

    @field_validator("points")
    @classmethod
    def _points(cls, v: list[list[float]]) -> list[list[float]]:
        return _check_points(v, 3)

    def pixel_points(self, frame_w: int, frame_h: int) -> np.ndarray:
        return to_pixels(self.points, frame_w, frame_h)


class LineSpec(BaseModel, extra="forbid"):
    """A named counting segment from ``points[0]`` to ``points[1]``.

    ``in_side`` is the side of the line, as seen on screen looking from the first point towards the second,
    that counts as *inside*: a person whose anchor moves onto it crosses ``in``, the other way ``out``.
    ``min_travel`` is the hysteresis: the anchor must get at least this far from the line, on both sides, for a
    crossing to count, so a person standing on the line or a box jittering across it is counted once. Values < 1
    are a fraction of the frame diagonal, values >= 1 are pixels.
    """

    name: str
    points: list[list[float]]
    in_side: Literal["left", "right"] = "left"
    min_travel: float = Field(0.02, ge=0)
    min_travel_heights: float = Field(0.1, ge=0, description="the hysteresis is also at least this many heights of "
                                      "the person's box: a detector's jitter grows with the box")
    anchor: Anchor = "bottom_center"

    _name = field_validator("name")(_check_name)

    @field_validator("points")
    @classmethod
    def _points(cls, v: list[list[float]]) -> list[list[float]]:
        _check_points(v, 2)
        if len(v) != 2:
            raise ValueError(f"a line has exactly 2 points, got {len(v)}")
        if v[0] == v[1]:
            raise ValueError("the two points of a line must differ")
        return v

    def pixel_points(self, frame_w: int, frame_h: int) -> np.ndarray:
        return to_pixels(self.points, frame_w, frame_h)

    def travel_px(self, frame_w: int, frame_h: int, box_height: float = 0.0) -> float:
        """The hysteresis distance in pixels for this frame size and a person box this tall.

        >>> LineSpec(name="a", points=[[0, 0], [10, 0]], min_travel=10).travel_px(640, 480, box_height=100)
        10.0
        """
        return max(self._frame_travel_px(frame_w, frame_h), self.min_travel_heights * float(box_height))

    def _frame_travel_px(self, frame_w: int, frame_h: int) -> float:
        if self.min_travel < 1:
            return float(self.min_travel * np.hypot(frame_w, frame_h))
        return float(self.min_travel)

    @property
    def in_sign(self) -> int:
        """Sign of :func:`line_side` on the in side."""
        return 1 if self.in_side == "left" else -1


def points_in_polygon(points: np.ndarray, polygon: np.ndarray) -> np.ndarray:
    """(N,) bool: which of ``points`` (N, 2) lie inside ``polygon`` (K, 2), by ray casting (even-odd rule).

    Points exactly on an edge may go either way; zone inertia and line hysteresis make that harmless.
    """
    pts = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    poly = np.asarray(polygon, dtype=np.float64).reshape(-1, 2)
    if len(pts) == 0 or len(poly) < 3:
        return np.zeros(len(pts), dtype=bool)
    x, y = pts[:, 0:1], pts[:, 1:2]  # (N, 1)
    x1, y1 = poly[:, 0], poly[:, 1]  # (K,)
    x2, y2 = np.concatenate((x1[1:], x1[:1])), np.concatenate((y1[1:], y1[:1]))  # next vertex
    straddles = (y1 > y) != (y2 > y)  # (N, K)
    with np.errstate(divide="ignore", invalid="ignore"):
        x_cross = x1 + (y - y1) * (x2 - x1) / (y2 - y1)
    hits = straddles & (x < x_cross)
    return (np.count_nonzero(hits, axis=1) % 2) == 1


def line_side(segment: np.ndarray, points: np.ndarray) -> np.ndarray:
    """(N,) signed distance in pixels of ``points`` from the infinite line through ``segment`` (2, 2).

    Positive = left of the direction first point → second point *as seen on screen* (image y grows downwards),
    negative = right.
    """
    seg = np.asarray(segment, dtype=np.float64)
    pts = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    d = seg[1] - seg[0]
    rel = pts - seg[0]
    cross = d[0] * rel[:, 1] - d[1] * rel[:, 0]  # > 0 means right on screen (y down)
    return -cross / float(np.hypot(d[0], d[1]))


def segments_intersect(p0: np.ndarray, p1: np.ndarray, q0: np.ndarray, q1: np.ndarray) -> bool:
    """Whether segment p0-p1 meets segment q0-q1 (touching counts)."""

    def orient(a: np.ndarray, b: np.ndarray, c: np.ndarray) -> float:
        return float((b[0] - a[0]) * (c[1] - a[1]) - (b[1] - a[1]) * (c[0] - a[0]))

    def on_segment(a: np.ndarray, b: np.ndarray, c: np.ndarray) -> bool:
        return min(a[0], b[0]) <= c[0] <= max(a[0], b[0]) and min(a[1], b[1]) <= c[1] <= max(a[1], b[1])

    o1, o2 = orient(p0, p1, q0), orient(p0, p1, q1)
    o3, o4 = orient(q0, q1, p0), orient(q0, q1, p1)
    if ((o1 > 0 and o2 < 0) or (o1 < 0 and o2 > 0)) and ((o3 > 0 and o4 < 0) or (o3 < 0 and o4 > 0)):
        return True
    return (
        (o1 == 0 and on_segment(p0, p1, q0))
        or (o2 == 0 and on_segment(p0, p1, q1))
        or (o3 == 0 and on_segment(q0, q1, p0))
        or (o4 == 0 and on_segment(q0, q1, p1))
    )


def box_anchor(xyxy: np.ndarray, rule: Anchor = "bottom_center") -> np.ndarray:
    """The (2,) anchor point of one box (x1, y1, x2, y2), by :func:`camera.detections.box_anchors`."""
    return box_anchors(np.asarray(xyxy)[None], rule)[0]

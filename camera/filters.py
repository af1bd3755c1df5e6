"""Detection filters applied before tracking: masks, box size and shape, minimum score.

Areas are *fractions of the frame area* (0..1) so one config works at every resolution; aspect is box
width / height (a standing person is about 0.3-0.6). A detection is masked when the bottom centre of its box
(the feet) lies inside a mask polygon, as Frigate does, so a person walking in front of a masked TV still counts.
``track_threshold`` is not used here: it is the track-level median score the EventBuilder requires.

>>> import numpy as np
>>> d = Detections(np.array([[0, 0, 10, 40], [0, 0, 300, 200]], np.float32), np.array([0.9, 0.9], np.float32),
...                np.zeros(2, np.int32))
>>> len(apply_filters(d, FilterSpec(max_area=0.1), [], 640, 480))
1
"""

from __future__ import annotations

import numpy as np
from pydantic import BaseModel, Field, field_validator, model_validator

from camera.detections import Detections
from camera.zones import points_in_polygon, to_pixels
from contract.topics import is_valid_name


class FilterSpec(BaseModel, extra="forbid"):
    """Per-detection limits (None = no limit) and the track-level score threshold."""

    min_score: float = Field(0.0, ge=0, le=1, description="drop detections scoring below")
    min_area: float = Field(0.0, ge=0, le=1, description="box area as a fraction of the frame area")
    max_area: float = Field(1.0, gt=0, le=1, description="box area as a fraction of the frame area")
    min_aspect: float | None = Field(None, gt=0, description="box width / height")
    max_aspect: float | None = Field(None, gt=0, description="box width / height")
    track_threshold: float = Field(
        0.5, ge=0, le=1, description="median score of a track's recent history needed before it is a person"
    )

    @model_validator(mode="after")
    def _ordered(self) -> FilterSpec:
        if self.min_area > self.max_area:
            raise ValueError(f"min_area {self.min_area} > max_area {self.max_area}")
        if self.min_aspect is not None and self.max_aspect is not None and self.min_aspect > self.max_aspect:
            raise ValueError(f"min_aspect {self.min_aspect} > max_aspect {self.max_aspect}")
        return self


class MaskSpec(BaseModel, extra="forbid"):
    """A polygon where detections are ignored (pixels, or normalized 0..1 if every coordinate is <= 1)."""

    name: str
    points: list[list[float]]

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not is_valid_name(v):
            raise ValueError(f"name {v!r} must be 1-64 chars of A-Z a-z 0-9 _ . -")
        return v

    @field_validator("points")
    @classmethod
    def _points(cls, v: list[list[float]]) -> list[list[float]]:
        if len(v) < 3 or any(len(p) != 2 or min(p) < 0 for p in v):
            raise ValueError("a mask needs at least 3 points [x, y] with non-negative coordinates")
        return v


def apply_filters(
    detections: Detections, spec: FilterSpec, masks: list[MaskSpec], frame_w: int, frame_h: int
) -> Detections:
    """The detections that pass every limit and lie outside every mask."""
    if len(detections) == 0:
        return detections
    keep = detections.confidence >= spec.min_score
    area = detections.area / float(frame_w * frame_h)
    keep &= (area >= spec.min_area) & (area <= spec.max_area)
    wh = np.clip(detections.xyxy[:, 2:4] - detections.xyxy[:, 0:2], 1e-6, None)
    aspect = wh[:, 0] / wh[:, 1]
    if spec.min_aspect is not None:
        keep &= aspect >= spec.min_aspect
    if spec.max_aspect is not None:
        keep &= aspect <= spec.max_aspect
    if masks and keep.any():
        feet = detections.anchors("bottom_center")
        for mask in masks:
            keep &= ~points_in_polygon(feet, to_pixels(mask.points, frame_w, frame_h))
    return detections[keep]

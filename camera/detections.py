"""`Detections`: the one value passed between detector, filters, tracker and annotator.

Modelled on supervision's ``sv.Detections``: parallel numpy arrays, boxes in *source-frame pixels*.

>>> import numpy as np
>>> d = Detections(np.array([[0, 0, 10, 20]], np.float32), np.array([0.9], np.float32), np.array([0], np.int32))
>>> len(d), d[d.confidence > 0.5].xyxy.shape
(1, (1, 4))
>>> d.anchors("center").tolist()
[[5.0, 10.0]]
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

Anchor = Literal["bottom_center", "center"]
ANCHORS: tuple[str, ...] = ("bottom_center", "center")


@dataclass(frozen=True)
class Detections:
    xyxy: np.ndarray  # (N, 4) float32, x1 y1 x2 y2 in source pixels
    confidence: np.ndarray  # (N,) float32
    class_id: np.ndarray  # (N,) int32

    @classmethod
    def empty(cls) -> Detections:
        return cls(np.zeros((0, 4), np.float32), np.zeros((0,), np.float32), np.zeros((0,), np.int32))

    def __len__(self) -> int:
        return int(self.xyxy.shape[0])

    def __getitem__(self, index) -> Detections:
        """Select by boolean mask, index array or slice; always returns a Detections."""
        if isinstance(index, (int, np.integer)):
            index = [int(index)]
        return Detections(self.xyxy[index], self.confidence[index], self.class_id[index])

    @property
    def area(self) -> np.ndarray:
        wh = np.clip(self.xyxy[:, 2:4] - self.xyxy[:, 0:2], 0, None)
        return wh[:, 0] * wh[:, 1]

    def anchors(self, rule: Anchor = "bottom_center") -> np.ndarray:
        """(N, 2) anchor points of the boxes (see :func:`box_anchors`)."""
        return box_anchors(self.xyxy, rule)


def box_anchors(xyxy: np.ndarray, rule: Anchor = "bottom_center") -> np.ndarray:
    """(N, 2) anchor points of (N, 4) boxes: ``bottom_center`` (the feet: zones, lines and masks) or ``center``.
    The one definition of anchors; any other rule is an error, never a silent default.

    >>> box_anchors(np.array([[0, 0, 10, 20]]), "bottom_center").tolist()
    [[5.0, 20.0]]
    >>> box_anchors(np.zeros((1, 4)), "top")
    Traceback (most recent call last):
    ValueError: unknown anchor rule 'top' (use bottom_center or center)
    """
    boxes = np.asarray(xyxy, dtype=np.float64).reshape(-1, 4)
    if rule not in ANCHORS:
        raise ValueError(f"unknown anchor rule {rule!r} (use bottom_center or center)")
    x = (boxes[:, 0] + boxes[:, 2]) / 2
    y = boxes[:, 3] if rule == "bottom_center" else (boxes[:, 1] + boxes[:, 3]) / 2
    return np.stack([x, y], axis=1)


def iou_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(len(a), len(b)) IoU of two sets of xyxy boxes: the one IoU definition (tracker, sampler, NMS users).

    >>> iou_matrix(np.array([[0, 0, 10, 10]]), np.array([[0, 0, 10, 10], [5, 0, 15, 10]])).round(3).tolist()
    [[1.0, 0.333]]
    """
    a = np.asarray(a, dtype=np.float64).reshape(-1, 4)
    b = np.asarray(b, dtype=np.float64).reshape(-1, 4)
    if len(a) == 0 or len(b) == 0:
        return np.zeros((len(a), len(b)))
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    wh = np.clip(rb - lt, 0, None)
    inter = wh[..., 0] * wh[..., 1]
    area_a = np.prod(np.clip(a[:, 2:] - a[:, :2], 0, None), axis=1)
    area_b = np.prod(np.clip(b[:, 2:] - b[:, :2], 0, None), axis=1)
    union = area_a[:, None] + area_b[None, :] - inter
    return np.where(union > 0, inter / np.maximum(union, 1e-9), 0.0)

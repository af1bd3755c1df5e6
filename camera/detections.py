"""`Detections`: the one value passed between detector, filters, tracker and annotator.

Modelled on supervision's ``sv.Detections``: parallel numpy arrays, boxes in *source-frame pixels*.

>>> import numpy as np
>>> d = Detections(np.array([[0, 0, 10, 20]], np.float32), np.array([0.9], np.float32), np.array([0], np.int32))
>>> len(d), d[d.confidence > 0.5].xyxy.shape
(1, (1, 4))
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


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

    def anchors(self, rule: str = "bottom_center") -> np.ndarray:
        """(N, 2) anchor points: ``bottom_center`` (feet, the default for zones/lines) or ``center``."""
        x = (self.xyxy[:, 0] + self.xyxy[:, 2]) / 2
        if rule == "center":
            y = (self.xyxy[:, 1] + self.xyxy[:, 3]) / 2
        elif rule == "bottom_center":
            y = self.xyxy[:, 3]
        else:
            raise ValueError(f"unknown anchor rule {rule!r} (use bottom_center or center)")
        return np.stack([x, y], axis=1)

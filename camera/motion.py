"""The motion gate: skip the detector while nothing in the picture moves (Frigate's trick, in a few lines).

Each frame is shrunk (``scale``, default 1/8), turned grey and blurred, then compared with a running-average
background. The fraction of pixels that changed by more than ``pixel_threshold`` grey levels is the frame's
motion. Below ``threshold`` the detector is skipped, except that it runs at least every ``keepalive_s`` seconds
so that people standing still are still seen (and tracks held alive).

>>> import numpy as np
>>> gate = MotionGate(threshold=0.01, keepalive_s=10)
>>> still = np.zeros((240, 320, 3), np.uint8)
>>> gate.check(still, 0.0), gate.check(still, 0.1)  # first frame always runs; an unchanged one does not
(True, False)
>>> moved = still.copy(); moved[80:200, 100:200] = 255
>>> gate.check(moved, 0.2), gate.skipped
(True, 1)
"""

from __future__ import annotations

import cv2
import numpy as np


class MotionGate:
    """Decides per frame whether the detector must run."""

    def __init__(self, threshold: float = 0.003, keepalive_s: float = 5.0, *, pixel_threshold: int = 25,
                 scale: float = 0.125, alpha: float = 0.2, min_width: int = 32) -> None:
        if not 0 <= threshold <= 1:
            raise ValueError(f"motion threshold must be a fraction in 0..1, got {threshold}")
        self.threshold = threshold
        self.keepalive_s = keepalive_s
        self.pixel_threshold = pixel_threshold
        self.scale = scale
        self.alpha = alpha  # background learning rate: slow changes (light) fade in, people do not
        self.min_width = min_width
        self._background: np.ndarray | None = None
        self._last_run_ts: float | None = None
        self.last_fraction = 0.0
        self.skipped = 0  # frames for which the detector was not run

    def _small_grey(self, image: np.ndarray) -> np.ndarray:
        h, w = image.shape[:2]
        width = max(self.min_width, int(w * self.scale))
        height = max(1, int(round(h * width / w)))
        grey = cv2.cvtColor(image, cv2.COLOR_BGR2GRAY) if image.ndim == 3 else image
        small = cv2.resize(grey, (width, height), interpolation=cv2.INTER_AREA)
        return cv2.GaussianBlur(small, (5, 5), 0).astype(np.float32)

    def motion_fraction(self, image: np.ndarray) -> float:
        """Fraction (0..1) of the frame that differs from the background; updates the background."""
        small = self._small_grey(image)
        if self._background is None or self._background.shape != small.shape:
            self._background = small
            self.last_fraction = 1.0  # nothing to compare with: treat as motion
            return self.last_fraction
        diff = cv2.absdiff(small, self._background)
        self.last_fraction = float(np.count_nonzero(diff > self.pixel_threshold)) / diff.size
        cv2.accumulateWeighted(small, self._background, self.alpha)
        return self.last_fraction

    def check(self, image: np.ndarray, ts: float) -> bool:
        """True if the detector should run on this frame (motion, first frame, or keepalive due)."""
        fraction = self.motion_fraction(image)
        due = self._last_run_ts is None or ts - self._last_run_ts >= self.keepalive_s or ts < self._last_run_ts
        if fraction >= self.threshold or due:
            self._last_run_ts = ts
            return True
        self.skipped += 1
        return False

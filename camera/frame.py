"""`Frame`: one decoded image with its capture time, as produced by every source."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Frame:
    image: np.ndarray  # HxWx3 uint8, BGR (OpenCV order)
    ts: float  # capture time, epoch seconds (UTC); for files: start time + position in the file
    index: int  # position in the source, counting from 0 (gaps = frames dropped to keep up)

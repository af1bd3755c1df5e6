"""The model input sizes ``smartcam-model build`` accepts: both sides multiples of 32 (the detector's largest
stride) from 32 to 1920. An unbounded side once took 11.4 GB before the export crashed (``--imgsz 100000``).

>>> imgsz_problem((384, 640)) is None
True
>>> imgsz_problem((100000, 100000))
'sides must be 32..1920, got 100000x100000'
>>> imgsz_problem((320, 300))
'sides must be multiples of 32, got 320x300'
"""

from __future__ import annotations

IMGSZ_MIN, IMGSZ_MAX, IMGSZ_STEP = 32, 1920, 32


def imgsz_problem(imgsz: tuple[int, int]) -> str | None:
    """Why ``imgsz`` (h, w) cannot be built, or None when it can."""
    h, w = imgsz
    if not all(IMGSZ_MIN <= side <= IMGSZ_MAX for side in (h, w)):
        return f"sides must be {IMGSZ_MIN}..{IMGSZ_MAX}, got {h}x{w}"
    if h % IMGSZ_STEP or w % IMGSZ_STEP:
        return f"sides must be multiples of {IMGSZ_STEP}, got {h}x{w}"
    return None

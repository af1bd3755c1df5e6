"""Region detection: the whole frame, plus crops around the counting lines seen at a higher scale, merged by NMS.

Why: a small model shrinks the whole frame, and far people vanish (a 768x576 camera into a 256x320 input is a
2.4x shrink: an 80 px person becomes 33 px). Counting only needs them *at the lines*, so, as Frigate runs its
detector on regions instead of the shrunk frame, each frame also runs the model on a few tiles that cover every
line, each ``scale`` times the model's input (1.5: 480x384 source pixels for a 256x320 model, 1.6x the full frame's
resolution there). Tiles overlap by a quarter; a box a tile cuts at its inner edge is dropped (the full frame or the
next tile sees that person whole); the rest are merged with the full frame's by NMS. The cost is one model run per
tile (bench/accuracy.py and docs/benchmarks.md state it next to the gain).

``auto`` (the default) turns regions on only when they add resolution at a bounded cost: lines are configured, a
tile sees the scene at least 1.3x sharper than the whole frame does (so not for a 480x640 model on a 768x576
camera), and the lines fit in at most two tiles (at most 3 model runs per frame; ``lines`` runs however many tiles
the lines need).

>>> regions = line_regions([np.array([[384.0, 0.0], [384.0, 576.0]])], (768, 576), (480, 384))
>>> regions
[(144, 0, 624, 384), (144, 192, 624, 576)]
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence

import numpy as np

from camera.detections import Detections
from camera.detector import nms

log = logging.getLogger(__name__)

MIN_GAIN = 1.3  # tiles must see the scene at least this much sharper than the full frame to be worth their cost
MAX_AUTO_TILES = 2  # auto never costs more than 1 + this many model runs per frame (``lines`` runs every tile)
OVERLAP = 0.25  # consecutive tiles along a line share this fraction of their size
EDGE_PX = 3  # a box within this many pixels of a tile's inner edge is cut off by the tile: dropped
_CLASS_OFFSET = 8192.0  # class-aware NMS: boxes of different classes never overlap after this shift

Box = tuple[int, int, int, int]


def line_regions(segments: Sequence[np.ndarray], frame_wh: tuple[int, int], region_wh: tuple[int, int]) -> list[Box]:
    """Tiles of ``region_wh`` (w, h) source pixels, inside the frame, that together cover every segment (2, 2)."""
    fw, fh = frame_wh
    rw, rh = min(region_wh[0], fw), min(region_wh[1], fh)
    tiles: list[Box] = []
    for seg in segments:
        p0, p1 = np.asarray(seg, dtype=np.float64)
        axis = 0 if abs(p1[0] - p0[0]) / rw >= abs(p1[1] - p0[1]) / rh else 1  # the line's long axis, in tiles
        length, limit = (rw, fw) if axis == 0 else (rh, fh)
        lo, hi = sorted((min(max(p0[axis], 0.0), limit), min(max(p1[axis], 0.0), limit)))
        n = 1 if hi - lo <= length else int(np.ceil((hi - lo - length) / (length * (1 - OVERLAP)))) + 1
        for first in np.linspace(lo, hi - length, n) if n > 1 else [(lo + hi - length) / 2]:
            along = first + length / 2  # tile centre on the long axis; the other axis follows the line
            f = 0.0 if p1[axis] == p0[axis] else float(np.clip((along - p0[axis]) / (p1[axis] - p0[axis]), 0, 1))
            centre = p0 + f * (p1 - p0)
            centre[axis] = along
            x0 = int(round(min(max(centre[0] - rw / 2, 0), fw - rw)))
            y0 = int(round(min(max(centre[1] - rh / 2, 0), fh - rh)))
            tile = (x0, y0, x0 + rw, y0 + rh)
            if tile not in tiles:
                tiles.append(tile)
    return tiles


class RegionDetector:
    """Wraps a detector's ``detect``: the full frame, then each line tile at ``scale`` x the model input."""

    def __init__(self, detect: Callable[[np.ndarray], Detections], imgsz: tuple[int, int], iou: float,
                 segments: Callable[[int, int], list[np.ndarray]], *, scale: float = 1.5, mode: str = "auto") -> None:
        if mode not in ("auto", "lines", "off"):
            raise ValueError(f"unknown regions mode {mode!r} (use auto, lines or off)")
        self._detect, self.imgsz, self.iou, self.scale, self.mode = detect, imgsz, float(iou), float(scale), mode
        self._segments = segments  # frame (w, h) -> line segments in pixels
        self._lock = threading.Lock()
        self._size: tuple[int, int] | None = None
        self.regions: list[Box] = []

    def plan(self, frame_wh: tuple[int, int]) -> list[Box]:
        """The tiles for this frame size ([] = full frame only), decided once per size."""
        with self._lock:
            if self._size != frame_wh:
                self._size, self.regions = frame_wh, self._tiles(frame_wh)
            return self.regions

    def _tiles(self, frame_wh: tuple[int, int]) -> list[Box]:
        segs = self._segments(*frame_wh)
        if self.mode == "off" or not segs:
            return []
        h, w = self.imgsz
        full = min(h / frame_wh[1], w / frame_wh[0])  # the letterbox ratio of the whole frame
        region_wh = (int(round(w * self.scale)), int(round(h * self.scale)))
        gain = min(w / min(region_wh[0], frame_wh[0]), h / min(region_wh[1], frame_wh[1])) / full
        if self.mode == "auto" and gain < MIN_GAIN:
            log.info("region detection off: tiles would see the lines only %.2fx sharper than the %dx%d input",
                     gain, h, w)
            return []
        tiles = line_regions(segs, frame_wh, region_wh)
        if self.mode == "auto" and len(tiles) > MAX_AUTO_TILES:
            log.info("region detection off: the lines need %d tiles of %dx%d px, more than auto's %d "
                     "(detector.regions: lines runs them all)", len(tiles), *region_wh, MAX_AUTO_TILES)
            return []
        log.info("region detection: full frame + %d tile(s) of %dx%d px around the lines (%.1fx sharper there), "
                 "%d model runs per frame", len(tiles), *region_wh, gain, 1 + len(tiles))
        return tiles

    def detect(self, image: np.ndarray) -> Detections:
        """Detections of the whole frame and of every tile, in source pixels, merged (NMS at the detector's IoU)."""
        fh, fw = image.shape[:2]
        full = self._detect(image)
        tiles = self.plan((fw, fh))
        if not tiles:
            return full
        parts = [full]
        for x0, y0, x1, y1 in tiles:
            d = self._detect(np.ascontiguousarray(image[y0:y1, x0:x1]))
            b = d.xyxy
            whole = (((b[:, 0] > EDGE_PX) | (x0 == 0)) & ((b[:, 2] < x1 - x0 - EDGE_PX) | (x1 == fw))
                     & ((b[:, 1] > EDGE_PX) | (y0 == 0)) & ((b[:, 3] < y1 - y0 - EDGE_PX) | (y1 == fh)))
            shift = np.array([x0, y0, x0, y0], dtype=np.float32)
            parts.append(Detections(b[whole] + shift, d.confidence[whole], d.class_id[whole]))
        xyxy = np.concatenate([p.xyxy for p in parts]).astype(np.float32)
        conf = np.concatenate([p.confidence for p in parts])
        cls = np.concatenate([p.class_id for p in parts])
        if len(xyxy) == 0:
            return full
        keep = nms(xyxy + (cls.astype(np.float32) * _CLASS_OFFSET)[:, None], conf, self.iou)
        return Detections(xyxy[keep], conf[keep], cls[keep])

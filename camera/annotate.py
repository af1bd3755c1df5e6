"""`--save-video`: boxes, track ids, zones, lines, masks and counts drawn on frames, to check counts by eye.

Only used for debugging and demos (images never leave the device by default). Drawing works on a copy, so the
frame the detector sees is never touched.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

import cv2
import numpy as np

from camera.filters import MaskSpec
from camera.tracker import Track
from camera.zones import LineSpec, ZoneSpec, to_pixels

ZONE_COLOR = (0, 200, 255)  # BGR amber
LINE_COLOR = (255, 0, 255)  # magenta
MASK_COLOR = (80, 80, 80)
TEXT_BG = (0, 0, 0)
FONT = cv2.FONT_HERSHEY_SIMPLEX


def _track_color(track_id: int) -> tuple[int, int, int]:
    """A stable, distinct colour per id (golden-ratio hue steps)."""
    hue = int((track_id * 0.618033988749895 % 1.0) * 180)
    bgr = cv2.cvtColor(np.uint8([[[hue, 220, 255]]]), cv2.COLOR_HSV2BGR)[0, 0]
    return int(bgr[0]), int(bgr[1]), int(bgr[2])


def _label(img: np.ndarray, text: str, org: tuple[int, int], color: tuple[int, int, int], scale: float) -> None:
    """Text on a filled background, kept inside the image."""
    thickness = max(1, int(round(scale * 2)))
    (tw, th), base = cv2.getTextSize(text, FONT, scale, thickness)
    x = int(min(max(org[0], 0), max(img.shape[1] - tw - 2, 0)))
    y = int(min(max(org[1], th + 2), img.shape[0] - base - 1))
    cv2.rectangle(img, (x, y - th - 2), (x + tw + 2, y + base), TEXT_BG, -1)
    cv2.putText(img, text, (x + 1, y - 1), FONT, scale, color, thickness, cv2.LINE_AA)


class Annotator:
    """Draws the configured geometry, the tracks and the counts (``EventBuilder.counts``) on a BGR image."""

    def __init__(
        self, zones: Iterable[ZoneSpec] = (), lines: Iterable[LineSpec] = (), masks: Iterable[MaskSpec] = ()
    ) -> None:
        self.zones = list(zones)
        self.lines = list(lines)
        self.masks = list(masks)

    def draw(self, image_bgr: np.ndarray, tracks: Sequence[Track], counts: dict[str, Any]) -> np.ndarray:
        img = image_bgr.copy()
        h, w = img.shape[:2]
        scale = max(0.4, min(w, h) / 900)
        thick = max(1, int(round(min(w, h) / 400)))
        if self.masks:
            overlay = img.copy()
            for mask in self.masks:
                cv2.fillPoly(overlay, [to_pixels(mask.points, w, h).round().astype(np.int32)], MASK_COLOR)
            img = cv2.addWeighted(overlay, 0.5, img, 0.5, 0)
        zone_counts = counts.get("zones", {})
        for zone in self.zones:
            pts = to_pixels(zone.points, w, h).round().astype(np.int32)
            cv2.polylines(img, [pts], True, ZONE_COLOR, thick, cv2.LINE_AA)
            top = pts[np.argmin(pts[:, 1])]
            _label(img, f"{zone.name}: {zone_counts.get(zone.name, 0)}", (int(top[0]), int(top[1]) + 18),
                   ZONE_COLOR, scale)
        line_totals = counts.get("lines", {})
        for line in self.lines:
            self._draw_line(img, line, line_totals.get(line.name, {"in": 0, "out": 0}), scale, thick)
        for t in tracks:
            x1, y1, x2, y2 = (int(round(float(v))) for v in t.xyxy)
            color = _track_color(t.track_id) if t.visible else (160, 160, 160)
            cv2.rectangle(img, (x1, y1), (x2, y2), color, thick)
            cv2.circle(img, ((x1 + x2) // 2, y2), thick + 2, color, -1)  # the anchor: feet
            _label(img, f"#{t.track_id} {t.score:.2f}", (x1, y1 - 2), color, scale * 0.8)
        _label(img, f"people: {counts.get('people', 0)}", (6, 24), (255, 255, 255), scale)
        return img

    @staticmethod
    def _draw_line(img: np.ndarray, line: LineSpec, totals: dict, scale: float, thick: int) -> None:
        h, w = img.shape[:2]
        p = to_pixels(line.points, w, h)
        a, b = p[0], p[1]
        cv2.line(img, tuple(a.round().astype(int)), tuple(b.round().astype(int)), LINE_COLOR, thick + 1)
        # An arrow from the middle of the line towards its "in" side.
        d = (b - a) / max(float(np.hypot(*(b - a))), 1e-9)
        left = np.array([d[1], -d[0]])  # left of the direction on screen (image y grows downwards)
        normal = left if line.in_side == "left" else -left
        mid = (a + b) / 2
        tip = mid + normal * 30 * scale / 0.5
        cv2.arrowedLine(img, tuple(mid.round().astype(int)), tuple(tip.round().astype(int)), LINE_COLOR, thick,
                        cv2.LINE_AA, tipLength=0.3)
        text = f"{line.name} in {totals.get('in', 0)} out {totals.get('out', 0)}"
        _label(img, text, (int(tip[0]) + 4, int(tip[1]) + 4), LINE_COLOR, scale)


class AnnotatedVideo:
    """An mp4 (mp4v) file of annotated frames, written with OpenCV."""

    def __init__(self, path: str | Path, fps: float, size: tuple[int, int]) -> None:
        self.path = Path(path)
        self.size = (int(size[0]), int(size[1]))
        if fps <= 0 or self.size[0] <= 0 or self.size[1] <= 0:
            raise ValueError(f"bad video parameters: fps={fps}, size={size}")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._writer = cv2.VideoWriter(str(self.path), cv2.VideoWriter_fourcc(*"mp4v"), float(fps), self.size)
        if not self._writer.isOpened():
            raise OSError(f"cannot write video {self.path} (mp4v, {self.size[0]}x{self.size[1]})")
        self.frames = 0

    def write(self, image: np.ndarray) -> None:
        """Append one BGR frame; a frame of another size is resized to the video size."""
        if image.shape[1] != self.size[0] or image.shape[0] != self.size[1]:
            image = cv2.resize(image, self.size, interpolation=cv2.INTER_AREA)
        self._writer.write(np.ascontiguousarray(image, dtype=np.uint8))
        self.frames += 1

    def close(self) -> None:
        if self._writer is not None:
            self._writer.release()
            self._writer = None

    def __enter__(self) -> AnnotatedVideo:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

"""Calibration frames: sampled evenly across every video / image folder given, preprocessed as on the edge.

Why spread: the model will meet footage we never saw, so activation ranges must come from all scenes
(indoor, street, overhead, night, no-people), not the first seconds of one clip.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from onnxruntime.quantization import CalibrationDataReader

from camera.detector import letterbox, preprocess
from camera.sources import IMAGE_SUFFIXES  # what the edge reads from a folder is what calibrates

log = logging.getLogger(__name__)

VIDEO_SUFFIXES = {".mp4", ".m4v", ".avi", ".mkv", ".mov", ".webm", ".mpg", ".mpeg", ".ts"}


class CalibrationError(ValueError):
    """No usable calibration frames (missing path, unreadable files, empty folder)."""


@dataclass(frozen=True)
class FrameRef:
    """Where one calibration frame came from (recorded in the manifest)."""

    source: str
    index: int  # frame number in a video, position in a sorted image folder

    def as_dict(self) -> dict:
        return {"source": self.source, "index": self.index}


def _evenly(count: int, k: int) -> list[int]:
    """``k`` indices spread evenly over ``range(count)`` (centres of k equal slices)."""
    if count <= 0 or k <= 0:
        return []
    k = min(k, count)
    return sorted({int((i + 0.5) * count / k) for i in range(k)})


def _expand(sources: Sequence[str | os.PathLike]) -> list[Path]:
    """Each source is a video, an image, or a folder of images/videos; missing paths are an error."""
    out: list[Path] = []
    for src in sources:
        p = Path(src)
        if not p.exists():
            raise CalibrationError(f"calibration source not found: {p}")
        if p.is_dir():
            images = sorted(f for f in p.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES)
            videos = sorted(f for f in p.iterdir() if f.suffix.lower() in VIDEO_SUFFIXES)
            if images:
                out.append(p)  # the folder is one source (its images share a budget)
            out.extend(videos)
        else:
            out.append(p)
    return out


def _video_frames(path: Path, k: int) -> Iterator[tuple[FrameRef, np.ndarray]]:
    cap = cv2.VideoCapture(str(path))
    try:
        if not cap.isOpened():
            raise CalibrationError(f"cannot open video {path}")
        count = int(cap.get(cv2.CAP_PROP_FRAME_COUNT))
        wanted = _evenly(count, k)
        # Sequential read (seeking is inexact in many codecs): grab() is cheap, retrieve() only wanted frames.
        todo, index = set(wanted), 0
        while todo and cap.grab():
            if index in todo:
                ok, frame = cap.retrieve()
                if ok and frame is not None:
                    yield FrameRef(str(path), index), frame
                todo.discard(index)
            index += 1
    finally:
        cap.release()


def _image_frames(paths: list[Path], k: int, source: str) -> Iterator[tuple[FrameRef, np.ndarray]]:
    for i in _evenly(len(paths), k):
        image = cv2.imread(str(paths[i]), cv2.IMREAD_COLOR)
        if image is None:
            log.warning("skipping unreadable calibration image %s", paths[i])
            continue
        yield FrameRef(str(paths[i]) if source == "" else source, i), image


def check_sources(sources: Sequence[str | os.PathLike], total: int) -> None:
    """Fail fast (before any export) on missing paths, folders without images/videos, or no frames asked."""
    if total <= 0 or not _expand(sources):
        raise CalibrationError(
            "empty calibration set: give --calib videos, images or folders and --calib-frames > 0"
        )


def sample_frames(
    sources: Sequence[str | os.PathLike], total: int, imgsz: tuple[int, int] | None = None
) -> list[tuple[FrameRef, np.ndarray]]:
    """About ``total`` BGR frames, an equal share from each source, evenly spaced within each.

    With ``imgsz`` each frame is kept already letterboxed (the edge's own ``letterbox``; applying
    ``preprocess`` to it later is then exact and memory stays ~1 MB per frame).
    """
    expanded = _expand(sources)
    if not expanded or total <= 0:
        raise CalibrationError(
            "empty calibration set: give --calib videos, images or folders and --calib-frames > 0"
        )
    share = [total // len(expanded) + (1 if i < total % len(expanded) else 0) for i in range(len(expanded))]
    frames: list[tuple[FrameRef, np.ndarray]] = []
    for path, k in zip(expanded, share, strict=True):
        if path.is_dir():
            images = sorted(f for f in path.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES)
            stream = _image_frames(images, k, "")
        elif path.suffix.lower() in IMAGE_SUFFIXES:
            stream = _image_frames([path], k, str(path))
        else:
            stream = _video_frames(path, k)
        got = [(ref, image if imgsz is None else letterbox(image, imgsz)[0]) for ref, image in stream]
        if not got:
            log.warning("no frames read from calibration source %s", path)
        frames.extend(got)
    if not frames:
        raise CalibrationError(f"empty calibration set: no readable frames in {[str(s) for s in sources]}")
    return frames


class FrameReader(CalibrationDataReader):
    """onnxruntime calibration reader over preprocessed frames; ``set_range`` lets ORT calibrate in chunks."""

    def __init__(self, frames: Sequence[np.ndarray], imgsz: tuple[int, int], input_name: str, progress=None):
        self.frames = frames
        self.imgsz = imgsz
        self.input_name = input_name
        self.progress = progress
        self.start, self.end = 0, len(frames)
        self.pos = 0

    def __len__(self) -> int:
        return len(self.frames)

    def set_range(self, start_index: int, end_index: int) -> None:
        self.start, self.end = start_index, min(end_index, len(self.frames))
        self.pos = self.start

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self.pos >= self.end:
            return None
        blob, _, _ = preprocess(self.frames[self.pos], self.imgsz)
        self.pos += 1
        if self.progress is not None:
            self.progress.update(1)
        return {self.input_name: blob}

    def rewind(self) -> None:
        self.pos = self.start

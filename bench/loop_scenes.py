"""The scenes `bench/learning_loop.py` runs a turn on, and where each one's held-out evaluation labels come from.

Every scene is one fixed camera's video: the edge samples from the first 60 %, the last 40 % is evaluation only
(never sampled, labeled for training or used for calibration). The evaluation labels are written in the
persons-eval format (``{"image", "width", "height", "boxes", "visibility", "ignore"}``) that
``models.evaluate`` scores:

* ``pets09``: ``../shared/data/sequences/PETS09-S2L1`` with its ground truth (``gt.json``), every frame of the slice;
* ``towncentre``: the street clip ``outdoor_street_cctv_towncentre_720p.m4v`` with the hand-checked labels of 16
  frames of the slice (``bench/data/towncentre_eval_labels.json``: teacher labels corrected by hand, each
  frame's changes recorded there).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("SMARTCAM_SHARED", ROOT.parent / "shared"))
VIDEOS = SHARED / "data" / "videos"
PETS = SHARED / "data" / "sequences" / "PETS09-S2L1"
STREET = VIDEOS / "outdoor_street_cctv_towncentre_720p.m4v"
TOWNCENTRE_LABELS = ROOT / "bench" / "data" / "towncentre_eval_labels.json"

Labeler = Callable[[list[np.ndarray], int, Path], Path]


@dataclass(frozen=True)
class Scene:
    name: str
    title: str  # the table's column for the held-out slice
    video: Path
    eval_labels: Labeler  # (frames, split, out dir) -> labels.json of the held-out slice
    general_clips: tuple[str, ...]  # other scenes' clips for the "general" share (never this one)


def _write(out: Path, frames: list[np.ndarray], items: list[tuple[int, dict]]) -> Path:
    """Frames (JPEG q95) + a persons-eval labels.json; ``items`` are (0-based frame index, label fields)."""
    labels = out / "labels.json"
    (out / "images").mkdir(parents=True, exist_ok=True)
    records = []
    for idx, fields in items:
        name = f"images/{idx + 1:06d}.jpg"
        cv2.imwrite(str(out / name), frames[idx], [cv2.IMWRITE_JPEG_QUALITY, 95])
        records.append({"image": name, "width": frames[idx].shape[1], "height": frames[idx].shape[0], **fields})
    labels.write_text(json.dumps(records))
    return labels


def pets_labels(frames: list[np.ndarray], split: int, out: Path) -> Path:
    """Every frame of the last 40 % with PETS09's ground truth."""
    gt = {g["frame"]: g for g in json.loads((PETS / "gt.json").read_text())}
    items = []
    for idx in range(split, len(frames)):
        g = gt.get(idx + 1, {"boxes": [], "visibility": None, "ignore": []})
        vis = [1.0 if v is None else v for v in (g.get("visibility") or [None] * len(g["boxes"]))]
        items.append((idx, {"boxes": g["boxes"], "visibility": vis, "ignore": g.get("ignore") or []}))
    return _write(out, frames, items)


def towncentre_labels(frames: list[np.ndarray], split: int, out: Path) -> Path:
    """The hand-checked frames of the street clip's last 40 % (all of them after ``split``, checked here)."""
    doc = json.loads(TOWNCENTRE_LABELS.read_text())
    h, w = frames[0].shape[:2]
    if (doc["width"], doc["height"]) != (w, h):
        raise SystemExit(f"{TOWNCENTRE_LABELS.name} is for {doc['width']}x{doc['height']} frames, the clip is {w}x{h}")
    items = []
    for f in doc["frames"]:
        idx = f["frame"] - 1
        if not split <= idx < len(frames):
            raise SystemExit(f"{TOWNCENTRE_LABELS.name}: frame {f['frame']} is not in the held-out 40 % "
                             f"(frames {split + 1}-{len(frames)})")
        items.append((idx, {"boxes": f["boxes"], "visibility": [1.0] * len(f["boxes"]), "ignore": f["ignore"]}))
    return _write(out, frames, items)


SCENES = {
    "pets09": Scene("pets09", "PETS09 held-out AP50", PETS / "PETS09-S2L1.mp4", pets_labels,
                    ("outdoor_street_cctv_towncentre_720p.m4v", "outdoor_overhead_plaza_many_people.mp4",
                     "indoor_webcam_2people_with_overlay.mp4")),
    "towncentre": Scene("towncentre", "street held-out AP50 (16 hand-checked frames)", STREET, towncentre_labels,
                        ("outdoor_overhead_plaza_many_people.mp4", "indoor_webcam_2people_with_overlay.mp4")),
}

"""``smartcam-model label``: sampled frames -> a YOLO dataset, labeled by a teacher stronger than the edge model.

The edge runs a small INT8 model at 320; the cloud can afford the same network in fp32 at a large input, run on
the frame and its mirror image (test-time augmentation), and on overlapping tiles when the frame is much larger
than the input (small, far-away people get more pixels). The views' person boxes are fused by weighted box
fusion (:func:`fuse_boxes`): boxes of one person seen by several views are averaged, weighted by score, and the
score is scaled by the share of views that saw it, so a box only one view believed counts less.

Training labels come from this teacher only (ground truth is for evaluation). The dataset is the layout every
YOLO tool reads (Ultralytics, Label Studio, CVAT), so a person can correct the labels before training::

    OUT/data.yaml  OUT/images/{train,val}/*.jpg  OUT/labels/{train,val}/*.txt  OUT/val.labels.json

Train and validation are split *by time*: the last ``val_share`` of the frames (by capture time) are the
validation slice, so the model is judged on moments it never trained on. ``val.labels.json`` holds the same
teacher boxes in persons-eval format, for ``smartcam-model eval`` and the gate.

>>> b = np.array([[0, 0, 10, 10], [1, 0, 11, 10], [50, 50, 60, 60]], np.float32)
>>> boxes, scores = fuse_boxes(b, np.array([0.8, 0.6, 0.9], np.float32), views=2)
>>> [[round(v, 1) for v in box] for box in boxes.tolist()], [round(v, 2) for v in scores.tolist()]
([[0.4, 0.0, 10.4, 10.0], [50.0, 50.0, 60.0, 60.0]], [0.7, 0.45])
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import onnx
import yaml
from tqdm import tqdm

from camera.detections import Detections, iou_matrix
from camera.detector import Detector, fitted_imgsz
from camera.sources import IMAGE_SUFFIXES

log = logging.getLogger(__name__)

FUSE_IOU = 0.55  # WBF's usual cluster threshold
VIEW_CONF = 0.05  # each view keeps boxes down to this score before fusion


def fuse_boxes(boxes: np.ndarray, scores: np.ndarray, views: int, iou: float = FUSE_IOU
               ) -> tuple[np.ndarray, np.ndarray]:
    """Weighted box fusion (Solovyev et al., 2019) of the boxes of ``views`` views of one image.

    Boxes are taken by decreasing score; each joins the first cluster whose fused box it overlaps by ``iou``, or
    starts a new one. A cluster's box is the score-weighted mean of its members; its score is their mean score
    times ``min(members, views) / views``.
    """
    if len(boxes) == 0:
        return np.zeros((0, 4), np.float32), np.zeros(0, np.float32)
    order = np.argsort(-scores, kind="stable")
    fused: list[np.ndarray] = []
    members: list[list[int]] = []
    for i in order:
        if fused:
            overlap = iou_matrix(boxes[i:i + 1], np.stack(fused))[0]
            j = int(overlap.argmax())
            if overlap[j] >= iou:
                members[j].append(int(i))
                w = scores[members[j]]
                fused[j] = (boxes[members[j]] * w[:, None]).sum(0) / w.sum()
                continue
        fused.append(boxes[i].astype(np.float64))
        members.append([int(i)])
    out_scores = np.array([scores[m].mean() * min(len(m), views) / views for m in members], np.float32)
    out_boxes = np.stack(fused).astype(np.float32)
    keep = np.argsort(-out_scores, kind="stable")
    return out_boxes[keep], out_scores[keep]


def tile_grid(w: int, h: int, tile: int, overlap: float = 0.2) -> list[tuple[int, int, int, int]]:
    """Overlapping square-ish tiles (x1, y1, x2, y2) covering a ``w`` x ``h`` frame; none if it fits one input.

    >>> [t[:2] for t in tile_grid(1920, 1080, 960)]
    [(0, 0), (0, 120), (768, 0), (768, 120), (960, 0), (960, 120)]
    >>> tile_grid(768, 576, 960)
    []
    """
    if max(w, h) <= tile:
        return []
    step = int(tile * (1 - overlap))

    def starts(size: int) -> list[int]:
        if size <= tile:
            return [0]
        out = list(range(0, size - tile, step)) + [size - tile]
        return sorted(set(out))

    return [(x, y, min(x + tile, w), min(y + tile, h)) for x in starts(w) for y in starts(h)]


class Teacher:
    """The labeling model: an fp32 ONNX resized to ``imgsz`` (graph surgery, no torch), with flip TTA and tiles.

    ``detect`` has the edge Detector's signature, so ``models.evaluate`` can score the teacher like any model.
    """

    def __init__(self, model: str | os.PathLike, imgsz: int = 960, *, flip: bool = True, tiles: bool = True,
                 threads: int | None = None, workdir: str | os.PathLike | None = None) -> None:
        self.model = Path(model)
        self.imgsz = int(imgsz)
        self.flip = flip
        self.tiles = tiles
        self.threads = threads
        self._tmp = tempfile.TemporaryDirectory(prefix="smartcam-teacher-") if workdir is None else None
        self.workdir = Path(workdir) if workdir is not None else Path(self._tmp.name)
        self._detectors: dict[tuple[int, int], Detector] = {}

    def _detector(self, shape: tuple[int, int]) -> Detector:
        """The teacher network at input ``shape`` (h, w), exported once per shape."""
        if shape not in self._detectors:
            from models.export import fp32_model

            path = self.workdir / f"teacher-{self.model.stem}-{shape[0]}x{shape[1]}.onnx"
            if not path.is_file():
                self.workdir.mkdir(parents=True, exist_ok=True)
                onnx.save(fp32_model(str(self.model), shape, self.workdir / "export"), path)
            self._detectors[shape] = Detector(path, conf=VIEW_CONF, iou=0.6, classes=("person",), max_det=1000,
                                              threads=self.threads)
        return self._detectors[shape]

    def detect(self, image: np.ndarray) -> Detections:
        h, w = image.shape[:2]
        full = self._detector(fitted_imgsz((w, h), self.imgsz))
        boxes, scores = [], []
        d = full.detect(image)
        boxes.append(d.xyxy)
        scores.append(d.confidence)
        views = 1
        if self.flip:
            f = full.detect(np.ascontiguousarray(image[:, ::-1]))
            xyxy = f.xyxy.copy()
            xyxy[:, [0, 2]] = w - f.xyxy[:, [2, 0]]
            boxes.append(xyxy)
            scores.append(f.confidence)
            views += 1
        grid = tile_grid(w, h, self.imgsz) if self.tiles else []
        if grid:
            views += 1
            tile_det = self._detector((self.imgsz, self.imgsz))
            for x1, y1, x2, y2 in grid:
                t = tile_det.detect(image[y1:y2, x1:x2])
                inner = _away_from_cut(t.xyxy, (x1, y1, x2, y2), w, h)  # a person cut by the tile edge: not here
                boxes.append(t.xyxy[inner] + np.array([x1, y1, x1, y1], np.float32))
                scores.append(t.confidence[inner])
        b, s = fuse_boxes(np.concatenate(boxes), np.concatenate(scores), views)
        return Detections(b, s, np.zeros(len(s), np.int32))

    def describe(self) -> dict:
        return {"model": str(self.model), "imgsz": self.imgsz, "flip": self.flip, "tiles": self.tiles,
                "fusion": f"weighted box fusion, IoU {FUSE_IOU}"}


def _away_from_cut(xyxy: np.ndarray, tile: tuple[int, int, int, int], w: int, h: int, margin: float = 4.0
                   ) -> np.ndarray:
    """Boxes that do not touch a tile edge lying inside the frame (those belong to a neighbouring tile)."""
    x1, y1, x2, y2 = tile
    tw, th = x2 - x1, y2 - y1
    keep = np.ones(len(xyxy), bool)
    if x1 > 0:
        keep &= xyxy[:, 0] > margin
    if y1 > 0:
        keep &= xyxy[:, 1] > margin
    if x2 < w:
        keep &= xyxy[:, 2] < tw - margin
    if y2 < h:
        keep &= xyxy[:, 3] < th - margin
    return keep


@dataclass
class SampleImage:
    path: Path
    ts: float  # capture time, epoch seconds (orders the train/val split)
    meta: dict


def find_images(images: str | os.PathLike) -> list[SampleImage]:
    """The frames to label, oldest first: ``DIR/samples.jsonl`` (what ``smartcam-sink samples export`` writes,
    times from its ``ts``) if present, else every image in DIR (or DIR/images) ordered by name."""
    from contract.timestamps import parse_ts

    root = Path(images)
    if not root.is_dir():
        raise FileNotFoundError(f"images folder not found: {root}")
    index = root / "samples.jsonl"
    if not index.is_file() and (root.parent / "samples.jsonl").is_file() and root.name == "images":
        index, root = root.parent / "samples.jsonl", root.parent
    out: list[SampleImage] = []
    if index.is_file():
        for n, line in enumerate(index.read_text().splitlines(), start=1):
            if not line.strip():
                continue
            try:
                meta = json.loads(line)
                path = root / meta["image_file"]
                ts = parse_ts(meta["ts"])
            except (ValueError, KeyError, TypeError) as exc:
                raise ValueError(f"{index}:{n}: not a sample record ({exc})") from None
            out.append(SampleImage(path, ts, meta))
    else:
        folder = root / "images" if (root / "images").is_dir() else root
        files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        out = [SampleImage(p, float(i), {}) for i, p in enumerate(files)]
    if not out:
        raise ValueError(f"no images in {root}")
    return sorted(out, key=lambda s: (s.ts, s.path.name))


@dataclass
class LabelResult:
    data_yaml: Path
    train: int
    val: int
    boxes: int
    val_labels: Path


def yolo_lines(d: Detections, w: int, h: int) -> list[str]:
    """YOLO label lines ``class cx cy w h`` (normalized) of person boxes, clipped to the frame."""
    lines = []
    for x1, y1, x2, y2 in np.clip(d.xyxy, 0, [w, h, w, h]):
        bw, bh = x2 - x1, y2 - y1
        if bw >= 2 and bh >= 2:
            lines.append(f"0 {(x1 + x2) / 2 / w:.6f} {(y1 + y2) / 2 / h:.6f} {bw / w:.6f} {bh / h:.6f}")
    return lines


def write_data_yaml(out: Path, names: dict[int, str], train: Sequence[str] = ("images/train",),
                    val: str = "images/val") -> Path:
    """``data.yaml`` for Ultralytics. The teacher's whole class list is kept (labels use class 0, person), so a
    COCO checkpoint keeps every head weight when it trains on it."""
    path = out / "data.yaml"
    path.write_text(yaml.safe_dump({"path": str(out.resolve()), "train": list(train) if len(train) > 1 else train[0],
                                    "val": val, "names": {int(k): v for k, v in names.items()}}, sort_keys=False))
    return path


def label_images(images: str | os.PathLike, teacher: Teacher, out: str | os.PathLike, *, conf: float = 0.35,
                 val_share: float = 0.2, progress: bool = True) -> LabelResult:
    """Label every frame with ``teacher`` (boxes scoring >= ``conf``) and write the dataset (module docstring)."""
    if not 0 <= val_share < 1:
        raise ValueError(f"val share must be in [0, 1), got {val_share}")
    items = find_images(images)
    out = Path(out)
    n_val = int(round(len(items) * val_share)) if len(items) > 1 else 0
    if val_share > 0 and len(items) > 1:
        n_val = max(1, n_val)
    split = len(items) - n_val
    for sub in ("images/train", "images/val", "labels/train", "labels/val"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    val_records, n_boxes = [], 0
    for k, item in enumerate(tqdm(items, desc="label", unit="frame", disable=not progress)):
        image = cv2.imread(str(item.path), cv2.IMREAD_COLOR)
        if image is None:
            raise ValueError(f"cannot read image {item.path}")
        h, w = image.shape[:2]
        d = teacher.detect(image)
        d = d[d.confidence >= conf]
        part = "train" if k < split else "val"
        stem = f"{k:06d}_{item.path.stem}"
        dst = out / "images" / part / f"{stem}{item.path.suffix.lower()}"
        if not dst.exists():
            shutil.copyfile(item.path, dst)
        lines = yolo_lines(d, w, h)
        (out / "labels" / part / f"{stem}.txt").write_text("".join(line + "\n" for line in lines))
        n_boxes += len(lines)
        if part == "val":
            val_records.append({"image": f"images/val/{dst.name}", "width": w, "height": h,
                                "boxes": np.round(d.xyxy, 1).tolist(), "visibility": [1.0] * len(d),
                                "ignore": [], "ts": item.ts})
    val_labels = out / "val.labels.json"
    val_labels.write_text(json.dumps(val_records))
    names = teacher._detector(fitted_imgsz((w, h), teacher.imgsz)).names
    data = write_data_yaml(out, names)
    (out / "teacher.json").write_text(json.dumps({**teacher.describe(), "conf": conf, "val_share": val_share,
                                                  "frames": len(items), "boxes": n_boxes}, indent=2))
    log.info("labeled %d frames (%d train, %d val, %d boxes) into %s", len(items), split, n_val, n_boxes, out)
    return LabelResult(data, split, n_val, n_boxes, val_labels)

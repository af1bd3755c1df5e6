"""Person detection accuracy (AP50, AP50-95, precision/recall at the edge threshold) and latency of ONNX models.

Labels are ``../shared/data/persons-eval/labels.json``: per image ``boxes`` (pixel corners), ``visibility``
and ``ignore`` regions. Ground truth less than 25 % visible and the ignore regions are *neutral*: a detection
on them is neither a hit nor a false alarm (as MOTChallenge and COCO's crowd regions). A second detection of
an already matched person is a false positive. AP is COCO's 101-point interpolated AP.
"""

from __future__ import annotations

import json
import os
import random
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import cv2
import numpy as np

from camera.detections import iou_matrix
from camera.detector import Detector, preprocess

IOU_THRESHOLDS = np.round(np.arange(0.5, 0.96, 0.05), 2)
MIN_VISIBILITY = 0.25
IGNORE_COVERAGE = 0.5  # a detection at least half inside an ignore region is neutral
TP, FP, NEUTRAL = 1, 0, -1


@dataclass
class LabeledImage:
    path: Path
    boxes: np.ndarray  # (G, 4) x1 y1 x2 y2
    visibility: np.ndarray  # (G,)
    ignore: np.ndarray  # (K, 4)


@dataclass
class Prediction:
    xyxy: np.ndarray  # (N, 4)
    scores: np.ndarray  # (N,)


@dataclass
class Scores:
    ap50: float
    ap50_95: float
    precision: float  # at the operating threshold, IoU 0.5
    recall: float
    tp: int
    fp: int
    gt: int
    conf: float
    per_iou: dict[str, float] = field(default_factory=dict)


def load_labels(path: str | os.PathLike) -> list[LabeledImage]:
    """Read labels.json; image paths are relative to its folder. Raises ValueError on a malformed file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"labels file not found: {path}")
    try:
        records = json.loads(path.read_text())
        images = []
        for r in records:
            boxes = np.asarray(r["boxes"], np.float32).reshape(-1, 4)
            vis = np.asarray(r.get("visibility", [1.0] * len(boxes)), np.float32)
            if len(vis) != len(boxes):
                raise ValueError(f"{r['image']}: {len(vis)} visibilities for {len(boxes)} boxes")
            ignore = np.asarray(r.get("ignore", []), np.float32).reshape(-1, 4)
            images.append(LabeledImage(path.parent / r["image"], boxes, vis, ignore))
    except (KeyError, TypeError, json.JSONDecodeError) as exc:
        raise ValueError(f"malformed labels file {path}: {exc}") from None
    return images


def coverage(dets: np.ndarray, regions: np.ndarray) -> np.ndarray:
    """Largest fraction of each detection's area inside any region (N,)."""
    if len(regions) == 0 or len(dets) == 0:
        return np.zeros(len(dets), np.float32)
    lt = np.maximum(dets[:, None, :2], regions[None, :, :2])
    rb = np.minimum(dets[:, None, 2:], regions[None, :, 2:])
    inter = np.prod(np.clip(rb - lt, 0, None), axis=2)
    area = np.maximum(np.prod(np.clip(dets[:, 2:] - dets[:, :2], 0, None), axis=1), 1e-9)
    return (inter / area[:, None]).max(axis=1)


def match_image(pred: Prediction, gt: LabeledImage, iou_thr: float) -> tuple[np.ndarray, int]:
    """Label each detection TP / FP / NEUTRAL (highest score first); return the labels and the valid GT count."""
    valid = gt.visibility >= MIN_VISIBILITY
    flags = np.full(len(pred.scores), FP, np.int8)
    if len(pred.scores) == 0:
        return flags, int(valid.sum())
    ious = iou_matrix(pred.xyxy, gt.boxes) if len(gt.boxes) else np.zeros((len(pred.scores), 0))
    in_ignore = coverage(pred.xyxy, gt.ignore) >= IGNORE_COVERAGE
    matched = np.zeros(len(gt.boxes), bool)
    for d in np.argsort(-pred.scores, kind="stable"):
        row = ious[d]
        free = np.where(valid & ~matched & (row >= iou_thr), row, -1.0)
        if free.size and free.max() >= 0:
            matched[int(free.argmax())] = True
            flags[d] = TP
        elif (row[~valid] >= iou_thr).any():
            flags[d] = NEUTRAL  # a barely visible person: finding it is not an error
        elif (row[valid & matched] >= iou_thr).any():
            flags[d] = FP  # duplicate of a person already found
        elif in_ignore[d]:
            flags[d] = NEUTRAL
    return flags, int(valid.sum())


def average_precision(scores: np.ndarray, flags: np.ndarray, n_gt: int) -> float:
    """COCO 101-point interpolated AP from per-detection TP/FP flags (NEUTRAL ones dropped)."""
    keep = flags != NEUTRAL
    scores, flags = scores[keep], flags[keep]
    if n_gt == 0:
        return float("nan")
    if len(scores) == 0:
        return 0.0
    order = np.argsort(-scores, kind="stable")
    tp = np.cumsum(flags[order] == TP)
    fp = np.cumsum(flags[order] == FP)
    recall = tp / n_gt
    precision = tp / np.maximum(tp + fp, 1)
    precision = np.maximum.accumulate(precision[::-1])[::-1]  # envelope
    points = np.linspace(0, 1, 101)
    idx = np.searchsorted(recall, points, side="left")
    return float(np.mean([precision[i] if i < len(precision) else 0.0 for i in idx]))


def score(labels: Sequence[LabeledImage], preds: Sequence[Prediction], conf: float = 0.25) -> Scores:
    """AP50, AP50-95 and precision/recall at ``conf`` for predictions made at a low threshold."""
    if len(labels) != len(preds):
        raise ValueError(f"{len(preds)} predictions for {len(labels)} labeled images")
    all_scores = np.concatenate([p.scores for p in preds]) if preds else np.zeros(0, np.float32)
    per_iou: dict[str, float] = {}
    op = (0, 0, 0)
    for thr in IOU_THRESHOLDS:
        flags, n_gt = [], 0
        for p, g in zip(preds, labels, strict=True):
            f, n = match_image(p, g, float(thr))
            flags.append(f)
            n_gt += n
        flat = np.concatenate(flags) if flags else np.zeros(0, np.int8)
        per_iou[f"{thr:.2f}"] = average_precision(all_scores, flat, n_gt)
        if thr == 0.5:
            at_op = all_scores > conf
            op = (int((flat[at_op] == TP).sum()), int((flat[at_op] == FP).sum()), n_gt)
    tp, fp, n_gt = op
    return Scores(
        ap50=per_iou["0.50"],
        ap50_95=float(np.mean(list(per_iou.values()))),
        precision=tp / max(tp + fp, 1),
        recall=tp / max(n_gt, 1),
        tp=tp,
        fp=fp,
        gt=n_gt,
        conf=conf,
        per_iou=per_iou,
    )


def predict(detector: Detector, labels: Sequence[LabeledImage], progress=None) -> list[Prediction]:
    """Run a (low-threshold) detector over every labeled image."""
    preds = []
    for item in labels:
        image = cv2.imread(str(item.path), cv2.IMREAD_COLOR)
        if image is None:
            raise ValueError(f"cannot read image {item.path}")
        d = detector.detect(image)
        preds.append(Prediction(d.xyxy, d.confidence))
        if progress is not None:
            progress.update(1)
    return preds


def scoring_detector(model_path: str | os.PathLike, iou: float = 0.45) -> Detector:
    """The detector accuracy is scored with: persons at conf 0.001 (the whole PR curve), the edge's NMS IoU."""
    return Detector(model_path, conf=0.001, iou=iou, classes=("person",))


def evaluate_accuracy(
    model: str | os.PathLike | Detector,
    labels: Sequence[LabeledImage],
    conf: float = 0.25,
    iou: float = 0.45,
    progress=None,
) -> Scores:
    """Person AP of one model (a path, or a :func:`scoring_detector` already loaded); ``conf`` is the operating
    threshold for precision/recall."""
    detector = model if isinstance(model, Detector) else scoring_detector(model, iou)
    return score(labels, predict(detector, labels, progress), conf)


def measure_latency(
    model_paths: Sequence[str | os.PathLike],
    image: np.ndarray,
    threads: Sequence[int],
    runs: int = 20,
    warmup: int = 3,
    progress=None,
    stages: Sequence[str] = ("detect",),
) -> dict[str, dict[str, dict[int, float]]]:
    """Median ms as ``{model: {stage: {threads: ms}}}``. Stages: ``detect`` = a full ``detect()`` on ``image``
    (letterbox, inference, decode: what the edge pays per frame), ``infer`` = the network alone.

    Every (model, thread count, stage) is timed once per round, in a shuffled order, round after round, so that
    load from other processes and position effects hit all of them alike and the ratios stay meaningful.
    """
    unknown = set(stages) - {"detect", "infer"}
    if unknown:
        raise ValueError(f"unknown latency stage {sorted(unknown)[0]!r} (use detect or infer)")
    calls: dict[tuple[str, str, int], partial] = {}
    for p in model_paths:
        for n in threads:
            det = Detector(p, threads=n)
            blob = preprocess(image, det.imgsz)[0]
            for stage in stages:
                calls[(str(p), stage, n)] = (
                    partial(det.detect, image) if stage == "detect" else partial(det.infer, blob)
                )
    times: dict[tuple[str, str, int], list[float]] = {k: [] for k in calls}
    for _ in range(warmup):
        for call in calls.values():
            call()
    # A fresh order every round: in a fixed order the model right after the fp32 one ran up to 30 % faster
    # (cache/frequency effects), which biased the INT8/fp32 ratio by the model's position in the list.
    rng = random.Random(0)
    keys = list(calls)
    for _ in range(runs):
        rng.shuffle(keys)
        for key in keys:
            t0 = time.perf_counter()
            calls[key]()
            times[key].append((time.perf_counter() - t0) * 1000)
        if progress is not None:
            progress.update(1)
    result: dict[str, dict[str, dict[int, float]]] = {}
    for (path, stage, n), values in times.items():
        result.setdefault(path, {}).setdefault(stage, {})[n] = statistics.median(values)
    return result

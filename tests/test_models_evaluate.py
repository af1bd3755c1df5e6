"""Evaluator: hand-made cases with known answers (perfect, ignore regions, low visibility, duplicates)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from camera.detections import iou_matrix
from models.evaluate import (
    FP,
    NEUTRAL,
    TP,
    LabeledImage,
    Prediction,
    average_precision,
    load_labels,
    match_image,
    score,
)

GT = np.array([[10, 10, 50, 110], [100, 20, 140, 120], [200, 40, 230, 100]], np.float32)


def _image(vis=(1.0, 1.0, 1.0), ignore=()) -> LabeledImage:
    return LabeledImage(
        path=None,  # type: ignore[arg-type]
        boxes=GT.copy(),
        visibility=np.array(vis, np.float32),
        ignore=np.array(ignore, np.float32).reshape(-1, 4),
    )


def _pred(boxes, scores) -> Prediction:
    return Prediction(np.array(boxes, np.float32).reshape(-1, 4), np.array(scores, np.float32))


def test_perfect_detections_score_ap_one():
    s = score([_image()], [_pred(GT, [0.9, 0.8, 0.7])])
    assert s.ap50 == pytest.approx(1.0) and s.ap50_95 == pytest.approx(1.0)
    assert (s.precision, s.recall, s.tp, s.fp, s.gt) == (1.0, 1.0, 3, 0, 3)


def test_no_detections_score_zero():
    s = score([_image()], [_pred([], [])])
    assert s.ap50 == 0.0 and s.recall == 0.0 and s.precision == 0.0


def test_detection_on_ignore_region_changes_nothing():
    base = score([_image(ignore=[[300, 0, 360, 100]])], [_pred(GT, [0.9, 0.8, 0.7])])
    on_ignore = _pred(np.vstack([GT, [[305, 10, 350, 95]]]), [0.9, 0.8, 0.7, 0.95])
    s = score([_image(ignore=[[300, 0, 360, 100]])], [on_ignore])
    assert s.ap50 == base.ap50 == pytest.approx(1.0)
    assert (s.tp, s.fp, s.precision) == (3, 0, 1.0)
    # the same detection without the ignore region is a false alarm with the highest score
    s2 = score([_image()], [on_ignore])
    assert s2.fp == 1 and s2.ap50 < 1.0


def test_low_visibility_ground_truth_is_neutral():
    img = _image(vis=(1.0, 1.0, 0.1))
    found = score([img], [_pred(GT, [0.9, 0.8, 0.7])])
    missed = score([img], [_pred(GT[:2], [0.9, 0.8])])
    assert found.ap50 == missed.ap50 == pytest.approx(1.0)
    assert found.gt == missed.gt == 2 and found.fp == 0


def test_duplicate_is_a_false_positive():
    dup = [[12, 12, 50, 108]]  # IoU ~0.9 with the first person, already matched by a better detection
    flags, n_gt = match_image(_pred(np.vstack([GT, dup]), [0.9, 0.8, 0.7, 0.85]), _image(), 0.5)
    assert flags.tolist() == [TP, TP, TP, FP] and n_gt == 3
    s = score([_image()], [_pred(np.vstack([GT, dup]), [0.9, 0.8, 0.7, 0.85])])
    assert s.fp == 1 and s.precision == pytest.approx(0.75) and s.ap50 < 1.0


def test_localisation_error_fails_strict_ious_only():
    shifted = GT + np.array([6, 0, 6, 0], np.float32)  # IoU 0.74 (40 px wide) and 0.67 (30 px)
    s = score([_image()], [_pred(shifted, [0.9, 0.8, 0.7])])
    assert s.ap50 == pytest.approx(1.0)
    assert s.per_iou["0.95"] == 0.0 and 0 < s.ap50_95 < 1.0


def test_neutral_flags_are_dropped_from_ap():
    flags = np.array([NEUTRAL, TP, FP], np.int8)
    assert average_precision(np.array([0.99, 0.9, 0.1]), flags, 1) == pytest.approx(1.0)
    assert np.isnan(average_precision(np.array([0.5]), np.array([FP], np.int8), 0))


def test_iou_matrix():
    a = np.array([[0, 0, 10, 10]], np.float32)
    b = np.array([[0, 0, 10, 10], [5, 0, 15, 10], [20, 20, 30, 30]], np.float32)
    assert iou_matrix(a, b)[0] == pytest.approx([1.0, 1 / 3, 0.0])


def test_load_labels_resolves_paths_and_rejects_bad_files(tmp_path):
    labels = tmp_path / "labels.json"
    labels.write_text(json.dumps([{"image": "images/a.jpg", "boxes": [[0, 0, 1, 1]], "visibility": [1.0]}]))
    (item,) = load_labels(labels)
    assert item.path == tmp_path / "images" / "a.jpg" and item.ignore.shape == (0, 4)
    labels.write_text(json.dumps([{"image": "a.jpg", "boxes": [[0, 0, 1, 1]], "visibility": []}]))
    with pytest.raises(ValueError, match="visibilities"):
        load_labels(labels)
    labels.write_text("{not json")
    with pytest.raises(ValueError, match="malformed"):
        load_labels(labels)
    with pytest.raises(FileNotFoundError):
        load_labels(tmp_path / "missing.json")

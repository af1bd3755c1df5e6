"""Per-model thresholds (issue 15): precision matching on the camera's validation slice (models/thresholds.py),
and the tracker taking a model's own score thresholds from its manifest (camera/tracker.py)."""

from __future__ import annotations

import numpy as np
import pytest

from camera.tracker import TrackerSpec, with_model_thresholds
from models.evaluate import FP, NEUTRAL, TP, LabeledImage, Prediction
from models.thresholds import DEFAULTS, ScoredBoxes, choose_thresholds


def synthetic(n: int = 2000, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Scores of a general model (uniform) whose precision rises with the score: P(right | s) = s."""
    rng = np.random.default_rng(seed)
    s = rng.uniform(0.01, 0.99, n)
    return s, np.where(rng.uniform(size=n) < s, TP, FP).astype(np.int8)


def test_a_model_that_scores_the_same_boxes_higher_gets_its_thresholds_raised_by_the_same_map():
    s, flags = synthetic()
    current = ScoredBoxes(s, flags)
    candidate = ScoredBoxes(np.sqrt(s), flags)  # the same boxes, a monotone rescoring: 0.25 -> 0.5, 0.5 -> 0.707
    choice = choose_thresholds(current, candidate, DEFAULTS)
    for key, t in DEFAULTS.items():
        assert choice.thresholds[key] == pytest.approx(np.sqrt(t), abs=0.02), key
        row = next(r for r in choice.rows if r["name"] == key)
        assert row["reason"] == "matched"
        assert row["precision_new"] >= row["precision_current"] - 1e-9  # at least as reliable
        assert row["precision_new"] == pytest.approx(row["precision_current"], abs=0.01)


def test_a_model_that_is_more_precise_everywhere_gets_lower_thresholds_and_more_boxes():
    s, flags = synthetic()
    better = np.where(flags == TP, np.minimum(s + 0.1, 0.99), s)  # right boxes score higher, wrong ones the same
    current, candidate = ScoredBoxes(s, flags), ScoredBoxes(better, flags)
    choice = choose_thresholds(current, candidate, {"conf": 0.5}, keys=("conf",))
    assert choice.thresholds["conf"] < 0.5
    p_cur, n_cur = current.precision_above(0.5)
    p_new, n_new = candidate.precision_above(choice.thresholds["conf"])
    assert p_new >= p_cur and n_new > n_cur


def test_too_few_boxes_on_the_slice_keep_the_current_thresholds():
    s, flags = synthetic(n=15)
    choice = choose_thresholds(ScoredBoxes(s, flags), ScoredBoxes(np.sqrt(s), flags),
                               {"conf": 0.3, "track_threshold": 0.6, "high_score": 0.45, "new_track_score": 0.55})
    assert choice.thresholds == {"conf": 0.3, "track_threshold": 0.6, "high_score": 0.45, "new_track_score": 0.55}
    assert all(r["reason"].startswith("kept: the current model has") for r in choice.rows)


def test_a_new_model_that_never_gets_as_precise_keeps_the_threshold():
    s, flags = synthetic()
    current = ScoredBoxes(s, flags)
    candidate = ScoredBoxes(s, np.where(np.arange(len(s)) % 2 == 0, TP, FP).astype(np.int8))  # precision 0.5
    choice = choose_thresholds(current, candidate, {"conf": 0.8}, keys=("conf",))
    assert choice.thresholds["conf"] == 0.8 and choice.rows[0]["reason"].startswith("kept: the new model never")


def test_chosen_thresholds_are_clamped_and_keep_the_trackers_order():
    s, flags = synthetic()
    current = ScoredBoxes(s, flags)
    high = ScoredBoxes(s ** 0.05, flags)  # squeezed towards 1: matched thresholds land above 0.9
    assert set(choose_thresholds(current, high, DEFAULTS).thresholds.values()) == {0.9}
    low = ScoredBoxes(s ** 4, flags)  # spread towards 0: 0.25 -> 0.004
    chosen = choose_thresholds(current, low, DEFAULTS).thresholds
    assert chosen["conf"] == 0.1 and 0.1 <= chosen["high_score"] <= chosen["new_track_score"]
    # matching that breaks conf <= high_score <= new_track_score is put back in order
    odd = choose_thresholds(current, ScoredBoxes(np.sqrt(s), flags),
                            {"conf": 0.6, "high_score": 0.4, "new_track_score": 0.3},
                            keys=("conf", "high_score", "new_track_score")).thresholds
    assert odd["conf"] <= odd["high_score"] <= odd["new_track_score"]


def test_scored_boxes_of_a_slice_leave_neutral_detections_out(tmp_path):
    gt = LabeledImage(path=tmp_path / "a.jpg",
                      boxes=np.array([[0, 0, 10, 20], [50, 50, 60, 70]], np.float64),
                      visibility=np.array([1.0, 1.0]), ignore=np.array([[80, 0, 100, 30]], np.float64))
    pred = Prediction(np.array([[0, 0, 10, 20], [30, 30, 40, 50], [82, 2, 92, 22]], np.float32),
                      np.array([0.9, 0.8, 0.7], np.float32))
    boxes = ScoredBoxes.of([gt], [pred])
    assert boxes.flags.tolist() == [TP, FP, NEUTRAL]
    assert boxes.precision_above(0.5) == (0.5, 2)  # the one in the ignore region counts neither way
    assert boxes.precision_above(0.85) == (1.0, 1)
    assert FP != NEUTRAL


def test_the_tracker_takes_a_models_own_score_thresholds():
    base = TrackerSpec(high_score=0.35, low_score=0.2, new_track_score=0.45, min_hits=2)
    spec = with_model_thresholds(base, {"conf": 0.3, "iou": 0.45, "high_score": 0.6, "new_track_score": 0.7})
    assert (spec.high_score, spec.new_track_score, spec.low_score, spec.min_hits) == (0.6, 0.7, 0.2, 2)
    assert with_model_thresholds(base, {"conf": 0.3, "track_threshold": 0.5}) is base  # an older manifest
    lower = with_model_thresholds(base, {"high_score": 0.15})
    assert lower.high_score == lower.low_score == 0.15  # low_score <= high_score still holds

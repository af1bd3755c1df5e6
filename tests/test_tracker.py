"""Tracker: confirmation, ids, association stages, occlusion gaps, hold/flush."""

from __future__ import annotations

import numpy as np
import pytest
from pydantic import ValidationError

from camera.detections import Detections, iou_matrix
from camera.tracker import Tracker, TrackerSpec, greedy_match


def dets(*boxes: tuple[float, float, float, float, float], class_id: int = 0) -> Detections:
    """Detections from (x1, y1, x2, y2, score) tuples."""
    if not boxes:
        return Detections.empty()
    arr = np.array(boxes, dtype=np.float32)
    return Detections(arr[:, :4], arr[:, 4], np.full(len(arr), class_id, np.int32))


def walk(x0: float, step: float, n: int, score: float = 0.9, y: float = 100.0):
    """A person box moving right by ``step`` px per frame."""
    return [(x0 + i * step, y, x0 + i * step + 40, y + 100, score) for i in range(n)]


def test_iou_matrix_and_greedy_match():
    a = np.array([[0, 0, 10, 10], [20, 20, 30, 30]])
    b = np.array([[0, 0, 10, 10], [5, 0, 15, 10], [100, 100, 110, 110]])
    iou = iou_matrix(a, b)
    assert iou.shape == (2, 3)
    assert iou[0, 0] == pytest.approx(1.0)
    assert iou[0, 1] == pytest.approx(50 / 150)
    assert iou[1].max() == 0
    assert greedy_match(iou, 0.3) == [(0, 0)]
    assert greedy_match(np.array([[0.5, 0.9], [0.8, 0.1]]), 0.3) == [(0, 1), (1, 0)]


def test_confirms_after_min_hits_and_ends_after_max_age():
    tr = Tracker(TrackerSpec(min_hits=3, max_age_s=0.5))
    boxes = walk(0, 5, 5)
    started_at = []
    for i, b in enumerate(boxes):
        up = tr.update(dets(b), i * 0.1)
        if up.started:
            started_at.append(i)
        assert not up.ended
    assert started_at == [2]  # third hit
    assert [t.track_id for t in tr.update(dets(), 0.5).active] == [1]  # coasting, still active
    assert tr.update(dets(), 0.5).active[0].visible is False
    up = tr.update(dets(), 1.0)  # 0.6 s since last seen > max_age
    assert [t.track_id for t in up.ended] == [1] and up.active == []
    t = up.ended[0]
    assert t.first_seen == 0.0 and t.last_seen == pytest.approx(0.4) and t.hits == 5


def test_ids_stable_for_two_walkers_crossing_paths():
    """Two people walking towards each other keep their ids through the moment their boxes overlap."""
    tr = Tracker(TrackerSpec(min_hits=2))
    ids_by_side: dict[int, set[int]] = {}
    for i in range(30):
        a = (100 + 10 * i, 100, 140 + 10 * i, 200, 0.9)
        b = (400 - 10 * i, 110, 440 - 10 * i, 210, 0.8)
        up = tr.update(dets(a, b), i / 10)
        for t in up.active:
            moving_right = t.velocity[0] > 0 if i > 5 else None
            if moving_right is not None:
                ids_by_side.setdefault(t.track_id, set()).add(bool(moving_right))
    assert sorted(ids_by_side) == [1, 2]
    assert all(len(v) == 1 for v in ids_by_side.values())  # each id always moved one way: no swap


def test_occlusion_gap_keeps_id():
    tr = Tracker(TrackerSpec(min_hits=2, max_age_s=1.0))
    boxes = walk(0, 10, 20)
    ids = set()
    for i, b in enumerate(boxes):
        hidden = 8 <= i < 14  # 0.6 s behind a pillar
        up = tr.update(dets() if hidden else dets(b), i / 10)
        ids |= {t.track_id for t in up.active}
        assert not up.ended
    assert ids == {1}  # constant-velocity prediction re-found it where it came out


def test_low_score_detection_keeps_track_alive_but_cannot_start_one():
    spec = TrackerSpec(min_hits=1, max_age_s=0.15)
    tr = Tracker(spec)
    tr.update(dets((0, 0, 40, 100, 0.9)), 0.0)
    for i in range(1, 6):  # half-occluded: only weak detections for 0.5 s
        up = tr.update(dets((i, 0, 40 + i, 100, 0.3)), i / 10)
        assert [t.track_id for t in up.active] == [1] and not up.ended
        assert up.active[0].visible
    # A weak detection elsewhere never creates a track.
    tr2 = Tracker(spec)
    assert tr2.update(dets((0, 0, 40, 100, 0.3)), 0.0).active == []
    assert tr2.tracks == []
    # Below new_track_score but above high_score: no new track either.
    assert Tracker(spec).update(dets((0, 0, 40, 100, 0.45)), 0.0).started == []


def test_weak_detections_carry_a_tentative_track_to_confirmation():
    """A small person: one confident detection, then weak ones (0.3-0.4). Without stage 4 the tentative track
    would die on the first weak frame and restart again and again."""
    tr = Tracker(TrackerSpec(min_hits=3))
    scores = [0.55, 0.35, 0.32, 0.38, 0.52]
    started = []
    for i, s in enumerate(scores):
        started += tr.update(dets((100 + 2 * i, 100, 130 + 2 * i, 180, s)), i / 10).started
    assert [t.track_id for t in started] == [1]
    assert started[0].first_seen == 0.0  # one track from the first detection, not a restart
    # Weak detections alone still never start anything.
    tr2 = Tracker(TrackerSpec(min_hits=1))
    for i in range(5):
        assert tr2.update(dets((300, 100, 330, 180, 0.35)), i / 10).started == []


def test_one_frame_false_positive_never_confirmed():
    tr = Tracker(TrackerSpec(min_hits=3))
    started = []
    for i in range(10):
        frame = [(0, 0, 40, 100, 0.9)] if i == 3 else []
        up = tr.update(dets(*frame), i / 10)
        started += up.started
        assert not up.ended
    assert started == []
    assert tr.flush(1.0).ended == []


def test_classes_are_not_mixed():
    tr = Tracker(TrackerSpec(min_hits=1))
    tr.update(dets((0, 0, 40, 100, 0.9), class_id=0), 0.0)
    up = tr.update(dets((0, 0, 40, 100, 0.9), class_id=2), 0.1)
    assert sorted((t.track_id, t.class_id) for t in up.active) == [(1, 0), (2, 2)]


def test_hold_keeps_tracks_and_flush_ends_them():
    tr = Tracker(TrackerSpec(min_hits=1, max_age_s=0.5))
    tr.update(dets((0, 0, 40, 100, 0.9)), 0.0)
    for k in range(1, 30):  # motion gate: 3 s of a still scene, no inference
        up = tr.hold(k / 10)
        assert [t.track_id for t in up.active] == [1] and not up.ended
    assert tr.update(dets((0, 0, 40, 100, 0.8)), 3.0).active[0].track_id == 1
    up = tr.flush(3.1)
    assert [t.track_id for t in up.ended] == [1] and up.active == []
    t = up.ended[0]
    assert t.last_seen == 3.0 and t.score_max == pytest.approx(0.9) and t.score_mean == pytest.approx(0.85)
    assert tr.update(dets(), 3.2).active == []


def test_score_history_is_bounded_and_best_box_kept():
    tr = Tracker(TrackerSpec(min_hits=1))
    for i in range(50):
        score = 0.95 if i == 10 else 0.7
        tr.update(dets((i, 0, 40 + i, 100, score)), i / 10)
    t = tr.flush(5.0).ended[0]
    assert len(t.scores) == 30 and t.median_score == pytest.approx(0.7)
    assert t.score_max == pytest.approx(0.95)
    assert t.best_xyxy is not None and t.best_xyxy[0] == pytest.approx(10)


def test_spec_rejects_unknown_and_inconsistent_values():
    with pytest.raises(ValidationError):
        TrackerSpec(max_hits=3)
    with pytest.raises(ValidationError):
        TrackerSpec(low_score=0.6, high_score=0.5)
    with pytest.raises(ValidationError):
        TrackerSpec(min_hits=0)

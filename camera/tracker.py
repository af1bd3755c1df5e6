"""ByteTrack-style multi-object tracker in plain numpy: stable ids across frames, cheap enough for every frame.

Why ByteTrack: low-score detections (a person half hidden behind another) are not thrown away but used, in a
second association stage, to keep existing tracks alive (here tentative ones too); only confident detections
may start new tracks.
Boxes are predicted forward with a constant-velocity alpha-beta filter on (cx, cy, w, h), matched by IoU
with a greedy assignment (tens of boxes: no scipy/lap needed), confirmed after ``min_hits`` and ended after
``max_age_s`` without a match. Track ids are handed out at confirmation, so they count 1, 2, 3, ...

>>> import numpy as np
>>> from camera.detections import Detections
>>> tracker = Tracker(TrackerSpec(min_hits=2))
>>> det = lambda x: Detections(np.array([[x, 0, x + 10, 30]], np.float32), np.array([0.9], np.float32),
...                            np.array([0], np.int32))
>>> [len(tracker.update(det(x), t).started) for t, x in enumerate([0, 2, 4])]
[0, 1, 0]
>>> [t.track_id for t in tracker.flush(3.0).ended]
[1]
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

import numpy as np
from pydantic import BaseModel, Field, model_validator

from camera.detections import Detections

SCORE_HISTORY = 30  # scores kept per track for the median threshold (Frigate keeps a short history too)
ALPHA = 0.6  # weight of a new measurement in the position estimate
BETA = 0.15  # weight of the innovation in the velocity estimate


class TrackerSpec(BaseModel, extra="forbid"):
    """Tracker settings. ByteTrack's defaults (high 0.5, new track 0.6, low 0.1) lowered by 0.1 after measuring
    on the street and plaza clips (docs/counting.md): small, overhead people score 0.3-0.6 with YOLOv8n."""

    min_hits: int = Field(3, ge=1, description="matched detections before a track is confirmed")
    max_age_s: float = Field(1.0, gt=0, description="seconds without a match before a track ends")
    match_iou: float = Field(0.3, gt=0, le=1, description="minimum IoU to match a high-score detection")
    low_match_iou: float = Field(0.5, gt=0, le=1, description="minimum IoU to match a low-score detection")
    high_score: float = Field(0.4, ge=0, le=1, description="detections at or above: first association stage")
    low_score: float = Field(0.1, ge=0, le=1, description="detections below are ignored")
    new_track_score: float = Field(0.5, ge=0, le=1, description="minimum score to start a new track")

    @model_validator(mode="after")
    def _ordered(self) -> TrackerSpec:
        if self.low_score > self.high_score:
            raise ValueError(f"low_score {self.low_score} must be <= high_score {self.high_score}")
        return self


@dataclass(eq=False)
class Track:
    """One tracked object. ``xyxy`` is the filtered box in source pixels at ``last_seen``."""

    track_id: int  # 0 while tentative; >= 1 once confirmed
    xyxy: np.ndarray  # (4,) float32 source pixels
    score: float  # score of the last matched detection
    class_id: int
    first_seen: float  # capture time of the first detection (s)
    last_seen: float  # capture time of the last matched detection (s)
    hits: int = 1
    scores: list[float] = field(default_factory=list)  # last SCORE_HISTORY scores, oldest first
    visible: bool = True  # False while coasting (unmatched, not yet ended)
    confirmed: bool = False
    score_max: float = 0.0
    best_xyxy: np.ndarray | None = None  # the box with the highest score: the representative box
    score_sum: float = 0.0  # over the whole life, for the mean
    first_xyxy: np.ndarray | None = None  # the box of the first detection (where the track came from)
    _state: np.ndarray = field(default_factory=lambda: np.zeros(4), repr=False)  # cx, cy, w, h
    _velocity: np.ndarray = field(default_factory=lambda: np.zeros(4), repr=False)  # per second
    _history: deque = field(default_factory=lambda: deque(maxlen=SCORE_HISTORY), repr=False)

    @property
    def score_mean(self) -> float:
        return self.score_sum / max(self.hits, 1)

    @property
    def median_score(self) -> float:
        return float(np.median(self.scores)) if self.scores else 0.0

    def predict(self, ts: float, horizon_s: float) -> np.ndarray:
        """The (4,) xyxy box expected at ``ts`` (velocity extrapolated at most ``horizon_s`` seconds)."""
        dt = min(max(ts - self.last_seen, 0.0), horizon_s)
        return _to_xyxy(self._state + self._velocity * dt)

    def observe(self, xyxy: np.ndarray, score: float, ts: float) -> None:
        """Fold a matched detection into the estimate (alpha-beta filter) and the score statistics."""
        z = _to_cxcywh(xyxy)
        dt = ts - self.last_seen
        if dt > 0:
            predicted = self._state + self._velocity * dt
            residual = z - predicted
            self._state = predicted + ALPHA * residual
            self._velocity = self._velocity + (BETA / dt) * residual
        else:
            self._state = z
        self._state[2:] = np.maximum(self._state[2:], 1.0)
        self.xyxy = _to_xyxy(self._state).astype(np.float32)
        self.score = float(score)
        self.last_seen = ts
        self.hits += 1
        self.visible = True
        self._add_score(score, xyxy)

    def _add_score(self, score: float, xyxy: np.ndarray) -> None:
        self._history.append(float(score))
        self.scores = list(self._history)
        self.score_sum += float(score)
        if self.best_xyxy is None or score > self.score_max:
            self.score_max = float(score)
            self.best_xyxy = np.asarray(xyxy, dtype=np.float32).copy()


@dataclass
class TrackUpdate:
    """What changed in one step. ``active``: confirmed tracks not ended (coasting ones have visible=False);
    ``started``: confirmed in this step; ``ended``: confirmed tracks that ended in this step."""

    active: list[Track]
    started: list[Track]
    ended: list[Track]


def _to_cxcywh(xyxy: np.ndarray) -> np.ndarray:
    x1, y1, x2, y2 = (float(v) for v in xyxy)
    return np.array([(x1 + x2) / 2, (y1 + y2) / 2, max(x2 - x1, 1.0), max(y2 - y1, 1.0)])


def _to_xyxy(s: np.ndarray) -> np.ndarray:
    cx, cy, w, h = s
    w, h = max(w, 1.0), max(h, 1.0)
    return np.array([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2])


def iou_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(len(a), len(b)) IoU of two sets of xyxy boxes."""
    a = np.asarray(a, dtype=np.float64).reshape(-1, 4)
    b = np.asarray(b, dtype=np.float64).reshape(-1, 4)
    if len(a) == 0 or len(b) == 0:
        return np.zeros((len(a), len(b)))
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    wh = np.clip(rb - lt, 0, None)
    inter = wh[..., 0] * wh[..., 1]
    area_a = np.prod(np.clip(a[:, 2:] - a[:, :2], 0, None), axis=1)
    area_b = np.prod(np.clip(b[:, 2:] - b[:, :2], 0, None), axis=1)
    union = area_a[:, None] + area_b[None, :] - inter
    return np.where(union > 0, inter / np.maximum(union, 1e-9), 0.0)


def greedy_match(iou: np.ndarray, threshold: float) -> list[tuple[int, int]]:
    """Pairs (row, col) taken in order of decreasing IoU, each row and column at most once, IoU >= threshold."""
    if iou.size == 0:
        return []
    rows, cols = np.nonzero(iou >= threshold)
    order = np.argsort(-iou[rows, cols], kind="stable")
    used_r: set[int] = set()
    used_c: set[int] = set()
    pairs = []
    for k in order:
        r, c = int(rows[k]), int(cols[k])
        if r not in used_r and c not in used_c:
            used_r.add(r)
            used_c.add(c)
            pairs.append((r, c))
    return pairs


class Tracker:
    """Feed it one :class:`Detections` per processed frame, in capture-time order."""

    def __init__(self, spec: TrackerSpec | None = None) -> None:
        self.spec = spec or TrackerSpec()
        self._tracks: list[Track] = []  # confirmed (visible or coasting), then tentative
        self._next_id = 1

    @property
    def tracks(self) -> list[Track]:
        """Every live track, tentative ones included (for debugging and drawing)."""
        return list(self._tracks)

    def update(self, detections: Detections, ts: float) -> TrackUpdate:
        spec = self.spec
        keep = detections.confidence >= spec.low_score
        boxes = detections.xyxy[keep].astype(np.float64)
        scores = detections.confidence[keep].astype(np.float64)
        classes = detections.class_id[keep]
        high = np.flatnonzero(scores >= spec.high_score)
        low = np.flatnonzero(scores < spec.high_score)

        confirmed = [t for t in self._tracks if t.confirmed]
        tentative = [t for t in self._tracks if not t.confirmed]
        matched: set[int] = set()  # id() of tracks matched in this step

        # Stage 1: confident detections against every confirmed track (visible or coasting).
        rest_high = self._associate(confirmed, high, boxes, scores, classes, ts, spec.match_iou, matched)
        # Stage 2: weak detections keep visible confirmed tracks alive (occlusion, motion blur).
        visible_left = [t for t in confirmed if id(t) not in matched and t.visible]
        rest_low = self._associate(visible_left, low, boxes, scores, classes, ts, spec.low_match_iou, matched)
        # Stage 3: the remaining confident detections against tentative tracks.
        rest_high = self._associate(tentative, rest_high, boxes, scores, classes, ts, spec.match_iou, matched)
        # Stage 4: weak detections keep tentative tracks alive too (small people flicker around 0.3-0.5);
        # they never start one, and the EventBuilder's median-score threshold still judges the track.
        tentative_left = [t for t in tentative if id(t) not in matched]
        self._associate(tentative_left, rest_low, boxes, scores, classes, ts, spec.low_match_iou, matched)

        started: list[Track] = []
        ended: list[Track] = []
        survivors: list[Track] = []
        for t in self._tracks:
            if id(t) in matched:
                if not t.confirmed and t.hits >= spec.min_hits:
                    self._confirm(t)
                    started.append(t)
                survivors.append(t)
            elif not t.confirmed:
                continue  # a tentative track missed once: a flicker, dropped silently (ByteTrack does the same)
            elif ts - t.last_seen > spec.max_age_s:
                ended.append(t)
            else:
                t.visible = False
                survivors.append(t)
        for d in rest_high:
            if scores[d] < spec.new_track_score:
                continue
            t = self._new_track(boxes[d], float(scores[d]), int(classes[d]), ts)
            if spec.min_hits <= 1:
                self._confirm(t)
                started.append(t)
            survivors.append(t)
        self._tracks = survivors
        return TrackUpdate(self._active(), started, ended)

    def hold(self, ts: float) -> TrackUpdate:
        """No inference this frame because nothing moved: visible tracks are still there, coasting ones age."""
        ended: list[Track] = []
        survivors: list[Track] = []
        for t in self._tracks:
            if t.visible:
                t.last_seen = max(t.last_seen, ts)
                survivors.append(t)
            elif ts - t.last_seen > self.spec.max_age_s:
                if t.confirmed:
                    ended.append(t)
            else:
                survivors.append(t)
        self._tracks = survivors
        return TrackUpdate(self._active(), [], ended)

    def flush(self, ts: float) -> TrackUpdate:
        """End of stream: every confirmed track ends now (tentative ones vanish)."""
        ended = [t for t in self._tracks if t.confirmed]
        for t in ended:
            t.visible = False
        self._tracks = []
        return TrackUpdate([], [], ended)

    def _active(self) -> list[Track]:
        return [t for t in self._tracks if t.confirmed]

    def _confirm(self, t: Track) -> None:
        t.confirmed = True
        t.track_id = self._next_id
        self._next_id += 1

    def _new_track(self, box: np.ndarray, score: float, class_id: int, ts: float) -> Track:
        t = Track(
            track_id=0,
            xyxy=np.asarray(box, dtype=np.float32).copy(),
            score=score,
            class_id=class_id,
            first_seen=ts,
            last_seen=ts,
            hits=1,
        )
        t._state = _to_cxcywh(box)
        t.first_xyxy = t.xyxy.copy()
        t._add_score(score, box)
        return t

    def _associate(
        self,
        tracks: list[Track],
        det_idx: np.ndarray,
        boxes: np.ndarray,
        scores: np.ndarray,
        classes: np.ndarray,
        ts: float,
        threshold: float,
        matched: set[int],
    ) -> np.ndarray:
        """Match ``tracks`` to detections ``det_idx``; update matched tracks; return unmatched detection indices."""
        if len(tracks) == 0 or len(det_idx) == 0:
            return det_idx
        predicted = np.stack([t.predict(ts, self.spec.max_age_s) for t in tracks])
        iou = iou_matrix(predicted, boxes[det_idx])
        same_class = np.array([t.class_id for t in tracks])[:, None] == classes[det_idx][None, :]
        iou = np.where(same_class, iou, 0.0)
        used = set()
        for r, c in greedy_match(iou, threshold):
            d = int(det_idx[c])
            tracks[r].observe(boxes[d], float(scores[d]), ts)
            matched.add(id(tracks[r]))
            used.add(c)
        return np.array([d for k, d in enumerate(det_idx) if k not in used], dtype=np.int64)

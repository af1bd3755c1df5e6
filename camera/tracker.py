"""ByteTrack-class multi-object tracker in plain numpy: stable ids across frames, cheap enough for every frame.

- **Motion**: a Kalman filter per track, constant velocity in image space on (cx, cy, w, h), with the time
  between frames as its step, so 5 fps, 30 fps and motion-gated gaps are one model. Noise scales with the
  box height (ByteTrack's rule): a small far person and a large near one are equally easy to follow.
- **Association** (ByteTrack, plus one round): (1) confident detections against every confirmed track by IoU
  with the predicted box; (2) weak detections (down to ``low_score``) keep still-visible tracks alive
  (occlusion, motion blur); (3) *re-identification by motion*: confirmed tracks left unmatched (lost up to
  ``max_age_s``, or missed by IoU because the person turned, or jumped at 5 fps) take a confident detection
  inside their Kalman gate (Mahalanobis distance of the position, similar height), so a person who walked on
  behind an obstacle keeps the id; (4)-(5) tentative tracks take the remaining confident, then weak, detections
  by IoU, and (6) a confident one inside their (wide, velocity unknown) gate: a fast walker at 5 fps.
- **Confirmation**: a track is confirmed after ``min_hits`` matched frames; only detections of at least
  ``new_track_score`` start one, so a lower threshold continues tracks than starts them. Ids are handed out at
  confirmation, so they count 1, 2, 3, ...
- **Emergence**: a new track remembers the confirmed track, matched in the same frame, whose box held at least half
  of its first box (``emerged_from``): it was hidden behind that person, or inside one box drawn around both, and
  the EventBuilder lets it start from that person's side of a line.
- **Motion gate** (:meth:`Tracker.hold`): frames without inference keep the tracks alive; the Kalman state is
  not touched, so the next detection is matched against where the person would be after the whole gap.

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

from camera.detections import Detections, iou_matrix

SCORE_HISTORY = 30  # scores kept per track for the median threshold (Frigate keeps a short history too)
# Mahalanobis gate on (cx, cy, w, h) for re-identification by motion: about the 99.7 % quantile of chi-square with
# 4 dof (the 95 % one, 9.49, left 1.2-1.4 tracks per person on PETS09: walkers who slowed down behind someone)
REID_GATE = 16.0
# Kalman noise, as fractions of the box height. ByteTrack's are 1/20 (position) and 1/160 (velocity) per frame at
# 30 fps; restated per second that is 0.27 h/sqrt(s) and 1.0 h/s/sqrt(s). Measured on PETS09 (bench/accuracy.py)
# half the position noise and a fifth of the velocity noise keep ids far better at 5-7 fps (walkers keep their
# pace; IDF1 +0.05-0.1 at every input size), so those are used.
MEASURE_STD = 1 / 20  # detector noise on each box coordinate
POS_STD_PER_S = 0.5 * (1 / 20) * np.sqrt(30)  # random walk of the position, per sqrt(second)
VEL_STD_PER_S = 0.2 * (1 / 160) * 30 * np.sqrt(30)  # random walk of the velocity (px/s), per sqrt(second)
INIT_VEL_STD = 1.0  # a new track's velocity is unknown: about one box height per second
# A new track whose first box lies at least this much (share of its own area) inside the box of a track seen in the
# same frame emerged from behind that person, or out of one box the detector had drawn around both
EMERGE_OVERLAP = 0.5


class TrackerSpec(BaseModel, extra="forbid"):
    """Tracker settings. ByteTrack's defaults (high 0.5, new track 0.6, low 0.1) lowered by 0.1 after measuring
    on the street and plaza clips (docs/counting.md): small, overhead people score 0.3-0.6 with YOLOv8n.
    ``max_age_s`` 2 (was 1): on PETS09 it halves the tracks per person at 5-7 fps (bench/accuracy.py), because
    people hidden by another for a second are found again by motion instead of getting a new id."""

    min_hits: int = Field(3, ge=1, description="matched detections before a track is confirmed")
    max_age_s: float = Field(2.0, gt=0, description="seconds without a match before a track ends (a lost track "
                             "can be re-identified by motion until then)")
    match_iou: float = Field(0.3, gt=0, le=1, description="minimum IoU to match a high-score detection")
    low_match_iou: float = Field(0.5, gt=0, le=1, description="minimum IoU to match a low-score detection")
    high_score: float = Field(0.4, ge=0, le=1, description="detections at or above: first association stage")
    low_score: float = Field(0.1, ge=0, le=1, description="detections below are ignored")
    new_track_score: float = Field(0.5, ge=0, le=1, description="minimum score to start a new track")
    reid_gate: float = Field(REID_GATE, ge=0, description="re-identification by motion: the largest Mahalanobis "
                             "distance (squared) of a detection from a lost track's Kalman prediction; 0 = off")

    @model_validator(mode="after")
    def _ordered(self) -> TrackerSpec:
        if self.low_score > self.high_score:
            raise ValueError(f"low_score {self.low_score} must be <= high_score {self.high_score}")
        return self


MODEL_THRESHOLDS = ("high_score", "new_track_score")  # the tracker's score thresholds a model's manifest may carry


def with_model_thresholds(spec: TrackerSpec, thresholds: dict[str, float]) -> TrackerSpec:
    """``spec`` with a model's own score thresholds (its registry manifest's ``high_score`` / ``new_track_score``,
    chosen for that model's scores by the learning loop, models/thresholds.py), where the manifest has them;
    ``low_score`` comes down with ``high_score`` if it must.

    >>> s = with_model_thresholds(TrackerSpec(), {"conf": 0.4, "high_score": 0.05, "new_track_score": 0.3})
    >>> s.high_score, s.new_track_score, s.low_score
    (0.05, 0.3, 0.05)
    >>> with_model_thresholds(TrackerSpec(), {"conf": 0.4}) == TrackerSpec()
    True
    """
    update = {k: float(thresholds[k]) for k in MODEL_THRESHOLDS if k in thresholds}
    if not update:
        return spec
    high = update.get("high_score", spec.high_score)
    return spec.model_copy(update={**update, "low_score": min(spec.low_score, high)})


class KalmanBox:
    """Constant-velocity Kalman filter on (cx, cy, w, h) with velocities per second; steps are in seconds.

    >>> kf = KalmanBox(np.array([100.0, 50.0, 20.0, 40.0]), t=0.0)
    >>> for k in range(1, 6):
    ...     kf.update(np.array([100.0 + 10 * k, 50.0, 20.0, 40.0]), t=k * 0.2)
    >>> round(float(kf.predict(1.2)[0][0]))  # 50 px/s to the right
    160
    """

    def __init__(self, z: np.ndarray, t: float) -> None:
        h = max(float(z[3]), 1.0)
        self.mean = np.concatenate([np.asarray(z, dtype=np.float64), np.zeros(4)])
        std = np.array([2 * MEASURE_STD * h] * 4 + [INIT_VEL_STD * h] * 4)
        self.cov = np.diag(std**2)
        self.t = t  # time of the estimate (s)

    @staticmethod
    def _transition(dt: float) -> np.ndarray:
        f = np.eye(8)
        f[:4, 4:] = np.eye(4) * dt
        return f

    def predict(self, t: float) -> tuple[np.ndarray, np.ndarray]:
        """(mean, covariance) expected at time ``t`` (never before the estimate); the filter is not changed."""
        dt = max(t - self.t, 0.0)
        if dt == 0:
            return self.mean.copy(), self.cov.copy()
        f = self._transition(dt)
        h = max(float(self.mean[3]), 1.0)
        q = np.diag(np.array([POS_STD_PER_S * h] * 4 + [VEL_STD_PER_S * h] * 4) ** 2 * dt)
        mean = f @ self.mean
        mean[2:4] = np.maximum(mean[2:4], 1.0)
        return mean, f @ self.cov @ f.T + q

    def update(self, z: np.ndarray, t: float) -> None:
        """Fold in a measured box (cx, cy, w, h) taken at time ``t``."""
        mean, cov = self.predict(t)
        r = np.diag((MEASURE_STD * max(float(mean[3]), 1.0) * np.ones(4)) ** 2)
        s = cov[:4, :4] + r
        gain = np.linalg.solve(s, cov[:4, :]).T  # cov H^T S^-1, with H = [I 0]
        self.mean = mean + gain @ (np.asarray(z, dtype=np.float64) - mean[:4])
        self.mean[2:4] = np.maximum(self.mean[2:4], 1.0)
        self.cov = cov - gain @ s @ gain.T
        self.t = max(t, self.t)

    def gating_distance(self, t: float, zs: np.ndarray) -> np.ndarray:
        """(N,) squared Mahalanobis distance of measured boxes ``zs`` (N, 4) from the prediction at ``t``."""
        mean, cov = self.predict(t)
        s = cov[:4, :4] + np.diag((MEASURE_STD * max(float(mean[3]), 1.0) * np.ones(4)) ** 2)
        d = np.asarray(zs, dtype=np.float64).reshape(-1, 4) - mean[:4]
        return np.einsum("ni,ni->n", d, np.linalg.solve(s, d.T).T)


@dataclass(eq=False)
class Track:
    """One tracked object. ``xyxy`` is the filtered box in source pixels at the last matched detection."""

    track_id: int  # 0 while tentative; >= 1 once confirmed
    xyxy: np.ndarray  # (4,) float32 source pixels
    score: float  # score of the last matched detection
    class_id: int
    first_seen: float  # capture time of the first detection (s)
    last_seen: float  # capture time of the last matched detection, or of the last motion-gated frame (s)
    hits: int = 1
    scores: list[float] = field(default_factory=list)  # last SCORE_HISTORY scores, oldest first
    visible: bool = True  # False while coasting (unmatched, not yet ended)
    confirmed: bool = False
    score_max: float = 0.0
    best_xyxy: np.ndarray | None = None  # the box with the highest score: the representative box
    score_sum: float = 0.0  # over the whole life, for the mean
    first_xyxy: np.ndarray | None = None  # the box of the first detection (where the track came from)
    emerged_from: int = 0  # id of the confirmed track, seen in the same frame, whose box held the first one; 0: none
    kalman: KalmanBox | None = field(default=None, repr=False)
    _history: deque = field(default_factory=lambda: deque(maxlen=SCORE_HISTORY), repr=False)

    def __post_init__(self) -> None:
        if self.kalman is None:
            self.kalman = KalmanBox(_to_cxcywh(self.xyxy), self.last_seen)

    @property
    def score_mean(self) -> float:
        return self.score_sum / max(self.hits, 1)

    @property
    def median_score(self) -> float:
        return float(np.median(self.scores)) if self.scores else 0.0

    @property
    def velocity(self) -> np.ndarray:
        """(2,) estimated motion of the box centre, pixels per second."""
        return self.kalman.mean[4:6].copy()

    def predict(self, ts: float) -> np.ndarray:
        """The (4,) xyxy box expected at ``ts``."""
        return _to_xyxy(self.kalman.predict(ts)[0][:4])

    def observe(self, xyxy: np.ndarray, score: float, ts: float) -> None:
        """Fold a matched detection into the Kalman estimate and the score statistics."""
        self.kalman.update(_to_cxcywh(xyxy), ts)
        self.xyxy = _to_xyxy(self.kalman.mean[:4]).astype(np.float32)
        self.score = float(score)
        self.last_seen = max(self.last_seen, ts)
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
    cx, cy, w, h = (float(v) for v in s[:4])
    w, h = max(w, 1.0), max(h, 1.0)
    return np.array([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2])


def _occluder(tracks: list[Track], box: np.ndarray) -> int:
    """Id of the track among ``tracks`` whose box holds the largest share (>= EMERGE_OVERLAP) of ``box``; 0 if none.

    >>> a = Track(track_id=7, xyxy=np.array([0, 0, 50, 120], np.float32), score=0.9, class_id=0, first_seen=0.0,
    ...           last_seen=0.0)
    >>> _occluder([a], np.array([15.0, -10.0, 65.0, 110.0])), _occluder([a], np.array([40.0, 0.0, 90.0, 120.0]))
    (7, 0)
    """
    if not tracks:
        return 0
    theirs = np.stack([t.xyxy for t in tracks]).astype(np.float64)
    x1, y1, x2, y2 = (float(v) for v in box)
    iw = np.clip(np.minimum(theirs[:, 2], x2) - np.maximum(theirs[:, 0], x1), 0, None)
    ih = np.clip(np.minimum(theirs[:, 3], y2) - np.maximum(theirs[:, 1], y1), 0, None)
    share = iw * ih / max((x2 - x1) * (y2 - y1), 1e-9)
    k = int(np.argmax(share))
    return tracks[k].track_id if share[k] >= EMERGE_OVERLAP else 0


def greedy_match(cost_ok: np.ndarray, threshold: float) -> list[tuple[int, int]]:
    """Pairs (row, col) taken in order of decreasing score, each row and column at most once, score >= threshold.

    >>> greedy_match(np.array([[0.5, 0.9], [0.8, 0.1]]), 0.3)
    [(0, 1), (1, 0)]
    """
    if cost_ok.size == 0:
        return []
    rows, cols = np.nonzero(cost_ok >= threshold)
    order = np.argsort(-cost_ok[rows, cols], kind="stable")
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
        args = (boxes, scores, classes, ts, matched)

        # 1: confident detections against every confirmed track (visible or coasting), by IoU.
        rest_high = self._by_iou(confirmed, high, *args, threshold=spec.match_iou)
        # 2: weak detections keep visible confirmed tracks alive (occlusion, motion blur).
        visible_left = [t for t in confirmed if id(t) not in matched and t.visible]
        rest_low = self._by_iou(visible_left, low, *args, threshold=spec.low_match_iou)
        # 3: re-identification by motion: confirmed tracks still unmatched take a confident detection in their gate.
        if spec.reid_gate > 0:
            left = [t for t in confirmed if id(t) not in matched]
            rest_high = self._by_motion(left, rest_high, *args)
        # 4-5: tentative tracks take the remaining confident detections, then weak ones (small people flicker
        # around 0.3-0.5); weak ones never start a track, and the EventBuilder's median score still judges it.
        rest_high = self._by_iou(tentative, rest_high, *args, threshold=spec.match_iou)
        tentative_left = [t for t in tentative if id(t) not in matched]
        rest_low = self._by_iou(tentative_left, rest_low, *args, threshold=spec.low_match_iou)
        # 6: a tentative track that moved too far for IoU (a fast walker at 5 fps) takes a confident detection in
        # its gate; its unknown velocity keeps the gate wide, confirmation (min_hits) still has to follow.
        if spec.reid_gate > 0:
            rest_high = self._by_motion([t for t in tentative if id(t) not in matched], rest_high, *args)

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
        seen = [t for t in confirmed if id(t) in matched]
        for d in rest_high:
            if scores[d] < spec.new_track_score:
                continue
            t = self._new_track(boxes[d], float(scores[d]), int(classes[d]), ts)
            t.emerged_from = _occluder(seen, boxes[d])
            if spec.min_hits <= 1:
                self._confirm(t)
                started.append(t)
            survivors.append(t)
        self._tracks = survivors
        return TrackUpdate(self._active(), started, ended)

    def hold(self, ts: float) -> TrackUpdate:
        """No inference this frame because nothing moved: visible tracks are still there (``last_seen`` moves on),
        coasting ones age. The motion state is left alone: the next detection is compared with the Kalman
        prediction over the whole gap, so a person who moved slowly meanwhile keeps the id."""
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
        t = Track(track_id=0, xyxy=np.asarray(box, dtype=np.float32).copy(), score=score, class_id=class_id,
                  first_seen=ts, last_seen=ts, hits=1)
        t.first_xyxy = t.xyxy.copy()
        t._add_score(score, box)
        return t

    def _observe(self, pairs: list[tuple[int, int]], tracks: list[Track], det_idx: np.ndarray, boxes: np.ndarray,
                 scores: np.ndarray, ts: float, matched: set[int]) -> np.ndarray:
        """Apply matched pairs (track row, detection column); the detection indices left unmatched."""
        used = set()
        for r, c in pairs:
            d = int(det_idx[c])
            tracks[r].observe(boxes[d], float(scores[d]), ts)
            matched.add(id(tracks[r]))
            used.add(c)
        return np.array([d for k, d in enumerate(det_idx) if k not in used], dtype=np.int64)

    def _by_iou(self, tracks: list[Track], det_idx: np.ndarray, boxes: np.ndarray, scores: np.ndarray,
                classes: np.ndarray, ts: float, matched: set[int], threshold: float) -> np.ndarray:
        """Match ``tracks`` to detections ``det_idx`` by IoU with the predicted box."""
        if len(tracks) == 0 or len(det_idx) == 0:
            return det_idx
        predicted = np.stack([t.predict(ts) for t in tracks])
        iou = iou_matrix(predicted, boxes[det_idx])
        same_class = np.array([t.class_id for t in tracks])[:, None] == classes[det_idx][None, :]
        iou = np.where(same_class, iou, 0.0)
        return self._observe(greedy_match(iou, threshold), tracks, det_idx, boxes, scores, ts, matched)

    def _by_motion(self, tracks: list[Track], det_idx: np.ndarray, boxes: np.ndarray, scores: np.ndarray,
                   classes: np.ndarray, ts: float, matched: set[int]) -> np.ndarray:
        """Match unmatched confirmed tracks to detections inside their Kalman gate, nearest first."""
        if len(tracks) == 0 or len(det_idx) == 0:
            return det_idx
        zs = np.stack([_to_cxcywh(b) for b in boxes[det_idx]])
        dist = np.stack([t.kalman.gating_distance(ts, zs) for t in tracks])
        same_class = np.array([t.class_id for t in tracks])[:, None] == classes[det_idx][None, :]
        ok = same_class & (dist <= self.spec.reid_gate)
        closeness = np.where(ok, 1.0 / (1.0 + dist), 0.0)  # larger = nearer, for the greedy match
        return self._observe(greedy_match(closeness, 1e-12), tracks, det_idx, boxes, scores, ts, matched)

"""The edge sampler: which frames are worth sending up to teach the next model (issue 15), and how they leave.

A fixed camera sees the same scene for years; the frames the current model finds *hard* are the cheapest
training data there is, and the edge is the only place they exist. :class:`Sampler` watches the detector's
output and the tracker's tracks frame by frame and picks, in order of priority:

``track_died``
    a tentative track seen on at least ``died_min_hits`` frames that vanished before it was confirmed: a
    false-positive candidate (or a person the model could not hold on to). The frame of its last detection is sent.
``coast``
    a confirmed track the detector lost for a while (the tracker coasted) that came back: a missed person. The
    first frame of the gap is sent.
``near_threshold``
    a detection whose score lies in ``conf_band``, just under the edge's decision threshold.
``random``
    a small random baseline, so the next model also sees ordinary frames.

Every sample costs a token from three buckets (per minute, hour and day, :class:`RateLimiter`); one track (or,
without a track, one place in the frame) is sent at most every ``track_gap_s``, so one person standing still
is not sent 200 times. Time is the frames' capture time, so a replayed file is limited like live video.

What leaves (:func:`prepare_image`): the frame with every configured mask filled black, resized so its longer
side is at most ``max_side``, JPEG-encoded. Nothing is sampled unless ``samples.enabled`` is true.

>>> spec = SamplesSpec(enabled=True, per_minute=2, random_probability=0.0)
>>> limiter = RateLimiter(spec)
>>> [limiter.allow(t) for t in (0.0, 1.0, 2.0, 31.0)]
[True, True, False, True]
"""

from __future__ import annotations

import logging
import random
import weakref
from collections.abc import Sequence
from dataclasses import dataclass, field

import cv2
import numpy as np
from pydantic import BaseModel, Field, model_validator

from camera.detections import Detections, iou_matrix
from camera.filters import MaskSpec
from camera.frame import Frame
from camera.tracker import Track
from camera.zones import to_pixels

log = logging.getLogger(__name__)

REASONS = ("track_died", "coast", "near_threshold", "random")  # priority order; sample.v1's reason enum
CELL_PX = 64  # a detection without a track is keyed by its place: a grid cell of this many source pixels
TRACK_IOU = 0.5  # a detection belongs to the track whose box it overlaps at least this much


class SamplesSpec(BaseModel, extra="forbid"):
    """Hard-frame sampling for the learning loop (off by default: nothing leaves the device unless enabled)."""

    enabled: bool = Field(False, description="send sampled frames (masked, resized JPEG + metadata) to the broker")
    conf_band: tuple[float, float] = Field((0.3, 0.5), description="a detection scoring in [low, high) is a "
                                           "near-threshold sample")
    died_min_hits: int = Field(2, ge=1, description="a tentative track seen this often that dies unconfirmed "
                               "is a sample")
    coast: bool = Field(True, description="sample the first frame of a gap the tracker coasted through")
    random_probability: float = Field(0.0005, ge=0, le=1, description="chance that any processed frame is sent "
                                      "as a random baseline sample")
    per_minute: int = Field(2, ge=0, description="samples per minute at most (token bucket)")
    per_hour: int = Field(30, ge=0, description="samples per hour at most (token bucket)")
    per_day: int = Field(200, ge=0, description="samples per day at most (token bucket)")
    track_gap_s: float = Field(60.0, ge=0, description="seconds between two samples of the same track (or place)")
    max_side: int = Field(640, ge=32, le=4096, description="longer side of the sent JPEG in pixels at most")
    jpeg_quality: int = Field(85, ge=10, le=100, description="JPEG quality of sent samples")
    queue_max_bytes: int = Field(32 * 1024 * 1024, ge=65536, description="durable sample queue bound in bytes; "
                                 "when full the oldest samples are dropped and counted")
    seed: int | None = Field(None, description="random baseline seed (tests, benchmarks)")

    @model_validator(mode="after")
    def _band(self) -> SamplesSpec:
        low, high = self.conf_band
        if not 0 <= low < high <= 1:
            raise ValueError(f"conf_band must be 0 <= low < high <= 1, got {list(self.conf_band)}")
        return self


class TokenBucket:
    """``capacity`` tokens, refilled at ``capacity / period_s`` per second (a full bucket to start with).

    >>> b = TokenBucket(2, 60.0)
    >>> [b.take(0.0), b.take(0.0), b.take(0.0), b.take(30.0)]
    [True, True, False, True]
    """

    def __init__(self, capacity: int, period_s: float) -> None:
        self.capacity = float(capacity)
        self.rate = capacity / period_s
        self.tokens = float(capacity)
        self.at: float | None = None

    def refill(self, now: float) -> None:
        if self.at is not None and now > self.at:
            self.tokens = min(self.capacity, self.tokens + (now - self.at) * self.rate)
        self.at = now if self.at is None else max(self.at, now)  # a clock stepping back never mints tokens

    def has(self, now: float) -> bool:
        self.refill(now)
        return self.tokens >= 1.0 - 1e-9

    def take(self, now: float) -> bool:
        if not self.has(now):
            return False
        self.tokens -= 1.0
        return True


class RateLimiter:
    """The three buckets together: a sample goes only if every bucket has a token, and then takes one from each."""

    def __init__(self, spec: SamplesSpec) -> None:
        self.buckets = [TokenBucket(spec.per_minute, 60.0), TokenBucket(spec.per_hour, 3600.0),
                        TokenBucket(spec.per_day, 86400.0)]
        self.refused = 0

    def allow(self, now: float) -> bool:
        if all(b.has(now) for b in self.buckets):
            for b in self.buckets:
                b.take(now)
            return True
        self.refused += 1
        return False


@dataclass
class Candidate:
    """A frame chosen to be sent: why, and the detections the edge model made on it (source pixels)."""

    frame: Frame
    detections: Detections
    reasons: list[str]
    track_ids: list[int] = field(default_factory=list)  # confirmed ids involved (0 = tentative)

    @property
    def reason(self) -> str:
        return self.reasons[0]


@dataclass
class _Seen:
    """The last frame on which a track was matched (kept for tentative tracks and coasting gaps)."""

    frame: Frame
    detections: Detections
    hits: int


class Sampler:
    """Call :meth:`observe` once per frame the detector ran on, in order; it returns the frames to send."""

    def __init__(self, spec: SamplesSpec, rng: random.Random | None = None) -> None:
        self.spec = spec
        self.limiter = RateLimiter(spec)
        self.rng = rng or random.Random(spec.seed)
        self._tentative: dict[int, tuple[Track, _Seen]] = {}  # id(track) -> the track and where it was last seen
        self._gap_start: weakref.WeakKeyDictionary[Track, _Seen] = weakref.WeakKeyDictionary()  # coasting tracks
        self._sent_track: weakref.WeakKeyDictionary[Track, float] = weakref.WeakKeyDictionary()
        self._sent_cell: dict[tuple[int, int], float] = {}
        self.chosen = {r: 0 for r in REASONS}  # samples let through per (primary) reason
        self.suppressed = 0  # candidates dropped by the per-track gap

    # ------------------------------------------------------------------ rules
    def observe(self, frame: Frame, detections: Detections, tracks: Sequence[Track]) -> list[Candidate]:
        """``detections``: what went into the tracker this frame; ``tracks``: ``Tracker.tracks`` after the update."""
        spec = self.spec
        if not spec.enabled:
            return []
        now = frame.ts
        out: list[Candidate] = []
        live = {id(t) for t in tracks}

        # tentative tracks that died unconfirmed: their last detection's frame
        for key in [k for k in self._tentative if k not in live]:
            track, seen = self._tentative.pop(key)
            if not track.confirmed and seen.hits >= spec.died_min_hits:
                self._offer(out, seen.frame, seen.detections, "track_died", [track], now)
        for t in tracks:
            if not t.confirmed:
                prev = self._tentative.get(id(t))
                if prev is None or prev[1].hits != t.hits:  # matched this frame
                    self._tentative[id(t)] = (t, _Seen(frame, detections, t.hits))
            else:
                self._tentative.pop(id(t), None)

        # coasting gaps: remember the first missed frame, send it when the track comes back
        if spec.coast:
            for t in tracks:
                if not t.confirmed:
                    continue
                if not t.visible:
                    self._gap_start.setdefault(t, _Seen(frame, detections, t.hits))
                elif t in self._gap_start:
                    gap = self._gap_start.pop(t)
                    self._offer(out, gap.frame, gap.detections, "coast", [t], now)

        # near-threshold detections, keyed by their track (or their place when no track holds them)
        low, high = spec.conf_band
        band = np.flatnonzero((detections.confidence >= low) & (detections.confidence < high))
        if band.size:
            owners = self._owners(detections.xyxy[band], tracks)
            keys = [owner if owner is not None else self._cell(detections.xyxy[i])
                    for i, owner in zip(band, owners, strict=True)]
            fresh = [k for k in keys if not self._recent(k, now)]
            if fresh:
                self._offer(out, frame, detections, "near_threshold", fresh, now, checked=True)
            else:
                self.suppressed += 1

        if spec.random_probability and self.rng.random() < spec.random_probability:
            self._offer(out, frame, detections, "random", [], now)
        return out

    # ------------------------------------------------------------------ helpers
    def _owners(self, boxes: np.ndarray, tracks: Sequence[Track]) -> list[Track | None]:
        if not tracks:
            return [None] * len(boxes)
        iou = iou_matrix(boxes, np.stack([t.xyxy for t in tracks]))
        best = iou.argmax(axis=1)
        return [tracks[int(j)] if iou[i, j] >= TRACK_IOU else None for i, j in enumerate(best)]

    @staticmethod
    def _cell(xyxy: np.ndarray) -> tuple[int, int]:
        return int((xyxy[0] + xyxy[2]) / 2 // CELL_PX), int((xyxy[1] + xyxy[3]) / 2 // CELL_PX)

    def _recent(self, key: Track | tuple[int, int], now: float) -> bool:
        last = self._sent_cell.get(key) if isinstance(key, tuple) else self._sent_track.get(key)
        return last is not None and 0 <= now - last < self.spec.track_gap_s

    def _offer(self, out: list[Candidate], frame: Frame, detections: Detections, reason: str,
               keys: Sequence[Track | tuple[int, int]], now: float, checked: bool = False) -> None:
        """Add a candidate if the per-track gap and the rate limits let it through (merging a repeated frame)."""
        for c in out:
            if c.frame.index == frame.index:  # the same frame for a second reason: one sample, both reasons
                c.reasons.append(reason)
                self._mark(keys, now)
                return
        if not checked and keys and all(self._recent(k, now) for k in keys):
            self.suppressed += 1
            return
        if not self.limiter.allow(now):
            return
        self._mark(keys, now)
        self.chosen[reason] += 1
        ids = sorted({k.track_id for k in keys if isinstance(k, Track)})
        out.append(Candidate(frame, detections, [reason], ids))

    def _mark(self, keys: Sequence[Track | tuple[int, int]], now: float) -> None:
        for k in keys:
            if isinstance(k, tuple):
                self._sent_cell[k] = now
            else:
                self._sent_track[k] = now
        if len(self._sent_cell) > 4096:  # old places age out; the gap is short compared with a day
            self._sent_cell = {k: v for k, v in self._sent_cell.items() if now - v < self.spec.track_gap_s}


def prepare_image(image: np.ndarray, masks: Sequence[MaskSpec], max_side: int) -> np.ndarray:
    """The pixels that may leave: every mask polygon filled black (at full resolution, before resizing, so no
    masked pixel bleeds into the result), then the frame shrunk so its longer side is at most ``max_side``.

    >>> img = np.full((100, 200, 3), 255, np.uint8)
    >>> out = prepare_image(img, [MaskSpec(name="m", points=[[0, 0], [0.5, 0], [0.5, 1], [0, 1]])], 100)
    >>> out.shape, int(out[25, 10].max()), int(out[25, 90].min())
    ((50, 100, 3), 0, 255)
    """
    h, w = image.shape[:2]
    out = image
    if masks:
        out = image.copy()
        for mask in masks:
            poly = np.round(to_pixels(mask.points, w, h)).astype(np.int32)
            cv2.fillPoly(out, [poly], (0, 0, 0))
    scale = min(1.0, max_side / max(h, w))
    if scale < 1.0:
        size = (max(1, round(w * scale)), max(1, round(h * scale)))
        out = cv2.resize(out, size, interpolation=cv2.INTER_AREA)
    return out


def encode_jpeg(image: np.ndarray, quality: int) -> bytes:
    """Baseline JPEG bytes of a BGR image."""
    ok, buf = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, int(quality)])
    if not ok:
        raise ValueError("JPEG encoding failed")
    return buf.tobytes()


def build_sample(candidate: Candidate, *, site: str, camera_id: str, model_name: str, model_sha256: str,
                 names: dict[int, str], spec: SamplesSpec, masks: Sequence[MaskSpec] = (),
                 conf: float | None = None, model_version: str | None = None) -> bytes:
    """The ``sample.v1`` message of one candidate: masked, resized JPEG plus its header (contract/sample.py)."""
    from contract.ids import new_event_id
    from contract.sample import encode_sample
    from contract.schema import SCHEMA_VERSION
    from contract.timestamps import format_ts

    image = candidate.frame.image
    h, w = image.shape[:2]
    sent = prepare_image(image, masks, spec.max_side)
    sh, sw = sent.shape[:2]
    sx, sy = sw / w, sh / h
    dets = candidate.detections
    model: dict = {"name": model_name[:128], "sha256": model_sha256}
    if model_version:
        model["version"] = model_version
    if conf is not None:
        model["conf"] = round(float(conf), 4)
    header = {
        "schema_version": SCHEMA_VERSION,
        "sample_id": new_event_id(),
        "ts": format_ts(candidate.frame.ts),
        "site": site,
        "camera_id": camera_id,
        "reason": candidate.reason,
        "reasons": list(dict.fromkeys(candidate.reasons)),
        "track_ids": candidate.track_ids,
        "model": model,
        "image": {"width": sw, "height": sh, "source_width": w, "source_height": h, "masked": len(masks)},
        "detections": [
            {"box": [round(float(x1) * sx, 1), round(float(y1) * sy, 1), round(float(x2) * sx, 1),
                     round(float(y2) * sy, 1)],
             "score": round(float(s), 4), "class": names.get(int(c), str(int(c)))}
            for (x1, y1, x2, y2), s, c in zip(dets.xyxy, dets.confidence, dets.class_id, strict=True)
        ],
    }
    return encode_sample(header, encode_jpeg(sent, spec.jpeg_quality))

"""The edge sampler (issue 15): its rules, its rate limits and the bytes that leave the device."""

from __future__ import annotations

import random

import cv2
import numpy as np
import pytest

from camera.detections import Detections
from camera.filters import MaskSpec
from camera.frame import Frame
from camera.sampler import RateLimiter, Sampler, SamplesSpec, TokenBucket, build_sample, prepare_image
from camera.tracker import Tracker, TrackerSpec
from contract.sample import decode_sample
from contract.schema import validation_errors

IMG = np.zeros((480, 640, 3), np.uint8)


def dets(*rows: tuple[float, float, float, float, float]) -> Detections:
    if not rows:
        return Detections.empty()
    arr = np.array(rows, np.float32)
    return Detections(arr[:, :4], arr[:, 4], np.zeros(len(rows), np.int32))


def spec(**kw) -> SamplesSpec:
    base = {"enabled": True, "random_probability": 0.0, "per_minute": 1000, "per_hour": 1000, "per_day": 1000,
            "track_gap_s": 30.0}
    return SamplesSpec(**{**base, **kw})


def run(sampler: Sampler, tracker: Tracker, frames: list[Detections], t0: float = 0.0, dt: float = 0.2):
    """Feed detections frame by frame through a real tracker; returns [(frame index, reasons)]."""
    out = []
    for i, d in enumerate(frames):
        frame = Frame(IMG, t0 + i * dt, i)
        tracker.update(d, frame.ts)
        out += [(c.frame.index, c.reasons) for c in sampler.observe(frame, d, tracker.tracks)]
    return out


def walker(score: float, n: int, x0: float = 100.0) -> list[Detections]:
    return [dets((x0 + 2 * i, 100, x0 + 40 + 2 * i, 200, score)) for i in range(n)]


def test_disabled_sampler_sends_nothing():
    s = Sampler(SamplesSpec(enabled=False, random_probability=1.0))
    assert run(s, Tracker(), walker(0.4, 20)) == []


def test_near_threshold_detection_is_sampled_once_per_track_gap():
    s = Sampler(spec(conf_band=(0.3, 0.5)))
    # a confident person (0.9) is never near the threshold; a 0.4 one is, but only once per track_gap_s
    assert run(s, Tracker(), walker(0.9, 30)) == []
    got = run(Sampler(spec(conf_band=(0.3, 0.5))), Tracker(TrackerSpec(min_hits=1, new_track_score=0.3)),
              walker(0.4, 30))
    assert got == [(0, ["near_threshold"])]
    # after the gap the same track may be sent again
    got = run(Sampler(spec(conf_band=(0.3, 0.5), track_gap_s=2.0)),
              Tracker(TrackerSpec(min_hits=1, new_track_score=0.3)), walker(0.4, 30))
    assert [i for i, _ in got] == [0, 10, 20]


def test_two_people_near_threshold_are_keyed_separately():
    s = Sampler(spec(conf_band=(0.3, 0.5)))
    t = Tracker(TrackerSpec(min_hits=1, new_track_score=0.3))
    first = walker(0.4, 5)
    both = [dets((110 + 2 * i, 100, 150 + 2 * i, 200, 0.4), (400, 100, 440, 200, 0.45)) for i in range(5, 10)]
    got = run(s, t, first + both)
    assert [i for i, _ in got] == [0, 5]  # the second person is new at frame 5; the first one is still in its gap


def test_tentative_track_that_dies_unconfirmed_sends_its_last_frame():
    s = Sampler(spec(conf_band=(0.0, 0.01), died_min_hits=2))
    t = Tracker(TrackerSpec(min_hits=5))
    frames = walker(0.7, 3) + [dets()] * 3  # seen on frames 0-2, never confirmed (5 hits needed), gone at 3
    assert run(s, t, frames) == [(2, ["track_died"])]
    # a one-frame flicker is below died_min_hits: not a sample
    s = Sampler(spec(conf_band=(0.0, 0.01), died_min_hits=2))
    assert run(s, Tracker(TrackerSpec(min_hits=5)), walker(0.7, 1) + [dets()] * 3) == []


def test_confirmed_track_that_dies_is_not_a_false_positive_candidate():
    s = Sampler(spec(conf_band=(0.0, 0.01), coast=False))
    assert run(s, Tracker(TrackerSpec(min_hits=2, max_age_s=0.3)), walker(0.9, 6) + [dets()] * 5) == []


def test_coasting_gap_sends_its_first_missed_frame_when_the_track_returns():
    s = Sampler(spec(conf_band=(0.0, 0.01)))
    t = Tracker(TrackerSpec(min_hits=2, max_age_s=2.0))
    w = walker(0.9, 10)
    frames = w[:4] + [dets(), dets()] + w[6:]  # the detector misses the person on frames 4 and 5
    assert run(s, t, frames) == [(4, ["coast"])]
    # a track that coasts out of view and ends (the person left) is no sample
    s = Sampler(spec(conf_band=(0.0, 0.01)))
    assert run(s, Tracker(TrackerSpec(min_hits=2, max_age_s=0.5)), w[:4] + [dets()] * 6) == []


def test_random_baseline_is_rate_limited_per_minute():
    s = Sampler(spec(random_probability=1.0, per_minute=2, per_hour=1000, per_day=1000), rng=random.Random(1))
    got = run(s, Tracker(), [dets()] * 600, dt=1.0)  # ten minutes at one frame per second, every frame a candidate
    times = [i for i, _ in got]
    assert times[:3] == [0, 1, 30]  # a full bucket (2), then one token per 30 s
    assert len(times) == 2 + (599 - 1) // 30
    assert all(r == ["random"] for _, r in got)
    assert s.limiter.refused == 600 - len(times)


def test_hour_and_day_buckets():
    hour = RateLimiter(spec(per_minute=1000, per_hour=30, per_day=1000))
    assert sum(hour.allow(float(t)) for t in range(600)) == 30 + int(599 * 30 / 3600)  # 30 at once, refilled 1 per 120 s
    day = RateLimiter(spec(per_minute=1000, per_hour=1000, per_day=3))
    assert [day.allow(t) for t in (0.0, 1.0, 2.0, 3.0, 86400 / 3 + 2.0)] == [True, True, True, False, True]


def test_defaults_are_two_per_minute_thirty_per_hour_two_hundred_per_day():
    d = SamplesSpec()
    assert (d.enabled, d.per_minute, d.per_hour, d.per_day) == (False, 2, 30, 200)


def test_clock_stepping_back_mints_no_tokens():
    b = TokenBucket(1, 60.0)
    assert b.take(1000.0)
    assert not b.take(10.0) and not b.take(1000.0)  # back in time, then back at the original instant
    assert b.take(1060.0)


def test_same_frame_for_two_reasons_is_one_sample():
    s = Sampler(spec(conf_band=(0.3, 0.5), random_probability=1.0))
    got = run(s, Tracker(TrackerSpec(min_hits=1, new_track_score=0.3)), walker(0.4, 1))
    assert got == [(0, ["near_threshold", "random"])]


def test_bad_band_is_a_config_error():
    with pytest.raises(ValueError, match="conf_band"):
        SamplesSpec(conf_band=(0.6, 0.4))


def test_masks_are_black_in_the_jpeg_that_leaves():
    h, w = 720, 1280
    image = np.full((h, w, 3), 255, np.uint8)
    masks = [MaskSpec(name="window", points=[[0, 0], [0.5, 0], [0.5, 1.0], [0, 1.0]]),  # left half (normalized)
             MaskSpec(name="door", points=[[1000, 100], [1200, 100], [1200, 300], [1000, 300]])]  # pixels
    frame = Frame(image, 1_700_000_000.0, 7)
    s = Sampler(spec(random_probability=1.0, max_side=640, jpeg_quality=90))
    d = dets((700, 400, 760, 600, 0.42))
    [cand] = s.observe(frame, d, [])
    payload = build_sample(cand, site="s1", camera_id="cam", model_name="m", model_sha256="a" * 64,
                           names={0: "person"}, spec=s.spec, masks=masks, conf=0.25)
    header, jpeg = decode_sample(payload)
    assert validation_errors(header, "sample.v1.schema.json") == []
    sent = cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_COLOR)
    assert sent.shape == (360, 640, 3)  # longer side at most max_side
    assert (header["image"]["width"], header["image"]["height"]) == (640, 360)
    assert sent[:, :316].max() <= 12  # left half black (a few pixels of margin for JPEG ringing at the edge)
    assert sent[60:140, 505:595].max() <= 12  # the pixel mask, scaled by 0.5
    assert sent[:, 330:480].min() >= 240 and sent[200:, 505:595].min() >= 240  # the rest untouched
    assert header["detections"] == [{"box": [350.0, 200.0, 380.0, 300.0], "score": 0.42, "class": "person"}]
    assert header["reasons"] == ["near_threshold", "random"] and header["model"]["conf"] == 0.25
    assert image.min() == 255  # the frame the pipeline keeps is not modified


def test_prepare_image_leaves_small_frames_alone():
    img = np.full((100, 80, 3), 7, np.uint8)
    assert prepare_image(img, [], 640) is img

"""The motion gate: skip still frames, run on movement, keepalive, ignore slow light changes; real footage."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from camera.motion import MotionGate
from tests.conftest import INDOOR_CLIP


def _scene(h: int = 360, w: int = 640) -> np.ndarray:
    rng = np.random.default_rng(0)
    base = rng.integers(40, 200, size=(h // 20, w // 20, 3), dtype=np.uint8)
    return cv2.resize(base, (w, h), interpolation=cv2.INTER_NEAREST)  # textured, static background


def test_still_frames_are_skipped_and_counted():
    gate = MotionGate(threshold=0.005, keepalive_s=100)
    img = _scene()
    decisions = [gate.check(img, t * 0.1) for t in range(20)]
    assert decisions[0] is True  # first frame: nothing to compare with
    assert not any(decisions[1:])
    assert gate.skipped == 19


def test_a_moving_person_sized_blob_triggers():
    gate = MotionGate(threshold=0.005, keepalive_s=100)
    img = _scene()
    gate.check(img, 0.0)
    gate.check(img, 0.1)
    moved = img.copy()
    cv2.rectangle(moved, (300, 100), (360, 300), (255, 255, 255), -1)  # ~5% of the frame
    assert gate.check(moved, 0.2) is True
    assert gate.last_fraction > 0.02


def test_keepalive_forces_a_detection_on_a_still_scene():
    gate = MotionGate(threshold=0.005, keepalive_s=2.0)
    img = _scene()
    runs = [t for t in np.arange(0, 10, 0.5) if gate.check(img, float(t))]
    assert runs == [0.0, 2.0, 4.0, 6.0, 8.0]


def test_slow_global_light_change_is_not_motion():
    gate = MotionGate(threshold=0.005, keepalive_s=100)
    img = _scene().astype(np.int16)
    runs = [gate.check(np.clip(img + step, 0, 255).astype(np.uint8), step * 0.1) for step in range(30)]
    assert not any(runs[1:])  # +1 grey level per frame stays under pixel_threshold against the running average


def test_tiny_noise_below_threshold():
    gate = MotionGate(threshold=0.01, keepalive_s=100)
    img = _scene()
    gate.check(img, 0)
    noisy = img.copy()
    noisy[10:14, 10:14] = 255  # a few pixels: less than 1% of the downscaled frame
    assert gate.check(noisy, 0.1) is False


def test_threshold_out_of_range():
    with pytest.raises(ValueError, match="fraction"):
        MotionGate(threshold=5)


@pytest.mark.slow
def test_real_footage_people_moving_is_motion_repeated_frame_is_not():
    cap = cv2.VideoCapture(str(INDOOR_CLIP))
    frames = []
    for _ in range(60):
        ok, img = cap.read()
        assert ok
        frames.append(img)
    cap.release()
    gate = MotionGate(threshold=0.003, keepalive_s=100)
    moving = [gate.check(f, i / 30) for i, f in enumerate(frames)]
    assert sum(moving[1:]) >= 10  # two people talking and moving in the first two seconds
    frozen = MotionGate(threshold=0.003, keepalive_s=100)
    still = [frozen.check(frames[0], i / 30) for i in range(30)]
    assert still.count(True) == 1

"""camera/inference.py: concurrent inference streams keep frame order, and the edge's events do not depend on them."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from camera.detections import Detections
from camera.frame import Frame
from camera.inference import InferenceQueue
from tests.conftest import INDOOR_CLIP


def frame(i: int) -> Frame:
    return Frame(image=np.full((4, 4, 3), i, np.uint8), ts=1000.0 + i, index=i)


def slow_then_fast(image: np.ndarray) -> Detections:
    """A detector stand-in whose early frames take longest, so later frames finish first."""
    i = int(image[0, 0, 0])
    time.sleep(0.03 if i % 3 == 0 else 0.001)
    return Detections(np.array([[i, i, i + 1, i + 1]], np.float32), np.array([0.5], np.float32),
                      np.array([0], np.int32))


@pytest.mark.parametrize("streams", [1, 2, 4])
def test_results_come_back_in_frame_order_with_their_own_detections(streams):
    queue = InferenceQueue(slow_then_fast, streams)
    out = []
    try:
        for i in range(20):
            out.extend(queue.put(frame(i), detect=i % 5 != 4))  # every fifth frame skipped (no motion)
            assert len(out) >= i + 1 - streams  # never more than `streams` frames held back
        out.extend(queue.drain())
    finally:
        queue.close()
    assert [f.index for f, _ in out] == list(range(20))
    for f, result in out:
        if f.index % 5 == 4:
            assert result is None
        else:
            detections, ms = result
            assert detections.xyxy[0, 0] == f.index and ms > 0


def test_one_stream_runs_inline_and_several_run_side_by_side():
    callers: set[int] = set()
    running, peak, lock = [0], [0], threading.Lock()

    def detect(image):
        callers.add(threading.get_ident())
        with lock:
            running[0] += 1
            peak[0] = max(peak[0], running[0])
        time.sleep(0.02)
        with lock:
            running[0] -= 1
        return Detections.empty()

    inline = InferenceQueue(detect, 1)
    assert [f.index for f, _ in inline.put(frame(0))] == [0]  # done before put returns
    assert callers == {threading.get_ident()}
    callers.clear()
    queue = InferenceQueue(detect, 3)
    try:
        for i in range(9):
            list(queue.put(frame(i)))
        list(queue.drain())
    finally:
        queue.close()
    assert threading.get_ident() not in callers and peak[0] >= 2


def test_a_detector_error_reaches_the_caller():
    def broken(image):
        raise RuntimeError("model exploded")

    queue = InferenceQueue(broken, 2)
    try:
        with pytest.raises(RuntimeError, match="model exploded"):
            for i in range(3):
                list(queue.put(frame(i)))
            list(queue.drain())
    finally:
        queue.close()


@pytest.mark.slow
def test_edge_events_are_the_same_with_one_or_three_streams(int8_model_320, tmp_path):
    """The real edge on a real clip: streams change the speed, never the events (ids aside)."""
    events = {}
    for streams in (1, 3):
        path = tmp_path / f"events-{streams}.jsonl"
        proc = subprocess.run(
            [sys.executable, "-m", "camera", "run", "--source", str(INDOOR_CLIP), "--model", str(int8_model_320),
             "--camera-id", "cam", "--site", "lab", "--no-motion", "--max-frames", "120", "--streams", str(streams),
             "--start-time", "2026-11-23T08:00:00Z", "--events-file", str(path)],
            capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert f"{streams} stream(s)" in proc.stderr
        events[streams] = [{k: v for k, v in json.loads(line).items() if k != "event_id"}
                           for line in path.read_text().splitlines()]
    assert any(e["type"] == "person.enter" for e in events[1])
    assert events[3] == events[1]


def test_put_returns_while_every_stream_is_busy_and_waits_only_beyond():
    """With 2 streams, two frames are accepted while both workers are busy (so no worker idles while the caller
    tracks and publishes); a third waits for the oldest result."""
    release = threading.Event()

    def blocked(image: np.ndarray) -> Detections:
        release.wait(10)
        return slow_then_fast(image)

    queue = InferenceQueue(blocked, 2)
    try:
        assert [list(queue.put(frame(i))) for i in range(2)] == [[], []]  # none blocked, none done
        got: list = []
        third = threading.Thread(target=lambda: got.extend(queue.put(frame(2))))
        third.start()
        third.join(0.3)
        assert third.is_alive() and not got  # held: both streams busy
        release.set()
        third.join(10)
        rest = got + list(queue.drain())
        assert [f.index for f, _ in rest] == [0, 1, 2]
    finally:
        release.set()
        queue.close()

"""The shared detector pool (camera/fair_scheduler.py): fair shares between cameras, each camera's frame order."""

from __future__ import annotations

import random
import threading
import time

import pytest

from camera.fair_scheduler import FairScheduler
from camera.frame import Frame


def _frame(i: int, lane: str = "") -> Frame:
    return Frame(image=(lane, i), ts=float(i), index=i)


class Recorder:
    """A detect function that logs which lane's frame ran, held back until ``gate`` opens."""

    def __init__(self) -> None:
        self.order: list[str] = []
        self.gate = threading.Event()

    def detect(self, image):
        self.gate.wait(10)
        self.order.append(image[0])
        return image


def _saturate(sched: FairScheduler, rec: Recorder, lanes: dict[str, float], frames: int) -> dict:
    """Queue ``frames`` frames on every lane while the single worker is held, then let it run them all."""
    made = {name: sched.lane(rec.detect, name, weight=w, depth=frames + 1) for name, w in lanes.items()}
    blocker = sched.lane(rec.detect, "blocker", depth=2)
    list(blocker.put(_frame(0, "blocker")))  # the worker takes this one and waits at the gate
    time.sleep(0.1)
    for i in range(frames):
        for name, lane in made.items():
            assert list(lane.put(_frame(i, name))) == []  # nothing done yet: the worker is held
    rec.gate.set()
    for lane in made.values():
        list(lane.drain())
    list(blocker.drain())
    rec.order.remove("blocker")
    return made


def test_saturated_lanes_of_equal_weight_take_turns():
    sched, rec = FairScheduler(workers=1), Recorder()
    try:
        _saturate(sched, rec, {"a": 1, "b": 1, "c": 1}, frames=10)
    finally:
        sched.close()
    assert rec.order[:9] == ["a", "b", "c"] * 3
    for n in range(3, 31, 3):  # at every point each camera has had its third of the runs
        window = rec.order[:n]
        assert {window.count(x) for x in "abc"} == {n // 3}, window


def test_weights_share_the_detector_in_proportion():
    """A 10 fps camera gets twice the runs of a 5 fps one while both ask for more than the pool can do."""
    sched, rec = FairScheduler(workers=1), Recorder()
    try:
        _saturate(sched, rec, {"fast": 10, "slow": 5}, frames=12)
    finally:
        sched.close()
    first = rec.order[:12]
    assert first.count("fast") == 8 and first.count("slow") == 4, first


def test_a_lane_that_was_idle_gets_no_burst_of_credit():
    """Camera b was quiet (motion gate) while a ran alone; when b wakes it takes turns with a, it does not
    run its whole backlog ahead of a."""
    sched, rec = FairScheduler(workers=1), Recorder()
    rec.gate.set()
    try:
        a = sched.lane(rec.detect, "a", depth=50)
        b = sched.lane(rec.detect, "b", depth=50)
        for i in range(20):
            list(a.put(_frame(i, "a")))
        list(a.drain())
        rec.order.clear()
        rec.gate.clear()
        hold = sched.lane(rec.detect, "hold", depth=2)
        list(hold.put(_frame(0, "hold")))
        time.sleep(0.1)
        for i in range(6):
            list(a.put(_frame(i, "a")))
            list(b.put(_frame(i, "b")))
        rec.gate.set()
        list(a.drain()), list(b.drain()), list(hold.drain())
    finally:
        sched.close()
    rec.order.remove("hold")
    assert rec.order[:6].count("b") == 3, rec.order


@pytest.mark.parametrize("workers", [1, 2, 3])
def test_every_lane_gets_its_own_frames_back_in_order(workers):
    rng = random.Random(7)

    def detect(image):
        time.sleep(rng.random() * 0.004)
        return image

    sched = FairScheduler(workers=workers)
    try:
        lanes = {name: sched.lane(detect, name) for name in ("door", "till", "yard")}
        got: dict[str, list[int]] = {name: [] for name in lanes}
        for i in range(40):
            for name, lane in lanes.items():
                for frame, result in lane.put(_frame(i, name), detect=i % 5 != 0):  # some frames skip (no motion)
                    got[name].append(frame.index)
                    assert result is None if frame.index % 5 == 0 else result[0] == (name, frame.index)
        for name, lane in lanes.items():
            got[name] += [f.index for f, _ in lane.drain()]
    finally:
        sched.close()
    assert all(v == list(range(40)) for v in got.values()), got
    assert {lane.runs for lane in lanes.values()} == {32}


def test_a_lane_holds_at_most_depth_frames_in_the_pool():
    """Beyond ``depth`` frames, put waits for the oldest: the camera (and a live source) cannot run ahead."""
    rec = Recorder()
    sched = FairScheduler(workers=1)
    try:
        lane = sched.lane(rec.detect, "a", depth=2)
        assert list(lane.put(_frame(0, "a"))) == [] and list(lane.put(_frame(1, "a"))) == []
        done: list[int] = []
        t = threading.Thread(target=lambda: done.extend(f.index for f, _ in lane.put(_frame(2, "a"))))
        t.start()
        t.join(0.3)
        assert t.is_alive() and done == [], "a third frame must wait while two are in the pool"
        rec.gate.set()
        t.join(5)
        assert done and done[0] == 0
        list(lane.drain())
    finally:
        rec.gate.set()
        sched.close()


def test_a_detector_error_reaches_that_camera_only():
    def detect(image):
        if image[0] == "bad":
            raise RuntimeError("model exploded")
        return image

    sched = FairScheduler(workers=2)
    try:
        bad, good = sched.lane(detect, "bad"), sched.lane(detect, "good")
        list(bad.put(_frame(0, "bad")))
        seen = [f.index for i in range(5) for f, _ in good.put(_frame(i, "good"))]
        assert seen + [f.index for f, _ in good.drain()] == list(range(5))
        with pytest.raises(RuntimeError, match="model exploded"):
            list(bad.drain())
    finally:
        sched.close()

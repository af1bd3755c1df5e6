"""Several cameras' frames in one network run (issue 16): a dynamic-batch model (models/head.py dynamic_batch,
the default of models.build), camera.detector.detect_batch, and the shared pool batching waiting frames in fair
order (camera/fair_scheduler.py)."""

from __future__ import annotations

import copy
import threading
import time

import cv2
import numpy as np
import onnx
import pytest

from camera.config import EdgeConfig
from camera.detector import Detector, ModelError, detect_batch
from camera.fair_scheduler import FairScheduler
from camera.frame import Frame
from camera.pipeline import EdgeRunner
from models.head import dynamic_batch
from tests.conftest import INDOOR_CLIP, ONNX_FP32, PLAZA_CLIP, STREET_CLIP


def _frames(clip, n: int, step: int = 7) -> list[np.ndarray]:
    cap = cv2.VideoCapture(str(clip))
    out = []
    while len(out) < n:
        for _ in range(step):
            ok, image = cap.read()
        assert ok, clip
        out.append(image)
    cap.release()
    return out


@pytest.fixture(scope="module")
def frames() -> dict[str, list[np.ndarray]]:
    """Four frames of each of three clips of different sizes (1280x720, the plaza's, the indoor webcam's)."""
    return {"street": _frames(STREET_CLIP, 4), "plaza": _frames(PLAZA_CLIP, 4), "indoor": _frames(INDOOR_CLIP, 4)}


def _copies(model, confs: tuple[float, ...]) -> list[Detector]:
    """One loaded model, one copy per camera with its own threshold: what camera/site_runner.py makes."""
    base = Detector(model)
    out = []
    for conf in confs:
        d = copy.copy(base)
        d.conf = conf
        out.append(d)
    return out


def _same(a, b) -> None:
    assert len(a) == len(b)
    np.testing.assert_allclose(a.xyxy, b.xyxy, atol=1e-3)
    np.testing.assert_allclose(a.confidence, b.confidence, atol=1e-5)
    assert a.class_id.tolist() == b.class_id.tolist()


def test_a_built_model_runs_a_batch_and_gives_each_frame_its_own_cameras_result(int8_model_320, frames):
    street, plaza, indoor = _copies(int8_model_320, (0.25, 0.4, 0.1))
    assert street.dynamic_batch and street.session is plaza.session
    images = [frames["street"][0], frames["plaza"][0], frames["indoor"][0], frames["street"][1]]
    detectors = [street, plaza, indoor, street]
    batched = detect_batch(detectors, images)
    alone = [d.detect(image) for d, image in zip(detectors, images, strict=True)]
    for a, b in zip(batched, alone, strict=True):
        _same(a, b)
    assert sum(len(d) for d in alone) > 5  # people were found, so the comparison compared something
    assert (plaza.conf, indoor.conf) == (0.4, 0.1) and batched[1].confidence.min() > 0.4  # each its own threshold


def test_dynamic_batch_surgery_keeps_every_image_result_of_the_static_graph(tmp_path, frames):
    path = tmp_path / "dyn.onnx"
    onnx.save(dynamic_batch(onnx.load(ONNX_FP32)), path)
    static, dynamic = Detector(ONNX_FP32), Detector(path)
    assert not static.dynamic_batch and dynamic.dynamic_batch
    images = frames["plaza"][:3]
    for a, image in zip(detect_batch([dynamic] * 3, images), images, strict=True):
        _same(a, static.detect(image))


def test_a_model_with_a_fixed_batch_or_two_sessions_refuse_a_batch_with_a_clear_error(tmp_path, frames):
    static = Detector(ONNX_FP32)
    with pytest.raises(ModelError, match="fixed batch of 1"):
        detect_batch([static, static], frames["plaza"][:2])
    _same(detect_batch([static], frames["plaza"][:1])[0], static.detect(frames["plaza"][0]))  # one is fine
    path = tmp_path / "dyn.onnx"
    onnx.save(dynamic_batch(onnx.load(ONNX_FP32)), path)
    with pytest.raises(ValueError, match="share one session"):
        detect_batch([Detector(path), Detector(path)], frames["plaza"][:2])


class Gate:
    """A lane's detect held until ``open`` is set: it keeps the single worker busy while the others queue."""

    def __init__(self) -> None:
        self.open = threading.Event()

    def detect(self, image):
        self.open.wait(10)
        return image


def test_the_pool_batches_waiting_frames_in_fair_order_and_each_camera_gets_its_own_results(int8_model_320,
                                                                                              frames):
    street, plaza, indoor = _copies(int8_model_320, (0.25, 0.4, 0.1))
    gate, alone = Gate(), []
    sched = FairScheduler(workers=1, max_batch=4)
    try:
        blocker = sched.lane(gate.detect, "blocker", depth=2)
        lanes = {"street": sched.lane(street.detect, "street", depth=10, batch=street),
                 "plaza": sched.lane(plaza.detect, "plaza", depth=10, batch=plaza),
                 "indoor": sched.lane(indoor.detect, "indoor", depth=10, batch=indoor)}
        # a camera whose frames cannot join a batch (region tiles, a model on probation): its turns stay its own
        tiles = sched.lane(lambda image: ("tiles", image.shape), "tiles", depth=10)
        list(blocker.put(Frame(image="hold", ts=0.0, index=0)))
        time.sleep(0.1)  # the worker now waits at the gate
        for i in range(4):
            for name, lane in lanes.items():
                assert list(lane.put(Frame(image=frames[name][i], ts=float(i), index=i))) == []
            assert list(tiles.put(Frame(image=frames["street"][i], ts=float(i), index=i))) == []
        gate.open.set()
        got = {name: list(lane.drain()) for name, lane in lanes.items()}
        tiled = list(tiles.drain())
        list(blocker.drain())
    finally:
        sched.close()
    # fair order is street, plaza, indoor, tiles, street, ...: three frames batched, then the tiles camera alone
    assert sched.batches == {3: 4, 1: 5}, sched.batches
    assert [r[0] for _, r in tiled] == [("tiles", frames["street"][0].shape)] * 4
    for name, detector in (("street", street), ("plaza", plaza), ("indoor", indoor)):
        assert [f.index for f, _ in got[name]] == [0, 1, 2, 3]  # its own frames, in its order
        for frame, (detections, ms) in got[name]:
            _same(detections, detector.detect(frame.image))
            alone.append(len(detections))
            assert ms > 0
    assert sum(alone) > 10


def test_one_cameras_bad_frame_fails_only_that_camera(int8_model_320, frames):
    street, plaza = _copies(int8_model_320, (0.25, 0.25))
    gate = Gate()
    sched = FairScheduler(workers=1, max_batch=4)
    try:
        blocker = sched.lane(gate.detect, "blocker", depth=2)
        good = sched.lane(street.detect, "street", depth=4, batch=street)
        bad = sched.lane(plaza.detect, "plaza", depth=4, batch=plaza)
        list(blocker.put(Frame(image="hold", ts=0.0, index=0)))
        time.sleep(0.1)
        list(good.put(Frame(image=frames["street"][0], ts=0.0, index=0)))
        list(bad.put(Frame(image=np.zeros((10, 10), np.uint8), ts=0.0, index=0)))  # not a BGR image
        gate.open.set()
        (frame, (detections, _)), = list(good.drain())
        with pytest.raises(ValueError, match="HxWx3"):
            list(bad.drain())
        list(blocker.drain())
    finally:
        sched.close()
    _same(detections, street.detect(frames["street"][0]))


def test_only_a_cameras_plain_detector_may_join_a_batch(int8_model_320, tmp_path):
    base = {"camera_id": "door", "source": str(STREET_CLIP), "model": str(int8_model_320)}
    line = {"lines": [{"name": "door", "points": [[0.1, 0.5], [0.9, 0.5]]}]}
    detector = Detector(int8_model_320)
    plain = EdgeRunner(EdgeConfig(**base))
    assert plain._batchable(detector) is detector
    assert plain._batchable(detector, detector.detect) is detector  # a swap to a model not on probation
    assert plain._batchable(detector, lambda image: detector.detect(image)) is None  # guarded (probation)
    assert EdgeRunner(EdgeConfig(**base, **line))._batchable(detector) is None  # region tiles around the line
    assert EdgeRunner(EdgeConfig(**base, **line, detector={"regions": "off"}))._batchable(detector) is detector

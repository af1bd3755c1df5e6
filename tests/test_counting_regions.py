"""Region detection around counting lines (camera/regions.py): the tiles cover every line, stay in the frame,
and the merged detections of the real detector are the full frame's plus what only the tiles saw, once each."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from camera.detections import iou_matrix
from camera.detector import Detector
from camera.regions import RegionDetector, line_regions
from tests.conftest import ONNX_FP32, SHARED

PETS = SHARED / "data" / "sequences" / "PETS09-S2L1" / "PETS09-S2L1.mp4"


@pytest.mark.parametrize("segment, frame, tile, count", [
    ([[384, 0], [384, 576]], (768, 576), (480, 384), 2),      # PETS09's vertical middle line, 256x320 model x 1.5
    ([[0, 450], [1280, 450]], (1280, 720), (480, 288), 4),    # a street-wide line, 192x320 x 1.5
    ([[0, 0], [768, 576]], (768, 576), (320, 256), 3),        # a diagonal, native scale
    ([[100, 50], [140, 60]], (640, 480), (480, 384), 1),      # shorter than a tile: one tile
])
def test_tiles_cover_the_line_and_stay_in_the_frame(segment, frame, tile, count):
    tiles = line_regions([np.array(segment, float)], frame, tile)
    assert len(tiles) == count and len(set(tiles)) == len(tiles)
    for x0, y0, x1, y1 in tiles:
        assert 0 <= x0 < x1 <= frame[0] and 0 <= y0 < y1 <= frame[1] and (x1 - x0, y1 - y0) == tile
    for f in np.linspace(0, 1, 200):
        x, y = np.array(segment[0], float) + f * (np.array(segment[1], float) - segment[0])
        assert any(x0 <= x <= x1 and y0 <= y <= y1 for x0, y0, x1, y1 in tiles), (x, y)


@pytest.fixture(scope="module")
def pets_frame() -> np.ndarray:
    cap = cv2.VideoCapture(str(PETS))
    for _ in range(300):  # frame 300: seven people, several far from the camera
        ok, image = cap.read()
        assert ok, PETS
    cap.release()
    return image


@pytest.mark.slow
def test_auto_leaves_regions_off_when_they_add_no_resolution(pets_frame):
    """The 640x640 model already sees a 768x576 frame at 0.83x: a 1.5x tile (960 px) would be no sharper."""
    det = Detector(ONNX_FP32, conf=0.1, threads=1)
    rd = RegionDetector(det.detect, det.imgsz, det.iou, lambda w, h: [np.array([[384.0, 0], [384.0, 576]])])
    assert rd.plan((768, 576)) == []
    full, merged = det.detect(pets_frame), rd.detect(pets_frame)
    assert np.array_equal(full.xyxy, merged.xyxy)


@pytest.mark.slow
def test_tiles_add_what_the_full_frame_missed_once(pets_frame):
    """The same model made to look at half-size tiles around the line (2x sharper there): every merged box is in
    the frame, no two overlap beyond the NMS IoU, and the full frame's people are all still there."""
    det = Detector(ONNX_FP32, conf=0.1, threads=1)
    small = cv2.resize(pets_frame, (384, 288))  # the camera at half size: the model sees its people small
    rd = RegionDetector(det.detect, det.imgsz, det.iou, lambda w, h: [np.array([[w / 2, 0], [w / 2, h]])],
                        scale=0.25, mode="lines")  # 160x160 px tiles: 2.4x sharper than the full frame
    tiles = rd.plan((384, 288))
    assert len(tiles) >= 2
    full, merged = det.detect(small), rd.detect(small)
    assert len(merged) >= len(full)
    assert (merged.xyxy[:, [0, 1]] >= -1).all() and (merged.xyxy[:, 2] <= 385).all() and (merged.xyxy[:, 3] <= 289).all()
    iou = iou_matrix(merged.xyxy, merged.xyxy)
    np.fill_diagonal(iou, 0)
    assert iou.max(initial=0) <= det.iou + 1e-6
    confident = full[full.confidence >= 0.5]
    if len(confident):
        assert iou_matrix(confident.xyxy, merged.xyxy).max(axis=1).min() > 0.5


def test_regions_off_in_yaml_is_off(tmp_path):
    """YAML 1.1 reads a bare ``off`` as false: the config takes it as the word the user wrote."""
    from camera.config import load_config

    path = tmp_path / "edge.yaml"
    path.write_text(f"camera_id: c\nsource: '0'\nmodel: {ONNX_FP32}\ndetector: {{regions: off}}\n")
    assert load_config(path).detector.regions == "off"


@pytest.mark.slow
def test_auto_bounds_the_cost_lines_runs_every_tile():
    """A line across a 2560x1440 camera needs 4 tiles of 960 px: more than auto's bound of 2 (3 model runs per
    frame), so auto stays at the full frame; ``lines`` runs all of them."""
    det = Detector(ONNX_FP32, conf=0.1, threads=1)
    line = lambda w, h: [np.array([[0.0, h / 2], [float(w), h / 2]])]  # noqa: E731
    assert RegionDetector(det.detect, det.imgsz, det.iou, line).plan((2560, 1440)) == []
    assert len(RegionDetector(det.detect, det.imgsz, det.iou, line, mode="lines").plan((2560, 1440))) == 4
    assert len(RegionDetector(det.detect, det.imgsz, det.iou, line).plan((1600, 900))) == 2

"""Annotator draws where it should without touching the input; AnnotatedVideo writes a playable mp4."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from camera.annotate import AnnotatedVideo, Annotator, _track_color
from camera.filters import MaskSpec
from camera.tracker import Track
from camera.zones import LineSpec, ZoneSpec
from tests.conftest import INDOOR_CLIP


def track(track_id: int, box: tuple[float, float, float, float], visible: bool = True) -> Track:
    return Track(track_id=track_id, xyxy=np.array(box, np.float32), score=0.87, class_id=0, first_seen=0.0,
                 last_seen=1.0, hits=5, scores=[0.87], visible=visible, confirmed=True)


def test_draw_marks_boxes_geometry_and_leaves_input_untouched():
    img = np.zeros((360, 640, 3), np.uint8)
    ann = Annotator(
        zones=[ZoneSpec(name="door", points=[[0.6, 0.2], [0.95, 0.2], [0.95, 0.9], [0.6, 0.9]])],
        lines=[LineSpec(name="gate", points=[[0, 300], [640, 300]], in_side="right")],
        masks=[MaskSpec(name="tv", points=[[0, 0], [100, 0], [100, 60], [0, 60]])],
    )
    counts = {"people": 1, "zones": {"door": 0}, "lines": {"gate": {"in": 3, "out": 1}}}
    out = ann.draw(img, [track(7, (200, 100, 260, 250))], counts)
    assert out.shape == img.shape and out.dtype == np.uint8
    assert img.max() == 0  # input not modified
    color = np.array(_track_color(7))
    assert np.abs(out[175, 200].astype(int) - color).max() <= 2  # left edge of the box, mid-height
    assert np.abs(out[175, 230].astype(int)).max() == 0  # inside the box stays clear
    assert tuple(out[300, 320]) == (255, 0, 255) or tuple(out[301, 320]) == (255, 0, 255)  # the line
    assert out[30, 80].max() > 0  # the mask is shaded
    assert out[100:250, 384:608].max() > 0  # the zone outline


def test_coasting_tracks_are_grey():
    out = Annotator().draw(np.zeros((200, 200, 3), np.uint8), [track(1, (50, 50, 100, 150), visible=False)], {})
    assert tuple(out[100, 50]) == (160, 160, 160)


def test_annotated_video_is_playable_with_the_expected_frame_count(tmp_path):
    cap = cv2.VideoCapture(str(INDOOR_CLIP))
    assert cap.isOpened(), INDOOR_CLIP
    w, h = int(cap.get(cv2.CAP_PROP_FRAME_WIDTH)), int(cap.get(cv2.CAP_PROP_FRAME_HEIGHT))
    ann = Annotator(lines=[LineSpec(name="mid", points=[[0.5, 0], [0.5, 1]])])
    path = tmp_path / "out" / "annotated.mp4"
    with AnnotatedVideo(path, fps=10, size=(w, h)) as video:
        for i in range(25):
            ok, frame = cap.read()
            assert ok
            video.write(ann.draw(frame, [track(1, (10 + i, 20, 60 + i, 120))], {"people": 1}))
        video.write(np.zeros((h // 2, w // 2, 3), np.uint8))  # other size: resized, still written
    cap.release()
    assert video.frames == 26
    check = cv2.VideoCapture(str(path))
    assert check.isOpened()
    assert int(check.get(cv2.CAP_PROP_FRAME_COUNT)) == 26
    read = 0
    while True:
        ok, frame = check.read()
        if not ok:
            break
        assert frame.shape == (h, w, 3)
        read += 1
    check.release()
    assert read == 26


def test_annotated_video_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="bad video"):
        AnnotatedVideo(tmp_path / "x.mp4", fps=0, size=(10, 10))
    with pytest.raises(OSError, match="cannot write"):
        AnnotatedVideo(tmp_path / "x.nosuchcontainer", fps=10, size=(10, 10))

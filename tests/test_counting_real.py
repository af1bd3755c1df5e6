"""Counting on real footage against a hand count (tests/data/README.md), and zero on the negative clip.

Runs the real detector (the shared fp32 YOLOv8n ONNX) at 5 processed frames/s, then filters → Tracker →
EventBuilder exactly as the edge pipeline does, with the geometry of samples/zones_lines.yaml. The measured
counts and their error are reported in docs/counting.md; the assertions allow the error measured there
(people hidden by the pillar at the street's right edge, one walker whose track starts on the plaza line)
and fail on anything worse.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import pytest

from camera.annotate import AnnotatedVideo, Annotator
from camera.config import EdgeConfig, load_config
from camera.detector import Detector
from camera.events import EventBuilder
from camera.filters import apply_filters
from camera.tracker import Tracker
from camera.zones import LineSpec
from contract.schema import validate_event
from tests.conftest import NEGATIVE_CLIP, ONNX_FP32, PLAZA_CLIP, ROOT, STREET_CLIP

pytestmark = pytest.mark.slow

# Hand counts (tests/data/README.md): (in, out) for each line.
STREET_HAND = {"in": 1, "out": 10}
PLAZA_HAND = {"in": 6, "out": 7}
COUNT_FPS = float(os.environ.get("SMARTCAM_COUNT_FPS", "5"))  # processed frames per second of video
COUNT_MODEL = Path(os.environ.get("SMARTCAM_COUNT_MODEL", str(ONNX_FP32)))  # e.g. an INT8 build to compare
PLAZA_LINE = LineSpec(name="plaza", points=[[230, 240], [620, 240]], in_side="right")


@dataclass
class ClipRun:
    counts: dict
    events: list[dict] = field(default_factory=list)
    frames: int = 0


@pytest.fixture(scope="module")
def detector() -> Detector:
    if not COUNT_MODEL.is_file():
        pytest.fail(f"model missing: {COUNT_MODEL}")
    return Detector(COUNT_MODEL, conf=0.25, threads=2)


@pytest.fixture(scope="module")
def street_config() -> EdgeConfig:
    """The sample config, with paths made independent of the working directory."""
    return load_config(ROOT / "samples" / "zones_lines.yaml",
                       overrides={"source": str(STREET_CLIP), "model": str(COUNT_MODEL)})


def count_clip(path, cfg: EdgeConfig, detector: Detector, fps: float = COUNT_FPS, video=None) -> ClipRun:
    """Decode every frame, detect on ``fps`` of them per second of video, and count like the pipeline."""
    cap = cv2.VideoCapture(str(path))
    assert cap.isOpened(), path
    src_fps = cap.get(cv2.CAP_PROP_FPS) or 25.0
    step = max(1, round(src_fps / fps))
    tracker = Tracker(cfg.tracker)
    builder = EventBuilder(site="test", camera_id="cam", model_name=detector.name, model_sha256=detector.sha256,
                           zones=cfg.zones, lines=cfg.lines, track_threshold=cfg.filters.track_threshold)
    annotator = Annotator(cfg.zones, cfg.lines, cfg.masks)
    run = ClipRun(counts={})
    index, ts, size = 0, 0.0, (0, 0)
    while True:
        ok, image = cap.read()
        if not ok:
            break
        if index % step == 0:
            h, w = image.shape[:2]
            size, ts = (w, h), 1_700_000_000.0 + index / src_fps
            detections = apply_filters(detector.detect(image), cfg.filters, cfg.masks, w, h)
            update = tracker.update(detections, ts)
            run.events += builder.update(update, ts, w, h)
            run.frames += 1
            if video is not None:
                video.write(annotator.draw(image, update.active, builder.counts))
        index += 1
    cap.release()
    run.events += builder.update(tracker.flush(ts), ts, *size)
    run.counts = builder.counts
    for event in run.events:
        validate_event(event)
    return run


def check_consistency(run: ClipRun) -> None:
    """Every event stream invariant the sink relies on."""
    enters = [e["track_id"] for e in run.events if e["type"] == "person.enter"]
    exits = [e["track_id"] for e in run.events if e["type"] == "person.exit"]
    assert sorted(enters) == sorted(exits) and len(set(enters)) == len(enters)  # paired, once each
    crosses = [e for e in run.events if e["type"] == "line.cross"]
    for line, totals in run.counts["lines"].items():
        mine = [e for e in crosses if e["line"] == line]
        assert len(mine) == totals["in"] + totals["out"]
        if mine:
            assert mine[-1]["totals"] == totals
    assert run.counts["people"] == 0  # all flushed


def test_street_line_counts_match_the_hand_count(detector, street_config, artifacts_dir):
    video_path = artifacts_dir / "counting_street.mp4"
    with AnnotatedVideo(video_path, fps=COUNT_FPS, size=(1280, 720)) as video:
        run = count_clip(STREET_CLIP, street_config, detector, video=video)
    check_consistency(run)
    got = run.counts["lines"]["street"]
    print(f"street @ {COUNT_FPS} fps, {COUNT_MODEL.name}: hand {STREET_HAND}, smartcam {got}, {run.frames} frames")
    assert got["in"] == STREET_HAND["in"]
    assert STREET_HAND["out"] - 2 <= got["out"] <= STREET_HAND["out"]  # measured: 8 (two hidden by the pillar)
    # Zone events come in pairs per track, with dwell.
    zone_in = [e["track_id"] for e in run.events if e["type"] == "zone.enter"]
    zone_out = [e["track_id"] for e in run.events if e["type"] == "zone.exit"]
    assert zone_in and sorted(zone_in) == sorted(zone_out)
    # The annotated video plays back with one frame per processed frame.
    cap = cv2.VideoCapture(str(video_path))
    assert cap.isOpened() and int(cap.get(cv2.CAP_PROP_FRAME_COUNT)) == run.frames
    cap.release()


def test_plaza_line_counts_match_the_hand_count(detector, street_config):
    cfg = street_config.model_copy(update={"lines": [PLAZA_LINE], "zones": [], "masks": []})
    run = count_clip(PLAZA_CLIP, cfg, detector)
    check_consistency(run)
    got = run.counts["lines"]["plaza"]
    print(f"plaza @ {COUNT_FPS} fps, {COUNT_MODEL.name}: hand {PLAZA_HAND}, smartcam {got}, {run.frames} frames")
    assert abs(got["in"] - PLAZA_HAND["in"]) <= 1  # measured: 6 at 5 and at 12.5 fps
    assert abs(got["out"] - PLAZA_HAND["out"]) <= 1  # measured: 6 (one walker first seen on the line)


def test_negative_clip_has_no_crossings_and_no_person_at_all(detector, street_config):
    line = LineSpec(name="road", points=[[0, 0.5], [1, 0.5]])
    cfg = street_config.model_copy(update={"lines": [line], "zones": [], "masks": []})
    run = count_clip(NEGATIVE_CLIP, cfg, detector, fps=3.0)
    assert run.frames > 80
    assert run.counts["lines"]["road"] == {"in": 0, "out": 0}
    assert run.events == []

"""EventBuilder: contract-valid events for enter/exit/count, zones, loitering, thresholds."""

from __future__ import annotations

import numpy as np
import pytest

from camera.detections import Detections
from camera.events import EventBuilder
from camera.tracker import Tracker, TrackerSpec
from camera.zones import ZoneSpec
from contract.schema import validate_event
from contract.timestamps import parse_ts

W, H = 640, 480
SHA = "0123456789abcdef" * 4


def builder(**kw) -> EventBuilder:
    return EventBuilder(site="shop", camera_id="cam-1", model_name="yolov8n-int8", model_sha256=SHA, **kw)


def run(frames: list[list[tuple]], b: EventBuilder, spec: TrackerSpec | None = None, fps: float = 10.0):
    """Drive a real Tracker + EventBuilder over per-frame (x1, y1, x2, y2, score) boxes; flush at the end."""
    tr = Tracker(spec or TrackerSpec(min_hits=2, max_age_s=0.5))
    events: list[dict] = []
    ts = 1_700_000_000.0
    for i, boxes in enumerate(frames):
        ts = 1_700_000_000.0 + i / fps
        arr = np.array(boxes, np.float32).reshape(-1, 5)
        d = Detections(arr[:, :4], arr[:, 4], np.zeros(len(arr), np.int32))
        events += b.update(tr.update(d, ts), ts, W, H)
    events += b.update(tr.flush(ts + 1 / fps), ts + 1 / fps, W, H)
    for e in events:
        validate_event(e)
    return events


def types(events: list[dict]) -> list[str]:
    return [e["type"] for e in events]


def test_enter_count_exit_sequence_is_schema_valid():
    frames = [[(100 + 5 * i, 100, 160 + 5 * i, 300, 0.8)] for i in range(20)]
    events = run(frames, builder())
    assert types(events) == ["person.enter", "count", "person.exit", "count"]
    enter, count_up, exit_, count_down = events
    assert enter["track_id"] == exit_["track_id"] == 1
    assert (count_up["count"], count_up["previous"]) == (1, 0)
    assert (count_down["count"], count_down["previous"]) == (0, 1)
    assert exit_["dwell_s"] == pytest.approx(1.9, abs=0.01)
    assert exit_["first_seen"] == enter["first_seen"]
    assert exit_["score_max"] == pytest.approx(0.8) and exit_["score_mean"] == pytest.approx(0.8)
    assert all(0 <= v <= 1 for v in exit_["box"])
    assert enter["model"] == {"name": "yolov8n-int8", "sha256": SHA[:12]}
    assert enter["frame"] == {"width": W, "height": H}
    assert len({e["event_id"] for e in events}) == 4
    assert parse_ts(count_up["ts"]) <= parse_ts(count_down["ts"])


def test_representative_box_is_the_best_scored_one_and_box_is_clipped():
    frames = [[(600, 100, 700, 300, 0.95 if i == 4 else 0.7)] for i in range(8)]  # box runs off the right edge
    events = run(frames, builder())
    exit_ = next(e for e in events if e["type"] == "person.exit")
    assert exit_["score_max"] == pytest.approx(0.95)
    assert exit_["box"][2] == 1.0 and exit_["box"][0] == pytest.approx(600 / W, abs=0.01)


def test_track_below_threshold_produces_no_event_at_all():
    frames = [[(100, 100, 160, 300, 0.62)] for _ in range(20)]  # confirmed by the tracker, but weak
    assert run(frames, builder(track_threshold=0.7)) == []
    assert types(run(frames, builder(track_threshold=0.6)))[:2] == ["person.enter", "count"]


def test_track_passing_threshold_late_enters_late():
    frames = [[(100, 100, 160, 300, 0.55 if i < 10 else 0.9)] for i in range(30)]
    spec = TrackerSpec(min_hits=2, max_age_s=0.5, new_track_score=0.5)
    events = run(frames, builder(track_threshold=0.7), spec=spec)
    enter = events[0]
    assert enter["type"] == "person.enter"
    assert parse_ts(enter["ts"]) - parse_ts(enter["first_seen"]) > 1.0  # median reached 0.7 only after ~1 s


def test_two_people_count_goes_up_and_down():
    frames = []
    for i in range(40):
        boxes = [(100, 100, 160, 300, 0.9)]
        if 10 <= i < 25:
            boxes.append((400, 100, 460, 300, 0.9))
        frames.append(boxes)
    counts = [(e["count"], e["previous"]) for e in run(frames, builder()) if e["type"] == "count"]
    assert counts == [(1, 0), (2, 1), (1, 2), (0, 1)]


def test_zone_enter_exit_dwell_and_occupancy():
    zone = ZoneSpec(name="door", points=[[0.5, 0], [1, 0], [1, 1], [0.5, 1]])  # right half, normalized
    # Walks right at 10 px/frame, turns round and walks back left: 39 frames with the anchor in the right half.
    xs = list(range(80, 480, 10)) + list(range(480, 180, -10))
    frames = [[(x, 100, x + 60, 300, 0.9)] for x in xs]
    events = run(frames, builder(zones=[zone]))
    zone_events = [e for e in events if e.get("zone") == "door"]
    assert [e["type"] for e in zone_events] == ["zone.enter", "count", "zone.exit", "count"]
    enter, up, exit_, down = zone_events
    assert (up["count"], down["count"]) == (1, 0)
    # inside while x + 30 >= 320: 19 frames out, 20 frames back = 3.9 s at 10 fps
    assert exit_["dwell_s"] == pytest.approx(3.9, abs=0.25)
    assert enter["track_id"] == exit_["track_id"]


def test_zone_inertia_ignores_a_brief_visit_and_exit_on_track_end():
    zone = ZoneSpec(name="till", points=[[300, 0], [640, 0], [640, 480], [300, 480]], min_inside_s=0.5)
    brief = [[(250 + (60 if 10 <= i < 13 else 0), 100, 310 + (60 if 10 <= i < 13 else 0), 300, 0.9)]
             for i in range(30)]  # anchor inside for 0.3 s only
    assert [e for e in run(brief, builder(zones=[zone])) if e.get("zone")] == []
    stay = [[(250, 100, 310, 300, 0.9)]] * 5 + [[(350, 100, 410, 300, 0.9)]] * 20  # stays inside till the end
    zone_events = [e for e in run(stay, builder(zones=[zone])) if e.get("zone")]
    assert [e["type"] for e in zone_events] == ["zone.enter", "count", "zone.exit", "count"]
    assert zone_events[2]["dwell_s"] == pytest.approx(1.9, abs=0.11)  # from first inside frame to last seen


def test_loiter_once_per_track_and_zone():
    zone = ZoneSpec(name="atm", points=[[0, 0], [640, 0], [640, 480], [0, 480]], loiter_s=1.0)
    frames = [[(100, 100, 160, 300, 0.9)] for _ in range(40)]
    loiters = [e for e in run(frames, builder(zones=[zone])) if e["type"] == "loiter"]
    assert len(loiters) == 1 and loiters[0]["dwell_s"] == pytest.approx(1.0, abs=0.11)


def test_constructor_rejects_bad_names_and_hash():
    with pytest.raises(ValueError, match="site"):
        EventBuilder(site="a/b", camera_id="c", model_name="m", model_sha256=SHA)
    with pytest.raises(ValueError, match="sha256"):
        EventBuilder(site="a", camera_id="c", model_name="m", model_sha256="xyz")
    with pytest.raises(ValueError, match="unique"):
        builder(zones=[ZoneSpec(name="z", points=[[0, 0], [1, 0], [1, 1]])] * 2)


def test_counts_property_tracks_state():
    b = builder(zones=[ZoneSpec(name="all", points=[[0, 0], [1, 0], [1, 1], [0, 1]])])
    tr = Tracker(TrackerSpec(min_hits=1))
    d = Detections(np.array([[10, 10, 50, 100]], np.float32), np.array([0.9], np.float32), np.zeros(1, np.int32))
    b.update(tr.update(d, 0.0), 0.0, W, H)
    assert b.counts == {"people": 1, "zones": {"all": 1}, "lines": {}}
    b.update(tr.flush(0.1), 0.1, W, H)
    assert b.counts["people"] == 0 and b.counts["zones"] == {"all": 0}

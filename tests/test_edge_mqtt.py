"""The edge end to end on real footage, a real model and a real Mosquitto: what a subscriber receives."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from collections import Counter
from datetime import datetime, timedelta, timezone
from pathlib import Path

import cv2
import pytest

from contract.schema import validate_event, validate_stats
from contract.topics import topic_for
from tests.conftest import INDOOR_CLIP, NEGATIVE_CLIP, ONNX_FP32, PERSONS_EVAL, ROOT
from tests.services import CAM, SITE, HttpServer, Subscriber, read_events, retained, run_edge


def model_path() -> Path:
    """The shared fp32 ONNX that issue 2's integration test names (fault tests use the INT8 320 fixture)."""
    return ONNX_FP32


@pytest.mark.slow
def test_indoor_clip_events_reach_a_subscriber(mosquitto, tmp_path):
    events_file = tmp_path / "events.jsonl"
    cfg = tmp_path / "edge.yaml"
    cfg.write_text("zones:\n  - name: room\n    points: [[0, 0], [1, 0], [1, 1], [0, 1]]\n")
    sub = Subscriber(mosquitto.port)
    try:
        proc = run_edge("--config", str(cfg), "--source", str(INDOOR_CLIP), "--model", str(model_path()),
                        "--camera-id", CAM, "--site", SITE, "--broker", mosquitto.url, "--fps", "3",
                        "--max-frames", "90", "--events-file", str(events_file), "--outbox", str(tmp_path / "o.db"),
                        "--stats-interval", "1")
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert "outbox drained" in proc.stderr
        # the square 640x640 model letterboxes this 500x280 clip: the edge says which input shape fits it
        assert "model input 640x640 is 44 % padding for this 500x280 source: a 384x640 model" in proc.stderr
        written = read_events(events_file)
        assert sub.wait_for(lambda: len(sub.events()) >= len(written))
        received = sub.events()
    finally:
        sub.close()

    # every event is schema-valid and what the edge wrote is what arrived, in order
    for ev in received:
        validate_event(ev)
    assert [e["event_id"] for e in received] == [e["event_id"] for e in written]
    types = Counter(e["type"] for e in received)
    assert types["person.enter"] >= 2, types  # two people in the clip
    # enter/exit paired per track (the end of the run closes every open track)
    enters = Counter(e["track_id"] for e in received if e["type"] == "person.enter")
    exits = Counter(e["track_id"] for e in received if e["type"] == "person.exit")
    assert enters == exits and set(enters.values()) == {1}
    assert all(e["site"] == SITE and e["camera_id"] == CAM for e in received)

    # retained summaries: the latest count (0 after the final flush), the zone occupancy, status offline
    counts = [e for e in received if e["type"] == "count" and "zone" not in e]
    assert counts and counts[-1]["count"] == 0
    assert json.loads(retained(mosquitto.port, "count"))["event_id"] == counts[-1]["event_id"]
    zone_counts = [e for e in received if e["type"] == "count" and e.get("zone") == "room"]
    assert zone_counts and max(e["count"] for e in zone_counts) >= 1
    assert json.loads(retained(mosquitto.port, "zones/room/count"))["event_id"] == zone_counts[-1]["event_id"]
    assert retained(mosquitto.port, "status") == b"offline"
    assert sub.payloads("status")[0] == b"online"

    # runtime stats: valid stats.v1, frames counted
    stats = [json.loads(p) for p in sub.payloads("stats")]
    assert stats
    for s in stats:
        validate_stats(s)
    assert stats[-1]["frames_processed"] == 90 and stats[-1]["source_state"] == "ended"
    assert stats[-1]["dropped_frames"] > 0  # --fps 3 on a 30 fps clip skips frames, counted
    assert stats[-1]["outbox_dead_letters"] == 0 and stats[-1]["publisher_restarts"] == 0  # never silent


@pytest.mark.slow
def test_negative_clip_produces_no_person_event(mosquitto, tmp_path):
    events_file = tmp_path / "events.jsonl"
    sub = Subscriber(mosquitto.port)
    try:
        proc = run_edge("--source", str(NEGATIVE_CLIP), "--model", str(model_path()), "--camera-id", CAM,
                        "--site", SITE, "--broker", mosquitto.url, "--fps", "3",
                        "--events-file", str(events_file), "--outbox", str(tmp_path / "o.db"))
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert sub.wait_for(lambda: b"offline" in sub.payloads("status"))
        assert read_events(events_file) == []
        assert sub.events() == []
        processed = int(re.search(r"(\d+) frames processed", proc.stderr).group(1))
        assert processed == 85  # the whole clip (1699 frames at 60 fps, 28.3 s) looked at 3 times a second
    finally:
        sub.close()


@pytest.mark.slow
def test_offline_mode_prints_valid_events_to_stdout_as_of_start_time():
    proc = run_edge("--source", str(INDOOR_CLIP), "--model", str(model_path()), "--camera-id", CAM,
                    "--fps", "3", "--max-frames", "20", "--start-time", "2024-05-01T08:00:00Z")
    assert proc.returncode == 0, proc.stderr[-3000:]
    events = [json.loads(line) for line in proc.stdout.splitlines()]
    assert any(e["type"] == "person.enter" for e in events)
    for ev in events:
        validate_event(ev)
    # replayed footage is stamped as of --start-time + position in the file (20 frames at 3 fps < 7 s)
    assert all("2024-05-01T08:00:00.000Z" <= e["ts"] < "2024-05-01T08:00:07.000Z" for e in events)


@pytest.mark.slow
def test_live_http_stream_with_motion_gate(tmp_path):
    """A live source (HTTP URL): the motion gate is on by default, frames are timestamped with wall time."""
    (tmp_path / "www").mkdir()
    clip = tmp_path / "www" / "cam.avi"
    cap, writer = cv2.VideoCapture(str(INDOOR_CLIP)), None
    for _ in range(60):
        ok, img = cap.read()
        assert ok
        if writer is None:
            writer = cv2.VideoWriter(str(clip), cv2.VideoWriter_fourcc(*"MJPG"), 30, img.shape[1::-1])
        writer.write(img)
    cap.release()
    writer.release()
    server = HttpServer(tmp_path / "www")
    try:
        before = time.time()
        proc = run_edge("--source", f"http://127.0.0.1:{server.port}/cam.avi", "--model", str(model_path()),
                        "--camera-id", CAM, "--max-frames", "25", "--events-file", str(tmp_path / "e.jsonl"))
    finally:
        server.stop()
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "motion gate on" in proc.stderr and "(stream)" in proc.stderr
    events = read_events(tmp_path / "e.jsonl")
    assert any(e["type"] == "person.enter" for e in events)
    from contract.timestamps import parse_ts

    assert all(parse_ts(e["ts"]) >= before - 1 for e in events)


@pytest.mark.slow
def test_save_video_writes_annotated_frames(tmp_path):
    out = tmp_path / "out.mp4"
    proc = run_edge("--source", str(INDOOR_CLIP), "--model", str(model_path()), "--camera-id", CAM,
                    "--fps", "5", "--max-frames", "12", "--events-file", str(tmp_path / "e.jsonl"),
                    "--save-video", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    cap = cv2.VideoCapture(str(out))
    assert cap.isOpened()
    assert int(cap.get(cv2.CAP_PROP_FRAME_COUNT)) == 12
    assert (int(cap.get(cv2.CAP_PROP_FRAME_WIDTH)), int(cap.get(cv2.CAP_PROP_FRAME_HEIGHT))) == (500, 280)
    cap.release()


@pytest.mark.slow
def test_detect_command_prints_boxes_as_json():
    labels = json.loads((PERSONS_EVAL / "labels.json").read_text())
    image = PERSONS_EVAL / labels[0]["image"]
    proc = subprocess.run([sys.executable, "-m", "camera", "detect", "--model", str(model_path()), "--json",
                           str(image)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result[0]["image"] == str(image)
    dets = result[0]["detections"]
    assert dets and all(d["class"] == "person" and 0 < d["score"] <= 1 for d in dets)
    for d in dets:
        x1, y1, x2, y2 = d["box"]
        assert 0 <= x1 < x2 <= labels[0]["width"] and 0 <= y1 < y2 <= labels[0]["height"]


@pytest.mark.parametrize(("args", "message"), [
    (["--source", "/nonexistent.mp4", "--model", str(ONNX_FP32), "--camera-id", CAM], "source not found"),
    (["--source", str(NEGATIVE_CLIP), "--model", "/nonexistent.onnx", "--camera-id", CAM], "model file not found"),
    (["--source", str(NEGATIVE_CLIP), "--model", str(ONNX_FP32), "--camera-id", CAM, "--broker", "tcp://x"],
     "scheme must be mqtt:// or mqtts://"),
])
def test_bad_input_is_a_clear_error_and_exit_2(args, message):
    proc = run_edge(*args, timeout=120)
    assert proc.returncode == 2
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr


# /proc/self/mem is a regular file that fails every read at offset 0 (EIO): unreadable even for root, which
# ignores a chmod 000 (CI runs as root).
@pytest.mark.parametrize(("model", "message"), [
    ("/proc/self/mem", "cannot read model file /proc/self/mem"),
    (str(INDOOR_CLIP), "cannot load model"),
])
def test_a_model_that_cannot_be_used_is_reported_as_such_with_exit_4(model, message):
    """An unreadable model said "cannot write" and exited 3, the outbox's code (issue 12). A missing one is a
    configuration error (exit 2, above)."""
    proc = run_edge("--source", str(NEGATIVE_CLIP), "--model", model, "--camera-id", CAM, timeout=120)
    assert proc.returncode == 4, proc.stderr[-2000:]
    assert message in proc.stderr and "cannot write" not in proc.stderr
    assert "Traceback" not in proc.stderr


def test_a_start_time_older_than_the_sink_accepts_is_warned_about_at_start(tmp_path):
    """--start-time 2020-01-01 made the edge report success while the sink dead-letters every event as too old."""
    proc = run_edge("--source", str(NEGATIVE_CLIP), "--model", str(ONNX_FP32), "--camera-id", CAM,
                    "--start-time", "2020-01-01T00:00:00Z", "--max-frames", "2", "--events-file",
                    str(tmp_path / "e.jsonl"), timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    warning = next((line for line in proc.stderr.splitlines() if "--start-time" in line and "WARNING" in line), "")
    assert "days ago" in warning and "400 days" in warning and "max_past_days" in warning, proc.stderr[-2000:]
    ten_days_ago = (datetime.now(timezone.utc) - timedelta(days=10)).strftime("%Y-%m-%dT%H:%M:%SZ")
    recent = run_edge("--source", str(NEGATIVE_CLIP), "--model", str(ONNX_FP32), "--camera-id", CAM,
                      "--start-time", ten_days_ago, "--max-frames", "1", "--events-file",
                      str(tmp_path / "e2.jsonl"), timeout=120)
    assert recent.returncode == 0 and "days ago" not in recent.stderr, recent.stderr[-2000:]


def test_topics_for_event_routes_retained_summaries():
    from contract.topics import topics_for_event

    base = topic_for(SITE, CAM, "")
    assert topics_for_event(SITE, CAM, {"type": "person.enter"}) == [(base + "events", 1, False)]
    assert topics_for_event(SITE, CAM, {"type": "count"})[1] == (base + "count", 1, True)
    assert topics_for_event(SITE, CAM, {"type": "count", "zone": "door"})[1] == (base + "zones/door/count", 1, True)
    assert topics_for_event(SITE, CAM, {"type": "line.cross", "line": "gate"})[1] == (
        base + "lines/gate/totals", 1, True)


@pytest.mark.slow
def test_publisher_drains_a_backlog_in_order_with_a_small_window(mosquitto, tmp_path):
    from camera.outbox import Outbox
    from camera.publisher import Publisher
    from contract.broker import BrokerSettings

    box = Outbox(tmp_path / "o.db")
    topic = topic_for(SITE, CAM, "events")
    box.put_many([(topic, f"m{i:04d}", 1, False) for i in range(500)])
    sub = Subscriber(mosquitto.port)
    pub = Publisher(BrokerSettings.from_url(mosquitto.url), box, site=SITE, camera_id=CAM, window=20)
    try:
        pub.start()
        assert pub.wait_drained(60) == 0
        assert sub.wait_for(lambda: len(sub.payloads("events")) >= 500)
        assert sub.payloads("events") == [f"m{i:04d}".encode() for i in range(500)]
        assert pub.published == 500 and box.depth() == 0
    finally:
        pub.stop()
        box.close()
    assert sub.wait_for(lambda: sub.payloads("status")[-1:] == [b"offline"], 10)
    sub.close()

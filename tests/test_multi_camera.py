"""Many cameras in one edge process (camera/site_runner.py), on the real detector and a real Mosquitto.

* three clips as three cameras: each camera's events are the ones it makes alone, on its own topics, and every
  events-file line reaches the broker once;
* overload: six cameras asking for more than the CPU can do all get a fair share, and count their drops;
* one camera's stream dies and comes back: its status says so, the other camera carries on untouched;
* ``kill -9``: every camera's outbox replays on the next start.
"""

from __future__ import annotations

import json
import signal
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
import yaml

from cloud_sink.ingest import Ingestor
from contract.batch import decode_batch
from contract.topics import node_document, topic_for
from tests.conftest import (
    INDOOR_CLIP,
    NEGATIVE_CLIP,
    PLAZA_CLIP,
    STREET_CLIP,
    Proc,
    events_file_ids,
    wait_until,
)
from tests.services import MjpegServer, Subscriber, clip_jpegs, free_port, start_mosquitto

SITE = "shop"
NODE = "edge-test"
MIDLINE = [{"name": "mid", "points": [[0.5, 0.0], [0.5, 1.0]]}]


def write_site(tmp: Path, model: Path, cameras: list[dict], **shared) -> Path:
    data = {"site": SITE, "node_id": NODE, "model": str(model), "lines": MIDLINE,
            "events_file": str(tmp / "events" / "{camera_id}.jsonl"), "outbox": {"dir": str(tmp / "state")},
            "drain_timeout_s": 20, **shared, "cameras": cameras}
    path = tmp / "site.yaml"
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    return path


def edge(tmp: Path, config: Path, *args: str, name: str = "edge") -> Proc:
    return Proc([sys.executable, "-m", "camera", "run", "--config", str(config), *args], tmp / f"{name}.log",
                env={"PATH": "/usr/bin:/bin", "XDG_STATE_HOME": str(tmp / "xdg"), "PYTHONUNBUFFERED": "1"}).start()


def camera_events(sub: Subscriber, camera: str) -> list[dict]:
    """Every event the broker delivered on this camera's events/batch topics, in arrival order."""
    out = []
    for topic, payload, _ in list(sub.messages):
        if topic == topic_for(SITE, camera, "events"):
            out.append(json.loads(payload))
        elif topic == topic_for(SITE, camera, "batch"):
            out += [json.loads(line) for line in decode_batch(payload, 8 << 20)]
    return out


def signature(events: list[dict]) -> Counter:
    """What a camera saw, independent of wall-clock times and random ids: type, track, zone/line, direction."""
    return Counter((e["type"], e.get("track_id"), e.get("zone"), e.get("line"), e.get("direction"), e.get("count"))
                   for e in events)


def read_events(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def edge_connections(broker) -> int:
    return broker.log_path.read_text().count(" as smartcam-edge-")


def stats_of(sub: Subscriber, camera: str) -> list[dict]:
    return [json.loads(p) for t, p, _ in list(sub.messages) if t == topic_for(SITE, camera, "stats")]


def statuses_of(sub: Subscriber, camera: str) -> list[str]:
    return [p.decode() for t, p, _ in list(sub.messages) if t == topic_for(SITE, camera, "status")]


# ------------------------------------------------------------------------------------------------ the sink side


def test_the_process_will_marks_every_listed_camera_offline_in_the_sink(store):
    """One connection has one Last Will: the node document speaks for all of the process's cameras."""
    ing = Ingestor(store)
    online = [(topic_for(SITE, cam, "status"), b"online") for cam in ("door", "till")]
    ing.handle(online)
    assert {c["camera_id"]: c["state"] for c in store.cameras()} == {"door": "online", "till": "online"}
    result = ing.handle([(topic_for(SITE, NODE, "node"),
                          node_document(SITE, NODE, "offline", ["door", "till"]).encode())])
    assert result.node == 1 and result.dead == 0
    assert {c["camera_id"]: c["state"] for c in store.cameras()} == {"door": "offline", "till": "offline"}
    assert NODE not in {c["camera_id"] for c in store.cameras()}, "the process is not a camera"
    wrong = ing.handle([(topic_for("other", NODE, "node"), node_document(SITE, NODE, "offline", ["door"]).encode())])
    assert wrong.dead == 1, "a node document on another site's topic is refused"


# ------------------------------------------------------------------------------------------------ three clips


@pytest.mark.slow
def test_three_clips_as_three_cameras_match_each_camera_alone(int8_model_320, mosquitto, tmp_path):
    cams = [{"camera_id": "street", "source": str(STREET_CLIP), "max_frames": 90},
            {"camera_id": "plaza", "source": str(PLAZA_CLIP), "max_frames": 90},
            {"camera_id": "indoor", "source": str(INDOOR_CLIP), "max_frames": 200}]
    alone_dir, together_dir = tmp_path / "alone", tmp_path / "together"
    for d in (alone_dir, together_dir):
        d.mkdir()
    sub = Subscriber(mosquitto.port, "watch")
    try:
        together_cfg = write_site(together_dir, int8_model_320, cams, mqtt={"broker": mosquitto.url})
        proc = edge(together_dir, together_cfg)
        assert proc.wait(240) == 0, proc.output()[-3000:]
        assert edge_connections(mosquitto) == 1, "one process, one MQTT connection"
        assert f"as smartcam-edge-{SITE}-{NODE}" in mosquitto.log_path.read_text()
        wait_until(lambda: all(len(camera_events(sub, c["camera_id"])) >= len(read_events(
            together_dir / "events" / f"{c['camera_id']}.jsonl")) for c in cams), 30, "the broker's copies")
        together = {c["camera_id"]: read_events(together_dir / "events" / f"{c['camera_id']}.jsonl") for c in cams}
        broker = {c["camera_id"]: camera_events(sub, c["camera_id"]) for c in cams}
    finally:
        sub.close()
    alone_cfg = write_site(alone_dir, int8_model_320, cams)  # offline: the reference is what each camera makes
    for c in cams:
        proc = edge(alone_dir, alone_cfg, "--camera", c["camera_id"], name=c["camera_id"])
        assert proc.wait(240) == 0, proc.output()[-3000:]
    report = []
    for c in cams:
        cam = c["camera_id"]
        alone = read_events(alone_dir / "events" / f"{cam}.jsonl")
        mine = together[cam]
        assert alone and mine, f"{cam}: no events"
        assert signature(mine) == signature(alone), f"{cam}: the events differ from the camera running alone"
        lines = lambda evs: [e["totals"] for e in evs if e["type"] == "line.cross"][-1:]  # noqa: E731
        assert lines(mine) == lines(alone)
        assert {e["camera_id"] for e in mine} == {cam} and {e["camera_id"] for e in broker[cam]} == {cam}
        ids, got = [e["event_id"] for e in mine], [e["event_id"] for e in broker[cam]]
        assert len(got) == len(set(got)), f"{cam}: duplicates on the broker"
        assert set(got) == set(ids), f"{cam}: {len(set(ids) - set(got))} lost, {len(set(got) - set(ids))} extra"
        report.append(f"{cam} {len(mine)} events, {len({e.get('track_id') for e in mine})} tracks")
    print("\nMULTI three cameras: " + "; ".join(report) + "; 0 lost, 0 duplicated, 1 connection")


# ------------------------------------------------------------------------------------------------ overload


@pytest.mark.slow
def test_six_cameras_beyond_the_cpu_each_get_a_fair_share_and_count_their_drops(int8_model_320, mosquitto,
                                                                                tmp_path):
    clips = []
    for i, clip in enumerate([INDOOR_CLIP, NEGATIVE_CLIP] * 3):  # six cameras, six sources (links to two clips)
        clips.append(tmp_path / f"cam{i}{clip.suffix}")
        clips[-1].symlink_to(clip)
    cams = [{"camera_id": f"cam{i}", "source": str(clip), "realtime": True, "loop": 0} for i, clip in
            enumerate(clips)]
    # one inference stream of one thread: far fewer inferences per second than six 30-60 fps cameras ask for
    cfg = write_site(tmp_path, int8_model_320, cams, lines=[], detector={"streams": 1, "threads": 1},
                     mqtt={"broker": mosquitto.url, "stats_interval_s": 1.0})
    sub = Subscriber(mosquitto.port, "watch")
    try:
        proc = edge(tmp_path, cfg)
        wait_until(lambda: all(any(s["frames_processed"] > 0 for s in stats_of(sub, c["camera_id"])) for c in cams),
                   90, "every camera processing", proc.proc, proc.log)
        start = {c["camera_id"]: stats_of(sub, c["camera_id"])[-1] for c in cams}
        time.sleep(10)
        end = {c["camera_id"]: stats_of(sub, c["camera_id"])[-1] for c in cams}
        proc.kill(signal.SIGTERM)
        assert proc.proc.returncode == 0, proc.output()[-3000:]
    finally:
        sub.close()
    processed = {cam: end[cam]["frames_processed"] - start[cam]["frames_processed"] for cam in end}
    dropped = {cam: end[cam]["dropped_frames"] - start[cam]["dropped_frames"] for cam in end}
    print(f"\nMULTI overload (6 cameras, 1 stream): processed in 10 s {processed}, dropped {dropped}")
    assert all(n > 0 for n in processed.values()), f"a camera starved: {processed}"
    assert all(n > 0 for n in dropped.values()), f"not overloaded, or drops not counted: {dropped}"
    # equal weights: every camera within 30 % of the mean share (stride scheduling gives each its turn)
    mean = sum(processed.values()) / len(processed)
    assert max(abs(n - mean) for n in processed.values()) <= 0.3 * mean, processed


# ------------------------------------------------------------------------------------------------ a source dies


@pytest.mark.slow
def test_one_camera_stream_dying_leaves_the_other_untouched(int8_model_320, mosquitto, tmp_path):
    stream = MjpegServer(clip_jpegs(STREET_CLIP), fps=8)
    stream.start()
    cams = [{"camera_id": "live", "source": stream.url, "fps": 5, "motion": {"enabled": False}},
            {"camera_id": "file", "source": str(INDOOR_CLIP), "realtime": True, "loop": 0, "fps": 5}]
    cfg = write_site(tmp_path, int8_model_320, cams, lines=[], mqtt={"broker": mosquitto.url,
                                                                     "stats_interval_s": 0.5})
    sub = Subscriber(mosquitto.port, "watch")
    try:
        proc = edge(tmp_path, cfg)
        wait_until(lambda: all(any(s["frames_processed"] > 0 for s in stats_of(sub, c)) for c in ("live", "file")),
                   90, "both cameras processing", proc.proc, proc.log)
        stream.stop()
        wait_until(lambda: "offline" in statuses_of(sub, "live"), 30, "the live camera's status offline",
                   proc.proc, proc.log)
        before = stats_of(sub, "file")[-1]["frames_processed"]
        time.sleep(4)
        during = stats_of(sub, "file")[-1]["frames_processed"]
        assert proc.alive()
        stream.start()
        wait_until(lambda: statuses_of(sub, "live")[-1] == "online" and stats_of(sub, "live")[-1].get(
            "reconnects", 0) >= 1, 60, "the live camera back online", proc.proc, proc.log)
        proc.kill(signal.SIGTERM)
        assert proc.proc.returncode == 0, proc.output()[-3000:]
        file_ids = events_file_ids(tmp_path / "events" / "file.jsonl")
        wait_until(lambda: {e["event_id"] for e in camera_events(sub, "file")} >= set(file_ids), 20, "file events")
        file_statuses = statuses_of(sub, "file")
        live_statuses = statuses_of(sub, "live")
        broker_ids = [e["event_id"] for e in camera_events(sub, "file")]
    finally:
        sub.close()
        stream.stop()
    print(f"\nMULTI source death: live statuses {live_statuses}, file statuses {file_statuses}, file frames during "
          f"the outage {during - before} in 4 s, file events {len(file_ids)}")
    assert live_statuses[0] == "online" and "offline" in live_statuses[1:-1] and live_statuses[-1] == "offline"
    back = live_statuses.index("offline")
    assert "online" in live_statuses[back:-1], "the live camera's status never came back"
    assert file_statuses == ["online", "offline"], "the other camera's status must not move"
    assert during - before >= 10, "the other camera stalled while the stream was down"
    assert sorted(broker_ids) == sorted(set(file_ids)), "the other camera lost or duplicated events"


# ------------------------------------------------------------------------------------------------ kill -9


@pytest.mark.slow
def test_kill_9_every_camera_outbox_replays_on_restart(int8_model_320, tmp_path):
    port = free_port()  # no broker yet: every camera queues in its own outbox
    cams = [{"camera_id": "street", "source": str(STREET_CLIP)},
            {"camera_id": "plaza", "source": str(PLAZA_CLIP)},
            {"camera_id": "indoor", "source": str(INDOOR_CLIP)}]
    cfg = write_site(tmp_path, int8_model_320, cams, mqtt={"broker": f"mqtt://127.0.0.1:{port}"})
    proc = edge(tmp_path, cfg, name="first")
    events = {c["camera_id"]: tmp_path / "events" / f"{c['camera_id']}.jsonl" for c in cams}
    wait_until(lambda: all(len(events_file_ids(p)) >= 5 for p in events.values()), 120,
               "events from every camera", proc.proc, proc.log)
    proc.kill(signal.SIGKILL)
    before = {cam: events_file_ids(p) for cam, p in events.items()}
    broker = start_mosquitto(tmp_path / "mosquitto", port=port)
    sub = Subscriber(broker.port, "watch")
    try:
        again = edge(tmp_path, cfg, "--max-frames", "2", name="second")
        assert again.wait(120) == 0, again.output()[-3000:]
        wait_until(lambda: all(set(ids) <= {e["event_id"] for e in camera_events(sub, cam)}
                               for cam, ids in before.items()), 30, "every camera's replay")
        got = {cam: [e["event_id"] for e in camera_events(sub, cam)] for cam in before}
        # and the process's Last Will: a kill -9 of a running process says every camera offline at once
        node = topic_for(SITE, NODE, "node")
        start = len(sub.messages)
        third = edge(tmp_path, cfg, name="third")
        wait_until(lambda: any(t == node and json.loads(p)["state"] == "online" for t, p, _ in sub.messages[start:]),
                   60, "the node online", third.proc, third.log)
        seen = len(sub.messages)
        third.kill(signal.SIGKILL)
        wait_until(lambda: any(t == node for t, _, _ in sub.messages[seen:]), 30, "the Last Will")
        will = [json.loads(p) for t, p, _ in sub.messages[seen:] if t == node][0]
    finally:
        sub.close()
        broker.stop()
    assert will["state"] == "offline" and will["cameras"] == [c["camera_id"] for c in cams], will
    print(f"\nMULTI kill -9: queued before the kill {({c: len(v) for c, v in before.items()})}, replayed "
          f"{({c: len(set(v) & set(before[c])) for c, v in got.items()})}")
    for cam, ids in before.items():
        assert set(ids) <= set(got[cam]), f"{cam}: {len(set(ids) - set(got[cam]))} events lost"
        assert len(got[cam]) == len(set(got[cam])), f"{cam}: duplicates"


# ------------------------------------------------------------------------------------------------ one connection


def test_every_camera_hears_a_topic_they_share_and_ha_needs_both_availabilities(mosquitto):
    """paho keeps one callback per topic filter; the shared connection fans a filter out to every camera that
    wants it (the site-wide desired model, Home Assistant's birth message)."""
    import paho.mqtt.client as mqtt

    from camera.homeassistant import discovery_documents
    from camera.mqtt_connection import MqttConnection
    from contract.broker import BrokerSettings

    conn = MqttConnection(BrokerSettings.from_url(mosquitto.url), "fanout", will=("smartcam/shop/n/node", "x"))
    heard: list[tuple[str, bytes]] = []
    conn.route("homeassistant/status", lambda t, p: heard.append(("door", p)))
    conn.route("homeassistant/status", lambda t, p: heard.append(("till", p)))
    conn.connect_hooks.append(lambda client: client.subscribe("homeassistant/status", qos=1))
    conn.start()
    try:
        wait_until(conn.connected.is_set, 10, "the connection")
        time.sleep(0.3)  # the subscription
        pub = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="ha")
        pub.connect("127.0.0.1", mosquitto.port)
        pub.loop_start()
        pub.publish("homeassistant/status", b"online", qos=1).wait_for_publish(5)
        wait_until(lambda: len(heard) >= 2, 10, "both cameras hearing the birth message")
        pub.loop_stop()
        pub.disconnect()
    finally:
        conn.stop()
    assert sorted(heard) == [("door", b"online"), ("till", b"online")]
    docs = discovery_documents(site=SITE, camera_id="door", availability=[(topic_for(SITE, NODE, "node"),
                                                                           "{{ value_json.state }}")])
    doc = next(iter(docs.values()))
    assert doc["availability_mode"] == "all"
    assert [a["topic"] for a in doc["availability"]] == [topic_for(SITE, "door", "status"),
                                                         topic_for(SITE, NODE, "node")]


def test_a_camera_that_cannot_start_is_named_and_the_process_exits_2(int8_model_320, tmp_path):
    cfg = write_site(tmp_path, int8_model_320, [{"camera_id": "door", "source": str(INDOOR_CLIP)},
                                                {"camera_id": "till", "source": str(tmp_path / "gone.mp4")}])
    proc = edge(tmp_path, cfg)
    assert proc.wait(60) == 2
    assert f"smartcam-edge: camera till: source not found: {tmp_path / 'gone.mp4'}" in proc.output()

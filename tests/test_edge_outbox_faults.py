"""Faults around the outbox, on real parts: broker outage mid-run, edge SIGKILL, SIGTERM, bounds, bad paths.

The promise under test: every event the edge wrote to its --events-file reaches a QoS 1 subscriber, whatever
happens to the broker or the edge process (duplicates allowed: event_id makes them harmless).
"""

from __future__ import annotations

import signal
import sqlite3
import subprocess
import time
from pathlib import Path

import pytest

from camera.outbox import Outbox
from tests.conftest import INDOOR_CLIP, NEGATIVE_CLIP, ONNX_FP32
from tests.services import (
    CAM,
    ROOT,
    SITE,
    Subscriber,
    edge_cmd,
    free_port,
    read_events,
    run_edge,
    start_mosquitto,
    start_persistent_mosquitto,
)


def _wait(predicate, timeout: float = 60.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.1)
    return predicate()


def _start_edge(tmp_path: Path, model: Path, broker_url: str, *extra: str) -> tuple[subprocess.Popen, Path, Path]:
    log = tmp_path / "edge.log"
    events = tmp_path / "events.jsonl"
    with open(log, "ab") as fh:
        proc = subprocess.Popen(edge_cmd("--source", str(INDOOR_CLIP), "--model", str(model),
                                         "--camera-id", CAM, "--site", SITE, "--broker", broker_url,
                                         "--events-file", str(events), "--outbox", str(tmp_path / "outbox.db"),
                                         *extra), cwd=ROOT, stdout=fh, stderr=fh)
    return proc, events, log


def _depth(path: Path) -> int:
    """Rows waiting in an outbox, read without taking it over (the edge may still hold it)."""
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        return db.execute("SELECT COUNT(*) FROM outbox").fetchone()[0]
    finally:
        db.close()


def _ids(events: list[dict]) -> set[str]:
    return {e["event_id"] for e in events}


@pytest.mark.slow
def test_broker_outage_mid_run_loses_nothing(tmp_path, int8_model_320):
    broker = start_persistent_mosquitto(tmp_path / "broker")
    sub = Subscriber(broker.port, client_id="sink-like", persistent=True)
    proc = None
    try:
        proc, events_file, log = _start_edge(tmp_path, int8_model_320, broker.url, "--fps", "5", "--max-frames", "60")
        assert _wait(lambda: len(read_events(events_file)) >= 2), log.read_text()[-2000:]
        broker.stop()  # outage: the edge keeps detecting and queueing
        # stay down until the clip is finished, so the final exits are queued while the broker is away
        assert _wait(lambda: "done:" in log.read_text(), 120), log.read_text()[-2000:]
        depth = _depth(tmp_path / "outbox.db")  # the edge is still running and holds the outbox
        broker.start()
        assert proc.wait(120) == 0, log.read_text()[-3000:]
        written = read_events(events_file)
        assert sub.wait_for(lambda: _ids(written) <= _ids(sub.events()), 30)
        received = sub.events()
    finally:
        if proc and proc.poll() is None:
            proc.kill()
        sub.close()
        broker.stop()
    text = log.read_text()
    print(f"events written {len(written)}, queued during the outage {depth}, received {len(received)} "
          f"({len(received) - len(_ids(received))} duplicates), lost {len(_ids(written) - _ids(received))}")
    assert depth > 0  # something really waited in the outbox
    assert "lost the broker" in text and "outbox drained" in text
    assert _ids(written) - _ids(received) == set()


@pytest.mark.slow
def test_sigkill_then_restart_replays_unacknowledged(tmp_path, int8_model_320):
    port = free_port()  # no broker yet: the edge starts anyway, queues, and is killed with everything unsent
    proc, events_file, log = _start_edge(tmp_path, int8_model_320, f"mqtt://127.0.0.1:{port}", "--fps", "5")
    try:
        assert _wait(lambda: len(read_events(events_file)) >= 3), log.read_text()[-2000:]
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
    written = read_events(events_file)
    box = Outbox(tmp_path / "outbox.db")
    assert box.depth() >= len(written)  # each event row (+ retained count rows) was on disk before the file line
    box.close()
    assert "cannot reach broker" in log.read_text()  # it warned, and kept detecting and queueing

    broker = start_mosquitto(tmp_path / "broker", port=port)
    sub = Subscriber(broker.port)
    try:
        # restart on a clip with no people: all it has to send is the previous run's backlog
        again = run_edge("--source", str(NEGATIVE_CLIP), "--model", str(int8_model_320), "--camera-id", CAM,
                         "--site", SITE, "--broker", broker.url, "--max-frames", "2",
                         "--events-file", str(events_file), "--outbox", str(tmp_path / "outbox.db"))
        assert again.returncode == 0, again.stderr[-3000:]
        assert "replaying" in again.stderr
        assert sub.wait_for(lambda: _ids(written) <= _ids(sub.events()), 30)
        received = sub.events()
    finally:
        sub.close()
        broker.stop()
    print(f"events written before SIGKILL {len(written)}, replayed after restart {len(received)}")
    assert [e["event_id"] for e in received][: len(written)] == [e["event_id"] for e in written]  # in order
    assert _depth(tmp_path / "outbox.db") == 0


@pytest.mark.slow
def test_sigterm_finishes_cleanly_and_publishes_offline(mosquitto, tmp_path, int8_model_320):
    sub = Subscriber(mosquitto.port)
    proc, events_file, log = _start_edge(tmp_path, int8_model_320, mosquitto.url, "--realtime", "--fps", "5")
    try:
        assert _wait(lambda: len(read_events(events_file)) >= 2), log.read_text()[-2000:]
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0, log.read_text()[-3000:]
        written = read_events(events_file)
        assert sub.wait_for(lambda: _ids(written) <= _ids(sub.events()), 20)
        assert sub.wait_for(lambda: sub.payloads("status")[-1:] == [b"offline"], 10)
    finally:
        if proc.poll() is None:
            proc.kill()
        sub.close()
    # the stop flushed the tracker: every person who entered also exited
    enters = {e["track_id"] for e in written if e["type"] == "person.enter"}
    exits = {e["track_id"] for e in written if e["type"] == "person.exit"}
    assert enters and enters == exits
    assert "received SIGTERM" in log.read_text()


@pytest.mark.slow
def test_bounded_outbox_drops_oldest_and_undrained_exit_code(tmp_path, int8_model_320):
    port = free_port()  # nobody listening: nothing can be acknowledged
    proc = run_edge("--source", str(INDOOR_CLIP), "--model", str(int8_model_320), "--camera-id", CAM,
                    "--broker", f"mqtt://127.0.0.1:{port}", "--fps", "5", "--max-frames", "15",
                    "--outbox", str(tmp_path / "o.db"), "--outbox-max", "2", "--drain-timeout", "1",
                    "--events-file", str(tmp_path / "e.jsonl"))
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "not acknowledged" in proc.stderr and "replayed on the next start" in proc.stderr
    assert "outbox full" in proc.stderr
    box = Outbox(tmp_path / "o.db")
    assert box.depth() == 2 and box.dropped > 0  # the drop is counted (and reported in stats.outbox_dropped)


def test_unwritable_outbox_is_a_clear_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    proc = run_edge("--source", str(NEGATIVE_CLIP), "--model", str(ONNX_FP32), "--camera-id", CAM,
                    "--broker", "mqtt://127.0.0.1:1", "--outbox", str(blocker / "o.db"), "--max-frames", "1",
                    timeout=120)
    assert proc.returncode == 3
    assert "cannot open outbox" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.slow
def test_broker_refusing_the_topic_keeps_events_in_the_outbox(tmp_path, int8_model_320):
    """An ACL that forbids this camera's topic: MQTT 5 PUBACKs say "not authorized" and nothing is deleted."""
    acl = tmp_path / "broker" / "acl"
    acl.parent.mkdir(parents=True)
    acl.write_text("topic read smartcam/#\n")  # anonymous clients may read, not write
    acl.chmod(0o644)
    broker = start_mosquitto(tmp_path / "broker", extra_conf=f"acl_file {acl}\nuser root\n")  # root: 0700 dirs
    try:
        proc = run_edge("--source", str(INDOOR_CLIP), "--model", str(int8_model_320), "--camera-id", CAM,
                        "--site", SITE, "--broker", broker.url, "--fps", "3", "--max-frames", "15",
                        "--events-file", str(tmp_path / "e.jsonl"), "--outbox", str(tmp_path / "o.db"),
                        "--drain-timeout", "3")
    finally:
        broker.stop()
    written = read_events(tmp_path / "e.jsonl")
    assert written
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "broker rejected" in proc.stderr and "not acknowledged" in proc.stderr
    assert _depth(tmp_path / "o.db") >= len(written)


def test_unwritable_events_file_is_a_clear_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    proc = run_edge("--source", str(NEGATIVE_CLIP), "--model", str(ONNX_FP32), "--camera-id", CAM,
                    "--events-file", str(blocker / "events.jsonl"), "--max-frames", "1", timeout=120)
    assert proc.returncode == 3
    assert "cannot write" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.slow
def test_rows_the_broker_keeps_rejecting_end_as_dead_letters_not_as_success(tmp_path, int8_model_320):
    """After outbox.max_rejections the rows leave the queue for the dead letters: the run must not then say
    "every event acknowledged" and exit 0; it says how many were dead-lettered, where, and exits 1."""
    acl = tmp_path / "broker" / "acl"
    acl.parent.mkdir(parents=True)
    acl.write_text("topic read smartcam/#\n")  # anonymous clients may read, not write
    acl.chmod(0o644)
    config = tmp_path / "edge.yaml"
    config.write_text("outbox:\n  max_rejections: 2\n  retry_s: 0.1\n")
    broker = start_mosquitto(tmp_path / "broker", extra_conf=f"acl_file {acl}\nuser root\n")  # root: 0700 dirs
    try:
        proc = run_edge("--config", str(config), "--source", str(INDOOR_CLIP), "--model", str(int8_model_320),
                        "--camera-id", CAM, "--site", SITE, "--broker", broker.url, "--fps", "3", "--max-frames", "15",
                        "--events-file", str(tmp_path / "e.jsonl"), "--outbox", str(tmp_path / "o.db"),
                        "--batch-linger", "0", "--drain-timeout", "20")
    finally:
        broker.stop()
    written = read_events(tmp_path / "e.jsonl")
    assert written
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "every event acknowledged" not in proc.stderr
    assert "dead letter" in proc.stderr and "smartcam-edge outbox dead-letters" in proc.stderr
    box = Outbox(tmp_path / "o.db")
    try:
        assert box.depth() == 0 and box.dead_lettered >= len(written)  # every event kept, none queued forever
    finally:
        box.close()

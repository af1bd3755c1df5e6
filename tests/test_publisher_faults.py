"""The publisher under faults, on a real Mosquitto: a drain thread that fails, rows the broker rejects.

What must hold: a failure of the drain thread is never silent (it restarts with backoff, counted, or the run ends
with a clear error); a row the broker rejects is retried while the process runs and, after ``max_rejections``,
kept as a dead letter in the outbox file, counted and listed by ``smartcam-edge outbox dead-letters``.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from camera.outbox import Outbox
from camera.publisher import Publisher, PublisherError
from contract.broker import BrokerSettings
from contract.topics import topic_for
from tests.services import CAM, SITE, Subscriber, start_mosquitto

ROOT = Path(__file__).resolve().parents[1]
EVENTS = topic_for(SITE, CAM, "events")


def _publisher(url: str, box: Outbox, cls: type[Publisher] = Publisher, **kwargs) -> Publisher:
    return cls(BrokerSettings.from_url(url), box, site=SITE, camera_id=CAM, window=20, **kwargs)


class FailingDrain(Publisher):
    """A publisher whose drain step raises ``failures`` times (the fault a bug in a later release would be)."""

    def __init__(self, *args, failures: int, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.failures_left = failures

    def _drain_once(self) -> None:
        if self.failures_left > 0:
            self.failures_left -= 1
            raise KeyError("injected drain failure")
        super()._drain_once()


def test_a_row_the_mqtt_client_refuses_is_dead_lettered_and_the_rest_still_goes(mosquitto, tmp_path):
    """paho refuses a topic with a wildcard (ValueError): before, that killed the drain thread for good."""
    box = Outbox(tmp_path / "o.db")
    box.put_many([(EVENTS, "before", 1, False), (topic_for(SITE, CAM, "#"), "poison", 1, False),
                  (EVENTS, "after", 1, False)])
    sub = Subscriber(mosquitto.port)
    pub = _publisher(mosquitto.url, box)
    try:
        pub.start()
        assert pub.wait_drained(10) == 0
        assert sub.wait_for(lambda: len(sub.payloads("events")) >= 2)
        pub.check()  # nothing fatal happened
    finally:
        pub.stop()
        sub.close()
    assert sub.payloads("events") == [b"before", b"after"]
    [dead] = box.dead_letters()
    assert dead.payload == b"poison" and "wildcard" in dead.reason.lower()
    assert box.dead_lettered == 1
    box.close()


def test_a_failing_drain_is_restarted_with_backoff_and_counted(mosquitto, tmp_path):
    box = Outbox(tmp_path / "o.db")
    box.put_many([(EVENTS, f"m{i}", 1, False) for i in range(5)])
    sub = Subscriber(mosquitto.port)
    pub = _publisher(mosquitto.url, box, FailingDrain, failures=2, drain_backoff_s=0.05)
    try:
        pub.start()
        assert pub.wait_drained(20) == 0
        assert sub.wait_for(lambda: len(sub.payloads("events")) >= 5)
        pub.check()
        assert pub.drain_restarts == 2
    finally:
        pub.stop()
        sub.close()
        box.close()
    assert sub.payloads("events") == [f"m{i}".encode() for i in range(5)]


def test_a_drain_that_keeps_failing_ends_the_run_with_a_clear_error(mosquitto, tmp_path):
    box = Outbox(tmp_path / "o.db")
    box.put(EVENTS, "m")
    pub = _publisher(mosquitto.url, box, FailingDrain, failures=10**6, drain_backoff_s=0.01, max_drain_failures=3)
    try:
        pub.start()
        assert pub.wait_drained(20) == 1  # returns on the error, not after the timeout
        with pytest.raises(PublisherError, match="drain failed 3 times in a row.*injected drain failure"):
            pub.check()
        assert pub.drain_restarts == 2
    finally:
        pub.stop()
        box.close()


def _read_only_broker(workdir: Path):
    """Anonymous clients may read smartcam/#, not write: every PUBACK says "Not authorized" (MQTT 5)."""
    workdir.mkdir(parents=True)
    acl = workdir / "acl"
    acl.write_text("topic read smartcam/#\n")
    acl.chmod(0o644)
    return start_mosquitto(workdir, extra_conf=f"acl_file {acl}\nuser root\n"), acl  # root: pytest dirs are 0700


def test_rejected_rows_are_retried_while_the_process_runs(tmp_path):
    broker, acl = _read_only_broker(tmp_path / "broker")
    box = Outbox(tmp_path / "o.db")
    box.put_many([(EVENTS, f"m{i}", 1, False) for i in range(3)])
    sub = Subscriber(broker.port)
    pub = _publisher(broker.url, box, retry_s=0.2, max_rejections=1000)
    try:
        pub.start()
        assert sub.wait_for(lambda: pub.rejected >= 2, 20)  # rejected, and rejected again after the backoff
        assert box.depth() == 3 and sub.payloads("events") == []
        acl.write_text("topic readwrite smartcam/#\n")  # the operator fixes the ACL; the edge keeps running
        broker.proc.send_signal(signal.SIGHUP)  # mosquitto reloads its ACL
        assert pub.wait_drained(30) == 0
        assert sub.wait_for(lambda: len(sub.payloads("events")) >= 3)
    finally:
        pub.stop()
        sub.close()
        broker.stop()
    assert sorted(sub.payloads("events")) == [b"m0", b"m1", b"m2"]
    assert box.dead_lettered == 0
    box.close()


def test_rows_rejected_n_times_are_dead_lettered_counted_and_listed(tmp_path):
    broker, _ = _read_only_broker(tmp_path / "broker")
    path = tmp_path / "o.db"
    box = Outbox(path)
    box.put_many([(EVENTS, f"m{i}", 1, False) for i in range(3)])
    pub = _publisher(broker.url, box, retry_s=0.05, max_rejections=3)
    try:
        pub.start()
        assert pub.wait_drained(30) == 0  # empty: not delivered, but not queued forever either
        pub.check()
    finally:
        pub.stop()
        broker.stop()
    dead = box.dead_letters()
    assert [d.payload for d in dead] == [b"m0", b"m1", b"m2"]
    assert all(d.rejections == 3 and "not authorized" in d.reason.lower() for d in dead)
    assert box.dead_lettered == 3 and box.depth() == 0
    box.close()
    listed = subprocess.run([sys.executable, "-m", "camera", "outbox", "dead-letters", "--outbox", str(path),
                             "--json"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert listed.returncode == 0, listed.stderr
    rows = [json.loads(line) for line in listed.stdout.splitlines()]
    assert [(r["topic"], r["payload"], r["rejections"]) for r in rows] == [(EVENTS, f"m{i}", 3) for i in range(3)]
    table = subprocess.run([sys.executable, "-m", "camera", "outbox", "dead-letters", "--outbox", str(path)],
                           cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert table.returncode == 0 and "3 dead letter(s)" in table.stdout and "Not authorized" in table.stdout


def test_the_edge_run_ends_with_exit_5_when_its_publisher_stops(mosquitto, tmp_path, monkeypatch, caplog):
    """The frame loop sees a publisher whose drain keeps failing and ends the run with its own exit code and the
    error, instead of detecting on while nothing is sent (the real edge; only the drain carries the fault)."""
    import functools

    import camera.pipeline
    from camera.config import load_config
    from camera.pipeline import EXIT_PUBLISHER, EdgeRunner
    from tests.conftest import NEGATIVE_CLIP, ONNX_FP32

    monkeypatch.setattr(camera.pipeline, "Publisher", functools.partial(
        FailingDrain, failures=10**6, drain_backoff_s=0.01, max_drain_failures=2))
    cfg = load_config(overrides={"source": str(NEGATIVE_CLIP), "model": str(ONNX_FP32), "camera_id": CAM,
                                 "site": SITE, "mqtt.broker": mosquitto.url, "outbox.path": str(tmp_path / "o.db"),
                                 "max_frames": 40, "drain_timeout_s": 20})
    assert EdgeRunner(cfg).run() == EXIT_PUBLISHER
    assert "drain failed 2 times in a row" in caplog.text


def test_rejected_samples_are_retried_while_the_process_runs_then_given_up(tmp_path):
    """A sampled frame the broker refuses (its ACL lacks .../sample) is sent again after a backoff, not only at
    the next start; once the ACL allows it, it arrives. One refused max_rejections times is dropped, counted."""
    from camera.sample_queue import SampleQueue

    broker, acl = _read_only_broker(tmp_path / "broker")
    box = Outbox(tmp_path / "o.db")
    queue = SampleQueue(tmp_path / "s.db", 1 << 20)
    for i in range(2):
        queue.put(f"jpeg{i}".encode())
    sub = Subscriber(broker.port)
    pub = _publisher(broker.url, box, samples=queue, retry_s=0.2, max_rejections=1000)
    try:
        pub.start()
        assert sub.wait_for(lambda: pub.rejected >= 4, 20)  # both rejected, and rejected again after the backoff
        assert queue.depth() == 2
        acl.write_text("topic readwrite smartcam/#\n")
        broker.proc.send_signal(signal.SIGHUP)
        assert sub.wait_for(lambda: queue.depth() == 0, 30), f"{queue.depth()} samples still queued"
        assert sorted(sub.payloads("sample")) == [b"jpeg0", b"jpeg1"] and pub.samples_sent == 2
    finally:
        pub.stop()
        sub.close()
        broker.stop()
    box.close()
    queue.close()

    broker, _ = _read_only_broker(tmp_path / "broker2")
    box, queue = Outbox(tmp_path / "o2.db"), SampleQueue(tmp_path / "s2.db", 1 << 20)
    queue.put(b"jpeg")
    pub = _publisher(broker.url, box, samples=queue, retry_s=0.05, max_rejections=3)
    try:
        pub.start()
        assert Subscriber.wait_for(None, lambda: pub.samples_rejected == 1, 20)
        assert queue.depth() == 0 and pub.rejected == 3 and pub.samples_sent == 0
    finally:
        pub.stop()
        broker.stop()
    box.close()
    queue.close()

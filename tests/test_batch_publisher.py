"""Batched publishing on a real Mosquitto into a real sink (``cloud_sink.ingest.Subscriber`` on SQLite).

What must hold: with ``linger_s`` the events go out in far fewer messages, all stored exactly once and in order;
retained snapshots are coalesced to the newest; a broker restart mid-stream loses and duplicates nothing in
storage; rows left in the outbox by a stopped edge are rebuilt into batches on the next start; ``linger_s`` 0 is
one message per event, as before batching.
"""

from __future__ import annotations

import json
import threading
import time

import pytest

from camera.config import BatchConfig
from camera.outbox import Outbox
from camera.publisher import Publisher
from contract.batch import decode_batch
from contract.broker import BrokerSettings
from contract.topics import topics_for_event
from tests.conftest import make_event
from tests.services import CAM, SITE, Subscriber, free_port, start_persistent_mosquitto
from tests.sink_clients import RealSink

pytestmark = pytest.mark.slow


def events_now(n: int, start: int = 0) -> list[dict]:
    """``n`` valid events of this camera stamped now: person.enter, and a (retained) count every 4th."""
    out = []
    for i in range(start, start + n):
        if i % 4 == 3:
            out.append(make_event("count", ts=time.time(), site=SITE, camera_id=CAM, count=i, previous=i - 1))
        else:
            out.append(make_event("person.enter", ts=time.time(), site=SITE, camera_id=CAM, track_id=i + 1))
    return out


def put(box: Outbox, events: list[dict]) -> None:
    """As the pipeline does: each event on ``events`` plus its retained summary, durable before publishing."""
    rows = []
    for ev in events:
        payload = json.dumps(ev, separators=(",", ":"))
        rows += [(topic, payload, qos, retain) for topic, qos, retain in topics_for_event(SITE, CAM, ev)]
    box.put_many(rows)


def feed_frames(box: Outbox, pub: Publisher, events: list[dict], per_frame: int) -> None:
    """As a camera does: ``per_frame`` events at a time, a frame every 50 ms, the publisher told each time."""
    for i in range(0, len(events), per_frame):
        put(box, events[i:i + per_frame])
        pub.notify()
        time.sleep(0.05)


def batch_events(sub: Subscriber) -> list[list[dict]]:
    return [[json.loads(line) for line in decode_batch(p, 8 << 20)] for p in sub.payloads("batch")]


def test_linger_sends_fewer_messages_and_every_event_is_stored_once(mosquitto, tmp_path):
    box = Outbox(tmp_path / "o.db")
    events = events_now(200)
    put(box, events)  # 200 events + 50 retained count rows
    sub = Subscriber(mosquitto.port)
    sink = RealSink(mosquitto.url, tmp_path / "sink.db")
    pub = Publisher(BrokerSettings.from_url(mosquitto.url), box, site=SITE, camera_id=CAM, window=20,
                    batch=BatchConfig(linger_s=0.5, max_events=64, retained_interval_s=0))
    try:
        pub.start()
        assert pub.wait_drained(60) == 0
        assert sub.wait_for(lambda: sum(map(len, batch_events(sub))) >= 200)
        batches = batch_events(sub)
        assert sink.wait_stored(200)
        time.sleep(0.5)  # a stray duplicate would have arrived by now
        stored = sink.stored_ids()
    finally:
        pub.stop()
        sink.close()
        box.close()
        sub.close()
    assert sub.payloads("events") == []  # nothing one by one
    assert len(batches) == 4 and max(map(len, batches)) <= 64  # 200 events in ceil(200 / 64) messages
    assert [e["event_id"] for b in batches for e in b] == [e["event_id"] for e in events]  # outbox order
    assert sorted(stored) == sorted(e["event_id"] for e in events)  # exactly once
    counts = [e for e in events if e["type"] == "count"]
    retained_sent = sub.payloads("count")
    assert len(retained_sent) < len(counts) and pub.coalesced == len(counts) - len(retained_sent)
    assert json.loads(retained_sent[-1])["event_id"] == counts[-1]["event_id"]  # the newest snapshot wins
    assert pub.published == 250 and pub.messages == len(batches) + len(retained_sent)


def test_events_arriving_over_time_are_grouped_by_linger(mosquitto, tmp_path):
    box = Outbox(tmp_path / "o.db")
    sub = Subscriber(mosquitto.port)
    pub = Publisher(BrokerSettings.from_url(mosquitto.url), box, site=SITE, camera_id=CAM,
                    batch=BatchConfig(linger_s=1.0, retained_interval_s=0))
    events = events_now(100)
    try:
        pub.start()
        assert pub.connected.wait(10)
        feed_frames(box, pub, events, 5)  # 20 frames
        assert pub.wait_drained(30) == 0
        assert sub.wait_for(lambda: sum(map(len, batch_events(sub))) >= 100)
    finally:
        pub.stop()
        box.close()
        sub.close()
    batches = batch_events(sub)
    assert [e["event_id"] for b in batches for e in b] == [e["event_id"] for e in events]
    assert len(batches) <= 10  # 20 frames of events, each batch held the oldest row up to 1 s


def test_linger_zero_is_one_message_per_event_as_before(mosquitto, tmp_path):
    box = Outbox(tmp_path / "o.db")
    events = events_now(20)
    put(box, events)
    sub = Subscriber(mosquitto.port)
    pub = Publisher(BrokerSettings.from_url(mosquitto.url), box, site=SITE, camera_id=CAM,
                    batch=BatchConfig(linger_s=0, retained_interval_s=0))
    try:
        pub.start()
        assert pub.wait_drained(30) == 0
        assert sub.wait_for(lambda: len(sub.payloads("events")) >= 20)
    finally:
        pub.stop()
        box.close()
        sub.close()
    assert [json.loads(p)["event_id"] for p in sub.payloads("events")] == [e["event_id"] for e in events]
    assert sub.payloads("batch") == [] and len(sub.payloads("count")) == 5 and pub.coalesced == 0


def test_broker_restart_mid_stream_loses_and_duplicates_nothing_in_storage(tmp_path):
    broker = start_persistent_mosquitto(tmp_path / "broker")
    box = Outbox(tmp_path / "o.db")
    sink = RealSink(broker.url, tmp_path / "sink.db")
    pub = Publisher(BrokerSettings.from_url(broker.url), box, site=SITE, camera_id=CAM, window=10,
                    reconnect_max_s=1, batch=BatchConfig(linger_s=0.3, max_events=16, retained_interval_s=0))
    events = events_now(300)
    stop_feeding = threading.Event()

    def feed() -> None:  # the frame loop: a few events at a time, whatever the broker is doing
        for i in range(0, 300, 6):
            put(box, events[i:i + 6])
            pub.notify()
            if stop_feeding.wait(0.03):
                return

    feeder = threading.Thread(target=feed)
    try:
        pub.start()
        assert pub.connected.wait(10)
        feeder.start()
        assert sink.wait_stored(30, timeout=30)  # batches are flowing
        broker.restart()  # kills in-flight PUBLISH/PUBACKs of both clients mid-stream
        feeder.join(60)
        assert pub.wait_drained(90) == 0
        assert sink.wait_stored(300, timeout=90)
        time.sleep(1.0)  # redeliveries of what was in flight have arrived by now
        stored = sink.stored_ids()
        reconnects = pub.connects
    finally:
        stop_feeding.set()
        pub.stop()
        sink.close()
        box.close()
        broker.stop()
    assert reconnects >= 2, "the broker restart was not seen"
    assert len(stored) == 300 and set(stored) == {e["event_id"] for e in events}


def test_rows_left_by_a_stopped_edge_are_replayed_as_batches(mosquitto, tmp_path):
    events = events_now(40)
    box = Outbox(tmp_path / "o.db")
    nowhere = BrokerSettings.from_url(f"mqtt://127.0.0.1:{free_port()}")  # nothing listens: all rows stay
    offline = Publisher(nowhere, box, site=SITE, camera_id=CAM, batch=BatchConfig(linger_s=0.2, retained_interval_s=0))
    offline.start()
    put(box, events)
    assert offline.wait_drained(0.5) == 50
    offline.stop()
    box.close()

    box = Outbox(tmp_path / "o.db")  # the next start
    sub = Subscriber(mosquitto.port)
    sink = RealSink(mosquitto.url, tmp_path / "sink.db")
    pub = Publisher(BrokerSettings.from_url(mosquitto.url), box, site=SITE, camera_id=CAM,
                    batch=BatchConfig(linger_s=0.2, retained_interval_s=0))
    try:
        pub.start()
        assert pub.wait_drained(30) == 0
        assert sink.wait_stored(40)
        stored = sink.stored_ids()
    finally:
        pub.stop()
        sink.close()
        box.close()
        sub.close()
    assert sub.payloads("events") == [] and len(sub.payloads("batch")) == 1
    assert sorted(stored) == sorted(e["event_id"] for e in events)
    assert json.loads(sub.payloads("count")[-1])["event_id"] == events[-1]["event_id"]  # i=39: a count


def test_a_rejected_batch_keeps_all_its_rows(tmp_path):
    """The broker's ACL refuses ``.../batch`` (MQTT 5 PUBACK "not authorized"): nothing is deleted."""
    from tests.services import start_mosquitto

    acl = tmp_path / "acl"
    acl.write_text(f"topic write smartcam/{SITE}/{CAM}/events\ntopic write smartcam/{SITE}/{CAM}/status\n")
    broker = start_mosquitto(tmp_path / "broker", extra_conf=f"acl_file {acl}\nuser root\n")  # root: 0700 dirs
    box = Outbox(tmp_path / "o.db")
    put(box, events_now(8))  # 8 event rows + 2 retained count rows (refused too)
    pub = Publisher(BrokerSettings.from_url(broker.url), box, site=SITE, camera_id=CAM,
                    batch=BatchConfig(linger_s=0.1, retained_interval_s=0))
    try:
        pub.start()
        deadline = time.monotonic() + 20
        while pub.rejected < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        rejected, depth = pub.rejected, box.depth()
    finally:
        pub.stop()
        box.close()
        broker.stop()
    assert rejected == 2 and depth == 10  # one batch + one coalesced count message, every row kept


def test_retained_summaries_go_at_most_every_interval_and_the_newest_at_the_end(mosquitto, tmp_path):
    box = Outbox(tmp_path / "o.db")
    sub = Subscriber(mosquitto.port)
    pub = Publisher(BrokerSettings.from_url(mosquitto.url), box, site=SITE, camera_id=CAM,
                    batch=BatchConfig(linger_s=0.2, retained_interval_s=3600))
    events = events_now(80)
    try:
        pub.start()
        assert pub.connected.wait(10)
        feed_frames(box, pub, events, 4)  # one count change per frame
        assert pub.wait_drained(30) == 0  # draining releases what is held
        assert sub.wait_for(lambda: sum(map(len, batch_events(sub))) >= 80)
        assert sub.wait_for(lambda: json.loads(sub.payloads("count")[-1])["event_id"] == events[-1]["event_id"])
    finally:
        pub.stop()
        box.close()
        sub.close()
    sent = sub.payloads("count")
    assert 1 <= len(sent) <= 2  # the first snapshot at once, then nothing for an hour but the final drain
    assert pub.coalesced == 20 - len(sent) and pub.published == 100
    assert [e["event_id"] for b in batch_events(sub) for e in b] == [e["event_id"] for e in events]

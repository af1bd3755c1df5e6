"""Ingest: batches stored exactly once, bad input dead-lettered with the sink still running, and — with a real
Mosquitto and the real ``smartcam-sink run`` process — persistent sessions and SIGKILL losing nothing."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cloud_sink.ingest import Ingestor, Subscriber
from cloud_sink.store import Batch, Store
from cloud_sink.validation import Limits, check_message
from contract.broker import BrokerSettings
from contract.timestamps import format_ts
from contract.topics import topic_for
from tests.conftest import make_event
from tests.sink_clients import now_event, publish, raw, sink_process, stop_process, wait_connected, wait_for

ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------------ Ingestor


def test_batch_stores_events_once_and_dead_letters_the_rest(store):  # noqa: F811
    ing = Ingestor(store)
    a, b = now_event(), now_event("count", count=2, previous=1)
    messages = [raw(a), raw(b), raw(a), ("smartcam/lobby/cam-1/events", b"garbage"),
                ("smartcam/lobby/cam-1/status", b"online"), ("smartcam/lobby/cam-1/count", raw(b)[1])]
    result = ing.handle(messages)
    assert (result.received, result.stored, result.duplicates, result.dead, result.status) == (6, 2, 2, 1, 1)
    assert [e["event_id"] for e in result.new_events] == [a["event_id"], b["event_id"]]
    again = ing.handle([raw(a)])
    assert (again.stored, again.duplicates) == (0, 1)
    assert store.event_count() == 2 and store.dead_letter_count() == 1
    (dead,) = store.dead_letters()
    assert dead["payload"] == "garbage" and "invalid JSON" in dead["reason"]
    assert store.cameras()[0]["state"] == "online"
    assert ing.totals.received == 7 and ing.totals.stored == 2


_hostile = st.one_of(
    st.binary(max_size=300),
    st.text(max_size=200).map(str.encode),
    st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=10),
                 lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=8), c, max_size=3),
                 max_leaves=8).map(lambda v: json.dumps(v).encode()),
    st.builds(lambda k, v: json.dumps(make_event() | {k: v}).encode(),
              st.sampled_from(["ts", "site", "schema_version", "event_id", "type", "box", "camera_id", "x"]),
              st.none() | st.integers() | st.text(max_size=30) | st.just(float("nan"))),
)


def test_hostile_payloads_are_dead_lettered_and_valid_ones_still_stored(tmp_path):
    s = Store.open(f"sqlite:///{tmp_path / 'fuzz.db'}")
    ing = Ingestor(s, limits=Limits(dead_letter_burst=10**6))  # every dead letter kept (no rate limit here)

    @settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(st.lists(_hostile, min_size=1, max_size=6),
           st.sampled_from(["events", "count", "stats", "status", "zones/z/count", "lines/l/totals", "x"]))
    def run(payloads, leaf):
        dead_before = s.dead_letter_count()
        good = [now_event(track_id=i) for i in range(2)]
        topic = f"smartcam/lobby/cam-1/{leaf}"
        messages = [raw(good[0])] + [(topic, p) for p in payloads] + [raw(good[1])]
        result = ing.handle(messages)
        # a generated payload is occasionally a valid status/stats/event by chance: everything else is dead
        assert result.dead + result.status + result.stats + result.stored + result.duplicates == len(messages)
        assert {e["event_id"] for e in s.events(limit=2)} == {g["event_id"] for g in good}
        expected_dead = sum(check_message(topic, p).kind == "dead" for p in payloads)
        assert result.dead == expected_dead
        assert s.dead_letter_count() - dead_before <= expected_dead  # a payload dead-lettered before: kept once
        assert all(r for r in result.reasons)

    try:
        run()
    finally:
        s.close()


# ------------------------------------------------------------------------------------------ real broker


@pytest.mark.slow
def test_subscriber_stores_live_messages_with_real_mosquitto(mosquitto, db_url):  # noqa: F811
    s = Store.open(db_url)
    sub = Subscriber(Ingestor(s), BrokerSettings.from_url(mosquitto.url), client_id="sink-live", log_every_s=0.5)
    thread = threading.Thread(target=sub.run)
    sub.start()
    thread.start()
    try:
        assert sub.subscribed.wait(10)  # SUBACK
        evs = [now_event(track_id=i) for i in range(50)]
        zone = now_event("count", zone="door", count=1, previous=0)
        publish(mosquitto.url, [raw(e) for e in evs] + [raw(e) for e in evs[:10]]
                + [("smartcam/lobby/cam-1/events", b"{broken"), ("smartcam/lobby/cam-1/status", b"online"),
                   ("smartcam/lobby/cam-1/zones/door/count", raw(zone)[1])])
        wait_for(lambda: s.event_count() == 51 and s.dead_letter_count() == 1, what="51 events, 1 dead letter")
        wait_for(lambda: s.cameras() and s.cameras()[0]["state"] == "online", what="status")
        assert sub.ingestor.totals.duplicates == 10
    finally:
        sub.stop()
        thread.join(10)
        s.close()
    assert not thread.is_alive()


@pytest.mark.slow
def test_persistent_session_delivers_what_was_published_while_the_sink_was_down(mosquitto, db_url, tmp_path):  # noqa: F811
    log_path = tmp_path / "sink.log"
    proc = sink_process(mosquitto.url, db_url, "sink-persist", log_path)
    try:
        wait_connected(log_path)
        first = [now_event(track_id=i) for i in range(20)]
        publish(mosquitto.url, [raw(e) for e in first])
        s = Store.open(db_url)
        wait_for(lambda: s.event_count() == 20, what="first 20 events")
        assert stop_process(proc) == 0  # graceful SIGTERM
        assert "stopped: received" in log_path.read_text()
        while_down = [now_event("person.exit", track_id=i, dwell_s=3.0) for i in range(300)]
        publish(mosquitto.url, [raw(e) for e in while_down])
        assert s.event_count() == 20  # nobody is storing
        proc = sink_process(mosquitto.url, db_url, "sink-persist", log_path)
        wait_for(lambda: s.event_count() == 320, what="events queued while down")
        stored = {e["event_id"] for e in s.events(limit=1000)}
        assert stored == {e["event_id"] for e in first + while_down}
        s.close()
    finally:
        stop_process(proc)


@pytest.mark.slow
def test_sigkill_mid_stream_loses_nothing_and_stores_nothing_twice(mosquitto, db_url, tmp_path):  # noqa: F811
    log_path = tmp_path / "sink.log"
    proc = sink_process(mosquitto.url, db_url, "sink-kill", log_path)
    events = [now_event(track_id=i) for i in range(3000)]
    s = Store.open(db_url)
    try:
        wait_connected(log_path)
        publisher = threading.Thread(target=publish, args=(mosquitto.url, [raw(e) for e in events]))
        publisher.start()
        wait_for(lambda: s.event_count() >= 300, what="some events stored")
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        killed_at = s.event_count()
        publisher.join(60)
        proc = sink_process(mosquitto.url, db_url, "sink-kill", log_path)
        wait_for(lambda: s.event_count() >= len(events), timeout=60, what="all events after restart")
        time.sleep(0.5)
        stored = [e["event_id"] for e in s.events(limit=10000)]
        print(f"SIGKILL test: {killed_at} stored before the kill, {len(stored)} after restart, "
              f"{len(events)} published")
        assert len(stored) == len(set(stored)) == len(events)
        assert set(stored) == {e["event_id"] for e in events}
        (row,) = [c for c in s.cameras() if c["camera_id"] == "cam-1"]
        assert row["events_total"] == len(events)  # rollup-side counters did not double count either
    finally:
        stop_process(proc)
        s.close()


@pytest.mark.slow
def test_cli_report_prints_the_stored_analytics(tmp_path):
    db = f"sqlite:///{tmp_path / 'r.db'}"
    s = Store.open(db)
    t = time.time() - 600
    s.write(Batch(events=[make_event(ts=t, track_id=1), make_event("person.exit", ts=t + 30, track_id=1, dwell_s=30.0),
                     make_event("count", ts=t, count=1, previous=0),
                     make_event("line.cross", ts=t + 10, line="gate", track_id=1, direction="in")]))
    s.close()
    cmd = [sys.executable, "-m", "cloud_sink", "report", "--db", db, "--since", "2h"]
    text = subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=ROOT).stdout
    assert "lobby/cam-1" in text and "gate" in text and "per hour (UTC)" in text
    data = json.loads(subprocess.run(cmd + ["--json"], capture_output=True, text=True, check=True,
                                     cwd=ROOT).stdout)
    (cam,) = data["cameras"]
    assert (cam["entries"], cam["exits"], cam["dwell"]["mean"], cam["lines"][0]["in"]) == (1, 1, 30.0, 1)
    assert data["since"] <= format_ts(t)
    bad = subprocess.run([sys.executable, "-m", "cloud_sink", "report", "--db", db, "--since", "yesterday"],
                         capture_output=True, text=True, cwd=ROOT)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "expected a duration" in bad.stderr


def test_cli_refuses_an_unwritable_database_path_with_one_line(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "cloud_sink", "report", "--db",
                           f"sqlite:///{tmp_path / 'missing' / 'x.db'}"], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 2 and proc.stderr.startswith("smartcam-sink: error: cannot open database")
    assert proc.stderr.count("\n") == 1


@pytest.mark.slow
def test_share_group_workers_split_the_load_and_store_everything_once(mosquitto, tmp_path):
    s = Store.open(f"sqlite:///{tmp_path / 'shared.db'}")
    workers = [Subscriber(Ingestor(s), BrokerSettings.from_url(mosquitto.url), client_id=f"worker-{i}",
                          share_group="sinks") for i in range(2)]
    assert workers[0].topics()[0] == "$share/sinks/smartcam/+/+/events"
    threads = [threading.Thread(target=w.run) for w in workers]
    for w, t in zip(workers, threads, strict=True):
        w.start()
        t.start()
    try:
        assert all(w.connected.wait(10) for w in workers)
        time.sleep(0.5)
        evs = [now_event(track_id=i) for i in range(400)]
        publish(mosquitto.url, [raw(e) for e in evs] + [raw(e) for e in evs[:50]])
        wait_for(lambda: s.event_count() == 400, what="400 events")
        time.sleep(0.3)
        per_worker = [w.ingestor.totals.received for w in workers]
        assert sum(per_worker) == 450 and min(per_worker) > 0  # both got a share
        assert s.event_count() == 400
    finally:
        for w in workers:
            w.stop()
        for t in threads:
            t.join(10)
        s.close()


@pytest.mark.slow
def test_run_serves_the_api_and_archives_new_events(mosquitto, tmp_path):
    import urllib.request

    from tests.services import free_port, wait_for_port

    port = free_port()
    log_path = tmp_path / "sink.log"
    db = f"sqlite:///{tmp_path / 'api.db'}"
    with open(log_path, "ab") as log:
        proc = subprocess.Popen([sys.executable, "-m", "cloud_sink", "run", "--broker", mosquitto.url, "--db", db,
                                 "--client-id", "sink-api", "--http", f"127.0.0.1:{port}", "--archive",
                                 str(tmp_path / "archive")], stdout=log, stderr=log, cwd=ROOT)
    try:
        wait_connected(log_path)
        wait_for_port(port)
        evs = [now_event(track_id=i) for i in range(5)]
        publish(mosquitto.url, [raw(e) for e in evs] * 2)
        s = Store.open(db)
        wait_for(lambda: s.event_count() == 5, what="5 events")
        s.close()
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/events?limit=50", timeout=10) as resp:
            body = json.loads(resp.read())
        assert {e["event_id"] for e in body["events"]} == {e["event_id"] for e in evs}
        def archived() -> list[str]:  # the archive follows the database (every 5 s by default)
            text = "".join(p.read_text() for p in (tmp_path / "archive").rglob("*.jsonl"))
            return sorted(json.loads(line)["event_id"] for line in text.splitlines())

        wait_for(lambda: archived() == sorted(e["event_id"] for e in evs), what="5 events archived")
    finally:
        assert stop_process(proc) == 0


def test_a_message_the_database_rejects_is_dead_lettered_without_stalling_the_batch(store):  # noqa: F811
    """Defence in depth: if a row passes validation but the database refuses it, only that row is lost to the
    dead-letter table; the rest of the batch is stored (here a real trigger plays the picky database)."""
    import sqlalchemy as sa

    with store.engine.begin() as conn:
        if store.dialect == "sqlite":
            conn.execute(sa.text("CREATE TRIGGER no_poison BEFORE INSERT ON events WHEN NEW.camera_id = 'poison' "
                                 "BEGIN SELECT RAISE(ABORT, 'poison camera'); END"))
        else:
            conn.execute(sa.text("CREATE FUNCTION no_poison() RETURNS trigger AS $$ BEGIN IF NEW.camera_id = "
                                 "'poison' THEN RAISE EXCEPTION 'poison camera' USING ERRCODE = 'check_violation';"
                                 " END IF; RETURN NEW; END $$ LANGUAGE plpgsql"))
            conn.execute(sa.text("CREATE TRIGGER no_poison BEFORE INSERT ON events FOR EACH ROW "
                                 "EXECUTE FUNCTION no_poison()"))
    ing = Ingestor(store)
    good = [now_event(track_id=i) for i in range(3)]
    poison = now_event(camera_id="poison")
    result = ing.handle([raw(good[0]), raw(poison), raw(good[1]), ("smartcam/lobby/cam-1/status", b"online"),
                         raw(good[2])])
    assert (result.stored, result.dead, result.status, result.duplicates) == (3, 1, 1, 0)
    assert "database rejected it" in result.reasons[0] and "poison camera" in result.reasons[0]
    assert store.event_count() == 3 and store.dead_letter_count() == 1
    assert store.cameras()[0]["state"] == "online"


def test_stats_with_numbers_no_float_can_hold_are_dead_letters_and_never_reach_a_column(store):  # noqa: F811
    """The schema's maxima refuse them (issue 12 §2.10: this test used to expect them stored); the store still
    keeps such a number out of its REAL columns if one ever gets past validation (defence in depth)."""
    stats = {"schema_version": 1, "ts": format_ts(time.time()), "site": "lobby", "camera_id": "cam-1",
             "input_fps": 25, "processed_fps": 10**400, "inference_ms_p50": 12.0,
             "inference_ms_p95": 20.0, "frames_in": 10**30, "frames_processed": 1, "motion_skipped": 0,
             "dropped_frames": 0, "outbox_depth": 0, "outbox_dropped": 0, "cpu_percent": 1.0,
             "source_state": "connected"}
    result = Ingestor(store).handle([("smartcam/lobby/cam-1/stats", json.dumps(stats).encode())])
    assert result.stats == 0 and result.dead == 1 and "processed_fps" in result.reasons[0]
    store.write(Batch(stats=[("lobby", "cam-1", stats)]))
    (cam,) = store.cameras()
    assert cam["fps"] is None and cam["inference_ms_p50"] == 12.0 and cam["stats"]["frames_in"] == 10**30


def test_a_camera_cannot_suppress_another_cameras_events_and_a_conflict_is_a_dead_letter(store):  # noqa: F811
    """Idempotency per (site, camera, event_id): the same id from another camera is another event; the same id
    with other content from the same camera is dead-lettered with the reason (the first copy is kept)."""
    now = time.time()
    victim = make_event(ts=now, camera_id="cam-1", track_id=1)
    forged = dict(make_event(ts=now, camera_id="cam-2", track_id=2), event_id=victim["event_id"])
    ing = Ingestor(store)
    first = ing.handle([(topic_for("lobby", "cam-2", "events"), json.dumps(forged).encode())], now=now)
    assert first.stored == 1
    second = ing.handle([(topic_for("lobby", "cam-1", "events"), json.dumps(victim).encode())], now=now)
    assert (second.stored, second.duplicates, second.dead) == (1, 0, 0)
    changed = dict(victim, track_id=9)
    third = ing.handle([(topic_for("lobby", "cam-1", "events"), json.dumps(victim).encode()),
                        (topic_for("lobby", "cam-1", "events"), json.dumps(changed).encode())], now=now)
    assert (third.stored, third.duplicates, third.dead) == (0, 1, 1)
    (dead,) = store.dead_letters()
    assert dead["reason"].startswith("conflict: event_id " + victim["event_id"])
    assert store.event_count() == 2


# ------------------------------------------------------------------------------------------ what is retried
def test_only_an_unavailable_database_is_transient(tmp_path):
    """Retry is for a database that cannot be used right now (locked, down); a deterministic error is not."""
    import sqlite3

    import sqlalchemy as sa

    from cloud_sink.store import is_transient

    url = f"sqlite:///{tmp_path / 'sink.db'}"
    s = Store.open(url)
    with pytest.raises(sa.exc.OperationalError) as missing, s.engine.connect() as conn:
        conn.execute(sa.text("SELECT * FROM no_such_table"))
    assert not is_transient(missing.value)
    holder = sqlite3.connect(tmp_path / "sink.db")
    holder.execute("BEGIN EXCLUSIVE")
    impatient = sa.create_engine(url, connect_args={"timeout": 0.05})
    with pytest.raises(sa.exc.OperationalError) as locked, impatient.begin() as conn:
        conn.execute(sa.text("INSERT INTO dead_letters (received_at, topic, reason, payload, payload_bytes) "
                             "VALUES (1, 't', 'r', 'p', 1)"))
    assert is_transient(locked.value)
    holder.rollback()
    holder.close()
    impatient.dispose()
    s.close()


def test_a_deterministic_database_error_dead_letters_the_message_instead_of_retrying_forever(store):  # noqa: F811
    """A table gone (an operator's mistake) is not 'unavailable': the messages become dead letters with the
    reason, the sink goes on (it used to raise, and the subscriber retried the batch forever)."""
    import sqlalchemy as sa

    with store.engine.begin() as conn:
        conn.execute(sa.text("DROP TABLE rollup_lines"))
    ing = Ingestor(store)
    crossing = now_event("line.cross", line="gate", track_id=1, direction="in", totals={"in": 1, "out": 0})
    fine = now_event(track_id=2, camera_id="cam-2")
    result = ing.handle([raw(crossing), raw(fine)])
    assert (result.stored, result.dead) == (1, 1)
    (dead,) = store.dead_letters()
    assert "rollup_lines" in dead["reason"] and json.loads(dead["payload"]) == crossing


def test_the_subscriber_stops_non_zero_when_it_cannot_even_dead_letter(mosquitto, tmp_path):
    """A database that refuses every write for its content (here a real trigger) cannot be retried into
    working: the subscriber stops with the reason (nothing acked, the broker keeps the message)."""
    import sqlalchemy as sa

    s = Store.open(f"sqlite:///{tmp_path / 'sink.db'}")
    with s.engine.begin() as conn:
        for table in ("events", "dead_letters"):
            conn.execute(sa.text(f"CREATE TRIGGER refuse_{table} BEFORE INSERT ON {table} "
                                 "BEGIN SELECT RAISE(ABORT, 'refused by policy'); END"))
    sub = Subscriber(Ingestor(s), BrokerSettings.from_url(mosquitto.url), client_id="sink-refused")
    thread = threading.Thread(target=sub.run)
    sub.start()
    thread.start()
    try:
        assert sub.subscribed.wait(10)  # SUBACK
        publish(mosquitto.url, [raw(now_event())])
        thread.join(30)
        assert not thread.is_alive(), "the subscriber retried a deterministic failure forever"
        assert sub.failure is not None and "refused by policy" in sub.failure
        assert sub.unstored == 1
    finally:
        sub.stop()
        thread.join(10)
        s.close()


def test_the_sink_says_when_its_broker_is_unreachable(store, caplog):  # noqa: F811
    """Not only 'received 0' forever: a clear line naming the broker, and again while it stays unreachable."""
    import logging
    import socket

    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    sub = Subscriber(Ingestor(store), BrokerSettings.from_url(f"mqtt://127.0.0.1:{port}"), client_id="sink-alone",
                     log_every_s=0.5)
    thread = threading.Thread(target=sub.run)
    with caplog.at_level(logging.WARNING, logger="cloud_sink.ingest"):
        sub.start()
        thread.start()
        try:
            wait_for(lambda: sum("cannot reach broker" in r.getMessage() for r in caplog.records) >= 2,
                     what="two 'cannot reach broker' lines", timeout=20)
        finally:
            sub.stop()
            thread.join(10)
    line = next(r.getMessage() for r in caplog.records if "cannot reach broker" in r.getMessage())
    assert f"127.0.0.1:{port}" in line

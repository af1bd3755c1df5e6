"""Store: idempotent inserts, migrations, camera health, queries — the same tests on SQLite and PostgreSQL."""

from __future__ import annotations

import json
import time
from typing import Any

import pytest
import sqlalchemy as sa

from cloud_sink.store import MIGRATIONS, Batch, Store, database_url, to_ms
from contract.ids import new_event_id
from contract.timestamps import format_ts
from tests.conftest import T0, make_event


def test_database_url_maps_postgres_to_psycopg():
    assert database_url("postgresql://u@h/db") == "postgresql+psycopg://u@h/db"
    assert database_url("postgres://u@h/db") == "postgresql+psycopg://u@h/db"
    assert database_url("sqlite:///x.db") == "sqlite:///x.db"
    with pytest.raises(ValueError, match="database URL"):
        database_url("mysql://x")


def test_to_ms_accepts_epoch_datetime_and_rfc3339():
    from datetime import datetime, timezone

    assert to_ms(T0) == int(T0 * 1000)
    assert to_ms(datetime.fromtimestamp(T0, tz=timezone.utc)) == int(T0 * 1000)
    assert to_ms(format_ts(T0)) == int(T0 * 1000)
    assert to_ms("2026-05-28T20:26:40+00:00") == int(T0 * 1000)


def test_migrations_are_recorded_and_reopen_is_a_noop(db_url):
    first = Store.open(db_url)
    assert first.schema_version() == MIGRATIONS[-1][0]
    first.write(Batch(events=[make_event()]))
    first.close()
    again = Store.open(db_url)
    assert again.migrate() == []  # nothing pending
    assert again.event_count() == 1
    with again.engine.connect() as conn:
        assert conn.execute(sa.text("SELECT count(*) FROM schema_migrations")).scalar() == len(MIGRATIONS)
    again.close()


def test_duplicates_are_stored_once_across_and_within_batches(store):
    a, b = make_event(), make_event("person.exit")
    assert len(store.write(Batch(events=[a, b, a])).new_events) == 2
    assert len(store.write(Batch(events=[a, dict(b)])).new_events) == 0
    assert store.event_count() == 2
    # rollups counted once: one entry, one exit
    from cloud_sink import rollups

    (row,) = rollups.hourly(store, since=T0 - 3600)
    assert (row["entries"], row["exits"]) == (1, 1)


def test_write_batch_returns_only_new_events_in_arrival_order(store):
    evs = [make_event(track_id=i) for i in range(5)]
    store.write(Batch(events=evs[1:3]))
    new = store.write(Batch(events=evs)).new_events
    assert [e["event_id"] for e in new] == [evs[0]["event_id"], evs[3]["event_id"], evs[4]["event_id"]]


def test_events_query_filters_and_paginates(store):
    evs = [make_event(ts=T0 + i, track_id=i) for i in range(10)]
    evs.append(make_event("count", ts=T0 + 3, camera_id="cam-2", count=2, previous=1))
    store.write(Batch(events=evs))
    newest = store.events(camera_id="cam-1", limit=3)
    assert [e["track_id"] for e in newest] == [9, 8, 7]
    assert [e["track_id"] for e in store.events(camera_id="cam-1", limit=3, offset=3)] == [6, 5, 4]
    window = store.events(since=T0 + 2, until=format_ts(T0 + 5), type="person.enter")
    assert sorted(e["track_id"] for e in window) == [2, 3, 4]
    (cnt,) = store.events(type="count")
    assert cnt["payload"] == evs[-1] and cnt["ts"] == format_ts(T0 + 3) and cnt["count"] == 2


def test_camera_health_from_events_status_and_stats(store):
    store.write(Batch(events=[make_event(ts=T0), make_event(ts=T0 + 10, track_id=2)]))
    store.write(Batch(statuses=[("lobby", "cam-1", "online")]))
    stats = {"schema_version": 1, "ts": format_ts(T0 + 20), "site": "lobby", "camera_id": "cam-1",
             "input_fps": 25.0, "processed_fps": 12.5, "inference_ms_p50": 31.0, "inference_ms_p95": 40.0,
             "frames_in": 100, "frames_processed": 50, "motion_skipped": 50, "dropped_frames": 0, "outbox_depth": 0,
             "outbox_dropped": 0, "cpu_percent": 80.0, "source_state": "connected"}
    store.write(Batch(stats=[("lobby", "cam-1", stats)]))
    store.write(Batch(statuses=[("lobby", "cam-9", "offline")]))
    cams = {c["camera_id"]: c for c in store.cameras()}
    cam = cams["cam-1"]
    assert cam["state"] == "online" and cam["events_total"] == 2
    assert cam["fps"] == 12.5 and cam["inference_ms_p50"] == 31.0 and cam["stats"]["cpu_percent"] == 80.0
    assert cam["last_seen"] == format_ts(T0 + 20)
    # an older event arriving late does not move last_seen back
    store.write(Batch(events=[make_event(ts=T0 - 100, track_id=3)]))
    assert {c["camera_id"]: c for c in store.cameras()}["cam-1"]["last_seen"] == format_ts(T0 + 20)
    assert cams["cam-9"]["state"] == "offline" and cams["cam-9"]["events_total"] == 0


def test_dead_letters_keep_truncated_payload_and_survive_nul_and_binary(store):
    raw = b"\x00\xff{" + b"x" * 10000
    store.write(Batch(dead_letters=[{"topic": "smartcam/a/b/events", "reason": "bad", "payload": raw},
                               {"topic": "t\x00", "reason": "r", "payload": "text"}]))
    assert store.dead_letter_count() == 2
    rows = store.dead_letters()
    big = next(r for r in rows if r["reason"] == "bad")
    assert big["payload_bytes"] == len(raw) and big["payload"].startswith("\\x00\\xff{")
    assert len(big["payload"]) < 4200


def test_payload_is_stored_verbatim_as_json(store):
    ev = make_event("line.cross", direction="out", totals={"in": 3, "out": 4})
    store.write(Batch(events=[ev]))
    with store.engine.connect() as conn:
        payload = conn.execute(sa.text("SELECT payload FROM events")).scalar_one()
    assert json.loads(payload) == ev


def test_concurrent_readers_while_writing(store):
    """WAL / MVCC: a reader thread sees consistent counts while batches commit."""
    import threading

    seen: list[int] = []
    stop = threading.Event()

    def read() -> None:
        while not stop.is_set():
            seen.append(store.event_count())
            time.sleep(0.005)

    reader = threading.Thread(target=read)
    reader.start()
    for i in range(20):
        store.write(Batch(events=[make_event(track_id=i * 10 + j) for j in range(10)]))
    stop.set()
    reader.join()
    assert store.event_count() == 200
    assert seen == sorted(seen) and all(n % 10 == 0 for n in seen)


# ------------------------------------------------------------------------------------------ idempotency scope
def test_the_same_event_id_on_two_cameras_is_two_events(store):
    """Idempotency is per (site, camera, event_id): one camera cannot suppress another's events."""
    from cloud_sink import rollups

    victim = make_event(camera_id="cam-1", track_id=1)
    attacker = dict(make_event(camera_id="cam-2", track_id=7), event_id=victim["event_id"])
    other_site = dict(make_event(site="garage", camera_id="cam-1", track_id=3), event_id=victim["event_id"])
    assert len(store.write(Batch(events=[attacker])).new_events) == 1
    assert len(store.write(Batch(events=[victim, other_site])).new_events) == 2
    assert store.event_count() == 3 and store.dead_letter_count() == 0
    assert {(r["site"], r["camera_id"]) for r in rollups.hourly(store, since=T0 - 3600)} == {
        ("lobby", "cam-1"), ("lobby", "cam-2"), ("garage", "cam-1")}


def test_the_same_event_id_with_different_content_is_a_conflict_dead_letter(store):
    from cloud_sink import rollups

    first = make_event(track_id=1)
    changed = dict(first, track_id=2)
    written = store.write(Batch(events=[first]))
    assert len(written.new_events) == 1 and written.conflicts == 0
    again = store.write(Batch(events=[dict(first), changed]))  # a true redelivery, and a conflicting copy
    assert again.new_events == [] and again.conflicts == 1
    (dead,) = store.dead_letters()
    assert "conflict" in dead["reason"] and first["event_id"] in dead["reason"]
    assert dead["topic"] == "smartcam/lobby/cam-1/events" and json.loads(dead["payload"]) == changed
    (row,) = rollups.hourly(store, since=T0 - 3600)
    assert row["entries"] == 1 and row["unique_tracks"] == 1  # the first copy counts, the conflict does not
    within = make_event(track_id=5)  # both copies in one batch: the first is stored, the second dead-lettered
    one = store.write(Batch(events=[within, dict(within, track_id=6)]))
    assert [e["event_id"] for e in one.new_events] == [within["event_id"]] and one.conflicts == 1


def _summary(site: str = "lobby", camera_id: str = "cam-1", entries: int = 1) -> dict[str, Any]:
    from contract.rollup import summary_document

    events = [make_event(ts=T0 // 60 * 60 + 1 + i, site=site, camera_id=camera_id, track_id=i)
              for i in range(entries)]
    return summary_document(events, summary_id=new_event_id(), start_s=int(T0) // 60 * 60, interval_s=60)


def test_summary_ids_are_scoped_to_the_camera_and_conflicts_are_dead_letters(store):
    doc = _summary()
    twin = dict(_summary(camera_id="cam-2"), summary_id=doc["summary_id"])
    assert len(store.write(Batch(summaries=[doc, twin])).new_summaries) == 2
    changed = _summary(entries=2)
    changed["summary_id"] = doc["summary_id"]
    written = store.write(Batch(summaries=[dict(doc), changed]))
    assert written.new_summaries == [] and written.summary_conflicts == 1
    (dead,) = store.dead_letters()
    assert "conflict" in dead["reason"] and dead["topic"] == "smartcam/lobby/cam-1/summary"
    assert store.summary_count() == 2


def test_a_version_3_database_migrates_to_camera_scoped_ids(db_url):
    """An existing database (event_id / summary_id the whole key) keeps its rows and gains the scoped key."""
    s = Store.open(db_url)
    kept = make_event(track_id=1)
    doc = _summary()
    s.write(Batch(events=[kept], summaries=[doc]))
    old = sa.MetaData()
    old_events = sa.Table("events", old, *[sa.Column(c.name, c.type, primary_key=c.name == "event_id",
                                                    nullable=c.nullable) for c in s_events()])
    old_summaries = sa.Table("summaries", old, *[sa.Column(c.name, c.type, primary_key=c.name == "summary_id",
                                                          nullable=c.nullable) for c in s_summaries()])
    with s.engine.begin() as conn:  # rebuild both tables the way migrations 1 and 3 made them
        rows = [dict(r) for r in conn.execute(sa.text("SELECT * FROM events")).mappings()]
        srows = [dict(r) for r in conn.execute(sa.text("SELECT * FROM summaries")).mappings()]
        conn.execute(sa.text("DROP TABLE events"))
        conn.execute(sa.text("DROP TABLE summaries"))
        old.create_all(conn)
        conn.execute(old_events.insert(), rows)
        conn.execute(old_summaries.insert(), srows)
        conn.execute(sa.text("DELETE FROM schema_migrations WHERE version >= 4"))
    s.close()
    upgraded = Store.open(db_url)
    assert upgraded.schema_version() == MIGRATIONS[-1][0]
    assert upgraded.events()[0]["payload"] == kept and upgraded.summary_count() == 1
    twin = dict(make_event(camera_id="cam-2", track_id=9), event_id=kept["event_id"])
    assert len(upgraded.write(Batch(events=[kept, twin])).new_events) == 1  # the redelivery is still a duplicate
    assert upgraded.event_count() == 2
    upgraded.close()


def s_events() -> list[sa.Column]:
    from cloud_sink.store import events_table

    return list(events_table.columns)


def s_summaries() -> list[sa.Column]:
    from cloud_sink.store import summaries_table

    return list(summaries_table.columns)


def test_rollup_counters_do_not_overflow_on_postgresql(db_url):
    """Sums past 2**31 (PostgreSQL INTEGER) are stored: the rollup counters are BIGINT, also in a database made
    before they were (its INTEGER columns are widened by a migration)."""
    from cloud_sink import rollups

    s = Store.open(db_url)
    if s.dialect == "postgresql":
        with s.engine.begin() as conn:  # as migrations 1-3 made them
            for table, columns in (("rollup_hourly", ("entries", "exits", "unique_tracks", "occupancy_max",
                                                      "occupancy_samples", "dwell_count", "loiters")),
                                   ("rollup_dwell", ("n",)), ("rollup_lines", ("in_count", "out_count")),
                                   ("rollup_daily", ("unique_tracks",)), ("summaries", ("events",))):
                for column in columns:
                    conn.execute(sa.text(f'ALTER TABLE {table} ALTER COLUMN "{column}" TYPE INTEGER'))
            conn.execute(sa.text("DELETE FROM schema_migrations WHERE description LIKE '%64-bit%'"))
        s.close()
        s = Store.open(db_url)
    hour = int(T0) // 3600 * 3600
    area = {"entries": 360_000, "exits": 0, "loiters": 0, "tracks": [],
            "occupancy": {"max": 0, "sum": 0, "samples": 0}, "dwell": {"sum": 0.0, "count": 0, "bins": {}}}
    docs = [{"schema_version": 1, "summary_id": new_event_id(), "site": "lobby", "camera_id": "cam-1",
             "model": {"name": "m", "sha256": "0123456789ab"}, "frame": {"width": 640, "height": 480},
             "start": format_ts(hour + i % 60 * 60), "end": format_ts(hour + i % 60 * 60 + 60), "events": 360_000,
             "areas": [area], "lines": []} for i in range(6000)]
    assert len(s.write(Batch(summaries=docs)).new_summaries) == 6000
    (row,) = rollups.hourly(s, since=hour, until=hour + 3600)
    assert row["entries"] == 6000 * 360_000 > 2**31
    s.close()


def test_last_seen_is_never_later_than_arrival_for_events_stats_and_summaries(store):
    """One rule for last_seen: the newest capture time, but never later than when the sink received it (a camera
    clock up to max_future_s ahead must not make a camera look alive in the future)."""
    received = T0
    ahead = T0 + 1800  # half an hour ahead of the sink's clock: inside the default window
    store.write(Batch(events=[make_event(ts=ahead, camera_id="cam-e")]), received_at=received)
    stats = {"schema_version": 1, "ts": format_ts(ahead), "site": "lobby", "camera_id": "cam-s", "input_fps": 1.0,
             "processed_fps": 1.0, "inference_ms_p50": 1.0, "inference_ms_p95": 1.0, "frames_in": 1,
             "frames_processed": 1, "motion_skipped": 0, "dropped_frames": 0, "outbox_depth": 0, "outbox_dropped": 0,
             "cpu_percent": 1.0, "source_state": "connected"}
    store.write(Batch(stats=[("lobby", "cam-s", stats)]), received_at=received)
    doc = _summary(camera_id="cam-m")
    store.write(Batch(summaries=[doc]), received_at=T0 - 3600)  # received before its window ended
    seen = {c["camera_id"]: c["last_seen"] for c in store.cameras()}
    assert seen == {"cam-e": format_ts(received), "cam-s": format_ts(received), "cam-m": format_ts(T0 - 3600)}
    store.write(Batch(events=[make_event(ts=T0 - 5, camera_id="cam-e", track_id=2)]), received_at=T0 + 10)
    assert {c["camera_id"]: c["last_seen"] for c in store.cameras()}["cam-e"] == format_ts(received)

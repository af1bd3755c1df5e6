"""Summary messages, sink side: a stored summary counts exactly like the events it stands for.

What must hold: storing the summaries of a set of events gives the same rollups (hourly, daily, dwell, lines,
peak hour, report) as storing the events themselves, on SQLite and PostgreSQL; a summary is applied once however
often it is delivered; a bad summary is a dead letter and changes nothing; and a real Mosquitto + the sink's
subscriber deliver it end to end. (An edge in summary mode sends no retained snapshots: tests/test_summary_edge.py.)
"""

from __future__ import annotations

import itertools
import json
import os
import random
import time
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cloud_sink import rollups
from cloud_sink.ingest import SUBSCRIPTIONS, Ingestor
from cloud_sink.store import MIGRATIONS, Batch, Store
from cloud_sink.validation import Limits, check_message
from contract.rollup import SUMMARY_LEAF, window_start
from contract.timestamps import format_ts, ts_ms
from contract.topics import topic_for
from tests.conftest import make_event
from tests.sink_scenario import summaries_of

DAY = 86400
D1 = 1_780_000_000 // DAY * DAY + DAY  # 2026-05-29T00:00:00Z
H0 = D1 - 3600  # 23:00 the day before: the scenario spans two hours and two days
NOW = D1 + 7200.0  # the validation clock for these fixed-time tests
INTERVAL = 60
_names = itertools.count()


# ------------------------------------------------------------------------------------------ scenario
def scenario(seed: int = 7) -> list[dict[str, Any]]:
    """Two cameras over two hours (23:00-01:00 UTC): people entering and leaving (some across the hour and the
    day), a zone with dwell and loiters, a line crossed both ways, whole-camera and zone counts."""
    rnd = random.Random(seed)
    out: list[dict[str, Any]] = []
    for cam in ("cam-1", "cam-2"):
        people = 0
        for n in range(40 if cam == "cam-1" else 15):
            track = n + 1
            t_in = H0 + rnd.uniform(0, 7000)
            dwell = round(rnd.choice([rnd.uniform(0.5, 9.5), rnd.uniform(10, 400)]), 3)
            t_out = min(t_in + dwell, H0 + 7199)
            dwell = round(t_out - t_in, 3)
            e = dict(site="lobby", camera_id=cam, track_id=track)
            out.append(make_event("person.enter", ts=t_in, **e))
            out.append(make_event("person.exit", ts=t_out, dwell_s=dwell, **e))
            if n % 3 == 0:
                z_in, z_dwell = t_in + 0.2, round(dwell * 0.7, 3)
                out.append(make_event("zone.enter", ts=z_in, zone="door", **e))
                out.append(make_event("zone.exit", ts=z_in + z_dwell, zone="door", dwell_s=z_dwell, **e))
                out.append(make_event("count", ts=z_in, zone="door", count=1, previous=0, site="lobby",
                                      camera_id=cam))
                if z_dwell > 60:
                    out.append(make_event("loiter", ts=z_in + 60, zone="door", dwell_s=60.0, **e))
            if n % 4 == 1:
                out.append(make_event("line.cross", ts=t_in + 0.1, line="gate", direction=rnd.choice(["in", "out"]),
                                      totals={"in": n, "out": n}, **e))
        moves = [ts_ms(ev["ts"]) / 1000 for ev in out
                 if ev["camera_id"] == cam and ev["type"] in ("person.enter", "person.exit")]
        for t in sorted(moves):  # a count report after each move (a random walk: only the figures matter)
            people = max(0, people + rnd.choice([-1, 1]))
            out.append(make_event("count", ts=t + 0.05, site="lobby", camera_id=cam, count=people,
                                  previous=max(0, people - 1)))
    return sorted(out, key=lambda ev: ev["ts"])


def message(doc: dict[str, Any]) -> tuple[str, bytes]:
    return topic_for(doc["site"], doc["camera_id"], SUMMARY_LEAF), json.dumps(doc, separators=(",", ":")).encode()


def rounded(value: Any) -> Any:
    """Floats to 6 decimals (the summary keeps dwell sums to the millisecond), recursively."""
    if isinstance(value, float):
        return round(value, 6)
    if isinstance(value, dict):
        return {k: rounded(v) for k, v in value.items()}
    if isinstance(value, list):
        return [rounded(v) for v in value]
    return value


def figures(store: Store) -> dict[str, Any]:
    """Every rollup query the API, report and dashboard use, over the scenario's range."""
    since, until = H0, H0 + 7200
    out: dict[str, Any] = {}
    for zone in (None, "*", "door"):
        out[f"hourly-{zone}"] = rollups.hourly(store, since=since, until=until, zone=zone)
        out[f"daily-{zone}"] = rollups.daily(store, since=since, until=until, zone=zone)
        out[f"peak-{zone}"] = rollups.peak_hour(store, since=since, until=until, zone=zone)
        for cam in ("cam-1", "cam-2"):
            out[f"dwell-{cam}-{zone}"] = rollups.dwell(store, since=since, until=until, camera_id=cam, zone=zone)
    out["lines"] = rollups.lines(store, since=since, until=until)
    report = rollups.overview(store, since=since, until=until)
    report.pop("events_total")  # events stored: none in summary mode
    report.pop("summaries_total")  # and no summary in events mode
    for cam in report["cameras"]:
        cam.pop("last_seen")  # newest event time vs. end of the newest window
    out["report"] = report
    return rounded(out)


def open_store(kind: str, tmp_path, request) -> Store:
    if kind == "sqlite":
        return Store.open(f"sqlite:///{tmp_path / f'{next(_names)}.db'}")
    server = request.getfixturevalue("postgres_server")
    return Store.open(server.create_database(f"sm{next(_names)}_{os.getpid()}"))


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.slow)])
def two_stores(request, tmp_path):
    """Two fresh, empty databases of the same kind: one fed events, one fed summaries."""
    stores = [open_store(request.param, tmp_path, request) for _ in range(2)]
    yield stores
    for s in stores:
        s.close()


@pytest.fixture
def store(tmp_path):
    s = Store.open(f"sqlite:///{tmp_path / 'sink.db'}")
    yield s
    s.close()


# ------------------------------------------------------------------------------------------ equivalence
def test_summaries_give_the_same_rollups_as_their_events(two_stores):
    by_events, by_summaries = two_stores
    events = scenario()
    docs = summaries_of(events)
    assert len(by_events.write(Batch(events=events)).new_events) == len(events)
    ing = Ingestor(by_summaries)
    result = ing.handle([message(d) for d in docs], now=NOW)  # the whole road: validation, then store
    assert (result.summaries, result.summary_duplicates, result.dead) == (len(docs), 0, 0), result.reasons
    assert by_summaries.summary_count() == len(docs) and by_summaries.event_count() == 0
    a, b = figures(by_events), figures(by_summaries)
    assert a["hourly-None"] and a["hourly-*"] and a["lines"] and a["dwell-cam-1-door"]["n"]  # not vacuous
    assert [d["day"] for d in a["daily-None"] if d["camera_id"] == "cam-1"] == ["2026-05-28", "2026-05-29"]
    for key in a:
        assert a[key] == b[key], key
    # per camera totals agree too: events_total counts the events a summary stands for
    assert [c["events_total"] for c in by_events.cameras()] == [c["events_total"] for c in by_summaries.cameras()]
    # occupancy: with buckets of the window or coarser, the same points
    for bucket in (60, 300, 3600):
        for zone in (None, "*", "door"):
            expect = rollups.occupancy(by_events, since=H0, until=H0 + 7200, zone=zone, bucket_s=bucket)
            got = rollups.occupancy(by_summaries, since=H0, until=H0 + 7200, zone=zone, bucket_s=bucket)
            assert expect and rounded(got) == rounded(expect), (bucket, zone)


def test_half_events_half_summaries_add_up_to_the_same_rollups(two_stores):
    """A camera switched to summary mode mid-stream: cam-1 sends events, cam-2 summaries, into one sink."""
    by_events, mixed = two_stores
    events = scenario(seed=11)
    by_events.write(Batch(events=events))
    mixed.write(Batch(events=[e for e in events if e["camera_id"] == "cam-1"]))
    assert len(mixed.write(Batch(summaries=summaries_of([e for e in events if e["camera_id"] == "cam-2"]))).new_summaries) > 0
    assert figures(by_events) == figures(mixed)


# ------------------------------------------------------------------------------------------ occupancy
def test_occupancy_from_summaries_is_one_point_per_window(store):
    start = H0 + 600
    counts = [make_event("count", ts=start + i * 5, count=c, previous=0) for i, c in enumerate([1, 3, 2, 2])]
    counts += [make_event("count", ts=start + 70, count=4, previous=2)]  # the next window
    counts += [make_event("count", ts=start + 10, zone="door", count=1, previous=0)]
    store.write(Batch(summaries=summaries_of(counts)))
    rows = rollups.occupancy(store, since=H0, until=H0 + 3600, bucket_s=60)
    assert [(r["t_ts"], r["max"], r["mean"], r["samples"]) for r in rows] == [(start, 3, 2.0, 4), (start + 60, 4, 4.0, 1)]
    (door,) = rollups.occupancy(store, since=H0, until=H0 + 3600, zone="door", bucket_s=60)
    assert (door["zone"], door["max"], door["samples"]) == ("door", 1, 1)
    assert len(rollups.occupancy(store, since=H0, until=H0 + 3600, zone="*", bucket_s=60)) == 1
    # no finer than the window: 10-s buckets still give one point per window, at its start
    assert [r["t_ts"] for r in rollups.occupancy(store, since=H0, until=H0 + 3600, bucket_s=10)] == [start,
                                                                                                      start + 60]
    # the range is on the window start
    assert rollups.occupancy(store, since=start + 1, until=H0 + 3600, bucket_s=60)[0]["t_ts"] == start + 60
    assert rollups.occupancy(store, since=H0, until=H0 + 3600, bucket_s=60, camera_id="cam-2") == []


# ------------------------------------------------------------------------------------------ idempotency
def test_a_summary_redelivered_counts_once_and_two_summaries_of_a_window_add_up(store):
    events = [e for e in scenario() if e["camera_id"] == "cam-2"]
    docs = summaries_of(events)
    ing = Ingestor(store)
    first = ing.handle([message(d) for d in docs] + [message(docs[0])], now=NOW)  # twice in one batch
    assert (first.summaries, first.summary_duplicates) == (len(docs), 1)
    once = figures(store)
    again = ing.handle([message(d) for d in docs], now=NOW)  # QoS 1 redelivery / outbox replay
    assert (again.summaries, again.summary_duplicates, again.dead) == (0, len(docs), 0)
    assert figures(store) == once and store.summary_count() == len(docs)
    assert store.cameras()[0]["events_total"] == len(events)
    assert ing.totals.summaries == len(docs) and ing.totals.summary_duplicates == len(docs) + 1

    # a window summarised in two messages (late events for a window already sent): both count
    window = ts_ms(docs[0]["start"]) // 1000
    late = [make_event("person.enter", ts=window + 59, camera_id="cam-2", track_id=999),
            make_event("count", ts=window + 59, camera_id="cam-2", count=7, previous=6)]
    (extra,) = summaries_of(late)
    assert extra["start"] == docs[0]["start"] and len(store.write(Batch(summaries=[extra])).new_summaries) == 1
    with_events = Store.open("sqlite://")
    try:
        with_events.write(Batch(events=events + late))
        assert figures(store) == figures(with_events)
    finally:
        with_events.close()


# ------------------------------------------------------------------------------------------ dead letters
def _doc() -> dict[str, Any]:
    start = H0 + 1200
    events = [make_event("person.enter", ts=start + 1, track_id=3), make_event("person.enter", ts=start + 2,
                                                                                track_id=4),
              make_event("person.exit", ts=start + 5, track_id=3, dwell_s=4.0),
              make_event("zone.enter", ts=start + 3, zone="door", track_id=4),
              make_event("count", ts=start + 1, count=1)]
    (doc,) = summaries_of(events)
    return doc


def _mutate(path: str, value: Any):
    def apply(doc: dict[str, Any]) -> dict[str, Any]:
        *parents, last = path.split(".")
        target: Any = doc
        for p in parents:
            target = target[int(p)] if isinstance(target, list) else target[p]
        target[int(last) if isinstance(target, list) else last] = value
        return doc
    return apply


BAD = [
    ("schema", _mutate("events", 0), "schema: events"),
    ("schema-extra", _mutate("extra", 1), "schema: <root>: Additional properties"),
    ("camera-mismatch", _mutate("camera_id", "cam-9"), "differ from topic lobby/cam-1"),
    ("crosses-hour", _mutate("end", format_ts(H0 + 3600 + 60)), "crosses an hour boundary"),
    ("empty-window", _mutate("end", format_ts(H0 + 1200)), "empty or longer than an hour"),
    ("unsorted-ranges", _mutate("areas.0.tracks", [[4, 4], [3, 3]]), "sorted"),
    ("bins", _mutate("areas.0.dwell.bins", {"7": 2}), "do not add up to its dwell count"),
    ("occupancy", _mutate("areas.0.occupancy", {"max": 1, "sum": 5, "samples": 1}), "occupancy of zone"),
    ("zone-twice", lambda d: dict(d, areas=d["areas"] + [d["areas"][1]]), "lists zone 'door' twice"),
    ("events-count", _mutate("events", 50), "events is 50 but its counters add up to 5"),
    ("future", lambda d: dict(d, start=format_ts(NOW + 7200), end=format_ts(NOW + 7260)), "in the future"),
]


@pytest.mark.parametrize("name,mutate,reason", BAD, ids=[b[0] for b in BAD])
def test_bad_summaries_are_dead_letters_with_a_reason_and_change_nothing(store, name, mutate, reason):
    doc = mutate(_doc())
    topic = topic_for("lobby", "cam-1", SUMMARY_LEAF)
    result = Ingestor(store).handle([(topic, json.dumps(doc).encode())], now=NOW)
    assert result.dead == 1 and result.summaries == 0
    assert reason in result.reasons[0], result.reasons
    assert store.summary_count() == 0 and rollups.hourly(store, since=H0 - 3600, until=NOW) == []
    (dead,) = store.dead_letters()
    assert dead["topic"] == topic and reason in dead["reason"]


def test_bad_json_and_too_many_tracks_are_dead_letters():
    topic = topic_for("lobby", "cam-1", SUMMARY_LEAF)
    assert "invalid JSON" in check_message(topic, b'{"summary_id": ', now=NOW).reason
    assert "duplicate key" in check_message(topic, b'{"a": 1, "a": 2}', now=NOW).reason
    doc = _doc()
    assert check_message(topic, json.dumps(doc).encode(), now=NOW).kind == "summary"
    doc["areas"][0]["tracks"] = [[1, 10]]
    tight = check_message(topic, json.dumps(doc).encode(), now=NOW, limits=Limits(max_summary_tracks=5))
    assert tight.kind == "dead" and "more than 5 tracks" in tight.reason
    big = check_message(topic, b" " * (Limits().max_bytes + 1), now=NOW)
    assert big.kind == "dead" and "exceeds" in big.reason


def test_summaries_are_a_table_of_migration_3_and_listed_newest_first(store):
    assert MIGRATIONS[2][:2] == (3, "summaries") and store.schema_version() >= 3
    docs = summaries_of(scenario())
    store.write(Batch(summaries=docs))
    listed = store.summaries(camera_id="cam-2", limit=1000)
    assert listed and all(r["camera_id"] == "cam-2" for r in listed)
    assert [r["start"] for r in listed] == sorted((r["start"] for r in listed), reverse=True)
    assert listed[0]["payload"] == next(d for d in docs if d["summary_id"] == listed[0]["summary_id"])
    window = store.summaries(since=H0 + 600, until=H0 + 1200, limit=1000)
    assert window and all(H0 + 600 <= ts_ms(r["start"]) / 1000 < H0 + 1200 for r in window)


def test_api_lists_summaries_with_filters_and_pagination(store):
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from fastapi.testclient import TestClient

    from cloud_sink.api import create_app

    docs = summaries_of(scenario())
    store.write(Batch(summaries=docs))
    client = TestClient(create_app(store))
    page = client.get("/api/summaries", params={"camera": "cam-1", "limit": 5}).json()
    assert len(page["summaries"]) == 5 and page["next_offset"] == 5
    assert all(s["camera_id"] == "cam-1" for s in page["summaries"])
    everything = client.get("/api/summaries", params={"limit": 1000}).json()
    assert len(everything["summaries"]) == len(docs) and everything["next_offset"] is None
    assert client.get("/api/summaries", params={"camera": "bad/name"}).status_code == 422


# ------------------------------------------------------------------------------------------ real broker
@pytest.mark.slow
def test_a_summary_through_real_mosquitto_is_stored_once(mosquitto, tmp_path):
    from tests.sink_clients import RealSink, publish, wait_for

    assert "smartcam/+/+/summary" in SUBSCRIPTIONS
    sink = RealSink(mosquitto.url, tmp_path / "live.db", client_id="sink-summary")
    s = sink.store
    try:
        start = window_start(time.time() - 120, INTERVAL)  # a closed window, as the edge sends it
        events = [make_event("person.enter", ts=start + 1, track_id=1), make_event("count", ts=start + 1, count=1),
                  make_event("person.enter", ts=start + 5, track_id=2),
                  make_event("count", ts=start + 5, count=2, previous=1),
                  make_event("person.exit", ts=start + 30, track_id=1, dwell_s=29.0),
                  make_event("count", ts=start + 30, count=1, previous=2)]
        (doc,) = summaries_of(events)
        publish(mosquitto.url, [message(doc)])
        publish(mosquitto.url, [message(doc)])  # redelivered
        wait_for(lambda: s.summary_count() == 1 and sink.ingestor.totals.summary_duplicates == 1,
                 what="1 summary, 1 duplicate")
        assert s.event_count() == 0
        (hour,) = rollups.hourly(s, since=start, until=start + INTERVAL)
        assert (hour["entries"], hour["exits"], hour["unique_tracks"], hour["dwell_mean"]) == (2, 1, 2, 29.0)
        assert (hour["occupancy_max"], hour["occupancy_mean"]) == (2, pytest.approx(4 / 3))
        (cam,) = s.cameras()
        assert cam["events_total"] == 6 and cam["last_seen"] == format_ts(start + INTERVAL)
    finally:
        sink.close()
    assert not sink.thread.is_alive()


_values = st.one_of(st.none(), st.booleans(), st.integers(min_value=-2**70, max_value=2**70),
                    st.floats(allow_nan=False), st.text(max_size=12),
                    st.lists(st.lists(st.integers(min_value=-5, max_value=2**64), max_size=3), max_size=3),
                    st.dictionaries(st.text(max_size=5), st.integers(min_value=-3, max_value=2**40), max_size=3))
_paths = ["events", "start", "end", "summary_id", "areas", "lines", "areas.0.tracks", "areas.0.entries",
          "areas.0.occupancy", "areas.0.occupancy.max", "areas.0.dwell.bins", "areas.0.dwell.sum", "areas.1.zone",
          "areas.0.dwell.count", "model", "frame"]


def test_hostile_summaries_never_crash_and_nothing_bad_is_stored(tmp_path):
    s = Store.open(f"sqlite:///{tmp_path / 'fuzz.db'}")
    ing = Ingestor(s, limits=Limits(dead_letter_burst=10**6))  # every verdict stored (no dead-letter rate limit)
    topic = topic_for("lobby", "cam-1", SUMMARY_LEAF)

    @settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(st.lists(st.tuples(st.sampled_from(_paths), _values), min_size=1, max_size=3))
    def run(changes):
        doc = _doc()
        try:
            for path, value in changes:
                _mutate(path, value)(doc)
        except (IndexError, KeyError, TypeError, ValueError):
            return  # the path no longer exists after an earlier change (e.g. "areas.0.x" once areas is [[]])
        payload = json.dumps(doc).encode()
        verdict = check_message(topic, payload, now=NOW)
        before = s.summary_count()
        result = ing.handle([(topic, payload)], now=NOW)  # never raises
        assert result.dead + result.summaries + result.summary_duplicates == 1
        assert (verdict.kind == "dead") == (result.dead == 1)
        if verdict.kind == "summary":
            assert s.summary_count() == before + result.summaries
        else:
            assert s.summary_count() == before and verdict.reason
            assert not verdict.reason.startswith("unexpected"), verdict.reason  # refused on purpose, not by a crash

    try:
        run()
    finally:
        s.close()

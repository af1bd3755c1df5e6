"""Summary publishing mode, edge side: the shared summary maths, the durable per-window staging, the real run.

What must hold: a summary stands for exactly the rollup increments of its window's events; events wait durably
in the outbox until their window closes and are then replaced by the summary in one transaction (a restart loses
and double-counts nothing); an edge in summary mode on a real clip sends summaries, status and stats but no
per-event message and no retained snapshot, and its summaries equal those built from the events it wrote.
"""

from __future__ import annotations

import json
from collections import Counter, defaultdict

import pytest

from camera.config import ConfigError, load_config
from camera.outbox import Outbox
from camera.summarizer import Summarizer
from cloud_sink.rollups import expand_ranges, merge_deltas, summary_deltas
from contract.ids import new_event_id
from contract.rollup import Deltas, deltas, summary_document, track_ranges, window_start
from contract.schema import SUMMARY_SCHEMA_FILE, validation_errors
from contract.timestamps import ts_ms
from contract.topics import topic_for
from tests.conftest import ONNX_FP32, STREET_CLIP, make_event
from tests.services import CAM, SITE, Subscriber, read_events, run_edge

T0 = 1_790_000_000 // 3600 * 3600  # an hour boundary


def scene(t0: float = T0, site: str = SITE, camera_id: str = CAM) -> list[dict]:
    """Events of every type over 150 s: people entering and leaving, a zone, a line, counts, a loiter."""
    out = []
    for i in range(12):
        t = t0 + 12 * i + 1
        track = 100 + i
        out.append(make_event("person.enter", ts=t, site=site, camera_id=camera_id, track_id=track))
        out.append(make_event("count", ts=t, site=site, camera_id=camera_id, count=i % 4 + 1, previous=i % 4))
        if i % 2:
            out.append(make_event("zone.enter", ts=t + 1, site=site, camera_id=camera_id, zone="door", track_id=track))
            out.append(make_event("zone.exit", ts=t + 3, site=site, camera_id=camera_id, zone="door", track_id=track,
                                  dwell_s=round(2.0 + i / 7, 3)))  # the edge rounds to ms
            out.append(make_event("count", ts=t + 3, site=site, camera_id=camera_id, zone="door", count=1,
                                  previous=0))
        if i % 3 == 0:
            out.append(make_event("line.cross", ts=t + 2, site=site, camera_id=camera_id, line="gate", track_id=track,
                                  direction="in" if i % 2 else "out", totals={"in": i, "out": i}))
        out.append(make_event("person.exit", ts=t + 9, site=site, camera_id=camera_id, track_id=track,
                              dwell_s=8.0 + i * 3.1))
    out.append(make_event("loiter", ts=t0 + 140, site=site, camera_id=camera_id, zone="door", track_id=107,
                          dwell_s=61.0))
    return sorted(out, key=lambda e: e["ts"])


def by_window(events: list[dict], interval: int) -> dict[int, list[dict]]:
    groups: dict[int, list[dict]] = defaultdict(list)
    for ev in events:
        groups[window_start(ts_ms(ev["ts"]) / 1000, interval)].append(ev)
    return dict(sorted(groups.items()))


def merged(delta_list) -> tuple[dict, set, dict, dict]:
    """Several Deltas added up the way the store adds them (``merge_deltas``), floats rounded for comparison."""
    total = Deltas()
    for d in delta_list:
        merge_deltas(total, d)
    hourly = {k: {n: round(v, 6) for n, v in row.items()} for k, row in total.hourly.items()}
    return hourly, total.tracks, dict(total.dwell_bins), dict(total.lines)


# ---------------------------------------------------------------------------------------------- maths
@pytest.mark.parametrize("interval", [10, 60, 300])
def test_summaries_stand_for_exactly_the_rollups_of_their_events(interval):
    events = scene()
    docs = [summary_document(evs, summary_id=new_event_id(), start_s=start, interval_s=interval)
            for start, evs in by_window(events, interval).items()]
    for doc in docs:
        assert validation_errors(doc, SUMMARY_SCHEMA_FILE) == []
    assert sum(d["events"] for d in docs) == len(events)
    assert merged(summary_deltas(d) for d in docs) == merged([deltas(events)])
    # and the figures themselves are what the events say
    camera = [a for d in docs for a in d["areas"] if "zone" not in a]
    assert sum(a["entries"] for a in camera) == 12 and sum(a["exits"] for a in camera) == 12
    assert sum(a["loiters"] for d in docs for a in d["areas"] if a.get("zone") == "door") == 1
    assert sum(line["in"] + line["out"] for d in docs for line in d["lines"]) == 4


def test_a_summary_is_refused_for_events_outside_its_window_or_of_two_cameras():
    events = scene()
    with pytest.raises(ValueError, match="outside the window"):
        summary_document(events, summary_id=new_event_id(), start_s=T0, interval_s=60)
    mixed = [make_event(ts=T0 + 1, camera_id="a"), make_event(ts=T0 + 2, camera_id="b")]
    with pytest.raises(ValueError, match="one camera"):
        summary_document(mixed, summary_id=new_event_id(), start_s=T0, interval_s=60)
    with pytest.raises(ValueError, match="divides an hour"):
        summary_document(events[:1], summary_id=new_event_id(), start_s=T0, interval_s=7)
    assert summary_document([], summary_id=new_event_id(), start_s=T0, interval_s=60) is None


def test_summary_deltas_rejects_what_the_schema_cannot_say():
    doc = summary_document([e for e in scene() if ts_ms(e["ts"]) < (T0 + 60) * 1000], summary_id=new_event_id(),
                           start_s=T0, interval_s=60)
    cases = {
        "crosses an hour": {**doc, "start": "2026-01-01T10:59:30.000Z", "end": "2026-01-01T11:00:30.000Z"},
        "empty or longer": {**doc, "end": doc["start"]},
        "sorted, disjoint": {**doc, "areas": [{**doc["areas"][0], "tracks": [[5, 9], [7, 12]]}]},
        "do not add up": {**doc, "areas": [{**doc["areas"][0], "dwell": {"sum": 1.0, "count": 3, "bins": {"2": 1}}}]},
        "inconsistent": {**doc, "areas": [{**doc["areas"][0], "occupancy": {"max": 1, "sum": 9, "samples": 2}}]},
        "twice": {**doc, "areas": [doc["areas"][0], doc["areas"][0]]},
    }
    for reason, bad in cases.items():
        with pytest.raises(ValueError, match=reason):
            summary_deltas(bad)
    with pytest.raises(ValueError, match="more than 3 tracks"):
        summary_deltas(doc, max_tracks=3)


def test_track_ranges_round_trip():
    ids = [1, 2, 3, 10, 11, 40, 7]
    assert track_ranges(ids) == [[1, 3], [7, 7], [10, 11], [40, 40]]
    assert expand_ranges(track_ranges(ids), limit=100) == sorted(ids)
    with pytest.raises(ValueError, match="more than 4"):
        expand_ranges([[1, 5]], limit=4)


# ---------------------------------------------------------------------------------------------- staging
def outbox_rows(box: Outbox) -> list[tuple[str, dict, bool]]:
    return [(r.topic, json.loads(r.payload), r.retain) for r in box.fetch(0, 10_000)]


def stage_frames(summarizer: Summarizer, events: list[dict]) -> None:
    """As the frame loop does: each frame's events at once (here: one event per call)."""
    for ev in events:
        summarizer.add([ev], [json.dumps(ev)])


def test_events_wait_staged_until_their_window_closes_then_one_summary_replaces_them(tmp_path):
    box = Outbox(tmp_path / "o.db")
    s = Summarizer(box, interval_s=60)
    events = scene()
    stage_frames(s, events)
    assert box.depth() == 0 and box.staged_windows() == [T0, T0 + 60, T0 + 120]
    assert s.close_due(T0 + 59.9) == 0
    queued = s.close_due(T0 + 60)
    rows = outbox_rows(box)
    assert len(rows) == queued and box.staged_windows() == [T0 + 60, T0 + 120]
    summary = [doc for topic, doc, _ in rows if topic == topic_for(SITE, CAM, "summary")]
    assert len(summary) == 1 and validation_errors(summary[0], SUMMARY_SCHEMA_FILE) == []
    first_window = by_window(events, 60)[T0]
    assert summary[0]["events"] == len(first_window)
    # the summary only: no per-event message, and no retained snapshot (an event the sink would count again)
    assert [topic for topic, _, _ in rows] == [topic_for(SITE, CAM, "summary")]
    assert s.close_all() > 0 and box.staged_windows() == []
    summaries = [doc for topic, doc, _ in outbox_rows(box) if topic.endswith("/summary")]
    assert merged(summary_deltas(d) for d in summaries) == merged([deltas(events)])
    box.close()


def test_staged_events_survive_a_crash_and_are_summarised_once(tmp_path):
    events = scene()
    box = Outbox(tmp_path / "o.db")
    s = Summarizer(box, interval_s=60)
    stage_frames(s, events[:20])
    s.close_due(T0 + 60)
    before = outbox_rows(box)
    box.close()  # the process dies here: nothing else is written

    box = Outbox(tmp_path / "o.db")
    s = Summarizer(box, interval_s=60)
    assert outbox_rows(box) == before  # the first window's summary is still queued, exactly once
    stage_frames(s, events[20:])
    s.close_all()
    summaries = [doc for topic, doc, _ in outbox_rows(box) if topic.endswith("/summary")]
    assert sum(d["events"] for d in summaries) == len(events)
    assert merged(summary_deltas(d) for d in summaries) == merged([deltas(events)])
    box.close()


def test_a_restart_with_another_interval_regroups_what_was_staged(tmp_path):
    events = scene()
    box = Outbox(tmp_path / "o.db")
    stage_frames(Summarizer(box, interval_s=300), events)
    assert box.staged_windows() == [T0]
    s = Summarizer(box, interval_s=30)
    s.close_all()
    summaries = [doc for topic, doc, _ in outbox_rows(box) if topic.endswith("/summary")]
    assert [d["start"] for d in summaries] == sorted(d["start"] for d in summaries)
    assert all(ts_ms(d["end"]) - ts_ms(d["start"]) == 30_000 for d in summaries) and len(summaries) == 5
    assert merged(summary_deltas(d) for d in summaries) == merged([deltas(events)])
    box.close()


def test_config_checks_the_mode_and_the_interval():
    base = {"camera_id": "c", "source": "0", "model": __file__}
    cfg = load_config(overrides={**base, "publish.mode": "summary", "publish.summary_interval_s": 300})
    assert cfg.publish.mode == "summary" and cfg.publish.summary_interval_s == 300
    with pytest.raises(ConfigError, match="divide 3600"):
        load_config(overrides={**base, "publish.summary_interval_s": 70})
    with pytest.raises(ConfigError, match="publish.mode"):
        load_config(overrides={**base, "publish.mode": "video"})


# ---------------------------------------------------------------------------------------------- real run
@pytest.mark.slow
def test_edge_in_summary_mode_sends_summaries_equal_to_its_events_and_no_event_message(mosquitto, tmp_path):
    events_file = tmp_path / "events.jsonl"
    sub = Subscriber(mosquitto.port)
    try:
        # 60 processed frames at 5 fps, stamped so that they span two 10-s windows and an hour boundary
        proc = run_edge("--config", "samples/demo_street.yaml", "--source", str(STREET_CLIP), "--model",
                        str(ONNX_FP32), "--camera-id", CAM, "--site", SITE, "--broker", mosquitto.url,
                        "--max-frames", "60", "--events-file", str(events_file), "--outbox", str(tmp_path / "o.db"),
                        "--publish-mode", "summary", "--summary-interval", "10",
                        "--start-time", "2026-11-22T09:59:55Z")
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert "summary mode: one summary message per 10-s window" in proc.stderr
        written = read_events(events_file)
        assert written, "the street clip has people in its first 12 s"
        expected = by_window(written, 10)
        assert len(expected) >= 2
        assert sub.wait_for(lambda: len(sub.payloads("summary")) >= len(expected))
        assert sub.wait_for(lambda: b"offline" in sub.payloads("status"))
        topics = Counter(t.split("/", 3)[3] for t, _, _ in sub.messages)
    finally:
        sub.close()
    assert set(topics) == {"summary", "status", "stats"}, topics  # no events, batches or retained snapshots
    got = [json.loads(p) for p in sub.payloads("summary")]
    for doc in got:
        assert validation_errors(doc, SUMMARY_SCHEMA_FILE) == []
    assert [ts_ms(d["start"]) // 1000 for d in got] == list(expected)
    assert [d["events"] for d in got] == [len(evs) for evs in expected.values()]
    assert merged(summary_deltas(d) for d in got) == merged([deltas(written)])


def test_the_sample_summary_is_valid_and_readable():
    from pathlib import Path

    for path in sorted((Path(__file__).resolve().parents[1] / "samples" / "summaries").glob("*.json")):
        doc = json.loads(path.read_text())
        assert validation_errors(doc, SUMMARY_SCHEMA_FILE) == [], path.name
        delta = summary_deltas(doc)
        assert sum(row["entries"] for row in delta.hourly.values()) > 0, path.name

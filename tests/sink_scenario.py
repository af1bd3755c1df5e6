"""The hand-counted sink scenario the API, dashboard and archive tests share: two sites, three cameras, three
hours, with known entries, dwell times, counts, a status, stats and a dead letter (``fill`` stores it the way
ingest does), and ``summaries_of``: what edges in summary mode would send for a list of events."""

from __future__ import annotations

from collections import defaultdict
from typing import Any

from contract.ids import new_event_id
from contract.rollup import summary_document, window_start
from contract.schema import validate_event
from contract.timestamps import format_ts, ts_ms

MODEL = {"name": "yolov8n-int8", "sha256": "0123456789ab"}


def make_event(type_: str, ts: float, *, site: str = "lobby", camera: str = "cam-1", **fields: Any) -> dict:
    """A valid v1 event of ``type_`` at epoch ``ts``; ``fields`` override the per-type defaults."""
    dwell = float(fields.get("dwell_s", 10.0))
    defaults: dict[str, dict[str, Any]] = {
        "person.enter": {"track_id": 1, "box": [0.1, 0.1, 0.3, 0.6], "score": 0.8},
        "person.exit": {"track_id": 1, "box": [0.1, 0.1, 0.3, 0.6], "first_seen": format_ts(ts - dwell),
                        "dwell_s": dwell, "score_max": 0.9, "score_mean": 0.7},
        "count": {"count": 0, "previous": 0},
        "zone.enter": {"zone": "door", "track_id": 1},
        "zone.exit": {"zone": "door", "track_id": 1, "dwell_s": dwell},
        "line.cross": {"line": "gate", "track_id": 1, "direction": "in", "totals": {"in": 1, "out": 0}},
        "loiter": {"zone": "door", "track_id": 1, "dwell_s": dwell},
    }
    event = {"schema_version": 1, "event_id": new_event_id(), "type": type_, "ts": format_ts(ts), "site": site,
             "camera_id": camera, "model": dict(MODEL), "frame": {"width": 640, "height": 480},
             **defaults[type_], **fields}
    validate_event(event)
    return event


# ------------------------------------------------------------------------------------------ the scenario
T0 = 1_767_236_400.0  # 2026-01-01T03:00:00Z, an hour boundary
HOUR = 3600


def scenario() -> list[dict]:
    """Two sites, three cameras, three hours: entries 3/1/2 per hour on lobby/cam-1, known dwell and counts."""
    ev = make_event
    return [
        # lobby/cam-1, hour 03: three people in, two out (12 s and 40 s), count reports 1, 2, 3, 1
        ev("person.enter", T0 + 60, track_id=1), ev("count", T0 + 61, count=1, previous=0),
        ev("person.enter", T0 + 120, track_id=2), ev("count", T0 + 121, count=2, previous=1),
        ev("person.enter", T0 + 180, track_id=3), ev("count", T0 + 181, count=3, previous=2),
        ev("person.exit", T0 + 72, track_id=1, dwell_s=12.0), ev("person.exit", T0 + 160, track_id=2, dwell_s=40.0),
        ev("count", T0 + 700, count=1, previous=3),
        ev("zone.enter", T0 + 200, track_id=3, zone="door"),
        # hour 04: one in, two out (track 3 after 3700 s, track 4 after 5 s)
        ev("person.enter", T0 + HOUR + 100, track_id=4),
        ev("person.exit", T0 + HOUR + 105, track_id=4, dwell_s=5.0),
        ev("person.exit", T0 + HOUR + 3000, track_id=3, dwell_s=2820.0),
        ev("count", T0 + HOUR + 3001, count=0, previous=1),
        # hour 05: two in
        ev("person.enter", T0 + 2 * HOUR + 10, track_id=5), ev("person.enter", T0 + 2 * HOUR + 20, track_id=6),
        ev("line.cross", T0 + 2 * HOUR + 30, track_id=6, line="gate", direction="in", totals={"in": 1, "out": 0}),
        # lobby/cam-2 and garage/cam-1 (same camera id on another site)
        ev("person.enter", T0 + 300, camera="cam-2", track_id=1),
        ev("count", T0 + 301, camera="cam-2", count=1, previous=0),
        ev("person.enter", T0 + 400, site="garage", track_id=9),
    ]


def stats_doc(site: str, camera: str, ts: float, fps: float) -> dict:
    return {"schema_version": 1, "ts": format_ts(ts), "site": site, "camera_id": camera, "input_fps": 25.0,
            "processed_fps": fps, "inference_ms_p50": 21.5, "inference_ms_p95": 30.0, "frames_in": 1000,
            "frames_processed": 900, "motion_skipped": 100, "dropped_frames": 0, "outbox_depth": 0,
            "outbox_dropped": 0, "cpu_percent": 55.0, "source_state": "connected"}


def fill(store, events: list[dict]) -> None:
    """Store the scenario the way ingest does: events (with a duplicate batch), status and stats."""
    from cloud_sink.store import Batch

    assert len(store.write(Batch(events=events)).new_events) == len(events)
    assert len(store.write(Batch(events=events[:5])).new_events) == 0, "redelivered events are not stored again"
    store.write(Batch(statuses=[("lobby", "cam-1", "online")]))
    store.write(Batch(stats=[("lobby", "cam-1", stats_doc("lobby", "cam-1", T0 + 3 * HOUR - 5, 12.5))]))
    store.write(Batch(statuses=[("lobby", "cam-2", "offline")]))
    store.write(Batch(dead_letters=[{"topic": "smartcam/lobby/cam-9/events",
                                     "reason": "schema: <root>: not an object", "payload": b"[1, 2, 3]"}]))


def summaries_of(events: list[dict[str, Any]], interval: int = 60) -> list[dict[str, Any]]:
    """What edges in summary mode would send: one summary per camera and window."""
    groups: dict[tuple[str, str, int], list[dict[str, Any]]] = defaultdict(list)
    for ev in events:
        groups[(ev["site"], ev["camera_id"], window_start(ts_ms(ev["ts"]) / 1000, interval))].append(ev)
    return [summary_document(evs, summary_id=new_event_id(), start_s=start, interval_s=interval)
            for (_s, _c, start), evs in sorted(groups.items())]

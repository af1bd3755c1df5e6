"""The read-only review API over real SQLite and PostgreSQL stores."""

from __future__ import annotations

from typing import Any

from camera.contract import format_ts, new_event_id, validate_event

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

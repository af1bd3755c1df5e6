"""MQTT topic names of the contract: one tree, ``smartcam/<site>/<camera>/<leaf>``, and the name rule.

>>> topic_for("lobby", "cam-1", "events")
'smartcam/lobby/cam-1/events'
>>> parse_topic("smartcam/lobby/cam-1/zones/door/count")
('lobby', 'cam-1', 'zones/door/count')
>>> is_valid_name("cam-1"), is_valid_name("a/b"), is_valid_name("x\\n")
(True, False, False)
"""

from __future__ import annotations

import re
from typing import Any

TOPIC_ROOT = "smartcam"
#: The topic tree under smartcam/<site>/<camera_id>/ (docs/mqtt.md is the reference):
#:   events  QoS 1, every event (via the durable outbox) when batching is off (publish.batch.linger_s = 0)
#:   batch   QoS 1, the default: many events of this camera, zlib-compressed JSON Lines (encode_batch)
#:   count   QoS 1, retained, the latest `count` event
#:   status  QoS 1, retained, plain text "online" / "offline" (also the Last Will)
#:   stats   QoS 0, runtime health (stats.v1.schema.json)
#:   zones/<zone>/count   QoS 1, retained, latest per-zone `count` event
#:   lines/<line>/totals  QoS 1, retained, latest `line.cross` event (running in/out totals)
#:   summary QoS 1, summary mode: one summary.v1 document per window (contract.rollup)

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


def topic_for(site: str, camera_id: str, leaf: str) -> str:
    """The MQTT topic of one camera's ``leaf`` (events, count, status, stats, zones/<z>/count, ...)."""
    return f"{TOPIC_ROOT}/{site}/{camera_id}/{leaf}"


def topics_for_event(site: str, camera_id: str, event: dict[str, Any]) -> list[tuple[str, int, bool]]:
    """Where one event goes: (topic, qos, retain). ``events`` always; retained summaries for counts and lines."""
    out = [(topic_for(site, camera_id, "events"), 1, False)]
    if event["type"] == "count":
        leaf = f"zones/{event['zone']}/count" if event.get("zone") else "count"
        out.append((topic_for(site, camera_id, leaf), 1, True))
    elif event["type"] == "line.cross":
        out.append((topic_for(site, camera_id, f"lines/{event['line']}/totals"), 1, True))
    return out


def parse_topic(topic: str) -> tuple[str, str, str] | None:
    """Split ``smartcam/<site>/<camera>/<leaf...>`` into (site, camera_id, leaf); None if it is not ours."""
    parts = topic.split("/")
    if len(parts) < 4 or parts[0] != TOPIC_ROOT:
        return None
    return parts[1], parts[2], "/".join(parts[3:])


def is_valid_name(value: str) -> bool:
    """Site, camera, zone and line names must be safe as a single topic level."""
    return bool(NAME_RE.fullmatch(value))  # fullmatch: ``$`` alone would accept a trailing newline

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
from dataclasses import dataclass
from typing import Any

TOPIC_ROOT = "smartcam"
ACK_LEAF = "ack"  # what the sink has committed, per camera (schemas/ack.v1.schema.json)


@dataclass(frozen=True)
class Leaf:
    """One kind of topic under ``smartcam/<site>/<camera_id>/`` (docs/mqtt.md is the prose reference)."""

    pattern: str  # the leaf; "+" stands for one name (a zone, a line)
    kind: str  # what the payload is: event, batch, summary, status, node, stats, model, sample, desired, ack
    qos: int
    retained: bool
    sender: str  # edge, sink, or deploy (smartcam-model deploy)
    what: str


#: The topic tree, the one definition: the sink subscribes to what edges send, validation classifies by it.
TOPIC_TREE: tuple[Leaf, ...] = (
    Leaf("events", "event", 1, False, "edge", "every event, one per message, when batching is off"),
    Leaf("batch", "batch", 1, False, "edge", "the default: many events, zlib-compressed JSON Lines (contract.batch)"),
    Leaf("summary", "summary", 1, False, "edge", "summary mode: one summary.v1 document per window"),
    Leaf("count", "event", 1, True, "edge", "the latest count event"),
    Leaf("zones/+/count", "event", 1, True, "edge", "the latest count event of one zone"),
    Leaf("lines/+/totals", "event", 1, True, "edge", "the latest line.cross event of one line (running totals)"),
    Leaf("status", "status", 1, True, "edge", "plain text online / offline (also the Last Will)"),
    Leaf("stats", "stats", 0, False, "edge", "runtime health (stats.v1)"),
    Leaf("node", "node", 1, True, "edge", "an edge process serving several cameras: node.v1 {state, cameras}; "
         "its Last Will sets every listed camera offline (the <camera> level is the process's node id)"),
    Leaf("model/reported", "model", 1, True, "edge", "the model the camera runs, the outcome of its last update"),
    Leaf("sample", "sample", 1, False, "edge", "a sampled frame for the learning loop (sample.v1 + JPEG)"),
    Leaf("model/desired", "desired", 1, True, "deploy", "the model the camera should run (model-desired.v1)"),
    Leaf("ack", "ack", 1, False, "sink", "the event ids the sink committed (publish.confirm sink)"),
)


def leaf_of(leaf: str) -> Leaf | None:
    """The tree's entry for a leaf such as ``zones/door/count``; None if the contract has no such topic.

    >>> leaf_of("zones/door/count").kind, leaf_of("nope")
    ('event', None)
    """
    parts = leaf.split("/")
    for entry in TOPIC_TREE:
        want = entry.pattern.split("/")
        if len(want) == len(parts) and all(w in ("+", p) for w, p in zip(want, parts, strict=True)):
            return entry
    return None


def subscriptions(sender: str = "edge") -> tuple[str, ...]:
    """Topic filters for everything ``sender`` publishes, for every site and camera (what a sink subscribes to).

    >>> subscriptions()[:2]
    ('smartcam/+/+/events', 'smartcam/+/+/batch')
    """
    return tuple(f"{TOPIC_ROOT}/+/+/{entry.pattern}" for entry in TOPIC_TREE if entry.sender == sender)


NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


def topic_for(site: str, camera_id: str, leaf: str) -> str:
    """The MQTT topic of one camera's ``leaf`` (events, count, status, stats, zones/<z>/count, ...)."""
    return f"{TOPIC_ROOT}/{site}/{camera_id}/{leaf}"


NODE_LEAF = "node"
NODE_SCHEMA_FILE = "node.v1.schema.json"


def node_document(site: str, node: str, state: str, cameras: list[str]) -> str:
    """The retained node.v1 document of an edge process (``state`` online / offline) for ``cameras``.

    >>> node_document("shop", "edge-pi", "offline", ["door", "till"])
    '{"schema_version":1,"site":"shop","node":"edge-pi","state":"offline","cameras":["door","till"]}'
    """
    import json

    return json.dumps({"schema_version": 1, "site": site, "node": node, "state": state, "cameras": list(cameras)},
                      separators=(",", ":"))


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

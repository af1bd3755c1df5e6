"""The event contract shared by the edge and the sink: one versioned JSON Schema, topic names, timestamps.

Both sides import this module, so there is exactly one definition of what an event is. It needs only the
standard library; validation imports ``jsonschema`` lazily (a sink dependency, not an edge one).

>>> topic_for("lobby", "cam-1", "events")
'smartcam/lobby/cam-1/events'
>>> format_ts(0.0)
'1970-01-01T00:00:00.000Z'
"""

from __future__ import annotations

import json
import re
import uuid
from datetime import datetime, timezone
from functools import cache
from importlib import resources
from typing import Any

SCHEMA_VERSION = 1
EVENT_SCHEMA_FILE = f"event.v{SCHEMA_VERSION}.schema.json"
STATS_SCHEMA_FILE = f"stats.v{SCHEMA_VERSION}.schema.json"

EVENT_TYPES = ("person.enter", "person.exit", "count", "zone.enter", "zone.exit", "line.cross", "loiter")

TOPIC_ROOT = "smartcam"
#: Topic leaves under smartcam/<site>/<camera_id>/ and how they are published.
#:   events  QoS 1, every event (via the durable outbox)
#:   count   QoS 1, retained, the latest `count` event
#:   status  QoS 1, retained, plain text "online" / "offline" (also the Last Will)
#:   stats   QoS 0, runtime health (stats.v1.schema.json)
#:   zones/<zone>/count   QoS 1, retained, latest per-zone `count` event
#:   lines/<line>/totals  QoS 1, retained, latest `line.cross` event (running in/out totals)
TOPIC_LEAVES = ("events", "count", "status", "stats")

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


def topic_for(site: str, camera_id: str, leaf: str) -> str:
    """The MQTT topic of one camera's ``leaf`` (events, count, status, stats, zones/<z>/count, ...)."""
    return f"{TOPIC_ROOT}/{site}/{camera_id}/{leaf}"


def parse_topic(topic: str) -> tuple[str, str, str] | None:
    """Split ``smartcam/<site>/<camera>/<leaf...>`` into (site, camera_id, leaf); None if it is not ours."""
    parts = topic.split("/")
    if len(parts) < 4 or parts[0] != TOPIC_ROOT:
        return None
    return parts[1], parts[2], "/".join(parts[3:])


def is_valid_name(value: str) -> bool:
    """Site, camera, zone and line names must be safe as a single topic level."""
    return bool(NAME_RE.fullmatch(value))  # fullmatch: ``$`` alone would accept a trailing newline


def new_event_id() -> str:
    """A fresh idempotency key (uuid4 hex)."""
    return uuid.uuid4().hex


def format_ts(epoch_s: float) -> str:
    """UTC RFC 3339 with milliseconds and a Z, the only timestamp form in the contract."""
    dt = datetime.fromtimestamp(epoch_s, tz=timezone.utc)
    return dt.strftime("%Y-%m-%dT%H:%M:%S.") + f"{dt.microsecond // 1000:03d}Z"


def parse_ts(value: str) -> float:
    """Inverse of :func:`format_ts`: epoch seconds."""
    return datetime.strptime(value, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=timezone.utc).timestamp()


@cache
def load_schema(name: str = EVENT_SCHEMA_FILE) -> dict[str, Any]:
    """The JSON Schema document shipped in ``camera/schemas``."""
    text = resources.files("camera").joinpath("schemas", name).read_text(encoding="utf-8")
    return json.loads(text)


@cache
def _validator(name: str):
    import jsonschema  # sink/dev dependency; the edge never needs it at run time

    schema = load_schema(name)
    cls = jsonschema.validators.validator_for(schema)
    cls.check_schema(schema)
    return cls(schema)


def validation_errors(payload: Any, name: str = EVENT_SCHEMA_FILE) -> list[str]:
    """Every way ``payload`` breaks the schema, as short readable strings (empty list = valid)."""
    errors = sorted(_validator(name).iter_errors(payload), key=lambda e: list(e.absolute_path))
    return [f"{'/'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}"[:300] for e in errors]


def validate_event(payload: Any) -> None:
    """Raise ``ValueError`` with the reasons if ``payload`` is not a valid v1 event."""
    errors = validation_errors(payload, EVENT_SCHEMA_FILE)
    if errors:
        raise ValueError("; ".join(errors))


def validate_stats(payload: Any) -> None:
    """Raise ``ValueError`` with the reasons if ``payload`` is not a valid v1 stats message."""
    errors = validation_errors(payload, STATS_SCHEMA_FILE)
    if errors:
        raise ValueError("; ".join(errors))

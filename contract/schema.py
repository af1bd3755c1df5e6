"""The versioned JSON Schemas of the wire (events, stats, summaries) and validation against them.

Standard library only; validation imports ``jsonschema`` lazily (a sink dependency, not an edge one).

>>> validation_errors({"schema_version": 1}, EVENT_SCHEMA_FILE)[0].startswith("<root>:")
True
"""

from __future__ import annotations

import json
from functools import cache
from importlib import resources
from typing import Any

SCHEMA_VERSION = 1
EVENT_SCHEMA_FILE = f"event.v{SCHEMA_VERSION}.schema.json"
STATS_SCHEMA_FILE = f"stats.v{SCHEMA_VERSION}.schema.json"
SUMMARY_SCHEMA_FILE = f"summary.v{SCHEMA_VERSION}.schema.json"

EVENT_TYPES = ("person.enter", "person.exit", "count", "zone.enter", "zone.exit", "line.cross", "loiter")


@cache
def load_schema(name: str = EVENT_SCHEMA_FILE) -> dict[str, Any]:
    """The JSON Schema document shipped in ``contract/schemas``, self-contained.

    A ``$ref`` to another shipped file (``"event.v1.schema.json#/$defs/name"``) is replaced by the part it points
    at, so a definition lives in one file while validators (jsonschema, fastjsonschema) never have to resolve
    a URL, which they would try to download.
    """
    text = resources.files("contract").joinpath("schemas", name).read_text(encoding="utf-8")
    return _inline_refs(json.loads(text))


def _inline_refs(node: Any) -> Any:
    if isinstance(node, list):
        return [_inline_refs(item) for item in node]
    if not isinstance(node, dict):
        return node
    ref = node.get("$ref")
    if isinstance(ref, str) and not ref.startswith("#"):
        file, _, pointer = ref.partition("#")
        target: Any = load_schema(file)
        for part in filter(None, pointer.split("/")):
            target = target[part.replace("~1", "/").replace("~0", "~")]
        return {**target, **{k: _inline_refs(v) for k, v in node.items() if k != "$ref"}}
    return {k: _inline_refs(v) for k, v in node.items()}


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

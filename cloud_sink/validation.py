"""Decide what one MQTT message is: a storable event, a summary, a camera status, camera stats, or a dead letter.

Everything the sink receives passes through :func:`check_message` (or :func:`check_messages`, which also expands
a compressed ``batch`` message into its events) before it touches the database. A ``summary`` (an edge in
summary mode: the rollup increments of one camera's time window) is checked against its schema and then by
``cloud_sink.rollups.summary_deltas``, which refuses what a schema cannot express (a window across an hour, unsorted
track ranges, dwell bins that do not add up...), so a stored summary can always be applied. It never
raises on input: every way a payload can be wrong (too big, not UTF-8, not JSON, NaN, too deep, wrong schema,
topic/payload mismatch, timestamp far from now, unknown schema version) becomes a ``Checked`` with
``kind="dead"`` and a one-line ``reason``. The schema is the edge's own file, via ``contract.schema``.

>>> check_message("smartcam/lobby/cam-1/status", b"online").value
'online'
>>> check_message("smartcam/lobby/cam-1/events", b'{"a": NaN}').reason
'invalid JSON: NaN/Infinity not allowed'
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, replace
from functools import cache, lru_cache
from typing import Any, Literal

from cloud_sink.rollups import summary_deltas
from contract.batch import BATCH_LEAF, BatchError, decode_batch
from contract.model_docs import REPORTED_SCHEMA_FILE
from contract.schema import (
    EVENT_SCHEMA_FILE,
    SCHEMA_VERSION,
    STATS_SCHEMA_FILE,
    SUMMARY_SCHEMA_FILE,
    load_schema,
    validation_errors,
)
from contract.timestamps import DEFAULT_MAX_PAST_DAYS, ts_ms
from contract.topics import NODE_SCHEMA_FILE, is_valid_name, leaf_of, parse_topic, topic_for

Kind = Literal["event", "summary", "status", "node", "stats", "model", "dead"]
STATUS_VALUES = ("online", "offline")


@dataclass(frozen=True)
class Limits:
    """Input limits; the defaults suit cameras whose clocks are NTP-synchronised."""

    max_bytes: int = 64 * 1024
    max_depth: int = 16
    max_future_s: float = 3600.0  # a camera clock more than 1 h ahead is wrong, not early
    max_past_s: float = DEFAULT_MAX_PAST_DAYS * 86400.0  # outside any report window: likely a bad clock
    max_batch_bytes: int = 8 * 1024 * 1024  # a batch message, compressed and after decompression
    max_batch_events: int = 10_000  # lines in one batch (the edge sends at most 500 by default)
    max_summary_tracks: int = 100_000  # distinct track ids one summary may name (over all its areas)
    max_events_per_s: float = 100.0  # per area of a summary: entries, exits, loiters, crossings per window second
    max_count_reports_per_s: float = 240.0  # per area: ``count`` reports (one per frame at most) per window second
    max_dead_lines: int = 10  # a batch with more bad lines than this is one dead letter (the whole payload)
    dead_letters_per_minute: float = 60.0  # per camera, sustained; more are counted, not stored
    dead_letter_burst: int = 100  # per camera, at once
    max_transaction_lines: int = 5000  # checked items (events, dead letters...) per database transaction
    max_transaction_bytes: int = 16 * 1024 * 1024  # and their payload bytes


@dataclass(frozen=True)
class Checked:
    """The verdict on one message. ``value``: the event/summary/stats dict or the status string; None if dead."""

    kind: Kind
    topic: str
    site: str | None = None
    camera_id: str | None = None
    value: Any = None
    reason: str | None = None


class _Reject(Exception):
    """Internal: carries the dead-letter reason out of the nested checks."""


def _no_constants(name: str) -> Any:
    raise _Reject("invalid JSON: NaN/Infinity not allowed")


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        raise _Reject("invalid JSON: duplicate key")
    return obj


def _split_by_type(schema: dict[str, Any]) -> dict[str, dict[str, Any]] | None:
    """Per event type, the same schema with its ``allOf``/``if type == X`` rules folded into ``required``.

    fastjsonschema evaluates each ``if`` by raising and catching an exception; folding the rules per type makes
    the accept path ~2x faster. Derived from the one schema file at start-up; None if its shape is unexpected.
    """
    types = schema.get("properties", {}).get("type", {}).get("enum")
    if not types:
        return None
    out: dict[str, dict[str, Any]] = {}
    for name in types:
        part = {k: v for k, v in schema.items() if k != "allOf"}
        part["properties"] = dict(schema["properties"], type={"const": name})
        required = list(schema.get("required", []))
        for rule in schema.get("allOf", []):
            cond = rule.get("if", {})
            if set(rule) != {"if", "then"} or set(rule["then"]) != {"required"}:
                return None
            if cond.get("properties", {}).get("type", {}).get("const") == name:
                required += [r for r in rule["then"]["required"] if r not in required]
        part["required"] = required
        out[name] = part
    return out


@cache
def _compiled(schema: str, type_name: str | None = None) -> Any:
    """The same schema file compiled to Python by fastjsonschema (several times faster than jsonschema)."""
    try:
        import fastjsonschema
    except ImportError:
        return None
    doc = load_schema(schema)
    if type_name is not None:
        parts = _split_by_type(doc)
        if parts is None or type_name not in parts:
            return None
        doc = parts[type_name]
    return fastjsonschema.compile(doc)


def _fast_accepts(doc: Any, schema: str) -> bool:
    kind = doc.get("type") if isinstance(doc, dict) and schema == EVENT_SCHEMA_FILE else None
    fast = _compiled(schema, kind) if isinstance(kind, str) and len(kind) < 20 else None
    fast = fast or _compiled(schema)
    if fast is None:
        return False
    try:
        fast(doc)
        return True
    except Exception:  # JsonSchemaException or anything odd: let jsonschema decide
        return False


def schema_errors(doc: Any, schema: str = EVENT_SCHEMA_FILE) -> list[str]:
    """``contract.schema.validation_errors`` with a fast path for the common case of a valid document.

    jsonschema stays the authority: the compiled validator may only *accept*; anything it rejects is re-checked
    by jsonschema, which also words the reasons (tests compare the two on generated payloads).
    """
    return [] if _fast_accepts(doc, schema) else validation_errors(doc, schema)


def _depth(value: Any, limit: int) -> int:
    """Nesting depth of containers, iteratively (a hostile payload must not exhaust the stack)."""
    deepest = 0
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, (dict, list)):
            deepest = max(deepest, depth)
            if deepest > limit:
                return deepest
            children = item.values() if isinstance(item, dict) else item
            stack.extend((child, depth + 1) for child in children)
    return deepest


def parse_json(payload: bytes, limits: Limits) -> Any:
    """Strict JSON: UTF-8, no NaN/Infinity, no duplicate keys, bounded nesting."""
    try:
        text = payload.decode("utf-8")
    except UnicodeDecodeError:
        raise _Reject("payload is not UTF-8") from None
    try:
        value = json.loads(text, parse_constant=_no_constants, object_pairs_hook=_no_duplicate_keys)
    except RecursionError:
        raise _Reject(f"JSON nested deeper than {limits.max_depth}") from None
    except ValueError as exc:  # JSONDecodeError, huge int strings
        raise _Reject(f"invalid JSON: {str(exc)[:120]}") from None
    return value


@lru_cache(maxsize=8192)  # the store and the rollups parse each event's ts again
def _check_time(value: Any, field: str, now: float, limits: Limits) -> None:
    try:
        ts = ts_ms(value) / 1000.0
    except (TypeError, ValueError):
        raise _Reject(f"{field}: not a valid timestamp") from None
    if ts > now + limits.max_future_s:
        raise _Reject(f"{field}: {value} is more than {limits.max_future_s:.0f} s in the future")
    if ts < now - limits.max_past_s:
        raise _Reject(f"{field}: {value} is more than {limits.max_past_s / 86400:.0f} days in the past")


def outside_time_window(reason: str | None) -> bool:
    """Whether a dead letter's reason is only the time window (:func:`_check_time`): a genuine event from a
    camera whose clock was wrong, kept one per event and never rate-limited or folded, so that
    ``smartcam-sink dead-letters replay`` can recover it (cloud_sink/dead_letters.py)."""
    return bool(reason) and (reason.endswith(" days in the past") or reason.endswith(" s in the future"))


def _check_document(doc: Any, schema: str, site: str, camera_id: str, now: float, limits: Limits) -> dict:
    version = doc.get("schema_version") if isinstance(doc, dict) else None
    known = version == SCHEMA_VERSION and not isinstance(version, bool)
    if not (known and _fast_accepts(doc, schema)):
        # the rejection path: a schema-valid document is shallow by construction, anything else is bounded first
        if _depth(doc, limits.max_depth) > limits.max_depth:
            raise _Reject(f"JSON nested deeper than {limits.max_depth}")
        if not isinstance(doc, dict):
            raise _Reject("payload is not a JSON object")
        if not known:
            raise _Reject(f"unknown schema_version {json.dumps(version)[:20]} (this sink reads {SCHEMA_VERSION})")
        errors = validation_errors(doc, schema)
        if errors:
            raise _Reject("schema: " + "; ".join(errors[:3]))
    if doc["site"] != site or doc["camera_id"] != camera_id:
        raise _Reject(f"payload site/camera {doc['site']}/{doc['camera_id']} differ from topic {site}/{camera_id}")
    # events and stats carry ``ts``; a summary its window ``start``/``end`` (the schema says which is required)
    for name in ("ts", "first_seen", "start", "end"):
        if name in doc:
            _check_time(doc[name], name, now, limits)
    return doc


def _check_summary(doc: dict[str, Any], limits: Limits) -> None:
    """What the summary schema cannot say: ``summary_deltas`` must accept it, and ``events`` must be the number
    of events its counters stand for (each event type increments exactly one counter), so the camera's
    ``events_total`` cannot be inflated by a summary that claims more than it carries."""
    try:
        summary_deltas(doc, max_tracks=limits.max_summary_tracks)
    except ValueError as exc:
        raise _Reject(f"summary: {str(exc)[:200]}") from None
    window_s = (ts_ms(doc["end"]) - ts_ms(doc["start"])) / 1000.0
    most, reports = limits.max_events_per_s * window_s, limits.max_count_reports_per_s * window_s
    for area in doc["areas"]:  # what one camera can see in the window (a schema cannot relate them)
        where = f"zone {area['zone']!r}" if area.get("zone") else "the whole camera"
        for name in ("entries", "exits", "loiters"):
            if area[name] > most:
                raise _Reject(f"summary: {area[name]} {name} for {where} in a {window_s:g} s window (more than "
                              f"{limits.max_events_per_s:g}/s)")
        if area["occupancy"]["samples"] > reports:
            raise _Reject(f"summary: {area['occupancy']['samples']} count samples for {where} in a {window_s:g} s "
                          f"window (more than {limits.max_count_reports_per_s:g}/s)")
    for line in doc["lines"]:
        if max(line["in"], line["out"]) > most:
            raise _Reject(f"summary: line {line['line']!r} crossed more than {limits.max_events_per_s:g}/s")
    counted = sum(a["entries"] + a["exits"] + a["loiters"] + a["occupancy"]["samples"] for a in doc["areas"])
    counted += sum(line["in"] + line["out"] for line in doc["lines"])
    if counted != doc["events"]:
        raise _Reject(f"summary: events is {doc['events']} but its counters add up to {counted}")


def _check_event_leaf(event: dict, leaf: str) -> None:
    """Retained copies must match the leaf they were published on."""
    parts = leaf.split("/")
    if leaf == "count" and event["type"] != "count":
        raise _Reject(f"{event['type']} event on a count topic")
    if len(parts) == 3 and parts[0] == "zones" and (event["type"] != "count" or event.get("zone") != parts[1]):
        raise _Reject(f"zone count topic {parts[1]!r} carries {event['type']} for zone {event.get('zone')!r}")
    if len(parts) == 3 and parts[0] == "lines" and (event["type"] != "line.cross" or event.get("line") != parts[1]):
        raise _Reject(f"line totals topic {parts[1]!r} carries {event['type']} for line {event.get('line')!r}")


def _leaf_kind(leaf: str) -> Kind | None:
    """What a message on ``leaf`` carries, by the contract's topic tree; None for what this check does not take
    (an unknown leaf; batches and samples have their own checks)."""
    entry = leaf_of(leaf)
    if entry is None or entry.sender != "edge" or entry.kind not in ("event", "status", "node", "stats", "summary",
                                                                         "model"):
        return None
    return entry.kind  # type: ignore[return-value]


def check_message(topic: str, payload: bytes, *, now: float | None = None, limits: Limits | None = None) -> Checked:
    """Classify one message; never raises. ``now`` (epoch s) is for tests; defaults to the wall clock."""
    limits = limits or Limits()
    now = time.time() if now is None else now
    parsed = parse_topic(topic) if isinstance(topic, str) else None
    if parsed is None:
        return Checked("dead", str(topic), reason="topic is not smartcam/<site>/<camera>/...")
    site, camera_id, leaf = parsed
    try:
        kind = _leaf_kind(leaf)
        if kind is None:
            raise _Reject(f"unknown topic leaf {leaf[:60]!r}")
        if not isinstance(payload, (bytes, bytearray)):
            raise _Reject("payload is not bytes")
        if len(payload) > limits.max_bytes:
            raise _Reject(f"payload of {len(payload)} bytes exceeds {limits.max_bytes}")
        if kind == "status":
            text = bytes(payload).decode("utf-8", errors="replace").strip()
            if text not in STATUS_VALUES:
                raise _Reject(f"status must be online/offline, got {text[:40]!r}")
            if not (is_valid_name(site) and is_valid_name(camera_id)):
                raise _Reject("topic site/camera are not valid names")
            return Checked("status", topic, site, camera_id, text)
        doc = parse_json(bytes(payload), limits)
        if kind == "node":  # an edge process's status: its Will speaks for every camera it lists
            errors = validation_errors(doc, NODE_SCHEMA_FILE)
            if errors:
                raise _Reject(f"node: {errors[0][:200]}")
            if doc["site"] != site or doc["node"] != camera_id:
                raise _Reject(f"node document of {doc['site']}/{doc['node']} on the topic of {site}/{camera_id}")
            return Checked("node", topic, site, camera_id, doc)
        schema = {"stats": STATS_SCHEMA_FILE, "summary": SUMMARY_SCHEMA_FILE,
                  "model": REPORTED_SCHEMA_FILE}.get(kind, EVENT_SCHEMA_FILE)
        doc = _check_document(doc, schema, site, camera_id, now, limits)
        if kind == "event":
            _check_event_leaf(doc, leaf)
        elif kind == "summary":
            _check_summary(doc, limits)
        return Checked(kind, topic, site, camera_id, doc)
    except _Reject as exc:
        return Checked("dead", topic, site, camera_id, reason=str(exc))
    except Exception as exc:  # the sink must survive anything; keep the message as a dead letter
        return Checked("dead", topic, site, camera_id, reason=f"unexpected {type(exc).__name__}: {str(exc)[:120]}")


def is_batch_topic(topic: str) -> bool:
    parsed = parse_topic(topic) if isinstance(topic, str) else None
    return parsed is not None and parsed[2] == BATCH_LEAF


def check_batch(topic: str, payload: bytes, *, now: float | None = None,
                limits: Limits | None = None) -> list[tuple[Checked, bytes]]:
    """A ``.../batch`` message as one verdict per event line (each checked exactly like a message on the same
    camera's ``.../events``), or a single dead letter for the whole payload if it cannot be decoded within the
    limits. More than ``limits.max_dead_lines`` bad lines are one dead letter for the payload (the count and the
    first reason), beside the good lines' verdicts. Never raises. The bytes beside each verdict are what a dead
    letter keeps (the line, or the payload).
    """
    limits = limits or Limits()
    now = time.time() if now is None else now
    parsed = parse_topic(topic) if isinstance(topic, str) else None
    if parsed is None or parsed[2] != BATCH_LEAF:
        return [(Checked("dead", str(topic), reason="not a smartcam/<site>/<camera>/batch topic"), payload)]
    site, camera_id, _ = parsed
    if not isinstance(payload, (bytes, bytearray)):  # kept as a dead letter like any other bad payload
        return [(Checked("dead", topic, site, camera_id, reason="batch payload is not bytes"), str(payload).encode())]
    try:
        if len(payload) > limits.max_batch_bytes:
            raise BatchError(f"batch payload of {len(payload)} bytes exceeds {limits.max_batch_bytes}")
        lines = decode_batch(bytes(payload), limits.max_batch_bytes)
        if len(lines) > limits.max_batch_events:
            raise BatchError(f"batch of {len(lines)} events exceeds {limits.max_batch_events}")
    except BatchError as exc:
        return [(Checked("dead", topic, site, camera_id, reason=str(exc)), bytes(payload))]
    except Exception as exc:  # the sink must survive anything
        reason = f"unexpected {type(exc).__name__}: {str(exc)[:120]}"
        return [(Checked("dead", topic, site, camera_id, reason=reason), bytes(payload))]
    events_topic = topic_for(site, camera_id, "events")
    out: list[tuple[Checked, bytes]] = []
    bad = 0
    for number, line in enumerate(lines, 1):
        c = check_message(events_topic, line, now=now, limits=limits)
        if c.kind == "dead":
            bad += not outside_time_window(c.reason)  # a wrong clock's events stay replayable, one each
            c = Checked("dead", topic, site, camera_id, reason=f"batch line {number}: {c.reason}")
        else:
            c = replace(c, topic=topic)
        out.append((c, line))
    if bad > limits.max_dead_lines:  # one dead letter for the payload, not one row per junk line
        first = next(c.reason or "" for c, _ in out if c.kind == "dead" and not outside_time_window(c.reason))
        reason = f"batch: {bad} of {len(lines)} lines rejected (first: {first.removeprefix('batch ')})"
        out = [item for item in out if item[0].kind != "dead" or outside_time_window(item[0].reason)]
        out.append((Checked("dead", topic, site, camera_id, reason=reason[:500]), bytes(payload)))
    return out


def check_messages(topic: str, payload: bytes, *, now: float | None = None,
                   limits: Limits | None = None) -> list[tuple[Checked, bytes]]:
    """:func:`check_message` for any topic, as a list: a batch gives one verdict per event it carries."""
    if is_batch_topic(topic):
        return check_batch(topic, payload, now=now, limits=limits)
    return [(check_message(topic, payload, now=now, limits=limits), payload)]

"""Validation: every rejection rule of the sink, and the fast schema path agreeing with jsonschema."""

from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cloud_sink.validation import Limits, check_message, schema_errors
from contract.schema import validation_errors
from contract.timestamps import format_ts
from tests.conftest import T0, make_event

NOW = T0 + 60
TOPIC = "smartcam/lobby/cam-1/events"


def check(topic: str, payload: bytes | dict, **kw):
    raw = json.dumps(payload).encode() if isinstance(payload, dict) else payload
    return check_message(topic, raw, now=NOW, **kw)


def stats_doc(**fields) -> dict:
    doc = {"schema_version": 1, "ts": format_ts(T0), "site": "lobby", "camera_id": "cam-1", "input_fps": 25.0,
           "processed_fps": 12.0, "inference_ms_p50": 30.0, "inference_ms_p95": 41.0, "frames_in": 10,
           "frames_processed": 5, "motion_skipped": 5, "dropped_frames": 0, "outbox_depth": 0, "outbox_dropped": 0,
           "cpu_percent": 50.0, "source_state": "connected"}
    doc.update(fields)
    return doc


@pytest.mark.parametrize("type_", ["person.enter", "person.exit", "count", "zone.enter", "zone.exit", "line.cross",
                                   "loiter"])
def test_every_valid_event_type_is_accepted(type_):
    ev = make_event(type_)
    result = check(TOPIC, ev)
    assert (result.kind, result.reason, result.value) == ("event", None, ev)
    assert (result.site, result.camera_id) == ("lobby", "cam-1")


def test_retained_leaves_are_events_when_they_match():
    assert check("smartcam/lobby/cam-1/count", make_event("count")).kind == "event"
    assert check("smartcam/lobby/cam-1/zones/door/count", make_event("count", zone="door")).kind == "event"
    assert check("smartcam/lobby/cam-1/lines/gate/totals", make_event("line.cross", line="gate")).kind == "event"


def test_status_and_stats():
    assert (check("smartcam/lobby/cam-1/status", b"offline").kind, check("smartcam/lobby/cam-1/status",
                                                                         b"online").value) == ("status", "online")
    assert check("smartcam/lobby/cam-1/status", b"rebooting").kind == "dead"
    assert check("smartcam/lobby/cam-1/stats", stats_doc()).kind == "stats"
    assert "schema" in check("smartcam/lobby/cam-1/stats", stats_doc(cpu_percent=-1)).reason


@pytest.mark.parametrize(("topic", "payload", "reason"), [
    ("other/lobby/cam-1/events", None, "topic is not"),
    ("smartcam/lobby/cam-1/video", None, "unknown topic leaf"),
    (TOPIC, b"\xff\xfe{}", "not UTF-8"),
    (TOPIC, b"{nope", "invalid JSON"),
    (TOPIC, b'{"schema_version": 1, "count": NaN}', "NaN/Infinity"),
    (TOPIC, b'{"schema_version": 1, "count": Infinity}', "NaN/Infinity"),
    (TOPIC, b'{"schema_version": 1, "schema_version": 1}', "duplicate key"),
    (TOPIC, b"[" * 40 + b"]" * 40, "nested deeper"),
    (TOPIC, b"[" * 100000 + b"]" * 100000, "exceeds"),
    (TOPIC, b'"just a string"', "not a JSON object"),
    (TOPIC, b"{}", "unknown schema_version"),
])
def test_malformed_payloads_are_rejected_with_a_reason(topic, payload, reason):
    result = check(topic, payload if payload is not None else json.dumps(make_event()).encode())
    assert result.kind == "dead" and reason in result.reason and result.value is None


def test_deep_nesting_within_the_size_limit_does_not_blow_the_stack():
    deep = b"[" * 30000 + b"]" * 30000
    assert "nested deeper" in check(TOPIC, deep).reason


def test_unknown_schema_version_is_rejected_before_schema_checks():
    assert "unknown schema_version 2" in check(TOPIC, make_event() | {"schema_version": 2}).reason
    assert "unknown schema_version" in check(TOPIC, make_event() | {"schema_version": True}).reason


def test_topic_must_match_payload_site_and_camera():
    assert "differ from topic" in check("smartcam/lobby/cam-2/events", make_event()).reason
    assert "differ from topic" in check("smartcam/other/cam-1/events", make_event()).reason


def test_retained_leaf_must_match_its_content():
    assert "count topic" in check("smartcam/lobby/cam-1/count", make_event()).reason
    assert "zone count topic" in check("smartcam/lobby/cam-1/zones/exit/count",
                                       make_event("count", zone="door")).reason
    assert "line totals topic" in check("smartcam/lobby/cam-1/lines/x/totals", make_event("line.cross")).reason


def test_timestamps_far_in_the_future_or_past_are_rejected():
    assert "future" in check(TOPIC, make_event(ts=NOW + 3700)).reason
    assert check(TOPIC, make_event(ts=NOW + 3500)).kind == "event"
    assert "past" in check(TOPIC, make_event(ts=NOW - 401 * 86400)).reason
    assert "past" in check(TOPIC, make_event(ts=NOW - 3 * 86400), limits=Limits(max_past_s=86400)).reason
    assert "first_seen" in check(TOPIC, make_event("person.exit", first_seen=format_ts(NOW - 500 * 86400))).reason
    assert "not a valid timestamp" in check(TOPIC, make_event() | {"ts": "2026-13-45T99:00:00.000Z"}).reason


def test_schema_violations_name_the_field():
    reason = check(TOPIC, make_event("person.exit") | {"dwell_s": -3}).reason
    assert reason.startswith("schema:") and "dwell_s" in reason
    assert "track_id" in check(TOPIC, {k: v for k, v in make_event().items() if k != "track_id"}).reason


def test_size_limit_is_configurable():
    payload = json.dumps(make_event()).encode()
    assert "exceeds 100" in check_message(TOPIC, payload, now=NOW, limits=Limits(max_bytes=100)).reason


def test_never_raises_on_non_bytes_or_odd_topics():
    assert check_message(TOPIC, None, now=NOW).kind == "dead"  # type: ignore[arg-type]
    assert check_message(None, b"x", now=NOW).kind == "dead"  # type: ignore[arg-type]
    assert check_message("smartcam/a/b/zones/z/count/extra", b"{}", now=NOW).kind == "dead"


# -------------------------------------------------------------------------------- fast path == jsonschema

_json = st.recursive(
    st.none() | st.booleans() | st.integers(-2**60, 2**60) | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4),
    max_leaves=10)


@st.composite
def mutated_events(draw):
    """A valid event with one field replaced, removed or added — the hard cases for a validator."""
    ev = make_event(draw(st.sampled_from(["person.enter", "person.exit", "count", "zone.exit", "line.cross"])))
    key = draw(st.sampled_from(sorted(ev) + ["extra", "zone", "line", "totals", "box"]))
    action = draw(st.sampled_from(["replace", "delete", "replace"]))
    if action == "delete":
        ev.pop(key, None)
    else:
        ev[key] = draw(_json | st.sampled_from([True, 1.0, -1, 0, 1, "a" * 65, [0, 0, 1, 1], {"in": 1, "out": 2}]))
    return ev


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutated_events())
def test_fast_schema_path_agrees_with_jsonschema(doc):
    assert (schema_errors(doc) == []) == (validation_errors(doc) == [])


@pytest.mark.parametrize("key", ["event_id", "site", "camera_id", "zone"])
def test_a_trailing_newline_is_rejected_by_the_schema(key):
    """Python's ``$`` accepts a final newline; the contract's patterns must not (PostgreSQL would refuse it)."""
    ev = make_event("zone.enter")
    ev[key] += "\n"
    topic = f"smartcam/{ev['site']}/{ev['camera_id']}/events"
    reason = check(topic, ev).reason
    assert reason.startswith("schema: ") and key in reason


def test_deep_nesting_is_named_whatever_else_is_wrong():
    deep = {"a": json.loads("[" * 30 + "]" * 30)}  # no schema_version either
    assert "nested deeper" in check(TOPIC, json.dumps(deep).encode()).reason
    assert "nested deeper" in check(TOPIC, json.dumps(make_event() | deep).encode()).reason


# ------------------------------------------------------------------------------------------ sane numbers
def _summary(**area_fields) -> dict:
    """A valid one-minute summary of one entry, with ``area_fields`` replacing the whole-camera area's."""
    from contract.ids import new_event_id
    from contract.rollup import summary_document

    start = int(T0) // 60 * 60
    doc = summary_document([make_event(ts=start + 1, track_id=1)], summary_id=new_event_id(), start_s=start,
                           interval_s=60)
    doc["areas"][0].update(area_fields)
    counted = sum(a["entries"] + a["exits"] + a["loiters"] + a["occupancy"]["samples"] for a in doc["areas"])
    doc["events"] = counted + sum(ln["in"] + ln["out"] for ln in doc["lines"])
    return doc


@pytest.mark.parametrize(("fields", "words"), [
    ({"entries": 100_000_000}, "entries"),  # 1e8 people in one minute: no camera sees that
    ({"entries": 7_000}, "entries"),  # schema-valid, but more than 100 per second of the window
    ({"occupancy": {"max": 3, "sum": 3 * 20_000, "samples": 20_000}}, "samples"),  # > 240 count reports/s
    ({"exits": 1, "dwell": {"sum": 5.0, "count": 1, "bins": {"9999": 1}}}, "bin"),  # a bin of 2.9e212 s
    ({"exits": 1, "dwell": {"sum": 1e14, "count": 1, "bins": {"0": 1}}}, "dwell"),  # sum far outside its bin
    ({"exits": 1, "dwell": {"sum": 0.2, "count": 1, "bins": {"40": 1}}}, "dwell"),  # bin 26-27 s, sum 0.2 s
])
def test_absurd_but_once_schema_valid_summaries_are_dead_letters(fields, words):
    c = check("smartcam/lobby/cam-1/summary", _summary(**fields))
    assert c.kind == "dead" and words in c.reason, c.reason


def test_a_plausible_summary_is_still_accepted():
    from contract.rollup import dwell_bin

    bins = {str(dwell_bin(v)): 1 for v in (12.5, 60.0, 700.0)}
    c = check("smartcam/lobby/cam-1/summary", _summary(entries=50, exits=3, dwell={
        "sum": 12.5 + 60.0 + 700.0, "count": 3, "bins": bins}))
    assert c.kind == "summary", c.reason


@pytest.mark.parametrize(("name", "value"), [
    ("processed_fps", 1e299), ("input_fps", 1e6), ("inference_ms_p50", 1e12), ("cpu_percent", 1e9),
    ("frames_in", 2**60), ("people", 10**9)])
def test_absurd_stats_are_dead_letters(name, value):
    c = check("smartcam/lobby/cam-1/stats", stats_doc(**{name: value}))
    assert c.kind == "dead" and name in c.reason, c.reason


def test_line_totals_have_a_maximum():
    ev = make_event("line.cross", ts=NOW, totals={"in": 1, "out": 0})
    ev["totals"]["in"] = 2**63
    c = check("smartcam/lobby/cam-1/events", ev)
    assert c.kind == "dead" and "totals" in c.reason, c.reason

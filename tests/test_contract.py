"""The event contract: the shipped examples are valid, and each kind of bad payload is refused with a reason."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from contract.broker import BrokerSettings
from contract.ids import new_event_id
from contract.schema import EVENT_TYPES, validate_event, validation_errors
from contract.timestamps import format_ts, parse_ts
from contract.topics import parse_topic, topic_for

SAMPLES = Path(__file__).resolve().parents[1] / "samples" / "events"


def samples() -> dict[str, dict]:
    return {p.name: json.loads(p.read_text()) for p in sorted(SAMPLES.glob("*.json"))}


def test_every_sample_event_is_valid_and_every_type_has_one():
    found = samples()
    for name, event in found.items():
        assert validation_errors(event) == [], name
    assert {e["type"] for e in found.values()} == set(EVENT_TYPES)


@pytest.mark.parametrize(
    "mutate, fragment",
    [
        (lambda e: e.pop("event_id"), "event_id"),
        (lambda e: e.update(schema_version=2), "schema_version"),
        (lambda e: e.update(type="person.dance"), "type"),
        (lambda e: e.update(ts="2026-11-22 10:15:02"), "ts"),
        (lambda e: e.update(box=[0.1, 0.2, 1.5, 0.3]), "box"),
        (lambda e: e.update(site="a/b"), "site"),
        (lambda e: e.update(extra_field=1), "extra_field"),
        (lambda e: e.pop("track_id"), "track_id"),
        (lambda e: e.update(score="high"), "score"),
    ],
)
def test_bad_events_are_refused_with_a_reason(mutate, fragment):
    event = copy.deepcopy(samples()["person_enter.json"])
    mutate(event)
    errors = validation_errors(event)
    assert errors and any(fragment in err for err in errors), errors
    with pytest.raises(ValueError):
        validate_event(event)


def test_type_specific_fields_are_required():
    exit_event = copy.deepcopy(samples()["person_exit.json"])
    del exit_event["dwell_s"]
    assert any("dwell_s" in e for e in validation_errors(exit_event))


def test_timestamps_round_trip_at_millisecond_precision():
    assert format_ts(1700000000.1234) == "2023-11-14T22:13:20.123Z"
    assert parse_ts(format_ts(1700000000.5)) == pytest.approx(1700000000.5)


def test_topics_and_ids():
    assert topic_for("lobby", "cam-1", "events") == "smartcam/lobby/cam-1/events"
    assert parse_topic("smartcam/lobby/cam-1/zones/door/count") == ("lobby", "cam-1", "zones/door/count")
    assert parse_topic("other/lobby/cam-1/events") is None
    ids = {new_event_id() for _ in range(1000)}
    assert len(ids) == 1000 and all(len(i) == 32 for i in ids)


def test_broker_urls():
    s = BrokerSettings.from_url("mqtts://cam1:s%40cret@broker.local")
    assert (s.host, s.port, s.tls, s.username, s.password, s.mqtt5) == ("broker.local", 8883, True, "cam1", "s@cret", True)
    assert "s@cret" not in s.redacted()
    assert BrokerSettings.from_url("mqtt://h:1884?protocol=3.1.1").mqtt5 is False
    for bad in ("http://h", "mqtt://", "mqtt://h:notaport", "mqtt://h?qos=2"):
        with pytest.raises(ValueError):
            BrokerSettings.from_url(bad)
    with pytest.raises(ValueError, match="CA file not found"):
        BrokerSettings.from_url("mqtts://h", ca_file="/nonexistent/ca.pem")


@pytest.mark.parametrize(("url", "reason"), [
    ("mqtt://broker.local/smartcam", "no path"),
    ("mqtt://broker.local:1883/", "no path"),
    ("mqtt://broker.local#frag", "no fragment"),
    ("mqtt://broker local:1883", "space"),
    ("mqtt://%20broker:1883", "space"),
    ("mqtt://broker.local:0", "port must be 1-65535"),
    ("mqtt://broker.local:65536", "bad port"),
])
def test_broker_urls_that_would_be_misread_are_refused(url, reason):
    """A path, a fragment, a space in the host or port 0 were accepted silently (issue 12)."""
    with pytest.raises(ValueError, match=reason):
        BrokerSettings.from_url(url)


def test_a_trailing_newline_never_passes_a_pattern():
    """Python's ``$`` matches before a final newline; the contract must not (a name is one topic level)."""
    from contract.topics import is_valid_name

    event = copy.deepcopy(samples()["person_enter.json"])
    for field, value in (("event_id", event["event_id"] + "\n"), ("site", "lobby\n"), ("ts", event["ts"] + "\n")):
        bad = dict(event, **{field: value})
        assert any(field in e for e in validation_errors(bad)), field
    assert not is_valid_name("cam-1\n") and is_valid_name("cam-1")


def test_every_copy_of_the_name_rule_is_contract_topics_name_re():
    """JSON Schemas and the credentials script cannot import Python: their copies must match NAME_RE exactly."""
    import json
    import re
    from pathlib import Path

    from contract.topics import NAME_RE

    root = Path(__file__).resolve().parents[1]
    body = NAME_RE.pattern[1:-1]  # without ^ and $
    schema_copies = []
    for path in sorted((root / "contract" / "schemas").glob("*.schema.json")):
        for pattern in re.findall(r'"pattern": "((?:[^"\\]|\\.)*)"', path.read_text()):
            pattern = json.loads(f'"{pattern}"')
            if "A-Za-z0-9][A-Za-z0-9_.-]" in pattern:
                schema_copies.append((path.name, pattern))
    assert schema_copies and all(p == f"^{body}(?!\\n)$" for _, p in schema_copies), schema_copies
    script = (root / "deploy" / "make-credentials.sh").read_text()
    assert f"NAME_RE='{NAME_RE.pattern}'" in script



def test_the_topic_tree_is_the_one_definition_of_the_leaves():
    """Every leaf constant and every topic the edge builds is in contract.topics.TOPIC_TREE, with its QoS and
    retain flag; the sink subscribes to exactly the tree's edge leaves."""
    from cloud_sink.ingest import SUBSCRIPTIONS
    from contract.batch import BATCH_LEAF
    from contract.model_docs import DESIRED_LEAF, REPORTED_LEAF
    from contract.rollup import SUMMARY_LEAF
    from contract.sample import SAMPLE_LEAF
    from contract.topics import ACK_LEAF, TOPIC_TREE, leaf_of, parse_topic, subscriptions, topics_for_event

    patterns = {leaf.pattern for leaf in TOPIC_TREE}
    assert {BATCH_LEAF, SUMMARY_LEAF, SAMPLE_LEAF, DESIRED_LEAF, REPORTED_LEAF, ACK_LEAF} <= patterns
    events = [{"type": "person.enter"}, {"type": "count"}, {"type": "count", "zone": "door"},
              {"type": "line.cross", "line": "gate"}]
    for event in events:
        for topic, qos, retain in topics_for_event("lobby", "cam-1", event):
            entry = leaf_of(parse_topic(topic)[2])
            assert entry is not None and (entry.qos, entry.retained, entry.sender) == (qos, retain, "edge"), topic
    assert set(SUBSCRIPTIONS) == set(subscriptions("edge")) and len(SUBSCRIPTIONS) == len(set(SUBSCRIPTIONS))

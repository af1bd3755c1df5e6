"""Fuzzing the sink's ingest path with hostile payloads (hypothesis), on a real SQLite store.

The target is ``cloud_sink.ingest.Ingestor.handle`` — the function the MQTT subscriber calls with
``(topic, payload bytes)`` pairs and that decides store vs dead-letter in one transaction. Every example is a
batch of four hostile messages with one valid event interleaved at a random position; the test checks, per batch
and over the whole run, that:

* nothing raises (the sink keeps running),
* every hostile message is dead-lettered with a non-empty reason, and none is stored as an event,
* every valid event in between is stored, exactly once.

A second test replays a sample of the same hostile payloads through a real Mosquitto into a running
``smartcam-sink run`` process and checks that it is still alive and counted every one.
"""

from __future__ import annotations

import copy
import json
import math
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cloud_sink.ingest import Ingestor
from cloud_sink.store import Store
from cloud_sink.validation import Limits
from contract.ids import new_event_id
from contract.schema import load_schema
from contract.timestamps import format_ts
from contract.topics import topic_for
from tests.conftest import ROOT

SAMPLES = ROOT / "samples" / "events"
SITE, CAMERA = "lobby", "cam-1"
LIMITS = Limits()
HOSTILE_TARGET = 10_000  # hostile payloads per run (the floor)
PER_BATCH = 4  # hostile payloads per batch, around one valid event
EXAMPLES = 2_600  # batches: 2,600 x 4 = 10,400 hostile payloads

PROPERTIES = load_schema()["properties"]
TEMPLATES = {p.stem: json.loads(p.read_text()) for p in sorted(SAMPLES.glob("*.json"))}


def _type_required() -> dict[str, set[str]]:
    """Fields the schema's if/then rules require per event type."""
    out: dict[str, set[str]] = {}
    for rule in load_schema()["allOf"]:
        out[rule["if"]["properties"]["type"]["const"]] = set(rule["then"]["required"])
    return out


TYPE_REQUIRED = _type_required()


def valid_event(name: str, now: float) -> dict[str, Any]:
    ev = copy.deepcopy(TEMPLATES[name])
    ev["event_id"] = new_event_id()
    ev["site"], ev["camera_id"] = SITE, CAMERA
    ev["ts"] = format_ts(now - 1.0)
    if "first_seen" in ev:
        ev["first_seen"] = format_ts(now - 30.0)
    return ev


def dumps(doc: Any) -> bytes:
    return json.dumps(doc, separators=(",", ":"), allow_nan=True).encode()


EVENTS_TOPIC = topic_for(SITE, CAMERA, "events")

# ------------------------------------------------------------------------------------------ hostile strategies

json_leaf = st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70),
                      st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=20))
json_value = st.recursive(json_leaf, lambda kids: st.lists(kids, max_size=4) | st.dictionaries(
    st.text(max_size=8), kids, max_size=4), max_leaves=12)
template_name = st.sampled_from(sorted(TEMPLATES))


@st.composite
def raw_bytes(draw):
    data = draw(st.binary(max_size=200))
    return "bytes", EVENTS_TOPIC, data


@st.composite
def not_json(draw):
    text = draw(st.text(max_size=120).filter(lambda t: not _parses(t)))
    return "not-json", EVENTS_TOPIC, text.encode("utf-8", "surrogatepass")


def _parses(text: str) -> bool:
    try:
        json.loads(text)
    except (ValueError, RecursionError):
        return False
    return True


@st.composite
def wrong_shape(draw):
    """Valid JSON that is not an event object at all (lists, numbers, strings, arbitrary dicts)."""
    value = draw(json_value.filter(lambda v: not (isinstance(v, dict) and v.get("schema_version") == 1)))
    return "wrong-shape", EVENTS_TOPIC, dumps(value)


@st.composite
def non_finite(draw):
    ev = valid_event(draw(template_name), time.time())
    numeric = [k for k, v in ev.items() if isinstance(v, (int, float)) and not isinstance(v, bool)
               and k != "schema_version"]
    bad = draw(st.sampled_from([math.nan, math.inf, -math.inf]))
    where = draw(st.sampled_from([*numeric, "box", "frame"]))
    if where == "box":
        ev["box"] = [bad, 0.1, 0.2, 0.3]
    elif where == "frame":
        ev["frame"]["width"] = bad
    else:
        ev[where] = bad
    return "nan-inf", EVENTS_TOPIC, dumps(ev)


@st.composite
def huge(draw):
    ev = valid_event(draw(template_name), time.time())
    size = draw(st.integers(LIMITS.max_bytes + 1, 4 * LIMITS.max_bytes))
    where = draw(st.sampled_from(["pad", "model"]))
    if where == "pad":
        ev["padding"] = "x" * size
    else:
        ev["model"]["name"] = "m" * size
    return "huge", EVENTS_TOPIC, dumps(ev)


@st.composite
def deep(draw):
    depth = draw(st.integers(LIMITS.max_depth + 1, 200_000))
    kind = draw(st.sampled_from(["list", "dict", "inside"]))
    if kind == "list":
        payload = b"[" * depth + b"]" * depth
    elif kind == "dict":
        payload = b'{"schema_version":1,"a":' + b'{"a":' * (depth - 1) + b"1" + b"}" * depth
    else:  # a valid event whose model carries a deep tail
        depth = min(depth, 5000)
        ev = dumps(valid_event(draw(template_name), time.time()))
        payload = ev[:-1] + b',"extra":' + b"[" * depth + b"]" * depth + b"}"
    return "deep", EVENTS_TOPIC, payload


@st.composite
def wrong_topic(draw):
    ev = valid_event(draw(template_name), time.time())
    site = draw(st.sampled_from([SITE, "other-site", "LOBBY"]))
    camera = draw(st.sampled_from([CAMERA, "cam-2", "cam-10"]))
    if (site, camera) == (SITE, CAMERA):
        camera = "cam-2"
    return "topic-mismatch", topic_for(site, camera, "events"), dumps(ev)


@st.composite
def bad_time(draw):
    now = time.time()
    ev = valid_event(draw(template_name), now)
    years_50 = 50 * 365 * 86400.0  # fixed bounds: a strategy must not depend on the clock
    offset = draw(st.one_of(st.floats(LIMITS.max_future_s + 60, years_50),
                            st.floats(-years_50, -(LIMITS.max_past_s + 86400))))
    field = "first_seen" if "first_seen" in ev and draw(st.booleans()) else "ts"
    ev[field] = format_ts(now + offset)
    return "timestamp", EVENTS_TOPIC, dumps(ev)


@st.composite
def bad_version(draw):
    ev = valid_event(draw(template_name), time.time())
    version = draw(st.sampled_from([0, 2, 3, -1, 99, "1", "v1", None, True, [], {}, "missing"]))
    if version == "missing":
        del ev["schema_version"]
    else:
        ev["schema_version"] = version
    return "schema-version", EVENTS_TOPIC, dumps(ev)


WRONG_TYPE = {"model": "m", "frame": [640, 480], "totals": 3, "box": {"x1": 0.1}}


@st.composite
def mutated(draw):
    """A valid event with one change that the contract forbids."""
    name = draw(template_name)
    ev = valid_event(name, time.time())
    how = draw(st.sampled_from(["drop", "extra", "wrong-type", "range", "event-id", "enum", "dup-key"]))
    if how == "drop":
        needed = set(load_schema()["required"]) | TYPE_REQUIRED.get(ev["type"], set())
        del ev[draw(st.sampled_from(sorted(needed)))]
    elif how == "extra":
        key = draw(st.text(min_size=1, max_size=12).filter(lambda k: k not in PROPERTIES))
        ev[key] = draw(json_value)
    elif how == "wrong-type":
        key = draw(st.sampled_from(sorted(k for k in ev if k != "schema_version")))
        ev[key] = WRONG_TYPE.get(key, {"nested": draw(json_value)})
    elif how == "range":
        choices = [k for k in ("score", "score_max", "score_mean", "dwell_s", "count", "previous", "track_id")
                   if k in ev] + ["box", "frame"]
        key = draw(st.sampled_from(choices))
        if key == "box":
            ev["box"] = draw(st.sampled_from([[0.1, 0.2, 1.5, 0.3], [-0.1, 0.2, 0.3, 0.4], [0.1, 0.2, 0.3]]))
        elif key == "frame":
            ev["frame"]["height"] = draw(st.sampled_from([0, -5, 16385]))
        elif key.startswith("score"):
            ev[key] = draw(st.sampled_from([-0.01, 1.01, 7]))
        else:
            ev[key] = draw(st.sampled_from([-1, -1000]))
    elif how == "event-id":
        ev["event_id"] = draw(st.sampled_from(["", "ABCDEF" * 5 + "00", "0" * 31, "0" * 33, "g" * 32, 12345]))
    elif how == "enum":
        ev["type"] = draw(st.text(max_size=15).filter(lambda t: t not in TYPE_REQUIRED and t != "count"))
    else:  # duplicate key: a second, different event_id smuggled in the same object
        text = dumps(ev)
        return "mutated", EVENTS_TOPIC, text[:-1] + b',"event_id":"' + new_event_id().encode() + b'"}'
    return "mutated", EVENTS_TOPIC, dumps(ev)


@st.composite
def bad_topic(draw):
    """Messages on topics that are not ours, not a known leaf, or carrying garbage status/stats."""
    ev = dumps(valid_event(draw(template_name), time.time()))
    case = draw(st.sampled_from(["foreign", "leaf", "status", "stats", "bad-names", "count-leaf"]))
    if case == "foreign":
        return "topic", draw(st.sampled_from(["other/lobby/cam-1/events", "smartcam/lobby", ""])), ev
    if case == "leaf":
        return "topic", topic_for(SITE, CAMERA, draw(st.sampled_from(["event", "snapshot", "zones/a", "x/y/z"]))), ev
    if case == "status":
        return "topic", topic_for(SITE, CAMERA, "status"), draw(st.sampled_from([b"", b"maybe", b"\xff\xfe", ev]))
    if case == "stats":
        return "topic", topic_for(SITE, CAMERA, "stats"), draw(st.sampled_from([ev, b"{}", b"[1]", b"NaN"]))
    if case == "bad-names":
        return "topic", "smartcam/lo+by/c#m/events", ev
    return "topic", topic_for(SITE, CAMERA, "count"), dumps(valid_event("person_enter", time.time()))


hostile = st.one_of(raw_bytes(), not_json(), wrong_shape(), non_finite(), huge(), deep(), wrong_topic(),
                    bad_time(), bad_version(), mutated(), bad_topic())
batches = st.tuples(st.lists(hostile, min_size=PER_BATCH, max_size=PER_BATCH), template_name, st.integers(0, PER_BATCH))


# ------------------------------------------------------------------------------------------ the fuzz run

#: Each category must be refused for its own reason (any of these words), not by accident.
EXPECTED_REASON = {
    "huge": ("exceeds",),
    "deep": ("nested deeper", "exceeds"),
    "nan-inf": ("NaN",),
    "timestamp": ("in the future", "in the past"),
    "schema-version": ("schema_version",),
    "topic-mismatch": ("differ from topic",),
    "mutated": ("schema:", "duplicate key", "schema_version"),
    "not-json": ("invalid JSON", "not UTF-8"),
    "wrong-shape": ("not a JSON object", "schema_version"),
}


@pytest.mark.slow
def test_hostile_payloads_are_dead_lettered_and_valid_events_still_stored(tmp_path):
    store = Store.open(f"sqlite:///{tmp_path / 'fuzz.db'}")
    ingestor = Ingestor(store, limits=Limits(dead_letter_burst=10**7))  # keep every dead letter (no rate limit)
    distinct: set[tuple[str, bytes]] = set()  # a message dead-lettered twice is stored once (digest)
    categories: Counter[str] = Counter()
    reasons: Counter[str] = Counter()
    valid_ids: list[str] = []
    started = time.perf_counter()

    @settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=False,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.large_base_example])
    @given(batch=batches)
    def run(batch):
        bad, name, position = batch
        good = valid_event(name, time.time())
        messages = [(topic, payload) for _, topic, payload in bad]
        messages.insert(min(position, len(messages)), (EVENTS_TOPIC, dumps(good)))
        result = ingestor.handle(messages)  # must not raise
        assert result.dead == len(bad), [(c, r) for (c, _, _), r in zip(bad, result.reasons, strict=False)]
        assert result.stored == 1 and result.new_events[0]["event_id"] == good["event_id"]
        assert all(r and r.strip() for r in result.reasons)
        for (category, _, _), reason in zip(bad, result.reasons, strict=True):
            words = EXPECTED_REASON.get(category, ("",))
            assert any(w in reason for w in words), f"{category} dead-lettered for the wrong reason: {reason}"
        valid_ids.append(good["event_id"])
        distinct.update((topic, payload) for _, topic, payload in bad)
        categories.update(c for c, _, _ in bad)
        reasons.update(r.split(":")[0][:40] for r in result.reasons)

    run()
    elapsed = time.perf_counter() - started
    hostile_total = sum(categories.values())
    engine = store.engine
    with engine.connect() as conn:
        stored = list(conn.execute(sa.text("SELECT event_id FROM events")).scalars())
        dead = conn.execute(sa.text("SELECT COUNT(*) FROM dead_letters")).scalar()
        empty_reasons = conn.execute(sa.text("SELECT COUNT(*) FROM dead_letters WHERE reason = ''")).scalar()
    store.close()
    print(f"\nFUZZ hostile payloads {hostile_total} in {len(valid_ids)} batches, {elapsed:.0f}s; "
          f"dead letters {dead}; events stored {len(stored)} (valid sent {len(valid_ids)})")
    print(f"FUZZ by category {dict(sorted(categories.items()))}")
    print(f"FUZZ top reasons {reasons.most_common(12)}")
    # Hypothesis shrinks failures with extra calls; on a passing run every call above is one counted example.
    assert hostile_total >= HOSTILE_TARGET, f"only {hostile_total} hostile payloads generated"
    assert sorted(stored) == sorted(valid_ids), "stored events differ from the valid ones sent"
    assert dead == len(distinct) and empty_reasons == 0
    assert set(categories) == {"bytes", "not-json", "wrong-shape", "nan-inf", "huge", "deep", "topic-mismatch",
                               "timestamp", "schema-version", "mutated", "topic"}


# ------------------------------------------------------------------------------------------ through a real sink


def _publishable(topic: str) -> bool:
    """What the running sink subscribes to: smartcam/<site>/<camera>/<events|count|status|stats>, no wildcards."""
    parts = topic.split("/")
    return (len(parts) == 4 and parts[0] == "smartcam" and parts[3] in ("events", "count", "status", "stats")
            and not any(c in topic for c in "+#"))


@pytest.mark.slow
def test_running_sink_survives_hostile_traffic(mosquitto, tmp_path):
    from contract.broker import BrokerSettings, make_client

    collected: list[tuple[str, bytes]] = []

    @settings(max_examples=400, deadline=None, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.large_base_example])
    @given(item=hostile)
    def collect(item):
        _, topic, payload = item
        if _publishable(topic):
            collected.append((topic, payload))

    collect()
    db = tmp_path / "sink.db"
    log = tmp_path / "sink.log"
    sink_bin = Path(sys.executable).with_name("smartcam-sink")
    with open(log, "wb") as fh:
        sink = subprocess.Popen([str(sink_bin), "run", "--broker", mosquitto.url, "--db", f"sqlite:///{db}",
                                 "--dead-letter-burst", "100000"], stdout=fh, stderr=subprocess.STDOUT)
    client = make_client(BrokerSettings.from_url(mosquitto.url), "fuzz-publisher")
    try:
        engine = sa.create_engine(f"sqlite:///{db}")

        def count(sql: str) -> int:
            try:
                with engine.connect() as conn:
                    return conn.execute(sa.text(sql)).scalar() or 0
            except sa.exc.SQLAlchemyError:
                return -1

        deadline = time.monotonic() + 30  # the sink logs its SUBACK: its subscriptions exist before we publish
        while "subscribed to" not in log.read_text(errors="replace") and time.monotonic() < deadline:
            time.sleep(0.1)
        client.connect("127.0.0.1", mosquitto.port)
        client.loop_start()
        good = [valid_event(name, time.time()) for name in sorted(TEMPLATES)]
        infos = [client.publish(t, p, qos=1) for t, p in collected]
        infos += [client.publish(EVENTS_TOPIC, dumps(ev), qos=1) for ev in good]
        for info in infos:
            info.wait_for_publish(10)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and (count("SELECT COUNT(*) FROM dead_letters") < len(set(collected))
                                               or count("SELECT COUNT(*) FROM events") < len(good)):
            assert sink.poll() is None, log.read_text()[-3000:]
            time.sleep(0.2)
        dead = count("SELECT COUNT(*) FROM dead_letters")
        stored = count("SELECT COUNT(*) FROM events")
        alive = sink.poll() is None
        print(f"\nFUZZ via MQTT: hostile published {len(collected)}, dead letters {dead}, valid {len(good)}, "
              f"stored {stored}, sink alive {alive}")
        assert alive, log.read_text()[-3000:]
        assert dead == len(set(collected)) and stored == len(good)  # the same message twice: one dead letter
        engine.dispose()
    finally:
        client.disconnect()
        client.loop_stop()
        if sink.poll() is None:
            sink.send_signal(signal.SIGTERM)
            try:
                sink.wait(15)
            except subprocess.TimeoutExpired:
                sink.kill()
                sink.wait(5)
    assert sink.returncode == 0, log.read_text()[-3000:]

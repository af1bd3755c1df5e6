"""Batched publishing, the codec and the sink side (no broker): compressible event ids, the ``batch`` envelope
(zlib + the shipped preset dictionary, bounded decoding) and how the sink expands, checks and stores a batch."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import threading
import time
import zlib
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cloud_sink.ingest import SUBSCRIPTIONS, Ingestor, Subscriber
from cloud_sink.validation import Limits, check_batch, check_messages
from contract.batch import BatchError, batch_dictionaries, decode_batch, encode_batch
from contract.ids import new_event_id
from contract.topics import topic_for
from tests.conftest import make_event

ROOT = Path(__file__).resolve().parents[1]
BATCH = topic_for("lobby", "cam-1", "batch")
V1_DICTID = 0x6AE5ED88  # frozen: edges in the field compress with exactly these bytes


def line(ev: dict) -> str:
    return json.dumps(ev, separators=(",", ":"))


def now_events(n: int, **fields) -> list[dict]:
    return [make_event("person.enter", ts=time.time(), track_id=i + 1, **fields) for i in range(n)]


# ------------------------------------------------------------------------------------------------ event ids


def test_event_ids_are_a_process_prefix_and_a_counter():
    ids = [new_event_id() for _ in range(100)]
    assert all(re.fullmatch(r"[0-9a-f]{32}", i) for i in ids)
    assert len({i[:16] for i in ids}) == 1
    counters = [int(i[16:], 16) for i in ids]
    assert counters == list(range(counters[0], counters[0] + 100))


def test_event_ids_are_unique_across_threads():
    out: list[list[str]] = [[] for _ in range(4)]

    def draw(k: int) -> None:
        out[k].extend(new_event_id() for _ in range(5000))

    threads = [threading.Thread(target=draw, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len({i for ids in out for i in ids}) == 20000


def test_two_processes_and_a_forked_child_draw_different_prefixes():
    code = "from contract.ids import new_event_id; print(new_event_id())"
    others = {subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                             check=True).stdout.strip()[:16] for _ in range(2)}
    mine = new_event_id()[:16]
    assert len(others) == 2 and mine not in others
    import os

    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        os.write(write, new_event_id().encode())
        os._exit(0)
    os.waitpid(pid, 0)
    child = os.read(read, 64).decode()
    os.close(read)
    os.close(write)
    assert child[:16] != mine


def test_sequential_ids_compress_better_than_random_ones():
    import uuid

    events = now_events(50)
    seq = len(encode_batch([line(e) for e in events]))
    rnd = len(encode_batch([line(dict(e, event_id=uuid.uuid4().hex)) for e in events]))
    assert seq < rnd


# ------------------------------------------------------------------------------------------------ the codec


def test_batch_round_trip_keeps_every_line_in_order():
    events = now_events(20)
    payload = encode_batch([line(e) for e in events])
    assert payload[:2] == bytes([0x78, 0xF9]) and int.from_bytes(payload[2:6], "big") == V1_DICTID
    assert decode_batch(payload, 1 << 20) == [line(e).encode() for e in events]
    assert decode_batch(encode_batch([e.encode() for e in map(line, events)]), 1 << 20) == \
        [line(e).encode() for e in events]


def test_the_shipped_dictionary_is_frozen_and_helps():
    (dictid, zdict), = batch_dictionaries().items()
    assert dictid == V1_DICTID == zlib.adler32(zdict)
    data = "".join(line(e) + "\n" for e in now_events(3)).encode()
    plain = zlib.compress(data, 9)
    assert len(encode_batch([line(e) for e in now_events(3)])) < len(plain)


def _raw_zlib(data: bytes, zdict: bytes | None = None) -> bytes:
    comp = zlib.compressobj(9, zdict=zdict) if zdict else zlib.compressobj(9)
    return comp.compress(data) + comp.flush()


@pytest.mark.parametrize("payload, reason", [
    (b"", "not a zlib stream"),
    (b'{"schema_version":1}\n', "not a zlib stream"),
    (_raw_zlib(b'{"a":1}\n'), "no preset dictionary"),
    (_raw_zlib(b'{"a":1}\n', zdict=b"some other dictionary"), "unknown zlib dictionary"),
    (encode_batch(['{"a":1}'])[:-4], "truncated"),
    (encode_batch(['{"a":1}']) + b"junk", "after the end"),
    (encode_batch(['{"a":1}'])[:6] + b"\xff" * 20, "not valid zlib data"),
    (encode_batch([]), "no events"),
])
def test_hostile_payloads_are_one_clear_error(payload, reason):
    with pytest.raises(BatchError, match=reason):
        decode_batch(payload, 1 << 20)


def test_a_zip_bomb_stops_at_the_limit():
    bomb = encode_batch([b"0" * (50 << 20)])  # 50 MiB of zeros in ~50 KB
    assert len(bomb) < 100_000
    with pytest.raises(BatchError, match=f"batch larger than {1 << 20} bytes after decompression"):
        decode_batch(bomb, 1 << 20)


# ------------------------------------------------------------------------------------------------ the sink


def test_batch_lines_are_checked_like_events_of_that_camera():
    good = now_events(3)
    other_camera = make_event("count", ts=time.time(), camera_id="cam-2")
    lines = [line(good[0]), "not json", line(good[1]), line(other_camera), line(good[2])]
    checked = check_batch(BATCH, encode_batch(lines))
    assert [c.kind for c, _ in checked] == ["event", "dead", "event", "dead", "event"]
    assert [c.value["event_id"] for c, _ in checked if c.kind == "event"] == [e["event_id"] for e in good]
    assert checked[1][0].reason.startswith("batch line 2: invalid JSON") and checked[1][1] == b"not json"
    assert checked[3][0].reason == "batch line 4: payload site/camera lobby/cam-2 differ from topic lobby/cam-1"
    assert all(c.topic == BATCH for c, _ in checked)


def test_undecodable_or_oversized_batches_are_one_dead_letter():
    limits = Limits(max_batch_bytes=4096, max_batch_events=5)
    cases = {
        b"plain text": "batch is not a zlib stream",
        encode_batch([b"x" * 5000]): "batch larger than 4096 bytes after decompression",
        encode_batch([line(e) for e in now_events(6)]): "batch of 6 events exceeds 5",
        bytes(5000): "batch payload of 5000 bytes exceeds 4096",
    }
    for payload, reason in cases.items():
        ((c, kept),) = check_batch(BATCH, payload, limits=limits)
        assert (c.kind, c.reason, kept) == ("dead", reason, payload)
    # a batch must stay within one event's own limits, line by line
    (c, _), = check_batch(BATCH, encode_batch([line(now_events(1)[0])]),
                          limits=Limits(max_bytes=100))
    assert c.kind == "dead" and "exceeds 100" in c.reason


def test_check_messages_passes_other_topics_through():
    ev = now_events(1)[0]
    ((c, _),) = check_messages(topic_for("lobby", "cam-1", "events"), line(ev).encode())
    assert c.kind == "event"
    assert "smartcam/+/+/batch" in SUBSCRIPTIONS


def test_ingest_stores_a_batch_once_with_its_dead_lines_in_one_commit(store):  # noqa: F811
    ing = Ingestor(store)
    events = now_events(4)
    payload = encode_batch([line(events[0]), '{"schema_version":1}', *map(line, events[1:])])
    result = ing.handle([(BATCH, payload), (topic_for("lobby", "cam-1", "events"), line(events[0]).encode())])
    assert (result.received, result.stored, result.duplicates, result.dead) == (6, 4, 1, 1)
    assert [e["event_id"] for e in result.new_events] == [e["event_id"] for e in events]
    again = ing.handle([(BATCH, payload)])  # a QoS 1 redelivery of the whole batch
    assert (again.stored, again.duplicates) == (0, 4)
    assert store.event_count() == 4 and store.dead_letter_count() == 1  # the redelivered dead letter: once
    assert all(d["reason"].startswith("batch line 2: ") for d in store.dead_letters())
    bad = ing.handle([(BATCH, b"\x78\x9c garbage")])
    assert bad.dead == 1 and "no preset dictionary" in bad.reasons[0]


def test_shared_subscriptions_include_the_batch_topic():
    sub = Subscriber(Ingestor.__new__(Ingestor), settings=None, share_group="workers")
    assert "$share/workers/smartcam/+/+/batch" in sub.topics()


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=2048))
def test_any_bytes_on_the_batch_topic_are_a_dead_letter_never_a_crash(payload):
    ((c, kept),) = check_batch(BATCH, payload)
    assert c.kind == "dead" and c.reason and kept == payload


@settings(max_examples=100, deadline=None)
@given(st.lists(st.text(alphabet=st.characters(blacklist_characters="\n\r", blacklist_categories=("Cs",)),
                        max_size=200), min_size=1, max_size=20))
def test_any_lines_in_a_valid_envelope_get_one_verdict_each(lines):
    checked = check_batch(BATCH, encode_batch(lines), limits=Limits(max_dead_lines=len(lines)))
    assert len(checked) == len(lines)
    assert all(c.kind == "dead" and c.reason.startswith(f"batch line {i}: ")
               for i, (c, _) in enumerate(checked, 1))
    collapsed = check_batch(BATCH, encode_batch(lines), limits=Limits(max_dead_lines=0))  # one for the payload
    assert len(collapsed) == 1 and collapsed[0][0].reason.startswith(f"batch: {len(lines)} of {len(lines)} lines")


def test_batch_linger_flag_and_config():
    from camera.cli import _overrides, build_parser
    from camera.config import load_config
    from tests.conftest import ONNX_FP32

    parser = build_parser()
    run_help = " ".join(parser._subparsers._group_actions[0].choices["run"].format_help().split())
    assert "--batch-linger" in run_help and "0 = one message per event" in run_help
    base = ["run", "--source", "0", "--camera-id", "c", "--model", str(ONNX_FP32)]
    off = load_config(overrides=_overrides(parser.parse_args([*base, "--batch-linger", "0"])))
    default = load_config(overrides=_overrides(parser.parse_args(base)))
    assert off.publish.batch.linger_s == 0
    assert (default.publish.batch.linger_s, default.publish.batch.max_events, default.publish.batch.max_bytes,
            default.publish.batch.retained_interval_s) == (2.0, 500, 256 * 1024, 10.0)

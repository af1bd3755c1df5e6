"""Dead letters are bounded: a junk batch is one row, each camera has a rate, the table a size and an age cap, a
transaction a size in lines; and a dead letter is stored once however often its message is delivered."""

from __future__ import annotations

import json
import time

import sqlalchemy as sa

from cloud_sink.ingest import Ingestor
from cloud_sink.store import Batch, Store
from cloud_sink.validation import Limits
from contract.batch import encode_batch
from contract.topics import topic_for
from tests.conftest import make_event

NOW = 1_780_000_000.0


def junk(camera: str = "cam-1", n: int = 1) -> list[tuple[str, bytes]]:
    return [(topic_for("lobby", camera, "events"), f'{{"junk": {i}}}'.encode()) for i in range(n)]


def test_a_batch_of_junk_lines_is_one_dead_letter_and_its_good_lines_are_kept(store):  # noqa: F811
    good = [make_event(ts=NOW, track_id=i) for i in range(5)]
    lines = [json.dumps(e) for e in good] + [f'{{"junk": {i}}}' for i in range(9_995)]
    payload = encode_batch(lines)
    assert len(payload) < 64 * 1024  # ~ the 19 kB message
    result = Ingestor(store).handle([(topic_for("lobby", "cam-1", "batch"), payload)], now=NOW)
    assert result.stored == 5 and result.dead == 1
    (dead,) = store.dead_letters()
    assert dead["reason"].startswith("batch: 9995 of 10000 lines rejected") and "line 6" in dead["reason"]
    assert store.dead_letter_count() == 1 and store.event_count() == 5
    few = encode_batch([f'{{"junk": {i}}}' for i in range(3)])  # a few bad lines keep one row each (the line)
    assert Ingestor(store).handle([(topic_for("lobby", "cam-2", "batch"), few)], now=NOW).dead == 3


def test_dead_letters_have_a_rate_per_camera_counted_and_reported(store):  # noqa: F811
    from cloud_sink import report

    ing = Ingestor(store, limits=Limits(dead_letter_burst=50, dead_letters_per_minute=60))
    result = ing.handle(junk("cam-1", 500) + junk("cam-2", 5), now=NOW)
    assert result.dead == 55 and result.dead_dropped == 450
    assert store.dead_letter_count() == 55  # cam-2 is not starved by cam-1's flood
    assert {d["topic"] for d in store.dead_letters(limit=100)} == {topic_for("lobby", c, "events")
                                                                   for c in ("cam-1", "cam-2")}
    later = ing.handle(junk("cam-1", 30), now=NOW + 10)  # 10 s at 1/s refill 10 tokens
    assert later.dead == 10 and later.dead_dropped == 20
    assert store.sink_state()["dead_letters_rate_limited"] == 470
    text = report.render(report.build(store, since=NOW - 3600, until=NOW + 60))
    assert "470 dead letters not stored (rate limit per camera)" in text


def test_the_dead_letter_table_has_a_size_and_an_age_cap(db_url):  # noqa: F811
    s = Store.open(db_url, dead_letter_cap=100, dead_letter_days=7)
    s.write(Batch(dead_letters=[{"topic": "t", "reason": f"old {i}", "payload": b"x"} for i in range(10)]),
            received_at=NOW - 8 * 86400)
    for chunk in range(5):
        s.write(Batch(dead_letters=[{"topic": "t", "reason": f"r {chunk}-{i}", "payload": b"x"}
                                    for i in range(50)]), received_at=NOW)
    assert s.dead_letter_count() == 100
    reasons = {d["reason"] for d in s.dead_letters(limit=1000)}
    assert "r 4-49" in reasons and "r 0-0" not in reasons and not any(r.startswith("old") for r in reasons)
    assert s.sink_state()["dead_letters_pruned"] == 160
    s.close()


def test_an_ingest_transaction_is_bounded_in_lines(store):  # noqa: F811
    commits: list[int] = []
    sa.event.listen(store.engine, "commit", lambda _conn: commits.append(1))
    lines = [[json.dumps(make_event(ts=NOW, track_id=b * 1000 + i)) for i in range(500)] for b in range(5)]
    messages = [(topic_for("lobby", "cam-1", "batch"), encode_batch(chunk)) for chunk in lines]
    result = Ingestor(store, limits=Limits(max_transaction_lines=1000)).handle(messages, now=NOW)
    assert result.stored == 2500 and store.event_count() == 2500
    assert len(commits) == 3  # 1000 + 1000 + 500 lines, not one transaction of 2500


def test_a_dead_letter_is_stored_once_across_redeliveries_and_sinks(db_url):  # noqa: F811
    one, two = Store.open(db_url), Store.open(db_url)
    message = junk("cam-1")
    assert Ingestor(one).handle(message, now=NOW).dead == 1
    assert Ingestor(one).handle(message, now=NOW + 5).dead == 1  # a QoS 1 redelivery
    assert Ingestor(two).handle(message, now=NOW + 9).dead == 1  # a second sink in the share group
    assert one.dead_letter_count() == 1
    other = [(message[0][0], b'{"junk": "else"}')]
    Ingestor(two).handle(other, now=NOW)
    assert one.dead_letter_count() == 2
    one.close()
    two.close()


def test_the_time_window_is_visible_where_the_operator_looks(store):  # noqa: F811
    from cloud_sink import report

    store.set_time_window(max_past_s=3 * 86400, max_future_s=120)
    state = store.sink_state()
    assert (state["window_max_past_s"], state["window_max_future_s"]) == (3 * 86400, 120)
    text = report.render(report.build(store, since=time.time() - 3600))
    assert "accepts event times from 3 days before to 120 s after its clock" in text


def test_the_time_window_and_dead_letter_bounds_are_flags_logged_at_start(tmp_path):
    """--max-future / --max-past-days / --dead-letter-*: accepted, logged at start, recorded for the report."""
    import os
    import signal
    import socket
    import subprocess
    import sys

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]  # no broker: the sink starts anyway (and says it cannot reach it)
    db = f"sqlite:///{tmp_path / 'sink.db'}"
    proc = subprocess.Popen([sys.executable, "-m", "cloud_sink", "run", "--broker", f"mqtt://127.0.0.1:{port}",
                             "--db", db, "--max-future", "120", "--max-past-days", "3", "--dead-letter-rate", "5",
                             "--dead-letter-burst", "7", "--dead-letter-cap", "1000", "--dead-letter-days", "2"],
                            stderr=subprocess.PIPE, text=True, env=dict(os.environ, PYTHONUNBUFFERED="1"))
    lines: list[str] = []
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not any("cannot reach broker" in ln for ln in lines):
            lines.append(proc.stderr.readline())
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(20)
    text = "".join(lines)
    assert "accepting event times from 3 days before to 120 s after this clock" in text
    assert "5 per camera and minute (burst 7), at most 1000 rows and 2 days" in text
    s = Store.open(db)
    assert s.sink_state()["window_max_future_s"] == 120 and s.sink_state()["window_max_past_s"] == 3 * 86400
    s.close()


def test_health_shows_the_time_window(store):  # noqa: F811
    from fastapi.testclient import TestClient

    from cloud_sink.api import create_app

    store.set_time_window(max_past_s=400 * 86400, max_future_s=3600)
    health = TestClient(create_app(store)).get("/health").json()
    assert health["time_window"] == {"max_past_s": 400 * 86400, "max_future_s": 3600}

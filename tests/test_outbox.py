"""The durable outbox: order, acknowledgement, bounds, restart and crash survival, clear errors."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from camera.outbox import Outbox, OutboxError

ROOT = Path(__file__).resolve().parents[1]


def test_put_fetch_keeps_order_and_fields(tmp_path):
    box = Outbox(tmp_path / "o.db")
    ids = [box.put("smartcam/s/c/events", f'{{"n": {i}}}') for i in range(5)]
    box.put("smartcam/s/c/count", b"retained", qos=1, retain=True)
    rows = box.fetch(limit=10)
    assert [r.id for r in rows[:5]] == ids == sorted(ids)
    assert [r.payload for r in rows[:5]] == [f'{{"n": {i}}}'.encode() for i in range(5)]
    assert rows[-1].retain is True and rows[-1].topic.endswith("/count") and rows[-1].qos == 1
    assert box.depth() == 6
    # fetch after an id: the publisher's cursor
    assert [r.id for r in box.fetch(after_id=ids[2], limit=2)] == ids[3:5]


def test_delete_only_acknowledged(tmp_path):
    box = Outbox(tmp_path / "o.db")
    ids = box.put_many([("t", f"m{i}", 1, False) for i in range(4)])
    box.delete([ids[0], ids[2], 999_999])  # an unknown id (already dropped) is ignored
    assert [r.payload for r in box.fetch()] == [b"m1", b"m3"]
    assert box.depth() == 2


def test_survives_reopen_in_order(tmp_path):
    path = tmp_path / "o.db"
    box = Outbox(path)
    box.put_many([("t", f"m{i}", 1, False) for i in range(10)])
    box.delete([r.id for r in box.fetch(limit=3)])
    box.close()
    again = Outbox(path)
    assert again.depth() == 7
    assert [r.payload for r in again.fetch(limit=100)] == [f"m{i}".encode() for i in range(3, 10)]
    new_id = again.put("t", "later")
    assert new_id > max(r.id for r in again.fetch(limit=6))  # ids never go back: replay order is insertion order


def test_bounded_drops_oldest_and_counts_persistently(tmp_path):
    path = tmp_path / "o.db"
    box = Outbox(path, max_rows=3)
    for i in range(5):
        box.put("t", f"m{i}")
    assert box.depth() == 3 and box.dropped == 2
    assert [r.payload for r in box.fetch()] == [b"m2", b"m3", b"m4"]
    box.put_many([("t", "x", 1, False), ("t", "y", 1, False)])
    assert box.dropped == 4 and [r.payload for r in box.fetch()] == [b"m4", b"x", b"y"]
    box.close()
    assert Outbox(path, max_rows=3).dropped == 4


def test_rows_survive_sigkill(tmp_path):
    """A row that put() returned is on disk even if the process dies right after (kill -9)."""
    path = tmp_path / "o.db"
    code = textwrap.dedent(f"""
        import os, signal
        from camera.outbox import Outbox
        box = Outbox({str(path)!r})
        for i in range(50):
            box.put("smartcam/s/c/events", "event-%d" % i)
        os.kill(os.getpid(), signal.SIGKILL)
    """)
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True)
    assert proc.returncode == -signal.SIGKILL
    rows = Outbox(path).fetch(limit=100)
    assert [r.payload.decode() for r in rows] == [f"event-{i}" for i in range(50)]


def test_unwritable_path_is_a_clear_error(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    with pytest.raises(OutboxError, match="cannot open outbox"):
        Outbox(blocker / "outbox.db")


def test_not_a_database_is_a_clear_error(tmp_path):
    bad = tmp_path / "o.db"
    bad.write_bytes(os.urandom(4096))
    with pytest.raises(OutboxError, match="cannot open outbox"):
        Outbox(bad)


def test_disk_full_raises_and_keeps_what_was_stored(tmp_path):
    """SQLite's 'database or disk is full' (forced with max_page_count) is an error, never a silent loss."""
    box = Outbox(tmp_path / "o.db")
    box.put("t", "before")
    pages = box._db.execute("PRAGMA page_count").fetchone()[0]
    box._db.execute(f"PRAGMA max_page_count = {pages}")
    with pytest.raises(OutboxError, match="full"):
        box.put("t", "x" * 100_000)
    assert [r.payload for r in box.fetch()] == [b"before"]
    assert box.depth() == 1


def test_one_process_per_outbox(tmp_path):
    path = tmp_path / "o.db"
    code = f"from camera.outbox import Outbox; Outbox({str(path)!r}); print('opened')"
    first = Outbox(path)
    other = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert other.returncode != 0 and "in use by another process" in other.stderr
    first.close()
    again = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert again.returncode == 0 and "opened" in again.stdout


# ---------------------------------------------------------------------------- rejections and dead letters (issue 12)


def test_rejections_are_counted_and_dead_lettered_after_the_limit(tmp_path):
    """A row the broker keeps rejecting leaves the queue after ``limit`` rejections and is kept, with its reason."""
    path = tmp_path / "o.db"
    box = Outbox(path)
    ids = box.put_many([("smartcam/s/c/events", f"m{i}", 1, False) for i in range(3)])
    assert box.reject(ids[:2], "Not authorized", limit=2) == (1, 0)  # first rejection: still queued
    assert box.depth() == 3 and box.dead_lettered == 0
    box.close()
    box = Outbox(path)  # the count survives a restart
    assert box.reject(ids[:2], "Not authorized", limit=2) == (2, 2)
    assert box.depth() == 1 and [r.payload for r in box.fetch()] == [b"m2"]
    dead = box.dead_letters()
    assert [(d.id, d.payload, d.reason, d.rejections) for d in dead] == [
        (ids[0], b"m0", "Not authorized", 2), (ids[1], b"m1", "Not authorized", 2)]
    assert box.dead_lettered == 2
    box.close()
    assert Outbox(path).dead_lettered == 2


def test_dead_letter_now_keeps_the_row_and_its_reason(tmp_path):
    box = Outbox(tmp_path / "o.db")
    [rid] = box.put_many([("smartcam/s/c/#", "x", 1, False)])
    assert box.dead_letter([rid], "the MQTT client refused it: wildcard in topic") == 1
    assert box.depth() == 0
    [d] = box.dead_letters()
    assert d.topic == "smartcam/s/c/#" and "wildcard" in d.reason


def test_an_outbox_from_before_dead_letters_opens_and_keeps_its_rows(tmp_path):
    import sqlite3

    path = tmp_path / "old.db"
    db = sqlite3.connect(path)
    db.executescript("CREATE TABLE outbox (id INTEGER PRIMARY KEY AUTOINCREMENT, topic TEXT NOT NULL, "
                     "payload BLOB NOT NULL, qos INTEGER NOT NULL, retain INTEGER NOT NULL, created REAL NOT NULL);"
                     "INSERT INTO outbox(topic, payload, qos, retain, created) VALUES ('t', X'6f6c64', 1, 0, 1.0);")
    db.close()
    box = Outbox(path)
    [row] = box.fetch()
    assert row.payload == b"old"
    assert box.reject([row.id], "Not authorized", limit=1) == (1, 1)


def test_failed_open_releases_the_lock_file(tmp_path):
    """A file that is not a database: the error is clear and the lock is released, so a retry can take it."""
    path = tmp_path / "o.db"
    path.write_bytes(b"this is not an SQLite database" * 100)
    with pytest.raises(OutboxError, match="cannot open outbox") as caught:
        Outbox(path)
    path.unlink()  # ``caught`` keeps the failed __init__'s frame alive, as a caller logging the error would
    Outbox(path).close()  # the same process may open it now: the lock of the failed attempt is gone
    import fcntl

    with open(path.with_name(path.name + ".lock"), "a+") as fh:  # and nobody holds the lock any more
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    assert "not a database" in str(caught.value)

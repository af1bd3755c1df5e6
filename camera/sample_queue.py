"""The durable sample queue: sampled frames wait here (bounded in *bytes*) until the broker acknowledges them.

Samples are tens of kilobytes where events are a few hundred bytes, so they get their own SQLite file beside the
outbox (``<outbox>.samples.db``, WAL, ``synchronous=FULL``) with a byte bound instead of a row bound: when a new
sample does not fit, the oldest are dropped and counted (``dropped``, persisted). The publisher sends them over
the camera's MQTT connection after the events (camera/publisher.py) and deletes each on its PUBACK; a crash
replays what was not acknowledged. A write failure here is logged and the sample lost: a sample is never worth
stopping the camera for (the events' outbox is).

>>> import tempfile, os
>>> q = SampleQueue(os.path.join(tempfile.mkdtemp(), "s.db"), max_bytes=10)
>>> [q.put(b"abcd") for _ in range(3)], q.depth(), q.bytes, q.dropped
([1, 2, 3], 2, 8, 1)
>>> [i for i, _ in q.fetch()]
[2, 3]
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
from pathlib import Path

log = logging.getLogger(__name__)

SCHEMA = """
CREATE TABLE IF NOT EXISTS samples (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    payload BLOB NOT NULL,
    size INTEGER NOT NULL,
    created REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
"""


def sample_queue_path(outbox_path: str | Path) -> Path:
    """The queue's file beside an outbox: ``edge.outbox.db`` -> ``edge.outbox.samples.db``."""
    p = Path(outbox_path)
    return p.with_name(p.stem + ".samples.db")


class SampleQueue:
    """A thread-safe FIFO of sample messages on disk, at most ``max_bytes`` of payload."""

    def __init__(self, path: str | Path, max_bytes: int) -> None:
        self.path = Path(path)
        self.max_bytes = int(max_bytes)
        self._lock = threading.Lock()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(str(self.path), check_same_thread=False, isolation_level=None, timeout=10)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(SCHEMA)
        n, size = self._db.execute("SELECT COUNT(*), COALESCE(SUM(size), 0) FROM samples").fetchone()
        self._depth, self.bytes = int(n), int(size)
        row = self._db.execute("SELECT value FROM meta WHERE key='dropped'").fetchone()
        self.dropped = int(row[0]) if row else 0
        self.queued = 0  # put in this run
        self.failed = 0  # could not be written (disk full...): lost, logged

    def put(self, payload: bytes) -> int | None:
        """Store one sample durably, dropping the oldest to stay within ``max_bytes``; None if it failed or is
        larger than the whole bound (logged)."""
        size = len(payload)
        if size > self.max_bytes:
            log.warning("sample of %d bytes is larger than samples.queue_max_bytes (%d): not queued", size,
                        self.max_bytes)
            self.failed += 1
            return None
        with self._lock:
            try:
                self._db.execute("BEGIN IMMEDIATE")
                new_id = int(self._db.execute("INSERT INTO samples(payload, size, created) VALUES (?, ?, ?)",
                                              (payload, size, time.time())).lastrowid)
                dropped, freed = 0, 0
                if self.bytes + size > self.max_bytes:
                    for old_id, old_size in self._db.execute("SELECT id, size FROM samples WHERE id < ? ORDER BY id",
                                                             (new_id,)).fetchall():
                        if self.bytes + size - freed <= self.max_bytes:
                            break
                        self._db.execute("DELETE FROM samples WHERE id = ?", (old_id,))
                        dropped, freed = dropped + 1, freed + old_size
                    self._db.execute("INSERT INTO meta(key, value) VALUES ('dropped', ?) ON CONFLICT(key) "
                                     "DO UPDATE SET value = value + excluded.value", (dropped,))
                self._db.execute("COMMIT")
            except sqlite3.Error as exc:
                if self._db.in_transaction:
                    self._db.execute("ROLLBACK")
                self.failed += 1
                log.error("cannot write sample queue %s: %s (sample lost; events are not affected)", self.path, exc)
                return None
            self._depth += 1 - dropped
            self.bytes += size - freed
            self.queued += 1
            if dropped:
                self.dropped += dropped
                log.warning("sample queue full (%d bytes): dropped the %d oldest sample(s), %d in total",
                            self.max_bytes, dropped, self.dropped)
        return new_id

    def fetch(self, after_id: int = 0, limit: int = 10) -> list[tuple[int, bytes]]:
        """The oldest ``limit`` samples with id > ``after_id``: (id, payload)."""
        with self._lock:
            rows = self._db.execute("SELECT id, payload FROM samples WHERE id > ? ORDER BY id LIMIT ?",
                                    (after_id, limit)).fetchall()
        return [(int(i), bytes(p)) for i, p in rows]

    def delete(self, sample_id: int) -> None:
        """Forget an acknowledged sample (a second delete of the same id is harmless)."""
        with self._lock:
            row = self._db.execute("DELETE FROM samples WHERE id = ? RETURNING size", (sample_id,)).fetchone()
            if row is not None:
                self._depth -= 1
                self.bytes -= int(row[0])

    def depth(self) -> int:
        return self._depth

    def close(self) -> None:
        with self._lock:
            self._db.close()

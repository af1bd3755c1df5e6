"""The durable outbox: every MQTT message is written here *before* it is published, deleted on PUBACK.

An SQLite database in WAL mode with ``synchronous=FULL``: a row that :meth:`Outbox.put` returned survives
``kill -9`` and power loss. Rows are replayed in ``id`` order. The table is bounded (``max_rows``): when full,
the oldest rows are dropped, counted in ``dropped`` (persisted, so it survives restarts) and logged — the only
way an event can be lost, and never silently. Duplicates on replay are allowed (the sink dedupes on event_id).

>>> import tempfile, os
>>> box = Outbox(os.path.join(tempfile.mkdtemp(), "o.db"), max_rows=2)
>>> [box.put("t", f"m{i}") for i in range(3)], box.depth(), box.dropped
([1, 2, 3], 2, 1)
>>> [r.payload for r in box.fetch()]
[b'm1', b'm2']
"""

from __future__ import annotations

import contextlib
import logging
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

SCHEMA = """
CREATE TABLE IF NOT EXISTS outbox (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    topic TEXT NOT NULL,
    payload BLOB NOT NULL,
    qos INTEGER NOT NULL,
    retain INTEGER NOT NULL,
    created REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS staged (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    window_start INTEGER NOT NULL,
    payload BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS staged_window ON staged(window_start);
"""


class OutboxError(RuntimeError):
    """The outbox cannot be opened or written (unwritable path, disk full, corrupt file): one-line message."""


@dataclass(frozen=True)
class Row:
    id: int
    topic: str
    payload: bytes
    qos: int
    retain: bool
    created: float


class Outbox:
    """A thread-safe bounded FIFO on disk (one connection, one lock: writes are small and rare)."""

    def __init__(self, path: str | Path, max_rows: int = 100_000) -> None:
        if max_rows < 1:
            raise ValueError("outbox max_rows must be >= 1")
        self.path = Path(path)
        self.max_rows = max_rows
        self._lock = threading.Lock()
        self._file_lock = None
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file_lock = _exclusive_lock(self.path)
            self._db = sqlite3.connect(str(self.path), check_same_thread=False, isolation_level=None, timeout=10)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.executescript(SCHEMA)
            row = self._db.execute("SELECT value FROM meta WHERE key='dropped'").fetchone()
            self._depth = self._db.execute("SELECT COUNT(*) FROM outbox").fetchone()[0]
        except (sqlite3.Error, OSError) as exc:
            raise OutboxError(f"cannot open outbox {self.path}: {exc}") from None
        self.dropped = int(row[0]) if row else 0

    def put(self, topic: str, payload: str | bytes, qos: int = 1, retain: bool = False) -> int:
        """Store one message durably; returns its id. Raises :class:`OutboxError` if it could not be stored."""
        return self.put_many([(topic, payload, qos, retain)])[-1]

    def put_many(self, messages: list[tuple[str, str | bytes, int, bool]]) -> list[int]:
        """Store several messages in one transaction (one fsync), in order."""
        return self._queue(messages)

    def _queue(self, messages: list[tuple[str, str | bytes, int, bool]], staged_window: int | None = None
               ) -> list[int]:
        """One transaction: insert ``messages`` and, if given, forget the events staged under ``staged_window``."""
        with self._lock:
            try:
                self._db.execute("BEGIN IMMEDIATE")
                ids, excess = self._insert(messages)
                if staged_window is not None:
                    self._db.execute("DELETE FROM staged WHERE window_start = ?", (staged_window,))
                self._db.execute("COMMIT")
            except sqlite3.Error as exc:
                self._rollback()
                raise OutboxError(f"cannot write outbox {self.path}: {exc}") from None
            self._account(len(ids), excess)
        return ids

    def _insert(self, messages: list[tuple[str, str | bytes, int, bool]]) -> tuple[list[int], int]:
        """INSERT inside an open transaction, dropping the oldest rows beyond ``max_rows``; (ids, dropped)."""
        data = [(t, p.encode() if isinstance(p, str) else p, q, int(r), time.time()) for t, p, q, r in messages]
        ids = [int(self._db.execute("INSERT INTO outbox(topic, payload, qos, retain, created) "
                                    "VALUES (?, ?, ?, ?, ?)", row).lastrowid) for row in data]
        excess = self._depth + len(ids) - self.max_rows
        if excess > 0:
            self._db.execute("DELETE FROM outbox WHERE id IN (SELECT id FROM outbox ORDER BY id LIMIT ?)", (excess,))
            self._db.execute("INSERT INTO meta(key, value) VALUES ('dropped', ?) ON CONFLICT(key) "
                             "DO UPDATE SET value = value + excluded.value", (excess,))
        return ids, max(excess, 0)

    def _account(self, added: int, excess: int) -> None:
        """Update the in-memory counters after a committed :meth:`_insert`."""
        self._depth += added - excess
        if excess > 0:
            self.dropped += excess
            log.warning("outbox full (%d rows): dropped the %d oldest message(s), %d dropped in total",
                        self.max_rows, excess, self.dropped)

    # ------------------------------------------------------------------ staging (summary mode)
    def stage(self, window: int, payloads: list[str | bytes]) -> None:
        """Keep events durably until their time window is summarised (:meth:`promote`); never published as is."""
        data = [(window, p.encode() if isinstance(p, str) else p) for p in payloads]
        with self._lock:
            try:
                self._db.execute("BEGIN IMMEDIATE")
                self._db.executemany("INSERT INTO staged(window_start, payload) VALUES (?, ?)", data)
                self._db.execute("COMMIT")
            except sqlite3.Error as exc:
                self._rollback()
                raise OutboxError(f"cannot write outbox {self.path}: {exc}") from None

    def staged_windows(self) -> list[int]:
        """The windows with staged events, oldest first (after a crash: the ones the last run did not close)."""
        with self._lock:
            try:
                return [r[0] for r in self._db.execute("SELECT DISTINCT window_start FROM staged ORDER BY window_start")]
            except sqlite3.Error as exc:
                raise OutboxError(f"cannot read outbox {self.path}: {exc}") from None

    def staged(self, window: int) -> list[bytes]:
        """The payloads staged for ``window``, in the order they were staged."""
        with self._lock:
            try:
                rows = self._db.execute("SELECT payload FROM staged WHERE window_start = ? ORDER BY id", (window,))
                return [bytes(r[0]) for r in rows]
            except sqlite3.Error as exc:
                raise OutboxError(f"cannot read outbox {self.path}: {exc}") from None

    def promote(self, window: int, messages: list[tuple[str, str | bytes, int, bool]]) -> list[int]:
        """In one transaction: queue ``messages`` (the window's summary) and forget the window's staged events.

        A crash before the commit leaves the events staged (summarised again on the next start); after it, only
        the summary exists. Either way the window is counted once.
        """
        return self._queue(messages, staged_window=window)

    def fetch(self, after_id: int = 0, limit: int = 100) -> list[Row]:
        """The oldest ``limit`` messages with id > ``after_id``, in order."""
        with self._lock:
            try:
                rows = self._db.execute("SELECT id, topic, payload, qos, retain, created FROM outbox WHERE id > ? "
                                        "ORDER BY id LIMIT ?", (after_id, limit)).fetchall()
            except sqlite3.Error as exc:
                raise OutboxError(f"cannot read outbox {self.path}: {exc}") from None
        return [Row(r[0], r[1], bytes(r[2]), r[3], bool(r[4]), r[5]) for r in rows]

    def delete(self, ids: list[int]) -> None:
        """Forget acknowledged messages (unknown ids are ignored: they may have been dropped meanwhile)."""
        if not ids:
            return
        with self._lock:
            try:
                self._db.execute("BEGIN IMMEDIATE")
                removed = self._db.executemany("DELETE FROM outbox WHERE id = ?", [(i,) for i in ids]).rowcount
                self._db.execute("COMMIT")
            except sqlite3.Error as exc:
                self._rollback()
                raise OutboxError(f"cannot delete from outbox {self.path}: {exc}") from None
            self._depth -= max(removed, 0)

    def depth(self) -> int:
        """Messages stored and not yet acknowledged."""
        return self._depth

    def _rollback(self) -> None:
        with contextlib.suppress(sqlite3.Error):
            self._db.execute("ROLLBACK")

    def close(self) -> None:
        with self._lock:
            with contextlib.suppress(sqlite3.Error):
                self._db.close()
            if self._file_lock is not None:
                self._file_lock.close()  # releases the flock
                self._file_lock = None


def _exclusive_lock(path: Path):
    """One process per outbox: two edges draining one file would double-send and miscount. The OS drops the
    lock when the process dies (kill -9 included), so a restart is never blocked by a stale lock."""
    handle = open(path.with_name(path.name + ".lock"), "a+")  # noqa: SIM115 - held open for the lock's life
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX: no lock
        return handle
    try:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        raise OutboxError(f"outbox {path} is in use by another process (two edges with the same site and "
                          "camera id, or the same --outbox?)") from None
    return handle

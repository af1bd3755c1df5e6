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

Rows the broker rejects (an MQTT 5 PUBACK with a failure reason, e.g. "Not authorized") are counted per row
(:meth:`Outbox.reject`); after ``limit`` rejections they move to the ``dead_letters`` table of the same file:
kept, counted in ``dead_lettered`` and listed by ``smartcam-edge outbox dead-letters --outbox PATH``.

>>> box.reject([3], "Not authorized", limit=1), box.depth(), box.dead_lettered
((1, 1), 1, 1)
"""

from __future__ import annotations

import contextlib
import json
import logging
import sqlite3
import threading
import time
from collections.abc import Callable
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
    created REAL NOT NULL,
    rejections INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS staged (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    window_start INTEGER NOT NULL,
    payload BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS staged_window ON staged(window_start);
CREATE TABLE IF NOT EXISTS dead_letters (
    id INTEGER PRIMARY KEY,
    topic TEXT NOT NULL,
    payload BLOB NOT NULL,
    qos INTEGER NOT NULL,
    retain INTEGER NOT NULL,
    created REAL NOT NULL,
    rejections INTEGER NOT NULL,
    reason TEXT NOT NULL,
    dead_at REAL NOT NULL
);
"""
# An outbox file made without the column gets it on open (rows keep their ids and order).
REJECTIONS_COLUMN = "ALTER TABLE outbox ADD COLUMN rejections INTEGER NOT NULL DEFAULT 0"


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


@dataclass(frozen=True)
class DeadLetter:
    """A row taken out of the queue because the broker kept rejecting it (or the MQTT client refused it)."""

    id: int
    topic: str
    payload: bytes
    qos: int
    retain: bool
    created: float
    rejections: int
    reason: str
    dead_at: float


class Outbox:
    """A thread-safe bounded FIFO on disk (one connection, one lock: writes are small and rare)."""

    def __init__(self, path: str | Path, max_rows: int = 100_000) -> None:
        if max_rows < 1:
            raise ValueError("outbox max_rows must be >= 1")
        self.path = Path(path)
        self.max_rows = max_rows
        self._lock = threading.Lock()
        self._file_lock = None
        self._db: sqlite3.Connection | None = None
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file_lock = _exclusive_lock(self.path)
            self._db = sqlite3.connect(str(self.path), check_same_thread=False, isolation_level=None, timeout=10)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            # one transaction: a fresh file costs a few WAL pages, not two per statement (an outbox on a nearly
            # full disk must still have room for its first events)
            self._db.executescript(f"BEGIN IMMEDIATE;\n{SCHEMA}\nCOMMIT;")
            columns = {r[1] for r in self._db.execute("PRAGMA table_info(outbox)")}
            if "rejections" not in columns:
                self._db.execute(REJECTIONS_COLUMN)
            row = self._db.execute("SELECT value FROM meta WHERE key='dropped'").fetchone()
            self._depth = self._db.execute("SELECT COUNT(*) FROM outbox").fetchone()[0]
            self.dead_lettered = self._db.execute("SELECT COUNT(*) FROM dead_letters").fetchone()[0]
        except (sqlite3.Error, OSError) as exc:
            self.close()  # the lock file and the connection of a failed open are not left behind
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

    def fetch_ids(self, ids: list[int]) -> list[Row]:
        """The rows among ``ids`` that are still queued, in order (a retry after a rejection)."""
        with self._lock:
            try:
                rows = self._db.execute("SELECT id, topic, payload, qos, retain, created FROM outbox WHERE id IN "
                                        "(SELECT value FROM json_each(?)) ORDER BY id", (_json_ids(ids),)).fetchall()
            except sqlite3.Error as exc:
                raise OutboxError(f"cannot read outbox {self.path}: {exc}") from None
        return [Row(r[0], r[1], bytes(r[2]), r[3], bool(r[4]), r[5]) for r in rows]

    def newer_on_topic(self, topic: str, after_id: int) -> bool:
        """Whether a row newer than ``after_id`` is queued on ``topic`` (a retained snapshot superseded)."""
        with self._lock:
            try:
                return self._db.execute("SELECT 1 FROM outbox WHERE topic = ? AND id > ? LIMIT 1",
                                        (topic, after_id)).fetchone() is not None
            except sqlite3.Error as exc:
                raise OutboxError(f"cannot read outbox {self.path}: {exc}") from None

    def reject(self, ids: list[int], reason: str, *, limit: int) -> tuple[int, int]:
        """Count one broker rejection of ``ids``; the rows rejected ``limit`` times move to the dead letters.

        Returns (the highest rejection count among the rows, the rows dead-lettered now).
        """
        return self._dead_letter(ids, reason, increment=1, limit=limit)

    def dead_letter(self, ids: list[int], reason: str) -> int:
        """Move ``ids`` to the dead letters now (a row that can never be sent); returns the rows moved."""
        return self._dead_letter(ids, reason, increment=0, limit=0)[1]

    def _dead_letter(self, ids: list[int], reason: str, *, increment: int, limit: int) -> tuple[int, int]:
        if not ids:
            return 0, 0
        ids_json = _json_ids(ids)
        chosen = "id IN (SELECT value FROM json_each(?))"
        with self._lock:
            try:
                self._db.execute("BEGIN IMMEDIATE")
                self._db.execute(f"UPDATE outbox SET rejections = rejections + ? WHERE {chosen}",
                                 (increment, ids_json))
                worst = self._db.execute(f"SELECT MAX(rejections) FROM outbox WHERE {chosen}",
                                         (ids_json,)).fetchone()[0] or 0
                moved = self._db.execute(
                    "INSERT OR REPLACE INTO dead_letters(id, topic, payload, qos, retain, created, rejections, "
                    f"reason, dead_at) SELECT id, topic, payload, qos, retain, created, rejections, ?, ? FROM outbox "
                    f"WHERE {chosen} AND rejections >= ?", (reason, time.time(), ids_json, limit)).rowcount
                self._db.execute(f"DELETE FROM outbox WHERE {chosen} AND rejections >= ?", (ids_json, limit))
                excess = self.dead_lettered + moved - self.max_rows
                if excess > 0:  # bounded like the queue: the oldest dead letters go, counted as dropped
                    self._db.execute("DELETE FROM dead_letters WHERE id IN (SELECT id FROM dead_letters "
                                     "ORDER BY dead_at, id LIMIT ?)", (excess,))
                    self._db.execute("INSERT INTO meta(key, value) VALUES ('dropped', ?) ON CONFLICT(key) "
                                     "DO UPDATE SET value = value + excluded.value", (excess,))
                self._db.execute("COMMIT")
            except sqlite3.Error as exc:
                self._rollback()
                raise OutboxError(f"cannot write outbox {self.path}: {exc}") from None
            moved = max(moved, 0)
            self._depth -= moved
            self.dead_lettered += moved - max(excess, 0)
            if excess > 0:
                self.dropped += excess
                log.warning("outbox dead letters full (%d rows): dropped the %d oldest, %d dropped in total",
                            self.max_rows, excess, self.dropped)
        return int(worst), moved

    def dead_letters(self, limit: int | None = None) -> list[DeadLetter]:
        """The dead letters, oldest first (``limit``: at most that many)."""
        with self._lock:
            return read_dead_letters(self.path, limit)

    def delete(self, ids: list[int]) -> int:
        """Forget acknowledged messages (unknown ids are ignored: they may have been dropped meanwhile); returns
        how many rows were removed."""
        if not ids:
            return 0
        with self._lock:
            try:
                self._db.execute("BEGIN IMMEDIATE")
                removed = self._db.executemany("DELETE FROM outbox WHERE id = ?", [(i,) for i in ids]).rowcount
                self._db.execute("COMMIT")
            except sqlite3.Error as exc:
                self._rollback()
                raise OutboxError(f"cannot delete from outbox {self.path}: {exc}") from None
            self._depth -= max(removed, 0)
        return max(removed, 0)

    def rewrite(self, change: Callable[[bytes], bytes | None]) -> int:
        """Replace, in one transaction, the payload of every queued row for which ``change`` returns new bytes
        (None: keep it); returns how many changed. Used once the clock is set, to correct the times of events
        stamped before (camera/clock.py). Row ids and order do not change."""
        with self._lock:
            try:
                self._db.execute("BEGIN IMMEDIATE")
                rows = self._db.execute("SELECT id, payload FROM outbox ORDER BY id").fetchall()
                updates = [(new, rid) for rid, old in rows if (new := change(bytes(old))) is not None]
                self._db.executemany("UPDATE outbox SET payload = ? WHERE id = ?", updates)
                self._db.execute("COMMIT")
            except sqlite3.Error as exc:
                self._rollback()
                raise OutboxError(f"cannot write outbox {self.path}: {exc}") from None
        return len(updates)

    def depth(self) -> int:
        """Messages stored and not yet acknowledged."""
        return self._depth

    def _rollback(self) -> None:
        with contextlib.suppress(sqlite3.Error):
            self._db.execute("ROLLBACK")

    def close(self) -> None:
        with self._lock:
            if self._db is not None:
                with contextlib.suppress(sqlite3.Error):
                    self._db.close()
            if self._file_lock is not None:
                self._file_lock.close()  # releases the flock
                self._file_lock = None


def _json_ids(ids: list[int]) -> str:
    """Row ids as one JSON array parameter (no SQL built from values, no limit on the number of ids)."""
    return json.dumps([int(i) for i in ids])


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


def read_dead_letters(path: str | Path, limit: int | None = None) -> list[DeadLetter]:
    """The dead letters of an outbox file, read-only and without its lock (the edge may be running)."""
    path = Path(path)
    if not path.is_file():
        raise OutboxError(f"no outbox at {path}")
    try:
        db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    except sqlite3.Error as exc:
        raise OutboxError(f"cannot open outbox {path}: {exc}") from None
    try:
        tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        if "dead_letters" not in tables:
            return []  # an outbox from before dead letters
        rows = db.execute("SELECT id, topic, payload, qos, retain, created, rejections, reason, dead_at FROM "
                          "dead_letters ORDER BY dead_at, id LIMIT ?", (-1 if limit is None else limit,)).fetchall()
    except sqlite3.Error as exc:
        raise OutboxError(f"cannot read outbox {path}: {exc}") from None
    finally:
        db.close()
    return [DeadLetter(r[0], r[1], bytes(r[2]), r[3], bool(r[4]), r[5], r[6], r[7], r[8]) for r in rows]

"""Copy stored events to the archive from a persistent cursor in the database, off the ingest's ack path.

The database is the record; the archive follows it. Each event's *position* is the order in which the
database committed it: SQLite's ``rowid`` (one writer at a time, so rowid order is commit order), PostgreSQL's
``events.stored_xid`` (the id of the transaction that inserted the row, migration 5). The cursor — "every event
before this position is archived" — lives in the ``archive_cursors`` table, one row per archive URL, and only
moves after the parts covering it are written. So:

- an archive outage (S3 down, disk full) leaves no hole: nothing moves the cursor until the write succeeds,
  and the follower retries with backoff;
- an archive added later (or a new bucket) starts at position 0 and receives every stored event (this is the
  backfill);
- a crash between a part's write and the cursor's update rewrites those events once more; compaction keeps
  each event once.

PostgreSQL commits out of order: share-group workers' transactions may commit in any order of their ids, so the
follower reads only rows of transactions older than the oldest one still running
(``pg_snapshot_xmin(pg_current_snapshot())``), which can never gain rows (a writing transaction left open holds
the archive back until it ends: ``smartcam_sink_archive_lag_events`` shows it). One follower at a time writes: the
cursor row carries a lease (owner, expiry) that other workers' followers respect and take over when it lapses.

Compaction: a partition is folded into its ``events.jsonl`` once its hour has ended and no part was written to
it for ``settle_s`` (so late events replayed from an edge outbox are compacted once per burst, not once per
batch).
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa

from cloud_sink.archive import Archive, partition_end, partition_of
from cloud_sink.store import Store, archive_cursors_table, events_table

log = logging.getLogger(__name__)

DEFAULT_INTERVAL_S = 5.0
DEFAULT_SETTLE_S = 600.0
DEFAULT_PAGE = 5000


@dataclass
class FollowerStats:
    """What the follower did since start (logged, and for health endpoints)."""

    archived: int = 0  # events written to parts
    parts: int = 0
    compacted: int = 0  # partitions compacted
    failures: int = 0  # failed attempts (each retried)
    skipped: int = 0  # stored events the archive cannot place (never expected: they were validated)
    last_error: str | None = None


class ArchiveFollower:
    """Archive every stored event once, in commit order, from the cursor of ``archive.url`` in ``store``."""

    def __init__(self, store: Store, archive: Archive, *, interval_s: float = DEFAULT_INTERVAL_S,
                 settle_s: float = DEFAULT_SETTLE_S, page: int = DEFAULT_PAGE, lease_s: float | None = None,
                 max_backoff_s: float = 60.0, owner: str | None = None) -> None:
        self.store = store
        self.archive = archive
        self.name = archive.url[:500]
        self.interval_s = interval_s
        self.settle_s = settle_s
        self.page = max(1, page)
        self.lease_s = lease_s or max(30.0, 4 * interval_s)
        self.max_backoff_s = max_backoff_s
        self.owner = owner or f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.stats = FollowerStats()
        self._dirty: dict[str, float] = {}  # partition -> when a part was last written to it
        self._scanned = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._postgres = store.dialect == "postgresql"
        self._position: int | None = None  # the cursor while we hold the lease (nobody else moves it)
        self._held_until = 0  # epoch ms

    # ------------------------------------------------------------------------------------------ one round
    def step(self, now: float | None = None) -> int:
        """Archive everything committed since the cursor, then compact settled partitions; events archived.

        Raises what the archive or the database raised; the cursor then stays where the last success left it.
        Returns 0 without doing anything while another worker's follower holds the lease.
        """
        now = time.time() if now is None else now
        position = self._claim()
        if position is None:
            return 0
        if not self._scanned:  # parts a previous run left: compacted as soon as their hour is settled
            for partition in self.archive.parts():
                self._dirty.setdefault(partition, 0.0)
            self._scanned = True
        done = 0
        while True:
            rows, next_position = self._pending(position)
            if not rows:
                break
            events = self._placeable([json.loads(payload) for _, payload in rows])
            if events:
                self.archive.write(events, name=f"{rows[0][0]:020d}-{rows[-1][0]:020d}")
            for partition in {partition_of(ev) for ev in events}:
                self._dirty[partition] = now
            if not self._advance(position, next_position):
                log.warning("archive: another worker took over the archive cursor; stopping this round")
                return done
            self.stats.archived += len(events)
            self.stats.parts += 1
            done += len(events)
            position = next_position
        for partition, last_write in sorted(self._dirty.items()):
            if now >= partition_end(partition) + self.settle_s and now >= last_write + self.settle_s:
                self.archive.compact(partition)
                del self._dirty[partition]
                self.stats.compacted += 1
        return done

    def _placeable(self, events: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Events the archive can place; one it cannot (validated on ingest, so never expected) is skipped and
        logged rather than stalling the archive behind it."""
        placeable = []
        for ev in events:
            try:
                partition_of(ev)
            except ValueError as exc:
                self.stats.skipped += 1
                log.error("archive: event %s skipped: %s", ev.get("event_id") if isinstance(ev, dict) else "?", exc)
                continue
            placeable.append(ev)
        return placeable

    def pending(self) -> int:
        """Stored events the archive does not have yet (the follower's lag, in events)."""
        with self.store.engine.connect() as conn:
            position = conn.execute(sa.select(archive_cursors_table.c.position).where(
                archive_cursors_table.c.archive == self.name)).scalar() or 0
            return conn.execute(sa.select(sa.func.count()).select_from(events_table).where(
                self._position_column() >= position)).scalar_one()

    # ------------------------------------------------------------------------------------------ the thread
    def start(self) -> None:
        """Follow in a daemon thread until :meth:`stop`."""
        self._thread = threading.Thread(target=self._run, name="archive", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Archive what is left (one last round), release the lease and end the thread."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                log.warning("archive: still writing after %.0f s at shutdown; the next start catches up", timeout)
        self._release()

    def _run(self) -> None:
        delay = self.interval_s
        failing_since: int | None = None
        while True:
            stopping = self._stop.is_set()
            try:
                n = self.step()
                if failing_since is not None:
                    log.info("archive: %s works again after %d failed attempts; %d events caught up",
                             self.archive.url, self.stats.failures - failing_since, n)
                failing_since, delay = None, self.interval_s
            except Exception as exc:  # archive or database unavailable: retried, the cursor did not move
                self.stats.failures += 1
                self.stats.last_error = str(exc).splitlines()[0][:300] if str(exc) else type(exc).__name__
                if failing_since is None:
                    failing_since = self.stats.failures - 1
                    log.error("archive: %s (events stay in the database and are archived when it works "
                              "again; retrying)", self.stats.last_error)
                delay = min(max(delay, self.interval_s) * 2, self.max_backoff_s)
            if stopping or self._stop.wait(delay):
                if not stopping:
                    continue  # one last round after stop() was called
                return

    # ------------------------------------------------------------------------------------------ the database
    def _position_column(self) -> Any:
        return sa.literal_column("stored_xid" if self._postgres else "rowid", sa.BigInteger)

    def _pending(self, position: int) -> tuple[list[tuple[int, str]], int]:
        """Rows at ``position`` or later that can no longer change, whole transactions only; next cursor."""
        pos = self._position_column()
        query = sa.select(pos, events_table.c.payload).where(pos >= position)
        if self._postgres:
            query = query.where(pos < sa.text("pg_snapshot_xmin(pg_current_snapshot())::text::bigint"))
        with self.store.engine.connect() as conn:
            rows = [(int(p), payload) for p, payload in conn.execute(query.order_by(pos).limit(self.page))]
            if not rows:
                return [], position
            last = rows[-1][0]
            if len(rows) < self.page or not self._postgres:
                return rows, last + 1  # rowids are unique; a short page holds every finished transaction
            whole = [r for r in rows if r[0] < last]
            if whole:
                return whole, last  # the last transaction may continue beyond the page: next time
            rows = [(int(p), payload) for p, payload in conn.execute(
                sa.select(pos, events_table.c.payload).where(pos == last))]
            return rows, last + 1  # one transaction larger than a page: taken whole

    def _claim(self) -> int | None:
        """Take or renew the lease; the cursor position, or None while another owner holds it."""
        c = archive_cursors_table.c
        now_ms = int(time.time() * 1000)
        if self._position is not None and self._held_until - now_ms > self.lease_s * 500:
            return self._position  # our lease has more than half its time left: no write needed
        until = now_ms + int(self.lease_s * 1000)
        self._position = None
        with self.store.engine.begin() as conn:
            row = conn.execute(sa.select(c.position).where(c.archive == self.name)).first()
            if row is None:
                try:
                    with conn.begin_nested():
                        conn.execute(archive_cursors_table.insert().values(
                            archive=self.name, position=0, owner=self.owner, lease_until=until, updated_at=now_ms))
                except sa.exc.IntegrityError:  # another worker created it first
                    return None
                self._held(0, until)
                return 0
            taken = conn.execute(archive_cursors_table.update().where(
                c.archive == self.name, sa.or_(c.owner == self.owner, c.owner.is_(None), c.lease_until < now_ms),
            ).values(owner=self.owner, lease_until=until)).rowcount
            if not taken:
                return None
            self._held(int(row.position), until)
            return self._position

    def _held(self, position: int, until_ms: int) -> None:
        self._position, self._held_until = position, until_ms

    def _advance(self, old: int, new: int) -> bool:
        c = archive_cursors_table.c
        now_ms = int(time.time() * 1000)
        until = now_ms + int(self.lease_s * 1000)
        with self.store.engine.begin() as conn:
            moved = conn.execute(archive_cursors_table.update().where(
                c.archive == self.name, c.owner == self.owner, c.position == old,
            ).values(position=new, lease_until=until, updated_at=now_ms)).rowcount == 1
        if moved:
            self._held(new, until)
        else:
            self._position = None
        return moved

    def _release(self) -> None:
        c = archive_cursors_table.c
        self._position = None
        try:
            with self.store.engine.begin() as conn:
                conn.execute(archive_cursors_table.update().where(c.archive == self.name, c.owner == self.owner)
                             .values(owner=None, lease_until=0))
        except sa.exc.SQLAlchemyError as exc:  # the lease lapses on its own
            log.warning("archive: could not release the cursor lease: %s", str(exc).splitlines()[0][:200])

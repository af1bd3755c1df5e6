"""List and replay dead letters: a message the sink refused is kept, never silently gone.

The commonest dead letter a real camera produces is not an attack but a clock: a device whose clock was wrong
(a Pi before NTP, a camera a year behind) sends events the time window (``--max-past-days``, ``max_future_s``)
refuses. Those events are genuine; once the cause is understood they are replayed with a wider window:

    smartcam-sink dead-letters list   --db URL --reason "days in the past"
    smartcam-sink dead-letters replay --db URL --reason "days in the past" --max-past-days 3650

Replay runs each matching dead letter through the same validation as live ingest (with the given window) and
stores what passes through the same idempotent write (``event_id`` is the key: a replay, or a second replay,
never stores an event twice); the replayed dead letters are then deleted. What still fails stays a dead letter.
A crash between the two steps leaves the dead letters in place; replaying again stores nothing new and deletes
them. A dead letter whose payload was cut to the first 4 KiB at the time cannot be replayed (counted, kept).

>>> from cloud_sink.store import Store
>>> store = Store.open("sqlite:///:memory:")
>>> replay(store, reason="anything").matched
0
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa

from cloud_sink.ingest import _batch
from cloud_sink.store import Store, dead_letters_table
from cloud_sink.validation import Limits, check_messages
from contract.batch import BATCH_LEAF


@dataclass
class ReplayResult:
    matched: int = 0  # dead letters whose reason matched
    stored: int = 0  # events (and summaries) stored for the first time
    already_stored: int = 0  # valid now, but already in the database (an earlier replay, a re-send)
    replayed: int = 0  # dead letters that passed validation and were deleted
    still_dead: int = 0  # failed again (kept)
    truncated: int = 0  # payload cut at dead-lettering time: cannot be replayed (kept)


def _matching(reason: str | None) -> Any:
    query = sa.select(dead_letters_table).order_by(dead_letters_table.c.id)
    if reason:
        query = query.where(dead_letters_table.c.reason.contains(reason, autoescape=True))
    return query


def list_dead_letters(store: Store, *, reason: str | None = None, limit: int = 100) -> list[dict[str, Any]]:
    """Oldest first, optionally only those whose reason contains ``reason``."""
    with store.engine.connect() as conn:
        rows = conn.execute(_matching(reason).limit(limit)).mappings().all()
    return [dict(r) for r in rows]


def count_dead_letters(store: Store, *, reason: str | None = None) -> int:
    with store.engine.connect() as conn:
        return conn.execute(sa.select(sa.func.count()).select_from(_matching(reason).subquery())).scalar_one()


def _live_topic(topic: str) -> str:
    """A dead letter from a batch message holds one event line: it is checked as a message on ``.../events``."""
    head, _, leaf = topic.rpartition("/")
    return f"{head}/events" if leaf == BATCH_LEAF else topic


def replay(store: Store, *, reason: str, limits: Limits | None = None, now: float | None = None,
           dry_run: bool = False, chunk: int = 500) -> ReplayResult:
    """Re-validate the dead letters whose reason contains ``reason`` with ``limits``; store what passes."""
    if not reason:
        raise ValueError("replay needs --reason (a part of the dead letters' reason): replaying everything would "
                         "retry every hostile payload too")
    limits = limits or Limits()
    now = time.time() if now is None else now
    result = ReplayResult()
    last_id = 0
    while True:
        with store.engine.connect() as conn:
            rows = conn.execute(_matching(reason).where(dead_letters_table.c.id > last_id).limit(chunk)
                                ).mappings().all()
        if not rows:
            return result
        last_id = rows[-1]["id"]
        result.matched += len(rows)
        passed: list[tuple[Any, bytes]] = []
        done_ids: list[int] = []
        for r in rows:
            payload = r["payload"].encode("utf-8", "surrogateescape")
            if len(payload) < r["payload_bytes"]:
                result.truncated += 1
                continue
            checked = check_messages(_live_topic(r["topic"]), payload, now=now, limits=limits)
            if any(c.kind == "dead" for c, _ in checked):
                result.still_dead += 1
                continue
            passed += checked
            done_ids.append(r["id"])
        valid = sum(1 for c, _ in passed if c.kind in ("event", "summary"))
        if dry_run:
            result.replayed += len(done_ids)
            continue
        written = store.write(_batch(passed, now), received_at=now)
        new = len(written.new_events) + len(written.new_summaries)
        result.stored += new
        result.already_stored += valid - new
        if done_ids:  # after the commit above: a crash in between only means replaying these again
            with store.engine.begin() as conn:
                conn.execute(dead_letters_table.delete().where(dead_letters_table.c.id.in_(done_ids)))
        result.replayed += len(done_ids)

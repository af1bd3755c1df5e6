"""The sink's storage: SQLAlchemy Core tables on SQLite (WAL, default) or PostgreSQL (psycopg 3), one code path.

Exactly-once: ``(site, camera_id, event_id)`` is the primary key (ids are unique per camera: another camera's
ids cannot suppress these) and every insert is ``INSERT ... ON CONFLICT DO NOTHING RETURNING``, so QoS 1
redeliveries and outbox replays are dropped by the database itself, and the hourly rollups are updated in the same
transaction from the *returned* (newly inserted) rows only — a duplicate can never count twice. A stored id whose
new copy differs is a conflict: the first stays, the copy becomes a dead letter with the reason. Dead letters are
stored once (a digest), capped in rows and age. Schema changes are a versioned list of migrations applied at
:meth:`Store.open`.

Summaries (an edge in summary mode sends one ``summary.v1`` message per camera and time window instead of its
events) take the same road: ``(site, camera_id, summary_id)`` is the key, and only a newly inserted summary's
increments (``cloud_sink.rollups.summary_deltas``) are merged with the new events' and applied by the one rollup
writer, ``cloud_sink.rollups.apply_deltas``. So hourly/daily figures are the same whichever way a camera
publishes. The rollup tables themselves live in ``cloud_sink.rollups``; this module holds the events, summaries,
dead letters, cameras and the migrations.

Time columns are epoch **milliseconds** (BIGINT, UTC): ``events.ts`` is the camera's capture time,
``received_at`` the sink's clock. Rollup ``hour`` columns are epoch **seconds** of the UTC hour start. Query
methods accept ``since``/``until`` as epoch seconds, ``datetime`` or an RFC 3339 string, and return plain
dicts with timestamps formatted by ``contract.timestamps.format_ts``.

>>> store = Store.open("sqlite:///:memory:")
>>> store.event_count()
0
"""

from __future__ import annotations

import hashlib
import json
import logging
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, TypeVar

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from cloud_sink import rollups
from cloud_sink.rollups import merge_deltas, summary_deltas
from contract.rollup import SUMMARY_LEAF, Deltas, deltas
from contract.timestamps import format_ts, ts_ms
from contract.topics import topic_for

log = logging.getLogger(__name__)
T = TypeVar("T")

DEAD_LETTER_PAYLOAD_BYTES = 4096
NAME = sa.String(64)

metadata = sa.MetaData()

migrations_table = sa.Table(
    "schema_migrations", metadata,
    sa.Column("version", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("description", sa.String(200), nullable=False),
    sa.Column("applied_at", sa.BigInteger, nullable=False),
)

events_table = sa.Table(
    "events", metadata,
    sa.Column("event_id", sa.String(32), nullable=False),
    sa.Column("site", NAME, nullable=False),
    sa.Column("camera_id", NAME, nullable=False),
    sa.Column("type", sa.String(16), nullable=False),
    sa.Column("ts", sa.BigInteger, nullable=False),  # epoch ms, capture time
    sa.Column("track_id", sa.BigInteger),
    sa.Column("zone", NAME),
    sa.Column("line", NAME),
    sa.Column("direction", sa.String(3)),
    sa.Column("count", sa.Integer),
    sa.Column("dwell_s", sa.Float),
    sa.Column("payload", sa.Text, nullable=False),  # the event exactly as validated, JSON
    sa.Column("received_at", sa.BigInteger, nullable=False),  # epoch ms, sink clock
    sa.PrimaryKeyConstraint("site", "camera_id", "event_id"),  # migration 6: ids are unique per camera
    sa.Index("ix_events_camera_ts", "site", "camera_id", "ts"),
    sa.Index("ix_events_type_ts", "type", "ts"),
)

dead_letters_table = sa.Table(
    "dead_letters", metadata,
    sa.Column("id", sa.BigInteger().with_variant(sa.Integer, "sqlite"), primary_key=True, autoincrement=True),
    sa.Column("received_at", sa.BigInteger, nullable=False),
    sa.Column("topic", sa.String(512), nullable=False),
    sa.Column("reason", sa.String(500), nullable=False),
    sa.Column("payload", sa.Text, nullable=False),  # first 4 KiB, undecodable bytes as \\x.. escapes
    sa.Column("payload_bytes", sa.Integer, nullable=False),  # original size
    # migration 8: sha256 of topic, reason and the whole payload: a redelivered (or second sink's) copy of the same
    # refused message is stored once (NULL for rows written before)
    sa.Column("digest", sa.String(64)),
    sa.Index("ix_dead_letters_received", "received_at"),
    sa.Index("ux_dead_letters_digest", "digest", unique=True),
)

sink_state_table = sa.Table(  # migration 8: counters and settings the sink reports (sink_state())
    "sink_state", metadata,
    sa.Column("name", sa.String(64), primary_key=True),
    sa.Column("value", sa.BigInteger, nullable=False),
    sa.Column("updated_at", sa.BigInteger, nullable=False),  # epoch ms
)

cameras_table = sa.Table(
    "cameras", metadata,
    sa.Column("site", NAME, primary_key=True),
    sa.Column("camera_id", NAME, primary_key=True),
    sa.Column("state", sa.String(8), nullable=False, server_default="unknown"),  # online/offline/unknown
    sa.Column("status_at", sa.BigInteger),  # when the sink received the last status (ms)
    sa.Column("last_seen", sa.BigInteger),  # newest event/stats capture time (ms)
    sa.Column("fps", sa.Float),
    sa.Column("inference_ms_p50", sa.Float),
    sa.Column("inference_ms_p95", sa.Float),
    sa.Column("stats", sa.Text),  # last stats message, JSON
    sa.Column("stats_at", sa.BigInteger),
    # events stored for the first time, plus the ``events`` a new summary stands for (summarised events count)
    sa.Column("events_total", sa.BigInteger, nullable=False, server_default="0"),
)

summaries_table = sa.Table(  # migration 3: summary messages, stored once (their increments are in the rollups)
    "summaries", metadata,
    sa.Column("summary_id", sa.String(32), nullable=False),
    sa.Column("site", NAME, nullable=False),
    sa.Column("camera_id", NAME, nullable=False),
    sa.Column("start", sa.BigInteger, nullable=False),  # epoch ms, window start (inclusive), capture time
    sa.Column("end", sa.BigInteger, nullable=False),  # epoch ms, window end (exclusive)
    sa.Column("events", sa.BigInteger, nullable=False),  # how many events it stands for
    sa.Column("received_at", sa.BigInteger, nullable=False),  # epoch ms, sink clock
    sa.Column("payload", sa.Text, nullable=False),  # the summary as validated, compact JSON
    sa.PrimaryKeyConstraint("site", "camera_id", "summary_id"),  # migration 6
    sa.Index("ix_summaries_camera_start", "site", "camera_id", "start"),
)



camera_models_table = sa.Table(  # migration 4: each camera's latest model/reported document (over-the-air models)
    "camera_models", metadata,
    sa.Column("site", NAME, primary_key=True),
    sa.Column("camera_id", NAME, primary_key=True),
    sa.Column("state", sa.String(16), nullable=False),  # of the latest update: active, rejected, rolled_back, ...
    sa.Column("version", sa.String(64)),  # the version that state is about
    sa.Column("reason", sa.Text),  # why it was rejected / rolled back
    sa.Column("active_version", sa.String(64)),  # what detects now (null: the camera's configured model)
    sa.Column("active_name", sa.String(128)),
    sa.Column("active_sha256", sa.String(64)),
    sa.Column("reported_at", sa.BigInteger, nullable=False),  # epoch ms, edge clock (the document's ts)
    sa.Column("received_at", sa.BigInteger, nullable=False),  # epoch ms, sink clock
    sa.Column("payload", sa.Text, nullable=False),  # the document as validated
)

archive_cursors_table = sa.Table(  # migration 5: how far each archive has followed the events (archive_follower)
    "archive_cursors", metadata,
    sa.Column("archive", sa.String(500), primary_key=True),  # the archive's URL
    sa.Column("position", sa.BigInteger, nullable=False),  # every event before it (rowid / stored_xid) is archived
    sa.Column("owner", sa.String(200)),  # the follower holding the lease (one writer per archive)
    sa.Column("lease_until", sa.BigInteger),  # epoch ms
    sa.Column("updated_at", sa.BigInteger),  # epoch ms
)


def _migration_1(conn: Connection) -> None:
    metadata.create_all(conn, tables=[events_table, dead_letters_table, cameras_table])
    rollups.metadata.create_all(conn, tables=rollups.HOURLY_TABLES)


def _migration_2(conn: Connection) -> None:
    """Daily distinct tracks kept on ingest (a COUNT DISTINCT over a month of hourly tracks took ~0.5 s)."""
    rollups.metadata.create_all(conn, tables=rollups.DAILY_TABLES)
    rollup_tracks, rollup_day_tracks, rollup_daily = rollups.rollup_tracks, rollups.rollup_day_tracks, rollups.rollup_daily
    t = rollup_tracks.c
    day = (t.hour // 86400) * 86400
    conn.execute(rollup_day_tracks.insert().from_select(
        ["site", "camera_id", "zone", "day", "track_id"],
        sa.select(t.site, t.camera_id, t.zone, day, t.track_id).distinct()))
    d = rollup_day_tracks.c
    conn.execute(rollup_daily.insert().from_select(
        ["site", "camera_id", "zone", "day", "unique_tracks"],
        sa.select(d.site, d.camera_id, d.zone, d.day, sa.func.count()).group_by(d.site, d.camera_id, d.zone, d.day)))


def _migration_3(conn: Connection) -> None:
    """Summary messages (edges in summary mode)."""
    metadata.create_all(conn, tables=[summaries_table])


def _migration_4(conn: Connection) -> None:
    """The model each camera runs and its latest update's outcome (model/reported documents)."""
    metadata.create_all(conn, tables=[camera_models_table])


def _migration_5(conn: Connection) -> None:
    """Archive cursors; on PostgreSQL each event also records the transaction that stored it (``stored_xid``),
    the commit order the archive follows (SQLite commits one writer at a time: its ``rowid`` is that order).
    The column stays out of ``events_table`` (SQLite has no such default); a rebuild of ``events`` must keep it."""
    metadata.create_all(conn, tables=[archive_cursors_table])
    if conn.dialect.name == "postgresql":
        conn.execute(sa.text("ALTER TABLE events ADD COLUMN IF NOT EXISTS stored_xid BIGINT NOT NULL "
                             "DEFAULT (pg_current_xact_id()::text::bigint)"))
        conn.execute(sa.text("CREATE INDEX IF NOT EXISTS ix_events_stored_xid ON events (stored_xid)"))


def _migration_6(conn: Connection) -> None:
    """Idempotency per camera: events and summaries are keyed by (site, camera_id, id), so one camera's ids can
    never suppress another's. PostgreSQL swaps the primary key in place (every other column, e.g. ``stored_xid``,
    stays); SQLite cannot, so the table is rebuilt with its rows and their ``rowid`` (the archive's order)."""
    for table, id_name in ((events_table, "event_id"), (summaries_table, "summary_id")):
        pk = sa.inspect(conn).get_pk_constraint(table.name)
        if set(pk["constrained_columns"]) == {"site", "camera_id", id_name}:
            continue  # created by migration 1 or 3 from today's definition
        if conn.dialect.name == "postgresql":
            conn.execute(sa.text(f'ALTER TABLE {table.name} DROP CONSTRAINT "{pk["name"]}", '
                                 f"ADD PRIMARY KEY (site, camera_id, {id_name})"))
            continue
        old = f"{table.name}_before_6"
        kept = [c["name"] for c in sa.inspect(conn).get_columns(table.name) if c["name"] in table.c]
        for index in table.indexes:
            conn.execute(sa.text(f'DROP INDEX IF EXISTS "{index.name}"'))
        conn.execute(sa.text(f'ALTER TABLE {table.name} RENAME TO "{old}"'))
        table.create(conn)
        cols = ", ".join(f'"{c}"' for c in kept)
        conn.execute(sa.text(f'INSERT INTO {table.name} (rowid, {cols}) SELECT rowid, {cols} FROM "{old}"'))
        conn.execute(sa.text(f'DROP TABLE "{old}"'))


def _migration_7(conn: Connection) -> None:
    """Sampled frames from the edge (the learning loop): their index; images and headers are objects."""
    from cloud_sink.samples import create_tables

    create_tables(conn)


def _migration_8(conn: Connection) -> None:
    """Bounded, idempotent dead letters: a digest per dead letter (unique), and the sink's counters."""
    if "digest" not in {c["name"] for c in sa.inspect(conn).get_columns("dead_letters")}:
        conn.execute(sa.text("ALTER TABLE dead_letters ADD COLUMN digest VARCHAR(64)"))
    conn.execute(sa.text("CREATE UNIQUE INDEX IF NOT EXISTS ux_dead_letters_digest ON dead_letters (digest)"))
    metadata.create_all(conn, tables=[sink_state_table])


#: Counters that can pass 2**31 over a busy hour/day or a hostile burst: PostgreSQL INTEGER would overflow.
_WIDENED = {"rollup_hourly": ("entries", "exits", "unique_tracks", "occupancy_max", "occupancy_samples",
                              "dwell_count", "loiters"), "rollup_dwell": ("n",), "rollup_lines": ("in_count", "out_count"),
            "rollup_daily": ("unique_tracks",), "summaries": ("events",)}


def _migration_9(conn: Connection) -> None:
    """Rollup counters 64-bit on PostgreSQL (SQLite integers already are): sums never overflow."""
    if conn.dialect.name != "postgresql":
        return
    for table, columns in _WIDENED.items():
        conn.execute(sa.text(f"ALTER TABLE {table} " + ", ".join(
            f'ALTER COLUMN "{c}" TYPE BIGINT' for c in columns)))


def _migration_10(conn: Connection) -> None:
    """An index on the hourly track table's hour: distinct tracks over a range read its partial days by hour."""
    conn.execute(sa.text("CREATE INDEX IF NOT EXISTS ix_rollup_tracks_hour ON rollup_tracks (hour)"))


#: (version, description, apply). Append only; never edit an applied migration.
MIGRATIONS: list[tuple[int, str, Callable[[Connection], None]]] = [
    (1, "events, dead letters, cameras, hourly rollups", _migration_1),
    (2, "daily distinct tracks", _migration_2),
    (3, "summaries", _migration_3),
    (4, "camera models (over-the-air model reports)", _migration_4),
    (5, "archive cursors (and events.stored_xid on PostgreSQL)", _migration_5),
    (6, "event and summary ids unique per camera", _migration_6),
    (7, "samples (sampled frames for the learning loop)", _migration_7),
    (8, "dead letter digests (stored once) and sink counters", _migration_8),
    (9, "rollup counters 64-bit (PostgreSQL)", _migration_9),
    (10, "index rollup_tracks by hour", _migration_10),
]


def database_url(url: str) -> str:
    """Accept ``postgresql://`` / ``postgres://`` and use the psycopg 3 driver; pass SQLite URLs through."""
    for prefix in ("postgresql://", "postgres://"):
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url[len(prefix):]
    if not url.startswith(("sqlite:", "postgresql+")):
        raise ValueError(f"database URL {url!r}: use sqlite:///path.db or postgresql://user@host/db")
    return url


def to_ms(value: float | int | datetime | str | None) -> int | None:
    """epoch seconds / aware datetime / RFC 3339 string → epoch ms (None stays None)."""
    if value is None:
        return None
    if isinstance(value, datetime):
        dt = value if value.tzinfo else value.replace(tzinfo=timezone.utc)
        return int(round(dt.timestamp() * 1000))
    if isinstance(value, str):
        try:
            return ts_ms(value)
        except ValueError:
            return to_ms(datetime.fromisoformat(value.replace("Z", "+00:00")))
    return int(round(float(value) * 1000))


def ms_iso(ms: int | None) -> str | None:
    return None if ms is None else format_ts(ms / 1000.0)


def _safe_text(raw: bytes | str, limit: int) -> str:
    """Bytes → text PostgreSQL accepts (no NUL, valid UTF-8), truncated to ``limit`` bytes of input."""
    if isinstance(raw, str):
        raw = raw.encode("utf-8", errors="backslashreplace")
    return raw[:limit].decode("utf-8", errors="backslashreplace").replace("\x00", "\\x00")


def dead_letter_row(d: dict[str, Any], now_ms: int) -> dict[str, Any]:
    """The columns of one dead letter (``topic``, ``reason``, ``payload`` bytes or str, optional ``received_at``)."""
    raw = d.get("payload") or b""
    raw_bytes = raw.encode("utf-8", errors="backslashreplace") if isinstance(raw, str) else bytes(raw)
    topic, reason = str(d.get("topic") or ""), str(d.get("reason") or "unknown")
    digest = hashlib.sha256(b"\0".join([topic.encode("utf-8", "backslashreplace"),
                                         reason.encode("utf-8", "backslashreplace"), raw_bytes])).hexdigest()
    return {
        "received_at": to_ms(d["received_at"]) if d.get("received_at") is not None else now_ms,
        "topic": _safe_text(topic, 512)[:512], "reason": _safe_text(reason, 500)[:500],
        "payload": _safe_text(raw_bytes, DEAD_LETTER_PAYLOAD_BYTES), "payload_bytes": len(raw_bytes),
        "digest": digest,
    }


def event_row(event: dict[str, Any], received_ms: int) -> dict[str, Any]:
    """The columns of one validated contract event."""
    return {
        "event_id": event["event_id"], "site": event["site"], "camera_id": event["camera_id"],
        "type": event["type"], "ts": to_ms(event["ts"]), "track_id": event.get("track_id"),
        "zone": event.get("zone"), "line": event.get("line"), "direction": event.get("direction"),
        "count": event.get("count"), "dwell_s": float(event["dwell_s"]) if "dwell_s" in event else None,
        "payload": json.dumps(event, separators=(",", ":")), "received_at": received_ms,
    }


def summary_row(doc: dict[str, Any], received_ms: int) -> dict[str, Any]:
    """The columns of one validated summary."""
    return {
        "summary_id": doc["summary_id"], "site": doc["site"], "camera_id": doc["camera_id"],
        "start": ts_ms(doc["start"]), "end": ts_ms(doc["end"]), "events": int(doc["events"]),
        "received_at": received_ms, "payload": json.dumps(doc, separators=(",", ":")),
    }


@dataclass
class Batch:
    """Everything one commit writes: validated events, summaries, dead letters, status and stats updates."""

    events: list[dict[str, Any]] = field(default_factory=list)
    summaries: list[dict[str, Any]] = field(default_factory=list)  # validated summary.v1 documents
    dead_letters: list[dict[str, Any]] = field(default_factory=list)  # topic, reason, payload (bytes), received_at?
    statuses: list[tuple[str, str, str]] = field(default_factory=list)  # (site, camera_id, online|offline)
    stats: list[tuple[str, str, dict[str, Any]]] = field(default_factory=list)  # (site, camera_id, stats doc)
    counters: dict[str, int] = field(default_factory=dict)  # sink_state increments (e.g. rate-limited dead letters)
    models: list[tuple[str, str, dict[str, Any]]] = field(default_factory=list)  # (site, camera_id, model-reported)


@dataclass
class Written:
    """What one :meth:`Store.write` stored for the first time (duplicates are not in here)."""

    new_events: list[dict[str, Any]] = field(default_factory=list)  # in arrival order
    new_summaries: list[str] = field(default_factory=list)  # summary ids
    conflicts: int = 0  # event ids already stored (or twice in the batch) with other content: dead-lettered
    summary_conflicts: int = 0  # the same for summary ids


class Store:
    """One database. Thread-safe: each method takes its own connection from the engine's pool."""

    def __init__(self, engine: Engine, *, dead_letter_cap: int = 100_000, dead_letter_days: float = 30.0):
        self.engine = engine
        self.dead_letter_cap = dead_letter_cap  # rows kept at most (the oldest go first)
        self.dead_letter_days = dead_letter_days  # and none older than this
        self.dialect = engine.dialect.name
        if self.dialect == "postgresql":
            from sqlalchemy.dialects.postgresql import insert
        else:
            from sqlalchemy.dialects.sqlite import insert
        self._insert = insert

    # ------------------------------------------------------------------------------------------ lifecycle
    @classmethod
    def open(cls, url: str, *, dead_letter_cap: int = 100_000, dead_letter_days: float = 30.0) -> Store:
        """Connect, create or migrate the schema, and return the store (dead letters capped in rows and age)."""
        url = database_url(url)
        if url.startswith("sqlite"):
            kwargs: dict[str, Any] = {"connect_args": {"check_same_thread": False, "timeout": 30}}
            if url in ("sqlite://", "sqlite:///:memory:"):
                kwargs["poolclass"] = sa.StaticPool
            engine = sa.create_engine(url, **kwargs)
            sa.event.listen(engine, "connect", _sqlite_pragmas)
        else:
            engine = sa.create_engine(url, pool_pre_ping=True, pool_size=5, max_overflow=5)
        store = cls(engine, dead_letter_cap=dead_letter_cap, dead_letter_days=dead_letter_days)
        store.migrate()
        return store

    def close(self) -> None:
        self.engine.dispose()

    def migrate(self) -> list[int]:
        """Apply pending migrations (serialised between processes); return the versions applied now."""
        applied_now: list[int] = []
        for attempt in range(10):
            try:
                with self.engine.begin() as conn:
                    if self.dialect == "postgresql":
                        conn.execute(sa.text("SELECT pg_advisory_xact_lock(7242001)"))
                    migrations_table.create(conn, checkfirst=True)
                    done = set(conn.execute(sa.select(migrations_table.c.version)).scalars())
                    for version, description, apply in MIGRATIONS:
                        if version in done:
                            continue
                        apply(conn)
                        conn.execute(migrations_table.insert().values(
                            version=version, description=description, applied_at=int(time.time() * 1000)))
                        applied_now.append(version)
                return applied_now
            except sa.exc.OperationalError:  # another process migrating the same SQLite file
                if attempt == 9:
                    raise
                applied_now.clear()
                time.sleep(0.2 * (attempt + 1))
        return applied_now

    def schema_version(self) -> int:
        with self.engine.connect() as conn:
            return conn.execute(sa.select(sa.func.max(migrations_table.c.version))).scalar() or 0

    # ------------------------------------------------------------------------------------------ writes
    def write(self, batch: Batch, *, received_at: float | None = None) -> Written:
        """One transaction for a whole batch; returns what was new.

        Retried on a PostgreSQL deadlock/serialisation failure (several share-group workers); rows are written in
        sorted key order so that is rare.
        """
        now_ms = to_ms(time.time() if received_at is None else received_at)
        for attempt in range(5):
            try:
                with self.engine.begin() as conn:
                    return self._write(conn, batch, now_ms)
            except sa.exc.OperationalError as exc:
                if attempt == 4 or not _retryable(exc):
                    raise
                log.warning("retrying batch after %s", type(exc.orig).__name__)
                time.sleep(0.05 * (attempt + 1))
        raise AssertionError("unreachable")

    def _write(self, conn: Connection, batch: Batch, now_ms: int) -> Written:
        new_events: list[dict[str, Any]] = []
        delta = Deltas()
        conflicts: list[dict[str, Any]] = []
        summary_conflicts: list[dict[str, Any]] = []
        new_docs: list[dict[str, Any]] = []
        if batch.summaries:
            new_docs, summary_conflicts = self._insert_once(conn, summaries_table, "summary_id", SUMMARY_LEAF, summary_row,
                                                    batch.summaries, now_ms)
        for doc in new_docs:  # validated on ingest; the limit on named tracks was applied there
            merge_deltas(delta, summary_deltas(doc, max_tracks=sys.maxsize))
        if batch.events:
            new_events, conflicts = self._insert_once(conn, events_table, "event_id", "events", event_row,
                                                      batch.events, now_ms)
            if new_events:  # the summaries' increments (usually none) added to the events', not the other way round
                delta = merge_deltas(deltas(new_events), delta)
                self._touch_cameras(conn, new_events, now_ms)
        rollups.apply_deltas(conn, delta, self.bulk_insert)
        for doc in sorted(new_docs, key=lambda d: (d["site"], d["camera_id"])):
            self._upsert_camera(conn, doc["site"], doc["camera_id"], {}, seen_ms=ts_ms(doc["end"]),
                                add_events=int(doc["events"]), now_ms=now_ms)
        counters = dict(batch.counters)
        dead = batch.dead_letters + conflicts + summary_conflicts
        if dead:
            rows = {}
            for d in dead:
                row = dead_letter_row(d, now_ms)
                rows.setdefault(row["digest"], row)
            conn.execute(self._insert(dead_letters_table).on_conflict_do_nothing(index_elements=["digest"]),
                         sorted(rows.values(), key=lambda r: r["digest"]))
            pruned = self._prune_dead_letters(conn, now_ms)
            if pruned:
                counters["dead_letters_pruned"] = counters.get("dead_letters_pruned", 0) + pruned
        for name, n in sorted(counters.items()):
            self._bump(conn, name, n, now_ms)
        for site, camera_id, state in _last_per_camera(batch.statuses):
            self._upsert_camera(conn, site, camera_id, {"state": state, "status_at": now_ms})
        for site, camera_id, doc in _last_per_camera(batch.stats):
            self._upsert_camera(conn, site, camera_id, {
                "fps": _number(doc.get("processed_fps")), "inference_ms_p50": _number(doc.get("inference_ms_p50")),
                "inference_ms_p95": _number(doc.get("inference_ms_p95")), "stats": json.dumps(doc, separators=(",", ":")),
                "stats_at": now_ms}, seen_ms=to_ms(doc.get("ts")), now_ms=now_ms)
        newest: dict[tuple[str, str], dict[str, Any]] = {}  # by the edge's ts: arrival order may differ
        for site, camera_id, doc in batch.models:
            if (site, camera_id) not in newest or doc["ts"] >= newest[(site, camera_id)]["ts"]:
                newest[(site, camera_id)] = doc
        for (site, camera_id), doc in sorted(newest.items()):
            self._upsert_model(conn, site, camera_id, doc, now_ms)
        return Written(new_events, [d["summary_id"] for d in new_docs], len(conflicts), len(summary_conflicts))

    def _upsert_model(self, conn: Connection, site: str, camera_id: str, doc: dict[str, Any], now_ms: int) -> None:
        """Keep the newest report per camera (by the edge's ts: a retained copy re-delivered later never wins)."""
        active = doc["active"]
        values = {"state": doc["state"], "version": doc["version"], "reason": doc["reason"],
                  "active_version": active["version"], "active_name": active["name"],
                  "active_sha256": active["sha256"], "reported_at": ts_ms(doc["ts"]), "received_at": now_ms,
                  "payload": json.dumps(doc, separators=(",", ":"))}
        ins = self._insert(camera_models_table).values(site=site, camera_id=camera_id, **values)
        conn.execute(ins.on_conflict_do_update(
            index_elements=["site", "camera_id"], set_={k: ins.excluded[k] for k in values},
            where=ins.excluded.reported_at >= camera_models_table.c.reported_at))
        self._upsert_camera(conn, site, camera_id, {})

    def camera_models(self) -> list[dict[str, Any]]:
        """Per camera: the model it runs and the outcome of its latest update (``failed`` when refused or rolled
        back)."""
        with self.engine.connect() as conn:
            rows = conn.execute(sa.select(camera_models_table).order_by(
                camera_models_table.c.site, camera_models_table.c.camera_id)).mappings().all()
        return [{
            "site": r["site"], "camera_id": r["camera_id"],
            "active": {"version": r["active_version"], "name": r["active_name"], "sha256": r["active_sha256"]},
            "update": {"state": r["state"], "version": r["version"], "reason": r["reason"]},
            "failed": r["state"] in ("rejected", "rolled_back"),
            "reported_at": ms_iso(r["reported_at"]), "received_at": ms_iso(r["received_at"]),
        } for r in rows]

    def _prune_dead_letters(self, conn: Connection, now_ms: int) -> int:
        """Keep at most ``dead_letter_cap`` dead letters, none older than ``dead_letter_days``; return how many
        went. Ids grow with insertion, so the cap is one indexed range delete."""
        d = dead_letters_table.c
        gone = conn.execute(dead_letters_table.delete().where(
            d.received_at < now_ms - int(self.dead_letter_days * 86400 * 1000))).rowcount
        newest = conn.execute(sa.select(sa.func.max(d.id))).scalar()
        if newest is not None and newest > self.dead_letter_cap:
            gone += conn.execute(dead_letters_table.delete().where(d.id <= newest - self.dead_letter_cap)).rowcount
        return max(0, gone)

    def _bump(self, conn: Connection, name: str, n: int, now_ms: int, *, set_to: bool = False) -> None:
        ins = self._insert(sink_state_table).values(name=name, value=n, updated_at=now_ms)
        value = ins.excluded.value if set_to else sink_state_table.c.value + ins.excluded.value
        conn.execute(ins.on_conflict_do_update(index_elements=["name"],
                                               set_={"value": value, "updated_at": ins.excluded.updated_at}))

    def set_time_window(self, *, max_past_s: float, max_future_s: float) -> None:
        """Record the event-time window this sink accepts (shown by the report and /health)."""
        now_ms = int(time.time() * 1000)
        with self.engine.begin() as conn:
            self._bump(conn, "window_max_past_s", int(max_past_s), now_ms, set_to=True)
            self._bump(conn, "window_max_future_s", int(max_future_s), now_ms, set_to=True)

    def sink_state(self) -> dict[str, int]:
        """The sink's counters (dead letters rate-limited / pruned) and its time window, by name."""
        with self.engine.connect() as conn:
            return {name: int(value) for name, value in conn.execute(
                sa.select(sink_state_table.c.name, sink_state_table.c.value))}

    def _insert_once(self, conn: Connection, table: sa.Table, id_name: str, leaf: str,
                     to_row: Callable[[dict[str, Any], int], dict[str, Any]], docs: list[dict[str, Any]],
                     now_ms: int) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        """Insert documents keyed by (site, camera_id, ``id_name``) once; return (stored now, dead letters).

        A key already stored (or earlier in ``docs``) with the same content is a redelivery and dropped; with
        other content it is a conflict: the first copy stays, the other becomes a dead letter (with the reason).
        """
        unique: dict[tuple[str, str, str], dict[str, Any]] = {}
        conflicts: list[dict[str, Any]] = []
        for doc in docs:
            first = unique.setdefault((doc["site"], doc["camera_id"], doc[id_name]), doc)
            if first is not doc and first != doc:
                conflicts.append(doc)
        c = table.c
        rows = sorted((to_row(d, now_ms) for d in unique.values()), key=lambda r: (r["site"], r["camera_id"],
                                                                                  r[id_name]))
        inserted = {tuple(r) for r in self.bulk_insert(conn, table, rows, lambda ins: ins.on_conflict_do_nothing(
            index_elements=["site", "camera_id", id_name]).returning(c.site, c.camera_id, c[id_name]))}
        seen = [k for k in unique if k not in inserted]
        for start in range(0, len(seen), 500):  # what the copies already stored say
            keys = seen[start:start + 500]
            query = sa.select(c.site, c.camera_id, c[id_name], c.payload).where(
                sa.tuple_(c.site, c.camera_id, c[id_name]).in_(keys))
            conflicts += [unique[(site, cam, i)] for site, cam, i, payload in conn.execute(query)
                          if json.loads(payload) != unique[(site, cam, i)]]
        dead = [_conflict(doc, id_name, leaf, now_ms) for doc in conflicts]
        return [d for k, d in unique.items() if k in inserted], dead

    def bulk_insert(self, conn: Connection, table: sa.Table, rows: list[dict[str, Any]],
              finish: Callable[[Any], Any]) -> Any:
        """Insert many rows with one statement; ``finish`` adds ON CONFLICT / RETURNING to the dialect insert.

        SQLite: an executemany. PostgreSQL: one array per column, ``unnest``-ed server side, so the statement text
        is the same whatever the batch size (psycopg re-parsed a 500-row VALUES list on every batch: ~40 % of
        the ingest CPU) and RETURNING still reports exactly the rows inserted.
        """
        if self.dialect != "postgresql":
            return conn.execute(finish(self._insert(table)), rows)
        from sqlalchemy.dialects.postgresql import ARRAY

        names = list(rows[0])
        arrays = [sa.bindparam(f"arr_{n}", [r[n] for r in rows], type_=ARRAY(table.c[n].type)) for n in names]
        source = sa.func.unnest(*arrays).table_valued(*names).render_derived(with_types=False)
        select = sa.select(*[source.c[n] for n in names])
        return conn.execute(finish(self._insert(table).from_select(names, select)))

    def _upsert_camera(self, conn: Connection, site: str, camera_id: str, values: dict[str, Any],
                       seen_ms: int | None = None, add_events: int = 0, now_ms: int | None = None) -> None:
        """Create or update a camera's row. ``last_seen`` (one rule for events, stats and summaries): the newest
        capture time, never later than when the sink received it (``now_ms``), and never moved back."""
        if seen_ms is not None and now_ms is not None:
            seen_ms = min(seen_ms, now_ms)
        ins = self._insert(cameras_table).values(site=site, camera_id=camera_id, last_seen=seen_ms,
                                           events_total=add_events, **values)
        updates: dict[str, Any] = dict(values)
        if add_events:
            updates["events_total"] = cameras_table.c.events_total + ins.excluded.events_total
        if seen_ms is not None:
            updates["last_seen"] = sa.case(
                (cameras_table.c.last_seen.is_(None), ins.excluded.last_seen),
                (ins.excluded.last_seen > cameras_table.c.last_seen, ins.excluded.last_seen),
                else_=cameras_table.c.last_seen)
        if not updates:
            conn.execute(ins.on_conflict_do_nothing(index_elements=["site", "camera_id"]))
            return
        conn.execute(ins.on_conflict_do_update(index_elements=["site", "camera_id"], set_=updates))

    def _touch_cameras(self, conn: Connection, new_events: list[dict[str, Any]], now_ms: int) -> None:
        per_cam: dict[tuple[str, str], list[int]] = defaultdict(lambda: [0, 0])
        for ev in new_events:
            acc = per_cam[(ev["site"], ev["camera_id"])]
            acc[0] += 1
            acc[1] = max(acc[1], to_ms(ev["ts"]) or 0)
        for (site, camera_id), (n, newest) in sorted(per_cam.items()):
            self._upsert_camera(conn, site, camera_id, {}, seen_ms=newest, add_events=n, now_ms=now_ms)

    # ------------------------------------------------------------------------------------------ reads
    def event_count(self) -> int:
        with self.engine.connect() as conn:
            return conn.execute(sa.select(sa.func.count()).select_from(events_table)).scalar_one()

    def summary_count(self) -> int:
        with self.engine.connect() as conn:
            return conn.execute(sa.select(sa.func.count()).select_from(summaries_table)).scalar_one()

    def summaries(self, *, site: str | None = None, camera_id: str | None = None, since: Any = None,
                  until: Any = None, limit: int = 100, offset: int = 0) -> list[dict[str, Any]]:
        """Stored summaries, newest window first; ``since`` inclusive, ``until`` exclusive (window start)."""
        s = summaries_table.c
        query = sa.select(summaries_table)
        for column, value in ((s.site, site), (s.camera_id, camera_id)):
            if value is not None:
                query = query.where(column == value)
        if since is not None:
            query = query.where(s.start >= to_ms(since))
        if until is not None:
            query = query.where(s.start < to_ms(until))
        query = query.order_by(s.start.desc(), s.site, s.camera_id, s.summary_id).limit(max(0, int(limit))).offset(
            max(0, int(offset)))
        with self.engine.connect() as conn:
            rows = conn.execute(query).mappings().all()
        return [{
            "summary_id": r["summary_id"], "site": r["site"], "camera_id": r["camera_id"], "start": ms_iso(r["start"]),
            "end": ms_iso(r["end"]), "events": r["events"], "received_at": ms_iso(r["received_at"]),
            "payload": json.loads(r["payload"]),
        } for r in rows]

    def dead_letter_count(self) -> int:
        with self.engine.connect() as conn:
            return conn.execute(sa.select(sa.func.count()).select_from(dead_letters_table)).scalar_one()

    def cameras(self) -> list[dict[str, Any]]:
        """Every camera seen (by event, status or stats) with its health."""
        with self.engine.connect() as conn:
            query = sa.select(cameras_table).order_by(cameras_table.c.site, cameras_table.c.camera_id)
            rows = conn.execute(query).mappings().all()
        return [{
            "site": r["site"], "camera_id": r["camera_id"], "state": r["state"],
            "last_seen": ms_iso(r["last_seen"]), "status_at": ms_iso(r["status_at"]),
            "fps": r["fps"], "inference_ms_p50": r["inference_ms_p50"], "inference_ms_p95": r["inference_ms_p95"],
            "events_total": r["events_total"], "stats_at": ms_iso(r["stats_at"]),
            "stats": json.loads(r["stats"]) if r["stats"] else None,
        } for r in rows]

    def events(self, *, site: str | None = None, camera_id: str | None = None, type: str | None = None,
               since: Any = None, until: Any = None, zone: str | None = None, limit: int = 100,
               offset: int = 0) -> list[dict[str, Any]]:
        """Stored events, newest first; ``since`` inclusive, ``until`` exclusive (capture time)."""
        e = events_table.c
        query = sa.select(events_table)
        for column, value in ((e.site, site), (e.camera_id, camera_id), (e.type, type), (e.zone, zone)):
            if value is not None:
                query = query.where(column == value)
        if since is not None:
            query = query.where(events_table.c.ts >= to_ms(since))
        if until is not None:
            query = query.where(events_table.c.ts < to_ms(until))
        query = query.order_by(events_table.c.ts.desc(), events_table.c.event_id).limit(max(0, int(limit))).offset(
            max(0, int(offset)))
        with self.engine.connect() as conn:
            rows = conn.execute(query).mappings().all()
        return [{
            "event_id": r["event_id"], "site": r["site"], "camera_id": r["camera_id"], "type": r["type"],
            "ts": ms_iso(r["ts"]), "track_id": r["track_id"], "zone": r["zone"], "line": r["line"],
            "direction": r["direction"], "count": r["count"], "dwell_s": r["dwell_s"],
            "received_at": ms_iso(r["received_at"]), "payload": json.loads(r["payload"]),
        } for r in rows]

    def dead_letters(self, *, limit: int = 100, offset: int = 0) -> list[dict[str, Any]]:
        """Newest dead letters first."""
        query = sa.select(dead_letters_table).order_by(dead_letters_table.c.id.desc()).limit(limit).offset(offset)
        with self.engine.connect() as conn:
            rows = conn.execute(query).mappings().all()
        return [{"id": r["id"], "received_at": ms_iso(r["received_at"]), "topic": r["topic"], "reason": r["reason"],
                 "payload": r["payload"], "payload_bytes": r["payload_bytes"]} for r in rows]


def _last_per_camera(items: Iterable[tuple[str, str, T]]) -> list[tuple[str, str, T]]:
    """The last value per (site, camera) of ``(site, camera_id, value)`` items, in key order (one upsert each)."""
    latest: dict[tuple[str, str], T] = {}
    for site, camera_id, value in items:
        latest[(site, camera_id)] = value
    return [(s, c, v) for (s, c), v in sorted(latest.items())]


def _conflict(doc: dict[str, Any], id_name: str, leaf: str, now_ms: int) -> dict[str, Any]:
    """The dead letter of a document whose id the camera already used for other content."""
    return {"topic": topic_for(doc["site"], doc["camera_id"], leaf), "received_at": now_ms / 1000.0,
            "reason": f"conflict: {id_name} {doc[id_name]} is already stored for {doc['site']}/{doc['camera_id']} "
                      "with different content (the first copy is kept)",
            "payload": json.dumps(doc, separators=(",", ":")).encode()}


def _number(value: Any) -> float | None:
    """A finite float for a REAL column, or None (JSON allows integers no float can hold)."""
    try:
        number = float(value)
    except (TypeError, ValueError, OverflowError):
        return None
    return number if abs(number) < 1e300 else None


#: PostgreSQL SQLSTATE classes of a database that cannot be used right now: connection (08), serialisation /
#: deadlock (40), insufficient resources such as a full disk (53), operator intervention e.g. shutdown (57), lock
#: not available (55P03). Anything else (no such table, a constraint, a bug) fails the same way on every retry.
_TRANSIENT_SQLSTATE = ("08", "40", "53", "57", "55P03")
_TRANSIENT_SQLITE = ("database is locked", "database table is locked", "disk i/o error", "database or disk is full",
                     "unable to open database file")


def is_transient(exc: BaseException) -> bool:
    """True when ``exc`` says the database is unavailable right now (retry later), not that this write is wrong.

    >>> is_transient(ValueError("a bug"))
    False
    """
    if isinstance(exc, sa.exc.DBAPIError) and exc.connection_invalidated:
        return True
    if not isinstance(exc, (sa.exc.OperationalError, sa.exc.InterfaceError)):
        return False
    orig = getattr(exc, "orig", None)
    sqlstate = getattr(orig, "sqlstate", None)
    if sqlstate:
        return sqlstate.startswith(_TRANSIENT_SQLSTATE)
    text = str(orig or exc).lower()
    if type(orig).__module__.startswith("sqlite3"):
        return any(words in text for words in _TRANSIENT_SQLITE)
    return True  # psycopg without a SQLSTATE: the connection itself failed (server gone, refused, closed)


def _retryable(exc: sa.exc.OperationalError) -> bool:
    text = str(exc.orig).lower()
    return any(word in text for word in ("deadlock", "could not serialize", "database is locked"))


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    """WAL so the API reads while ingest writes; FULL sync because a commit precedes the broker ack."""
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA synchronous=FULL")
    cur.execute("PRAGMA busy_timeout=30000")
    cur.close()

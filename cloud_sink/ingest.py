"""MQTT → validate → store, with nothing acknowledged to the broker before its batch is committed.

Two layers so each can be tested alone:

- :class:`Ingestor` takes a batch of ``(topic, payload)`` pairs, classifies each (``validation.check_messages``;
  a compressed ``.../batch`` message becomes one verdict per event it carries), writes events, dead letters,
  status and stats in ONE transaction and returns what happened. No MQTT here.
- :class:`Subscriber` owns the paho-mqtt 2 client: MQTT 5, fixed client id, ``clean_start=False`` and a session
  expiry so the broker queues QoS 1 messages while the sink is down; ``manual_ack=True`` so a PUBACK is only sent
  after the commit (a SIGKILL before it means the broker redelivers; the idempotent insert drops the copy).
  Batches close at ``batch_size`` messages, ``batch_wait`` seconds, or a short idle gap.

Summaries (``.../summary``, an edge in summary mode) are stored in the database's ``summaries`` table and their
increments applied to the rollups in the same transaction; they are counted in :class:`BatchResult` as
``summaries`` (new) and ``summary_duplicates``. Nothing here writes the archive: it follows the database on its
own (``cloud_sink/archive_follower.py``), off the ack path, and holds events only.

>>> from cloud_sink.store import Store
>>> ing = Ingestor(Store.open("sqlite:///:memory:"))
>>> ing.handle([("smartcam/lobby/cam-1/events", b"not json")]).dead
1
"""

from __future__ import annotations

import json
import logging
import queue
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field, fields
from typing import Any

from cloud_sink.samples import is_sample_topic
from cloud_sink.store import Batch, Store, Written, is_transient
from cloud_sink.validation import Checked, Limits, check_messages, outside_time_window
from contract.timestamps import format_ts
from contract.topics import ACK_LEAF, subscriptions, topic_for

log = logging.getLogger(__name__)

ACK_MAX_IDS = 1000  # ids per ack message (~35 KB)


SUBSCRIPTIONS = subscriptions("edge")  # everything edges send (contract.topics.TOPIC_TREE)


@dataclass
class BatchResult:
    """What ingest did: one call of :meth:`Ingestor.handle`, or everything since start (:attr:`Ingestor.totals`,
    which keeps the counts only). ``new_events`` are the events stored for the first time. The counts are per
    item: a ``.../batch`` message counts once per event line it carries (once, dead, if it cannot be decoded or
    has more than ``Limits.max_dead_lines`` bad lines)."""

    received: int = 0
    stored: int = 0
    duplicates: int = 0
    dead: int = 0
    status: int = 0
    node: int = 0  # edge process documents (node.v1): an offline one marks its cameras offline
    stats: int = 0
    model: int = 0  # model/reported documents
    summaries: int = 0  # summaries stored for the first time
    summary_duplicates: int = 0
    samples: int = 0  # sampled frames stored for the first time (cloud_sink/samples.py)
    dead_dropped: int = 0  # dead letters over their camera's rate: counted (sink_state), not stored
    batches: int = 0  # database transactions
    new_events: list[dict[str, Any]] = field(default_factory=list)
    reasons: list[str] = field(default_factory=list)
    # per (site, camera): the event/summary ids now committed (stored, already stored, or dead-lettered),
    # confirmed back to the camera on .../ack (Subscriber._confirm; camera/confirm.py)
    committed: dict[tuple[str, str], list[str]] = field(default_factory=dict)

    def add(self, other: BatchResult, *, items: bool = True) -> BatchResult:
        """Add ``other``'s counts (and, with ``items``, its events, reasons and ids) to this one."""
        for f in fields(self):
            mine, theirs = getattr(self, f.name), getattr(other, f.name)
            if isinstance(mine, int):
                setattr(self, f.name, mine + theirs)
            elif items and isinstance(mine, list):
                mine.extend(theirs)
            elif items:
                for key, ids in theirs.items():
                    mine.setdefault(key, []).extend(ids)
        return self


class _DeadLetterRate:
    """A token bucket per camera (``site/camera``; one for unparseable topics): dead letters over the rate are
    dropped and counted, so one camera's junk can neither fill the table nor crowd out another's."""

    def __init__(self, per_minute: float, burst: int):
        self.rate = per_minute / 60.0
        self.burst = float(burst)
        self._buckets: dict[tuple[str | None, str | None], tuple[float, float]] = {}  # key -> (tokens, at)

    def allow(self, key: tuple[str | None, str | None], now: float) -> bool:
        tokens, at = self._buckets.get(key, (self.burst, now))
        tokens = min(self.burst, tokens + max(0.0, now - at) * self.rate)
        ok = tokens >= 1.0
        self._buckets[key] = (tokens - 1.0 if ok else tokens, now)
        if len(self._buckets) > 100_000:  # bounded: forget the fullest buckets (they would be full again)
            self._buckets = {k: v for k, v in self._buckets.items() if v[0] < self.burst - 1}
        return ok


class Ingestor:
    """Classify and store batches of raw messages; never raises on bad input (only on storage failure)."""

    def __init__(self, store: Store, *, limits: Limits | None = None, metrics: Any = None,
                 samples: Any = None):
        self.store = store
        self.samples = samples  # cloud_sink.samples.SampleSink; None: samples are dead-lettered with the reason
        self.limits = limits or Limits()
        self.totals = BatchResult()
        self._dead_rate = _DeadLetterRate(self.limits.dead_letters_per_minute, self.limits.dead_letter_burst)
        self.metrics = metrics  # cloud_sink.metrics.SinkMetrics: what /metrics serves (optional)

    def handle(self, messages: Iterable[tuple[str, bytes]], *, now: float | None = None) -> BatchResult:
        """Validate and commit one batch.

        Raises only when the database is unavailable (``store.is_transient``: locked, down, disk full) so the
        caller keeps the batch unacknowledged and retries. If the database *rejects* the batch for its content,
        the messages are stored one by one and the rejected ones dead-lettered, so one poison message can never
        stall the stream. Bounded: messages are checked as they come and committed in transactions of at most
        ``Limits.max_transaction_lines`` items and ``max_transaction_bytes`` payload bytes, and dead letters over
        a camera's rate are dropped and counted, so a flood of junk costs neither memory nor table space.
        """
        now = time.time() if now is None else now
        messages = list(messages)
        sampled = [m for m in messages if is_sample_topic(m[0])]
        if sampled:
            messages = [m for m in messages if not is_sample_topic(m[0])]
        result: BatchResult | None = None
        for checked, dropped in self._parts(messages, now):
            part = self._store_part(checked, now, sampled if result is None else [], dropped)
            result = part if result is None else result.add(part)
        assert result is not None
        return result

    def _parts(self, messages: list[tuple[str, bytes]], now: float
               ) -> Iterator[tuple[list[tuple[Checked, bytes]], int]]:
        """The verdicts on ``messages`` in transaction-sized parts (at least one, maybe empty), each with the
        number of dead letters dropped by the rate limit; checked lazily, so only one part is held at a time."""
        part: list[tuple[Checked, bytes]] = []
        size = dropped = 0
        for topic, payload in messages:
            for c, raw in check_messages(topic, payload, now=now, limits=self.limits):
                if (c.kind == "dead" and not outside_time_window(c.reason)  # a wrong clock's backlog is kept
                        and not self._dead_rate.allow((c.site, c.camera_id), now)):
                    dropped += 1
                    continue
                if part and (len(part) >= self.limits.max_transaction_lines
                             or size + len(raw) > self.limits.max_transaction_bytes):
                    yield part, dropped
                    part, size, dropped = [], 0, 0
                part.append((c, raw))
                size += len(raw)
        yield part, dropped

    def _store_part(self, checked: list[tuple[Checked, bytes]], now: float, sampled: list[tuple[str, bytes]],
                    dropped: int) -> BatchResult:
        """One transaction: store ``checked`` (and ``sampled``) and count what happened."""
        started = time.perf_counter()
        try:
            written = self.store.write(_batch(checked, now, dropped=dropped), received_at=now)
        except Exception as exc:
            if is_transient(exc):  # down, locked, disk full: the caller keeps the batch unacked and retries
                raise
            log.warning("database rejected a batch of %d (%s); storing one by one", len(checked),
                        str(exc).splitlines()[0][:200])
            if self.metrics is not None:
                self.metrics.db_errors.labels("rejected").inc()
            checked, written = self._one_by_one(checked, now)
            if dropped:
                self.store.write(Batch(counters={"dead_letters_rate_limited": dropped}), received_at=now)
        new_events = written.new_events
        result = BatchResult(received=len(checked) + dropped, new_events=new_events, stored=len(new_events),
                             summaries=len(written.new_summaries), dead_dropped=dropped, batches=1)
        for c, _ in checked:
            if c.kind == "event":
                result.duplicates += 1
            elif c.kind == "summary":
                result.summary_duplicates += 1
            elif c.kind == "dead":
                result.dead += 1
                result.reasons.append(c.reason or "")
            else:
                setattr(result, c.kind, getattr(result, c.kind) + 1)
        result.duplicates -= result.stored + written.conflicts
        result.summary_duplicates -= result.summaries + written.summary_conflicts
        result.dead += written.conflicts + written.summary_conflicts  # same id, other content: dead-lettered
        result.reasons += ["conflict"] * (written.conflicts + written.summary_conflicts)
        if sampled:
            self._store_samples(sampled, now, result)
        result.committed = committed_ids(checked)
        self.totals.add(result, items=False)
        if self.metrics is not None:
            self.metrics.batch(result, time.perf_counter() - started)
        return result

    def _store_samples(self, sampled: list[tuple[str, bytes]], now: float, result: BatchResult) -> None:
        """Sampled frames go to object storage + their index, not through the event path (samples.py)."""
        from cloud_sink.samples import SampleSink

        done = (self.samples or SampleSink(self.store, None)).handle(sampled, now)
        result.received += len(sampled)
        result.samples += done.stored
        result.dead += done.dead
        result.reasons += done.reasons

    def _one_by_one(self, checked: list[tuple[Checked, bytes]], now: float
                    ) -> tuple[list[tuple[Checked, bytes]], Written]:
        out: list[tuple[Checked, bytes]] = []
        total = Written()
        for c, payload in checked:
            try:
                written = self.store.write(_batch([(c, payload)], now), received_at=now)
                total.new_events += written.new_events
                total.new_summaries += written.new_summaries
                total.conflicts += written.conflicts
                total.summary_conflicts += written.summary_conflicts
            except Exception as exc:
                if is_transient(exc):
                    raise
                c = Checked("dead", c.topic, c.site, c.camera_id,
                            reason=f"database rejected it: {str(exc).splitlines()[0][:200]}")
                self.store.write(_batch([(c, payload)], now), received_at=now)
            out.append((c, payload))
        return out, total


def committed_ids(checked: list[tuple[Checked, bytes]]) -> dict[tuple[str, str], list[str]]:
    """The ids a committed batch holds, per camera: events and summaries by their id, dead letters by the
    ``event_id`` in their payload when it has one (kept by the sink, replayable: the camera need not resend)."""
    out: dict[tuple[str, str], list[str]] = {}
    for c, payload in checked:
        if not (c.site and c.camera_id):
            continue
        if c.kind == "event":
            key = c.value.get("event_id")
        elif c.kind == "summary":
            key = c.value.get("summary_id")
        elif c.kind == "dead":
            try:
                doc = json.loads(payload)
                key = doc.get("event_id", doc.get("summary_id")) if isinstance(doc, dict) else None
            except (ValueError, RecursionError):  # not JSON, or nested deeper than the parser's stack
                key = None
        else:
            continue
        if isinstance(key, str):
            out.setdefault((c.site, c.camera_id), []).append(key)
    return out


def _batch(checked: list[tuple[Checked, bytes]], now: float, *, dropped: int = 0) -> Batch:
    batch = Batch(counters={"dead_letters_rate_limited": dropped} if dropped else {})
    for c, payload in checked:
        if c.kind == "event":
            batch.events.append(c.value)
        elif c.kind == "summary":
            batch.summaries.append(c.value)
        elif c.kind == "status":
            batch.statuses.append((c.site, c.camera_id, c.value))
        elif c.kind == "node" and c.value["state"] == "offline":  # the process is gone: so are its cameras
            batch.statuses.extend((c.site, cam, "offline") for cam in c.value["cameras"])
        elif c.kind == "node":
            pass  # online: each camera's own retained status, sent right after, says how it is
        elif c.kind == "stats":
            batch.stats.append((c.site, c.camera_id, c.value))
        elif c.kind == "model":
            batch.models.append((c.site, c.camera_id, c.value))
        else:
            batch.dead_letters.append({"topic": c.topic, "reason": c.reason, "payload": payload, "received_at": now})
    return batch


@dataclass
class _Message:
    topic: str
    payload: bytes
    mid: int
    qos: int
    generation: int


class Subscriber:
    """The sink's MQTT client: persistent session, shared subscription option, batch → commit → ack."""

    def __init__(self, ingestor: Ingestor, settings: Any, *, client_id: str = "smartcam-sink",
                 share_group: str | None = None, session_expiry_s: int = 7 * 86400, batch_size: int = 500,
                 batch_wait_s: float = 0.05, idle_gap_s: float = 0.01, log_every_s: float = 10.0):
        self.ingestor = ingestor
        self.settings = settings
        self.client_id = client_id
        self.share_group = share_group
        self.session_expiry_s = session_expiry_s
        self.batch_size = batch_size
        self.batch_wait_s = batch_wait_s
        self.idle_gap_s = idle_gap_s
        self.log_every_s = log_every_s
        self.connected = threading.Event()
        self.subscribed = threading.Event()  # the broker acknowledged every subscription (SUBACK) on this connection
        self.stop_event = threading.Event()
        self._queue: queue.Queue[_Message] = queue.Queue()
        self._lock = threading.Lock()  # guards _generation vs. acks
        self._generation = 0
        self._client: Any = None
        self.unstored = 0  # messages received but not stored when stopped (database unavailable at the end)
        self.failure: str | None = None  # why the sink stopped by itself (a deterministic storage failure)
        self._unreachable_since: float | None = None  # monotonic time of the first failed connection attempt
        self._unreachable_logged = 0.0

    # ----------------------------------------------------------------------------------------- MQTT callbacks
    def topics(self) -> list[str]:
        prefix = f"$share/{self.share_group}/" if self.share_group else ""
        return [prefix + t for t in SUBSCRIPTIONS]

    def _on_connect(self, client: Any, _userdata: Any, flags: Any, reason_code: Any, _props: Any) -> None:
        from paho.mqtt.subscribeoptions import SubscribeOptions

        if reason_code.is_failure:
            log.error("broker refused connection: %s", reason_code)
            return
        with self._lock:
            self._generation += 1
        if self._unreachable_since is not None:
            log.info("broker %s reachable again after %.0f s", self.settings.redacted(),
                     time.monotonic() - self._unreachable_since)
        self._unreachable_since = None
        log.info("connected to %s as %s (session present: %s)", self.settings.redacted(), self.client_id,
                 flags.session_present)
        if self.settings.mqtt5:
            client.subscribe([(t, SubscribeOptions(qos=1)) for t in self.topics()])
        else:
            client.subscribe([(t, 1) for t in self.topics()])
        self.connected.set()

    def _on_subscribe(self, _client: Any, _userdata: Any, _mid: Any, reason_codes: Any, _props: Any) -> None:
        """SUBACK: say which subscriptions the broker refused (an ACL that lets the sink connect but not read)."""
        topics = self.topics()
        refused = [f"{t} ({rc})" for t, rc in zip(topics, reason_codes, strict=False) if rc.is_failure]
        if refused:
            log.error("broker refused %d of %d subscriptions: %s; check its ACL for user %s", len(refused),
                      len(topics), ", ".join(refused), self.settings.username or "(anonymous)")
        else:
            log.info("subscribed to %d topics", len(topics))
        self.subscribed.set()

    def _on_disconnect(self, _client: Any, _userdata: Any, _flags: Any, reason_code: Any, _props: Any) -> None:
        with self._lock:
            self._generation += 1  # message ids of the old connection must never be acked on the new one
        self.connected.clear()
        self.subscribed.clear()
        if not self.stop_event.is_set():
            log.warning("disconnected from broker (%s); reconnecting", reason_code)

    def _on_connect_fail(self, _client: Any, _userdata: Any) -> None:
        """paho could not open the connection (refused, unreachable, TLS, DNS): say so, not only 'received 0'."""
        now = time.monotonic()
        if self._unreachable_since is None:
            self._unreachable_since = now
        self._report_unreachable(now, force=self._unreachable_logged == 0.0)

    def _report_unreachable(self, now: float, *, force: bool = False) -> None:
        if self._unreachable_since is None or self.stop_event.is_set():
            return
        if force or now - self._unreachable_logged >= self.log_every_s:
            self._unreachable_logged = now
            log.warning("cannot reach broker %s (%s:%d) for %.0f s: connection failed; retrying every <= 10 s",
                        self.settings.redacted(), self.settings.host, self.settings.port,
                        now - self._unreachable_since)

    def _on_message(self, _client: Any, _userdata: Any, msg: Any) -> None:
        self._queue.put(_Message(msg.topic, bytes(msg.payload), msg.mid, msg.qos, self._generation))

    # ----------------------------------------------------------------------------------------- loop
    def start(self) -> None:
        """Connect (non-blocking; paho retries in its network thread)."""
        from contract.broker import make_client, persistent_connect_kwargs

        # MQTT 5 unless the broker URL says ?protocol=3.1.1 (e.g. the demo's embedded broker); both keep a
        # persistent session (3.1.1: clean_session=False, set by make_client).
        client = make_client(self.settings, self.client_id, manual_ack=True, persistent=True)
        client.on_connect = self._on_connect
        client.on_subscribe = self._on_subscribe
        client.on_disconnect = self._on_disconnect
        client.on_connect_fail = self._on_connect_fail
        client.on_message = self._on_message
        client.reconnect_delay_set(min_delay=1, max_delay=10)
        connect_kwargs = persistent_connect_kwargs(client, self.session_expiry_s,
                                                   receive_maximum=min(65535, max(self.batch_size * 2, 20)))
        if not self.settings.mqtt5 and self.share_group:
            raise ValueError("--share-group needs MQTT 5 (shared subscriptions); drop ?protocol=3.1.1")
        client.connect_async(self.settings.host, self.settings.port, keepalive=self.settings.keepalive,
                             **connect_kwargs)
        client.loop_start()
        self._client = client

    def _collect(self) -> list[_Message]:
        try:
            first = self._queue.get(timeout=0.2)
        except queue.Empty:
            return []
        batch = [first]
        size = len(first.payload)
        deadline = time.monotonic() + self.batch_wait_s
        while len(batch) < self.batch_size and size < self.ingestor.limits.max_transaction_bytes:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            try:
                batch.append(self._queue.get(timeout=min(remaining, self.idle_gap_s)))
                size += len(batch[-1].payload)
            except queue.Empty:
                break
        return batch

    def _commit(self, batch: list[_Message]) -> bool:
        """Store the batch, retrying while the database is unavailable; True once committed.

        Only an unavailable database is retried (``store.is_transient``). Any other failure is deterministic:
        retrying would stall the subscription forever, so the batch's messages are dead-lettered with the
        reason; if even that fails, :attr:`failure` says why and False stops the sink (nothing acked).
        """
        delay = 0.5
        while True:
            try:
                self._confirm(self.ingestor.handle([(m.topic, m.payload) for m in batch]))
                return True
            except Exception as exc:
                if not is_transient(exc):
                    return self._dead_letter_batch(batch, exc)
                log.error("storing a batch of %d failed, database unavailable (nothing acknowledged; retrying): %s",
                          len(batch), str(exc)[:300])
                metrics = self.ingestor.metrics
                if metrics is not None:
                    metrics.db_errors.labels("unavailable").inc()
                if self.stop_event.wait(delay):
                    return False
                if metrics is not None:
                    metrics.db_retries.inc()
                delay = min(delay * 2, 10.0)

    def _dead_letter_batch(self, batch: list[_Message], exc: Exception) -> bool:
        reason = f"sink error: {type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}"
        log.error("storing a batch of %d failed deterministically (%s); dead-lettering it", len(batch), reason)
        try:
            self.ingestor.store.write(Batch(dead_letters=[
                {"topic": m.topic, "reason": reason, "payload": m.payload} for m in batch]))
        except Exception as again:
            if is_transient(again):  # the database went away meanwhile: retry the batch as usual
                return self._commit(batch)
            self.failure = (f"cannot store or dead-letter a batch of {len(batch)}: {reason}; then "
                            f"{type(again).__name__}: {str(again).splitlines()[0][:300]}")
            log.error("stopping: %s", self.failure)
            return False
        self.ingestor.totals.dead += len(batch)
        return True

    def _confirm(self, result: BatchResult) -> None:
        """Tell each camera what is committed now, on smartcam/<site>/<camera>/ack (QoS 1, ack.v1): an edge with
        publish.confirm sink deletes those events only then. A lost confirmation costs the edge one re-send,
        which is a duplicate here and is confirmed again."""
        ts = format_ts(time.time())
        try:
            for (site, camera_id), ids in sorted(result.committed.items()):
                for i in range(0, len(ids), ACK_MAX_IDS):
                    doc = {"schema_version": 1, "site": site, "camera_id": camera_id, "ts": ts,
                           "ids": ids[i:i + ACK_MAX_IDS]}
                    self._client.publish(topic_for(site, camera_id, ACK_LEAF),
                                         json.dumps(doc, separators=(",", ":")), qos=1)
        except Exception:  # noqa: BLE001 - the batch is committed: a missing ack only means the edge re-sends
            log.exception("could not publish the commit's acknowledgements (the cameras will re-send)")

    def _ack(self, batch: list[_Message]) -> None:
        with self._lock:
            for m in batch:
                if m.qos and m.generation == self._generation:
                    self._client.ack(m.mid, m.qos)

    def run(self) -> None:
        """Block until :meth:`stop`; then drain what was received, ack it and disconnect cleanly."""
        if self._client is None:
            self.start()
        last_log = time.monotonic()
        logged = 0
        while True:
            stopping = self.stop_event.is_set()
            batch = self._collect() if not stopping else self._drain()
            if batch:
                if not self._commit(batch):
                    self.unstored = len(batch) + self._queue.qsize()  # left unacked: the broker redelivers them
                    break
                self._ack(batch)
            elif stopping:
                break
            self._report_unreachable(time.monotonic())
            if time.monotonic() - last_log >= self.log_every_s:
                t = self.ingestor.totals
                rate = (t.received - logged) / (time.monotonic() - last_log)
                log.info("received %d (%.0f/s), stored %d, duplicates %d, summaries %d (+%d duplicates), "
                         "dead letters %d, batches %d", t.received, rate, t.stored, t.duplicates, t.summaries,
                         t.summary_duplicates, t.dead, t.batches)
                last_log, logged = time.monotonic(), t.received
        self._close()

    def _drain(self) -> list[_Message]:
        batch: list[_Message] = []
        while len(batch) < self.batch_size:
            try:
                batch.append(self._queue.get_nowait())
            except queue.Empty:
                break
        return batch

    def stop(self) -> None:
        self.stop_event.set()

    def _close(self) -> None:
        if self._client is not None:
            self._client.disconnect()  # reason 0: the session (and its queued messages) persists
            self._client.loop_stop()
            self._client = None
        t = self.ingestor.totals
        log.info("stopped: received %d, stored %d, duplicates %d, summaries %d, dead letters %d", t.received,
                 t.stored, t.duplicates, t.summaries, t.dead)

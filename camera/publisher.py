"""The MQTT publisher: one paho-mqtt v2 client that drains the durable outbox to the broker.

The frame loop never touches the network: it writes to the :class:`~camera.outbox.Outbox` and returns. A drain
thread here sends the oldest unsent rows (at most ``window`` unacknowledged at a time, in id order) and deletes a
row only when its PUBACK arrives. paho keeps unacknowledged QoS 1 messages in memory and re-sends them after a
reconnect; after a process restart the outbox itself replays them. The broker may be down at start: paho's loop
thread retries with backoff while the outbox fills.

``status`` is retained: ``online`` on every (re)connect, ``offline`` on a clean stop and as the Last Will.

Batching (``publish.batch``, like a Kafka producer's linger + batch + compression): with ``linger_s`` > 0 the
drain waits until the oldest pending row has waited ``linger_s`` (or a batch is full, or :meth:`wait_drained`
asks), then sends every pending row of this camera's ``events`` topic as zlib-compressed JSON Lines on the
``batch`` topic (``contract.batch.encode_batch``), and only the newest pending row of each retained topic, at
most every ``retained_interval_s`` per topic: the older ones are superseded snapshots, deleted with the newest
one's PUBACK. The outbox keeps one row per event
either way; a message's PUBACK deletes all of its rows, a rejection keeps them all. ``linger_s`` = 0 sends one
message per row on ``events``.

A rejected message (an MQTT 5 PUBACK with a failure reason, e.g. "Not authorized") is sent again after a backoff
(``retry_s``, doubling up to ``retry_max_s``) while the process runs; after ``max_rejections`` its rows move to
the outbox's dead letters (kept, counted, listed by ``smartcam-edge outbox dead-letters``). A row the MQTT client
refuses outright (a wildcard in its topic, a payload over the MQTT limit) is dead-lettered at once.

One process may serve several cameras on one connection (camera/mqtt_connection.py): each camera has its own
Publisher (outbox, topics, batching, retries), and the connection's single drain thread serves them in turn.

The drain never dies silently: an unexpected exception is logged with its traceback and the drain starts
again after a backoff (counted in ``drain_restarts``); after ``max_drain_failures`` failures in a row, or an
outbox error, it stops and :meth:`Publisher.check` raises :class:`PublisherError` / ``OutboxError`` in the frame
loop, which ends the run with its exit code.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import paho.mqtt.client as mqtt

from camera.config import BatchConfig
from camera.confirm import SinkConfirmations
from camera.mqtt_connection import MqttConnection
from camera.outbox import Outbox, OutboxError, Row
from camera.sample_queue import SampleQueue
from contract.batch import BATCH_LEAF, encode_batch
from contract.broker import BrokerSettings
from contract.rollup import SUMMARY_LEAF
from contract.sample import SAMPLE_LEAF
from contract.topics import ACK_LEAF, topic_for

log = logging.getLogger(__name__)

ONLINE, OFFLINE = "online", "offline"
SAMPLES_IN_FLIGHT = 2  # sampled frames unacknowledged at most (tens of KB each: they must not crowd out events)


class PublisherError(RuntimeError):
    """The publisher cannot go on (its drain thread failed repeatedly or stopped); one line for the user."""


@dataclass(frozen=True)
class _Sent:
    """What one in-flight MQTT message carries: enough to send it again after a rejection."""

    topic: str
    qos: int
    retain: bool
    row_ids: tuple[int, ...]


@dataclass
class _Message:
    """One MQTT message planned from outbox rows; ``row_ids`` are deleted together on its PUBACK."""

    key: int  # the row id that orders it among the other messages of one flush
    topic: str
    qos: int
    retain: bool
    rows: list[Row] = field(default_factory=list)
    superseded: list[int] = field(default_factory=list)  # older retained snapshots replaced by ``rows[-1]``
    size: int = 0

    @property
    def row_ids(self) -> list[int]:
        return self.superseded + [r.id for r in self.rows]


class Publisher:
    """Owns the MQTT connection; call :meth:`start`, then :meth:`wait_drained` / :meth:`stop`."""

    def __init__(self, settings: BrokerSettings, outbox: Outbox, *, site: str, camera_id: str,
                 client_id: str | None = None, window: int = 200, reconnect_max_s: int = 30,
                 batch: BatchConfig | None = None, samples: SampleQueue | None = None, retry_s: float = 5.0,
                 retry_max_s: float = 300.0, max_rejections: int = 5, drain_backoff_s: float = 1.0,
                 max_drain_failures: int = 10, confirm: SinkConfirmations | None = None,
                 connection: MqttConnection | None = None) -> None:
        self.settings = settings
        self.outbox = outbox
        self.site = site
        self.camera_id = camera_id
        self.window = window
        self.batch = batch if batch is not None and batch.linger_s > 0 else None  # None: one message per row
        self.retained_interval_s = self.batch.retained_interval_s if self.batch else 0.0  # per retained topic
        self._held: dict[str, _Message] = {}  # retained topic -> its newest pending snapshot (+ superseded rows)
        self._retained_at: dict[str, float] = {}  # retained topic -> monotonic time of its last publish
        self.status_topic = topic_for(site, camera_id, "status")
        self.events_topic = topic_for(site, camera_id, "events")
        self.batch_topic = topic_for(site, camera_id, BATCH_LEAF)
        self._owns_connection = connection is None  # one camera alone: its own connection, its status the Will
        self.connection = connection or MqttConnection(
            settings, client_id or f"smartcam-edge-{site}-{camera_id}", will=(self.status_topic, OFFLINE),
            window=window, reconnect_max_s=reconnect_max_s)
        self.client = self.connection.client
        self.connected = self.connection.connected
        self.status = ONLINE  # what this camera's retained status says on each connect (offline: source down)
        self.published = 0  # outbox rows acknowledged by the broker (with batching: events, not messages)
        self.error: OutboxError | PublisherError | None = None  # why the drain thread stopped (check() raises it)
        self.acks: queue.SimpleQueue[tuple[int, str | None]] = queue.SimpleQueue()  # (mid, rejection), routed
        self.rejected = 0  # PUBACKs with an MQTT 5 failure reason (e.g. not authorized): retried, then dead letters
        self.retry_s, self.retry_max_s, self.max_rejections = retry_s, retry_max_s, max_rejections
        self._retries: list[tuple[float, _Sent]] = []  # (monotonic time due, message): sent again when due
        self.drain_restarts = 0  # unexpected drain failures survived (restarted after a backoff)
        self.dead_lettered_messages = 0  # rejected messages whose rows became dead letters
        self.drain_backoff_s, self.max_drain_failures = drain_backoff_s, max_drain_failures
        self._failures = 0  # drain failures in a row
        self._not_before = 0.0  # monotonic: after a failure, the drain waits out its backoff
        self._inflight: dict[int, _Sent] = {}  # paho mid -> what it carries
        self._last_sent = 0
        self.messages = 0  # MQTT messages handed to paho from the outbox (a batch counts once)
        self.batches = 0  # of which batch messages
        self.coalesced = 0  # retained snapshots never sent because a newer one superseded them
        self._flush = threading.Event()  # wait_drained: send what is pending without waiting for linger_s
        self._stop = threading.Event()
        self._abort_wait = threading.Event()
        self._wake = self.connection.wake
        self.paused = threading.Event()  # set while the wall clock is not set (camera/clock.py): nothing is sent
        # publish.confirm: sink (camera/confirm.py): event rows stay until the sink confirms them on .../ack
        self.confirm = confirm
        self.ack_topic = topic_for(site, camera_id, ACK_LEAF)
        self._sink_topics = {self.events_topic, self.batch_topic, topic_for(site, camera_id, SUMMARY_LEAF)}
        if confirm is not None:
            self.client.message_callback_add(self.ack_topic, self._on_sink_ack)
            self.connect_hooks.append(lambda client: client.subscribe(self.ack_topic, qos=1))
        # sampled frames (learning loop): a second, byte-bounded queue sent after the events, never ahead of them
        self.samples = samples
        self.sample_topic = topic_for(site, camera_id, SAMPLE_LEAF)
        self._sample_inflight: dict[int, int] = {}  # paho mid -> sample queue id
        self._last_sample = 0
        self.samples_sent = 0  # acknowledged by the broker
        self.sample_bytes = 0
        self._sample_rejections: dict[int, int] = {}  # sample id -> rejections so far
        self._sample_retries: list[tuple[float, int]] = []  # (monotonic time due, sample id)
        self.samples_rejected = 0  # given up after max_rejections (deleted: samples are best effort)
        self.connection.attach(self)

    # ------------------------------------------------------------------ the connection (camera/mqtt_connection.py)
    @property
    def connects(self) -> int:
        return self.connection.connects

    @property
    def connect_failures(self) -> int:
        return self.connection.connect_failures

    @property
    def connect_hooks(self) -> list[Callable[[mqtt.Client], None]]:
        """Run on every (re)connect, on paho's network thread, after ``online``: e.g. Home Assistant discovery
        (camera/homeassistant.py), which shares the one connection."""
        return self.connection.connect_hooks

    def route(self, topic: str, handler: Callable[[str, bytes], None]) -> None:
        """Receive messages on ``topic`` through the shared connection (other cameras may want it too)."""
        self.connection.route(topic, handler)

    def owns(self, mid: int) -> bool:
        """Is paho message ``mid`` one this camera sent from its outbox or sample queue?"""
        return mid in self._inflight or mid in self._sample_inflight

    def set_status(self, status: str) -> None:
        """This camera's retained status now and on every reconnect (``offline`` while its source is down)."""
        if status == self.status:
            return
        self.status = status
        if self.connected.is_set():
            self.client.publish(self.status_topic, status, qos=1, retain=True)

    # ------------------------------------------------------------------ drain (the connection's thread)
    def serve(self) -> None:
        """One turn of this camera on the drain thread. Never dies silently: an unexpected exception is logged
        and the drain starts again after a backoff; an outbox error, or too many failures in a row, stops it."""
        if self.error is not None or self._stop.is_set() or time.monotonic() < self._not_before:
            return
        try:
            self._drain_once()
            self._failures = 0
        except OutboxError as exc:
            self.error = exc
            log.error("%s", exc)
        except Exception as exc:  # noqa: BLE001 - seen, counted and restarted: never a silent death
            self._failures += 1
            if self._failures >= self.max_drain_failures:
                self.error = PublisherError(f"the outbox drain failed {self._failures} times in a row (last: "
                                            f"{type(exc).__name__}: {exc}); stopping, unsent events stay in "
                                            "the outbox")
                log.exception("%s", self.error)
                return
            self.drain_restarts += 1
            delay = min(self.drain_backoff_s * 2 ** (self._failures - 1), 30.0)
            log.exception("the outbox drain failed (%s: %s); restarting it in %.1f s (restart #%d)",
                          type(exc).__name__, exc, delay, self.drain_restarts)
            self._restart_drain()
            self._not_before = time.monotonic() + delay

    def final_acks(self) -> None:
        """Last call on the drain thread: delete what the broker acknowledged meanwhile."""
        with contextlib.suppress(OutboxError):
            self._process_acks()

    def _drain_once(self) -> None:
        """One pass of the drain thread: acknowledgements, rejected messages whose backoff is over, new rows."""
        self._process_acks()
        if self.connected.is_set():
            self._send_retries()
            self._send_more()
            self._send_samples()

    def _restart_drain(self) -> None:
        """After a failure, start again from the oldest unsent row (one in flight may go twice: the sink
        dedupes on event_id)."""
        self._last_sent = 0
        self._held.clear()

    def check(self) -> None:
        """Raise why the publisher stopped (the frame loop calls this); nothing while it works."""
        if self.error is not None:
            raise self.error
        drainer = self.connection.thread
        if drainer.ident is not None and not drainer.is_alive() and not self._stop.is_set():
            raise PublisherError("the outbox drain thread stopped unexpectedly; unsent events stay in the outbox")

    def _on_sink_ack(self, _client, _userdata, msg) -> None:
        self.confirm.on_ack(msg.payload)  # parsed and queued: the drain thread does the rest
        self._wake.set()

    def _sink_confirmed(self, waiting: list[int]) -> list[int]:
        """confirm: sink: rows to delete now (confirmed by the sink, or nothing to wait for); overdue rows are
        sent again from the oldest (the cursor goes back; rows still waiting are skipped, see :meth:`_fresh`)."""
        assert self.confirm is not None
        now = time.monotonic()
        done = self.confirm.take_confirmed()
        if waiting:
            done += self.confirm.broker_acked({r.id: r.payload for r in self.outbox.fetch_ids(waiting)}, now)
        late = self.confirm.take_expired(now)
        if late:
            self._last_sent = min(self._last_sent, min(late) - 1)
            log.warning("%d event(s) acknowledged by the broker but not confirmed by the sink within %.0f s: sending "
                        "them again (%d re-sent so far; is smartcam-sink running? a third-party consumer needs "
                        "publish.confirm: broker)", len(late), self.confirm.timeout_s, self.confirm.resent)
        return done

    def _fresh(self, rows: list[Row]) -> list[Row]:
        """confirm: sink: leave out rows the broker already has (in flight, or waiting for the sink)."""
        if self.confirm is None:
            return rows
        flying = {i for sent in self._inflight.values() for i in sent.row_ids}
        return [r for r in rows if r.id not in flying and not self.confirm.waits(r.id)]

    def _process_acks(self) -> None:
        done: list[int] = []
        waiting: list[int] = []
        while True:
            try:
                mid, rejection = self.acks.get_nowait()
            except queue.Empty:
                break
            sent = self._inflight.pop(mid, None)
            if sent is None:
                self._sample_acked(mid, rejection)
                continue
            if rejection is None:
                if self.confirm is not None and sent.topic in self._sink_topics:
                    waiting.extend(sent.row_ids)  # the broker has them; the sink has not said so yet
                else:
                    done.extend(sent.row_ids)
            else:
                self._rejected(sent, rejection)
        if self.confirm is not None:
            done.extend(self._sink_confirmed(waiting))
        if done:
            self.published += self.outbox.delete(done)

    def _rejected(self, sent: _Sent, reason: str) -> None:
        """Count a broker rejection: send again after a backoff, or dead-letter after ``max_rejections``."""
        self.rejected += 1
        times, dead = self.outbox.reject(list(sent.row_ids), reason, limit=self.max_rejections)
        first, last = min(sent.row_ids), max(sent.row_ids)
        if dead:
            self.dead_lettered_messages += 1
            first_or_100th = self.dead_lettered_messages == 1 or self.dead_lettered_messages % 100 == 0
            level = logging.ERROR if first_or_100th else logging.DEBUG
            log.log(level, "broker rejected outbox row(s) %d..%d %d times (%s): moved %d row(s) to the outbox's "
                    "dead letters (%d messages so far; smartcam-edge outbox dead-letters --outbox %s); check the "
                    "broker's ACL for this camera", first, last, times, reason, dead, self.dead_lettered_messages,
                    self.outbox.path)
            return
        delay = min(self.retry_s * 2 ** (max(times, 1) - 1), self.retry_max_s)
        if self.rejected == 1 or self.rejected % 100 == 0:
            log.error("broker rejected outbox row(s) %d..%d (%s; %d messages rejected so far): kept in the outbox "
                      "and sent again in %.1f s (dead letters after %d rejections); check the broker's ACL for "
                      "this camera", first, last, reason, self.rejected, delay, self.max_rejections)
        self._retries.append((time.monotonic() + delay, sent))

    def _send_retries(self) -> None:
        """Send the rejected messages whose backoff is over, rebuilt from their rows still in the outbox."""
        now = time.monotonic()
        due = [sent for t, sent in self._retries if t <= now]
        if not due:
            return
        self._retries = [(t, sent) for t, sent in self._retries if t > now]
        for sent in due:
            rows = self.outbox.fetch_ids(list(sent.row_ids))
            if not rows:
                continue  # acknowledged meanwhile (a copy sent after a reconnect)
            if sent.retain and self.outbox.newer_on_topic(sent.topic, rows[-1].id):
                self.published += self.outbox.delete([r.id for r in rows])  # superseded: the newer one goes
                self.coalesced += len(rows)
                continue
            payload = encode_batch([r.payload for r in rows]) if sent.topic == self.batch_topic else rows[-1].payload
            if not self._publish(_Sent(sent.topic, sent.qos, sent.retain, tuple(r.id for r in rows)), payload):
                self._retries.append((now + self.retry_s, sent))

    def _publish(self, sent: _Sent, payload: bytes) -> bool:
        """Hand one message to paho; False if it must be tried again later. A message paho refuses outright
        (ValueError: a wildcard in the topic, a payload over the MQTT limit) can never go: dead-lettered."""
        try:
            info = self.client.publish(sent.topic, payload, qos=sent.qos, retain=sent.retain)
        except ValueError as exc:
            moved = self.outbox.dead_letter(list(sent.row_ids), f"the MQTT client refused it: {exc}")
            log.error("outbox row(s) %d..%d cannot be published (%s): moved %d row(s) to the dead letters",
                      min(sent.row_ids), max(sent.row_ids), exc, moved)
            return True
        if info.rc not in (mqtt.MQTT_ERR_SUCCESS, mqtt.MQTT_ERR_NO_CONN, mqtt.MQTT_ERR_QUEUE_SIZE):
            log.warning("publish of outbox row(s) %d..%d failed (%s); will retry", min(sent.row_ids),
                        max(sent.row_ids), mqtt.error_string(info.rc))
            return False
        self.messages += 1
        if sent.qos == 0:  # no PUBACK will come: a QoS 0 row is done once handed to paho
            self.outbox.delete(list(sent.row_ids))
        else:
            self._inflight[info.mid] = sent
        return True

    def _send_more(self) -> None:
        if self.paused.is_set():  # rows stamped with a clock that is not set wait, durably, for their correction
            return
        room = self.window - len(self._inflight)
        if room <= 0:
            return
        if self.batch is not None:
            self._send_batched(room)
            return
        fetched = self.outbox.fetch(self._last_sent, room)
        fresh = self._fresh(fetched)
        if fetched and not fresh:
            self._last_sent = fetched[-1].id  # all with the broker already: look further
        for row in fresh:
            if not self._publish(_Sent(row.topic, row.qos, row.retain, (row.id,)), row.payload):
                break
            self._last_sent = row.id

    # ------------------------------------------------------------------ samples
    def _send_samples(self) -> None:
        """A few samples at a time, only while the events leave room in the window (events go first)."""
        if self.samples is None or len(self._inflight) >= self.window:
            return
        room = SAMPLES_IN_FLIGHT - len(self._sample_inflight)
        if room <= 0:
            return
        now = time.monotonic()
        due = [sid for t, sid in self._sample_retries if t <= now]
        if due:  # a rejected sample's backoff is over: the cursor goes back to it
            self._sample_retries = [(t, sid) for t, sid in self._sample_retries if t > now]
            self._last_sample = min(self._last_sample, min(due) - 1)
        waiting = {sid for _, sid in self._sample_retries} | set(self._sample_inflight.values())
        for sample_id, payload in self.samples.fetch(self._last_sample, room + len(waiting)):
            if sample_id in waiting:
                continue
            if room <= 0:
                break
            room -= 1
            info = self.client.publish(self.sample_topic, payload, qos=1)
            if info.rc not in (mqtt.MQTT_ERR_SUCCESS, mqtt.MQTT_ERR_NO_CONN, mqtt.MQTT_ERR_QUEUE_SIZE):
                log.warning("publish of sample %d failed (%s); will retry", sample_id, mqtt.error_string(info.rc))
                return
            self._sample_inflight[info.mid] = sample_id
            self._last_sample = sample_id

    def _sample_acked(self, mid: int, rejection: str | None) -> None:
        sample_id = self._sample_inflight.pop(mid, None)
        if sample_id is None or self.samples is None:
            return
        if rejection is not None:  # the broker's ACL may not allow .../sample (yet): again after a backoff
            self.rejected += 1
            times = self._sample_rejections[sample_id] = self._sample_rejections.get(sample_id, 0) + 1
            if times >= self.max_rejections:
                self.samples.delete(sample_id)
                self._sample_rejections.pop(sample_id, None)
                self.samples_rejected += 1
                log.error("broker rejected sample %d %d times (%s): dropped (%d so far); check the broker's ACL "
                          "for %s", sample_id, times, rejection, self.samples_rejected, self.sample_topic)
                return
            delay = min(self.retry_s * 2 ** (times - 1), self.retry_max_s)
            log.error("broker rejected sample %d (%s): kept in the sample queue, sent again in %.1f s", sample_id,
                      rejection, delay)
            self._sample_retries.append((time.monotonic() + delay, sample_id))
            return
        self._sample_rejections.pop(sample_id, None)
        self.samples.delete(sample_id)
        self.samples_sent += 1

    # ------------------------------------------------------------------ batching
    def _batchable(self, row: Row) -> bool:
        return (row.topic == self.events_topic and row.qos == 1 and not row.retain
                and b"\n" not in row.payload)  # one event per line: a payload with a newline goes alone

    def _due(self, rows: list[Row], fetched_all: bool) -> bool:
        """Send now? When asked to, when a batch is full, or when the oldest row has lingered long enough."""
        assert self.batch is not None
        if self._flush.is_set() or not fetched_all:
            return True
        age = time.time() - rows[0].created
        if age >= self.batch.linger_s or age < -1.0:  # a clock stepped back must not hold rows forever
            return True
        events = [r for r in rows if self._batchable(r)]
        if any(not self._batchable(r) and not (r.retain and r.qos) for r in rows):
            return True  # some other kind of row: not ours to hold back
        return (len(events) >= self.batch.max_events
                or sum(len(r.payload) + 1 for r in events) >= self.batch.max_bytes)

    def _plan(self, rows: list[Row], room: int) -> tuple[list[_Message], int]:
        """Group ``rows`` (in id order) into at most ``room`` messages; returns them and the last row id used.

        Events go into batch messages (split at ``max_events`` / ``max_bytes``); rows of a retained topic move to
        ``_held`` (see :meth:`_release_held`); anything else goes alone.
        """
        assert self.batch is not None
        messages: list[_Message] = []
        chunk: _Message | None = None
        last = self._last_sent
        for row in rows:
            if self._batchable(row):
                size = len(row.payload) + 1
                if chunk is None or len(chunk.rows) >= self.batch.max_events or (
                        chunk.size + size > self.batch.max_bytes):
                    if len(messages) >= room:
                        break
                    chunk = _Message(row.id, self.batch_topic, 1, False)
                    messages.append(chunk)
                chunk.rows.append(row)
                chunk.size += size
            elif row.retain and row.qos:
                held = self._held.get(row.topic)
                if held is None:
                    held = self._held[row.topic] = _Message(row.id, row.topic, row.qos, True)
                held.superseded += [r.id for r in held.rows]
                held.rows, held.key = [row], row.id
            else:
                if len(messages) >= room:
                    break
                messages.append(_Message(row.id, row.topic, row.qos, row.retain, [row]))
            last = row.id
        return messages, last

    def _release_held(self, room: int) -> list[_Message]:
        """The held retained snapshots that may go now: each topic at most every ``retained_interval_s``
        (the first one at once), all of them when the outbox is being drained. The rest stay held: their rows
        are still in the outbox, so a restart replays them."""
        now = time.monotonic()
        out: list[_Message] = []
        for topic in sorted(self._held, key=lambda t: self._held[t].key):
            if len(out) >= room:
                break
            if self._flush.is_set() or now - self._retained_at.get(topic, -1e18) >= self.retained_interval_s:
                out.append(self._held.pop(topic))
                self._retained_at[topic] = now
        return out

    def _send_batched(self, room: int) -> None:
        assert self.batch is not None
        limit = max(2 * self.batch.max_events, 2 * self.window, 100)
        fetched = self.outbox.fetch(self._last_sent, limit)
        rows = self._fresh(fetched)
        if fetched and not rows:
            self._last_sent = fetched[-1].id  # all with the broker already: look further
        messages: list[_Message] = []
        last = self._last_sent
        if rows and self._due(rows, fetched_all=len(rows) < limit):
            messages, last = self._plan(rows, room)
        if self._held:
            messages += self._release_held(room - len(messages))
        # events keep their order; a retained snapshot goes after the batch holding the events before it
        messages.sort(key=lambda m: m.key)
        for msg in messages:
            if msg.topic == self.batch_topic:
                payload = encode_batch([r.payload for r in msg.rows])
            else:
                payload = msg.rows[-1].payload
            # No MQTT 5 content type: 28 bytes per message (~50 KB/h at one batch per 2 s) for what the zlib
            # header's DICTID already says.
            if not self._publish(_Sent(msg.topic, msg.qos, msg.retain, tuple(msg.row_ids)), payload):
                unsent = [i for m in messages[messages.index(msg):] + list(self._held.values()) for i in m.row_ids]
                # fetch again from the first row not sent (anything after it that went out is a harmless copy)
                self._last_sent = min(unsent) - 1
                self._held.clear()
                return
            self.batches += msg.topic == self.batch_topic
            self.coalesced += len(msg.superseded)
        self._last_sent = max(self._last_sent, last)

    # ------------------------------------------------------------------ public API
    def start(self) -> None:
        """Connect in the background (never blocks, never raises for an unreachable broker)."""
        if self._owns_connection:  # a shared one is started by the process once every camera is attached
            self.connection.start()
        log.info("publisher started for %s (outbox depth %d)", self.settings.redacted(), self.outbox.depth())

    def notify(self) -> None:
        """Tell the drain thread new rows are waiting (optional: it also polls)."""
        self._wake.set()

    def publish_now(self, topic_leaf: str, payload: str | bytes, qos: int = 0, retain: bool = False) -> bool:
        """Best-effort direct publish (stats): skipped when offline, never queued."""
        if not self.connected.is_set():
            return False
        info = self.client.publish(topic_for(self.site, self.camera_id, topic_leaf), payload, qos=qos, retain=retain)
        return info.rc == mqtt.MQTT_ERR_SUCCESS

    def wait_drained(self, timeout: float) -> int:
        """Wait up to ``timeout`` s for the outbox to empty; returns the rows still queued."""
        deadline = time.monotonic() + timeout
        self._flush.set()  # nothing lingers while someone waits for the outbox to empty
        try:
            while time.monotonic() < deadline and self.error is None and not self._abort_wait.is_set():
                depth = self.outbox.depth()
                if depth == 0 and (self.samples is None or self.samples.depth() == 0):
                    return 0  # samples too (best effort: ones still queued at the deadline wait for the next start)
                if self._only_retries_left(depth, deadline):
                    return depth
                self._wake.set()
                time.sleep(0.05)
            return self.outbox.depth()
        finally:
            self._flush.clear()

    def _only_retries_left(self, depth: int, deadline: float) -> bool:
        """Every queued row was rejected and waits for a retry due after ``deadline``: waiting cannot help."""
        retries = list(self._retries)
        return (not self._inflight and bool(retries) and min(t for t, _ in retries) > deadline
                and depth <= sum(len(sent.row_ids) for _, sent in retries))

    def abort_wait(self) -> None:
        """Make a running :meth:`wait_drained` return now (second Ctrl-C)."""
        self._abort_wait.set()

    def stop(self, timeout: float = 5.0) -> None:
        """Publish ``offline`` (retained) and leave the connection; disconnect cleanly if it is this camera's."""
        self.status = OFFLINE
        if self.connected.is_set():
            info = self.client.publish(self.status_topic, OFFLINE, qos=1, retain=True)
            try:
                info.wait_for_publish(timeout)
            except (RuntimeError, ValueError) as exc:
                log.warning("could not publish offline status: %s", exc)
        self._stop.set()
        self.connection.detach(self, timeout)
        if self._owns_connection:
            self.connection.stop(timeout)

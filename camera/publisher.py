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
message per row, as before.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import paho.mqtt.client as mqtt

from camera.config import BatchConfig
from camera.outbox import Outbox, OutboxError, Row
from camera.sample_queue import SampleQueue
from contract.batch import BATCH_LEAF, encode_batch
from contract.broker import BrokerSettings, diagnose, make_client
from contract.sample import SAMPLE_LEAF
from contract.topics import topic_for

log = logging.getLogger(__name__)

ONLINE, OFFLINE = "online", "offline"
SAMPLES_IN_FLIGHT = 2  # sampled frames unacknowledged at most (tens of KB each: they must not crowd out events)


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
                 batch: BatchConfig | None = None, samples: SampleQueue | None = None) -> None:
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
        self.client = make_client(settings, client_id or f"smartcam-edge-{site}-{camera_id}")
        self.client.max_inflight_messages_set(window)
        self.client.max_queued_messages_set(0)
        self.client.reconnect_delay_set(min_delay=1, max_delay=reconnect_max_s)
        self.client.will_set(self.status_topic, OFFLINE, qos=1, retain=True)
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.on_publish = self._on_publish
        self.client.on_connect_fail = self._on_connect_fail
        self.connect_failures = 0
        # run on every (re)connect, on paho's network thread, after ``online``: e.g. Home Assistant discovery
        # (camera/homeassistant.py), which shares this one connection
        self.connect_hooks: list[Callable[[mqtt.Client], None]] = []
        self.connected = threading.Event()
        self.connects = 0
        self.published = 0  # outbox rows acknowledged by the broker (with batching: events, not messages)
        self.error: OutboxError | None = None  # set if the outbox failed under the drain thread
        self._acks: queue.SimpleQueue[tuple[int, str | None]] = queue.SimpleQueue()  # (mid, rejection)
        self.rejected = 0  # PUBACKs with an MQTT 5 failure reason (e.g. not authorized): kept in the outbox
        self._inflight: dict[int, list[int]] = {}  # paho mid -> the outbox row ids it carries
        self._last_sent = 0
        self.messages = 0  # MQTT messages handed to paho from the outbox (a batch counts once)
        self.batches = 0  # of which batch messages
        self.coalesced = 0  # retained snapshots never sent because a newer one superseded them
        self._flush = threading.Event()  # wait_drained: send what is pending without waiting for linger_s
        self._stop = threading.Event()
        self._abort_wait = threading.Event()
        self._wake = threading.Event()
        self._drainer = threading.Thread(target=self._drain_loop, name="outbox-drain", daemon=True)
        # sampled frames (learning loop): a second, byte-bounded queue sent after the events, never ahead of them
        self.samples = samples
        self.sample_topic = topic_for(site, camera_id, SAMPLE_LEAF)
        self._sample_inflight: dict[int, int] = {}  # paho mid -> sample queue id
        self._last_sample = 0
        self.samples_sent = 0  # acknowledged by the broker
        self.sample_bytes = 0

    # ------------------------------------------------------------------ paho callbacks (network thread)
    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        if reason_code.is_failure:
            log.warning("broker %s refused the connection: %s", self.settings.redacted(), reason_code)
            return
        self.connects += 1
        log.info("connected to broker %s%s", self.settings.redacted(),
                 "" if self.connects == 1 else f" (reconnect #{self.connects - 1})")
        client.publish(self.status_topic, ONLINE, qos=1, retain=True)
        for hook in self.connect_hooks:
            try:
                hook(client)
            except Exception:  # noqa: BLE001 - an add-on must never take the event stream down
                log.exception("connect hook %r failed", hook)
        self.connected.set()
        self._wake.set()

    def _on_connect_fail(self, client, userdata) -> None:
        self.connect_failures += 1
        if self.connect_failures == 1 or self.connect_failures % 10 == 0:
            log.warning("cannot reach broker %s (attempt %d: %s); events are queued in the outbox, retrying with "
                        "backoff", self.settings.redacted(), self.connect_failures, diagnose(self.settings))

    def _on_disconnect(self, client, userdata, flags, reason_code, properties) -> None:
        was = self.connected.is_set()
        self.connected.clear()
        if was and not self._stop.is_set():
            log.warning("lost the broker %s (%s); queueing in the outbox and retrying",
                        self.settings.redacted(), reason_code)

    def _on_publish(self, client, userdata, mid, reason_code, properties) -> None:
        # Never touch SQLite or our locks here (paho may hold its own): hand the ack to the drain thread.
        rejected = reason_code is not None and getattr(reason_code, "is_failure", False)
        self._acks.put((mid, str(reason_code) if rejected else None))
        self._wake.set()

    # ------------------------------------------------------------------ drain thread
    def _drain_loop(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(0.2)
            self._wake.clear()
            try:
                self._process_acks()
                if self.connected.is_set():
                    self._send_more()
                    self._send_samples()
            except OutboxError as exc:
                self.error = exc
                log.error("%s", exc)
                return
        self._process_acks()

    def _process_acks(self) -> None:
        done: list[int] = []
        while True:
            try:
                mid, rejection = self._acks.get_nowait()
            except queue.Empty:
                break
            row_ids = self._inflight.pop(mid, None)
            if row_ids is None:
                self._sample_acked(mid, rejection)
                continue
            if rejection is None:
                done.extend(row_ids)
            else:  # not deleted: they stay in the outbox and are retried on the next start
                self.rejected += 1
                if self.rejected == 1 or self.rejected % 100 == 0:
                    log.error("broker rejected outbox row(s) %d..%d (%s; %d messages rejected so far): kept in the "
                              "outbox, check the broker's ACL for this camera", min(row_ids), max(row_ids),
                              rejection, self.rejected)
        if done:
            self.outbox.delete(done)
            self.published += len(done)

    def _send_more(self) -> None:
        room = self.window - len(self._inflight)
        if room <= 0:
            return
        if self.batch is not None:
            self._send_batched(room)
            return
        for row in self.outbox.fetch(self._last_sent, room):
            info = self.client.publish(row.topic, row.payload, qos=row.qos, retain=row.retain)
            if info.rc not in (mqtt.MQTT_ERR_SUCCESS, mqtt.MQTT_ERR_NO_CONN, mqtt.MQTT_ERR_QUEUE_SIZE):
                log.warning("publish of outbox row %d failed (%s); will retry", row.id, mqtt.error_string(info.rc))
                break
            self.messages += 1
            if row.qos == 0:  # no PUBACK will come: a QoS 0 row is done once handed to paho
                self.outbox.delete([row.id])
            else:
                self._inflight[info.mid] = [row.id]
            self._last_sent = row.id

    # ------------------------------------------------------------------ samples
    def _send_samples(self) -> None:
        """A few samples at a time, only while the events leave room in the window (events go first)."""
        if self.samples is None or len(self._inflight) >= self.window:
            return
        room = SAMPLES_IN_FLIGHT - len(self._sample_inflight)
        if room <= 0:
            return
        for sample_id, payload in self.samples.fetch(self._last_sample, room):
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
        if rejection is not None:  # kept: replayed on the next start (the broker's ACL may not allow .../sample)
            log.error("broker rejected sample %d (%s): kept in the sample queue", sample_id, rejection)
            return
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
        rows = self.outbox.fetch(self._last_sent, limit)
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
            info = self.client.publish(msg.topic, payload, qos=msg.qos, retain=msg.retain)
            if info.rc not in (mqtt.MQTT_ERR_SUCCESS, mqtt.MQTT_ERR_NO_CONN, mqtt.MQTT_ERR_QUEUE_SIZE):
                log.warning("publish of outbox row(s) %d..%d failed (%s); will retry", min(msg.row_ids),
                            max(msg.row_ids), mqtt.error_string(info.rc))
                unsent = [i for m in messages[messages.index(msg):] + list(self._held.values()) for i in m.row_ids]
                # fetch again from the first row not sent (anything after it that went out is a harmless copy)
                self._last_sent = min(unsent) - 1
                self._held.clear()
                return
            self.messages += 1
            self.batches += msg.topic == self.batch_topic
            self.coalesced += len(msg.superseded)
            if msg.qos == 0:
                self.outbox.delete(msg.row_ids)
            else:
                self._inflight[info.mid] = msg.row_ids
        self._last_sent = max(self._last_sent, last)

    # ------------------------------------------------------------------ public API
    def start(self) -> None:
        """Connect in the background (never blocks, never raises for an unreachable broker)."""
        self.client.connect_async(self.settings.host, self.settings.port, keepalive=self.settings.keepalive)
        self.client.loop_start()
        self._drainer.start()
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
                if self.outbox.depth() == 0 and (self.samples is None or self.samples.depth() == 0):
                    return 0  # samples too (best effort: ones still queued at the deadline wait for the next start)
                self._wake.set()
                time.sleep(0.05)
            return self.outbox.depth()
        finally:
            self._flush.clear()

    def abort_wait(self) -> None:
        """Make a running :meth:`wait_drained` return now (second Ctrl-C)."""
        self._abort_wait.set()

    def stop(self, timeout: float = 5.0) -> None:
        """Publish ``offline`` (retained), disconnect cleanly, stop the threads."""
        if self.connected.is_set():
            info = self.client.publish(self.status_topic, OFFLINE, qos=1, retain=True)
            try:
                info.wait_for_publish(timeout)
            except (RuntimeError, ValueError) as exc:
                log.warning("could not publish offline status: %s", exc)
        self._stop.set()
        self._wake.set()
        if self._drainer.is_alive():
            self._drainer.join(timeout)
        self.client.disconnect()
        self.client.loop_stop()

    def health(self) -> dict[str, Any]:
        return {"connected": self.connected.is_set(), "connects": self.connects, "published": self.published,
                "inflight": len(self._inflight), "messages": self.messages, "batches": self.batches,
                "coalesced": self.coalesced}

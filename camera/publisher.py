"""The MQTT publisher: one paho-mqtt v2 client that drains the durable outbox to the broker.

The frame loop never touches the network: it writes to the :class:`~camera.outbox.Outbox` and returns. A drain
thread here sends the oldest unsent rows (at most ``window`` unacknowledged at a time, in id order) and deletes a
row only when its PUBACK arrives. paho keeps unacknowledged QoS 1 messages in memory and re-sends them after a
reconnect; after a process restart the outbox itself replays them. The broker may be down at start: paho's loop
thread retries with backoff while the outbox fills.

``status`` is retained: ``online`` on every (re)connect, ``offline`` on a clean stop and as the Last Will.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from typing import Any

import paho.mqtt.client as mqtt

from camera.broker import BrokerSettings, diagnose, make_client
from camera.contract import topic_for
from camera.outbox import Outbox, OutboxError

log = logging.getLogger(__name__)

ONLINE, OFFLINE = "online", "offline"


class Publisher:
    """Owns the MQTT connection; call :meth:`start`, then :meth:`wait_drained` / :meth:`stop`."""

    def __init__(self, settings: BrokerSettings, outbox: Outbox, *, site: str, camera_id: str,
                 client_id: str | None = None, window: int = 200, reconnect_max_s: int = 30) -> None:
        self.settings = settings
        self.outbox = outbox
        self.site = site
        self.camera_id = camera_id
        self.window = window
        self.status_topic = topic_for(site, camera_id, "status")
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
        self.connected = threading.Event()
        self.connects = 0
        self.published = 0  # messages acknowledged by the broker
        self.error: OutboxError | None = None  # set if the outbox failed under the drain thread
        self._acks: queue.SimpleQueue[tuple[int, str | None]] = queue.SimpleQueue()  # (mid, rejection)
        self.rejected = 0  # PUBACKs with an MQTT 5 failure reason (e.g. not authorized): kept in the outbox
        self._inflight: dict[int, int] = {}  # paho mid -> outbox row id
        self._last_sent = 0
        self._stop = threading.Event()
        self._abort_wait = threading.Event()
        self._wake = threading.Event()
        self._drainer = threading.Thread(target=self._drain_loop, name="outbox-drain", daemon=True)

    # ------------------------------------------------------------------ paho callbacks (network thread)
    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        if reason_code.is_failure:
            log.warning("broker %s refused the connection: %s", self.settings.redacted(), reason_code)
            return
        self.connects += 1
        log.info("connected to broker %s%s", self.settings.redacted(),
                 "" if self.connects == 1 else f" (reconnect #{self.connects - 1})")
        client.publish(self.status_topic, ONLINE, qos=1, retain=True)
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
            row_id = self._inflight.pop(mid, None)
            if row_id is None:
                continue
            if rejection is None:
                done.append(row_id)
            else:  # not deleted: it stays in the outbox and is retried on the next start
                self.rejected += 1
                if self.rejected == 1 or self.rejected % 100 == 0:
                    log.error("broker rejected outbox row %d (%s; %d rejected so far): kept in the outbox, "
                              "check the broker's ACL for this camera", row_id, rejection, self.rejected)
        if done:
            self.outbox.delete(done)
            self.published += len(done)

    def _send_more(self) -> None:
        room = self.window - len(self._inflight)
        if room <= 0:
            return
        for row in self.outbox.fetch(self._last_sent, room):
            info = self.client.publish(row.topic, row.payload, qos=row.qos, retain=row.retain)
            if info.rc not in (mqtt.MQTT_ERR_SUCCESS, mqtt.MQTT_ERR_NO_CONN, mqtt.MQTT_ERR_QUEUE_SIZE):
                log.warning("publish of outbox row %d failed (%s); will retry", row.id, mqtt.error_string(info.rc))
                break
            if row.qos == 0:  # no PUBACK will come: a QoS 0 row is done once handed to paho
                self.outbox.delete([row.id])
            else:
                self._inflight[info.mid] = row.id
            self._last_sent = row.id

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
        while time.monotonic() < deadline and self.error is None and not self._abort_wait.is_set():
            if self.outbox.depth() == 0:
                return 0
            self._wake.set()
            time.sleep(0.05)
        return self.outbox.depth()

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
                "inflight": len(self._inflight)}

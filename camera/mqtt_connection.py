"""One MQTT connection for the whole edge process, shared by every camera's publisher.

Why one: a broker sees one client id per process (one login, one TLS session, one keep-alive), and the process's
Last Will can speak for all of its cameras. paho runs the connection on its own network thread; everything that
touches an outbox runs on the one drain thread here, which serves each camera's
:class:`~camera.publisher.Publisher` in turn and hands it the PUBACKs of the messages it sent. Because the
same thread publishes and routes acknowledgements, the message id -> camera lookup cannot race.

Several cameras may want the same topic (the site-wide desired model, Home Assistant's birth message): paho
keeps one callback per topic filter, so :meth:`MqttConnection.route` fans a filter out to every handler.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import paho.mqtt.client as mqtt

from contract.broker import BrokerSettings, diagnose, make_client

if TYPE_CHECKING:
    from camera.publisher import Publisher

log = logging.getLogger(__name__)

Handler = Callable[[str, bytes], None]


class MqttConnection:
    """The paho client, its Last Will, connect hooks, topic routes and the drain thread of every publisher."""

    def __init__(self, settings: BrokerSettings, client_id: str, *, will: tuple[str, str | bytes],
                 birth: list[tuple[str, str | bytes]] | None = None, window: int = 200,
                 reconnect_max_s: int = 30) -> None:
        self.settings = settings
        self.client_id = client_id
        self.client = make_client(settings, client_id)
        self.window = window
        self.client.max_inflight_messages_set(window)
        self.client.max_queued_messages_set(0)
        self.client.reconnect_delay_set(min_delay=1, max_delay=reconnect_max_s)
        self.client.will_set(will[0], will[1], qos=1, retain=True)
        self.birth = list(birth or [])  # retained (topic, payload) published first on every connect
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.on_publish = self._on_publish
        self.client.on_connect_fail = self._on_connect_fail
        self.connected = threading.Event()
        self.connects = 0
        self.connect_failures = 0
        # run on every (re)connect, on paho's network thread, after each camera's ``online``
        self.connect_hooks: list[Callable[[mqtt.Client], None]] = []
        self.channels: list[Publisher] = []
        self._leaving: dict[int, threading.Event] = {}  # id(publisher) -> set once its last acks were handled
        self._lock = threading.Lock()
        self._acks: queue.SimpleQueue[tuple[int, str | None]] = queue.SimpleQueue()  # (mid, rejection)
        self._routes: dict[str, list[Handler]] = {}
        self.wake = threading.Event()
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._serve_loop, name="outbox-drain", daemon=True)

    # ------------------------------------------------------------------ set-up
    def attach(self, publisher: Publisher) -> None:
        """Serve ``publisher`` on this connection (its status goes online on every connect)."""
        with self._lock:
            self.channels.append(publisher)
            self.client.max_inflight_messages_set(self.window * max(1, len(self.channels)))

    def route(self, topic: str, handler: Handler) -> None:
        """Call ``handler(topic, payload)`` for every message on ``topic`` (a filter); any number per filter."""
        handlers = self._routes.setdefault(topic, [])
        handlers.append(handler)
        if len(handlers) == 1:
            def fan_out(_client: Any, _userdata: Any, msg: Any, handlers: list[Handler] = handlers) -> None:
                for h in list(handlers):
                    try:
                        h(msg.topic, msg.payload)
                    except Exception:  # noqa: BLE001 - one camera's handler must not starve the others
                        log.exception("handler for %s failed", msg.topic)

            self.client.message_callback_add(topic, fan_out)

    def start(self) -> None:
        """Connect in the background (never blocks, never raises for an unreachable broker); idempotent."""
        if self.thread.ident is not None:
            return
        self.client.connect_async(self.settings.host, self.settings.port, keepalive=self.settings.keepalive)
        self.client.loop_start()
        self.thread.start()

    # ------------------------------------------------------------------ paho callbacks (network thread)
    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        if reason_code.is_failure:
            log.warning("broker %s refused the connection: %s", self.settings.redacted(), reason_code)
            return
        self.connects += 1
        log.info("connected to broker %s%s", self.settings.redacted(),
                 "" if self.connects == 1 else f" (reconnect #{self.connects - 1})")
        for topic, payload in self.birth:
            client.publish(topic, payload, qos=1, retain=True)
        with self._lock:
            channels = list(self.channels)
        for ch in channels:
            client.publish(ch.status_topic, ch.status, qos=1, retain=True)
        for hook in list(self.connect_hooks):
            try:
                hook(client)
            except Exception:  # noqa: BLE001 - an add-on must never take the event stream down
                log.exception("connect hook %r failed", hook)
        self.connected.set()
        self.wake.set()

    def _on_connect_fail(self, client, userdata) -> None:
        self.connect_failures += 1
        if self.connect_failures == 1 or self.connect_failures % 10 == 0:
            log.warning("cannot reach broker %s (attempt %d: %s); events are queued in the outbox, retrying with "
                        "backoff", self.settings.redacted(), self.connect_failures, diagnose(self.settings))

    def _on_disconnect(self, client, userdata, flags, reason_code, properties) -> None:
        was = self.connected.is_set()
        self.connected.clear()
        if was and not self.stopping.is_set():
            log.warning("lost the broker %s (%s); queueing in the outbox and retrying",
                        self.settings.redacted(), reason_code)

    def _on_publish(self, client, userdata, mid, reason_code, properties) -> None:
        # Never touch SQLite or our locks here (paho may hold its own): hand the ack to the drain thread.
        rejected = reason_code is not None and getattr(reason_code, "is_failure", False)
        self._acks.put((mid, str(reason_code) if rejected else None))
        self.wake.set()

    # ------------------------------------------------------------------ the drain thread
    def _route_acks(self, channels: list[Publisher]) -> None:
        while True:
            try:
                mid, rejection = self._acks.get_nowait()
            except queue.Empty:
                return
            for ch in channels:
                if ch.owns(mid):
                    ch.acks.put((mid, rejection))
                    break  # a mid no publisher owns: status, stats, a model report: nothing to do

    def _serve_loop(self) -> None:
        while not self.stopping.is_set():
            self.wake.wait(0.2)
            self.wake.clear()
            with self._lock:
                channels = list(self.channels)
            self._route_acks(channels)
            for ch in channels:
                if id(ch) in self._leaving:
                    ch.final_acks()
                    with self._lock:
                        self.channels.remove(ch)
                    self._leaving.pop(id(ch)).set()
                else:
                    ch.serve()
        with self._lock:
            channels = list(self.channels)
        self._route_acks(channels)
        for ch in channels:
            ch.final_acks()

    def detach(self, publisher: Publisher, timeout: float = 5.0) -> None:
        """Stop serving ``publisher`` after handling the acknowledgements already received for it."""
        if not self.thread.is_alive():
            with self._lock:
                if publisher in self.channels:
                    self.channels.remove(publisher)
            return
        done = threading.Event()
        self._leaving[id(publisher)] = done
        self.wake.set()
        done.wait(timeout)

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the drain thread, disconnect cleanly (no Last Will), stop paho's loop."""
        self.stopping.set()
        self.wake.set()
        if self.thread.is_alive():
            self.thread.join(timeout)
        self.client.disconnect()
        self.client.loop_stop()

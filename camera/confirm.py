"""End-to-end confirmation (``publish.confirm: sink``): an outbox row leaves only when the sink has committed it.

A broker's PUBACK only says the broker has the message. Mosquitto saves to disk every 30 s at best, so a broker
crash (SIGKILL, power cut) loses what it had acknowledged but not yet delivered. With ``confirm: sink`` the edge
keeps every event row after the PUBACK, until the sink's acknowledgement for it arrives: after each commit the
sink publishes, per camera, the ids it has committed — stored, already stored, or kept as a dead letter — on
``smartcam/<site>/<camera>/ack`` (QoS 1, ``contract/schemas/ack.v1.schema.json``, docs/mqtt.md). A row the broker
acknowledged but the sink has not confirmed within ``timeout_s`` is sent again; the sink's idempotent insert
makes the copy harmless, and it confirms the copy too, so a lost acknowledgement costs one re-send, never an
event.

Only rows the sink stores wait: events (on ``.../events`` or inside a ``.../batch``) and summaries. Retained
snapshots (``count``, zone counts, line totals) are superseded anyway and leave on the broker's PUBACK.

>>> c = SinkConfirmations(timeout_s=30.0)
>>> c.broker_acked({7: b'{"event_id":"ab"}', 8: b'{"event_id":"cd"}'}, now=0.0)  # both wait for the sink
[]
>>> c.on_ack(b'{"schema_version":1,"ids":["ab"]}')
>>> c.take_confirmed(), c.waiting
([7], 1)
>>> c.take_expired(now=31.0), c.waiting
([8], 0)
"""

from __future__ import annotations

import json
import logging
import queue
from collections import OrderedDict

log = logging.getLogger(__name__)

EARLY_KEEP = 10_000  # acks that arrived before their row's PUBACK was processed (kept this many, oldest dropped)


def payload_id(payload: bytes) -> str | None:
    """The id the sink confirms a row by: its ``event_id`` (or a summary's ``summary_id``); None if it has none.

    >>> payload_id(b'{"event_id":"ab","type":"count"}'), payload_id(b'{"summary_id":"s1"}'), payload_id(b'x')
    ('ab', 's1', None)
    """
    try:
        doc = json.loads(payload)
    except ValueError:
        return None
    if not isinstance(doc, dict):
        return None
    value = doc.get("event_id", doc.get("summary_id"))
    return value if isinstance(value, str) else None


class SinkConfirmations:
    """Rows the broker has acknowledged, waiting for the sink. The drain thread calls everything except
    :meth:`on_ack` (paho's network thread), which only queues."""

    def __init__(self, timeout_s: float) -> None:
        self.timeout_s = timeout_s
        self._row_of: dict[str, int] = {}  # confirmation id -> outbox row id
        self._due: dict[int, tuple[float, str]] = {}  # row id -> (monotonic time to send it again, its id)
        self._incoming: queue.SimpleQueue[list[str]] = queue.SimpleQueue()
        self._early: OrderedDict[str, None] = OrderedDict()  # confirmed before we knew the row
        self.confirmed = 0  # rows the sink confirmed
        self.resent = 0  # rows sent again because no confirmation came in time
        self.acks = 0  # ack messages received

    @property
    def waiting(self) -> int:
        return len(self._due)

    def waits(self, row_id: int) -> bool:
        """Acknowledged by the broker, not yet by the sink (and not yet due again): do not send it now."""
        return row_id in self._due

    def broker_acked(self, rows: dict[int, bytes], now: float) -> list[int]:
        """The broker has these rows (id -> payload); returns the ids with nothing to wait for (no event id, or
        the sink confirmed them already): delete those now."""
        done = []
        for row_id, payload in rows.items():
            key = payload_id(payload)
            if key is None or key in self._early:  # nothing the sink confirms, or confirmed already
                self._early.pop(key, None)
                done.append(row_id)
                continue
            self._row_of[key] = row_id
            self._due[row_id] = (now + self.timeout_s, key)
        return done

    def on_ack(self, payload: bytes) -> None:
        """An ack message from the sink (network thread: parse and queue, nothing else)."""
        try:
            doc = json.loads(payload)
            ids = [i for i in doc["ids"] if isinstance(i, str)]
        except (ValueError, KeyError, TypeError):
            log.warning("ignored an ack message that is not ack.v1 JSON (%d bytes)", len(payload))
            return
        self._incoming.put(ids)

    def take_confirmed(self) -> list[int]:
        """Row ids the sink has confirmed since the last call: delete them."""
        rows = []
        while True:
            try:
                ids = self._incoming.get_nowait()
            except queue.Empty:
                break
            self.acks += 1
            for key in ids:
                row_id = self._row_of.pop(key, None)
                if row_id is None:
                    self._early[key] = None
                    if len(self._early) > EARLY_KEEP:
                        self._early.popitem(last=False)
                    continue
                self._due.pop(row_id, None)
                rows.append(row_id)
        self.confirmed += len(rows)
        return rows

    def take_expired(self, now: float) -> list[int]:
        """Row ids whose confirmation is overdue: they stop waiting and are sent again."""
        late = [row_id for row_id, (due, _) in self._due.items() if due <= now]
        for row_id in late:
            _, key = self._due.pop(row_id)
            self._row_of.pop(key, None)
        self.resent += len(late)
        return late

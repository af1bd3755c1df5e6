"""Summary mode (``publish.mode: summary``): one message per time window instead of one per event.

For links that are paid by the byte (cellular, satellite, LoRa) the per-person records are not worth their size;
the hourly answers are. The frame loop still builds every event; here they are *staged* durably in the outbox's
SQLite file (so ``kill -9`` loses nothing), grouped by the ``interval_s`` window their timestamp falls in. When
event time passes a window's end, its events become one ``summary.v1`` message (``contract.rollup``), queued in
the same transaction that forgets the staged events. A window with no events sends nothing. No retained
snapshots (``count``, ``zones/<z>/count``, ``lines/<l>/totals``) either: they are events, which a sink would
count on top of the summary that already holds them (and they were a quarter of the bytes).

An exit is stamped when the person was last seen, up to the tracker's ``max_age_s`` before the frame that ends
the track, so a window closes only once frames are ``lateness_s`` past its end. An event later than that (a track
held through a motion-gated stretch) is summarised as a second message for the same window: summaries add up,
so nothing is counted twice or lost.
"""

from __future__ import annotations

import json
import logging
import threading
from typing import Any

from camera.outbox import Outbox
from contract.ids import new_event_id
from contract.rollup import SUMMARY_LEAF, summary_document, window_start
from contract.timestamps import ts_ms
from contract.topics import topic_for

log = logging.getLogger(__name__)


class Summarizer:
    """Stages events per window and turns each closed window into its summary (thread-safe)."""

    def __init__(self, outbox: Outbox, *, interval_s: int, lateness_s: float = 0.0) -> None:
        self.outbox = outbox
        self.lateness_s = lateness_s  # how far behind the newest frame an event's ts may be (an exit: last seen)
        self.interval_s = interval_s
        self._lock = threading.Lock()
        self._open: set[int] = set(outbox.staged_windows())  # windows with staged events (a crash leaves some)
        if self._open:
            log.info("outbox holds staged events of %d window(s) from a previous run: they are summarised when "
                     "their window closes", len(self._open))

    def add(self, events: list[dict[str, Any]], payloads: list[str]) -> None:
        """Stage one frame's events (already serialised) under their windows."""
        per_window: dict[int, list[str]] = {}
        for ev, payload in zip(events, payloads, strict=True):
            per_window.setdefault(window_start(ts_ms(ev["ts"]) / 1000, self.interval_s), []).append(payload)
        with self._lock:
            for window, rows in per_window.items():
                self.outbox.stage(window, rows)
                self._open.add(window)

    def close_due(self, now_s: float) -> int:
        """Summarise every window that ended at least ``lateness_s`` before ``now_s`` (the newest frame's time);
        returns the messages queued."""
        with self._lock:
            return sum(self._close(w) for w in sorted(self._open) if w + self.interval_s + self.lateness_s <= now_s)

    def close_all(self) -> int:
        """End of stream: summarise every staged window, complete or not."""
        with self._lock:
            return sum(self._close(w) for w in sorted(self._open))

    def _close(self, window: int) -> int:
        events = [json.loads(p) for p in self.outbox.staged(window)]
        self._open.discard(window)
        # Regrouped rather than trusted: a previous run may have staged with another interval or camera name.
        groups: dict[tuple[str, str, int], list[dict[str, Any]]] = {}
        for ev in events:
            start = window_start(ts_ms(ev["ts"]) / 1000, self.interval_s)
            groups.setdefault((ev["site"], ev["camera_id"], start), []).append(ev)
        messages: list[tuple[str, str | bytes, int, bool]] = []
        for (site, camera_id, start), group in sorted(groups.items()):
            doc = summary_document(group, summary_id=new_event_id(), start_s=start, interval_s=self.interval_s)
            assert doc is not None
            messages.append((topic_for(site, camera_id, SUMMARY_LEAF), json.dumps(doc, separators=(",", ":")), 1,
                             False))
        self.outbox.promote(window, messages)
        log.debug("summarised %d event(s) staged under the window at %d into %d summary message(s)", len(events),
                  window, len(groups))
        return len(messages)

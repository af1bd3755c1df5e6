"""Can the system clock be trusted? A Raspberry Pi has no real-time clock: until NTP syncs it believes it is 1970
(or the last shutdown, with fake-hwclock), and NTP may later *step* the clock by hours.

Policy (docs/reliability.md, "Time faults"):

* a wall clock before :data:`PLAUSIBLE_AFTER` (older than this release) is **not set**: events are still detected
  and kept durably in the outbox, stamped with ``time_uncertain: true``, but nothing is sent while the clock is
  unset (the sink would file them as 1970 and its time window would dead-letter them);
* when the clock becomes plausible, the jump is measured against the monotonic clock (which never steps), and
  every queued event stamped before it is shifted by that jump — its time is then right to within the drift of
  the monotonic clock, still flagged ``time_uncertain`` — and sending resumes;
* a step while the clock is plausible (NTP correcting an hour, a DST mistake) is logged and followed: the
  clock is right as far as anyone can tell, and the sink's window (1 h ahead, 400 days back by default, with
  recoverable dead letters beyond it) absorbs it.

>>> t = iter([0.0, 100.0, 1.0, 101.0, 1_800_000_000.0, 102.0])
>>> c = SystemClock(wall=lambda: next(t), mono=lambda: next(t))
>>> c.plausible
False
>>> c.check()  # still 1970, running at the monotonic rate
ClockCheck(plausible=False, step_s=0.0, fixed_by_s=None)
>>> c.check().fixed_by_s  # NTP: the clock jumped to 2027; times stamped before move by this much
1799999998.0
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from contract.timestamps import format_ts

log = logging.getLogger(__name__)

PLAUSIBLE_AFTER = 1_767_225_600.0  # 2026-01-01T00:00:00Z: no event this release sees can be older
STEP_S = 2.0  # a wall-vs-monotonic jump bigger than this is a step, not jitter


@dataclass(frozen=True)
class ClockCheck:
    plausible: bool
    step_s: float  # how far the wall clock jumped since the last check (0.0: it did not)
    fixed_by_s: float | None  # the clock just became plausible: shift every time stamped before by this


class SystemClock:
    """Watches ``wall`` (time.time) against ``mono`` (time.monotonic); call :meth:`check` often (every frame)."""

    def __init__(self, *, floor: float = PLAUSIBLE_AFTER, wall: Callable[[], float] = time.time,
                 mono: Callable[[], float] = time.monotonic) -> None:
        self.floor, self._wall, self._mono = floor, wall, mono
        now = self._wall()
        self._offset = now - self._mono()
        self.plausible = now >= floor
        self.steps = 0  # steps seen while plausible
        self.fixed_by_s = 0.0  # the total correction applied when the clock was set (0 if it always was)

    def check(self) -> ClockCheck:
        now = self._wall()
        offset = now - self._mono()
        step = offset - self._offset
        self._offset = offset
        if abs(step) <= STEP_S:
            return ClockCheck(self.plausible, 0.0, None)
        if not self.plausible and now >= self.floor:
            self.plausible = True
            self.fixed_by_s += step
            log.warning("system clock set: now %s (jumped %+.0f s); the events stamped before are shifted by that "
                        "much, flagged time_uncertain, and sent now", format_ts(now), step)
            return ClockCheck(True, step, step)
        if self.plausible and now < self.floor:
            self.plausible = False
            log.warning("system clock went back to %s (before %s): not set; holding events until it is",
                        format_ts(now), format_ts(self.floor))
            return ClockCheck(False, step, None)
        if self.plausible:
            self.steps += 1
            log.warning("system clock stepped by %+.0f s (now %s); following it", step, format_ts(now))
        return ClockCheck(self.plausible, step, None)


def shift_event_times(payload: bytes, by_s: float, floor: float = PLAUSIBLE_AFTER) -> bytes | None:
    """An outbox row's event with its times moved by ``by_s``, if it was stamped before the clock was set
    (``time_uncertain`` and a ``ts`` before ``floor``); None for anything else (left as it is).

    >>> row = b'{"ts":"1970-01-01T00:00:10.000Z","first_seen":"1970-01-01T00:00:05.000Z","time_uncertain":true}'
    >>> shift_event_times(row, 1_800_000_000.0)
    b'{"ts":"2027-01-15T08:00:10.000Z","first_seen":"2027-01-15T08:00:05.000Z","time_uncertain":true}'
    >>> shift_event_times(b'{"ts":"2026-12-01T00:00:00.000Z"}', 5.0) is None
    True
    """
    import json

    from contract.timestamps import parse_ts

    try:
        doc = json.loads(payload)
        if not (isinstance(doc, dict) and doc.get("time_uncertain") is True and parse_ts(doc["ts"]) < floor):
            return None
        for key in ("ts", "first_seen"):
            if key in doc:
                doc[key] = format_ts(parse_ts(doc[key]) + by_s)
    except (ValueError, KeyError, TypeError):
        return None
    return json.dumps(doc, separators=(",", ":")).encode()

"""`EventBuilder`: tracker updates → contract events (person enter/exit, counts, zones, lines, loitering).

Pure logic, no I/O: the frame loop passes each :class:`~camera.tracker.TrackUpdate` in and gets plain dicts out,
each valid against ``contract/schemas/event.v1.schema.json``.

Rules that make the counts trustworthy:
- a track is a *person* only once it is confirmed and the median of its recent scores reaches
  ``track_threshold`` (Frigate's approach); a track that never gets there produces no event at all;
- zone membership has inertia (``min_inside_s`` / ``min_outside_s``); line crossings need the anchor to travel
  ``min_travel`` beyond the line on both sides (hysteresis), so standing on a line or jitter counts nothing;
- an id switch in the middle of a crossing is counted once: a new person appearing where a lost/ended one was
  last seen, shortly after, inherits the old track's line state (``handover_s``);
- a person who walked hidden behind another and comes out from behind them on a line (their own track starts
  inside the hysteresis band) starts from the side the other person was on then, so both crossings count.

>>> from camera.tracker import TrackUpdate
>>> b = EventBuilder(site="shop", camera_id="cam1", model_name="yolov8n", model_sha256="ab" * 32)
>>> b.update(TrackUpdate([], [], []), 0.0, 640, 480), b.counts["people"]
([], 0)
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from camera.detections import ANCHORS, box_anchors
from camera.tracker import Track, TrackUpdate
from camera.zones import LineSpec, ZoneSpec, box_anchor, line_side, points_in_polygon, segments_intersect
from contract.ids import new_event_id
from contract.schema import SCHEMA_VERSION
from contract.timestamps import format_ts
from contract.topics import is_valid_name

HANDOVER_DISTANCE = 1.0  # a successor must start within this many box heights of where the lost track was, or of
# where it would be by now at its last velocity (a walker lost at the line at 5 fps is found a stride further on)
ORPHAN_GRACE_S = 5.0  # how long after handover_s a successor may still get confirmed and claim an orphan


@dataclass(eq=False)
class _ZoneState:
    inside: bool = False
    entered_at: float = 0.0  # when the anchor first got inside (start of the run that confirmed entry)
    pending_since: float | None = None  # when the raw inside/outside state started to differ from ``inside``
    loitered: bool = False


@dataclass(eq=False)
class _LineState:
    side: int = 0  # +1 / -1: the side the anchor last settled on (beyond the hysteresis band); 0 = not yet
    pos: np.ndarray | None = None  # the last settled anchor position on that side
    changed_at: float | None = None  # when ``side`` last changed (a crossing), and what it was before then:
    prev: tuple[int, np.ndarray | None] = (0, None)  # a person who emerged from this one earlier starts there

    def before(self, ts: float) -> tuple[int, np.ndarray | None]:
        """(side, settled position) as they were in the frames before time ``ts``."""
        if self.changed_at is not None and self.changed_at >= ts:
            return self.prev
        return self.side, self.pos


@dataclass(eq=False)
class _Person:
    track: Track
    zones: dict[str, _ZoneState] = field(default_factory=dict)
    lines: dict[str, _LineState] = field(default_factory=dict)


@dataclass(eq=False)
class _Orphan:
    """Line state of a person that was lost or ended, waiting for a successor (id switch)."""

    lines: dict[str, _LineState]
    anchor: np.ndarray  # bottom-centre at last sighting
    height: float
    last_seen: float
    velocity: np.ndarray  # (2,) px/s of the box centre at last sighting (the tracker's motion estimate)


class EventBuilder:
    """Turns the tracker's view of the scene into events. One instance per camera stream."""

    def __init__(
        self,
        *,
        site: str,
        camera_id: str,
        model_name: str,
        model_sha256: str,
        zones: Iterable[ZoneSpec] = (),
        lines: Iterable[LineSpec] = (),
        track_threshold: float = 0.0,
        handover_s: float = 1.0,
    ) -> None:
        for label, value in (("site", site), ("camera_id", camera_id)):
            if not is_valid_name(value):
                raise ValueError(f"{label} {value!r} must be 1-64 chars of A-Z a-z 0-9 _ . -")
        sha = model_sha256.lower()[:12]
        if len(sha) != 12 or any(c not in "0123456789abcdef" for c in sha):
            raise ValueError(f"model_sha256 must be hex (at least 12 digits), got {model_sha256!r}")
        self.zones = list(zones)
        self.lines = list(lines)
        names = [z.name for z in self.zones]
        if len(set(names)) != len(names):
            raise ValueError(f"zone names must be unique: {names}")
        line_names = [ln.name for ln in self.lines]
        if len(set(line_names)) != len(line_names):
            raise ValueError(f"line names must be unique: {line_names}")
        self.track_threshold = float(track_threshold)
        self.handover_s = float(handover_s)
        self._base = {
            "schema_version": SCHEMA_VERSION,
            "site": site,
            "camera_id": camera_id,
            "model": {"name": model_name, "sha256": sha},
        }
        # camera/clock.py: added to every time (a file's frames were stamped from a clock that was not set yet),
        # and whether the times come from a clock that was not set (events carry time_uncertain: true)
        self.clock_offset_s = 0.0
        self.time_uncertain = False
        self._people: dict[int, _Person] = {}  # track_id -> person state (tracks that passed the threshold)
        self._orphans: list[_Orphan] = []
        self._count = 0
        self._zone_counts = {z.name: 0 for z in self.zones}
        self._totals = {ln.name: {"in": 0, "out": 0} for ln in self.lines}
        self._geometry_size: tuple[int, int] | None = None
        self._zone_px: dict[str, np.ndarray] = {}
        self._line_px: dict[str, np.ndarray] = {}

    def set_model(self, model_name: str, model_sha256: str) -> None:
        """Events from now on carry this model (an over-the-air swap between two frames; tracks carry on)."""
        sha = model_sha256.lower()[:12]
        if len(sha) != 12 or any(c not in "0123456789abcdef" for c in sha):
            raise ValueError(f"model_sha256 must be hex (at least 12 digits), got {model_sha256!r}")
        self._base = {**self._base, "model": {"name": model_name, "sha256": sha}}

    @property
    def counts(self) -> dict[str, Any]:
        """``{"people": n, "zones": {zone: n}, "lines": {line: {"in": a, "out": b}}}``, as of the last update."""
        return {
            "people": self._count,
            "zones": dict(self._zone_counts),
            "lines": {k: dict(v) for k, v in self._totals.items()},
        }

    def people(self, tracks: Iterable[Track]) -> list[Track]:
        """Those of ``tracks`` counted as people (confirmed and past the track threshold): what events are about."""
        return [t for t in tracks if t.track_id in self._people]

    def update(self, update: TrackUpdate, ts: float, frame_w: int, frame_h: int) -> list[dict]:
        """Events caused by one tracker step at capture time ``ts`` on a ``frame_w`` x ``frame_h`` frame."""
        self._prepare_geometry(frame_w, frame_h)
        frame = {"width": int(frame_w), "height": int(frame_h)}
        events: list[dict] = []
        for t in update.ended:
            events += self._end(t, frame)
        # A successor is matched on its *first* sighting (<= handover_s after the loss) but only seen here once
        # confirmed, later: keep orphans a little longer than handover_s.
        self._orphans = [o for o in self._orphans if ts - o.last_seen <= self.handover_s + ORPHAN_GRACE_S]
        for t in update.active:
            if t.track_id not in self._people and t.median_score >= self.track_threshold:
                events += self._begin(t, ts, frame)
        visible: list[_Person] = []
        for t in update.active:
            person = self._people.get(t.track_id)
            if person is None:
                continue
            person.track = t
            if not t.visible:
                self._offer_as_orphan(person)
                continue
            self._orphans = [o for o in self._orphans if o.lines is not person.lines]  # it is back
            visible.append(person)
        if visible:
            # Geometry for everyone at once (one numpy call per zone and line), then each person's state machine.
            boxes = np.stack([p.track.xyxy for p in visible]).astype(np.float64)
            anchors = {rule: box_anchors(boxes, rule) for rule in ANCHORS}
            inside = {z.name: points_in_polygon(anchors[z.anchor], self._zone_px[z.name]) for z in self.zones}
            dist = {ln.name: line_side(self._line_px[ln.name], anchors[ln.anchor]) for ln in self.lines}
            for k, person in enumerate(visible):
                events += self._zones_step(person, ts, frame, {n: bool(v[k]) for n, v in inside.items()})
                events += self._lines_step(person, ts, frame, {n: float(v[k]) for n, v in dist.items()},
                                           {rule: a[k] for rule, a in anchors.items()})
        events += self._count_events(update, ts, frame)
        return events

    # -- people ---------------------------------------------------------------------------------------------

    def _begin(self, t: Track, ts: float, frame: dict) -> list[dict]:
        person = _Person(track=t)
        self._people[t.track_id] = person
        self._seed_lines(person)
        self._seed_from_occluder(person)
        self._adopt_orphan(person)
        return [
            self._event(
                "person.enter", ts, frame, track_id=t.track_id, box=self._box(t.xyxy, frame),
                score=_unit(t.median_score), first_seen=format_ts(t.first_seen + self.clock_offset_s),
            )
        ]

    def _end(self, t: Track, frame: dict) -> list[dict]:
        person = self._people.pop(t.track_id, None)
        if person is None:
            return []  # never passed the threshold: no event at all
        events = []
        for zone in self.zones:
            state = person.zones.get(zone.name)
            if state and state.inside:
                events.append(self._event(
                    "zone.exit", t.last_seen, frame, zone=zone.name, track_id=t.track_id,
                    dwell_s=_seconds(t.last_seen - state.entered_at),
                ))
        self._offer_as_orphan(person)
        best = t.best_xyxy if t.best_xyxy is not None else t.xyxy
        events.append(self._event(
            "person.exit", t.last_seen, frame, track_id=t.track_id, box=self._box(best, frame),
            first_seen=format_ts(t.first_seen + self.clock_offset_s), dwell_s=_seconds(t.last_seen - t.first_seen),
            score_max=_unit(t.score_max), score_mean=_unit(t.score_mean),
        ))
        return events

    def _count_events(self, update: TrackUpdate, ts: float, frame: dict) -> list[dict]:
        events = []
        present = [self._people[t.track_id] for t in update.active if t.track_id in self._people]
        count = len(present)
        if count != self._count:
            events.append(self._event("count", ts, frame, count=count, previous=self._count))
            self._count = count
        for zone in self.zones:
            n = sum(1 for p in present if p.zones.get(zone.name, _ZoneState()).inside)
            if n != self._zone_counts[zone.name]:
                events.append(self._event("count", ts, frame, zone=zone.name, count=n,
                                          previous=self._zone_counts[zone.name]))
                self._zone_counts[zone.name] = n
        return events

    # -- zones ----------------------------------------------------------------------------------------------

    def _zones_step(self, person: _Person, ts: float, frame: dict, inside: dict[str, bool]) -> list[dict]:
        """Advance one person's zone states; ``inside`` says where the anchor is now (zone name -> bool)."""
        events = []
        t = person.track
        for zone in self.zones:
            state = person.zones.setdefault(zone.name, _ZoneState())
            raw = inside[zone.name]
            if raw == state.inside:
                state.pending_since = None
            else:
                if state.pending_since is None:
                    state.pending_since = ts
                needed = zone.min_inside_s if raw else zone.min_outside_s
                if ts - state.pending_since >= needed:
                    if raw:
                        state.inside, state.entered_at, state.loitered = True, state.pending_since, False
                        events.append(self._event("zone.enter", ts, frame, zone=zone.name, track_id=t.track_id,
                                                  box=self._box(t.xyxy, frame)))
                    else:
                        state.inside = False
                        events.append(self._event(
                            "zone.exit", ts, frame, zone=zone.name, track_id=t.track_id,
                            box=self._box(t.xyxy, frame), dwell_s=_seconds(state.pending_since - state.entered_at),
                        ))
                    state.pending_since = None
            loiter_s = zone.loiter_s
            if state.inside and loiter_s is not None and not state.loitered and ts - state.entered_at >= loiter_s:
                state.loitered = True
                events.append(self._event("loiter", ts, frame, zone=zone.name, track_id=t.track_id,
                                          box=self._box(t.xyxy, frame), dwell_s=_seconds(ts - state.entered_at)))
        return events

    # -- lines ----------------------------------------------------------------------------------------------

    def _lines_step(
        self, person: _Person, ts: float, frame: dict, dist: dict[str, float], anchors: dict[str, np.ndarray]
    ) -> list[dict]:
        """Advance one person's line states; ``dist`` is the signed distance of the anchor from each line."""
        events = []
        t = person.track
        for line in self.lines:
            state = person.lines.setdefault(line.name, _LineState())
            anchor = anchors[line.anchor]
            seg = self._line_px[line.name]
            d = dist[line.name]
            band = line.travel_px(*self._geometry_size, box_height=float(t.xyxy[3] - t.xyxy[1]))
            if abs(d) < band or d == 0:
                continue  # inside the hysteresis band: nothing settles here
            side = 1 if d > 0 else -1
            crossed = (
                state.side != 0 and side != state.side and state.pos is not None
                and segments_intersect(state.pos, anchor, seg[0], seg[1])
            )
            if crossed:
                direction = "in" if side == line.in_sign else "out"
                totals = self._totals[line.name]
                totals[direction] += 1
                events.append(self._event(
                    "line.cross", ts, frame, line=line.name, track_id=t.track_id, direction=direction,
                    totals=dict(totals), box=self._box(t.xyxy, frame),
                ))
            if state.side != 0 and side != state.side:
                state.changed_at, state.prev = ts, (state.side, state.pos)
            state.side, state.pos = side, anchor
        return events

    def _seed_lines(self, person: _Person) -> None:
        """Start each line state from where the track was first seen, so a crossing made while the track was
        still being confirmed (min_hits, threshold) is counted at confirmation."""
        first = person.track.first_xyxy
        if first is None:
            return
        for line in self.lines:
            anchor = box_anchor(first, line.anchor)
            d = float(line_side(self._line_px[line.name], anchor[None])[0])
            band = line.travel_px(*self._geometry_size, box_height=float(first[3] - first[1]))
            if abs(d) >= band and d != 0:
                person.lines[line.name] = _LineState(1 if d > 0 else -1, anchor)

    def _seed_from_occluder(self, person: _Person) -> None:
        """A track that started inside a line's band, out of the box of a person seen in the same frame (it walked
        hidden behind them, or inside one box the detector drew around both), starts from the side of the line that
        person was on while hiding it (the frames before its first sighting): they came the same way. A copy:
        both can cross."""
        t = person.track
        occluder = self._people.get(t.emerged_from) if t.emerged_from else None
        if occluder is None or occluder is person or t.first_xyxy is None or self._at_border(t.first_xyxy):
            return  # nobody in front of it, or it came in over the edge of the picture: no known side
        for line in self.lines:
            state = occluder.lines.get(line.name)
            if line.name in person.lines or state is None:
                continue  # settled from its own first sighting, or no side known
            side, pos = state.before(t.first_seen)
            if side != 0 and pos is not None:
                person.lines[line.name] = _LineState(side, pos.copy())

    def _offer_as_orphan(self, person: _Person) -> None:
        """Make a lost/ended person's line state available to a successor track (id switch)."""
        if not self.lines or not any(s.side for s in person.lines.values()):
            return
        t = person.track
        if any(o.lines is person.lines for o in self._orphans) or self._at_border(t.xyxy):
            return  # lost at the edge of the picture: the person left, this is no id switch
        self._orphans.append(_Orphan(person.lines, box_anchor(t.xyxy), float(t.xyxy[3] - t.xyxy[1]), t.last_seen,
                                     t.velocity))

    def _adopt_orphan(self, person: _Person) -> None:
        """A new person continues the line state of one lost/ended just before, close to where it starts."""
        t = person.track
        first = t.first_xyxy if t.first_xyxy is not None else t.xyxy
        if self._at_border(first):
            return  # came in over the edge of the picture: a newcomer, not a lost track found again
        start = box_anchor(first)
        height = float(first[3] - first[1])
        best, best_dist = None, np.inf
        for o in self._orphans:
            if o.last_seen > t.first_seen or t.first_seen - o.last_seen > self.handover_s:
                continue  # both visible at once: two people, not one id switch
            moved = o.anchor + o.velocity * (t.first_seen - o.last_seen)  # where it would be by now
            dist = min(float(np.hypot(*(start - o.anchor))), float(np.hypot(*(start - moved))))
            if dist <= HANDOVER_DISTANCE * max(height, o.height) and dist < best_dist:
                best, best_dist = o, dist
        if best is None:
            return
        self._orphans = [o for o in self._orphans if o is not best]
        person.lines = {k: _LineState(v.side, v.pos) for k, v in best.lines.items()}
        for v in best.lines.values():  # the predecessor, if it comes back, starts afresh: no double count
            v.side, v.pos = 0, None

    # -- helpers --------------------------------------------------------------------------------------------

    def _prepare_geometry(self, frame_w: int, frame_h: int) -> None:
        if self._geometry_size == (frame_w, frame_h):
            return
        self._geometry_size = (frame_w, frame_h)
        self._zone_px = {z.name: z.pixel_points(frame_w, frame_h) for z in self.zones}
        self._line_px = {ln.name: ln.pixel_points(frame_w, frame_h) for ln in self.lines}

    def _event(self, type_: str, ts: float, frame: dict, **fields: Any) -> dict:
        return {
            **self._base,
            "model": dict(self._base["model"]),
            "event_id": new_event_id(),
            "type": type_,
            "ts": format_ts(ts + self.clock_offset_s),
            "frame": dict(frame),
            **fields,
            **({"time_uncertain": True} if self.time_uncertain else {}),
        }

    def _at_border(self, xyxy: np.ndarray) -> bool:
        """Whether a box touches the frame edge (within 1 % of its size): people enter and leave there."""
        if self._geometry_size is None:
            return False
        w, h = self._geometry_size
        mx, my = max(2.0, 0.01 * w), max(2.0, 0.01 * h)
        x1, y1, x2, y2 = (float(v) for v in xyxy)
        return x1 <= mx or y1 <= my or x2 >= w - mx or y2 >= h - my

    @staticmethod
    def _box(xyxy: np.ndarray, frame: dict) -> list[float]:
        w, h = frame["width"], frame["height"]
        scale = np.array([w, h, w, h], dtype=np.float64)
        return [round(float(v), 5) for v in np.clip(np.asarray(xyxy, dtype=np.float64) / scale, 0.0, 1.0)]


def _unit(value: float) -> float:
    return round(min(max(float(value), 0.0), 1.0), 4)


def _seconds(value: float) -> float:
    return round(max(float(value), 0.0), 3)

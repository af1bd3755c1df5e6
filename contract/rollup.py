"""The aggregate form of the contract: rollup increments of a list of events, and the ``summary`` message.

One piece of maths, used on both sides so the two can never disagree:
- the sink turns newly stored events into rollup increments (:func:`deltas`) in the insert's transaction;
- an edge in summary mode (``publish.mode: summary``) turns one time window's events into the same increments and
  sends them as one ``summary.v1`` message (:func:`summary_document`); the sink turns that back into increments
  (:func:`summary_deltas`) and applies them exactly as if it had received the events. Every hourly and daily
  figure (entries, exits, distinct tracks, occupancy max/mean, dwell mean/median/p90, loiters, line crossings) is
  therefore the same in both modes; only per-person records and sub-window occupancy are not sent.

Standard library only (the edge imports it). Windows are aligned to multiples of ``interval_s`` since the epoch
and ``interval_s`` divides an hour, so a window never straddles two hours.

>>> dwell_bin(3.2), dwell_bin(10.0), round(bin_edges(dwell_bin(100.0))[0], 2)
(6, 20, 99.06)
>>> track_ranges([7, 3, 4, 5, 9, 8]), expand_ranges([[3, 5], [7, 9]], limit=10)
([[3, 5], [7, 9]], [3, 4, 5, 7, 8, 9])
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from contract.schema import SCHEMA_VERSION
from contract.timestamps import format_ts, ts_ms

HOUR = 3600
_FINE_BINS = 20  # 0.5 s wide below 10 s
_RATIO = 1.05
SUMMARY_LEAF = "summary"
#: Window lengths an edge may use: divisors of an hour, so every window lies inside one UTC hour.
WINDOW_CHOICES = tuple(s for s in range(10, HOUR + 1) if HOUR % s == 0)


def dwell_bin(seconds: float) -> int:
    """Histogram bin of a dwell time."""
    if seconds < 10.0:
        return max(0, int(seconds * 2))
    return _FINE_BINS + int(math.log(seconds / 10.0) / math.log(_RATIO))


def bin_edges(index: int) -> tuple[float, float]:
    """[lo, hi) seconds of a dwell bin."""
    if index < _FINE_BINS:
        return index / 2.0, (index + 1) / 2.0
    k = index - _FINE_BINS
    return 10.0 * _RATIO**k, 10.0 * _RATIO ** (k + 1)


def _zero() -> dict[str, Any]:
    return {"entries": 0, "exits": 0, "unique_tracks": 0, "occupancy_max": 0, "occupancy_sum": 0,
            "occupancy_samples": 0, "dwell_sum": 0.0, "dwell_count": 0, "loiters": 0}


@dataclass
class Deltas:
    """Increments for the rollup tables. Keys: (site, camera_id, zone, hour[, track_id | bin]) / line key.

    ``hourly[...]["unique_tracks"]`` stays 0 here: the store counts a track only the first time it sees it in an
    hour (``tracks``), which is what keeps it exact under redelivery.
    """

    hourly: dict[tuple[str, str, str, int], dict[str, Any]] = field(default_factory=lambda: defaultdict(_zero))
    tracks: set[tuple[str, str, str, int, int]] = field(default_factory=set)
    dwell_bins: dict[tuple[str, str, str, int, int], int] = field(default_factory=lambda: defaultdict(int))
    lines: dict[tuple[str, str, str, int], list[int]] = field(default_factory=lambda: defaultdict(lambda: [0, 0]))


def deltas(new_events: Iterable[dict[str, Any]]) -> Deltas:
    """Rollup increments for events that were just stored for the first time (never for duplicates)."""
    out = Deltas()
    for ev in new_events:
        site, cam, kind = ev["site"], ev["camera_id"], ev["type"]
        hour = ts_ms(ev["ts"]) // 1000 // HOUR * HOUR
        zone = ev.get("zone") or ""
        key = (site, cam, zone, hour)
        row = out.hourly[key]
        if kind in ("person.enter", "zone.enter"):
            row["entries"] += 1
        elif kind in ("person.exit", "zone.exit"):
            row["exits"] += 1
            dwell = float(ev["dwell_s"])
            row["dwell_sum"] += dwell
            row["dwell_count"] += 1
            out.dwell_bins[(*key, dwell_bin(dwell))] += 1
        elif kind == "count":
            row["occupancy_max"] = max(row["occupancy_max"], int(ev["count"]))
            row["occupancy_sum"] += int(ev["count"])
            row["occupancy_samples"] += 1
        elif kind == "loiter":
            row["loiters"] += 1
        elif kind == "line.cross":
            out.lines[(site, cam, ev["line"], hour)][0 if ev["direction"] == "in" else 1] += 1
        if ev.get("track_id") is not None:
            out.tracks.add((site, cam, zone, hour, int(ev["track_id"])))
    return out


def merge_deltas(into: Deltas, other: Deltas) -> Deltas:
    """Add ``other`` to ``into`` (in place) the way the rollup tables add up: sums, max for occupancy_max."""
    for key, row in other.hourly.items():
        target = into.hourly[key]
        for name, value in row.items():
            target[name] = max(target[name], value) if name == "occupancy_max" else target[name] + value
    into.tracks |= other.tracks
    for key, n in other.dwell_bins.items():
        into.dwell_bins[key] += n
    for key, (n_in, n_out) in other.lines.items():
        into.lines[key][0] += n_in
        into.lines[key][1] += n_out
    return into


# ---------------------------------------------------------------------------------------------- track id ranges
def track_ranges(ids: Iterable[int]) -> list[list[int]]:
    """Distinct ids as sorted inclusive ``[first, last]`` runs: a window's tracks are mostly consecutive ids."""
    out: list[list[int]] = []
    for i in sorted(set(ids)):
        if out and i == out[-1][1] + 1:
            out[-1][1] = i
        else:
            out.append([i, i])
    return out


def expand_ranges(ranges: list[list[int]], *, limit: int) -> list[int]:
    """Inverse of :func:`track_ranges`; ``ValueError`` if the runs are not sorted and disjoint or exceed ``limit``."""
    out: list[int] = []
    previous = -2
    for first, last in ranges:
        if first > last or (out and first <= previous):
            raise ValueError(f"track ranges must be sorted, disjoint and first <= last: {[first, last]}")
        if len(out) + last - first + 1 > limit:
            raise ValueError(f"summary names more than {limit} tracks")
        out.extend(range(first, last + 1))
        previous = last
    return out


# ---------------------------------------------------------------------------------------------- summary message
def window_start(epoch_s: float, interval_s: int) -> int:
    """Start (epoch s) of the ``interval_s`` window that holds ``epoch_s``."""
    return int(epoch_s // interval_s * interval_s)


def summary_document(events: list[dict[str, Any]], *, summary_id: str, start_s: int, interval_s: int
                     ) -> dict[str, Any] | None:
    """The ``summary.v1`` message for the events of one camera in ``[start_s, start_s + interval_s)``.

    None when there are no events. ``events`` must be of one site and camera (the first event's model and frame
    size are reported). An event outside the window is a programming error (``ValueError``).
    """
    if not events:
        return None
    if interval_s not in WINDOW_CHOICES or start_s % interval_s:
        raise ValueError(f"window must start on a multiple of an interval that divides an hour: {start_s}+{interval_s}")
    end_s = start_s + interval_s
    first = events[0]
    for ev in events:
        if (ev["site"], ev["camera_id"]) != (first["site"], first["camera_id"]):
            raise ValueError("a summary covers one camera")
        if not start_s * 1000 <= ts_ms(ev["ts"]) < end_s * 1000:
            raise ValueError(f"event at {ev['ts']} is outside the window {format_ts(start_s)}..{format_ts(end_s)}")
    delta = deltas(events)
    zone_tracks: dict[str, list[int]] = defaultdict(list)
    for _site, _cam, zone, _hour, track in delta.tracks:
        zone_tracks[zone].append(track)
    zone_bins: dict[str, dict[str, int]] = defaultdict(dict)
    for (_site, _cam, zone, _hour, index), n in sorted(delta.dwell_bins.items()):
        zone_bins[zone][str(index)] = n
    areas = []
    for (_site, _cam, zone, _hour), row in sorted(delta.hourly.items()):  # every event makes its zone's row
        area: dict[str, Any] = {} if zone == "" else {"zone": zone}
        area.update({
            "entries": row["entries"], "exits": row["exits"], "loiters": row["loiters"],
            "tracks": track_ranges(zone_tracks.get(zone, ())),
            "occupancy": {"max": row["occupancy_max"], "sum": row["occupancy_sum"],
                          "samples": row["occupancy_samples"]},
            "dwell": {"sum": round(row["dwell_sum"], 3), "count": row["dwell_count"], "bins": zone_bins.get(zone, {})},
        })
        areas.append(area)
    doc: dict[str, Any] = {
        "schema_version": SCHEMA_VERSION, "summary_id": summary_id, "site": first["site"],
        "camera_id": first["camera_id"], "model": first["model"], "frame": first["frame"],
        "start": format_ts(start_s), "end": format_ts(end_s), "events": len(events), "areas": areas,
        "lines": [{"line": line, "in": io[0], "out": io[1]} for (_s, _c, line, _h), io in sorted(delta.lines.items())],
    }
    return doc


def summary_deltas(doc: dict[str, Any], *, max_tracks: int = 100_000) -> Deltas:
    """The rollup increments a (schema-valid) summary stands for: the same as :func:`deltas` of its events.

    ``ValueError`` with the reason for what the schema cannot say: a window that is empty, longer than an hour or
    across an hour boundary, unordered track ranges, dwell bins that do not add up to the dwell count.
    """
    start, end = ts_ms(doc["start"]), ts_ms(doc["end"])
    if not start < end <= start + HOUR * 1000:
        raise ValueError(f"summary window {doc['start']}..{doc['end']} is empty or longer than an hour")
    hour = start // 1000 // HOUR * HOUR
    if (end - 1) // 1000 // HOUR * HOUR != hour:
        raise ValueError(f"summary window {doc['start']}..{doc['end']} crosses an hour boundary")
    site, cam = doc["site"], doc["camera_id"]
    out = Deltas()
    tracks_named = 0
    seen_zones: set[str] = set()
    for area in doc["areas"]:
        zone = area.get("zone") or ""
        if zone in seen_zones:
            raise ValueError(f"summary lists zone {zone or '(whole camera)'!r} twice")
        seen_zones.add(zone)
        ids = expand_ranges(area["tracks"], limit=max_tracks - tracks_named)
        tracks_named += len(ids)
        out.tracks.update((site, cam, zone, hour, i) for i in ids)
        dwell = area["dwell"]
        bins = {int(k): int(v) for k, v in dwell["bins"].items() if v}
        if sum(bins.values()) != dwell["count"]:
            raise ValueError(f"dwell bins of zone {zone or '(whole camera)'!r} do not add up to its dwell count")
        occ = area["occupancy"]
        if occ["samples"] == 0 and (occ["max"] or occ["sum"]) or occ["max"] * occ["samples"] < occ["sum"]:
            raise ValueError(f"occupancy of zone {zone or '(whole camera)'!r} is inconsistent (max/sum/samples)")
        out.hourly[(site, cam, zone, hour)].update(
            entries=area["entries"], exits=area["exits"], loiters=area["loiters"], occupancy_max=occ["max"],
            occupancy_sum=occ["sum"], occupancy_samples=occ["samples"], dwell_sum=float(dwell["sum"]),
            dwell_count=dwell["count"])
        for index, n in bins.items():
            out.dwell_bins[(site, cam, zone, hour, index)] += n
    for line in doc["lines"]:
        key = (site, cam, line["line"], hour)
        if key in out.lines:
            raise ValueError(f"summary lists line {line['line']!r} twice")
        out.lines[key] = [line["in"], line["out"]]
    return out

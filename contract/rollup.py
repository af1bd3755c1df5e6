"""The aggregate form of the contract: rollup increments of a list of events, and the ``summary`` message.

One piece of maths, so the two sides can never disagree:
- the sink turns newly stored events into rollup increments (:func:`deltas`) in the insert's transaction;
- an edge in summary mode (``publish.mode: summary``) turns one time window's events into the same increments and
  sends them as one ``summary.v1`` message (:func:`summary_document`). The sink reads a summary back into
  increments (``cloud_sink.rollups.summary_deltas``, sink-only) and applies them exactly as if it had received the
  events, so every hourly and daily figure is the same in both modes; only per-person records and sub-window
  occupancy are not sent.

Standard library only (the edge imports it). Windows are aligned to multiples of ``interval_s`` since the epoch
and ``interval_s`` divides an hour, so a window never straddles two hours. The dwell histogram's bins are defined
here (:func:`dwell_bin`, ``DWELL_FINE_BINS``/``DWELL_RATIO``); the sink derives their edges from the same constants.

>>> dwell_bin(3.2), dwell_bin(10.0), dwell_bin(100.0)
(6, 20, 67)
>>> track_ranges([7, 3, 4, 5, 9, 8])
[[3, 5], [7, 9]]
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
DWELL_FINE_BINS = 20  #: dwell bins 0.5 s wide below 10 s ...
DWELL_RATIO = 1.05  #: ... then each bin 5 % wider than the one before
SUMMARY_LEAF = "summary"
#: Window lengths an edge may use: divisors of an hour, so every window lies inside one UTC hour.
WINDOW_CHOICES = tuple(s for s in range(10, HOUR + 1) if HOUR % s == 0)


def dwell_bin(seconds: float) -> int:
    """Histogram bin of a dwell time."""
    if seconds < 10.0:
        return max(0, int(seconds * 2))
    return DWELL_FINE_BINS + int(math.log(seconds / 10.0) / math.log(DWELL_RATIO))


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

"""``smartcam-sink report``: the analytics as plain aligned text tables, or as JSON.

Reads only the rollup tables (through :mod:`cloud_sink.rollups`), so a report over months of events is instant.

>>> parse_since("24h", now=100000.0)
13600.0
>>> print(table(["a", "n"], [["x", 1], ["yy", 22]]))
a    n
--  --
x    1
yy  22
"""

from __future__ import annotations

import json
import re
import time
from typing import Any

from cloud_sink import rollups
from cloud_sink.store import Store, to_ms

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_since(text: str, *, now: float | None = None) -> float:
    """'24h', '30m', '7d', '2w', '90s' ago, or an RFC 3339 / ISO date-time → epoch seconds."""
    now = time.time() if now is None else now
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*", text)
    if match:
        return now - float(match.group(1)) * _UNITS[match.group(2)]
    try:
        ms = to_ms(text)
    except ValueError:
        raise ValueError(f"{text!r}: expected a duration like 24h / 7d / 30m or a timestamp like "
                         "2026-05-28T00:00:00Z") from None
    assert ms is not None
    return ms / 1000.0


def build(store: Store, *, since: float, until: float | None = None, site: str | None = None,
          camera_id: str | None = None) -> dict[str, Any]:
    """The overview plus hourly rows per camera: everything printed, as one JSON-able dict."""
    until = time.time() if until is None else until
    data = rollups.overview(store, since=since, until=until, site=site, camera_id=camera_id)
    per_camera: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for row in rollups.hourly(store, since=since, until=until, site=site, camera_id=camera_id):  # one query
        per_camera.setdefault((row["site"], row["camera_id"]), []).append(row)
    for cam in data["cameras"]:
        cam["hourly"] = per_camera.get((cam["site"], cam["camera_id"]), [])
    return data


def _span(seconds: int) -> str:
    return f"{seconds / 86400:g} days" if seconds >= 86400 else f"{seconds} s"


def sink_lines(state: dict[str, int]) -> list[str]:
    """What the sink itself reports (``Store.sink_state``): its time window and what it did not store."""
    out = []
    if "window_max_past_s" in state:
        out.append(f"the sink accepts event times from {_span(state['window_max_past_s'])} before to "
                   f"{_span(state.get('window_max_future_s', 0))} after its clock (older/newer: dead letters)")
    if state.get("dead_letters_rate_limited"):
        out.append(f"{state['dead_letters_rate_limited']} dead letters not stored (rate limit per camera)")
    if state.get("dead_letters_pruned"):
        out.append(f"{state['dead_letters_pruned']} dead letters pruned (size/age cap)")
    return out


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.2f}" if abs(value) < 100 else f"{value:.0f}"
    return str(value)


def table(headers: list[str], rows: list[list[Any]]) -> str:
    """Columns padded to width; numbers right-aligned, text left-aligned."""
    cells = [[_fmt(v) for v in row] for row in rows]
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(headers)]
    numeric = [all(isinstance(row[i], (int, float)) or row[i] is None for row in rows) and rows != []
               for i in range(len(headers))]

    def line(values: list[str]) -> str:
        return "  ".join(v.rjust(w) if num else v.ljust(w)
                         for v, w, num in zip(values, widths, numeric, strict=True)).rstrip()

    return "\n".join([line(headers), line(["-" * w for w in widths])] + [line(r) for r in cells])


def render(data: dict[str, Any]) -> str:
    """The human-readable report."""
    summaries = data.get("summaries_total") or 0
    out = [f"smartcam report  {data['since']} .. {data['until']}   events stored: {data['events_total']}   "
           + (f"summaries stored: {summaries}   " if summaries else "")
           + f"dead letters: {data['dead_letters']}"]
    out += sink_lines(data.get("sink") or {}) + [""]
    cams = data["cameras"]
    if not cams:
        out.append("no cameras in this database yet")
        return "\n".join(out)
    out.append(table(
        ["camera", "state", "last seen", "fps", "inf ms", "events", "entries", "exits", "tracks", "occ max",
         "occ mean", "dwell mean s", "median s", "p90 s", "peak hour (entries)"],
        [[f"{c['site']}/{c['camera_id']}", c["state"], c["last_seen"], c["fps"], c["inference_ms_p50"],
          c["events_total"], c["entries"], c["exits"], c["unique_tracks"], c["occupancy_max"], c["occupancy_mean"],
          c["dwell"]["mean"], c["dwell"]["median"], c["dwell"]["p90"],
          f"{c['peak_hour']['hour'][:13]}h ({c['peak_hour']['entries']})" if c["peak_hour"] else None]
         for c in cams]))
    for c in cams:
        out += ["", f"== {c['site']}/{c['camera_id']}"]
        if c.get("hourly"):
            out += ["", "per hour (UTC):", table(
                ["hour", "entries", "exits", "tracks", "occ max", "occ mean", "dwell mean s"],
                [[r["hour"][:13] + "h", r["entries"], r["exits"], r["unique_tracks"], r["occupancy_max"],
                  r["occupancy_mean"], r["dwell_mean"]] for r in c["hourly"]])]
        if c["daily"]:
            out += ["", "per day (UTC):", table(
                ["day", "entries", "exits", "tracks", "occ max", "occ mean", "dwell mean s"],
                [[r["day"], r["entries"], r["exits"], r["unique_tracks"], r["occupancy_max"], r["occupancy_mean"],
                  r["dwell_mean"]] for r in c["daily"]])]
        if c["zones"]:
            out += ["", "zones:", table(
                ["zone", "entries", "exits", "tracks", "occ max", "occ mean", "dwell mean s", "median s", "p90 s",
                 "loiters"],
                [[z["zone"], z["entries"], z["exits"], z["unique_tracks"], z["occupancy_max"], z["occupancy_mean"],
                  z["dwell"]["mean"], z["dwell"]["median"], z["dwell"]["p90"], z["loiters"]] for z in c["zones"]])]
        if c["lines"]:
            out += ["", "lines:", table(["line", "in", "out"], [[ln["line"], ln["in"], ln["out"]] for ln in c["lines"]])]
    return "\n".join(out)


def to_json(data: dict[str, Any]) -> str:
    return json.dumps(data, indent=2, sort_keys=True)

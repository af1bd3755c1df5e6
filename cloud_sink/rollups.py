"""Analytics: hourly rollups maintained on ingest, and the queries the report, API and dashboard ask.

The maths lives in ``contract.rollup`` (shared with the edge): ``deltas`` gives the rollup increments for a list
of *newly stored* events (the store applies them in the same transaction as the insert; a stored ``summary`` message from an edge in summary mode
brings the same increments for its window, ``contract.rollup.summary_deltas``, so every figure below is the same
whichever way a camera publishes). The query functions read only the small rollup tables (except
:func:`occupancy`, which buckets raw ``count`` events at any resolution, and the summaries' windows at theirs),
so they stay fast however many events are stored.

What the figures mean (per site, camera, hour; ``zone=''`` = the whole camera):
- entries / exits: ``person.enter`` / ``person.exit`` events (per zone: ``zone.enter`` / ``zone.exit``).
- unique_tracks: distinct track ids with an event in that hour (exact; tracks seen in several hours count in each).
- occupancy_max / occupancy_mean: max and mean of the people counts reported by ``count`` events (a zone's
  ``count`` events carry its name). The mean is over reports, not time-weighted. For a camera in summary mode
  :func:`occupancy` has one point per summary window (no finer), at the bucket of the window start.
- dwell: ``dwell_s`` of ``person.exit`` (per zone: ``zone.exit``): exact mean, median/p90 from a fixed histogram
  (0.5 s bins below 10 s, then 5 % geometric bins), so they are within one bin of the exact value.
- lines: ``line.cross`` events counted per direction.

Arguments: ``since``/``until`` are epoch seconds, aware ``datetime`` or RFC 3339 strings; hourly figures cover
the hours that start in ``[floor_hour(since), until)``. ``zone=None`` selects whole-camera figures, ``zone="*"``
every zone, ``zone="name"`` one zone.

>>> histogram_quantile({0: 1, 20: 1}, 0.5)
0.5
"""

from __future__ import annotations

import json
import time
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa

from contract.rollup import HOUR, bin_edges
from contract.timestamps import format_ts

if TYPE_CHECKING:
    from cloud_sink.store import Store

DAY = 86400


# ---------------------------------------------------------------------------------------------- pure maths
def histogram_quantile(bins: dict[int, int], q: float) -> float | None:
    """The q-quantile of a binned distribution, interpolating linearly inside the bin."""
    total = sum(bins.values())
    if total == 0:
        return None
    target = q * total
    seen = 0
    for index in sorted(bins):
        n = bins[index]
        if seen + n >= target and n > 0:
            lo, hi = bin_edges(index)
            return lo + (hi - lo) * max(0.0, target - seen) / n
        seen += n
    return bin_edges(max(bins))[1]


# ---------------------------------------------------------------------------------------------- queries
def _tables():
    from cloud_sink import store as tables

    return tables


def _epoch_s(value: Any) -> int | None:
    from cloud_sink.store import to_ms

    ms = to_ms(value)
    return None if ms is None else ms // 1000


def _hour_range(query, column, since: Any, until: Any):
    start = _epoch_s(since)
    if start is not None:
        query = query.where(column >= start // HOUR * HOUR)
    end = _epoch_s(until)
    if end is not None:
        query = query.where(column < end)
    return query


def _filter(query, table, site: str | None, camera_id: str | None, zone: str | None):
    if site is not None:
        query = query.where(table.c.site == site)
    if camera_id is not None:
        query = query.where(table.c.camera_id == camera_id)
    if zone is None:
        query = query.where(table.c.zone == "")
    elif zone == "*":
        query = query.where(table.c.zone != "")
    else:
        query = query.where(table.c.zone == zone)
    return query


def _mean(total: float, n: int) -> float | None:
    return total / n if n else None


def hourly(store: Store, *, since: Any, until: Any = None, site: str | None = None, camera_id: str | None = None,
           zone: str | None = None) -> list[dict[str, Any]]:
    """One row per (site, camera, zone, hour), oldest first."""
    t = _tables().rollup_hourly
    query = _filter(_hour_range(sa.select(t), t.c.hour, since, until), t, site, camera_id, zone)
    query = query.order_by(t.c.hour, t.c.site, t.c.camera_id, t.c.zone)
    with store.engine.connect() as conn:
        rows = conn.execute(query).mappings().all()
    return [{
        "site": r["site"], "camera_id": r["camera_id"], "zone": r["zone"] or None,
        "hour": format_ts(r["hour"]), "hour_ts": r["hour"], "entries": r["entries"], "exits": r["exits"],
        "unique_tracks": r["unique_tracks"], "occupancy_max": r["occupancy_max"] if r["occupancy_samples"] else None,
        "occupancy_mean": _mean(r["occupancy_sum"], r["occupancy_samples"]),
        "dwell_mean": _mean(r["dwell_sum"], r["dwell_count"]), "dwell_count": r["dwell_count"],
        "loiters": r["loiters"],
    } for r in rows]


def daily(store: Store, *, since: Any, until: Any = None, site: str | None = None, camera_id: str | None = None,
          zone: str | None = None) -> list[dict[str, Any]]:
    """Hourly rollups (of the hours in range) summed per UTC day; unique_tracks is distinct over the whole day."""
    tables = _tables()
    t, tr = tables.rollup_hourly, tables.rollup_daily
    day = (t.c.hour // DAY) * DAY
    query = sa.select(
        t.c.site, t.c.camera_id, t.c.zone, day.label("day"), sa.func.sum(t.c.entries).label("entries"),
        sa.func.sum(t.c.exits).label("exits"), sa.func.max(t.c.occupancy_max).label("occupancy_max"),
        sa.func.sum(t.c.occupancy_sum).label("occupancy_sum"),
        sa.func.sum(t.c.occupancy_samples).label("occupancy_samples"), sa.func.sum(t.c.dwell_sum).label("dwell_sum"),
        sa.func.sum(t.c.dwell_count).label("dwell_count"), sa.func.sum(t.c.loiters).label("loiters"),
    ).group_by(t.c.site, t.c.camera_id, t.c.zone, day)
    query = _filter(_hour_range(query, t.c.hour, since, until), t, site, camera_id, zone)
    daily_q = _filter(sa.select(tr), tr, site, camera_id, zone)
    start, end = _epoch_s(since), _epoch_s(until)
    if start is not None:
        daily_q = daily_q.where(tr.c.day >= start // DAY * DAY)
    if end is not None:
        daily_q = daily_q.where(tr.c.day < end)
    with store.engine.connect() as conn:
        rows = conn.execute(query).mappings().all()
        uniques = {(r.site, r.camera_id, r.zone, r.day): r.unique_tracks for r in conn.execute(daily_q)}
    out = [{
        "site": r["site"], "camera_id": r["camera_id"], "zone": r["zone"] or None, "day": format_ts(r["day"])[:10],
        "day_ts": int(r["day"]), "entries": int(r["entries"]), "exits": int(r["exits"]),
        "unique_tracks": uniques.get((r["site"], r["camera_id"], r["zone"], r["day"]), 0),
        "occupancy_max": int(r["occupancy_max"]) if r["occupancy_samples"] else None,
        "occupancy_mean": _mean(float(r["occupancy_sum"]), int(r["occupancy_samples"])),
        "dwell_mean": _mean(float(r["dwell_sum"]), int(r["dwell_count"])), "loiters": int(r["loiters"]),
    } for r in rows]
    return sorted(out, key=lambda r: (r["day_ts"], r["site"], r["camera_id"], r["zone"] or ""))


def _zone_matches(name: str | None, zone: str | None) -> bool:
    """The ``zone`` filter on one area's name: None = the whole camera, "*" = every zone, else that zone."""
    if zone is None:
        return name is None
    return name is not None if zone == "*" else name == zone


def occupancy(store: Store, *, since: Any, until: Any = None, site: str | None = None,
              camera_id: str | None = None, zone: str | None = None, bucket_s: int = 60) -> list[dict[str, Any]]:
    """People in view per ``bucket_s`` interval (max and mean of ``count`` reports).

    From raw ``count`` events, and from summaries whose window starts in range (one point per area at the
    bucket of the window start: the window's max, its mean and number of reports); both merged per bucket (max
    of max, report-weighted mean, summed reports).
    """
    from cloud_sink.store import to_ms

    if bucket_s < 1:
        raise ValueError("bucket_s must be >= 1")
    tables = _tables()
    e, sm = tables.events, tables.summaries
    bucket_ms = int(bucket_s) * 1000
    bucket = (e.c.ts // bucket_ms) * bucket_ms
    query = sa.select(e.c.site, e.c.camera_id, e.c.zone, bucket.label("t"), sa.func.max(e.c.count).label("max"),
                      sa.func.sum(e.c.count).label("sum"), sa.func.count().label("samples")).where(
        e.c.type == "count").group_by(e.c.site, e.c.camera_id, e.c.zone, bucket)
    windows = sa.select(sm.c.start, sm.c.payload)
    if since is not None:
        query = query.where(e.c.ts >= to_ms(since))
        windows = windows.where(sm.c.start >= to_ms(since))
    if until is not None:
        query = query.where(e.c.ts < to_ms(until))
        windows = windows.where(sm.c.start < to_ms(until))
    for column, value in (("site", site), ("camera_id", camera_id)):
        if value is not None:
            query = query.where(e.c[column] == value)
            windows = windows.where(sm.c[column] == value)
    if zone is None:
        query = query.where(e.c.zone.is_(None))
    elif zone == "*":
        query = query.where(e.c.zone.is_not(None))
    else:
        query = query.where(e.c.zone == zone)
    with store.engine.connect() as conn:
        rows = conn.execute(query).mappings().all()
        summary_rows = conn.execute(windows).all()
    # (site, camera, zone, bucket ms) -> [max, sum, samples]
    points: dict[tuple[str, str, str | None, int], list[int]] = {
        (r["site"], r["camera_id"], r["zone"], int(r["t"])): [int(r["max"]), int(r["sum"]), int(r["samples"])]
        for r in rows}
    for start, payload in summary_rows:
        doc = json.loads(payload)
        for area in doc["areas"]:
            name, occ = area.get("zone"), area["occupancy"]
            if occ["samples"] <= 0 or not _zone_matches(name, zone):
                continue
            point = points.setdefault((doc["site"], doc["camera_id"], name, start // bucket_ms * bucket_ms),
                                      [0, 0, 0])
            point[0] = max(point[0], int(occ["max"]))
            point[1] += int(occ["sum"])
            point[2] += int(occ["samples"])
    out = [{"site": s, "camera_id": c, "zone": z, "t": format_ts(t / 1000), "t_ts": t // 1000, "max": mx,
            "mean": total / n, "samples": n} for (s, c, z, t), (mx, total, n) in points.items()]
    return sorted(out, key=lambda r: (r["t_ts"], r["site"], r["camera_id"], r["zone"] or ""))


def dwell(store: Store, *, since: Any, until: Any = None, site: str | None = None, camera_id: str | None = None,
          zone: str | None = None) -> dict[str, Any]:
    """Dwell distribution over the range: n, mean (exact), median and p90 (histogram), histogram bins."""
    tables = _tables()
    t, d = tables.rollup_hourly, tables.rollup_dwell
    sums = _filter(_hour_range(sa.select(sa.func.sum(t.c.dwell_sum), sa.func.sum(t.c.dwell_count)), t.c.hour,
                               since, until), t, site, camera_id, zone)
    bins_q = _filter(_hour_range(sa.select(d.c.bin, sa.func.sum(d.c.n)).group_by(d.c.bin), d.c.hour, since, until),
                     d, site, camera_id, zone)
    with store.engine.connect() as conn:
        total, n = conn.execute(sums).one()
        bins = {int(b): int(c) for b, c in conn.execute(bins_q)}
    n = int(n or 0)
    return {
        "n": n, "mean": _mean(float(total or 0.0), n), "median": histogram_quantile(bins, 0.5),
        "p90": histogram_quantile(bins, 0.9),
        "histogram": [{"lo": round(bin_edges(b)[0], 3), "hi": round(bin_edges(b)[1], 3), "n": bins[b]}
                      for b in sorted(bins)],
    }


def peak_hour(store: Store, *, since: Any, until: Any = None, site: str | None = None,
              camera_id: str | None = None, zone: str | None = None) -> dict[str, Any] | None:
    """The hour with the most entries (summed over the matching cameras); earliest on ties; None if no entries."""
    t = _tables().rollup_hourly
    total = sa.func.sum(t.c.entries).label("entries")
    query = _filter(_hour_range(sa.select(t.c.hour, total).group_by(t.c.hour), t.c.hour, since, until), t, site,
                    camera_id, zone)
    query = query.order_by(total.desc(), t.c.hour).limit(1)
    with store.engine.connect() as conn:
        row = conn.execute(query).first()
    if row is None or not row.entries:
        return None
    return {"hour": format_ts(row.hour), "hour_ts": int(row.hour), "entries": int(row.entries)}


def lines(store: Store, *, since: Any, until: Any = None, site: str | None = None, camera_id: str | None = None,
          line: str | None = None) -> list[dict[str, Any]]:
    """In/out crossings per line over the range."""
    t = _tables().rollup_lines
    query = sa.select(t.c.site, t.c.camera_id, t.c.line, sa.func.sum(t.c.in_count).label("in_"),
                      sa.func.sum(t.c.out_count).label("out")).group_by(t.c.site, t.c.camera_id, t.c.line)
    query = _hour_range(query, t.c.hour, since, until)
    for column, value in ((t.c.site, site), (t.c.camera_id, camera_id), (t.c.line, line)):
        if value is not None:
            query = query.where(column == value)
    with store.engine.connect() as conn:
        rows = conn.execute(query.order_by(t.c.site, t.c.camera_id, t.c.line)).all()
    return [{"site": r.site, "camera_id": r.camera_id, "line": r.line, "in": int(r.in_), "out": int(r.out)}
            for r in rows]


def _totals(rows: list[dict[str, Any]]) -> dict[str, Any]:
    samples = [r for r in rows if r["occupancy_mean"] is not None]
    return {
        "entries": sum(r["entries"] for r in rows), "exits": sum(r["exits"] for r in rows),
        "unique_tracks": sum(r["unique_tracks"] for r in rows),
        "occupancy_max": max((r["occupancy_max"] for r in samples), default=None),
        "loiters": sum(r["loiters"] for r in rows),
    }


def _occupancy_mean(store: Store, since: Any, until: Any, site: str, camera_id: str, zone: str | None) -> float | None:
    t = _tables().rollup_hourly
    query = _filter(_hour_range(sa.select(sa.func.sum(t.c.occupancy_sum), sa.func.sum(t.c.occupancy_samples)),
                                t.c.hour, since, until), t, site, camera_id, zone)
    with store.engine.connect() as conn:
        total, n = conn.execute(query).one()
    return _mean(float(total or 0), int(n or 0))


def summary(store: Store, *, since: Any, until: Any = None, site: str | None = None,
            camera_id: str | None = None) -> dict[str, Any]:
    """Everything the report prints: per camera totals, health, dwell, peak hour, days, zones and lines."""
    until_value = until if until is not None else time.time()
    cams = [c for c in store.cameras() if (site is None or c["site"] == site)
            and (camera_id is None or c["camera_id"] == camera_id)]
    out_cams = []
    for cam in cams:
        s, c = cam["site"], cam["camera_id"]
        rows = hourly(store, since=since, until=until_value, site=s, camera_id=c)
        zone_rows = hourly(store, since=since, until=until_value, site=s, camera_id=c, zone="*")
        zones = []
        for name in sorted({r["zone"] for r in zone_rows}):
            these = [r for r in zone_rows if r["zone"] == name]
            zones.append({"zone": name, **_totals(these),
                          "occupancy_mean": _occupancy_mean(store, since, until_value, s, c, name),
                          "dwell": dwell(store, since=since, until=until_value, site=s, camera_id=c, zone=name)})
        out_cams.append({
            **cam, **_totals(rows),
            "occupancy_mean": _occupancy_mean(store, since, until_value, s, c, None),
            "dwell": dwell(store, since=since, until=until_value, site=s, camera_id=c),
            "peak_hour": peak_hour(store, since=since, until=until_value, site=s, camera_id=c),
            "daily": daily(store, since=since, until=until_value, site=s, camera_id=c),
            "zones": zones,
            "lines": lines(store, since=since, until=until_value, site=s, camera_id=c),
        })
    since_s, until_s = _epoch_s(since), _epoch_s(until_value)
    return {
        "since": format_ts(since_s) if since_s is not None else None,
        "until": format_ts(until_s) if until_s is not None else None,
        "cameras": out_cams, "events_total": store.event_count(), "summaries_total": store.summary_count(),
        "dead_letters": store.dead_letter_count(),
    }

"""The rollups: their tables, their one writer, and the analytics queries the report, API and dashboard ask.

The sink's only module that knows the rollup tables. Every figure comes from increments of type
``contract.rollup.Deltas``: ``contract.rollup.deltas`` of the events stored for the first time, and
:func:`summary_deltas` of a summary (an edge in summary mode) stored for the first time; :func:`merge_deltas` adds
them up and :func:`apply_deltas`, called by ``Store.write`` inside the insert's transaction, adds them to the
tables. Duplicates never reach it, so nothing counts twice. The queries read only these small tables (except
:func:`occupancy`, which buckets raw ``count`` events at any resolution, and the summaries' windows at theirs), so
they stay fast however many events are stored.

What the figures mean (per site, camera, hour; ``zone=''`` = the whole camera):
- entries / exits: ``person.enter`` / ``person.exit`` events (per zone: ``zone.enter`` / ``zone.exit``).
- unique_tracks: distinct track ids with an event in the range asked for (a person seen in several hours of the
  range counts once); ``hourly`` rows count per hour, ``daily`` rows per day (the hours of that day in range).
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
>>> round(bin_edges(67)[0], 2), expand_ranges([[3, 5], [7, 9]], limit=10)
(99.06, [3, 4, 5, 7, 8, 9])
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from contract.rollup import DWELL_FINE_BINS, DWELL_RATIO, HOUR, Deltas, dwell_bin
from contract.timestamps import format_ts, ts_ms

if TYPE_CHECKING:
    from cloud_sink.store import Store

DAY = 86400
NAME = sa.String(64)

#: The rollup tables (created by the store's migrations 1 and 2). Hour/day columns: epoch s of the UTC start.
metadata = sa.MetaData()


def _camera_key() -> list[sa.Column]:
    """(site, camera_id) primary-key columns; a fresh pair per table."""
    return [sa.Column("site", NAME, primary_key=True), sa.Column("camera_id", NAME, primary_key=True)]


rollup_hourly = sa.Table(
    "rollup_hourly", metadata,
    *_camera_key(),
    sa.Column("zone", NAME, primary_key=True),  # '' = the whole camera
    sa.Column("hour", sa.BigInteger, primary_key=True),
    sa.Column("entries", sa.BigInteger, nullable=False, server_default="0"),
    sa.Column("exits", sa.BigInteger, nullable=False, server_default="0"),
    sa.Column("unique_tracks", sa.BigInteger, nullable=False, server_default="0"),
    sa.Column("occupancy_max", sa.BigInteger, nullable=False, server_default="0"),
    sa.Column("occupancy_sum", sa.BigInteger, nullable=False, server_default="0"),
    sa.Column("occupancy_samples", sa.BigInteger, nullable=False, server_default="0"),
    sa.Column("dwell_sum", sa.Float, nullable=False, server_default="0"),
    sa.Column("dwell_count", sa.BigInteger, nullable=False, server_default="0"),
    sa.Column("loiters", sa.BigInteger, nullable=False, server_default="0"),
    sa.Index("ix_rollup_hourly_hour", "hour"),
)

rollup_tracks = sa.Table(  # distinct track ids per hour: unique_tracks stays exact under redelivery
    "rollup_tracks", metadata,
    *_camera_key(),
    sa.Column("zone", NAME, primary_key=True),
    sa.Column("hour", sa.BigInteger, primary_key=True),
    sa.Column("track_id", sa.BigInteger, primary_key=True),
    sa.Index("ix_rollup_tracks_hour", "hour"),  # migration 10: the hours at the ends of a range, all cameras
)

rollup_dwell = sa.Table(  # dwell histogram per hour in fixed bins (contract.rollup.dwell_bin), for median/p90
    "rollup_dwell", metadata,
    *_camera_key(),
    sa.Column("zone", NAME, primary_key=True),
    sa.Column("hour", sa.BigInteger, primary_key=True),
    sa.Column("bin", sa.Integer, primary_key=True),
    sa.Column("n", sa.BigInteger, nullable=False),
)

rollup_lines = sa.Table(
    "rollup_lines", metadata,
    *_camera_key(),
    sa.Column("line", NAME, primary_key=True),
    sa.Column("hour", sa.BigInteger, primary_key=True),
    sa.Column("in_count", sa.BigInteger, nullable=False, server_default="0"),
    sa.Column("out_count", sa.BigInteger, nullable=False, server_default="0"),
)

rollup_day_tracks = sa.Table(  # distinct track ids per UTC day (migration 2): whole days without COUNT DISTINCT
    "rollup_day_tracks", metadata,
    *_camera_key(),
    sa.Column("zone", NAME, primary_key=True),
    sa.Column("day", sa.BigInteger, primary_key=True),
    sa.Column("track_id", sa.BigInteger, primary_key=True),
)

rollup_daily = sa.Table(
    "rollup_daily", metadata,
    *_camera_key(),
    sa.Column("zone", NAME, primary_key=True),
    sa.Column("day", sa.BigInteger, primary_key=True),
    sa.Column("unique_tracks", sa.BigInteger, nullable=False, server_default="0"),
)

MAX_DWELL_S = 31_536_000  # the event schema's longest dwell_s (a year)
MAX_DWELL_BIN = dwell_bin(MAX_DWELL_S)

HOURLY_TABLES = [rollup_hourly, rollup_tracks, rollup_dwell, rollup_lines]  # migration 1
DAILY_TABLES = [rollup_day_tracks, rollup_daily]  # migration 2


# ---------------------------------------------------------------------------------------------- maths
def bin_edges(index: int) -> tuple[float, float]:
    """[lo, hi) seconds of a dwell bin (the inverse of ``contract.rollup.dwell_bin``)."""
    if index < DWELL_FINE_BINS:
        return index / 2.0, (index + 1) / 2.0
    k = index - DWELL_FINE_BINS
    return 10.0 * DWELL_RATIO**k, 10.0 * DWELL_RATIO ** (k + 1)


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



def expand_ranges(ranges: list[list[int]], *, limit: int) -> list[int]:
    """Inverse of ``contract.rollup.track_ranges``; ``ValueError`` if the runs are not sorted and disjoint or exceed ``limit``."""
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



def summary_deltas(doc: dict[str, Any], *, max_tracks: int = 100_000) -> Deltas:
    """The rollup increments a (schema-valid) summary stands for: the same as ``contract.rollup.deltas`` of
    its events.

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
        if bins and max(bins) > MAX_DWELL_BIN:
            raise ValueError(f"dwell bin {max(bins)} of zone {zone or '(whole camera)'!r} is beyond the longest "
                             f"dwell ({MAX_DWELL_S} s, bin {MAX_DWELL_BIN})")
        low = sum(bin_edges(i)[0] * n for i, n in bins.items())
        high = sum(bin_edges(i)[1] * n for i, n in bins.items())
        if not low - 0.001 * (1 + dwell["count"]) <= float(dwell["sum"]) <= high + 0.001 * (1 + dwell["count"]):
            raise ValueError(f"dwell sum {dwell['sum']} of zone {zone or '(whole camera)'!r} is outside its bins' "
                             f"range {low:.3f}..{high:.3f} s")
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


# ---------------------------------------------------------------------------------------------- the writer
Bulk = Callable[[Connection, sa.Table, list[dict[str, Any]], Callable[[Any], Any]], Any]


def apply_deltas(conn: Connection, delta: Deltas, bulk: Bulk) -> None:
    """Add rollup increments (of new events and new summaries) to the rollup tables, in ``conn``'s transaction.

    ``bulk`` is ``Store.bulk_insert`` (one dialect-aware INSERT ... ON CONFLICT per table). Distinct tracks are
    counted from the rows the track tables did not hold yet, so a track named by an event and by a summary of the
    same hour counts once.
    """
    if delta.tracks:
        keys = sorted(delta.tracks)
        cols = rollup_tracks.c
        returned = bulk(
            conn, rollup_tracks,
            [dict(zip(("site", "camera_id", "zone", "hour", "track_id"), k, strict=True)) for k in keys],
            lambda ins: ins.on_conflict_do_nothing().returning(cols.site, cols.camera_id, cols.zone, cols.hour))
        for site, camera_id, zone, hour in returned:
            delta.hourly[(site, camera_id, zone, hour)]["unique_tracks"] += 1
        day_keys = sorted({(s, c, z, h // DAY * DAY, tr) for s, c, z, h, tr in keys})
        dcols = rollup_day_tracks.c
        returned = bulk(
            conn, rollup_day_tracks,
            [dict(zip(("site", "camera_id", "zone", "day", "track_id"), k, strict=True)) for k in day_keys],
            lambda ins: ins.on_conflict_do_nothing().returning(dcols.site, dcols.camera_id, dcols.zone, dcols.day))
        new_per_day: dict[tuple[str, str, str, int], int] = {}
        for key in returned:
            new_per_day[tuple(key)] = new_per_day.get(tuple(key), 0) + 1
        if new_per_day:
            bulk(conn, rollup_daily,
                 [dict(zip(("site", "camera_id", "zone", "day"), k, strict=True), unique_tracks=n)
                  for k, n in sorted(new_per_day.items())],
                 lambda ins: ins.on_conflict_do_update(
                     index_elements=["site", "camera_id", "zone", "day"],
                     set_={"unique_tracks": rollup_daily.c.unique_tracks + ins.excluded.unique_tracks}))
    if delta.hourly:
        def hourly_upsert(ins: Any) -> Any:
            t, x = rollup_hourly.c, ins.excluded
            summed = ("entries", "exits", "unique_tracks", "occupancy_sum", "occupancy_samples", "dwell_sum",
                      "dwell_count", "loiters")
            set_: dict[str, Any] = {name: t[name] + x[name] for name in summed}
            set_["occupancy_max"] = sa.case((x.occupancy_max > t.occupancy_max, x.occupancy_max),
                                            else_=t.occupancy_max)
            return ins.on_conflict_do_update(index_elements=["site", "camera_id", "zone", "hour"], set_=set_)

        bulk(conn, rollup_hourly, [dict(zip(("site", "camera_id", "zone", "hour"), k, strict=True), **v)
                                   for k, v in sorted(delta.hourly.items())], hourly_upsert)
    if delta.dwell_bins:
        bulk(conn, rollup_dwell,
             [dict(zip(("site", "camera_id", "zone", "hour", "bin"), k, strict=True), n=n)
              for k, n in sorted(delta.dwell_bins.items())],
             lambda ins: ins.on_conflict_do_update(
                 index_elements=["site", "camera_id", "zone", "hour", "bin"],
                 set_={"n": rollup_dwell.c.n + ins.excluded.n}))
    if delta.lines:
        lc = rollup_lines.c
        bulk(conn, rollup_lines,
             [dict(zip(("site", "camera_id", "line", "hour"), k, strict=True), in_count=v[0], out_count=v[1])
              for k, v in sorted(delta.lines.items())],
             lambda ins: ins.on_conflict_do_update(
                 index_elements=["site", "camera_id", "line", "hour"],
                 set_={"in_count": lc.in_count + ins.excluded.in_count,
                       "out_count": lc.out_count + ins.excluded.out_count}))


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
def _store_tables():
    """The store's own tables (events, summaries), imported late: the store imports this module."""
    from cloud_sink import store

    return store


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
    if zone == ANY_ZONE:
        return query
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
    t = rollup_hourly
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


ANY_ZONE = "**"  # internal: no zone filter (the whole camera and every zone, told apart by ``zone``)


def _hour_bounds(since: Any, until: Any) -> tuple[int | None, int | None]:
    """The hours in range as ``[first, end)`` hour starts: ``first = floor_hour(since)``, ``end`` the first hour
    start at or after ``until`` (an hour is in range when it starts before ``until``). None = unbounded."""
    start, stop = _epoch_s(since), _epoch_s(until)
    first = None if start is None else start // HOUR * HOUR
    end = None if stop is None else -(-stop // HOUR) * HOUR
    return first, end


def _full_days(first: int | None, end: int | None) -> tuple[int | None, int | None] | None:
    """``[d0, d1)``: the UTC days all of whose hours are in ``[first, end)`` (None bounds: open); None if none."""
    d0 = None if first is None else -(-first // DAY) * DAY
    d1 = None if end is None else end // DAY * DAY
    if d0 is not None and d1 is not None and d0 >= d1:
        return None
    return d0, d1


def _between(column: Any, lo: int | None, hi: int | None) -> Any:
    cond = sa.true()
    if lo is not None:
        cond = sa.and_(cond, column >= lo)
    if hi is not None:
        cond = sa.and_(cond, column < hi)
    return cond


def _distinct_tracks(since: Any, until: Any, site: str | None, camera_id: str | None, zone: str | None, *,
                     per_day: bool) -> Any:
    """One grouped query: distinct track ids over the hours in range, per (site, camera, zone[, day]).

    Whole days in range are read from the daily track tables (no COUNT DISTINCT over a month of hours), the
    hours at either end from ``rollup_tracks``; a track seen in both counts once (``UNION`` before counting).
    """
    first, end = _hour_bounds(since, until)
    days = _full_days(first, end)
    t, dt, dd = rollup_tracks, rollup_day_tracks, rollup_daily
    edge = _between(t.c.hour, first, end)
    if days is not None:  # the hours before the first whole day and after the last (two index ranges)
        edge = sa.or_(_between(t.c.hour, first, days[0]) if days[0] is not None else sa.false(),
                      _between(t.c.hour, days[1], end) if days[1] is not None else sa.false())
    day_of_hour = ((t.c.hour // DAY) * DAY).label("day")
    if per_day:
        parts = [_filter(sa.select(t.c.site, t.c.camera_id, t.c.zone, day_of_hour,
                                   sa.func.count(sa.distinct(t.c.track_id)).label("n")).where(edge), t, site,
                         camera_id, zone).group_by(t.c.site, t.c.camera_id, t.c.zone, day_of_hour)]
        if days is not None:
            parts.append(_filter(sa.select(dd.c.site, dd.c.camera_id, dd.c.zone, dd.c.day,
                                           dd.c.unique_tracks.label("n")).where(_between(dd.c.day, *days)), dd,
                                 site, camera_id, zone))
        return sa.union_all(*parts) if len(parts) > 1 else parts[0]
    parts = [_filter(sa.select(t.c.site, t.c.camera_id, t.c.zone, t.c.track_id).where(edge), t, site, camera_id,
                     zone)]
    if days is not None:
        parts.append(_filter(sa.select(dt.c.site, dt.c.camera_id, dt.c.zone, dt.c.track_id).where(
            _between(dt.c.day, *days)), dt, site, camera_id, zone))
    ids = (sa.union(*parts) if len(parts) > 1 else parts[0].distinct()).subquery()
    return sa.select(ids.c.site, ids.c.camera_id, ids.c.zone, sa.func.count().label("n")).group_by(
        ids.c.site, ids.c.camera_id, ids.c.zone)


def _daily_rows(conn: Connection, since: Any, until: Any, site: str | None, camera_id: str | None,
                zone: str | None) -> list[dict[str, Any]]:
    t = rollup_hourly
    day = (t.c.hour // DAY) * DAY
    query = sa.select(
        t.c.site, t.c.camera_id, t.c.zone, day.label("day"), sa.func.sum(t.c.entries).label("entries"),
        sa.func.sum(t.c.exits).label("exits"), sa.func.max(t.c.occupancy_max).label("occupancy_max"),
        sa.func.sum(t.c.occupancy_sum).label("occupancy_sum"),
        sa.func.sum(t.c.occupancy_samples).label("occupancy_samples"), sa.func.sum(t.c.dwell_sum).label("dwell_sum"),
        sa.func.sum(t.c.dwell_count).label("dwell_count"), sa.func.sum(t.c.loiters).label("loiters"),
    ).group_by(t.c.site, t.c.camera_id, t.c.zone, day)
    query = _filter(_hour_range(query, t.c.hour, since, until), t, site, camera_id, zone)
    rows = conn.execute(query).mappings().all()
    uniques = {(r.site, r.camera_id, r.zone, int(r.day)): int(r.n) for r in conn.execute(
        _distinct_tracks(since, until, site, camera_id, zone, per_day=True))}
    out = [{
        "site": r["site"], "camera_id": r["camera_id"], "zone": r["zone"] or None, "day": format_ts(r["day"])[:10],
        "day_ts": int(r["day"]), "entries": int(r["entries"]), "exits": int(r["exits"]),
        "unique_tracks": uniques.get((r["site"], r["camera_id"], r["zone"], int(r["day"])), 0),
        "occupancy_max": int(r["occupancy_max"]) if r["occupancy_samples"] else None,
        "occupancy_mean": _mean(float(r["occupancy_sum"]), int(r["occupancy_samples"])),
        "dwell_mean": _mean(float(r["dwell_sum"]), int(r["dwell_count"])), "loiters": int(r["loiters"]),
    } for r in rows]
    return sorted(out, key=lambda r: (r["day_ts"], r["site"], r["camera_id"], r["zone"] or ""))


def daily(store: Store, *, since: Any, until: Any = None, site: str | None = None, camera_id: str | None = None,
          zone: str | None = None) -> list[dict[str, Any]]:
    """The hours in range summed per UTC day; unique_tracks is distinct over the same hours (one scope)."""
    with store.engine.connect() as conn:
        return _daily_rows(conn, since, until, site, camera_id, zone)


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
    e, sm = _store_tables().events_table, _store_tables().summaries_table
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
    t, d = rollup_hourly, rollup_dwell
    sums = _filter(_hour_range(sa.select(sa.func.sum(t.c.dwell_sum), sa.func.sum(t.c.dwell_count)), t.c.hour,
                               since, until), t, site, camera_id, zone)
    bins_q = _filter(_hour_range(sa.select(d.c.bin, sa.func.sum(d.c.n)).group_by(d.c.bin), d.c.hour, since, until),
                     d, site, camera_id, zone)
    with store.engine.connect() as conn:
        total, n = conn.execute(sums).one()
        bins = {int(b): int(c) for b, c in conn.execute(bins_q)}
    return _dwell_figures(float(total or 0.0), int(n or 0), bins)


def peak_hour(store: Store, *, since: Any, until: Any = None, site: str | None = None,
              camera_id: str | None = None, zone: str | None = None) -> dict[str, Any] | None:
    """The hour with the most entries (summed over the matching cameras); earliest on ties; None if no entries."""
    t = rollup_hourly
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
    t = rollup_lines
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


def _dwell_figures(total: float, n: int, bins: dict[int, int]) -> dict[str, Any]:
    return {
        "n": n, "mean": _mean(total, n), "median": histogram_quantile(bins, 0.5),
        "p90": histogram_quantile(bins, 0.9),
        "histogram": [{"lo": round(bin_edges(b)[0], 3), "hi": round(bin_edges(b)[1], 3), "n": bins[b]}
                      for b in sorted(bins)],
    }


def overview(store: Store, *, since: Any, until: Any = None, site: str | None = None,
             camera_id: str | None = None) -> dict[str, Any]:
    """Everything the report prints: per camera totals, health, dwell, peak hour, days, zones and lines.

    One grouped query per figure for all the cameras at once (a fixed number of statements however many
    cameras there are). unique_tracks is distinct over the range, per camera and per zone.
    """
    until_value = until if until is not None else time.time()
    t, d, ln = rollup_hourly, rollup_dwell, rollup_lines
    key = (t.c.site, t.c.camera_id, t.c.zone)
    totals_q = _filter(_hour_range(sa.select(
        *key, sa.func.sum(t.c.entries).label("entries"), sa.func.sum(t.c.exits).label("exits"),
        sa.func.max(t.c.occupancy_max).label("occupancy_max"), sa.func.sum(t.c.occupancy_sum).label("occ_sum"),
        sa.func.sum(t.c.occupancy_samples).label("occ_n"), sa.func.sum(t.c.dwell_sum).label("dwell_sum"),
        sa.func.sum(t.c.dwell_count).label("dwell_n"), sa.func.sum(t.c.loiters).label("loiters"),
    ).group_by(*key), t.c.hour, since, until_value), t, site, camera_id, ANY_ZONE)
    bins_q = _filter(_hour_range(sa.select(d.c.site, d.c.camera_id, d.c.zone, d.c.bin, sa.func.sum(d.c.n).label(
        "n")).group_by(d.c.site, d.c.camera_id, d.c.zone, d.c.bin), d.c.hour, since, until_value), d, site,
        camera_id, ANY_ZONE)
    per_hour = sa.func.sum(t.c.entries).label("entries")
    peaks_q = _filter(_hour_range(sa.select(t.c.site, t.c.camera_id, t.c.hour, per_hour).group_by(
        t.c.site, t.c.camera_id, t.c.hour), t.c.hour, since, until_value), t, site, camera_id, None)
    lines_q = _hour_range(sa.select(ln.c.site, ln.c.camera_id, ln.c.line, sa.func.sum(ln.c.in_count).label("in_"),
                                    sa.func.sum(ln.c.out_count).label("out")).group_by(
        ln.c.site, ln.c.camera_id, ln.c.line), ln.c.hour, since, until_value)
    for column, value in ((ln.c.site, site), (ln.c.camera_id, camera_id)):
        if value is not None:
            lines_q = lines_q.where(column == value)
    with store.engine.connect() as conn:
        totals = conn.execute(totals_q).mappings().all()
        tracks = {(r.site, r.camera_id, r.zone): int(r.n) for r in conn.execute(
            _distinct_tracks(since, until_value, site, camera_id, ANY_ZONE, per_day=False))}
        bins: dict[tuple[str, str, str], dict[int, int]] = {}
        for r in conn.execute(bins_q):
            bins.setdefault((r.site, r.camera_id, r.zone), {})[int(r.bin)] = int(r.n)
        peaks: dict[tuple[str, str], tuple[int, int]] = {}
        for r in conn.execute(peaks_q):
            best = peaks.get((r.site, r.camera_id))
            if r.entries and (best is None or (int(r.entries), -int(r.hour)) > (best[1], -best[0])):
                peaks[(r.site, r.camera_id)] = (int(r.hour), int(r.entries))
        days: dict[tuple[str, str], list[dict[str, Any]]] = {}
        for row in _daily_rows(conn, since, until_value, site, camera_id, None):
            days.setdefault((row["site"], row["camera_id"]), []).append(row)
        cam_lines: dict[tuple[str, str], list[dict[str, Any]]] = {}
        for r in conn.execute(lines_q.order_by(ln.c.site, ln.c.camera_id, ln.c.line)):
            cam_lines.setdefault((r.site, r.camera_id), []).append(
                {"site": r.site, "camera_id": r.camera_id, "line": r.line, "in": int(r.in_), "out": int(r.out)})
    areas: dict[tuple[str, str], dict[str, dict[str, Any]]] = {}
    for r in totals:
        k = (r.site, r.camera_id, r.zone)
        occ_n = int(r.occ_n or 0)
        areas.setdefault((r.site, r.camera_id), {})[r.zone] = {
            "entries": int(r.entries), "exits": int(r.exits), "unique_tracks": tracks.get(k, 0),
            "occupancy_max": int(r.occupancy_max) if occ_n else None,
            "occupancy_mean": _mean(float(r.occ_sum or 0), occ_n), "loiters": int(r.loiters),
            "dwell": _dwell_figures(float(r.dwell_sum or 0.0), int(r.dwell_n or 0), bins.get(k, {})),
        }
    empty = {"entries": 0, "exits": 0, "unique_tracks": 0, "occupancy_max": None, "occupancy_mean": None,
             "loiters": 0}
    out_cams = []
    for cam in store.cameras():
        s, c = cam["site"], cam["camera_id"]
        if (site is not None and s != site) or (camera_id is not None and c != camera_id):
            continue
        mine = areas.get((s, c), {})
        whole = mine.get("", {**empty, "dwell": _dwell_figures(0.0, 0, {})})
        peak = peaks.get((s, c))
        out_cams.append({
            **cam, **whole,
            "peak_hour": {"hour": format_ts(peak[0]), "hour_ts": peak[0], "entries": peak[1]} if peak else None,
            "daily": days.get((s, c), []),
            "zones": [{"zone": z, **fig} for z, fig in sorted(mine.items()) if z != ""],
            "lines": cam_lines.get((s, c), []),
        })
    since_s, until_s = _epoch_s(since), _epoch_s(until_value)
    return {
        "since": format_ts(since_s) if since_s is not None else None,
        "until": format_ts(until_s) if until_s is not None else None,
        "cameras": out_cams, "events_total": store.event_count(), "summaries_total": store.summary_count(),
        "dead_letters": store.dead_letter_count(), "sink": store.sink_state(),
    }

"""Rollups: figures equal a scenario computed by hand, on SQLite and PostgreSQL; duplicates never count."""

from __future__ import annotations

import random
import statistics

import pytest
import sqlalchemy as sa

from cloud_sink import rollups
from cloud_sink.rollups import bin_edges
from cloud_sink.store import Batch
from contract.rollup import deltas, dwell_bin
from tests.conftest import make_event
from tests.rollup_scenario import H0, H1, scenario


def test_hourly_equals_hand_computed(loaded):
    rows = rollups.hourly(loaded, since=H0, camera_id="cam-1")
    assert [r["hour_ts"] for r in rows] == [H0, H1]
    h0, h1 = rows
    assert (h0["entries"], h0["exits"], h0["unique_tracks"]) == (3, 2, 3)
    assert (h0["occupancy_max"], h0["occupancy_mean"], h0["dwell_mean"]) == (3, pytest.approx(1.8), 550.0)
    assert (h1["entries"], h1["exits"], h1["unique_tracks"]) == (1, 2, 2)
    assert (h1["occupancy_max"], h1["occupancy_mean"], h1["dwell_mean"]) == (1, pytest.approx(1 / 3), 1730.0)
    assert h0["hour"] == "2026-05-28T20:00:00.000Z" and h0["zone"] is None


def test_hourly_window_and_camera_filters(loaded):
    assert [r["hour_ts"] for r in rollups.hourly(loaded, since=H1 + 5, camera_id="cam-1")] == [H1]
    assert rollups.hourly(loaded, since=H0, until=H1, camera_id="cam-1")[-1]["hour_ts"] == H0
    (cam2,) = rollups.hourly(loaded, since=H0, camera_id="cam-2")
    assert cam2["entries"] == 1 and cam2["occupancy_max"] is None and cam2["dwell_mean"] is None
    assert len(rollups.hourly(loaded, since=H0)) == 3  # per camera rows
    assert rollups.hourly(loaded, since=H0, site="elsewhere") == []


def test_zone_breakdown(loaded):
    (door,) = rollups.hourly(loaded, since=H0, camera_id="cam-1", zone="door")
    assert door["hour_ts"] == H1 and door["zone"] == "door"
    assert (door["entries"], door["exits"], door["unique_tracks"], door["loiters"]) == (1, 1, 1, 1)
    assert (door["occupancy_max"], door["occupancy_mean"], door["dwell_mean"]) == (1, 0.5, 40.0)
    assert rollups.hourly(loaded, since=H0, zone="*") == [door]


def test_daily_counts_distinct_tracks_over_the_day(loaded):
    (day,) = rollups.daily(loaded, since=H0, camera_id="cam-1")
    assert day["day"] == "2026-05-28"
    assert (day["entries"], day["exits"], day["unique_tracks"]) == (4, 4, 4)  # track 3 spans two hours: once
    assert day["occupancy_max"] == 3 and day["occupancy_mean"] == pytest.approx((9 + 1) / 8)
    assert day["dwell_mean"] == pytest.approx((300 + 800 + 3400 + 60) / 4)


def test_occupancy_buckets_from_count_events(loaded):
    rows = rollups.occupancy(loaded, since=H0, until=H1 + 3600, camera_id="cam-1", bucket_s=600)
    got = [(r["t_ts"], r["max"], round(r["mean"], 3), r["samples"]) for r in rows]
    assert got == [(H0, 3, 2.0, 4), (H0 + 600, 1, 1.0, 1), (H1, 1, 0.333, 3)]
    door = rollups.occupancy(loaded, since=H0, camera_id="cam-1", zone="door", bucket_s=3600)
    assert [(r["max"], r["mean"]) for r in door] == [(1, 0.5)]
    with pytest.raises(ValueError):
        rollups.occupancy(loaded, since=H0, bucket_s=0)


def test_dwell_and_peak_hour(loaded):
    d = rollups.dwell(loaded, since=H0, camera_id="cam-1")
    assert d["n"] == 4 and d["mean"] == pytest.approx(1140.0)
    assert 300 <= d["median"] <= 800 * 1.05  # any value between the 2nd and 3rd of 60,300,800,3400 is a median
    assert 800 <= d["p90"] <= 3400 * 1.05
    assert sum(b["n"] for b in d["histogram"]) == 4
    assert all(b["lo"] < b["hi"] for b in d["histogram"])
    assert rollups.peak_hour(loaded, since=H0, camera_id="cam-1") == {
        "hour": "2026-05-28T20:00:00.000Z", "hour_ts": H0, "entries": 3}
    assert rollups.peak_hour(loaded, since=H1 + 3600) is None


def test_lines_totals(loaded):
    assert rollups.lines(loaded, since=H0) == [
        {"site": "lobby", "camera_id": "cam-1", "line": "gate", "in": 1, "out": 1}]


def test_overview_has_everything_the_report_prints(loaded):
    s = rollups.overview(loaded, since=H0, until=H1 + 3600)
    cams = {c["camera_id"]: c for c in s["cameras"]}
    cam = cams["cam-1"]
    # 4 tracks: track 3 is seen in both hours and counts once (this test used to enshrine 5, a per-hour sum)
    assert (cam["entries"], cam["exits"], cam["unique_tracks"], cam["occupancy_max"]) == (4, 4, 4, 3)
    assert cam["occupancy_mean"] == pytest.approx(10 / 8)
    assert cam["dwell"]["n"] == 4 and cam["peak_hour"]["hour_ts"] == H0
    assert cam["zones"][0]["zone"] == "door" and cam["zones"][0]["dwell"]["mean"] == 40.0
    assert cam["lines"][0]["in"] == 1 and cam["events_total"] == 23
    assert s["events_total"] == 24 and s["dead_letters"] == 0
    only = rollups.overview(loaded, since=H0, until=H1 + 3600, camera_id="cam-2")
    assert [c["camera_id"] for c in only["cameras"]] == ["cam-2"]


def test_unique_tracks_are_distinct_over_the_range_asked_for(loaded):
    """Distinct over [since, until): the overview, and daily rows scoped to the hours of the day in range."""
    whole = rollups.overview(loaded, since=H0, until=H1 + 3600, camera_id="cam-1")["cameras"][0]
    assert whole["unique_tracks"] == 4
    (door,) = whole["zones"]
    assert door["unique_tracks"] == 1
    second = rollups.overview(loaded, since=H1, until=H1 + 3600, camera_id="cam-1")["cameras"][0]
    assert second["unique_tracks"] == 2  # tracks 3 and 4; 1 and 2 were only seen in H0
    (day,) = rollups.daily(loaded, since=H1, until=H1 + 3600, camera_id="cam-1")
    assert (day["entries"], day["unique_tracks"]) == (1, 2)  # the same scope for both figures
    (first,) = rollups.daily(loaded, since=H0, until=H1, camera_id="cam-1")
    assert (first["entries"], first["unique_tracks"]) == (3, 3)
    # across days: a day fully in range and part of the next one, the same track in both
    extra = [make_event(ts=H0 + 86400 + 60, track_id=3), make_event(ts=H0 + 86400 + 120, track_id=50)]
    loaded.write(Batch(events=extra))
    two_days = rollups.overview(loaded, since=H0 - 20 * 3600, until=H0 + 86400 + 3600, camera_id="cam-1")
    assert two_days["cameras"][0]["unique_tracks"] == 5  # 1, 2, 3, 4 and 50
    days = rollups.daily(loaded, since=H0 - 20 * 3600, until=H0 + 86400 + 3600, camera_id="cam-1")
    assert [d["unique_tracks"] for d in days] == [4, 2]


def _count_queries(target, work) -> int:
    """How many SQL statements ``work()`` sends to ``target`` (SQLAlchemy ``before_cursor_execute`` events)."""
    seen: list[str] = []

    def count(*_args) -> None:
        seen.append("")

    sa.event.listen(target.engine, "before_cursor_execute", count)
    try:
        work()
    finally:
        sa.event.remove(target.engine, "before_cursor_execute", count)
    return len(seen)


def test_overview_and_report_take_a_fixed_number_of_queries_however_many_cameras(store):  # noqa: F811
    """One grouped query per figure: 100 cameras cost the same number of statements as one."""
    from cloud_sink import report

    def fill(n: int) -> None:
        evs = []
        for i in range(n):
            cam = f"cam-{i}"
            evs += [make_event(ts=H0 + 10, camera_id=cam, track_id=1), make_event(
                "person.exit", ts=H0 + 70, camera_id=cam, track_id=1, dwell_s=60.0),
                make_event("zone.enter", ts=H0 + 20, camera_id=cam, zone="door", track_id=1),
                make_event("line.cross", ts=H0 + 30, camera_id=cam, line="gate", track_id=1, direction="in",
                           totals={"in": 1, "out": 0}),
                make_event("count", ts=H0 + 15, camera_id=cam, count=1, previous=0)]
        store.write(Batch(events=evs))

    fill(1)
    one = _count_queries(store, lambda: report.build(store, since=H0, until=H1))
    with store.engine.begin() as conn:
        for table in rollups.metadata.sorted_tables:
            conn.execute(table.delete())
        conn.execute(sa.text("DELETE FROM cameras"))
    fill(100)
    data: dict = {}
    hundred = _count_queries(store, lambda: data.update(report.build(store, since=H0, until=H1)))
    assert len(data["cameras"]) == 100 and all(c["unique_tracks"] == 1 for c in data["cameras"])
    assert all(c["zones"][0]["entries"] == 1 and c["lines"][0]["in"] == 1 for c in data["cameras"])
    assert hundred == one and hundred <= 20


def test_median_and_p90_are_within_one_bin_of_exact(store):  # noqa: F811
    rng = random.Random(7)
    values = [round(rng.lognormvariate(3.5, 1.0), 3) for _ in range(301)]
    store.write(Batch(events=[make_event("person.exit", ts=H0 + i, track_id=i, dwell_s=v) for i, v in enumerate(values)]))
    d = rollups.dwell(store, since=H0)
    assert d["n"] == 301 and d["mean"] == pytest.approx(statistics.fmean(values))
    exact_median = statistics.median(values)
    exact_p90 = statistics.quantiles(values, n=10)[-1]
    assert d["median"] == pytest.approx(exact_median, rel=0.06, abs=0.5)
    assert d["p90"] == pytest.approx(exact_p90, rel=0.06, abs=0.5)


def test_deltas_are_pure_and_ignore_nothing():
    evs = scenario()
    delta = deltas(evs)
    assert delta.hourly[("lobby", "cam-1", "", H0)]["entries"] == 3
    assert delta.lines[("lobby", "cam-1", "gate", H1)] == [1, 1]
    assert sum(delta.dwell_bins.values()) == 5  # 4 person.exit + 1 zone.exit
    assert ("lobby", "cam-1", "door", H1, 4) in delta.tracks


@pytest.mark.parametrize("seconds", [0.0, 0.49, 0.5, 9.99, 10.0, 10.5, 59.0, 3600.0, 86400.0, 31536000.0])
def test_dwell_bins_contain_their_value(seconds):
    lo, hi = bin_edges(dwell_bin(seconds))
    assert lo <= seconds * (1 + 1e-12) and seconds < hi * (1 + 1e-12)
    assert hi - lo <= max(0.5, 0.051 * hi)


def test_migration_2_backfills_daily_tracks_of_a_version_1_database(db_url):  # noqa: F811
    import sqlalchemy as sa

    from cloud_sink.store import MIGRATIONS, Store

    s = Store.open(db_url)
    s.write(Batch(events=scenario()))
    with s.engine.begin() as conn:  # make it look like a database written before migration 2
        conn.execute(sa.text("DROP TABLE rollup_daily"))
        conn.execute(sa.text("DROP TABLE rollup_day_tracks"))
        conn.execute(sa.text("DELETE FROM schema_migrations WHERE version = 2"))
    s.close()
    upgraded = Store.open(db_url)
    assert upgraded.schema_version() == MIGRATIONS[-1][0]  # 2 re-applied (and any later ones kept)
    (day,) = rollups.daily(upgraded, since=H0, camera_id="cam-1")
    assert day["unique_tracks"] == 4
    upgraded.write(Batch(events=[make_event(ts=H1 + 500, track_id=99)]))
    assert rollups.daily(upgraded, since=H0, camera_id="cam-1")[0]["unique_tracks"] == 5
    upgraded.close()

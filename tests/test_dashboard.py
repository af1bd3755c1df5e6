"""The dashboard in real headless Chromium, served by uvicorn over a store holding the known scenario."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from contract.timestamps import format_ts
from tests.chromium import CHROMIUM, PageWatch, open_dashboard, serve
from tests.sink_scenario import HOUR, T0, fill, scenario

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian chromium: run scripts/setup.sh"),
]


@pytest.fixture
def scenario_store(tmp_path):
    from cloud_sink.store import Store

    store = Store.open(f"sqlite:///{tmp_path / 'sink.db'}")
    events = scenario()
    fill(store, events)
    yield store, events
    store.close()


def _values(page, selector: str, *attrs: str) -> list[tuple[str, ...]]:
    rows = page.eval_on_selector_all(
        selector, f"els => els.map(e => [{', '.join(f'e.getAttribute({a!r})' for a in attrs)}])")
    return [tuple(row) for row in rows]


def test_dashboard_renders_the_stored_data(browser, scenario_store, artifacts_dir):
    from playwright.sync_api import expect

    from cloud_sink.api import create_app

    store, events = scenario_store
    with serve(create_app(store)) as url:
        page, watch = open_dashboard(browser, url)

        # Camera cards with their health; garage/cam-1 sorts first and is selected at start.
        cards = _values(page, "button.camera", "data-camera", "aria-pressed")
        assert sorted(cards) == [("garage/cam-1", "true"), ("lobby/cam-1", "false"), ("lobby/cam-2", "false")]
        assert page.text_content('[data-camera="lobby/cam-2"] .status') == "offline"
        assert page.text_content('[data-camera="lobby/cam-1"] .status') == "online"
        assert "12.5" in page.inner_text('[data-camera="lobby/cam-1"] .facts')
        assert page.text_content("#dead-letters") == "1 refused"

        page.click('[data-camera="lobby/cam-1"]')
        expect(page.locator("#camera-title")).to_have_text("lobby / cam-1")
        page.wait_for_selector('[data-camera="lobby/cam-1"][aria-pressed=true]')

        # Entries per hour: 24 hourly bars ending at the camera's last event; non-zero ones = the hand counts.
        bars = _values(page, "#chart-entries rect.bar.entries", "data-hour", "data-value")
        assert len(bars) == 24
        assert bars[-1][0] == format_ts(T0 + 2 * HOUR)
        assert {h: int(v) for h, v in bars if v != "0"} == {format_ts(T0): 3, format_ts(T0 + HOUR): 1,
                                                             format_ts(T0 + 2 * HOUR): 2}
        exits = {h: int(v) for h, v in _values(page, "#chart-entries rect.bar.exits", "data-hour", "data-value")}
        assert exits[format_ts(T0)] == 2 and exits[format_ts(T0 + HOUR)] == 2
        heights = {h: float(v) for h, v in _values(page, "#chart-entries rect.bar.entries", "data-hour", "height")}
        assert heights[format_ts(T0)] == pytest.approx(3 * heights[format_ts(T0 + HOUR)], rel=1e-3)

        # Occupancy: one point per 10-minute interval holding count reports (max 3, then 1, then 0).
        points = _values(page, "#chart-occupancy circle.pt", "data-t", "data-max")
        assert points == [(format_ts(T0), "3"), (format_ts(T0 + 600), "1"), (format_ts(T0 + HOUR + 3000), "0")]
        assert page.locator("#chart-occupancy path.line.max").count() == 1

        # Dwell: 5 s, 12 s, 40 s and 47 min land in the 5-10 s, 10-20 s, 30-60 s and 10 min+ bins.
        dwell = {int(lo): int(v) for lo, v in _values(page, "#chart-dwell rect.bar.dwell", "data-lo", "data-value")
                 if v != "0"}
        assert dwell == {5: 1, 10: 1, 30: 1, 600: 1}
        assert "n 4" in page.inner_text("#dwell-stats")

        # Recent events: every lobby/cam-1 event id, newest first.
        cam1 = sorted((e for e in events if (e["site"], e["camera_id"]) == ("lobby", "cam-1")),
                      key=lambda e: e["ts"], reverse=True)
        rows = [r[0] for r in _values(page, "#events tbody tr", "data-event-id")]
        assert rows == [e["event_id"] for e in cam1]
        kpis = page.eval_on_selector_all("#kpis .kpi", "els => els.map(e => [e.lastChild.textContent,"
                                                       " e.firstChild.textContent])")
        assert dict(kpis)["entries"] == "6" and dict(kpis)["exits"] == "4"
        assert dict(kpis)["people"] == "6"  # distinct over the window: track 3 (hours 03 and 04) counts once
        assert dict(kpis)["peak hour"] == "03:00 UTC" and dict(kpis)["most in view"] == "3"

        page.screenshot(path=str(artifacts_dir / "dashboard.png"), full_page=True)
        assert not watch.errors, watch.errors
        assert all(u.startswith(url) or u.startswith("data:") for u in watch.requests), "nothing from elsewhere"
        page.close()


def test_dashboard_asks_for_the_token_and_uses_it(browser, scenario_store):
    from playwright.sync_api import expect

    from cloud_sink.api import create_app

    store, events = scenario_store
    with serve(create_app(store, token="dash-token-123")) as url:
        page = browser.new_page()
        page.goto(url)
        page.wait_for_selector("#auth:not([hidden])", timeout=20000)
        assert page.locator("#events tbody tr").count() == 0, "no data without the token"
        page.fill("#token-input", "wrong")
        page.click("#auth button")
        expect(page.locator("#banner")).to_contain_text("refused")
        page.fill("#token-input", "dash-token-123")
        page.click("#auth button")
        page.wait_for_selector("body[data-ready=true]", timeout=20000)
        assert page.locator("#auth").is_hidden()
        assert page.locator("#events tbody tr").count() > 0
        page.close()

        # A link with the token in the fragment (never sent to the server) works and is cleaned from the URL.
        page = browser.new_page()
        page.goto(url + "#token=dash-token-123")
        page.wait_for_selector("body[data-ready=true]", timeout=20000)
        assert "token" not in page.url
        ids = {r[0] for r in _values(page, "#events tbody tr", "data-event-id")}
        assert ids == {e["event_id"] for e in events if (e["site"], e["camera_id"]) == ("garage", "cam-1")}
        page.close()


def test_dashboard_of_a_summary_mode_camera_shows_the_same_charts_and_says_why_no_events(browser, tmp_path):
    """The same scenario sent as 60-s summaries: same entries per hour and dwell; the event list explains."""
    from cloud_sink.api import create_app
    from cloud_sink.store import Batch, Store
    from tests.sink_scenario import summaries_of

    store = Store.open(f"sqlite:///{tmp_path / 'sink.db'}")
    events = [e for e in scenario() if (e["site"], e["camera_id"]) == ("lobby", "cam-1")]
    docs = summaries_of(events)
    assert len(store.write(Batch(summaries=docs)).new_summaries) == len(docs) and store.event_count() == 0
    try:
        with serve(create_app(store)) as url:
            page, watch = open_dashboard(browser, url)
            bars = _values(page, "#chart-entries rect.bar.entries", "data-hour", "data-value")
            assert {h: int(v) for h, v in bars if v != "0"} == {format_ts(T0): 3, format_ts(T0 + HOUR): 1,
                                                                 format_ts(T0 + 2 * HOUR): 2}
            dwell = {int(lo): int(v) for lo, v in _values(page, "#chart-dwell rect.bar.dwell", "data-lo",
                                                          "data-value") if v != "0"}
            assert dwell == {5: 1, 10: 1, 30: 1, 600: 1}
            text = page.inner_text("#events tbody")
            assert "sends summaries (summary mode)" in text and "no per-person records" in text
            assert not watch.errors, watch.errors
            page.close()
    finally:
        store.close()


# ------------------------------------------------------------------------------------------ issue 17
DAY = 86400


def _today() -> float:
    return float(int(time.time()) // DAY * DAY)


def shop_events() -> list[dict]:
    """shop/door with zones and a line, events on days chosen so every range picks a different set:
    today 3 entries, yesterday 2, three days ago 5, seven days ago 1, twenty days ago 7 (all at 01:00-02:00 UTC)."""
    from tests.sink_scenario import make_event

    out: list[dict] = []
    track = iter(range(1, 10_000))
    for days_ago, entries in ((0, 3), (1, 2), (3, 5), (7, 1), (20, 7)):
        base = _today() - days_ago * DAY + HOUR
        for i in range(entries):
            t, ts = next(track), base + 60 * i
            out += [make_event("person.enter", ts, site="shop", camera="door", track_id=t),
                    make_event("count", ts + 1, site="shop", camera="door", count=i + 1, previous=i),
                    make_event("person.exit", ts + 30 + 10 * days_ago, site="shop", camera="door", track_id=t,
                               dwell_s=30.0 + 10 * days_ago)]
        out += [make_event("count", base + 1200, site="shop", camera="door", count=0, previous=entries),
                make_event("zone.enter", base + 5, site="shop", camera="door", zone="till", track_id=1),
                make_event("count", base + 6, site="shop", camera="door", zone="till", count=entries, previous=0),
                make_event("zone.exit", base + 65, site="shop", camera="door", zone="till", track_id=1,
                           dwell_s=60.0),
                make_event("count", base + 66, site="shop", camera="door", zone="till", count=0, previous=entries),
                make_event("line.cross", base + 10, site="shop", camera="door", line="entrance", direction="in",
                           track_id=1, totals={"in": entries, "out": 0}),
                make_event("line.cross", base + 20, site="shop", camera="door", line="entrance", direction="out",
                           track_id=2, totals={"in": entries, "out": 1})]
    # a second camera without zones or lines, and with a backlog in its last stats
    out.append(make_event("person.enter", _today() + 2 * HOUR, site="shop", camera="back", track_id=1))
    return out


@pytest.fixture
def shop_store(tmp_path):
    from cloud_sink.store import Batch, Store
    from tests.sink_scenario import stats_doc

    store = Store.open(f"sqlite:///{tmp_path / 'shop.db'}")
    events = shop_events()
    assert len(store.write(Batch(events=events)).new_events) == len(events)
    model = {"version": "v7", "name": "yolov8n-int8", "sha256": "ab" * 32}  # stats carry the running model
    backlog = {**stats_doc("shop", "back", _today() + 2 * HOUR, 4.0), "outbox_depth": 321, "model": model}
    store.write(Batch(statuses=[("shop", "door", "online"), ("shop", "back", "offline")],
                      stats=[("shop", "door", {**stats_doc("shop", "door", _today() + HOUR, 9.0), "model": model}),
                             ("shop", "back", backlog)]))
    store.write(Batch(dead_letters=[{"topic": "smartcam/shop/door/events", "reason": "invalid JSON", "payload": p,
                                     "received_at": time.time()} for p in (b"{", b"[")]))
    yield store, events
    store.close()


def _kpis(page) -> dict[str, str]:
    return dict(page.eval_on_selector_all("#kpis .kpi", "els => els.map(e => [e.lastChild.textContent, "
                                                         "e.firstChild.textContent])"))


def _pick(page, name: str) -> None:
    page.click(f'#range-picker button[data-range="{name}"]')
    page.wait_for_selector(f"body[data-ready=true][data-range='{name}']", timeout=20000)


def _entries(page) -> dict[str, int]:
    rows = _values(page, "#chart-entries rect.bar.entries", "data-hour", "data-day", "data-value")
    return {(h or d): int(v) for h, d, v in rows}


def test_range_picker_changes_every_chart_and_figure(browser, shop_store):
    from cloud_sink.api import create_app

    store, events = shop_store
    today = _today()
    with serve(create_app(store)) as url:
        page, watch = open_dashboard(browser, url)
        page.click('button.camera[data-camera="shop/door"]')
        page.wait_for_selector("body[data-ready=true][data-selected='shop/door']")

        _pick(page, "today")
        bars = _entries(page)
        assert len(bars) == 24 and min(bars) == format_ts(today)  # one bar per hour of today (UTC)
        assert sum(bars.values()) == 3 and bars[format_ts(today + HOUR)] == 3
        assert _kpis(page)["entries"] == "3"
        compare = {c: (int(p), int(d)) for c, p, d in _values(page, "#compare .delta", "data-compare",
                                                                "data-previous", "data-diff")}
        assert compare == {"day": (2, 1), "week": (1, 2)}  # day-over-day vs yesterday, week-over-week
        assert page.text_content("#range") == f"{format_ts(today)[:10]} UTC"
        dwell_today = page.inner_text("#dwell-stats")
        assert "n 3" in dwell_today
        rows = [r[0] for r in _values(page, "#events tbody tr", "data-event-id")]
        in_today = {e["event_id"] for e in events if e["camera_id"] == "door" and
                    format_ts(today) <= e["ts"] < format_ts(today + DAY)}
        assert set(rows) == in_today  # the event list follows the range too

        _pick(page, "yesterday")
        assert sum(_entries(page).values()) == 2 and _kpis(page)["entries"] == "2"
        assert "n 2" in page.inner_text("#dwell-stats")
        points = _values(page, "#chart-occupancy circle.pt", "data-t", "data-max")
        assert points and all(format_ts(today - DAY) <= t < format_ts(today) for t, _ in points)
        assert max(int(m) for _, m in points) == 2

        _pick(page, "7d")
        bars = _entries(page)
        assert list(bars) == [format_ts(today - d * DAY)[:10] for d in range(6, -1, -1)]  # one bar per day
        assert sum(bars.values()) == 3 + 2 + 5 and page.text_content("#entries-title") == "Entries per day"
        assert {c for (c,) in _values(page, "#compare .delta", "data-compare")} == {"period"}
        assert _values(page, "#compare .delta", "data-previous") == [("1",)]  # the 7 days before: 1 entry

        _pick(page, "30d")
        assert len(_entries(page)) == 30 and sum(_entries(page).values()) == 18
        site = {r.get_attribute("data-camera"): int(r.query_selector("td:nth-child(6)").text_content())
                for r in page.query_selector_all("#site-table tbody tr")}
        assert site == {"shop/door": 18, "shop/back": 1}  # "entries in range" follows the picker

        page.click('#range-picker button[data-range="custom"]')
        day20 = format_ts(today - 20 * DAY)[:10]
        page.fill("#custom-from", day20)
        page.fill("#custom-to", day20)
        page.click("#custom-range button[type=submit]")
        page.wait_for_selector("body[data-ready=true][data-range=custom]")
        assert sum(_entries(page).values()) == 7 and len(_entries(page)) == 24
        assert page.text_content("#range") == f"{day20} UTC"
        assert "n 7" in page.inner_text("#dwell-stats") and "median 3" in page.inner_text("#dwell-stats")
        assert not watch.errors, watch.errors
        page.close()


def test_a_camera_with_zones_and_lines_shows_their_panels(browser, shop_store, artifacts_dir):
    from cloud_sink.api import create_app

    store, _ = shop_store
    with serve(create_app(store)) as url:
        page, watch = open_dashboard(browser, url)
        page.click('button.camera[data-camera="shop/door"]')
        page.wait_for_selector("body[data-ready=true][data-selected='shop/door']")
        _pick(page, "30d")
        assert page.locator("#lines-panel").is_visible() and page.locator("#zones-panel").is_visible()
        lines = {(n, k): int(v) for n, k, v in _values(page, "#chart-lines rect.bar", "data-line", "class",
                                                       "data-value")}
        assert lines == {("entrance", "bar in"): 5, ("entrance", "bar out"): 5}  # one in, one out on 5 days
        assert page.inner_text("#lines-table tbody").split() == ["entrance", "5", "5", "0"]
        zones = {(n, k): float(v) for n, k, v in _values(page, "#chart-zones rect.bar", "data-zone", "class",
                                                         "data-value")}
        assert zones[("till", "bar max")] == 7  # the busiest day had 7 in the zone at once
        dwell = _values(page, "#chart-zones-dwell rect.bar", "data-zone", "data-value")
        assert [z for z, _ in dwell] == ["till"] and float(dwell[0][1]) > 0
        assert "till" in page.inner_text("#zones-table tbody")
        page.screenshot(path=str(artifacts_dir / "dashboard-zones-lines.png"), full_page=True)

        # a camera without zones and lines: no empty panels
        page.click('button.camera[data-camera="shop/back"]')
        page.wait_for_selector("body[data-ready=true][data-selected='shop/back']")
        assert page.locator("#lines-panel").is_hidden() and page.locator("#zones-panel").is_hidden()
        assert not watch.errors, watch.errors
        page.close()


def test_site_overview_sorts_and_shows_fleet_health(browser, shop_store):
    from cloud_sink.api import create_app

    store, _ = shop_store
    with serve(create_app(store)) as url:
        page, watch = open_dashboard(browser, url)
        fleet = dict(_values(page, "#fleet .fleet-item", "id", "data-value"))
        assert fleet == {"fleet-offline": "1", "fleet-backlog": "321", "fleet-dead": "2"}
        assert "1 / 2" in page.inner_text("#fleet-offline")

        def order() -> list[str]:
            return [r[0] for r in _values(page, "#site-table tbody tr", "data-camera")]

        assert order() == ["shop/back", "shop/door"]  # by camera name at first
        table = page.inner_text("#site-table tbody")
        assert "yolov8n-int8 v7" in table and "offline" in table and "321" in table
        page.click('#site-table th[data-sort="entries_today"] button')
        assert order() == ["shop/door", "shop/back"]  # most entries today first (3 vs 1)
        assert page.get_attribute('#site-table th[data-sort="entries_today"]', "aria-sort") == "descending"
        page.click('#site-table th[data-sort="entries_today"] button')
        assert order() == ["shop/back", "shop/door"]
        page.click('#site-table th[data-sort="outbox"] button')
        assert order()[0] == "shop/back"  # the backlog first
        page.click('#site-table tbody tr[data-camera="shop/door"]')  # a row selects its camera
        page.wait_for_selector("body[data-ready=true][data-selected='shop/door']")
        assert page.text_content("#camera-title") == "shop / door"
        assert not watch.errors, watch.errors
        page.close()


def test_csv_downloads_follow_the_camera_and_range(browser, shop_store):
    from cloud_sink.api import create_app

    store, _ = shop_store
    today = _today()
    with serve(create_app(store, token="csv-token")) as url:
        page = browser.new_page(accept_downloads=True)
        page.goto(url + "#token=csv-token")
        page.wait_for_selector("body[data-ready=true]")
        page.click('button.camera[data-camera="shop/door"]')
        page.wait_for_selector("body[data-ready=true][data-selected='shop/door']")
        _pick(page, "7d")
        with page.expect_download() as info:
            page.click("#csv-daily")
        download = info.value
        assert download.suggested_filename == "smartcam-shop-door-daily.csv"
        lines = Path(download.path()).read_text().splitlines()
        assert lines[0].startswith("site,camera_id,zone,day,entries,exits")
        whole = [ln.split(",") for ln in lines[1:] if ln.split(",")[2] == ""]
        assert [(r[3], int(r[4])) for r in whole] == [(format_ts(today - d * DAY)[:10], n)
                                                        for d, n in ((3, 5), (1, 2), (0, 3))]
        with page.expect_download() as info:
            page.click("#csv-hourly")
        hourly = Path(info.value.path()).read_text().splitlines()
        assert hourly[0].startswith("site,camera_id,zone,hour,entries")
        assert sum(int(r.split(",")[4]) for r in hourly[1:] if r.split(",")[2] == "") == 10
        page.close()


def test_the_dashboard_fits_a_phone(browser, shop_store, artifacts_dir):
    from cloud_sink.api import create_app

    store, _ = shop_store
    with serve(create_app(store)) as url:
        page = browser.new_page(viewport={"width": 390, "height": 844}, device_scale_factor=2, is_mobile=True,
                                has_touch=True)
        watch = PageWatch(page)
        page.goto(url)
        page.wait_for_selector("body[data-ready=true]")
        page.tap('button.camera[data-camera="shop/door"]')
        page.wait_for_selector("body[data-ready=true][data-selected='shop/door']")
        page.tap('#range-picker button[data-range="30d"]')
        page.wait_for_selector("body[data-ready=true][data-range='30d']")
        # nothing wider than the screen: the page never scrolls sideways (wide tables scroll in their own box)
        assert page.evaluate("document.documentElement.scrollWidth") <= 390
        for chart in ("#chart-entries", "#chart-occupancy", "#chart-dwell", "#chart-lines", "#chart-zones"):
            box = page.locator(chart).bounding_box()
            assert box is not None and 250 <= box["width"] <= 390, (chart, box)
        assert page.locator("#range-picker").bounding_box()["width"] <= 390
        page.screenshot(path=str(artifacts_dir / "dashboard-phone.png"), full_page=True)
        assert not watch.errors, watch.errors
        page.close()


def test_names_from_events_are_never_interpreted_as_html(browser, tmp_path):
    """Names are validated at ingest, but the page must not trust the database: zone, line, site and camera
    names written straight into it with markup show as text and run nothing."""
    from cloud_sink.api import create_app
    from cloud_sink.store import Batch, Store
    from tests.sink_scenario import make_event

    t0 = _today() + HOUR
    zone, line = '<img src=x onerror="window.__pwned=1">', "<b>gate</b>"
    camera = '<script>window.__pwned=2</script>'
    events = [make_event("person.enter", t0, site="shop", camera="door", track_id=1),
              make_event("zone.enter", t0 + 1, site="shop", camera="door", track_id=1),
              make_event("count", t0 + 2, site="shop", camera="door", zone="door", count=1, previous=0),
              make_event("line.cross", t0 + 3, site="shop", camera="door", track_id=1),
              make_event("person.enter", t0 + 4, site="zz", camera="cam", track_id=2)]
    events[1]["zone"] = events[2]["zone"] = zone
    events[3]["line"] = line
    events[4]["camera_id"] = camera
    store = Store.open(f"sqlite:///{tmp_path / 'hostile.db'}")
    try:
        store.write(Batch(events=events))
        with serve(create_app(store)) as url:
            page, watch = open_dashboard(browser, url)
            page.click('button.camera[data-camera="shop/door"]')
            page.wait_for_selector("body[data-ready=true][data-selected='shop/door']")
            _pick(page, "today")
            assert page.locator("#zones-panel").is_visible() and page.locator("#lines-panel").is_visible()
            assert zone in page.inner_text("#zones-table") and line in page.inner_text("#lines-table")
            assert [z for (z,) in _values(page, "#chart-zones rect.bar", "data-zone")] == [zone, zone]  # max, mean
            assert zone in page.inner_text("#events") and line in page.inner_text("#events")
            assert f"zz/{camera}" in page.inner_text("#site-table")
            assert camera in page.inner_text("#cameras")
            assert page.evaluate("window.__pwned") is None
            assert page.locator("img").count() == 0 and page.locator("main b").count() == 0
            assert page.locator("script").count() == 1  # app.js only
            assert not watch.errors, watch.errors
            page.close()
    finally:
        store.close()


def test_camera_cards_show_the_model_and_a_failed_update(browser, scenario_store):
    """Over-the-air models (docs/models-ota.md): each card says which model runs and that an update failed."""
    from cloud_sink.api import create_app
    from cloud_sink.store import Batch
    from contract.model_docs import reported_document

    store, events = scenario_store
    site, camera = events[0]["site"], events[0]["camera_id"]
    doc = reported_document(site=site, camera_id=camera, ts_s=time.time(), state="rolled_back",
                            version="person-0123456789ab", sha256="ab" * 32, deployment="d-1",
                            reason="probation: people on 0% of frames", previous=None,
                            active={"version": None, "name": "yolov8n-int8", "sha256": "cd" * 32})
    store.write(Batch(models=[(site, camera, doc)]))
    with serve(create_app(store)) as url:
        page, watch = open_dashboard(browser, url)
        card = page.inner_text(f'#cameras [data-camera="{site}/{camera}"]')
        assert "yolov8n-int8 · update person-0123456789ab rolled back" in card, card
        others = page.inner_text("#cameras")
        assert others.count("update person-0123456789ab") == 1  # only that camera
        assert not watch.errors, watch.errors
        page.close()

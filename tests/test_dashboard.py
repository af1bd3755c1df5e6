"""The dashboard in real headless Chromium, served by uvicorn over a store holding the known scenario."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from contract.timestamps import format_ts
from tests.services import free_port
from tests.test_sink_api import HOUR, T0, fill, scenario

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-quic",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian chromium: run scripts/setup.sh"),
]


@contextmanager
def serve(app) -> Iterator[str]:
    """The app on a real uvicorn server (127.0.0.1, free port) in a thread; yields its base URL."""
    import uvicorn

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}/"
    finally:
        server.should_exit = True
        thread.join(10)


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture
def scenario_store(tmp_path):
    from cloud_sink.store import Store

    store = Store.open(f"sqlite:///{tmp_path / 'sink.db'}")
    events = scenario()
    fill(store, events)
    yield store, events
    store.close()


class PageWatch:
    """Console errors, page exceptions and every URL the page requested."""

    def __init__(self, page) -> None:
        self.errors: list[str] = []
        self.requests: list[str] = []
        page.on("console", lambda msg: self.errors.append(msg.text) if msg.type == "error" else None)
        page.on("pageerror", lambda exc: self.errors.append(str(exc)))
        page.on("request", lambda req: self.requests.append(req.url))


def open_dashboard(browser, url: str):
    """A desktop-sized page on the dashboard, watched, once its first refresh is done; (page, watch)."""
    page = browser.new_page(viewport={"width": 1360, "height": 1000})
    watch = PageWatch(page)
    page.goto(url)
    page.wait_for_selector("body[data-ready=true]", timeout=20000)
    return page, watch


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
    from tests.test_sink_summary import summaries_of

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

"""Issue 4's "done": a real clip run through the edge shows up in the report, the API, the dashboard and the archive.

Real parts only: the street clip through ``smartcam-edge run`` with the INT8 320 session model and the demo's
counting line and zone, a real Mosquitto, ``smartcam-sink run`` as a subprocess on SQLite and on a real
PostgreSQL server, with ``--http`` and ``--archive``. Every check compares against the edge's own
``--events-file`` (what it produced), never against hard-coded numbers.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.request
from collections import Counter
from pathlib import Path

import pytest

from tests.chromium import CHROMIUM, CHROMIUM_ARGS
from tests.conftest import ROOT, STREET_CLIP
from tests.sink_clients import SinkProcess, wait_for

SITE, CAM = "demo", "street-1"
MAX_FRAMES = "60"  # 12 s of the street clip at the config's 5 processed frames/s: people enter, cross and leave


def get_json(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=10) as resp:
        assert resp.status == 200
        return json.loads(resp.read())


def api_events(base: str) -> list[dict]:
    """Every event the API lists, following its pagination."""
    out: list[dict] = []
    offset: int | None = 0
    while offset is not None:
        page = get_json(f"{base}api/events?limit=50&offset={offset}")
        out += page["events"]
        offset = page["next_offset"]
    return out


def run_edge(model: Path, broker_url: str, workdir: Path) -> list[dict]:
    events_file = workdir / "events.jsonl"
    proc = subprocess.run(
        [sys.executable, "-m", "camera", "run", "--config", str(ROOT / "samples" / "demo_street.yaml"),
         "--source", str(STREET_CLIP), "--model", str(model), "--broker", broker_url, "--events-file",
         str(events_file), "--outbox", str(workdir / "outbox.db"), "--max-frames", MAX_FRAMES],
        cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "outbox drained" in proc.stderr
    return [json.loads(line) for line in events_file.read_text().splitlines() if line.strip()]


def check_dashboard(base: str, enters: int, artifacts_dir: Path) -> None:
    """This run's dashboard in real headless Chromium: the camera, its entries KPI, recent events; screenshot."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1360, "height": 1000})
            errors: list[str] = []
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            page.goto(base)
            page.wait_for_selector("body[data-ready=true]", timeout=30000)
            cards = page.eval_on_selector_all("button.camera", "els => els.map(e => e.dataset.camera)")
            assert cards == [f"{SITE}/{CAM}"]
            kpis = dict(page.eval_on_selector_all(
                "#kpis .kpi", "els => els.map(e => [e.lastChild.textContent, e.firstChild.textContent])"))
            assert kpis["entries"] == str(enters)
            assert page.locator("#events tbody tr").count() > 0
            page.screenshot(path=str(artifacts_dir / "dashboard-e2e.png"), full_page=True)
            assert not errors, errors
        finally:
            browser.close()


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_clip_through_edge_shows_up_in_report_api_dashboard_and_archive(
        backend, request, mosquitto, tmp_path, int8_model_320, artifacts_dir):
    db = f"sqlite:///{tmp_path / 'sink.db'}" if backend == "sqlite" else request.getfixturevalue("postgres_url")
    sink = SinkProcess(mosquitto.url, db, tmp_path)
    try:
        produced = run_edge(int8_model_320, mosquitto.url, tmp_path)
        by_id = {e["event_id"]: e for e in produced}
        assert len(by_id) == len(produced) > 0
        types = Counter(e["type"] for e in produced)
        assert types["person.enter"] > 0 and types["person.exit"] > 0 and types["line.cross"] > 0

        from cloud_sink.store import Store

        store = Store.open(db)
        try:
            wait_for(lambda: store.event_count() >= len(produced), 60, "the sink to store every event")
            time.sleep(1.0)  # a late duplicate would land now
            stored = store.events(limit=10 * len(produced))
            assert store.event_count() == len(produced)  # exactly once: nothing missing, nothing twice
            assert {e["event_id"]: e["payload"] for e in stored} == by_id  # stored exactly as produced
        finally:
            store.close()

        # The API lists every event once, as produced.
        listed = api_events(sink.base)
        assert len(listed) == len(produced)
        assert {e["event_id"]: e["payload"] for e in listed} == by_id

        # Hourly rollups: camera-level entries/exits = person.enter/exit events; zone rows = zone.enter/exit.
        cam_rows = get_json(f"{sink.base}api/stats/hourly")["hours"]  # camera level (no zone)
        assert cam_rows and {(h["site"], h["camera_id"], h["zone"]) for h in cam_rows} == {(SITE, CAM, None)}
        assert sum(h["entries"] for h in cam_rows) == types["person.enter"]
        assert sum(h["exits"] for h in cam_rows) == types["person.exit"]
        zone_rows: Counter[str] = Counter()
        for h in get_json(f"{sink.base}api/stats/hourly?zone=*")["hours"]:  # every zone
            zone_rows[h["zone"]] += h["entries"]
        assert zone_rows == Counter(e["zone"] for e in produced if e["type"] == "zone.enter")

        # The report (JSON) agrees with the edge's own events, lines included.
        report = json.loads(subprocess.run(
            [sys.executable, "-m", "cloud_sink", "report", "--db", db, "--since", "2h", "--json"],
            cwd=ROOT, capture_output=True, text=True, check=True).stdout)
        (cam,) = report["cameras"]
        assert (cam["site"], cam["camera_id"]) == (SITE, CAM)
        assert cam["events_total"] == report["events_total"] == len(produced)
        assert (cam["entries"], cam["exits"]) == (types["person.enter"], types["person.exit"])
        crossings = Counter(e["direction"] for e in produced if e["type"] == "line.cross")
        (line,) = cam["lines"]
        assert (line["line"], line["in"], line["out"]) == ("street", crossings["in"], crossings["out"])
        assert report["dead_letters"] == 0

        # The archive holds each event once, exactly as produced, in its hourly partition.
        wait_for(lambda: sum(len(f.read_text().splitlines()) for f in sink.archive.rglob("*.jsonl"))
                 >= len(produced), 10, "the archive")
        files = sorted(sink.archive.rglob("*.jsonl"))
        assert all(f"site={SITE}/camera={CAM}/date=" in str(f) for f in files)
        archived = [json.loads(line) for f in sorted(sink.archive.rglob("*.jsonl")) for line in
                    f.read_text().splitlines()]
        assert Counter(e["event_id"] for e in archived) == Counter(by_id.keys())  # each once
        assert {e["event_id"]: e for e in archived} == by_id

        if backend == "sqlite" and CHROMIUM.exists():
            check_dashboard(sink.base, types["person.enter"], artifacts_dir)
    finally:
        assert sink.stop() == 0, sink.log_path.read_text()[-2000:]

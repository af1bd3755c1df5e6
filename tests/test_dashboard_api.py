"""The API behind the review dashboard (issue 17): CSV exports and ``smartcam-sink serve`` (API, dashboard and
/metrics over a database, without ingesting), on real SQLite and a real uvicorn subprocess."""

from __future__ import annotations

import csv
import io
import signal
import socket
import subprocess
import sys
import urllib.request
import warnings
from pathlib import Path

import pytest

from contract.timestamps import format_ts
from tests.services import free_port, wait_for_port
from tests.sink_scenario import HOUR, T0, fill, make_event, scenario

with warnings.catch_warnings():  # starlette's notice about httpx vs httpx2 is not ours to fix
    warnings.simplefilter("ignore")
    from fastapi.testclient import TestClient

ROOT = Path(__file__).resolve().parents[1]
RANGE = {"since": format_ts(T0 - 3 * HOUR), "until": format_ts(T0 + 24 * HOUR)}


@pytest.fixture
def db(tmp_path) -> str:
    from cloud_sink.store import Store

    url = f"sqlite:///{tmp_path / 'sink.db'}"
    store = Store.open(url)
    fill(store, scenario())
    store.close()
    return url


@pytest.fixture
def client(db):
    from cloud_sink.api import create_app
    from cloud_sink.store import Store

    store = Store.open(db)
    yield TestClient(create_app(store))
    store.close()


def _rows(text: str) -> list[dict[str, str]]:
    return list(csv.DictReader(io.StringIO(text)))


def test_hourly_csv_has_the_same_figures_as_the_json(client):
    params = {**RANGE, "site": "lobby", "camera": "cam-1"}
    as_json = client.get("/api/stats/hourly", params=params).json()["hours"]
    response = client.get("/api/stats/hourly", params={**params, "format": "csv"})
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/csv")
    assert 'filename="smartcam-hourly.csv"' in response.headers["content-disposition"]
    rows = _rows(response.text)
    assert [(r["hour"], int(r["entries"]), int(r["exits"])) for r in rows] == [
        (h["hour"], h["entries"], h["exits"]) for h in as_json]
    assert [int(r["entries"]) for r in rows] == [3, 1, 2]  # the scenario's hand counts
    assert rows[0]["zone"] == "" and rows[0]["dwell_mean"] == "26.0"


def test_daily_json_and_csv_sum_the_hours_per_day(client):
    days = client.get("/api/stats/daily", params={**RANGE, "site": "lobby", "camera": "cam-1"}).json()["days"]
    assert [(d["day"], d["entries"], d["exits"], d["unique_tracks"]) for d in days] == [("2026-01-01", 6, 4, 6)]
    text = client.get("/api/stats/daily", params={**RANGE, "format": "csv", "zone": "*"}).text
    rows = _rows(text)
    assert [(r["site"], r["camera_id"], r["zone"], r["day"], r["entries"]) for r in rows] == [
        ("lobby", "cam-1", "door", "2026-01-01", "1")]
    assert text.splitlines()[0] == ("site,camera_id,zone,day,entries,exits,unique_tracks,occupancy_max,"
                                    "occupancy_mean,dwell_mean,loiters")


def test_csv_format_is_checked_and_needs_the_token(db):
    from cloud_sink.api import create_app
    from cloud_sink.store import Store

    store = Store.open(db)
    try:
        client = TestClient(create_app(store, token="t0ken"))
        assert client.get("/api/stats/daily", params={"format": "csv"}).status_code == 401
        headers = {"Authorization": "Bearer t0ken"}
        assert client.get("/api/stats/daily", params={"format": "xlsx"}, headers=headers).status_code == 422
        assert client.get("/api/stats/daily", params={"format": "csv"}, headers=headers).status_code == 200
    finally:
        store.close()


def test_csv_cells_that_look_like_formulas_are_text():
    from cloud_sink.csv_export import to_csv

    rows = _rows(to_csv([{"site": "=HYPERLINK(\"x\")", "camera_id": "+1", "entries": 3}],
                        ["site", "camera_id", "entries"]))
    assert rows == [{"site": "'=HYPERLINK(\"x\")", "camera_id": "'+1", "entries": "3"}]


def _get(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=10) as resp:
        return resp.read()


@pytest.mark.slow
def test_serve_answers_the_api_dashboard_and_metrics_without_ingesting(db, tmp_path):
    port = free_port()
    with open(tmp_path / "serve.log", "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "cloud_sink", "serve", "--db", db, "--http",
                                 f"127.0.0.1:{port}"], cwd=ROOT, stdout=log, stderr=log)
    try:
        wait_for_port(port, 30)
        base = f"http://127.0.0.1:{port}"
        import json

        cameras = json.loads(_get(f"{base}/api/cameras"))["cameras"]
        assert {(c["site"], c["camera_id"]) for c in cameras} == {("lobby", "cam-1"), ("lobby", "cam-2"),
                                                                  ("garage", "cam-1")}
        assert b"<title>smartcam" in _get(f"{base}/")
        metrics = _get(f"{base}/metrics").decode()
        assert 'smartcam_camera_online{camera="cam-1",site="lobby"} 1.0' in metrics
        assert "smartcam_sink_messages_total" not in metrics  # nothing is ingested here
        daily = _get(f"{base}/api/stats/daily?format=csv&site=lobby&camera=cam-1&since=2026-01-01T00:00:00Z")
        assert _rows(daily.decode())[0]["entries"] == "6"
        # another event written by an ingest worker shows up on the next request
        from cloud_sink.store import Batch, Store

        store = Store.open(db)
        store.write(Batch(events=[make_event("person.enter", T0 + 5 * HOUR, track_id=99)]))
        store.close()
        daily = _get(f"{base}/api/stats/daily?format=csv&site=lobby&camera=cam-1&since=2026-01-01T00:00:00Z")
        assert _rows(daily.decode())[0]["entries"] == "7"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)


def test_serve_refuses_a_port_in_use_and_an_exposed_address_without_token(db):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        proc = subprocess.run([sys.executable, "-m", "cloud_sink", "serve", "--db", db, "--http",
                               f"127.0.0.1:{port}"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "address already in use" in proc.stderr
    proc = subprocess.run([sys.executable, "-m", "cloud_sink", "serve", "--db", db, "--http", "0.0.0.0:8080"],
                          cwd=ROOT, capture_output=True, text=True, timeout=60, env={"PATH": "/usr/bin"})
    assert proc.returncode == 2 and "without a token" in proc.stderr

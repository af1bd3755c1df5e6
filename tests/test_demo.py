"""The one-command demo (scripts/demo.py) for real: model build, broker, sink, edge on the street clip, report.

Runs it as a user would (a subprocess), but with a short clip budget (--max-frames), a small model (--imgsz 320,
few calibration frames), a temp --out and --models-dir (nothing written into the repository) and a free port.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT, STREET_CLIP

DEMO = ROOT / "scripts" / "demo.py"


def run_demo(*args: str, timeout: float = 400) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(DEMO), *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("demo-models")


def assert_demo_succeeded(proc: subprocess.CompletedProcess, out: Path) -> dict:
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    produced = [json.loads(line)["event_id"] for line in (out / "events.jsonl").read_text().splitlines()]
    assert summary["events_produced"] == len(produced) > 0
    assert summary["events_stored"] == summary["events_produced"] and summary["events_missing"] == 0
    assert summary["all_stored"] is True
    assert summary["events_archived"] == summary["archive_lines"] == len(produced)  # each archived once
    assert f"All {len(produced)} events the edge produced were stored exactly once" in proc.stdout
    # The report was printed, with the camera's entries and the demo's counting line and zone.
    entries = sum(1 for line in (out / "events.jsonl").read_text().splitlines() if '"person.enter"' in line)
    assert entries > 0
    lines = proc.stdout.splitlines()
    header = next(line for line in lines if line.startswith("camera "))
    (row,) = [line for line in lines if line.startswith("demo/street-1 ")]
    table = dict(zip(re.split(r"\s{2,}", header.strip()), re.split(r"\s{2,}", row.strip()), strict=True))
    assert int(table["entries"]) == entries and int(table["events"]) == len(produced)
    assert "right_pavement" in proc.stdout and "street" in proc.stdout
    return summary


@pytest.mark.slow
def test_demo_builds_the_model_and_stores_every_event(tmp_path, models_dir):
    """Fresh models dir: the demo builds the INT8 model, then runs on the system Mosquitto."""
    out = tmp_path / "out"
    proc = run_demo("--max-frames", "40", "--imgsz", "320", "--calib-frames", "8", "--models-dir", str(models_dir),
                    "--out", str(out), "--http-port", "0", "--broker", "mosquitto")
    # The street clip is 1280x720: long side 320, short side fitted to 16:9 and rounded up to 32, as Ultralytics.
    assert "model: building an INT8 person model with a 192x320 input" in proc.stdout
    assert (models_dir / "yolov8n-person-int8-192x320.onnx").exists()
    assert (models_dir / "yolov8n-person-int8-192x320.json").exists()  # the manifest
    summary = assert_demo_succeeded(proc, out)
    assert summary["broker"] == "mosquitto"


@pytest.mark.slow
def test_demo_on_the_embedded_broker_reuses_the_model_and_cleans_its_previous_output(tmp_path, models_dir):
    """amqtt (MQTT 3.1.1) path; a second run into the same --out replaces the first run's output."""
    out = tmp_path / "out"
    args = ("--max-frames", "25", "--imgsz", "320", "--calib-frames", "8", "--models-dir", str(models_dir),
            "--out", str(out), "--http-port", "0", "--broker", "amqtt")
    first = run_demo(*args)
    assert_demo_succeeded(first, out)
    second = run_demo(*args)
    assert "already built" in second.stdout
    summary = assert_demo_succeeded(second, out)  # its events.jsonl and database hold only the second run
    assert summary["broker"] == "amqtt" and summary["broker_url"].endswith("?protocol=3.1.1")


@pytest.mark.slow
def test_demo_in_summary_mode_reports_the_same_figures_from_summaries(tmp_path, models_dir):
    """--summary: the edge sends per-window summaries; they stand for every event and the report is unchanged."""
    out = tmp_path / "out"
    proc = run_demo("--max-frames", "40", "--imgsz", "320", "--calib-frames", "8", "--models-dir", str(models_dir),
                    "--out", str(out), "--http-port", "0", "--summary")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    produced = [json.loads(line) for line in (out / "events.jsonl").read_text().splitlines()]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["mode"] == "summary" and summary["all_stored"] is True
    assert summary["events_summarised"] == summary["events_produced"] == len(produced) > 0
    assert summary["summaries_stored"] >= 1
    assert f"stood for all {len(produced)} events the edge produced" in proc.stdout
    lines = proc.stdout.splitlines()
    header = next(line for line in lines if line.startswith("camera "))
    (row,) = [line for line in lines if line.startswith("demo/street-1 ")]
    table = dict(zip(re.split(r"\s{2,}", header.strip()), re.split(r"\s{2,}", row.strip()), strict=True))
    entries = sum(1 for e in produced if e["type"] == "person.enter")
    assert int(table["entries"]) == entries and int(table["events"]) == len(produced)
    assert "summaries stored: " in proc.stdout and "events stored: 0" in proc.stdout  # no per-event record


def test_bad_source_is_a_one_line_error(tmp_path):
    proc = run_demo("--source", str(tmp_path / "nope.mp4"), "--out", str(tmp_path / "out"), timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.startswith("demo: error: source not found") and proc.stderr.count("\n") == 1
    assert not (tmp_path / "out").exists()


def test_refuses_to_wipe_a_directory_it_did_not_make(tmp_path):
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "thesis.tex").write_text("do not delete")
    proc = run_demo("--source", str(STREET_CLIP), "--out", str(precious), timeout=60)
    assert proc.returncode == 2 and "is not empty" in proc.stderr and proc.stderr.count("\n") == 1
    assert (precious / "thesis.tex").read_text() == "do not delete"


@pytest.mark.slow
def test_serve_keeps_the_dashboard_up_until_terminated(tmp_path, models_dir):
    """--serve: the dashboard and API answer after the run; SIGTERM stops the demo, the sink and the broker."""
    import signal
    import time
    import urllib.request

    from tests.services import free_port

    out, port = tmp_path / "out", free_port()
    with open(tmp_path / "demo.log", "wb") as log:  # a file, not a pipe nobody reads while it serves
        proc = subprocess.Popen([sys.executable, str(DEMO), "--max-frames", "15", "--imgsz", "320", "--calib-frames",
                                 "8", "--models-dir", str(models_dir), "--out", str(out), "--http-port", str(port),
                                 "--serve"], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 300
        while not (out / "summary.json").exists():
            assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "demo.log").read_text()[-3000:]
            time.sleep(0.5)
        time.sleep(0.5)
        summary = json.loads((out / "summary.json").read_text())
        assert summary["dashboard"] == f"http://127.0.0.1:{port}/"
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/events?limit=1000", timeout=10) as resp:
            assert len(json.loads(resp.read())["events"]) == summary["events_produced"]
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=10) as resp:
            assert b"smartcam" in resp.read()
        assert proc.poll() is None  # still serving
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    with pytest.raises(OSError):  # the sink is gone with it
        urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)


@pytest.mark.slow
def test_ctrl_c_stops_the_edge_early_and_still_reports_everything_it_produced(tmp_path, models_dir):
    """The way to end a live source: one SIGINT stops the edge (which sends what it queued), then the report."""
    import signal
    import time

    from tests.conftest import INDOOR_CLIP

    out = tmp_path / "out"
    with open(tmp_path / "demo.log", "wb") as log:
        proc = subprocess.Popen([sys.executable, str(DEMO), "--source", str(INDOOR_CLIP), "--config", "none",
                                 "--imgsz", "320", "--calib-frames", "8", "--models-dir", str(models_dir), "--out",
                                 str(out), "--http-port", "0"], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    try:
        events = out / "events.jsonl"
        deadline = time.monotonic() + 300
        while not (events.exists() and events.read_text().count("\n") >= 3):
            assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "demo.log").read_text()[-3000:]
            time.sleep(0.2)
        proc.send_signal(signal.SIGINT)
        rc = proc.wait(120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    text = (tmp_path / "demo.log").read_text()
    assert rc == 0, text[-3000:]
    assert "Ctrl-C: stopping the edge" in text
    import cv2

    cap = cv2.VideoCapture(str(INDOOR_CLIP))
    total = int(cap.get(cv2.CAP_PROP_FRAME_COUNT))
    cap.release()
    (read,) = [int(m) for m in re.findall(r"done: \d+ frames processed \((\d+) read", text)]
    assert 0 < read < total  # it really stopped early
    summary = json.loads((out / "summary.json").read_text())
    assert summary["all_stored"] and summary["events_stored"] == summary["events_produced"] >= 3
    assert "demo/street-1" in text  # the report ran

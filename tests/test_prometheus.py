"""Prometheus metrics (cloud_sink/metrics.py, camera/metrics.py) and deploy/prometheus/, with the real programs:
promtool checks and unit-tests the shipped config and alert rules, and a real Prometheus (Debian's 2.42) scrapes
a running ``smartcam-sink run`` and a running ``smartcam-edge run --metrics``."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from cloud_sink.api import create_app
from cloud_sink.ingest import Ingestor
from cloud_sink.metrics import SinkMetrics
from cloud_sink.store import Store
from contract.ids import new_event_id
from contract.timestamps import format_ts
from tests.conftest import ONNX_FP32, STREET_CLIP
from tests.services import _find_binary, free_port, wait_for_port
from tests.sink_clients import SinkProcess

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy" / "prometheus"
SITE, CAM = "lab", "cam-1"


def samples(text: str) -> dict[tuple[str, tuple], float]:
    """{(sample name, sorted labels): value} of a text exposition, parsed by prometheus-client's own parser."""
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(parsed: dict, name: str, **labels: str) -> float | None:
    return parsed.get((name, tuple(sorted(labels.items()))))


def promtool(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([_find_binary("promtool"), *args], cwd=DEPLOY, capture_output=True, text=True, timeout=60)


def test_promtool_accepts_the_example_config_and_the_alert_rules_fire_as_tested():
    for args in (("check", "config", "prometheus.yml"), ("check", "rules", "alerts.yml"),
                 ("test", "rules", "alerts.test.yml")):
        proc = promtool(*args)
        assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "SUCCESS" in promtool("test", "rules", "alerts.test.yml").stdout
    rules = promtool("check", "rules", "alerts.yml").stdout
    assert "4 rules found" in rules


def _event(ts: float, **extra) -> dict:
    return {"schema_version": 1, "site": SITE, "camera_id": CAM, "ts": format_ts(ts),
            "model": {"name": "m", "sha256": "0" * 12}, "frame": {"width": 640, "height": 480},
            "event_id": new_event_id(), **extra}


def test_sink_metrics_count_what_ingest_does_and_show_each_camera(tmp_path):
    store = Store.open(f"sqlite:///{tmp_path / 'sink.db'}")
    metrics = SinkMetrics()
    ingestor = Ingestor(store, metrics=metrics)
    client = TestClient(create_app(store, metrics=metrics))
    try:
        before = samples(client.get("/metrics").text)
        assert value(before, "smartcam_sink_events_stored_total") == 0
        now = time.time()
        good = [_event(now - 5 + i, type="count", count=i, previous=max(0, i - 1)) for i in range(3)]
        topic = f"smartcam/{SITE}/{CAM}/events"
        ingestor.handle([(topic, json.dumps(e).encode()) for e in good] + [
            (topic, b"{not json"), (topic, json.dumps(_event(now - 500 * 86400, type="count", count=1, previous=0)).encode()),
            (topic, json.dumps(good[0]).encode())])  # the last one: a duplicate
        ingestor.handle([(f"smartcam/{SITE}/{CAM}/status", b"online")])
        response = client.get("/metrics")
        assert response.headers["content-type"].startswith("text/plain; version=")
        after = samples(response.text)
        assert value(after, "smartcam_sink_messages_total") == 7
        assert value(after, "smartcam_sink_events_stored_total") == 3
        assert value(after, "smartcam_sink_duplicates_total") == 1
        assert value(after, "smartcam_sink_dead_letters_total", reason="json") == 1
        assert value(after, "smartcam_sink_dead_letters_total", reason="time") == 1
        assert value(after, "smartcam_sink_dead_letters_total", reason="schema") == 0  # there, at zero
        assert value(after, "smartcam_sink_dead_letters_stored") == 2
        assert value(after, "smartcam_sink_batch_commit_seconds_count") == 2
        assert value(after, "smartcam_sink_database_errors_total", kind="unavailable") == 0
        cam = {"site": SITE, "camera": CAM}
        assert value(after, "smartcam_camera_online", **cam) == 1
        assert 0 <= value(after, "smartcam_camera_last_seen_age_seconds", **cam) < 60
        assert value(after, "smartcam_camera_events_stored", **cam) == 3
    finally:
        store.close()


def test_sink_metrics_need_the_api_token_when_one_is_set(tmp_path):
    store = Store.open(f"sqlite:///{tmp_path / 'sink.db'}")
    try:
        client = TestClient(create_app(store, token="s3cret"))
        assert client.get("/metrics").status_code == 401
        ok = client.get("/metrics", headers={"Authorization": "Bearer s3cret"})
        assert ok.status_code == 200 and "smartcam_sink_dead_letters_stored" in ok.text
    finally:
        store.close()


def test_edge_refuses_a_metrics_address_it_cannot_listen_on(tmp_path):
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        proc = subprocess.run([sys.executable, "-m", "camera", "run", "--source", str(STREET_CLIP), "--model",
                               str(ONNX_FP32), "--camera-id", CAM, "--no-broker", "--max-frames", "1",
                               "--metrics", f"127.0.0.1:{port}"], cwd=ROOT, capture_output=True, text=True,
                              timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert f"cannot serve metrics on 127.0.0.1:{port}: address already in use" in proc.stderr
    bad = subprocess.run([sys.executable, "-m", "camera", "run", "--source", str(STREET_CLIP), "--model",
                          str(ONNX_FP32), "--camera-id", CAM, "--no-broker", "--metrics", "9108"], cwd=ROOT,
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "metrics.listen: '9108' must be HOST:PORT" in bad.stderr


# ------------------------------------------------------------------------------------------ real Prometheus
class Prometheus:
    """A real Prometheus server on 127.0.0.1, scraping ``targets`` ({job: host:port}) every second."""

    def __init__(self, workdir: Path, targets: dict[str, str]) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        jobs = "".join(f"  - job_name: {job}\n    static_configs:\n      - targets: ['{target}']\n"
                       for job, target in targets.items())
        conf = workdir / "prometheus.yml"
        conf.write_text(f"global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nscrape_configs:\n{jobs}")
        self.log = workdir / "prometheus.log"
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(
                [_find_binary("prometheus"), f"--config.file={conf}", f"--storage.tsdb.path={workdir / 'data'}",
                 f"--web.listen-address=127.0.0.1:{self.port}"], stdout=log, stderr=log)
        wait_for_port(self.port, 30)
        wait_until(self._ready, 30, "Prometheus to be ready")

    def _ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/-/ready", timeout=5) as resp:
                return resp.status == 200
        except OSError:  # 503 while it starts (HTTPError is an OSError)
            return False

    def query(self, expr: str) -> list[dict]:
        url = f"http://127.0.0.1:{self.port}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
        with urllib.request.urlopen(url, timeout=10) as resp:
            body = json.loads(resp.read())
        assert body["status"] == "success", body
        return body["data"]["result"]

    def scalar(self, expr: str) -> float | None:
        result = self.query(expr)
        return float(result[0]["value"][1]) if result else None

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


def wait_until(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = predicate()
        if result:
            return result
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.mark.slow
def test_prometheus_scrapes_a_running_sink_and_edge_and_the_series_move(mosquitto, tmp_path):
    sink = SinkProcess(mosquitto.url, f"sqlite:///{tmp_path / 'sink.db'}", tmp_path)
    edge_port = free_port()
    edge = subprocess.Popen(
        [sys.executable, "-m", "camera", "run", "--source", str(STREET_CLIP), "--model", str(ONNX_FP32),
         "--camera-id", CAM, "--site", SITE, "--broker", mosquitto.url, "--outbox", str(tmp_path / "outbox.db"),
         "--fps", "5", "--realtime", "--loop", "0", "--stats-interval", "1", "--batch-linger", "0.5",
         "--metrics", f"127.0.0.1:{edge_port}"], cwd=ROOT, stdout=subprocess.DEVNULL,
        stderr=open(tmp_path / "edge.log", "wb"))  # noqa: SIM115
    prom = None
    try:
        wait_for_port(edge_port, 60)
        prom = Prometheus(tmp_path / "prometheus", {"smartcam-sink": f"127.0.0.1:{sink.port}",
                                                    "smartcam-edge": f"127.0.0.1:{edge_port}"})
        wait_until(lambda: len(prom.query("up == 1")) == 2, 30, "Prometheus to scrape both targets")
        cam = f'site="{SITE}",camera="{CAM}"'
        # events flow: the sink's and the edge's counters grow between two looks
        first = wait_until(lambda: prom.scalar("smartcam_sink_events_stored_total"), 60, "events stored")
        frames = prom.scalar(f"smartcam_edge_frames_processed_total{{{cam}}}")
        wait_until(lambda: prom.scalar("smartcam_sink_events_stored_total") > first
                   and prom.scalar(f"smartcam_edge_frames_processed_total{{{cam}}}") > frames, 60,
                   "the sink's and the edge's counters to move")
        assert prom.scalar(f"smartcam_edge_events_total{{{cam}}}") > 0
        assert prom.scalar(f"smartcam_edge_mqtt_connected{{{cam}}}") == 1
        assert prom.scalar(f"smartcam_edge_outbox_depth{{{cam}}}") is not None
        assert prom.scalar(f'smartcam_edge_inference_milliseconds{{{cam},quantile="0.5"}}') > 0
        assert prom.scalar("smartcam_sink_batch_commit_seconds_count") > 0
        assert prom.scalar("smartcam_sink_messages_total") >= first
        assert prom.scalar(f"smartcam_camera_online{{{cam}}}") == 1
        assert prom.scalar(f"smartcam_camera_last_seen_age_seconds{{{cam}}}") < 60
        wait_until(lambda: prom.scalar(f"smartcam_camera_outbox_depth{{{cam}}}") is not None, 30,
                   "the camera's outbox depth from its stats")
        wait_until(lambda: prom.scalar("smartcam_sink_archive_events_total"), 30, "the archive follower's events")
        assert prom.scalar("smartcam_sink_archive_lag_events") is not None
        assert prom.scalar("smartcam_sink_archive_failures_total") == 0

        # a broken payload: the dead-letter series appears with its reason, and the rules' expression sees it
        assert prom.scalar('smartcam_sink_dead_letters_total{reason="json"}') == 0  # exists before the first
        bad = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="bad-camera")
        bad.connect("127.0.0.1", mosquitto.port)
        bad.loop_start()
        bad.publish(f"smartcam/{SITE}/{CAM}/events", b"{oops", qos=1).wait_for_publish(5)
        bad.loop_stop()
        bad.disconnect()
        wait_until(lambda: prom.scalar('smartcam_sink_dead_letters_total{reason="json"}') == 1, 30,
                   "the dead letter to be counted")
        wait_until(lambda: prom.query("sum by (reason) (increase(smartcam_sink_dead_letters_total[1m])) > 0"), 30,
                   "the alert expression to see the dead letters rising")

        # the edge stops: its retained status goes offline and the sink's gauge follows
        edge.send_signal(signal.SIGTERM)
        assert edge.wait(60) == 0
        wait_until(lambda: prom.scalar(f"smartcam_camera_online{{{cam}}}") == 0, 30, "the camera to show offline")
        wait_until(lambda: prom.scalar('up{job="smartcam-edge"}') == 0, 30, "the edge target to be down")
    finally:
        if edge.poll() is None:
            edge.kill()
            edge.wait(10)
        if prom is not None:
            prom.stop()
        sink.stop()


@pytest.mark.slow
def test_a_database_outage_counts_errors_and_retries_and_nothing_is_lost(mosquitto):
    """A real PostgreSQL stopped under a running ingest: the unavailable-error and retry counters move, and once
    it is back the event is stored (the batch was kept unacknowledged meanwhile)."""
    import threading

    from cloud_sink.ingest import Subscriber
    from contract.broker import BrokerSettings
    from tests.services import start_postgres

    pg = start_postgres()
    store = None
    try:
        store = Store.open(pg.create_database("metrics_outage"))
        metrics = SinkMetrics()
        sub = Subscriber(Ingestor(store, metrics=metrics), BrokerSettings.from_url(mosquitto.url),
                         client_id="metrics-outage-sink")
        sub.start()
        runner = threading.Thread(target=sub.run, daemon=True)
        runner.start()
        camera = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="metrics-outage-cam")
        camera.connect("127.0.0.1", mosquitto.port)
        camera.loop_start()
        topic = f"smartcam/{SITE}/{CAM}/events"

        def now(name: str, **labels: str) -> float:
            return value(samples(metrics.exposition().decode()), name, **labels) or 0.0

        time.sleep(0.5)  # the sink's subscription
        first = _event(time.time(), type="count", count=1, previous=0)
        camera.publish(topic, json.dumps(first), qos=1).wait_for_publish(5)
        wait_until(lambda: now("smartcam_sink_events_stored_total") == 1, 20, "the first event stored")
        assert now("smartcam_sink_database_errors_total", kind="unavailable") == 0

        pg.ctl("stop")
        second = _event(time.time(), type="count", count=2, previous=1)
        camera.publish(topic, json.dumps(second), qos=1).wait_for_publish(5)
        wait_until(lambda: now("smartcam_sink_database_errors_total", kind="unavailable") >= 2, 30,
                   "the sink to count the database errors")
        assert now("smartcam_sink_database_retries_total") >= 1
        assert now("smartcam_sink_events_stored_total") == 1
        pg.ctl("restart")
        wait_until(lambda: now("smartcam_sink_events_stored_total") == 2, 60, "the event stored after the outage")
        assert store.event_count() == 2
        camera.loop_stop()
        camera.disconnect()
        sub.stop()
        runner.join(20)
    finally:
        if store is not None:
            store.close()
        pg.stop()

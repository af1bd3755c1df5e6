"""A real sink for tests to feed: in-process (:class:`RealSink`), as ``smartcam-sink run`` subprocesses
(:func:`sink_process`, :class:`SinkProcess` with its API and archive), and a QoS 1 publisher that waits for
every PUBACK. Shared by the ingest, batching, summary, archive, end-to-end and Prometheus tests."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from cloud_sink.ingest import Ingestor, Subscriber
from cloud_sink.store import Store
from contract.broker import BrokerSettings, make_client
from contract.topics import topic_for
from tests.conftest import make_event
from tests.services import ROOT, free_port, wait_for_port


def now_event(type_: str = "person.enter", **fields) -> dict:
    """A valid event stamped now (the live sink checks timestamps against its clock)."""
    return make_event(type_, ts=fields.pop("ts", time.time()), **fields)


def raw(ev: dict) -> tuple[str, bytes]:
    return topic_for(ev["site"], ev["camera_id"], "events"), json.dumps(ev).encode()


def publish(url: str, messages: list[tuple[str, bytes]], *, retain: bool = False, qos: int = 1) -> None:
    """Publish with QoS 1 and wait for every PUBACK."""
    client = make_client(BrokerSettings.from_url(url), f"pub-{os.getpid()}-{time.monotonic_ns()}")
    client.connect(BrokerSettings.from_url(url).host, BrokerSettings.from_url(url).port)
    client.loop_start()
    try:
        infos = [client.publish(t, p, qos=qos, retain=retain) for t, p in messages]
        for info in infos:
            info.wait_for_publish(timeout=30)
    finally:
        client.disconnect()
        client.loop_stop()


def wait_for(predicate, timeout: float = 30.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def sink_process(broker_url: str, db: str, client_id: str, log_path: Path) -> subprocess.Popen:
    log = open(log_path, "ab")  # noqa: SIM115  (the child keeps its own descriptor)
    try:
        return subprocess.Popen([sys.executable, "-m", "cloud_sink", "run", "--broker", broker_url, "--db", db,
                                 "--client-id", client_id, "--log-every", "1"], stdout=log, stderr=log, cwd=ROOT)
    finally:
        log.close()


def stop_process(proc: subprocess.Popen, sig: int = signal.SIGTERM) -> int:
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            return proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
    return proc.wait(5)


def wait_connected(log_path: Path, times: int = 1) -> None:
    wait_for(lambda: log_path.exists() and log_path.read_text().count("subscribed to") >= times, 30,
             "sink subscriptions acknowledged")


class SinkProcess:
    """``smartcam-sink run`` as a subprocess with the API and a local archive; stops by PID."""

    def __init__(self, broker_url: str, db: str, workdir: Path) -> None:
        self.port = free_port()
        self.log_path = workdir / "sink.log"
        self.archive = workdir / "archive"
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "cloud_sink", "run", "--broker", broker_url, "--db", db, "--client-id",
                 "e2e-sink", "--http", f"127.0.0.1:{self.port}", "--archive", str(self.archive), "--log-every", "1"],
                stdout=log, stderr=log, cwd=ROOT)
        wait_for(lambda: self.proc.poll() is not None or "subscribed to" in self.log_path.read_text(), 60,
                 "the sink's subscriptions to be acknowledged")
        assert self.proc.poll() is None, self.log_path.read_text()[-2000:]
        wait_for_port(self.port, 30)
        self.base = f"http://127.0.0.1:{self.port}/"

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                return self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        return self.proc.wait(5)


class RealSink:
    """The sink's MQTT ingest loop in a thread, storing into an SQLite file."""

    def __init__(self, url: str, db: Path, client_id: str = "batch-test-sink") -> None:
        self.db_url = f"sqlite:///{db}"
        self.store = Store.open(self.db_url)
        self.ingestor = Ingestor(self.store)
        self.sink = Subscriber(self.ingestor, BrokerSettings.from_url(url), client_id=client_id)
        self.sink.start()
        # the SUBACK: the persistent session and its subscriptions exist before anything is published
        assert self.sink.subscribed.wait(10), "the sink's subscriptions were not acknowledged"
        self.thread = threading.Thread(target=self.sink.run, daemon=True)
        self.thread.start()

    def stored_ids(self) -> list[str]:
        return [e["event_id"] for e in self.store.events(limit=100_000)]

    def wait_stored(self, n: int, timeout: float = 60) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.store.event_count() >= n:
                return True
            time.sleep(0.1)
        return self.store.event_count() >= n

    def close(self) -> None:
        self.sink.stop()
        self.thread.join(20)
        self.store.close()

"""End-to-end acknowledgement (``publish.confirm: sink``): a broker crash loses nothing.

A broker's PUBACK is not the end of the line: Mosquitto keeps undelivered messages in memory and saves them at
best every 30 s, so SIGKILL loses what it had acknowledged but not delivered. With ``--confirm sink`` the edge
keeps every event until the sink says (on ``.../ack``) it has committed it, and sends it again otherwise.

The scenario makes the loss certain rather than lucky: the sink is SIGKILLed first, so the broker holds the
events published meanwhile for the sink's persistent session; then the broker is SIGKILLed and restarted with
no persistence file (everything it held is gone, sessions included); then the sink comes back. The same run with
``--confirm broker`` (the pre-existing behaviour) shows the events that vanish — the test that proves the
scenario can fail — and with ``--confirm sink`` every event of the edge's events file is stored exactly once.
Also with two sink workers in a shared subscription group, the broker SIGKILLed while both are ingesting.

Real parts throughout: the edge on the street clip with the shipped INT8 model, Mosquitto, the sink on SQLite.
"""

from __future__ import annotations

import os
import shutil
import signal
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.conftest import STREET_CLIP, Counts, Proc, events_file_ids, stored_event_ids, wait_until
from tests.secure_broker import SITE as SECURE_SITE
from tests.secure_broker import start_secure_broker
from tests.services import start_mosquitto

pytestmark = pytest.mark.slow

BIN = Path(sys.executable).parent
SITE, CAMERA = "confirm", "cam1"
CONFIRM_TIMEOUT_S = "5"  # re-send after 5 s without the sink's confirmation (the default is 30 s)


def _bin(name: str) -> str:
    path = BIN / name
    return str(path) if path.exists() else (shutil.which(name) or name)


class Rig:
    def __init__(self, work: Path, broker, model: Path) -> None:
        self.work, self.broker, self.model = work, broker, model
        self.db = f"sqlite:///{work / 'sink.db'}"
        self.events = work / "events.jsonl"
        self.procs: list[Proc] = []
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1"}

    def sink(self, name: str = "sink", *extra: str) -> Proc:
        log = self.work / f"{name}.log"
        seen = log.read_text().count("subscribed to") if log.exists() else 0
        p = Proc([_bin("smartcam-sink"), "run", "--broker", self.broker.url, "--db", self.db, "--client-id", name,
                  "--log-every", "5", *extra], log, self.env).start()
        self.procs.append(p)
        wait_until(lambda: p.output().count("subscribed to") > seen, 60, f"{name} to subscribe", p.proc, log)
        return p

    def edge(self, confirm: str, frames: int = 100) -> Proc:
        p = Proc([_bin("smartcam-edge"), "run", "--source", str(STREET_CLIP), "--model", str(self.model),
                  "--camera-id", CAMERA, "--site", SITE, "--broker", self.broker.url, "--events-file",
                  str(self.events), "--outbox", str(self.work / "outbox.db"), "--fps", "4", "--threads", "1",
                  "--streams", "1", "--realtime", "--loop", "0", "--max-frames", str(frames), "--confirm", confirm,
                  "--confirm-timeout", CONFIRM_TIMEOUT_S, "--drain-timeout", "60", "--stats-interval", "2"],
                 self.work / "edge.log", self.env).start()
        self.procs.append(p)
        return p

    def file_ids(self) -> list[str]:
        return events_file_ids(self.events)

    def stored(self) -> list[str]:
        return stored_event_ids(self.db)

    def crash_broker(self) -> None:
        """SIGKILL, then start again from nothing: this test broker runs with ``persistence false``, so the
        restart has no file to read — every queued message and every session is gone."""
        self.broker.stop(signal.SIGKILL)
        self.broker.start()

    def stop(self) -> None:
        for p in self.procs:
            p.kill()


def _run(scenario, work: Path, model: Path, *args) -> BaseException | tuple[Counts, float]:
    """One scenario on its own broker; returns its counts and wall time, or what it raised."""
    started = time.monotonic()
    broker = start_mosquitto(work / "mosquitto")
    r = Rig(work, broker, model)
    try:
        return scenario(r, *args), round(time.monotonic() - started, 1)
    except BaseException as exc:  # noqa: BLE001 - pytest.fail's Failed included; re-raised by the test
        return exc
    finally:
        r.stop()
        broker.stop()


def _through_the_deployment_acl(work: Path, model: Path) -> BaseException | tuple[Counts, float]:
    """The generated deployment (users, ACL from deploy/make-credentials.sh): the sink may write the cameras'
    .../ack and each camera may read its own, so confirmation works with auth on (and nothing else opens)."""
    started = time.monotonic()
    base = Path(tempfile.mkdtemp(prefix="smartcam-confirm-acl-"))
    base.chmod(0o755)  # the broker drops to user mosquitto
    sb = start_secure_broker(base)
    procs: list[Proc] = []
    try:
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        db = f"sqlite:///{work / 'sink.db'}"
        sink = Proc([_bin("smartcam-sink"), "run", "--broker", f"mqtt://sink@127.0.0.1:{sb.plain_port}", "--db", db],
                    work / "sink.log", {**env, "SMARTCAM_MQTT_PASSWORD": sb.passwords["sink"]}).start()
        procs.append(sink)
        wait_until(lambda: "connected to" in sink.output(), 60, "the sink to connect", sink.proc, sink.log)
        time.sleep(0.5)
        edge = Proc([_bin("smartcam-edge"), "run", "--source", str(STREET_CLIP), "--model", str(model),
                     "--camera-id", "cam1", "--site", SECURE_SITE, "--broker",
                     f"mqtt://cam1@127.0.0.1:{sb.plain_port}", "--events-file", str(work / "events.jsonl"),
                     "--outbox", str(work / "outbox.db"), "--fps", "4", "--threads", "1", "--streams", "1",
                     "--max-frames", "40", "--confirm", "sink", "--confirm-timeout", CONFIRM_TIMEOUT_S,
                     "--drain-timeout", "60"], work / "edge.log",
                    {**env, "SMARTCAM_MQTT_PASSWORD": sb.passwords["cam1"]}).start()
        procs.append(edge)
        rc = edge.wait(240)
        ids = events_file_ids(work / "events.jsonl")
        wait_until(lambda: set(ids) <= set(stored_event_ids(db)), 60, "every event stored")
        c = Counts.of("confirm=sink through the deployment's ACL", ids, stored_event_ids(db),
                      detail={"edge_exit": rc})
        c.detail["log"] = edge.output()[-3000:]
        return c, round(time.monotonic() - started, 1)
    except BaseException as exc:  # noqa: BLE001
        return exc
    finally:
        for p in procs:
            p.kill()
        sb.broker.stop()
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="module")
def results(tmp_path_factory, int8_model_320) -> dict[str, BaseException | tuple[Counts, float]]:
    """The three scenarios are independent (own broker, sinks, edge): run them concurrently."""
    jobs = {"sink": (_crash_with_sink_down, "sink"), "broker": (_crash_with_sink_down, "broker"),
            "share": (_crash_with_share_group,)}
    with ThreadPoolExecutor(len(jobs) + 1) as pool:
        futures = {name: pool.submit(_run, job[0], tmp_path_factory.mktemp(name), int8_model_320, *job[1:])
                   for name, job in jobs.items()}
        futures["acl"] = pool.submit(_through_the_deployment_acl, tmp_path_factory.mktemp("acl"), int8_model_320)
        out = {name: f.result() for name, f in futures.items()}
    print(f"\nCONFIRM wall s: { {k: v[1] for k, v in out.items() if isinstance(v, tuple)} }")
    return out


def _counts(results: dict, name: str, record_property) -> Counts:
    if isinstance(results[name], BaseException):
        raise results[name]
    c, wall = results[name]
    for key in ("emitted", "stored_rows", "lost", "stored_twice"):
        record_property(key, getattr(c, key))
    record_property("wall_s", wall)
    return c


def _crash_with_sink_down(rig: Rig, confirm: str) -> Counts:
    sink = rig.sink()
    edge = rig.edge(confirm)
    wait_until(lambda: len(rig.stored()) >= 10, 120, "10 events stored", edge.proc, edge.log)
    sink.kill(signal.SIGKILL)
    before = len(rig.file_ids())
    wait_until(lambda: len(rig.file_ids()) >= before + 12, 120, "12 events queued for the dead sink", edge.proc,
               edge.log)
    time.sleep(2.5)  # past the batch linger: the broker has acknowledged them to the edge
    rig.crash_broker()
    at_crash = len(rig.file_ids())
    rig.sink()
    rc = edge.wait(240)
    if confirm == "sink":
        wait_until(lambda: set(rig.file_ids()) <= set(rig.stored()), 60, "every event stored")
    else:
        time.sleep(5.0)  # what the sink will ever get has arrived by now
    c = Counts.of(f"broker SIGKILL, no persistence, confirm={confirm}", rig.file_ids(), rig.stored(),
                  during_fault=at_crash - before, detail={"edge_exit": rc})
    c.detail["log"] = edge.output()[-3000:]
    return c


def _crash_with_share_group(rig: Rig) -> Counts:
    workers = [rig.sink(f"worker{i}", "--share-group", "ingest") for i in (1, 2)]
    edge = rig.edge("sink")
    wait_until(lambda: len(rig.stored()) >= 15, 120, "15 events stored", edge.proc, edge.log)
    rig.crash_broker()  # mid-stream, both workers ingesting
    crashed_at = len(rig.file_ids())
    rc = edge.wait(240)
    wait_until(lambda: set(rig.file_ids()) <= set(rig.stored()), 60, "every event stored")
    c = Counts.of("broker SIGKILL, no persistence, 2 share-group workers, confirm=sink", rig.file_ids(),
                  rig.stored(), during_fault=len(rig.file_ids()) - crashed_at, detail={"edge_exit": rc})
    c.detail.update(workers_alive=all(w.alive() for w in workers), log=edge.output()[-3000:])
    return c


def test_broker_sigkill_without_persistence_sink_confirm(results, record_property):
    c = _counts(results, "sink", record_property)
    assert c.emitted > 0
    assert c.lost == 0, f"{c.lost} event(s) lost"
    assert c.stored_twice == 0, f"{c.stored_twice} event(s) stored twice"
    assert c.detail["edge_exit"] == 0, c.detail["log"]
    assert "sending them again" in c.detail["log"] and "every event confirmed by the sink" in c.detail["log"]


def test_broker_sigkill_without_persistence_broker_confirm_loses_events(results, record_property):
    """The pre-existing guarantee in the same scenario: what the crashed broker held is gone. This is the run
    that proves the scenario can fail, and what ``confirm: sink`` fixes."""
    c = _counts(results, "broker", record_property)
    assert c.emitted > 0 and c.stored_twice == 0
    assert c.lost > 0, "the scenario lost nothing even without end-to-end confirmation: it tests nothing"


def test_broker_sigkill_with_two_sink_workers_in_a_share_group(results, record_property):
    c = _counts(results, "share", record_property)
    assert c.emitted > 0
    assert c.lost == 0, f"{c.lost} event(s) lost"
    assert c.stored_twice == 0, f"{c.stored_twice} event(s) stored twice"
    assert c.detail["edge_exit"] == 0, c.detail["log"]
    assert c.detail["workers_alive"], "a worker died"


def test_confirmation_through_the_deployment_acl(results, record_property):
    c = _counts(results, "acl", record_property)
    assert c.emitted > 0 and c.lost == 0 and c.stored_twice == 0
    assert c.detail["edge_exit"] == 0, c.detail["log"]
    assert "every event confirmed by the sink" in c.detail["log"]
    assert "not confirmed by the sink" not in c.detail["log"], "acks did not get through the ACL"

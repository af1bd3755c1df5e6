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
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import STREET_CLIP, Counts, Proc, events_file_ids, stored_event_ids, wait_until

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


@pytest.fixture
def rig(tmp_path, mosquitto, int8_model_320) -> Iterator[Rig]:
    r = Rig(tmp_path, mosquitto, int8_model_320)
    yield r
    r.stop()


@pytest.mark.parametrize("confirm", ["sink", "broker"])
def test_broker_sigkill_without_persistence(rig, confirm, record_property):
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
    for key in ("emitted", "stored_rows", "lost", "stored_twice"):
        record_property(key, getattr(c, key))
    assert c.emitted > 0 and c.stored_twice == 0
    if confirm == "broker":
        # the pre-existing guarantee: the events the crashed broker held are gone (this is what sink fixes)
        assert c.lost > 0, "the scenario lost nothing even without end-to-end confirmation: it tests nothing"
        return
    assert c.lost == 0, f"{c.lost} event(s) lost"
    assert rc == 0, edge.output()[-3000:]
    out = edge.output()
    assert "sending them again" in out and "every event confirmed by the sink" in out, out[-3000:]


def test_broker_sigkill_with_two_sink_workers_in_a_share_group(rig, record_property):
    workers = [rig.sink(f"worker{i}", "--share-group", "ingest") for i in (1, 2)]
    edge = rig.edge("sink")
    wait_until(lambda: len(rig.stored()) >= 15, 120, "15 events stored", edge.proc, edge.log)
    rig.crash_broker()  # mid-stream, both workers ingesting
    crashed_at = len(rig.file_ids())
    rc = edge.wait(240)
    wait_until(lambda: set(rig.file_ids()) <= set(rig.stored()), 60, "every event stored")
    c = Counts.of("broker SIGKILL, no persistence, 2 share-group workers, confirm=sink", rig.file_ids(),
                  rig.stored(), during_fault=len(rig.file_ids()) - crashed_at, detail={"edge_exit": rc})
    for key in ("emitted", "stored_rows", "lost", "stored_twice"):
        record_property(key, getattr(c, key))
    assert c.emitted > 0
    assert c.lost == 0, f"{c.lost} event(s) lost"
    assert c.stored_twice == 0, f"{c.stored_twice} event(s) stored twice"
    assert rc == 0, edge.output()[-3000:]
    assert all(w.alive() for w in workers), "a worker died"
    assert all("stored" in w.output() for w in workers)

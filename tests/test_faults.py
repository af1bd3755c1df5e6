"""Fault injection on real parts: the edge, the sink, Mosquitto and the databases are real processes.

Each scenario runs ``smartcam-edge run`` over a real clip (paced to real time so faults land mid-stream) with
``smartcam-sink run`` storing events, injects one fault, then counts end to end: the ``event_id`` of every line
in the edge's ``--events-file`` against the rows in the sink's ``events`` table.

* lost      = ids in the events file that never reached the table (must be 0)
* stored 2x = rows beyond one per id (must be 0; the table is keyed on event_id, so this also checks it is)

The broker is the shipped deployment (``deploy/make-credentials.sh`` output: auth, ACL, persistence,
``max_queued_messages`` raised), so edge and sink log in as ``cam1`` and ``sink``. Every scenario prints its
counts and appends them to ``test-artifacts/fault_counts.jsonl`` (quoted in docs/reliability.md).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import sqlite3
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pytest

from contract.topics import topic_for
from tests.conftest import STREET_CLIP, Counts, Proc, events_file_ids, stored_event_ids, wait_until
from tests.secure_broker import SITE, Client, SecureBroker, make_deployment, start_secure_broker
from tests.services import MjpegServer, clip_jpegs, fill, small_disk

pytestmark = pytest.mark.slow

CAMERA = "cam1"
BIN = Path(sys.executable).parent
FPS = "4"  # processed frames per second of clip time: light on 2 shared cores, ~4 events/s on the street clip
EDGE_TIMEOUT = 120.0
STORE_TIMEOUT = 60.0


# ------------------------------------------------------------------------------------------ processes


def _bin(name: str) -> str:
    path = BIN / name
    return str(path) if path.exists() else (shutil.which(name) or name)


@dataclass
class Rig:
    """One scenario's world: broker, working dir, the edge and sink command lines, and the counts."""

    broker: SecureBroker
    work: Path
    db_url: str
    model: Path  # the INT8 320 model the edge ships with (tests/model_fixtures.py)
    procs: list[Proc] = field(default_factory=list)
    tls: bool = False  # connect edge and sink over mqtts:// with the deployment's CA
    ca_file: str | None = None  # another CA instead of the deployment's (must be refused)

    def broker_args(self, user: str) -> list[str]:
        if self.tls:
            ca = self.ca_file or self.broker.ca_file
            return ["--broker", f"mqtts://{user}@127.0.0.1:{self.broker.tls_port}", "--tls-ca", ca]
        return ["--broker", f"mqtt://{user}@127.0.0.1:{self.broker.plain_port}"]

    @property
    def events_file(self) -> Path:
        return self.work / "events.jsonl"

    @property
    def outbox(self) -> Path:
        return self.work / "outbox.db"

    def _env(self, user: str) -> dict[str, str]:
        return {**os.environ, "SMARTCAM_MQTT_PASSWORD": self.broker.passwords[user], "PYTHONUNBUFFERED": "1"}

    def edge(self, *extra: str, source: str | Path = STREET_CLIP, realtime: bool = True,
             outbox: Path | None = None, events_file: Path | None = None) -> Proc:
        args = [_bin("smartcam-edge"), "run", "--source", str(source), "--model", str(self.model),
                "--camera-id", CAMERA, "--site", SITE, *self.broker_args(CAMERA),
                "--events-file", str(events_file or self.events_file), "--outbox", str(outbox or self.outbox),
                "--fps", FPS, "--threads", "1", *(["--realtime"] if realtime else []), *extra]
        p = Proc(args, self.work / "edge.log", self._env(CAMERA)).start()
        self.procs.append(p)
        return p

    def sink(self, *extra: str, db_url: str | None = None, ready: bool = True) -> Proc:
        """Start ``smartcam-sink run``; with ``ready``, wait until its persistent session is subscribed (only
        from then on does the broker keep events for it — before its first connect there is nobody to keep
        them for)."""
        args = [_bin("smartcam-sink"), "run", *self.broker_args("sink"), "--db", db_url or self.db_url, *extra]
        log = self.work / "sink.log"
        seen = log.read_text(errors="replace").count("subscribed to") if log.exists() else 0
        p = Proc(args, log, self._env("sink")).start()
        self.procs.append(p)
        if ready:
            wait_until(lambda: p.output().count("subscribed to") > seen, 60, "the sink to subscribe", p.proc, log)
        return p

    # -------------------------------------------------------------------------------------- counting
    def file_ids(self) -> list[str]:
        """event_id of every complete line in the events file (a line cut by SIGKILL is not an event)."""
        return events_file_ids(self.events_file)

    def stored_ids(self, db_url: str | None = None) -> list[str]:
        return stored_event_ids(db_url or self.db_url)

    def wait_stored(self, timeout: float = STORE_TIMEOUT, db_url: str | None = None) -> None:
        """Until every id in the events file is in the table (the assertion on counts comes after)."""
        def done() -> bool:
            return set(self.file_ids()) <= set(self.stored_ids(db_url))
        with contextlib.suppress(BaseException):
            wait_until(done, timeout, "the sink to store every event")

    def counts(self, scenario: str, db_url: str | None = None, **extra) -> Counts:
        file_ids, stored = self.file_ids(), self.stored_ids(db_url)
        c = Counts(scenario=scenario, emitted=len(file_ids), stored_rows=len(stored),
                   lost=len(set(file_ids) - set(stored)), stored_twice=len(stored) - len(set(stored)),
                   not_in_file=len(set(stored) - set(file_ids)), **extra)
        c.report()
        return c

    def stop_all(self) -> None:
        for p in self.procs:
            p.kill()


@pytest.fixture
def broker() -> Iterator[SecureBroker]:
    """A fresh broker from the shipped deployment per scenario (scenarios restart it)."""
    base = Path(tempfile.mkdtemp(prefix="smartcam-faults-mq-"))
    base.chmod(0o755)
    sb = start_secure_broker(base)
    yield sb
    sb.broker.stop()
    shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request, tmp_path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'sink.db'}"
    return request.getfixturevalue("postgres_url")


@pytest.fixture
def rig(broker, tmp_path, db_url, request) -> Iterator[Rig]:
    r = Rig(broker, tmp_path, db_url, request.getfixturevalue("int8_model_320"))
    yield r
    r.stop_all()


def assert_nothing_lost(c: Counts, record_property) -> None:
    for key, value in asdict(c).items():
        record_property(key, value)
    assert c.emitted > 0, "the edge produced no events: the scenario proves nothing"
    assert c.lost == 0, f"{c.lost} event(s) lost"
    assert c.stored_twice == 0, f"{c.stored_twice} event(s) stored twice"


# ------------------------------------------------------------------------------------------ 1-3: outages


def test_broker_outage_mid_stream_loses_nothing(rig, record_property):
    sink = rig.sink()
    edge = rig.edge()
    wait_until(lambda: len(rig.file_ids()) >= 15, EDGE_TIMEOUT, "15 events before the outage", edge.proc, edge.log)
    before = len(rig.file_ids())
    rig.broker.broker.stop()  # SIGTERM: a clean broker shutdown (persistence saved)
    wait_until(lambda: len(rig.file_ids()) >= before + 15, EDGE_TIMEOUT, "15 events during the outage",
               edge.proc, edge.log)
    during = len(rig.file_ids()) - before
    rig.broker.broker.start()
    assert edge.wait(EDGE_TIMEOUT) == 0, edge.output()[-3000:]
    rig.wait_stored()
    assert sink.alive(), sink.output()[-3000:]
    c = rig.counts(f"broker outage ({rig.db_url.split(':')[0]})", during_fault=during)
    assert_nothing_lost(c, record_property)
    assert c.stored_rows == c.emitted and c.not_in_file == 0


def test_sink_sigkill_mid_stream_loses_nothing(rig, record_property):
    sink = rig.sink()
    edge = rig.edge()
    wait_until(lambda: len(rig.stored_ids()) >= 10, EDGE_TIMEOUT, "10 events stored before the kill", edge.proc,
               sink.log)
    sink.kill(signal.SIGKILL)
    before = len(rig.file_ids())
    wait_until(lambda: len(rig.file_ids()) >= before + 15, EDGE_TIMEOUT, "15 events while the sink is dead",
               edge.proc, edge.log)
    during = len(rig.file_ids()) - before
    sink = rig.sink()
    assert edge.wait(EDGE_TIMEOUT) == 0, edge.output()[-3000:]
    rig.wait_stored()
    c = rig.counts(f"sink SIGKILL ({rig.db_url.split(':')[0]})", during_fault=during)
    assert_nothing_lost(c, record_property)
    assert c.stored_rows == c.emitted and c.not_in_file == 0


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_edge_sigkill_with_unacked_events_replays_outbox(rig, record_property):
    """Broker down so events pile up unacknowledged, then kill -9 the edge: the restart must replay them."""
    rig.sink()
    edge = rig.edge()
    wait_until(lambda: len(rig.file_ids()) >= 10, EDGE_TIMEOUT, "10 events", edge.proc, edge.log)
    rig.broker.broker.stop()
    before = len(rig.file_ids())
    wait_until(lambda: len(rig.file_ids()) >= before + 10, EDGE_TIMEOUT, "10 unacknowledged events",
               edge.proc, edge.log)
    edge.kill(signal.SIGKILL)
    with sqlite3.connect(rig.outbox) as db:
        pending = db.execute("SELECT COUNT(*) FROM outbox WHERE topic LIKE '%/events'").fetchone()[0]
    assert pending > 0, "nothing was waiting in the outbox: the kill did not test replay"
    rig.broker.broker.start()
    first_run = len(rig.file_ids())
    restarted = rig.edge("--max-frames", "8", realtime=False)
    assert restarted.wait(EDGE_TIMEOUT) == 0, restarted.output()[-3000:]
    rig.wait_stored()
    c = rig.counts("edge SIGKILL + outbox replay (sqlite)", during_fault=len(rig.file_ids()) - before,
                   detail={"outbox_pending_at_kill": pending, "events_first_run": first_run})
    assert_nothing_lost(c, record_property)
    assert "replaying" in restarted.output(), "the restarted edge did not report an outbox replay"


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_edge_and_sink_over_tls_with_verified_certificates(rig, record_property):
    """The deployment's TLS listener end to end: both CLIs verify the broker with the generated CA."""
    rig.tls = True
    rig.sink()
    edge = rig.edge("--max-frames", "40", realtime=False)
    assert edge.wait(EDGE_TIMEOUT) == 0, edge.output()[-3000:]
    rig.wait_stored()
    c = rig.counts("edge and sink over TLS (mqtts, CA-verified)")
    assert_nothing_lost(c, record_property)
    assert c.stored_rows == c.emitted


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_edge_refuses_a_broker_signed_by_another_ca(rig, tmp_path):
    """An edge given another install's CA must not talk to this broker: events stay in its outbox."""

    rig.tls, rig.ca_file = True, str(make_deployment(tmp_path / "other") / "ca.crt")
    wrong = rig.edge("--drain-timeout", "3", "--max-frames", "20", realtime=False)
    rc = wrong.wait(EDGE_TIMEOUT)
    out = wrong.output()
    with sqlite3.connect(rig.outbox) as db:
        queued = db.execute("SELECT COUNT(*) FROM outbox").fetchone()[0]
    print(f"\nFAULT COUNTS wrong CA: exit {rc}, events emitted {len(rig.file_ids())}, still queued {queued}")
    assert rc == 1, f"expected exit 1 (events left in the outbox), got {rc}\n{out[-3000:]}"
    # The log names the real reason, not just "cannot reach broker".
    assert "certificate verify failed" in out, out[-3000:]
    assert queued > 0


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_no_image_leaves_the_device_by_default(rig):
    """Privacy: with default settings the edge publishes only contract events, stats and status text."""
    from contract.batch import decode_batch
    from contract.schema import validate_event, validate_stats

    watcher = Client(rig.broker.settings("sink"), "privacy-watcher")
    try:
        assert not watcher.connect().is_failure
        watcher.subscribe("smartcam/#")
        edge = rig.edge("--max-frames", "20", "--stats-interval", "0.5", realtime=False)
        assert edge.wait(EDGE_TIMEOUT) == 0, edge.output()[-3000:]
        with watcher.got:
            watcher.got.wait_for(lambda: any(p == b"offline" for _, p in watcher.messages), 10)
            messages = list(watcher.messages)
    finally:
        watcher.close()
    kinds: Counter[str] = Counter()
    for topic, payload in messages:
        leaf = topic.split("/", 3)[3]
        if leaf == "status":
            assert payload in (b"online", b"offline")
        elif leaf == "stats":
            validate_stats(json.loads(payload))
        elif leaf == "batch":  # the default: events in zlib-compressed JSON Lines
            lines = decode_batch(payload, 1 << 20)
            for line in lines:
                validate_event(json.loads(line))
            kinds["events"] += len(lines)
        else:
            assert leaf in ("events", "count"), f"unexpected topic {topic}"
            validate_event(json.loads(payload))
        kinds[leaf] += 1
    biggest = max(len(p) for _, p in messages)
    print(f"\nFAULT COUNTS privacy: messages {dict(kinds)}, largest payload {biggest} bytes")
    assert kinds["events"] > 0 and biggest < 4096, "something image-sized left the device"


# ------------------------------------------------------------------------------------------ 4: network source


@dataclass
class StreamDrop:
    """What one stream outage looked like from the broker (stats/status topics) and from the camera."""

    stats: list[dict]
    during: list[dict]  # stats published between the drop and the reconnect
    statuses: list[str]
    connections: int
    exit_code: int


@pytest.fixture(scope="module")
def stream_drop(tmp_path_factory, request) -> StreamDrop:
    """Run the edge on a local HTTP MJPEG camera, stop the camera for a few seconds, bring it back, SIGTERM."""
    base = Path(tempfile.mkdtemp(prefix="smartcam-faults-mq-"))
    base.chmod(0o755)
    broker = start_secure_broker(base)
    rig = Rig(broker, tmp_path_factory.mktemp("stream"), "sqlite://", request.getfixturevalue("int8_model_320"))
    cam = MjpegServer(clip_jpegs(STREET_CLIP))
    cam.start()
    watcher = Client(broker.settings("sink"), "fault-watcher")
    try:
        assert not watcher.connect().is_failure
        watcher.subscribe(topic_for(SITE, CAMERA, "stats"))
        watcher.subscribe(topic_for(SITE, CAMERA, "status"))

        def stats() -> list[dict]:
            with watcher.got:
                return [json.loads(p) for t, p in watcher.messages if t.endswith("/stats")]

        edge = rig.edge("--stats-interval", "0.5", "--fps", "5", source=cam.url, realtime=False)
        wait_until(lambda: any(s["source_state"] == "connected" and s["frames_processed"] > 0 for s in stats()),
                   60, "stats from a connected stream", edge.proc, edge.log)
        cam.stop()
        outage_start = len(stats())
        wait_until(lambda: "lost the source" in edge.output() or "reconnecting" in edge.output(), 30,
                   "the edge to notice the drop", edge.proc, edge.log)
        time.sleep(3.0)  # the camera stays away a while: several reconnect attempts with backoff
        assert edge.alive(), f"the edge died while the stream was down\n{edge.output()[-3000:]}"
        outage_end = len(stats())
        cam.start()
        wait_until(lambda: any(s.get("reconnects", 0) >= 1 and s["source_state"] == "connected" for s in stats()),
                   60, "stats showing the reconnect", edge.proc, edge.log)
        edge.kill(signal.SIGTERM)
        with watcher.got:
            watcher.got.wait_for(lambda: any(p == b"offline" for _, p in watcher.messages), 10)
            statuses = [p.decode() for t, p in watcher.messages if t.endswith("/status")]
        all_stats = stats()
        drop = StreamDrop(all_stats, all_stats[outage_start:outage_end + 1], statuses, cam.connections,
                          edge.proc.returncode)
    finally:
        watcher.close()
        cam.stop()
        rig.stop_all()
        broker.broker.stop()
        shutil.rmtree(base, ignore_errors=True)
    states = [s["source_state"] for s in drop.stats]
    print(f"\nFAULT COUNTS stream drop: stats messages {len(states)} ({len(drop.during)} during the outage), "
          f"states seen {sorted(set(states))}, reconnects {max(s.get('reconnects', 0) for s in drop.stats)}, "
          f"stream connections {drop.connections}, statuses {drop.statuses}, edge exit {drop.exit_code}")
    return drop


def test_network_source_drop_reconnects_without_crash(stream_drop, record_property):
    reconnects = max(s.get("reconnects", 0) for s in stream_drop.stats)
    record_property("reconnects", reconnects)
    assert stream_drop.connections >= 2, "the edge never came back to the camera"
    assert reconnects >= 1
    after = [s for s in stream_drop.stats if s.get("reconnects", 0) >= 1]
    assert after and after[0]["source_state"] == "connected" and after[-1]["frames_processed"] > after[0][
        "frames_processed"] - 1
    assert stream_drop.exit_code == 0, "SIGTERM must stop a live edge cleanly"
    assert stream_drop.statuses[0] == "online" and stream_drop.statuses[-1] == "offline"


def test_network_source_drop_is_visible_in_stats_while_it_lasts(stream_drop):
    """Operators watch the stats topic: a camera whose stream is down must say so, not go quiet."""
    states = [s["source_state"] for s in stream_drop.during]
    assert "reconnecting" in states, (
        f"no stats message said source_state=reconnecting while the stream was down "
        f"({len(stream_drop.during)} stats published during the outage, states {states})")


# ------------------------------------------------------------------------------------------ 5: disks


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_edge_outbox_path_unwritable_is_a_clear_error(rig, tmp_path):
    """The outbox's parent is a regular file (tests run as root, so permissions cannot make a dir unwritable)."""
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("x")
    edge = rig.edge("--max-frames", "3", realtime=False, outbox=blocker / "outbox.db")
    rc = edge.wait(EDGE_TIMEOUT)
    out = edge.output()
    assert rc == 3, out[-2000:]
    assert "outbox" in out and str(blocker) in out
    assert "Traceback" not in out
    assert rig.file_ids() == [], "events were produced although they could not be stored durably"


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_sink_database_path_unwritable_is_a_clear_error(rig, tmp_path):
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("x")
    sink = rig.sink(db_url=f"sqlite:///{blocker / 'sink.db'}", ready=False)
    rc = sink.wait(60)
    out = sink.output()
    assert rc == 2, out[-2000:]
    assert "Traceback" not in out, out[-3000:]
    assert "sink.db" in out or "database" in out.lower(), out[-2000:]


def free_bytes(mnt: Path) -> int:
    st = os.statvfs(mnt)
    return st.f_bavail * st.f_frsize


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_edge_outbox_disk_full_stops_loudly_and_loses_nothing(rig, record_property):
    """The outbox's disk fills while the broker is down: the edge must stop with a clear error (exit 3), and
    every event it reported must still reach the database once there is room and a broker again."""
    with small_disk() as mnt:
        rig.sink()
        rig.broker.broker.stop()  # nothing drains: the outbox only grows
        outbox = mnt / "outbox.db"
        ballast = fill(mnt, 96 * 1024)
        edge = rig.edge(realtime=False, outbox=outbox)
        rc = edge.wait(EDGE_TIMEOUT)
        out = edge.output()
        assert rc == 3, f"expected exit 3 (outbox failure), got {rc}\n{out[-3000:]}"
        assert "Traceback" not in out and "full" in out.lower(), out[-3000:]
        emitted = len(rig.file_ids())
        assert emitted > 0, f"no event before the disk filled: nothing to check\n{out[-3000:]}"
        ballast.unlink()
        rig.broker.broker.start()
        replay = rig.edge("--max-frames", "2", realtime=False, outbox=outbox)
        assert replay.wait(EDGE_TIMEOUT) == 0, replay.output()[-3000:]
        rig.wait_stored()
        error = next((line for line in out.splitlines() if "full" in line.lower() and not line.startswith("$")), "")
        c = rig.counts("edge outbox disk full (tmpfs, 96 KiB left)",
                       detail={"exit_code": rc, "events_before_full": emitted, "error": error[-200:]})
    assert_nothing_lost(c, record_property)


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_sink_database_disk_full_loses_nothing(rig, record_property):
    """The sink's SQLite disk fills up mid-stream: it must not acknowledge what it could not commit, say so,
    and store everything once room is made."""
    with small_disk() as mnt:
        db = f"sqlite:///{mnt / 'sink.db'}"
        sink = rig.sink(db_url=db)
        ballast = fill(mnt, 64 * 1024)
        edge = rig.edge(realtime=False)
        assert edge.wait(EDGE_TIMEOUT) == 0, edge.output()[-3000:]
        wait_until(lambda: "full" in sink.output().lower() or not sink.alive(), 60, "the sink to hit the full disk",
                   None, sink.log)
        stored_before = len(set(rig.stored_ids(db)))
        alive_when_full = sink.alive()
        ballast.unlink()
        if not sink.alive():  # a sink that exits on a full disk is restarted, as its service manager would
            rig.sink(db_url=db, ready=False)
        rig.wait_stored(db_url=db)
        error = next((line for line in sink.output().splitlines()
                      if "full" in line.lower() and not line.startswith("$")), "")
        c = rig.counts("sink database disk full (tmpfs, 64 KiB left)", db_url=db,
                       detail={"stored_before_room": stored_before, "sink_alive_when_full": alive_when_full,
                               "error": error[-200:]})
    assert stored_before < c.emitted, "the disk never filled up: the scenario proves nothing"
    assert_nothing_lost(c, record_property)

"""Shared fixtures: paths to ../shared data and real servers started per test session."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pytest

from contract.ids import new_event_id
from contract.schema import validate_event
from contract.timestamps import format_ts
from tests.services import start_mosquitto, start_postgres

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("SMARTCAM_SHARED", ROOT.parent / "shared")).resolve()
VIDEOS = SHARED / "data" / "videos"
MODELS = SHARED / "models"
PERSONS_EVAL = SHARED / "data" / "persons-eval"
ONNX_FP32 = MODELS / "yolov8n-coco.onnx"
PT_WEIGHTS = MODELS / "yolov8n-coco.pt"
INDOOR_CLIP = VIDEOS / "indoor_webcam_2people_with_overlay.mp4"
NEGATIVE_CLIP = VIDEOS / "negative_highway_cars_only_320x240.avi"
STREET_CLIP = VIDEOS / "outdoor_street_cctv_towncentre_720p.m4v"
PLAZA_CLIP = VIDEOS / "outdoor_overhead_plaza_many_people.mp4"
ARTIFACTS = ROOT / "test-artifacts"


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    if not SHARED.exists():
        pytest.fail(f"../shared not found at {SHARED}: set SMARTCAM_SHARED")
    return SHARED


@pytest.fixture
def mosquitto(tmp_path):
    """A fresh real Mosquitto per test (anonymous, max_queued_messages raised)."""
    broker = start_mosquitto(tmp_path / "mosquitto")
    yield broker
    broker.stop()


@pytest.fixture(scope="session")
def postgres_server():
    """One real PostgreSQL server for the whole test session; use ``postgres_url`` for a fresh database."""
    pg = start_postgres()
    yield pg
    pg.stop()


_db_counter = iter(range(1, 10**9))


@pytest.fixture
def postgres_url(postgres_server) -> str:
    """A fresh, empty PostgreSQL database on the session's server."""
    return postgres_server.create_database(f"t{next(_db_counter)}_{os.getpid()}")


# ------------------------------------------------------------------------------ sink: events and databases

T0 = 1_780_000_000.0  # a fixed instant (2026-05-28T20:26:40Z) so hour buckets are known


def make_event(type_: str = "person.enter", *, ts: float = T0, site: str = "lobby", camera_id: str = "cam-1",
               **fields: Any) -> dict[str, Any]:
    """A valid contract event (checked against the schema) with sensible defaults per type."""
    ev: dict[str, Any] = {
        "schema_version": 1, "event_id": new_event_id(), "type": type_, "ts": format_ts(ts), "site": site,
        "camera_id": camera_id, "model": {"name": "yolov8n-int8", "sha256": "0123456789ab"},
        "frame": {"width": 640, "height": 480},
    }
    defaults: dict[str, dict[str, Any]] = {
        "person.enter": {"track_id": 1, "box": [0.1, 0.1, 0.3, 0.9], "score": 0.8},
        "person.exit": {"track_id": 1, "box": [0.1, 0.1, 0.3, 0.9], "first_seen": format_ts(ts - 5), "dwell_s": 5.0,
                        "score_max": 0.9, "score_mean": 0.8},
        "count": {"count": 1, "previous": 0},
        "zone.enter": {"zone": "door", "track_id": 1},
        "zone.exit": {"zone": "door", "track_id": 1, "dwell_s": 5.0},
        "line.cross": {"line": "gate", "track_id": 1, "direction": "in", "totals": {"in": 1, "out": 0}},
        "loiter": {"zone": "door", "track_id": 1, "dwell_s": 60.0},
    }
    ev.update(defaults[type_])
    ev.update(fields)
    if type_ == "person.exit" and "dwell_s" in fields and "first_seen" not in fields:
        ev["first_seen"] = format_ts(ts - float(fields["dwell_s"]))
    validate_event(ev)
    return ev


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.slow)])
def db_url(request, tmp_path) -> str:
    """A fresh empty database: SQLite file, or a new database on the session's real PostgreSQL server."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'sink.db'}"
    return request.getfixturevalue("postgres_url")


@pytest.fixture
def store(db_url):
    """A sink Store on ``db_url``."""
    from cloud_sink.store import Store

    s = Store.open(db_url)
    yield s
    s.close()


@pytest.fixture(scope="module")
def browser():
    """Real headless Chromium for one test module (tests/chromium.py)."""
    from playwright.sync_api import sync_playwright

    from tests.chromium import CHROMIUM, CHROMIUM_ARGS

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture
def loaded(store):
    """The store with tests/rollup_scenario.py's events, stored twice (the second time shuffled: no change)."""
    import random

    from cloud_sink.store import Batch
    from tests.rollup_scenario import scenario

    events = scenario()
    assert len(store.write(Batch(events=events)).new_events) == len(events)
    shuffled = events[:]
    random.Random(1).shuffle(shuffled)
    assert len(store.write(Batch(events=shuffled)).new_events) == 0  # redelivered, in another order: nothing changes
    return store


@pytest.fixture(scope="session")
def artifacts_dir() -> Path:
    ARTIFACTS.mkdir(exist_ok=True)
    return ARTIFACTS


@pytest.fixture(scope="session")
def seaweedfs(tmp_path_factory):
    """One real SeaweedFS S3 server for the session (signatures checked); make a bucket per test."""
    from tests.services import start_seaweedfs

    server = start_seaweedfs(tmp_path_factory.mktemp("seaweedfs"))
    yield server
    server.stop()


# The INT8 320 edge model, built once per test session by the real `models.build` path. Registered here (not
# imported by each test module) so every module shares one build.
from tests.model_fixtures import int8_model_320  # noqa: E402,F401

# ------------------------------------------------------------------------- end-to-end counting (fault tests)
# Shared by tests/test_faults.py, tests/test_network_faults.py, tests/test_time_faults.py, tests/test_sink_confirm.py
# and tests/test_crash_points.py: real processes, their logs, and "every event id in the edge's events file is
# stored once" counted the same way everywhere.


def wait_until(predicate: Callable[[], bool], timeout: float, what: str, proc: subprocess.Popen | None = None,
               log: Path | None = None) -> None:
    """Poll ``predicate``; fail with the process log if it does not come true (or the process dies)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        if proc is not None and proc.poll() is not None and not predicate():
            break
        time.sleep(0.1)
    tail = log.read_text(errors="replace")[-3000:] if log and log.exists() else ""
    rc = proc.poll() if proc is not None else None
    pytest.fail(f"timed out waiting for {what} (process exit code {rc})\n{tail}")


@dataclass
class Proc:
    """A child process with its output in a log file; killed by PID at teardown."""

    args: list[str]
    log: Path
    env: dict[str, str]
    proc: subprocess.Popen | None = None

    def start(self) -> Proc:
        with open(self.log, "ab") as fh:
            fh.write(f"\n$ {' '.join(self.args)}\n".encode())
            fh.flush()
            self.proc = subprocess.Popen(self.args, stdout=fh, stderr=subprocess.STDOUT, env=self.env,
                                         start_new_session=True)
        return self

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.alive():
            self.proc.send_signal(sig)
            self.proc.wait(30)

    def wait(self, timeout: float) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            pytest.fail(f"{self.args[0]} did not finish in {timeout}s\n{self.log.read_text()[-3000:]}")

    def output(self) -> str:
        return self.log.read_text(errors="replace")


def events_file_ids(path: Path) -> list[str]:
    """event_id of every complete line of an edge's ``--events-file`` (a line cut by SIGKILL is not an event)."""
    if not path.exists():
        return []
    ids = []
    for line in path.read_text().splitlines():
        with contextlib.suppress(ValueError, KeyError, TypeError):
            ids.append(json.loads(line)["event_id"])
    return ids


def stored_event_ids(db_url: str, camera_id: str | None = None) -> list[str]:
    """Every ``event_id`` row of the sink's ``events`` table (one per row: a duplicate would show twice)."""
    import sqlalchemy as sa

    engine = sa.create_engine(db_url)
    try:
        with engine.connect() as conn:
            if camera_id is None:
                return list(conn.execute(sa.text("SELECT event_id FROM events")).scalars())
            return list(conn.execute(sa.text("SELECT event_id FROM events WHERE camera_id = :c"),
                                     {"c": camera_id}).scalars())
    except sa.exc.SQLAlchemyError:  # the sink has not created its tables yet
        return []
    finally:
        engine.dispose()


@dataclass
class Counts:
    scenario: str
    emitted: int  # events in the edge's --events-file
    stored_rows: int  # rows in the sink's events table
    lost: int
    stored_twice: int
    not_in_file: int  # stored but not in the file (an edge killed between outbox and file write): harmless
    during_fault: int = 0  # events the edge produced while the fault lasted
    detail: dict = field(default_factory=dict)

    @classmethod
    def of(cls, scenario: str, file_ids: list[str], stored: list[str], **extra) -> Counts:
        """Compare the edge's ids with the sink's rows (and report the result)."""
        c = cls(scenario=scenario, emitted=len(file_ids), stored_rows=len(stored),
                lost=len(set(file_ids) - set(stored)), stored_twice=len(stored) - len(set(stored)),
                not_in_file=len(set(stored) - set(file_ids)), **extra)
        c.report()
        return c

    def report(self) -> None:
        line = json.dumps({**asdict(self), "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
        print(f"\nFAULT COUNTS {line}")
        ARTIFACTS.mkdir(exist_ok=True)
        with open(ARTIFACTS / "fault_counts.jsonl", "a") as fh:
            fh.write(line + "\n")
from tests.ota_fixtures import model_cli, ota_keys, ota_model_a, ota_model_b, registry_server  # noqa: E402,F401

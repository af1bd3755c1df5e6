"""Time faults: the edge's clock is wrong (a Pi before NTP), or steps while it runs; the sink's time window.

The edge runs under Debian's libfaketime with its wall clock read from a file the test rewrites
(``FAKETIME_TIMESTAMP_FILE``, re-read on every call): ``@2020-01-01 00:00:00`` is a device that booted without a
real-time clock, ``+0`` is NTP having set it, ``-3600`` an hour back. The monotonic clock is left alone
(``FAKETIME_DONT_FAKE_MONOTONIC``), as on a real device. libfaketime 0.9.10 breaks absolute monotonic
``clock_nanosleep`` in that mode (Python's ``time.sleep`` fails with EINVAL), so the test compiles a 5-line shim
that passes that one call straight to the kernel, preloaded before libfaketime. Where gcc or libfaketime is
missing the clock tests skip saying so.

Everything else is real: the edge on the street clip with the shipped INT8 model, Mosquitto, the sink on SQLite.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
import sqlalchemy as sa

from contract.timestamps import parse_ts
from tests.conftest import STREET_CLIP, Counts, Proc, events_file_ids, stored_event_ids, wait_until
from tests.services import start_mosquitto

pytestmark = pytest.mark.slow

BIN = Path(sys.executable).parent
SITE, CAMERA = "timefaults", "cam-clock"
FAKETIME_LIBS = [Path(p) for p in ("/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1",
                                   "/usr/lib/aarch64-linux-gnu/faketime/libfaketime.so.1",
                                   "/usr/lib/faketime/libfaketime.so.1")]
SHIM_C = r"""
#define _GNU_SOURCE
#include <errno.h>
#include <time.h>
#include <unistd.h>
#include <sys/syscall.h>
int clock_nanosleep(clockid_t clk, int flags, const struct timespec *req, struct timespec *rem) {
    return syscall(SYS_clock_nanosleep, clk, flags, req, rem) == 0 ? 0 : errno;
}
"""


def _bin(name: str) -> str:
    path = BIN / name
    return str(path) if path.exists() else (shutil.which(name) or name)


def faketime_preload(work: Path) -> str:
    """LD_PRELOAD value: the sleep shim, then libfaketime; raises pytest's Skipped (kept, re-raised by the clock
    tests) where either cannot be had."""
    lib = next((p for p in FAKETIME_LIBS if p.exists()), None)
    if lib is None:
        raise pytest.skip.Exception("libfaketime is not installed (scripts/setup.sh installs the faketime package)")
    if shutil.which("gcc") is None:
        raise pytest.skip.Exception("gcc is needed to build the clock_nanosleep shim for libfaketime")
    (work / "shim.c").write_text(SHIM_C)
    subprocess.run(["gcc", "-shared", "-fPIC", "-O2", "-o", str(work / "shim.so"), str(work / "shim.c")], check=True)
    return f"{work / 'shim.so'} {lib}"


class Rig:
    """Mosquitto + sink (real clock) + an edge whose wall clock the test sets."""

    def __init__(self, work: Path, broker_url: str, model: Path, preload: str | None = None) -> None:
        self.work, self.broker_url, self.model, self.preload = work, broker_url, model, preload
        self.clock_file = work / "clock.txt"
        self.db = f"sqlite:///{work / 'sink.db'}"
        self.procs: list[Proc] = []

    def set_clock(self, spec: str) -> None:
        tmp = self.clock_file.with_suffix(".tmp")
        tmp.write_text(spec + "\n")
        tmp.replace(self.clock_file)  # atomic: the edge never reads half a line

    def sink(self, *extra: str) -> Proc:
        p = Proc([_bin("smartcam-sink"), "run", "--broker", self.broker_url, "--db", self.db, "--client-id",
                  "sink-time", *extra], self.work / "sink.log", {**os.environ, "PYTHONUNBUFFERED": "1"}).start()
        self.procs.append(p)
        wait_until(lambda: "connected to" in p.output(), 60, "the sink to connect", p.proc, p.log)
        time.sleep(0.5)
        return p

    def edge(self, *extra: str, realtime: bool = True) -> Proc:
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        if self.preload:
            env.update(LD_PRELOAD=self.preload, FAKETIME_TIMESTAMP_FILE=str(self.clock_file), FAKETIME_NO_CACHE="1",
                       FAKETIME_DONT_FAKE_MONOTONIC="1")
        args = [_bin("smartcam-edge"), "run", "--source", str(STREET_CLIP), "--model", str(self.model),
                "--camera-id", CAMERA, "--site", SITE, "--broker", self.broker_url, "--events-file",
                str(self.events), "--outbox", str(self.work / "outbox.db"), "--fps", "4", "--threads", "1",
                "--streams", "1", "--stats-interval", "2", "--drain-timeout", "60",
                *(["--realtime", "--loop", "0"] if realtime else []), *extra]
        p = Proc(args, self.work / "edge.log", env).start()
        self.procs.append(p)
        return p

    @property
    def events(self) -> Path:
        return self.work / "events.jsonl"

    def stored_rows(self) -> list[dict]:
        engine = sa.create_engine(self.db)
        try:
            with engine.connect() as conn:
                return [json.loads(p) for p in conn.execute(sa.text("SELECT payload FROM events")).scalars()]
        except sa.exc.SQLAlchemyError:
            return []
        finally:
            engine.dispose()

    def dead_letters(self) -> list[str]:
        engine = sa.create_engine(self.db)
        try:
            with engine.connect() as conn:
                return list(conn.execute(sa.text("SELECT reason FROM dead_letters")).scalars())
        except sa.exc.SQLAlchemyError:
            return []
        finally:
            engine.dispose()

    def stop(self) -> None:
        for p in self.procs:
            p.kill()


def _run(name: str, scenario, work: Path, model: Path, preload: str | None) -> BaseException | float:
    """One scenario on its own broker; returns its wall time, or what it raised (re-raised by its test)."""
    started = time.monotonic()
    broker = start_mosquitto(work / "mosquitto")
    r = Rig(work, broker.url, model, preload)
    r.set_clock("+0")
    try:
        scenario(r)
        return round(time.monotonic() - started, 1)
    except BaseException as exc:  # noqa: BLE001 - pytest.fail's Failed included
        return exc
    finally:
        r.stop()
        broker.stop()


@pytest.fixture(scope="module")
def results(tmp_path_factory, int8_model_320) -> dict[str, BaseException | float]:
    """The three scenarios are independent (own broker, sink, edge, clock file): run them concurrently."""
    out: dict[str, BaseException | float] = {}
    try:
        preload: str | None = faketime_preload(tmp_path_factory.mktemp("faketime"))
    except pytest.skip.Exception as skip:
        preload = None
        out = {"unset": skip, "steps": skip}
    jobs = {"unset": (_clock_unset_then_set, preload), "steps": (_clock_steps, preload),
            "replay": (_dead_letter_replay, None)}
    jobs = {k: v for k, v in jobs.items() if k not in out}
    with ThreadPoolExecutor(len(jobs)) as pool:
        futures = {name: pool.submit(_run, name, fn, tmp_path_factory.mktemp(name), int8_model_320, preload)
                   for name, (fn, preload) in jobs.items()}
        out.update({name: f.result() for name, f in futures.items()})
    print(f"\nTIME FAULTS wall s: { {k: v for k, v in out.items() if isinstance(v, float)} }")
    return out


def _outcome(results: dict, name: str) -> None:
    if isinstance(results[name], BaseException):
        raise results[name]


def _assert_once(c: Counts) -> None:
    assert c.emitted > 0, "the edge produced no events: the scenario proves nothing"
    assert c.lost == 0, f"{c.lost} event(s) lost"
    assert c.stored_twice == 0, f"{c.stored_twice} event(s) stored twice"


def _clock_unset_then_set(rig: Rig) -> None:
    """A Pi that boots in 2020: events are kept (not sent, not lost), then sent with corrected times."""
    started = time.time()
    rig.set_clock("@2020-01-01 00:00:00")
    rig.sink()
    edge = rig.edge("--max-frames", "80")
    wait_until(lambda: len(events_file_ids(rig.events)) >= 10, 120, "10 events under the unset clock",
               edge.proc, edge.log)
    time.sleep(2.0)  # a stats interval and a batch linger: anything that would leave has had its chance
    held = len(events_file_ids(rig.events))
    stored_while_unset = len(stored_event_ids(rig.db))
    assert "not set" in edge.output(), edge.output()[-2000:]
    assert stored_while_unset == 0, "events left the camera with a 1970-style clock"
    rig.set_clock("+0")  # NTP
    fixed_at = time.time()
    assert edge.wait(180) == 0, edge.output()[-3000:]
    wait_until(lambda: set(events_file_ids(rig.events)) <= set(stored_event_ids(rig.db)), 60, "every event stored")
    rows = rig.stored_rows()
    c = Counts.of("clock unset at start (2020), then set", events_file_ids(rig.events), stored_event_ids(rig.db),
                  during_fault=held, detail={"stored_while_unset": stored_while_unset,
                                             "uncertain": sum(1 for r in rows if r.get("time_uncertain")),
                                             "dead_letters": len(rig.dead_letters())})
    _assert_once(c)
    times = [parse_ts(r["ts"]) for r in rows]
    # every time is right: between this test's start and now (the clip runs in real time from the edge's start)
    assert min(times) >= started - 5 and max(times) <= time.time() + 5, (
        f"times outside the run: {min(times) - started:+.0f} s .. {max(times) - time.time():+.0f} s")
    early = [r for r in rows if parse_ts(r["ts"]) < fixed_at - 3]
    assert early and all(r.get("time_uncertain") is True for r in early), "events stamped before NTP not flagged"
    assert rig.dead_letters() == [], rig.dead_letters()
    assert "corrected the times of" in edge.output()


def _clock_steps(rig: Rig) -> None:
    """NTP steps the clock back an hour, then forward again, mid-run: nothing lost, the clip's times run on."""
    rig.sink()
    edge = rig.edge("--max-frames", "80")
    wait_until(lambda: len(events_file_ids(rig.events)) >= 10, 120, "10 events", edge.proc, edge.log)
    rig.set_clock("-3600")
    n = len(events_file_ids(rig.events))
    wait_until(lambda: len(events_file_ids(rig.events)) >= n + 10, 120, "10 events an hour back", edge.proc,
               edge.log)
    rig.set_clock("+0")
    assert edge.wait(180) == 0, edge.output()[-3000:]
    wait_until(lambda: set(events_file_ids(rig.events)) <= set(stored_event_ids(rig.db)), 60, "every event stored")
    out = edge.output()
    c = Counts.of("clock steps -1 h then +1 h", events_file_ids(rig.events), stored_event_ids(rig.db),
                  detail={"dead_letters": len(rig.dead_letters())})
    _assert_once(c)
    assert "stepped by -3600 s" in out and "stepped by +3600 s" in out, out[-3000:]
    times = sorted(parse_ts(r["ts"]) for r in rig.stored_rows())
    assert max(times) - min(times) < 60, "a file's event times jumped with the system clock"
    assert rig.dead_letters() == []


def _dead_letter_replay(rig: Rig) -> None:
    """The sink's window refuses a camera's backlog 10 days old; nothing is lost: replay stores it, once."""
    rig.sink("--max-past-days", "1")
    ten_days_ago = (datetime.now(timezone.utc) - timedelta(days=10)).strftime("%Y-%m-%dT%H:%M:%SZ")
    edge = rig.edge("--max-frames", "40", "--start-time", ten_days_ago, realtime=False)
    assert edge.wait(180) == 0, edge.output()[-3000:]
    ids = events_file_ids(rig.events)
    wait_until(lambda: len(rig.dead_letters()) >= len(ids), 60, "every event dead-lettered")
    time.sleep(1.0)  # the retained count copies follow
    assert stored_event_ids(rig.db) == []
    cli = [_bin("smartcam-sink"), "dead-letters"]
    listed = subprocess.run([*cli, "list", "--db", rig.db, "--reason", "days in the past", "--json"],
                            capture_output=True, text=True, check=True)
    listed_ids = {json.loads(d["payload"])["event_id"] for d in json.loads(listed.stdout)["dead_letters"]}
    assert json.loads(listed.stdout)["total"] >= len(ids), listed.stdout[:2000]  # + the retained count copies
    assert listed_ids <= set(ids)
    narrow = subprocess.run([*cli, "replay", "--db", rig.db, "--reason", "days in the past", "--max-past-days",
                             "5", "--json"], capture_output=True, text=True, check=True)  # still too narrow
    first = subprocess.run([*cli, "replay", "--db", rig.db, "--reason", "days in the past", "--max-past-days",
                            "30", "--json"], capture_output=True, text=True, check=True)
    again = subprocess.run([*cli, "replay", "--db", rig.db, "--reason", "days in the past", "--max-past-days",
                            "30", "--json"], capture_output=True, text=True, check=True)
    c = Counts.of("dead-lettered by the time window, replayed", ids, stored_event_ids(rig.db),
                  detail={"narrow": json.loads(narrow.stdout), "replay": json.loads(first.stdout),
                          "again": json.loads(again.stdout)})
    _assert_once(c)
    assert json.loads(narrow.stdout)["stored"] == 0 and json.loads(narrow.stdout)["still_dead"] >= len(ids)
    assert json.loads(first.stdout)["stored"] == len(ids)
    assert json.loads(again.stdout)["matched"] == 0, "replayed dead letters were not removed"
    assert rig.dead_letters() == []
    bad = subprocess.run([*cli, "replay", "--db", rig.db], capture_output=True, text=True)
    assert bad.returncode == 2 and "--reason" in bad.stderr


def test_clock_unset_at_start_then_set_by_ntp(results):
    """A Pi that boots in 2020: events are kept (not sent, not lost), then sent with corrected times."""
    _outcome(results, "unset")


def test_clock_steps_back_and_forward_an_hour(results):
    """NTP steps the clock back an hour, then forward again, mid-run: nothing lost, the clip's times run on."""
    _outcome(results, "steps")


def test_too_old_events_are_dead_lettered_then_replayed_once(results):
    """The sink's window refuses a camera's backlog 10 days old; nothing is lost: replay stores it, once."""
    _outcome(results, "replay")

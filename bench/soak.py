"""Soak: the edge on a looping clip into the sink on PostgreSQL for a long time, the broker and the database
restarted every few minutes; resources sampled every 10 s; nothing may grow, nothing may be lost.

    nice -n 10 .venv/bin/python bench/soak.py --minutes 30 --plot docs/soak.png --json test-artifacts/soak.json

Every ``--restart-every`` seconds it restarts, in turn, Mosquitto (SIGKILL: a crash; the edge runs with
``--confirm sink``, so nothing the crashed broker held is lost) and PostgreSQL (``pg_ctl restart -m fast``: the
sink's writes fail, nothing is acknowledged, the broker keeps the messages until it is back). Every
``--sample-every`` seconds it records, for the edge and the sink: RSS, open file descriptors and threads
(``/proc``), and the outbox file size and depth and the database size. At the end the edge is stopped with
SIGTERM, drained, and the events file is compared with the database (0 lost, 0 stored twice).

Pass = 0 lost, 0 duplicated, and no growth trend: over the samples after the warm-up (the first quarter), the
fds and threads end no higher than they were (+5 for reconnect wobble), RSS grows less than 25 MB, and in a
run of 20 minutes or more its least-squares slope stays under 20 MB/h; the outbox depth ends at 0. A 3-minute version runs in CI (tests/test_crash_points.py::test_soak_3_minutes).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.conftest import events_file_ids  # noqa: E402
from tests.services import start_mosquitto, start_postgres  # noqa: E402

BIN = Path(sys.executable).parent
STREET_CLIP = Path(os.environ.get("SMARTCAM_SHARED", ROOT.parent / "shared")) / "data/videos/" \
    "outdoor_street_cctv_towncentre_720p.m4v"


@dataclass
class Sample:
    t: float  # seconds since the start
    edge_rss_mb: float
    edge_fds: int
    edge_threads: int
    sink_rss_mb: float
    sink_fds: int
    sink_threads: int
    outbox_bytes: int
    outbox_depth: int
    db_bytes: int
    events: int  # lines in the events file so far


@dataclass
class SoakResult:
    minutes: float
    emitted: int = 0
    stored_rows: int = 0
    lost: int = 0
    stored_twice: int = 0
    restarts: list[tuple[float, str]] = field(default_factory=list)
    samples: list[Sample] = field(default_factory=list)
    slopes_per_h: dict[str, float] = field(default_factory=dict)  # after warm-up
    edge_exit: int | None = None
    passed: bool = False
    why: list[str] = field(default_factory=list)


def _proc_stats(pid: int) -> tuple[float, int, int]:
    """(RSS MB, open fds, threads) of a live process, from /proc."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
        fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
        rss = int(fields["VmRSS"].split()[0]) / 1024
        threads = int(fields["Threads"])
        fds = len(os.listdir(f"/proc/{pid}/fd"))
        return round(rss, 1), fds, threads
    except (OSError, KeyError, ValueError):
        return 0.0, 0, 0


def _slope_per_h(ts: list[float], ys: list[float]) -> float:
    n = len(ts)
    if n < 3:
        return 0.0
    mt, my = sum(ts) / n, sum(ys) / n
    var = sum((t - mt) ** 2 for t in ts)
    return 0.0 if var == 0 else sum((t - mt) * (y - my) for t, y in zip(ts, ys, strict=True)) / var * 3600


def _db_stats(url: str) -> tuple[list[str], int]:
    import sqlalchemy as sa

    engine = sa.create_engine(url)
    try:
        with engine.connect() as conn:
            ids = list(conn.execute(sa.text("SELECT event_id FROM events")).scalars())
            size = conn.execute(sa.text("SELECT pg_database_size(current_database())")).scalar_one()
            return ids, int(size)
    except sa.exc.SQLAlchemyError:
        return [], 0
    finally:
        engine.dispose()


def _outbox(path: Path) -> tuple[int, int]:
    size = sum(p.stat().st_size for p in path.parent.glob(path.name + "*") if p.is_file())
    try:
        with sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5) as db:
            depth = db.execute("SELECT COUNT(*) FROM outbox").fetchone()[0]
    except sqlite3.Error:
        depth = -1
    return size, depth


def soak(minutes: float, model: Path, work: Path, *, restart_every_s: float = 180.0, sample_every_s: float = 10.0,
         clip: Path = STREET_CLIP, max_rss_growth_mb: float = 25.0, max_rss_growth_mb_per_h: float = 20.0,
         log=print) -> SoakResult:
    """Run the soak; returns what it measured (``passed`` and ``why``)."""
    work.mkdir(parents=True, exist_ok=True)
    result = SoakResult(minutes=minutes)
    pg = start_postgres()
    broker = start_mosquitto(work / "mosquitto")
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    db = pg.create_database("soak")
    events, outbox = work / "events.jsonl", work / "outbox.db"
    procs: list[subprocess.Popen] = []

    def start(args: list[str], name: str) -> subprocess.Popen:
        fh = open(work / f"{name}.log", "ab")  # noqa: SIM115 - the child holds it
        p = subprocess.Popen(args, stdout=fh, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        procs.append(p)
        return p

    try:
        sink = start([str(BIN / "smartcam-sink"), "run", "--broker", broker.url, "--db", db, "--log-every", "30"],
                     "sink")
        time.sleep(3.0)
        edge = start([str(BIN / "smartcam-edge"), "run", "--source", str(clip), "--model", str(model),
                      "--camera-id", "soak", "--site", "bench", "--broker", broker.url, "--events-file", str(events),
                      "--outbox", str(outbox), "--fps", "4", "--threads", "1", "--streams", "1", "--realtime",
                      "--loop", "0", "--confirm", "sink", "--confirm-timeout", "10", "--stats-interval", "10",
                      "--drain-timeout", "120"], "edge")
        t0 = time.monotonic()
        end = t0 + minutes * 60
        next_sample, next_restart, turn = t0, t0 + restart_every_s, 0
        while time.monotonic() < end:
            now = time.monotonic()
            if now >= next_restart:
                what = ("broker", "postgresql")[turn % 2]
                turn += 1
                if what == "broker":
                    broker.stop(signal.SIGKILL)
                    broker.start()
                else:
                    pg.ctl("restart")
                result.restarts.append((round(now - t0, 1), what))
                log(f"  {now - t0:6.0f} s: restarted {what}")
                next_restart += restart_every_s
            if now >= next_sample:
                e, s = _proc_stats(edge.pid), _proc_stats(sink.pid)
                ob_bytes, ob_depth = _outbox(outbox)
                _, db_bytes = _db_stats(db)
                smp = Sample(round(now - t0, 1), *e, *s, ob_bytes, ob_depth, db_bytes, len(events_file_ids(events)))
                result.samples.append(smp)
                log(f"  {smp.t:6.0f} s: edge {smp.edge_rss_mb:.0f} MB {smp.edge_fds} fds {smp.edge_threads} thr | "
                    f"sink {smp.sink_rss_mb:.0f} MB {smp.sink_fds} fds {smp.sink_threads} thr | outbox "
                    f"{smp.outbox_depth} rows | db {smp.db_bytes / 1e6:.1f} MB | {smp.events} events")
                next_sample += sample_every_s
            if edge.poll() is not None or sink.poll() is not None:
                result.why.append(f"a process died (edge {edge.poll()}, sink {sink.poll()})")
                break
            time.sleep(0.5)
        edge.send_signal(signal.SIGTERM)  # finish the frame, drain (confirmed by the sink), exit
        try:
            result.edge_exit = edge.wait(180)
        except subprocess.TimeoutExpired:
            edge.kill()
        file_ids = events_file_ids(events)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not set(file_ids) <= set(_db_stats(db)[0]):
            time.sleep(1.0)
        stored = _db_stats(db)[0]
        result.emitted, result.stored_rows = len(file_ids), len(stored)
        result.lost = len(set(file_ids) - set(stored))
        result.stored_twice = len(stored) - len(set(stored))
        ob_depth = _outbox(outbox)[1]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait(10)
        broker.stop()
        pg.stop()
    warm = max(len(result.samples) // 4, int(60 / sample_every_s))  # model load, first reconnects, caches
    steady = result.samples[warm:] if len(result.samples) > warm + 3 else result.samples
    ts = [s.t for s in steady]
    for key in ("edge_rss_mb", "edge_fds", "edge_threads", "sink_rss_mb", "sink_fds", "sink_threads"):
        result.slopes_per_h[key] = round(_slope_per_h(ts, [getattr(s, key) for s in steady]), 2)
    if result.lost or result.stored_twice or not result.emitted:
        result.why.append(f"emitted {result.emitted}, lost {result.lost}, stored twice {result.stored_twice}")
    for key in ("edge_rss_mb", "sink_rss_mb"):
        values = [getattr(s, key) for s in steady]
        growth = sum(values[-3:]) / len(values[-3:]) - sum(values[:3]) / len(values[:3]) if values else 0.0
        # a slope over minutes extrapolates noise to MB/h: judge short runs by what they grew, long ones by both
        if growth > max_rss_growth_mb or (minutes >= 20 and result.slopes_per_h[key] > max_rss_growth_mb_per_h):
            result.why.append(f"{key} grew {growth:.1f} MB after warm-up ({result.slopes_per_h[key]:.1f} MB/h)")
    for key in ("edge_fds", "edge_threads", "sink_fds", "sink_threads"):
        values = [getattr(s, key) for s in steady]
        # a leak climbs; reconnects make fds/threads wobble by a few: flag a rise over the run, not the wobble
        if values and max(values[-3:]) > max(values[: max(3, len(values) // 2)]) + 5:
            result.why.append(f"{key} rose from {values[0]} to {values[-1]}")
    if ob_depth not in (0, -1):
        result.why.append(f"outbox ended with {ob_depth} rows")
    result.passed = not result.why
    return result


def plot(result: SoakResult, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = result.samples
    t = [x.t / 60 for x in s]
    fig, axes = plt.subplots(2, 2, figsize=(11, 7), sharex=True)
    panels = [("RSS (MB)", [("edge", [x.edge_rss_mb for x in s]), ("sink", [x.sink_rss_mb for x in s])]),
              ("open fds / threads", [("edge fds", [x.edge_fds for x in s]), ("sink fds", [x.sink_fds for x in s]),
                                      ("edge threads", [x.edge_threads for x in s]),
                                      ("sink threads", [x.sink_threads for x in s])]),
              ("outbox", [("depth (rows)", [x.outbox_depth for x in s]),
                          ("file (KB)", [x.outbox_bytes / 1024 for x in s])]),
              ("database / events", [("db (MB)", [x.db_bytes / 1e6 for x in s]),
                                     ("events (x100)", [x.events / 100 for x in s])])]
    for ax, (title, series) in zip(axes.flat, panels, strict=True):
        for label, ys in series:
            ax.plot(t, ys, label=label)
        for at, what in result.restarts:
            ax.axvline(at / 60, color="red" if what == "broker" else "purple", alpha=0.25, lw=1)
        ax.set_title(title)
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    for ax in axes[1]:
        ax.set_xlabel("minutes (red: broker SIGKILL, purple: PostgreSQL restart)")
    fig.suptitle(f"soak {result.minutes:.0f} min: {result.emitted} events, lost {result.lost}, stored twice "
                 f"{result.stored_twice}, {'PASS' if result.passed else 'FAIL'}")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=90)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--minutes", type=float, default=30.0)
    ap.add_argument("--restart-every", type=float, default=180.0, help="seconds between restarts (default 180)")
    ap.add_argument("--sample-every", type=float, default=10.0)
    ap.add_argument("--model", type=Path, help="edge model (default: build the INT8 320 model the tests use)")
    ap.add_argument("--plot", type=Path, help="write the PNG here (e.g. docs/soak.png)")
    ap.add_argument("--json", type=Path, help="write the measurements here")
    args = ap.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="smartcam-soak-"))
    model = args.model
    if model is None:
        from models.build import build_model
        from tests.conftest import ONNX_FP32
        from tests.model_fixtures import CALIB_CLIPS

        model = work / "yolov8n-320-int8.onnx"
        build_model(ONNX_FP32, (320, 320), CALIB_CLIPS, model, calib_frames=16, latency_runs=0,
                    progress=False)
    try:
        result = soak(args.minutes, model, work, restart_every_s=args.restart_every, sample_every_s=args.sample_every)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps({k: v for k, v in asdict(result).items() if k != "samples"}, indent=1))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(asdict(result)))
    if args.plot:
        plot(result, args.plot)
    return 0 if result.passed else 1


if __name__ == "__main__":
    sys.exit(main())

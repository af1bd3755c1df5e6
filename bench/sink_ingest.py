"""Sink benchmarks: events/s from publishers through a real Mosquitto into ``smartcam-sink run``, and rollup query
time over a large store. Starts its own Mosquitto / PostgreSQL (tests/services.py) and kills them at the end.

  python bench/sink_ingest.py ingest --db sqlite --events 30000 --publishers 2 --workers 1
  python bench/sink_ingest.py ingest --db postgresql --events 30000 --workers 2      # --share-group workers
  python bench/sink_ingest.py ingest --db sqlite --events 30000 --backlog            # drain a queued backlog
  python bench/sink_ingest.py query --db sqlite --events 1000000

``ingest`` measures end to end: from the moment the publishers start until the database holds every event
(live), or from the sink's start until a backlog queued in its persistent session is stored (--backlog).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import random
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cloud_sink.store import Batch, Store  # noqa: E402
from contract.ids import new_event_id  # noqa: E402
from contract.timestamps import format_ts  # noqa: E402
from contract.topics import topic_for  # noqa: E402
from tests.services import start_mosquitto, start_postgres  # noqa: E402

MODEL = {"name": "yolov8n-int8", "sha256": "0123456789ab"}
FRAME = {"width": 1280, "height": 720}


def make_events(n: int, *, start: float, span_s: float, cameras: int = 4, seed: int = 0) -> list[dict]:
    """A realistic mix: enter / exit with dwell / count, some per zone and line, over ``cameras`` cameras."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        ts = start + span_s * i / n
        cam = f"cam-{i % cameras}"
        base = {"schema_version": 1, "event_id": new_event_id(), "ts": format_ts(ts), "site": "bench",
                "camera_id": cam, "model": MODEL, "frame": FRAME}
        kind = i % 10
        track = i // 10
        if kind < 3:
            ev = {**base, "type": "person.enter", "track_id": track, "box": [0.1, 0.2, 0.3, 0.9], "score": 0.8}
        elif kind < 6:
            dwell = round(rng.lognormvariate(3.0, 1.0), 3)
            ev = {**base, "type": "person.exit", "track_id": track, "box": [0.1, 0.2, 0.3, 0.9],
                  "first_seen": format_ts(ts - dwell), "dwell_s": dwell, "score_max": 0.9, "score_mean": 0.7}
        elif kind < 8:
            ev = {**base, "type": "count", "count": rng.randint(0, 12), "previous": rng.randint(0, 12)}
        elif kind == 8:
            ev = {**base, "type": "zone.exit", "zone": "door", "track_id": track,
                  "dwell_s": round(rng.uniform(1, 60), 3)}
        else:
            ev = {**base, "type": "line.cross", "line": "gate", "track_id": track,
                  "direction": rng.choice(["in", "out"]), "totals": {"in": i, "out": i}}
        out.append(ev)
    return out


def _publisher(url: str, payloads: list[tuple[str, bytes]], go, done_q) -> None:
    from contract.broker import BrokerSettings, make_client

    settings = BrokerSettings.from_url(url)
    client = make_client(settings, f"bench-pub-{os.getpid()}")
    client.max_inflight_messages_set(1000)
    client.max_queued_messages_set(0)
    client.connect(settings.host, settings.port)
    client.loop_start()
    go.wait()
    t0 = time.perf_counter()
    infos = [client.publish(t, p, qos=1) for t, p in payloads]
    for info in infos:
        info.wait_for_publish(timeout=120)
    done_q.put((len(payloads), time.perf_counter() - t0))
    client.disconnect()
    client.loop_stop()


def _sink(url: str, db: str, client_id: str, share: str | None, log: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "cloud_sink", "run", "--broker", url, "--db", db, "--client-id", client_id,
           "--log-every", "5"]
    if share:
        cmd += ["--share-group", share]
    with open(log, "ab") as fh:
        return subprocess.Popen(cmd, stdout=fh, stderr=fh, cwd=ROOT)


def _wait(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise TimeoutError(what)


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _database(kind: str, workdir: Path):
    """(url, stop) for a fresh SQLite file or a fresh database on a private PostgreSQL server."""
    if kind == "sqlite":
        return f"sqlite:///{workdir / 'bench.db'}", lambda: None
    pg = start_postgres()
    return pg.create_database("bench"), pg.stop


def bench_ingest(args: argparse.Namespace) -> dict:
    workdir = Path(tempfile.mkdtemp(prefix="sinkbench-"))
    broker = start_mosquitto(workdir / "mosquitto")
    db, stop_db = _database(args.db, workdir)
    sinks: list[subprocess.Popen] = []
    share = "bench" if args.workers > 1 or args.share_group else None
    try:
        Store.open(db).close()  # migrate once, before several workers race to
        events = make_events(args.events, start=time.time() - 600, span_s=600)
        payloads = [(topic_for(e["site"], e["camera_id"], "events"), json.dumps(e).encode()) for e in events]
        logs = [workdir / f"sink{i}.log" for i in range(args.workers)]
        for i in range(args.workers):
            sinks.append(_sink(broker.url, db, f"bench-sink-{i}", share, logs[i]))
        for log in logs:
            _wait(lambda log=log: log.exists() and "connected to" in log.read_text(), 60, "sink connect")
        time.sleep(0.5)
        if args.backlog:
            for p in sinks:
                _stop(p)
            sinks.clear()
        ctx = mp.get_context("fork")
        go, done_q = ctx.Event(), ctx.Queue()
        chunks = [payloads[i::args.publishers] for i in range(args.publishers)]
        pubs = [ctx.Process(target=_publisher, args=(broker.url, c, go, done_q)) for c in chunks]
        for p in pubs:
            p.start()
        time.sleep(1.0)  # publishers connected
        store = Store.open(db)
        t0 = time.perf_counter()
        go.set()
        pub_results = [done_q.get(timeout=600) for _ in pubs]
        t_pub = time.perf_counter() - t0
        for p in pubs:
            p.join(30)
        if args.backlog:
            assert store.event_count() == 0
            for log in logs:
                log.write_text("")
            t0 = time.perf_counter()
            for i in range(args.workers):
                sinks.append(_sink(broker.url, db, f"bench-sink-{i}", share, logs[i]))
            _wait(lambda: all("connected to" in log.read_text() for log in logs), 60, "sink reconnect")
            t_connected = time.perf_counter()
        _wait(lambda: store.event_count() >= args.events, 900, "all events stored")
        elapsed = time.perf_counter() - t0
        extra = {}
        if args.backlog:
            drain = time.perf_counter() - t_connected
            extra = {"drain_s": round(drain, 2), "drain_events_per_s": round(args.events / drain)}
        stored = store.event_count()
        store.close()
        for p in sinks:
            _stop(p)
        received = [int(m) for log in logs for m in re.findall(r"stopped: received (\d+)", log.read_text())[-1:]]
        extra["received_per_worker"] = received
        return {"db": args.db, "events": args.events, "stored": stored, "publishers": args.publishers,
                "workers": args.workers, "share_group": share, "mode": "backlog" if args.backlog else "live",
                "publish_s": round(t_pub, 2), "publish_rate": round(sum(n for n, _ in pub_results) / t_pub),
                "elapsed_s": round(elapsed, 2), "events_per_s": round(args.events / elapsed), **extra,
                "load_avg_1m": round(os.getloadavg()[0], 1)}
    finally:
        for p in sinks:
            _stop(p)
        broker.stop()
        stop_db()
        shutil.rmtree(workdir, ignore_errors=True)


def bench_query(args: argparse.Namespace) -> dict:
    from cloud_sink import rollups

    workdir = Path(tempfile.mkdtemp(prefix="sinkbench-"))
    db, stop_db = _database(args.db, workdir)
    try:
        store = Store.open(db)
        days = 30
        start = (time.time() // 3600 * 3600) - days * 86400
        t0 = time.perf_counter()
        batch = 10000
        for i in range(0, args.events, batch):
            n = min(batch, args.events - i)
            evs = make_events(n, start=start + days * 86400 * i / args.events, span_s=days * 86400 * n / args.events,
                              seed=i)
            store.write(Batch(events=evs))
        load_s = time.perf_counter() - t0
        assert store.event_count() == args.events

        def timed(fn, repeat: int = 7) -> float:
            fn()  # warm
            times = []
            for _ in range(repeat):
                t = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t)
            return round(statistics.median(times) * 1000, 1)

        since = start
        result = {
            "db": args.db, "events": args.events, "load_s": round(load_s, 1),
            "load_rate": round(args.events / load_s),
            "hourly_all_cameras_30d_ms": timed(lambda: rollups.hourly(store, since=since)),
            "hourly_one_camera_30d_ms": timed(lambda: rollups.hourly(store, since=since, camera_id="cam-1")),
            "hourly_one_camera_24h_ms": timed(lambda: rollups.hourly(store, since=time.time() - 86400,
                                                                     camera_id="cam-1")),
            "daily_30d_ms": timed(lambda: rollups.daily(store, since=since)),
            "dwell_30d_ms": timed(lambda: rollups.dwell(store, since=since, camera_id="cam-1")),
            "peak_hour_30d_ms": timed(lambda: rollups.peak_hour(store, since=since)),
            "overview_30d_ms": timed(lambda: rollups.overview(store, since=since), repeat=3),
            "hourly_rows": len(rollups.hourly(store, since=since)),
        }
        store.close()
        return result
    finally:
        stop_db()
        shutil.rmtree(workdir, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    ing = sub.add_parser("ingest", help="events/s through Mosquitto into smartcam-sink run")
    ing.add_argument("--db", choices=["sqlite", "postgresql"], default="sqlite")
    ing.add_argument("--events", type=int, default=30000)
    ing.add_argument("--publishers", type=int, default=2)
    ing.add_argument("--workers", type=int, default=1, help=">1 uses an MQTT 5 shared subscription group")
    ing.add_argument("--repeat", type=int, default=1, help="runs (fresh broker and database each); prints median")
    ing.add_argument("--share-group", action="store_true", help="use a shared subscription even for one worker")
    ing.add_argument("--backlog", action="store_true", help="publish while the sink is down, then time the drain")
    q = sub.add_parser("query", help="rollup query time over N stored events")
    q.add_argument("--db", choices=["sqlite", "postgresql"], default="sqlite")
    q.add_argument("--events", type=int, default=1_000_000)
    args = parser.parse_args()
    if args.command == "query":
        print(json.dumps(bench_query(args)))
        return
    runs = [bench_ingest(args) for _ in range(args.repeat)]
    for run in runs:
        print(json.dumps(run), file=sys.stderr)
    key = "drain_events_per_s" if args.backlog else "events_per_s"
    rates = sorted(r[key] for r in runs)
    print(json.dumps({**runs[0], "runs": len(runs), key: rates, f"median_{key}": statistics.median(rates),
                      "load_avg_1m": [r["load_avg_1m"] for r in runs]}))


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""The one-command demo: a sample clip through the edge, a broker, the sink on SQLite, a printed report.

Run through ``scripts/demo.sh`` (which installs what it needs first). Steps, each announced as it runs:

1. an INT8 person model: one already in ``--models-dir``, else built from ``../shared/models/yolov8n-coco.onnx``,
   else (online, with ``pip install 'smartcam[ultralytics]'``) from official weights that ultralytics downloads;
2. a broker: the system's Mosquitto when installed, otherwise the embedded pure-Python ``amqtt`` (MQTT 3.1.1);
3. the sink on SQLite with its dashboard and a local archive;
4. the edge on a sample clip (the street clip with a counting line, ``samples/demo_street.yaml``); Ctrl-C stops
   it early (the way to end a webcam or RTSP ``--source``) and the demo goes on with what it produced;
5. a check that every event the edge produced was stored once and archived, the analytics report and the
   dashboard URL; then everything stops (``--serve`` keeps the sink and dashboard running until Ctrl-C).

Everything it writes goes to ``--out`` (default ``demo-output/``, git-ignored); ``summary.json`` there holds
the figures. Exit code 0 only when every produced event was stored.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("SMARTCAM_SHARED", ROOT.parent / "shared"))
DEFAULT_CLIP = SHARED / "data" / "videos" / "outdoor_street_cctv_towncentre_720p.m4v"
FP32_ONNX = SHARED / "models" / "yolov8n-coco.onnx"
VIDEO_SUFFIXES = (".mp4", ".m4v", ".avi", ".mkv", ".mov")
BIN = Path(sys.executable).parent
MARKER = ".smartcam-demo-output"  # only a directory holding this is ever wiped by a re-run


class DemoError(RuntimeError):
    """A step failed; the message says which and where its log is."""


def say(msg: str) -> None:
    print(f"\033[1;36m==>\033[0m {msg}", flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_busy(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def wait_until(predicate, timeout: float, interval: float = 0.2) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return bool(predicate())


def tool(name: str) -> str:
    """A console script of this project, from the same environment as this interpreter."""
    path = BIN / name
    return str(path) if path.exists() else name


def show(path: Path) -> str:
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


# ------------------------------------------------------------------------------------------------ 1. model


def model_shape(imgsz: int, source: str, is_file: bool) -> tuple[int, int]:
    """(h, w) for the model: long side ``imgsz``, short side fitted to a video file's frames (as Ultralytics).

    A 16:9 clip gets a 384x640 model instead of 640x640: the same pixels, 1.7x less network. Cameras and
    streams are not opened here to look: they get a square model (build a fitted one with smartcam-model).
    """
    if is_file:
        import cv2

        from camera.detector import fitted_imgsz

        cap = cv2.VideoCapture(source)
        ok, image = cap.read()
        cap.release()
        if ok:
            return fitted_imgsz((image.shape[1], image.shape[0]), imgsz)
    return (imgsz, imgsz)


def get_model(shape: tuple[int, int], models_dir: Path, calib: list[Path], calib_frames: int) -> Path:
    """The INT8 person model of input ``shape`` (h, w): reused when already built, else built (with calibration)."""
    size = str(shape[0]) if shape[0] == shape[1] else f"{shape[0]}x{shape[1]}"
    wanted = models_dir / f"yolov8n-person-int8-{size}.onnx"
    if wanted.exists():
        say(f"model: using {show(wanted)} (already built; delete it to rebuild)")
        return wanted
    if FP32_ONNX.exists():
        weights = str(FP32_ONNX)
        say(f"model: building an INT8 person model with a {size} input from {FP32_ONNX.name}, calibrated on "
            f"{calib_frames} frames of {len(calib)} clip(s) (once; later runs reuse {show(wanted)})")
    else:
        weights = "yolo11n.pt"
        say("model: ../shared not found; building from official weights downloaded by ultralytics "
            "(needs internet and `pip install 'smartcam[ultralytics]'`)")
    if not calib:
        raise DemoError("no video file to calibrate the model on: pass --source with a video file")
    cmd = [tool("smartcam-model"), "build", "--weights", weights, "--imgsz", f"{shape[0]}x{shape[1]}", "--out", str(wanted),
           "--keep-classes", "person", "--calib-frames", str(calib_frames), "--no-eval", "--latency-runs", "0",
           "--calib", *map(str, calib)]
    t0 = time.monotonic()
    if subprocess.run(cmd).returncode != 0 or not wanted.exists():
        raise DemoError("the model build failed (see its output above)")
    say(f"model: built {show(wanted)} in {time.monotonic() - t0:.0f} s")
    return wanted


# ------------------------------------------------------------------------------------------------ 2. broker


def start_broker(workdir: Path, kind: str) -> tuple[subprocess.Popen, str, str]:
    """Start Mosquitto (or amqtt) on a free loopback port; returns (process, URL, which broker)."""
    port = free_port()
    mosquitto = shutil.which("mosquitto") or next(
        (p for p in ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto") if Path(p).exists()), None)
    if kind == "mosquitto" and not mosquitto:
        raise DemoError("--broker mosquitto: mosquitto is not installed (apt-get install mosquitto)")
    with open(workdir / "broker.log", "wb") as broker_log:  # the child keeps its own descriptor
        if mosquitto and kind != "amqtt":
            conf = workdir / "mosquitto.conf"
            # max_queued_messages: the default (1000) silently drops QoS 1 messages for an offline subscriber.
            conf.write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n"
                            "max_queued_messages 1000000\nmax_inflight_messages 0\n")
            proc = subprocess.Popen([mosquitto, "-c", str(conf)], stdout=broker_log, stderr=broker_log,
                                    start_new_session=True)
            url, name = f"mqtt://127.0.0.1:{port}", "mosquitto"
            say(f"broker: system Mosquitto on {url}")
        else:
            conf = workdir / "amqtt.yaml"
            conf.write_text(f"listeners:\n  default:\n    type: tcp\n    bind: 127.0.0.1:{port}\nplugins:\n"
                            "  amqtt.plugins.authentication.AnonymousAuthPlugin:\n    allow_anonymous: true\n")
            proc = subprocess.Popen([tool("amqtt"), "-c", str(conf)], stdout=broker_log, stderr=broker_log,
                                    start_new_session=True)
            url, name = f"mqtt://127.0.0.1:{port}?protocol=3.1.1", "amqtt"  # amqtt speaks MQTT 3.1.1 only
            why = "as asked" if kind == "amqtt" else "Mosquitto is not installed"
            say(f"broker: embedded amqtt ({why}) on {url}")
    if not wait_until(lambda: proc.poll() is not None or port_busy(port), 20) or proc.poll() is not None:
        stop(proc, "broker")
        raise DemoError(f"the broker did not start; see {workdir / 'broker.log'}")
    return proc, url, name


# ------------------------------------------------------------------------------------------------ 3-5


def stored_ids(db_path: Path) -> set[str]:
    """Event ids in the sink's database (read-only; empty until the sink has created it)."""
    try:
        with contextlib.closing(sqlite3.connect(f"file:{db_path}?mode=ro", uri=True, timeout=1)) as con:
            return {row[0] for row in con.execute("SELECT event_id FROM events")}
    except sqlite3.Error:
        return set()


def summarised_events(db_path: Path) -> tuple[int, int]:
    """(summaries stored, events they stand for) in the sink's database; (0, 0) until it exists."""
    try:
        with contextlib.closing(sqlite3.connect(f"file:{db_path}?mode=ro", uri=True, timeout=1)) as con:
            n, events = con.execute("SELECT COUNT(*), COALESCE(SUM(events), 0) FROM summaries").fetchone()
            return int(n), int(events)
    except sqlite3.Error:
        return 0, 0


def archived_ids(archive: Path) -> list[str]:
    """Every event id in the archive's JSON Lines files, duplicates kept (so they can be spotted)."""
    ids = []
    for path in sorted(archive.rglob("*.jsonl")):
        ids += [json.loads(line)["event_id"] for line in path.read_text().splitlines() if line.strip()]
    return ids


def produced_ids(events_file: Path) -> list[str]:
    if not events_file.exists():
        return []
    return [json.loads(line)["event_id"] for line in events_file.read_text().splitlines() if line.strip()]


def stop(proc: subprocess.Popen | None, name: str) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(20)
    except subprocess.TimeoutExpired:
        say(f"{name} did not stop within 20 s; killing it")
        proc.kill()
        proc.wait()


def prepare_out(out: Path) -> None:
    """Create ``out``; wipe it only when a previous demo made it (never a directory the user cares about)."""
    if out.exists():
        if (out / MARKER).exists():
            shutil.rmtree(out)
        elif any(out.iterdir()):
            raise DemoError(f"--out {out} exists and is not empty (and not a previous demo's output): "
                            "pass a new or empty directory")
    out.mkdir(parents=True, exist_ok=True)
    (out / MARKER).write_text("written by scripts/demo.py; the next demo run deletes this directory\n")


def start_sink(url: str, out: Path, http_port: int) -> subprocess.Popen:
    """The sink on SQLite with the dashboard and a local archive; returns once it is subscribed."""
    db_path = out / "smartcam.db"
    sink_log_path = out / "sink.log"
    cmd = [tool("smartcam-sink"), "run", "--broker", url, "--db", f"sqlite:///{db_path}",
           "--http", f"127.0.0.1:{http_port}", "--archive", str(out / "archive"), "--client-id", "demo-sink",
           "--log-every", "5"]
    with open(sink_log_path, "wb") as sink_log:
        sink = subprocess.Popen(cmd, stdout=sink_log, stderr=subprocess.STDOUT, start_new_session=True)

    def ready() -> bool:
        return sink.poll() is not None or (port_busy(http_port) and "connected to" in sink_log_path.read_text())

    if not wait_until(ready, 60) or sink.poll() is not None:
        stop(sink, "sink")
        tail = sink_log_path.read_text().strip().splitlines()[-1:] or ["(no output)"]
        raise DemoError(f"the sink did not start: {tail[0]} (see {sink_log_path})")
    time.sleep(0.5)  # the subscription is acknowledged right after the connection; the edge must not beat it
    say(f"sink: SQLite {show(db_path)}, archive {show(out / 'archive')}, dashboard on http://127.0.0.1:{http_port}/")
    return sink


def run_edge(source: str, model: Path, url: str, config: Path | None, events_file: Path, outbox: Path,
             max_frames: int | None, summary: bool = False) -> None:
    cmd = [tool("smartcam-edge"), "run", "--source", source, "--model", str(model), "--camera-id", "street-1",
           "--site", "demo", "--broker", url, "--events-file", str(events_file), "--outbox", str(outbox)]
    if summary:
        cmd += ["--publish-mode", "summary"]
    if config is not None:
        cmd[2:2] = ["--config", str(config)]
    if max_frames:
        cmd += ["--max-frames", str(max_frames)]
    say("edge: " + " ".join(show(Path(c)) if c.startswith(str(ROOT)) else c for c in cmd[1:]))
    # Its own session: Ctrl-C reaches only the demo, which forwards one SIGINT so the edge stops reading, sends
    # what it has queued and exits; the demo then goes on to the report (the way to end a live source).
    edge = subprocess.Popen(cmd, start_new_session=True)
    try:
        try:
            rc = edge.wait()
        except KeyboardInterrupt:
            say("Ctrl-C: stopping the edge; it sends what it has queued (Ctrl-C again: stop waiting for that)")
            edge.send_signal(signal.SIGINT)
            try:
                rc = edge.wait()
            except KeyboardInterrupt:
                edge.send_signal(signal.SIGINT)  # the edge's second SIGINT ends its drain wait at once
                rc = edge.wait(30)
    finally:
        stop(edge, "edge")
    if rc != 0:
        raise DemoError(f"the edge exited with code {rc} (1: events left unacknowledged in its outbox)")


def finish_summary(args: argparse.Namespace, produced: list[str], out: Path, http_port: int,
                   sink: subprocess.Popen, t0: float) -> int:
    """Summary mode: the events arrive as per-window summaries; check they account for every event, report."""
    db_path = out / "smartcam.db"
    say(f"edge done: {len(produced)} events summarised; waiting for the sink to store the summaries")
    wait_until(lambda: sink.poll() is not None or summarised_events(db_path)[1] >= len(produced), args.wait, 0.5)
    n, events = summarised_events(db_path)
    complete = events == len(produced)
    say(f"sink stored {n} summar{'y' if n == 1 else 'ies'} standing for {events} of {len(produced)} events"
        + (" (every one, once)" if complete else " (NOT all)"))
    print_report(db_path)
    dashboard = f"http://127.0.0.1:{http_port}/"
    summary = {"mode": "summary", "events_produced": len(produced), "summaries_stored": n,
               "events_summarised": events, "all_stored": complete, "dashboard": dashboard, "db": str(db_path),
               "elapsed_s": round(time.monotonic() - t0, 1)}
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"\n{n} summar{'y' if n == 1 else 'ies'} stood for all {events} events the edge produced; demo took "
          f"{summary['elapsed_s']:.0f} s." if complete else
          f"\nNOT every event was summarised and stored: {events} of {len(produced)}; see {out / 'sink.log'}")
    serve_or_stop(args.serve, sink, dashboard, "summaries")
    return 0 if complete else 1


def print_report(db_path: Path) -> None:
    say("analytics report (smartcam-sink report)")
    subprocess.run([tool("smartcam-sink"), "report", "--db", f"sqlite:///{db_path}", "--since", "48h"], check=False)


def serve_or_stop(serve: bool, sink: subprocess.Popen, dashboard: str, records: str) -> None:
    """With --serve, keep the sink (and its dashboard) up until Ctrl-C; otherwise say it is being stopped."""
    if serve:
        print(f"Dashboard: {dashboard}   (API: {dashboard}api/{records}, {dashboard}api/stats/hourly)")
        say("serving; press Ctrl-C to stop")
        with contextlib.suppress(KeyboardInterrupt, Terminated):
            sink.wait()
    else:
        print(f"Dashboard was at {dashboard} (stopped now; run with --serve to keep it up)")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--source", default=str(DEFAULT_CLIP),
                    help="video file, webcam index or RTSP URL (default: the street clip in ../shared)")
    ap.add_argument("--imgsz", type=int, default=640,
                    help="model input long side, 320/480/640 (default: %(default)s; 320 for a Raspberry Pi); the "
                         "short side is fitted to a video file's frames, e.g. 384x640 for 16:9")
    ap.add_argument("--calib-frames", type=int, default=32,
                    help="frames to calibrate the INT8 model on when building it (default: %(default)s)")
    ap.add_argument("--models-dir", default=str(ROOT / "models"),
                    help="where the INT8 model is looked for and built (default: %(default)s)")
    ap.add_argument("--config", default=str(ROOT / "samples" / "demo_street.yaml"),
                    help="edge config with zones/lines (default: %(default)s; 'none' for no zones or lines)")
    ap.add_argument("--max-frames", type=int, default=None, help="stop the edge after N processed frames")
    ap.add_argument("--broker", choices=("auto", "mosquitto", "amqtt"), default="auto",
                    help="auto: the system's Mosquitto if installed, else the embedded amqtt (default: auto)")
    ap.add_argument("--out", default=str(ROOT / "demo-output"), help="where the demo writes (default: %(default)s)")
    ap.add_argument("--http-port", type=int, default=8080,
                    help="dashboard port (default: %(default)s, or a free one if busy; 0 = any free port)")
    ap.add_argument("--wait", type=float, default=120.0,
                    help="seconds to wait for the sink to store every event after the edge ends (default: %(default)s)")
    ap.add_argument("--serve", action="store_true", help="keep the sink and dashboard running until Ctrl-C")
    ap.add_argument("--summary", action="store_true",
                    help="run the edge in summary mode (one message per minute instead of every event, for metered "
                         "links): the report is the same, there is no per-event record")
    return ap.parse_args(argv)


class Terminated(Exception):
    """SIGTERM or SIGHUP: stop everything now (the ``finally`` clauses stop the edge, sink and broker)."""


def _terminate(signum: int, _frame: object) -> None:
    raise Terminated(signal.Signals(signum).name)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # even when started with SIGINT ignored (nohup, &)
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _terminate)
    try:
        return run(args)
    except DemoError as exc:
        print(f"demo: error: {exc}", file=sys.stderr)
        return 2
    except (KeyboardInterrupt, Terminated) as exc:
        print(f"demo: interrupted ({exc or 'SIGINT'}); everything it started was stopped", file=sys.stderr)
        return 130


def run(args: argparse.Namespace) -> int:
    t0 = time.monotonic()
    source = args.source
    is_file = not source.isdigit() and "://" not in source and not source.startswith("picamera")
    if is_file and not Path(source).exists():
        raise DemoError(f"source not found: {source} (pass --source FILE|INDEX|URL)")
    config = None if args.config.lower() == "none" else Path(args.config)
    if config is not None and not config.is_file():
        raise DemoError(f"edge config not found: {config} (pass --config FILE or --config none)")
    out = Path(args.out).resolve()
    prepare_out(out)

    calib = sorted(p for p in (SHARED / "data" / "videos").glob("*") if p.suffix in VIDEO_SUFFIXES)
    calib = calib or ([Path(source)] if is_file else [])
    model = get_model(model_shape(args.imgsz, source, is_file), Path(args.models_dir).resolve(), calib,
                      args.calib_frames)

    work = Path(tempfile.mkdtemp(prefix="smartcam-demo-"))
    broker = sink = None
    try:
        broker, url, broker_name = start_broker(work, args.broker)
        http_port = args.http_port if args.http_port and not port_busy(args.http_port) else free_port()
        sink = start_sink(url, out, http_port)
        events_file = out / "events.jsonl"
        run_edge(source, model, url, config, events_file, work / "outbox.db", args.max_frames, args.summary)

        produced = produced_ids(events_file)
        if args.summary:
            return finish_summary(args, produced, out, http_port, sink, t0)
        say(f"edge done: {len(produced)} events written to {show(events_file)}; waiting for the sink to store them")
        db_path = out / "smartcam.db"
        wanted = set(produced)
        wait_until(lambda: sink.poll() is not None or wanted <= stored_ids(db_path), args.wait, 0.5)
        stored = stored_ids(db_path)
        missing = wanted - stored
        archive = out / "archive"
        wait_until(lambda: wanted <= set(archived_ids(archive)), 10, 0.5)  # written right after each commit
        archived = archived_ids(archive)
        all_stored = not missing and len(produced) == len(wanted)
        say(f"sink stored {len(wanted & stored)} of {len(produced)} events"
            + (" (every one, once)" if all_stored else f" ({len(missing)} MISSING)")
            + f"; archive holds {len(set(archived) & wanted)} of them in {len(archived)} lines")

        print_report(db_path)
        dashboard = f"http://127.0.0.1:{http_port}/"
        summary = {"events_produced": len(produced), "events_stored": len(wanted & stored),
                   "events_missing": len(missing), "events_archived": len(set(archived) & wanted),
                   "archive_lines": len(archived), "all_stored": all_stored, "broker": broker_name,
                   "broker_url": url, "imgsz": args.imgsz, "model": str(model), "dashboard": dashboard,
                   "db": str(db_path), "archive": str(archive), "elapsed_s": round(time.monotonic() - t0, 1)}
        (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        if all_stored:
            print(f"\nAll {len(produced)} events the edge produced were stored exactly once "
                  f"(and archived under {show(archive)}); demo took {summary['elapsed_s']:.0f} s.")
        else:
            print(f"\nNOT all events were stored: {len(missing)} of {len(produced)} missing; see {out / 'sink.log'}")
        serve_or_stop(args.serve, sink, dashboard, "events")
        return 0 if all_stored else 1
    finally:
        stop(sink, "sink")
        stop(broker, "broker")
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""The one-command demo: a sample clip through the edge, a broker, the sink on SQLite, a printed report.

Run through ``scripts/demo.sh`` (which installs what it needs first). Steps, each announced as it runs:

1. an INT8 person model: one already in ``models/``, else built from ``../shared/models/yolov8n-coco.onnx``,
   else (online, with ``pip install 'smartcam[ultralytics]'``) from official weights that ultralytics downloads;
2. a broker: the system's Mosquitto when installed, otherwise the embedded pure-Python ``amqtt``;
3. the sink on SQLite with its dashboard;
4. the edge on a sample clip;
5. the analytics report and the dashboard URL; then everything stops (``--serve`` keeps the sink running).

Everything it writes goes to ``demo-output/`` (git-ignored).
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
BIN = Path(sys.executable).parent


def say(msg: str) -> None:
    print(f"\033[1;36m==>\033[0m {msg}", flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, timeout: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return True
        except OSError:
            time.sleep(0.1)
    return False


def tool(name: str) -> str:
    """A console script of this project, from the same environment as this interpreter."""
    path = BIN / name
    return str(path) if path.exists() else name


# ------------------------------------------------------------------------------------------------ 1. model


def get_model(imgsz: int, out_dir: Path, calib: list[Path]) -> Path:
    models_dir = ROOT / "models"
    wanted = models_dir / f"yolov8n-person-int8-{imgsz}.onnx"
    if wanted.exists():
        say(f"model: using {wanted.relative_to(ROOT)} (already built)")
        return wanted
    if FP32_ONNX.exists():
        weights = FP32_ONNX
        say(f"model: building an INT8 person model at {imgsz}px from {weights} (calibrated on the sample clips)")
    else:
        weights = Path("yolo11n.pt")
        say("model: ../shared not found; building from official weights downloaded by ultralytics "
            "(needs internet and `pip install 'smartcam[ultralytics]'`)")
    cmd = [tool("smartcam-model"), "build", "--weights", str(weights), "--imgsz", str(imgsz),
           "--out", str(wanted), "--calib", *map(str, calib)]
    subprocess.run(cmd, check=True)
    return wanted


# ------------------------------------------------------------------------------------------------ 2. broker


def start_broker(workdir: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    mosquitto = shutil.which("mosquitto") or ("/usr/sbin/mosquitto" if Path("/usr/sbin/mosquitto").exists() else None)
    log = open(workdir / "broker.log", "wb")  # noqa: SIM115 - handed to the child for its lifetime
    if mosquitto:
        conf = workdir / "mosquitto.conf"
        # max_queued_messages: the default (1000) silently drops QoS 1 messages for an offline subscriber.
        conf.write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n"
                        "max_queued_messages 1000000\nmax_inflight_messages 0\n")
        proc = subprocess.Popen([mosquitto, "-c", str(conf)], stdout=log, stderr=log)
        url = f"mqtt://127.0.0.1:{port}"
        say(f"broker: system Mosquitto on {url}")
    else:
        conf = workdir / "amqtt.yaml"
        conf.write_text(f"listeners:\n  default:\n    type: tcp\n    bind: 127.0.0.1:{port}\nplugins:\n"
                        "  amqtt.plugins.authentication.AnonymousAuthPlugin:\n    allow_anonymous: true\n")
        proc = subprocess.Popen([tool("amqtt"), "-c", str(conf)], stdout=log, stderr=log)
        url = f"mqtt://127.0.0.1:{port}?protocol=3.1.1"  # amqtt speaks MQTT 3.1.1 only
        say(f"broker: Mosquitto not installed, using the embedded amqtt broker on {url}")
    if not wait_for_port(port):
        raise SystemExit(f"the broker did not start; see {workdir / 'broker.log'}")
    return proc, url


# ------------------------------------------------------------------------------------------------ 3-5


def stored_events(db_path: Path) -> int:
    try:
        with sqlite3.connect(f"file:{db_path}?mode=ro", uri=True, timeout=1) as con:
            return int(con.execute("SELECT count(*) FROM events").fetchone()[0])
    except sqlite3.Error:
        return 0


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


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--source", default=str(DEFAULT_CLIP), help="video file, webcam index, RTSP URL (default: %(default)s)")
    ap.add_argument("--imgsz", type=int, default=640, help="model input size (default: %(default)s)")
    ap.add_argument("--config", default=str(ROOT / "samples" / "demo_street.yaml"),
                    help="edge config with zones/lines (default: %(default)s, skipped if missing)")
    ap.add_argument("--max-frames", type=int, default=None, help="stop the edge after N frames")
    ap.add_argument("--out", default=str(ROOT / "demo-output"), help="where the demo writes (default: %(default)s)")
    ap.add_argument("--http-port", type=int, default=8080, help="dashboard port (default: %(default)s; 0 = any free)")
    ap.add_argument("--serve", action="store_true", help="keep the sink and dashboard running until Ctrl-C")
    args = ap.parse_args(argv)

    out = Path(args.out).resolve()
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    work = Path(tempfile.mkdtemp(prefix="smartcam-demo-"))
    source = args.source
    if not source.isdigit() and "://" not in source and not Path(source).exists():
        raise SystemExit(f"source not found: {source} (pass --source FILE|INDEX|URL)")

    calib = sorted(p for p in (SHARED / "data" / "videos").glob("*") if p.suffix in (".mp4", ".m4v", ".avi"))
    model = get_model(args.imgsz, out, calib or [Path(source)])

    broker = sink = edge = None
    t0 = time.monotonic()
    try:
        broker, url = start_broker(work)
        http_port = args.http_port if args.http_port and not _port_busy(args.http_port) else free_port()
        db_path = out / "smartcam.db"
        sink_cmd = [tool("smartcam-sink"), "run", "--broker", url, "--db", f"sqlite:///{db_path}",
                    "--http", f"127.0.0.1:{http_port}", "--archive", str(out / "archive"), "--client-id", "demo-sink"]
        sink_log = open(out / "sink.log", "wb")  # noqa: SIM115 - handed to the child
        sink = subprocess.Popen(sink_cmd, stdout=sink_log, stderr=subprocess.STDOUT)
        if not wait_for_port(http_port, 30):
            raise SystemExit(f"the sink did not start; see {out / 'sink.log'}")
        say(f"sink: SQLite {db_path.relative_to(ROOT) if db_path.is_relative_to(ROOT) else db_path}, "
            f"dashboard on http://127.0.0.1:{http_port}/")

        events_file = out / "events.jsonl"
        edge_cmd = [tool("smartcam-edge"), "run", "--source", source, "--model", str(model), "--camera-id", "street-1",
                    "--site", "demo", "--broker", url, "--events-file", str(events_file),
                    "--outbox", str(work / "outbox.db")]
        if Path(args.config).exists():
            edge_cmd += ["--config", args.config]
        if args.max_frames:
            edge_cmd += ["--max-frames", str(args.max_frames)]
        say("edge: " + " ".join(edge_cmd[1:]))
        edge = subprocess.Popen(edge_cmd)
        rc = edge.wait()
        if rc != 0:
            raise SystemExit(f"the edge exited with code {rc}")

        produced = sum(1 for _ in events_file.open()) if events_file.exists() else 0
        say(f"edge done: {produced} events written to {events_file.name}; waiting for the sink to store them")
        deadline = time.monotonic() + 60
        while (stored := stored_events(db_path)) < produced and time.monotonic() < deadline:
            time.sleep(0.5)
        say(f"sink stored {stored} of {produced} events ({time.monotonic() - t0:.0f} s since the broker started)")

        say("analytics report")
        subprocess.run([tool("smartcam-sink"), "report", "--db", f"sqlite:///{db_path}", "--since", "48h"], check=False)
        summary = {"events_produced": produced, "events_stored": stored, "dashboard": f"http://127.0.0.1:{http_port}/",
                   "db": str(db_path), "archive": str(out / "archive"), "model": str(model)}
        (out / "summary.json").write_text(json.dumps(summary, indent=2))
        print(f"\nDashboard: http://127.0.0.1:{http_port}/   (API: /api/cameras, /api/events, /api/stats/hourly)")
        if args.serve:
            say("serving; press Ctrl-C to stop")
            with contextlib.suppress(KeyboardInterrupt):
                sink.wait()
        return 0 if stored >= produced else 1
    finally:
        stop(edge, "edge")
        stop(sink, "sink")
        stop(broker, "broker")
        shutil.rmtree(work, ignore_errors=True)


def _port_busy(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


if __name__ == "__main__":
    sys.exit(main())

"""Over-the-air model swap on a running edge: deploy -> first event with the new model, and the gap across the swap.

A real Mosquitto, a directory registry, a real edge (``EdgeRunner`` in this process) on a looping clip; the new
model is published, signed and deployed with the same code as ``smartcam-model publish`` / ``deploy``. Measured:

* ``deploy_to_swap_s``: from the deploy command returning to the first frame detected by the new model
  (download + verify + health check + swap; the frame loop never waits for any of it);
* ``deploy_to_first_event_s``: to the first event that carries the new model's sha256;
* the swap itself: ``switch_ms`` (the pointer change: new inference queue, event builder's model) and
  ``drain_ms`` (frames already in the detector finishing on the old model, which is not a gap: they are
  detected and tracked);
* the detection gap: the longest time between two consecutive processed frames around the swap, against the
  median frame interval, and how many frames went without a detector (must be 0).

    .venv/bin/python bench/ota_swap.py --old models/yolov8n-192x320-int8.onnx --new models/yolov8n-384x640-int8.onnx \\
        [--clip ../shared/data/videos/outdoor_street_cctv_towncentre_720p.m4v] [--runs 3] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from camera.config import load_config  # noqa: E402
from camera.pipeline import EdgeRunner  # noqa: E402
from contract.broker import BrokerSettings  # noqa: E402
from models.deploy import deploy  # noqa: E402
from models.registry import open_registry, publish  # noqa: E402
from models.signing import generate_keypair, load_private_key  # noqa: E402
from tests.services import start_mosquitto  # noqa: E402

DEFAULT_CLIP = ROOT.parent / "shared" / "data" / "videos" / "outdoor_street_cctv_towncentre_720p.m4v"


def one_run(old: Path, new: Path, clip: Path, realtime: bool, work: Path, streams: int | None) -> dict:
    broker = start_mosquitto(work / "mqtt")
    try:
        private, public = generate_keypair(work / "keys")
        registry = open_registry(work / "registry")
        entry = publish(registry, new, load_private_key(private), name="bench")
        cfg = load_config(overrides={
            "camera_id": "bench", "site": "lab", "source": str(clip), "model": str(old), "realtime": realtime,
            "loop": 0, "mqtt": {"broker": broker.url, "stats_interval_s": 5}, "events_file": str(work / "ev.jsonl"),
            "outbox": {"path": str(work / "outbox.db")}, "detector": {"streams": streams} if streams else {},
            "model_updates": {"enabled": True, "trust_key": str(public), "dir": str(work / "models"),
                              "probation_s": 5}})
        runner = EdgeRunner(cfg)
        frames: list[tuple[float, str, bool]] = []  # (perf_counter, sha of the serving model, detector ran)
        runner.open()
        observe = runner.updater.observe

        def timed(image, people, ms, error=None):
            frames.append((time.perf_counter(), runner.detector.sha256, people is not None))
            observe(image, people, ms, error)

        runner.updater.observe = timed
        thread = threading.Thread(target=lambda: (runner._loop(), runner.close()), daemon=True)
        thread.start()
        time.sleep(8)  # warm: frames for the health check, a steady frame rate
        deploy(registry, entry["version"], BrokerSettings.from_url(broker.url), "lab", ["bench"], say=lambda _: None)
        t_deploy = time.perf_counter()
        first_event = None
        sha12 = entry["sha256"][:12]
        deadline = time.monotonic() + 120
        while first_event is None and time.monotonic() < deadline:
            with open(work / "ev.jsonl") as fh:
                if any(json.loads(line)["model"]["sha256"] == sha12 for line in fh if line.strip()):
                    first_event = time.perf_counter()
            time.sleep(0.01)
        time.sleep(2)
        runner.request_stop()
        thread.join(60)
        swaps = [s for s in runner.swaps if s["trial"]]
        assert swaps, "the new model was never swapped in"
        first_new = next(i for i, f in enumerate(frames) if f[1] == entry["sha256"])
        at_deploy = next(i for i, f in enumerate(frames) if f[0] >= t_deploy)
        gaps = [b[0] - a[0] for a, b in zip(frames, frames[1:], strict=False)]  # gaps[i]: frame i -> i + 1

        def ms(values: list[float]) -> float:
            return round(statistics.median(values) * 1000, 2)

        return {
            "deploy_to_swap_s": round(frames[first_new][0] - t_deploy, 3),
            "deploy_to_first_event_s": round(first_event - t_deploy, 3) if first_event else None,
            "switch_ms": round(swaps[0]["switch_ms"], 3), "drain_ms": round(swaps[0]["drain_ms"], 2),
            # frame intervals: the old model before the deploy, during the update (download, health check on a
            # worker thread), at the swap itself (last old frame -> first new frame), the new model after it
            "interval_ms_old": ms(gaps[max(0, at_deploy - 100):at_deploy]),
            "interval_ms_during_update_median": ms(gaps[at_deploy:first_new - 1]),
            "interval_ms_during_update_max": round(max(gaps[at_deploy:first_new - 1]) * 1000, 2),
            "interval_ms_at_swap": round(gaps[first_new - 1] * 1000, 2),
            "interval_ms_new": ms(gaps[first_new + 5:first_new + 105]),
            "frames_without_detector": sum(1 for f in frames if not f[2]),
            "new_version": entry["version"],
        }
    finally:
        broker.stop()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--old", required=True, type=Path, help="the model the edge starts on")
    ap.add_argument("--new", required=True, type=Path, help="the model deployed to it")
    ap.add_argument("--clip", type=Path, default=DEFAULT_CLIP)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--streams", type=int, help="detector streams (default: the edge's)")
    ap.add_argument("--json", type=Path, help="write the results here")
    args = ap.parse_args()
    results = {}
    for mode, realtime in (("free-running", False), ("realtime", True)):
        rows = []
        for i in range(args.runs):
            work = Path(tempfile.mkdtemp(prefix="smartcam-ota-bench-"))
            try:
                rows.append(one_run(args.old, args.new, args.clip, realtime, work, args.streams))
            finally:
                shutil.rmtree(work, ignore_errors=True)
            print(mode, i + 1, json.dumps(rows[-1]), flush=True)
        results[mode] = rows
    git = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT).stdout
    summary = {"old": str(args.old), "new": str(args.new), "clip": str(args.clip), "commit": git.strip(),
               "results": results}
    for mode, rows in results.items():
        med = {k: statistics.median(r[k] for r in rows) for k in rows[0]
               if isinstance(rows[0][k], (int, float)) and all(r[k] is not None for r in rows)}
        summary[f"{mode}_median"] = med
        print(f"{mode} (median of {len(rows)}): " + ", ".join(f"{k} {v}" for k, v in med.items()))
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

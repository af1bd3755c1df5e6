"""Bytes the edge publishes per hour of video vs the size of the video itself (issue 7; target >= 1000x less).

For each clip and publishing mode: a real Mosquitto (started here, on a free port), a subscriber on
``smartcam/#`` that records every message the broker delivers (events, batches, summaries, the retained
count/zone/line snapshots, status, stats), and ``smartcam-edge run --realtime`` on the clip, so the stats cadence
(every ``--stats-interval`` s) and every other timer run at their real rate. Short clips are played several times
(``--loop``) so that each run covers at least ``--min-duration`` seconds: the per-hour rate then includes the
per-minute and per-window costs at their real weight instead of a 14-s clip's one-off start and end messages
(extrapolated x260 to an hour). Published bytes = topic + payload + a fixed MQTT overhead per message
(``MQTT_OVERHEAD``: PUBLISH fixed header 1 + remaining length 2 + topic length 2 + packet id 2 + MQTT 5
properties length 1, plus its 4-byte PUBACK); ``--tcp-overhead`` adds a TCP/IPv4 estimate per message on top.
Per hour = bytes / video time x 3600; the video's own rate = file size / clip duration x 3600 (the file as
stored: H.264/MPEG-4 at the bitrate of the clip).

Modes (``--modes``), run side by side on the same detections (each with its own broker):
- ``summary``: ``--publish-mode summary`` (one summary.v1 message per 60-s window, for metered links);
- ``batched``: the edge default, events in zlib-compressed batches (``--batch-linger`` 2 s);
- ``per-event``: ``--batch-linger 0``, one message per event (as before batching).

    .venv/bin/python bench/bytes_published.py            # the four clips, all three modes, >= 120 s each
    .venv/bin/python bench/bytes_published.py --clips ../shared/data/videos/outdoor_street_cctv_towncentre_720p.m4v

``samples`` (``--modes samples``) is the learning loop's sampled frames (issue 15): not a run of the edge, but
the edge's sampler and sample encoder on the clip's frames (``bench/sample_bytes.py``), priced at the default
rates (200 samples a camera-day) and put in the same table per hour (a day's bytes / 24).

Needs Mosquitto (scripts/setup.sh) and a model: ``--model`` (default: the demo's models/yolov8n-person-int8-384x640.onnx if
built, else the shared fp32 ONNX; the published bytes depend on what is seen, not on the model's speed).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import cv2

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # tests.services (the real-Mosquitto starter) when run as a script

from bench.sample_bytes import as_row, measure_samples  # noqa: E402
from bench.sample_bytes import table as samples_table  # noqa: E402
from camera.config import MqttConfig  # noqa: E402
from contract.batch import decode_batch  # noqa: E402
from contract.topics import parse_topic  # noqa: E402
from tests.services import start_mosquitto  # noqa: E402

SHARED = Path(os.environ.get("SMARTCAM_SHARED", ROOT.parent / "shared")).resolve()
VIDEOS = SHARED / "data" / "videos"
STREET = VIDEOS / "outdoor_street_cctv_towncentre_720p.m4v"
MQTT_OVERHEAD = 12  # bytes per message: PUBLISH header 8 (QoS 1, MQTT 5, no properties) + PUBACK 4
TCP_OVERHEAD = 104  # bytes per message: PUBLISH and PUBACK each in its own packet, IPv4 20 + TCP 32 (timestamps)
CONFIGS = {STREET.name: ROOT / "samples" / "demo_street.yaml"}  # the street clip with its zone and line
MODES = {  # name -> edge flags
    "summary": ["--publish-mode", "summary"],
    "batched": [],  # the default: --batch-linger 2
    "per-event": ["--batch-linger", "0"],
}


def default_model() -> Path:
    built = ROOT / "models" / "yolov8n-person-int8-384x640.onnx"  # ./scripts/demo.sh builds it
    return built if built.exists() else SHARED / "models" / "yolov8n-coco.onnx"


@dataclass
class Tally:
    """Messages and bytes received on ``smartcam/#``, per kind (events, count, zones, lines, status, stats)."""

    messages: Counter = field(default_factory=Counter)
    topic_payload_bytes: Counter = field(default_factory=Counter)
    events: int = 0  # events delivered: one per ``events`` message, many per ``batch`` or ``summary`` message
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, topic: str, payload: bytes) -> None:
        parsed = parse_topic(topic)
        kind = parsed[2].split("/")[0] if parsed else "other"
        if kind == "batch":
            carried = len(decode_batch(payload, 64 << 20))
        elif kind == "summary":
            carried = json.loads(payload)["events"]
        else:
            carried = int(kind == "events")
        with self.lock:
            self.messages[kind] += 1
            self.topic_payload_bytes[kind] += len(topic.encode()) + len(payload)
            self.events += carried

    def total_messages(self) -> int:
        return sum(self.messages.values())

    def total_bytes(self, per_message: int) -> int:
        return sum(self.topic_payload_bytes.values()) + per_message * self.total_messages()


def subscribe(port: int, tally: Tally):
    """A real MQTT 5 subscriber on ``smartcam/#`` (QoS 1); returns the running client."""
    import paho.mqtt.client as mqtt

    subscribed = threading.Event()
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"bytes-bench-{port}", protocol=mqtt.MQTTv5)
    client.on_connect = lambda c, u, f, rc, p: c.subscribe("smartcam/#", qos=1)
    client.on_subscribe = lambda *a: subscribed.set()
    client.on_message = lambda c, u, msg: tally.add(msg.topic, bytes(msg.payload))
    client.connect("127.0.0.1", port)
    client.loop_start()
    if not subscribed.wait(10):
        raise SystemExit("the subscriber could not subscribe to smartcam/#")
    return client


def clip_info(path: Path) -> tuple[float, int]:
    """(duration in seconds from frame count / fps, file size in bytes)."""
    cap = cv2.VideoCapture(str(path))
    try:
        frames, fps = cap.get(cv2.CAP_PROP_FRAME_COUNT), cap.get(cv2.CAP_PROP_FPS)
    finally:
        cap.release()
    if not frames or not fps:
        raise SystemExit(f"{path}: cannot read frame count and fps")
    return frames / fps, path.stat().st_size


def measure(clip: Path, model: Path, fps: float, stats_interval: float, mode: str, loops: int,
            workdir: Path) -> dict:
    """One clip (played ``loops`` times) through the edge in real time into a fresh Mosquitto."""
    clip_duration, clip_size = clip_info(clip)
    duration, size = clip_duration * loops, clip_size * loops  # the video the run covered, as stored
    workdir.mkdir(parents=True, exist_ok=True)
    broker = start_mosquitto(workdir / "mosquitto")
    tally = Tally()
    sub = subscribe(broker.port, tally)
    try:
        cmd = [sys.executable, "-m", "camera", "run", "--source", str(clip), "--model", str(model),
               "--camera-id", "cam-1", "--site", "bench", "--broker", broker.url, "--realtime", "--fps", str(fps),
               "--loop", str(loops), "--stats-interval", str(stats_interval), *MODES[mode],
               "--outbox", str(workdir / "outbox.db"), "--events-file", str(workdir / "events.jsonl")]
        if clip.name in CONFIGS:
            cmd[4:4] = ["--config", str(CONFIGS[clip.name])]
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
        if proc.returncode != 0:
            raise SystemExit(f"the edge failed on {clip.name} (exit {proc.returncode}):\n{proc.stderr[-2000:]}")
        produced = [json.loads(line)["type"] for line in (workdir / "events.jsonl").read_text().splitlines()]
        events = len(produced)
        deadline = time.monotonic() + 10  # wait for the broker to hand over everything acknowledged
        while tally.events < events and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(0.5)  # the final offline status and stats
    finally:
        sub.loop_stop()
        sub.disconnect()
        broker.stop()
    mqtt_bytes = tally.total_bytes(MQTT_OVERHEAD)
    wire_bytes = tally.total_bytes(MQTT_OVERHEAD + TCP_OVERHEAD)
    # What does not depend on people (status, stats) vs what each person adds (everything else).
    fixed = sum(tally.topic_payload_bytes[k] + MQTT_OVERHEAD * tally.messages[k] for k in ("status", "stats"))
    people = produced.count("person.enter")
    if tally.events < events:
        raise SystemExit(f"{clip.name} ({mode}): the subscriber got {tally.events} of {events} events")
    return {
        "clip": clip.name, "mode": mode, "loops": loops, "duration_s": round(duration, 2), "video_bytes": size,
        "events": events,
        "people": people, "fixed_bytes": fixed,
        "bytes_per_person": (mqtt_bytes - fixed) / people if people else None,
        "messages": dict(tally.messages), "topic_payload_bytes": dict(tally.topic_payload_bytes),
        "mqtt_bytes": mqtt_bytes, "wire_bytes_est": wire_bytes,
        "video_bytes_per_hour": size / duration * 3600, "mqtt_bytes_per_hour": mqtt_bytes / duration * 3600,
        "wire_bytes_per_hour_est": wire_bytes / duration * 3600,
        "ratio": size / mqtt_bytes, "ratio_wire_est": size / wire_bytes,
    }


def break_even(r: dict) -> float | None:
    """People per hour at which the published bytes reach 1/1000 of this clip's video bytes."""
    if not r["bytes_per_person"]:
        return None
    budget = r["video_bytes_per_hour"] / 1000 - r["fixed_bytes"] / r["duration_s"] * 3600
    return max(0.0, budget / r["bytes_per_person"])


def table(rows: list[dict]) -> str:
    head = ("| clip | mode | video s (plays) | video MB/h | people (person.enter) per h | messages (events) "
            "| published KB/h | ratio | with TCP/IP est. KB/h | ratio | B per person | people/h at 1000x |")
    lines = [head, "| --- |" + " ---: |" * 11]
    for r in rows:
        if r["mode"] == "samples":  # priced at the default rates, not counted from a run
            d = r["sample_detail"]
            lines.append(f"| {r['clip']} | samples | {r['duration_s']:.0f} (1) | "
                         f"{r['video_bytes_per_hour'] / 1e6:,.0f} | - | {d['samples_per_day']:.0f}/day "
                         f"({d['mean_message_bytes']:,} B each) | {r['mqtt_bytes_per_hour'] / 1e3:,.1f} | "
                         f"{r['ratio']:,.0f}x | {r['wire_bytes_per_hour_est'] / 1e3:,.1f} | "
                         f"{r['ratio_wire_est']:,.0f}x | - | - |")
            continue
        msgs = sum(r["messages"].values())
        per_person = f"{r['bytes_per_person']:,.0f}" if r["bytes_per_person"] else "-"
        even = break_even(r)
        lines.append(f"| {r['clip']} | {r['mode']} | {r['duration_s']:.0f} ({r['loops']}) | "
                     f"{r['video_bytes_per_hour'] / 1e6:,.0f} | "
                     f"{r['people'] / r['duration_s'] * 3600:,.0f} | {msgs} ({r['events']}) | "
                     f"{r['mqtt_bytes_per_hour'] / 1e3:,.1f} | {r['ratio']:,.0f}x | "
                     f"{r['wire_bytes_per_hour_est'] / 1e3:,.1f} | {r['ratio_wire_est']:,.0f}x | {per_person} | "
                     f"{'-' if even is None else f'{even:,.0f}'} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clips", nargs="+", type=Path,
                    default=sorted(p for p in VIDEOS.glob("*") if p.suffix in (".mp4", ".m4v", ".avi")),
                    help="video files (default: every clip in ../shared/data/videos)")
    ap.add_argument("--model", type=Path, default=default_model(), help="edge model (default: %(default)s)")
    ap.add_argument("--fps", type=float, default=5.0, help="edge processing rate (default: %(default)s)")
    ap.add_argument("--stats-interval", type=float, default=MqttConfig.model_fields["stats_interval_s"].default,
                    help="edge stats period in seconds, the edge's default (default: %(default)s)")
    ap.add_argument("--modes", nargs="+", choices=[*MODES, "samples"], default=[*MODES, "samples"],
                    help="publishing modes to compare, each run on every clip, and the learning loop's samples "
                    "(default: all)")
    ap.add_argument("--min-duration", type=float, default=120.0, metavar="S",
                    help="play each clip enough times to cover at least S seconds of video (default: %(default)s)")
    ap.add_argument("--sequential", action="store_true", help="run the modes one after another, not side by side")
    ap.add_argument("--json", type=Path, help="also write every figure (per message kind) to this JSON file")
    args = ap.parse_args(argv)
    missing = [str(p) for p in [*args.clips, args.model] if not p.exists()]
    if missing:
        ap.error(f"not found: {', '.join(missing)}")

    rows, sampled = [], []
    edge_modes = [m for m in args.modes if m in MODES]
    for clip in args.clips:
        loops = max(1, math.ceil(args.min_duration / clip_info(clip)[0]))
        if edge_modes:
            print(f"  {clip.name}: {loops} play(s) in real time, modes {', '.join(edge_modes)} ...",
                  file=sys.stderr, flush=True)
            with tempfile.TemporaryDirectory(prefix="bytes-bench-") as tmp, \
                    ThreadPoolExecutor(1 if args.sequential else len(edge_modes)) as pool:
                runs = [pool.submit(measure, clip, args.model, args.fps, args.stats_interval, mode, loops,
                                    Path(tmp) / mode) for mode in edge_modes]
                rows += [run.result() for run in runs]
        if "samples" in args.modes:
            print(f"  {clip.name}: samples (sampler + encoder on its frames) ...", file=sys.stderr, flush=True)
            sampled.append(measure_samples(clip, args.model, CONFIGS.get(clip.name), args.fps, MQTT_OVERHEAD,
                                           TCP_OVERHEAD))
            rows.append(as_row(sampled[-1], *clip_info(clip)))
    print(f"model {args.model.name}, --fps {args.fps:g}, --realtime, stats every {args.stats_interval:g} s; "
          f"published = topic + payload + {MQTT_OVERHEAD} B/message MQTT overhead "
          f"(TCP/IP est.: + {TCP_OVERHEAD} B/message)\n")
    print(table(rows))
    if sampled:
        print("\nsamples (learning loop, issue 15) at the default rates: 2/min, 30/h, 200/day; max_side "
              f"{sampled[0]['max_side']}, JPEG quality {sampled[0]['jpeg_quality']}; the random baseline alone "
              f"offers {sampled[0]['random_offered_per_day']}/day at --fps {args.fps:g}\n")
        print(samples_table(sampled))
    for mode in edge_modes:
        mine = [r for r in rows if r["mode"] == mode]
        kinds = Counter()
        for r in mine:
            kinds.update(r["topic_payload_bytes"])
        total = sum(kinds.values())
        print(f"\n{mode}: share of topic+payload bytes: "
              + ", ".join(f"{k} {v / total:.0%}" for k, v in kinds.most_common()))
        worst = min(mine, key=lambda r: r["ratio"])
        print(f"{mode}: smallest ratio {worst['ratio']:,.0f}x ({worst['clip']}); target >= 1000x: "
              f"{'met' if worst['ratio'] >= 1000 else 'NOT met'}")
    for clip in args.clips:
        mine = {r["mode"]: r for r in rows if r["clip"] == clip.name}
        print(f"{clip.name}: " + ", ".join(f"{m} {r['ratio']:,.0f}x" for m, r in mine.items()))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""``smartcam-edge``: run the edge pipeline on a camera/stream/file, or detect people in still images.

    smartcam-edge run --source clip.mp4 --model person-int8.onnx --camera-id door [--broker mqtt://host:1883]
    smartcam-edge detect --model person-int8.onnx --json image.jpg ...

Exit codes (README, Troubleshooting): 0 ok, 1 events not delivered (left in the outbox after the drain wait, or
dead-lettered during the run), 2 bad configuration or source (a missing model file included), 3 storage failure
(outbox or events file: disk full, unwritable), 4 the model cannot be used (unreadable, not a detector ONNX), 5 the
publisher stopped (its outbox drain failed again and again).
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
from datetime import datetime
from typing import Any

log = logging.getLogger("camera")

EXIT_USAGE = 2
EXIT_MODEL = 4


def _iso_time(value: str) -> str:
    try:
        datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an ISO 8601 time: {value!r} (e.g. 2024-05-01T08:00:00Z)") from None
    return value.replace("Z", "+00:00")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="smartcam-edge", description="smartcam edge: people detection → tracked events → MQTT.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("-q", "--quiet", action="store_true", help="warnings and errors only")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run the pipeline on a source", description=(
        "Run the edge pipeline. Settings come from --config (YAML) and these flags; flags win. "
        "Without --broker the edge runs offline: events go to --events-file, or to stdout."))
    run.add_argument("--config", metavar="EDGE.yaml", help="YAML config file (see samples/edge*.yaml); one that "
                     "lists cameras: runs them all in this process (samples/edge-site.yaml)")
    run.add_argument("--camera", metavar="ID", help="with a cameras: config, run only this camera")
    run.add_argument("--source", help="video file, image folder, webcam index (0), rtsp://... / http://... URL, "
                                      "or picamera[:N]")
    run.add_argument("--model", help="detection ONNX (fp32 or INT8, Ultralytics layout)")
    run.add_argument("--camera-id", dest="camera_id", help="camera name (one MQTT topic level)")
    run.add_argument("--site", help="site name (default: default)")
    run.add_argument("--broker", help="mqtt://[user@]host[:port] or mqtts://... (omit for offline)")
    run.add_argument("--username", help="MQTT user (or in the URL)")
    run.add_argument("--password", help="MQTT password; prefer $SMARTCAM_MQTT_PASSWORD")
    run.add_argument("--tls-ca", dest="tls_ca", metavar="CA.pem", help="CA certificate that signed the broker's")
    run.add_argument("--tls-insecure", dest="tls_insecure", action="store_true", default=None,
                     help="skip broker hostname verification (testing only)")
    run.add_argument("--client-id", dest="client_id", help="MQTT client id (default smartcam-edge-<site>-<camera>)")
    run.add_argument("--stats-interval", dest="stats_interval_s", type=float, metavar="S",
                     help="publish runtime stats every S seconds (default 60)")
    run.add_argument("--batch-linger", dest="batch_linger_s", type=float, metavar="SECONDS",
                     help="send events in zlib-compressed batches on .../batch once the oldest has waited SECONDS "
                          "(default 2; 0 = one message per event on .../events)")
    run.add_argument("--publish-mode", dest="publish_mode", choices=("events", "summary"),
                     help="events (default): every event; summary: one message per window with the hourly "
                          "figures' increments, for metered links (no per-person records; docs/mqtt.md)")
    run.add_argument("--confirm", choices=("sink", "broker"),
                     help="keep each event in the outbox until the sink confirms it committed it (sink), or only "
                          "until the broker acknowledges it (broker, the default: works with any consumer)")
    run.add_argument("--confirm-timeout", dest="confirm_timeout_s", type=float, metavar="S",
                     help="confirm sink: send an event again when unconfirmed S seconds after the broker's ack "
                          "(default 30)")
    run.add_argument("--summary-interval", dest="summary_interval_s", type=int, metavar="S",
                     help="summary mode: window length in seconds, a divisor of 3600 (default 60)")
    run.add_argument("--outbox", metavar="FILE.db", help="durable outbox path "
                                                         "(default $XDG_STATE_HOME/smartcam/<site>-<camera>.outbox.db)")
    run.add_argument("--outbox-max", dest="outbox_max", type=int, metavar="N",
                     help="outbox bound; beyond it the oldest messages are dropped and counted (default 100000)")
    run.add_argument("--events-file", dest="events_file", metavar="EVENTS.jsonl",
                     help="append every event as one JSON line")
    run.add_argument("--save-video", dest="save_video", metavar="OUT.mp4",
                     help="write an annotated video (boxes, ids, zones, lines, counts)")
    run.add_argument("--tracks-file", dest="tracks_file", metavar="TRACKS.txt",
                     help="write every person track's box per processed frame in the MOTChallenge text format "
                          "(frame, id, x, y, w, h, score, -1, -1, -1), to score tracking with standard tools")
    run.add_argument("--max-frames", dest="max_frames", type=int, metavar="N", help="stop after N processed frames")
    run.add_argument("--fps", type=float, metavar="N", help="target processing rate; extra frames are skipped")
    run.add_argument("--realtime", action="store_true", default=None, help="pace a file to its own frame rate")
    run.add_argument("--loop", type=int, metavar="N", help="files and image folders: play N times, timestamps "
                                                          "running on (0 = forever; default 1)")
    run.add_argument("--start-time", dest="start_time", type=_iso_time, metavar="ISO",
                     help="files: capture time of the first frame (replay footage as of a date; default now)")
    run.add_argument("--conf", type=float, help="detection confidence threshold (default 0.1: weak detections "
                                                "continue tracks, only confident ones start them)")
    run.add_argument("--iou", type=float, help="NMS IoU threshold (default 0.45)")
    run.add_argument("--regions", choices=("auto", "lines", "off"),
                     help="also detect on tiles around the counting lines at 1.5x the model input (auto, the default: "
                          "when that sees them >= 1.3x sharper than the whole frame; one model run per tile)")
    run.add_argument("--classes", help="comma-separated class names to detect (default person)")
    run.add_argument("--threads", type=int, help="inference threads per stream (default: the cores shared out "
                                                 "between the streams; lower it on a device busy with other work)")
    run.add_argument("--streams", type=int, help="frames in the detector at once, results kept in frame order "
                                                 "(default: one per core; 1 = lowest latency)")
    run.add_argument("--provider", help="onnxruntime execution provider: cpu (default), openvino (pip install "
                                        "onnxruntime-openvino), cuda, ...; missing = CPU with a warning")
    motion = run.add_mutually_exclusive_group()
    motion.add_argument("--motion", dest="motion", action="store_const", const=True,
                        help="force the motion gate on (default: on for live sources, off for files)")
    motion.add_argument("--no-motion", dest="motion", action="store_const", const=False,
                        help="run the detector on every frame")
    ota = run.add_argument_group("over-the-air model updates (docs/models-ota.md; off by default)")
    ota.add_argument("--model-updates", dest="model_updates", action="store_true", default=None,
                     help="follow the desired model published by `smartcam-model deploy` (needs --broker)")
    ota.add_argument("--trust-key", dest="trust_key", metavar="signing.pub",
                     help="the registry's public key: models whose signature does not verify are refused")
    ota.add_argument("--allow-unsigned-models", dest="allow_unsigned", action="store_true", default=None,
                     help="accept models without a valid signature (testing only)")
    ota.add_argument("--model-dir", dest="model_dir", metavar="DIR",
                     help="downloaded models and current.json (default $XDG_STATE_HOME/smartcam/<site>-<camera>.models)")
    ota.add_argument("--probation", dest="probation_s", type=float, metavar="S",
                     help="watch a new model this long after the swap, roll back if it fails (default 60)")
    ota.add_argument("--model-max-bytes", dest="model_max_bytes", type=int, metavar="N",
                     help="largest model download accepted (default 200 MiB)")
    ota.add_argument("--model-download-timeout", dest="model_download_timeout_s", type=float, metavar="S",
                     help="abandon a download with no data for S seconds (default 30)")
    ota.add_argument("--health-frames", dest="health_frames", type=int, metavar="N",
                     help="recent frames a new model is checked on before it serves (default 8; 0 = load only)")
    ota.add_argument("--max-latency-factor", dest="max_latency_factor", type=float, metavar="X",
                     help="refuse or roll back a model X times slower than the current one (default 5)")
    ota.add_argument("--min-detection-ratio", dest="min_detection_ratio", type=float, metavar="R",
                     help="refuse or roll back a model finding people on fewer than R of the frames where the "
                          "current one does (default 0.5)")
    run.add_argument("--drain-timeout", dest="drain_timeout_s", type=float, metavar="S",
                     help="at the end of a file, wait up to S s for the broker to acknowledge (default 30)")
    run.add_argument("--homeassistant", dest="homeassistant", action="store_true", default=None,
                     help="publish Home Assistant MQTT discovery: the camera appears there as one device")
    run.add_argument("--homeassistant-prefix", dest="homeassistant_prefix", metavar="PREFIX",
                     help="Home Assistant's discovery prefix (default homeassistant)")
    run.add_argument("--metrics", dest="metrics_listen", metavar="HOST:PORT",
                     help="serve Prometheus metrics on http://HOST:PORT/metrics (e.g. 127.0.0.1:9108; default off)")
    run.add_argument("--samples", dest="samples_enabled", action="store_true", default=None,
                     help="send hard frames (masked, resized JPEG + metadata) to the broker for the learning loop "
                          "(default off; README: Privacy)")
    run.add_argument("--samples-per-minute", dest="samples_per_minute", type=int, metavar="N",
                     help="samples per minute at most (default 2)")
    run.add_argument("--samples-per-hour", dest="samples_per_hour", type=int, metavar="N",
                     help="samples per hour at most (default 30)")
    run.add_argument("--samples-per-day", dest="samples_per_day", type=int, metavar="N",
                     help="samples per day at most (default 200)")
    run.add_argument("--samples-max-side", dest="samples_max_side", type=int, metavar="PX",
                     help="longer side of a sent sample in pixels at most (default 640)")
    run.add_argument("--no-broker", dest="no_broker", action="store_true",
                     help="offline even if the config file names a broker")

    det = sub.add_parser("detect", help="detect people in images and print the boxes",
                         description="Detect objects in still images (source pixels).")
    det.add_argument("--model", required=True, help="detection ONNX")
    det.add_argument("--conf", type=float, default=0.25, help="confidence threshold (default 0.25)")
    det.add_argument("--iou", type=float, default=0.45, help="NMS IoU threshold (default 0.45)")
    det.add_argument("--classes", default="person", help="comma-separated class names, or 'all' (default person)")
    det.add_argument("--threads", type=int, help="onnxruntime intra-op threads")
    det.add_argument("--json", action="store_true", help="print JSON (the default; kept for scripts)")
    det.add_argument("images", nargs="+", metavar="IMAGE")

    box = sub.add_parser("outbox", help="inspect an outbox: the dead letters the broker kept rejecting",
                         description="Read an outbox file (also while the edge runs, read-only).")
    box.add_argument("action", choices=("dead-letters",), help="dead-letters: rows moved out of the queue after "
                     "the broker rejected them mqtt.max_rejections times (or the MQTT client refused them)")
    box.add_argument("--outbox", required=True, metavar="FILE.db", help="the outbox file (run --outbox)")
    box.add_argument("--limit", type=int, metavar="N", help="the oldest N only")
    box.add_argument("--json", action="store_true", help="one JSON object per line (payload as text)")
    return parser


def _overrides(args: argparse.Namespace) -> dict:
    """CLI flags as dotted config keys (None = not given, the YAML or the default stays)."""
    return {
        "source": args.source, "model": args.model, "camera_id": args.camera_id, "site": args.site,
        "mqtt.broker": args.broker, "mqtt.username": args.username, "mqtt.password": args.password,
        "mqtt.tls_ca": args.tls_ca, "mqtt.tls_insecure": args.tls_insecure, "mqtt.client_id": args.client_id,
        "mqtt.stats_interval_s": args.stats_interval_s, "publish.batch.linger_s": args.batch_linger_s,
        "publish.mode": args.publish_mode, "publish.summary_interval_s": args.summary_interval_s,
        "publish.confirm": args.confirm, "publish.confirm_timeout_s": args.confirm_timeout_s,
        "outbox.path": args.outbox,
        "outbox.max_events": args.outbox_max, "events_file": args.events_file, "save_video": args.save_video,
        "tracks_file": args.tracks_file,
        "max_frames": args.max_frames, "fps": args.fps, "realtime": args.realtime, "start_time": args.start_time,
        "loop": args.loop,
        "detector.conf": args.conf, "detector.iou": args.iou,
        "detector.regions": args.regions,
        "detector.classes": args.classes.split(",") if args.classes else None, "detector.threads": args.threads,
        "detector.streams": args.streams,
        "detector.provider": args.provider,
        "model_updates.enabled": args.model_updates, "model_updates.trust_key": args.trust_key,
        "model_updates.allow_unsigned": args.allow_unsigned, "model_updates.dir": args.model_dir,
        "model_updates.probation_s": args.probation_s, "model_updates.max_bytes": args.model_max_bytes,
        "model_updates.download_timeout_s": args.model_download_timeout_s,
        "model_updates.health_frames": args.health_frames,
        "model_updates.max_latency_factor": args.max_latency_factor,
        "model_updates.min_detection_ratio": args.min_detection_ratio,
        "motion.enabled": args.motion, "drain_timeout_s": args.drain_timeout_s,
        "homeassistant.enabled": args.homeassistant, "homeassistant.discovery_prefix": args.homeassistant_prefix,
        "metrics.listen": args.metrics_listen,
        "samples.enabled": args.samples_enabled, "samples.per_minute": args.samples_per_minute,
        "samples.per_hour": args.samples_per_hour, "samples.per_day": args.samples_per_day,
        "samples.max_side": args.samples_max_side,
    }


def exit_code_for(exc: BaseException) -> tuple[int, str]:
    """The exit code and one-line message for an error that stops a camera (the codes of the module docstring)."""
    from camera.detector import ModelError
    from camera.metrics import MetricsError
    from camera.outbox import OutboxError
    from camera.pipeline import EXIT_OUTBOX
    from camera.sources import SourceError

    if isinstance(exc, (SourceError, MetricsError)):
        return EXIT_USAGE, str(exc)
    if isinstance(exc, ModelError):
        return EXIT_MODEL, str(exc)
    if isinstance(exc, OutboxError):
        return EXIT_OUTBOX, str(exc)
    if isinstance(exc, OSError):  # the events file or the annotated video: unwritable path, disk full
        return EXIT_OUTBOX, f"cannot write {exc.filename or 'output'}: {exc.strerror or exc}"
    raise exc


def cmd_run(args: argparse.Namespace) -> int:
    from camera.config import ConfigError
    from camera.pipeline import EdgeRunner
    from camera.site_config import load_site_config

    try:
        site = load_site_config(args.config, _overrides(args), camera=args.camera)
    except ConfigError as exc:
        print(f"smartcam-edge: invalid configuration:\n{exc}", file=sys.stderr)
        return EXIT_USAGE
    cameras = site.cameras
    if args.no_broker:  # a copy: the validated config is never changed in place
        cameras = [c.model_copy(update={"mqtt": c.mqtt.model_copy(update={"broker": None})}) for c in cameras]
    if site.multi and args.camera is None:
        from dataclasses import replace

        from camera.site_runner import SiteRunner

        runner: Any = SiteRunner(replace(site, cameras=cameras))
    else:
        runner = EdgeRunner(cameras[0])
    signal.signal(signal.SIGTERM, runner.request_stop)
    signal.signal(signal.SIGINT, runner.request_stop)
    try:
        return runner.run()
    except Exception as exc:  # noqa: BLE001 - mapped to its exit code; anything unexpected is re-raised
        code, message = exit_code_for(exc)
        print(f"smartcam-edge: {message}", file=sys.stderr)
        return code


def cmd_detect(args: argparse.Namespace) -> int:
    from camera.detector import ModelError, detect_images

    classes = None if args.classes == "all" else [c.strip() for c in args.classes.split(",") if c.strip()]
    try:
        result = detect_images(args.images, args.model, conf=args.conf, iou=args.iou, classes=classes,
                               threads=args.threads)
    except (ModelError, ValueError) as exc:
        print(f"smartcam-edge: {exc}", file=sys.stderr)
        return EXIT_USAGE
    print(json.dumps(result))
    return 0


def cmd_outbox(args: argparse.Namespace) -> int:
    from camera.outbox import OutboxError, read_dead_letters
    from contract.timestamps import format_ts

    try:
        dead = read_dead_letters(args.outbox, limit=args.limit)
    except OutboxError as exc:
        print(f"smartcam-edge: {exc}", file=sys.stderr)
        return EXIT_USAGE
    for d in dead:
        if args.json:
            print(json.dumps({"id": d.id, "topic": d.topic, "payload": d.payload.decode("utf-8", "replace"),
                              "qos": d.qos, "retain": d.retain, "created": format_ts(d.created),
                              "dead_at": format_ts(d.dead_at), "rejections": d.rejections, "reason": d.reason}))
        else:
            print(f"{d.id}\t{format_ts(d.dead_at)}\t{d.topic}\t{d.rejections} rejection(s)\t{d.reason}\t"
                  f"{len(d.payload)} bytes")
    if not args.json:
        print(f"{len(dead)} dead letter(s) in {args.outbox}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    level = logging.DEBUG if args.verbose else logging.WARNING if args.quiet else logging.INFO
    logging.basicConfig(level=level, stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return {"run": cmd_run, "detect": cmd_detect, "outbox": cmd_outbox}[args.command](args)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

"""``smartcam-model build | eval``: build a calibrated INT8 edge model, or score models side by side."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

import cv2
from tqdm import tqdm

from camera.detector import ModelError
from models.calibration import CalibrationError
from models.evaluate import evaluate_accuracy, load_labels, measure_latency, scoring_detector
from models.imgsz import imgsz_problem
from models.quantize import METHODS, TYPES, QuantSettings

log = logging.getLogger("smartcam.model")

SHARED = Path(os.environ.get("SMARTCAM_SHARED", Path(__file__).resolve().parents[1].parent / "shared"))
DEFAULT_LABELS = SHARED / "data" / "persons-eval" / "labels.json"


def parse_imgsz(text: str) -> tuple[int, int]:
    """``320`` or ``384x640`` (h x w), within :func:`models.imgsz.imgsz_problem`'s bounds."""
    try:
        parts = [int(p) for p in text.lower().split("x")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"bad --imgsz {text!r}: use e.g. 320 or 384x640") from None
    if len(parts) == 1:
        parts *= 2
    if len(parts) != 2:
        raise argparse.ArgumentTypeError(f"bad --imgsz {text!r}: use e.g. 320 or 384x640")
    problem = imgsz_problem((parts[0], parts[1]))
    if problem:
        raise argparse.ArgumentTypeError(f"bad --imgsz {text!r}: {problem}")
    return (parts[0], parts[1])


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="smartcam-model", description=__doc__)
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True)

    b = sub.add_parser(
        "build",
        help="weights -> calibrated INT8 ONNX + manifest",
        description="Export/resize the weights to fp32 ONNX at --imgsz, calibrate on frames sampled evenly across "
        "--calib, quantize to INT8 QDQ (decode head kept in float) and write NAME.onnx + NAME.json.",
    )
    b.add_argument(
        "--weights", required=True, help="Ultralytics .pt (needs smartcam[ultralytics]) or fp32 .onnx"
    )
    b.add_argument("--imgsz", type=parse_imgsz, default=(640, 640), help="input size: 320, 480, 640 (square) or HxW, sides multiples of 32 from 32 to 1920. For a 16:9 camera use 192x320, 288x480 "
                        "or 384x640: the same pixels as the square size without letterbox padding (what "
                        "Ultralytics' own predict runs), about 1.7x less work; the edge says at start-up which "
                        "shape fits its source")
    b.add_argument("--calib", nargs="+", required=True, help="videos, images or folders to calibrate on")
    b.add_argument("--calib-frames", type=int, default=128, help="frames sampled across all --calib sources")
    b.add_argument("--out", help="output .onnx (default models/<weights>-<imgsz>-int8.onnx)")
    b.add_argument(
        "--method",
        choices=["auto", *sorted(METHODS)],
        default="auto",
        help="calibration method (default auto: percentile 99.999 from 64 frames, else minmax)",
    )
    b.add_argument("--types", choices=sorted(TYPES), default="u8s8", help="activation/weight int types")
    b.add_argument("--no-per-channel", action="store_true", help="per-tensor weight scales")
    b.add_argument(
        "--float-head-convs", action="store_true", help="keep the head's last convolutions in float"
    )
    b.add_argument(
        "--keep-classes", nargs="+", metavar="NAME", help="slim the head to these classes (e.g. person)"
    )
    b.add_argument("--fp32-out", help="also write the fp32 ONNX at this size (+ manifest) here")
    b.add_argument("--static-batch", action="store_true",
                   help="a fixed batch of 1 (default: any batch size, so an edge running several cameras can run "
                   "their waiting frames as one batch; as fast at batch 1)")
    b.add_argument("--labels", help=f"labels.json to measure AP on (default {DEFAULT_LABELS} if present)")
    b.add_argument("--no-eval", action="store_true", help="skip accuracy measurement")
    b.add_argument(
        "--latency-runs", type=int, default=10, help="timed runs per model for the manifest (0: skip)"
    )
    b.add_argument("--quiet", action="store_true", help="no progress bars")

    e = sub.add_parser(
        "eval",
        help="person AP50/AP50-95, precision/recall and latency of one or more models",
        description="Scores models on labeled images (visibility<0.25 and ignore regions neutral) and times them "
        "(median of repeated runs, interleaved across models) at 1 thread and all threads: the network alone "
        "(infer) and a full detect() on the first labeled image (letterbox + network + decode).",
    )
    e.add_argument("--model", action="append", required=True, help="ONNX model (repeat to compare)")
    e.add_argument("--labels", default=str(DEFAULT_LABELS), help="labels.json (persons-eval format)")
    e.add_argument("--conf", type=float, default=0.25, help="edge operating threshold for precision/recall")
    e.add_argument("--iou", type=float, default=0.45, help="NMS IoU (the edge's)")
    e.add_argument("--runs", type=int, default=20, help="timed runs per model and thread count (0: skip)")
    e.add_argument("--threads", type=int, nargs="+", help="thread counts to time (default: 1 and all cores)")
    e.add_argument("--json", action="store_true", help="print JSON instead of a table")
    e.add_argument("--quiet", action="store_true", help="no progress bars")
    _ota_parsers(sub)
    from models.loop_cli import add_parsers as _loop_parsers  # label, finetune, loop (the learning loop)

    _loop_parsers(sub)
    return p


def _ota_parsers(sub) -> None:
    """keygen, publish, registry, deploy, rollback: the signed registry and over-the-air delivery
    (docs/models-ota.md)."""
    k = sub.add_parser("keygen", help="make the ed25519 key pair that signs published models",
                       description="Write DIR/signing.key (private, mode 0600: keep it where models are published, "
                       "never on a camera) and DIR/signing.pub (give it to every camera as model_updates.trust_key).")
    k.add_argument("--out", required=True, metavar="DIR", help="directory for signing.key and signing.pub")
    k.add_argument("--force", action="store_true", help="replace an existing key pair (re-keys every camera)")

    pb = sub.add_parser("publish", help="check, sign and store a model in the registry",
                        description="Load the model as the edge would (a model it cannot run is refused), sign "
                        "its manifest and store both under an immutable version <name>-<sha256[:12]>. Prints the "
                        "version as the last line of standard output.")
    pb.add_argument("--model", required=True, metavar="M.onnx", help="the model (e.g. from smartcam-model build)")
    pb.add_argument("--registry", required=True, metavar="DIR|s3://bucket/prefix", help="where models are kept")
    pb.add_argument("--signing-key", required=True, metavar="KEY.pem", help="signing.key from smartcam-model keygen")
    pb.add_argument("--name", help="model name (default: the file name); the version is <name>-<sha256[:12]>")
    pb.add_argument("--notes", help="free text stored in the manifest (what changed)")
    pb.add_argument("--conf", type=float, help="recommended confidence threshold (default 0.25)")
    pb.add_argument("--iou", type=float, help="recommended NMS IoU (default 0.45)")
    pb.add_argument("--track-threshold", dest="track_threshold", type=float,
                    help="recommended track threshold (default 0.5)")
    pb.add_argument("--parent", help="the version this one replaces (default: the latest of the same name)")
    pb.add_argument("--eval", dest="eval_json", metavar="EVAL.json",
                    help="`smartcam-model eval --json` output to store as the model's evaluation figures")
    pb.add_argument("--s3-endpoint", dest="s3_endpoint", help="S3 endpoint URL (default $SMARTCAM_S3_ENDPOINT)")

    r = sub.add_parser("registry", help="list or show published models")
    r.add_argument("action", choices=("list", "show"))
    r.add_argument("version", nargs="?", help="show: the version")
    r.add_argument("--registry", required=True, metavar="DIR|s3://bucket/prefix")
    r.add_argument("--json", action="store_true", help="list: JSON instead of a table")
    r.add_argument("--s3-endpoint", dest="s3_endpoint", help="S3 endpoint URL (default $SMARTCAM_S3_ENDPOINT)")

    d = sub.add_parser("deploy", help="send a registry model to cameras over MQTT (optionally canary first)",
                       description="Publish a retained desired-model document per camera (--camera) or for the "
                       "whole site. With --canary N: N cameras first, watch their reported state for --watch-s, "
                       "then the rest; abort (exit 1, canaries restored) after more than --max-failures failures.")
    d.add_argument("--registry", required=True, metavar="DIR|s3://bucket/prefix")
    d.add_argument("--version", required=True, help="the registry version to deploy")
    d.add_argument("--broker", required=True, help="mqtt://[user[:pw]@]host[:port] or mqtts://...")
    d.add_argument("--site", required=True)
    d.add_argument("--camera", action="append", help="one camera (repeat); default: the whole site")
    d.add_argument("--canary", type=int, default=0, metavar="N", help="send to N cameras first and watch them")
    d.add_argument("--watch-s", dest="watch_s", type=float, default=120.0, metavar="S",
                   help="how long to wait for the canaries to pass (be active after their probation: make it "
                        "longer than probation_s plus the download; default 120)")
    d.add_argument("--max-failures", dest="max_failures", type=int, default=0, metavar="K",
                   help="abort when more than K canaries fail (default 0)")
    d.add_argument("--url-base", dest="url_base", metavar="URL",
                   help="cameras fetch <URL>/models/<version>/model.onnx (an HTTP server serving the registry) "
                        "instead of a file:// path or a presigned S3 URL")
    d.add_argument("--url-expires-s", dest="url_expires_s", type=int, metavar="S",
                   help="lifetime of a presigned S3 URL (default and maximum 7 days)")
    d.add_argument("--s3-endpoint", dest="s3_endpoint", help="S3 endpoint URL (default $SMARTCAM_S3_ENDPOINT)")

    rb = sub.add_parser("rollback", help="make the previous desired model the desired one again")
    rb.add_argument("--broker", required=True)
    rb.add_argument("--site", required=True)
    rb.add_argument("--camera", help="one camera (default: the site's model)")
    rb.add_argument("--registry", metavar="DIR|s3://bucket/prefix",
                    help="re-issue the download URL from the registry (a presigned URL may have expired)")
    rb.add_argument("--url-base", dest="url_base", metavar="URL", help="as for deploy")
    rb.add_argument("--s3-endpoint", dest="s3_endpoint")


def _cmd_build(args: argparse.Namespace) -> int:
    from models.build import build_model  # onnx/quantization imports only for this command

    labels = None
    if not args.no_eval:
        labels = args.labels or (str(DEFAULT_LABELS) if DEFAULT_LABELS.is_file() else None)
    settings = QuantSettings(
        method=args.method,
        types=args.types,
        per_channel=not args.no_per_channel,
        float_head_convs=args.float_head_convs,
    )
    result = build_model(
        args.weights,
        args.imgsz,
        args.calib,
        args.out,
        calib_frames=args.calib_frames,
        settings=settings,
        keep_classes=args.keep_classes,
        fp32_out=args.fp32_out,
        static_batch=args.static_batch,
        labels=labels,
        latency_runs=args.latency_runs,
        progress=not args.quiet,
    )
    res = result.manifest["results"]
    print(f"wrote {result.model_path} and {result.model_path.with_suffix('.json')}")
    if "persons_eval" in res:
        ref = res.get("fp32_reference", {}).get("persons_eval", {})
        print(
            f"person AP50 int8 {res['persons_eval']['ap50']:.4f} vs fp32 {ref.get('ap50', float('nan')):.4f}"
        )
    if "speedup_vs_fp32" in res:
        print(
            "speed-up vs fp32 (threads: x): "
            + ", ".join(f"{k}: {v}" for k, v in res["speedup_vs_fp32"].items())
        )
    return 0


def _table(rows: list[dict], threads: list[int]) -> str:
    head = ["model", "imgsz", "AP50", "AP50-95", "P@conf", "R@conf"]
    head += [f"infer ms {n}T" for n in threads] + [f"detect ms {n}T" for n in threads] + ["MB"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [
            r["model"],
            "x".join(str(v) for v in r["imgsz"]),
            f"{r['ap50']:.4f}",
            f"{r['ap50_95']:.4f}",
            f"{r['precision']:.3f}",
            f"{r['recall']:.3f}",
        ]
        for key in ("infer_ms", "latency_ms"):
            cells += [f"{r[key][str(n)]:.1f}" if str(n) in r.get(key, {}) else "-" for n in threads]
        cells.append(f"{r['size_mb']:.1f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _cmd_eval(args: argparse.Namespace) -> int:

    labels = load_labels(args.labels)
    if not labels:
        raise ValueError(f"no labeled images in {args.labels}")
    rows = []
    detectors = [scoring_detector(model, args.iou) for model in args.model]  # every model loads before the runs
    for model, det in zip(args.model, detectors, strict=True):
        with tqdm(total=len(labels), desc=f"eval {Path(model).name}", disable=args.quiet, leave=False) as bar:
            s = evaluate_accuracy(det, labels, conf=args.conf, progress=bar)
        rows.append(
            {
                "model": Path(model).name,
                "path": str(model),
                "imgsz": list(det.imgsz),
                "ap50": s.ap50,
                "ap50_95": s.ap50_95,
                "precision": s.precision,
                "recall": s.recall,
                "tp": s.tp,
                "fp": s.fp,
                "gt": s.gt,
                "conf": s.conf,
                "size_mb": Path(model).stat().st_size / 1e6,
            }
        )
    threads = args.threads or sorted({1, os.cpu_count() or 1})
    if args.runs > 0:
        probe = cv2.imread(str(labels[0].path))
        with tqdm(total=args.runs, desc="latency", disable=args.quiet, leave=False) as bar:
            lat = measure_latency(
                args.model, probe, threads, runs=args.runs, progress=bar, stages=("infer", "detect")
            )
        for row in rows:
            row["infer_ms"] = {str(n): v for n, v in lat[row["path"]]["infer"].items()}
            row["latency_ms"] = {str(n): v for n, v in lat[row["path"]]["detect"].items()}
    if args.json:
        print(
            json.dumps(
                {"labels": args.labels, "runs": args.runs, "threads": threads, "models": rows}, indent=2
            )
        )
    else:
        print(_table(rows, threads if args.runs > 0 else []))
    return 0


def _cmd_keygen(args: argparse.Namespace) -> int:
    from models.signing import generate_keypair

    private_path, public_path = generate_keypair(args.out, overwrite=args.force)
    print(f"wrote {private_path} (private, mode 0600: keep it off the cameras) and {public_path} (the cameras' "
          "model_updates.trust_key)")
    return 0


def _cmd_publish(args: argparse.Namespace) -> int:
    from models.registry import open_registry, publish
    from models.signing import load_private_key

    key = load_private_key(args.signing_key)
    registry = open_registry(args.registry, endpoint_url=args.s3_endpoint)
    thresholds = {k: v for k in ("conf", "iou", "track_threshold") if (v := getattr(args, k)) is not None}
    manifest = publish(registry, args.model, key, name=args.name, notes=args.notes, thresholds=thresholds,
                       parent=args.parent, eval_json=args.eval_json)
    print(f"stored in {registry.url}: sha256 {manifest['sha256']}, {manifest['size']} bytes, imgsz "
          f"{'x'.join(map(str, manifest['imgsz']))}, parent {manifest['parent'] or '-'}")
    print(manifest["version"])
    return 0


def _cmd_registry(args: argparse.Namespace) -> int:
    from models.registry import open_registry

    registry = open_registry(args.registry, endpoint_url=args.s3_endpoint)
    if args.action == "show":
        if not args.version:
            raise ValueError("registry show needs a VERSION")
        print(json.dumps(registry.entry(args.version), indent=2))
        return 0
    versions = registry.versions()
    if args.json:
        print(json.dumps(versions, indent=2))
        return 0
    if not versions:
        print(f"no models in {registry.url}")
        return 0
    print("| version | created | imgsz | MB | conf | parent | AP50 | notes |\n|---|---|---|---|---|---|---|---|")
    for m in versions:
        ap = (m.get("evaluation") or {}).get("ap50")
        print(f"| {m['version']} | {m['created']} | {'x'.join(map(str, m['imgsz']))} | {m['size'] / 1e6:.1f} | "
              f"{m['thresholds']['conf']} | {m.get('parent') or '-'} | {'-' if ap is None else f'{ap:.4f}'} | "
              f"{(m.get('notes') or '').replace('|', '/')[:60]} |")
    return 0


def _cmd_deploy(args: argparse.Namespace) -> int:
    from contract.broker import BrokerSettings
    from models.deploy import deploy
    from models.registry import open_registry

    registry = open_registry(args.registry, endpoint_url=args.s3_endpoint)
    return deploy(registry, args.version, BrokerSettings.from_url(args.broker), args.site, args.camera,
                  canary=args.canary, watch_s=args.watch_s, max_failures=args.max_failures, url_base=args.url_base,
                  url_expires_s=args.url_expires_s, say=lambda text: print(text, flush=True))


def _cmd_rollback(args: argparse.Namespace) -> int:
    from contract.broker import BrokerSettings
    from models.deploy import rollback
    from models.registry import open_registry

    registry = open_registry(args.registry, endpoint_url=args.s3_endpoint) if args.registry else None
    return rollback(BrokerSettings.from_url(args.broker), args.site, args.camera, registry=registry,
                    url_base=args.url_base, say=lambda text: print(text, flush=True))


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING, format="%(levelname)s %(message)s"
    )
    from contract.signature import SignatureError
    from models.deploy import DeployError
    from models.registry import RegistryError

    commands = {"build": _cmd_build, "eval": _cmd_eval, "keygen": _cmd_keygen, "publish": _cmd_publish,
                "registry": _cmd_registry, "deploy": _cmd_deploy, "rollback": _cmd_rollback}
    from models.loop_cli import COMMANDS as loop_commands

    commands.update(loop_commands)
    try:
        return commands[args.command](args)
    except (ModelError, CalibrationError, FileNotFoundError, ValueError, RegistryError, SignatureError,
            DeployError) as exc:
        print(f"smartcam-model {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

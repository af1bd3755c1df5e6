"""The learning-loop commands of ``smartcam-model``: ``label``, ``finetune``, ``loop`` (docs/learning-loop.md)."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

SHARED = Path(os.environ.get("SMARTCAM_SHARED", Path(__file__).resolve().parents[1].parent / "shared"))
TEACHER = SHARED / "models" / "yolov8n-coco.onnx"
BASE = SHARED / "models" / "yolov8n-coco-trainable.pt"
PERSONS_EVAL = SHARED / "data" / "persons-eval" / "labels.json"


def add_parsers(sub: argparse._SubParsersAction) -> None:
    from models.loop import BOTH, RECIPES
    lab = sub.add_parser(
        "label", help="sampled frames -> YOLO dataset labeled by a strong teacher (fp32, large input, TTA)",
        description="Labels every frame in --images (a `smartcam-sink samples export` folder, or any folder of "
        "images) with the teacher: the fp32 model at --imgsz on the frame and its mirror image, plus tiles "
        "for frames larger than the input, boxes fused by weighted box fusion. Writes OUT/data.yaml, "
        "OUT/images/{train,val}, OUT/labels/{train,val} (YOLO format: correct them in Label Studio or CVAT "
        "if you like) and OUT/val.labels.json; the last --val-share of the frames by time is validation.")
    lab.add_argument("--images", required=True, help="folder with images/ + samples.jsonl, or plain images")
    lab.add_argument("--teacher", default=str(TEACHER), help=f"fp32 ONNX (default {TEACHER})")
    lab.add_argument("--out", required=True, help="dataset folder")
    lab.add_argument("--imgsz", type=int, default=960, help="teacher input, longer side (default 960)")
    lab.add_argument("--conf", type=float, default=0.35, help="fused score a box needs to become a label")
    lab.add_argument("--val-share", type=float, default=0.2, help="latest share of frames kept for validation")
    lab.add_argument("--no-flip", action="store_true", help="no mirror-image view")
    lab.add_argument("--no-tiles", action="store_true", help="no tiles for frames larger than the input")
    lab.add_argument("--quiet", action="store_true", help="no progress bar")

    ft = sub.add_parser(
        "finetune", help="fine-tune a YOLO checkpoint on a dataset (Ultralytics; resumable)",
        description="Trains --base on --data at --imgsz and writes the best checkpoint to --out (+ OUT.json, the "
        "recipe). Keep general person knowledge with --freeze (first N modules fixed; 10 = the backbone) "
        "and/or --general DATA.yaml --general-share S (other scenes mixed in). Needs smartcam[ultralytics].")
    ft.add_argument("--data", required=True, help="data.yaml from `smartcam-model label`")
    ft.add_argument("--base", default=str(BASE), help=f"checkpoint to start from (default {BASE})")
    ft.add_argument("--imgsz", type=int, default=320, help="training input size (default 320)")
    ft.add_argument("--epochs", type=int, default=10)
    ft.add_argument("--freeze", type=int, default=22, help="modules kept fixed (default 22: all but the head; 10 = "
                                                        "the backbone, 0 = none)")
    ft.add_argument("--general", help="data.yaml of general frames to mix in")
    ft.add_argument("--general-share", type=float, default=0.0, help="share of training images from --general")
    ft.add_argument("--batch", type=int, default=16)
    ft.add_argument("--lr0", type=float, default=0.0005, help="initial learning rate (AdamW; default 0.0005)")
    ft.add_argument("--resume", action="store_true", help="continue an interrupted run of the same --out")
    ft.add_argument("--device", help="cpu, 0, ... (default: the first GPU, else the CPU)")
    ft.add_argument("--out", required=True, help="output .pt")

    mg = sub.add_parser(
        "merge", help="merge a fine-tune with the checkpoint it started from (WiSE-FT weight interpolation)",
        description="Writes --out = (1 - ALPHA) x --base + ALPHA x --tuned, tensor by tensor (both the same "
        "architecture, the fine-tune trained from the base). 0 is the base, 1 the fine-tune; in between keeps "
        "much of the camera's gain and much of the general knowledge (docs/learning-loop.md). Needs "
        "smartcam[ultralytics].")
    mg.add_argument("--base", default=str(BASE), help=f"the checkpoint the fine-tune started from (default {BASE})")
    mg.add_argument("--tuned", required=True, help="the fine-tuned checkpoint")
    mg.add_argument("--alpha", type=float, required=True, help="weight of the fine-tune, 0..1")
    mg.add_argument("--out", required=True, help="output .pt")

    lp = sub.add_parser(
        "loop", help="one turn of the learning loop for one camera, with a before/after table",
        description="export samples -> label -> finetune -> build INT8 (calibrated on the camera's frames) -> "
        "eval new vs current on the camera's held-out slice and persons-eval -> gate -> publish -> deploy. "
        "Steps already done in --work are skipped.")
    lp.add_argument("--camera", required=True, help="camera id")
    lp.add_argument("--site", help="site (export filter; required with --deploy-broker)")
    lp.add_argument("--current", required=True, help="the INT8 ONNX the camera runs now")
    lp.add_argument("--work", required=True, help="working folder for this turn")
    lp.add_argument("--samples", help="an exported samples folder (else exported with --db and --store)")
    lp.add_argument("--db", help="the sink's database URL")
    lp.add_argument("--store", help="the sink's --samples-store (or --archive)")
    lp.add_argument("--since", default="7d", help="samples since (default 7d)")
    lp.add_argument("--teacher", default=str(TEACHER))
    lp.add_argument("--teacher-imgsz", type=int, default=960)
    lp.add_argument("--base", default=str(BASE))
    lp.add_argument("--imgsz", type=int, help="training input (default: the current model's longer side)")
    lp.add_argument("--recipe", choices=[*RECIPES, BOTH],
                    help="what trains: head (only the detection head, 10 epochs, lr 0.0005: best where the gap is "
                         "small), whole (everything, 30 %% --general frames mixed in, 20 epochs, merged with "
                         "--base at alpha 0.5: best where people are small), both (train each, keep the one with "
                         "the higher AP50 on the camera's held-out slice). Default: both with --general, else head")
    lp.add_argument("--general", help="data.yaml of general frames (other scenes, teacher-labeled) to mix in")
    lp.add_argument("--epochs", type=int, help="override the recipe's epochs (head 10, whole 20)")
    lp.add_argument("--freeze", type=int, help="override the recipe's modules kept fixed (head 22, whole 0)")
    lp.add_argument("--lr0", type=float, help="override the recipe's initial learning rate (AdamW; 0.0005)")
    lp.add_argument("--general-share", type=float, help="override the recipe's share of --general frames "
                                                        "(head 0, whole 0.3)")
    lp.add_argument("--wise", type=float, metavar="ALPHA",
                    help="override the recipe's merge with --base before the build (WiSE-FT, see `merge`; head: "
                         "none, whole 0.5; 1 = do not merge)")
    lp.add_argument("--batch", type=int, default=16)
    lp.add_argument("--val-share", type=float, default=0.2)
    lp.add_argument("--labels", default=str(PERSONS_EVAL), help="the regression guard (persons-eval labels.json)")
    lp.add_argument("--min-gain", type=float, default=1.0, help="camera AP50 points the new model must gain")
    lp.add_argument("--max-drop", type=float, default=1.0, help="persons-eval AP50 points it may lose")
    lp.add_argument("--current-threshold", action="append", default=[], metavar="NAME=VALUE",
                    help="a score threshold the camera runs the current model at (conf, track_threshold, high_score, "
                    "new_track_score; default what a camera runs a registry model at when its manifest does not say: 0.25, "
                    "0.5, 0.4, 0.5; a camera on its configured model detects at detector.conf 0.1); the new "
                    "model's are chosen to match their precision on the held-out slice (models/thresholds.py)")
    lp.add_argument("--registry", help="publish there when the gate passes (DIR or s3://...)")
    lp.add_argument("--signing-key", help="ed25519 private key for publish")
    lp.add_argument("--deploy-broker", help="deploy the published version to the camera through this broker")
    lp.add_argument("--canary-watch", type=float, default=60.0,
                    help="seconds to wait for the camera to report the new model active (it verified, health-checked "
                    "and kept it; otherwise its previous desired model is put back); 0: send, do not wait "
                    "(default 60)")


def cmd_label(args: argparse.Namespace) -> int:
    from models.label import Teacher, label_images

    teacher = Teacher(args.teacher, args.imgsz, flip=not args.no_flip, tiles=not args.no_tiles,
                      workdir=Path(args.out) / ".teacher")
    r = label_images(args.images, teacher, args.out, conf=args.conf, val_share=args.val_share,
                     progress=not args.quiet)
    print(f"wrote {r.data_yaml}: {r.train} train + {r.val} val frames, {r.boxes} person boxes")
    return 0


def cmd_finetune(args: argparse.Namespace) -> int:
    from models.finetune import finetune

    out = finetune(args.data, args.base, args.out, imgsz=args.imgsz, epochs=args.epochs, freeze=args.freeze,
                   general=args.general, general_share=args.general_share, batch=args.batch, lr0=args.lr0,
                   resume=args.resume, device=args.device)
    print(f"wrote {out}")
    return 0


def cmd_merge(args: argparse.Namespace) -> int:
    from models.weight_merge import merge_checkpoints

    print(f"wrote {merge_checkpoints(args.base, args.tuned, args.alpha, args.out)}")
    return 0


def cmd_loop(args: argparse.Namespace) -> int:
    from models.gate import GateSpec
    from models.loop import BOTH, TurnSettings, run_turn

    publish = deploy = None
    if args.registry:
        if not args.signing_key:
            raise ValueError("--registry needs --signing-key to publish")
        publish = {"registry": args.registry, "signing_key": args.signing_key, "name": f"{args.camera}-loop"}
        if args.deploy_broker:
            if not args.site:
                raise ValueError("--deploy-broker needs --site")
            deploy = {"broker": args.deploy_broker, "site": args.site, "canary": int(args.canary_watch > 0),
                      "watch_s": args.canary_watch}
    from models.thresholds import DEFAULTS

    current_thresholds = {}
    for item in args.current_threshold:
        key, _, value = item.partition("=")
        if key not in DEFAULTS or not value:
            raise ValueError(f"--current-threshold {item!r}: expected NAME=VALUE, NAME one of {', '.join(DEFAULTS)}")
        current_thresholds[key] = float(value)
    s = TurnSettings(camera=args.camera, work=Path(args.work), current=Path(args.current), base=Path(args.base),
                     teacher=Path(args.teacher), general_labels=Path(args.labels),
                     samples=Path(args.samples) if args.samples else None, site=args.site, db=args.db,
                     store=args.store, since=args.since, teacher_imgsz=args.teacher_imgsz,
                     val_share=args.val_share, recipe=args.recipe or (BOTH if args.general else "head"),
                     epochs=args.epochs, imgsz=args.imgsz, freeze=args.freeze,
                     general_data=Path(args.general) if args.general else None, general_share=args.general_share,
                     batch=args.batch, lr0=args.lr0, wise=args.wise, gate=GateSpec(args.min_gain / 100, args.max_drop / 100),
                     publish=publish, deploy=deploy, current_thresholds=current_thresholds)
    report = run_turn(s, say=lambda text: print(text, flush=True))
    print(report.table())
    if report.choice:
        print(report.choice.table())
    print(report.thresholds_line())
    print("steps (s): " + ", ".join(f"{k} {v}" for k, v in report.seconds.items()))
    print(report.decision.reason)
    if report.version:
        print(f"published {report.version}" + (f"; deployed to {args.site}/{args.camera}: "
                                               f"{'yes' if report.deployed else 'NO (aborted)'}" if deploy else ""))
    if not report.decision.passed:
        return 1
    return 3 if deploy and not report.deployed else 0


COMMANDS = {"label": cmd_label, "finetune": cmd_finetune, "merge": cmd_merge, "loop": cmd_loop}

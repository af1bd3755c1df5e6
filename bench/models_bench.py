"""Models benchmark (issue 3): fp32 vs INT8 person AP and latency per input size, measured in one run.

Builds (or reuses with --reuse) an fp32 and an INT8 model per ``--sizes`` with the real ``models.build`` path,
scores all of them on persons-eval and times them interleaved (so machine load hits every model alike and the
INT8/fp32 ratio is meaningful), then prints a markdown table, the targets and a JSON record.

    .venv/bin/python bench/models_bench.py --sizes 320 480 640 --runs 30
    .venv/bin/python bench/models_bench.py --sizes 640 --methods minmax percentile entropy   # calibration choice
    .venv/bin/python bench/models_bench.py --sizes 320 --slim                                  # person-only head
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import cv2

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from models.build import build_model  # noqa: E402
from models.evaluate import evaluate_accuracy, load_labels, measure_latency  # noqa: E402
from models.quantize import QuantSettings  # noqa: E402

SHARED = Path(os.environ.get("SMARTCAM_SHARED", ROOT.parent / "shared"))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--weights", default=str(SHARED / "models" / "yolov8n-coco.onnx"))
    p.add_argument("--sizes", type=int, nargs="+", default=[320, 480, 640])
    p.add_argument("--methods", nargs="+", default=["auto"], help="calibration methods to compare")
    p.add_argument("--slim", action="store_true", help="also build person-only-head variants")
    p.add_argument("--calib", nargs="+", default=[str(SHARED / "data" / "videos")])
    p.add_argument("--calib-frames", type=int, default=128)
    p.add_argument("--labels", default=str(SHARED / "data" / "persons-eval" / "labels.json"))
    p.add_argument("--runs", type=int, default=30, help="timed runs per model and thread count")
    p.add_argument("--threads", type=int, nargs="+", default=sorted({1, os.cpu_count() or 1}))
    p.add_argument("--out-dir", default=str(ROOT / "test-artifacts" / "models-bench"), help="(git-ignored)")
    p.add_argument("--reuse", action="store_true", help="reuse models already built in --out-dir")
    p.add_argument("--json-out", help="also write the JSON record here")
    args = p.parse_args()

    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = Path(args.weights).stem
    models: list[dict] = []  # {"path", "size", "precision", "variant"}
    t_build = time.time()
    for size in args.sizes:
        variants = [(m, False) for m in args.methods] + ([(args.methods[0], True)] if args.slim else [])
        for method, slim in variants:
            tag = f"{'-person' if slim else ''}-{size}"
            int8 = out_dir / f"{stem}{tag}-int8-{method}.onnx"
            fp32 = out_dir / f"{stem}{tag}-fp32.onnx"
            if not (args.reuse and int8.is_file() and fp32.is_file()):
                build_model(
                    args.weights,
                    (size, size),
                    args.calib,
                    int8,
                    calib_frames=args.calib_frames,
                    settings=QuantSettings(method=method),
                    keep_classes=["person"] if slim else None,
                    fp32_out=fp32,
                    latency_runs=0,
                    progress=True,
                )
            if not any(m["path"] == fp32 for m in models):
                models.append({"path": fp32, "size": size, "precision": "fp32", "variant": tag.lstrip("-")})
            models.append(
                {"path": int8, "size": size, "precision": "int8", "variant": f"{tag.lstrip('-')} {method}"}
            )
    build_s = time.time() - t_build

    labels = load_labels(args.labels)
    for m in models:
        s = evaluate_accuracy(m["path"], labels)
        m.update(ap50=s.ap50, ap50_95=s.ap50_95, precision_op=s.precision, recall_op=s.recall, gt=s.gt)
        print(f"scored {m['path'].name}: AP50 {s.ap50:.4f}", file=sys.stderr)
    probe = cv2.imread(str(labels[0].path))
    paths = [m["path"] for m in models]
    lat = measure_latency(paths, probe, args.threads, runs=args.runs, stages=("infer", "detect"))
    for m in models:
        for stage in ("infer", "detect"):
            m[f"{stage}_ms"] = lat[str(m["path"])][stage]

    cols = ["model", "imgsz", "precision", "AP50", "AP50-95", "P@0.25", "R@0.25"]
    cols += [f"infer ms {n}T" for n in args.threads] + [f"detect ms {n}T" for n in args.threads]
    cols += [f"INT8 speed-up infer {n}T" for n in args.threads] + [f"detect {n}T" for n in args.threads]
    cols += ["ΔAP50 (points)"]
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    checks = []
    for m in models:
        ref = next(r for r in models if r["size"] == m["size"] and r["precision"] == "fp32"
                   and ("person" in r["variant"]) == ("person" in m["variant"]))  # fmt: skip
        speed = {
            st: [ref[f"{st}_ms"][n] / m[f"{st}_ms"][n] for n in args.threads] for st in ("infer", "detect")
        }
        delta = 100 * (m["ap50"] - ref["ap50"])
        int8 = m["precision"] == "int8"
        row = [m["path"].name, str(m["size"]), m["precision"], f"{m['ap50']:.4f}", f"{m['ap50_95']:.4f}"]
        row += [f"{m['precision_op']:.3f}", f"{m['recall_op']:.3f}"]
        row += [f"{m['infer_ms'][n]:.1f}" for n in args.threads] + [
            f"{m['detect_ms'][n]:.1f}" for n in args.threads
        ]
        row += [f"{x:.2f}x" if int8 else "" for x in speed["infer"] + speed["detect"]]
        row += [f"{delta:+.2f}" if int8 else ""]
        print("| " + " | ".join(row) + " |")
        if int8:
            m["speedup"] = {st: dict(zip(args.threads, v, strict=True)) for st, v in speed.items()}
            m["delta_ap50_points"] = delta
            checks.append((m["path"].name, delta >= -1.0, min(speed["infer"]) >= 1.5))
    print()
    for name, acc_ok, speed_ok in checks:
        print(f"{name}: AP50 within 1.0 point of fp32: {'PASS' if acc_ok else 'MISS'}; "
              f"network >=1.5x faster at every thread count: {'PASS' if speed_ok else 'MISS'}")  # fmt: skip
    record = {
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count()},
        "load_avg": os.getloadavg(),
        "build_seconds": round(build_s, 1),
        "runs": args.runs,
        "calib": args.calib,
        "calib_frames": args.calib_frames,
        "models": [{**m, "path": str(m["path"])} for m in models],
    }
    text = json.dumps(record, indent=2, default=str)
    if args.json_out:
        Path(args.json_out).write_text(text + "\n")
    print(f"\nload average during the run: {os.getloadavg()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

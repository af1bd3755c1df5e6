"""Compare ``smartcam-edge detect`` output from the arm64 root with this machine's, for scripts/arm64-check.sh.

INT8 kernels differ between ARM and x86 (different accumulation and requantisation paths), so boxes and scores
are compared with a tolerance: every detection is matched one-to-one by IoU, and the report gives the largest
score and box-corner differences and the detections found on one side only.

>>> round(_iou([0, 0, 10, 10], [5, 0, 15, 10]), 3)
0.333
"""

from __future__ import annotations

import argparse
import json
import platform
from datetime import datetime, timezone
from pathlib import Path


def _iou(a: list[float], b: list[float]) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def compare(arm: list[dict], x86: list[dict], *, min_iou: float = 0.5) -> dict:
    """Greedy one-to-one matching per image (highest IoU first); differences of the matched pairs."""
    images, max_score, max_px, only_arm, only_x86, matched = [], 0.0, 0.0, 0, 0, 0
    for a_img, x_img in zip(arm, x86, strict=True):
        a, x = a_img["detections"], x_img["detections"]
        pairs = sorted(((_iou(d["box"], e["box"]), i, j) for i, d in enumerate(a) for j, e in enumerate(x)),
                       reverse=True)
        used_a, used_x = set(), set()
        for iou, i, j in pairs:
            if iou < min_iou or i in used_a or j in used_x:
                continue
            used_a.add(i)
            used_x.add(j)
            max_score = max(max_score, abs(a[i]["score"] - x[j]["score"]))
            max_px = max(max_px, max(abs(p - q) for p, q in zip(a[i]["box"], x[j]["box"], strict=True)))
        matched += len(used_a)
        only_arm += len(a) - len(used_a)
        only_x86 += len(x) - len(used_x)
        images.append({"image": Path(a_img["image"]).name, "arm64": len(a), "x86": len(x), "matched": len(used_a)})
    return {"images": images, "matched": matched, "only_arm64": only_arm, "only_x86": only_x86,
            "max_score_diff": round(max_score, 4), "max_box_diff_px": round(max_px, 2)}


def _by_type(events: list[dict]) -> dict[str, int]:
    out: dict[str, int] = {}
    for e in events:
        out[e["type"]] = out.get(e["type"], 0) + 1
    return dict(sorted(out.items()))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arm", required=True, type=Path)
    ap.add_argument("--x86", required=True, type=Path)
    ap.add_argument("--ort", required=True, type=Path, help="onnxruntime facts gathered inside the arm64 root")
    ap.add_argument("--venv-kb", type=int, required=True, help="size of the arm64 edge virtualenv")
    ap.add_argument("--arch", required=True)
    ap.add_argument("--events", type=Path, required=True)
    ap.add_argument("--run-log", type=Path, required=True)
    ap.add_argument("--x86-events", type=Path, required=True, help="the same run on this machine")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    result = compare(json.loads(args.arm.read_text()), json.loads(args.x86.read_text()))
    ort = json.loads(args.ort.read_text())
    events, x86_events = (
        [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        for path in (args.events, args.x86_events))
    report = {
        "checked_at": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "emulated_arch": args.arch, "host_arch": platform.machine(),
        "edge_venv_mb": round(args.venv_kb / 1024, 1),
        "onnxruntime": ort["onnxruntime"], "providers": ort["providers"],
        "int8_kernels_run": ort["int8_ops"],
        "detect": result,
        "run": {"arm64": _by_type(events), "x86": _by_type(x86_events),
                "finished": "done:" in args.run_log.read_text()},
        "note": "speed under emulation is meaningless and not reported",
    }
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()

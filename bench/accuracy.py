"""Tracking and counting accuracy of the edge on labeled sequences (issue 13): one command, every setting.

For every folder under ``--sequences`` (default ``$SMARTCAM_SHARED/data/sequences``, i.e. ``../shared/...``) that
holds ``gt.json``, ``counts_derived.json`` and ``<folder name>.mp4``, for each model whose input fits the video
(letterbox padding <= 20 %, the edge's own rule) and each processing rate (every frame, and 5 fps by default),
this runs the real edge (``EdgeRunner``: source → detector → filters → tracker → events, the defaults a user
gets, with the sequence's counting line added) and scores what it wrote:

- ``--tracks-file`` (MOTChallenge text) against the ground truth with TrackEval (HOTA, DetA, AssA; CLEAR: MOTA,
  ID switches; Identity: IDF1), through TrackEval's own MOT17 pre-processing: predictions matched to an ignore
  region or to a person less than 25 % visible are removed, and those boxes are neither hit nor miss. At 5 fps only
  the processed frames are scored;
- person tracks (distinct ids in the tracks file) per ground-truth person;
- the ``line.cross`` events against ``counts_derived.json``: the count per direction and its error, and the share
  of ground-truth crossings matched one-to-one by a counted crossing in the same direction within 2 s.

    .venv/bin/python bench/accuracy.py                       # every sequence x fitting model in models/ x rate
    .venv/bin/python bench/accuracy.py --model models/yolov8n-person-int8-256x320.onnx --fps 5
    .venv/bin/python bench/accuracy.py --set tracker.max_age_s=2 --set detector.conf=0.1   # A/B a setting

Results: a Markdown table per sequence on stdout, every number in ``--out``/accuracy.json (default
``test-artifacts/accuracy``), the tracks and events files of each run beside it. docs/benchmarks.md has the numbers.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time
from contextlib import redirect_stdout
from dataclasses import asdict, dataclass, field
from io import StringIO
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(ROOT))

SHARED = Path(os.environ.get("SMARTCAM_SHARED", ROOT.parent / "shared"))
START = "2024-01-01T00:00:00+00:00"  # capture time of frame 1 (events carry times; frames are derived back)
MIN_VISIBILITY = 0.25  # ground truth less visible than this is neutral (as in `smartcam-model eval`)
MATCH_WINDOW_S = 2.0  # a counted crossing matches a ground-truth one in the same direction within this time
LINE_NAME = "gt_line"
_OFFSETS = {"left": (-1.0, 0.0), "right": (1.0, 0.0), "top": (0.0, -1.0), "bottom": (0.0, 1.0)}


@dataclass
class Sequence:
    """One labeled sequence: the video, per-frame ground truth and the derived line crossings."""

    name: str
    video: Path
    gt: list[dict]
    counts: dict
    fps: float
    width: int
    height: int

    @property
    def line(self) -> list[list[float]]:
        return [list(map(float, self.counts["line"]["p1"])), list(map(float, self.counts["line"]["p2"]))]

    @property
    def directions(self) -> list[str]:
        """The ground truth's direction names, e.g. ``left_to_right`` and ``right_to_left``."""
        return sorted({e["direction"] for e in self.counts["events"]} | {
            k for k in self.counts if "_to_" in k and isinstance(self.counts[k], int)})


def discover(root: Path) -> list[Sequence]:
    """Every folder under ``root`` with gt.json, counts_derived.json and <folder>.mp4, by name."""
    import cv2

    found = []
    for folder in sorted(p for p in Path(root).iterdir() if p.is_dir()):
        video = folder / f"{folder.name}.mp4"
        if not ((folder / "gt.json").is_file() and (folder / "counts_derived.json").is_file() and video.is_file()):
            continue
        cap = cv2.VideoCapture(str(video))
        fps, w, h = cap.get(cv2.CAP_PROP_FPS), int(cap.get(cv2.CAP_PROP_FRAME_WIDTH)), int(
            cap.get(cv2.CAP_PROP_FRAME_HEIGHT))
        cap.release()
        found.append(Sequence(folder.name, video, json.loads((folder / "gt.json").read_text()),
                              json.loads((folder / "counts_derived.json").read_text()), float(fps), w, h))
    return found


def in_direction(seq: Sequence, in_side: str = "left") -> dict[str, str]:
    """Which ground-truth direction name a ``line.cross`` ``in`` / ``out`` of the sequence's line stands for."""
    from camera.zones import LineSpec, line_side

    line = LineSpec(name=LINE_NAME, points=seq.line, in_side=in_side)
    seg = np.asarray(seq.line, dtype=np.float64)
    mid = seg.mean(axis=0)
    out: dict[str, str] = {}
    for name in seq.directions:
        target = name.split("_to_")[-1]
        if target not in _OFFSETS:
            raise ValueError(f"{seq.name}: cannot tell the side of direction {name!r} (want <side>_to_<side>)")
        side = float(line_side(seg, (mid + 10 * np.asarray(_OFFSETS[target]))[None])[0])
        out["in" if np.sign(side) == line.in_sign else "out"] = name
    return out


def processed_frames(seq: Sequence, fps: float | None, max_frames: int | None = None) -> list[int]:
    """1-based frames the edge processes at ``fps`` (the source's own rate limiter decides, as in a run)."""
    from camera.sources import RateLimiter

    limiter = RateLimiter(fps, tolerance=0.5 / seq.fps)
    frames = [i + 1 for i in range(len(seq.gt)) if limiter.keep(i / seq.fps)]
    return frames[:max_frames] if max_frames else frames


# ------------------------------------------------------------------------------------------------ running


def run_edge(seq: Sequence, model: Path, fps: float | None, out_dir: Path, overrides: dict[str, Any] | None = None,
             max_frames: int | None = None) -> tuple[Path, list[dict], float]:
    """Run the edge offline on the sequence with its counting line; (tracks file, events, seconds)."""
    from camera.config import load_config
    from camera.pipeline import EdgeRunner

    out_dir.mkdir(parents=True, exist_ok=True)
    tracks, events = out_dir / "tracks.txt", out_dir / "events.jsonl"
    events.unlink(missing_ok=True)
    cfg = load_config(overrides={
        "camera_id": "accuracy", "site": "bench", "source": str(seq.video), "model": str(model), "fps": fps,
        "start_time": START, "events_file": str(events), "tracks_file": str(tracks), "max_frames": max_frames,
        "lines": [{"name": LINE_NAME, "points": seq.line, "in_side": "left"}], **(overrides or {})})
    t0 = time.perf_counter()
    rc = EdgeRunner(cfg).run()
    if rc != 0:
        raise RuntimeError(f"edge run failed with exit code {rc}")
    rows = [json.loads(line) for line in events.read_text().splitlines() if line.strip()]
    return tracks, rows, time.perf_counter() - t0


# ------------------------------------------------------------------------------------------------ scoring


def read_tracks(path: Path) -> np.ndarray:
    """(N, 7) frame, id, x, y, w, h, score from a MOTChallenge text file (empty file: no rows)."""
    text = Path(path).read_text().strip()
    if not text:
        return np.zeros((0, 7))
    return np.loadtxt(StringIO(text), delimiter=",", ndmin=2)[:, :7]


def _gt_rows(seq: Sequence, frames: list[int]) -> list[str]:
    """MOT17 ground-truth lines (frame, id, x, y, w, h, consider, class, visibility) of the scored frames.
    People are class 1; ignore regions and people under MIN_VISIBILITY are class 8 (distractor): TrackEval
    removes predictions matched to them, and drops them from the ground truth."""
    wanted, rows, extra_id = set(frames), [], 1_000_000
    for entry in seq.gt:
        f = int(entry["frame"])
        if f not in wanted:
            continue
        vis = entry.get("visibility") or [None] * len(entry["boxes"])
        for box, tid, v in zip(entry["boxes"], entry["ids"], vis, strict=True):
            x1, y1, x2, y2 = box
            cls = 8 if v is not None and v < MIN_VISIBILITY else 1
            rows.append(f"{f},{tid},{x1},{y1},{x2 - x1},{y2 - y1},1,{cls},{1.0 if v is None else v}")
        for x1, y1, x2, y2 in entry.get("ignore") or []:
            extra_id += 1
            rows.append(f"{f},{extra_id},{x1},{y1},{x2 - x1},{y2 - y1},1,8,1.0")
    return rows


def score_tracks(seq: Sequence, tracks: np.ndarray, frames: list[int]) -> dict[str, float]:
    """HOTA, DetA, AssA, MOTA, IDF1, IDSW (TrackEval, official MOT17 pre-processing) over ``frames``."""
    import trackeval

    wanted = set(frames)
    with tempfile.TemporaryDirectory(prefix="smartcam-acc-") as tmp:
        gt_dir = Path(tmp, "gt", seq.name, "gt")
        gt_dir.mkdir(parents=True)
        (gt_dir / "gt.txt").write_text("\n".join(_gt_rows(seq, frames)) + "\n")
        tr_dir = Path(tmp, "trackers", "edge", "data")
        tr_dir.mkdir(parents=True)
        lines = [f"{int(r[0])},{int(r[1])},{r[2]:.2f},{r[3]:.2f},{r[4]:.2f},{r[5]:.2f},{r[6]:.4f},-1,-1,-1"
                 for r in tracks if int(r[0]) in wanted]
        (tr_dir / f"{seq.name}.txt").write_text("\n".join(lines) + ("\n" if lines else ""))
        dataset = trackeval.datasets.MotChallenge2DBox({
            "GT_FOLDER": str(Path(tmp, "gt")), "TRACKERS_FOLDER": str(Path(tmp, "trackers")), "BENCHMARK": "MOT17",
            "SKIP_SPLIT_FOL": True, "TRACKERS_TO_EVAL": ["edge"], "SEQ_INFO": {seq.name: len(seq.gt)},
            "PRINT_CONFIG": False})
        evaluator = trackeval.Evaluator({"PRINT_RESULTS": False, "PRINT_CONFIG": False, "TIME_PROGRESS": False,
                                         "OUTPUT_SUMMARY": False, "OUTPUT_DETAILED": False, "PLOT_CURVES": False,
                                         "LOG_ON_ERROR": None, "DISPLAY_LESS_PROGRESS": True})
        metrics = [trackeval.metrics.HOTA(), trackeval.metrics.CLEAR({"PRINT_CONFIG": False}),
                   trackeval.metrics.Identity({"PRINT_CONFIG": False})]
        with redirect_stdout(StringIO()):
            results, _ = evaluator.evaluate([dataset], metrics)
    res = results["MotChallenge2DBox"]["edge"][seq.name]["pedestrian"]
    return {"HOTA": float(np.mean(res["HOTA"]["HOTA"])), "DetA": float(np.mean(res["HOTA"]["DetA"])),
            "AssA": float(np.mean(res["HOTA"]["AssA"])), "MOTA": float(res["CLEAR"]["MOTA"]),
            "IDF1": float(res["Identity"]["IDF1"]), "IDSW": int(res["CLEAR"]["IDSW"]),
            "recall": float(res["CLEAR"]["CLR_Re"]), "precision": float(res["CLEAR"]["CLR_Pr"])}


def gt_people(seq: Sequence, frames: list[int]) -> int:
    """Distinct ground-truth people (not ignore regions, not invisible) in ``frames``."""
    wanted, ids = set(frames), set()
    for entry in seq.gt:
        if int(entry["frame"]) in wanted:
            vis = entry.get("visibility") or [None] * len(entry["ids"])
            ids |= {tid for tid, v in zip(entry["ids"], vis, strict=True) if v is None or v >= MIN_VISIBILITY}
    return len(ids)


def match_in_time(gt_t: list[float], pred_t: list[float], window_s: float = MATCH_WINDOW_S) -> int:
    """How many ground-truth times are matched one-to-one by a predicted time within ``window_s``."""
    from scipy.optimize import linear_sum_assignment

    if not gt_t or not pred_t:
        return 0
    cost = np.abs(np.asarray(gt_t)[:, None] - np.asarray(pred_t)[None, :])
    big = 1e6
    rows, cols = linear_sum_assignment(np.where(cost <= window_s, cost, big))
    return int(np.count_nonzero(cost[rows, cols] <= window_s))


def score_counts(seq: Sequence, events: list[dict], frames: list[int]) -> dict[str, dict[str, float]]:
    """Per direction: ground truth, counted, error (counted - gt) / gt, and crossings matched within 2 s."""
    from datetime import datetime

    from contract.timestamps import parse_ts

    start = datetime.fromisoformat(START).timestamp()
    last = max(frames) if frames else 0
    names = in_direction(seq)
    out = {}
    for direction in seq.directions:
        gt_t = [(e["frame"] - 1) / seq.fps for e in seq.counts["events"]
                if e["direction"] == direction and e["frame"] <= last]
        pred_t = [parse_ts(e["ts"]) - start for e in events
                  if e["type"] == "line.cross" and e["line"] == LINE_NAME and names.get(e["direction"]) == direction]
        matched = match_in_time(gt_t, pred_t)
        out[direction] = {"gt": len(gt_t), "counted": len(pred_t),
                          "error": (len(pred_t) - len(gt_t)) / len(gt_t) if gt_t else float(len(pred_t)),
                          "within_2s": matched / len(gt_t) if gt_t else 1.0}
    return out


@dataclass
class Result:
    sequence: str
    model: str
    imgsz: list[int]
    fps: float | None
    frames: int
    seconds: float
    tracking: dict[str, float]
    tracks: int
    people: int
    counts: dict[str, dict[str, float]] = field(default_factory=dict)

    @property
    def tracks_per_person(self) -> float:
        return self.tracks / max(self.people, 1)


def evaluate(seq: Sequence, model: Path, fps: float | None, out_dir: Path, overrides: dict[str, Any] | None = None,
             max_frames: int | None = None) -> Result:
    """Run the edge on one setting and score it."""
    from camera.detector import Detector

    imgsz = list(Detector(model, threads=1).imgsz)
    tracks_path, events, seconds = run_edge(seq, model, fps, out_dir, overrides, max_frames)
    frames = processed_frames(seq, fps, max_frames)
    tracks = read_tracks(tracks_path)
    return Result(seq.name, model.name, imgsz, fps, len(frames), round(seconds, 1),
                  score_tracks(seq, tracks, frames), len(set(tracks[:, 1].astype(int))) if len(tracks) else 0,
                  gt_people(seq, frames), score_counts(seq, events, frames))


def fitting_models(seq: Sequence, models: list[Path]) -> list[Path]:
    """Models whose input wastes at most 20 % on letterbox padding for this video (the edge's hint rule)."""
    from camera.detector import Detector, padding_share

    return [m for m in models if padding_share((seq.width, seq.height), Detector(m, threads=1).imgsz) <= 0.2]


# ------------------------------------------------------------------------------------------------ report


def markdown(results: list[Result]) -> str:
    """One table per sequence: a row per model and rate."""
    out = []
    for name in dict.fromkeys(r.sequence for r in results):
        rows = [r for r in results if r.sequence == name]
        dirs = list(rows[0].counts)
        head = " | ".join(f"{d}: counted / gt (error, within 2 s)" for d in dirs)
        out += [f"**{name}**", "", f"| input | rate | {head} | tracks / people | HOTA | IDF1 | MOTA | IDsw |",
                "| --- | --- | " + "--- | " * len(dirs) + "--- | --- | --- | --- | --- |"]
        for r in rows:
            cells = " | ".join(f"{c['counted']} / {c['gt']} ({c['error']:+.0%}, {c['within_2s']:.0%})"
                               for c in r.counts.values())
            t = r.tracking
            rate = "every frame" if not r.fps else f"{r.fps:g} fps"
            out.append(f"| {r.imgsz[0]}x{r.imgsz[1]} | {rate} | {cells} | {r.tracks} / {r.people} = "
                       f"{r.tracks_per_person:.2f} | {t['HOTA']:.3f} | {t['IDF1']:.3f} | {t['MOTA']:.3f} | "
                       f"{t['IDSW']} |")
        out.append("")
    return "\n".join(out)


def detect_cost(seq: Sequence, models: list[Path], frames: int = 120) -> list[tuple[str, int, float]]:
    """(setting, model runs per frame, median ms per frame) of ``detect`` on the sequence's first frames, one
    inference thread, for each model, and with its line tiles where it has any (``detector.regions: lines``)."""
    import statistics

    import cv2

    from camera.detector import Detector
    from camera.regions import RegionDetector

    cap = cv2.VideoCapture(str(seq.video))
    images = [img for ok, img in (cap.read() for _ in range(frames)) if ok]
    cap.release()
    out = []
    for model in models:
        det = Detector(model, conf=0.1, threads=1)
        tiles = RegionDetector(det.detect, det.imgsz, det.iou, lambda w, h: [np.asarray(seq.line)], mode="lines")
        runs = {"": (det.detect, 1), " + line tiles": (tiles.detect, 1 + len(tiles.plan((seq.width, seq.height))))}
        for label, (fn, n) in runs.items():
            for img in images[:5]:
                fn(img)  # warm-up
            ms = []
            for img in images[5:]:
                t0 = time.perf_counter()
                fn(img)
                ms.append((time.perf_counter() - t0) * 1000)
            out.append((f"{seq.name} {det.imgsz[0]}x{det.imgsz[1]}{label}", n, statistics.median(ms)))
    return out


def _parse_set(items: list[str]) -> dict[str, Any]:
    import yaml

    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SystemExit(f"accuracy: --set wants KEY=VALUE (e.g. tracker.max_age_s=2), got {item!r}")
        out[key] = yaml.safe_load(value)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sequences", type=Path, default=SHARED / "data" / "sequences",
                    help="folder of labeled sequences (default $SMARTCAM_SHARED/data/sequences)")
    ap.add_argument("--model", type=Path, action="append",
                    help="model(s) to score (default: every models/*.onnx whose input fits the video)")
    ap.add_argument("--fps", type=float, action="append",
                    help="processing rate(s); 0 = every frame (default: 0 and 5)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="edge config override, dotted (tracker.max_age_s=2); the defaults otherwise")
    ap.add_argument("--max-frames", type=int, help="score only the first N processed frames")
    ap.add_argument("--out", type=Path, default=ROOT / "test-artifacts" / "accuracy", help="results folder")
    ap.add_argument("--cost", action="store_true",
                    help="instead: the detector's median ms per frame (1 thread), with and without line tiles")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if not args.sequences.is_dir():
        print(f"accuracy: no sequences folder {args.sequences}", file=sys.stderr)
        return 2
    sequences = discover(args.sequences)
    if not sequences:
        print(f"accuracy: no labeled sequence (gt.json + counts_derived.json + <name>.mp4) under {args.sequences}",
              file=sys.stderr)
        return 2
    models = args.model or sorted((ROOT / "models").glob("*.onnx"))
    if not models:
        print("accuracy: no model: build one (models/README.md) or pass --model", file=sys.stderr)
        return 2
    if args.cost:
        for seq in sequences:
            for setting, runs, ms in detect_cost(seq, fitting_models(seq, models)):
                print(f"{setting}: {ms:.1f} ms per frame ({runs} model run{'s' if runs > 1 else ''})")
        return 0
    rates = [r or None for r in (args.fps or [0.0, 5.0])]
    overrides = _parse_set(args.set)
    results = []
    for seq in sequences:
        for model in fitting_models(seq, models):
            for fps in rates:
                tag = f"{seq.name}/{model.stem}/{'all' if not fps else f'{fps:g}fps'}"
                print(f"accuracy: {tag} ...", file=sys.stderr, flush=True)
                r = evaluate(seq, model, fps, args.out / tag, overrides, args.max_frames)
                results.append(r)
                c = " ".join(f"{d} {v['counted']}/{v['gt']}" for d, v in r.counts.items())
                print(f"accuracy: {tag}: {c}, tracks {r.tracks}/{r.people}, IDF1 {r.tracking['IDF1']:.3f}, "
                      f"HOTA {r.tracking['HOTA']:.3f} ({r.seconds:.0f} s)", file=sys.stderr, flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "accuracy.json").write_text(json.dumps(
        {"overrides": overrides, "results": [asdict(r) | {"tracks_per_person": r.tracks_per_person}
                                             for r in results]}, indent=1))
    print(markdown(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""One turn of the learning loop on a real scene, measured (issue 15).

``--scene pets09`` (default): ``../shared/data/sequences/PETS09-S2L1/`` (768x576, 7 fps, 795 frames), scored on
its ground truth; ``--scene towncentre``: the street clip (1280x720, 24.9 fps, 523 frames), scored on 16
hand-checked frames of its last 40 % (``bench/data/towncentre_eval_labels.json``; ``bench/loop_scenes.py``).
On each, the edge's own sampler
(``camera.sampler``, behind the general 320 INT8 model, detector + filters + tracker as the edge runs them) picks
frames from the first 60 % of the video; the teacher (``models.label``) labels them; the model is fine-tuned
(``models.finetune``) in several recipes; each result is built to INT8 at the edge's input (256x320, calibrated on
the sampled frames) and scored on

* the last 40 % of the video (never used for sampling, labels or calibration), against its ground truth or the
  hand-checked labels, and
* ``../shared/data/persons-eval`` (the regression guard),

next to the general 320 and 640 INT8 models built the same way. The target: close at least half of the AP50 gap
between general 320 and general 640 on the scene, losing at most 1 point on persons-eval.

The clip is 68 s long where a camera runs for days, so the sampler's rate limits are raised (``--per-minute``)
and its per-track gap shortened; the rules are the edge's. Bytes per camera-day are computed from the mean size
of the JPEG samples at the default limits (2/min, 30/h, 200/day: 200 a day bind) and default ``max_side``.

    nice -n 10 .venv/bin/python bench/learning_loop.py --work bench-output/learning-loop --epochs 8
    .venv/bin/python bench/learning_loop.py --work ... --recipes freeze10            # one recipe only
    nice -n 10 .venv/bin/python bench/learning_loop.py --scene towncentre --work bench-output/loop-street \
        --epochs 6 --recipes headonly+lr0.0005

Each fine-tuned model's score thresholds are chosen as ``smartcam-model loop`` chooses them (``models.thresholds``:
precision matching against the general 320 model on the teacher-labeled validation slice of the sampled
frames, never the ground truth) and its precision/recall on the evaluation frames reported at conf 0.25 and at
the chosen conf (``results.json`` ``thresholds``, ``WORK/thresholds.md``).

Stages are cached in ``--work`` (delete a stage's folder to redo it). Results: ``WORK/results.json`` and
Markdown tables on stdout; docs/benchmarks.md and docs/learning-loop.md have the numbers.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import sys
import time
from pathlib import Path

import cv2
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.loop_scenes import SCENES, Scene  # noqa: E402
from camera.detector import Detector, fitted_imgsz  # noqa: E402
from camera.filters import FilterSpec, apply_filters  # noqa: E402
from camera.frame import Frame  # noqa: E402
from camera.sampler import Sampler, SamplesSpec, build_sample  # noqa: E402
from camera.tracker import Tracker  # noqa: E402
from contract.sample import decode_sample  # noqa: E402

SHARED = Path(os.environ.get("SMARTCAM_SHARED", ROOT.parent / "shared"))
BASE_PT = SHARED / "models" / "yolov8n-coco-trainable.pt"
TEACHER = SHARED / "models" / "yolov8n-coco.onnx"
PERSONS_EVAL = SHARED / "data" / "persons-eval" / "labels.json"
T0 = 1_704_067_200.0  # 2024-01-01T00:00:00Z: capture time of frame 1
TRAIN_SHARE = 0.6

RECIPES = {  # name -> finetune() keyword arguments
    "freeze10": {"freeze": 10},
    "freeze10+general30": {"freeze": 10, "general_share": 0.3},
    "nofreeze+general30": {"freeze": 0, "general_share": 0.3},
    "freeze10+general30+lr0.0005": {"freeze": 10, "general_share": 0.3, "lr0": 0.0005},
    "headonly+lr0.0005": {"freeze": 22, "lr0": 0.0005},
    "headonly+lr0.0005+seed1": {"freeze": 22, "lr0": 0.0005, "seed": 1},  # the same recipe, another seed
    "headonly+lr0.002": {"freeze": 22, "lr0": 0.002},
    "headonly+lr0.0005+nomosaic": {"freeze": 22, "lr0": 0.0005, "mosaic": 0.0},  # the edge's scale exactly
    "freeze10+general30+nomosaic": {"freeze": 10, "general_share": 0.3, "mosaic": 0.0},
    "freeze10+general50": {"freeze": 10, "general_share": 0.5},
    # between the two: the neck's P3 path (layers 13-15, the stride-8 output small people come from) trains too,
    # or only the P4/P5 path (16-21); both with the general share
    "freeze13+general30": {"freeze": 13, "general_share": 0.3},
    "freeze16+general30": {"freeze": 16, "general_share": 0.3},
    "nofreeze": {"freeze": 0},
    "nofreeze+general30+e12": {"freeze": 0, "general_share": 0.3, "epochs": 12},
    "freeze10+general30+e12": {"freeze": 10, "general_share": 0.3, "epochs": 12},
    "nofreeze+general30+e20": {"freeze": 0, "general_share": 0.3, "epochs": 20},
    "nofreeze+general30+e20+seed1": {"freeze": 0, "general_share": 0.3, "epochs": 20, "seed": 1},
}
WISE = "+wise"  # RECIPE+wiseA: that recipe's fine-tune merged with the base, alpha A (models.weight_merge)


def recipe_name(name: str) -> str:
    """argparse type: a recipe of RECIPES, optionally with a +wiseA suffix (0 < A < 1).

    >>> recipe_name("freeze10+general30+wise0.5")
    'freeze10+general30+wise0.5'
    >>> recipe_name("freeze10+wise2")
    Traceback (most recent call last):
    argparse.ArgumentTypeError: freeze10+wise2: the +wise alpha must be between 0 and 1
    """
    trained, _, alpha = name.partition(WISE)
    if trained not in RECIPES:
        raise argparse.ArgumentTypeError(f"{name}: unknown recipe (one of {', '.join(RECIPES)}, +wiseA optional)")
    if alpha:
        try:
            ok = 0 < float(alpha) < 1
        except ValueError:
            ok = False
        if not ok:
            raise argparse.ArgumentTypeError(f"{name}: the +wise alpha must be between 0 and 1")
    return name

log = logging.getLogger("learning_loop")


def read_video(path: Path) -> list[np.ndarray]:
    cap = cv2.VideoCapture(str(path))
    frames = []
    while True:
        ok, frame = cap.read()
        if not ok:
            break
        frames.append(frame)
    cap.release()
    return frames


def eval_labels(scene: Scene, frames: list[np.ndarray], split: int, work: Path) -> Path:
    """persons-eval format labels of the held-out frames (the last 40 %), written once into ``work``."""
    labels = work / "eval_slice" / "labels.json"
    return labels if labels.is_file() else scene.eval_labels(frames, split, work / "eval_slice")


def build(weights: Path, imgsz: tuple[int, int], calib: Path, out: Path) -> Path:
    from models.build import build_model

    if not out.is_file():
        build_model(str(weights), imgsz, [str(calib)], out, calib_frames=64, keep_classes=["person"], labels=None,
                    latency_runs=0, progress=False)
    return out


def sample_scene(frames: list[np.ndarray], split: int, fps: float, model: Path, spec: SamplesSpec, work: Path,
                 camera: str) -> Path:
    """The edge's sampler over the first 60 %: images/ + samples.jsonl, as `smartcam-sink samples export` writes."""
    out = work / "samples"
    index = out / "samples.jsonl"
    if index.is_file():
        return out
    (out / "images").mkdir(parents=True, exist_ok=True)
    det = Detector(model, conf=0.25, classes=("person",))
    tracker, sampler, filters = Tracker(), Sampler(spec), FilterSpec()
    lines = []
    for idx in range(split):
        frame = Frame(frames[idx], T0 + idx / fps, idx)
        h, w = frame.image.shape[:2]
        kept = apply_filters(det.detect(frame.image), filters, [], w, h)
        tracker.update(kept, frame.ts)
        for cand in sampler.observe(frame, kept, tracker.tracks):
            header, jpeg = decode_sample(build_sample(cand, site="bench", camera_id=camera, model_name=det.name,
                                                      model_sha256=det.sha256, names=det.names, spec=spec))
            name = f"images/{header['sample_id']}.jpg"
            (out / name).write_bytes(jpeg)
            lines.append(json.dumps({**header, "image_file": name, "frame": idx + 1}))
    index.write_text("".join(line + "\n" for line in lines))
    (out / "sampler.json").write_text(json.dumps({"chosen": sampler.chosen, "refused": sampler.limiter.refused,
                                                  "suppressed": sampler.suppressed}, indent=2))
    return out


def general_frames(work: Path, per_clip: int, clips: tuple[str, ...]) -> Path:
    """Frames of the other shared clips (never persons-eval, never the scene's own clip): the 'general' share,
    labeled by the teacher too."""
    out = work / "general-frames"
    if out.is_dir() and any(out.iterdir()):
        return out
    out.mkdir(parents=True, exist_ok=True)
    for clip in clips:
        frames = read_video(SHARED / "data" / "videos" / clip)
        for k in np.linspace(0, len(frames) - 1, per_clip).astype(int):
            cv2.imwrite(str(out / f"{Path(clip).stem}-{k:05d}.jpg"), frames[k], [cv2.IMWRITE_JPEG_QUALITY, 92])
    return out


def general_val(work: Path, per_clip: int, clips: tuple[str, ...], teacher, conf: float) -> Path:
    """Teacher labels (persons-eval format) of general frames *between* the training ones: a second validation set
    for choosing among candidates (e.g. the merge's alpha) without looking at persons-eval, the gate's guard."""
    out = work / "general-val"
    labels = out / "labels.json"
    if labels.is_file():
        return labels
    (out / "images").mkdir(parents=True, exist_ok=True)
    records = []
    for clip in clips:
        frames = read_video(SHARED / "data" / "videos" / clip)
        train = np.linspace(0, len(frames) - 1, per_clip).astype(int)
        for k in ((train[:-1] + train[1:]) // 2)[::2]:  # midway between two training frames, never one of them
            name = f"images/{Path(clip).stem}-{k:05d}.jpg"
            cv2.imwrite(str(out / name), frames[k], [cv2.IMWRITE_JPEG_QUALITY, 92])
            image = cv2.imread(str(out / name))
            d = teacher.detect(image)
            d = d[d.confidence >= conf]
            records.append({"image": name, "width": image.shape[1], "height": image.shape[0],
                            "boxes": np.round(d.xyxy, 1).tolist(), "visibility": [1.0] * len(d), "ignore": []})
    labels.write_text(json.dumps(records))
    return labels


def ap50(model: Path, labels: Path) -> float:
    from models.evaluate import evaluate_accuracy, load_labels

    return round(evaluate_accuracy(model, load_labels(labels)).ap50, 4)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scene", choices=list(SCENES), default="pets09", help="which camera (bench/loop_scenes.py)")
    p.add_argument("--work", help="cache and results folder (default bench-output/learning-loop[-SCENE])")
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--recipes", nargs="+", default=list(RECIPES), type=recipe_name,
                   help="recipes to run (default all); RECIPE+wiseA also merges that fine-tune with the base, "
                        "weight alpha A (WiSE-FT)")
    p.add_argument("--per-minute", type=int, default=600, help="sampler rate limit for these short clips")
    p.add_argument("--track-gap", type=float, default=3.0, help="sampler per-track gap (s of video)")
    p.add_argument("--random", type=float, default=0.1, help="random baseline probability per frame")
    p.add_argument("--teacher-imgsz", type=int, default=960)
    p.add_argument("--teacher-conf", type=float, default=0.35)
    p.add_argument("--general-per-clip", type=int, default=40)
    p.add_argument("--no-teacher", action="store_true", help="do not score the teacher (slow; a reference only)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    scene = SCENES[args.scene]
    work = Path(args.work or ("bench-output/learning-loop" + ("" if scene.name == "pets09" else f"-{scene.name}")))
    work.mkdir(parents=True, exist_ok=True)
    results_path = work / "results.json"
    results = json.loads(results_path.read_text()) if results_path.is_file() else {}
    timings = results.setdefault("seconds", {})

    def save() -> None:
        results_path.write_text(json.dumps(results, indent=2))

    t = time.perf_counter()
    frames = read_video(scene.video)
    cap = cv2.VideoCapture(str(scene.video))
    fps = cap.get(cv2.CAP_PROP_FPS) or 25.0
    cap.release()
    split = int(len(frames) * TRAIN_SHARE)
    eval_slice = eval_labels(scene, frames, split, work)
    results["scene"] = {"name": scene.name, "video": scene.video.name, "frames": len(frames), "fps": round(fps, 3),
                        "sampled_from": [1, split], "evaluated": len(json.loads(eval_slice.read_text()))}
    calib = work / "calib"
    if not calib.is_dir():
        calib.mkdir()
        for k in np.linspace(0, split - 1, 64).astype(int):
            cv2.imwrite(str(calib / f"{k + 1:06d}.jpg"), frames[k])
    h, w = frames[0].shape[:2]
    s320, s640 = fitted_imgsz((w, h), 320), fitted_imgsz((w, h), 640)
    models = work / "models"
    models.mkdir(exist_ok=True)
    g320 = build(BASE_PT, s320, calib, models / "general-320.onnx")
    g640 = build(BASE_PT, s640, calib, models / "general-640.onnx")
    timings.setdefault("build_general", round(time.perf_counter() - t, 1))

    spec = SamplesSpec(enabled=True, per_minute=args.per_minute, per_hour=100_000, per_day=100_000,
                       track_gap_s=args.track_gap, random_probability=args.random, seed=0)
    t = time.perf_counter()
    samples = sample_scene(frames, split, fps, g320, spec, work, scene.name)
    timings["sample"] = timings.get("sample") or round(time.perf_counter() - t, 1)
    records = [json.loads(x) for x in (samples / "samples.jsonl").read_text().splitlines()]
    sizes = [r["image"]["bytes"] for r in records]
    reasons: dict[str, int] = {}
    for r in records:
        reasons[r["reason"]] = reasons.get(r["reason"], 0) + 1
    results["samples"] = {"frames_sampled": len(records), "of_frames": split, "reasons": reasons,
                          "mean_jpeg_bytes": round(float(np.mean(sizes))), "max_side": spec.max_side,
                          "bytes_per_camera_day_at_defaults": round(float(np.mean(sizes)) * 200)}
    save()

    from models.label import Teacher, label_images

    teacher = Teacher(TEACHER, imgsz=args.teacher_imgsz, workdir=work / "teacher")
    t = time.perf_counter()
    tag = "" if args.teacher_conf == 0.35 else f"+teacher{args.teacher_conf:g}"  # another labeling, cached apart
    scene_ds = work / f"dataset{tag}"
    if not (scene_ds / "data.yaml").is_file():
        label_images(samples, teacher, scene_ds, conf=args.teacher_conf, val_share=0.2)
        timings[f"label_scene{tag}"] = round(time.perf_counter() - t, 1)
    general_ds = work / "general-dataset"
    mixing = any(RECIPES[r.partition(WISE)[0]].get("general_share") for r in args.recipes)
    if mixing and not (general_ds / "data.yaml").is_file():  # only recipes that mix need it
        t = time.perf_counter()
        label_images(general_frames(work, args.general_per_clip, scene.general_clips), teacher, general_ds,
                     conf=args.teacher_conf, val_share=0.0)
        timings["label_general"] = round(time.perf_counter() - t, 1)
    save()

    scores = results.setdefault("ap50", {})
    for name, path in (("general-320", g320), ("general-640", g640)):
        if name not in scores:
            scores[name] = {"scene": ap50(path, eval_slice), "persons_eval": ap50(path, PERSONS_EVAL)}
            save()
    from models.finetune import finetune

    for recipe in args.recipes:
        key = f"{recipe}{tag}-e{args.epochs}"
        if key in scores:
            continue
        trained, _, alpha = recipe.partition(WISE)
        kw = dict(RECIPES[trained])
        share = kw.pop("general_share", 0.0)
        seed = kw.pop("seed", 0)
        epochs = kw.pop("epochs", args.epochs)
        pt = work / "runs" / f"{trained}{tag}-e{args.epochs}.pt"  # +wise variants share their recipe's run
        t = time.perf_counter()
        if not pt.is_file():
            finetune(scene_ds / "data.yaml", BASE_PT, pt, imgsz=max(s320), epochs=epochs,
                     general=general_ds / "data.yaml" if share else None, general_share=share, seed=seed, **kw)
        if alpha:
            from models.weight_merge import merge_checkpoints

            pt = merge_checkpoints(BASE_PT, pt, float(alpha), work / "runs" / f"{key}.pt")
        train_s = time.perf_counter() - t
        t = time.perf_counter()
        onnx_path = build(pt, s320, calib, models / f"{key}-320.onnx")
        build_s = time.perf_counter() - t
        scores[key] = {"scene": ap50(onnx_path, eval_slice), "persons_eval": ap50(onnx_path, PERSONS_EVAL),
                       "train_s": round(train_s, 1), "build_s": round(build_s, 1)}
        save()

    if any(WISE in r for r in args.recipes):  # validation scores to choose alpha by, beside the test scores
        gval = general_val(work, args.general_per_clip, scene.general_clips, teacher, args.teacher_conf)
        sel = results.setdefault("selection", {})
        keys = ["general-320"] + [f"{r.partition(WISE)[0]}{tag}-e{args.epochs}" for r in args.recipes] + \
               [f"{r}{tag}-e{args.epochs}" for r in args.recipes]
        for key in dict.fromkeys(keys):
            path = models / f"{key}-320.onnx" if key != "general-320" else g320
            if key not in sel and path.is_file():
                sel[key] = {"scene_val": ap50(path, scene_ds / "val.labels.json"), "general_val": ap50(path, gval)}
                save()
        print(selection_table(results))

    thresholds_stage(results, save, work, scene_ds / "val.labels.json", eval_slice, g320,
                     [k for k in (f"{r}{tag}-e{args.epochs}" for r in args.recipes)], models)

    if "teacher" not in scores and not args.no_teacher:
        from models.evaluate import load_labels, predict, score

        t = time.perf_counter()
        scores["teacher"] = {
            "scene": round(score(load_labels(eval_slice), predict(teacher, load_labels(eval_slice))).ap50, 4),
            "persons_eval": round(score(load_labels(PERSONS_EVAL), predict(teacher, load_labels(PERSONS_EVAL))).ap50,
                                  4)}
        timings["teacher_eval"] = round(time.perf_counter() - t, 1)
        save()

    print(table(results, scene.title))
    print(thresholds_table(results))
    return 0


EDGE_CONF = 0.1  # camera/config.py's detector.conf: what a camera without an over-the-air model runs at


def _pr(sc) -> dict:
    return {"conf": sc.conf, "precision": round(sc.precision, 4), "recall": round(sc.recall, 4), "tp": sc.tp,
            "fp": sc.fp, "gt": sc.gt}


def thresholds_stage(results: dict, save, work: Path, slice_labels: Path, eval_slice: Path, current: Path,
                     keys: list[str], models: Path) -> None:
    """Each fine-tuned model's score thresholds, chosen as the loop chooses them (``models.thresholds``: precision
    matching against the general 320 model at the edge's thresholds) on the **teacher-labeled validation slice**
    of the sampled frames (``dataset/val.labels.json``, the loop's own slice; never the ground truth), then
    precision/recall on the held-out evaluation (ground truth / hand-checked labels) at conf 0.25 and at the
    chosen conf. Also ``conf`` matched from the edge config's 0.1 (what the counting harness runs at)."""
    from models.evaluate import load_labels, predict, score, scoring_detector
    from models.thresholds import DEFAULTS, ScoredBoxes, choose_thresholds

    out = results.setdefault("thresholds", {})
    todo = [k for k in keys if k not in out]
    if not todo:
        return
    val, ev = load_labels(slice_labels), load_labels(eval_slice)

    def preds(path: Path) -> tuple[list, list]:
        det = scoring_detector(path, DEFAULTS.get("iou", 0.45))
        return predict(det, val), predict(det, ev)

    cur_val, cur_ev = preds(current)
    cur_boxes = ScoredBoxes.of(val, cur_val)
    for key in todo:
        new_val, new_ev = preds(models / f"{key}-320.onnx")
        new_boxes = ScoredBoxes.of(val, new_val)
        choice = choose_thresholds(cur_boxes, new_boxes, DEFAULTS)
        from_edge = choose_thresholds(cur_boxes, new_boxes, {"conf": EDGE_CONF}, keys=("conf",))
        conf = choice.thresholds["conf"]
        out[key] = {
            "slice": {"images": len(val), "boxes": int(sum(len(g.boxes) for g in val)),
                      "current@0.25": _pr(score(val, cur_val, 0.25)), "new@0.25": _pr(score(val, new_val, 0.25)),
                      "new@chosen": _pr(score(val, new_val, conf))},
            "chosen": choice.thresholds, "rows": choice.rows,
            "conf_from_edge_0.1": from_edge.thresholds["conf"], "conf_from_edge_rows": from_edge.rows,
            "eval": {"current@0.25": _pr(score(ev, cur_ev, 0.25)), "new@0.25": _pr(score(ev, new_ev, 0.25)),
                     "new@chosen": _pr(score(ev, new_ev, conf))},
        }
        log.info("%s: thresholds %s\n%s", key, choice.thresholds, choice.table())
        save()
    (work / "thresholds.md").write_text(thresholds_table(results) + "\n")


def thresholds_table(results: dict) -> str:
    lines = ["| model | chosen conf / track_threshold / high_score / new_track_score (conf from 0.1) | "
             "slice P / R at 0.25 | slice P / R at chosen | eval P / R at 0.25 | eval P / R at chosen | eval FP |",
             "|---|---|---|---|---|---|---|"]
    first = True
    for key, r in results.get("thresholds", {}).items():
        if first:
            c, e = r["slice"]["current@0.25"], r["eval"]["current@0.25"]
            lines.append(f"| general-320 (current, 0.25 / 0.5 / 0.4 / 0.5) | | {c['precision']:.3f} / "
                         f"{c['recall']:.3f} | | {e['precision']:.3f} / {e['recall']:.3f} | | {e['fp']} |")
            first = False
        t, sl, ev = r["chosen"], r["slice"], r["eval"]
        lines.append(f"| {key} | {t['conf']:g} / {t['track_threshold']:g} / {t['high_score']:g} / "
                     f"{t['new_track_score']:g} ({r['conf_from_edge_0.1']:g}) | "
                     f"{sl['new@0.25']['precision']:.3f} / {sl['new@0.25']['recall']:.3f} | "
                     f"{sl['new@chosen']['precision']:.3f} / {sl['new@chosen']['recall']:.3f} | "
                     f"{ev['new@0.25']['precision']:.3f} / {ev['new@0.25']['recall']:.3f} | "
                     f"{ev['new@chosen']['precision']:.3f} / {ev['new@chosen']['recall']:.3f} | "
                     f"{ev['new@0.25']['fp']} -> {ev['new@chosen']['fp']} |")
    return "\n".join(lines)


def selection_table(results: dict, max_drop: float = 1.0) -> str:
    """Each candidate's validation scores (teacher labels: the scene's validation slice, general frames between
    the training ones) beside its test scores, and per fine-tune the alpha those choose: the best scene
    validation AP50 among the merges (alpha 1 = not merged) that lose at most ``max_drop`` points of general
    validation AP50 — chosen without the held-out slice or persons-eval."""
    sel, scores = results.get("selection", {}), results.get("ap50", {})
    base = sel.get("general-320")
    if not base:
        return ""
    rows = ["| model | scene val (teacher) | general val (teacher) | street/scene test | persons-eval |",
            "|---|---:|---:|---:|---:|"]
    for key, v in sel.items():
        t = scores.get(key, {})
        rows.append(f"| {key} | {v['scene_val']:.4f} | {v['general_val']:.4f} | {t.get('scene', float('nan')):.4f} "
                    f"| {t.get('persons_eval', float('nan')):.4f} |")
    for key in sel:
        if key == "general-320" or WISE in key:
            continue
        trained, _, epochs = key.rpartition("-e")
        family = {key: 1.0} | {k: float(k.partition(WISE)[2].rpartition("-e")[0]) for k in sel
                               if k.startswith(trained + WISE) and k.endswith(f"-e{epochs}")}
        ok = {k: a for k, a in family.items() if sel[k]["general_val"] >= base["general_val"] - max_drop / 100}
        if ok:
            best = max(ok, key=lambda k: sel[k]["scene_val"])
            rows.append(f"\n{trained}: chosen alpha {ok[best]:g} ({best}) of {sorted(family.values())}")
        else:
            rows.append(f"\n{trained}: no alpha within {max_drop:g} pt of general validation")
    return "\n".join(rows)


def table(results: dict, title: str = "PETS09 held-out AP50") -> str:
    s = results["ap50"]
    base, top = s["general-320"], s["general-640"]
    gap = top["scene"] - base["scene"]
    lines = [f"| model | {title} | gap closed | persons-eval AP50 | change |",
             "|---|---:|---:|---:|---:|"]
    for name, r in s.items():
        closed = (r["scene"] - base["scene"]) / gap if gap else float("nan")
        lines.append(f"| {name} | {r['scene']:.4f} | {closed:+.0%} | {r['persons_eval']:.4f} | "
                     f"{(r['persons_eval'] - base['persons_eval']) * 100:+.1f} pt |")
    return "\n".join(lines)


if __name__ == "__main__":
    random.seed(0)
    sys.exit(main())

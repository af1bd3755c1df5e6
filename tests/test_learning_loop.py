"""The cloud half of the learning loop (issue 15): teacher labels, the gate, and a tiny real turn
(the real teacher, the real Ultralytics fine-tune, the real INT8 build and eval) that the gate accepts or refuses
with its reason."""

from __future__ import annotations

import json
import subprocess
import sys

import cv2
import numpy as np
import pytest
import yaml

from camera.detections import Detections
from camera.frame import Frame
from camera.sampler import Candidate, SamplesSpec, build_sample
from contract.sample import decode_sample
from models.gate import AP, GateSpec, decide
from tests.conftest import INDOOR_CLIP, MODELS, ONNX_FP32, PERSONS_EVAL, ROOT

TRAINABLE = MODELS / "yolov8n-coco-trainable.pt"


def test_gate_needs_the_camera_gain_and_bounds_the_general_drop():
    spec = GateSpec(min_gain=0.02, max_drop=0.01)
    ok = decide(AP(0.70, 0.50), AP(0.75, 0.495), spec)
    assert ok.passed and ok.reason.startswith("accepted: camera AP50 0.7000 -> 0.7500 (+5.0 pt)")
    small = decide(AP(0.70, 0.50), AP(0.71, 0.52), spec)
    assert not small.passed and "below the required +2.0 pt" in small.reason
    worse = decide(AP(0.70, 0.50), AP(0.80, 0.48), spec)
    assert not worse.passed and "persons-eval AP50 0.5000 -> 0.4800 (-2.0 pt)" in worse.reason


def export_like_the_sink(out, frames: list[np.ndarray], t0: float = 1_767_323_000.0) -> None:
    """A `smartcam-sink samples export` folder made by the edge's own sample encoder (newest frame first on
    disk order, so the split must come from the times, not the names)."""
    (out / "images").mkdir(parents=True)
    lines = []
    for i, image in reversed(list(enumerate(frames))):
        payload = build_sample(Candidate(Frame(image, t0 + i, i), Detections.empty(), ["random"]), site="s",
                               camera_id="cam", model_name="m", model_sha256="a" * 64, names={0: "person"},
                               spec=SamplesSpec(enabled=True, max_side=320))
        header, jpeg = decode_sample(payload)
        name = f"images/{header['sample_id']}.jpg"
        (out / name).write_bytes(jpeg)
        lines.append(json.dumps({**header, "image_file": name}))
    (out / "samples.jsonl").write_text("\n".join(lines) + "\n")


def clip_frames(n: int) -> list[np.ndarray]:
    cap = cv2.VideoCapture(str(INDOOR_CLIP))
    frames = []
    while len(frames) < n:
        ok, frame = cap.read()
        if not ok:
            break
        for _ in range(15):  # a second apart, roughly
            cap.grab()
        frames.append(frame)
    cap.release()
    return frames


def test_teacher_labels_a_yolo_dataset_split_by_time(tmp_path):
    from models.label import Teacher, label_images

    samples = tmp_path / "samples"
    export_like_the_sink(samples, clip_frames(5))
    result = label_images(samples, Teacher(ONNX_FP32, 320, workdir=tmp_path / "t"), tmp_path / "ds", val_share=0.4,
                          progress=False)
    assert (result.train, result.val) == (3, 2)
    data = yaml.safe_load(result.data_yaml.read_text())
    assert data["names"][0] == "person" and len(data["names"]) == 80  # every head weight transfers
    train = sorted((tmp_path / "ds" / "labels" / "train").glob("*.txt"))
    val = sorted((tmp_path / "ds" / "labels" / "val").glob("*.txt"))
    assert [p.stem[:6] for p in train + val] == ["000000", "000001", "000002", "000003", "000004"]  # oldest first
    rows = [line.split() for p in train + val for line in p.read_text().splitlines()]
    assert rows, "the teacher found nobody on a clip of two people"
    assert all(r[0] == "0" and all(0 <= float(v) <= 1 for v in r[1:]) for r in rows)
    val_labels = json.loads(result.val_labels.read_text())
    assert len(val_labels) == 2 and all((tmp_path / "ds" / r["image"]).is_file() for r in val_labels)


def test_teacher_flip_view_agrees_with_the_plain_view():
    from models.label import Teacher

    image = clip_frames(1)[0]
    both = Teacher(ONNX_FP32, 320, flip=True).detect(image)
    plain = Teacher(ONNX_FP32, 320, flip=False).detect(image)
    confident = both[both.confidence > 0.5]
    assert len(confident) >= 1
    from camera.detections import iou_matrix

    assert (iou_matrix(confident.xyxy, plain.xyxy).max(axis=1) > 0.7).all()  # mirrored back to the right place


@pytest.mark.slow
def test_tiny_turn_end_to_end_gives_a_gate_verdict(tmp_path):
    from models.build import build_model

    frames = clip_frames(8)
    samples = tmp_path / "samples"
    export_like_the_sink(samples, frames)
    current = tmp_path / "current-96-int8.onnx"
    build_model(ONNX_FP32, (96, 96), [str(INDOOR_CLIP)], current, calib_frames=8, keep_classes=["person"],
                labels=None, latency_runs=0, progress=False)
    work = tmp_path / "turn"
    proc = subprocess.run(
        [sys.executable, "-m", "models", "loop", "--camera", "cam", "--current", str(current), "--work", str(work),
         "--samples", str(samples), "--teacher-imgsz", "320", "--base", str(TRAINABLE), "--epochs", "1",
         "--batch", "4", "--val-share", "0.25", "--labels", str(PERSONS_EVAL / "labels.json"),
         "--min-gain", "1", "--max-drop", "1"],
        cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode in (0, 1), proc.stderr[-3000:]
    out = proc.stdout
    assert "| current (current-96-int8.onnx) |" in out and "| candidate (candidate-96x96-int8.onnx) |" in out
    verdict = out.strip().splitlines()[-1]
    assert verdict.startswith("accepted: camera AP50" if proc.returncode == 0 else "refused: ")
    doc = json.loads((work / "eval.json").read_text())
    assert doc["decision"]["passed"] is (proc.returncode == 0)
    assert set(doc["seconds"]) >= {"label", "finetune", "build", "eval"}
    from camera.detector import Detector

    candidate = Detector(work / "candidate-96x96-int8.onnx", classes=("person",))  # the edge can load it
    assert candidate.imgsz == (96, 96)
    assert (work / "candidate.json").is_file() and json.loads((work / "candidate.json").read_text())["epochs"] == 1

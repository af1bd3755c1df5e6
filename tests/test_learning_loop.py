"""The cloud half of the learning loop (issue 15): teacher labels, the gate, and a tiny real turn
(the real teacher, the real Ultralytics fine-tune, the real INT8 build and eval) that the gate accepts or refuses
with its reason."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

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
from tests.services import CAM, SITE, Subscriber

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


@dataclass
class TinyTurn:
    """A tiny real turn run once through ``smartcam-model loop`` (no registry): its inputs, work folder, result."""

    samples: Path
    current: Path
    work: Path
    proc: subprocess.CompletedProcess


@pytest.fixture(scope="module")
def tiny_turn(tmp_path_factory) -> TinyTurn:
    """8 frames of the indoor clip exported as the sink does, a 96x96 INT8 "current" model, and one turn of the
    real loop on them: the teacher at 320, a 1-epoch Ultralytics fine-tune at 96, the INT8 build, eval, gate.
    The publish/deploy tests copy its ``--work``, so only their own steps (eval, gate, publish, deploy) run."""
    from models.build import build_model

    tmp = tmp_path_factory.mktemp("tiny_turn")
    samples = tmp / "samples"
    export_like_the_sink(samples, clip_frames(8))
    current = tmp / "current-96-int8.onnx"
    build_model(ONNX_FP32, (96, 96), [str(INDOOR_CLIP)], current, calib_frames=8, keep_classes=["person"],
                labels=None, latency_runs=0, progress=False)
    work = tmp / "turn"
    proc = subprocess.run(
        [sys.executable, "-m", "models", "loop", "--camera", "cam", "--current", str(current), "--work", str(work),
         "--samples", str(samples), "--teacher-imgsz", "320", "--base", str(TRAINABLE), "--epochs", "1",
         "--batch", "4", "--val-share", "0.25", "--labels", str(PERSONS_EVAL / "labels.json"),
         "--min-gain", "1", "--max-drop", "1"],
        cwd=ROOT, capture_output=True, text=True, timeout=600)
    return TinyTurn(samples, current, work, proc)


@pytest.mark.slow
def test_tiny_turn_end_to_end_gives_a_gate_verdict(tiny_turn):
    proc, work = tiny_turn.proc, tiny_turn.work
    assert proc.returncode in (0, 1), proc.stderr[-3000:]
    out = proc.stdout
    assert "| current (current-96-int8.onnx) |" in out and "| candidate (candidate-96x96-int8.onnx) |" in out
    verdict = out.strip().splitlines()[-1]
    assert verdict.startswith("accepted: camera AP50" if proc.returncode == 0 else "refused: ")
    doc = json.loads((work / "eval.json").read_text())
    assert doc["decision"]["passed"] is (proc.returncode == 0)
    assert set(doc["seconds"]) >= {"label", "finetune", "build", "eval"}
    # the new model's thresholds, chosen on the slice (models/thresholds.py), are in the record and the log
    assert set(doc["thresholds"]) == {"conf", "iou", "track_threshold", "high_score", "new_track_score"}
    assert 0.1 <= doc["thresholds"]["conf"] <= 0.9 and doc["thresholds"]["iou"] == 0.45
    assert [r["name"] for r in doc["threshold_choice"]["rows"]] == ["conf", "track_threshold", "high_score",
                                                                   "new_track_score"]
    assert "thresholds for the new model (precision matching on the slice): conf 0.25 -> " in out
    assert "| threshold | current | precision (current) | chosen |" in out
    from camera.detector import Detector

    candidate = Detector(work / "candidate-96x96-int8.onnx", classes=("person",))  # the edge can load it
    assert candidate.imgsz == (96, 96)
    assert (work / "candidate.json").is_file() and json.loads((work / "candidate.json").read_text())["epochs"] == 1


def turn_settings(tiny: TinyTurn, work: Path, gate: GateSpec, registry: Path, signing_key: Path, broker: str,
                  watch_s: float = 60.0):
    """The tiny turn's settings again (same --work copy), now with publish and deploy to ``CAM`` at ``SITE``."""
    from models.loop import TurnSettings

    return TurnSettings(camera=CAM, work=work, current=tiny.current, base=TRAINABLE, teacher=ONNX_FP32,
                        general_labels=PERSONS_EVAL / "labels.json", samples=tiny.samples, teacher_imgsz=320,
                        val_share=0.25, epochs=1, batch=4, gate=gate,
                        publish={"registry": str(registry), "signing_key": str(signing_key)},
                        deploy={"broker": broker, "site": SITE, "canary": 1, "watch_s": watch_s})


def retained(port: int, topic: str, settle_s: float = 1.5) -> list[tuple[bytes, bool]]:
    """What a subscriber that connects now receives on ``topic`` within ``settle_s``: (payload, retain flag)."""
    sub = Subscriber(port, client_id=f"loop-check-{time.monotonic_ns()}", topic=topic)
    try:
        time.sleep(settle_s)
        with sub._lock:
            return [(p, r) for t, p, r in sub.messages if t == topic]
    finally:
        sub.close()


@pytest.mark.slow
def test_accepted_turn_publishes_a_signed_version_and_the_camera_runs_it(tiny_turn, mosquitto, tmp_path, ota_keys):
    """The gate accepts (its margins allow any result), the candidate is signed into a real registry, its desired
    document is retained on a real Mosquitto, and a real edge running the current model verifies, health-checks and
    swaps it in: only then is the turn's ``deployed`` true."""
    from camera.detector import file_sha256
    from contract.model_docs import camera_desired_topic
    from contract.signature import load_public_key
    from models.loop import run_turn
    from models.registry import open_registry, verify_entry
    from tests.ota_fixtures import EdgeThread, Watch, ota_edge_config

    assert tiny_turn.proc.returncode in (0, 1), tiny_turn.proc.stderr[-3000:]
    work = tmp_path / "turn"
    shutil.copytree(tiny_turn.work, work)
    registry = tmp_path / "registry"
    watch = Watch(mosquitto.port)
    (tmp_path / "edge").mkdir()
    edge = EdgeThread(ota_edge_config(tmp_path / "edge", model=tiny_turn.current, broker=mosquitto.url, site=SITE,
                                      camera=CAM, trust_key=ota_keys[1]))
    said: list[str] = []
    try:
        watch.wait_report(SITE, CAM, lambda d: d["state"] == "active", what="start-up report")
        report = run_turn(turn_settings(tiny_turn, work, GateSpec(min_gain=-1.0, max_drop=1.0), registry,
                                        ota_keys[0], mosquitto.url), say=said.append)
        running = edge.detector.sha256
        running_conf, running_iou = edge.detector.conf, edge.detector.iou
    finally:
        rc = edge.stop()
        watch.close()
    assert rc == 0
    tracker_spec = edge.runner._tracker.spec  # after the swap: the new model's tracker thresholds
    assert "finetune" not in report.seconds and {"eval", "publish", "deploy"} <= set(report.seconds)
    assert report.decision.passed and report.decision.reason.startswith("accepted: "), report.decision.reason
    sha = file_sha256(report.candidate)
    assert report.version == f"{CAM}-loop-{sha[:12]}"
    entry = open_registry(registry).entry(report.version)
    verify_entry(entry, load_public_key(ota_keys[1]))  # signed by the turn's key
    assert entry["manifest"]["sha256"] == sha and "learning loop for cam-1: accepted" in entry["manifest"]["notes"]
    assert (registry / "models" / report.version / "model.onnx").read_bytes() == report.candidate.read_bytes()
    assert report.deployed, "\n".join(said)
    docs = retained(mosquitto.port, camera_desired_topic(SITE, CAM))
    assert len(docs) == 1 and docs[0][1], "no retained desired document for the camera"
    desired = json.loads(docs[0][0])
    assert desired["manifest"]["version"] == report.version and desired["url"].startswith("file://")
    assert running == sha  # the camera swapped the new model in
    # ... with the thresholds the turn chose for it: in the signed manifest, in the log, in the edge's detector
    chosen = json.loads((work / "eval.json").read_text())["thresholds"]
    assert report.thresholds == chosen and entry["manifest"]["thresholds"] == chosen
    assert any(line.startswith(f"published {report.version} with thresholds conf {chosen['conf']:g}")
               for line in said), said
    assert (running_conf, running_iou) == (chosen["conf"], chosen["iou"])
    assert (tracker_spec.high_score, tracker_spec.new_track_score) == (chosen["high_score"], chosen["new_track_score"])
    record = json.loads((work / "eval.json").read_text())
    assert record["version"] == report.version and record["deployed"] is True


@pytest.mark.slow
def test_refused_turn_publishes_and_deploys_nothing(tiny_turn, mosquitto, tmp_path, ota_keys):
    from contract.model_docs import camera_desired_topic, site_desired_topic
    from models.loop import run_turn
    from models.registry import open_registry

    assert tiny_turn.proc.returncode in (0, 1), tiny_turn.proc.stderr[-3000:]
    work = tmp_path / "turn"
    shutil.copytree(tiny_turn.work, work)
    registry = tmp_path / "registry"
    report = run_turn(turn_settings(tiny_turn, work, GateSpec(min_gain=1.0, max_drop=0.0), registry, ota_keys[0],
                                    mosquitto.url), say=lambda _: None)  # +100 AP50 points: impossible
    assert not report.decision.passed and report.decision.reason.startswith("refused: camera AP50")
    assert "below the required +100.0 pt" in report.decision.reason
    assert report.version is None and not report.deployed
    assert not {"publish", "deploy"} & set(report.seconds)
    assert open_registry(registry).versions() == [] and not (registry / "models").exists()
    assert retained(mosquitto.port, camera_desired_topic(SITE, CAM)) == []
    assert retained(mosquitto.port, site_desired_topic(SITE), settle_s=0.5) == []
    record = json.loads((work / "eval.json").read_text())
    assert record["decision"]["passed"] is False and "version" not in record


@pytest.mark.slow
def test_wise_turn_merges_the_same_fine_tune_with_the_base_and_builds_that(tiny_turn, tmp_path):
    """``loop --wise 0.5`` on a finished turn's work folder: no new training, the candidate is the fine-tune
    merged half way with the base (models/weight_merge.py), built and scored under its own name."""
    work = tmp_path / "turn"
    shutil.copytree(tiny_turn.work, work)
    proc = subprocess.run(
        [sys.executable, "-m", "models", "loop", "--camera", "cam", "--current", str(tiny_turn.current), "--work",
         str(work), "--samples", str(tiny_turn.samples), "--teacher-imgsz", "320", "--base", str(TRAINABLE),
         "--epochs", "1", "--batch", "4", "--val-share", "0.25", "--labels", str(PERSONS_EVAL / "labels.json"),
         "--wise", "0.5"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode in (0, 1), proc.stderr[-3000:]
    assert "| candidate (candidate-wise0.5-96x96-int8.onnx) |" in proc.stdout
    doc = json.loads((work / "eval.json").read_text())
    assert "finetune" not in doc["seconds"] and {"merge", "build"} <= set(doc["seconds"])
    from ultralytics.nn.tasks import torch_safe_load

    ckpt, _ = torch_safe_load(str(work / "candidate-wise0.5.pt"))
    assert ckpt["wise_ft"]["alpha"] == 0.5 and ckpt["wise_ft"]["tuned"] == str(work / "candidate.pt")


def refused_at_once(tmp_path: Path, *flags: str) -> str:
    """``smartcam-model loop`` with ``flags`` must fail before it touches ``--work``; returns its stderr."""
    work = tmp_path / "turn"
    proc = subprocess.run(
        [sys.executable, "-m", "models", "loop", "--camera", "cam", "--current", str(ONNX_FP32), "--work",
         str(work), "--samples", str(tmp_path / "no-samples"), *flags],
        cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert not work.exists()
    return proc.stderr


def test_a_bad_wise_alpha_is_refused_before_any_work(tmp_path):
    """``--wise 2`` is an error the user sees at once, not after the labeling and the fine-tune."""
    assert "alpha must be between 0 (the base) and 1 (the fine-tune), got 2.0" in refused_at_once(tmp_path,
                                                                                                  "--wise", "2")


@pytest.mark.slow
def test_both_recipes_train_and_the_better_one_on_the_camera_slice_goes_to_the_gate(tiny_turn, tmp_path):
    """``loop --recipe both``: the head-only and the whole-network recipe (merged at 0.5) are each fine-tuned and
    built, scored on the camera's held-out slice, and the one with the higher AP50 is the candidate the gate
    judges (the real path at a tiny size: 1 epoch each at 96, the turn's own dataset as the general frames)."""
    work = tmp_path / "turn"
    shutil.copytree(tiny_turn.work, work)
    proc = subprocess.run(
        [sys.executable, "-m", "models", "loop", "--camera", "cam", "--current", str(tiny_turn.current), "--work",
         str(work), "--samples", str(tiny_turn.samples), "--teacher-imgsz", "320", "--base", str(TRAINABLE),
         "--recipe", "both", "--general", str(work / "dataset" / "data.yaml"), "--epochs", "1", "--batch", "4",
         "--val-share", "0.25", "--labels", str(PERSONS_EVAL / "labels.json")],
        cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode in (0, 1), proc.stderr[-3000:]
    doc = json.loads((work / "eval.json").read_text())
    tried = doc["recipes"]
    assert set(tried) == {"head", "whole"}
    assert tried["head"]["freeze"] == 22 and tried["head"]["wise"] is None
    assert tried["whole"]["freeze"] == 0 and tried["whole"]["general_share"] == 0.3 and tried["whole"]["wise"] == 0.5
    assert tried["head"]["epochs"] == tried["whole"]["epochs"] == 1  # --epochs overrides every recipe tried
    chosen = doc["recipe"]
    assert tried[chosen]["camera_ap50"] == max(t["camera_ap50"] for t in tried.values())
    assert f"| candidate ({Path(tried[chosen]['candidate']).name}) |" in proc.stdout
    assert "recipes tried (camera slice AP50): head " in proc.stdout and f"{chosen} " in proc.stdout
    assert {"finetune head", "finetune whole", "merge whole", "build head", "build whole", "choose"} <= set(
        doc["seconds"])
    from ultralytics.nn.tasks import torch_safe_load

    ckpt, _ = torch_safe_load(str(work / "candidate-whole-wise0.5.pt"))
    assert ckpt["wise_ft"]["alpha"] == 0.5 and ckpt["wise_ft"]["tuned"] == str(work / "candidate-whole.pt")


def test_a_recipe_that_mixes_general_frames_is_refused_without_them_before_any_work(tmp_path):
    """``--recipe whole`` trains on 30 % general frames: without ``--general`` that is a one-line error at once."""
    assert "recipe whole mixes 30 % general frames into training: give it --general DATA.yaml" in refused_at_once(
        tmp_path, "--recipe", "whole")

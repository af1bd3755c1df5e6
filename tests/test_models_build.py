"""Model build: fp32 resize/slim surgery, calibration sampling, INT8 builds from ONNX and .pt, clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from camera.detections import iou_matrix
from camera.detector import Detector, ModelError, preprocess
from models.build import build_model
from models.calibration import CalibrationError, sample_frames
from models.cli import main
from models.evaluate import load_labels
from models.head import decode_nodes, fast_dfl, make_anchors, retarget, slim_classes
from tests.conftest import (
    INDOOR_CLIP,
    NEGATIVE_CLIP,
    ONNX_FP32,
    PERSONS_EVAL,
    PLAZA_CLIP,
    PT_WEIGHTS,
    STREET_CLIP,
)

LABELED = "MOT17-11-FRCNN_000004.jpg"  # four large, fully visible people


def _labels_subset(
    tmp_path, names=(LABELED, "MOT17-05-FRCNN_000003.jpg", "MOT17-02-FRCNN_000001.jpg")
) -> str:
    """A 3-image labels.json (absolute image paths) to keep evaluation in tests short."""
    records = [
        r
        for r in json.loads((PERSONS_EVAL / "labels.json").read_text())
        if r["image"].split("/")[-1] in names
    ]
    for r in records:
        r["image"] = str(PERSONS_EVAL / r["image"])
    path = tmp_path / "labels-subset.json"
    path.write_text(json.dumps(records))
    return str(path)


def _labeled_image():
    item = next(i for i in load_labels(PERSONS_EVAL / "labels.json") if i.path.name == LABELED)
    return cv2.imread(str(item.path)), item


def assert_finds_the_people(model_path) -> None:
    """Every clearly visible, large person in the labeled image is detected (IoU >= 0.5)."""
    image, item = _labeled_image()
    dets = Detector(model_path, threads=1)(image)
    big = (item.visibility >= 0.5) & (item.boxes[:, 3] - item.boxes[:, 1] >= image.shape[0] / 4)
    assert big.sum() >= 3
    assert len(dets) > 0
    assert (iou_matrix(item.boxes[big], dets.xyxy).max(axis=1) >= 0.5).all()


def _run(model_path, image_bgr, imgsz):
    blob, _, _ = preprocess(image_bgr, imgsz)
    sess = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: blob})[0][0]


# ---- graph surgery ----------------------------------------------------------------------------------------------
def test_make_anchors_matches_ultralytics():
    import torch
    from ultralytics.utils.tal import make_anchors as ul_make_anchors

    feats = [torch.zeros(1, 1, 384 // s, 640 // s) for s in (8, 16, 32)]
    points, strides = ul_make_anchors(feats, torch.tensor([8.0, 16.0, 32.0]), 0.5)
    ours_points, ours_strides = make_anchors((384, 640))
    assert np.array_equal(ours_points, points.numpy().T)
    assert np.array_equal(ours_strides, strides.numpy().ravel())


@pytest.mark.slow
def test_retarget_and_slim_preserve_the_network(tmp_path):
    image = cv2.imread(str(PERSONS_EVAL / "images" / LABELED))
    full = onnx.load(ONNX_FP32)
    m320 = retarget(full, (320, 320))
    onnx.save(m320, tmp_path / "r320.onnx")
    out = _run(tmp_path / "r320.onnx", image, (320, 320))
    assert out.shape == (84, 2100)
    det = Detector(tmp_path / "r320.onnx")
    assert det.imgsz == (320, 320) and det.names[0] == "person"
    slim = slim_classes(m320, ["person"])
    onnx.save(slim, tmp_path / "slim.onnx")
    slim_out = _run(tmp_path / "slim.onnx", image, (320, 320))
    assert slim_out.shape == (5, 2100)
    assert np.allclose(slim_out, out[:5], atol=1e-5)  # same boxes, same person scores
    assert Detector(tmp_path / "slim.onnx").names == {0: "person"}
    wide = retarget(full, (384, 640))
    onnx.save(wide, tmp_path / "wide.onnx")
    assert _run(tmp_path / "wide.onnx", image, (384, 640)).shape == (84, 5040)
    with pytest.raises(ModelError, match="multiple of 32"):
        retarget(full, (300, 300))
    with pytest.raises(ModelError, match="no class 'unicorn'"):
        slim_classes(m320, ["unicorn"])


@pytest.mark.slow
def test_decode_nodes_are_the_float_tail():
    for model in (onnx.load(ONNX_FP32), fast_dfl(onnx.load(ONNX_FP32))):
        decode, convs = decode_nodes(model)
        assert len(convs) == 6  # three box and three class branch convolutions
        assert any("dfl" in n for n in decode) and all("cv2" not in n and "cv3" not in n for n in decode)


@pytest.mark.slow
def test_fast_dfl_is_the_same_head_with_a_last_axis_softmax(tmp_path):
    image = cv2.imread(str(PERSONS_EVAL / "images" / LABELED))
    wide = retarget(onnx.load(ONNX_FP32), (384, 640))
    fast = fast_dfl(wide)
    softmax = [n for n in fast.graph.node if n.op_type == "Softmax"]
    assert len(softmax) == 1 and softmax[0].attribute[0].i == -1
    assert not any(n.op_type == "Conv" and "dfl" in n.name for n in fast.graph.node)
    assert fast_dfl(fast) is fast  # nothing left to rewrite
    onnx.save(wide, tmp_path / "wide.onnx")
    onnx.save(fast, tmp_path / "fast.onnx")
    before, after = _run(tmp_path / "wide.onnx", image, (384, 640)), _run(tmp_path / "fast.onnx", image, (384, 640))
    assert after.shape == before.shape == (84, 5040)
    assert np.allclose(after, before, atol=1e-3)  # box pixels and scores: the same expectation, summed in another order


# ---- calibration sampling ---------------------------------------------------------------------------------------
def test_calibration_frames_are_spread_over_every_source():
    frames = sample_frames([INDOOR_CLIP, STREET_CLIP, PLAZA_CLIP], 9)
    by_source: dict[str, list[int]] = {}
    for ref, image in frames:
        by_source.setdefault(ref.source, []).append(ref.index)
        assert image.ndim == 3
    assert len(by_source) == 3 and all(len(v) == 3 for v in by_source.values())
    street = sorted(by_source[str(STREET_CLIP)])
    count = int(cv2.VideoCapture(str(STREET_CLIP)).get(cv2.CAP_PROP_FRAME_COUNT))
    assert street[0] > 0 and street[-1] > count / 2  # not just the first seconds
    boxed = sample_frames([PERSONS_EVAL / "images"], 2, (320, 320))
    assert len(boxed) == 2 and all(img.shape == (320, 320, 3) for _, img in boxed)


def test_empty_calibration_set_is_a_clear_error(tmp_path):
    with pytest.raises(CalibrationError, match="empty calibration set"):
        sample_frames([tmp_path], 16)
    with pytest.raises(CalibrationError, match="not found"):
        sample_frames([tmp_path / "nope.mp4"], 16)
    with pytest.raises(CalibrationError, match="empty calibration set"):
        sample_frames([INDOOR_CLIP], 0)
    (tmp_path / "junk.jpg").write_bytes(b"not an image")
    with pytest.raises(CalibrationError, match="no readable frames"):
        sample_frames([tmp_path], 4)


# ---- INT8 builds ------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_build_person_model_from_onnx_with_measurements(tmp_path):
    out = tmp_path / "person-320-int8.onnx"
    result = build_model(
        ONNX_FP32,
        (320, 320),
        [INDOOR_CLIP, STREET_CLIP, PLAZA_CLIP, NEGATIVE_CLIP],
        out,
        calib_frames=16,
        keep_classes=["person"],
        fp32_out=tmp_path / "person-320-fp32.onnx",
        labels=_labels_subset(tmp_path),
        latency_runs=2,
        progress=False,
    )
    assert result.model_path == out and out.is_file()
    model = onnx.load(out)
    ops = {n.op_type for n in model.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    # the head's final concat (box pixels + scores) is computed in float, not fed by a dequantized tensor
    producers = {o: n for n in model.graph.node for o in n.output}
    final = producers[model.graph.output[0].name]
    assert final.op_type == "Concat"
    assert all(producers[i].op_type != "DequantizeLinear" for i in final.input)
    det = Detector(out)
    assert det.names == {0: "person"} and det.imgsz == (320, 320)
    manifest = json.loads(out.with_suffix(".json").read_text())
    assert manifest == det.manifest
    assert manifest["sha256"] == det.sha256 and manifest["precision"] == "int8"
    assert manifest["source"]["sha256"] == Detector(ONNX_FP32).sha256
    assert manifest["calibration"]["frames"] == 16 and len(manifest["calibration"]["frame_refs"]) == 16
    assert len({r["source"] for r in manifest["calibration"]["frame_refs"]}) == 4
    # auto: 16 frames are too few for the percentile tail, so MinMax
    assert manifest["quantization"]["method"] == "minmax" and manifest["quantization"]["types"] == "u8s8"
    res = manifest["results"]
    assert 0.3 < res["persons_eval"]["ap50"] <= 1 and 0.3 < res["fp32_reference"]["persons_eval"]["ap50"] <= 1
    assert set(res["latency_ms"]) >= {"1"} and set(res["infer_ms"]) >= {"1"}
    assert res["speedup_vs_fp32"]["infer"]["1"] > 0 and res["speedup_vs_fp32"]["detect"]["1"] > 0
    assert json.loads((tmp_path / "person-320-fp32.json").read_text())["precision"] == "fp32"
    assert_finds_the_people(out)
    # any batch size (several cameras' frames in one run, camera/fair_scheduler.py), the fp32 twin too
    assert det.dynamic_batch and manifest["batch"] == "batch" and Detector(tmp_path / "person-320-fp32.onnx").dynamic_batch
    # ... and that twin, a dynamic-batch fp32 ONNX, builds again; --static-batch gives a fixed batch of 1
    again = tmp_path / "again-320-int8.onnx"
    assert main(["build", "--weights", str(tmp_path / "person-320-fp32.onnx"), "--imgsz", "320", "--calib",
                 str(INDOOR_CLIP), str(STREET_CLIP), str(PLAZA_CLIP), "--calib-frames", "16", "--out", str(again), "--static-batch", "--no-eval",
                 "--latency-runs", "0", "--quiet"]) == 0
    assert not Detector(again).dynamic_batch and json.loads(again.with_suffix(".json").read_text())["batch"] == 1
    assert_finds_the_people(again)


@pytest.mark.slow
def test_build_from_pt_checkpoint(tmp_path):
    """The .pt goes through ultralytics' exporter (in a private folder: nothing is written beside it) and agrees
    with the fp32 ONNX resized by graph surgery."""
    before = sorted(p.name for p in PT_WEIGHTS.parent.iterdir())
    out = tmp_path / "pt-320-int8.onnx"
    build_model(
        PT_WEIGHTS, (320, 320), [INDOOR_CLIP, STREET_CLIP], out, calib_frames=8,
        fp32_out=tmp_path / "pt-320-fp32.onnx", latency_runs=0, progress=False,
    )  # fmt: skip
    assert sorted(p.name for p in PT_WEIGHTS.parent.iterdir()) == before
    det = Detector(out)
    assert det.imgsz == (320, 320) and det.names[0] == "person" and len(det.names) == 80
    assert_finds_the_people(out)
    image = cv2.imread(str(PERSONS_EVAL / "images" / LABELED))
    exported = _run(tmp_path / "pt-320-fp32.onnx", image, (320, 320))
    onnx.save(retarget(onnx.load(ONNX_FP32), (320, 320)), tmp_path / "r320.onnx")
    resized = _run(tmp_path / "r320.onnx", image, (320, 320))
    confident = exported[4:].max(axis=0) > 0.25
    assert confident.sum() > 5
    assert np.abs(exported[:4, confident] - resized[:4, confident]).max() < 1.0
    assert np.abs(exported[4:] - resized[4:]).max() < 0.02


@pytest.mark.slow
def test_int8_model_320_fixture(int8_model_320):
    det = Detector(int8_model_320)
    assert det.imgsz == (320, 320) and det.manifest["precision"] == "int8"
    assert_finds_the_people(int8_model_320)


# ---- errors -----------------------------------------------------------------------------------------------------
def _layout_model(path, output_shape, names):
    inp = helper.make_tensor_value_info("images", TensorProto.FLOAT, [1, 3, 64, 64])
    out = helper.make_tensor_value_info("output0", TensorProto.FLOAT, list(output_shape))
    nodes = [
        helper.make_node("ReduceMean", ["images"], ["m"], keepdims=0),
        helper.make_node("Add", ["const", "m"], ["output0"]),
    ]
    const = numpy_helper.from_array(np.zeros(output_shape, np.float32), "const")
    model = helper.make_model(
        helper.make_graph(nodes, "g", [inp], [out], [const]), opset_imports=[helper.make_opsetid("", 17)]
    )
    model.metadata_props.add(key="names", value=repr(names))
    onnx.save(model, path)
    return path


def test_bad_weights_are_clear_errors(tmp_path):
    calib = [INDOOR_CLIP]
    with pytest.raises(ModelError, match="not found"):
        build_model(tmp_path / "missing.onnx", (320, 320), calib, tmp_path / "o.onnx", progress=False)
    corrupt = tmp_path / "corrupt.onnx"
    corrupt.write_bytes(b"\x00garbage" * 100)
    with pytest.raises(ModelError, match="corrupt ONNX"):
        build_model(corrupt, (320, 320), calib, tmp_path / "o.onnx", progress=False)
    seg = _layout_model(tmp_path / "seg.onnx", (1, 116, 21), {i: str(i) for i in range(80)})
    with pytest.raises(ModelError, match="unsupported model layout"):
        build_model(seg, (64, 64), calib, tmp_path / "o.onnx", progress=False)
    with pytest.raises(ModelError, match="unsupported weights"):
        build_model(tmp_path / "model.tflite", (320, 320), calib, tmp_path / "o.onnx", progress=False)
    assert not (tmp_path / "o.onnx").exists()


@pytest.mark.slow
def test_bad_pt_checkpoints_are_clear_errors(tmp_path):
    with pytest.raises(ModelError, match="checkpoint not found"):
        build_model(tmp_path / "gone.pt", (320, 320), [INDOOR_CLIP], tmp_path / "o.onnx", progress=False)
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"not a torch checkpoint" * 10)
    with pytest.raises(ModelError, match="cannot load checkpoint"):
        build_model(corrupt, (320, 320), [INDOOR_CLIP], tmp_path / "o.onnx", progress=False)


def test_empty_calibration_build_fails_before_writing(tmp_path):
    with pytest.raises(CalibrationError):
        build_model(ONNX_FP32, (320, 320), [tmp_path], tmp_path / "o.onnx", progress=False)
    assert not (tmp_path / "o.onnx").exists()


def test_cli_errors_are_one_line(tmp_path, capsys):
    code = main(["build", "--weights", str(tmp_path / "x.pt"), "--calib", str(INDOOR_CLIP), "--quiet"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("smartcam-model build: error:") and "\n" not in err
    code = main(
        ["eval", "--model", str(tmp_path / "none.onnx"), "--labels", str(PERSONS_EVAL / "labels.json")]
    )
    err = capsys.readouterr().err.strip()
    assert code == 2 and "model file not found" in err and "\n" not in err
    with pytest.raises(SystemExit):
        main(["build", "--weights", "w.onnx", "--imgsz", "300", "--calib", "x"])


@pytest.mark.slow
def test_cli_eval_side_by_side_json(int8_model_320, capsys, tmp_path):
    labels = _labels_subset(tmp_path)
    args = ["eval", "--model", str(ONNX_FP32), "--model", str(int8_model_320), "--labels", labels]
    code = main([*args, "--json", "--runs", "2", "--quiet"])
    assert code == 0
    report = json.loads(capsys.readouterr().out)
    rows = {r["model"]: r for r in report["models"]}
    assert set(rows) == {ONNX_FP32.name, int8_model_320.name}
    fp32, int8 = rows[ONNX_FP32.name], rows[int8_model_320.name]
    assert fp32["imgsz"] == [640, 640] and int8["imgsz"] == [320, 320]
    assert fp32["ap50"] > int8["ap50"] > 0.3  # 640 sees the small pedestrians that 320 misses
    assert fp32["gt"] == int8["gt"] > 20
    assert set(fp32["latency_ms"]) == set(int8["infer_ms"]) == {str(n) for n in report["threads"]}
    code = main(["eval", "--model", str(int8_model_320), "--labels", labels, "--runs", "0", "--quiet"])
    table = capsys.readouterr().out
    assert code == 0 and table.startswith("| model |") and int8_model_320.name in table
    code = main(
        [
            "eval",
            "--model",
            str(int8_model_320),
            "--labels",
            labels,
            "--runs",
            "1",
            "--threads",
            "1",
            "--quiet",
        ]
    )
    lines = capsys.readouterr().out.strip().splitlines()
    assert code == 0 and len(lines) == 3
    assert lines[0].count("|") == lines[2].count("|") == 10  # model, imgsz, 4 scores, infer, detect, MB
    assert "infer ms 1T" in lines[0] and "detect ms 1T" in lines[0] and " - " not in lines[2]


# ---- inputs and outputs checked before the work; a failed build changes nothing (issue 12) -------------------
def test_imgsz_is_bounded_and_a_multiple_of_32():
    import argparse

    from models.cli import parse_imgsz

    assert parse_imgsz("32") == (32, 32) and parse_imgsz("1920x1088") == (1920, 1088)
    for bad in ("100000", "1952", "16", "320x0", "300"):
        with pytest.raises(argparse.ArgumentTypeError):
            parse_imgsz(bad)
    with pytest.raises(ModelError, match="imgsz"):  # the library call is bounded too, not only the flag
        build_model(ONNX_FP32, (100000, 100000), [INDOOR_CLIP], "o.onnx", progress=False)


@pytest.mark.parametrize("which", ["out", "fp32_out"])
def test_an_unwritable_output_fails_before_the_work(tmp_path, monkeypatch, which):
    """/proc refuses new files even to root: the build says so at once, not after minutes of export and
    calibration (a tripwire on the export, the first step of the work, proves the order)."""
    import models.build

    def tripwire(*args, **kwargs):
        raise AssertionError("the build started its work before refusing an unwritable output")

    monkeypatch.setattr(models.build, "fp32_model", tripwire)
    outs = {"out": tmp_path / "o.onnx", "fp32_out": tmp_path / "o-fp32.onnx", which: "/proc/smartcam-x.onnx"}
    with pytest.raises(ModelError, match=r"cannot write .*/proc/smartcam-x"):
        build_model(ONNX_FP32, (64, 64), [INDOOR_CLIP], outs["out"], fp32_out=outs["fp32_out"], calib_frames=2,
                    latency_runs=0, progress=False)
    assert not list(tmp_path.iterdir())


def test_cli_unwritable_out_is_one_line(capsys):
    code = main(["build", "--weights", str(ONNX_FP32), "--imgsz", "64", "--calib", str(INDOOR_CLIP),
                 "--out", "/proc/smartcam-x.onnx", "--quiet", "--no-eval", "--latency-runs", "0"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "cannot write" in err and "\n" not in err


@pytest.mark.slow
def test_a_build_that_fails_late_keeps_the_good_model_and_its_manifest(tmp_path):
    """The measurement step fails (a labeled image is missing) after quantization: the model and manifest
    already at --out stay as they were, and no temporary file is left beside them."""
    out = tmp_path / "good-int8.onnx"
    out.write_bytes(b"the good model")
    out.with_suffix(".json").write_text('{"good": true}')
    labels = json.loads(Path(_labels_subset(tmp_path)).read_text())
    labels[0]["image"] = str(tmp_path / "gone.jpg")
    (tmp_path / "labels-subset.json").write_text(json.dumps(labels))
    with pytest.raises(ValueError, match="cannot read image"):
        build_model(ONNX_FP32, (64, 64), [INDOOR_CLIP], out, calib_frames=2, labels=str(tmp_path / "labels-subset.json"),
                    latency_runs=0, progress=False)
    assert out.read_bytes() == b"the good model"
    assert out.with_suffix(".json").read_text() == '{"good": true}'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["good-int8.json", "good-int8.onnx", "labels-subset.json"]

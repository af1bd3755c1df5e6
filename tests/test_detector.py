"""Detector: letterbox/decode/NMS units, agreement with Ultralytics on real weights, clear model errors."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import cv2
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from camera.detector import (
    Detector,
    ModelError,
    detect_images,
    fitted_imgsz,
    letterbox,
    nms,
    padding_share,
    preprocess,
)
from tests.conftest import INDOOR_CLIP, NEGATIVE_CLIP, ONNX_FP32, PERSONS_EVAL, PT_WEIGHTS

EVAL_IMAGES = [
    PERSONS_EVAL / "images" / name
    for name in ("MOT17-02-FRCNN_000001.jpg", "MOT17-05-FRCNN_000003.jpg", "MOT17-11-FRCNN_000004.jpg")
]


def _video_frame(path: Path, index: int = 0) -> np.ndarray:
    cap = cv2.VideoCapture(str(path))
    cap.set(cv2.CAP_PROP_POS_FRAMES, index)
    ok, frame = cap.read()
    cap.release()
    assert ok, f"cannot read frame {index} of {path}"
    return frame


def _const_model(path: Path, output: np.ndarray, *, imgsz: int = 64, meta: dict | None = None) -> Path:
    """A tiny ONNX whose output is a fixed prediction tensor (hand-made decode cases, layout errors)."""
    inp = helper.make_tensor_value_info("images", TensorProto.FLOAT, [1, 3, imgsz, imgsz])
    out = helper.make_tensor_value_info("output0", TensorProto.FLOAT, list(output.shape))
    # output = const + 0 * mean(images): depends on the input so no runtime prunes it away
    nodes = [
        helper.make_node("ReduceMean", ["images"], ["m"], keepdims=0),
        helper.make_node("Mul", ["m", "zero"], ["z"]),
        helper.make_node("Add", ["const", "z"], ["output0"]),
    ]
    inits = [
        numpy_helper.from_array(output.astype(np.float32), "const"),
        numpy_helper.from_array(np.zeros((), np.float32), "zero"),
    ]
    graph = helper.make_graph(nodes, "const", [inp], [out], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    for k, v in (meta or {}).items():
        model.metadata_props.add(key=k, value=v)
    onnx.save(model, path)
    return path


def _pred(rows: list[tuple[float, float, float, float, list[float]]], nc: int, n: int = 20) -> np.ndarray:
    """Build a 1x(4+nc)xN prediction from (cx, cy, w, h, class scores) rows; the other anchors score 0."""
    pred = np.zeros((1, 4 + nc, n), np.float32)
    pred[0, :4, :] = 1.0
    for i, (cx, cy, w, h, scores) in enumerate(rows):
        pred[0, :4, i] = (cx, cy, w, h)
        pred[0, 4 : 4 + len(scores), i] = scores
    return pred


# ---- letterbox / preprocess ---------------------------------------------------------------------------------
@pytest.mark.parametrize("hw", [(1080, 1920), (280, 500), (240, 320), (640, 640), (1000, 3), (37, 801)])
def test_letterbox_is_ultralytics_identical(hw):
    from ultralytics.data.augment import LetterBox

    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, (*hw, 3), dtype=np.uint8)
    for shape in [(640, 640), (320, 320), (480, 640)]:
        ours, ratio, (padw, padh) = letterbox(image, shape)
        theirs = LetterBox(new_shape=shape, auto=False)(image=image.copy())
        assert ours.shape == theirs.shape == (*shape, 3)
        assert np.array_equal(ours, theirs)
        assert ratio == pytest.approx(min(shape[0] / hw[0], shape[1] / hw[1]))
        assert padw >= 0 and padh >= 0


@pytest.mark.parametrize("hw", [(720, 1280), (1080, 1920), (280, 500), (480, 640), (1280, 720), (240, 320)])
@pytest.mark.parametrize("long_side", [320, 640])
def test_fitted_imgsz_is_ultralytics_rect_shape(hw, long_side):
    """The shape Ultralytics' own predict letterboxes a .pt input to (auto=True, stride 32)."""
    from ultralytics.data.augment import LetterBox

    image = np.zeros((*hw, 3), np.uint8)
    theirs = LetterBox(new_shape=(long_side, long_side), auto=True, stride=32)(image=image)
    assert fitted_imgsz((hw[1], hw[0]), long_side) == theirs.shape[:2]


def test_padding_share():
    assert padding_share((1280, 720), (640, 640)) == pytest.approx(0.4375)
    assert padding_share((1280, 720), (384, 640)) == pytest.approx(1 - 360 / 384)
    assert padding_share((640, 640), (640, 640)) == 0


def test_letterbox_pads_centred_with_grey():
    image = np.zeros((100, 200, 3), np.uint8)  # wide: padded top and bottom
    out, ratio, (padw, padh) = letterbox(image, (64, 64))
    assert ratio == pytest.approx(0.32)
    assert padw == 0 and padh == 16
    assert (out[:16] == 114).all() and (out[-16:] == 114).all() and (out[16:-16] == 0).all()


def test_preprocess_is_rgb_nchw_unit_range():
    image = np.zeros((64, 64, 3), np.uint8)
    image[..., 0] = 255  # blue in BGR
    blob, ratio, pad = preprocess(image, (32, 32))
    assert blob.shape == (1, 3, 32, 32) and blob.dtype == np.float32
    assert ratio == 0.5 and pad == (0.0, 0.0)
    assert np.allclose(blob[0, 2], 1.0) and np.allclose(blob[0, :2], 0.0)  # blue lands in the last (B) plane


def test_preprocess_rejects_non_bgr():
    with pytest.raises(ValueError, match="HxWx3"):
        preprocess(np.zeros((10, 10), np.uint8), (32, 32))


# ---- NMS and decode ------------------------------------------------------------------------------------------
def test_nms_suppresses_overlaps_and_keeps_order():
    boxes = np.array([[0, 0, 10, 10], [1, 1, 10, 10], [20, 20, 30, 30], [0, 0, 10, 10.5]], np.float32)
    scores = np.array([0.9, 0.8, 0.7, 0.95], np.float32)
    assert nms(boxes, scores, 0.5).tolist() == [3, 2]
    assert nms(boxes, scores, 0.99).tolist() == [3, 0, 1, 2]  # IoU 0.81 boxes survive a high threshold


def test_decode_hand_made_prediction(tmp_path):
    names = {0: "person", 1: "car"}
    rows = [
        (32, 32, 10, 20, [0.9, 0.1]),  # person
        (33, 32, 10, 20, [0.8, 0.0]),  # duplicate of it -> suppressed
        (10, 10, 4, 4, [0.2, 0.0]),  # below conf
        (50, 50, 8, 8, [0.6, 0.7]),  # best class is car -> not a person (Ultralytics semantics)
        (50, 20, 6, 6, [0.0, 0.5]),  # car
    ]
    path = _const_model(tmp_path / "m.onnx", _pred(rows, 2), meta={"names": repr(names), "imgsz": "[64, 64]"})
    det = Detector(path, conf=0.25, iou=0.45)
    image = np.zeros((128, 256, 3), np.uint8)  # ratio 0.25, pad top 16
    d = det(image)
    assert len(d) == 1 and d.class_id.tolist() == [0]
    assert d.confidence[0] == pytest.approx(0.9)
    assert d.xyxy[0] == pytest.approx([108, 24, 148, 104])  # (27..37, 22..42) -> unpadded, /0.25
    both = Detector(path, conf=0.25, iou=0.45, classes=("person", "car"))(image)
    assert sorted(both.class_id.tolist()) == [0, 1, 1]
    assert both.confidence.tolist() == sorted(both.confidence.tolist(), reverse=True)
    assert Detector(path, conf=0.25, classes=None, max_det=2)(image).confidence.tolist() == pytest.approx(
        [0.9, 0.7]
    )


def test_decode_accepts_transposed_layout_and_clips(tmp_path):
    rows = [(2, 32, 10, 20, [0.9])]  # sticks out of the left edge
    pred = _pred(rows, 1).transpose(0, 2, 1).copy()  # 1 x N x (4+nc)
    path = _const_model(tmp_path / "t.onnx", pred, meta={"names": "{0: 'person'}"})
    d = Detector(path)(np.zeros((64, 64, 3), np.uint8))
    assert len(d) == 1 and d.xyxy[0] == pytest.approx([0, 22, 7, 42])


def test_model_without_metadata_uses_input_shape(tmp_path):
    path = _const_model(tmp_path / "plain.onnx", _pred([(16, 16, 4, 4, [0.0, 0.0, 0.9])], 3), imgsz=32)
    det = Detector(path, classes=None)
    assert det.imgsz == (32, 32) and det.names == {0: "class0", 1: "class1", 2: "class2"}
    assert det(np.zeros((32, 32, 3), np.uint8)).class_id.tolist() == [2]


# ---- errors ---------------------------------------------------------------------------------------------------
def test_missing_model_is_a_clear_error(tmp_path):
    with pytest.raises(ModelError, match="not found"):
        Detector(tmp_path / "nope.onnx")


def test_corrupt_model_is_a_one_line_error(tmp_path):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"this is not a protobuf" * 50)
    with pytest.raises(ModelError, match="cannot load model") as info:
        Detector(bad)
    assert "\n" not in str(info.value)


def test_unsupported_layout_is_a_clear_error(tmp_path):
    names = repr({i: f"c{i}" for i in range(80)})
    path = _const_model(tmp_path / "seg.onnx", np.zeros((1, 116, 20), np.float32), meta={"names": names})
    with pytest.raises(ModelError, match="unsupported model layout"):
        Detector(path)
    e2e = _const_model(tmp_path / "e2e.onnx", np.zeros((1, 300, 6), np.float32), meta={"end2end": "True"})
    with pytest.raises(ModelError, match="end-to-end"):
        Detector(e2e)


def test_unknown_class_is_a_clear_error(tmp_path):
    path = _const_model(tmp_path / "m.onnx", _pred([], 1), meta={"names": "{0: 'person'}"})
    with pytest.raises(ModelError, match="no class 'dog'"):
        Detector(path, classes=("dog",))


# ---- real weights --------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_metadata_hash_and_manifest(tmp_path):
    det = Detector(ONNX_FP32, threads=1)
    assert det.name == "yolov8n-coco" and det.imgsz == (640, 640)
    assert det.names[0] == "person" and len(det.names) == 80
    assert det.sha256 == hashlib.sha256(ONNX_FP32.read_bytes()).hexdigest()
    assert det.manifest is None
    model = tmp_path / "m.onnx"
    model.write_bytes(ONNX_FP32.read_bytes())
    (tmp_path / "m.json").write_text(json.dumps({"imgsz": [640, 640], "ap50": 0.5}))
    assert Detector(model).manifest == {"imgsz": [640, 640], "ap50": 0.5}


def _assert_agrees(
    ours, theirs_xyxy: np.ndarray, theirs_conf: np.ndarray, *, borderline: float = 0.0
) -> None:
    """Same count and boxes within 2 px. With ``borderline`` > 0 a detection whose score is that close to the
    threshold may be present on one side only (fp32 PyTorch and onnxruntime round differently)."""
    ours_keep = np.abs(ours.confidence - 0.25) >= borderline
    theirs_keep = np.abs(theirs_conf - 0.25) >= borderline
    o_xyxy, o_conf = ours.xyxy[ours_keep], ours.confidence[ours_keep]
    t_xyxy, t_conf = theirs_xyxy[theirs_keep], theirs_conf[theirs_keep]
    assert len(o_xyxy) == len(t_xyxy)
    assert len(ours) - len(o_xyxy) <= 1 and len(theirs_xyxy) - len(t_xyxy) <= 1
    order_o, order_t = np.argsort(-o_conf), np.argsort(-t_conf)
    assert np.abs(o_xyxy[order_o] - t_xyxy[order_t]).max(initial=0) <= 2.0
    assert np.abs(o_conf[order_o] - t_conf[order_t]).max(initial=0) <= 0.01


@pytest.mark.slow
@pytest.mark.parametrize("weights", [ONNX_FP32, PT_WEIGHTS], ids=["onnx", "pt"])
def test_agrees_with_ultralytics_predict(weights):
    """Same fp32 weights through Ultralytics' own predict. The ONNX goes through the same runtime: exact count.
    For the .pt, ``rect=False`` makes Ultralytics use the same fixed 640x640 letterbox as an ONNX model
    (otherwise it pads to the minimum stride rectangle); scores within 0.01 of the threshold may flip."""
    from ultralytics import YOLO

    det = Detector(ONNX_FP32, conf=0.25, iou=0.45)
    yolo = YOLO(str(weights), task="detect")
    images = [cv2.imread(str(p)) for p in EVAL_IMAGES] + [_video_frame(INDOOR_CLIP, 100)]
    total = 0
    for image in images:
        ours = det(image)
        r = yolo.predict(image, imgsz=640, conf=0.25, iou=0.45, classes=[0], rect=False, verbose=False)[0]
        borderline = 0.0 if weights == ONNX_FP32 else 0.01
        _assert_agrees(ours, r.boxes.xyxy.numpy(), r.boxes.conf.numpy(), borderline=borderline)
        assert set(ours.class_id.tolist()) <= {0}
        total += len(ours)
    assert total >= 10  # real people were found, not an empty agreement


@pytest.mark.slow
def test_transposed_real_model_gives_same_detections(tmp_path):
    model = onnx.load(ONNX_FP32)
    out = model.graph.output[0]
    old = out.name
    for node in model.graph.node:
        node.output[:] = [f"{o}_cf" if o == old else o for o in node.output]
    model.graph.node.append(helper.make_node("Transpose", [f"{old}_cf"], [old], perm=[0, 2, 1]))
    out.type.tensor_type.shape.dim[1].dim_value, out.type.tensor_type.shape.dim[2].dim_value = 8400, 84
    path = tmp_path / "transposed.onnx"
    onnx.save(model, path)
    image = cv2.imread(str(EVAL_IMAGES[0]))
    a, b = Detector(ONNX_FP32)(image), Detector(path)(image)
    assert len(a) == len(b) > 0
    assert np.allclose(a.xyxy, b.xyxy, atol=1e-3)


@pytest.mark.slow
def test_negative_clip_has_almost_no_person():
    """Cars only: persons at most on an isolated frame (yolov8n scores a partly visible car 0.28 on frame 900:
    the tracker's min-hits must absorb it), while the same model does find the cars."""
    det = Detector(ONNX_FP32, threads=1)
    cars = Detector(ONNX_FP32, classes=("car",), threads=1)
    cap = cv2.VideoCapture(str(NEGATIVE_CLIP))
    frames, index = [], 0
    while True:
        ok, frame = cap.read()
        if not ok:
            break
        if index % 120 == 0:
            frames.append(frame)
        index += 1
    cap.release()
    assert len(frames) >= 14
    assert sum(len(det(f)) > 0 for f in frames) <= 1
    assert sum(len(cars(f)) > 0 for f in frames) >= len(frames) // 2


@pytest.mark.slow
def test_detect_images_json(tmp_path):
    unreadable = tmp_path / "broken.jpg"
    unreadable.write_bytes(b"not an image")
    result = detect_images([EVAL_IMAGES[0]], ONNX_FP32, threads=1)
    assert result[0]["image"] == str(EVAL_IMAGES[0])
    dets = result[0]["detections"]
    assert len(dets) > 0 and all(d["class"] == "person" for d in dets)
    x1, y1, x2, y2 = dets[0]["box"]
    assert 0 <= x1 < x2 <= 1920 and 0 <= y1 < y2 <= 1080 and 0.25 < dets[0]["score"] <= 1
    json.dumps(result)
    with pytest.raises(ValueError, match="cannot read image"):
        detect_images([unreadable], ONNX_FP32)

"""The edge detector: any Ultralytics-layout detection ONNX (fp32 or INT8 QDQ) run with onnxruntime.

Pre- and post-processing reproduce Ultralytics' own (centred 114-grey letterbox, best-class confidence filter,
class-aware NMS, ``max_det``, boxes mapped back to source pixels) so the edge agrees with ``YOLO(model).predict``
without importing torch or ultralytics.

>>> det = Detector("models/yolov8n-int8-320.onnx")      # doctest: +SKIP
>>> dets = det(cv2.imread("people.jpg"))                # doctest: +SKIP
>>> dets.xyxy, dets.confidence, dets.class_id           # doctest: +SKIP
"""

from __future__ import annotations

import ast
import hashlib
import json
import logging
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import cv2
import numpy as np

from camera.detections import Detections, iou_matrix

log = logging.getLogger(__name__)

PAD_VALUE = 114  # Ultralytics' letterbox grey
_MAX_WH = 7680.0  # class offset for class-aware NMS in one pass (as Ultralytics)


class ModelError(RuntimeError):
    """A model file that is missing, corrupt or not a supported detection layout (one-line message)."""


def letterbox(
    image_bgr: np.ndarray, new_shape: tuple[int, int]
) -> tuple[np.ndarray, float, tuple[float, float]]:
    """Resize keeping aspect ratio and pad (centred, grey 114) to ``new_shape`` (h, w), exactly as Ultralytics.

    Returns the padded image, the scale ratio and the (left, top) padding in pixels.
    """
    h0, w0 = image_bgr.shape[:2]
    nh, nw = new_shape
    r = min(nh / h0, nw / w0)
    new_unpad = (max(round(w0 * r), 1), max(round(h0 * r), 1))  # (w, h)
    dw, dh = (nw - new_unpad[0]) / 2, (nh - new_unpad[1]) / 2
    img = image_bgr
    if (w0, h0) != new_unpad:
        img = cv2.resize(img, new_unpad, interpolation=cv2.INTER_LINEAR)
    top, bottom = round(dh - 0.1), round(dh + 0.1)
    left, right = round(dw - 0.1), round(dw + 0.1)
    if top or bottom or left or right:
        img = cv2.copyMakeBorder(img, top, bottom, left, right, cv2.BORDER_CONSTANT, value=(PAD_VALUE,) * 3)
    return img, r, (float(left), float(top))


def fitted_imgsz(frame_wh: tuple[int, int], long_side: int, stride: int = 32) -> tuple[int, int]:
    """The smallest (h, w) input with ``long_side`` that holds a ``frame_wh`` frame: Ultralytics' rect inference.

    Why: a 16:9 camera letterboxed into a square 640x640 input spends 44 % of the network on grey padding;
    Ultralytics' own PyTorch predict runs 1280x720 video at 384x640. Build the edge model at this size.
    """
    w0, h0 = frame_wh
    r = long_side / max(w0, h0)
    h, w = round(h0 * r), round(w0 * r)
    return (-(-h // stride) * stride, -(-w // stride) * stride)


def padding_share(frame_wh: tuple[int, int], imgsz: tuple[int, int]) -> float:
    """Share of the model input (0..1) that is letterbox padding for a ``frame_wh`` frame."""
    w0, h0 = frame_wh
    r = min(imgsz[0] / h0, imgsz[1] / w0)
    return 1.0 - (round(w0 * r) * round(h0 * r)) / (imgsz[0] * imgsz[1])


def preprocess(
    image_bgr: np.ndarray, imgsz: tuple[int, int]
) -> tuple[np.ndarray, float, tuple[float, float]]:
    """Letterbox, BGR→RGB, HWC→CHW, scale to 0..1: the model input ``1x3xHxW`` float32 (edge and calibration)."""
    if image_bgr is None or image_bgr.ndim != 3 or image_bgr.shape[2] != 3:
        raise ValueError(f"expected an HxWx3 BGR image, got shape {getattr(image_bgr, 'shape', None)}")
    img, ratio, pad = letterbox(image_bgr, imgsz)
    # One C++ pass: channel swap, transpose to NCHW and scaling (no intermediate numpy copies).
    blob = cv2.dnn.blobFromImage(img, scalefactor=1.0 / 255.0, swapRB=True, crop=False)
    return blob, ratio, pad


def nms(boxes: np.ndarray, scores: np.ndarray, iou: float) -> np.ndarray:
    """Greedy NMS (torchvision semantics: suppress IoU > ``iou``), indices sorted by descending score.

    One IoU matrix of the candidates (``camera.detections.iou_matrix``, the one IoU definition), then the greedy
    pass over its rows: a kept box suppresses every later box it overlaps by more than ``iou``.

    >>> nms(np.array([[0, 0, 10, 10], [1, 0, 11, 10], [20, 0, 30, 10]], np.float32), np.array([0.9, 0.8, 0.7]), 0.5)
    array([0, 2])
    """
    order = np.argsort(-scores, kind="stable")
    ious = iou_matrix(boxes[order], boxes[order])
    suppressed = np.zeros(len(order), dtype=bool)
    keep: list[int] = []
    for k in range(len(order)):
        if not suppressed[k]:
            keep.append(int(order[k]))
            suppressed |= ious[k] > iou
    return np.asarray(keep, dtype=np.int64)


def read_build_manifest(model_path: Path) -> dict | None:
    """The ``NAME.json`` that ``smartcam-model build`` writes beside ``NAME.onnx`` (None if absent or unreadable).

    The one reader of it: the detector takes thresholds from it, the registry copies its build facts.
    """
    manifest_path = Path(model_path).with_suffix(".json")
    if not manifest_path.is_file():
        return None
    try:
        return json.loads(manifest_path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        log.warning("ignoring unreadable manifest %s: %s", manifest_path, exc)
        return None


def file_sha256(path: Path) -> str:
    """Full hex SHA-256 of a file, read in chunks (models can be large)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _parse_literal(text: str | None):
    if not text:
        return None
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return None


#: ``detector.provider`` short names; any full onnxruntime name (``...ExecutionProvider``) is accepted too.
PROVIDER_NAMES = {
    "cpu": "CPUExecutionProvider",
    "openvino": "OpenVINOExecutionProvider",  # pip install onnxruntime-openvino: Intel iGPU/NPU/CPU
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
    "coreml": "CoreMLExecutionProvider",
    "xnnpack": "XnnpackExecutionProvider",
    "qnn": "QNNExecutionProvider",
    "rocm": "ROCMExecutionProvider",
}


def execution_providers(provider: str, options: dict[str, str] | None, available: Sequence[str]) -> list:
    """The ``providers`` list for onnxruntime: the requested one first (with its options), the CPU as fallback.

    A provider this onnxruntime build does not have is a warning, not an error: the edge keeps detecting on the
    CPU (a box whose accelerator package or device is missing must not go blind). A name that is no provider
    at all is an error.

    >>> execution_providers("cpu", None, ["CPUExecutionProvider"])
    ['CPUExecutionProvider']
    >>> execution_providers("openvino", {"device_type": "GPU"}, ["OpenVINOExecutionProvider", "CPUExecutionProvider"])
    [('OpenVINOExecutionProvider', {'device_type': 'GPU'}), 'CPUExecutionProvider']
    >>> execution_providers("openvino", None, ["CPUExecutionProvider"])
    ['CPUExecutionProvider']
    """
    name = PROVIDER_NAMES.get(provider.lower(), provider)
    if not name.endswith("ExecutionProvider"):
        raise ModelError(f"unknown execution provider {provider!r}: use one of {', '.join(PROVIDER_NAMES)} "
                         "or a full onnxruntime provider name")
    if name == "CPUExecutionProvider":
        return [name]
    if name not in available:
        log.warning("execution provider %s is not in this onnxruntime build (it has %s); using the CPU",
                    name, ", ".join(available))
        return ["CPUExecutionProvider"]
    return [(name, dict(options or {})), "CPUExecutionProvider"]


class Detector:
    """onnxruntime detector for Ultralytics-layout ONNX (``1 x (4+nc) x N`` or ``1 x N x (4+nc)``)."""

    def __init__(
        self,
        model_path: str | os.PathLike,
        *,
        conf: float = 0.25,
        iou: float = 0.45,
        classes: Sequence[str] | None = ("person",),
        threads: int | None = None,
        max_det: int = 300,
        provider: str = "cpu",
        provider_options: dict[str, str] | None = None,
    ) -> None:
        import onnxruntime as ort  # edge dependency; imported here so `camera` imports stay light

        path = Path(model_path)
        if not path.is_file():
            raise ModelError(f"model file not found: {path}")
        self.path = path
        self.name = path.stem
        self.conf = float(conf)
        self.iou = float(iou)
        self.max_det = int(max_det)
        try:
            self.sha256 = file_sha256(path)
        except OSError as exc:  # permissions, an I/O error: the model's problem, not an output's
            raise ModelError(f"cannot read model file {path}: {exc.strerror or exc}") from None

        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        opts.inter_op_num_threads = 1
        if threads:
            opts.intra_op_num_threads = int(threads)
        opts.log_severity_level = 3
        # Not set: "session.set_denormal_as_zero". It made INT8 inference 1.5x faster on some frames (a MOT17
        # image at 640: 42.7 -> 28.5 ms; street-clip frames unchanged), but it flips the calling thread's FTZ/DAZ
        # flags, i.e. float semantics for the whole rest of the process (numpy, the tracker, everything).
        if os.environ.get("SMARTCAM_ORT_SPIN", "1") == "0":
            # Spinning worker threads burn a core waiting for work; on a busy device that core is better
            # spent decoding video.
            opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        providers = execution_providers(provider, provider_options, ort.get_available_providers())
        try:
            self.session = ort.InferenceSession(str(path), sess_options=opts, providers=providers)
        except Exception as exc:  # onnxruntime raises several private exception types
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ModelError(f"cannot load model {path}: {first}") from None

        self.providers: list[str] = self.session.get_providers()  # what actually runs (after any fallback)
        if providers[0] != "CPUExecutionProvider" and self.providers[0] != providers[0]:
            log.warning("execution provider %s could not run %s (its device is missing?); using the CPU",
                        providers[0], path.name)
        meta = self.session.get_modelmeta().custom_metadata_map
        inputs, outputs = self.session.get_inputs(), self.session.get_outputs()
        if len(inputs) != 1 or len(inputs[0].shape) != 4:
            raise ModelError(f"unsupported model layout in {path}: expected one 1x3xHxW image input")
        if meta.get("end2end", "False") == "True":
            raise ModelError(
                f"unsupported model layout in {path}: end-to-end (NMS-free) export; export with nms=False"
            )
        if meta.get("task", "detect") != "detect" or len(outputs) != 1 or len(outputs[0].shape) != 3:
            raise ModelError(
                f"unsupported model layout in {path}: need one detection output 1x(4+nc)xN "
                f"(task={meta.get('task', '?')}, outputs={[o.shape for o in outputs]})"
            )
        self.input_name = inputs[0].name
        # a batch dimension without a fixed size (models/head.py dynamic_batch): several frames in one run
        self.dynamic_batch = not isinstance(inputs[0].shape[0], int)
        self.input_dtype = np.float16 if "float16" in inputs[0].type else np.float32
        self.imgsz = self._read_imgsz(meta.get("imgsz"), inputs[0].shape, path)
        self.names = self._read_names(meta.get("names"), outputs[0].shape)
        self.nc = len(self.names)
        self._channels_first: bool | None = self._layout(outputs[0].shape)
        if classes is None:
            self.class_ids: np.ndarray | None = None
        else:
            by_name = {v: k for k, v in self.names.items()}
            missing = [c for c in classes if c not in by_name]
            if missing:
                raise ModelError(
                    f"model {path.name} has no class {missing[0]!r} (it has e.g. {list(by_name)[:5]})"
                )
            self.class_ids = np.array(sorted(by_name[c] for c in classes), dtype=np.int64)
        self.manifest = read_build_manifest(path)

    # ---- metadata ---------------------------------------------------------------------------------------------
    @staticmethod
    def _read_imgsz(text: str | None, input_shape: list, path: Path) -> tuple[int, int]:
        value = _parse_literal(text)
        if isinstance(value, int):
            return (value, value)
        if isinstance(value, (list, tuple)) and len(value) == 2 and all(isinstance(v, int) for v in value):
            return (int(value[0]), int(value[1]))
        h, w = input_shape[2], input_shape[3]
        if isinstance(h, int) and isinstance(w, int):
            return (h, w)
        raise ModelError(
            f"cannot tell the input size of {path}: no 'imgsz' metadata and a dynamic input shape"
        )

    @staticmethod
    def _read_names(text: str | None, output_shape: list) -> dict[int, str]:
        value = _parse_literal(text)
        if isinstance(value, dict) and value:
            return {int(k): str(v) for k, v in value.items()}
        dims = [d for d in output_shape[1:] if isinstance(d, int)]
        nc = min(dims) - 4 if dims else 0
        if nc <= 0:
            raise ModelError(
                "model has no 'names' metadata and its class count cannot be read from the output shape"
            )
        return {i: f"class{i}" for i in range(nc)}

    def _layout(self, shape: list) -> bool | None:
        """True for 1x(4+nc)xN, False for 1xNx(4+nc), None if only known at run time (dynamic dims)."""
        c = 4 + self.nc
        if shape[1] == c:
            return True
        if shape[2] == c:
            return False
        if isinstance(shape[1], int) and isinstance(shape[2], int):
            raise ModelError(
                f"unsupported model layout: output {shape} is not 1x{c}xN or 1xNx{c} for {self.nc} classes"
            )
        return None

    # ---- inference --------------------------------------------------------------------------------------------
    def infer(self, blob: np.ndarray) -> np.ndarray:
        """Run the network on a preprocessed ``1x3xHxW`` blob; returns the raw ``(4+nc, N)`` prediction."""
        return self.infer_batch(blob)[0]

    def infer_batch(self, blob: np.ndarray) -> list[np.ndarray]:
        """Run the network on ``Bx3xHxW`` (B > 1 needs :attr:`dynamic_batch`); one ``(4+nc, N)`` per image."""
        if blob.dtype != self.input_dtype:
            blob = blob.astype(self.input_dtype)
        out = self.session.run(None, {self.input_name: blob})[0]
        if self._channels_first is None:
            self._channels_first = self._layout(list(out.shape))
            if self._channels_first is None:
                raise ModelError(f"unsupported model layout: output {out.shape} for {self.nc} classes")
        preds = out if self._channels_first else out.transpose(0, 2, 1)
        return [p if p.dtype == np.float32 else p.astype(np.float32) for p in preds]

    def postprocess(
        self, pred: np.ndarray, ratio: float, pad: tuple[float, float], source_hw: tuple[int, int]
    ) -> Detections:
        """Decode ``(4+nc, N)`` predictions: confidence filter first, best class, class filter, NMS, unletterbox."""
        scores = pred[4:]
        # Cheap pre-filter: a kept box needs a wanted class above the threshold (exact, not an approximation).
        wanted = scores if self.class_ids is None else scores[self.class_ids]
        cand = np.flatnonzero((wanted.max(axis=0) if wanted.shape[0] > 1 else wanted[0]) > self.conf)
        if cand.size == 0:
            return Detections.empty()
        cand_scores = scores[:, cand]
        cls = cand_scores.argmax(axis=0)
        conf = cand_scores[cls, np.arange(cand.size)]
        keep = conf > self.conf
        if self.class_ids is not None:
            keep &= np.isin(cls, self.class_ids)
        if not keep.any():
            return Detections.empty()
        cand, cls, conf = cand[keep], cls[keep], conf[keep]
        xywh = pred[:4, cand]
        half_w, half_h = xywh[2] / 2, xywh[3] / 2
        boxes = np.stack([xywh[0] - half_w, xywh[1] - half_h, xywh[0] + half_w, xywh[1] + half_h], axis=1)
        idx = nms(boxes + (cls * _MAX_WH)[:, None].astype(np.float32), conf, self.iou)[: self.max_det]
        boxes, conf, cls = boxes[idx], conf[idx], cls[idx]
        # Back to source pixels with the per-axis gains Ultralytics' scale_boxes uses.
        h0, w0 = source_hw
        gain_x, gain_y = max(round(w0 * ratio), 1) / w0, max(round(h0 * ratio), 1) / h0
        boxes[:, [0, 2]] = np.clip((boxes[:, [0, 2]] - pad[0]) / gain_x, 0, w0)
        boxes[:, [1, 3]] = np.clip((boxes[:, [1, 3]] - pad[1]) / gain_y, 0, h0)
        return Detections(boxes.astype(np.float32), conf.astype(np.float32), cls.astype(np.int32))

    def detect(self, image_bgr: np.ndarray) -> Detections:
        """Detect objects of the configured classes in one BGR image; boxes in source pixels, clipped."""
        blob, ratio, pad = preprocess(image_bgr, self.imgsz)
        return self.postprocess(self.infer(blob), ratio, pad, image_bgr.shape[:2])

    __call__ = detect


def detect_batch(detectors: Sequence[Detector], images: Sequence[np.ndarray]) -> list[Detections]:
    """``detectors[i].detect(images[i])`` for every i, in one network run: the detectors share one session (the
    copies a multi-camera edge makes of one loaded model, each with its own thresholds) whose batch is dynamic.
    Each image is letterboxed to the model's input on its own and decoded with its own detector's thresholds, so
    the results are those of the one-by-one calls (tests/test_detector_batch.py)."""
    if len(detectors) != len(images):
        raise ValueError(f"{len(detectors)} detectors for {len(images)} images")
    if not images:
        return []
    first = detectors[0]
    if len(images) == 1:
        return [first.detect(images[0])]
    if not first.dynamic_batch:
        raise ModelError(f"model {first.path.name} has a fixed batch of 1 (rebuild it without --static-batch)")
    if any(d.session is not first.session for d in detectors):
        raise ValueError("detect_batch needs detectors that share one session")
    prepared = [preprocess(image, first.imgsz) for image in images]
    preds = first.infer_batch(np.concatenate([blob for blob, _, _ in prepared]))
    return [d.postprocess(pred, ratio, pad, image.shape[:2])
            for d, pred, (_, ratio, pad), image in zip(detectors, preds, prepared, images, strict=True)]


def detect_images(
    paths: Iterable[str | os.PathLike],
    model_path: str | os.PathLike,
    *,
    conf: float = 0.25,
    iou: float = 0.45,
    classes: Sequence[str] | None = ("person",),
    threads: int | None = None,
) -> list[dict]:
    """Detect on image files: the JSON of ``smartcam-edge detect --json`` (raises ValueError for an unreadable image)."""
    detector = Detector(model_path, conf=conf, iou=iou, classes=classes, threads=threads)
    results = []
    for p in paths:
        image = cv2.imread(str(p), cv2.IMREAD_COLOR)
        if image is None:
            raise ValueError(f"cannot read image {p}")
        dets = detector.detect(image)
        results.append(
            {
                "image": str(p),
                "detections": [
                    {
                        "box": [round(float(v), 2) for v in box],
                        "score": round(float(score), 4),
                        "class": detector.names.get(int(c), str(int(c))),
                    }
                    for box, score, c in zip(dets.xyxy, dets.confidence, dets.class_id, strict=True)
                ],
            }
        )
    return results

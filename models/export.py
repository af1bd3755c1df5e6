"""Weights → fp32 ONNX at the requested input size: an Ultralytics ``.pt`` through ultralytics' exporter, or an
existing fp32 ONNX resized by graph surgery (no torch needed).

Ultralytics writes its export beside the checkpoint, so the checkpoint is copied into a private work folder
first (a hub name such as ``yolo11n.pt`` is downloaded there): shared weights (e.g. ``../shared/models``) are
never written to, and the process's working directory is never changed.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

import onnx
from google.protobuf.message import DecodeError

from camera.detector import ModelError
from models.head import check_layout, fast_dfl, retarget
from models.imgsz import imgsz_problem

log = logging.getLogger(__name__)

INSTALL_HINT = "pip install 'smartcam[ultralytics]'"


def _is_hub_name(weights: str) -> bool:
    """A bare checkpoint name such as ``yolo11n.pt`` that ultralytics can download (when online)."""
    return os.sep not in weights and "/" not in weights and weights.endswith(".pt")


def export_pt(weights: str, imgsz: tuple[int, int], workdir: Path) -> onnx.ModelProto:
    """Export an Ultralytics detection checkpoint to an fp32 ONNX (static shape, no NMS) and load it."""
    try:
        from ultralytics import YOLO  # heavy (torch): only when a .pt is given
    except ImportError:
        raise ModelError(f"converting a .pt checkpoint needs ultralytics: {INSTALL_HINT}") from None
    src = Path(weights)
    workdir.mkdir(parents=True, exist_ok=True)
    if src.is_file():
        local = workdir / src.name
        shutil.copyfile(src, local)
        target = str(local)
    elif _is_hub_name(weights):
        target = str(workdir / weights)  # ultralytics downloads a known asset to this path (needs internet)
    else:
        raise ModelError(f"checkpoint not found: {src}")
    # ultralytics logs its own export progress (to stdout)
    try:
        model = YOLO(target)
    except Exception as exc:
        raise ModelError(f"cannot load checkpoint {weights}: {str(exc).strip().splitlines()[0]}") from None
    if getattr(model, "task", "detect") != "detect":
        raise ModelError(f"unsupported model: {weights} is a {model.task} model, not a detector")
    try:
        out = model.export(format="onnx", imgsz=list(imgsz), dynamic=False, simplify=True, nms=False)
    except Exception as exc:
        raise ModelError(f"ONNX export of {weights} failed: {str(exc).strip().splitlines()[0]}") from None
    return onnx.load(str(out))


def load_onnx(path: Path) -> onnx.ModelProto:
    """Load an ONNX file with clear errors for a missing or corrupt file."""
    if not path.is_file():
        raise ModelError(f"model file not found: {path}")
    try:
        return onnx.load(str(path))
    except (DecodeError, ValueError, OSError) as exc:
        raise ModelError(
            f"corrupt ONNX file {path}: {str(exc).strip().splitlines()[0] if str(exc) else exc}"
        ) from None


def fp32_model(weights: str | os.PathLike, imgsz: tuple[int, int], workdir: Path) -> onnx.ModelProto:
    """The fp32 detection ONNX for ``weights`` at ``imgsz`` (h, w), checked to be an Ultralytics layout."""
    w = str(weights)
    problem = imgsz_problem(imgsz)
    if problem:
        raise ModelError(f"bad imgsz: {problem}")
    if w.endswith(".onnx"):
        model = load_onnx(Path(w))
        check_layout(model)
        return fast_dfl(retarget(model, imgsz))
    if w.endswith(".pt"):
        model = export_pt(w, imgsz, workdir)
        check_layout(model)
        return fast_dfl(model)
    raise ModelError(f"unsupported weights {w}: give an Ultralytics .pt checkpoint or an fp32 .onnx")

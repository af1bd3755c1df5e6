"""The model manifest ``NAME.json`` beside ``NAME.onnx``: where the model came from and what it measured.

The edge reads ``imgsz``/``names`` from the ONNX itself; the manifest is for people and dashboards (provenance,
quantization settings, calibration frames, measured accuracy and latency).
"""

from __future__ import annotations

import json
import platform
from datetime import datetime, timezone
from pathlib import Path

import onnx
import onnxruntime

from camera.detector import file_sha256

SCHEMA = "smartcam.model-manifest/1"


def manifest_path(model_path: str | Path) -> Path:
    return Path(model_path).with_suffix(".json")


def build_manifest(
    *,
    model_path: Path,
    weights: str,
    imgsz: tuple[int, int],
    names: dict[int, str],
    precision: str,
    quantization: dict | None = None,
    calibration: dict | None = None,
    results: dict | None = None,
) -> dict:
    """Assemble the manifest for a built model file (which must already exist)."""
    src = Path(weights)
    return {
        "schema": SCHEMA,
        "model": model_path.stem,
        "file": model_path.name,
        "sha256": file_sha256(model_path),
        "size_bytes": model_path.stat().st_size,
        "created": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "precision": precision,
        "source": {
            "weights": str(weights),
            "sha256": file_sha256(src) if src.is_file() else None,
        },
        "imgsz": list(imgsz),
        "classes": [names[k] for k in sorted(names)],
        "quantization": quantization,
        "calibration": calibration,
        "results": results or {},
        "license": "AGPL-3.0 (Ultralytics YOLO weights)",
        "built_with": {
            "onnxruntime": onnxruntime.__version__,
            "onnx": onnx.__version__,
            "machine": platform.machine(),
            "processor": platform.processor() or platform.machine(),
        },
    }


def write_manifest(model_path: str | Path, manifest: dict) -> Path:
    path = manifest_path(model_path)
    path.write_text(json.dumps(manifest, indent=2) + "\n")
    return path


def read_manifest(model_path: str | Path) -> dict | None:
    path = manifest_path(model_path)
    if not path.is_file():
        return None
    return json.loads(path.read_text())

"""The model manifest ``NAME.json`` beside ``NAME.onnx``: where the model came from and what it measured.

The edge reads ``imgsz``/``names`` from the ONNX itself; the manifest is for people and dashboards (provenance,
quantization settings, calibration frames, measured accuracy and latency). The edge reads it with
``camera.detector.read_manifest``.
"""

from __future__ import annotations

import json
import os
import platform
import tempfile
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
    file_name: str | None = None,
) -> dict:
    """Assemble the manifest for a built model file (which must already exist). ``file_name``: the name it will
    have (a build hashes its temporary file, renamed at the end)."""
    src = Path(weights)
    name = file_name or model_path.name
    return {
        "schema": SCHEMA,
        "model": Path(name).stem,
        "file": name,
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
    """Write ``NAME.json`` beside ``model_path`` atomically (a temporary file renamed over it): a failure
    leaves the previous manifest whole."""
    path = manifest_path(model_path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=".tmp.json")
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(json.dumps(manifest, indent=2) + "\n")
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)
    return path

"""Reusable model fixtures: a person INT8 model built once per test session (register in conftest)."""

from __future__ import annotations

from pathlib import Path

import pytest

from models.build import build_model
from tests.conftest import INDOOR_CLIP, NEGATIVE_CLIP, ONNX_FP32, PLAZA_CLIP, STREET_CLIP

CALIB_CLIPS = [INDOOR_CLIP, STREET_CLIP, PLAZA_CLIP, NEGATIVE_CLIP]


@pytest.fixture(scope="session")
def int8_model_320(tmp_path_factory) -> Path:
    """INT8 QDQ model at 320x320 (80 COCO classes, person is class 0) built from ONNX_FP32 by the real
    ``models.build`` path on 16 frames spread over the four shared clips (~15 s, once per session)."""
    out = tmp_path_factory.mktemp("int8_model") / "yolov8n-320-int8.onnx"
    build_model(ONNX_FP32, (320, 320), CALIB_CLIPS, out, calib_frames=16, latency_runs=0, progress=False)
    return out

"""``detector.provider``: the onnxruntime execution provider, with a CPU fallback when it is missing (issue 16)."""

from __future__ import annotations

import logging

import numpy as np
import onnxruntime as ort
import pytest

from camera.config import ConfigError, load_config
from camera.detector import Detector, ModelError
from tests.conftest import ONNX_FP32


def test_cpu_is_the_default_provider():
    det = Detector(ONNX_FP32, threads=1)
    assert det.providers == ["CPUExecutionProvider"]


def test_missing_provider_falls_back_to_cpu_with_a_warning(caplog):
    assert "OpenVINOExecutionProvider" not in ort.get_available_providers()  # the case this test is about
    with caplog.at_level(logging.WARNING, logger="camera.detector"):
        det = Detector(ONNX_FP32, threads=1, provider="openvino", provider_options={"device_type": "GPU"})
    assert det.providers == ["CPUExecutionProvider"]
    assert any("OpenVINOExecutionProvider" in r.getMessage() and "using the CPU" in r.getMessage()
               for r in caplog.records)
    dets = det.detect(np.zeros((480, 640, 3), np.uint8))  # still detects
    assert len(dets.xyxy) == 0


def test_unknown_provider_is_a_clear_error():
    with pytest.raises(ModelError, match="unknown execution provider 'tpu9000'"):
        Detector(ONNX_FP32, provider="tpu9000")


def test_config_names_a_bad_provider(tmp_path):
    with pytest.raises(ConfigError, match="detector.provider"):
        load_config(overrides={"camera_id": "c", "source": "0", "model": str(ONNX_FP32),
                               "detector.provider": "tpu9000"})
    cfg = load_config(overrides={"camera_id": "c", "source": "0", "model": str(ONNX_FP32),
                                 "detector.provider": "openvino"})
    assert cfg.detector.provider == "openvino"

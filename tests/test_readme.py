"""The README's configuration examples are real: each YAML block validates against the edge config model."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from camera.config import load_config
from camera.site_config import load_site_config
from tests.conftest import ONNX_FP32

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"```yaml\n(.*?)```", README.read_text(encoding="utf-8"), re.S)


def test_readme_has_config_examples():
    assert len(BLOCKS) >= 2


@pytest.mark.parametrize("block", BLOCKS, ids=[f"block{i}" for i in range(len(BLOCKS))])
def test_readme_yaml_block_is_a_valid_edge_config(block, tmp_path):
    data = yaml.safe_load(block)
    if "cameras" in data:  # a multi-camera file: validated the way `smartcam-edge run --config` reads it
        data["model"] = str(ONNX_FP32)
        for cam in data["cameras"]:
            cam.pop("model", None)
        if "tls_ca" in data.get("mqtt", {}):
            data["mqtt"].pop("tls_ca")
        path = tmp_path / "site.yaml"
        path.write_text(yaml.safe_dump(data), encoding="utf-8")
        site = load_site_config(path)
        assert site.multi and len(site.cameras) == len(data["cameras"])
        return
    data.setdefault("camera_id", "readme")
    data.setdefault("source", "0")
    data["model"] = str(ONNX_FP32)  # the example names a model the reader builds first
    if "mqtt" in data and "tls_ca" in data["mqtt"]:
        ca = tmp_path / "ca.crt"
        ca.write_text("placeholder: the example's CA path does not exist on this machine\n")
        data["mqtt"]["tls_ca"] = str(ca)
    if "outbox" in data:
        data["outbox"]["path"] = str(tmp_path / "outbox.db")
    cfg = load_config(overrides=data)  # raises ConfigError naming the bad key
    assert cfg.camera_id == data["camera_id"]

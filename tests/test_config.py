"""Edge configuration: YAML + CLI overrides, validated once, every error named with its path."""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path

import pytest

from camera.cli import _overrides, build_parser
from camera.config import ConfigError, load_config

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = sorted((ROOT / "samples").glob("edge*.yaml"))
# every edge config shipped in samples/ (others' too: demo, counting), recognised by its camera_id key
EDGE_CONFIGS = sorted(p for p in (ROOT / "samples").glob("*.yaml") if "\ncamera_id:" in "\n" + p.read_text())


@pytest.fixture
def model(tmp_path) -> str:
    path = tmp_path / "m.onnx"
    path.write_bytes(b"an existing file; the detector checks its content")
    return str(path)


def _write(tmp_path, text: str) -> Path:
    path = tmp_path / "edge.yaml"
    path.write_text(text)
    return path


def test_defaults_and_overrides_win(tmp_path, model):
    cfg_file = _write(tmp_path, f"camera_id: cam1\nsource: clip.mp4\nmodel: {model}\nfps: 3\n"
                                "mqtt:\n  broker: mqtt://a:1883\n  stats_interval_s: 5\n")
    cfg = load_config(cfg_file, {"fps": 7.5, "mqtt.broker": "mqtts://b", "site": None})
    assert cfg.fps == 7.5 and cfg.site == "default"
    assert cfg.mqtt.broker == "mqtts://b" and cfg.mqtt.stats_interval_s == 5  # sibling keys are kept
    assert cfg.mqtt.settings().port == 8883 and cfg.mqtt.settings().tls
    assert cfg.detector.classes == ["person"] and cfg.drain_timeout_s == 30
    assert cfg.motion_enabled(live=True) and not cfg.motion_enabled(live=False)
    assert cfg.outbox_path().name == "default-cam1.outbox.db"


def test_cli_flags_map_onto_config(tmp_path, model):
    args = build_parser().parse_args(["run", "--source", "0", "--model", model, "--camera-id", "door",
                                      "--broker", "mqtt://h:1884", "--no-motion", "--classes", "person,car",
                                      "--start-time", "2024-05-01T08:00:00Z", "--outbox", str(tmp_path / "o.db")])
    cfg = load_config(None, _overrides(args))
    assert cfg.source == "0" and cfg.camera_id == "door" and cfg.motion.enabled is False
    assert cfg.detector.classes == ["person", "car"] and cfg.mqtt.settings().port == 1884
    assert cfg.start_time == datetime(2024, 5, 1, 8, tzinfo=timezone.utc)
    assert cfg.outbox_path() == tmp_path / "o.db"
    assert not cfg.motion_enabled(live=True)


def test_unknown_key_is_named_with_its_path(tmp_path, model):
    cfg_file = _write(tmp_path, f"camera_id: c\nsource: x\nmodel: {model}\nmotion:\n  treshold: 0.1\n")
    with pytest.raises(ConfigError) as info:
        load_config(cfg_file)
    assert "motion.treshold: unknown key" in str(info.value)
    assert str(cfg_file) in str(info.value)


@pytest.mark.parametrize(("overrides", "expected"), [
    ({"mqtt.broker": "http://broker:1883"}, "mqtt.broker: broker URL 'http://broker:1883': scheme must be"),
    ({"mqtt.broker": "mqtt://:1883"}, "no host"),
    ({"model": "/nonexistent/model.onnx"}, "model: model file not found: /nonexistent/model.onnx"),
    ({"camera_id": "cam/1"}, "camera_id: 'cam/1' must be"),
    ({"detector.conf": 1.5}, "detector.conf: Input should be less than 1"),
    ({"fps": -1}, "fps: Input should be greater than 0"),
    ({"mqtt.tls_ca": "/nonexistent/ca.crt"}, "mqtt.tls_ca: CA file not found"),
    ({"motion.enabled": "sometimes"}, "motion.enabled"),
    ({"zones": [{"name": "a", "points": [[0, 0], [1, 0], [1, 1]]},
                {"name": "a", "points": [[0, 0], [1, 0], [1, 1]]}]}, "duplicate name(s) a"),
    ({"filters": {"track_treshold": 0.5}}, "filters.track_treshold: unknown key"),
])
def test_bad_values_are_clear_errors(model, overrides, expected):
    base = {"camera_id": "cam1", "source": "0", "model": model}
    with pytest.raises(ConfigError) as info:
        load_config(None, {**base, **overrides})
    assert expected in str(info.value)


def test_missing_required_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="camera_id: Field required"):
        load_config(None, {"source": "0"})
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(_write(tmp_path, "camera_id: [unclosed\n"))
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(_write(tmp_path, "- a\n- b\n"))
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config(tmp_path / "missing.yaml")


@pytest.mark.parametrize("sample", EDGE_CONFIGS, ids=lambda p: p.name)
def test_shipped_samples_are_valid(sample, model):
    # the samples name a model built by smartcam-model and a CA made by deploy/make-credentials.sh
    cfg = load_config(sample, {"model": model, "mqtt.tls_ca": model if "tls_ca" in sample.read_text() else None})
    assert cfg.camera_id and cfg.source


def test_samples_exist_for_every_source_kind():
    assert {p.name for p in SAMPLES} >= {"edge-file.yaml", "edge-webcam.yaml", "edge-rtsp.yaml",
                                          "edge-picamera.yaml"}


def test_config_reference_lists_every_key_in_a_well_formed_table():
    from camera.config import EdgeConfig, config_reference

    table = config_reference().splitlines()
    assert all(row.count("|") == 5 for row in table)  # no stray pipes from "int | None" types
    keys = [row.split("`")[1] for row in table[2:]]
    for name in EdgeConfig.model_fields:
        assert any(k == name or k.startswith(f"{name}.") or k.startswith(f"{name}[]") for k in keys), name
    assert {"mqtt.broker", "motion.keepalive_s", "zones[].name", "filters.track_threshold"} <= set(keys)

"""Multi-camera configs (camera/site_config.py): shared settings, per-camera overrides, errors that name both."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from camera.config import ConfigError, load_config
from camera.site_config import load_site_config


@pytest.fixture
def model(tmp_path) -> Path:
    path = tmp_path / "m.onnx"
    path.write_bytes(b"not read at config time")
    return path


def write(tmp_path: Path, data: dict) -> Path:
    path = tmp_path / "site.yaml"
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    return path


def site(model: Path, *cameras: dict, **shared) -> dict:
    return {"site": "shop", "model": str(model), "node_id": "pi-1", **shared, "cameras": list(cameras)}


def test_shared_settings_apply_to_every_camera_and_a_camera_overrides_them(tmp_path, model):
    path = write(tmp_path, site(model, {"camera_id": "door", "source": "0"},
                                {"camera_id": "till", "source": "1", "fps": 2, "detector": {"conf": 0.3},
                                 "lines": [{"name": "queue", "points": [[0, 0.5], [1, 0.5]]}]},
                                detector={"conf": 0.2, "iou": 0.5}, mqtt={"broker": "mqtt://127.0.0.1:1883"},
                                lines=[{"name": "entry", "points": [[0.5, 0], [0.5, 1]]}],
                                outbox={"dir": str(tmp_path / "state")}))
    cfg = load_site_config(path)
    door, till = cfg.cameras
    assert cfg.multi and cfg.node_id == "pi-1"
    assert (door.site, door.detector.conf, door.detector.iou, door.fps) == ("shop", 0.2, 0.5, None)
    assert (till.detector.conf, till.detector.iou, till.fps) == (0.3, 0.5, 2.0)  # deep merge: iou stays shared
    assert [ln.name for ln in door.lines] == ["entry"] and [ln.name for ln in till.lines] == ["queue"]
    assert door.mqtt.broker == till.mqtt.broker
    assert door.outbox_path() != till.outbox_path()
    assert door.outbox_path().parent == till.outbox_path().parent == tmp_path / "state"


def test_a_one_camera_file_is_a_list_of_one(tmp_path, model):
    path = write(tmp_path, {"camera_id": "door", "source": "0", "model": str(model), "fps": 4})
    cfg = load_site_config(path)
    assert not cfg.multi and [c.camera_id for c in cfg.cameras] == ["door"]
    assert cfg.cameras[0] == load_config(path)


def test_camera_placeholder_gives_each_camera_its_own_files(tmp_path, model):
    path = write(tmp_path, site(model, {"camera_id": "door", "source": "0"}, {"camera_id": "till", "source": "1"},
                                events_file=str(tmp_path / "out" / "{camera_id}.jsonl")))
    door, till = load_site_config(path).cameras
    assert door.events_file == tmp_path / "out" / "door.jsonl" and till.events_file == tmp_path / "out" / "till.jsonl"


@pytest.mark.parametrize(("cameras", "shared", "expected"), [
    ([{"camera_id": "door", "source": "0"}, {"camera_id": "door", "source": "1"}], {},
     r"cameras\[1\] \(door\): camera_id: same as camera door: every camera needs its own id"),
    ([{"camera_id": "door", "source": "0"}, {"camera_id": "till", "source": "0"}], {},
     r"\(till\): source: same as camera door"),
    ([{"camera_id": "door", "source": "0"}, {"camera_id": "till", "source": "1"}], {"events_file": "all.jsonl"},
     r"\(till\): events_file: same as camera door: all.jsonl \(use \{camera_id\} in the path\)"),
    ([{"camera_id": "door", "source": "0"}, {"camera_id": "till", "source": "1"}],
     {"outbox": {"path": "one.db"}}, r"\(till\): outbox.path: same as camera door"),
    ([{"camera_id": "door", "source": "0"},
      {"camera_id": "till", "source": "1", "mqtt": {"broker": "mqtt://elsewhere:1883"}}], {},
     r"cameras\[1\] \(till\): mqtt.broker: shared by every camera of the process"),
    ([{"camera_id": "door", "source": "0"}, {"camera_id": "till", "source": "1", "site": "other"}], {},
     r"cameras\[1\] \(till\): site: shared by every camera"),
    ([{"camera_id": "door", "source": "0"}, {"camera_id": "till", "source": "1", "motion": {"treshold": 0.1}}], {},
     r"cameras\[1\] \(till\): motion.treshold: unknown key"),
    ([{"camera_id": "door", "source": "0"}, {"camera_id": "till"}], {}, r"cameras\[1\] \(till\): source: Field required"),
    ([{"camera_id": "pi-1", "source": "0"}], {}, r"node_id: 'pi-1' is also a camera id"),
    ([{"camera_id": "door", "source": "0", "zones": [{"name": "z", "points": [[0, 0], [1, 1]]}]}], {},
     r"cameras\[0\] \(door\): zones.0.points"),
])
def test_errors_name_the_camera_and_the_key(tmp_path, model, cameras, shared, expected):
    with pytest.raises(ConfigError, match=expected):
        load_site_config(write(tmp_path, site(model, *cameras, **shared)))


def test_every_problem_is_listed_not_just_the_first(tmp_path, model):
    path = write(tmp_path, site(model, {"camera_id": "door", "source": "0", "fps": -1},
                                {"camera_id": "till", "source": "0", "detector": {"conf": 2}}))
    with pytest.raises(ConfigError) as err:
        load_site_config(path)
    text = str(err.value)
    assert "cameras[0] (door): fps" in text and "cameras[1] (till): detector.conf" in text


def test_camera_selects_one_and_one_camera_flags_need_it(tmp_path, model):
    path = write(tmp_path, site(model, {"camera_id": "door", "source": "0"}, {"camera_id": "till", "source": "1"}))
    only = load_site_config(path, camera="till")
    assert [c.camera_id for c in only.cameras] == ["till"]
    assert load_site_config(path, {"source": "2"}, camera="till").cameras[0].source == "2"
    with pytest.raises(ConfigError, match="--source applies to one camera: add --camera ID"):
        load_site_config(path, {"source": "2"})
    with pytest.raises(ConfigError, match=r"no camera 'yard' in cameras: \(door, till\)"):
        load_site_config(path, camera="yard")
    assert {c.mqtt.broker for c in load_site_config(path, {"mqtt.broker": "mqtt://h:1883"}).cameras} == {
        "mqtt://h:1883"}  # a shared flag applies to every camera


def test_cameras_must_be_a_list_of_mappings(tmp_path, model):
    with pytest.raises(ConfigError, match="cameras: must be a list of camera mappings"):
        load_site_config(write(tmp_path, {"model": str(model), "cameras": {"door": "0"}}))
    with pytest.raises(ConfigError, match="load_site_config"):
        load_config(write(tmp_path, site(model, {"camera_id": "door", "source": "0"})))


def test_the_shipped_multi_camera_sample_is_valid(model):
    sample = Path(__file__).resolve().parents[1] / "samples" / "edge-site.yaml"
    cfg = load_site_config(sample, {"model": str(model)})
    assert cfg.multi and cfg.node_id == "shop-pi"
    assert [c.camera_id for c in cfg.cameras] == ["door", "street", "plaza"]
    assert len({c.outbox_path() for c in cfg.cameras}) == 3 and len({c.events_file for c in cfg.cameras}) == 3


def test_a_zone_outside_its_camera_frame_is_reported_with_camera_and_key(tmp_path, model, caplog):
    """Pixel coordinates can only be checked against the frame the camera delivers: said at its first frame."""
    from camera.pipeline import EdgeRunner

    path = write(tmp_path, site(model, {"camera_id": "till", "source": "1", "zones": [
        {"name": "queue", "points": [[10, 10], [900, 10], [900, 500]]},
        {"name": "fits", "points": [[0.1, 0.1], [0.9, 0.1], [0.9, 0.9]]}]}))
    runner = EdgeRunner(load_site_config(path).cameras[0])
    with caplog.at_level("ERROR"):
        runner._check_geometry((640, 480))
    assert [r.getMessage().split(" is ")[0] for r in caplog.records] == [
        "camera till: zones.queue: point [900.0, 10.0]"]

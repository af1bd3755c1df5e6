"""Many cameras in one edge config: a ``cameras:`` list over shared settings, validated per camera and across.

A site file gives the shared parts once (``site``, ``model``, ``detector``, ``mqtt``, ``publish``, ``outbox``,
...) and lists the cameras, each with its own ``camera_id`` and ``source`` and anything it overrides (``fps``,
``motion``, ``masks``, ``zones``, ``lines``, ``filters``, its own ``model``...). Each camera is the shared
settings deep-merged with its entry, then validated as a one-camera :class:`~camera.config.EdgeConfig`, so every
key means exactly what it means in a one-camera file. A file without ``cameras:`` is a list of one.

Paths that must differ per camera may say ``{camera_id}``: ``events_file: out/{camera_id}.jsonl``.

>>> import tempfile, pathlib
>>> d = pathlib.Path(tempfile.mkdtemp())
>>> _ = (d / "m.onnx").write_bytes(b"x")
>>> _ = (d / "s.yaml").write_text(f"site: shop\\nmodel: {d}/m.onnx\\ncameras:\\n"
...     "  - {camera_id: door, source: '0'}\\n  - {camera_id: till, source: '1', fps: 2}\\n")
>>> site = load_site_config(d / "s.yaml")
>>> [(c.camera_id, c.site, c.fps) for c in site.cameras], site.multi
([('door', 'shop', None), ('till', 'shop', 2.0)], True)
"""

from __future__ import annotations

import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from camera.config import ConfigError, EdgeConfig, _format_errors, _merge, read_config_file
from contract.topics import is_valid_name

#: settings of the process, not of a camera: one MQTT connection, one detector pool, one metrics server
SHARED_ONLY = ("site", "mqtt.broker", "mqtt.username", "mqtt.password", "mqtt.tls_ca", "mqtt.tls_insecure",
               "mqtt.client_id", "detector.streams", "detector.threads", "detector.batch", "detector.provider",
               "metrics.listen")
#: outputs every camera needs its own of
PER_CAMERA_FILES = ("outbox_path", "events_file", "tracks_file", "save_video", "model_dir")
PLACEHOLDER_KEYS = (("outbox", "path"), ("outbox", "dir"), ("model_updates", "dir"), ("events_file",),
                    ("tracks_file",), ("save_video",))


@dataclass(frozen=True)
class SiteConfig:
    """The validated cameras of one edge process; ``multi``: the file listed ``cameras:``."""

    cameras: list[EdgeConfig]
    node_id: str
    multi: bool

    def camera(self, camera_id: str) -> EdgeConfig:
        for cam in self.cameras:
            if cam.camera_id == camera_id:
                return cam
        raise ConfigError(f"no camera {camera_id!r} in the config (cameras: "
                          f"{', '.join(c.camera_id for c in self.cameras)})")


def default_node_id() -> str:
    """This machine's host name as one topic level (the process's name on the broker)."""
    name = "".join(c if c.isalnum() or c in "_.-" else "-" for c in socket.gethostname())[:58].strip("-.") or "edge"
    return f"edge-{name}" if not name.startswith("edge") else name


def _get(data: dict[str, Any], dotted: str) -> Any:
    node: Any = data
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def _deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """``over`` on top of ``base``: mappings merge key by key, anything else (lists too) replaces.

    >>> _deep_merge({"detector": {"conf": 0.2, "iou": 0.5}, "lines": [1]}, {"detector": {"conf": 0.3}, "lines": []})
    {'detector': {'conf': 0.3, 'iou': 0.5}, 'lines': []}
    """
    out = dict(base)
    for key, value in over.items():
        out[key] = _deep_merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) \
            else value
    return out


def _fill(data: dict[str, Any], camera_id: str) -> dict[str, Any]:
    """``{camera_id}`` in per-camera paths replaced by the camera's id."""
    for keys in PLACEHOLDER_KEYS:
        node = data
        for k in keys[:-1]:
            node = node.get(k) if isinstance(node.get(k), dict) else {}
        value = node.get(keys[-1])
        if isinstance(value, str) and "{camera_id}" in value:
            node[keys[-1]] = value.replace("{camera_id}", camera_id)
    return data


def load_site_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None,
                     camera: str | None = None) -> SiteConfig:
    """Read a one-camera or ``cameras:`` file, apply CLI ``overrides`` to every camera (``source`` and
    ``camera_id`` only to ``camera`` or a lone one), validate. Raises :class:`ConfigError` naming camera and key."""
    data = read_config_file(path) if path is not None else {}
    origin = str(path) if path is not None else "command line"
    overrides = {k: v for k, v in (overrides or {}).items() if v is not None}
    if "cameras" not in data:
        cfg = _validate(_merge(data, overrides), origin)
        if camera is not None and camera != cfg.camera_id:
            raise ConfigError(f"{origin}: no camera {camera!r} (this file configures {cfg.camera_id!r})")
        return SiteConfig([cfg], str(data.get("node_id") or default_node_id()), multi=False)
    shared = {k: v for k, v in data.items() if k not in ("cameras", "node_id")}
    entries = data["cameras"]
    if not isinstance(entries, list) or not entries or not all(isinstance(e, dict) for e in entries):
        raise ConfigError(f"{origin}: cameras: must be a list of camera mappings (camera_id, source, ...)")
    node_id = str(data.get("node_id") or default_node_id())
    if not is_valid_name(node_id):
        raise ConfigError(f"{origin}: node_id: {node_id!r} must be 1-64 chars of A-Z a-z 0-9 _ . - (one topic level)")
    ids = [str(e.get("camera_id", "")) for e in entries]
    if camera is not None:
        if camera not in ids:
            raise ConfigError(f"{origin}: no camera {camera!r} in cameras: ({', '.join(ids)})")
        entries = [entries[ids.index(camera)]]
    one_camera_keys = {k for k in ("source", "camera_id") if k in overrides}
    if one_camera_keys and len(entries) > 1:
        raise ConfigError(f"{origin}: --{'/--'.join(sorted(k.replace('_', '-') for k in one_camera_keys))} applies "
                          "to one camera: add --camera ID")
    cameras: list[EdgeConfig] = []
    errors: list[str] = []
    labels: list[str] = []
    for i, entry in enumerate(entries):
        label = f"{origin}: cameras[{ids.index(str(entry.get('camera_id', ''))) if camera else i}]" + (
            f" ({entry['camera_id']})" if entry.get("camera_id") else "")
        for key in SHARED_ONLY:
            if _get(entry, key) is not None and _get(entry, key) != _get(shared, key):
                errors.append(f"{label}: {key}: shared by every camera of the process (one site, one MQTT "
                              "connection and Last Will, one detector pool, one metrics server): set it once, outside cameras:")
        merged = _fill(_merge(_deep_merge(shared, entry), overrides), str(entry.get("camera_id", "")))
        try:
            cameras.append(_validate(merged, label))
            labels.append(label)
        except ConfigError as exc:
            errors.append(str(exc))
    errors += _across(cameras, labels, origin, node_id)
    if errors:
        raise ConfigError("\n".join(errors))
    return SiteConfig(cameras, node_id, multi=True)


def _validate(data: dict[str, Any], origin: str) -> EdgeConfig:
    try:
        return EdgeConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_format_errors(exc, origin)) from None


def _across(cameras: list[EdgeConfig], labels: list[str], origin: str, node_id: str) -> list[str]:
    """What no single camera can see wrong: two cameras with one id, one source, one output file."""
    errors = []
    seen: dict[tuple[str, str], str] = {}
    for cam, label in zip(cameras, labels, strict=True):
        if cam.camera_id == node_id:
            errors.append(f"{origin}: node_id: {node_id!r} is also a camera id; the process needs its own name")
        if ("camera_id", cam.camera_id) in seen:
            errors.append(f"{label}: camera_id: same as camera {cam.camera_id}: every camera needs its own id")
            continue  # its default files collide too: one error is enough
        checks = [("camera_id", cam.camera_id), ("source", cam.source)] + [
            (key, str(value)) for key in PER_CAMERA_FILES
            if (value := (getattr(cam, key)() if callable(getattr(cam, key)) else getattr(cam, key))) is not None]
        for key, value in checks:
            other = seen.get((key, value))
            if other is not None:
                hint = "" if key == "source" else " (use {camera_id} in the path)"
                name = {"outbox_path": "outbox.path", "model_dir": "model_updates.dir"}.get(key, key)
                errors.append(f"{label}: {name}: same as camera {other}: {value}{hint}")
            else:
                seen[(key, value)] = cam.camera_id
    return errors

"""The edge configuration: one YAML file plus command-line overrides, validated once at start-up.

Every section is a pydantic model with ``extra="forbid"``, so a typo is an error that names its path
(``motion.treshold: unknown key``) instead of a silently ignored setting. See ``samples/edge*.yaml``.

>>> cfg = load_config(overrides={"camera_id": "cam-1", "source": "0", "model": __file__})
>>> cfg.site, cfg.motion_enabled(live=True), cfg.motion_enabled(live=False)
('default', True, False)
"""

from __future__ import annotations

import os
import re
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from camera.filters import FilterSpec, MaskSpec
from camera.sampler import SamplesSpec
from camera.tracker import TrackerSpec
from camera.zones import LineSpec, ZoneSpec
from contract.broker import BrokerSettings
from contract.topics import is_valid_name


class ConfigError(ValueError):
    """Invalid configuration; the message lists every problem with its path, one per line."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class DetectorConfig(_Strict):
    conf: float = Field(0.1, gt=0, lt=1, description="minimum detection confidence; low on purpose: the tracker "
                        "continues tracks with detections from tracker.low_score and starts them only from "
                        "tracker.new_track_score (docs/counting.md)")
    iou: float = Field(0.45, gt=0, le=1, description="NMS IoU threshold")
    classes: list[str] = Field(default_factory=lambda: ["person"], min_length=1,
                               description="class names to detect (the model's names)")
    threads: int | None = Field(None, ge=1, le=64,
                                description="inference threads per stream (default: the cores shared by the streams)")
    streams: int | None = Field(None, ge=1, le=16,
                                description="frames in the detector at once, in order (default: see docs)")
    batch: int = Field(1, ge=1, le=32, description="several cameras in one process: run up to this many waiting "
                       "frames of one model in one network call when the model's batch is dynamic (smartcam-model "
                       "build makes it so; 1: one frame per call)")
    regions: Literal["auto", "lines", "off"] = Field(
        "auto", description="also detect on tiles around the counting lines at region_scale x the model input, "
        "merged with the full frame (camera/regions.py); auto = only when that sees the lines >= 1.3x sharper")
    region_scale: float = Field(1.5, gt=0.5, le=4, description="a region tile's size in model inputs (1.5: 480x384 "
                                "source pixels for a 256x320 model)")
    provider: str = Field("cpu", description="onnxruntime execution provider: cpu, openvino, cuda, ... (falls "
                                             "back to the CPU with a warning when missing)")
    provider_options: dict[str, str] = Field(default_factory=dict,
                                             description="provider options, e.g. {device_type: GPU} for OpenVINO")

    @field_validator("regions", mode="before")
    @classmethod
    def _yaml_off(cls, value: Any) -> Any:
        """YAML reads a bare ``off`` / ``on`` as false / true: take them as the words they were."""
        return {False: "off", True: "lines"}.get(value, value) if isinstance(value, bool) else value

    @field_validator("provider")
    @classmethod
    def _known_provider(cls, value: str) -> str:
        from camera.detector import PROVIDER_NAMES

        if value.lower() not in PROVIDER_NAMES and not value.endswith("ExecutionProvider"):
            raise ValueError(f"unknown execution provider {value!r}: one of {', '.join(PROVIDER_NAMES)}")
        return value


class MotionConfig(_Strict):
    enabled: Literal["auto"] | bool = Field("auto", description="auto = on for live sources, off for files")
    threshold: float = Field(0.003, ge=0, le=1, description="changed-area fraction that counts as motion")
    pixel_threshold: int = Field(25, ge=1, le=255, description="grey-level change that counts a pixel as changed")
    keepalive_s: float = Field(5.0, gt=0, description="run the detector at least this often, motion or not")


class MqttConfig(_Strict):
    broker: str | None = Field(None, description="mqtt://[user[:pw]@]host[:port] or mqtts://...; none = offline")
    username: str | None = Field(None, description="MQTT user (or in the broker URL)")
    password: str | None = Field(None, description="better: $SMARTCAM_MQTT_PASSWORD")
    tls_ca: Path | None = Field(None, description="CA certificate that signed the broker's (mqtts://)")
    tls_insecure: bool = Field(False, description="skip the broker hostname check (testing only)")
    client_id: str | None = Field(None, description="default smartcam-edge-<site>-<camera_id>")
    stats_interval_s: float = Field(60.0, gt=0, description="seconds between stats messages (health; status is "
                                                             "immediate via the retained topic and Last Will)")
    window: int = Field(200, ge=1, le=10000, description="unacknowledged messages in flight at most")

    @field_validator("broker")
    @classmethod
    def _check_broker(cls, value: str | None) -> str | None:
        if value is not None:
            BrokerSettings.from_url(value)  # raises ValueError with the reason
        return value

    @field_validator("tls_ca")
    @classmethod
    def _check_ca(cls, value: Path | None) -> Path | None:
        if value is not None and not value.is_file():
            raise ValueError(f"CA file not found: {value}")
        return value

    def settings(self) -> BrokerSettings:
        assert self.broker is not None
        return BrokerSettings.from_url(self.broker, ca_file=str(self.tls_ca) if self.tls_ca else None,
                                       username=self.username, password=self.password, insecure=self.tls_insecure)


class OutboxConfig(_Strict):
    path: Path | None = Field(None, description="SQLite file; default <dir>/<site>-<camera_id>.outbox.db")
    dir: Path | None = Field(None, description="where the default outbox files live (one per camera); default "
                             "$XDG_STATE_HOME/smartcam")
    max_events: int = Field(100_000, ge=1, description="bounded: beyond it the oldest are dropped and counted")
    max_rejections: int = Field(5, ge=1, le=1000, description="a message the broker rejects (e.g. not authorized) "
                                "is sent again after a backoff; after this many rejections its rows become dead "
                                "letters, kept in the outbox file (smartcam-edge outbox dead-letters)")
    retry_s: float = Field(5.0, gt=0, le=3600, description="first wait before a rejected message is sent again; "
                           "doubles after each rejection, up to 5 minutes")


class BatchConfig(_Strict):
    """Batching of the events topic: several events in one zlib-compressed message (docs/mqtt.md)."""

    linger_s: float = Field(2.0, ge=0, le=3600, description="wait up to this long to fill a batch on "
                            "smartcam/<site>/<camera>/batch; 0 = one message per event on .../events")
    max_events: int = Field(500, ge=1, le=10_000, description="events per batch message at most")
    max_bytes: int = Field(256 * 1024, ge=1024, le=4 * 1024 * 1024,
                           description="uncompressed JSON Lines bytes per batch message at most")
    retained_interval_s: float = Field(10.0, ge=0, le=3600, description="with batching, republish each retained "
                                       "summary (count, zone count, line totals) at most this often, newest only; "
                                       "every change is still in the batches")


class ModelUpdatesConfig(_Strict):
    """Over-the-air model updates from the registry (camera/model_updates.py, docs/models-ota.md)."""

    enabled: bool = Field(False, description="follow the desired model on smartcam/<site>/<camera>/model/desired "
                          "and smartcam/<site>/model/desired (needs mqtt.broker)")
    trust_key: Path | None = Field(None, description="signing.pub of the registry: models whose manifest "
                                   "signature does not verify with it are refused")
    allow_unsigned: bool = Field(False, description="accept models without a valid signature (testing only)")
    dir: Path | None = Field(None, description="where downloaded models and current.json live; default "
                             "$XDG_STATE_HOME/smartcam/<site>-<camera_id>.models")
    probation_s: float = Field(60.0, ge=0, description="after a swap, watch the new model this long and roll back "
                               "on inference errors, latency or detection-rate collapse")
    max_bytes: int = Field(200 * 1024 * 1024, ge=1024, description="largest model file accepted for download")
    download_timeout_s: float = Field(30.0, gt=0, description="a download with no data for this long is abandoned")
    health_frames: int = Field(8, ge=0, le=64, description="recent frames the new model is health-checked on "
                               "before it serves (0 = load check only)")
    max_latency_factor: float = Field(5.0, gt=1, description="refuse / roll back a model this many times slower "
                                      "than the current one on the same frames")
    min_detection_ratio: float = Field(0.5, ge=0, le=1, description="refuse / roll back a model that finds people "
                                       "on fewer than this share of the frames where the current one does")

    @field_validator("trust_key")
    @classmethod
    def _check_key(cls, value: Path | None) -> Path | None:
        if value is not None and not value.is_file():
            raise ValueError(f"trust key not found: {value}")
        if value is not None:
            from contract.signature import load_public_key

            load_public_key(value)  # not an ed25519 public key: a clear error now, not at the first deploy
        return value

    @model_validator(mode="after")
    def _signed(self) -> ModelUpdatesConfig:
        if self.enabled and self.trust_key is None and not self.allow_unsigned:
            raise ValueError("model_updates.enabled needs trust_key (the registry's signing.pub), or "
                             "allow_unsigned: true")
        return self


class PublishConfig(_Strict):
    """What the edge sends and how the outbox is published to the broker."""

    mode: Literal["events", "summary"] = Field("events", description="events = every event (batched, see batch); "
                                               "summary = one summary.v1 message per window, for metered links")
    summary_interval_s: int = Field(60, description="summary mode: window length in seconds; must divide 3600 "
                                    "(10, 15, 20, 30, 60, 120, 300, 600, 900, 1800, 3600, ...)")
    batch: BatchConfig = Field(default_factory=BatchConfig)
    confirm: Literal["sink", "broker"] = Field(
        "broker", description="when an event leaves the outbox: broker = on the broker's PUBACK (works with any "
        "consumer); sink = only once smartcam-sink confirms it committed it (on .../ack), re-sent if that does not "
        "come within confirm_timeout_s: nothing is lost even if the broker crashes (camera/confirm.py)")
    confirm_timeout_s: float = Field(30.0, gt=0, description="confirm: sink: send an event again if the sink has "
                                     "not confirmed it this long after the broker's PUBACK")

    @field_validator("summary_interval_s")
    @classmethod
    def _check_interval(cls, value: int) -> int:
        from contract.rollup import WINDOW_CHOICES

        if value not in WINDOW_CHOICES:
            raise ValueError(f"must be at least 10 and divide 3600 (an hour), e.g. 60 or 300; got {value}")
        return value


class HomeAssistantConfig(_Strict):
    """Home Assistant MQTT discovery: the camera appears as one device (camera/homeassistant.py, README)."""

    enabled: bool = Field(False, description="publish retained discovery documents so Home Assistant finds the "
                          "camera's entities by itself")
    discovery_prefix: str = Field("homeassistant", description="Home Assistant's MQTT discovery prefix (its "
                                  "birth message is read on <prefix>/status)")

    @field_validator("discovery_prefix")
    @classmethod
    def _check_prefix(cls, value: str) -> str:
        if not value or any(c in value for c in "+#\0") or value.startswith("/") or value.endswith("/"):
            raise ValueError(f"{value!r} is not an MQTT topic prefix (no + or #, no leading or trailing /)")
        return value


class MetricsConfig(_Strict):
    """Prometheus metrics of the edge (camera/metrics.py)."""

    listen: str | None = Field(None, description="HOST:PORT to serve /metrics on, e.g. 127.0.0.1:9108; "
                               "none = off")

    @field_validator("listen")
    @classmethod
    def _check_listen(cls, value: str | None) -> str | None:
        if value is not None:
            host, sep, port = value.rpartition(":")
            if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
                raise ValueError(f"{value!r} must be HOST:PORT, e.g. 127.0.0.1:9108")
        return value


class EdgeConfig(_Strict):
    camera_id: str = Field(description="camera name, one MQTT topic level")
    site: str = Field("default", description="site name, one MQTT topic level")
    source: str = Field(description="video file, image folder, webcam index, rtsp:// or http:// URL, picamera[:N]")
    model: Path = Field(description="detection ONNX (INT8 from smartcam-model build, or fp32)")
    detector: DetectorConfig = Field(default_factory=DetectorConfig)
    motion: MotionConfig = Field(default_factory=MotionConfig)
    fps: float | None = Field(None, gt=0, description="target processing rate; frames beyond it are skipped")
    realtime: bool = Field(False, description="pace a file to its own frame rate")
    loop: int = Field(1, ge=0, description="files and image folders: play this many times, time "
                      "running on (0 = forever)")
    start_time: datetime | None = Field(None, description="files: timestamp of the first frame (default: now)")
    tracker: TrackerSpec = Field(default_factory=TrackerSpec)
    filters: FilterSpec = Field(default_factory=FilterSpec)
    masks: list[MaskSpec] = Field(default_factory=list)
    zones: list[ZoneSpec] = Field(default_factory=list)
    lines: list[LineSpec] = Field(default_factory=list)
    mqtt: MqttConfig = Field(default_factory=MqttConfig)
    publish: PublishConfig = Field(default_factory=PublishConfig)
    outbox: OutboxConfig = Field(default_factory=OutboxConfig)
    samples: SamplesSpec = Field(default_factory=SamplesSpec)
    homeassistant: HomeAssistantConfig = Field(default_factory=HomeAssistantConfig)
    metrics: MetricsConfig = Field(default_factory=MetricsConfig)
    events_file: Path | None = Field(None, description="append every event as one JSON line (audit, offline)")
    save_video: Path | None = Field(None, description="annotated video (boxes, ids, zones, lines, counts)")
    tracks_file: Path | None = Field(None, description="every person track's box per processed frame, "
                                     "MOTChallenge text (frame, id, x, y, w, h, score, -1, -1, -1), for scoring")
    max_frames: int | None = Field(None, ge=1, description="stop after this many processed frames")
    drain_timeout_s: float = Field(30.0, ge=0, description="end of file: wait this long for the broker's acks")
    model_updates: ModelUpdatesConfig = Field(default_factory=ModelUpdatesConfig)

    @field_validator("camera_id", "site")
    @classmethod
    def _check_name(cls, value: str) -> str:
        if not is_valid_name(value):
            raise ValueError(f"{value!r} must be 1-64 chars of A-Z a-z 0-9 _ . - (one MQTT topic level)")
        return value

    @field_validator("model")
    @classmethod
    def _check_model(cls, value: Path) -> Path:
        if not value.is_file():
            raise ValueError(f"model file not found: {value}")
        return value

    @field_validator("start_time")
    @classmethod
    def _utc(cls, value: datetime | None) -> datetime | None:
        if value is not None and value.tzinfo is None:
            value = value.replace(tzinfo=timezone.utc)  # naive ISO times are UTC, like every event timestamp
        return value

    @model_validator(mode="after")
    def _unique_names(self) -> EdgeConfig:
        for what, items in (("zones", self.zones), ("lines", self.lines)):
            names = [i.name for i in items]
            dupes = sorted({n for n in names if names.count(n) > 1})
            if dupes:
                raise ValueError(f"{what}: duplicate name(s) {', '.join(dupes)}")
        if self.homeassistant.enabled and self.publish.mode == "summary":
            raise ValueError("homeassistant.enabled needs publish.mode events: summary mode sends no retained "
                             "count, zone or line topics for Home Assistant to read")
        return self

    def motion_enabled(self, live: bool) -> bool:
        return live if self.motion.enabled == "auto" else bool(self.motion.enabled)

    def outbox_path(self) -> Path:
        if self.outbox.path:
            return self.outbox.path
        state = self.outbox.dir or Path(os.environ.get("XDG_STATE_HOME") or Path.home() / ".local" / "state") / (
            "smartcam")
        return state / f"{self.site}-{self.camera_id}.outbox.db"

    def start_epoch(self) -> float | None:
        return self.start_time.timestamp() if self.start_time else None

    def model_dir(self) -> Path:
        if self.model_updates.dir:
            return self.model_updates.dir
        state = Path(os.environ.get("XDG_STATE_HOME") or Path.home() / ".local" / "state")
        return state / "smartcam" / f"{self.site}-{self.camera_id}.models"

    @model_validator(mode="after")
    def _updates_need_broker(self) -> EdgeConfig:
        if self.model_updates.enabled and not self.mqtt.broker:
            raise ValueError("model_updates.enabled needs mqtt.broker: desired models arrive over MQTT")
        return self


def _merge(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """Deep-merge ``overrides`` (dotted keys allowed: ``mqtt.broker``) into a copy of ``base``; None = not given."""
    out = {k: (dict(v) if isinstance(v, dict) else v) for k, v in base.items()}
    for key, value in overrides.items():
        if value is None:
            continue
        node = out
        *parents, leaf = key.split(".")
        for p in parents:
            if not isinstance(node.get(p), dict):
                node[p] = {}
            node[p] = dict(node[p])
            node = node[p]
        node[leaf] = value
    return out


def _format_errors(exc: ValidationError, origin: str) -> str:
    lines = []
    for err in exc.errors():
        path = ".".join(str(p) for p in err["loc"]) or "<root>"
        msg = "unknown key" if err["type"] == "extra_forbidden" else err["msg"].removeprefix("Value error, ")
        lines.append(f"{origin}: {path}: {msg}")
    return "\n".join(lines)


def read_config_file(path: str | Path) -> dict[str, Any]:
    """The YAML mapping in ``path``; :class:`ConfigError` for an unreadable file or one that is not a mapping."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror or exc}") from None
    try:
        loaded = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {str(exc).splitlines()[0]}") from None
    if loaded is not None and not isinstance(loaded, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of settings")
    return loaded or {}  # relative paths are relative to the working directory, as on the command line


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> EdgeConfig:
    """Read the YAML file (if any), apply CLI overrides, validate. Raises :class:`ConfigError`.
    (A file listing ``cameras:`` is read by camera/site_config.py.)"""
    data: dict[str, Any] = read_config_file(path) if path is not None else {}
    origin = str(path) if path is not None else "command line"
    if "cameras" in data:
        raise ConfigError(f"{origin}: lists cameras: read it with camera.site_config.load_site_config")
    merged = _merge(data, overrides or {})
    try:
        return EdgeConfig.model_validate(merged)
    except ValidationError as exc:
        raise ConfigError(_format_errors(exc, origin)) from None


def config_reference() -> str:
    """The edge config keys as a Markdown table (key, type, default, meaning), generated from the models above
    so the documentation cannot drift from what is validated. ``python -c "from camera.config import *;
    print(config_reference())"``."""
    import typing

    from pydantic import BaseModel as _Base
    from pydantic_core import PydanticUndefined

    rows = ["| key | type | default | meaning |", "| --- | --- | --- | --- |"]

    def type_name(tp: Any) -> str:
        text = str(tp).replace("typing.", "").replace("pathlib.", "").replace("datetime.", "")
        text = re.sub(r"<class '([\w.]+)'>", lambda m: m.group(1).rsplit(".", 1)[-1], text)
        text = text.replace(" | None", ", optional").replace("Union[Literal['auto'], bool]", "auto / true / false")
        return text.replace("|", "/")

    def summary(doc: str | None) -> str:
        text = " ".join((doc or "").split())
        return text.split(". ")[0].rstrip(".").replace("``", "`")

    def walk(model: type[_Base], prefix: str) -> None:
        for name, field in model.model_fields.items():
            key = f"{prefix}{name}"
            tp = field.annotation
            args = typing.get_args(tp)
            inner = next((a for a in (tp, *args) if isinstance(a, type) and issubclass(a, _Base)), None)
            if inner is not None and typing.get_origin(tp) is list:
                rows.append(f"| `{key}` | list | `[]` | {summary(inner.__doc__)} |")
                walk(inner, f"{key}[].")
                continue
            if inner is not None:
                walk(inner, f"{key}.")
                continue
            if field.default is PydanticUndefined and field.default_factory is None:
                default = "**required**"
            else:
                value = field.default_factory() if field.default_factory else field.default
                default = f"`{value}`" if value is not None else "none"
            rows.append(f"| `{key}` | {type_name(tp)} | {default} | {(field.description or '').replace('|', '/')} |")

    walk(EdgeConfig, "")
    return "\n".join(rows)

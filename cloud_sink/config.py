"""The sink's settings: one typed object from an optional YAML file plus command-line overrides.

Validated once at start-up (pydantic), so a typo is a one-line error before anything connects.

>>> SinkConfig().db
'sqlite:///smartcam.db'
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from cloud_sink.validation import Limits
from contract.timestamps import DEFAULT_MAX_PAST_DAYS


class ConfigError(ValueError):
    """A bad config file or value, worded for the user."""


class SinkConfig(BaseModel):
    """Every ``smartcam-sink run`` option; see samples/sink.yaml."""

    model_config = ConfigDict(extra="forbid")

    broker: str = "mqtt://127.0.0.1:1883"
    db: str = "sqlite:///smartcam.db"
    http: str | None = None  # host:port for the read-only API and dashboard
    http_token: str | None = None  # bearer token; required off-loopback (also $SMARTCAM_API_TOKEN)
    http_token_file: str | None = None  # a file holding the token (not visible in ps, unlike http_token)
    http_allowed_hosts: list[str] | None = None  # Host names the API answers; default: see api.allowed_hosts
    archive: str | None = None  # directory or s3://bucket/prefix
    archive_interval_s: float = Field(5.0, gt=0, le=3600)  # between archive rounds (one part per hour/camera each)
    samples_store: str | None = None  # sampled frames: directory or s3://bucket/prefix (default: archive)
    max_sample_bytes: int = Field(2 * 1024 * 1024, ge=1024)  # a larger sample is dead-lettered
    share_group: str | None = None  # MQTT 5 shared subscription group: several workers split the load
    client_id: str = "smartcam-sink"  # fixed: the persistent session is keyed by it (unique per worker)
    tls_ca: str | None = None
    username: str | None = None  # password: in the URL or $SMARTCAM_MQTT_PASSWORD
    session_expiry_s: int = Field(7 * 86400, ge=60)  # how long the broker queues for us while we are down
    batch_size: int = Field(500, ge=1, le=20000)
    batch_wait_ms: float = Field(50.0, gt=0, le=10000)
    max_payload_bytes: int = Field(64 * 1024, ge=1024)
    max_depth: int = Field(16, ge=2, le=256)
    max_future_s: float = Field(3600.0, ge=0)  # event times later than the sink's clock + this are dead letters
    max_past_days: float = Field(DEFAULT_MAX_PAST_DAYS, gt=0)  # ... and earlier than its clock - this
    dead_letters_per_minute: float = Field(60.0, gt=0)  # per camera, sustained (more: counted, not stored)
    dead_letter_burst: int = Field(100, ge=1)  # per camera, at once
    dead_letter_cap: int = Field(100_000, ge=100)  # rows kept at most (the oldest go first)
    dead_letter_days: float = Field(30.0, gt=0)  # and none older than this
    log_every_s: float = Field(10.0, gt=0)

    @field_validator("share_group", "client_id")
    @classmethod
    def _topic_safe(cls, value: str | None) -> str | None:
        if value is not None and (not value or any(c in value for c in "/+#")):
            raise ValueError("must be non-empty without '/', '+' or '#'")
        return value

    def limits(self) -> Limits:
        return Limits(max_bytes=self.max_payload_bytes, max_depth=self.max_depth, max_future_s=self.max_future_s,
                      max_past_s=self.max_past_days * 86400.0, dead_letters_per_minute=self.dead_letters_per_minute,
                      dead_letter_burst=self.dead_letter_burst)

    def http_address(self) -> tuple[str, int] | None:
        """``host:port`` → (host, port); None when the API is off."""
        if not self.http:
            return None
        host, sep, port = self.http.rpartition(":")
        if not sep or not port.isdigit() or not host:
            raise ConfigError(f"--http {self.http!r}: expected HOST:PORT, e.g. 127.0.0.1:8080")
        return host.strip("[]"), int(port)


def load_config(path: str | Path | None, overrides: dict[str, Any]) -> SinkConfig:
    """YAML file (optional) then non-None overrides; raise ConfigError with a readable reason."""
    data: dict[str, Any] = {}
    if path:
        import yaml

        try:
            loaded = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
        except OSError as exc:
            raise ConfigError(f"cannot read config {path}: {exc.strerror}") from None
        except yaml.YAMLError as exc:
            raise ConfigError(f"config {path} is not valid YAML: {exc}") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"config {path}: expected a mapping of option: value")
        data.update(loaded)
    data.update({k: v for k, v in overrides.items() if v is not None})
    try:
        return SinkConfig(**data)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise ConfigError(f"config option {where}: {first['msg']}") from None

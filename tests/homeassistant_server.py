"""Start a real Home Assistant (PyPI ``homeassistant`` 2024.3.3 in its own virtualenv, ``.venv-ha``) for tests.

Home Assistant pins its own SQLAlchemy, pydantic, aiohttp..., so it lives in ``$SMARTCAM_HA_VENV`` (default
``.venv-ha``, made by ``scripts/setup.sh dev``), never in the project's venv. The config dir is written from
scratch: a minimal ``configuration.yaml`` (http + api only: no frontend, recorder or default_config, so it starts
in seconds), the MQTT integration as a config entry pointing at the test's Mosquitto (since 2022.12 the broker
cannot be set in YAML), finished onboarding, and an owner user with a long-lived access token: the auth store
holds the refresh token, and the access token is the HS256 JWT Home Assistant itself would issue for it.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import secrets
import signal
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from tests.services import free_port, wait_for_port

ROOT = Path(__file__).resolve().parents[1]
HA_VENV = Path(os.environ.get("SMARTCAM_HA_VENV", ROOT / ".venv-ha"))


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def hs256_jwt(claims: dict, key: str) -> str:
    """A JSON Web Token signed with HMAC-SHA256 (RFC 7519), the form of Home Assistant's access tokens."""
    head = _b64(json.dumps({"alg": "HS256", "typ": "JWT"}, separators=(",", ":")).encode())
    body = _b64(json.dumps(claims, separators=(",", ":")).encode())
    sig = hmac.new(key.encode(), f"{head}.{body}".encode(), hashlib.sha256).digest()
    return f"{head}.{body}.{_b64(sig)}"


def _store(key: str, data: dict, version: int = 1, minor: int = 1) -> str:
    return json.dumps({"version": version, "minor_version": minor, "key": key, "data": data}, indent=1)


@dataclass
class HomeAssistant:
    """A running Home Assistant; ``get(path)`` calls its REST API with the test's token."""

    port: int
    config_dir: Path
    token: str
    proc: subprocess.Popen

    @property
    def log(self) -> str:
        path = self.config_dir / "home-assistant.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def get(self, path: str):
        req = urllib.request.Request(f"http://127.0.0.1:{self.port}{path}",
                                     headers={"Authorization": f"Bearer {self.token}"})
        try:
            with urllib.request.urlopen(req, timeout=10) as resp:
                return json.loads(resp.read())
        except urllib.error.HTTPError as exc:
            if exc.code == 404:
                return None
            raise

    def state(self, entity_id: str) -> dict | None:
        return self.get(f"/api/states/{entity_id}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


def write_config(config_dir: Path, http_port: int, mqtt_port: int) -> str:
    """Write a ready-to-start config dir; returns the access token for its REST API."""
    storage = config_dir / ".storage"
    storage.mkdir(parents=True, exist_ok=True)
    (config_dir / "configuration.yaml").write_text(
        "homeassistant:\n  name: smartcam-test\n  latitude: 0\n  longitude: 0\n  elevation: 0\n"
        "  unit_system: metric\n  time_zone: UTC\n  currency: EUR\n  country: NL\n"
        f"http:\n  server_host: 127.0.0.1\n  server_port: {http_port}\napi:\n"
        "logger:\n  default: warning\n  logs:\n    homeassistant.components.mqtt: info\n")
    now = datetime.now(timezone.utc).isoformat()
    (storage / "core.config_entries").write_text(_store("core.config_entries", {"entries": [{
        "entry_id": secrets.token_hex(16), "version": 1, "minor_version": 1, "domain": "mqtt", "title": "Mosquitto",
        "data": {"broker": "127.0.0.1", "port": mqtt_port, "discovery": True}, "options": {},
        "pref_disable_new_entities": False, "pref_disable_polling": False, "source": "user", "unique_id": None,
        "disabled_by": None}]}))
    (storage / "onboarding").write_text(_store("onboarding", {"done": ["user", "core_config", "analytics",
                                                                      "integration"]}, version=4))
    user_id, token_id, jwt_key = secrets.token_hex(16), secrets.token_hex(16), secrets.token_hex(64)
    (storage / "auth").write_text(_store("auth", {
        "users": [{"id": user_id, "group_ids": ["system-admin"], "is_owner": True, "is_active": True,
                   "name": "smartcam test", "system_generated": False, "local_only": False}],
        "groups": [{"id": "system-admin", "name": "Administrators"}, {"id": "system-users", "name": "Users"},
                   {"id": "system-read-only", "name": "Read Only"}],
        "credentials": [],
        "refresh_tokens": [{"id": token_id, "user_id": user_id, "client_id": None, "client_name": "smartcam tests",
                            "client_icon": None, "token_type": "long_lived_access_token", "created_at": now,
                            "access_token_expiration": 86400.0 * 365, "token": secrets.token_hex(64),
                            "jwt_key": jwt_key, "last_used_at": None, "last_used_ip": None, "expire_at": None,
                            "credential_id": None, "version": "2024.3.3"}]}))
    iat = int(time.time()) - 60
    return hs256_jwt({"iss": token_id, "iat": iat, "exp": iat + 86400 * 365}, jwt_key)


def start_homeassistant(config_dir: Path, mqtt_port: int, timeout: float = 90.0) -> HomeAssistant:
    """Start ``hass`` on 127.0.0.1:<free port> and wait until its API answers and MQTT is connected."""
    hass = HA_VENV / "bin" / "hass"
    if not hass.exists():
        raise FileNotFoundError(f"Home Assistant is not installed at {HA_VENV}: run scripts/setup.sh dev")
    port = free_port()
    token = write_config(config_dir, port, mqtt_port)
    log = open(config_dir / "stdout.log", "ab")  # noqa: SIM115 - the child keeps its own descriptor
    proc = subprocess.Popen([str(hass), "--config", str(config_dir), "--skip-pip", "--log-no-color"],
                            stdout=log, stderr=log, cwd=config_dir)
    log.close()
    ha = HomeAssistant(port=port, config_dir=config_dir, token=token, proc=proc)
    deadline = time.monotonic() + timeout
    try:
        wait_for_port(port, timeout)
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"hass exited with {proc.returncode}")
            try:
                if ha.get("/api/config").get("state") == "RUNNING" and "mqtt" in ha.get("/api/config")["components"]:
                    return ha
            except (urllib.error.URLError, ConnectionError):
                pass
            time.sleep(0.25)
        raise TimeoutError("Home Assistant did not reach RUNNING with MQTT loaded")
    except BaseException as exc:
        ha.stop()
        tail = (config_dir / "stdout.log").read_text(errors="replace")[-3000:]
        raise RuntimeError(f"Home Assistant did not start ({exc}):\n{tail}") from None

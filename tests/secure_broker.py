"""A broker deployed from exactly what ``deploy/make-credentials.sh`` writes (its mosquitto.conf with free
loopback ports, hashed passwords, the generated ACL, a CA and server certificate), and a paho client that
records every CONNACK, SUBACK, PUBACK and message: shared by the security and fault tests."""

from __future__ import annotations

import os
import shutil
import subprocess
import threading
from dataclasses import dataclass
from pathlib import Path

from contract.broker import BrokerSettings, make_client
from tests.services import ROOT, Mosquitto, free_port, wait_for_port

SCRIPT = ROOT / "deploy" / "make-credentials.sh"
SITE = "lobby"  # the site the deployment is generated for
WAIT = 10.0  # seconds to wait for something that must happen


@dataclass
class SecureBroker:
    """A Mosquitto started from the generated deployment, plus what clients need to reach it."""

    broker: Mosquitto
    conf_dir: Path
    plain_port: int
    tls_port: int
    passwords: dict[str, str]

    @property
    def ca_file(self) -> str:
        return str(self.conf_dir / "ca.crt")

    def url(self, user: str | None = None, password: str | None = None, tls: bool = False) -> str:
        cred = ""
        if user:
            cred = f"{user}:{self.passwords[user] if password is None else password}@"
        scheme, port = ("mqtts", self.tls_port) if tls else ("mqtt", self.plain_port)
        return f"{scheme}://{cred}127.0.0.1:{port}"

    def settings(self, user: str | None = None, password: str | None = None, tls: bool = False) -> BrokerSettings:
        return BrokerSettings.from_url(self.url(user, password, tls), ca_file=self.ca_file if tls else None)


def make_deployment(base: Path, cameras: tuple[str, ...] = ("cam1", "cam2"), sink: str = "sink",
                    deployers: tuple[str, ...] = ()) -> Path:
    """Run the credentials script into ``base/conf`` with broker data in ``base/data``; return the conf dir."""
    conf_dir, data_dir = base / "conf", base / "data"
    args = [str(SCRIPT), str(conf_dir), "--site", SITE, "--sink", sink, "--data-dir", str(data_dir)]
    for cam in cameras:
        args += ["--camera", cam]
    for deployer in deployers:
        args += ["--deployer", deployer]
    subprocess.run(args, check=True, capture_output=True, text=True)
    data_dir.mkdir()
    if os.geteuid() == 0:  # mosquitto drops to user "mosquitto" and must write its persistence file here
        shutil.chown(data_dir, "mosquitto", "mosquitto")
    return conf_dir


def read_passwords(conf_dir: Path) -> dict[str, str]:
    out = {}
    for env in (conf_dir / "clients").glob("*.env"):
        values = dict(line.split("=", 1) for line in env.read_text().splitlines() if "=" in line)
        out[values["SMARTCAM_MQTT_USER"]] = values["SMARTCAM_MQTT_PASSWORD"]
    return out


def start_secure_broker(base: Path, deployers: tuple[str, ...] = ()) -> SecureBroker:
    """Generate a deployment under ``base`` and start Mosquitto from it on two free loopback ports."""
    conf_dir = make_deployment(base, deployers=deployers)
    plain_port, tls_port = free_port(), free_port()
    conf = conf_dir / "mosquitto.conf"
    text = conf.read_text()
    assert "listener 8883\n" in text and "listener 1883 127.0.0.1\n" in text, "shipped listeners changed"
    text = text.replace("listener 8883\n", f"listener {tls_port} 127.0.0.1\n")
    text = text.replace("listener 1883 127.0.0.1\n", f"listener {plain_port} 127.0.0.1\n")
    conf.write_text(text)
    broker = Mosquitto(port=plain_port, conf_path=conf, log_path=base / "mosquitto.log")
    broker.start()
    wait_for_port(tls_port)
    return SecureBroker(broker, conf_dir, plain_port, tls_port, read_passwords(conf_dir))


class Client:
    """A connected paho client that records its CONNACK, SUBACKs, PUBACKs and received messages."""

    def __init__(self, settings: BrokerSettings, client_id: str, *, mqtt5: bool = True):
        self.settings = settings
        self.mqtt5 = mqtt5
        self.paho = make_client(settings, client_id, mqtt5=mqtt5)
        self.paho.reconnect_delay_set(30, 60)  # a refused client must not hammer the broker during the test
        self.connack = None
        self.connected = threading.Event()
        self.messages: list[tuple[str, bytes]] = []
        self.got = threading.Condition()
        self.pubacks: dict[int, object] = {}
        self.subacks: dict[int, list] = {}
        self.paho.on_connect = self._on_connect
        self.paho.on_message = self._on_message
        self.paho.on_publish = self._on_publish
        self.paho.on_subscribe = self._on_subscribe

    def _on_connect(self, client, userdata, flags, reason_code, properties):
        self.connack = reason_code
        self.connected.set()

    def _on_message(self, client, userdata, msg):
        with self.got:
            self.messages.append((msg.topic, msg.payload))
            self.got.notify_all()

    def _on_publish(self, client, userdata, mid, reason_code, properties):
        with self.got:
            self.pubacks[mid] = reason_code
            self.got.notify_all()

    def _on_subscribe(self, client, userdata, mid, reason_codes, properties):
        with self.got:
            self.subacks[mid] = reason_codes
            self.got.notify_all()

    def connect(self, **kwargs):
        """Connect and return the CONNACK reason code (raises ssl errors from the TLS handshake)."""
        self.paho.connect(self.settings.host, self.settings.port, keepalive=30, **kwargs)
        self.paho.loop_start()
        assert self.connected.wait(WAIT), "no CONNACK"
        return self.connack

    def subscribe(self, topic: str) -> list:
        _, mid = self.paho.subscribe(topic, qos=1)
        with self.got:
            assert self.got.wait_for(lambda: mid in self.subacks, WAIT), f"no SUBACK for {topic}"
            return self.subacks[mid]

    def publish(self, topic: str, payload: bytes):
        """Publish at QoS 1 and return the PUBACK reason code."""
        info = self.paho.publish(topic, payload, qos=1)
        with self.got:
            assert self.got.wait_for(lambda: info.mid in self.pubacks, WAIT), f"no PUBACK for {topic}"
            return self.pubacks[info.mid]

    def wait_for_payload(self, payload: bytes, timeout: float = WAIT) -> bool:
        with self.got:
            return self.got.wait_for(lambda: any(p == payload for _, p in self.messages), timeout)

    def received(self, payload: bytes) -> bool:
        with self.got:
            return any(p == payload for _, p in self.messages)

    def close(self) -> None:
        self.paho.disconnect()
        self.paho.loop_stop()

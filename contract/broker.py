"""Broker addresses and paho-mqtt client construction, shared by the edge publisher and the sink ingest.

A broker is one URL: ``mqtt://[user[:password]@]host[:port]`` or ``mqtts://...`` for TLS (default ports 1883 /
8883). The password may instead come from ``$SMARTCAM_MQTT_PASSWORD`` so it stays out of process listings.
MQTT 5 is used unless the URL ends in ``?protocol=3.1.1`` (e.g. for the embedded demo broker, which only speaks
3.1.1); ``persistent_connect_kwargs`` gives the right persistent-session arguments for either (the sink's
subscription, the tests' persistent subscribers).

Anything MQTT has no place for is refused rather than dropped: a path, a fragment, a space in the host, port 0.

>>> BrokerSettings.from_url("mqtts://cam1:secret@broker.local").port
8883
>>> BrokerSettings.from_url("mqtt://broker.local/smartcam")
Traceback (most recent call last):
ValueError: broker URL 'mqtt://broker.local/smartcam': no path allowed (MQTT has none; topics are not part of the URL)
"""

from __future__ import annotations

import os
import ssl
from dataclasses import dataclass
from urllib.parse import unquote, urlsplit

DEFAULT_PORTS = {"mqtt": 1883, "mqtts": 8883}


@dataclass(frozen=True)
class BrokerSettings:
    host: str
    port: int
    tls: bool = False
    username: str | None = None
    password: str | None = None
    ca_file: str | None = None  # CA bundle that signed the broker's certificate (TLS)
    cert_file: str | None = None  # client certificate (mutual TLS), optional
    key_file: str | None = None
    insecure: bool = False  # skip hostname verification (testing only)
    keepalive: int = 30
    mqtt5: bool = True  # False: MQTT 3.1.1 (URL query ?protocol=3.1.1)

    @classmethod
    def from_url(cls, url: str, *, ca_file: str | None = None, cert_file: str | None = None,
                 key_file: str | None = None, username: str | None = None, password: str | None = None,
                 insecure: bool = False) -> BrokerSettings:
        """Parse and check a broker URL; raise ValueError with a readable reason."""
        parts = urlsplit(url)
        if parts.scheme not in DEFAULT_PORTS:
            raise ValueError(f"broker URL {url!r}: scheme must be mqtt:// or mqtts://")
        if not parts.hostname:
            raise ValueError(f"broker URL {url!r}: no host")
        host = unquote(parts.hostname)
        if any(c.isspace() for c in host) or any(c in host for c in "/?#@"):
            raise ValueError(f"broker URL {url!r}: a space or / ? # @ in the host {host!r}")
        if parts.path:
            raise ValueError(f"broker URL {url!r}: no path allowed (MQTT has none; topics are not part of the URL)")
        if parts.fragment or url.endswith("#"):
            raise ValueError(f"broker URL {url!r}: no fragment allowed")
        try:
            port = parts.port
        except ValueError:
            raise ValueError(f"broker URL {url!r}: bad port") from None
        if port is None:
            port = DEFAULT_PORTS[parts.scheme]
        elif not 0 < port < 65536:
            raise ValueError(f"broker URL {url!r}: port must be 1-65535")
        query = dict(q.split("=", 1) for q in parts.query.split("&") if "=" in q)
        protocol = query.pop("protocol", "5")
        if protocol not in ("5", "3.1.1") or query:
            raise ValueError(f"broker URL {url!r}: the only query option is protocol=5 or protocol=3.1.1")
        user = username or (unquote(parts.username) if parts.username else None)
        pw = password or (unquote(parts.password) if parts.password else None) or os.environ.get(
            "SMARTCAM_MQTT_PASSWORD") if user else None
        for path, what in ((ca_file, "CA file"), (cert_file, "client certificate"), (key_file, "client key")):
            if path and not os.path.isfile(path):
                raise ValueError(f"{what} not found: {path}")
        return cls(host=host, port=port, tls=parts.scheme == "mqtts", username=user, password=pw,
                   ca_file=ca_file, cert_file=cert_file, key_file=key_file, insecure=insecure,
                   mqtt5=protocol == "5")

    def redacted(self) -> str:
        """The URL without the password, for logs."""
        scheme = "mqtts" if self.tls else "mqtt"
        user = f"{self.username}@" if self.username else ""
        query = "" if self.mqtt5 else "?protocol=3.1.1"
        return f"{scheme}://{user}{self.host}:{self.port}{query}"


def make_client(settings: BrokerSettings, client_id: str, *, mqtt5: bool | None = None, manual_ack: bool = False,
                persistent: bool = False):
    """A configured (not yet connected) paho-mqtt 2.x client with auth and TLS applied.

    ``mqtt5`` defaults to the URL's protocol. ``persistent`` asks for a broker-side session that survives
    disconnects (MQTT 3.1.1 sets it here, in the constructor; MQTT 5 sets it at connect time, see
    :func:`persistent_connect_kwargs`).
    """
    import paho.mqtt.client as mqtt

    use5 = settings.mqtt5 if mqtt5 is None else mqtt5
    kwargs = {} if use5 else {"clean_session": not persistent}
    client = mqtt.Client(
        mqtt.CallbackAPIVersion.VERSION2,
        client_id=client_id,
        protocol=mqtt.MQTTv5 if use5 else mqtt.MQTTv311,
        manual_ack=manual_ack,
        **kwargs,
    )
    if settings.username:
        client.username_pw_set(settings.username, settings.password)
    if settings.tls:
        ctx = ssl.create_default_context(cafile=settings.ca_file)
        if settings.cert_file:
            ctx.load_cert_chain(settings.cert_file, settings.key_file)
        if settings.insecure:
            ctx.check_hostname = False
        client.tls_set_context(ctx)
    return client


def persistent_connect_kwargs(client, session_expiry_s: int = 7 * 24 * 3600,
                              receive_maximum: int | None = None) -> dict:
    """Extra ``client.connect(...)`` arguments for a persistent session on MQTT 5 (empty for 3.1.1, where
    :func:`make_client` sets ``clean_session=False``). ``receive_maximum``: unacknowledged messages the broker may
    send at once (MQTT 5's flow control)."""
    import paho.mqtt.client as mqtt
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties

    if client.protocol != mqtt.MQTTv5:
        return {}
    props = Properties(PacketTypes.CONNECT)
    props.SessionExpiryInterval = session_expiry_s
    if receive_maximum is not None:
        props.ReceiveMaximum = receive_maximum
    return {"clean_start": False, "properties": props}


def diagnose(settings: BrokerSettings, timeout: float = 3.0) -> str:
    """Why a connection fails, in words (paho's connect-fail callback carries no reason).

    Opens a plain TCP connection and, for ``mqtts://``, a TLS handshake with the same verification the client
    uses, so "certificate verify failed" is reported as such instead of as an unreachable broker.
    """
    import socket

    try:
        sock = socket.create_connection((settings.host, settings.port), timeout=timeout)
    except OSError as exc:
        return exc.strerror or str(exc) or type(exc).__name__
    with sock:
        if not settings.tls:
            return "TCP connects; the broker closed or refused the MQTT session"
        ctx = ssl.create_default_context(cafile=settings.ca_file)
        if settings.insecure:
            ctx.check_hostname = False
        try:
            with ctx.wrap_socket(sock, server_hostname=settings.host):
                return "TLS handshake succeeds; the broker closed or refused the MQTT session"
        except ssl.SSLCertVerificationError as exc:
            return f"TLS: certificate verify failed: {exc.verify_message or exc}"
        except (ssl.SSLError, OSError) as exc:
            return f"TLS: {exc}"

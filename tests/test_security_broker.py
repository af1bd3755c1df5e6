"""The shipped broker deployment, tested on a real Mosquitto: who may connect, publish and read, and TLS.

The broker runs from exactly what ``deploy/make-credentials.sh`` writes (the shipped ``mosquitto.conf`` with
its paths filled in, a hashed password file, the generated ACL, a CA and server certificate); the test only
rewrites the two listener ports to free ones. Clients are built with the project's own ``contract/broker.py``
(``BrokerSettings.from_url`` + ``make_client``) so the TLS path the edge and sink use is the one under test.

ACL denials are silent in MQTT 3.1.1 (the publish "succeeds"), so every denial is checked by what a
subscriber actually receives, with an allowed message published afterwards as a sentinel.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import ssl
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from contract.broker import BrokerSettings
from contract.ids import new_event_id
from contract.topics import topic_for
from tests.secure_broker import (
    SCRIPT,
    SITE,
    WAIT,
    Client,
    SecureBroker,
    make_deployment,
    read_passwords,
    start_secure_broker,
)
from tests.services import free_port, wait_for_port

pytestmark = pytest.mark.slow

QUIET = 0.5  # seconds to keep listening for something that must NOT happen (after the sentinel arrived)


# ------------------------------------------------------------------------------------------ broker fixture


@pytest.fixture(scope="module")
def secure_broker() -> Iterator[SecureBroker]:
    # Not pytest's tmp_path: it is private to root (0700) and mosquitto drops to its own user.
    base = Path(tempfile.mkdtemp(prefix="smartcam-secure-mq-"))
    base.chmod(0o755)
    sb = start_secure_broker(base)
    yield sb
    sb.broker.stop()
    shutil.rmtree(base, ignore_errors=True)


# ------------------------------------------------------------------------------------------ client helper


@pytest.fixture
def clients() -> Iterator[list[Client]]:
    """Collects clients so each test disconnects them all, even when an assertion fails."""
    made: list[Client] = []
    yield made
    for c in made:
        c.close()


def connect(clients: list[Client], settings: BrokerSettings, *, mqtt5: bool = True, **kwargs) -> Client:
    c = Client(settings, f"test-{secrets.token_hex(6)}", mqtt5=mqtt5)  # unique: ids share a process prefix
    clients.append(c)
    rc = c.connect(**kwargs)
    assert not rc.is_failure, f"{settings.redacted()} refused: {rc}"
    return c


def marker(kind: str) -> bytes:
    return json.dumps({"marker": kind, "id": new_event_id()}).encode()


# ------------------------------------------------------------------------------------------ who may connect


@pytest.mark.parametrize("mqtt5", [True, False], ids=["mqtt5", "mqtt311"])
@pytest.mark.parametrize("tls", [False, True], ids=["plain", "tls"])
def test_anonymous_client_is_refused(secure_broker, clients, mqtt5, tls):
    c = Client(secure_broker.settings(tls=tls), "anon", mqtt5=mqtt5)
    clients.append(c)
    rc = c.connect()
    assert rc.is_failure and "authori" in str(rc).lower(), rc


@pytest.mark.parametrize("user,password", [("cam1", "wrong-password"), ("cam1", ""), ("nobody", "x" * 48),
                                           ("sink", None)], ids=["wrong", "empty", "unknown-user", "cam-pw-for-sink"])
def test_wrong_credentials_are_refused(secure_broker, clients, user, password):
    if password is None:  # a real password, but another user's
        password = secure_broker.passwords["cam1"]
    settings = BrokerSettings.from_url(secure_broker.url(), username=user, password=password or "")
    c = Client(settings, "wrong-creds")
    clients.append(c)
    rc = c.connect()
    assert rc.is_failure, f"{user} got in with a wrong password: {rc}"


def test_each_generated_user_can_connect(secure_broker, clients):
    assert set(secure_broker.passwords) == {"cam1", "cam2", "sink"}
    for user in secure_broker.passwords:
        connect(clients, secure_broker.settings(user))


# ------------------------------------------------------------------------------------------ ACL


@pytest.mark.parametrize("mqtt5", [True, False], ids=["mqtt5", "mqtt311"])
def test_camera_cannot_publish_as_another_camera(secure_broker, clients, mqtt5):
    sink = connect(clients, secure_broker.settings("sink"))
    assert sink.subscribe("smartcam/#")[0].value < 128
    cam1 = connect(clients, secure_broker.settings("cam1"), mqtt5=mqtt5)

    forged = {t: marker(f"forged {t}") for t in (topic_for(SITE, "cam2", "events"), topic_for(SITE, "cam2", "status"),
                                                  topic_for("othersite", "cam1", "events"), "smartcam/lobby/cam10/events",
                                                  "other/topic")}
    for topic, payload in forged.items():
        rc = cam1.publish(topic, payload)
        if mqtt5:  # MQTT 5 says so in the PUBACK; MQTT 3.1.1 cannot
            assert rc.value == 135, f"{topic}: PUBACK {rc}, expected Not authorized"
    own = marker("own")
    rc = cam1.publish(topic_for(SITE, "cam1", "events"), own)
    assert not rc.is_failure if mqtt5 else True
    assert sink.wait_for_payload(own), "cam1's message on its own topic was not delivered"
    time.sleep(QUIET)
    leaked = [t for t, p in forged.items() if sink.received(p)]
    print(f"\nforged publishes delivered: {len(leaked)} of {len(forged)}; own topic delivered: 1 of 1")
    assert leaked == []


def test_sink_may_only_read(secure_broker, clients):
    reader = connect(clients, secure_broker.settings("sink"))
    reader.subscribe("smartcam/#")
    sink = connect(clients, secure_broker.settings("sink"))
    forged = marker("sink writes")
    rc = sink.publish(topic_for(SITE, "cam1", "events"), forged)
    assert rc.value == 135, rc
    cam1 = connect(clients, secure_broker.settings("cam1"))
    sentinel = marker("sentinel")
    cam1.publish(topic_for(SITE, "cam1", "events"), sentinel)
    assert reader.wait_for_payload(sentinel)
    time.sleep(QUIET)
    assert not reader.received(forged), "the sink user published an event"


def test_cameras_cannot_read(secure_broker, clients):
    spy = connect(clients, secure_broker.settings("cam2"))
    spy.subscribe("smartcam/#")
    spy.subscribe(topic_for(SITE, "cam1", "events"))
    sink = connect(clients, secure_broker.settings("sink"))
    sink.subscribe("smartcam/#")
    cam1 = connect(clients, secure_broker.settings("cam1"))
    payload = marker("private")
    cam1.publish(topic_for(SITE, "cam1", "events"), payload)
    assert sink.wait_for_payload(payload)
    time.sleep(QUIET)
    assert spy.messages == [], "camera cam2 read camera cam1's events"


def test_sink_shared_subscription_is_allowed(secure_broker, clients):
    """``smartcam-sink run --share-group`` subscribes with $share/...: the sink ACL must allow it."""
    worker = connect(clients, secure_broker.settings("sink"))
    assert worker.subscribe("$share/workers/smartcam/+/+/events")[0].value < 128
    cam1 = connect(clients, secure_broker.settings("cam1"))
    payload = marker("shared")
    cam1.publish(topic_for(SITE, "cam1", "events"), payload)
    assert worker.wait_for_payload(payload)


# ------------------------------------------------------------------------------------------ TLS


def test_tls_with_verified_certificate_round_trip(secure_broker, clients):
    sink = connect(clients, secure_broker.settings("sink", tls=True))
    assert sink.paho.socket() is not None and isinstance(sink.paho.socket(), ssl.SSLSocket)
    sink.subscribe("smartcam/+/+/events")
    cam1 = connect(clients, secure_broker.settings("cam1", tls=True))
    payload = marker("over tls")
    assert not cam1.publish(topic_for(SITE, "cam1", "events"), payload).is_failure
    assert sink.wait_for_payload(payload)


def test_tls_client_with_another_ca_is_refused(secure_broker, tmp_path, clients):
    other = make_deployment(tmp_path / "other")  # a second install: same shape, different CA
    settings = BrokerSettings.from_url(secure_broker.url("cam1", tls=True), ca_file=str(other / "ca.crt"))
    c = Client(settings, "wrong-ca")
    clients.append(c)
    with pytest.raises(ssl.SSLCertVerificationError):
        c.connect()


def test_tls_client_without_ca_file_is_refused(secure_broker, clients):
    """No CA file means the system trust store, which does not know our private CA."""
    c = Client(BrokerSettings.from_url(secure_broker.url("cam1", tls=True)), "system-ca")
    clients.append(c)
    with pytest.raises(ssl.SSLCertVerificationError):
        c.connect()


# ------------------------------------------------------------------------------------------ nothing lost


def test_offline_sink_queue_beyond_1000_survives_broker_restart(secure_broker, clients):
    """The shipped config raises max_queued_messages (default 1000 drops silently) and persists queues."""
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties

    props = Properties(PacketTypes.CONNECT)
    props.SessionExpiryInterval = 3600
    session_id = f"sink-{secrets.token_hex(4)}"

    def sink_session() -> Client:
        c = Client(secure_broker.settings("sink"), session_id)
        clients.append(c)
        assert not c.connect(clean_start=False, properties=props).is_failure
        return c

    first = sink_session()
    first.subscribe("smartcam/+/+/events")
    first.close()

    cam1 = connect(clients, secure_broker.settings("cam1"))
    n = 2500
    ids = [new_event_id() for _ in range(n)]
    infos = [cam1.paho.publish(topic_for(SITE, "cam1", "events"), i.encode(), qos=1) for i in ids]
    for info in infos:
        info.wait_for_publish(WAIT)
    cam1.close()

    secure_broker.broker.restart()  # SIGTERM: Mosquitto saves its persistence file, then starts from it
    wait_for_port(secure_broker.tls_port)

    second = sink_session()
    with second.got:
        second.got.wait_for(lambda: len(second.messages) >= n, 30)
    got = {p.decode() for _, p in second.messages}
    print(f"\nqueued for offline sink across broker restart: published {n}, delivered {len(got)}")
    assert got == set(ids)


# ------------------------------------------------------------------------------------------ the script


@pytest.mark.parametrize("args,message", [
    (["--site", "lobby", "--camera", "a/b"], "not a valid name"),
    (["--site", "lobby"], "--camera"),
    (["--camera", "cam1"], "--site"),
    (["--site", "lobby", "--camera", "cam1", "--sink", "cam1"], "unique"),
    (["--site", "lobby", "--camera", "cam1", "--bogus"], "unknown option"),
])
def test_credentials_script_rejects_bad_arguments(tmp_path, args, message):
    res = subprocess.run([str(SCRIPT), str(tmp_path / "out"), *args], capture_output=True, text=True)
    assert res.returncode == 2 and message in res.stderr, res.stderr
    assert not (tmp_path / "out" / "passwd").exists()


def test_credentials_script_keeps_ca_and_refuses_to_clobber_users(tmp_path):
    conf = make_deployment(tmp_path)
    ca = (conf / "ca.crt").read_bytes()
    res = subprocess.run([str(SCRIPT), str(conf), "--site", SITE, "--camera", "cam9"], capture_output=True, text=True)
    assert res.returncode == 2 and "--force" in res.stderr
    subprocess.run([str(SCRIPT), str(conf), "--site", SITE, "--camera", "cam9", "--force"], check=True,
                   capture_output=True)
    assert (conf / "ca.crt").read_bytes() == ca, "re-running must keep the CA clients already trust"
    assert set(read_passwords(conf)) == {"cam9", "sink"}
    acl = (conf / "acl").read_text()
    assert "user cam9\ntopic write smartcam/lobby/cam9/#" in acl and "user cam1\n" not in acl
    assert oct((conf / "private" / "ca.key").stat().st_mode & 0o777) == "0o600"


# ------------------------------------------------------------------------------------------ the sink's HTTP API


@pytest.mark.parametrize("host", ["0.0.0.0", "192.0.2.10", "[::]"])
def test_sink_refuses_to_expose_its_api_without_a_token(tmp_path, host):
    """``smartcam-sink run --http`` on a non-loopback address without a token must not start at all."""
    import sys

    sink = Path(sys.executable).with_name("smartcam-sink")
    env = {k: v for k, v in os.environ.items() if k != "SMARTCAM_API_TOKEN"}
    res = subprocess.run([str(sink), "run", "--broker", "mqtt://127.0.0.1:1", "--db", f"sqlite:///{tmp_path / 's.db'}",
                          "--http", f"{host}:{free_port()}"], capture_output=True, text=True, env=env, timeout=60)
    assert res.returncode == 2, res.stderr
    assert "token" in res.stderr and "Traceback" not in res.stderr

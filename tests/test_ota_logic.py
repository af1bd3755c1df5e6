"""The edge updater's decisions without a camera or a broker: desired documents, the health check, probation,
the on-disk record and what a restart starts on; and the sink storing the reported documents it receives."""

from __future__ import annotations

import json
import time

import pytest

from camera.model_updates import (
    HealthLimits,
    ModelUpdater,
    Probation,
    UpdateRefused,
    UpdateSettings,
    check_file,
    judge_health,
    parse_desired,
    read_state,
    write_state,
)
from contract.model_docs import (
    REPORTED_SCHEMA_FILE,
    desired_document,
    effective_desired,
    reported_document,
    reported_topic,
)
from contract.schema import validation_errors
from models.signing import generate_keypair, load_private_key, sign_manifest

SHA = "ab" * 32
MANIFEST = {"version": "person-abababababab", "name": "person", "sha256": SHA, "size": 4, "imgsz": [192, 320],
            "classes": ["person"], "thresholds": {"conf": 0.3}, "created": "2026-01-01T00:00:00.000Z"}


def signed(manifest: dict, key) -> dict:
    return {"manifest": manifest, "signature": sign_manifest(manifest, key)}


def test_desired_documents_are_checked_against_their_schema(tmp_path):
    key = load_private_key(generate_keypair(tmp_path)[0])
    doc = desired_document(deployment="d-1", url="https://r.example/m.onnx", entry=signed(MANIFEST, key),
                           issued_s=0)
    assert parse_desired(json.dumps(doc).encode()) == doc
    assert parse_desired(b"") is None  # a cleared retained topic: nothing desired
    for bad, why in [(b"{", "not JSON"), (json.dumps({**doc, "url": "ftp://x/m"}).encode(), "url"),
                     (json.dumps({**doc, "manifest": {**MANIFEST, "sha256": "xyz"}}).encode(), "sha256"),
                     (json.dumps({**doc, "extra": 1}).encode(), "model-desired.v1")]:
        with pytest.raises(UpdateRefused, match=why):
            parse_desired(bad)
    # a model's own tracker thresholds (chosen by the learning loop) are scores: in [0, 1]
    own = {**MANIFEST, "thresholds": {"conf": 0.3, "high_score": 0.45, "new_track_score": 0.6}}
    assert parse_desired(json.dumps({**doc, "manifest": own}).encode())["manifest"] == own
    for key in ("high_score", "new_track_score"):
        with pytest.raises(UpdateRefused, match="model-desired.v1"):
            parse_desired(json.dumps({**doc, "manifest": {**own, "thresholds": {**own["thresholds"], key: 1.5}}})
                          .encode())


def test_the_later_issued_of_camera_and_site_documents_wins():
    cam = {"issued": "2026-01-01T00:00:01.000Z", "deployment": "cam"}
    site = {"issued": "2026-01-01T00:00:02.000Z", "deployment": "site"}
    assert effective_desired(cam, site)["deployment"] == "site"
    assert effective_desired({**cam, "issued": "2026-01-01T00:00:03.000Z"}, site)["deployment"] == "cam"
    assert effective_desired(None, None) is None and effective_desired(cam, None) is cam


def test_health_check_and_probation_decisions():
    lim = HealthLimits(max_latency_factor=5, min_detection_ratio=0.5, min_frames=3)
    assert judge_health([4, 5, 6], [6, 7, 8], [1, 2, 0], [1, 1, 0], lim) is None
    assert "ms per frame" in judge_health([4, 5, 6], [90, 100, 110], [1, 1, 1], [1, 1, 1], lim)
    assert "found people on 1 of the 3" in judge_health([5] * 4, [5] * 4, [1, 1, 1, 0], [1, 0, 0, 3], lim)
    assert judge_health([5], [5], [0, 0], [0, 0], lim) is None  # nobody in view: cannot judge detections

    ok = Probation(base_ms=5, base_rate=0.8, started=0, probation_s=10, limits=lim)
    for _ in range(5):
        ok.record(6, 1)
    assert ok.verdict(9.9) is None and ok.verdict(10.0) == "pass"
    too_few = Probation(base_ms=5, base_rate=0.8, started=0, probation_s=1, limits=lim)
    too_few.record(5, 1)
    assert too_few.verdict(100) is None  # probation lasts until it has seen enough frames
    slow = Probation(base_ms=5, base_rate=0.8, started=0, probation_s=100, limits=lim)
    for _ in range(3):
        slow.record(40, 1)
    assert "latency 40.0 ms vs 5.0 ms" in slow.verdict(1)  # a latency collapse does not wait for the end
    failing = Probation(base_ms=5, base_rate=0.8, started=0, probation_s=100, limits=lim)
    for _ in range(3):
        failing.record(None, 0, error="RuntimeError: boom")
    assert "inference failed 3 times (RuntimeError: boom)" in failing.verdict(1)
    empty_scene = Probation(base_ms=5, base_rate=0.05, started=0, probation_s=1, limits=lim)
    for _ in range(5):
        empty_scene.record(5, 0)
    assert empty_scene.verdict(2) == "pass"  # nobody was there before either: no rate to compare


def test_state_file_is_replaced_atomically(tmp_path):
    assert read_state(tmp_path) == {}
    write_state(tmp_path, {"current": {"version": "a"}})
    write_state(tmp_path, {"current": {"version": "b"}})
    assert read_state(tmp_path)["current"]["version"] == "b"
    assert [p.name for p in tmp_path.iterdir()] == ["current.json"]  # no temp file left behind
    (tmp_path / "current.json").write_text("{ half written")
    assert read_state(tmp_path) == {}  # unreadable: start on the configured model, never crash


def test_check_file_compares_size_and_sha256(tmp_path):
    f = tmp_path / "m.onnx"
    f.write_bytes(b"abcd")
    import hashlib

    good = {"size": 4, "sha256": hashlib.sha256(b"abcd").hexdigest()}
    check_file(f, good)
    with pytest.raises(UpdateRefused, match="truncated or wrong file: 4 bytes"):
        check_file(f, {**good, "size": 8})
    with pytest.raises(UpdateRefused, match="sha256 mismatch"):
        check_file(f, {**good, "sha256": SHA})


def _updater(tmp_path, base, pub) -> ModelUpdater:
    return ModelUpdater(UpdateSettings(directory=tmp_path / "models", trust_key=pub), site="s", camera_id="c",
                        base_model=base, load=lambda p, t: None)


def test_restart_starts_on_the_last_model_that_passed_its_checks(tmp_path):
    import hashlib

    key_path, pub = generate_keypair(tmp_path / "keys")
    key = load_private_key(key_path)
    base = tmp_path / "base.onnx"
    base.write_bytes(b"base model")
    models = tmp_path / "models"

    def stored(version: str, data: bytes) -> dict:
        d = models / version
        d.mkdir(parents=True)
        (d / f"{version}.onnx").write_bytes(data)
        sha = hashlib.sha256(data).hexdigest()
        manifest = {**MANIFEST, "version": version, "sha256": sha, "size": len(data)}
        (d / f"{version}.json").write_text(json.dumps(signed(manifest, key)))
        return {"path": str(d / f"{version}.onnx"), "name": version, "sha256": sha, "version": version}

    v1, v2, v3 = stored("v1", b"one"), stored("v2", b"two"), stored("v3", b"three")
    write_state(models, {"current": v2, "previous": v1, "trial": v3, "failed": None})
    boot = _updater(tmp_path, base, pub).boot()
    assert boot.version == "v2"  # the trial (on probation when the edge stopped) is not trusted
    (models / "v2" / "v2.onnx").write_bytes(b"tampered")  # the current file no longer matches its record
    boot = _updater(tmp_path, base, pub).boot()
    assert boot.version == "v1"
    other = load_private_key(generate_keypair(tmp_path / "other")[0])
    (models / "v1" / "v1.json").write_text(json.dumps(signed({**MANIFEST, "sha256": v1["sha256"]}, other)))
    boot = _updater(tmp_path, base, pub).boot()
    assert boot.version is None and boot.path == str(base)  # nothing verifies: the configured model
    (models / ".downloads").mkdir()
    (models / ".downloads" / "v4.part").write_bytes(b"half")
    _updater(tmp_path, base, pub).boot()
    assert not (models / ".downloads").exists()  # a download cut by kill -9 starts over


@pytest.mark.slow
def test_sink_stores_the_latest_report_per_camera_and_serves_it(mosquitto, tmp_path):
    from fastapi.testclient import TestClient

    from cloud_sink.api import create_app
    from cloud_sink.ingest import Ingestor, Subscriber
    from cloud_sink.store import Store
    from contract.broker import BrokerSettings

    def report(camera: str, state: str, ts: float, reason: str | None = None) -> dict:
        doc = reported_document(site="shop", camera_id=camera, ts_s=ts, state=state, version="person-b",
                                sha256=SHA, deployment="d-1", reason=reason,
                                active={"version": "person-a", "name": "person-a", "sha256": "cd" * 32},
                                previous=None)
        assert validation_errors(doc, REPORTED_SCHEMA_FILE) == []
        return doc

    store = Store.open(f"sqlite:///{tmp_path / 'sink.db'}")
    store.migrate()
    sub = Subscriber(Ingestor(store), BrokerSettings.from_url(mosquitto.url), client_id="sink-ota-test")
    sub.start()
    assert sub.subscribed.wait(10), "the sink's subscriptions were not acknowledged"
    thread = __import__("threading").Thread(target=sub.run, daemon=True)
    thread.start()
    try:
        import paho.mqtt.publish as publish

        now = time.time()
        msgs = [(reported_topic("shop", "door"), json.dumps(report("door", "downloading", now - 2)), 1, True),
                (reported_topic("shop", "door"), json.dumps(report("door", "rejected", now - 1, "bad signature")),
                 1, True),
                (reported_topic("shop", "hall"), json.dumps(report("hall", "active", now)), 1, True),
                (reported_topic("shop", "bad"), b'{"schema_version": 1, "kind": "model.reported"}', 1, False)]
        publish.multiple([{"topic": t, "payload": p, "qos": q, "retain": r} for t, p, q, r in msgs],
                         hostname="127.0.0.1", port=mosquitto.port)
        # an older report arriving late (a retained copy re-delivered) never replaces a newer one
        publish.single(reported_topic("shop", "door"), json.dumps(report("door", "active", now - 10)), qos=1,
                       hostname="127.0.0.1", port=mosquitto.port)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and (len(store.camera_models()) < 2 or store.dead_letter_count() < 1):
            time.sleep(0.1)
        time.sleep(0.5)
    finally:
        sub.stop()
        thread.join(10)
    models = {m["camera_id"]: m for m in store.camera_models()}
    assert set(models) == {"door", "hall"}
    assert models["door"]["failed"] and models["door"]["update"] == {"state": "rejected", "version": "person-b",
                                                                     "reason": "bad signature"}
    assert models["door"]["active"]["version"] == "person-a" and not models["hall"]["failed"]
    assert store.dead_letter_count() == 1  # the invalid report is kept as a dead letter, not stored
    client = TestClient(create_app(store))
    api = client.get("/api/models").json()["cameras"]
    assert [m["camera_id"] for m in api] == ["door", "hall"] and api[0]["failed"] is True
    cams = {c["camera_id"]: c for c in client.get("/api/cameras").json()["cameras"]}
    assert cams["door"]["model"]["update"]["reason"] == "bad signature"


def test_model_updates_config_errors_are_one_line(tmp_path):
    from camera.config import ConfigError, load_config

    model = tmp_path / "m.onnx"
    model.write_bytes(b"x")
    junk = tmp_path / "junk.pub"
    junk.write_text("not a key")
    base = {"camera_id": "c", "source": "0", "model": str(model), "mqtt.broker": "mqtt://127.0.0.1:1883"}
    cases = [({"model_updates.enabled": True}, "needs trust_key"),
             ({"model_updates.enabled": True, "model_updates.trust_key": str(junk)}, "is not a PEM public key")]
    for extra, message in cases:
        with pytest.raises(ConfigError, match=message):
            load_config(overrides={**base, **extra})
    with pytest.raises(ConfigError, match="needs mqtt.broker"):
        load_config(overrides={"camera_id": "c", "source": "0", "model": str(model),
                               "model_updates.enabled": True, "model_updates.allow_unsigned": True})
    assert load_config(overrides=base).model_updates.enabled is False  # off by default

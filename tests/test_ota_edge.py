"""Over-the-air models on a running edge (in this process), a real Mosquitto, real INT8 builds, a real HTTP
registry: the swap without a restart (nothing lost or duplicated around it), every bad case refused while the old
model serves on, broken models caught by the health check or on probation, an edge that was off at deploy time."""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from collections import Counter

import paho.mqtt.publish as mqtt_publish
import pytest

from contract.broker import BrokerSettings
from contract.model_docs import REPORTED_SCHEMA_FILE, camera_desired_topic, desired_document
from contract.schema import validate_stats, validation_errors
from models.deploy import deploy
from models.registry import open_registry, publish
from models.signing import generate_keypair, load_private_key, sign_manifest
from tests.ota_fixtures import (
    CutProxy,
    EdgeThread,
    Watch,
    classifier_model,
    failing_at_runtime,
    ota_edge_config,
    slowed,
    zeroed_scores,
)
from tests.services import CAM, SITE, fill, read_events, small_disk

pytestmark = pytest.mark.slow


def wait_until(pred, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def push(port: int, doc: dict | bytes) -> None:
    """A desired document on this camera's topic, retained, QoS 1 (what deploy sends)."""
    payload = doc if isinstance(doc, bytes) else json.dumps(doc)
    mqtt_publish.single(camera_desired_topic(SITE, CAM), payload, qos=1, retain=True, hostname="127.0.0.1",
                        port=port)


def test_new_model_swaps_in_without_restart_and_nothing_is_lost(mosquitto, tmp_path, ota_model_a, ota_model_b,
                                                                 ota_keys):
    registry = open_registry(tmp_path / "reg")
    entry_b = publish(registry, ota_model_b, load_private_key(ota_keys[0]), name="person")
    v2 = entry_b["version"]
    watch = Watch(mosquitto.port)
    edge = EdgeThread(ota_edge_config(tmp_path, model=ota_model_a, broker=mosquitto.url, site=SITE, camera=CAM,
                                      trust_key=ota_keys[1]))
    try:
        boot = watch.wait_report(SITE, CAM, lambda d: d["state"] == "active", what="start-up report")
        assert boot["active"]["version"] is None and boot["active"]["name"] == ota_model_a.stem
        old_sha = edge.detector.sha256
        wait_until(lambda: len(read_events(tmp_path / "events.jsonl")) >= 3, 30, "events before the swap")
        assert deploy(registry, v2, BrokerSettings.from_url(mosquitto.url), SITE, [CAM], say=lambda _: None) == 0
        done = watch.wait_report(SITE, CAM, lambda d: d["state"] == "active" and d["version"] == v2, timeout=60)
        assert done["active"] == {"version": v2, "name": v2, "sha256": entry_b["sha256"]}
        assert done["previous"]["sha256"] == old_sha
        frames = edge.runner.stats.frames_processed
        wait_until(lambda: edge.runner.stats.frames_processed > frames + 10, 20, "frames on the new model")
        assert edge.thread.is_alive()  # no restart
    finally:
        rc = edge.stop()
    assert rc == 0
    written = read_events(tmp_path / "events.jsonl")
    shas = [e["model"]["sha256"] for e in written]
    first_new = shas.index(entry_b["sha256"][:12])  # at the latest, the exits of the tracks open at the stop
    assert set(shas[:first_new]) == {old_sha[:12]} and set(shas[first_new:]) == {entry_b["sha256"][:12]}
    assert first_new >= 3
    assert [s["trial"] for s in edge.runner.swaps] == [True]  # one swap, between two frames
    # events file vs broker: 0 lost, 0 duplicated
    assert watch.sub.wait_for(lambda: len(watch.sub.events()) >= len(written), 30)
    received = [e["event_id"] for e in watch.sub.events()]
    assert Counter(received).most_common(1)[0][1] == 1, "duplicated events"
    assert set(received) == {e["event_id"] for e in written}, "lost events"
    # every step reported, each a valid model-reported.v1 document
    reports = watch.reports(SITE, CAM)
    assert all(validation_errors(r, REPORTED_SCHEMA_FILE) == [] for r in reports)
    steps = [r["state"] for r in reports if r["version"] == v2]
    assert steps == ["downloading", "verifying", "checking", "probation", "active"], steps
    # stats say which model detects: the configured one before, the registry version after
    stats = [json.loads(p) for t, p, _ in watch.sub.messages if t.endswith("/stats")]
    assert all(validate_stats(st) is None for st in stats)
    assert stats[0]["model"] == {"version": None, "name": ota_model_a.stem, "sha256": old_sha}
    assert stats[-1]["model"] == {"version": v2, "name": v2, "sha256": entry_b["sha256"]}
    # what is on disk says the new model is current, the old one previous
    state = json.loads((tmp_path / "models" / "current.json").read_text())
    assert state["current"]["version"] == v2 and state["previous"]["sha256"] == old_sha and state["trial"] is None
    watch.close()


def test_bad_updates_are_refused_with_a_reason_and_the_old_model_serves_on(mosquitto, tmp_path, ota_model_a,
                                                                           ota_model_b, ota_keys, registry_server):
    root = registry_server.root
    registry = open_registry(root)
    key = load_private_key(ota_keys[0])
    good = registry.entry(publish(registry, ota_model_b, key, name="person")["version"])
    zero = registry.entry(publish(registry, zeroed_scores(ota_model_b, tmp_path / "zeroed.onnx"), key,
                                  name="zeroed")["version"])
    slow = registry.entry(publish(registry, slowed(ota_model_a, tmp_path / "slow.onnx"), key, name="slow")["version"])
    url = f"{registry_server.url}/models/{good['manifest']['version']}/model.onnx"
    data = ota_model_b.read_bytes()
    (root / "truncated.onnx").write_bytes(data[: len(data) // 2])
    (root / "flipped.onnx").write_bytes(data[:1000] + bytes([data[1000] ^ 1]) + data[1001:])
    shutil.copy(classifier_model(tmp_path / "cls.onnx"), root / "cls.onnx")
    cls_bytes = (root / "cls.onnx").read_bytes()
    layout_manifest = {**good["manifest"], "version": "cls-1", "sha256": hashlib.sha256(cls_bytes).hexdigest(),
                       "size": len(cls_bytes)}
    other_key = load_private_key(generate_keypair(tmp_path / "other")[0])

    def doc(n: int, entry: dict, where: str) -> dict:
        return desired_document(deployment=f"bad-{n}", url=where, entry=entry, issued_s=time.time())

    cases = [  # (what we push, the reason the camera must give)
        (doc(1, good, f"{registry_server.url}/no/such/model.onnx"), "HTTP 404"),
        (doc(2, good, f"{registry_server.url}/truncated.onnx"), "truncated or wrong file"),
        (doc(3, good, f"{registry_server.url}/flipped.onnx"), "sha256 mismatch"),
        (doc(4, {"manifest": good["manifest"], "signature": sign_manifest(good["manifest"], other_key)}, url),
         "bad signature"),
        (doc(5, {"manifest": layout_manifest, "signature": sign_manifest(layout_manifest, key)},
             f"{registry_server.url}/cls.onnx"), "wrong layout"),
        (b'{"schema_version": 1, "kind": "model.desired", "url": "ftp://x"}', "fails model-desired.v1"),
        (doc(7, zero, f"{registry_server.url}/models/{zero['manifest']['version']}/model.onnx"),
         "health check: found people on 0 of the"),
        (doc(8, slow, f"{registry_server.url}/models/{slow['manifest']['version']}/model.onnx"),
         "ms per frame vs"),
    ]
    with small_disk("24m") as disk:
        watch = Watch(mosquitto.port)
        cfg = ota_edge_config(disk, model=ota_model_a, broker=mosquitto.url, site=SITE, camera=CAM,
                              trust_key=ota_keys[1], download_timeout_s=5)
        cfg.outbox.path = tmp_path / "outbox.db"
        cfg.events_file = tmp_path / "events.jsonl"
        edge = EdgeThread(cfg)
        try:
            watch.wait_report(SITE, CAM, lambda d: d["state"] == "active", what="start-up report")
            old_sha = edge.detector.sha256
            wait_until(lambda: edge.runner.stats.frames_processed > 30, 30, "frames to health-check on")
            for payload, reason in cases:
                n = len(watch.reports(SITE, CAM))
                frames = edge.runner.stats.frames_processed
                push(mosquitto.port, payload)
                wait_until(lambda n=n: any(d["state"] == "rejected" for d in watch.reports(SITE, CAM)[n:]), 30,
                           f"a refusal ({reason})")
                got = [d for d in watch.reports(SITE, CAM)[n:] if d["state"] == "rejected"][0]
                assert reason in got["reason"], (reason, got)
                assert got["active"]["sha256"] == old_sha and edge.detector.sha256 == old_sha
                wait_until(lambda f=frames: edge.runner.stats.frames_processed > f + 5, 10, "detection going on")

            # the disk fills up in the middle of a download (another program writes): refused, old model serves
            registry_server.throttle_bps = 1_000_000  # ~3.5 s for the model
            push(mosquitto.port, doc(9, good, url))
            watch.wait_report(SITE, CAM, lambda d: d["state"] == "downloading" and d["deployment"] == "bad-9")
            frames = edge.runner.stats.frames_processed
            time.sleep(0.8)
            assert edge.runner.stats.frames_processed >= frames + 3  # a slow download never holds up the frames
            fill(disk, 64 * 1024)
            got = watch.wait_report(SITE, CAM, lambda d: d["state"] == "rejected" and d["deployment"] == "bad-9",
                                    timeout=30)
            assert "disk full while downloading" in got["reason"] and edge.detector.sha256 == old_sha
            assert not list((disk / "models" / ".downloads").glob("*"))  # the partial file is gone
            # no room at all: refused before downloading
            push(mosquitto.port, doc(10, good, url))
            got = watch.wait_report(SITE, CAM, lambda d: d["state"] == "rejected" and d["deployment"] == "bad-10")
            assert "not enough disk space" in got["reason"]
            (disk / "ballast").unlink()
            registry_server.throttle_bps = None
            # and a good model after all that still goes through
            push(mosquitto.port, doc(11, good, url))
            got = watch.wait_report(SITE, CAM, lambda d: d["state"] == "active" and d["deployment"] == "bad-11")
            assert edge.detector.sha256 == good["manifest"]["sha256"]
        finally:
            assert edge.stop() == 0
            watch.close()
    assert all(validation_errors(r, REPORTED_SCHEMA_FILE) == [] for r in watch.reports(SITE, CAM))


def test_a_model_runs_at_its_manifests_thresholds_after_the_swap_and_after_a_restart(mosquitto, tmp_path,
                                                                                      ota_model_a, ota_model_b,
                                                                                      ota_keys):
    """The thresholds the learning loop chose for a model (models/thresholds.py) travel in its signed manifest:
    the detector's conf / iou and the tracker's high_score / new_track_score are the manifest's from the swap on,
    and again when the edge restarts on that model from disk; a model without them runs at the config's."""
    registry = open_registry(tmp_path / "reg")
    own = {"conf": 0.3, "iou": 0.5, "track_threshold": 0.55, "high_score": 0.6, "new_track_score": 0.7}
    v2 = publish(registry, ota_model_b, load_private_key(ota_keys[0]), name="person", thresholds=own)["version"]
    cfg = ota_edge_config(tmp_path, model=ota_model_a, broker=mosquitto.url, site=SITE, camera=CAM,
                          trust_key=ota_keys[1])

    def running() -> tuple[float, float, float, float]:
        wait_until(lambda: edge.runner._tracker is not None, 30, "the tracker")
        spec = edge.runner._tracker.spec
        return edge.detector.conf, edge.detector.iou, spec.high_score, spec.new_track_score

    watch = Watch(mosquitto.port)
    edge = EdgeThread(cfg)
    try:
        watch.wait_report(SITE, CAM, lambda d: d["state"] == "active", what="start-up report")
        assert running() == (cfg.detector.conf, cfg.detector.iou, cfg.tracker.high_score, cfg.tracker.new_track_score)
        assert deploy(registry, v2, BrokerSettings.from_url(mosquitto.url), SITE, [CAM], say=lambda _: None) == 0
        watch.wait_report(SITE, CAM, lambda d: d["state"] == "active" and d["version"] == v2, timeout=60)
        assert running() == (0.3, 0.5, 0.6, 0.7)  # swapped in at its own thresholds
    finally:
        assert edge.stop() == 0
    n = len(watch.reports(SITE, CAM))
    edge = EdgeThread(cfg)  # a restart: it starts on v2 (it passed probation) from disk
    try:
        watch.wait_report(SITE, CAM, lambda d: d["state"] == "active" and d["version"] == v2, since=n)
        assert edge.detector.name == v2 and running() == (0.3, 0.5, 0.6, 0.7)
        # a model published without tracker thresholds: the tracker goes back to the config's
        v3 = publish(registry, ota_model_a, load_private_key(ota_keys[0]), name="base")["version"]
        assert deploy(registry, v3, BrokerSettings.from_url(mosquitto.url), SITE, [CAM], say=lambda _: None) == 0
        watch.wait_report(SITE, CAM, lambda d: d["state"] == "active" and d["version"] == v3, timeout=60, since=n)
        assert running()[2:] == (cfg.tracker.high_score, cfg.tracker.new_track_score)
    finally:
        assert edge.stop() == 0
        watch.close()


def test_a_model_that_fails_probation_is_rolled_back(mosquitto, tmp_path, ota_model_a, ota_model_b, ota_keys):
    registry = open_registry(tmp_path / "reg")
    zero = publish(registry, zeroed_scores(ota_model_b, tmp_path / "zeroed.onnx"), load_private_key(ota_keys[0]),
                   name="zeroed")
    watch = Watch(mosquitto.port)
    # health_frames 0: only a load check before serving, so the broken model reaches probation
    edge = EdgeThread(ota_edge_config(tmp_path, model=ota_model_a, broker=mosquitto.url, site=SITE, camera=CAM,
                                      trust_key=ota_keys[1], health_frames=0, probation_s=3))
    try:
        watch.wait_report(SITE, CAM, lambda d: d["state"] == "active")
        old_sha = edge.detector.sha256
        wait_until(lambda: edge.runner.stats.frames_processed > 30, 30, "a baseline of frames")
        assert deploy(registry, zero["version"], BrokerSettings.from_url(mosquitto.url), SITE, [CAM],
                      say=lambda _: None) == 0
        watch.wait_report(SITE, CAM, lambda d: d["state"] == "probation" and d["version"] == zero["version"])
        back = watch.wait_report(SITE, CAM, lambda d: d["state"] == "rolled_back", timeout=30)
        assert "probation: people on 0% of frames" in back["reason"]
        assert back["active"]["sha256"] == old_sha
        wait_until(lambda: edge.detector.sha256 == old_sha, 10, "the old model back")
        frames = edge.runner.stats.frames_processed
        wait_until(lambda: edge.runner.stats.frames_processed > frames + 5, 10, "detection going on")
        # a model whose every inference fails: rolled back too, and the camera never stopped
        seen = len(watch.reports(SITE, CAM))
        failing = publish(registry, failing_at_runtime(ota_model_b, tmp_path / "failing.onnx"),
                          load_private_key(ota_keys[0]), name="failing")
        assert deploy(registry, failing["version"], BrokerSettings.from_url(mosquitto.url), SITE, [CAM],
                      say=lambda _: None) == 0
        back = watch.wait_report(SITE, CAM, lambda d: d["state"] == "rolled_back", timeout=30, since=seen)
        assert back["version"] == failing["version"] and "inference failed 3 times" in back["reason"], back
        wait_until(lambda: edge.detector.sha256 == old_sha, 10, "the old model back")
        frames = edge.runner.stats.frames_processed
        wait_until(lambda: edge.runner.stats.frames_processed > frames + 5, 10, "detection going on")
    finally:
        assert edge.stop() == 0
        watch.close()
    assert [s["trial"] for s in edge.runner.swaps] == [True, False, True, False]
    state = json.loads((tmp_path / "models" / "current.json").read_text())
    assert state["current"] is None and state["failed"]["state"] == "rolled_back"
    shas = [e["model"]["sha256"] for e in read_events(tmp_path / "events.jsonl")]
    assert shas[-1] == old_sha[:12]  # the events after the rollback carry the old model again


def test_an_edge_off_at_deploy_time_applies_the_site_model_when_it_comes_up_and_rollback(
        mosquitto, tmp_path, ota_model_a, ota_model_b, ota_keys, model_cli):
    registry = open_registry(tmp_path / "reg")
    v2 = publish(registry, ota_model_b, load_private_key(ota_keys[0]), name="person")["version"]
    # nobody is running: the deploy is retained on the site topic
    assert deploy(registry, v2, BrokerSettings.from_url(mosquitto.url), SITE, None, say=lambda _: None) == 0
    watch = Watch(mosquitto.port)
    edge = EdgeThread(ota_edge_config(tmp_path, model=ota_model_a, broker=mosquitto.url, site=SITE, camera=CAM,
                                      trust_key=ota_keys[1]))
    try:
        watch.wait_report(SITE, CAM, lambda d: d["state"] == "active" and d["version"] == v2, timeout=60)
        assert edge.detector.name == v2
        # the site moves on to another version, then `rollback` brings the previous one back (from disk)
        v3 = publish(registry, ota_model_a, load_private_key(ota_keys[0]), name="base")["version"]
        assert deploy(registry, v3, BrokerSettings.from_url(mosquitto.url), SITE, None, say=lambda _: None) == 0
        watch.wait_report(SITE, CAM, lambda d: d["state"] == "active" and d["version"] == v3, timeout=60)
        seen = len(watch.reports(SITE, CAM))
        out = model_cli("rollback", "--broker", mosquitto.url, "--site", SITE)
        assert out.returncode == 0 and f"rolled back site {SITE}: {v3} -> {v2}" in out.stdout, out
        back = watch.wait_report(SITE, CAM, lambda d: d["state"] == "active" and d["version"] == v2, since=seen)
        assert "downloading" not in [d["state"] for d in watch.reports(SITE, CAM)[seen:]]  # kept on disk
        assert back["previous"]["version"] == v3 and edge.detector.name == v2
    finally:
        assert edge.stop() == 0
        watch.close()


def test_a_running_edge_cut_off_at_deploy_time_applies_the_model_when_its_connection_comes_back(
        mosquitto, tmp_path, ota_model_a, ota_model_b, ota_keys):
    registry = open_registry(tmp_path / "reg")
    v2 = publish(registry, ota_model_b, load_private_key(ota_keys[0]), name="person")["version"]
    proxy = CutProxy(mosquitto.port)  # the camera reaches the broker only through this
    watch = Watch(mosquitto.port)
    edge = EdgeThread(ota_edge_config(tmp_path, model=ota_model_a, broker=f"mqtt://127.0.0.1:{proxy.port}", site=SITE,
                                      camera=CAM, trust_key=ota_keys[1]))
    try:
        watch.wait_report(SITE, CAM, lambda d: d["state"] == "active")
        wait_until(lambda: edge.runner.publisher.connected.is_set(), 10, "the edge connected")
        proxy.cut()
        wait_until(lambda: not edge.runner.publisher.connected.is_set(), 30, "the edge to notice the cut")
        assert deploy(registry, v2, BrokerSettings.from_url(mosquitto.url), SITE, [CAM], say=lambda _: None) == 0
        time.sleep(1.0)
        assert edge.detector.name != v2  # it cannot know yet
        frames = edge.runner.stats.frames_processed
        proxy.restore()
        watch.wait_report(SITE, CAM, lambda d: d["state"] == "active" and d["version"] == v2, timeout=60)
        assert edge.detector.name == v2 and edge.runner.stats.frames_processed > frames
    finally:
        assert edge.stop() == 0
        watch.close()
        proxy.close()

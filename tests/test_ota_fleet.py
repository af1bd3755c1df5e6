"""Over-the-air models across real edge processes: ``kill -9`` in the middle of a download and right after a swap
(the restart serves a verified model and finishes the update), and a canary rollout over three cameras that a
broken model aborts after the canary (the others never receive it), then `rollback`."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path

import pytest

from contract.model_docs import camera_desired_topic, site_desired_topic
from models.registry import open_registry, publish
from models.signing import load_private_key
from tests.conftest import INDOOR_CLIP, ROOT
from tests.ota_fixtures import Watch, zeroed_scores
from tests.services import edge_cmd

pytestmark = pytest.mark.slow
SITE = "fleet"


def start_edge(tmp_path: Path, camera: str, model: Path, broker: str, trust_key: Path, *extra: str) -> subprocess.Popen:
    work = tmp_path / camera
    work.mkdir(exist_ok=True)
    args = ["--source", str(INDOOR_CLIP), "--model", str(model), "--camera-id", camera, "--site", SITE,
            "--broker", broker, "--fps", "5", "--realtime", "--loop", "0", "--streams", "1", "--threads", "1",
            "--outbox", str(work / "outbox.db"), "--events-file", str(work / "events.jsonl"),
            "--stats-interval", "1", "--model-updates", "--trust-key", str(trust_key),
            "--model-dir", str(work / "models"), "--probation", "2", *extra]
    log = open(work / "edge.log", "ab")  # noqa: SIM115 - the child keeps it
    return subprocess.Popen(edge_cmd(*args), cwd=ROOT, stdout=log, stderr=log)


def stop(proc: subprocess.Popen) -> int:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    return proc.wait(30)


def test_kill_9_mid_download_and_after_the_swap_restart_on_a_verified_model(mosquitto, tmp_path, ota_model_a,
                                                                             ota_model_b, ota_keys, registry_server,
                                                                             model_cli):
    registry = open_registry(registry_server.root)
    v2 = publish(registry, ota_model_b, load_private_key(ota_keys[0]), name="person")
    sha_a = __import__("hashlib").sha256(ota_model_a.read_bytes()).hexdigest()
    watch = Watch(mosquitto.port)
    registry_server.throttle_bps = 500_000  # ~7 s: the download is still going when it is killed
    proc = start_edge(tmp_path, "door", ota_model_a, mosquitto.url, ota_keys[1], "--probation", "30")
    try:
        watch.wait_report(SITE, "door", lambda d: d["state"] == "active", what="start-up")
        time.sleep(2)  # a few frames for the health check
        deploy = model_cli("deploy", "--registry", str(registry_server.root), "--version", v2["version"],
                           "--broker", mosquitto.url, "--site", SITE, "--camera", "door",
                           "--url-base", registry_server.url)
        assert deploy.returncode == 0, deploy.stderr
        watch.wait_report(SITE, "door", lambda d: d["state"] == "downloading")
        time.sleep(1)
        proc.send_signal(signal.SIGKILL)  # kill -9 in the middle of the download
        proc.wait(10)
        partial = list((tmp_path / "door" / "models" / ".downloads").glob("*.part"))
        assert partial and partial[0].stat().st_size < v2["size"]  # it really was mid-download

        n = len(watch.reports(SITE, "door"))
        registry_server.throttle_bps = None
        proc = start_edge(tmp_path, "door", ota_model_a, mosquitto.url, ota_keys[1], "--probation", "30")
        boot = watch.wait_report(SITE, "door", lambda d: d["state"] == "active" and d["version"] is None, since=n)
        assert boot["active"]["sha256"] == sha_a  # the restart serves the verified old model ...
        # ... and finishes the update (the desired document is retained): swapped in, on probation
        watch.wait_report(SITE, "door", lambda d: d["state"] == "probation" and d["version"] == v2["version"],
                          timeout=60, since=n)
        state = json.loads((tmp_path / "door" / "models" / "current.json").read_text())
        assert state["trial"]["version"] == v2["version"] and state["current"] is None
        proc.send_signal(signal.SIGKILL)  # kill -9 right after the swap, on probation (not trusted yet)
        proc.wait(10)

        n = len(watch.reports(SITE, "door"))
        proc = start_edge(tmp_path, "door", ota_model_a, mosquitto.url, ota_keys[1])
        time.sleep(0.5)
        watch.wait_report(SITE, "door", lambda d: d["state"] == "active" and d["version"] == v2["version"],
                          timeout=60, since=n)
        steps = [d["state"] for d in watch.reports(SITE, "door")[n:]]
        # restarted on the model that passed everything (the old one), then redid check + probation: no download
        assert steps[0] == "active" and watch.reports(SITE, "door")[n]["active"]["sha256"] == sha_a, steps
        assert "downloading" not in steps and steps[-3:] == ["checking", "probation", "active"], steps
        assert stop(proc) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        watch.close()
    state = json.loads((tmp_path / "door" / "models" / "current.json").read_text())
    assert state["current"]["version"] == v2["version"] and state["trial"] is None
    assert "already on disk (verified)" in (tmp_path / "door" / "edge.log").read_text()


def test_canary_rollout_aborts_on_a_broken_model_then_a_good_one_reaches_all(mosquitto, tmp_path, ota_model_a,
                                                                             ota_model_b, ota_keys, model_cli):
    reg = tmp_path / "reg"
    key = str(ota_keys[0])
    pub = model_cli("publish", "--model", str(ota_model_b), "--registry", str(reg), "--signing-key", key,
                    "--name", "person")
    good = pub.stdout.strip().splitlines()[-1]
    broken = zeroed_scores(ota_model_b, tmp_path / "zeroed.onnx")
    bad = model_cli("publish", "--model", str(broken), "--registry", str(reg), "--signing-key", key,
                    "--name", "zeroed").stdout.strip().splitlines()[-1]
    watch = Watch(mosquitto.port)
    cams = ["c1", "c2", "c3"]
    procs = {c: start_edge(tmp_path, c, ota_model_a, mosquitto.url, ota_keys[1]) for c in cams}
    try:
        for c in cams:
            watch.wait_report(SITE, c, lambda d: d["state"] == "active", what="start-up", timeout=60)
        time.sleep(2)  # frames to health-check on
        out = model_cli("deploy", "--registry", str(reg), "--version", bad, "--broker", mosquitto.url, "--site",
                        SITE, "--canary", "1", "--watch-s", "90")
        assert out.returncode == 1, out.stdout + out.stderr
        assert "ABORTED" in out.stdout and "c1: rejected: health check" in out.stdout, out.stdout
        assert "2 camera(s) never received it" in out.stdout
        # the others never received it: no desired document for them, none for the site, they never heard of it
        retained = {t: p for t, p, r in watch.sub.messages if t.endswith("/model/desired")}
        assert camera_desired_topic(SITE, "c2") not in retained and camera_desired_topic(SITE, "c3") not in retained
        assert site_desired_topic(SITE) not in retained
        for c in ("c2", "c3"):
            assert all(d["version"] != bad for d in watch.reports(SITE, c))
        # the canary's desired document was put back (it had none: cleared)
        # (deploy returns on the broker's PUBACK of the clear; the watcher's copy may still be on its way)
        canary = camera_desired_topic(SITE, "c1")
        assert watch.sub.wait_for(lambda: [p for t, p, _ in list(watch.sub.messages) if t == canary][-1:] == [b""],
                                  10), "the canary's desired document was not cleared"

        # a good model passes the canary and reaches every camera, then rollback restores the previous one
        out = model_cli("deploy", "--registry", str(reg), "--version", good, "--broker", mosquitto.url, "--site",
                        SITE, "--canary", "1", "--watch-s", "90")
        assert out.returncode == 0, out.stdout + out.stderr
        assert "canary passed" in out.stdout
        for c in cams:
            watch.wait_report(SITE, c, lambda d: d["state"] == "active" and d["version"] == good, timeout=60)
        out = model_cli("rollback", "--broker", mosquitto.url, "--site", SITE, "--camera", "c2")
        assert out.returncode == 2 and "has no previous version" in out.stderr  # nothing was deployed before
        for c in cams:
            assert stop(procs[c]) == 0
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.kill()
        watch.close()
    state = json.loads((tmp_path / "c1" / "models" / "current.json").read_text())
    assert state["current"]["version"] == good and state["previous"]["version"] is None  # the configured model


def test_the_shipped_broker_acl_lets_a_deployer_and_the_cameras_do_over_the_air_updates_and_nothing_more(
        tmp_path, ota_model_a, ota_model_b, ota_keys):
    """deploy/make-credentials.sh --deployer: the deployer writes desired models and reads the site; each camera
    reads its own and its site's desired model; the deployer cannot publish events, a camera cannot deploy to
    the site or read another camera's desired model."""
    import shutil
    import tempfile

    from contract.topics import topic_for
    from models.deploy import deploy
    from tests.secure_broker import SITE as LOBBY
    from tests.secure_broker import Client, start_secure_broker

    base = Path(tempfile.mkdtemp(prefix="smartcam-ota-acl-"))
    base.chmod(0o755)  # mosquitto drops to its own user
    sb = start_secure_broker(base, deployers=("ops",))
    clients = []
    try:
        registry = open_registry(tmp_path / "reg")
        v2 = publish(registry, ota_model_b, load_private_key(ota_keys[0]), name="person")["version"]
        assert deploy(registry, v2, sb.settings("ops"), LOBBY, ["cam1"], say=lambda _: None) == 0
        assert deploy(registry, v2, sb.settings("ops"), LOBBY, None, say=lambda _: None) == 0
        cam1, cam2, ops = (Client(sb.settings(u), f"acl-{u}") for u in ("cam1", "cam2", "ops"))
        clients += [cam1, cam2, ops]
        for c in clients:
            assert not c.connect().is_failure
        for topic in (camera_desired_topic(LOBBY, "cam1"), site_desired_topic(LOBBY)):
            cam1.subscribe(topic)
        cam2.subscribe(camera_desired_topic(LOBBY, "cam1"))
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and len(cam1.messages) < 2:
            time.sleep(0.05)
        assert sorted(t for t, _ in cam1.messages) == sorted([camera_desired_topic(LOBBY, "cam1"),
                                                               site_desired_topic(LOBBY)])
        assert json.loads(cam1.messages[0][1])["manifest"]["version"] == v2
        assert cam2.messages == []  # another camera's desired model is not readable
        assert ops.publish(topic_for(LOBBY, "cam1", "events"), b"{}").value == 135  # not authorized
        assert cam1.publish(site_desired_topic(LOBBY), b"{}").value == 135  # a camera cannot deploy
        ops.subscribe(f"smartcam/{LOBBY}/+/model/reported")  # the deployer watches what the cameras report
        assert not cam1.publish(topic_for(LOBBY, "cam1", "model/reported"), b'{"r": 1}').is_failure
        assert ops.wait_for_payload(b'{"r": 1}')
    finally:
        for c in clients:
            c.close()
        sb.broker.stop()
        shutil.rmtree(base, ignore_errors=True)

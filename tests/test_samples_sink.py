"""Sampled frames in the sink (issue 15): validated, stored as objects beside the archive, indexed, exported;
corrupt and oversized ones dead-lettered. Real SQLite, a real directory, and end to end the real edge through a
real Mosquitto into the real sink process and a real SeaweedFS."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import cv2
import numpy as np
import paho.mqtt.client as mqtt
import pytest
import sqlalchemy as sa

from cloud_sink.ingest import Ingestor
from cloud_sink.samples import SampleSink, SampleStorage, recent_samples, sample_keys
from cloud_sink.store import Store
from contract.sample import decode_sample, encode_sample
from tests.conftest import INDOOR_CLIP, ONNX_FP32, ROOT, wait_until
from tests.sample_payloads import TOPIC, a_sample
from tests.services import CAM, SITE, run_edge


def not_a_jpeg() -> bytes:
    """A valid envelope and header whose image starts like a JPEG but is not one (sha256 matches the bytes)."""
    header, _ = decode_sample(a_sample())
    return encode_sample({**header, "sample_id": "c" * 32}, b"\xff\xd8\xff\xe0" + b"\x00garbage" * 50)


@pytest.fixture
def sink(tmp_path):
    store = Store.open(f"sqlite:///{tmp_path / 'sink.db'}")
    ingestor = Ingestor(store, samples=SampleSink(store, SampleStorage(str(tmp_path / "store")), max_bytes=200_000))
    yield ingestor, tmp_path / "store"
    store.close()


def dead_letters(store: Store) -> list[dict]:
    return store.dead_letters()


def test_sample_is_stored_once_beside_the_archive_and_indexed(sink):
    ingestor, root = sink
    payload = a_sample()
    header, jpeg = decode_sample(payload)
    first = ingestor.handle([(TOPIC, payload)])
    again = ingestor.handle([(TOPIC, payload)])  # a redelivery after a crash before the ack
    assert (first.samples, first.dead, again.samples, again.dead) == (1, 0, 0, 0)
    image_key, header_key = sample_keys(header)
    assert image_key.startswith(f"samples/site={SITE}/camera={CAM}/date=2026-01-02/")
    assert (root / image_key).read_bytes() == jpeg
    assert json.loads((root / header_key).read_text())["sample_id"] == header["sample_id"]
    [row] = recent_samples(ingestor.store, camera_id=CAM)
    assert (row["reason"], row["width"], row["height"], row["detections"]) == ("near_threshold", 320, 240, 1)


@pytest.mark.parametrize("payload, reason", [
    (b"\xff\xd8 a bare JPEG, no envelope", "bad sample envelope"),
    (not_a_jpeg(), "does not decode as a JPEG"),
    (a_sample(site="elsewhere"), "on the topic of"),
])
def test_bad_samples_are_dead_lettered_with_the_reason(sink, payload, reason):
    ingestor, root = sink
    result = ingestor.handle([(TOPIC, payload)])
    assert (result.samples, result.dead) == (0, 1)
    [dead] = dead_letters(ingestor.store)
    assert reason in dead["reason"] and dead["topic"] == TOPIC
    assert not (root / "samples").exists() and recent_samples(ingestor.store) == []


def test_oversized_sample_is_dead_lettered(sink):
    ingestor, _ = sink
    header, _ = decode_sample(a_sample())
    big = cv2.imencode(".jpg", np.random.default_rng(1).integers(0, 255, (1000, 1000, 3), np.uint8),
                       [cv2.IMWRITE_JPEG_QUALITY, 100])[1].tobytes()
    payload = encode_sample({**header, "image": {**header["image"], "width": 1000, "height": 1000}}, big)
    assert len(payload) > 200_000
    result = ingestor.handle([(TOPIC, payload)])
    assert result.dead == 1 and "over the 200000-byte limit" in dead_letters(ingestor.store)[0]["reason"]


def test_sink_without_a_samples_store_dead_letters_them(tmp_path):
    store = Store.open(f"sqlite:///{tmp_path / 'sink.db'}")
    try:
        result = Ingestor(store).handle([(TOPIC, a_sample())])
        assert result.dead == 1 and "stores no samples" in store.dead_letters()[0]["reason"]
    finally:
        store.close()


@pytest.mark.slow
def test_edge_samples_through_mosquitto_into_the_sink_and_seaweedfs(mosquitto, seaweedfs, tmp_path):
    bucket = "samples-e2e"
    seaweedfs.client().create_bucket(Bucket=bucket)
    env = {**os.environ, "AWS_ACCESS_KEY_ID": seaweedfs.access_key, "AWS_SECRET_ACCESS_KEY": seaweedfs.secret_key,
           "SMARTCAM_S3_ENDPOINT": seaweedfs.endpoint}
    db = f"sqlite:///{tmp_path / 'sink.db'}"
    log = tmp_path / "sink.log"
    with open(log, "wb") as fh:
        sink = subprocess.Popen([sys.executable, "-m", "cloud_sink", "run", "--broker", mosquitto.url, "--db", db,
                                 "--samples-store", f"s3://{bucket}/cam-data", "--max-sample-bytes", "150000"],
                                cwd=ROOT, env=env, stdout=fh, stderr=subprocess.STDOUT)
    try:
        wait_until(lambda: "sampled frames go to" in log.read_text(), 30, "sink start", sink, log)
        cfg = tmp_path / "edge.yaml"
        cfg.write_text(json.dumps({"samples": {"enabled": True, "random_probability": 1.0, "per_minute": 3,
                                               "max_side": 320}}))
        edge = run_edge("--config", str(cfg), "--source", str(INDOOR_CLIP), "--model", str(ONNX_FP32),
                        "--camera-id", CAM, "--site", SITE, "--broker", mosquitto.url, "--fps", "5",
                        "--max-frames", "15", "--outbox", str(tmp_path / "o.db"))
        assert edge.returncode == 0, edge.stderr[-2000:]
        # and two bad ones straight onto the topic: a corrupt image and an oversized message
        pub = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
        pub.connect("127.0.0.1", mosquitto.port)
        pub.loop_start()
        for bad in (not_a_jpeg(), a_sample()[:8] + b"x" * 200_000):
            pub.publish(TOPIC, bad, qos=1).wait_for_publish(10)
        pub.loop_stop()
        pub.disconnect()

        engine = sa.create_engine(db)

        def counts() -> tuple[int, int]:
            try:
                with engine.connect() as conn:
                    return (conn.execute(sa.text("SELECT COUNT(*) FROM samples")).scalar(),
                            conn.execute(sa.text("SELECT COUNT(*) FROM dead_letters")).scalar())
            except sa.exc.OperationalError:
                return (0, 0)

        wait_until(lambda: counts() == (3, 2), 30, "3 samples stored and 2 dead-lettered", sink, log)
        with engine.connect() as conn:
            reasons = sorted(conn.execute(sa.text("SELECT reason FROM dead_letters")).scalars())
        engine.dispose()
        assert any("does not decode" in r for r in reasons) and any("over the 150000-byte" in r for r in reasons)
    finally:
        sink.terminate()
        sink.wait(15)
    keys = [o["Key"] for o in seaweedfs.client().list_objects_v2(Bucket=bucket)["Contents"]]
    jpgs = [k for k in keys if k.endswith(".jpg")]
    assert len(jpgs) == 3 and all(k.startswith(f"cam-data/samples/site={SITE}/camera={CAM}/date=") for k in jpgs)
    assert len([k for k in keys if k.endswith(".json")]) == 3

    out = tmp_path / "export"
    proc = subprocess.run([sys.executable, "-m", "cloud_sink", "samples", "export", "--db", db, "--store",
                           f"s3://{bucket}/cam-data", "--camera", CAM, "--since", "3650d", "--out", str(out),
                           "--quiet"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    lines = [json.loads(x) for x in (out / "samples.jsonl").read_text().splitlines()]
    assert len(lines) == 3 and [x["ts"] for x in lines] == sorted(x["ts"] for x in lines)
    for line in lines:
        image = cv2.imread(str(out / line["image_file"]))
        assert image is not None and image.shape[:2] == (line["image"]["height"], line["image"]["width"])

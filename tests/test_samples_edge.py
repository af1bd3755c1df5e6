"""Sampled frames leave the edge (issue 15): a byte-bounded durable queue, the real edge over a real Mosquitto,
masks applied to the bytes that arrive, and samples left by an earlier run replayed."""

from __future__ import annotations

import json

import cv2
import numpy as np
import pytest

from camera.sample_queue import SampleQueue, sample_queue_path
from contract.sample import SampleFormatError, decode_sample, encode_sample
from contract.schema import validation_errors
from tests.conftest import INDOOR_CLIP, ONNX_FP32
from tests.services import CAM, SITE, Subscriber, run_edge


def test_queue_is_bounded_in_bytes_and_survives_a_reopen(tmp_path):
    path = tmp_path / "q.db"
    q = SampleQueue(path, max_bytes=100_000)
    ids = [q.put(bytes([i]) * 30_000) for i in range(5)]  # 150 KB into a 100 KB queue
    assert ids == [1, 2, 3, 4, 5]
    assert (q.depth(), q.bytes, q.dropped) == (3, 90_000, 2)
    q.delete(4)
    q.close()
    again = SampleQueue(path, max_bytes=100_000)  # a restart (or a crash: every put was committed with fsync)
    assert [(i, p[0]) for i, p in again.fetch()] == [(3, 2), (5, 4)]
    assert (again.depth(), again.bytes, again.dropped) == (2, 60_000, 2)
    assert again.put(b"x" * 200_000) is None and again.depth() == 2  # larger than the whole bound: refused


def test_queue_file_sits_beside_the_outbox(tmp_path):
    assert sample_queue_path(tmp_path / "lab-cam.outbox.db") == tmp_path / "lab-cam.outbox.samples.db"


def test_envelope_rejects_truncated_and_altered_images():
    payload = encode_sample({"sample_id": "a" * 32, "image": {"width": 1}}, b"\xff\xd8" + b"j" * 100)
    with pytest.raises(SampleFormatError, match="bytes"):
        decode_sample(payload[:-1])
    with pytest.raises(SampleFormatError, match="sha256"):
        decode_sample(payload[:-1] + b"k")
    with pytest.raises(SampleFormatError, match="magic"):
        decode_sample(b"PK\x03\x04" + payload[4:])


def edge_config(tmp_path, **samples) -> str:
    spec = {"enabled": True, "random_probability": 1.0, "per_minute": 3, "per_hour": 100, "per_day": 100,
            "max_side": 320, "seed": 1, **samples}
    cfg = tmp_path / "edge.yaml"
    cfg.write_text(json.dumps({"samples": spec, "masks": [
        {"name": "left", "points": [[0, 0], [0.25, 0], [0.25, 1], [0, 1]]}]}))
    return str(cfg)


@pytest.mark.slow
def test_edge_sends_masked_samples_over_mqtt_and_empties_its_queue(mosquitto, tmp_path):
    sub = Subscriber(mosquitto.port)
    outbox = tmp_path / "o.db"
    try:
        proc = run_edge("--config", edge_config(tmp_path), "--source", str(INDOOR_CLIP), "--model", str(ONNX_FP32),
                        "--camera-id", CAM, "--site", SITE, "--broker", mosquitto.url, "--fps", "5",
                        "--max-frames", "20", "--outbox", str(outbox), "--stats-interval", "1")
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert "samples on:" in proc.stderr
        assert sub.wait_for(lambda: len(sub.payloads("sample")) >= 3, 10)
        payloads = sub.payloads("sample")
    finally:
        sub.close()
    # every frame is a random candidate; 4 s of video at 3/min lets exactly the bucket's 3 through
    assert len(payloads) == 3
    for payload in payloads:
        header, jpeg = decode_sample(payload)
        assert validation_errors(header, "sample.v1.schema.json") == []
        assert (header["site"], header["camera_id"], header["reason"]) == (SITE, CAM, "random")
        assert header["model"]["sha256"] and len(header["model"]["sha256"]) == 64
        image = cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_COLOR)
        assert image.shape[1] == 320 and image.shape[:2] == (header["image"]["height"], header["image"]["width"])
        assert image[:, : int(320 * 0.25) - 3].max() <= 12  # the mask is black in what arrived
        assert image[:, int(320 * 0.25) + 3:].mean() > 40  # and the rest of the scene is there
    assert SampleQueue(sample_queue_path(outbox), 1 << 20).depth() == 0  # deleted on PUBACK


@pytest.mark.slow
def test_samples_left_by_an_earlier_run_are_replayed(mosquitto, tmp_path):
    outbox = tmp_path / "o.db"
    left = SampleQueue(sample_queue_path(outbox), 1 << 20)
    old = [encode_sample({"sample_id": f"{i:032x}", "image": {}}, b"\xff\xd8" + bytes([i]) * 50) for i in range(3)]
    for payload in old:
        left.put(payload)
    left.close()
    sub = Subscriber(mosquitto.port)
    try:
        proc = run_edge("--config", edge_config(tmp_path, random_probability=0.0, conf_band=[0.0, 0.001]),
                        "--source", str(INDOOR_CLIP), "--model", str(ONNX_FP32), "--camera-id", CAM, "--site", SITE,
                        "--broker", mosquitto.url, "--max-frames", "3", "--outbox", str(outbox))
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert "3 queued from a previous run" in proc.stderr
        assert sub.wait_for(lambda: len(sub.payloads("sample")) >= 3, 10)
        assert sub.payloads("sample") == old  # in order, byte for byte
    finally:
        sub.close()
    assert SampleQueue(sample_queue_path(outbox), 1 << 20).depth() == 0

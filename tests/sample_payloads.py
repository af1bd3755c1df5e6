"""A real sample.v1 message (the edge's own builder on a synthetic frame) and its topic: shared by the sample
sink and sample dashboard tests."""

from __future__ import annotations

import numpy as np

from camera.detections import Detections
from camera.frame import Frame
from camera.sampler import Candidate, SamplesSpec, build_sample
from tests.services import CAM, SITE

TOPIC = f"smartcam/{SITE}/{CAM}/sample"


def a_sample(site: str = SITE, camera: str = CAM, ts: float = 1_767_323_045.678) -> bytes:
    """One sample of a random 320x240 frame with a near-threshold person box."""
    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, (240, 320, 3), dtype=np.uint8)
    d = Detections(np.array([[10, 20, 50, 120]], np.float32), np.array([0.41], np.float32), np.zeros(1, np.int32))
    return build_sample(Candidate(Frame(image, ts, 3), d, ["near_threshold"], [7]), site=site, camera_id=camera,
                        model_name="m", model_sha256="b" * 64, names={0: "person"}, spec=SamplesSpec(enabled=True))

"""Shared fixtures: paths to ../shared data and real servers started per test session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.services import start_mosquitto, start_postgres

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("SMARTCAM_SHARED", ROOT.parent / "shared")).resolve()
VIDEOS = SHARED / "data" / "videos"
MODELS = SHARED / "models"
PERSONS_EVAL = SHARED / "data" / "persons-eval"
ONNX_FP32 = MODELS / "yolov8n-coco.onnx"
PT_WEIGHTS = MODELS / "yolov8n-coco.pt"
INDOOR_CLIP = VIDEOS / "indoor_webcam_2people_with_overlay.mp4"
NEGATIVE_CLIP = VIDEOS / "negative_highway_cars_only_320x240.avi"
STREET_CLIP = VIDEOS / "outdoor_street_cctv_towncentre_720p.m4v"
PLAZA_CLIP = VIDEOS / "outdoor_overhead_plaza_many_people.mp4"
ARTIFACTS = ROOT / "test-artifacts"


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    if not SHARED.exists():
        pytest.fail(f"../shared not found at {SHARED}: set SMARTCAM_SHARED")
    return SHARED


@pytest.fixture
def mosquitto(tmp_path):
    """A fresh real Mosquitto per test (anonymous, max_queued_messages raised)."""
    broker = start_mosquitto(tmp_path / "mosquitto")
    yield broker
    broker.stop()


@pytest.fixture(scope="session")
def postgres_server():
    """One real PostgreSQL server for the whole test session; use ``postgres_url`` for a fresh database."""
    pg = start_postgres()
    yield pg
    pg.stop()


_db_counter = iter(range(1, 10**9))


@pytest.fixture
def postgres_url(postgres_server) -> str:
    """A fresh, empty PostgreSQL database on the session's server."""
    return postgres_server.create_database(f"t{next(_db_counter)}_{os.getpid()}")


@pytest.fixture(scope="session")
def artifacts_dir() -> Path:
    ARTIFACTS.mkdir(exist_ok=True)
    return ARTIFACTS


@pytest.fixture(scope="session")
def seaweedfs(tmp_path_factory):
    """One real SeaweedFS S3 server for the session (signatures checked); make a bucket per test."""
    from tests.services import start_seaweedfs

    server = start_seaweedfs(tmp_path_factory.mktemp("seaweedfs"))
    yield server
    server.stop()


# The INT8 320 edge model, built once per test session by the real `models.build` path. Registered here (not
# imported by each test module) so every module shares one build.
from tests.model_fixtures import int8_model_320  # noqa: E402,F401

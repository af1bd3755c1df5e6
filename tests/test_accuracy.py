"""The accuracy harness (bench/accuracy.py) and the edge's MOT tracks file on a short slice of PETS09-S2L1, with
the real detector: the metrics are computed from what the edge wrote, and a broken tracker's output fails them."""

from __future__ import annotations

import numpy as np
import pytest

from bench.accuracy import discover, evaluate, gt_people, processed_frames, read_tracks, score_tracks
from tests.conftest import ONNX_FP32, SHARED

pytestmark = pytest.mark.slow

SLICE = 60  # frames: 3-6 people walking, one crossing each way of the middle line


@pytest.fixture(scope="module")
def pets():
    found = [s for s in discover(SHARED / "data" / "sequences") if s.name == "PETS09-S2L1"]
    if not found:
        pytest.fail(f"PETS09-S2L1 missing under {SHARED / 'data' / 'sequences'}")
    return found[0]


@pytest.fixture(scope="module")
def edge_run(pets, tmp_path_factory):
    out = tmp_path_factory.mktemp("accuracy")
    return evaluate(pets, ONNX_FP32, None, out, max_frames=SLICE), out


def test_tracks_file_is_motchallenge_text(edge_run):
    _, out = edge_run
    lines = (out / "tracks.txt").read_text().splitlines()
    assert lines
    for line in lines:
        fields = line.split(",")
        assert len(fields) == 10 and fields[7:] == ["-1", "-1", "-1"]
        frame, tid, x, y, w, h, score = (float(v) for v in fields[:7])
        assert 1 <= frame <= SLICE and tid >= 1 and w > 0 and h > 0 and 0 < score <= 1


def test_metrics_are_computed_on_the_edge_output(edge_run, pets):
    result, _ = edge_run
    t = result.tracking
    assert result.frames == SLICE and result.people == gt_people(pets, list(range(1, SLICE + 1)))
    assert t["IDF1"] > 0.6 and t["MOTA"] > 0.5 and t["HOTA"] > 0.4, t
    assert 0 < result.tracks <= 2 * result.people
    assert set(result.counts) == {"left_to_right", "right_to_left"}
    assert result.counts["left_to_right"]["gt"] == 1  # the first crossing is at frame 24


def test_a_tracker_that_resets_ids_every_frame_fails(edge_run, pets):
    """The same boxes with a new id in every frame (the broken tracker): IDF1 and HOTA collapse, ID switches soar."""
    result, out = edge_run
    rows = read_tracks(out / "tracks.txt")
    broken = rows.copy()
    broken[:, 1] = np.arange(1, len(rows) + 1)
    bad = score_tracks(pets, broken, processed_frames(pets, None, SLICE))
    good = result.tracking
    assert bad["IDF1"] < 0.3 < good["IDF1"] - 0.3
    assert bad["HOTA"] < good["HOTA"] - 0.2
    assert bad["IDSW"] > 10 * max(good["IDSW"], 1)
    assert bad["DetA"] == pytest.approx(good["DetA"], abs=0.01)  # same boxes: detection did not fail

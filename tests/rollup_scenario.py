"""The rollup scenario computed by hand (two hours of one camera, one event on another): what the rollup, report
and overview tests check the sink's figures against. The ``loaded`` fixture (tests/conftest.py) stores it."""

from __future__ import annotations

from tests.conftest import T0, make_event

H0 = int(T0) // 3600 * 3600  # 2026-05-28T20:00:00Z
H1 = H0 + 3600


def scenario() -> list[dict]:
    """Two hours of one camera (see the comments for the hand-computed figures) plus one event on cam-2."""
    e = make_event
    return [
        # hour H0: tracks 1,2,3 enter; 1 and 2 leave (dwell 300, 800); counts 1,2,3,2,1 → max 3, mean 1.8
        e("person.enter", ts=H0 + 100, track_id=1), e("person.enter", ts=H0 + 200, track_id=2),
        e("person.enter", ts=H0 + 300, track_id=3),
        e("person.exit", ts=H0 + 400, track_id=1, dwell_s=300.0),
        e("person.exit", ts=H0 + 1000, track_id=2, dwell_s=800.0),
        e("count", ts=H0 + 100, count=1, previous=0), e("count", ts=H0 + 200, count=2, previous=1),
        e("count", ts=H0 + 300, count=3, previous=2), e("count", ts=H0 + 400, count=2, previous=3),
        e("count", ts=H0 + 1000, count=1, previous=2),
        # hour H1: track 3 leaves (dwell 3400), track 4 enters and leaves (dwell 60); counts 0,1,0
        e("person.exit", ts=H1 + 100, track_id=3, dwell_s=3400.0),
        e("person.enter", ts=H1 + 200, track_id=4), e("person.exit", ts=H1 + 260, track_id=4, dwell_s=60.0),
        e("count", ts=H1 + 100, count=0, previous=1), e("count", ts=H1 + 200, count=1, previous=0),
        e("count", ts=H1 + 260, count=0, previous=1),
        # zone "door" in H1: track 4 in for 40 s, loiters; zone counts 1, 0
        e("zone.enter", ts=H1 + 210, zone="door", track_id=4),
        e("loiter", ts=H1 + 240, zone="door", track_id=4, dwell_s=30.0),
        e("zone.exit", ts=H1 + 250, zone="door", track_id=4, dwell_s=40.0),
        e("count", ts=H1 + 210, zone="door", count=1, previous=0),
        e("count", ts=H1 + 250, zone="door", count=0, previous=1),
        # line "gate": track 3 out, track 4 in
        e("line.cross", ts=H1 + 90, line="gate", track_id=3, direction="out", totals={"in": 0, "out": 1}),
        e("line.cross", ts=H1 + 205, line="gate", track_id=4, direction="in", totals={"in": 1, "out": 1}),
        # another camera
        e("person.enter", ts=H0 + 50, camera_id="cam-2", track_id=7),
    ]

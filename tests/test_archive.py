"""The archive: hourly JSON Lines partitions, idempotent, local directory and a real SeaweedFS S3 server."""

from __future__ import annotations

import json
import uuid

import pytest

from cloud_sink.archive import ArchiveError, LocalArchive, S3Archive, open_archive, partition_of
from contract.schema import validate_event
from tests.test_sink_api import make_event

T0 = 1_767_236_400.0  # 2026-01-01T03:00:00Z


def _events() -> list[dict]:
    """Five events: two cameras, two hours (03 and 04 UTC), out of time order on purpose."""
    return [
        make_event("person.enter", T0 + 3700, camera="cam-1", track_id=2),
        make_event("person.enter", T0 + 10, camera="cam-1", track_id=1),
        make_event("person.exit", T0 + 50, camera="cam-1", track_id=1, dwell_s=40.0),
        make_event("count", T0 + 20, camera="cam-2", count=1, previous=0),
        make_event("person.enter", T0 + 5, camera="cam-2", track_id=7),
    ]


EXPECTED_PARTITIONS = [
    "site=lobby/camera=cam-1/date=2026-01-01/hour=03",
    "site=lobby/camera=cam-1/date=2026-01-01/hour=04",
    "site=lobby/camera=cam-2/date=2026-01-01/hour=03",
]


def _check_layout(archive, events: list[dict]) -> None:
    assert archive.partitions() == EXPECTED_PARTITIONS
    stored = {p: archive.read(p) for p in archive.partitions()}
    assert sorted(e["event_id"] for rows in stored.values() for e in rows) == sorted(e["event_id"] for e in events)
    for partition, rows in stored.items():
        assert all(partition_of(e) == partition for e in rows)
        assert [e["ts"] for e in rows] == sorted(e["ts"] for e in rows)
        for e in rows:
            validate_event(e)
            assert e == next(x for x in events if x["event_id"] == e["event_id"])


def test_local_partitions_and_content(tmp_path):
    events = _events()
    archive = open_archive(str(tmp_path / "arch"))
    assert isinstance(archive, LocalArchive)
    assert archive.write(events) == 5
    _check_layout(archive, events)
    path = tmp_path / "arch" / EXPECTED_PARTITIONS[0] / "events.jsonl"
    lines = path.read_text().splitlines()
    assert len(lines) == 2 and all(json.loads(line)["camera_id"] == "cam-1" for line in lines)
    assert not list(tmp_path.rglob("*.tmp")), "temp files must be renamed or removed"


def test_local_idempotent_across_batches_and_instances(tmp_path):
    events = _events()
    archive = open_archive(f"file://{tmp_path}/arch")
    assert archive.write(events[:3]) == 3
    assert archive.write(events[:3]) == 0, "the same batch again adds nothing"
    assert archive.write(events[2:]) == 2, "an overlapping batch adds only the new events"
    before = {p: (tmp_path / "arch" / p / "events.jsonl").read_bytes() for p in archive.partitions()}
    fresh = open_archive(str(tmp_path / "arch"))  # a restarted sink: no in-memory state
    assert fresh.write(list(reversed(events))) == 0
    after = {p: (tmp_path / "arch" / p / "events.jsonl").read_bytes() for p in fresh.partitions()}
    assert before == after
    _check_layout(fresh, events)


def test_local_sees_changes_made_by_another_writer(tmp_path):
    a = open_archive(str(tmp_path))
    b = open_archive(str(tmp_path))
    first, second, third = (make_event("person.enter", T0 + i, track_id=i) for i in (1, 2, 3))
    a.write([first])
    b.write([second])
    a.write([third])  # a's cached copy is stale: it must re-read, not overwrite b's event
    assert [e["event_id"] for e in a.read(a.partitions()[0])] == [e["event_id"] for e in (first, second, third)]


@pytest.mark.parametrize("bad, reason", [
    ({"event_id": "a" * 32, "ts": "2026-01-01T00:00:00.000Z", "site": "../etc", "camera_id": "c"}, "unsafe"),
    ({"event_id": "a" * 32, "ts": "yesterday", "site": "s", "camera_id": "c"}, "timestamp"),
    ({"ts": "2026-01-01T00:00:00.000Z", "site": "s", "camera_id": "c"}, "needs"),
    ("not an event", "needs"),
])
def test_local_bad_event_is_refused_and_nothing_written(tmp_path, bad, reason):
    archive = open_archive(str(tmp_path))
    with pytest.raises(ValueError, match=reason):
        archive.write([make_event("person.enter", T0), bad])
    assert archive.partitions() == []


def test_unusable_targets_fail_clearly(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(ArchiveError, match="cannot be created"):
        open_archive(str(blocker / "sub"))
    with pytest.raises(ArchiveError, match="unsupported scheme"):
        open_archive("gs://bucket/prefix")
    with pytest.raises(ArchiveError, match="no bucket"):
        open_archive("s3:///prefix")


# ------------------------------------------------------------------------------------------ S3 (SeaweedFS)


@pytest.fixture
def s3_env(seaweedfs, monkeypatch):
    """A fresh bucket on the real server, credentials and endpoint in the environment as in production."""
    bucket = f"arch-{uuid.uuid4().hex[:10]}"
    seaweedfs.client().create_bucket(Bucket=bucket)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", seaweedfs.access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", seaweedfs.secret_key)
    monkeypatch.setenv("SMARTCAM_S3_ENDPOINT", seaweedfs.endpoint)
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    return bucket


@pytest.mark.slow
def test_s3_partitions_idempotent_and_readable_by_plain_s3(seaweedfs, s3_env):
    events = _events()
    archive = open_archive(f"s3://{s3_env}/smartcam/archive")
    assert isinstance(archive, S3Archive)
    assert archive.write(events[:4]) == 4
    assert archive.write(events) == 1
    assert archive.write(events) == 0
    assert open_archive(f"s3://{s3_env}/smartcam/archive").write(events) == 0, "a restarted sink adds nothing"
    _check_layout(archive, events)

    # What a reviewer sees with any S3 tool: exactly one JSON Lines object per hour and camera.
    listing = seaweedfs.client().list_objects_v2(Bucket=s3_env, Prefix="smartcam/archive/")
    keys = sorted(obj["Key"] for obj in listing["Contents"])
    assert keys == [f"smartcam/archive/{p}/events.jsonl" for p in EXPECTED_PARTITIONS]
    body = seaweedfs.client().get_object(Bucket=s3_env, Key=keys[0])["Body"].read().decode()
    assert [json.loads(line)["event_id"] for line in body.splitlines()] == [
        e["event_id"] for e in sorted(events[:3], key=lambda e: e["ts"]) if partition_of(e) == EXPECTED_PARTITIONS[0]]


@pytest.mark.slow
def test_s3_sees_changes_made_by_another_writer(s3_env):
    a = open_archive(f"s3://{s3_env}")
    b = open_archive(f"s3://{s3_env}")
    first, second, third = (make_event("person.enter", T0 + i, track_id=i) for i in (1, 2, 3))
    a.write([first])
    b.write([second])
    a.write([third])  # a's cached ETag is stale: the conditional GET must return b's version
    assert [e["event_id"] for e in a.read(a.partitions()[0])] == [e["event_id"] for e in (first, second, third)]


@pytest.mark.slow
def test_s3_wrong_credentials_and_missing_bucket_refused(seaweedfs, s3_env, monkeypatch):
    with pytest.raises(ArchiveError, match="does not exist"):
        open_archive("s3://no-such-bucket-here/prefix")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
    with pytest.raises(ArchiveError, match="credentials refused"):
        open_archive(f"s3://{s3_env}/p")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "unknown-key")
    with pytest.raises(ArchiveError, match="credentials refused"):
        open_archive(f"s3://{s3_env}/p")
    # A writer whose credentials are revoked after opening: the write fails loudly, nothing is stored.
    good = seaweedfs.client()
    archive = S3Archive(s3_env, "p", endpoint_url=seaweedfs.endpoint, client=good)
    archive.client = seaweedfs.client(secret_key="revoked")
    with pytest.raises(ArchiveError, match="credentials refused"):
        archive.write([make_event("person.enter", T0)])
    assert good.list_objects_v2(Bucket=s3_env).get("KeyCount", 0) == 0
    monkeypatch.setenv("SMARTCAM_S3_ENDPOINT", "http://127.0.0.1:9")
    with pytest.raises(ArchiveError, match="cannot connect"):
        open_archive(f"s3://{s3_env}/p")


def test_backfill_restores_what_a_crash_left_out(tmp_path):
    """Events committed to the database but never archived (sink killed in between) are filled in, once."""
    from cloud_sink.archive import backfill
    from cloud_sink.store import Batch, Store

    store = Store.open(f"sqlite:///{tmp_path / 'sink.db'}")
    events = _events()
    store.write(Batch(events=events))
    archive = open_archive(str(tmp_path / "arch"))
    archive.write(events[:2])  # the crash: only the first batch reached the archive
    assert backfill(store, archive, page=2) == 3
    assert backfill(store, archive) == 0
    _check_layout(archive, events)
    assert backfill(store, open_archive(str(tmp_path / "cam2")), camera_id="cam-2") == 2
    store.close()


def _race(archives: list, rounds: int = 15, per_batch: int = 4) -> list[dict]:
    """Each archive writes its own events into the SAME partition from its own thread, all at once."""
    import threading

    batches = [[[make_event("person.enter", T0 + 1 + (w * rounds + r) * per_batch + i, track_id=w)
                 for i in range(per_batch)] for r in range(rounds)] for w in range(len(archives))]
    start = threading.Barrier(len(archives))
    errors: list[BaseException] = []

    def run(archive, mine) -> None:
        start.wait()
        try:
            for batch in mine:
                archive.write(batch)
        except BaseException as exc:  # reported by the test thread
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(a, b)) for a, b in zip(archives, batches, strict=True)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    return [e for worker in batches for batch in worker for e in batch]


def test_local_concurrent_writers_lose_nothing(tmp_path):
    """Three sink workers archiving into one directory: the flock makes their merges take turns."""
    archives = [open_archive(str(tmp_path)) for _ in range(3)]
    written = _race(archives)
    rows = archives[0].read(archives[0].partitions()[0])
    assert sorted(e["event_id"] for e in rows) == sorted(e["event_id"] for e in written)


@pytest.mark.slow
def test_s3_concurrent_writers_lose_nothing(s3_env):
    """Three writers on one S3 partition: conditional PUTs make the loser re-read and merge, nothing is lost."""
    archives = [open_archive(f"s3://{s3_env}/shared") for _ in range(3)]
    written = _race(archives)
    rows = archives[0].read(archives[0].partitions()[0])
    assert sorted(e["event_id"] for e in rows) == sorted(e["event_id"] for e in written)
    print(f"conflicts resolved: {[a.conflicts for a in archives]}")

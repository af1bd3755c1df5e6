"""Sampled frames from the edge (issue 15): validated, stored as objects beside the event archive, indexed in the
database, exported for labeling.

Each ``smartcam/<site>/<camera>/sample`` message (``contract/sample.py``: a ``sample.v1`` JSON header + a JPEG) is
checked in this order, and dead-lettered with the first reason it fails: size limit (``max_sample_bytes``),
envelope (magic, lengths, the JPEG's sha256 against the header), the header's schema, the topic's site and camera
against the header's, and the image itself — it must *decode* as a JPEG of the size the header says (a file that
merely starts like one is not enough). Then::

    <store>/samples/site=<site>/camera=<camera>/date=YYYY-MM-DD/<HHMMSS.mmm>-<sample_id>.jpg   the image
    <store>/samples/site=<site>/camera=<camera>/date=YYYY-MM-DD/<HHMMSS.mmm>-<sample_id>.json  its header

(``<store>``: ``--samples-store``, default the ``--archive`` root; a local directory or ``s3://bucket/prefix``,
through the archive's storage classes), and one row in the ``samples`` table (migration 7), written after the
objects: a redelivered sample finds its row and is a duplicate; a crash between the two rewrites the same
objects. ``smartcam-sink samples export`` writes ``DIR/images/*.jpg`` and ``DIR/samples.jsonl`` (the headers,
each with its ``image_file``) — the input of ``smartcam-model label``.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from contract.sample import SAMPLE_LEAF, SAMPLE_SCHEMA_FILE, SampleFormatError, decode_sample
from contract.schema import validation_errors
from contract.timestamps import ts_ms
from contract.topics import parse_topic

log = logging.getLogger(__name__)

PREFIX = "samples"
DEFAULT_MAX_SAMPLE_BYTES = 2 * 1024 * 1024

metadata = sa.MetaData()
NAME = sa.String(64)

samples_table = sa.Table(  # migration 7 (cloud_sink/store.py)
    "samples", metadata,
    sa.Column("sample_id", sa.String(32), primary_key=True),
    sa.Column("site", NAME, nullable=False),
    sa.Column("camera_id", NAME, nullable=False),
    sa.Column("ts", sa.BigInteger, nullable=False),  # epoch ms, capture time
    sa.Column("reason", sa.String(32), nullable=False),
    sa.Column("model_sha256", sa.String(64), nullable=False),
    sa.Column("width", sa.Integer, nullable=False),
    sa.Column("height", sa.Integer, nullable=False),
    sa.Column("bytes", sa.Integer, nullable=False),
    sa.Column("detections", sa.Integer, nullable=False),
    sa.Column("image_key", sa.String(500), nullable=False),  # relative to the samples store's root
    sa.Column("header", sa.Text, nullable=False),  # the validated sample.v1 header, JSON
    sa.Column("received_at", sa.BigInteger, nullable=False),  # epoch ms, sink clock
    sa.Index("ix_samples_camera_ts", "site", "camera_id", "ts"),
)


def create_tables(conn: sa.Connection) -> None:
    """Migration 7."""
    metadata.create_all(conn, tables=[samples_table])


def is_sample_topic(topic: str) -> bool:
    parts = parse_topic(topic)
    return parts is not None and parts[2] == SAMPLE_LEAF


class SampleStorage:
    """Bytes in and out of the archive's storage (a :class:`~cloud_sink.archive.LocalArchive` directory or an
    :class:`~cloud_sink.archive.S3Archive` bucket): the archive writes text, samples are JPEG."""

    def __init__(self, url: str) -> None:
        from cloud_sink.archive import open_archive

        self.archive = open_archive(url)
        self.url = getattr(self.archive, "url", url)

    def put(self, key: str, data: bytes, content_type: str) -> None:
        self.archive.put_object(key, data, content_type)

    def get(self, key: str) -> bytes:
        return self.archive.get_object(key)


def sample_keys(header: dict[str, Any]) -> tuple[str, str]:
    """(image key, header key) of one sample, partitioned by site, camera and UTC date of its capture time.

    >>> sample_keys({"site": "s", "camera_id": "c", "ts": "2026-01-02T03:04:05.678Z", "sample_id": "ab"})[0]
    'samples/site=s/camera=c/date=2026-01-02/030405.678-ab.jpg'
    """
    ts = header["ts"]
    base = (f"{PREFIX}/site={header['site']}/camera={header['camera_id']}/date={ts[:10]}/"
            f"{ts[11:13]}{ts[14:16]}{ts[17:23]}-{header['sample_id']}")
    return base + ".jpg", base + ".json"


def check_sample(topic: str, payload: bytes, max_bytes: int = DEFAULT_MAX_SAMPLE_BYTES
                 ) -> tuple[dict[str, Any], bytes]:
    """The (header, jpeg) of a valid sample; raises ValueError with the one-line reason it is not."""
    if len(payload) > max_bytes:
        raise ValueError(f"sample of {len(payload)} bytes is over the {max_bytes}-byte limit")
    try:
        header, jpeg = decode_sample(payload)
    except SampleFormatError as exc:
        raise ValueError(f"bad sample envelope: {exc}") from None
    errors = validation_errors(header, SAMPLE_SCHEMA_FILE)
    if errors:
        raise ValueError(f"sample header fails sample.v1: {errors[0]}")
    site, camera, _ = parse_topic(topic) or ("", "", "")
    if (header["site"], header["camera_id"]) != (site, camera):
        raise ValueError(f"sample of {header['site']}/{header['camera_id']} on the topic of {site}/{camera}")
    import cv2
    import numpy as np

    if not jpeg.startswith(b"\xff\xd8"):
        raise ValueError("sample image is not a JPEG (no SOI marker)")
    image = cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_COLOR)
    if image is None:
        raise ValueError("sample image does not decode as a JPEG")
    h, w = image.shape[:2]
    if (w, h) != (header["image"]["width"], header["image"]["height"]):
        raise ValueError(f"sample image is {w}x{h}, its header says {header['image']['width']}x"
                         f"{header['image']['height']}")
    return header, jpeg


@dataclass
class SampleResult:
    stored: int = 0
    duplicates: int = 0
    dead: int = 0
    reasons: list[str] = field(default_factory=list)


class SampleSink:
    """Validate, store and index sample messages (called by the Ingestor for ``.../sample`` topics)."""

    def __init__(self, store: Any, storage: SampleStorage | None, *, max_bytes: int = DEFAULT_MAX_SAMPLE_BYTES):
        self.store = store
        self.storage = storage
        self.max_bytes = max_bytes

    def handle(self, messages: list[tuple[str, bytes]], now: float) -> SampleResult:
        """Store what is valid; dead-letter the rest (one transaction for the dead letters). Raises only when
        the storage or the database is unavailable, so the caller does not acknowledge the batch."""
        from cloud_sink.store import Batch

        result = SampleResult()
        dead: list[dict[str, Any]] = []
        for topic, payload in messages:
            try:
                if self.storage is None:
                    raise ValueError("this sink stores no samples (start it with --samples-store or --archive)")
                header, jpeg = check_sample(topic, payload, self.max_bytes)
            except ValueError as exc:
                dead.append({"topic": topic, "reason": str(exc)[:500], "payload": payload, "received_at": now})
                result.dead += 1
                result.reasons.append(str(exc))
                continue
            if self._known(header["sample_id"]):
                result.duplicates += 1
                continue
            image_key, header_key = sample_keys(header)
            self.storage.put(image_key, jpeg, "image/jpeg")
            self.storage.put(header_key, json.dumps(header, sort_keys=True).encode(), "application/json")
            new = self._index(header, image_key, now)  # 0: another worker indexed it meanwhile
            result.stored += new
            result.duplicates += 1 - new
        if dead:
            self.store.write(Batch(dead_letters=dead), received_at=now)
        return result

    def _known(self, sample_id: str) -> bool:
        with self.store.engine.connect() as conn:
            return conn.execute(sa.select(samples_table.c.sample_id)
                                .where(samples_table.c.sample_id == sample_id)).first() is not None

    def _index(self, header: dict[str, Any], image_key: str, now: float) -> int:
        row = {"sample_id": header["sample_id"], "site": header["site"], "camera_id": header["camera_id"],
               "ts": ts_ms(header["ts"]), "reason": header["reason"], "model_sha256": header["model"]["sha256"],
               "width": header["image"]["width"], "height": header["image"]["height"],
               "bytes": header["image"]["bytes"], "detections": len(header["detections"]),
               "image_key": image_key, "header": json.dumps(header, sort_keys=True),
               "received_at": int(now * 1000)}
        stmt = self.store._insert(samples_table).values(**row).on_conflict_do_nothing(index_elements=["sample_id"])
        with self.store.engine.begin() as conn:
            return conn.execute(stmt).rowcount or 0


def recent_samples(store: Any, *, site: str | None = None, camera_id: str | None = None,
                   since_ms: int | None = None, until_ms: int | None = None, limit: int | None = None,
                   newest_first: bool = True) -> list[dict[str, Any]]:
    """Index rows (without the header text), newest first by default."""
    t = samples_table.c
    q = sa.select(t.sample_id, t.site, t.camera_id, t.ts, t.reason, t.model_sha256, t.width, t.height, t.bytes,
                  t.detections, t.image_key, t.header)
    if site:
        q = q.where(t.site == site)
    if camera_id:
        q = q.where(t.camera_id == camera_id)
    if since_ms is not None:
        q = q.where(t.ts >= since_ms)
    if until_ms is not None:
        q = q.where(t.ts < until_ms)
    q = q.order_by(t.ts.desc() if newest_first else t.ts, t.sample_id)
    if limit:
        q = q.limit(limit)
    with store.engine.connect() as conn:
        return [dict(r._mapping) for r in conn.execute(q)]


def export_samples(store: Any, storage: SampleStorage, out: str | Path, *, camera_id: str, site: str | None = None,
                   since_ms: int | None = None, until_ms: int | None = None, progress: bool = False) -> int:
    """Write ``out/images/<sample_id>.jpg`` and ``out/samples.jsonl`` (oldest first); returns the count."""
    from tqdm import tqdm

    rows = recent_samples(store, site=site, camera_id=camera_id, since_ms=since_ms, until_ms=until_ms,
                          newest_first=False)
    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    lines = []
    for row in tqdm(rows, desc="export", unit="sample", disable=not progress):
        name = f"images/{row['sample_id']}.jpg"
        (out / name).write_bytes(storage.get(row["image_key"]))
        lines.append(json.dumps({**json.loads(row["header"]), "image_file": name}, sort_keys=True))
    tmp = out / "samples.jsonl.tmp"
    tmp.write_text("".join(line + "\n" for line in lines))
    tmp.replace(out / "samples.jsonl")
    return len(rows)


def parse_since(text: str, now: float | None = None) -> int:
    """``7d``, ``24h``, ``30m`` ago, or a timestamp -> epoch ms.

    >>> parse_since("1d", now=86400.0 * 2)
    86400000
    """
    now = time.time() if now is None else now
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
    if text and text[-1] in units and text[:-1].replace(".", "", 1).isdigit():
        return int((now - float(text[:-1]) * units[text[-1]]) * 1000)
    try:
        dt = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise ValueError(f"bad --since {text!r}: use e.g. 7d, 24h, 30m or an ISO time") from None
    return int((dt if dt.tzinfo else dt.replace(tzinfo=timezone.utc)).timestamp() * 1000)


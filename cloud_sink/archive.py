"""The event archive: JSON Lines per site, camera and UTC hour, in a local directory or S3 — written as
immutable parts, compacted once the hour is over.

Layout (Hive-style, so Spark/DuckDB/Athena read it as partitioned data)::

    <root>/site=<site>/camera=<camera_id>/date=YYYY-MM-DD/hour=HH/events.jsonl       the compacted hour
    <root>/site=<site>/camera=<camera_id>/date=YYYY-MM-DD/hour=HH/part-<name>.jsonl  parts not compacted yet

The hour is the event's own ``ts`` in UTC (not the time it was archived), so replays land in the right hour.
Each line is one event exactly as stored (compact JSON, sorted keys); a file's lines are ordered by
(ts, event_id). A partition's events are the union of its files, each event once (:meth:`Archive.read`): a
reader that globs ``*.jsonl`` and keeps the first line per ``event_id`` sees the same.

Why parts: S3 has no append, so adding to one hourly object means rewriting it whole, once per batch (900x the
bytes of the file over an hour, with the rewrite on the ingest's ack path). A part is written once and never
changed; :meth:`Archive.compact` folds a partition's parts into ``events.jsonl`` (merged by ``event_id``) and
deletes them, once the hour is closed. Each event is so written about twice (part + compacted file). Parts are
named by whoever writes them (:class:`cloud_sink.archive_follower.ArchiveFollower`: the database positions
they cover), so two writers never write the same object with different content. The compacted file is replaced
with a conditional PUT on S3 (``If-Match`` the ETag read, ``If-None-Match: *`` when new) or under ``flock`` on
``<root>/.archive.lock`` locally, so two compactions never lose each other's events.

>>> import tempfile
>>> archive = open_archive(tempfile.mkdtemp())
>>> ev = {"event_id": "0" * 32, "ts": "2026-01-02T03:04:05.000Z", "site": "lobby", "camera_id": "cam-1"}
>>> archive.write([ev, ev], name="1-1")
1
>>> archive.partitions()
['site=lobby/camera=cam-1/date=2026-01-02/hour=03']
>>> archive.compact('site=lobby/camera=cam-1/date=2026-01-02/hour=03')
1
>>> [e["event_id"] == ev["event_id"] for e in archive.read(archive.partitions()[0])]
[True]
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import tempfile
import threading
import uuid
from abc import ABC, abstractmethod
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from contract.timestamps import parse_ts
from contract.topics import is_valid_name

log = logging.getLogger(__name__)

FILE_NAME = "events.jsonl"
PART_PREFIX = "part-"
SUFFIX = ".jsonl"
ENDPOINT_ENV = ("SMARTCAM_S3_ENDPOINT", "AWS_ENDPOINT_URL")
_MAX_CONFLICTS = 50  # concurrent compactions of one partition: re-read and merge again this many times at most
_PART_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,100}$")
_PREFIX_SEGMENT = re.compile(r"^[A-Za-z0-9_.=-]{1,200}$")
_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")  # S3 bucket naming rules


class ArchiveError(RuntimeError):
    """The archive cannot be opened or written (missing bucket, refused credentials, unwritable dir)."""


class _Conflict(Exception):
    """Another writer replaced the object since we read it."""


def partition_of(event: dict[str, Any]) -> str:
    """``site=S/camera=C/date=YYYY-MM-DD/hour=HH`` for one event; ``ValueError`` if it cannot be placed."""
    try:
        site, camera, ts, event_id = event["site"], event["camera_id"], event["ts"], event["event_id"]
    except (KeyError, TypeError):
        raise ValueError("archive: event needs event_id, ts, site and camera_id") from None
    if not (isinstance(site, str) and isinstance(camera, str) and is_valid_name(site) and is_valid_name(camera)):
        raise ValueError(f"archive: unsafe site/camera name {site!r}/{camera!r}")
    if not isinstance(event_id, str) or not event_id:
        raise ValueError("archive: event_id must be a non-empty string")
    try:
        parse_ts(ts)
    except (TypeError, ValueError):
        raise ValueError(f"archive: bad timestamp {ts!r} (want YYYY-MM-DDTHH:MM:SS.mmmZ)") from None
    return f"site={site}/camera={camera}/date={ts[:10]}/hour={ts[11:13]}"


def partition_end(partition: str) -> float:
    """Epoch seconds at which a partition's hour ends (its events are older than that).

    >>> partition_end("site=a/camera=b/date=1970-01-01/hour=01")
    7200.0
    """
    fields = dict(part.split("=", 1) for part in partition.split("/"))
    return parse_ts(f"{fields['date']}T{fields['hour']}:00:00.000Z") + 3600.0


def _line(event: dict[str, Any]) -> str:
    return json.dumps(event, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


class _Lines:
    """Events keyed by event_id (first copy wins); lines that cannot be parsed are kept verbatim (never dropped)."""

    def __init__(self) -> None:
        self.rows: dict[str, tuple[str, str]] = {}  # event_id -> (ts, line)
        self.unparsed: list[str] = []

    def add_text(self, text: str) -> None:
        for line in text.splitlines():
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
                self.rows.setdefault(str(obj["event_id"]), (str(obj.get("ts", "")), line))
            except (ValueError, KeyError, TypeError):
                self.unparsed.append(line)
                log.warning("archive: an unreadable line is kept as it is")

    def add_events(self, events: list[dict[str, Any]]) -> None:
        for ev in events:
            self.rows.setdefault(ev["event_id"], (ev["ts"], _line(ev)))

    def text(self) -> str:
        ordered = sorted(self.rows.items(), key=lambda kv: (kv[1][0], kv[0]))
        return "".join(line + "\n" for _, (_, line) in ordered) + "".join(u + "\n" for u in self.unparsed)


class Archive(ABC):
    """Hourly JSON Lines partitions; subclasses only move whole objects (get, put, list, delete)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.conflicts = 0  # times another compaction got there first (re-read and merged again)

    @property
    @abstractmethod
    def url(self) -> str:
        """Where the archive is (``s3://bucket/prefix`` or the absolute directory): its identity."""

    def write(self, events: list[dict[str, Any]], *, name: str | None = None) -> int:
        """Write ``events`` as one new immutable part per partition; returns how many distinct events.

        ``name`` (letters, digits, ``_ . -``) names the parts; give each batch its own (the follower uses the
        database positions it covers). Every event is checked before anything is written.
        """
        name = name or uuid.uuid4().hex
        if not _PART_NAME.match(name):
            raise ValueError(f"archive: bad part name {name!r}")
        groups: dict[str, _Lines] = {}
        for ev in events:
            groups.setdefault(partition_of(ev), _Lines()).add_events([ev])
        with self._lock:
            for partition, lines in sorted(groups.items()):
                self._put_new(f"{partition}/{PART_PREFIX}{name}{SUFFIX}", lines.text())
        return sum(len(lines.rows) for lines in groups.values())

    def compact(self, partition: str) -> int:
        """Fold the partition's parts into its ``events.jsonl`` and delete them; returns how many parts.

        Safe to repeat and to interrupt: the parts are deleted only after the merged file is in place, and a
        part written meanwhile is left for the next compaction.
        """
        key = f"{partition}/{FILE_NAME}"
        with self._lock, self._writers_lock():
            for _ in range(_MAX_CONFLICTS):
                parts = self._parts_in(partition)
                if not parts:
                    return 0
                version, text = self._get(key)
                merged = _Lines()
                merged.add_text(text or "")
                for part in parts:
                    merged.add_text(self._get(part)[1] or "")
                try:
                    self._put(key, merged.text(), expect=version)
                except _Conflict:
                    self.conflicts += 1
                    continue
                self._delete(parts)
                return len(parts)
        raise ArchiveError(f"archive {partition}: still conflicting after {_MAX_CONFLICTS} attempts")

    def read(self, partition: str) -> list[dict[str, Any]]:
        """A partition's events, compacted file and parts together, each once, ordered by (ts, event_id)."""
        lines = _Lines()
        for key in [f"{partition}/{FILE_NAME}", *self._parts_in(partition)]:
            lines.add_text(self._get(key)[1] or "")
        return [json.loads(line) for line in lines.text().splitlines()]

    def partitions(self) -> list[str]:
        """Every partition that holds a compacted file or parts, sorted."""
        return sorted({key.rsplit("/", 1)[0] for key in self._data_keys()})

    def parts(self) -> dict[str, list[str]]:
        """Partition -> its parts' keys (relative to the root), for partitions not fully compacted."""
        found: dict[str, list[str]] = {}
        for key in self._data_keys():
            partition, leaf = key.rsplit("/", 1)
            if leaf != FILE_NAME:
                found.setdefault(partition, []).append(key)
        return found

    def _data_keys(self) -> list[str]:
        return [k for k in self._list("site=") if k.endswith(SUFFIX) and k.count("/") == 4 and k.startswith("site=")
                and (k.endswith("/" + FILE_NAME) or k.rsplit("/", 1)[1].startswith(PART_PREFIX))]

    def _parts_in(self, partition: str) -> list[str]:
        return sorted(k for k in self._list(partition + "/")
                      if k.rsplit("/", 1)[1].startswith(PART_PREFIX) and k.endswith(SUFFIX))

    @contextlib.contextmanager
    def _writers_lock(self) -> Iterator[None]:
        """Exclusion between processes, where the storage needs it (a local directory)."""
        yield

    @abstractmethod
    def _get(self, key: str) -> tuple[Any, str | None]:
        """(version, text); (None, None) when missing."""

    @abstractmethod
    def _put(self, key: str, text: str, expect: Any) -> Any:
        """Replace the object atomically if it is still at version ``expect`` (None: absent); new version.

        Raises ``_Conflict`` when another writer changed it in between (where the storage can tell).
        """

    @abstractmethod
    def _put_new(self, key: str, text: str) -> None:
        """Write an immutable object (a part); the same key is only ever written with the same events."""

    @abstractmethod
    def _list(self, prefix: str) -> list[str]:
        """Every key under the root that starts with ``prefix``, relative to the root."""

    @abstractmethod
    def _delete(self, keys: list[str]) -> None:
        """Remove objects (missing ones are fine)."""

    @abstractmethod
    def put_object(self, key: str, data: bytes, content_type: str) -> None:
        """Store any bytes under ``key``: the sink's sampled frames live in the same storage as the events."""

    @abstractmethod
    def get_object(self, key: str) -> bytes:
        """The bytes stored under ``key``."""


class LocalArchive(Archive):
    """A directory tree; every file is written to a temp file, synced and renamed into place."""

    def __init__(self, root: str | Path) -> None:
        super().__init__()
        self.root = Path(root)
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ArchiveError(f"archive directory {self.root} cannot be created: {exc.strerror}") from None
        if not os.access(self.root, os.W_OK | os.X_OK):
            raise ArchiveError(f"archive directory {self.root} is not writable")

    def __repr__(self) -> str:
        return f"LocalArchive({str(self.root)!r})"

    @property
    def url(self) -> str:
        return str(self.root.resolve())

    def _get(self, key: str) -> tuple[Any, str | None]:
        path = self.root / key
        try:
            st = path.stat()
            return (st.st_mtime_ns, st.st_size, st.st_ino), path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return None, None

    @contextlib.contextmanager
    def _writers_lock(self) -> Iterator[None]:
        try:
            import fcntl
        except ImportError:  # not a POSIX system: writers in one process are still serialised
            yield
            return
        try:
            fh = open(self.root / ".archive.lock", "a+b")  # noqa: SIM115 (held for the whole block)
        except OSError as exc:
            raise ArchiveError(f"archive lock in {self.root}: {exc.strerror or exc}") from None
        with fh:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh.fileno(), fcntl.LOCK_UN)

    def _write_file(self, path: Path, data: bytes) -> None:
        """The one place bytes reach the disk: temp file in the same directory, fsync, rename."""
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=".archive-", suffix=".tmp", dir=path.parent)
            try:
                with os.fdopen(fd, "wb") as fh:
                    fh.write(data)
                    fh.flush()
                    os.fsync(fh.fileno())
                os.replace(tmp, path)
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise
        except OSError as exc:
            raise ArchiveError(f"archive write to {path} failed: {exc.strerror or exc}") from None

    def _put(self, key: str, text: str, expect: Any) -> Any:
        # Under the writers' flock nobody else compacts meanwhile: expect always holds.
        path = self.root / key
        self._write_file(path, text.encode("utf-8"))
        st = path.stat()
        return (st.st_mtime_ns, st.st_size, st.st_ino)

    def _put_new(self, key: str, text: str) -> None:
        self._write_file(self.root / key, text.encode("utf-8"))

    def put_object(self, key: str, data: bytes, content_type: str) -> None:
        """Store any bytes under ``key`` (sampled frames live beside the events): atomic, like every write."""
        self._write_file(self.root / key, data)

    def get_object(self, key: str) -> bytes:
        return (self.root / key).read_bytes()

    def _list(self, prefix: str) -> list[str]:
        folder, _, start = prefix.rpartition("/")
        base = self.root / folder if folder else self.root
        if not base.is_dir():
            return []
        tops = [p for p in base.iterdir() if p.name.startswith(start)]
        files = [f for top in tops for f in ([top] if top.is_file() else top.rglob(f"*{SUFFIX}"))]
        return sorted(p.relative_to(self.root).as_posix() for p in files if p.is_file() and p.name.endswith(SUFFIX))

    def _delete(self, keys: list[str]) -> None:
        for key in keys:
            try:
                (self.root / key).unlink(missing_ok=True)
            except OSError as exc:
                raise ArchiveError(f"archive delete of {self.root / key} failed: {exc.strerror or exc}") from None


class S3Archive(Archive):
    """An S3-compatible bucket (AWS, SeaweedFS, MinIO...): parts are PUT once, the hour replaced by a
    conditional PUT when compacted."""

    def __init__(self, bucket: str, prefix: str = "", *, endpoint_url: str | None = None, client: Any = None) -> None:
        super().__init__()
        self.bucket = bucket
        self.prefix = check_prefix(prefix)
        if not _BUCKET.match(bucket) or ".." in bucket:
            raise ArchiveError(f"archive bucket {bucket!r}: not a valid S3 bucket name (3-63 of a-z 0-9 . -)")
        self.endpoint_url = endpoint_url or next((os.environ[v] for v in ENDPOINT_ENV if os.environ.get(v)), None)
        self.client = client or self._make_client()
        self.conditional_writes = True  # If-Match / If-None-Match on PUT (AWS, MinIO, SeaweedFS support them)
        self._call("open", lambda: self.client.head_bucket(Bucket=self.bucket))

    def __repr__(self) -> str:
        return f"S3Archive({self.url!r}, endpoint={self.endpoint_url!r})"

    @property
    def url(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}" if self.prefix else f"s3://{self.bucket}"

    def _make_client(self) -> Any:
        import boto3
        from botocore.config import Config

        region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"
        config = Config(retries={"max_attempts": 3, "mode": "standard"}, connect_timeout=5, read_timeout=30)
        # A fresh session: the default one caches the credentials it first resolved from the environment.
        session = boto3.session.Session()
        return session.client("s3", endpoint_url=self.endpoint_url, region_name=region, config=config)

    def _full(self, key: str) -> str:
        return f"{self.prefix}/{key}" if self.prefix else key

    def _call(self, what: str, fn: Any) -> Any:
        """Run one S3 request; turn botocore's errors into one readable ArchiveError line."""
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return fn()
        except (BotoCoreError, ClientError) as exc:
            raise self._error(what, exc) from None

    def _error(self, what: str, exc: Exception) -> ArchiveError:
        from botocore.exceptions import ClientError, EndpointConnectionError, NoCredentialsError

        where = f"{self.url} at {self.endpoint_url or 'AWS'}"
        if isinstance(exc, NoCredentialsError):
            return ArchiveError(f"archive {where}: no credentials (set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY)")
        if isinstance(exc, EndpointConnectionError):
            return ArchiveError(f"archive {where}: cannot connect to the S3 endpoint (set SMARTCAM_S3_ENDPOINT "
                                "or AWS_ENDPOINT_URL)")
        if isinstance(exc, ClientError):
            err = exc.response.get("Error", {})
            code = str(err.get("Code", ""))
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if code == "NoSuchBucket" or (what == "open" and status == 404):
                return ArchiveError(f"archive {where}: bucket {self.bucket!r} does not exist")
            if code in ("InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied") or status == 403:
                return ArchiveError(f"archive {where}: credentials refused ({code}; check AWS_ACCESS_KEY_ID / "
                                    "AWS_SECRET_ACCESS_KEY and the bucket policy)")
            return ArchiveError(f"archive {where}: {what} failed: {code} {err.get('Message', '')}".strip())
        return ArchiveError(f"archive {where}: {what} failed: {exc}")

    def _get(self, key: str) -> tuple[Any, str | None]:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            resp = self.client.get_object(Bucket=self.bucket, Key=self._full(key))
        except ClientError as exc:
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            code = str(exc.response.get("Error", {}).get("Code", ""))
            if code in ("NoSuchKey", "404") and status == 404:
                return None, None
            raise self._error("read", exc) from None
        except BotoCoreError as exc:
            raise self._error("read", exc) from None
        return resp.get("ETag"), resp["Body"].read().decode("utf-8")

    def _put(self, key: str, text: str, expect: Any) -> Any:
        from botocore.exceptions import BotoCoreError, ClientError

        condition = {"IfMatch": expect} if expect else {"IfNoneMatch": "*"}
        if not self.conditional_writes:
            condition = {}
        try:
            resp = self.client.put_object(Bucket=self.bucket, Key=self._full(key), Body=text.encode("utf-8"),
                                          ContentType="application/x-ndjson", **condition)
        except ClientError as exc:
            code = str(exc.response.get("Error", {}).get("Code", ""))
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if status in (409, 412) or code in ("PreconditionFailed", "ConditionalRequestConflict"):
                raise _Conflict(key) from None
            if condition and (status == 501 or code == "NotImplemented"):
                log.warning("archive %s: conditional PUT not supported by this server; one compactor per "
                            "prefix from now on", self.url)
                self.conditional_writes = False
                return self._put(key, text, expect)
            raise self._error("write", exc) from None
        except BotoCoreError as exc:
            raise self._error("write", exc) from None
        return resp.get("ETag")

    def put_object(self, key: str, data: bytes, content_type: str) -> None:
        """Store any bytes under ``key`` (sampled frames live beside the events)."""
        self._call("write", lambda: self.client.put_object(Bucket=self.bucket, Key=self._full(key), Body=data,
                                                           ContentType=content_type))

    def get_object(self, key: str) -> bytes:
        return self._call("read", lambda: self.client.get_object(Bucket=self.bucket, Key=self._full(key))["Body"].read())

    def _put_new(self, key: str, text: str) -> None:
        self._call("write", lambda: self.client.put_object(
            Bucket=self.bucket, Key=self._full(key), Body=text.encode("utf-8"), ContentType="application/x-ndjson"))

    def _list(self, prefix: str) -> list[str]:
        base = f"{self.prefix}/" if self.prefix else ""
        paginator = self.client.get_paginator("list_objects_v2")
        pages = self._call("list", lambda: list(paginator.paginate(Bucket=self.bucket, Prefix=base + prefix)))
        return sorted(obj["Key"][len(base):] for page in pages for obj in page.get("Contents", []))

    def _delete(self, keys: list[str]) -> None:
        for start in range(0, len(keys), 1000):  # DeleteObjects takes at most 1,000 keys
            chunk = keys[start:start + 1000]
            resp = self._call("delete", lambda chunk=chunk: self.client.delete_objects(
                Bucket=self.bucket, Delete={"Objects": [{"Key": self._full(k)} for k in chunk], "Quiet": True}))
            if resp.get("Errors"):
                first = resp["Errors"][0]
                raise ArchiveError(f"archive {self.url}: delete of {first.get('Key')} failed: {first.get('Code')}")


def check_prefix(prefix: str) -> str:
    """An S3 key prefix made of plain path segments (no ``.``/``..``, no empty segment); stripped of slashes.

    Some S3 servers (and every tool that mirrors a bucket to disk) resolve ``..``: ``s3://b/../../x`` would
    write outside the prefix the operator gave.

    >>> check_prefix("/smartcam/archive/")
    'smartcam/archive'
    >>> check_prefix("../../x")
    Traceback (most recent call last):
    ...
    cloud_sink.archive.ArchiveError: archive prefix '../../x': segment '..' is not allowed (use plain names: \
A-Z a-z 0-9 _ . = -)
    """
    stripped = prefix.strip("/")
    if not stripped:
        return ""
    for segment in stripped.split("/"):
        if segment in ("", ".", "..") or not _PREFIX_SEGMENT.match(segment):
            raise ArchiveError(f"archive prefix {prefix!r}: segment {segment!r} is not allowed (use plain names: "
                               "A-Z a-z 0-9 _ . = -)")
    return stripped


def open_archive(url: str, *, endpoint_url: str | None = None) -> Archive:
    """A local directory path (or ``file://``) or ``s3://bucket/prefix``; fails early with a clear message."""
    parsed = urlparse(url)
    if parsed.scheme == "s3":
        if not parsed.netloc:
            raise ArchiveError(f"archive URL {url!r} has no bucket (want s3://bucket/prefix)")
        if parsed.query or parsed.fragment or parsed.params:
            raise ArchiveError(f"archive URL {url!r}: no ?query or #fragment (want s3://bucket/prefix)")
        return S3Archive(parsed.netloc, parsed.path, endpoint_url=endpoint_url)
    if parsed.scheme == "file":
        return LocalArchive(parsed.path)
    if parsed.scheme and len(parsed.scheme) > 1:  # one letter would be a Windows drive
        raise ArchiveError(f"archive URL {url!r}: unsupported scheme {parsed.scheme!r} (use a directory or s3://)")
    return LocalArchive(url)

"""The event archive: hourly-partitioned JSON Lines per site and camera, in a local directory or S3.

Layout (Hive-style, so Spark/DuckDB/Athena read it as partitioned data)::

    <root>/site=<site>/camera=<camera_id>/date=YYYY-MM-DD/hour=HH/events.jsonl

The hour is the event's own ``ts`` in UTC (not the time it was archived), so replays land in the right file.
Each line is one event exactly as stored (compact JSON, sorted keys), lines ordered by (ts, event_id).

Idempotent: a write reads the partition's file, merges the new events keyed by ``event_id`` and replaces the
whole object (S3 has no append; a local write goes to a temp file and is renamed over). Writing the same event
twice therefore leaves it in the file once, and a batch with nothing new writes nothing.

Several writers (sink workers in one ``--share-group``) may share an archive: on S3 the replace is a
conditional PUT (``If-Match`` the ETag that was read, ``If-None-Match: *`` for a new object), and a writer that
loses the race re-reads and merges again; a local directory serialises writers with ``flock`` on
``<root>/.archive.lock``. So no writer ever overwrites another's events.

>>> import tempfile
>>> archive = open_archive(tempfile.mkdtemp())
>>> ev = {"event_id": "0" * 32, "ts": "2026-01-02T03:04:05.000Z", "site": "lobby", "camera_id": "cam-1"}
>>> archive.write([ev, ev])
1
>>> archive.partitions()
['site=lobby/camera=cam-1/date=2026-01-02/hour=03']
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import tempfile
import threading
from abc import ABC, abstractmethod
from collections import OrderedDict
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from contract.timestamps import parse_ts
from contract.topics import is_valid_name

log = logging.getLogger(__name__)

FILE_NAME = "events.jsonl"
ENDPOINT_ENV = ("SMARTCAM_S3_ENDPOINT", "AWS_ENDPOINT_URL")
_CACHE_PARTITIONS = 64  # recently written partitions kept in memory so a batch does not re-read the file
_MAX_CONFLICTS = 50  # concurrent writers on one partition: re-read and merge again this many times at most


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


def _line(event: dict[str, Any]) -> str:
    return json.dumps(event, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


class _Partition:
    """One partition's lines keyed by event_id; lines we cannot parse are kept verbatim (never dropped)."""

    def __init__(self, text: str) -> None:
        self.rows: dict[str, tuple[str, str]] = {}  # event_id -> (ts, line)
        self.unparsed: list[str] = []
        for line in text.splitlines():
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
                self.rows[str(obj["event_id"])] = (str(obj.get("ts", "")), line)
            except (ValueError, KeyError, TypeError):
                self.unparsed.append(line)
        if self.unparsed:
            log.warning("archive: %d unreadable line(s) kept as they are", len(self.unparsed))

    def merge(self, events: list[dict[str, Any]]) -> int:
        added = 0
        for ev in events:
            if ev["event_id"] not in self.rows:
                self.rows[ev["event_id"]] = (ev["ts"], _line(ev))
                added += 1
        return added

    def text(self) -> str:
        ordered = sorted(self.rows.items(), key=lambda kv: (kv[1][0], kv[0]))
        return "".join(line + "\n" for _, (_, line) in ordered) + "".join(u + "\n" for u in self.unparsed)


class Archive(ABC):
    """Hourly JSON Lines partitions; subclasses only move whole objects (get, put, list)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._cache: OrderedDict[str, tuple[Any, _Partition]] = OrderedDict()
        self.conflicts = 0  # times another writer got there first (re-read and merged again)

    def write(self, events: list[dict[str, Any]]) -> int:
        """Archive newly stored events; returns how many were not already there. Checks every event first."""
        groups: dict[str, list[dict[str, Any]]] = {}
        for ev in events:
            groups.setdefault(partition_of(ev), []).append(ev)
        added = 0
        with self._lock, self._writers_lock():
            for partition, batch in sorted(groups.items()):
                added += self._merge_into(partition, batch)
        return added

    def read(self, partition: str) -> list[dict[str, Any]]:
        """The events stored in one partition (``site=../camera=../date=../hour=..``), in file order."""
        _, text = self._get(self._key(partition), None)
        return [json.loads(line) for line in (text or "").splitlines() if line.strip()]

    def partitions(self) -> list[str]:
        """Every partition that holds a file, sorted."""
        suffix = "/" + FILE_NAME
        return sorted(k[: -len(suffix)] for k in self._list() if k.endswith(suffix))

    def _key(self, partition: str) -> str:
        return f"{partition}/{FILE_NAME}"

    def _merge_into(self, partition: str, batch: list[dict[str, Any]]) -> int:
        key = self._key(partition)
        for _ in range(_MAX_CONFLICTS):
            cached = self._cache.pop(key, None)
            version, text = self._get(key, cached[0] if cached else None)
            part = cached[1] if cached and text is None and version == cached[0] else _Partition(text or "")
            added = part.merge(batch)
            if added:
                try:
                    version = self._put(key, part.text(), expect=version)
                except _Conflict:
                    self.conflicts += 1
                    continue  # the cached copy is dropped: read the winner's version and merge into it
            self._cache[key] = (version, part)
            while len(self._cache) > _CACHE_PARTITIONS:
                self._cache.popitem(last=False)
            return added
        raise ArchiveError(f"archive {partition}: still conflicting after {_MAX_CONFLICTS} attempts")

    @contextlib.contextmanager
    def _writers_lock(self) -> Iterator[None]:
        """Exclusion between processes, where the storage needs it (a local directory)."""
        yield

    @abstractmethod
    def _get(self, key: str, known_version: Any) -> tuple[Any, str | None]:
        """(version, text); text None when missing, or when unchanged since ``known_version``."""

    @abstractmethod
    def _put(self, key: str, text: str, expect: Any) -> Any:
        """Replace the object atomically if it is still at version ``expect`` (None: absent); new version.

        Raises ``_Conflict`` when another writer changed it in between (where the storage can tell).
        """

    @abstractmethod
    def _list(self) -> list[str]:
        """Every key under the root, relative to it."""


class LocalArchive(Archive):
    """A directory tree; each partition file is replaced atomically (temp file + rename)."""

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

    def _get(self, key: str, known_version: Any) -> tuple[Any, str | None]:
        path = self.root / key
        try:
            st = path.stat()
        except FileNotFoundError:
            return None, None
        version = (st.st_mtime_ns, st.st_size, st.st_ino)
        if version == known_version:
            return version, None
        return version, path.read_text(encoding="utf-8")

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

    def _put(self, key: str, text: str, expect: Any) -> Any:
        # Under the writers' flock nobody else can have changed the file since _get: expect always holds.
        path = self.root / key
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=".events-", suffix=".tmp", dir=path.parent)
            try:
                with os.fdopen(fd, "w", encoding="utf-8") as fh:
                    fh.write(text)
                    fh.flush()
                    os.fsync(fh.fileno())
                os.replace(tmp, path)
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise
        except OSError as exc:
            raise ArchiveError(f"archive write to {path} failed: {exc.strerror or exc}") from None
        st = path.stat()
        return (st.st_mtime_ns, st.st_size, st.st_ino)

    def _list(self) -> list[str]:
        return sorted(p.relative_to(self.root).as_posix() for p in self.root.rglob(FILE_NAME))


class S3Archive(Archive):
    """An S3-compatible bucket (AWS, SeaweedFS, MinIO...); each partition is one object, replaced by PUT."""

    def __init__(self, bucket: str, prefix: str = "", *, endpoint_url: str | None = None, client: Any = None) -> None:
        super().__init__()
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.endpoint_url = endpoint_url or next((os.environ[v] for v in ENDPOINT_ENV if os.environ.get(v)), None)
        self.client = client or self._make_client()
        self.conditional_writes = True  # If-Match / If-None-Match on PUT (AWS, MinIO, SeaweedFS support them)
        self._call("open", lambda: self.client.head_bucket(Bucket=self.bucket))

    def __repr__(self) -> str:
        return f"S3Archive('s3://{self.bucket}/{self.prefix}', endpoint={self.endpoint_url!r})"

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

        where = f"s3://{self.bucket}/{self.prefix} at {self.endpoint_url or 'AWS'}"
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

    def _get(self, key: str, known_version: Any) -> tuple[Any, str | None]:
        from botocore.exceptions import BotoCoreError, ClientError

        kwargs: dict[str, Any] = {"Bucket": self.bucket, "Key": self._full(key)}
        if known_version:
            kwargs["IfNoneMatch"] = known_version
        try:
            resp = self.client.get_object(**kwargs)
        except ClientError as exc:
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            code = str(exc.response.get("Error", {}).get("Code", ""))
            if status == 304 or code == "304":
                return known_version, None
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
                log.warning("archive s3://%s: conditional PUT not supported by this server; one writer per "
                            "prefix from now on", self.bucket)
                self.conditional_writes = False
                return self._put(key, text, expect)
            raise self._error("write", exc) from None
        except BotoCoreError as exc:
            raise self._error("write", exc) from None
        return resp.get("ETag")

    def _list(self) -> list[str]:
        base = f"{self.prefix}/" if self.prefix else ""
        keys: list[str] = []
        paginator = self.client.get_paginator("list_objects_v2")
        pages = self._call("list", lambda: list(paginator.paginate(Bucket=self.bucket, Prefix=base)))
        for page in pages:
            keys += [obj["Key"][len(base):] for obj in page.get("Contents", [])]
        return sorted(keys)


def backfill(store: Any, archive: Archive, *, since: Any = None, until: Any = None, site: str | None = None,
             camera_id: str | None = None, page: int = 1000) -> int:
    """Archive stored events again from the database (e.g. after a crash between commit and archive write).

    Safe to repeat: the archive keeps each event once. Returns how many events were missing from the archive.
    """
    added = offset = 0
    while True:
        rows = store.events(site=site, camera_id=camera_id, since=since, until=until, limit=page, offset=offset)
        if not rows:
            return added
        added += archive.write([row["payload"] for row in rows])
        offset += len(rows)


def open_archive(url: str, *, endpoint_url: str | None = None) -> Archive:
    """A local directory path (or ``file://``) or ``s3://bucket/prefix``; fails early with a clear message."""
    parsed = urlparse(url)
    if parsed.scheme == "s3":
        if not parsed.netloc:
            raise ArchiveError(f"archive URL {url!r} has no bucket (want s3://bucket/prefix)")
        return S3Archive(parsed.netloc, parsed.path, endpoint_url=endpoint_url)
    if parsed.scheme == "file":
        return LocalArchive(parsed.path)
    if parsed.scheme and len(parsed.scheme) > 1:  # one letter would be a Windows drive
        raise ArchiveError(f"archive URL {url!r}: unsupported scheme {parsed.scheme!r} (use a directory or s3://)")
    return LocalArchive(url)

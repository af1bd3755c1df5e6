"""The model registry: signed, immutable model versions in a directory or in S3-compatible object storage.

Layout (the same under a directory and under ``s3://bucket/prefix``)::

    models/<version>/model.onnx       the file, byte for byte what was published
    models/<version>/manifest.json    {"manifest": {...}, "signature": {...}}, written last (the commit marker)

A version is content-addressed, ``<name>-<first 12 hex of the file's sha256>``: publishing the same file under
the same name again is a no-op that returns the stored version, and nothing is ever overwritten (S3 writes use
``If-None-Match: *``). The manifest says what a camera needs to trust and run the model: sha256 and size,
input shape, class names, recommended thresholds (a re-trained model's scores differ, so its thresholds travel
with it), the parent version, evaluation figures, when it was made; its ed25519 signature covers all of it.

>>> registry = open_registry("/tmp/registry")     # doctest: +SKIP
>>> publish(registry, "models/m.onnx", load_private_key("keys/signing.key"))["version"]   # doctest: +SKIP
'm-3fa1c2d4e5f6'
"""

from __future__ import annotations

import json
import logging
import os
import re
import tempfile
from abc import ABC, abstractmethod
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from camera.detector import read_build_manifest
from cloud_sink.archive import ENDPOINT_ENV
from contract.signature import SignatureError, key_id, verify_manifest
from contract.topics import NAME_RE

log = logging.getLogger(__name__)

MANIFEST_SCHEMA = "smartcam.registry-model/1"
MODEL_FILE, MANIFEST_FILE = "model.onnx", "manifest.json"
PRESIGN_EXPIRES_S = 7 * 24 * 3600  # the longest a SigV4 presigned URL may live
DEFAULT_THRESHOLDS = {"conf": 0.25, "iou": 0.45, "track_threshold": 0.5}  # the edge's own defaults


class RegistryError(RuntimeError):
    """The registry cannot be read or written, or a version is missing / refused (one-line message)."""


class Registry(ABC):
    """Storage of immutable objects under string keys; subclasses for a directory and for S3."""

    url: str

    @abstractmethod
    def read(self, key: str) -> bytes | None:
        """The object's bytes, or None if there is none."""

    @abstractmethod
    def create(self, key: str, data_path: Path) -> bool:
        """Store the file at ``key`` unless something is already there; returns False if it was."""

    @abstractmethod
    def children(self, prefix: str) -> list[str]:
        """The names one level below ``prefix`` (like ``ls``)."""

    @abstractmethod
    def fetch_url(self, key: str, expires_s: int = PRESIGN_EXPIRES_S) -> str:
        """Where a camera downloads the object: ``file://`` for a directory, a presigned HTTPS URL for S3."""

    # ---- versions ------------------------------------------------------------------------------------------
    def versions(self) -> list[dict[str, Any]]:
        """Every published version's manifest, oldest first."""
        out = []
        for version in self.children("models"):
            entry = self.entry(version, missing_ok=True)
            if entry is not None:
                out.append(entry["manifest"])
        return sorted(out, key=lambda m: (m["created"], m["version"]))

    def entry(self, version: str, *, missing_ok: bool = False) -> dict[str, Any] | None:
        """``{"manifest": ..., "signature": ...}`` of one version (RegistryError if missing, unless missing_ok)."""
        if not NAME_RE.fullmatch(version):
            raise RegistryError(f"not a version name: {version!r}")
        raw = self.read(f"models/{version}/{MANIFEST_FILE}")
        if raw is None:
            if missing_ok:
                return None
            raise RegistryError(f"no version {version!r} in registry {self.url}")
        try:
            entry = json.loads(raw)
            entry["manifest"]["version"]
        except (ValueError, KeyError, TypeError):
            raise RegistryError(f"registry {self.url}: manifest of {version} is unreadable") from None
        return entry

    def model_url(self, version: str, *, url_base: str | None = None, expires_s: int = PRESIGN_EXPIRES_S) -> str:
        """Where cameras fetch ``version``'s file: under ``url_base`` (an HTTP server serving the registry) if
        given, else the registry's own (``file://`` or presigned S3)."""
        key = f"models/{version}/{MODEL_FILE}"
        if url_base:
            return url_base.rstrip("/") + "/" + key
        return self.fetch_url(key, expires_s)


class DirRegistry(Registry):
    """A registry in a local (or NFS-mounted) directory."""

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root).resolve()
        self.url = str(self.root)
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise RegistryError(f"registry {self.root}: {exc.strerror or exc}") from None

    def read(self, key: str) -> bytes | None:
        try:
            return (self.root / key).read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise RegistryError(f"registry {self.root}: cannot read {key}: {exc.strerror or exc}") from None

    def create(self, key: str, data_path: Path) -> bool:
        target = self.root / key
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=target.parent, prefix=".tmp-", delete=False) as tmp, \
                    open(data_path, "rb") as src:
                while chunk := src.read(1 << 20):
                    tmp.write(chunk)
                tmp.flush()
                os.fsync(tmp.fileno())
            try:
                os.link(tmp.name, target)  # atomic and never replaces an existing file (rename would)
            except FileExistsError:
                return False
            finally:
                os.unlink(tmp.name)
        except OSError as exc:
            raise RegistryError(f"registry {self.root}: cannot write {key}: {exc.strerror or exc}") from None
        return True

    def children(self, prefix: str) -> list[str]:
        base = self.root / prefix
        return sorted(p.name for p in base.iterdir() if p.is_dir()) if base.is_dir() else []

    def fetch_url(self, key: str, expires_s: int = PRESIGN_EXPIRES_S) -> str:
        return (self.root / key).as_uri()


class S3Registry(Registry):
    """A registry in an S3 bucket (AWS, MinIO, SeaweedFS...); credentials from the usual AWS variables."""

    def __init__(self, bucket: str, prefix: str = "", *, endpoint_url: str | None = None, client: Any = None):
        self.bucket, self.prefix = bucket, prefix.strip("/")
        self.url = f"s3://{bucket}/{self.prefix}"
        self.endpoint_url = endpoint_url or next((os.environ[v] for v in ENDPOINT_ENV if os.environ.get(v)), None)
        if client is None:
            import boto3
            from botocore.config import Config

            region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"
            client = boto3.session.Session().client(
                "s3", endpoint_url=self.endpoint_url, region_name=region,
                config=Config(retries={"max_attempts": 3, "mode": "standard"}, connect_timeout=5, read_timeout=60,
                              signature_version="s3v4"))
        self.client = client
        self._call("open", lambda: self.client.head_bucket(Bucket=bucket))

    def _key(self, key: str) -> str:
        return f"{self.prefix}/{key}" if self.prefix else key

    def _call(self, what: str, fn: Callable[[], Any]) -> Any:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return fn()
        except (ClientError, BotoCoreError) as exc:
            raise self._error(what, exc) from None

    def _error(self, what: str, exc: Exception) -> RegistryError:
        from botocore.exceptions import ClientError

        if isinstance(exc, ClientError):
            err = exc.response.get("Error", {})
            return RegistryError(f"registry {self.url}: {what}: {err.get('Code', '?')} "
                                 f"{err.get('Message', '')}".rstrip())
        return RegistryError(f"registry {self.url} at {self.endpoint_url or 'AWS'}: {what}: {exc}")

    def read(self, key: str) -> bytes | None:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return self.client.get_object(Bucket=self.bucket, Key=self._key(key))["Body"].read()
        except (ClientError, BotoCoreError) as exc:
            if isinstance(exc, ClientError) and exc.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
                return None
            raise self._error(f"read {key}", exc) from None

    def create(self, key: str, data_path: Path) -> bool:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            with open(data_path, "rb") as f:
                self.client.put_object(Bucket=self.bucket, Key=self._key(key), Body=f, IfNoneMatch="*")
        except (ClientError, BotoCoreError) as exc:
            code = exc.response.get("Error", {}).get("Code") if isinstance(exc, ClientError) else None
            if code in ("PreconditionFailed", "412", "ConditionalRequestConflict"):
                return False
            raise self._error(f"write {key}", exc) from None
        return True

    def children(self, prefix: str) -> list[str]:
        full = self._key(prefix).rstrip("/") + "/"
        names: list[str] = []
        paginator = self.client.get_paginator("list_objects_v2")
        pages = self._call("list", lambda: list(paginator.paginate(Bucket=self.bucket, Prefix=full, Delimiter="/")))
        for page in pages:
            names += [p["Prefix"][len(full):].rstrip("/") for p in page.get("CommonPrefixes", [])]
        return sorted(names)

    def fetch_url(self, key: str, expires_s: int = PRESIGN_EXPIRES_S) -> str:
        return self.client.generate_presigned_url("get_object", Params={"Bucket": self.bucket, "Key": self._key(key)},
                                                  ExpiresIn=int(expires_s))


def open_registry(url: str, *, endpoint_url: str | None = None) -> Registry:
    """A directory path (or ``file://``) or ``s3://bucket/prefix``."""
    parsed = urlparse(str(url))
    if parsed.scheme == "s3":
        if not parsed.netloc:
            raise RegistryError(f"registry URL {url!r} has no bucket (want s3://bucket/prefix)")
        return S3Registry(parsed.netloc, parsed.path, endpoint_url=endpoint_url)
    if parsed.scheme == "file":
        return DirRegistry(parsed.path)
    if parsed.scheme and len(parsed.scheme) > 1:
        raise RegistryError(f"registry URL {url!r}: unsupported scheme {parsed.scheme!r} (a directory or s3://)")
    return DirRegistry(url)


# ---- publishing ------------------------------------------------------------------------------------------------
def describe_model(path: str | os.PathLike) -> dict[str, Any]:
    """What a camera needs to know about a model file, read by the edge's own loader (so a model the edge cannot
    run is refused here, with the edge's reason): input name/shape/type, imgsz, class names."""
    from camera.detector import Detector, ModelError

    try:
        det = Detector(path, classes=None, threads=1)
    except ModelError as exc:
        raise RegistryError(f"refused: {exc}") from None
    if "person" not in det.names.values():
        raise RegistryError(f"refused: model {Path(path).name} has no 'person' class (the edge detects people)")
    inp = det.session.get_inputs()[0]
    return {"input": {"name": inp.name, "shape": [d if isinstance(d, int) else str(d) for d in inp.shape],
                      "dtype": "float16" if det.input_dtype.__name__ == "float16" else "float32"},
            "output_shape": [d if isinstance(d, int) else str(d) for d in det.session.get_outputs()[0].shape],
            "imgsz": list(det.imgsz), "classes": [det.names[k] for k in sorted(det.names)], "sha256": det.sha256}


def _eval_figures(eval_json: str | os.PathLike | None, model_path: Path, sha256: str) -> dict[str, Any] | None:
    """The row of ``smartcam-model eval --json`` output that is this model (by path or file name)."""
    if eval_json is None:
        return None
    try:
        doc = json.loads(Path(eval_json).read_text())
        rows = doc["models"]
    except (OSError, ValueError, KeyError, TypeError):
        raise RegistryError(f"{eval_json} is not the output of smartcam-model eval --json") from None
    for row in rows:
        if Path(row.get("path", "")).resolve() == model_path.resolve() or row.get("model") == model_path.name:
            keep = ("ap50", "ap50_95", "precision", "recall", "conf", "infer_ms", "latency_ms", "imgsz")
            return {"labels": doc.get("labels"), **{k: row[k] for k in keep if k in row}}
    raise RegistryError(f"{eval_json} has no results for {model_path.name}")


def publish(registry: Registry, model_path: str | os.PathLike, signing_key: Any, *, name: str | None = None,
            notes: str | None = None, thresholds: dict[str, float] | None = None, parent: str | None = None,
            eval_json: str | os.PathLike | None = None, now: datetime | None = None) -> dict[str, Any]:
    """Check, sign and store one model; returns its manifest (the stored one if this file was published before)."""
    from camera.detector import file_sha256
    from models.signing import sign_manifest

    path = Path(model_path)
    if not path.is_file():
        raise RegistryError(f"model file not found: {path}")
    name = name or re.sub(r"[^A-Za-z0-9_.-]", "-", path.stem)[:50]
    if not NAME_RE.fullmatch(name) or len(name) > 50:
        raise RegistryError(f"bad --name {name!r}: 1-50 chars of A-Z a-z 0-9 _ . -")
    info = describe_model(path)
    sha256 = file_sha256(path)
    version = f"{name}-{sha256[:12]}"
    existing = registry.entry(version, missing_ok=True)
    if existing is not None:
        log.info("%s is already in the registry as %s: nothing stored", path, version)
        return existing["manifest"]
    if parent is None:
        same = [m for m in registry.versions() if m.get("name") == name]
        parent = same[-1]["version"] if same else None
    elif registry.entry(parent, missing_ok=True) is None:
        raise RegistryError(f"parent version {parent!r} is not in registry {registry.url}")
    bm = read_build_manifest(path)
    build = None if bm is None else {
        k: bm[k] for k in ("precision", "source", "quantization", "results", "built_with") if k in bm}
    manifest = {
        "schema": MANIFEST_SCHEMA, "version": version, "name": name, "file": MODEL_FILE,
        "sha256": sha256, "size": path.stat().st_size, "input": info["input"], "output_shape": info["output_shape"],
        "imgsz": info["imgsz"], "classes": info["classes"],
        "thresholds": {**DEFAULT_THRESHOLDS, **(thresholds or {})}, "parent": parent,
        "evaluation": _eval_figures(eval_json, path, sha256), "build": build,
        "created": (now or datetime.now(timezone.utc)).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z",
        "notes": notes,
    }
    entry = {"manifest": manifest, "signature": sign_manifest(manifest, signing_key)}
    registry.create(f"models/{version}/{MODEL_FILE}", path)
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as tmp:
        json.dump(entry, tmp, indent=2)
    try:
        if not registry.create(f"models/{version}/{MANIFEST_FILE}", Path(tmp.name)):
            log.info("another publisher stored %s first", version)
            return registry.entry(version)["manifest"]
    finally:
        os.unlink(tmp.name)
    log.info("published %s (%s, %d bytes, key %s)", version, sha256[:12], manifest["size"],
             key_id(signing_key.public_key()))
    return manifest


def verify_entry(entry: dict[str, Any], public_key: Any) -> None:
    """Raise :class:`~contract.signature.SignatureError` unless the entry's signature verifies."""
    if not isinstance(entry, dict) or "manifest" not in entry:
        raise SignatureError("not a registry entry")
    verify_manifest(entry["manifest"], entry.get("signature"), public_key)

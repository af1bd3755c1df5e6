"""Ed25519 signatures over model manifests, the verifying half (the edge and the cloud both need it).

A model's manifest holds the file's sha256 and size; the registry signs the manifest's canonical JSON (sorted
keys, no spaces, UTF-8) with the publisher's private key (``models/signing.py``), and every edge verifies it with
the public key it trusts (``model_updates.trust_key``) before a byte of the model runs. Any change to any field,
the sha256 included, breaks the signature. ``cryptography`` is imported lazily, as the rest of the contract is
standard library only.

>>> canonical_json({"b": 1, "a": [1, 2]})
b'{"a":[1,2],"b":1}'
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
from pathlib import Path
from typing import Any

ALGORITHM = "ed25519"


class SignatureError(ValueError):
    """A signature, key or signed document that cannot be trusted (one-line message)."""


def canonical_json(doc: dict[str, Any]) -> bytes:
    """The bytes that are signed: sorted keys, compact separators, UTF-8 (the same on every machine)."""
    return json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def key_id(public_key: Any) -> str:
    """A short stable name for a public key (first 16 hex of the sha256 of its raw bytes): which key signed."""
    from cryptography.hazmat.primitives import serialization

    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def load_public_key(path: str | os.PathLike) -> Any:
    """Read a ``signing.pub`` (PEM) as an ed25519 public key; a one-line error otherwise."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    try:
        key = serialization.load_pem_public_key(Path(path).read_bytes())
    except OSError as exc:
        raise SignatureError(f"cannot read trust key {path}: {exc.strerror or exc}") from None
    except ValueError as exc:
        raise SignatureError(f"{path} is not a PEM public key: {str(exc).splitlines()[0]}") from None
    if not isinstance(key, Ed25519PublicKey):
        raise SignatureError(f"{path} is not an ed25519 public key")
    return key


def verify_manifest(manifest: dict[str, Any], signature: Any, key: Any) -> None:
    """Raise :class:`SignatureError` unless ``signature`` is a valid signature of ``manifest`` by ``key``."""
    from cryptography.exceptions import InvalidSignature

    if not isinstance(signature, dict) or signature.get("alg") != ALGORITHM:
        raise SignatureError(f"unsigned, or not an {ALGORITHM} signature")
    try:
        raw = base64.b64decode(str(signature.get("value", "")), validate=True)
    except ValueError:
        raise SignatureError("signature is not base64") from None
    try:
        key.verify(raw, canonical_json(manifest))
    except InvalidSignature:
        raise SignatureError(f"signature does not verify with trust key {key_id(key)} (signed by key "
                             f"{signature.get('key_id', '?')})") from None

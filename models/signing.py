"""Model signing keys and signatures, the private half: ``smartcam-model keygen`` and ``publish``.

Whoever publishes models holds ``signing.key`` (never on a camera); cameras hold ``signing.pub`` and verify with
:mod:`contract.signature`. See docs/models-ota.md for the trust model and key rotation.

>>> import tempfile
>>> from contract.signature import load_public_key, verify_manifest
>>> private_path, public_path = generate_keypair(tempfile.mkdtemp())
>>> doc = {"version": "person-abc", "sha256": "00" * 32}
>>> sig = sign_manifest(doc, load_private_key(private_path))
>>> verify_manifest(doc, sig, load_public_key(public_path))
>>> verify_manifest({**doc, "sha256": "11" * 32}, sig, load_public_key(public_path))
Traceback (most recent call last):
...
contract.signature.SignatureError: signature does not verify with trust key ...
"""

from __future__ import annotations

import base64
import os
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from contract.signature import ALGORITHM, SignatureError, canonical_json, key_id

PRIVATE_NAME, PUBLIC_NAME = "signing.key", "signing.pub"


def generate_keypair(out_dir: str | os.PathLike, *, overwrite: bool = False) -> tuple[Path, Path]:
    """Write ``signing.key`` (PKCS#8 PEM, mode 0600) and ``signing.pub`` (PEM) into ``out_dir``.

    Refuses to replace an existing key unless ``overwrite``: replacing it means re-keying every camera.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    private_path, public_path = out / PRIVATE_NAME, out / PUBLIC_NAME
    if not overwrite and (private_path.exists() or public_path.exists()):
        raise SignatureError(f"{private_path} or {public_path} already exists (rotate keys deliberately: see "
                             "docs/models-ota.md)")
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    private_path.unlink(missing_ok=True)
    # Created 0600 from the start: never readable by others, not even for a moment.
    fd = os.open(private_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
    os.chmod(private_path, 0o600)  # whatever the umask
    public_path.write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM,
                                                          serialization.PublicFormat.SubjectPublicKeyInfo))
    return private_path, public_path


def load_private_key(path: str | os.PathLike) -> Ed25519PrivateKey:
    """Read a ``signing.key``; a clear error for a missing file or a key of another kind."""
    try:
        key = serialization.load_pem_private_key(Path(path).read_bytes(), password=None)
    except OSError as exc:
        raise SignatureError(f"cannot read signing key {path}: {exc.strerror or exc}") from None
    except (ValueError, TypeError) as exc:
        raise SignatureError(f"{path} is not an unencrypted PEM private key: {str(exc).splitlines()[0]}") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise SignatureError(f"{path} is not an ed25519 key (smartcam-model keygen makes one)")
    return key


def sign_manifest(manifest: dict[str, Any], key: Ed25519PrivateKey) -> dict[str, str]:
    """The signature block stored with the manifest: algorithm, key id, base64 signature of its canonical JSON."""
    return {"alg": ALGORITHM, "key_id": key_id(key.public_key()),
            "value": base64.b64encode(key.sign(canonical_json(manifest))).decode("ascii")}

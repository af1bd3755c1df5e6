"""The ``sample.v1`` envelope: one sampled frame on ``smartcam/<site>/<camera>/sample`` (the learning loop).

Binary, not base64-in-JSON (a third more bytes on a metered link): ``b"SCS1"``, the header's length as 4 bytes
big-endian, the header (``sample.v1.schema.json``, UTF-8 JSON), then the JPEG bytes. The header carries the
JPEG's length and sha256, so a truncated or altered image is caught before anyone decodes it.

>>> payload = encode_sample({"sample_id": "x", "image": {}}, b"\\xff\\xd8jpeg")
>>> payload[:4], decode_sample(payload)[1]
(b'SCS1', b'\\xff\\xd8jpeg')
"""

from __future__ import annotations

import hashlib
import json
import struct
from typing import Any

SAMPLE_LEAF = "sample"
SAMPLE_SCHEMA_FILE = "sample.v1.schema.json"
MAGIC = b"SCS1"
MAX_HEADER_BYTES = 256 * 1024


class SampleFormatError(ValueError):
    """Not a sample.v1 envelope, or its image does not match its header (one-line reason)."""


def encode_sample(header: dict[str, Any], jpeg: bytes) -> bytes:
    """The envelope of one sample; fills ``image.bytes`` and ``image.sha256`` from ``jpeg``."""
    header = {**header, "image": {**header.get("image", {}), "bytes": len(jpeg),
                                  "sha256": hashlib.sha256(jpeg).hexdigest()}}
    head = json.dumps(header, separators=(",", ":")).encode()
    return MAGIC + struct.pack(">I", len(head)) + head + jpeg


def decode_sample(payload: bytes) -> tuple[dict[str, Any], bytes]:
    """(header, jpeg); raises :class:`SampleFormatError` for a wrong magic, a bad length, bad JSON, or a JPEG
    whose length or sha256 differs from the header's (schema validation is the reader's next step)."""
    if len(payload) < 8 or payload[:4] != MAGIC:
        raise SampleFormatError("not a sample.v1 envelope (no SCS1 magic)")
    (n,) = struct.unpack(">I", payload[4:8])
    if n > MAX_HEADER_BYTES or 8 + n > len(payload):
        raise SampleFormatError(f"header length {n} does not fit the {len(payload)}-byte message")
    try:
        header = json.loads(payload[8:8 + n].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SampleFormatError(f"header is not UTF-8 JSON: {exc}") from None
    if not isinstance(header, dict):
        raise SampleFormatError("header is not a JSON object")
    jpeg = payload[8 + n:]
    image = header.get("image") if isinstance(header.get("image"), dict) else {}
    if image.get("bytes") != len(jpeg):
        raise SampleFormatError(f"image is {len(jpeg)} bytes, header says {image.get('bytes')}")
    if image.get("sha256") != hashlib.sha256(jpeg).hexdigest():
        raise SampleFormatError("image sha256 does not match the header")
    return header, jpeg

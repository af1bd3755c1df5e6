"""The ``batch`` envelope: many events of one camera in one zlib-compressed JSON Lines message.

``smartcam/<site>/<camera>/batch``: QoS 1, not retained; zlib (level 9, preset dictionary) of JSON Lines, one
ordinary event.v1 document per line, of that camera only, in outbox order.

>>> lines = decode_batch(encode_batch(['{"a":1}', '{"b":2}']), max_bytes=1000)
>>> lines
[b'{"a":1}', b'{"b":2}']
"""

from __future__ import annotations

import json
import zlib
from functools import cache
from importlib import resources

from contract.schema import SCHEMA_VERSION

BATCH_LEAF = "batch"
ZDICT_FILE = f"event.v{SCHEMA_VERSION}.zdict.json"


class BatchError(ValueError):
    """A batch payload that cannot be decoded (not zlib, unknown dictionary, too large, truncated)."""


@cache
def batch_dictionaries() -> dict[int, bytes]:
    """Every preset dictionary this side knows, by zlib DICTID (Adler-32). The edge uses :data:`ZDICT_FILE`'s."""
    doc = json.loads(resources.files("contract").joinpath("schemas", ZDICT_FILE).read_text(encoding="utf-8"))
    zdict = doc["text"].encode("utf-8")
    if zlib.adler32(zdict) != doc["dictid"]:
        raise RuntimeError(f"{ZDICT_FILE} is damaged: its Adler-32 is not the recorded dictid")
    return {doc["dictid"]: zdict}


def _edge_zdict() -> bytes:
    return next(iter(batch_dictionaries().values()))


def encode_batch(events_json_lines: list[str] | list[bytes]) -> bytes:
    """Compress compact-JSON events (one per item, no newlines inside) into one ``batch`` payload."""
    data = b"".join((e.encode("utf-8") if isinstance(e, str) else e) + b"\n" for e in events_json_lines)
    comp = zlib.compressobj(9, zdict=_edge_zdict())
    return comp.compress(data) + comp.flush()


def decode_batch(payload: bytes, max_bytes: int) -> list[bytes]:
    """The event lines of a ``batch`` payload, decompressing at most ``max_bytes`` (a zip bomb stops there).

    Raises :class:`BatchError` with a one-line reason. The lines are not parsed: each is checked like a message
    on ``.../events`` by the caller.
    """
    data = bytes(payload)
    if len(data) < 6 or (data[0] & 0x0F) != 8 or ((data[0] << 8) | data[1]) % 31:
        raise BatchError("batch is not a zlib stream")
    if not data[1] & 0x20:
        raise BatchError("batch zlib stream has no preset dictionary (expected the event.v1 dictionary)")
    dictid = int.from_bytes(data[2:6], "big")
    zdict = batch_dictionaries().get(dictid)
    if zdict is None:
        raise BatchError(f"batch uses an unknown zlib dictionary (DICTID {dictid:#010x})")
    inflater = zlib.decompressobj(zdict=zdict)
    try:
        out = inflater.decompress(data, max_bytes + 1)
    except zlib.error as exc:
        raise BatchError(f"batch is not valid zlib data: {exc}") from None
    if len(out) > max_bytes:
        raise BatchError(f"batch larger than {max_bytes} bytes after decompression")
    if not inflater.eof:
        raise BatchError("batch zlib stream is truncated")
    if inflater.unused_data:
        raise BatchError(f"{len(inflater.unused_data)} bytes after the end of the batch's zlib stream")
    lines = out.split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()  # every line ends with a newline
    if not lines:
        raise BatchError("batch holds no events")
    return lines

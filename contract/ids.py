"""Event and summary ids: the idempotency keys the sink de-duplicates on.

>>> a, b = new_event_id(), new_event_id()
>>> len(a), a != b, a[:16] == b[:16]
(32, True, True)
"""

from __future__ import annotations

import itertools
import os
import secrets

_ID_PREFIX = secrets.token_hex(8)  # 64 random bits per process: ids of two processes differ in this half
_ID_COUNTER = itertools.count()  # next() on itertools.count is atomic under the GIL: thread-safe


def _new_id_prefix() -> None:
    """A forked child must not repeat its parent's ids: it draws its own prefix and restarts the counter."""
    global _ID_PREFIX, _ID_COUNTER
    _ID_PREFIX, _ID_COUNTER = secrets.token_hex(8), itertools.count()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_new_id_prefix)


def new_event_id() -> str:
    """A fresh idempotency key: 16 hex of per-process randomness + 16 hex of a process-wide counter.

    Still 32 lowercase hex chars (the schema's pattern), unique as long as two processes never draw the same
    64-bit prefix (p ~ n^2 / 2^65 for n process starts). Unlike uuid4, consecutive ids share their first 26-28
    characters, so a batch of events compresses ~1.4x better (docs/mqtt.md).
    """
    return f"{_ID_PREFIX}{next(_ID_COUNTER):016x}"

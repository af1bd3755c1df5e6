"""The contract's one timestamp form: UTC RFC 3339 with milliseconds and a ``Z``.

>>> format_ts(0.0)
'1970-01-01T00:00:00.000Z'
>>> parse_ts("1970-01-01T00:01:00.500Z")
60.5
"""

from __future__ import annotations

from datetime import datetime, timezone

#: How old an event may be for the sink by default (``cloud_sink`` ``max_past_days``): older ones are
#: dead-lettered as too old. The edge warns at start when ``--start-time`` stamps events older than this.
DEFAULT_MAX_PAST_DAYS = 400.0


def format_ts(epoch_s: float) -> str:
    """UTC RFC 3339 with milliseconds and a Z, the only timestamp form in the contract."""
    dt = datetime.fromtimestamp(epoch_s, tz=timezone.utc)
    return dt.strftime("%Y-%m-%dT%H:%M:%S.") + f"{dt.microsecond // 1000:03d}Z"


def parse_ts(value: str) -> float:
    """Inverse of :func:`format_ts`: epoch seconds."""
    return datetime.strptime(value, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=timezone.utc).timestamp()


def ts_ms(value: str) -> int:
    """Contract timestamp ``YYYY-MM-DDTHH:MM:SS.mmmZ`` → epoch ms; ~10x faster than strptime, same checks.

    >>> ts_ms("1970-01-02T00:00:00.250Z")
    86400250
    """
    if (not isinstance(value, str) or len(value) != 24 or value[4] != "-" or value[7] != "-" or value[10] != "T"
            or value[13] != ":" or value[16] != ":" or value[19] != "." or value[23] != "Z"
            or not (value[:4] + value[5:7] + value[8:10] + value[11:13] + value[14:16] + value[17:19]
                    + value[20:23]).isdigit() or not value.isascii()):
        raise ValueError(f"not a contract timestamp: {str(value)[:40]!r}")
    dt = datetime(int(value[:4]), int(value[5:7]), int(value[8:10]), int(value[11:13]), int(value[14:16]),
                  int(value[17:19]), tzinfo=timezone.utc)  # validates month/day/hour ranges
    return int(dt.timestamp()) * 1000 + int(value[20:23])

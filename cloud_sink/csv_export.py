"""CSV of the hourly and daily figures (``/api/stats/hourly?format=csv``, ``/api/stats/daily?format=csv``), for
the spreadsheet every shop owner has: one header row, one row per (site, camera, zone, hour or day), UTC times,
empty cells for figures without data, and names that start like a formula quoted so a spreadsheet shows them
as text (OWASP "CSV injection").

>>> to_csv([{"site": "shop", "camera_id": "door", "zone": None, "day": "2026-05-01", "entries": 3}],
...        ["site", "camera_id", "zone", "day", "entries"]).splitlines()
['site,camera_id,zone,day,entries', 'shop,door,,2026-05-01,3']
>>> to_csv([{"site": "=1+1"}], ["site"]).splitlines()[1]
"'=1+1"
"""

from __future__ import annotations

import csv
import io
from typing import Any

HOURLY_COLUMNS = ["site", "camera_id", "zone", "hour", "entries", "exits", "unique_tracks", "occupancy_max",
                  "occupancy_mean", "dwell_mean", "dwell_count", "loiters"]
DAILY_COLUMNS = ["site", "camera_id", "zone", "day", "entries", "exits", "unique_tracks", "occupancy_max",
                 "occupancy_mean", "dwell_mean", "loiters"]


def _cell(value: Any) -> Any:
    if value is None:
        return ""
    if isinstance(value, float):
        return round(value, 3)
    if isinstance(value, str) and value[:1] in ("=", "+", "-", "@", "\t", "\r"):
        return "'" + value
    return value


def to_csv(rows: list[dict[str, Any]], columns: list[str]) -> str:
    """``rows`` as RFC 4180 CSV with ``columns`` (in that order), line ends ``\\r\\n`` as the RFC says."""
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(columns)
    for row in rows:
        writer.writerow([_cell(row.get(c)) for c in columns])
    return out.getvalue()

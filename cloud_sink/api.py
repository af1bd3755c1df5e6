"""The sink's review API: read-only FastAPI over the store and its rollups, plus the dashboard at ``/``.

Nothing here writes: every route is GET, so POST/PUT/DELETE get 405. ``/api/*`` needs ``Authorization: Bearer
<token>`` when a token is set, and :func:`check_bind` refuses to serve a non-loopback address without one (the
data shows when people came and went). ``/health`` and the static dashboard files stay open: they hold no data.
Query parameters are validated by FastAPI/pydantic (bad values → 422, never 500); a database that cannot be
reached answers 503. The dashboard asks for the token, or takes it from a link's fragment
(``http://host:8080/#token=...``, never sent to the server) and keeps it in the tab's sessionStorage.

    app = create_app(Store.open("sqlite:///smartcam.db"), token=os.environ.get(TOKEN_ENV))
    check_bind("0.0.0.0", token)  # raises InsecureBindError without a token
    uvicorn.run(app, host="0.0.0.0", port=8080)
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import logging
import re
from datetime import datetime, timedelta, timezone
from importlib import resources
from typing import Annotated, Any, Literal

import sqlalchemy as sa
from fastapi import APIRouter, Depends, FastAPI, HTTPException, Query, Request
from fastapi.responses import JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from fastapi.staticfiles import StaticFiles
from pydantic import BeforeValidator

from cloud_sink import rollups
from cloud_sink.csv_export import DAILY_COLUMNS, HOURLY_COLUMNS, to_csv
from cloud_sink.store import Store
from contract.schema import EVENT_TYPES
from contract.topics import NAME_RE

log = logging.getLogger(__name__)

TOKEN_ENV = "SMARTCAM_API_TOKEN"
MAX_LIMIT = 1000
NAME_PATTERN = NAME_RE.pattern  # contract.topics: the one name rule
ZONE_PATTERN = rf"^(\*|{NAME_RE.pattern[1:-1]})$"  # a zone name, or * for every zone

#: The dashboard loads nothing from elsewhere; this keeps it that way (and blocks injected inline script).
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data: blob:; style-src 'self'; script-src 'self'; "
                               "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
}


class InsecureBindError(ValueError):
    """Serving the API beyond this machine without a token."""


def is_loopback(host: str) -> bool:
    """True for localhost / 127.0.0.0/8 / ::1; any other name or address counts as reachable from outside."""
    if host.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


MIN_TOKEN_CHARS = 32  # ~128 bits from secrets.token_hex(16) / token_urlsafe(24): off loopback it is the only guard
MIN_TOKEN_DISTINCT = 8  # "x" * 40 is long, not strong


def check_bind(host: str, token: str | None) -> None:
    """Refuse to expose the API on a non-loopback address without a strong bearer token (call before serving)."""
    if is_loopback(host):
        return
    if not token:
        raise InsecureBindError(
            f"refusing to serve the API on {host} without a token: set {TOKEN_ENV} or --http-token-file, "
            "or bind 127.0.0.1")
    if len(token) < MIN_TOKEN_CHARS or len(set(token)) < MIN_TOKEN_DISTINCT or not token.strip():
        raise InsecureBindError(
            f"refusing to serve the API on {host}: the token is too weak ({len(token)} characters, "
            f"{len(set(token))} distinct; want at least {MIN_TOKEN_CHARS}, ~128 bits): make one with "
            "python3 -c 'import secrets; print(secrets.token_urlsafe(32))'")


def allowed_hosts(host: str, token: str | None, configured: list[str] | None = None) -> list[str]:
    """``Host`` header names the API answers; ``["*"]`` = any.

    Without a token on loopback, a web page whose name re-binds to 127.0.0.1 (DNS rebinding) could read the API
    through the operator's browser; it must send its own name as ``Host``, so only the bound host and the
    loopback names are accepted unless ``configured`` says otherwise. With a token (required off loopback) the
    page cannot authenticate, and reverse proxies send their own names: any.

    >>> allowed_hosts("127.0.0.1", None)
    ['127.0.0.1', '[::1]', 'localhost']
    >>> allowed_hosts("0.0.0.0", "t" * 32)
    ['*']
    """
    if configured:
        return sorted({_host_name(h) for h in configured if h.strip()})
    if token or not is_loopback(host):
        return ["*"]
    return sorted({_host_name(host), "localhost", "127.0.0.1", "[::1]"})


def _host_name(host: str) -> str:
    """As a ``Host`` header names it: lower case, IPv6 literals in brackets."""
    name = host.strip().strip("[]").lower()
    return f"[{name}]" if ":" in name else name


# ------------------------------------------------------------------------------------------ query parameters
Site = Annotated[str | None, Query(pattern=NAME_PATTERN, description="site name")]
Camera = Annotated[str | None, Query(pattern=NAME_PATTERN, description="camera id")]
Zone = Annotated[str | None, Query(pattern=ZONE_PATTERN, description="zone name, '*' = every zone, "
                                                                     "absent = the whole camera")]
_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
_NUMBER = re.compile(r"^\s*[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?\s*$")


def _epoch_seconds(value: Any) -> Any:
    """A number is epoch **seconds**, whatever its size (pydantic alone reads one above 2e10 as milliseconds:
    year 9999 in seconds became 1978); anything else goes on to ISO 8601 parsing."""
    if isinstance(value, str) and _NUMBER.match(value):
        try:
            return _EPOCH + timedelta(seconds=float(value))
        except (OverflowError, ValueError):
            raise ValueError("epoch seconds out of range (years 1-9999)") from None
    return value


_TIME = "ISO 8601 time (e.g. 2026-01-01T03:00:00Z; no offset = UTC) or epoch seconds"
Since = Annotated[datetime | None, BeforeValidator(_epoch_seconds), Query(description=f"{_TIME} (inclusive)")]
Until = Annotated[datetime | None, BeforeValidator(_epoch_seconds), Query(description=f"{_TIME} (exclusive)")]


def _utc(value: datetime | None) -> datetime | None:
    """Naive times are UTC, like every time in the contract."""
    if value is None or value.tzinfo is not None:
        return value
    return value.replace(tzinfo=timezone.utc)


def _range(since: datetime | None, until: datetime | None) -> tuple[datetime | None, datetime | None]:
    since, until = _utc(since), _utc(until)
    if since is not None and until is not None and since >= until:
        raise HTTPException(422, detail=[{"loc": ["query", "until"], "msg": "until must be after since",
                                          "type": "value_error"}])
    return since, until


Format = Annotated[Literal["json", "csv"], Query(description="json (default) or csv (a spreadsheet download)")]


def _csv(rows: list[dict[str, Any]], columns: list[str], filename: str) -> Response:
    return Response(to_csv(rows, columns), media_type="text/csv; charset=utf-8",
                    headers={"Content-Disposition": f'attachment; filename="{filename}"'})


class BearerToken(HTTPBearer):
    """``Authorization: Bearer <token>`` on every /api route when a token is set (constant-time compare)."""

    def __init__(self, token: str | None) -> None:
        super().__init__(auto_error=False, description="the sink's API token")
        self.token = token

    async def __call__(self, request: Request) -> None:  # type: ignore[override]
        if self.token is None:
            return
        credentials: HTTPAuthorizationCredentials | None = await super().__call__(request)
        given = credentials.credentials if credentials else ""
        if not hmac.compare_digest(given.encode(), self.token.encode()):
            raise HTTPException(401, detail="missing or wrong bearer token", headers={"WWW-Authenticate": "Bearer"})


def _static_dir() -> str:
    return str(resources.files("cloud_sink").joinpath("static"))


# ------------------------------------------------------------------------------------------ the app
def create_app(store: Store, *, token: str | None = None, metrics: Any = None, samples: Any = None) -> FastAPI:
    """The read-only API and dashboard over ``store``; ``token`` (if set) is required on ``/api/*`` and
    ``/metrics``. ``metrics``: this process's ingest counters (cloud_sink.metrics.SinkMetrics), if it ingests."""
    app = FastAPI(title="smartcam sink", version="1", docs_url=None, redoc_url=None,  # /docs would need a CDN
                  description="Read-only review API: cameras, events, hourly rollups, occupancy, dwell.")
    api = APIRouter(prefix="/api", dependencies=[Depends(BearerToken(token or None))])

    @app.middleware("http")
    async def headers(request: Request, call_next):
        response = await call_next(request)
        for name, value in SECURITY_HEADERS.items():
            response.headers.setdefault(name, value)
        if request.url.path.startswith("/api/"):
            response.headers["Cache-Control"] = "no-store"
        return response

    @app.exception_handler(sa.exc.SQLAlchemyError)
    async def database_down(_request: Request, exc: sa.exc.SQLAlchemyError) -> JSONResponse:
        log.error("database error: %s", str(exc).splitlines()[0][:300])
        return JSONResponse({"detail": "database unavailable"}, status_code=503)

    @app.get("/health", tags=["health"])
    def health() -> dict[str, Any]:
        """Liveness for load balancers: the database answers, and the event-time window ingest applies (set by
        the sink at start). No data, no token."""
        state = store.sink_state()
        window = ({"max_past_s": state["window_max_past_s"], "max_future_s": state.get("window_max_future_s", 0)}
                  if "window_max_past_s" in state else None)
        return {"status": "ok", "schema_version": store.schema_version(), "time_window": window}

    @api.get("/cameras")
    def cameras(site: Site = None) -> dict[str, Any]:
        """Every camera seen, with its health (state, last seen, fps, inference ms, events total)."""
        rows = store.cameras()
        models = {(m["site"], m["camera_id"]): m for m in store.camera_models()}
        for c in rows:  # the model it runs and whether its latest update failed (over-the-air models)
            c["model"] = models.get((c["site"], c["camera_id"]))
        return {"cameras": [c for c in rows if site is None or c["site"] == site]}

    @api.get("/models")
    def camera_models(site: Site = None) -> dict[str, Any]:
        """Per camera: the model it runs (registry version, name, sha256) and its latest update's outcome
        (state, version, reason; ``failed`` when it was rejected or rolled back), from the model/reported
        documents (docs/models-ota.md)."""
        return {"cameras": [m for m in store.camera_models() if site is None or m["site"] == site]}

    @api.get("/events")
    def events(site: Site = None, camera: Camera = None,
               type: Annotated[Literal[EVENT_TYPES] | None, Query(description="event type")] = None,  # type: ignore[valid-type]
               zone: Annotated[str | None, Query(pattern=NAME_PATTERN)] = None,
               since: Since = None, until: Until = None,
               limit: Annotated[int, Query(ge=1, le=MAX_LIMIT)] = 100,
               offset: Annotated[int, Query(ge=0, le=10**9)] = 0) -> dict[str, Any]:
        """Stored events, newest first, with filters and limit/offset pagination (``next_offset`` when more)."""
        since, until = _range(since, until)
        rows = store.events(site=site, camera_id=camera, type=type, zone=zone, since=since, until=until,
                            limit=limit + 1, offset=offset)
        more = len(rows) > limit
        return {"events": rows[:limit], "limit": limit, "offset": offset,
                "next_offset": offset + limit if more else None}

    @api.get("/summaries")
    def summaries(site: Site = None, camera: Camera = None, since: Since = None, until: Until = None,
                  limit: Annotated[int, Query(ge=1, le=MAX_LIMIT)] = 100,
                  offset: Annotated[int, Query(ge=0, le=10**9)] = 0) -> dict[str, Any]:
        """Stored summary messages (cameras in summary mode), newest window first; since/until on window start."""
        since, until = _range(since, until)
        rows = store.summaries(site=site, camera_id=camera, since=since, until=until, limit=limit + 1,
                               offset=offset)
        more = len(rows) > limit
        return {"summaries": rows[:limit], "limit": limit, "offset": offset,
                "next_offset": offset + limit if more else None}

    @api.get("/stats/hourly")
    def stats_hourly(site: Site = None, camera: Camera = None, zone: Zone = None, since: Since = None,
                     until: Until = None, format: Format = "json") -> Any:
        """Hourly rollups (entries, exits, unique tracks, occupancy, dwell mean), oldest first; ``format=csv``
        for a spreadsheet."""
        since, until = _range(since, until)
        rows = rollups.hourly(store, since=since, until=until, site=site, camera_id=camera, zone=zone)
        return _csv(rows, HOURLY_COLUMNS, "smartcam-hourly.csv") if format == "csv" else {"hours": rows}

    @api.get("/stats/daily")
    def stats_daily(site: Site = None, camera: Camera = None, zone: Zone = None, since: Since = None,
                    until: Until = None, format: Format = "json") -> Any:
        """The hourly rollups summed per UTC day (unique tracks distinct per day), oldest first; ``format=csv``
        for a spreadsheet."""
        since, until = _range(since, until)
        rows = rollups.daily(store, since=since, until=until, site=site, camera_id=camera, zone=zone)
        return _csv(rows, DAILY_COLUMNS, "smartcam-daily.csv") if format == "csv" else {"days": rows}

    @api.get("/occupancy")
    def occupancy(site: Site = None, camera: Camera = None, zone: Zone = None, since: Since = None,
                  until: Until = None,
                  bucket: Annotated[int, Query(ge=1, le=86400, description="interval, seconds")] = 60,
                  ) -> dict[str, Any]:
        """People in view per interval: max and mean of the camera's ``count`` reports."""
        since, until = _range(since, until)
        rows = rollups.occupancy(store, since=since, until=until, site=site, camera_id=camera, zone=zone,
                                 bucket_s=bucket)
        return {"bucket_s": bucket, "intervals": rows}

    @api.get("/dwell")
    def dwell(site: Site = None, camera: Camera = None, zone: Zone = None, since: Since = None,
              until: Until = None) -> dict[str, Any]:
        """Dwell time distribution (n, mean, median, p90, histogram) from ``person.exit`` events."""
        since, until = _range(since, until)
        return rollups.dwell(store, since=since, until=until, site=site, camera_id=camera, zone=zone)

    @api.get("/overview")
    def overview(site: Site = None, camera: Camera = None, since: Since = None,
                 until: Until = None) -> dict[str, Any]:
        """What ``smartcam-sink report --json`` prints: per camera totals, health, dwell, peak hour, zones, lines."""
        since, until = _range(since, until)
        return rollups.overview(store, since=since, until=until, site=site, camera_id=camera)

    @api.get("/samples")
    def sample_list(site: Site = None, camera: Camera = None,
                    limit: Annotated[int, Query(ge=1, le=MAX_LIMIT)] = 24) -> dict[str, Any]:
        """Recent sampled frames (the learning loop), newest first: why each was sent, size, detections; the
        image is at ``/api/samples/<sample_id>.jpg`` (cloud_sink/samples.py)."""
        from cloud_sink.samples import recent_samples

        rows = recent_samples(store, site=site, camera_id=camera, limit=limit)
        for r in rows:
            r["reasons"] = json.loads(r.pop("header"))["reasons"]
            r["ts"] = datetime.fromtimestamp(r["ts"] / 1000, tz=timezone.utc).isoformat().replace("+00:00", "Z")
            del r["image_key"]
        return {"samples": rows}

    @api.get("/samples/{sample_id}.jpg", response_class=Response)
    def sample_image(sample_id: str) -> Response:
        """One sample's JPEG (masked on the edge before it left), from the sink's samples store."""
        from cloud_sink.samples import samples_table

        if samples is None:
            raise HTTPException(404, detail="this sink serves no sample images (no --samples-store)")
        with store.engine.connect() as conn:
            key = conn.execute(sa.select(samples_table.c.image_key)
                               .where(samples_table.c.sample_id == sample_id)).scalar()
        if key is None:
            raise HTTPException(404, detail=f"no sample {sample_id[:40]!r}")
        return Response(samples.get(key), media_type="image/jpeg", headers={"Cache-Control": "private, max-age=3600"})

    @api.get("/dead-letters")
    def dead_letters(limit: Annotated[int, Query(ge=1, le=MAX_LIMIT)] = 50,
                     offset: Annotated[int, Query(ge=0, le=10**9)] = 0) -> dict[str, Any]:
        """Refused payloads, newest first, with the reason (payloads truncated to 4 KiB)."""
        return {"total": store.dead_letter_count(), "dead_letters": store.dead_letters(limit=limit, offset=offset)}

    from prometheus_client.exposition import choose_encoder

    from cloud_sink.metrics import registry_for

    registry = registry_for(store, metrics)

    @app.get("/metrics", tags=["health"], dependencies=[Depends(BearerToken(token or None))])
    def prometheus_metrics(request: Request) -> Response:
        """Prometheus exposition (text, or OpenMetrics when asked for): ingest counters and per-camera gauges
        (cloud_sink/metrics.py)."""
        encode, content_type = choose_encoder(request.headers.get("accept", ""))
        return Response(encode(registry), headers={"Content-Type": content_type})

    app.include_router(api)
    app.mount("/", StaticFiles(directory=_static_dir(), html=True), name="dashboard")
    return app

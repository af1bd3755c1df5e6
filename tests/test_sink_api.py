"""The read-only review API over real SQLite and PostgreSQL stores."""

from __future__ import annotations

import warnings
from datetime import datetime

import pytest

from contract.timestamps import format_ts, parse_ts
from tests.sink_scenario import HOUR, T0, fill, scenario

with warnings.catch_warnings():  # starlette's notice about httpx vs httpx2 is not ours to fix
    warnings.simplefilter("ignore")
    from fastapi.testclient import TestClient

# ------------------------------------------------------------------------------------------ fixtures
# ``store``: tests/conftest.py (SQLite, and PostgreSQL in the slow run)
@pytest.fixture
def filled(store):
    events = scenario()
    fill(store, events)
    return store, events


@pytest.fixture
def client(filled):
    from cloud_sink.api import create_app

    store, events = filled
    with TestClient(create_app(store)) as c:
        yield c, events


# ------------------------------------------------------------------------------------------ reads
def test_cameras_report_health(client):
    c, _ = client
    cams = {(x["site"], x["camera_id"]): x for x in c.get("/api/cameras").json()["cameras"]}
    assert set(cams) == {("lobby", "cam-1"), ("lobby", "cam-2"), ("garage", "cam-1")}
    cam1 = cams[("lobby", "cam-1")]
    assert (cam1["state"], cam1["fps"], cam1["inference_ms_p50"], cam1["events_total"]) == ("online", 12.5, 21.5, 17)
    assert cam1["last_seen"] == format_ts(T0 + 3 * HOUR - 5)
    assert cams[("lobby", "cam-2")]["state"] == "offline"
    assert [x["site"] for x in c.get("/api/cameras", params={"site": "garage"}).json()["cameras"]] == ["garage"]


@pytest.mark.parametrize("params", [
    {},
    {"site": "lobby"},
    {"site": "lobby", "camera": "cam-1"},
    {"camera": "cam-1"},
    {"type": "person.exit"},
    {"site": "lobby", "type": "count", "since": "2026-01-01T03:05:00Z"},
    {"since": str(int(T0 + HOUR)), "until": format_ts(T0 + 2 * HOUR)},
    {"zone": "door"},
])
def test_events_filters_match_the_stored_events(client, params):
    c, events = client
    resp = c.get("/api/events", params={**params, "limit": 1000})
    assert resp.status_code == 200
    got = resp.json()["events"]

    def keep(e: dict) -> bool:
        t = parse_ts(e["ts"])
        since = params.get("since")
        until = params.get("until")
        return ((params.get("site") in (None, e["site"])) and (params.get("camera") in (None, e["camera_id"]))
                and (params.get("type") in (None, e["type"])) and (params.get("zone") in (None, e.get("zone")))
                and (since is None or t >= (float(since) if since.isdigit() else parse_ts_any(since)))
                and (until is None or t < parse_ts_any(until)))

    expected = [e for e in events if keep(e)]
    assert expected, "every case must select something"
    assert sorted(e["event_id"] for e in got) == sorted(e["event_id"] for e in expected)
    assert [e["ts"] for e in got] == sorted((e["ts"] for e in got), reverse=True), "newest first"
    by_id = {e["event_id"]: e for e in events}
    assert all(e["payload"] == by_id[e["event_id"]] for e in got), "the payload is the stored event, unchanged"


def parse_ts_any(value: str) -> float:
    return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()


def test_events_pagination_walks_every_event_once(client):
    c, events = client
    seen: list[str] = []
    offset = 0
    pages = 0
    while offset is not None:
        body = c.get("/api/events", params={"limit": 4, "offset": offset}).json()
        assert len(body["events"]) <= 4
        seen += [e["event_id"] for e in body["events"]]
        offset = body["next_offset"]
        pages += 1
    assert pages == 5  # 20 events, 4 a page: the 5th page knows it is the last (next_offset None)
    assert sorted(seen) == sorted(e["event_id"] for e in events) and len(seen) == len(set(seen))
    assert c.get("/api/events", params={"limit": 1000, "offset": 20}).json() == {
        "events": [], "limit": 1000, "offset": 20, "next_offset": None}


def test_hourly_occupancy_and_dwell_match_the_hand_counts(client):
    c, _ = client
    hours = c.get("/api/stats/hourly", params={"site": "lobby", "camera": "cam-1"}).json()["hours"]
    assert [(h["hour"], h["entries"], h["exits"]) for h in hours] == [
        (format_ts(T0), 3, 2), (format_ts(T0 + HOUR), 1, 2), (format_ts(T0 + 2 * HOUR), 2, 0)]
    assert hours[0]["occupancy_max"] == 3 and hours[0]["occupancy_mean"] == pytest.approx(7 / 4)
    zone = c.get("/api/stats/hourly", params={"camera": "cam-1", "zone": "door"}).json()["hours"]
    assert [(h["zone"], h["entries"]) for h in zone] == [("door", 1)]
    window = {"site": "lobby", "camera": "cam-1", "since": format_ts(T0), "until": format_ts(T0 + HOUR)}
    assert [h["entries"] for h in c.get("/api/stats/hourly", params=window).json()["hours"]] == [3]

    occ = c.get("/api/occupancy", params={"site": "lobby", "camera": "cam-1", "bucket": 600}).json()
    assert occ["bucket_s"] == 600
    assert [(o["t"], o["max"], o["samples"]) for o in occ["intervals"]] == [
        (format_ts(T0), 3, 3), (format_ts(T0 + 600), 1, 1), (format_ts(T0 + HOUR + 3000), 0, 1)]

    dwell = c.get("/api/dwell", params={"site": "lobby", "camera": "cam-1"}).json()
    assert dwell["n"] == 4 and dwell["mean"] == pytest.approx((12 + 40 + 5 + 2820) / 4)
    assert sum(b["n"] for b in dwell["histogram"]) == 4
    assert 11 <= dwell["median"] <= 41 and dwell["p90"] > 1000

    summary = c.get("/api/overview", params={"since": format_ts(T0), "until": format_ts(T0 + 3 * HOUR)}).json()
    cam1 = next(x for x in summary["cameras"] if (x["site"], x["camera_id"]) == ("lobby", "cam-1"))
    assert (cam1["entries"], cam1["exits"], cam1["peak_hour"]["hour"]) == (6, 4, format_ts(T0))


def test_health_and_dashboard_are_served(client):
    c, _ = client
    assert c.get("/health").json()["status"] == "ok"
    page = c.get("/")
    assert page.status_code == 200 and "app.js" in page.text
    assert "default-src 'self'" in page.headers["content-security-policy"]
    assert c.get("/app.js").headers["content-type"].startswith(("text/javascript", "application/javascript"))
    dead = c.get("/api/dead-letters").json()
    assert dead["total"] == 1
    assert [(d["topic"], d["reason"], d["payload"]) for d in dead["dead_letters"]] == [
        ("smartcam/lobby/cam-9/events", "schema: <root>: not an object", "[1, 2, 3]")]


# ------------------------------------------------------------------------------------------ refusals
BAD_QUERIES = [
    ("/api/events", {"limit": 0}),
    ("/api/events", {"limit": 1001}),
    ("/api/events", {"limit": "ten"}),
    ("/api/events", {"offset": -1}),
    ("/api/events", {"type": "person.teleport"}),
    ("/api/events", {"site": "../etc"}),
    ("/api/events", {"camera": "a/b"}),
    ("/api/events", {"camera": "x" * 65}),
    ("/api/events", {"since": "yesterday"}),
    ("/api/events", {"since": "1e400"}),
    ("/api/events", {"until": "2026-13-45T99:00:00Z"}),
    ("/api/events", {"since": format_ts(T0 + 10), "until": format_ts(T0)}),
    ("/api/stats/hourly", {"zone": "**"}),
    ("/api/stats/hourly", {"since": "nan"}),
    ("/api/occupancy", {"bucket": 0}),
    ("/api/occupancy", {"bucket": 10**12}),
    ("/api/dwell", {"until": "-"}),
    ("/api/overview", {"since": "2026-01-01T00:00:00Z", "until": "2025-01-01T00:00:00Z"}),
    ("/api/dead-letters", {"limit": -5}),
]


def test_bad_query_parameters_get_422(client):
    c, _ = client
    for path, params in BAD_QUERIES:
        resp = c.get(path, params=params)
        assert resp.status_code == 422, (path, params, resp.status_code, resp.text)
        assert resp.json()["detail"]


def test_no_endpoint_writes(client):
    c, events = client
    for path in ("/api/cameras", "/api/events", "/api/stats/hourly", "/api/occupancy", "/api/dwell",
                 "/api/overview", "/api/dead-letters", "/health", "/", "/app.js", "/index.html"):
        for method in ("POST", "PUT", "DELETE", "PATCH"):
            resp = c.request(method, path, json=events[0])
            assert resp.status_code == 405, (method, path, resp.status_code)
    assert len(c.get("/api/events", params={"limit": 1000}).json()["events"]) == len(events)


# ------------------------------------------------------------------------------------------ token
def test_token_required_accepted_and_refused(filled):
    from cloud_sink.api import create_app

    store, _ = filled
    with TestClient(create_app(store, token="correct-horse-battery")) as c:
        for path in ("/api/cameras", "/api/events", "/api/stats/hourly", "/api/dwell", "/api/dead-letters"):
            missing = c.get(path)
            assert missing.status_code == 401 and missing.headers["www-authenticate"] == "Bearer"
            assert c.get(path, headers={"Authorization": "Bearer wrong-token"}).status_code == 401
            assert c.get(path, headers={"Authorization": "Basic Y29ycmVjdC1ob3JzZS1iYXR0ZXJ5"}).status_code == 401
            assert c.get(path, headers={"Authorization": "Bearer correct-horse-battery"}).status_code == 200
        assert c.get("/api/events", params={"limit": 0}).status_code == 401, "no data or hints before auth"
        assert c.get("/health").status_code == 200, "health stays open for load balancers"
        assert c.get("/").status_code == 200, "the page itself holds no data"


STRONG = "Hq3v-9Zx_Lp2Rt7Wn4Ks8Mb6Jc1Yd5Fg0"  # 34 characters, as from secrets.token_urlsafe


@pytest.mark.parametrize("host, token, ok", [
    ("127.0.0.1", None, True), ("localhost", None, True), ("::1", None, True), ("127.0.0.2", None, True),
    ("0.0.0.0", None, False), ("::", None, False), ("192.168.1.20", None, False), ("camera-sink.lan", None, False),
    ("", None, False), ("0.0.0.0", "", False), ("0.0.0.0", STRONG, True), ("127.0.0.1", "short", True),
])
def test_check_bind_requires_a_token_off_loopback(host, token, ok):
    from cloud_sink.api import InsecureBindError, check_bind

    if ok:
        check_bind(host, token)
    else:
        with pytest.raises(InsecureBindError, match="without a token"):
            check_bind(host, token)


@pytest.mark.parametrize("token", ["s3cret-token", "x" * 40, "ab" * 20, "0123456789abcdef0123456789abcde", " " * 40])
def test_a_weak_token_is_refused_off_loopback(token):
    """Off loopback the token is all that guards the data: at least 32 characters (~128 bits), not repetitive."""
    from cloud_sink.api import InsecureBindError, check_bind

    with pytest.raises(InsecureBindError, match="too weak.*32"):
        check_bind("0.0.0.0", token)
    check_bind("0.0.0.0", STRONG)
    check_bind("0.0.0.0", "0123456789abcdef0123456789abcdef")  # secrets.token_hex(16): 128 bits


# ------------------------------------------------------------------------------------------ since / until
def test_since_and_until_take_iso_times_and_epoch_seconds_only(client):
    """One epoch unit (seconds, any size): year 9999 in seconds is year 9999, never milliseconds (1978)."""
    c, events = client
    everything = len(events)

    def count(**params) -> int:
        resp = c.get("/api/events", params={"limit": 1000, **params})
        assert resp.status_code == 200, (params, resp.text)
        return len(resp.json()["events"])

    assert count(since=str(int(T0 + HOUR))) == count(since=format_ts(T0 + HOUR)) == 7
    for same in ("2026-01-01T04:00:00Z", "2026-01-01T04:00:00+00:00", "2026-01-01T05:00:00+01:00",
                 "2026-01-01T04:00:00", f"{T0 + HOUR:.3f}"):
        assert count(since=same) == 7, same
    assert count(since="253402300799") == 0, "9999-12-31T23:59:59Z: nothing is that new"
    assert count(until="253402300799") == everything


@pytest.mark.parametrize("value", ["253402300800", "1767236400000", "1e20", "-1e20", "1e400", "nan", "inf", "10000-01-01T00:00:00Z"])
def test_times_out_of_range_are_422_with_the_reason(client, value):
    c, _ = client
    resp = c.get("/api/events", params={"since": value})
    assert resp.status_code == 422, (value, resp.status_code, resp.text)
    assert "since" in resp.text


# ------------------------------------------------------------------------------------------ robustness
PARAMS = ("site", "camera", "type", "zone", "since", "until", "limit", "offset", "bucket")
PATHS = ("/api/events", "/api/stats/hourly", "/api/occupancy", "/api/dwell", "/api/overview", "/api/cameras",
         "/api/dead-letters")


def test_hostile_query_strings_never_cause_a_server_error(filled):
    """Random text (NUL bytes too), numbers and times in every parameter: 200 or 422, never a 500."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    from cloud_sink.api import create_app

    store, _ = filled
    values = st.one_of(st.text(max_size=40), st.integers(min_value=-10**22, max_value=10**22).map(str),
                       st.floats(allow_nan=True, allow_infinity=True).map(str),
                       st.datetimes().map(lambda d: d.isoformat()), st.sampled_from(["*", "cam-1", "lobby", "count"]))

    with TestClient(create_app(store), raise_server_exceptions=False) as c:
        @settings(max_examples=200, deadline=None, suppress_health_check=list(HealthCheck))
        @given(path=st.sampled_from(PATHS), params=st.dictionaries(st.sampled_from(PARAMS), values, max_size=4))
        def check(path: str, params: dict[str, str]) -> None:
            resp = c.get(path, params=params)
            assert resp.status_code in (200, 422), (path, params, resp.status_code, resp.text[:200])

        check()


@pytest.mark.slow
def test_database_gone_answers_503_not_500(postgres_server, postgres_url):
    """PostgreSQL drops the database under a running API: clear 503s, and /health reports it too."""
    import sqlalchemy as sa

    from cloud_sink.api import create_app
    from cloud_sink.store import Store

    store = Store.open(postgres_url)
    fill(store, scenario())
    with TestClient(create_app(store), raise_server_exceptions=False) as c:
        assert c.get("/api/events").status_code == 200
        name = postgres_url.rsplit("/", 1)[1]
        admin = sa.create_engine(postgres_url.rsplit("/", 1)[0] + "/postgres", isolation_level="AUTOCOMMIT")
        with admin.connect() as conn:
            conn.execute(sa.text(f'DROP DATABASE "{name}" WITH (FORCE)'))
        admin.dispose()
        for path in ("/api/events", "/api/cameras", "/api/stats/hourly", "/health"):
            resp = c.get(path)
            assert resp.status_code == 503, (path, resp.status_code, resp.text)
            assert resp.json() == {"detail": "database unavailable"}
    store.close()

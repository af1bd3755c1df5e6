"""``smartcam-sink run | serve | report``: the cloud sink's command line.

``run`` subscribes to the edge's topics and stores events exactly once (optionally serving the read-only API and
dashboard, and archiving new events); ``serve`` serves the API, dashboard and /metrics over a database without
ingesting; ``report`` prints the analytics. Bad options or an unreachable/unwritable
database give a one-line error and exit status 2.
"""

from __future__ import annotations

import argparse
import errno
import logging
import os
import signal
import socket
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from contract.timestamps import DEFAULT_MAX_PAST_DAYS

log = logging.getLogger("smartcam.sink")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="smartcam-sink", description="smartcam cloud sink: ingest events, report.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="subscribe to the cameras' MQTT topics and store their events",
                         description="Ingest: MQTT 5 persistent session, validate, store exactly once, ack after "
                                     "commit. Options override --config.")
    run.add_argument("--config", help="YAML file with these options (see samples/sink.yaml)")
    run.add_argument("--broker", help="mqtt://[user@]host[:port] or mqtts://... (default mqtt://127.0.0.1:1883)")
    run.add_argument("--db", help="sqlite:///path.db (default sqlite:///smartcam.db) or postgresql://user@host/db")
    run.add_argument("--http", metavar="HOST:PORT", help="serve the read-only API and dashboard, e.g. 127.0.0.1:8080")
    run.add_argument("--http-token", help="API bearer token, required off loopback (visible in ps: prefer "
                                           "--http-token-file or $SMARTCAM_API_TOKEN)")
    run.add_argument("--http-token-file", help="file holding the API bearer token (at least 32 characters)")
    run.add_argument("--http-allowed-hosts", type=_names, metavar="NAME,...",
                     help="Host header names the API answers (default on loopback without a token: the bound "
                          "host and localhost, against DNS rebinding; '*' = any)")
    run.add_argument("--archive", help="archive stored events as JSON Lines to a directory or s3://bucket/prefix "
                                       "(follows the database from a cursor: catches up after an outage)")
    run.add_argument("--archive-interval", type=float, dest="archive_interval_s",
                     help="seconds between archive rounds (default 5; each round writes one part per hour and "
                          "camera with new events, so raise it to cut S3 PUT requests)")
    run.add_argument("--samples-store", help="store sampled frames (learning loop) under samples/ in a directory or "
                                             "s3://bucket/prefix (default: the --archive root; none: dead-lettered)")
    run.add_argument("--max-sample-bytes", type=int, help="largest sample message accepted (default 2 MiB)")
    run.add_argument("--share-group", help="MQTT 5 shared subscription group: workers in a group split the load")
    run.add_argument("--client-id", help="fixed MQTT client id (default smartcam-sink); one per worker")
    run.add_argument("--tls-ca", help="CA file that signed the broker's certificate (mqtts://)")
    run.add_argument("--username", help="MQTT user (password in the URL or $SMARTCAM_MQTT_PASSWORD)")
    run.add_argument("--session-expiry", type=int, dest="session_expiry_s",
                     help="seconds the broker keeps our queued messages while we are down (default 7 days)")
    run.add_argument("--batch-size", type=int, help="messages per commit (default 500)")
    run.add_argument("--batch-wait-ms", type=float, help="longest wait to fill a batch (default 50)")
    run.add_argument("--max-past-days", type=float, help=f"reject events older than this (default {DEFAULT_MAX_PAST_DAYS:g})")
    run.add_argument("--max-future", type=float, dest="max_future_s", metavar="SECONDS",
                     help="reject events this far ahead of the sink's clock (default 3600)")
    run.add_argument("--dead-letter-rate", type=float, dest="dead_letters_per_minute", metavar="PER_MINUTE",
                     help="dead letters stored per camera and minute; more are counted, not stored (default 60)")
    run.add_argument("--dead-letter-burst", type=int, help="dead letters a camera may send at once (default 100)")
    run.add_argument("--dead-letter-cap", type=int, help="dead letters kept at most, oldest pruned (default 100000)")
    run.add_argument("--dead-letter-days", type=float, help="dead letters kept at most this long (default 30)")
    run.add_argument("--log-every", type=float, dest="log_every_s", help="seconds between count logs (default 10)")

    report = sub.add_parser("report", help="print entries, exits, occupancy, dwell, peak hour per camera",
                            description="Analytics from the hourly rollups, as tables or JSON.")
    report.add_argument("--db", required=True, help="sqlite:///path.db or postgresql://user@host/db")
    report.add_argument("--since", default="24h", help="window start: 24h, 7d, 30m ago or a timestamp (default 24h)")
    report.add_argument("--until", help="window end (default now)")
    report.add_argument("--camera", help="only this camera id")
    report.add_argument("--site", help="only this site")
    report.add_argument("--json", action="store_true", help="machine-readable JSON instead of tables")

    serve = sub.add_parser("serve", help="serve the API and dashboard over a database, without ingesting",
                           description="The read-only API, dashboard and /metrics over --db, no MQTT: several "
                                       "`run` workers can feed one database while one `serve` answers.")
    serve.add_argument("--db", required=True, help="sqlite:///path.db or postgresql://user@host/db")
    serve.add_argument("--http", required=True, metavar="HOST:PORT", help="where to listen, e.g. 127.0.0.1:8080")
    serve.add_argument("--http-token", help="API bearer token, required off loopback (visible in ps: prefer "
                                             "--http-token-file or $SMARTCAM_API_TOKEN)")
    serve.add_argument("--http-token-file", help="file holding the API bearer token (at least 32 characters)")
    serve.add_argument("--http-allowed-hosts", type=_names, metavar="NAME,...",
                       help="Host header names answered (default on loopback without a token: loopback names)")

    samples = sub.add_parser("samples", help="sampled frames from the edge (the learning loop)",
                             description="Export the frames cameras sent (samples.enabled) for labeling: "
                                         "DIR/images/*.jpg and DIR/samples.jsonl (their sample.v1 headers).")
    samples_sub = samples.add_subparsers(dest="action", required=True)
    export = samples_sub.add_parser("export", help="write one camera's samples to a folder",
                                    description="DIR/images/<sample_id>.jpg + DIR/samples.jsonl, oldest first; the "
                                                "input of smartcam-model label.")
    export.add_argument("--db", required=True, help="sqlite:///path.db or postgresql://user@host/db")
    export.add_argument("--store", required=True, help="the sink's --samples-store (or --archive): directory or "
                                                       "s3://bucket/prefix")
    export.add_argument("--camera", required=True, help="camera id")
    export.add_argument("--site", help="only this site")
    export.add_argument("--since", default="7d", help="7d, 24h, 30m ago or an ISO time (default 7d)")
    export.add_argument("--until", help="end (default now)")
    export.add_argument("--out", required=True, help="output folder")
    export.add_argument("--quiet", action="store_true", help="no progress bar")
    samples_sub.add_parser("list", help="recent samples per camera").add_argument(
        "--db", required=True, help="sqlite:///path.db or postgresql://user@host/db")

    dead = sub.add_parser("dead-letters", help="list or replay what the sink refused (cloud_sink/dead_letters.py)",
                          description="Dead letters are kept, never silently dropped. Replay re-validates those "
                                      "whose reason matches (e.g. events refused by the time window from a "
                                      "camera whose clock was wrong) and stores what passes, once.")
    dead_sub = dead.add_subparsers(dest="action", required=True)
    for name, text in (("list", "show dead letters, oldest first"),
                       ("replay", "re-validate and store the matching dead letters; delete those stored")):
        p = dead_sub.add_parser(name, help=text, description=text)
        p.add_argument("--db", required=True, help="sqlite:///path.db or postgresql://user@host/db")
        p.add_argument("--reason", required=name == "replay",
                       help="only dead letters whose reason contains this text, e.g. 'days in the past'")
        p.add_argument("--json", action="store_true", help="machine-readable JSON")
    dead_sub.choices["list"].add_argument("--limit", type=int, default=50, help="at most this many (default 50)")
    replay = dead_sub.choices["replay"]
    replay.add_argument("--max-past-days", type=float, default=DEFAULT_MAX_PAST_DAYS,
                        help=f"accept events up to this many days old (default {DEFAULT_MAX_PAST_DAYS:g}, as ingest)")
    replay.add_argument("--max-future-s", type=float, default=3600.0,
                        help="accept events up to this many seconds ahead of now (default 3600, as ingest)")
    replay.add_argument("--dry-run", action="store_true", help="count what would be stored; change nothing")
    return parser


def _open_store(url: str, **options: Any):
    from sqlalchemy.exc import SQLAlchemyError

    from cloud_sink.store import Store

    try:
        return Store.open(url, **options)
    except ValueError:
        raise
    except SQLAlchemyError as exc:
        orig = getattr(exc, "orig", None) or exc
        raise ValueError(f"cannot open database {url.split('@')[-1]}: {str(orig).splitlines()[0]}") from None


def _names(text: str) -> list[str]:
    return [name.strip() for name in text.split(",") if name.strip()]


def resolve_token(cfg: Any) -> str | None:
    """The API token: ``http_token_file``, else ``$SMARTCAM_API_TOKEN``, else ``--http-token`` (warned: any user
    on the machine reads a flag in ``ps``). ValueError for both flag and file, or a file that cannot be read."""
    if cfg.http_token and cfg.http_token_file:
        raise ValueError("give one of --http-token and --http-token-file, not both")
    if cfg.http_token_file:
        try:
            token = Path(cfg.http_token_file).read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as exc:
            raise ValueError(f"cannot read --http-token-file {cfg.http_token_file}: "
                             f"{getattr(exc, 'strerror', None) or exc}") from None
        if not token:
            raise ValueError(f"--http-token-file {cfg.http_token_file} is empty")
        return token
    if cfg.http_token:
        log.warning("--http-token is visible to every user of this machine (ps, /proc): prefer "
                    "--http-token-file or $SMARTCAM_API_TOKEN")
        return cfg.http_token
    return os.environ.get("SMARTCAM_API_TOKEN") or None


def bind_http(host: str, port: int) -> socket.socket:
    """The API's listening socket, bound now so a port that cannot be had stops the start (one-line ValueError).

    Bound before the database, the archive or the broker are touched: a sink that cannot serve what it was
    asked to serve does not start at all (``uvicorn`` alone would log the error in its thread and the sink
    would carry on without its API).
    """
    where = f"{host}:{port}" if ":" not in host else f"[{host}]:{port}"
    if not 0 < port < 65536:
        raise ValueError(f"--http {where}: the port must be 1-65535")
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                             flags=socket.AI_PASSIVE)[0]
    except socket.gaierror as exc:
        raise ValueError(f"--http {where}: cannot resolve {host!r} ({exc.strerror})") from None
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # TIME_WAIT from a previous run is fine
        sock.bind(address)
        sock.listen(2048)
    except OSError as exc:
        sock.close()
        hint = {errno.EADDRINUSE: " (another process listens there: stop it or choose another --http port)",
                errno.EACCES: " (ports below 1024 need privileges: use a port >= 1024 behind a proxy)",
                errno.EADDRNOTAVAIL: " (not an address of this machine)"}.get(exc.errno or 0, "")
        reason = (exc.strerror or str(exc)).lower()
        raise ValueError(f"cannot serve the API on {where}: {reason}{hint}") from None
    return sock


def start_http(store: Any, host: str, port: int, token: str | None, *, allowed: list[str] | None = None,
               sock: socket.socket | None = None,
               on_failure: Callable[[], None] | None = None, metrics: Any = None,
               samples: Any = None) -> tuple[Any, threading.Thread]:
    """Serve the API and dashboard from a thread until ``should_exit``, on ``sock`` or a socket bound now.

    Returns once uvicorn is accepting requests (a bind that fails raises ValueError). Should the server stop
    on its own later, ``on_failure`` is called (the sink stops rather than ingest without its API).
    """
    import uvicorn

    from cloud_sink import api

    api.check_bind(host, token)
    sock = sock or bind_http(host, port)
    app = api.create_app(store, token=token, metrics=metrics, samples=samples)
    hosts = api.allowed_hosts(host, token, allowed)
    if hosts != ["*"]:
        from starlette.middleware.trustedhost import TrustedHostMiddleware

        app.add_middleware(TrustedHostMiddleware, allowed_hosts=hosts, www_redirect=False)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False))

    def serve() -> None:
        try:
            server.run(sockets=[sock])
        except BaseException as exc:  # reported below: the sink must not run on without its API
            log.error("the API server failed: %s", exc)
        finally:
            sock.close()
        if not server.should_exit and on_failure is not None:
            log.error("the API on %s:%d stopped; stopping the sink", host, port)
            on_failure()

    thread = threading.Thread(target=serve, name="http", daemon=True)
    thread.start()
    while not server.started and thread.is_alive():
        thread.join(0.02)
    if not server.started:
        raise ValueError(f"cannot serve the API on {host}:{port}: the server did not start (see the log)")
    log.info("API and dashboard on http://%s:%d/", host if ":" not in host else f"[{host}]", port)
    return server, thread


def cmd_run(args: argparse.Namespace) -> int:
    from cloud_sink.config import load_config
    from cloud_sink.ingest import Ingestor, Subscriber
    from contract.broker import BrokerSettings

    overrides = {k: getattr(args, k, None) for k in (
        "broker", "db", "http", "http_token", "http_token_file", "http_allowed_hosts", "archive", "archive_interval_s",
        "share_group", "client_id", "tls_ca", "username",
        "session_expiry_s", "batch_size", "batch_wait_ms", "max_past_days", "max_future_s", "dead_letters_per_minute",
        "dead_letter_burst", "dead_letter_cap", "dead_letter_days", "log_every_s", "samples_store",
        "max_sample_bytes")}
    cfg = load_config(args.config, overrides)
    settings = BrokerSettings.from_url(cfg.broker, ca_file=cfg.tls_ca, username=cfg.username)
    http = cfg.http_address()
    token = resolve_token(cfg)
    sock = None
    if http:  # bind first: a port we cannot have stops the start before anything else is touched
        from cloud_sink.api import check_bind

        check_bind(http[0], token)
        sock = bind_http(*http)
    store = _open_store(cfg.db, dead_letter_cap=cfg.dead_letter_cap, dead_letter_days=cfg.dead_letter_days)
    store.set_time_window(max_past_s=cfg.max_past_days * 86400.0, max_future_s=cfg.max_future_s)
    log.info("accepting event times from %g days before to %g s after this clock (--max-past-days, "
             "--max-future); dead letters: %g per camera and minute (burst %d), at most %d rows and %g days",
             cfg.max_past_days, cfg.max_future_s, cfg.dead_letters_per_minute, cfg.dead_letter_burst,
             cfg.dead_letter_cap, cfg.dead_letter_days)
    follower = None
    if cfg.archive:  # off the ack path: a thread copies committed events from the database's cursor
        from cloud_sink.archive import open_archive
        from cloud_sink.archive_follower import ArchiveFollower

        try:
            archive = open_archive(cfg.archive)
        except Exception as exc:  # bucket missing, bad credentials, unwritable directory, unsafe prefix
            raise ValueError(f"archive {cfg.archive}: {exc}") from None
        follower = ArchiveFollower(store, archive, interval_s=cfg.archive_interval_s)
    from cloud_sink.metrics import SinkMetrics

    metrics = SinkMetrics()
    if follower is not None:
        metrics.watch_archive(follower)  # its lag on /metrics
    samples = None
    if cfg.samples_store or cfg.archive:
        from cloud_sink.samples import SampleSink, SampleStorage

        where = cfg.samples_store or cfg.archive
        try:
            samples = SampleSink(store, SampleStorage(where), max_bytes=cfg.max_sample_bytes)
        except Exception as exc:  # bucket missing, bad credentials, unwritable directory
            raise ValueError(f"samples store {where}: {exc}") from None
        log.info("sampled frames go to %s/samples/", samples.storage.url)
    subscriber = Subscriber(Ingestor(store, limits=cfg.limits(), metrics=metrics,
                                     samples=samples), settings,
                            client_id=cfg.client_id, share_group=cfg.share_group,
                            session_expiry_s=cfg.session_expiry_s, batch_size=cfg.batch_size,
                            batch_wait_s=cfg.batch_wait_ms / 1000.0, log_every_s=cfg.log_every_s)
    server = None
    api_failed = threading.Event()

    def on_api_failure() -> None:
        api_failed.set()
        subscriber.stop()

    if http:
        server, _ = start_http(store, http[0], http[1], token, allowed=cfg.http_allowed_hosts, sock=sock,
                               on_failure=on_api_failure,
                               metrics=metrics, samples=samples.storage if samples is not None else None)

    def on_signal(signum: int, _frame: Any) -> None:
        log.info("%s: finishing the current batch and stopping", signal.Signals(signum).name)
        subscriber.stop()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    log.info("sink %s: broker %s, db %s%s", cfg.client_id, settings.redacted(), cfg.db.split("@")[-1],
             f", share group {cfg.share_group}" if cfg.share_group else "")
    if follower is not None:
        follower.start()
        log.info("archiving to %s every %g s (%d stored events not archived yet)", follower.archive.url,
                 follower.interval_s, follower.pending())
    subscriber.start()
    subscriber.run()
    if follower is not None:
        follower.stop()  # one last round: what this run stored is archived before it exits
    if server is not None:
        server.should_exit = True
    store.close()
    if subscriber.failure:
        log.error("stopped: %s; %d messages not acknowledged (the broker keeps them)", subscriber.failure,
                  subscriber.unstored)
        return 3
    if subscriber.unstored:
        log.error("stopped with %d messages not stored (database unavailable); the broker keeps them for the "
                  "next run", subscriber.unstored)
        return 1
    return 1 if api_failed.is_set() else 0


def cmd_serve(args: argparse.Namespace) -> int:
    """API + dashboard + /metrics over the database until SIGTERM/SIGINT; nothing is ingested here."""
    from cloud_sink.api import check_bind
    from cloud_sink.config import SinkConfig

    host, port = SinkConfig(http=args.http).http_address()
    token = resolve_token(SinkConfig(http_token=args.http_token, http_token_file=args.http_token_file))
    check_bind(host, token)
    sock = bind_http(host, port)
    store = _open_store(args.db)
    done, failed = threading.Event(), threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    signal.signal(signal.SIGINT, lambda *_: done.set())
    server, thread = start_http(store, host, port, token, allowed=args.http_allowed_hosts, sock=sock,
                                on_failure=lambda: (failed.set(), done.set()))
    done.wait()
    server.should_exit = True
    thread.join(10)
    store.close()
    return 1 if failed.is_set() else 0


def cmd_report(args: argparse.Namespace) -> int:
    from cloud_sink import report

    since = report.parse_since(args.since)
    until = report.parse_since(args.until) if args.until else None
    store = _open_store(args.db)
    try:
        data = report.build(store, since=since, until=until, site=args.site, camera_id=args.camera)
    finally:
        store.close()
    print(report.to_json(data) if args.json else report.render(data))
    return 0


def cmd_dead_letters(args: argparse.Namespace) -> int:
    import json

    from cloud_sink import dead_letters
    from cloud_sink.validation import Limits

    store = _open_store(args.db)
    try:
        if args.action == "list":
            rows = dead_letters.list_dead_letters(store, reason=args.reason, limit=args.limit)
            total = dead_letters.count_dead_letters(store, reason=args.reason)
            if args.json:
                print(json.dumps({"total": total, "dead_letters": rows}, default=str))
            else:
                print(f"{total} dead letter(s){f' whose reason contains {args.reason!r}' if args.reason else ''}"
                      f"{f', the first {len(rows)}' if len(rows) < total else ''}:")
                for r in rows:
                    print(f"  #{r['id']} {r['topic']}: {r['reason']} ({r['payload_bytes']} bytes)")
            return 0
        limits = Limits(max_past_s=args.max_past_days * 86400.0, max_future_s=args.max_future_s)
        result = dead_letters.replay(store, reason=args.reason, limits=limits, dry_run=args.dry_run)
        if args.json:
            print(json.dumps(result.__dict__))
        else:
            print(f"{'would replay' if args.dry_run else 'replayed'} {result.replayed} of {result.matched} matching "
                  f"dead letter(s): {result.stored} stored, {result.already_stored} already stored, "
                  f"{result.still_dead} still refused, {result.truncated} cut at 4 KiB (kept)")
        return 0
    finally:
        store.close()


def cmd_samples(args: argparse.Namespace) -> int:
    from cloud_sink.samples import SampleStorage, export_samples, parse_since, recent_samples

    store = _open_store(args.db)
    try:
        if args.action == "list":
            seen: dict[tuple[str, str], list[dict]] = {}
            for row in recent_samples(store):
                seen.setdefault((row["site"], row["camera_id"]), []).append(row)
            for (site, cam), rows in sorted(seen.items()):
                reasons: dict[str, int] = {}
                for r in rows:
                    reasons[r["reason"]] = reasons.get(r["reason"], 0) + 1
                print(f"{site}/{cam}: {len(rows)} samples, {sum(r['bytes'] for r in rows)} bytes, "
                      + ", ".join(f"{k} {v}" for k, v in sorted(reasons.items())))
            return 0
        storage = SampleStorage(args.store)
        n = export_samples(store, storage, args.out, camera_id=args.camera, site=args.site,
                           since_ms=parse_since(args.since),
                           until_ms=parse_since(args.until) if args.until else None, progress=not args.quiet)
        print(f"exported {n} samples of {args.camera} to {args.out} (images/ and samples.jsonl)")
        return 0 if n else 1
    finally:
        store.close()


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not args.verbose:
        logging.getLogger("paho").setLevel(logging.WARNING)
    try:
        return {"run": cmd_run, "serve": cmd_serve, "report": cmd_report,
                "dead-letters": cmd_dead_letters, "samples": cmd_samples}[args.command](args)
    except (ValueError, OSError) as exc:  # ConfigError, bad URL, unreadable file, database unavailable
        print(f"smartcam-sink: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

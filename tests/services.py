"""Start real servers for tests: Mosquitto, PostgreSQL, SeaweedFS (S3); a real MQTT subscriber; the real edge.

No mocks, no Docker.

Each starter binds 127.0.0.1 on a free port inside a temp dir, waits until the server answers, and returns a
handle whose ``stop()`` kills it by PID. See ../shared/ENVIRONMENT.md for why the settings are what they are.
"""

from __future__ import annotations

import contextlib
import functools
import http.server
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from contract.batch import decode_batch
from contract.topics import topic_for


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, timeout: float = 15.0, host: str = "127.0.0.1") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listening on {host}:{port} after {timeout}s")


def _find_binary(name: str, extra_dirs: tuple[str, ...] = ()) -> str:
    found = shutil.which(name)
    if found:
        return found
    for d in ("/usr/sbin", "/usr/local/sbin", *extra_dirs):
        candidate = Path(d) / name
        if candidate.exists():
            return str(candidate)
    raise FileNotFoundError(f"{name} is not installed: run scripts/setup.sh")


# --------------------------------------------------------------------------------------------- Mosquitto

# max_queued_messages: Mosquitto's default (1000) silently DROPS QoS 1 messages queued for an offline or slow
# persistent subscriber. Every config we test with raises it so a test can never pass by losing events.
MOSQUITTO_BASE_CONF = """\
persistence false
max_queued_messages 1000000
max_inflight_messages 0
log_dest stderr
log_type error
log_type warning
log_type notice
"""


@dataclass
class Mosquitto:
    """A running Mosquitto. ``restart()`` keeps the same port and config (a broker outage in tests)."""

    port: int
    conf_path: Path
    log_path: Path
    proc: subprocess.Popen | None = None
    binary: str = field(default_factory=lambda: _find_binary("mosquitto"))

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    def start(self) -> None:
        with open(self.log_path, "ab") as log:  # the child keeps its own copy of the descriptor
            self.proc = subprocess.Popen([self.binary, "-c", str(self.conf_path)], stdout=log, stderr=log)
        try:
            wait_for_port(self.port)
        except TimeoutError:
            raise RuntimeError(f"mosquitto did not start:\n{self.log_path.read_text()[-2000:]}") from None

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.proc = None

    def restart(self) -> None:
        self.stop()
        self.start()


def start_mosquitto(workdir: Path, extra_conf: str = "", port: int | None = None) -> Mosquitto:
    """A Mosquitto on 127.0.0.1:<free port>, anonymous allowed unless ``extra_conf`` says otherwise.

    ``extra_conf`` is appended after the listener line, so it may add password_file, acl_file, more listeners.
    """
    workdir.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    conf = workdir / "mosquitto.conf"
    allow_anon = "" if "allow_anonymous" in extra_conf else "allow_anonymous true\n"
    conf.write_text(f"{MOSQUITTO_BASE_CONF}listener {port} 127.0.0.1\n{allow_anon}{extra_conf}\n")
    broker = Mosquitto(port=port, conf_path=conf, log_path=workdir / "mosquitto.log")
    broker.start()
    return broker


def start_persistent_mosquitto(workdir: Path, port: int | None = None) -> Mosquitto:
    """A Mosquitto that keeps sessions and queued messages across a restart (saved on SIGTERM)."""
    workdir.mkdir(parents=True, exist_ok=True)
    conf = f"persistence true\npersistence_location {workdir}/\nuser root\n"  # root: pytest dirs are 0700
    return start_mosquitto(workdir, extra_conf=conf, port=port)


# --------------------------------------------------------------------------------------------- PostgreSQL


def _pg_bin(name: str) -> str:
    dirs = tuple(sorted((str(p) for p in Path("/usr/lib/postgresql").glob("*/bin")), reverse=True))
    return _find_binary(name, dirs)


@dataclass
class Postgres:
    datadir: Path
    port: int

    @property
    def url(self) -> str:
        """SQLAlchemy URL (psycopg 3 driver)."""
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/postgres"

    def _as_postgres(self, args: list[str]) -> list[str]:
        if os.geteuid() == 0:
            return ["runuser", "-u", "postgres", "--", *args]
        return args

    def create_database(self, name: str) -> str:
        """Create an empty database and return its SQLAlchemy URL (fresh state per test)."""
        subprocess.run(
            self._as_postgres([_pg_bin("createdb"), "-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres", name]),
            check=True, capture_output=True,
        )
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/{name}"

    def ctl(self, action: str, mode: str = "fast") -> None:
        """``pg_ctl stop`` or ``restart`` this server (an outage in tests); restart also starts a stopped one,
        with the options it last ran with. The server logs to pg.log, so no pipe of ours is held open."""
        subprocess.run(self._as_postgres([_pg_bin("pg_ctl"), "-D", str(self.datadir), "-m", mode, "-w", "-l",
                                          str(self.datadir.parent / "pg.log"), action]),
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True, timeout=120)

    def stop(self) -> None:
        subprocess.run(self._as_postgres([_pg_bin("pg_ctl"), "-D", str(self.datadir), "-m", "immediate", "stop"]),
                       capture_output=True)
        shutil.rmtree(self.datadir.parent, ignore_errors=True)


def start_postgres(workdir: Path | None = None) -> Postgres:
    """initdb (as user postgres when root), start on a free port, trust auth on loopback.

    The data lives in its own directory directly under the system temp dir: pytest's temp dirs are private to
    root (0700), which user postgres cannot enter.
    """
    workdir = Path(tempfile.mkdtemp(prefix="smartcam-pg-"))
    datadir = workdir / "pgdata"
    port = free_port()
    pg = Postgres(datadir=datadir, port=port)
    if os.geteuid() == 0:
        shutil.chown(workdir, "postgres", "postgres")
        workdir.chmod(0o755)
    subprocess.run(pg._as_postgres([_pg_bin("initdb"), "-D", str(datadir), "-U", "postgres", "--auth=trust",
                                    "-E", "UTF8", "--no-sync"]), check=True, capture_output=True)
    opts = f"-p {port} -k {workdir} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=100"
    res = subprocess.run(pg._as_postgres([_pg_bin("pg_ctl"), "-D", str(datadir), "-o", opts, "-l",
                                          str(workdir / "pg.log"), "-w", "start"]), capture_output=True, text=True)
    if res.returncode != 0:
        log = (workdir / "pg.log").read_text() if (workdir / "pg.log").exists() else ""
        raise RuntimeError(f"postgres did not start: {res.stderr}\n{log[-2000:]}")
    return pg


# --------------------------------------------------------------------------------------------- SeaweedFS (S3)


@dataclass
class SeaweedFS:
    """A running ``weed mini``: a real S3-compatible server that checks request signatures.

    ``endpoint`` is the S3 URL; ``access_key``/``secret_key`` are the only credentials it accepts.
    """

    workdir: Path
    s3_port: int
    access_key: str
    secret_key: str
    log_path: Path
    proc: subprocess.Popen | None = None
    args: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.s3_port}"

    def start(self) -> None:
        """(Re)start on the same ports and data directory (an S3 outage in tests); waits until it answers."""
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(self.args, stdout=log, stderr=log, cwd=self.workdir, env=self.env)
        try:
            wait_for_port(self.s3_port, timeout=60)
            _wait_s3_ready(self)
        except Exception:
            self.stop()
            raise RuntimeError(f"seaweedfs did not start:\n{self.log_path.read_text()[-2000:]}") from None

    def client(self, access_key: str | None = None, secret_key: str | None = None):
        """A boto3 S3 client for this server (the right credentials unless told otherwise)."""
        import boto3
        from botocore.config import Config

        return boto3.client(
            "s3", endpoint_url=self.endpoint, region_name="us-east-1",
            aws_access_key_id=access_key or self.access_key, aws_secret_access_key=secret_key or self.secret_key,
            config=Config(retries={"max_attempts": 2}, connect_timeout=5, read_timeout=30),
        )

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.proc = None


def _weed_binary() -> str:
    import sys

    return _find_binary("weed", (str(Path(sys.executable).parent),))


def start_seaweedfs(workdir: Path, access_key: str = "smartcam-test", secret_key: str = "smartcam-secret",
                    buckets: tuple[str, ...] = ()) -> SeaweedFS:
    """``weed mini`` on 127.0.0.1 with every port chosen free (master, volume, filer, S3, admin, gRPC).

    Buckets are NOT auto-created on upload (``-s3.autoCreateBucket=false``) so a missing bucket is an error, as
    on real S3; pass ``buckets`` to create some at start. The Iceberg/Lance/WebDAV side servers are turned off
    so two instances never fight over their fixed default ports.
    """
    workdir.mkdir(parents=True, exist_ok=True)
    ports = {name: free_port() for name in ("master", "volume", "filer", "s3", "admin")}
    grpc = {name: free_port() for name in ("master", "volume", "filer", "s3", "admin")}
    args = [
        _weed_binary(), "mini", f"-dir={workdir}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
        "-master.telemetry=false", "-admin.ui=false", "-webdav=false", "-s3.port.iceberg=0", "-s3.port.lance=0",
        "-s3.autoCreateBucket=false",
    ]
    for name in ports:
        args += [f"-{name}.port={ports[name]}", f"-{name}.port.grpc={grpc[name]}"]
    env = {**os.environ, "AWS_ACCESS_KEY_ID": access_key, "AWS_SECRET_ACCESS_KEY": secret_key}
    log_path = workdir / "weed.log"
    server = SeaweedFS(workdir=workdir, s3_port=ports["s3"], access_key=access_key, secret_key=secret_key,
                       log_path=log_path, args=args, env=env)
    server.start()
    for bucket in buckets:  # after start-up, so a bad name fails at once with S3's own message
        try:
            server.client().create_bucket(Bucket=bucket)
        except Exception:
            server.stop()
            raise
    return server


def _wait_s3_ready(server: SeaweedFS, timeout: float = 60.0) -> None:
    """The S3 port opens before the filer behind it is ready: wait until a real request succeeds."""
    client = server.client()
    deadline = time.monotonic() + timeout
    while True:
        try:
            client.list_buckets()
            return
        except Exception:
            if time.monotonic() > deadline or (server.proc and server.proc.poll() is not None):
                raise
            time.sleep(0.2)


# --------------------------------------------------------------------------------------------- MQTT clients, the edge

ROOT = Path(__file__).resolve().parents[1]
SITE, CAM = "lab", "cam-1"  # the camera the edge tests run as


def edge_cmd(*args: str) -> list[str]:
    """``smartcam-edge run ARGS`` as this interpreter runs it."""
    return [sys.executable, "-m", "camera", "run", *args]


def run_edge(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run the real edge to the end; its exit code, stdout and stderr."""
    return subprocess.run(edge_cmd(*args), cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def read_events(path: Path) -> list[dict]:
    """The events of an --events-file (none if it does not exist)."""
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


class Subscriber:
    """A real MQTT 5 subscriber on ``smartcam/#`` collecting (topic, payload, retain); optionally persistent."""

    def __init__(self, port: int, client_id: str = "test-sub", *, persistent: bool = False,
                 topic: str = "smartcam/#") -> None:
        import paho.mqtt.client as mqtt

        from contract.broker import persistent_connect_kwargs

        self.messages: list[tuple[str, bytes, bool]] = []
        self._lock = threading.Lock()
        self.subscribed = threading.Event()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5)
        self.client.on_message = self._on_message
        self.client.on_connect = lambda c, u, f, rc, p: c.subscribe(topic, qos=1)
        self.client.on_subscribe = lambda *a: self.subscribed.set()
        self.client.reconnect_delay_set(0.1, 0.5)
        self.client.connect("127.0.0.1", port, **(persistent_connect_kwargs(self.client, 3600) if persistent
                                                   else {"clean_start": True}))
        self.client.loop_start()
        assert self.subscribed.wait(10), "subscription not acknowledged"

    def _on_message(self, client, userdata, msg) -> None:
        with self._lock:
            self.messages.append((msg.topic, bytes(msg.payload), bool(msg.retain)))

    def payloads(self, leaf: str) -> list[bytes]:
        topic = topic_for(SITE, CAM, leaf)
        with self._lock:
            return [p for t, p, _ in self.messages if t == topic]

    def events(self) -> list[dict]:
        """Every event received, in arrival order: one per ``events`` message, many per ``batch`` message."""
        events_topic, batch_topic = topic_for(SITE, CAM, "events"), topic_for(SITE, CAM, "batch")
        with self._lock:
            messages = list(self.messages)
        out: list[dict] = []
        for t, p, _ in messages:
            if t == events_topic:
                out.append(json.loads(p))
            elif t == batch_topic:
                out += [json.loads(line) for line in decode_batch(p, 8 << 20)]
        return out

    def wait_for(self, predicate, timeout: float = 30.0) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate():
                return True
            time.sleep(0.05)
        return predicate()

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def retained(port: int, leaf: str, timeout: float = 5.0) -> bytes | None:
    """The retained message on one topic, as a fresh subscriber sees it (None if nothing is retained)."""
    sub = Subscriber(port, client_id=f"retained-{leaf.replace('/', '-')}", topic=topic_for(SITE, CAM, leaf))
    try:
        sub.wait_for(lambda: sub.messages, timeout)
        return next((p for _, p, r in sub.messages if r), None)
    finally:
        sub.close()


# --------------------------------------------------------------------------------------------- HTTP


class HttpServer:
    """A real HTTP server on 127.0.0.1 that can be stopped and restarted on the same port."""

    def __init__(self, directory: Path) -> None:
        self.handler = functools.partial(_QuietHttpHandler, directory=str(directory))
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), self.handler)
        self.port = self.httpd.server_address[1]
        self._serve()

    def _serve(self) -> None:
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def start(self) -> None:
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", self.port), self.handler)
        self._serve()


class _QuietHttpHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


# ------------------------------------------------------------------------------------------ a disk that fills
@contextlib.contextmanager
def small_disk(size: str = "8m") -> Iterator[Path]:
    """A real, small filesystem (tmpfs) that can be filled up; skips when mounting is not allowed here."""
    mnt = Path(tempfile.mkdtemp(prefix="smartcam-disk-"))
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(mnt)],
                         capture_output=True, text=True)
    if res.returncode != 0:
        mnt.rmdir()
        pytest.skip(f"cannot mount a tmpfs here ({res.stderr.strip()}): disk-full case not run")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)
        with contextlib.suppress(OSError):
            mnt.rmdir()


def fill(mnt: Path, leave: int) -> Path:
    """Fill the filesystem with a ballast file until only about ``leave`` bytes are free (another program
    filling the disk); deleting the ballast makes room again."""
    ballast = mnt / "ballast"
    chunk = b"\0" * (64 * 1024)
    with open(ballast, "ab", buffering=0) as fh:
        while True:  # in chunks, re-reading the free space: the program under test may be writing meanwhile
            st = os.statvfs(mnt)
            room = st.f_bavail * st.f_frsize - leave
            if room <= 0:
                break
            try:
                fh.write(chunk[:room])
            except OSError:  # ENOSPC: the other writer took the rest first; the disk is as full as asked
                break
    return ballast


class MjpegServer:
    """An HTTP MJPEG camera on 127.0.0.1 (multipart/x-mixed-replace), paced at ``fps``; stop() drops clients."""

    def __init__(self, frames: list[bytes], fps: float = 10.0, port: int | None = None):
        self.frames, self.fps, self.port = frames, fps, port or free_port()
        self.server: http.server.ThreadingHTTPServer | None = None
        self.stopped = threading.Event()
        self.connections = 0

    def _handler(self):
        srv = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 - http.server's name
                srv.connections += 1
                self.send_response(200)
                self.send_header("Content-Type", "multipart/x-mixed-replace; boundary=frame")
                self.end_headers()
                i = 0
                while not srv.stopped.is_set():
                    jpg = srv.frames[i % len(srv.frames)]
                    i += 1
                    try:
                        self.wfile.write(b"--frame\r\nContent-Type: image/jpeg\r\nContent-Length: %d\r\n\r\n%s\r\n"
                                         % (len(jpg), jpg))
                    except OSError:
                        return
                    srv.stopped.wait(1.0 / srv.fps)
                self.close_connection = True

            def log_message(self, *args):
                pass

        return Handler

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/stream.mjpg"

    def start(self) -> None:
        self.stopped.clear()
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", self.port), self._handler())
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        self.stopped.set()
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
            self.server = None


def clip_jpegs(path: Path, n: int = 40, step: int = 3) -> list[bytes]:
    import cv2

    cap = cv2.VideoCapture(str(path))
    out: list[bytes] = []
    index = 0
    while len(out) < n:
        ok, image = cap.read()
        if not ok:
            break
        if index % step == 0:
            out.append(cv2.imencode(".jpg", cv2.resize(image, (640, 360)))[1].tobytes())
        index += 1
    cap.release()
    return out

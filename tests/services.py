"""Start real servers for tests: Mosquitto, PostgreSQL, SeaweedFS (S3). No mocks, no Docker.

Each starter binds 127.0.0.1 on a free port inside a temp dir, waits until the server answers, and returns a
handle whose ``stop()`` kills it by PID. See ../shared/ENVIRONMENT.md for why the settings are what they are.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path


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

    def stop(self) -> None:
        subprocess.run(self._as_postgres([_pg_bin("pg_ctl"), "-D", str(self.datadir), "-m", "immediate", "stop"]),
                       capture_output=True)
        shutil.rmtree(self.datadir.parent, ignore_errors=True)


def start_postgres(workdir: Path | None = None) -> Postgres:
    """initdb (as user postgres when root), start on a free port, trust auth on loopback.

    The data lives in its own directory directly under the system temp dir: pytest's temp dirs are private to
    root (0700), which user postgres cannot enter.
    """
    import tempfile

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

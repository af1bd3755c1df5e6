"""``smartcam-sink run --http``: the API's socket is bound before anything else starts, with real uvicorn.

A bind that cannot succeed (port taken, a privileged port without privilege, a port out of range, a host that
does not resolve) stops the start with one line on stderr and a non-zero exit, instead of a sink that ingests
without the API it was asked to serve.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from tests.services import free_port

ROOT = Path(__file__).resolve().parents[1]
TOKEN = "k" * 40


def _run_sink(broker_url: str, db_dir: Path, http: str, *, prefix: tuple[str, ...] = (),
              timeout: float = 20) -> subprocess.CompletedProcess:
    """``smartcam-sink run`` expected to exit on its own; a sink still running after ``timeout`` fails the test."""
    cmd = [sys.executable, "-m", "cloud_sink", "run", "--broker", broker_url, "--db",
           f"sqlite:///{db_dir / 'sink.db'}", "--client-id", f"http-{os.getpid()}", "--http", http]
    cmd = [*prefix, *cmd]
    env = {**os.environ, "SMARTCAM_API_TOKEN": TOKEN}  # so a non-loopback host gets as far as the bind
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        pytest.fail(f"the sink kept running without its API (--http {http}):\n{err[-1500:]}")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def _one_line_error(result: subprocess.CompletedProcess, *words: str) -> str:
    assert result.returncode != 0, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    errors = [line for line in result.stderr.splitlines() if "error" in line.lower()]
    assert len(errors) == 1, result.stderr
    for word in words:
        assert word in errors[0], errors[0]
    assert "API and dashboard on" not in result.stderr, "it must not claim to serve"
    return errors[0]


def test_port_in_use_fails_the_start(mosquitto, tmp_path):
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen(1)
        port = holder.getsockname()[1]
        result = _run_sink(mosquitto.url, tmp_path, f"127.0.0.1:{port}")
    line = _one_line_error(result, f"127.0.0.1:{port}", "in use")
    assert result.returncode == 2, line
    assert not (tmp_path / "sink.db").exists(), "bind first: nothing else was started"


@pytest.mark.parametrize("http, words", [
    ("127.0.0.1:99999", ("99999", "1-65535")),
    ("127.0.0.1:0", ("port", "1-65535")),
    ("no-such-host.invalid:8080", ("no-such-host.invalid", "resolve")),
])
def test_impossible_addresses_fail_the_start(mosquitto, tmp_path, http, words):
    result = _run_sink(mosquitto.url, tmp_path, http)
    _one_line_error(result, *words)
    assert result.returncode == 2


def _without_bind_privilege() -> tuple[str, ...] | None:
    """A command prefix that runs the sink unable to bind ports below 1024; None where this host cannot."""
    try:
        start = int(Path("/proc/sys/net/ipv4/ip_unprivileged_port_start").read_text())
    except OSError:
        start = 1024
    if start <= 80:
        return None  # everyone may bind port 80 on this kernel
    if os.geteuid() != 0:
        return ()
    setpriv = shutil.which("setpriv")  # util-linux: root without CAP_NET_BIND_SERVICE
    return (setpriv, "--bounding-set", "-net_bind_service", "--inh-caps", "-net_bind_service") if setpriv else None


@pytest.mark.skipif(_without_bind_privilege() is None, reason="port 80 is not privileged here, or no setpriv")
def test_privileged_port_without_privilege_fails_the_start(mosquitto, tmp_path):
    result = _run_sink(mosquitto.url, tmp_path, "127.0.0.1:80", prefix=_without_bind_privilege() or ())
    _one_line_error(result, "127.0.0.1:80", "permission denied")
    assert result.returncode == 2


def test_bind_returns_a_listening_socket_and_uvicorn_serves_it(tmp_path):
    """The happy path with the real server: bound at once (the port answers as soon as start returns)."""
    from cloud_sink.cli import start_http
    from cloud_sink.store import Store

    store = Store.open(f"sqlite:///{tmp_path / 'sink.db'}")
    port = free_port()
    server, _thread = start_http(store, "127.0.0.1", port, None)
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=10) as resp:
            assert json.loads(resp.read())["status"] == "ok"
        with pytest.raises(ValueError, match="in use"):  # a second sink on the same port is refused
            start_http(store, "127.0.0.1", port, None)
    finally:
        server.should_exit = True
        _thread.join(10)
        store.close()

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
TOKEN = "Hq3v-9Zx_Lp2Rt7Wn4Ks8Mb6Jc1Yd5Fg0"  # strong enough to serve off loopback


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


# ------------------------------------------------------------------------------------------ Host header (DNS rebinding)
def _get(port: int, path: str, host: str | None = None, token: str | None = None) -> int:
    headers = {"Host": host} if host else {}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status
    except urllib.error.HTTPError as exc:
        return exc.code


def test_loopback_without_token_answers_only_its_own_host_names(tmp_path):
    """A web page on evil.example that re-binds its name to 127.0.0.1 sends ``Host: evil.example``: refused,
    on the data, the dashboard and health alike; the loopback names the operator types work."""
    from cloud_sink.cli import start_http
    from cloud_sink.store import Store

    store = Store.open(f"sqlite:///{tmp_path / 'sink.db'}")
    port = free_port()
    server, thread = start_http(store, "127.0.0.1", port, None)
    try:
        for host in ("evil.example", f"evil.example:{port}", f"192.168.1.20:{port}", "127.0.0.1.evil.example"):
            for path in ("/api/events", "/", "/health"):
                assert _get(port, path, host) == 400, (host, path)
        for host in (None, f"127.0.0.1:{port}", f"localhost:{port}", "localhost", f"[::1]:{port}"):
            assert _get(port, "/api/events", host) == 200, host
    finally:
        server.should_exit = True
        thread.join(10)
    port = free_port()  # configured: a name the operator put in /etc/hosts
    server, thread = start_http(store, "127.0.0.1", port, None, allowed=["sink.local"])
    try:
        assert _get(port, "/api/events", f"sink.local:{port}") == 200
        assert _get(port, "/api/events", f"evil.example:{port}") == 400
    finally:
        server.should_exit = True
        thread.join(10)
        store.close()


# ------------------------------------------------------------------------------------------ where the token comes from
def test_token_from_a_file_or_the_environment_and_a_flag_warns(tmp_path, monkeypatch, caplog):
    from cloud_sink.cli import resolve_token
    from cloud_sink.config import SinkConfig

    monkeypatch.delenv("SMARTCAM_API_TOKEN", raising=False)
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    assert resolve_token(SinkConfig(http_token_file=str(token_file))) == TOKEN
    monkeypatch.setenv("SMARTCAM_API_TOKEN", TOKEN[::-1])
    assert resolve_token(SinkConfig()) == TOKEN[::-1]
    assert resolve_token(SinkConfig(http_token_file=str(token_file))) == TOKEN, "the file wins over the env"
    with caplog.at_level("WARNING"):
        assert resolve_token(SinkConfig(http_token=TOKEN)) == TOKEN
    assert "visible" in caplog.text and "--http-token-file" in caplog.text
    with pytest.raises(ValueError, match="one of"):
        resolve_token(SinkConfig(http_token=TOKEN, http_token_file=str(token_file)))
    with pytest.raises(ValueError, match="cannot read"):
        resolve_token(SinkConfig(http_token_file=str(tmp_path / "missing")))
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(ValueError, match="empty"):
        resolve_token(SinkConfig(http_token_file=str(tmp_path / "empty")))


def test_a_weak_token_off_loopback_fails_the_start(mosquitto, tmp_path):
    (tmp_path / "token").write_text("s3cret-token\n")
    cmd_env = {k: v for k, v in os.environ.items() if k != "SMARTCAM_API_TOKEN"}
    proc = subprocess.run([sys.executable, "-m", "cloud_sink", "run", "--broker", mosquitto.url, "--db",
                           f"sqlite:///{tmp_path / 'sink.db'}", "--http", f"0.0.0.0:{free_port()}",
                           "--http-token-file", str(tmp_path / "token")], cwd=ROOT, env=cmd_env,
                          capture_output=True, text=True, timeout=30)
    line = _one_line_error(subprocess.CompletedProcess(proc.args, proc.returncode, proc.stdout, proc.stderr),
                           "too weak", "32")
    assert proc.returncode == 2, line

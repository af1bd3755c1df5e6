"""Fixtures and helpers for the over-the-air model tests (registered in conftest): two small INT8 builds, broken
variants made by ONNX graph surgery, signing keys, a registry, an HTTP server for the registry (with a throttle,
to catch a download in the middle), a running in-process edge and an MQTT watcher of its documents."""

from __future__ import annotations

import contextlib
import functools
import http.server
import json
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from models.build import build_model
from tests.conftest import INDOOR_CLIP, NEGATIVE_CLIP, ONNX_FP32, PLAZA_CLIP, STREET_CLIP

CALIB = [INDOOR_CLIP, STREET_CLIP, PLAZA_CLIP, NEGATIVE_CLIP]


def _build(tmp_path_factory, imgsz: tuple[int, int]) -> Path:
    out = tmp_path_factory.mktemp("ota_model") / f"person-{imgsz[0]}x{imgsz[1]}-int8.onnx"
    build_model(ONNX_FP32, imgsz, CALIB, out, calib_frames=8, latency_runs=0, progress=False,
                keep_classes=["person"])
    return out


@pytest.fixture(scope="session")
def ota_model_a(int8_model_320) -> Path:
    """The model an edge starts on: the session's INT8 320 build (tests/model_fixtures.py), built once for
    every suite that needs a real model."""
    return int8_model_320


@pytest.fixture(scope="session")
def ota_model_b(tmp_path_factory) -> Path:
    """A second, different INT8 build (256x320, person-only head, 8 calibration frames): the "new model" pushed
    to a running edge."""
    return _build(tmp_path_factory, (256, 320))


# ------------------------------------------------------------------------------------------ graph surgery
def _rewire_output(model: onnx.ModelProto) -> tuple[str, str]:
    """Rename the graph output's producer to ``<out>_raw``; returns (raw name, output name)."""
    out = model.graph.output[0].name
    raw = out + "_raw"
    for node in model.graph.node:
        node.output[:] = [raw if o == out else o for o in node.output]
    return raw, out


def zeroed_scores(src: Path, dst: Path) -> Path:
    """The same network with every class score multiplied by 0 (boxes kept): it loads and runs, finds nobody."""
    model = onnx.load(src)
    rows = model.graph.output[0].type.tensor_type.shape.dim[1].dim_value
    raw, out = _rewire_output(model)
    mask = np.zeros((1, rows, 1), np.float32)
    mask[0, :4, 0] = 1.0
    model.graph.initializer.append(numpy_helper.from_array(mask, "score_mask"))
    model.graph.node.append(helper.make_node("Mul", [raw, "score_mask"], [out]))
    onnx.save(model, dst)
    return dst


def slowed(src: Path, dst: Path, convs: int = 3) -> Path:
    """The same outputs plus a heavy branch on the input (full-resolution 64-channel convolutions whose result is
    multiplied by 0 and added): many times slower, identical detections."""
    model = onnx.load(src)
    inp = model.graph.input[0].name
    raw, out = _rewire_output(model)
    rng = np.random.default_rng(0)
    g = model.graph
    g.initializer.append(numpy_helper.from_array(rng.standard_normal((64, 3, 7, 7)).astype(np.float32), "slow_w0"))
    g.node.append(helper.make_node("Conv", [inp, "slow_w0"], ["slow_0"], pads=[3, 3, 3, 3]))
    for i in range(1, convs + 1):
        g.initializer.append(numpy_helper.from_array(
            rng.standard_normal((64, 64, 3, 3)).astype(np.float32) * 0.01, f"slow_w{i}"))
        g.node.append(helper.make_node("Conv", [f"slow_{i - 1}", f"slow_w{i}"], [f"slow_{i}"], pads=[1, 1, 1, 1]))
    g.initializer.append(numpy_helper.from_array(np.zeros((), np.float32), "slow_zero"))
    g.node.append(helper.make_node("ReduceMean", [f"slow_{convs}"], ["slow_mean"], keepdims=0))
    g.node.append(helper.make_node("Mul", ["slow_mean", "slow_zero"], ["slow_nothing"]))
    g.node.append(helper.make_node("Add", [raw, "slow_nothing"], [out]))
    onnx.save(model, dst)
    return dst


def failing_at_runtime(src: Path, dst: Path) -> Path:
    """Loads like the original (same declared output), but every inference fails: the output goes through a
    Reshape whose target shape is computed from the input at run time, one that the output cannot take."""
    model = onnx.load(src)
    inp = model.graph.input[0].name
    raw, out = _rewire_output(model)
    g = model.graph
    for name, value in (("rt_zero", np.zeros((), np.float32)), ("rt_eleven", np.full((), 11.0, np.float32)),
                        ("rt_one", np.array([1], np.int64)), ("rt_rest", np.array([-1], np.int64))):
        g.initializer.append(numpy_helper.from_array(value, name))
    g.node.extend([
        helper.make_node("ReduceMax", [inp], ["rt_max"], keepdims=0),
        helper.make_node("Mul", ["rt_max", "rt_zero"], ["rt_z"]),
        helper.make_node("Add", ["rt_z", "rt_eleven"], ["rt_f"]),
        helper.make_node("Cast", ["rt_f"], ["rt_i"], to=TensorProto.INT64),
        helper.make_node("Reshape", ["rt_i", "rt_one"], ["rt_i1"]),
        helper.make_node("Concat", ["rt_one", "rt_i1", "rt_rest"], ["rt_shape"], axis=0),  # [1, 11, -1]
        helper.make_node("Reshape", [raw, "rt_shape"], [out]),
    ])
    onnx.save(model, dst)
    return dst


def classifier_model(dst: Path) -> Path:
    """A valid ONNX the edge cannot use as a detector: one 1x3x64x64 input, a 1x10 output (another layout)."""
    x = helper.make_tensor_value_info("images", TensorProto.FLOAT, [1, 3, 64, 64])
    y = helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 10])
    w = numpy_helper.from_array(np.ones((3 * 64 * 64, 10), np.float32), "w")
    shape = numpy_helper.from_array(np.array([1, -1], np.int64), "shape")
    graph = helper.make_graph([helper.make_node("Reshape", ["images", "shape"], ["flat"]),
                               helper.make_node("MatMul", ["flat", "w"], ["logits"])], "cls", [x], [y], [w, shape])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.metadata_props.add(key="names", value=str({i: f"c{i}" for i in range(10)}))
    onnx.save(model, dst)
    return dst


# ------------------------------------------------------------------------------------------ keys, registry
@pytest.fixture(scope="session")
def ota_keys(tmp_path_factory) -> tuple[Path, Path]:
    """(signing.key, signing.pub) made by the real keygen."""
    from models.signing import generate_keypair

    return generate_keypair(tmp_path_factory.mktemp("ota_keys"))


@dataclass
class CliRun:
    returncode: int
    stdout: str
    stderr: str


@pytest.fixture
def model_cli(capsys, monkeypatch):
    """``smartcam-model ARGS`` run in this process (its main, output and exit code); ``env`` is set for the rest
    of the test. A subprocess would spend seconds importing onnx for every call."""
    from models.cli import main

    def run(*args: str, env: dict | None = None) -> CliRun:
        for k, v in (env or {}).items():
            monkeypatch.setenv(k, v)
        capsys.readouterr()
        code = main(list(args))
        out = capsys.readouterr()
        return CliRun(code, out.out, out.err)

    return run


# ------------------------------------------------------------------------------------------ HTTP
class RegistryServer:
    """A real HTTP server over a directory (the registry), on 127.0.0.1; ``throttle_bps`` slows every response."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.throttle_bps: float | None = None
        server = self

        class Handler(http.server.SimpleHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def copyfile(self, source, outputfile) -> None:
                if server.throttle_bps is None:
                    return super().copyfile(source, outputfile)
                while chunk := source.read(16 * 1024):
                    outputfile.write(chunk)
                    outputfile.flush()
                    time.sleep(len(chunk) / (server.throttle_bps or 1e12))

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0),
                                                     functools.partial(Handler, directory=str(root)))
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def registry_server(tmp_path) -> Iterator[RegistryServer]:
    server = RegistryServer(tmp_path / "registry")
    (tmp_path / "registry").mkdir(exist_ok=True)
    yield server
    server.close()


class CutProxy:
    """A TCP proxy on 127.0.0.1 to ``port`` that can be cut (every connection dropped, new ones refused) and
    restored: a camera's network going away while the broker and the cloud stay up."""

    def __init__(self, port: int) -> None:
        import socket

        self.target = port
        self.up = threading.Event()
        self.up.set()
        self._conns: list = []
        self._lock = threading.Lock()
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        import socket

        while True:
            try:
                client, _ = self.server.accept()
            except OSError:
                return
            if not self.up.is_set():
                client.close()
                continue
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target))
            except OSError:
                client.close()
                continue
            with self._lock:
                self._conns += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    def _pipe(self, src, dst) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.close()

    def cut(self) -> None:
        import socket

        self.up.clear()
        with self._lock:
            conns, self._conns = self._conns, []
        for c in conns:
            with contextlib.suppress(OSError):
                c.shutdown(socket.SHUT_RDWR)
                c.close()

    def restore(self) -> None:
        self.up.set()

    def close(self) -> None:
        self.cut()
        self.server.close()


# ------------------------------------------------------------------------------------------ MQTT watching
class Watch:
    """A real MQTT subscriber on ``smartcam/#``: the latest document per topic, and every reported state."""

    def __init__(self, port: int) -> None:
        from tests.services import Subscriber

        self.sub = Subscriber(port, client_id=f"ota-watch-{time.monotonic_ns()}")

    def reports(self, site: str, camera: str) -> list[dict]:
        topic = f"smartcam/{site}/{camera}/model/reported"
        with self.sub._lock:
            return [json.loads(p) for t, p, _ in self.sub.messages if t == topic and p]

    def wait_report(self, site: str, camera: str, pred, timeout: float = 60.0, what: str = "report",
                    since: int = 0) -> dict:
        """The first reported document (from the ``since``-th on) matching ``pred`` (fails with every state seen)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for doc in self.reports(site, camera)[since:]:
                if pred(doc):
                    return doc
            time.sleep(0.1)
        seen = [(d["state"], d["version"], d["reason"]) for d in self.reports(site, camera)]
        raise AssertionError(f"no {what} from {site}/{camera} in {timeout:.0f} s; seen: {seen}")

    def close(self) -> None:
        self.sub.close()


def ota_edge_config(tmp_path: Path, *, model: Path, broker: str, site: str, camera: str, trust_key: Path | None,
                    **updates: Any) -> Any:
    """An edge config for a looping indoor clip paced in real time, with model updates on."""
    from camera.config import load_config

    mu = {"enabled": True, "trust_key": str(trust_key) if trust_key else None, "dir": str(tmp_path / "models"),
          "probation_s": 2.0, **updates}
    return load_config(overrides={
        "camera_id": camera, "site": site, "source": str(INDOOR_CLIP), "model": str(model), "fps": 10,
        "realtime": True, "loop": 0, "mqtt": {"broker": broker, "stats_interval_s": 1.0},
        "detector": {"streams": 1, "threads": 1}, "outbox": {"path": str(tmp_path / "outbox.db")},
        "events_file": str(tmp_path / "events.jsonl"), "model_updates": {k: v for k, v in mu.items() if v is not None},
        "drain_timeout_s": 15,
    })


class EdgeThread:
    """A real :class:`EdgeRunner` in a thread of the test process (stopped by :meth:`stop`, as SIGTERM does)."""

    def __init__(self, cfg: Any) -> None:
        from camera.pipeline import EdgeRunner

        self.runner = EdgeRunner(cfg)
        self.rc: int | None = None
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            self.rc = self.runner.run()
        except BaseException as exc:  # noqa: BLE001 - reported by stop()
            self.error = exc

    @property
    def detector(self) -> Any:
        return self.runner.detector

    def stop(self, timeout: float = 30.0) -> int | None:
        self.runner.request_stop()
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "edge did not stop"
        if self.error is not None:
            raise self.error
        return self.rc

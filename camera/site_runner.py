"""Many cameras, one edge process: one MQTT connection, one detector pool shared fairly, one outbox per camera.

Each camera is an :class:`~camera.pipeline.EdgeRunner` in its own thread, exactly as it runs alone (source,
motion gate, tracker, zones, lines, events, its own outbox, topics, retained status and stats), except for three
shared parts handed to it:

* the :class:`~camera.fair_scheduler.FairScheduler`: every camera's frames go through one pool of inference
  workers, each camera's share weighted by its ``fps`` (the ones without get the share of
  :data:`DEFAULT_WEIGHT` fps); results come back in that camera's frame order;
* one onnxruntime session per model file (cameras on the same model share it, each with its own thresholds);
* the :class:`~camera.mqtt_connection.MqttConnection`: one client id, and a Last Will on the process's node
  document (``smartcam/<site>/<node>/node``, contract/schemas/node.v1) that says every camera offline at once.

One camera's trouble stays its own: a source that drops reconnects on its own (its status goes offline until it
is back), a backlog fills only that camera's outbox, and an error ends only that camera's thread. The process
exits with the worst of the cameras' exit codes (camera/cli.py lists them).
"""

from __future__ import annotations

import copy
import logging
import threading
import time
from pathlib import Path
from typing import Any

from camera.fair_scheduler import FairScheduler
from camera.mqtt_connection import MqttConnection
from camera.pipeline import EXIT_OK, EdgeRunner, default_streams, default_threads
from camera.site_config import SiteConfig
from contract.topics import NODE_LEAF, node_document, topic_for

log = logging.getLogger(__name__)

CAMERA_THREAD = "camera-"  # thread-name prefix: log lines from a camera's thread say which camera they are about
DEFAULT_WEIGHT = 10.0  # the share (in fps) of a camera with no fps set: as much as a 10 fps camera


class CameraLogFilter(logging.Filter):
    """Prefix ``[camera]`` to what a camera's own thread logs: with several cameras in one process, "source
    opened" or "done: 300 frames" must say whose."""

    def filter(self, record: logging.LogRecord) -> bool:
        name = threading.current_thread().name
        if name.startswith(CAMERA_THREAD) and not getattr(record, "camera_tagged", False):
            record.msg = f"[{name[len(CAMERA_THREAD):]}] {record.msg}"
            record.camera_tagged = True
        return True


class SiteRunner:
    """Runs every camera of a :class:`SiteConfig` in one process; :meth:`run` returns the exit code."""

    def __init__(self, site: SiteConfig) -> None:
        self.site = site
        first = site.cameras[0]
        d = first.detector
        self.streams = d.streams or default_streams()
        self.threads = d.threads or default_threads(self.streams)
        self.scheduler = FairScheduler(workers=self.streams, max_batch=d.batch)
        self._sessions: dict[tuple[str, tuple[str, ...]], Any] = {}  # (model file, classes) -> Detector
        self._lock = threading.Lock()
        self.connection: MqttConnection | None = None
        self.node_topic = topic_for(first.site, site.node_id, NODE_LEAF)
        ids = [c.camera_id for c in site.cameras]
        if first.mqtt.broker:
            self.connection = MqttConnection(
                first.mqtt.settings(), first.mqtt.client_id or f"smartcam-edge-{first.site}-{site.node_id}",
                will=(self.node_topic, node_document(first.site, site.node_id, "offline", ids)),
                birth=[(self.node_topic, node_document(first.site, site.node_id, "online", ids))],
                window=first.mqtt.window)
        self.runners = [self._runner(cam) for cam in site.cameras]
        self._metrics_server: Any = None
        self.exit_codes: dict[str, int] = {}

    def _runner(self, cam: Any) -> EdgeRunner:
        weight = cam.fps or DEFAULT_WEIGHT
        return EdgeRunner(
            cam, connection=self.connection,
            new_queue=lambda detect, batch=None: self.scheduler.lane(detect, cam.camera_id, weight=weight,
                                                                     batch=batch),
            load_detector=lambda path, thresholds: self._detector(cam, Path(path), thresholds),
            availability=[(self.node_topic, "{{ value_json.state }}")] if self.connection else None,
            live_files=True)

    def _detector(self, cam: Any, path: Path, thresholds: dict[str, float]) -> Any:
        """One session per model file (and class list), a copy per camera with that camera's thresholds."""
        from camera.detector import Detector

        d = cam.detector
        key = (str(path.resolve()), tuple(d.classes))
        with self._lock:
            base = self._sessions.get(key)
            if base is None:
                base = self._sessions[key] = Detector(path, conf=d.conf, iou=d.iou, classes=d.classes,
                                                      threads=self.threads, provider=d.provider,
                                                      provider_options=d.provider_options)
            else:
                log.info("sharing the loaded model %s", path.name)
        mine = copy.copy(base)  # the session and its buffers are shared; thresholds are this camera's
        mine.conf, mine.iou = thresholds.get("conf", d.conf), thresholds.get("iou", d.iou)
        return mine

    def request_stop(self, signum: int | None = None, frame: Any = None) -> None:
        for r in self.runners:
            r.request_stop(signum, frame)

    def run(self) -> int:
        """Open every camera (a camera that cannot open fails the start), then run them all until each ends."""
        tag = CameraLogFilter()
        handlers = logging.getLogger().handlers
        for h in handlers:
            h.addFilter(tag)
        try:
            for r in self.runners:  # one after the other, each in a thread named after its camera (log lines)
                failed: list[BaseException] = []
                opener = threading.Thread(target=self._guard, args=(r.open, failed),
                                          name=CAMERA_THREAD + r.cfg.camera_id)
                opener.start()
                opener.join()
                if failed:
                    raise _naming(failed[0], r.cfg.camera_id)
            first = self.site.cameras[0]
            if first.metrics.listen:
                from camera.metrics import serve_metrics

                self._metrics_server = serve_metrics(self.runners, first.metrics.listen)
            if self.connection is not None:
                self.connection.start()
            log.info("%d cameras (%s) on one detector pool of %d stream(s) x %d thread(s), %d model session(s)%s",
                     len(self.runners), ", ".join(r.cfg.camera_id for r in self.runners), self.streams,
                     self.threads, len(self._sessions),
                     f", one MQTT connection as {self.connection.client_id}" if self.connection else "")
            threads = [threading.Thread(target=self._camera, args=(r,), name=CAMERA_THREAD + r.cfg.camera_id)
                       for r in self.runners]
            for t in threads:
                t.start()
            for t in threads:
                while t.is_alive():  # join in slices: the main thread must stay free for signals
                    t.join(0.5)
            self._log_batches()
            return max(self.exit_codes.values(), default=EXIT_OK)
        finally:
            self.close()
            for h in handlers:
                h.removeFilter(tag)

    def _log_batches(self) -> None:
        """How the detector pool ran the frames: network runs by batch size (detector.batch, fair_scheduler)."""
        runs = dict(sorted(self.scheduler.batches.items()))
        frames = sum(size * count for size, count in runs.items())
        if frames:
            log.info("detector pool: %d frames in %d network runs (%s), max batch %d", frames, sum(runs.values()),
                     ", ".join(f"{count} x {size}" for size, count in runs.items()), self.scheduler.max_batch)

    @staticmethod
    def _guard(fn: Any, failed: list[BaseException]) -> None:
        try:
            fn()
        except BaseException as exc:  # noqa: BLE001 - re-raised in the caller's thread
            failed.append(exc)

    def _camera(self, runner: EdgeRunner) -> None:
        cam = runner.cfg.camera_id
        try:
            self.exit_codes[cam] = runner.run_opened()
        except Exception as exc:  # noqa: BLE001 - one camera's failure ends that camera, never the others
            from camera.cli import exit_code_for

            try:
                code, message = exit_code_for(exc)
            except Exception:  # noqa: BLE001 - not one of ours: a bug; its traceback, and never exit 0
                log.exception("camera %s stopped on an unexpected error", cam)
                self.exit_codes[cam] = 1
                return
            log.error("camera %s stopped: %s", cam, message)
            self.exit_codes[cam] = code
        else:
            if self.exit_codes[cam] != EXIT_OK:
                log.error("camera %s ended with exit code %d", cam, self.exit_codes[cam])

    def close(self) -> None:
        """Every camera says offline and leaves; then the process's node document says offline and the
        connection closes cleanly."""
        if self._metrics_server is not None:
            self._metrics_server.shutdown()
            self._metrics_server = None
        for r in self.runners:
            r.close()
        if self.connection is not None:
            conn, first = self.connection, self.site.cameras[0]
            if conn.connected.is_set():
                info = conn.client.publish(self.node_topic, node_document(
                    first.site, self.site.node_id, "offline", [c.camera_id for c in self.site.cameras]),
                    qos=1, retain=True)
                deadline = time.monotonic() + 5
                while not info.is_published() and time.monotonic() < deadline and conn.connected.is_set():
                    time.sleep(0.02)
            conn.stop()
            self.connection = None
        self.scheduler.close()


def _naming(exc: BaseException, camera_id: str) -> BaseException:
    """The same error, its one line saying which camera could not start (a missing source, an unusable model)."""
    from camera.detector import ModelError
    from camera.metrics import MetricsError
    from camera.outbox import OutboxError
    from camera.sources import SourceError

    if type(exc) in (SourceError, ModelError, OutboxError, MetricsError):
        return type(exc)(f"camera {camera_id}: {exc}")
    return exc

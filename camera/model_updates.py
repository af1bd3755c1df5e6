"""Over-the-air model updates on the edge: download, verify, health-check, swap, probation, rollback.

The camera follows the retained *desired model* documents (``contract/model_docs.py``) of its camera and site
topics. For a new version a worker thread, never the frame loop:

1. checks the document against ``model-desired.v1`` and the manifest's ed25519 signature against
   ``model_updates.trust_key`` (before downloading a byte);
2. downloads the file to ``<dir>/.downloads/`` (bounded by the manifest's size and ``max_bytes``, a stalled
   read times out), then checks its size and sha256 against the signed manifest;
3. loads it in a second onnxruntime session and health-checks it on frames kept from the last seconds: the new
   model's latency within ``max_latency_factor`` of the current one's on the same frames, and people found on
   the frames where the current model finds them;
4. hands it to the frame loop, which swaps it in between two frames (:meth:`ModelUpdater.take_swap`);
5. watches it on probation for ``probation_s`` (:class:`Probation`: inference errors, latency, detection rate
   against the old model's); a failure swaps the old model back at once (it stays loaded meanwhile);
6. records current / previous / trial in ``<dir>/current.json`` (write + fsync + rename), so a restart, even
   after ``kill -9``, starts on a model that passed its checks, and the retained desired document finishes the
   update.

Every step is reported on the retained ``.../model/reported`` document. Pure decisions (:func:`judge_health`,
:class:`Probation`, :func:`read_state`, :func:`check_file`, :func:`parse_desired`) are separate from the I/O
(:class:`ModelUpdater`) so they are testable without a camera or a broker.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import queue
import shutil
import statistics
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np

from contract.model_docs import (
    DESIRED_SCHEMA_FILE,
    camera_desired_topic,
    effective_desired,
    model_ref,
    reported_document,
    site_desired_topic,
)
from contract.signature import SignatureError, load_public_key, verify_manifest

log = logging.getLogger(__name__)

STATE_FILE = "current.json"
CHUNK = 256 * 1024


class UpdateRefused(Exception):
    """A desired model this camera will not run; the message is the reported reason (one line)."""


# ------------------------------------------------------------------------------------------------ pure decisions
@cache
def _desired_validator() -> Callable[[Any], Any]:
    import fastjsonschema  # small, pure Python: the edge validates what it is told to run

    from contract.schema import load_schema

    return fastjsonschema.compile(load_schema(DESIRED_SCHEMA_FILE))


def parse_desired(payload: bytes) -> dict[str, Any] | None:
    """A desired document from an MQTT payload; None for an empty (cleared) one; UpdateRefused if it is invalid.

    >>> parse_desired(b"") is None
    True
    >>> parse_desired(b'{"kind": "model.desired"}')
    Traceback (most recent call last):
    ...
    camera.model_updates.UpdateRefused: desired document fails model-desired.v1: data must contain [...] properties
    """
    if not payload:
        return None
    try:
        doc = json.loads(payload)
    except (ValueError, UnicodeDecodeError):
        raise UpdateRefused("desired document is not JSON") from None
    import fastjsonschema

    try:
        _desired_validator()(doc)
    except fastjsonschema.JsonSchemaException as exc:
        text = str(exc.message).replace("\n", " ")
        if "must contain" in text:
            text = text.split("must contain")[0] + "must contain [...] properties"
        raise UpdateRefused(f"desired document fails model-desired.v1: {text}"[:300]) from None
    return doc


def check_file(path: Path, manifest: dict[str, Any]) -> None:
    """Size and sha256 of a downloaded file against its signed manifest (UpdateRefused with the difference)."""
    size = path.stat().st_size
    if size != manifest["size"]:
        raise UpdateRefused(f"truncated or wrong file: {size} bytes, the manifest says {manifest['size']}")
    digest = file_digest(path)
    if digest != manifest["sha256"]:
        raise UpdateRefused(f"sha256 mismatch: got {digest[:12]}, the manifest says {manifest['sha256'][:12]}")


def file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


@dataclass(frozen=True)
class HealthLimits:
    """What a new model must show before it serves, and on probation."""

    max_latency_factor: float = 5.0
    min_detection_ratio: float = 0.5
    max_failures: int = 3  # inference errors on probation before rolling back
    min_frames: int = 10  # probation ends only after this many detector frames
    min_baseline_rate: float = 0.2  # the old model must see people this often for the rate check to apply


def judge_health(old_ms: list[float], new_ms: list[float], old_people: list[int], new_people: list[int],
                 limits: HealthLimits) -> str | None:
    """The reason a new model fails its health check on the same frames, or None if it passes.

    >>> judge_health([5, 5], [6, 6], [2, 0], [2, 0], HealthLimits())
    >>> judge_health([5, 5], [100, 100], [2, 0], [2, 0], HealthLimits())
    'health check: 100.0 ms per frame vs 5.0 ms for the current model (limit 5x)'
    >>> judge_health([5, 5], [5, 5], [2, 3], [0, 0], HealthLimits())
    'health check: found people on 0 of the 2 recent frames where the current model does'
    """
    if new_ms and old_ms:
        new, old = statistics.median(new_ms), statistics.median(old_ms)
        if new > limits.max_latency_factor * max(old, 0.1):
            return (f"health check: {new:.1f} ms per frame vs {old:.1f} ms for the current model "
                    f"(limit {limits.max_latency_factor:g}x)")
    seen = [i for i, n in enumerate(old_people) if n > 0]
    found = sum(1 for i in seen if new_people[i] > 0)
    if seen and found < limits.min_detection_ratio * len(seen):
        return f"health check: found people on {found} of the {len(seen)} recent frames where the current model does"
    return None


class Probation:
    """Watches a newly swapped-in model frame by frame against the old model's recent baseline.

    ``verdict()`` is None while undecided, ``"pass"`` after ``probation_s`` (and ``min_frames``) without a
    failure, or the reason to roll back.

    >>> p = Probation(base_ms=5.0, base_rate=0.9, started=0.0, probation_s=10, limits=HealthLimits(min_frames=2))
    >>> for _ in range(3): p.record(6.0, 1)
    >>> p.verdict(now=5.0), p.verdict(now=11.0)
    (None, 'pass')
    >>> q = Probation(base_ms=5.0, base_rate=0.9, started=0.0, probation_s=10, limits=HealthLimits(min_frames=2))
    >>> for _ in range(20): q.record(6.0, 0)
    >>> q.verdict(now=11.0)
    'probation: people on 0% of frames vs 90% before the swap (limit 50%)'
    """

    def __init__(self, *, base_ms: float | None, base_rate: float | None, started: float, probation_s: float,
                 limits: HealthLimits) -> None:
        self.base_ms, self.base_rate = base_ms, base_rate
        self.started, self.probation_s, self.limits = started, probation_s, limits
        self.ms: list[float] = []
        self.people: list[int] = []
        self.failures = 0
        self.last_error: str | None = None

    def record(self, ms: float | None, people: int, error: str | None = None) -> None:
        if error is not None:
            self.failures += 1
            self.last_error = error
            return
        if ms is not None:
            self.ms.append(ms)
            self.people.append(people)

    def verdict(self, now: float) -> str | None:
        lim = self.limits
        if self.failures >= lim.max_failures:
            return f"probation: inference failed {self.failures} times ({self.last_error})"
        if self.base_ms and len(self.ms) >= lim.min_frames:
            recent = statistics.median(self.ms[-50:])
            if recent > lim.max_latency_factor * max(self.base_ms, 0.1):
                return (f"probation: latency {recent:.1f} ms vs {self.base_ms:.1f} ms before the swap "
                        f"(limit {lim.max_latency_factor:g}x)")
        if now - self.started < self.probation_s or len(self.ms) < lim.min_frames:
            return None
        if self.base_rate is not None and self.base_rate >= lim.min_baseline_rate:
            rate = sum(1 for n in self.people if n > 0) / len(self.people)
            if rate < lim.min_detection_ratio * self.base_rate:
                return (f"probation: people on {rate:.0%} of frames vs {self.base_rate:.0%} before the swap "
                        f"(limit {lim.min_detection_ratio:.0%})")
        return "pass"


# ------------------------------------------------------------------------------------------------ on disk
@dataclass
class ModelRecord:
    """A model this camera can run: a registry version (``version`` set) or the configured one (None)."""

    path: str
    name: str
    sha256: str
    version: str | None = None
    thresholds: dict[str, float] = field(default_factory=dict)
    deployment: str | None = None

    def ref(self) -> dict[str, Any]:
        return model_ref(self.version, self.name, self.sha256)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelRecord:
        return cls(path=d["path"], name=d["name"], sha256=d["sha256"], version=d.get("version"),
                   thresholds=dict(d.get("thresholds") or {}), deployment=d.get("deployment"))


def read_state(directory: Path) -> dict[str, Any]:
    """``current.json``: {"current", "previous", "trial", "failed"} (absent keys None; {} if there is none)."""
    try:
        state = json.loads((directory / STATE_FILE).read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        log.error("model state %s is unreadable (%s): starting on the configured model", directory / STATE_FILE, exc)
        return {}
    return state if isinstance(state, dict) else {}


def write_state(directory: Path, state: dict[str, Any]) -> None:
    """Atomically replace ``current.json`` (temp file, fsync, rename, fsync the directory)."""
    directory.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".current-", suffix=".json")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(state, f, indent=2)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, directory / STATE_FILE)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dfd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


# ------------------------------------------------------------------------------------------------ the updater
@dataclass
class Swap:
    """A model handed to the frame loop: swap it in before the next frame."""

    detector: Any
    record: ModelRecord
    trial: bool  # True: a new model going on probation; False: the old one coming back (rollback)
    detect: Callable[[np.ndarray], Any] = field(init=False)

    def __post_init__(self) -> None:
        self.detect = self.detector.detect


@dataclass(frozen=True)
class UpdateSettings:
    """``model_updates`` of the edge config, as the updater needs it."""

    directory: Path
    trust_key: Path | None
    allow_unsigned: bool = False
    probation_s: float = 60.0
    max_bytes: int = 200 * 1024 * 1024
    download_timeout_s: float = 30.0
    health_frames: int = 8
    limits: HealthLimits = HealthLimits()


class ModelUpdater:
    """Follows the desired documents for one camera; the frame loop calls :meth:`observe` and :meth:`take_swap`."""

    def __init__(self, settings: UpdateSettings, *, site: str, camera_id: str, base_model: Path,
                 load: Callable[[Path, dict[str, float]], Any], clock: Callable[[], float] = time.monotonic):
        self.s = settings
        self.site, self.camera_id = site, camera_id
        self.base_model = Path(base_model)
        self._load = load  # (path, thresholds) -> a Detector
        self._clock = clock
        self.topics = [camera_desired_topic(site, camera_id), site_desired_topic(site)]
        self._trust = None
        if settings.trust_key is not None:
            self._trust = load_public_key(settings.trust_key)  # SignatureError at start-up, not at deploy time
        self.dir = Path(settings.directory).absolute()  # records stay valid whatever the working directory
        self.downloads = self.dir / ".downloads"
        self._docs: dict[str, bytes] = {}
        self._docs_lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._jobs: queue.SimpleQueue[str] = queue.SimpleQueue()
        self._ready: Swap | None = None
        self._ready_lock = threading.Lock()
        self._recent_lock = threading.Lock()
        self._recent: deque[tuple[np.ndarray, int]] = deque(maxlen=max(settings.health_frames, 1))
        self._recent_people: deque[tuple[np.ndarray, int]] = deque(maxlen=max(settings.health_frames, 1))
        self._window: deque[tuple[float, int]] = deque(maxlen=200)  # (ms, people) of the serving model
        self._seen = 0
        self._probation: Probation | None = None
        self._inference_error: str | None = None  # set by a guarded detect() on an inference thread
        self._probation_done = threading.Event()
        self._probation_done.set()
        self._serving: Swap | None = None  # the detector in use and its record
        self._fallback: Swap | None = None  # the old model kept loaded while the new one is on probation
        self.state: dict[str, Any] = {}
        self.publish: Callable[[str], None] | None = None  # set by the runner: publish the reported document
        self.last_report: dict[str, Any] | None = None
        self._handled: set[tuple[str, str]] = set()  # (deployment, version) already acted on in this run
        self._thread = threading.Thread(target=self._run, name="model-updates", daemon=True)

    # ---------------------------------------------------------------- start-up
    def boot(self) -> ModelRecord:
        """The model to start on: the recorded current one if it still verifies, else previous, else the
        configured ``model``. An update interrupted by a restart (trial) is not trusted: it is redone."""
        self.dir.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(self.downloads, ignore_errors=True)  # a download cut by kill -9 starts over
        self.state = read_state(self.dir)
        if self.state.get("trial"):
            log.warning("model %s was on probation when the edge stopped: starting on the last model that passed, "
                        "the update is retried", self.state["trial"].get("version"))
        for key in ("current", "previous"):
            rec = self.state.get(key)
            if not rec:
                continue
            record = ModelRecord.from_dict(rec)
            problem = self._stored_problem(record)
            if problem is None:
                if key == "previous":
                    log.warning("current model unusable: starting on the previous one, %s", record.version)
                    self.state = {**self.state, "current": rec, "previous": None}
                self.state["trial"] = None
                return record
            log.error("recorded %s model %s cannot be used: %s", key, record.version or record.path, problem)
        from camera.detector import file_sha256

        self.state = {"current": None, "previous": None, "trial": None, "failed": self.state.get("failed")}
        return ModelRecord(path=str(self.base_model), name=self.base_model.stem, sha256=file_sha256(self.base_model))

    def _stored_problem(self, record: ModelRecord) -> str | None:
        path = Path(record.path)
        if not path.is_file():
            return f"{path} is missing"
        if file_digest(path) != record.sha256:
            return f"{path} does not match its recorded sha256"
        if record.version is not None:
            try:
                entry = json.loads(path.with_suffix(".json").read_text())
                self._check_signature(entry["manifest"], entry.get("signature"))
            except (OSError, ValueError, KeyError, UpdateRefused) as exc:
                return f"its signed manifest does not verify ({exc})"
        return None

    def start(self, detector: Any, record: ModelRecord) -> None:
        """Begin following desired documents; ``detector`` serves ``record`` now."""
        self._serving = Swap(detector, record, trial=False)
        self._report("active", record.version, record.sha256, record.deployment, None)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        self._probation_done.set()
        if self._thread.is_alive():
            self._thread.join(5)

    @property
    def active(self) -> ModelRecord | None:
        return self._serving.record if self._serving else None

    # ---------------------------------------------------------------- MQTT side (paho's thread: store and wake)
    def offer(self, topic: str, payload: bytes) -> None:
        """A retained desired document arrived on one of :attr:`topics`."""
        with self._docs_lock:
            self._docs[topic] = bytes(payload)
        self._wake.set()

    def on_connect(self) -> None:
        """Re-publish the latest report after a reconnect (retained, so the cloud always has the latest)."""
        if self.last_report is not None and self.publish is not None:
            self.publish(json.dumps(self.last_report, separators=(",", ":")))

    # ---------------------------------------------------------------- frame loop side (must stay cheap)
    def observe(self, image: np.ndarray, people: int | None, ms: float | None, error: str | None = None) -> None:
        """One processed frame: ``people`` found by the serving model (None: detector not run)."""
        error = error or self.take_error()
        if people is None and error is None:
            return
        self._seen += 1
        if ms is not None:
            self._window.append((ms, people or 0))
        if self._seen % 5 == 1 and people is not None:  # frames for the next health check, spread over time
            item = (image.copy(), int(people))
            with self._recent_lock:
                (self._recent_people if people > 0 else self._recent).append(item)
        probation = self._probation
        if probation is not None:
            probation.record(ms, people or 0, error)
            verdict = probation.verdict(self._clock())
            if verdict is not None:
                self._probation = None
                self._jobs.put("pass" if verdict == "pass" else "fail:" + verdict)
                self._wake.set()

    def take_swap(self) -> Swap | None:
        """The model to run from the next frame on, if one is ready (then the caller must swap it in)."""
        if self._ready is None:
            return None
        with self._ready_lock:
            swap, self._ready = self._ready, None
        return swap

    def swapped(self, swap: Swap) -> None:
        """The frame loop has swapped ``swap`` in (between two frames)."""
        old = self._serving
        self._serving = swap
        if swap.trial:
            window = list(self._window)
            base_ms = statistics.median(m for m, _ in window) if window else None
            base_rate = sum(1 for _, n in window if n > 0) / len(window) if len(window) >= 20 else None
            self._fallback = old
            self._window.clear()
            self._probation = Probation(base_ms=base_ms, base_rate=base_rate, started=self._clock(),
                                        probation_s=self.s.probation_s, limits=self.s.limits)
            log.info("model %s serving on probation for %.0f s", swap.record.version, self.s.probation_s)
            self._report("probation", swap.record.version, swap.record.sha256, swap.record.deployment, None)
        else:
            self._window.clear()

    def guarded(self, detector: Any) -> Callable[[np.ndarray], Any]:
        """``detector.detect`` for a model on probation: an inference error counts against it instead of stopping
        the camera (the frame gets no detections)."""
        from camera.detections import Detections

        def detect(image: np.ndarray) -> Any:
            try:
                return detector.detect(image)
            except Exception as exc:  # noqa: BLE001 - any failure of the new model is the probation's business
                self._inference_error = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:200]
                return Detections.empty()

        return detect

    def take_error(self) -> str | None:
        """The last inference error of a model on probation since the previous call (counted by :meth:`observe`)."""
        err, self._inference_error = self._inference_error, None
        return err

    # ---------------------------------------------------------------- the worker
    def _run(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(1.0)
            if self._stop.is_set():
                return
            self._wake.clear()
            try:
                while True:
                    try:
                        job = self._jobs.get_nowait()
                    except queue.Empty:
                        break
                    self._finish_probation(job)
                if self._probation_done.is_set():
                    time.sleep(0.2)  # let the camera's and the site's retained documents both arrive
                    self._follow()
            except Exception:  # noqa: BLE001 - the updater must never take the camera down
                log.exception("model update failed unexpectedly")

    def _follow(self) -> None:
        with self._docs_lock:
            raw = {t: self._docs.get(t, b"") for t in self.topics}
        docs = []
        for topic in self.topics:
            try:
                docs.append(parse_desired(raw[topic]))
            except UpdateRefused as exc:
                key = ("invalid", hashlib.sha256(raw[topic]).hexdigest())
                if key not in self._handled:
                    self._handled.add(key)
                    log.error("model update refused: %s (on %s)", exc, topic)
                    self._report("rejected", None, None, None, str(exc))
                docs.append(None)
        doc = effective_desired(docs[0], docs[1])
        if doc is None:
            return
        manifest, deployment = doc["manifest"], doc["deployment"]
        version = manifest["version"]
        key = (deployment, version)
        serving = self._serving.record if self._serving else None
        if key in self._handled:
            return
        self._handled.add(key)
        if serving is not None and serving.sha256 == manifest["sha256"]:
            log.info("desired model %s is the one serving (same sha256)", version)
            serving.version = serving.version or version  # the configured file, now known by its registry name
            serving.deployment = deployment
            self._report("active", version, manifest["sha256"], deployment, None)
            return
        failed = self.state.get("failed") or {}
        if failed.get("deployment") == deployment and failed.get("version") == version:
            log.info("desired model %s (deployment %s) failed here before: %s", version, deployment,
                     failed.get("reason"))
            self._report(failed.get("state", "rejected"), version, manifest["sha256"], deployment,
                         failed.get("reason"))
            return
        try:
            self._update(doc)
        except UpdateRefused as exc:
            reason = str(exc)
            log.error("model %s refused: %s; %s keeps serving", version, reason,
                      serving.version or serving.name if serving else "the current model")
            self._fail("rejected", version, manifest["sha256"], deployment, reason)

    def _fail(self, state: str, version: str | None, sha256: str | None, deployment: str | None,
              reason: str) -> None:
        self.state["failed"] = {"deployment": deployment, "version": version, "state": state, "reason": reason}
        self.state["trial"] = None
        write_state(self.dir, self.state)
        self._report(state, version, sha256, deployment, reason)

    def _check_signature(self, manifest: dict[str, Any], signature: Any) -> None:
        if self._trust is None:
            if not self.s.allow_unsigned:
                raise UpdateRefused("no trust_key configured and unsigned models are not allowed")
            log.warning("model %s accepted without a signature check (allow_unsigned)", manifest.get("version"))
            return
        try:
            verify_manifest(manifest, signature, self._trust)
        except SignatureError as exc:
            if not self.s.allow_unsigned:
                raise UpdateRefused(f"bad signature: {exc}") from None
            log.warning("model %s: %s; accepted anyway (allow_unsigned)", manifest.get("version"), exc)

    def _update(self, doc: dict[str, Any]) -> None:
        manifest, deployment = doc["manifest"], doc["deployment"]
        version, sha = manifest["version"], manifest["sha256"]
        self._check_signature(manifest, doc["signature"])
        target_dir = self.dir / version
        target = target_dir / f"{version}.onnx"
        if target.is_file() and file_digest(target) == sha:
            log.info("model %s is already on disk (verified): no download", version)
        else:
            self._report("downloading", version, sha, deployment, None)
            part = self._download(doc["url"], manifest)
            self._report("verifying", version, sha, deployment, None)
            try:
                check_file(part, manifest)
                target_dir.mkdir(parents=True, exist_ok=True)
                os.replace(part, target)
            finally:
                part.unlink(missing_ok=True)
        (target_dir / f"{version}.json").write_text(json.dumps({"manifest": manifest, "signature": doc["signature"]}))
        self._report("checking", version, sha, deployment, None)
        record = ModelRecord(path=str(target), name=version, sha256=sha, version=version,
                             thresholds=dict(manifest.get("thresholds") or {}), deployment=deployment)
        detector = self._load_checked(record, manifest)
        # Passed: from here a restart would redo the update (trial), never start on it unchecked.
        self.state["trial"] = dict(record.__dict__)
        write_state(self.dir, self.state)
        self._probation_done.clear()
        with self._ready_lock:
            self._ready = Swap(detector, record, trial=True)
            self._ready.detect = self.guarded(detector)

    def _download(self, url: str, manifest: dict[str, Any]) -> Path:
        size = int(manifest["size"])
        if size > self.s.max_bytes:
            raise UpdateRefused(f"model is {size} bytes, more than model_updates.max_bytes {self.s.max_bytes}")
        self.downloads.mkdir(parents=True, exist_ok=True)
        free = shutil.disk_usage(self.downloads).free
        if free < size:
            raise UpdateRefused(f"not enough disk space in {self.dir}: the model needs {size} bytes, {free} free")
        part = self.downloads / f"{manifest['version']}.part"
        got = 0
        t0 = time.monotonic()
        try:
            with urllib.request.urlopen(url, timeout=self.s.download_timeout_s) as resp, open(part, "wb") as out:
                while chunk := resp.read(CHUNK):
                    got += len(chunk)
                    if got > size:
                        raise UpdateRefused(f"download is larger than the manifest's {size} bytes")
                    out.write(chunk)
                    if self._stop.is_set():
                        raise UpdateRefused("edge stopping")
        except UpdateRefused:
            part.unlink(missing_ok=True)
            raise
        except urllib.error.HTTPError as exc:
            part.unlink(missing_ok=True)
            raise UpdateRefused(f"download failed: HTTP {exc.code} {exc.reason}") from None
        except TimeoutError:
            part.unlink(missing_ok=True)
            raise UpdateRefused(f"download stalled: no data for {self.s.download_timeout_s:g} s") from None
        except urllib.error.URLError as exc:
            part.unlink(missing_ok=True)
            raise UpdateRefused(f"download failed: {exc.reason}") from None
        except OSError as exc:
            part.unlink(missing_ok=True)
            if exc.errno == 28:
                raise UpdateRefused(f"disk full while downloading to {self.dir} ({got} of {size} bytes)") from None
            raise UpdateRefused(f"download failed: {exc.strerror or exc}") from None
        log.info("downloaded %s: %d bytes in %.1f s", manifest["version"], got, time.monotonic() - t0)
        return part

    def _load_checked(self, record: ModelRecord, manifest: dict[str, Any]) -> Any:
        """Load in a second session and health-check on recent frames against the serving model."""
        from camera.detector import ModelError

        try:
            detector = self._load(Path(record.path), record.thresholds)
        except ModelError as exc:
            raise UpdateRefused(f"wrong layout: {exc}") from None
        if list(detector.imgsz) != list(manifest["imgsz"]):
            raise UpdateRefused(f"wrong layout: the model's input is {detector.imgsz}, its manifest says "
                                f"{manifest['imgsz']}")
        if self.s.health_frames <= 0:
            return detector
        frames = self._recent_frames()
        deadline = time.monotonic() + 60
        while len(frames) < min(2, self.s.health_frames) and time.monotonic() < deadline and not self._stop.is_set():
            time.sleep(0.5)  # just started: wait for a few frames to check on
            frames = self._recent_frames()
        if not frames:
            raise UpdateRefused("health check: no recent frames to check the model on (is the source up?)")
        frames = frames[: self.s.health_frames]
        current = self._serving.detector
        old_ms, new_ms, old_people, new_people = [], [], [], []
        try:
            detector.detect(frames[0][0])  # warm-up: the first run allocates
            current.detect(frames[0][0])
            for image, _ in frames:
                for det, ms_list, people in ((current, old_ms, old_people), (detector, new_ms, new_people)):
                    t0 = time.perf_counter()
                    people.append(len(det.detect(image)))
                    ms_list.append((time.perf_counter() - t0) * 1000)
        except Exception as exc:  # noqa: BLE001 - a model that cannot run on a real frame is refused
            raise UpdateRefused(f"health check: inference failed: {type(exc).__name__}: "
                                f"{str(exc).splitlines()[0] if str(exc) else ''}"[:300]) from None
        reason = judge_health(old_ms, new_ms, old_people, new_people, self.s.limits)
        log.info("health check of %s on %d frames: %.1f ms vs %.1f ms, people on %d/%d frames (current %d/%d)",
                 record.version, len(frames), statistics.median(new_ms), statistics.median(old_ms),
                 sum(n > 0 for n in new_people), len(frames), sum(n > 0 for n in old_people), len(frames))
        if reason is not None:
            raise UpdateRefused(reason)
        return detector

    def _recent_frames(self) -> list[tuple[np.ndarray, int]]:
        """Kept frames, those where the serving model saw people first."""
        with self._recent_lock:
            return list(self._recent_people) + list(self._recent)

    def _finish_probation(self, job: str) -> None:
        serving = self._serving
        if serving is None or not serving.trial:
            return
        record = serving.record
        if job == "pass":
            self.state.update(current=dict(record.__dict__), previous=dict(self._fallback.record.__dict__),
                              trial=None, failed=None)
            write_state(self.dir, self.state)
            serving.trial = False
            self._fallback = None
            self._collect_garbage()
            log.info("model %s passed probation: active", record.version)
            self._report("active", record.version, record.sha256, record.deployment, None)
        else:
            reason = job.removeprefix("fail:")
            log.error("model %s failed probation: %s; rolling back to %s", record.version, reason,
                      self._fallback.record.version or self._fallback.record.name)
            with self._ready_lock:
                self._ready = self._fallback
            self._fallback = None
            self._fail("rolled_back", record.version, record.sha256, record.deployment, reason)
        self._probation_done.set()
        self._wake.set()

    def _collect_garbage(self) -> None:
        keep = {Path(r["path"]).parent.name for r in (self.state.get("current"), self.state.get("previous")) if r}
        for child in self.dir.iterdir():
            if child.is_dir() and not child.name.startswith(".") and child.name not in keep:
                shutil.rmtree(child, ignore_errors=True)

    # ---------------------------------------------------------------- reports
    def _report(self, state: str, version: str | None, sha256: str | None, deployment: str | None,
                reason: str | None) -> None:
        serving = self._serving.record if self._serving else None
        if state == "rolled_back" and self._ready is not None:
            serving = self._ready.record  # the old model is what serves from the next frame
        fallback = self._fallback.record if self._fallback else None
        if fallback is None and self.state.get("previous"):
            fallback = ModelRecord.from_dict(self.state["previous"])
        doc = reported_document(site=self.site, camera_id=self.camera_id, ts_s=time.time(), state=state,
                                version=version, sha256=sha256, deployment=deployment, reason=reason,
                                active=serving.ref() if serving else model_ref(None, "?", "0" * 64),
                                previous=fallback.ref() if fallback else None)
        self.last_report = doc
        if self.publish is not None:
            self.publish(json.dumps(doc, separators=(",", ":")))

"""Frame sources: video file, image folder, webcam, RTSP/HTTP stream, Raspberry Pi camera.

Every source yields :class:`camera.frame.Frame` values and exposes the same health counters, so the pipeline
and the stats never care where frames come from.

* Files and folders are *replayed*: every frame by default, ``fps`` skips frames to reach a target rate,
  ``realtime`` sleeps to the file's own frame rate. ``Frame.ts`` = ``start_time`` + position in the file, so
  old footage can be replayed "as of" a date.
* Live sources (webcam, stream, Pi camera) are read by a background thread that keeps only the newest frame:
  the consumer never falls behind real time, and every frame it never saw is counted in ``dropped``. After a
  read failure the thread reconnects with exponential backoff (``state`` = ``reconnecting``).

>>> src = open_source("/nonexistent/clip.mp4")  # doctest: +IGNORE_EXCEPTION_DETAIL
Traceback (most recent call last):
SourceError: source not found: /nonexistent/clip.mp4
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from camera.frame import Frame

log = logging.getLogger(__name__)

STREAM_SCHEMES = ("rtsp://", "rtsps://", "rtmp://", "http://", "https://", "udp://", "tcp://", "srt://")
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"}
OPEN_TIMEOUT_MS = 5000  # a dead stream must not hang the reader thread forever
READ_TIMEOUT_MS = 5000
PREFETCH_FRAMES = 4  # files: frames decoded ahead of the detector (memory: 4 decoded frames)


class SourceError(RuntimeError):
    """A source that cannot be opened or read; the message is one line for the user."""


class Source:
    """Common counters and the iterator protocol shared by all sources."""

    live: bool = False
    kind: str = "source"

    def __init__(self, name: str) -> None:
        self.name = name
        self.state = "connected"  # connected | reconnecting | ended (stats.v1 source_state)
        self.reconnects = 0
        self.frames_read = 0  # frames taken from the device/file, including dropped ones
        self.dropped = 0  # frames never handed to the consumer (pacing, --fps, latest-frame-only)
        self.fps: float | None = None  # nominal frame rate of the source, when known
        self._closed = threading.Event()

    def __iter__(self) -> Iterator[Frame]:
        return self.frames()

    def frames(self) -> Iterator[Frame]:  # pragma: no cover - overridden
        raise NotImplementedError

    def interrupt(self) -> None:
        """End an iteration in progress after its current frame; safe from a signal handler (no join, no I/O)."""
        self._closed.set()

    def close(self) -> None:
        """Stop reading and release the device or file; an iterator in progress ends after its current frame."""
        self._closed.set()

    def __enter__(self) -> Source:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class RateLimiter:
    """Keeps frames so that at most ``fps`` of them per (media or wall) second get through."""

    def __init__(self, fps: float | None, tolerance: float = 1e-6) -> None:
        self.period = 1.0 / fps if fps else 0.0
        self.tolerance = tolerance  # files: half a source frame, so the frame nearest each slot is kept
        self.next_t: float | None = None

    def keep(self, t: float) -> bool:
        if not self.period:
            return True
        if self.next_t is None or t >= self.next_t - self.tolerance:
            # advance from the scheduled slot, not from t, so the mean rate is exact; resync after a gap
            self.next_t = t + self.period if self.next_t is None or t - self.next_t > self.period else (
                self.next_t + self.period)
            return True
        return False


# --------------------------------------------------------------------------------------------- replayed


def _sleep_until(deadline: float) -> None:
    """Pace a recorded source to real time (``--realtime``): wait until ``deadline`` on the monotonic clock."""
    delay = deadline - time.monotonic()
    if delay > 0:
        time.sleep(delay)


class VideoFileSource(Source):
    """A video file decoded with OpenCV (FFMPEG backend)."""

    kind = "file"

    def __init__(self, path: str | Path, *, fps: float | None = None, realtime: bool = False,
                 start_time: float | None = None, loop: int = 1, drop_late: bool = False) -> None:
        super().__init__(str(path))
        self.drop_late = drop_late  # realtime like a live camera: a frame the reader is late for is dropped
        if loop < 0:
            raise SourceError(f"loop must be >= 0 (0 = forever), got {loop}")
        self.loop = loop  # plays of the file; time keeps running across plays (a kiosk demo, a long benchmark)
        self.path = Path(path)
        self.cap = cv2.VideoCapture(str(self.path), cv2.CAP_FFMPEG)
        if not self.cap.isOpened():
            raise SourceError(f"cannot open video file (not a video or unsupported codec): {self.path}")
        native = self.cap.get(cv2.CAP_PROP_FPS)
        self.fps = float(native) if native and 0 < native < 1000 else 30.0
        self.frame_count = int(self.cap.get(cv2.CAP_PROP_FRAME_COUNT) or 0)
        self.width = int(self.cap.get(cv2.CAP_PROP_FRAME_WIDTH))
        self.height = int(self.cap.get(cv2.CAP_PROP_FRAME_HEIGHT))
        self.realtime = realtime
        self.limiter = RateLimiter(fps, tolerance=0.5 / self.fps)
        self.start_time = time.time() if start_time is None else start_time
        self._decoder: threading.Thread | None = None

    def _decode(self, out: queue.Queue) -> None:
        """Decoder thread: decodes ahead (bounded) so decoding overlaps inference; frames stay in order."""
        index = -1
        item: object = None
        plays = 1
        try:
            while not self._closed.is_set():
                index += 1
                pos = index / self.fps
                keep = self.limiter.keep(pos)
                if not self.cap.grab():  # grab without retrieve: skipped frames cost no colour conversion
                    if self.frames_read and (self.loop == 0 or plays < self.loop):
                        plays += 1
                        self.cap.release()
                        self.cap = cv2.VideoCapture(str(self.path), cv2.CAP_FFMPEG)  # a seek to 0 is not exact
                        index -= 1
                        continue
                    break
                self.frames_read += 1
                if not keep:
                    self.dropped += 1
                    continue
                ok, image = self.cap.retrieve()
                if not ok or image is None:
                    item = SourceError(f"cannot decode frame {index} of {self.path}")
                    break
                if not self._put(out, (index, pos, image)):
                    return
            if item is None and self.frames_read == 0:
                item = SourceError(f"video file has no readable frames: {self.path}")
        except Exception as exc:  # noqa: BLE001 - hand any decoder failure to the consumer
            item = SourceError(f"cannot read {self.path}: {exc}")
        finally:
            self.cap.release()
        self._put(out, item)  # None = end of file

    def _put(self, out: queue.Queue, item: object) -> bool:
        while not self._closed.is_set():
            try:
                out.put(item, timeout=0.2)
                return True
            except queue.Full:
                continue
        return False

    def frames(self) -> Iterator[Frame]:
        out: queue.Queue = queue.Queue(maxsize=PREFETCH_FRAMES)
        decoder = self._decoder = threading.Thread(target=self._decode, args=(out,), name="source-decode",
                                                   daemon=True)
        decoder.start()
        started = time.monotonic()
        try:
            while not self._closed.is_set():
                try:
                    item = out.get(timeout=0.2)
                except queue.Empty:
                    continue
                if item is None:
                    break
                if isinstance(item, SourceError):
                    raise item
                index, pos, image = item
                if self.realtime:
                    if self.drop_late and time.monotonic() - (started + pos) > 1.0 / self.fps:
                        self.dropped += 1  # behind real time: a live camera would have moved on
                        continue
                    _sleep_until(started + pos)
                yield Frame(image=image, ts=self.start_time + pos, index=index)
        finally:
            self.state = "ended"
            self._closed.set()
            decoder.join(timeout=5)

    def close(self) -> None:
        """Stop reading and release the file: the decoder thread releases it when it runs, this otherwise (a
        run that fails before its first frame never starts the decoder)."""
        super().close()
        decoder = self._decoder
        if decoder is not None:
            decoder.join(timeout=5)
        if decoder is None or not decoder.is_alive():
            self.cap.release()


class ImageFolderSource(Source):
    """Every image in a folder, in name order, as if it were a video at ``fps`` (default 1) frames/s."""

    kind = "folder"

    def __init__(self, path: str | Path, *, fps: float | None = None, realtime: bool = False,
                 start_time: float | None = None, loop: int = 1) -> None:
        super().__init__(str(path))
        if loop < 0:
            raise SourceError(f"loop must be >= 0 (0 = forever), got {loop}")
        self.loop = loop  # plays of the folder; time keeps running across plays (a kiosk demo, a long benchmark)
        self.paths = sorted(p for p in Path(path).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not self.paths:
            raise SourceError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) in folder: {path}")
        self.fps = float(fps) if fps else 1.0
        self.realtime = realtime
        self.start_time = time.time() if start_time is None else start_time

    def _plays(self) -> Iterator[Path]:
        """The paths once per play: ``loop`` times, or forever for 0."""
        play = 0
        while self.loop == 0 or play < self.loop:
            play += 1
            yield from self.paths

    def frames(self) -> Iterator[Frame]:
        started = time.monotonic()
        try:
            yielded = 0
            for index, path in enumerate(self._plays()):
                if self._closed.is_set() or (index == len(self.paths) and not yielded):
                    break  # stopped, or a whole play without one readable image (loop 0 would spin forever)
                image = cv2.imread(str(path), cv2.IMREAD_COLOR)
                self.frames_read += 1
                if image is None:
                    log.warning("skipping unreadable image %s", path)
                    self.dropped += 1
                    continue
                pos = index / self.fps
                if self.realtime:
                    _sleep_until(started + pos)
                yielded += 1
                yield Frame(image=image, ts=self.start_time + pos, index=index)
        finally:
            self.state = "ended"


# --------------------------------------------------------------------------------------------- live


class LiveSource(Source):
    """A camera or stream read by a thread that keeps only the newest frame and reconnects after a drop.

    ``opener`` returns a ``read() -> ndarray | None`` callable and a ``release()`` callable; it raises
    :class:`SourceError` when the device or stream cannot be opened.
    """

    live = True
    kind = "live"

    def __init__(self, name: str, opener: Callable[[], tuple[Callable[[], np.ndarray | None], Callable[[], None]]],
                 *, fps: float | None = None, backoff_initial_s: float = 0.5, backoff_max_s: float = 10.0) -> None:
        super().__init__(name)
        self._opener = opener
        self.limiter = RateLimiter(fps)
        self.backoff_initial_s = backoff_initial_s
        self.backoff_max_s = backoff_max_s
        self._cond = threading.Condition()
        self._latest: Frame | None = None
        self._read, self._release = opener()  # fail fast: a missing camera is an error at start-up
        self._thread = threading.Thread(target=self._reader, name=f"source-{self.kind}", daemon=True)
        self._thread.start()

    def _reader(self) -> None:
        index = -1
        read, release = self._read, self._release
        while not self._closed.is_set():
            try:
                image = read()
            except Exception as exc:  # noqa: BLE001 - any device error means "reconnect"
                log.warning("%s: read failed: %s", self.name, exc)
                image = None
            if image is None:
                release()
                opened = self._reconnect()
                if opened is None:
                    break
                read, release = opened
                continue
            index += 1
            self.frames_read += 1
            now = time.time()
            if not self.limiter.keep(time.monotonic()):
                self.dropped += 1
                continue
            with self._cond:
                if self._latest is not None:
                    self.dropped += 1  # the consumer was busy: replace, never queue (stay real-time)
                self._latest = Frame(image=image, ts=now, index=index)
                self._cond.notify_all()
        release()
        with self._cond:
            self.state = "ended"
            self._cond.notify_all()

    def _reconnect(self) -> tuple[Callable[[], np.ndarray | None], Callable[[], None]] | None:
        delay = self.backoff_initial_s
        self.state = "reconnecting"
        log.warning("%s: lost the source, reconnecting", self.name)
        while not self._closed.wait(delay):
            try:
                opened = self._opener()
            except SourceError as exc:
                log.warning("%s: reconnect failed (%s); retrying in %.1fs", self.name, exc,
                            min(delay * 2, self.backoff_max_s))
                delay = min(delay * 2, self.backoff_max_s)
                continue
            self.reconnects += 1
            self.state = "connected"
            log.info("%s: reconnected (reconnect #%d)", self.name, self.reconnects)
            return opened
        return None

    def frames(self) -> Iterator[Frame]:
        while True:
            with self._cond:
                while self._latest is None and self.state != "ended" and not self._closed.is_set():
                    self._cond.wait(0.5)
                frame, self._latest = self._latest, None
            if frame is None:
                return
            yield frame

    def close(self) -> None:
        super().close()
        with self._cond:
            self._cond.notify_all()
        self._thread.join(timeout=OPEN_TIMEOUT_MS / 1000 + 2)


def _opencv_opener(target: Any, description: str, *, api: int = cv2.CAP_ANY, params: list[int] | None = None):
    """An opener for :class:`LiveSource` backed by ``cv2.VideoCapture``."""

    def opener():
        cap = cv2.VideoCapture(target, api, params or [])
        if not cap.isOpened():
            cap.release()
            raise SourceError(f"cannot open {description}")

        def read() -> np.ndarray | None:
            ok, image = cap.read()
            return image if ok else None

        return read, cap.release

    return opener


def _picamera_opener(index: int, size: tuple[int, int]):
    def opener():
        try:
            from picamera2 import Picamera2  # type: ignore[import-not-found]
        except ImportError:
            raise SourceError("picamera2 is not installed: on Raspberry Pi OS run "
                              "`sudo apt install python3-picamera2` and create the venv with "
                              "--system-site-packages") from None
        try:
            cam = Picamera2(index)
            # "RGB888" in libcamera's naming is stored B, G, R in memory: exactly OpenCV's BGR
            cam.configure(cam.create_video_configuration(main={"format": "RGB888", "size": size}))
            cam.start()
        except Exception as exc:  # noqa: BLE001 - libcamera raises many types
            raise SourceError(f"cannot open Pi camera {index}: {exc}") from None

        def release() -> None:
            try:
                cam.stop()
                cam.close()
            except Exception:  # noqa: BLE001
                pass

        return (lambda: cam.capture_array("main")), release

    return opener


def open_source(spec: str, *, fps: float | None = None, realtime: bool = False, start_time: float | None = None,
                picamera_size: tuple[int, int] = (1280, 720), loop: int = 1, drop_late: bool = False) -> Source:
    """Open a source from its spec: a file, a folder, a webcam index (``0``), a URL, or ``picamera[:N]``.
    ``drop_late``: a realtime video file drops the frames its reader is late for, as a live camera does."""
    spec = str(spec).strip()
    if not spec:
        raise SourceError("empty source")
    if spec.isdigit():
        index = int(spec)
        opener = _opencv_opener(index, f"camera {index} (/dev/video{index}): not present or busy",
                                api=cv2.CAP_V4L2 if os.name == "posix" else cv2.CAP_ANY)
        src: Source = LiveSource(f"camera:{index}", opener, fps=fps)
        src.kind = "webcam"
        return src
    if spec == "picamera" or spec.startswith("picamera:"):
        index = int(spec.partition(":")[2] or 0)
        src = LiveSource(f"picamera:{index}", _picamera_opener(index, picamera_size), fps=fps)
        src.kind = "picamera"
        return src
    if spec.lower().startswith(STREAM_SCHEMES):
        params = [cv2.CAP_PROP_OPEN_TIMEOUT_MSEC, OPEN_TIMEOUT_MS, cv2.CAP_PROP_READ_TIMEOUT_MSEC, READ_TIMEOUT_MS]
        redacted = _redact_url(spec)
        src = LiveSource(redacted, _opencv_opener(spec, f"stream {redacted}", api=cv2.CAP_FFMPEG, params=params),
                         fps=fps)
        src.kind = "stream"
        return src
    if "://" in spec:
        raise SourceError(f"unsupported source URL scheme: {_redact_url(spec)} "
                          f"(use one of {', '.join(s[:-3] for s in STREAM_SCHEMES)})")
    path = Path(spec).expanduser()
    if path.is_dir():
        return ImageFolderSource(path, fps=fps, realtime=realtime, start_time=start_time, loop=loop)
    if not path.exists():
        raise SourceError(f"source not found: {spec}")
    if not os.access(path, os.R_OK):
        raise SourceError(f"source not readable (permissions): {spec}")
    if path.suffix.lower() in IMAGE_SUFFIXES:
        raise SourceError(f"source is a single image: {spec} (use `smartcam-edge detect` or a folder of images)")
    return VideoFileSource(path, fps=fps, realtime=realtime, start_time=start_time, loop=loop, drop_late=drop_late)


def _redact_url(url: str) -> str:
    """``rtsp://user:pw@host/x`` → ``rtsp://user:***@host/x`` for logs and errors."""
    scheme, sep, rest = url.partition("://")
    creds, at, host = rest.partition("@")
    if at and ":" in creds:
        return f"{scheme}{sep}{creds.split(':', 1)[0]}:***@{host}"
    return url

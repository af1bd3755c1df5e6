"""The frame loop: source → motion gate → detector → filters → tracker → events → outbox (→ publisher).

Events are written to the durable outbox first (one transaction per frame), then appended to ``events_file``,
so every line of the events file is already safe on disk for the publisher. The loop never waits on the
network. At the end of a file it flushes the tracker (every open track gets its exit), waits up to
``drain_timeout_s`` for the broker to acknowledge everything, and reports what is left.

Exit codes: 0 done (or stopped by a signal), 1 events still queued after the drain wait (kept for the next
start), 3 the outbox failed (disk full, unwritable), 5 the publisher stopped (its drain failed again and again):
nothing is lost silently (camera/cli.py lists every code).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import IO, Any

from camera.clock import SystemClock, shift_event_times
from camera.config import EdgeConfig
from camera.confirm import SinkConfirmations
from camera.frame import Frame
from camera.inference import InferenceQueue, Result
from camera.motion import MotionGate
from camera.outbox import Outbox, OutboxError
from camera.publisher import Publisher, PublisherError
from camera.sources import Source, open_source
from camera.stats import RuntimeStats
from camera.summarizer import Summarizer
from contract.rollup import SUMMARY_LEAF
from contract.timestamps import format_ts
from contract.topics import topic_for, topics_for_event

log = logging.getLogger(__name__)

EXIT_OK, EXIT_UNDRAINED, EXIT_OUTBOX, EXIT_PUBLISHER = 0, 1, 3, 5
LATE_FRAME_GRACE_S = 2.0  # summary mode, live source: a frame may reach the event builder this long after capture
SIGNAL_DRAIN_S = 5.0  # on SIGTERM/SIGINT: how long to try to flush before leaving the rest in the outbox


def cores() -> int:
    """CPU cores this process may run on."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def default_streams() -> int:
    """Frames in the detector at once when not configured: one per core, at most 4 (camera/inference.py).

    Measured on the 2-core dev machine (docs/benchmarks.md): two streams of one thread each ran the edge 1.2-1.5x
    faster end to end than one stream of two threads, with the same events. More than 4 would mostly add memory
    (each run in flight holds its own activations) and latency."""
    return min(cores(), 4)


def default_threads(streams: int = 1) -> int:
    """Inference threads per stream when not configured: the cores shared out between the streams."""
    return max(1, cores() // max(1, streams))


class EdgeRunner:
    """Builds every part from a validated :class:`EdgeConfig` and runs the loop; :meth:`run` returns an exit code."""

    def __init__(self, cfg: EdgeConfig, *, source: Source | None = None, connection: Any = None,
                 new_queue: Any = None, load_detector: Any = None, availability: list[tuple[str, str]] | None = None,
                 live_files: bool = False) -> None:
        """One camera. In a multi-camera process (camera/site_runner.py) the process hands in its shared parts:
        ``connection`` (the one MQTT connection), ``new_queue(detect) -> lane`` (the shared detector pool),
        ``load_detector(path, thresholds)`` (one session per model file) and ``availability`` (extra Home
        Assistant availability topics: the process's node document); ``live_files``: a realtime file drops the
        frames the camera is late for, like a live camera, instead of falling behind."""
        self.live_files = live_files
        self.cfg = cfg
        self.connection = connection
        self._new_queue = new_queue or (lambda detect, batch=None: InferenceQueue(detect, self.streams))
        self._shared_load = load_detector
        self.availability = availability or []
        self._stop = threading.Event()
        self._stats_stop = threading.Event()
        self.stopped_by_signal = False
        self.stats = RuntimeStats()
        self.events_emitted = 0
        self.source = source
        self.detector: Any = None
        self.streams = 1
        self.outbox: Outbox | None = None
        self._dead_at_start = 0
        self.summarizer: Summarizer | None = None  # summary mode only
        self.publisher: Any = None
        self._metrics_server: Any = None  # camera/metrics.py, when metrics.listen is set
        self.updater: Any = None  # model_updates.enabled: over-the-air models (camera/model_updates.py)
        self.swaps: list[dict[str, Any]] = []  # one entry per model swapped in (or back) during the run
        self._swap_pending: Any = None  # (swap, old inference queue, first frame of the new model, switch ms)
        self._tracker: Any = None  # the running tracker (a swapped-in model brings its own score thresholds)
        self.clock = SystemClock()  # is the wall clock set? (camera/clock.py: a Pi before NTP is not)
        self.sampler: Any = None  # samples.enabled with a broker: hard frames for the learning loop
        self.sample_queue: Any = None
        self.samples_queued = 0
        self._events_fh: IO[str] | None = None
        self._video: Any = None
        self._annotator: Any = None

    # ------------------------------------------------------------------ set-up
    def open(self) -> None:
        """Open source, model, outbox and broker connection; raises SourceError / ModelError / OutboxError."""
        from camera.detector import Detector

        cfg = self.cfg
        if cfg.metrics.listen and self._metrics_server is None and self.connection is None:  # first: a port we cannot have stops the start
            from camera.metrics import serve_metrics

            self._metrics_server = serve_metrics(self, cfg.metrics.listen)
        if self.source is None:
            self.source = open_source(cfg.source, fps=cfg.fps, realtime=cfg.realtime, start_time=cfg.start_epoch(),
                                      loop=cfg.loop, drop_late=self.live_files)
        log.info("source %s opened (%s%s)", self.source.name, self.source.kind,
                 f", {self.source.fps:.1f} fps" if self.source.fps else "")
        self._warn_old_start_time()
        d = cfg.detector
        self.streams = d.streams or default_streams()
        threads = d.threads or default_threads(self.streams)

        def load(path: Path, thresholds: dict[str, float]) -> Detector:
            """A model with its own recommended thresholds (an over-the-air model's travel with it)."""
            return Detector(path, conf=thresholds.get("conf", d.conf), iou=thresholds.get("iou", d.iou),
                            classes=d.classes, threads=threads, provider=d.provider,
                            provider_options=d.provider_options)

        if self._shared_load is not None:
            load = self._shared_load
        record = self._open_updater(load) if cfg.model_updates.enabled else None
        self.detector = load(Path(record.path), record.thresholds) if record else load(cfg.model, {})
        log.info("model %s loaded (sha256 %s, imgsz %s, classes %s, conf %.2f, %d stream(s) x %d inference "
                 "thread(s))", self.detector.name, self.detector.sha256[:12], self.detector.imgsz, d.classes,
                 self.detector.conf, self.streams, threads)  # conf: the model's manifest's, else the config's
        if cfg.mqtt.broker:
            self.outbox = Outbox(cfg.outbox_path(), max_rows=cfg.outbox.max_events)
            self._dead_at_start = self.outbox.dead_lettered  # _finish says how many this run added
            if self.outbox.depth():
                log.info("outbox %s holds %d unacknowledged message(s) from a previous run: replaying",
                         self.outbox.path, self.outbox.depth())
            self.publisher = Publisher(cfg.mqtt.settings(), self.outbox, site=cfg.site, camera_id=cfg.camera_id,
                                       client_id=cfg.mqtt.client_id, window=cfg.mqtt.window,
                                       batch=cfg.publish.batch, samples=self._open_samples(),
                                       retry_s=cfg.outbox.retry_s, max_rejections=cfg.outbox.max_rejections,
                                       confirm=SinkConfirmations(cfg.publish.confirm_timeout_s)
                                       if cfg.publish.confirm == "sink" else None, connection=self.connection)
            if cfg.publish.confirm == "sink":
                log.info("publish.confirm sink: events stay in the outbox until the sink confirms them (re-sent "
                         "after %.0f s without)", cfg.publish.confirm_timeout_s)
            if cfg.homeassistant.enabled:
                self._attach_homeassistant()
            summarizer = Summarizer(self.outbox, interval_s=cfg.publish.summary_interval_s,
                                    lateness_s=cfg.tracker.max_age_s + 1.0)
            if cfg.publish.mode == "summary":
                self.summarizer = summarizer
                log.info("summary mode: one summary message per %d-s window on %s (no per-event messages)",
                         cfg.publish.summary_interval_s, topic_for(cfg.site, cfg.camera_id, SUMMARY_LEAF))
            elif summarizer.close_all():  # staged by an earlier run in summary mode: sent, not stranded
                log.info("sent the summaries of windows an earlier summary-mode run left staged")
            if not self.clock.plausible:
                self._hold_for_clock()
            if self.updater is not None:
                self._attach_updater(record)
            self.publisher.start()
        else:
            log.info("no broker configured: offline mode, events go to %s",
                     cfg.events_file or "stdout")
            if cfg.publish.mode == "summary":
                log.warning("publish.mode summary applies to what is sent to a broker; offline, every event is "
                            "written as usual")
        if cfg.events_file:
            Path(cfg.events_file).parent.mkdir(parents=True, exist_ok=True)
            self._events_fh = open(cfg.events_file, "a", encoding="utf-8")  # noqa: SIM115 - closed in close()
        elif not cfg.mqtt.broker:
            self._events_fh = sys.stdout

    def _attach_homeassistant(self) -> None:
        """Home Assistant discovery on the publisher's connection; its record of what was announced lives
        beside the outbox, so entities of zones and lines deleted from the config are removed next time."""
        from camera.homeassistant import Discovery, discovery_documents

        cfg, ha = self.cfg, self.cfg.homeassistant
        docs = discovery_documents(site=cfg.site, camera_id=cfg.camera_id, zones=[z.name for z in cfg.zones],
                                   lines=[ln.name for ln in cfg.lines], prefix=ha.discovery_prefix,
                                   model_name=self.detector.name, availability=self.availability)
        outbox = cfg.outbox_path()
        discovery = Discovery(docs, prefix=ha.discovery_prefix,
                              state_file=outbox.with_name(outbox.name + ".homeassistant.json"),
                              route=self.publisher.route)
        self.publisher.connect_hooks.append(discovery.on_connect)
        log.info("Home Assistant discovery on: %d entities under %s/", len(docs), ha.discovery_prefix)

    def _open_samples(self) -> Any:
        """The sampler and its durable queue, when ``samples.enabled`` (only with a broker: they leave through it)."""
        spec = self.cfg.samples
        if not spec.enabled:
            return None
        from camera.sample_queue import SampleQueue, sample_queue_path
        from camera.sampler import Sampler

        self.sampler = Sampler(spec)
        self.sample_queue = SampleQueue(sample_queue_path(self.cfg.outbox_path()), spec.queue_max_bytes)
        log.info("samples on: hard frames (masked, longer side <= %d px, JPEG) to %s, at most %d/min %d/h %d/day%s",
                 spec.max_side, topic_for(self.cfg.site, self.cfg.camera_id, "sample"), spec.per_minute,
                 spec.per_hour, spec.per_day,
                 f"; {self.sample_queue.depth()} queued from a previous run" if self.sample_queue.depth() else "")
        return self.sample_queue

    def _sample(self, frame: Frame, detections: Any, tracks: list) -> None:
        """Offer one processed frame to the sampler; a chosen one is masked, encoded and queued (a few ms, rare)."""
        from camera.sampler import build_sample

        for cand in self.sampler.observe(frame, detections, tracks):
            payload = build_sample(cand, site=self.cfg.site, camera_id=self.cfg.camera_id,
                                   model_name=self.detector.name, model_sha256=self.detector.sha256,
                                   names=self.detector.names, spec=self.cfg.samples, masks=self.cfg.masks,
                                   conf=self.detector.conf)  # what it ran at (a manifest's own conf)
            if self.sample_queue.put(payload) is not None:
                self.samples_queued += 1
                self.publisher.notify()

    def _open_updater(self, load: Any) -> Any:
        """The over-the-air updater and the model it says to start on (the last one that passed its checks)."""
        from camera.model_updates import HealthLimits, ModelUpdater, UpdateSettings

        cfg, mu = self.cfg, self.cfg.model_updates
        if not cfg.mqtt.broker:
            log.warning("model_updates.enabled but no broker: over-the-air updates are off for this run")
            return None
        settings = UpdateSettings(
            directory=cfg.model_dir(), trust_key=mu.trust_key, allow_unsigned=mu.allow_unsigned,
            probation_s=mu.probation_s, max_bytes=mu.max_bytes, download_timeout_s=mu.download_timeout_s,
            health_frames=mu.health_frames,
            limits=HealthLimits(max_latency_factor=mu.max_latency_factor, min_detection_ratio=mu.min_detection_ratio))
        self.updater = ModelUpdater(settings, site=cfg.site, camera_id=cfg.camera_id, base_model=cfg.model, load=load)
        record = self.updater.boot()
        log.info("model updates on: following %s (models in %s%s)", " and ".join(self.updater.topics),
                 settings.directory, ", signatures checked" if mu.trust_key else ", UNSIGNED models allowed")
        return record

    def _attach_updater(self, record: Any) -> None:
        """Desired documents in and reported documents out through the publisher's one MQTT connection."""
        from contract.model_docs import reported_topic

        updater, publisher = self.updater, self.publisher
        topic = reported_topic(self.cfg.site, self.cfg.camera_id)
        for desired in updater.topics:  # routed: the site-wide topic may have other cameras of this process
            publisher.route(desired, updater.offer)

        def on_connect(client: Any) -> None:
            client.subscribe([(t, 1) for t in updater.topics])
            if updater.last_report is not None:
                client.publish(topic, json.dumps(updater.last_report, separators=(",", ":")), qos=1, retain=True)

        publisher.connect_hooks.append(on_connect)
        # QoS 1, retained; while offline the connect hook sends the latest one when the connection is back
        updater.publish = lambda payload: publisher.connected.is_set() and publisher.client.publish(
            topic, payload, qos=1, retain=True)
        updater.start(self.detector, record)

    def _swap_model(self, swap: Any, queue: Any, process: Any, builder: Any, first: Frame) -> Any:
        """Swap the detector between two frames: ``first`` and every later frame run on the new model, the frames
        already in the detector finish on the old one, side by side (no pipeline bubble), and are tracked first
        (:meth:`_complete_swap`). The tracker, its tracks, zones, lines, outbox and connection carry on. Returns
        the inference queue to use from now on."""
        if self._swap_pending is not None:  # the previous swap's old frames first
            self._complete_swap(process, builder)
        t0 = time.perf_counter()
        new_queue = self._new_queue(self._detect_fn(swap.detector, swap.detect),
                                    self._batchable(swap.detector, swap.detect))
        self._swap_pending = (swap, queue, first, (time.perf_counter() - t0) * 1000)
        return new_queue

    def _complete_swap(self, process: Any, builder: Any) -> None:
        """Before the first frame of the new model is tracked: track the old model's last frames, then events
        carry the new model (name, sha256, thresholds) and its probation starts."""
        swap, old_queue, _first, switch_ms = self._swap_pending
        self._swap_pending = None
        t0 = time.perf_counter()
        for done, result in old_queue.drain():
            process(done, result)
        old_queue.close()
        wait_ms = (time.perf_counter() - t0) * 1000
        old = self.detector
        self.detector = swap.detector
        builder.set_model(swap.detector.name, swap.detector.sha256)
        builder.track_threshold = float(swap.record.thresholds.get("track_threshold",
                                                                   self.cfg.filters.track_threshold))
        if self._tracker is not None:  # the new model's own tracker thresholds (or the config's)
            from camera.tracker import with_model_thresholds

            self._tracker.spec = with_model_thresholds(self.cfg.tracker, swap.record.thresholds)
        self.updater.swapped(swap)
        self.swaps.append({"at_frame": self.stats.frames_processed, "from": old.sha256, "to": swap.detector.sha256,
                           "drain_ms": wait_ms, "switch_ms": switch_ms, "trial": swap.trial, "wall": time.time()})
        log.info("model %s %s between frames %d and %d (switch %.2f ms; waited %.1f ms for the old model's last "
                 "frames)", swap.record.version or swap.record.name, "swapped in" if swap.trial else "restored",
                 self.stats.frames_processed, self.stats.frames_processed + 1, switch_ms, wait_ms)

    def request_stop(self, signum: int | None = None, _frame: Any = None) -> None:
        """Signal handler: finish the current frame, then wind down."""
        if signum is not None:
            if self._stop.is_set() and self.publisher is not None:  # a second signal: stop waiting for the broker
                log.warning("received %s again: leaving now, unacknowledged events stay in the outbox",
                            signal.Signals(signum).name)
                self.publisher.abort_wait()
            else:
                log.info("received %s: finishing the current frame and stopping", signal.Signals(signum).name)
            self.stopped_by_signal = True
        self._stop.set()
        if self.source is not None:
            self.source.interrupt()  # wakes a live source's iterator; the reader thread exits by itself

    # ------------------------------------------------------------------ the loop
    def run(self) -> int:
        """Open everything, process frames until the end / max_frames / a signal, drain, close."""
        try:
            self.open()
            return self._loop()
        finally:
            self.close()

    def run_opened(self) -> int:
        """After :meth:`open`: process frames until the end, drain; the caller closes (camera/site_runner.py)."""
        return self._loop()

    def _detect_fn(self, detector: Any, detect: Any = None) -> Any:
        """What the inference queue runs per frame: ``detect`` (default ``detector.detect``; a model on probation
        passes its guarded one), or that on the frame plus tiles around the counting lines (``detector.regions``,
        camera/regions.py) -- the same for every model, swapped in or not."""
        cfg = self.cfg
        detect = detect or detector.detect
        if cfg.detector.regions == "off" or not cfg.lines:
            return detect
        from camera.regions import RegionDetector

        return RegionDetector(detect, detector.imgsz, detector.iou,
                              lambda w, h: [line.pixel_points(w, h) for line in cfg.lines],
                              scale=cfg.detector.region_scale, mode=cfg.detector.regions).detect

    def _batchable(self, detector: Any, detect: Any = None) -> Any:
        """``detector`` when the queue runs its plain ``detect`` (no probation guard, no region tiles): a shared
        pool may then run this camera's frames in one batch with other cameras' (camera/fair_scheduler.py)."""
        plain = detect is None or detect == detector.detect
        tiles = self.cfg.detector.regions != "off" and bool(self.cfg.lines)
        return detector if plain and not tiles else None

    def _loop(self) -> int:
        from camera.events import EventBuilder
        from camera.filters import apply_filters
        from camera.tracker import Tracker, with_model_thresholds

        cfg, src, stats = self.cfg, self.source, self.stats
        assert src is not None
        active = self.updater.active if self.updater is not None else None
        tracker = self._tracker = Tracker(with_model_thresholds(cfg.tracker, active.thresholds if active else {}))
        builder = EventBuilder(site=cfg.site, camera_id=cfg.camera_id, model_name=self.detector.name,
                               model_sha256=self.detector.sha256, zones=cfg.zones, lines=cfg.lines,
                               track_threshold=(active.thresholds if active else {}).get(
                                   "track_threshold", cfg.filters.track_threshold))
        queue = self._new_queue(self._detect_fn(self.detector), self._batchable(self.detector))
        tracks_out = None
        if cfg.tracks_file:
            from camera.mot import MotWriter

            tracks_out = MotWriter(cfg.tracks_file)
            log.info("writing person tracks (MOTChallenge text) to %s", cfg.tracks_file)
        gate = None
        if cfg.motion_enabled(src.live):
            m = cfg.motion
            gate = MotionGate(m.threshold, m.keepalive_s, pixel_threshold=m.pixel_threshold)
            log.info("motion gate on (threshold %.4f, keepalive %.1fs)", m.threshold, m.keepalive_s)
        # stats come from their own thread: a live source that is down (no frames) must still report it
        stats_thread = threading.Thread(target=self._stats_loop, name="stats", daemon=True)
        stats_thread.start()
        last_ts, size = time.time(), (0, 0)
        stats.start_clock()
        try:
            def process(frame: Frame, result: Result) -> None:
                """Everything after the detector, strictly in frame order."""
                if self._swap_pending is not None and frame is self._swap_pending[2]:
                    self._complete_swap(process, builder)  # the old model's last frames first
                h, w = frame.image.shape[:2]
                if result is not None:
                    stats.record_inference(result[1])
                    kept = apply_filters(result[0], cfg.filters, cfg.masks, w, h)
                    update = tracker.update(kept, frame.ts)
                    if self.sampler is not None:
                        self._sample(frame, kept, tracker.tracks)
                else:
                    stats.motion_skipped += 1
                    update = tracker.hold(frame.ts)
                self._follow_clock(builder)
                if self.updater is not None:
                    self.updater.observe(frame.image, None if result is None else len(result[0]),
                                         None if result is None else result[1])
                self._emit(builder.update(update, frame.ts, w, h))
                if tracks_out is not None:
                    tracks_out.write(frame.index + 1, builder.people(update.active))
                if self.summarizer is not None and self.summarizer.close_due(frame.ts):
                    self.publisher.notify()
                stats.frames_processed += 1
                stats.people = int(builder.counts["people"])
                if cfg.save_video:
                    self._write_video(frame.image, update.active, builder.counts)

            for submitted, frame in enumerate(src, start=1):
                if self.updater is not None and (swap := self.updater.take_swap()) is not None:
                    queue = self._swap_model(swap, queue, process, builder, frame)
                h, w = frame.image.shape[:2]
                if size != (w, h):
                    self._hint_input_size((w, h))
                    self._check_geometry((w, h))
                size, last_ts = (w, h), frame.ts
                for done, result in queue.put(frame, gate is None or gate.check(frame.image, frame.ts)):
                    process(done, result)
                if self._stop.is_set() or (cfg.max_frames and submitted >= cfg.max_frames):
                    break
                if self.publisher is not None:
                    self.publisher.check()  # a publisher that stopped ends the run, never silently
            for done, result in queue.drain():
                process(done, result)
            # end of stream, max_frames or signal: every open track ends now
            if size[0]:
                self._emit(builder.update(tracker.flush(last_ts), last_ts, *size))
                stats.people = int(builder.counts["people"])
            if self.summarizer is not None and self.summarizer.close_all():
                self.publisher.notify()
        except OutboxError as exc:
            log.error("%s: stopping (events already queued stay in the outbox)", exc)
            return EXIT_OUTBOX
        except PublisherError as exc:
            log.error("%s", exc)
            return EXIT_PUBLISHER
        finally:
            queue.close()
            if self._swap_pending is not None:
                self._swap_pending[1].close()
            if tracks_out is not None:
                tracks_out.close()
            self._stats_stop.set()
            stats_thread.join()
        self._sync_source_counters()
        return self._finish()

    def _warn_old_start_time(self) -> None:
        """Say at start when --start-time stamps events older than a sink accepts by default (it would
        dead-letter every one as too old while this run reports success)."""
        from contract.timestamps import DEFAULT_MAX_PAST_DAYS, format_ts

        start = self.cfg.start_epoch()
        if start is None:
            return
        age_days = (time.time() - start) / 86400.0
        if age_days > DEFAULT_MAX_PAST_DAYS:
            log.warning("--start-time %s is %.0f days ago: a sink with its default window (%.0f days) dead-letters "
                        "these events as too old; raise the sink's max_past_days (smartcam-sink --max-past-days) "
                        "or replay with a later --start-time", format_ts(start), age_days, DEFAULT_MAX_PAST_DAYS)

    def _check_geometry(self, frame_wh: tuple[int, int]) -> None:
        """Zones, lines and masks in pixels must lie in this camera's frame (known only once it delivers one)."""
        w, h = frame_wh
        for key, items in (("zones", self.cfg.zones), ("lines", self.cfg.lines), ("masks", self.cfg.masks)):
            for item in items:
                points = getattr(item, "points", None) or []
                if not points or max(max(p) for p in points) <= 1.0:
                    continue  # normalized: fits any frame
                outside = [p for p in points if p[0] > w or p[1] > h]
                if outside:
                    log.error("camera %s: %s.%s: point %s is outside its %dx%d frame (pixel coordinates; use 0..1 "
                              "to fit any resolution)", self.cfg.camera_id, key, getattr(item, "name", "?"),
                              outside[0], w, h)

    def _hint_input_size(self, frame_wh: tuple[int, int]) -> None:
        """Say when the model's input shape wastes much of the network on letterbox padding for this source."""
        from camera.detector import fitted_imgsz, padding_share

        imgsz = self.detector.imgsz
        share = padding_share(frame_wh, imgsz)
        better = fitted_imgsz(frame_wh, max(imgsz))
        if share > 0.2 and better[0] * better[1] < imgsz[0] * imgsz[1]:
            log.warning("model input %dx%d is %d %% padding for this %dx%d source: a %dx%d model sees the same "
                        "pixels %.1fx cheaper (smartcam-model build --imgsz %dx%d ...)", imgsz[0], imgsz[1],
                        round(share * 100), *frame_wh, *better, imgsz[0] * imgsz[1] / (better[0] * better[1]),
                        *better)

    def _stats_loop(self) -> None:
        """Stats every ``stats_interval_s``; in summary mode with a live source, also close windows by the clock,
        so a camera whose stream is down (no frames, so no event time) still sends what it saw."""
        interval = self.cfg.mqtt.stats_interval_s
        by_clock = self.summarizer is not None and self.source is not None and self.source.live
        next_stats = time.monotonic() + interval
        while not self._stats_stop.wait(min(1.0, interval)):
            try:
                self._follow_source()
                if by_clock and self.summarizer.close_due(time.time() - LATE_FRAME_GRACE_S):
                    self.publisher.notify()
                if time.monotonic() >= next_stats:
                    next_stats += interval
                    self._report_stats()
            except OutboxError as exc:
                log.error("%s", exc)  # the frame loop hits the same error on its next write and stops
            except Exception:  # noqa: BLE001 - health reporting must never take the camera down
                log.exception("stats report failed")

    def _follow_source(self) -> None:
        """A live source that is down makes this camera's retained status ``offline`` until it is back (the
        process and its other cameras carry on; stats say ``source_state`` reconnecting)."""
        src, pub = self.source, self.publisher
        if pub is None or src is None or not src.live:
            return
        status = "offline" if src.state == "reconnecting" else "online"
        if status != pub.status and not self._stop.is_set():
            if status == "offline":
                log.warning("%s: source down (%s): status offline until it is back", self.cfg.camera_id, src.name)
            else:
                log.info("%s: source back: status online", self.cfg.camera_id)
            pub.set_status(status)

    def _hold_for_clock(self) -> None:
        log.warning("the system clock says %s, before %s: it is not set (no real-time clock, no NTP yet?). Events "
                    "are kept in the outbox, flagged time_uncertain, and sent once it is set, their times corrected",
                    format_ts(time.time()), format_ts(self.clock.floor))
        self.publisher.paused.set()

    def _follow_clock(self, builder: Any) -> None:
        """Per frame (camera/clock.py): once the wall clock is set, shift what was stamped before and send it."""
        check = self.clock.check()
        if check.fixed_by_s is not None:
            if not self.source.live and self.cfg.start_time is None:  # a file's times run on from its start
                builder.clock_offset_s += check.fixed_by_s
            if self.outbox is not None:
                fixed = self.outbox.rewrite(lambda p: shift_event_times(p, check.fixed_by_s, self.clock.floor))
                log.info("corrected the times of %d queued message(s) by %+.0f s", fixed, check.fixed_by_s)
            if self.publisher is not None:
                self.publisher.paused.clear()
                self.publisher.notify()
        elif not check.plausible and self.publisher is not None and not self.publisher.paused.is_set():
            self._hold_for_clock()
        builder.time_uncertain = not check.plausible or builder.clock_offset_s != 0.0

    def _emit(self, events: list[dict]) -> None:
        if not events:
            return
        payloads = [json.dumps(ev, separators=(",", ":")) for ev in events]  # serialized once, used twice
        if self.summarizer is not None:
            self.summarizer.add(events, payloads)  # durable; sent as the window's summary when it closes
        elif self.outbox is not None:
            cfg = self.cfg
            rows = []
            for ev, payload in zip(events, payloads, strict=True):
                rows.extend((topic, payload, qos, retain) for topic, qos, retain in
                            topics_for_event(cfg.site, cfg.camera_id, ev))
            self.outbox.put_many(rows)  # durable before anything else sees the events
            self.publisher.notify()
        if self._events_fh is not None:
            self._events_fh.write("".join(p + "\n" for p in payloads))
            self._events_fh.flush()
        self.events_emitted += len(events)
        self.stats.events += len(events)

    def _write_video(self, image, tracks, counts) -> None:
        from camera.annotate import AnnotatedVideo, Annotator

        if self._video is None:
            h, w = image.shape[:2]
            fps = self.cfg.fps or self.source.fps or 10.0
            self._annotator = Annotator(self.cfg.zones, self.cfg.lines, self.cfg.masks)
            self._video = AnnotatedVideo(self.cfg.save_video, fps, (w, h))
            log.info("writing annotated video to %s (%dx%d @ %.1f fps)", self.cfg.save_video, w, h, fps)
        self._video.write(self._annotator.draw(image, tracks, counts))

    def _sync_source_counters(self) -> None:
        src = self.source
        self.stats.frames_in = src.frames_read
        self.stats.dropped_frames = src.dropped

    def stats_payload(self) -> dict[str, Any]:
        self._sync_source_counters()
        payload = self.stats.snapshot(
            site=self.cfg.site, camera_id=self.cfg.camera_id,
            outbox_depth=self.outbox.depth() if self.outbox else 0,
            outbox_dropped=self.outbox.dropped if self.outbox else 0,
            source_state=self.source.state, reconnects=self.source.reconnects)
        if self.detector is not None:  # which model detects now (over-the-air updates change it)
            active = self.updater.active if self.updater is not None else None
            payload["model"] = {"version": active.version if active else None, "name": self.detector.name,
                                "sha256": self.detector.sha256}
        if self.outbox is not None and self.publisher is not None:  # never silent: rows given up, drain restarts
            payload.update(outbox_dead_letters=self.outbox.dead_lettered,
                           publisher_restarts=self.publisher.drain_restarts)
        if self.sample_queue is not None:  # the learning loop's cost, visible per camera
            payload.update(samples_queued=self.samples_queued, samples_dropped=self.sample_queue.dropped,
                           samples_sent=self.publisher.samples_sent if self.publisher is not None else 0,
                           sample_queue_bytes=self.sample_queue.bytes)
        return payload


    def _report_stats(self) -> None:
        payload = self.stats_payload()
        log.info("stats: %.1f fps in, %.1f fps processed, inference p50 %.1f ms, people %d, outbox %d, "
                 "source %s, cpu %.0f%%", payload["input_fps"], payload["processed_fps"],
                 payload["inference_ms_p50"], payload["people"], payload["outbox_depth"],
                 payload["source_state"], payload["cpu_percent"])
        if self.publisher is not None and self.clock.plausible:  # a 1970 ts would only be dead-lettered
            self.publisher.publish_now("stats", json.dumps(payload, separators=(",", ":")), qos=0)

    # ------------------------------------------------------------------ wind-down
    def _finish(self) -> int:
        s = self.stats
        log.info("done: %d frames processed (%d read, %d dropped, %d motion-skipped), %d events, %.1f fps, "
                 "inference p50/p95 %.1f/%.1f ms (camera %s)", s.frames_processed, s.frames_in, s.dropped_frames,
                 s.motion_skipped, self.events_emitted, s.overall_fps(), *s.inference_percentiles(),
                 self.cfg.camera_id)
        if self.publisher is None:
            return EXIT_OK
        self._report_stats()
        timeout = min(self.cfg.drain_timeout_s, SIGNAL_DRAIN_S) if self.stopped_by_signal else self.cfg.drain_timeout_s
        remaining = self.publisher.wait_drained(timeout)
        if self.publisher.error is not None:
            log.error("%s", self.publisher.error)
            return EXIT_PUBLISHER if isinstance(self.publisher.error, PublisherError) else EXIT_OUTBOX
        if remaining:
            log.error("%d message(s) not %s after %.0fs; they stay in the outbox %s and are replayed on the next "
                      "start", remaining, "confirmed by the sink" if self.cfg.publish.confirm == "sink"
                      else "acknowledged by the broker", timeout, self.outbox.path)
            return EXIT_OK if self.stopped_by_signal else EXIT_UNDRAINED
        dead = self.outbox.dead_lettered - self._dead_at_start
        if dead:
            log.error("%d outbox row(s) became dead letters during this run (the broker rejected them %d times): "
                      "not delivered, kept in %s; list them with smartcam-edge outbox dead-letters --outbox %s",
                      dead, self.cfg.outbox.max_rejections, self.outbox.path, self.outbox.path)
            return EXIT_OK if self.stopped_by_signal else EXIT_UNDRAINED
        log.info("outbox drained: every event %s", "confirmed by the sink" if self.cfg.publish.confirm == "sink"
                 else "acknowledged by the broker")
        return EXIT_OK

    def close(self) -> None:
        """Release everything (idempotent); publishes ``offline``."""
        if self._metrics_server is not None:
            self._metrics_server.shutdown()
            self._metrics_server = None
        if self.updater is not None:
            self.updater.stop()
        if self.publisher is not None:
            self.publisher.stop()
            self.publisher = None
        if self.outbox is not None:
            self.outbox.close()
        if self.sample_queue is not None:
            self.sample_queue.close()
            self.sample_queue = None
        if self._video is not None:
            self._video.close()
            self._video = None
        if self._events_fh is not None and self._events_fh is not sys.stdout:
            self._events_fh.close()
        self._events_fh = None
        if self.source is not None:
            self.source.close()

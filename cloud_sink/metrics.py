"""Prometheus metrics of the sink, served on ``/metrics`` next to the API (prometheus-client's own exposition).

Two kinds: what ingest counts as it goes (:class:`SinkMetrics`: messages, events, dead letters by reason, commit
latency, database errors and retries) and what is read at scrape time: the archive follower's lag
(:class:`ArchiveCollector`) and the database
(:class:`StoreCollector`: per camera the age of its newest event or stats, online or not, outbox depth and
fps from its latest stats). A ``smartcam-sink serve`` process has only the second kind; an ingest worker both.
Each sink has its own registry, so two in one process (tests) never collide.

Dead-letter reasons are free text (``batch line 3: 'ts' is a required property``); the ``reason`` label is the
kind of problem (:func:`reason_class`), so the number of series stays small whatever the payloads say.

>>> reason_class("batch line 3: schema: 'ts' is a required property"), reason_class("invalid JSON: Expecting value")
('schema', 'json')
>>> m = SinkMetrics(); m.dead_letters.labels("json").inc(); b"smartcam_sink_dead_letters_total" in m.exposition()
True
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

#: (label, pattern) in order: the first match names the kind of a dead letter's reason.
REASON_CLASSES = (
    ("conflict", r"^conflict"),  # an event id already stored with other content
    ("size", r"exceeds|larger than"),
    ("database", r"database"),
    ("batch", r"^batch |zlib"),
    ("version", r"schema_version"),
    ("time", r"timestamp|in the future|in the past"),
    ("json", r"JSON|UTF-8|not bytes"),
    ("topic", r"topic"),
    ("schema", r"^schema:|^summary:|must be"),
)
_REASON_RES = [(label, re.compile(pattern, re.IGNORECASE)) for label, pattern in REASON_CLASSES]


def reason_class(reason: str) -> str:
    """The kind of problem a dead letter's reason describes (a bounded label value)."""
    text = re.sub(r"^batch line \d+: ", "", reason or "")
    return next((label for label, rx in _REASON_RES if rx.search(text)), "other")


class SinkMetrics:
    """Counters an ingest worker updates; :meth:`exposition` is what ``/metrics`` serves."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.messages = Counter("smartcam_sink_messages", "MQTT items received (a batch message counts once per "
                                "event line)", registry=r)
        self.events = Counter("smartcam_sink_events_stored", "Events stored for the first time", registry=r)
        self.duplicates = Counter("smartcam_sink_duplicates", "Events received again and dropped (exactly once)",
                                  registry=r)
        self.summaries = Counter("smartcam_sink_summaries_stored", "Summary messages stored for the first time",
                                 registry=r)
        self.dead_letters = Counter("smartcam_sink_dead_letters", "Payloads refused and kept as dead letters, by "
                                    "kind of reason", ["reason"], registry=r)
        self.commit_seconds = Histogram("smartcam_sink_batch_commit_seconds", "Time to validate and commit one "
                                        "batch to the database", registry=r,
                                        buckets=(.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10))
        self.db_errors = Counter("smartcam_sink_database_errors", "Database failures: unavailable (batch kept "
                                 "unacknowledged and retried) or rejected (stored one by one)", ["kind"], registry=r)
        self.db_retries = Counter("smartcam_sink_database_retries", "Batch commits retried after the database "
                                  "was unavailable", registry=r)
        # every series exists from the start at 0: increase()/rate() see the first dead letter or error (a
        # counter that appears at 1 has no earlier sample to differ from)
        for kind in ("unavailable", "rejected"):
            self.db_errors.labels(kind)
        for label in [*(label for label, _ in REASON_CLASSES), "other"]:
            self.dead_letters.labels(label)

    def batch(self, result: Any, seconds: float) -> None:
        """One committed batch (a cloud_sink.ingest.BatchResult)."""
        self.commit_seconds.observe(seconds)
        self.messages.inc(result.received)
        self.events.inc(result.stored)
        self.duplicates.inc(result.duplicates)
        self.summaries.inc(result.summaries)
        for reason in result.reasons:
            self.dead_letters.labels(reason_class(reason)).inc()

    def watch_archive(self, follower: Any) -> None:
        """Export the archive follower's progress (cloud_sink/archive_follower.py) with the ingest counters."""
        self.registry.register(ArchiveCollector(follower))

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


class ArchiveCollector(Collector):
    """The archive follower at each scrape: how many stored events it has not archived yet (its lag), what it
    wrote and how often a round failed (each is retried with backoff)."""

    def __init__(self, follower: Any) -> None:
        self.follower = follower

    def collect(self) -> Iterator[Metric]:
        lag = GaugeMetricFamily("smartcam_sink_archive_lag_events", "Stored events not in the archive yet")
        lag.add_metric([], float(self.follower.pending()))
        archived = CounterMetricFamily("smartcam_sink_archive_events", "Events written to the archive")
        archived.add_metric([], float(self.follower.stats.archived))
        failures = CounterMetricFamily("smartcam_sink_archive_failures", "Archive rounds that failed (retried)")
        failures.add_metric([], float(self.follower.stats.failures))
        yield from (lag, archived, failures)


class StoreCollector(Collector):
    """Per-camera gauges read from the database at each scrape (so ``serve`` has them too)."""

    def __init__(self, store: Any) -> None:
        self.store = store

    def collect(self) -> Iterator[Metric]:
        now = time.time()
        labels = ["site", "camera"]
        age = GaugeMetricFamily("smartcam_camera_last_seen_age_seconds", "Seconds since the camera's newest event "
                                "or stats (capture time)", labels=labels)
        online = GaugeMetricFamily("smartcam_camera_online", "1 while the camera's retained status is online",
                                   labels=labels)
        depth = GaugeMetricFamily("smartcam_camera_outbox_depth", "Messages waiting in the camera's outbox (its "
                                  "latest stats)", labels=labels)
        fps = GaugeMetricFamily("smartcam_camera_processed_fps", "Frames per second the camera processed (its "
                                "latest stats)", labels=labels)
        events = GaugeMetricFamily("smartcam_camera_events_stored", "Events stored for the camera", labels=labels)
        dead = GaugeMetricFamily("smartcam_sink_dead_letters_stored", "Dead letters kept in the database")
        from contract.timestamps import parse_ts

        for cam in self.store.cameras():
            key = [cam["site"], cam["camera_id"]]
            if cam["last_seen"]:
                age.add_metric(key, max(0.0, now - parse_ts(cam["last_seen"])))
            online.add_metric(key, 1.0 if cam["state"] == "online" else 0.0)
            stats = cam.get("stats") or {}
            if "outbox_depth" in stats:
                depth.add_metric(key, float(stats["outbox_depth"]))
            if cam.get("fps") is not None:
                fps.add_metric(key, float(cam["fps"]))
            events.add_metric(key, float(cam["events_total"] or 0))
        dead.add_metric([], float(self.store.dead_letter_count()))
        yield from (age, online, depth, fps, events, dead)


def registry_for(store: Any, metrics: SinkMetrics | None = None) -> CollectorRegistry:
    """The registry ``/metrics`` serves: the ingest counters (if this process ingests) + the store's gauges."""
    registry = metrics.registry if metrics is not None else CollectorRegistry()
    registry.register(StoreCollector(store))
    return registry

"""Prometheus metrics of the edge on ``http://HOST:PORT/metrics`` (``metrics: {listen: 127.0.0.1:9108}``, off by
default): the runtime counters the ``stats`` message carries, read at scrape time from the running pipeline.

A collector, not counters updated in the frame loop: the loop stays as it is, and a scrape reads the same numbers
the stats thread reports (``RuntimeStats``, the source, the outbox, the publisher). Every series carries the
camera's ``site`` and ``camera`` labels, so one Prometheus can scrape many cameras and the sink with one job each.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

log = logging.getLogger(__name__)


class MetricsError(ValueError):
    """The metrics endpoint cannot listen where it was asked to (one line)."""


class EdgeCollector(Collector):
    """Reads an EdgeRunner (camera/pipeline.py) at each scrape."""

    def __init__(self, runner: Any) -> None:
        self.runner = runner

    def collect(self) -> Iterator[Metric]:
        r = self.runner
        cfg, stats, src = r.cfg, r.stats, r.source
        names, values = ["site", "camera"], [cfg.site, cfg.camera_id]

        def counter(name: str, doc: str, value: float) -> CounterMetricFamily:
            m = CounterMetricFamily(f"smartcam_edge_{name}", doc, labels=names)
            m.add_metric(values, value)
            return m

        def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
            m = GaugeMetricFamily(f"smartcam_edge_{name}", doc, labels=names)
            m.add_metric(values, value)
            return m

        yield counter("frames_read", "Frames read from the source (dropped ones included)",
                      src.frames_read if src is not None else 0)
        yield counter("frames_dropped", "Frames dropped to keep up with real time or --fps",
                      src.dropped if src is not None else 0)
        yield counter("frames_processed", "Frames through the pipeline (detector or motion hold)",
                      stats.frames_processed)
        yield counter("frames_detected", "Frames the detector ran on", stats.frames_detected)
        yield counter("motion_skipped", "Frames the motion gate let skip the detector", stats.motion_skipped)
        yield counter("events", "Events produced", stats.events)
        yield counter("source_reconnects", "Times a live source was reopened", src.reconnects if src else 0)
        yield gauge("people", "People in view now", stats.people)
        yield gauge("processed_fps", "Frames processed per second since the start", stats.overall_fps())
        p50, p95 = stats.inference_percentiles()
        q = GaugeMetricFamily("smartcam_edge_inference_milliseconds", "Detector latency over the last inferences",
                              labels=[*names, "quantile"])
        q.add_metric([*values, "0.5"], p50)
        q.add_metric([*values, "0.95"], p95)
        yield q
        up = GaugeMetricFamily("smartcam_edge_source_up", "1 while the source is connected (state: connected, reconnecting, ended)",
                               labels=[*names, "state"])
        state = src.state if src is not None else "opening"
        up.add_metric([*values, state], 1.0 if state == "connected" else 0.0)
        yield up
        if r.outbox is not None:
            yield gauge("outbox_depth", "Messages waiting in the durable outbox for the broker's ack",
                        r.outbox.depth())
            yield counter("outbox_dropped", "Outbox rows dropped because the outbox was full", r.outbox.dropped)
        if r.publisher is not None:
            yield gauge("mqtt_connected", "1 while connected to the broker", float(r.publisher.connected.is_set()))
            yield counter("published", "Outbox rows acknowledged by the broker", r.publisher.published)


def serve_metrics(runner: Any, listen: str) -> Any:
    """Start the ``/metrics`` HTTP server in a daemon thread; returns it (call ``.shutdown()`` to stop)."""
    host, _, port = listen.rpartition(":")
    registry = CollectorRegistry()
    registry.register(EdgeCollector(runner))
    try:
        server, _thread = start_http_server(int(port), addr=host.strip("[]"), registry=registry)
    except OSError as exc:
        raise MetricsError(f"cannot serve metrics on {listen}: {(exc.strerror or str(exc)).lower()}") from None
    log.info("Prometheus metrics on http://%s/metrics", listen)
    return server

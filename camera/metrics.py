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
    """Reads the EdgeRunners (camera/pipeline.py) of this process at each scrape: one sample per camera."""

    def __init__(self, runners: Any) -> None:
        self.runners = list(runners) if isinstance(runners, (list, tuple)) else [runners]

    def collect(self) -> Iterator[Metric]:
        families: dict[str, Metric] = {}

        def family(kind: type, name: str, doc: str, labels: list[str]) -> Metric:
            if name not in families:
                families[name] = kind(name, doc, labels=labels)
            return families[name]

        for r in self.runners:
            self._add(r, family)
        yield from families.values()

    @staticmethod
    def _add(r: Any, family: Any) -> None:
        cfg, stats, src = r.cfg, r.stats, r.source
        names, values = ["site", "camera"], [cfg.site, cfg.camera_id]

        def counter(name: str, doc: str, value: float) -> None:
            family(CounterMetricFamily, f"smartcam_edge_{name}", doc, names).add_metric(values, value)

        def gauge(name: str, doc: str, value: float) -> None:
            family(GaugeMetricFamily, f"smartcam_edge_{name}", doc, names).add_metric(values, value)

        counter("frames_read", "Frames read from the source (dropped ones included)",
                src.frames_read if src is not None else 0)
        counter("frames_dropped", "Frames dropped to keep up with real time or --fps",
                src.dropped if src is not None else 0)
        counter("frames_processed", "Frames through the pipeline (detector or motion hold)", stats.frames_processed)
        counter("frames_detected", "Frames the detector ran on", stats.frames_detected)
        counter("motion_skipped", "Frames the motion gate let skip the detector", stats.motion_skipped)
        counter("events", "Events produced", stats.events)
        counter("source_reconnects", "Times a live source was reopened", src.reconnects if src else 0)
        gauge("people", "People in view now", stats.people)
        gauge("processed_fps", "Frames processed per second since the start", stats.overall_fps())
        p50, p95 = stats.inference_percentiles()
        q = family(GaugeMetricFamily, "smartcam_edge_inference_milliseconds",
                   "Detector latency over the last inferences", [*names, "quantile"])
        q.add_metric([*values, "0.5"], p50)
        q.add_metric([*values, "0.95"], p95)
        state = src.state if src is not None else "opening"
        family(GaugeMetricFamily, "smartcam_edge_source_up",
               "1 while the source is connected (state: connected, reconnecting, ended)",
               [*names, "state"]).add_metric([*values, state], 1.0 if state == "connected" else 0.0)
        if r.outbox is not None:
            gauge("outbox_depth", "Messages waiting in the durable outbox for the broker's ack", r.outbox.depth())
            counter("outbox_dropped", "Outbox rows dropped because the outbox was full", r.outbox.dropped)
        if r.publisher is not None:
            gauge("mqtt_connected", "1 while connected to the broker", float(r.publisher.connected.is_set()))
            counter("published", "Outbox rows acknowledged by the broker", r.publisher.published)


def serve_metrics(runner: Any, listen: str) -> Any:
    """Start the ``/metrics`` HTTP server in a daemon thread; returns it (call ``.shutdown()`` to stop).
    ``runner``: one EdgeRunner, or the list of a multi-camera process's."""
    host, _, port = listen.rpartition(":")
    registry = CollectorRegistry()
    registry.register(EdgeCollector(runner))
    try:
        server, _thread = start_http_server(int(port), addr=host.strip("[]"), registry=registry)
    except OSError as exc:
        raise MetricsError(f"cannot serve metrics on {listen}: {(exc.strerror or str(exc)).lower()}") from None
    log.info("Prometheus metrics on http://%s/metrics", listen)
    return server

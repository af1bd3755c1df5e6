"""Runtime counters of the edge: frame rates, inference latency percentiles, skipped/dropped frames, CPU.

No psutil on the edge: CPU % comes from ``os.times()`` (user + system time of this process and its threads)
over wall time, so 100 % = one core busy.

>>> s = RuntimeStats()
>>> for ms in (10, 20, 30): s.record_inference(ms)
>>> s.inference_percentiles()
(20.0, 29.0)
"""

from __future__ import annotations

import os
import threading
import time
from collections import deque
from typing import Any

import numpy as np

from contract.schema import SCHEMA_VERSION
from contract.timestamps import format_ts


class CpuMeter:
    """CPU use of this process between two calls, in percent of one core."""

    def __init__(self) -> None:
        self._last = self._sample()

    @staticmethod
    def _sample() -> tuple[float, float]:
        t = os.times()
        return t.user + t.system, time.monotonic()

    def percent(self) -> float:
        cpu, wall = self._sample()
        d_cpu, d_wall = cpu - self._last[0], wall - self._last[1]
        self._last = (cpu, wall)
        return max(0.0, 100.0 * d_cpu / d_wall) if d_wall > 0 else 0.0


class RuntimeStats:
    """Counters updated by the frame loop; :meth:`snapshot` turns them into a stats.v1 message."""

    def __init__(self, window: int = 500) -> None:
        self.frames_in = 0  # frames read from the source (including dropped ones)
        self.frames_processed = 0  # frames that went through the loop (detector or motion hold)
        self.frames_detected = 0  # frames on which the detector ran
        self.motion_skipped = 0
        self.dropped_frames = 0
        self.events = 0
        self.people = 0
        self._inference_ms: deque[float] = deque(maxlen=window)
        self._lock = threading.Lock()  # snapshots are taken from the stats thread while the loop records
        self._cpu = CpuMeter()
        self._started = time.monotonic()
        self._last_snapshot = (self._started, 0, 0)

    def start_clock(self) -> None:
        """Start the rate clocks now (the first frame), so model loading does not count against fps."""
        self._started = time.monotonic()
        self._last_snapshot = (self._started, self.frames_in, self.frames_processed)

    def record_inference(self, ms: float) -> None:
        with self._lock:
            self.frames_detected += 1
            self._inference_ms.append(float(ms))

    def inference_percentiles(self) -> tuple[float, float]:
        """(p50, p95) in ms over the last ``window`` inferences; zeros before the first."""
        with self._lock:
            values = np.fromiter(self._inference_ms, float, count=len(self._inference_ms))
        if not values.size:
            return 0.0, 0.0
        p50, p95 = np.percentile(values, [50, 95])
        return round(float(p50), 2), round(float(p95), 2)

    def elapsed(self) -> float:
        return time.monotonic() - self._started

    def overall_fps(self) -> float:
        """Frames processed per second since start."""
        dt = self.elapsed()
        return self.frames_processed / dt if dt > 0 else 0.0

    def snapshot(self, *, site: str, camera_id: str, outbox_depth: int, outbox_dropped: int, source_state: str,
                 reconnects: int) -> dict[str, Any]:
        """A stats.v1 payload; rates are over the time since the previous snapshot."""
        now = time.monotonic()
        t0, in0, proc0 = self._last_snapshot
        dt = max(now - t0, 1e-6)
        self._last_snapshot = (now, self.frames_in, self.frames_processed)
        p50, p95 = self.inference_percentiles()
        return {
            "schema_version": SCHEMA_VERSION,
            "ts": format_ts(time.time()),
            "site": site,
            "camera_id": camera_id,
            "input_fps": round((self.frames_in - in0) / dt, 2),
            "processed_fps": round((self.frames_processed - proc0) / dt, 2),
            "inference_ms_p50": p50,
            "inference_ms_p95": p95,
            "frames_in": self.frames_in,
            "frames_processed": self.frames_processed,
            "motion_skipped": self.motion_skipped,
            "dropped_frames": self.dropped_frames,
            "outbox_depth": outbox_depth,
            "outbox_dropped": outbox_dropped,
            "cpu_percent": round(self._cpu.percent(), 1),
            "source_state": source_state,
            "reconnects": reconnects,
            "people": self.people,
        }

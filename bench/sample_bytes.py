"""Bytes the learning loop's sampled frames cost per camera-day at the default rates (issue 15), measured.

Runs the edge's own path on real frames of a clip: detector -> filters -> tracker -> :class:`camera.sampler.Sampler`
-> :func:`camera.sampler.build_sample` (masks from the clip's config, resized to the default ``max_side``, JPEG at
the default quality, the ``sample.v1`` header with its detections), and measures every message that would go to
``.../sample``: topic + payload + MQTT overhead. Only the rate limits are lifted and the random baseline raised,
so a 21-s clip yields enough samples for a mean; what one sample costs does not depend on how many are chosen.

Per camera-day at the defaults (2/min, 30/h, 200/day): the day bucket binds whenever a scene offers at least 200
candidates a day, and the random baseline alone offers ``random_probability x fps x 86400`` (0.0005 x 5 x 86400 =
216 at the edge's 5 fps), so a camera sends 200 samples a day: bytes/day = 200 x the mean message.

    .venv/bin/python bench/bytes_published.py --modes samples        # this row only, every clip
"""

from __future__ import annotations

import math
import statistics
from pathlib import Path
from typing import Any

import cv2

from camera.sampler import SamplesSpec

SAMPLE_TCP_SEGMENT = 1448  # payload bytes per TCP segment (MSS 1460 - 12 bytes of timestamps)
SAMPLE_TCP_SEGMENT_OVERHEAD = 52  # IPv4 20 + TCP 32 per segment
PROBE_RANDOM = 0.05  # raised random baseline while measuring: ordinary frames as well as hard ones


def samples_per_day(spec: SamplesSpec) -> int:
    """The most the token buckets let through in a day (the day bucket, unless the hour or minute one is tighter)."""
    return min(spec.per_day, spec.per_hour * 24, spec.per_minute * 1440)


def random_offered_per_day(spec: SamplesSpec, fps: float) -> float:
    """Random-baseline candidates a day at ``fps`` processed frames a second, before the buckets."""
    return spec.random_probability * fps * 86400


def measure_samples(clip: Path, model: Path, config: Path | None, fps: float, mqtt_overhead: int,
                    tcp_overhead: int, site: str = "bench", camera: str = "cam-1") -> dict[str, Any]:
    """Every sample the edge's sampler picks on ``clip`` (processed at ``fps``), encoded as the edge encodes it."""
    from camera.config import load_config
    from camera.detector import Detector
    from camera.filters import apply_filters
    from camera.frame import Frame
    from camera.sampler import Sampler, build_sample
    from camera.tracker import Tracker
    from contract.sample import SAMPLE_LEAF
    from contract.topics import topic_for

    cfg = load_config(config, overrides={"source": str(clip), "model": str(model), "camera_id": camera,
                                         "site": site})
    default = SamplesSpec()
    spec = default.model_copy(update={"enabled": True, "per_minute": 10**6, "per_hour": 10**6, "per_day": 10**6,
                                      "track_gap_s": 3.0, "random_probability": PROBE_RANDOM, "seed": 0})
    det = Detector(model, conf=cfg.detector.conf, iou=cfg.detector.iou, classes=("person",))
    tracker, sampler = Tracker(cfg.tracker), Sampler(spec)
    topic = len(topic_for(site, camera, SAMPLE_LEAF).encode())
    cap = cv2.VideoCapture(str(clip))
    video_fps = cap.get(cv2.CAP_PROP_FPS) or 25.0
    step, idx, processed = video_fps / fps, 0, 0
    sizes: list[int] = []
    reasons: dict[str, int] = {}
    try:
        next_at = 0.0
        while True:
            ok, image = cap.read()
            if not ok:
                break
            if idx + 1e-9 >= next_at:
                next_at += step
                frame = Frame(image, idx / video_fps, idx)
                h, w = image.shape[:2]
                kept = apply_filters(det.detect(image), cfg.filters, cfg.masks, w, h)
                tracker.update(kept, frame.ts)
                processed += 1
                for cand in sampler.observe(frame, kept, tracker.tracks):
                    payload = build_sample(cand, site=site, camera_id=camera, model_name=det.name,
                                           model_sha256=det.sha256, names=det.names, spec=spec, masks=cfg.masks,
                                           conf=cfg.detector.conf)
                    sizes.append(topic + len(payload))
                    reasons[cand.reason] = reasons.get(cand.reason, 0) + 1
            idx += 1
    finally:
        cap.release()
    if not sizes:
        raise SystemExit(f"{clip.name}: the sampler chose no frame")
    mean = statistics.fmean(sizes)
    mqtt = mean + mqtt_overhead
    wire = mqtt + tcp_overhead + SAMPLE_TCP_SEGMENT_OVERHEAD * (math.ceil(mean / SAMPLE_TCP_SEGMENT) - 1)
    per_day = samples_per_day(default)
    return {"clip": clip.name, "frames_processed": processed, "samples": len(sizes), "reasons": reasons,
            "max_side": default.max_side, "jpeg_quality": default.jpeg_quality, "masks": len(cfg.masks),
            "mean_message_bytes": round(mean), "min_message_bytes": min(sizes), "max_message_bytes": max(sizes),
            "samples_per_day": per_day, "random_offered_per_day": round(random_offered_per_day(default, fps)),
            "mqtt_bytes_per_day": mqtt * per_day, "wire_bytes_per_day_est": wire * per_day}


def as_row(r: dict[str, Any], video_s: float, video_bytes: int) -> dict[str, Any]:
    """The measurement as a row of bytes_published's table (per hour = per day / 24)."""
    per_h = r["samples_per_day"] / 24
    mqtt_h, wire_h = r["mqtt_bytes_per_day"] / 24, r["wire_bytes_per_day_est"] / 24
    video_h = video_bytes / video_s * 3600
    return {"clip": r["clip"], "mode": "samples", "loops": 1, "duration_s": video_s, "video_bytes": video_bytes,
            "events": r["samples"], "people": 0, "fixed_bytes": 0, "bytes_per_person": None,
            "messages": {"sample": r["samples"]}, "topic_payload_bytes": {"sample": r["mean_message_bytes"] * per_h},
            "mqtt_bytes": None, "video_bytes_per_hour": video_h, "mqtt_bytes_per_hour": mqtt_h,
            "wire_bytes_per_hour_est": wire_h, "ratio": video_h / mqtt_h, "ratio_wire_est": video_h / wire_h,
            "sample_detail": r}


def table(rows: list[dict[str, Any]]) -> str:
    """Markdown: what one sample costs and what a camera-day of them costs at the default rates."""
    lines = ["| clip | frames processed | samples measured (reasons) | mean B/sample (min-max) | samples/day "
             "(defaults) | MB/camera-day | with TCP/IP est. MB/day |", "| --- |" + " ---: |" * 6]
    for r in rows:
        why = ", ".join(f"{k} {v}" for k, v in sorted(r["reasons"].items()))
        lines.append(f"| {r['clip']} | {r['frames_processed']} | {r['samples']} ({why}) | "
                     f"{r['mean_message_bytes']:,} ({r['min_message_bytes']:,}-{r['max_message_bytes']:,}) | "
                     f"{r['samples_per_day']:.0f} | {r['mqtt_bytes_per_day'] / 1e6:.2f} | "
                     f"{r['wire_bytes_per_day_est'] / 1e6:.2f} |")
    return "\n".join(lines)

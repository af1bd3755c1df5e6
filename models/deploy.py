"""Delivery of registry models to cameras over MQTT: ``smartcam-model deploy`` and ``rollback``.

A deployment is a retained, QoS 1 *desired model* document (``contract/model_docs.py``) per camera or per site:
a camera offline at deploy time gets it when it reconnects, a camera that joins later gets its site's. A staged
rollout (``--canary N``) sends to N cameras first, watches their retained ``model/reported`` documents (and
their stats) for ``--watch-s`` seconds, then sends to the rest, or aborts: the canaries' previous desired
documents are put back and the command exits non-zero.

The cameras decide for themselves whether a model is safe (signature, sha256, health check, probation); this
side only says what should run and reads what happened.
"""

from __future__ import annotations

import json
import logging
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from contract.broker import BrokerSettings, make_client
from contract.model_docs import (
    FAILED_STATES,
    camera_desired_topic,
    desired_document,
    effective_desired,
    reported_topic,
    site_desired_topic,
)
from contract.timestamps import format_ts
from contract.topics import TOPIC_ROOT, is_valid_name, parse_topic
from models.registry import Registry

log = logging.getLogger(__name__)

Say = Callable[[str], None]


class DeployError(RuntimeError):
    """A deployment that cannot start or was aborted (one-line message)."""


def new_deployment_id(now_s: float | None = None) -> str:
    """``d-20260101T120000Z-1a2b3c``: sortable by time, unique enough for humans and retained documents."""
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(time.time() if now_s is None else now_s))
    return f"d-{stamp}-{secrets.token_hex(3)}"


@dataclass
class _Channel:
    """One short-lived MQTT connection of the deploy tool: reads retained documents, publishes, watches."""

    settings: BrokerSettings
    client_id: str
    messages: dict[str, bytes] = field(default_factory=dict)  # topic -> latest payload ("" = cleared)
    changed: threading.Condition = field(default_factory=threading.Condition)

    def __post_init__(self) -> None:
        self.client = make_client(self.settings, self.client_id)
        self.client.on_message = self._on_message
        self._connected = threading.Event()
        self.client.on_connect = lambda c, u, f, rc, p: None if rc.is_failure else self._connected.set()

    def _on_message(self, client, userdata, msg) -> None:
        with self.changed:
            self.messages[msg.topic] = bytes(msg.payload)
            self.changed.notify_all()

    def __enter__(self) -> _Channel:
        try:
            self.client.connect(self.settings.host, self.settings.port, keepalive=30)
        except OSError as exc:
            raise DeployError(f"cannot reach broker {self.settings.redacted()}: {exc}") from None
        self.client.loop_start()
        if not self._connected.wait(10):
            self.client.loop_stop()
            raise DeployError(f"broker {self.settings.redacted()} did not accept the connection")
        return self

    def __exit__(self, *exc: Any) -> None:
        self.client.disconnect()
        self.client.loop_stop()

    def subscribe(self, *patterns: str, settle_s: float = 1.0) -> None:
        """Subscribe and give the broker ``settle_s`` to deliver the retained messages."""
        for pattern in patterns:
            self.client.subscribe(pattern, qos=1)
        time.sleep(settle_s)

    def doc(self, topic: str) -> dict[str, Any] | None:
        raw = self.messages.get(topic)
        if not raw:
            return None
        try:
            return json.loads(raw)
        except ValueError:
            log.warning("ignoring a retained document on %s that is not JSON", topic)
            return None

    def publish(self, topic: str, doc: dict[str, Any] | None) -> None:
        """Retained, QoS 1, waits for the broker's PUBACK; ``None`` clears the retained document."""
        payload = b"" if doc is None else json.dumps(doc, separators=(",", ":")).encode()
        info = self.client.publish(topic, payload, qos=1, retain=True)
        info.wait_for_publish(10)
        if not info.is_published():
            raise DeployError(f"broker did not acknowledge the document on {topic}")


def _discover_cameras(ch: _Channel, site: str) -> list[str]:
    """Cameras of a site that the broker knows about (their retained status or reported documents)."""
    cams = set()
    for topic in ch.messages:
        parsed = parse_topic(topic)
        if parsed and parsed[0] == site and parsed[2] in ("status", "model/reported") and is_valid_name(parsed[1]):
            cams.add(parsed[1])
    return sorted(cams)


def _camera_verdict(reported: dict[str, Any] | None, version: str, deployment: str) -> tuple[str, str]:
    """("ok" | "failed" | "pending", what to print) for one canary's latest reported document."""
    if reported is None or reported.get("version") != version:
        return "pending", "no report yet"
    state, reason = reported.get("state"), reported.get("reason")
    if state in FAILED_STATES and reported.get("deployment") in (deployment, None):
        return "failed", f"{state}: {reason}"
    if state == "active":
        return "ok", "active"
    return "pending", str(state)


def deploy(registry: Registry, version: str, settings: BrokerSettings, site: str, cameras: list[str] | None = None,
           *, canary: int = 0, watch_s: float = 60.0, max_failures: int = 0, url_base: str | None = None,
           url_expires_s: int | None = None, say: Say = print) -> int:
    """Publish ``version`` as the desired model; returns 0 when sent (and the canaries passed), 1 on abort."""
    if not is_valid_name(site) or any(not is_valid_name(c) for c in cameras or []):
        raise DeployError("site and camera names must be 1-64 chars of A-Z a-z 0-9 _ . -")
    entry = registry.entry(version)
    kwargs = {"expires_s": url_expires_s} if url_expires_s else {}
    url = registry.model_url(version, url_base=url_base, **kwargs)
    deployment = new_deployment_id()
    with _Channel(settings, f"smartcam-deploy-{deployment}") as ch:
        ch.subscribe(f"{TOPIC_ROOT}/{site}/+/status", f"{TOPIC_ROOT}/{site}/+/model/#",
                     site_desired_topic(site), f"{TOPIC_ROOT}/{site}/+/stats")
        site_doc = ch.doc(site_desired_topic(site))
        targets = list(cameras or [])
        if canary and not targets:
            targets = _discover_cameras(ch, site)
            if not targets:
                raise DeployError(f"--canary: no cameras of site {site!r} known to the broker (pass --camera)")
        say(f"deployment {deployment}: {version} ({entry['manifest']['sha256'][:12]}) to site {site}"
            + (f", cameras {', '.join(targets)}" if targets else ", every camera"))

        def send(cams: list[str]) -> None:
            for cam in cams:
                topic = camera_desired_topic(site, cam)
                prev = effective_desired(ch.doc(topic), site_doc)
                ch.publish(topic, desired_document(deployment=deployment, url=url, entry=entry,
                                                   issued_s=time.time(), previous=prev))
                say(f"  sent to {site}/{cam}")

        if canary:
            canaries, rest = targets[:canary], targets[canary:]
            before = {cam: ch.messages.get(camera_desired_topic(site, cam), b"") for cam in canaries}
            say(f"canary: {', '.join(canaries)}; watching {watch_s:.0f} s (abort after more than {max_failures} "
                "failure(s))")
            send(canaries)
            failures = _watch(ch, site, canaries, version, deployment, watch_s, max_failures, say)
            if len(failures) > max_failures:
                for cam in canaries:  # put back exactly what each canary had (or nothing)
                    raw = before[cam]
                    ch.publish(camera_desired_topic(site, cam), json.loads(raw) if raw else None)
                say(f"ABORTED: {len(failures)} canary failure(s): "
                    + "; ".join(f"{c}: {why}" for c, why in failures.items())
                    + f". Previous desired model restored on {', '.join(canaries)}; {len(rest)} camera(s) "
                    "never received it.")
                return 1
            say(f"canary passed ({len(canaries) - len(failures)}/{len(canaries)} ok): rolling out")
            targets = rest
        if targets:
            send(targets)
        if not cameras:  # the site's model: cameras that join later get it too
            ch.publish(site_desired_topic(site), desired_document(deployment=deployment, url=url, entry=entry,
                                                                  issued_s=time.time(), previous=site_doc))
            say(f"  sent to site {site} (every camera, also those that join later)")
    say(f"deployed {version} as {deployment}")
    return 0


def _watch(ch: _Channel, site: str, canaries: list[str], version: str, deployment: str, watch_s: float,
           max_failures: int, say: Say) -> dict[str, str]:
    """Print the canaries' progress for up to ``watch_s``; returns {camera: why} of those that failed. Ends early
    when more than ``max_failures`` failed, or when every canary is active (it passed its own probation). A canary
    that is not active at the end counts as failed."""
    deadline = time.monotonic() + watch_s
    last: dict[str, str] = {}
    failures: dict[str, str] = {}
    while True:
        with ch.changed:
            for cam in canaries:
                verdict, text = _camera_verdict(ch.doc(reported_topic(site, cam)), version, deployment)
                stats = ch.doc(f"{TOPIC_ROOT}/{site}/{cam}/stats") or {}
                if stats.get("model"):
                    text += f" (stats: {stats.get('processed_fps', 0):.1f} fps, model " \
                            f"{stats['model'].get('version') or stats['model'].get('name')})"
                if last.get(cam) != text:
                    say(f"  [{format_ts(time.time())}] {cam}: {text}")
                    last[cam] = text
                if verdict == "failed":
                    failures[cam] = text
            remaining = deadline - time.monotonic()
            if len(failures) > max_failures or remaining <= 0:
                break
            if all(_camera_verdict(ch.doc(reported_topic(site, c)), version, deployment)[0] == "ok"
                   for c in canaries):
                break  # every canary passed its own probation: nothing left to wait for
            ch.changed.wait(min(remaining, 1.0))
    for cam in canaries:
        if cam not in failures:
            verdict, text = _camera_verdict(ch.doc(reported_topic(site, cam)), version, deployment)
            if verdict != "ok":
                failures[cam] = f"not active after {watch_s:.0f} s ({text})"
    return failures


def rollback(settings: BrokerSettings, site: str, camera: str | None = None, *, registry: Registry | None = None,
             url_base: str | None = None, say: Say = print) -> int:
    """Make the previous desired model the desired one again (for one camera, or the site)."""
    deployment = new_deployment_id()
    with _Channel(settings, f"smartcam-rollback-{deployment}") as ch:
        ch.subscribe(site_desired_topic(site), *([camera_desired_topic(site, camera)] if camera else []))
        site_doc = ch.doc(site_desired_topic(site))
        topic = camera_desired_topic(site, camera) if camera else site_desired_topic(site)
        current = effective_desired(ch.doc(topic), site_doc) if camera else site_doc
        where = f"{site}/{camera}" if camera else f"site {site}"
        if current is None:
            raise DeployError(f"nothing deployed to {where}: nothing to roll back")
        prev = current.get("previous")
        if not prev:
            raise DeployError(f"{where} runs {current['manifest']['version']} and has no previous version")
        url = prev["url"]
        if registry is not None:  # a fresh URL (a presigned one may have expired)
            url = registry.model_url(prev["manifest"]["version"], url_base=url_base)
        doc = desired_document(deployment=deployment, url=url, entry=prev, issued_s=time.time(), previous=current)
        ch.publish(topic, doc)
    say(f"rolled back {where}: {current['manifest']['version']} -> {prev['manifest']['version']} ({deployment})")
    return 0

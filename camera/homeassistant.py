"""Home Assistant MQTT discovery: the camera appears in Home Assistant as one device, with no YAML to write.

Home Assistant reads retained *discovery documents* on ``<prefix>/<component>/<object_id>/config`` (one per
entity, the form every release since 2021 understands; device-based discovery came in 2024.x and 2024.3, the last
release for Python 3.11, does not have it). Each document points at a retained topic the edge already publishes
(``count``, ``zones/<z>/count``, ``lines/<l>/totals``) or at ``stats``, reads it with a ``value_template``, and
takes its availability from the retained ``status`` topic the Last Will sets to ``offline``.

:func:`discovery_documents` is pure (config in, documents out). :class:`Discovery` publishes them on every
(re)connect of the publisher's one MQTT client, again whenever Home Assistant announces ``online`` on
``<prefix>/status`` (it restarted and may have lost them), and removes (empty retained payload) the entities of
zones and lines no longer in the config, remembered in a small JSON state file beside the outbox.

>>> docs = discovery_documents(site="shop", camera_id="door", zones=["till"], lines=["gate.1"])
>>> sorted(docs)[:3]
['homeassistant/binary_sensor/smartcam_shop_door_present/config', \
'homeassistant/sensor/smartcam_shop_door_fps/config', \
'homeassistant/sensor/smartcam_shop_door_line_gate_1_0bc523_in/config']
>>> people = docs["homeassistant/sensor/smartcam_shop_door_people/config"]
>>> people["state_topic"], people["state_class"], people["availability"][0]["topic"]
('smartcam/shop/door/count', 'measurement', 'smartcam/shop/door/status')
>>> object_id("gate.1"), object_id("till")
('gate_1_0bc523', 'till')
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from collections.abc import Iterable
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from contract.topics import topic_for

log = logging.getLogger(__name__)

DEFAULT_PREFIX = "homeassistant"
_UNSAFE = re.compile(r"[^a-zA-Z0-9_-]")  # what a discovery topic's object_id may hold


def object_id(name: str) -> str:
    """``name`` as a discovery object id: unsafe characters become ``_``; if any did, a short hash of the
    original keeps two names that differ only there (``a.b``, ``a_b``) apart, the same on every start."""
    safe = _UNSAFE.sub("_", name)
    if safe == name:
        return name
    return f"{safe}_{hashlib.sha1(name.encode()).hexdigest()[:6]}"


def _smartcam_version() -> str:
    try:
        return version("smartcam")
    except PackageNotFoundError:  # running from a source tree that was never installed
        return "0+unknown"


def discovery_documents(*, site: str, camera_id: str, zones: Iterable[str] = (), lines: Iterable[str] = (),
                        prefix: str = DEFAULT_PREFIX, model_name: str | None = None,
                        availability: Iterable[tuple[str, str]] = ()) -> dict[str, dict[str, Any]]:
    """Every discovery document of one camera: {config topic: document}.

    ``availability``: more (topic, value template) pairs that must all say online, e.g. the node document of a
    multi-camera process, whose Last Will is the one that fires when the process dies (camera/site_runner.py).

    The device's identifier and each ``unique_id`` are built from site, camera and zone/line names only, so they
    are the same after every restart (Home Assistant keeps the entities' history and the user's renames)."""
    base = f"smartcam_{object_id(site)}_{object_id(camera_id)}"
    status = topic_for(site, camera_id, "status")
    sw = _smartcam_version()
    device = {"identifiers": [base], "name": f"{camera_id} ({site})" if site != "default" else camera_id,
              "manufacturer": "smartcam", "model": f"smartcam edge{f' · {model_name}' if model_name else ''}",
              "sw_version": sw}
    available = [{"topic": status, "payload_available": "online", "payload_not_available": "offline"}]
    available += [{"topic": topic, "value_template": template, "payload_available": "online",
                   "payload_not_available": "offline"} for topic, template in availability]
    common: dict[str, Any] = {"availability": available, "device": device,
                              "origin": {"name": "smartcam", "sw_version": sw}}
    if len(available) > 1:
        common["availability_mode"] = "all"
    docs: dict[str, dict[str, Any]] = {}

    def add(component: str, suffix: str, name: str, leaf: str, template: str, **extra: Any) -> None:
        oid = f"{base}_{suffix}"
        docs[f"{prefix}/{component}/{oid}/config"] = {
            "name": name, "unique_id": oid, "object_id": oid, "state_topic": topic_for(site, camera_id, leaf),
            "value_template": template, **extra, **common}

    count = "{{ value_json.count }}"
    add("sensor", "people", "People in view", "count", count, state_class="measurement",
        unit_of_measurement="people", icon="mdi:account-group")
    add("binary_sensor", "present", "Person present", "count",
        "{{ 'ON' if (value_json.count | int(0)) > 0 else 'OFF' }}", device_class="occupancy")
    for zone in zones:
        add("sensor", f"zone_{object_id(zone)}", f"Zone {zone} occupancy", f"zones/{zone}/count", count,
            state_class="measurement", unit_of_measurement="people", icon="mdi:account-box-multiple")
    for line in lines:
        for direction in ("in", "out"):
            add("sensor", f"line_{object_id(line)}_{direction}", f"Line {line} {direction}",
                f"lines/{line}/totals", f"{{{{ value_json.totals['{direction}'] }}}}",
                state_class="total_increasing", unit_of_measurement="people",
                icon="mdi:login" if direction == "in" else "mdi:logout")
    add("sensor", "fps", "Processed fps", "stats", "{{ value_json.processed_fps }}", state_class="measurement",
        unit_of_measurement="fps", entity_category="diagnostic", icon="mdi:speedometer")
    # Every event carries its model; the retained count topic is the one Home Assistant can read at any time.
    add("sensor", "model", "Model version", "count", "{{ value_json.model.name }}", entity_category="diagnostic",
        icon="mdi:brain")
    return docs


class Discovery:
    """Publishes one camera's discovery documents through an existing paho client (the publisher's).

    ``state_file`` records the config topics announced last time, so entities of a zone or line deleted from the
    config since are removed on the next connect. Call :meth:`on_connect` from the client's on_connect."""

    def __init__(self, documents: dict[str, dict[str, Any]], *, prefix: str = DEFAULT_PREFIX,
                 state_file: Path | None = None, route: Any = None) -> None:
        """``route(topic, handler)``: a shared connection's fan-out (camera/mqtt_connection.py), so several
        cameras of one process all hear Home Assistant's birth message; None: paho's callback on each connect."""
        self.documents = documents
        self.route = route
        self._client: Any = None  # the connection's client, set on connect
        if route is not None:
            route(f"{prefix}/status", lambda _topic, payload: self._birth(payload))
        self.prefix = prefix
        self.state_file = state_file
        self.announced = 0  # times the full set was published
        self.removed: list[str] = []  # config topics emptied because their zone/line left the config

    def on_connect(self, client: Any) -> None:
        """Subscribe to Home Assistant's birth message, publish every document, remove the stale ones."""
        birth = f"{self.prefix}/status"
        if self.route is None:
            client.message_callback_add(birth, lambda _c, _u, msg: self._birth(msg.payload))
        self._client = client
        client.subscribe(birth, qos=1)
        self.publish(client)
        self._remove_stale(client)

    def _birth(self, payload: bytes) -> None:
        if payload.decode("utf-8", "replace").strip() == "online":
            log.info("Home Assistant announced online on %s/status: re-publishing discovery", self.prefix)
            self.publish(self._client)

    def publish(self, client: Any) -> None:
        for topic, doc in self.documents.items():
            client.publish(topic, json.dumps(doc, separators=(",", ":")), qos=1, retain=True)
        self.announced += 1
        log.info("Home Assistant discovery: %d entities under %s/", len(self.documents), self.prefix)

    def _remove_stale(self, client: Any) -> None:
        if self.state_file is None:
            return
        try:
            before = set(json.loads(self.state_file.read_text(encoding="utf-8")).get("topics", []))
        except FileNotFoundError:
            before = set()
        except (OSError, ValueError) as exc:
            log.warning("cannot read %s (%s): entities removed from the config since cannot be removed from "
                        "Home Assistant this time", self.state_file, exc)
            before = set()
        stale = sorted(t for t in before - set(self.documents) if t.startswith(f"{self.prefix}/"))
        for topic in stale:
            client.publish(topic, b"", qos=1, retain=True)  # an empty retained config removes the entity
        if stale:
            self.removed += stale
            log.info("Home Assistant discovery: removed %d entities no longer in the config", len(stale))
        try:
            self.state_file.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.state_file.with_name(self.state_file.name + ".tmp")
            tmp.write_text(json.dumps({"topics": sorted(self.documents)}, indent=1), encoding="utf-8")
            os.replace(tmp, self.state_file)
        except OSError as exc:
            log.warning("cannot write %s (%s)", self.state_file, exc)

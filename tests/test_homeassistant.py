"""Home Assistant MQTT discovery (camera/homeassistant.py) against a real Mosquitto and a real Home Assistant.

The fast tests drive the edge's real Publisher (its paho client, a real outbox) and read what a plain MQTT client
sees. The slow one starts Home Assistant 2024.3.3 (tests/homeassistant_server.py) and the real edge on the street
clip, and reads the entities back from Home Assistant's REST API.
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
import yaml

from camera.homeassistant import Discovery, discovery_documents, object_id
from camera.outbox import Outbox
from camera.publisher import Publisher
from contract.broker import BrokerSettings
from tests.conftest import ONNX_FP32, STREET_CLIP
from tests.homeassistant_server import HA_VENV, start_homeassistant
from tests.services import Subscriber, retained

ROOT = Path(__file__).resolve().parents[1]
SITE, CAM = "lab", "cam-1"


def wait_until(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def retained_configs(port: int, prefix: str = "homeassistant") -> dict[str, bytes]:
    """Every retained discovery config a fresh client sees under ``prefix`` (after the retained burst)."""
    sub = Subscriber(port, client_id="ha-configs", topic=f"{prefix}/+/+/config")
    try:
        time.sleep(0.5)  # retained messages arrive right after SUBACK; 0.5 s is plenty on localhost
        return {t: p for t, p, r in sub.messages if r and p}
    finally:
        sub.close()


# ------------------------------------------------------------------------------------------ pure documents
def test_documents_have_stable_sanitised_ids_and_read_the_retained_topics():
    docs = discovery_documents(site="shop", camera_id="door.1", zones=["till", "till.2", "till_2"],
                               lines=["gate"], model_name="yolov8n-person-int8-320")
    again = discovery_documents(site="shop", camera_id="door.1", zones=["till", "till.2", "till_2"],
                                lines=["gate"], model_name="yolov8n-person-int8-320")
    assert docs == again  # the same config gives the same ids on every start
    ids = [d["unique_id"] for d in docs.values()]
    assert len(ids) == len(set(ids)) == 2 + 3 + 2 + 2  # people, present, 3 zones, in/out, fps, model
    for topic, doc in docs.items():
        component, oid = re.fullmatch(r"homeassistant/(sensor|binary_sensor)/([a-zA-Z0-9_-]+)/config",
                                      topic).groups()
        assert doc["unique_id"] == doc["object_id"] == oid
        assert doc["availability"][0]["topic"] == "smartcam/shop/door.1/status"
        assert doc["device"]["identifiers"] == [f"smartcam_shop_{object_id('door.1')}"]
    assert object_id("till.2") != object_id("till_2") == "till_2"
    by_name = {d["name"]: d for d in docs.values()}
    assert by_name["Zone till.2 occupancy"]["state_topic"] == "smartcam/shop/door.1/zones/till.2/count"
    assert by_name["Line gate in"]["state_class"] == by_name["Line gate out"]["state_class"] == "total_increasing"
    assert by_name["Line gate out"]["state_topic"] == "smartcam/shop/door.1/lines/gate/totals"
    assert by_name["People in view"]["state_class"] == "measurement"
    assert by_name["Person present"]["device_class"] == "occupancy"
    assert by_name["Processed fps"]["entity_category"] == by_name["Model version"]["entity_category"] == "diagnostic"


def test_config_refuses_home_assistant_in_summary_mode_and_a_bad_prefix():
    from camera.config import ConfigError, load_config

    base = {"camera_id": "door", "source": "0", "model": __file__, "homeassistant.enabled": True}
    assert load_config(overrides=base).homeassistant.discovery_prefix == "homeassistant"
    with pytest.raises(ConfigError, match="homeassistant.enabled needs publish.mode events"):
        load_config(overrides={**base, "publish.mode": "summary"})
    with pytest.raises(ConfigError, match="homeassistant.discovery_prefix: 'ha/#' is not an MQTT topic prefix"):
        load_config(overrides={**base, "homeassistant.discovery_prefix": "ha/#"})


@pytest.mark.skipif(not (HA_VENV / "bin" / "python").exists(), reason="needs .venv-ha (scripts/setup.sh dev)")
def test_every_document_passes_home_assistants_own_discovery_schemas():
    """Home Assistant drops a discovery document that fails its schema with only a log line: check them all
    with the schemas of the installed Home Assistant (its MQTT platforms' DISCOVERY_SCHEMA)."""
    docs = discovery_documents(site="shop", camera_id="door.1", zones=["till.2"], lines=["gate"], model_name="m")
    check = (
        "import json, sys, importlib\n"
        "bad = []\n"
        "for topic, doc in json.load(sys.stdin).items():\n"
        "    component = topic.split('/')[1]\n"
        "    schema = importlib.import_module(f'homeassistant.components.mqtt.{component}').DISCOVERY_SCHEMA\n"
        "    try:\n"
        "        schema(doc)\n"
        "    except Exception as exc:\n"
        "        bad.append(f'{topic}: {exc}')\n"
        "print(json.dumps(bad))\n")
    proc = subprocess.run([str(HA_VENV / "bin" / "python"), "-c", check], input=json.dumps(docs),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads(proc.stdout.splitlines()[-1]) == []


# ------------------------------------------------------------------------------------------ real Mosquitto
def _publisher(broker, tmp_path: Path, zones: list[str], lines: list[str]) -> tuple[Publisher, Discovery]:
    outbox = Outbox(tmp_path / "outbox.db")
    pub = Publisher(BrokerSettings.from_url(broker.url), outbox, site=SITE, camera_id=CAM)
    discovery = Discovery(discovery_documents(site=SITE, camera_id=CAM, zones=zones, lines=lines),
                          state_file=tmp_path / "outbox.db.homeassistant.json")
    pub.connect_hooks.append(discovery.on_connect)
    pub.start()
    assert pub.connected.wait(10)
    return pub, discovery


def _stop(pub: Publisher) -> None:
    pub.stop()
    pub.outbox.close()


def test_birth_message_republishes_and_deleted_zones_and_lines_are_removed(mosquitto, tmp_path):
    pub, discovery = _publisher(mosquitto, tmp_path, zones=["till", "door"], lines=["gate", "exit"])
    try:
        expected = set(discovery.documents)
        configs = wait_until(lambda: (c := retained_configs(mosquitto.port)) and set(c) == expected and c, 10,
                             "every discovery document to be retained")
        assert {t: json.loads(p) for t, p in configs.items()} == discovery.documents
        # Home Assistant restarted: its birth message makes the edge announce everything again
        watcher = Subscriber(mosquitto.port, client_id="watch", topic="homeassistant/+/+/config")
        time.sleep(0.3)
        retained_burst = len(watcher.messages)
        ha = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="fake-ha-birth")
        ha.connect("127.0.0.1", mosquitto.port)
        ha.loop_start()
        ha.publish("homeassistant/status", "online", qos=1).wait_for_publish(5)
        wait_until(lambda: len([m for m in watcher.messages[retained_burst:] if not m[2]]) >= len(expected), 10,
                   "discovery to be re-published after Home Assistant's birth message")
        ha.publish("homeassistant/status", "offline", qos=1).wait_for_publish(5)  # Home Assistant's will: ignored
        ha.loop_stop()
        ha.disconnect()
        time.sleep(0.5)
        assert discovery.announced == 2
        watcher.close()
    finally:
        _stop(pub)

    # The edge restarts with the zone "door" and the line "exit" deleted from its config: their entities go.
    pub, discovery = _publisher(mosquitto, tmp_path, zones=["till"], lines=["gate"])
    try:
        wait_until(lambda: set(retained_configs(mosquitto.port)) == set(discovery.documents), 10,
                   "the deleted zone's and line's configs to be emptied")
        gone = sorted(expected - set(discovery.documents))
        assert discovery.removed == gone and len(gone) == 3  # zone door; line exit in + out
        assert all("door" in t or "exit" in t for t in gone)
    finally:
        _stop(pub)
    # a third start with the same config removes nothing more
    pub, discovery = _publisher(mosquitto, tmp_path, zones=["till"], lines=["gate"])
    _stop(pub)
    assert discovery.removed == []


# ------------------------------------------------------------------------------------------ real Home Assistant
def _entity(kind: str, suffix: str) -> str:
    """The entity id Home Assistant derives from our object_id (lower case, anything else becomes ``_``)."""
    return f"{kind}.{re.sub(r'[^a-z0-9]+', '_', f'smartcam_{SITE}_{CAM}_{suffix}'.lower())}"


def _edge_config(path: Path, zones: list[dict]) -> Path:
    cfg = yaml.safe_load((ROOT / "samples" / "demo_street.yaml").read_text())
    cfg.update(site=SITE, camera_id=CAM, source=str(STREET_CLIP), model=str(ONNX_FP32), zones=zones,
               homeassistant={"enabled": True})
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.mark.slow
@pytest.mark.skipif(not (HA_VENV / "bin" / "hass").exists(), reason="needs .venv-ha (scripts/setup.sh dev)")
def test_home_assistant_shows_the_camera_and_marks_it_unavailable_when_the_edge_dies(mosquitto, tmp_path):
    ha = start_homeassistant(tmp_path / "ha", mosquitto.port)
    edge = None
    try:
        pavement = yaml.safe_load((ROOT / "samples" / "demo_street.yaml").read_text())["zones"][0]
        whole = {"name": "street.all", "points": [[0, 0], [1280, 0], [1280, 720], [0, 720]]}
        cfg = _edge_config(tmp_path / "edge.yaml", [pavement, whole])
        common = ["--config", str(cfg), "--broker", mosquitto.url, "--outbox", str(tmp_path / "outbox.db")]
        # the real edge, live-paced and looping so it is running when killed; default batching on
        edge = subprocess.Popen([sys.executable, "-m", "camera", "run", *common, "--realtime", "--loop", "0",
                                 "--stats-interval", "2"], cwd=ROOT, stdout=subprocess.DEVNULL,
                                stderr=open(tmp_path / "edge.log", "wb"))  # noqa: SIM115
        people, present = _entity("sensor", "people"), _entity("binary_sensor", "present")
        zone_all = _entity("sensor", f"zone_{object_id('street.all')}")
        zone_pavement = _entity("sensor", "zone_right_pavement")
        line_in, line_out = _entity("sensor", "line_street_in"), _entity("sensor", "line_street_out")
        fps, model = _entity("sensor", "fps"), _entity("sensor", "model")
        entities = [people, present, zone_all, zone_pavement, line_in, line_out, fps, model]

        def known(entity_id: str) -> bool:
            s = ha.state(entity_id)
            return s is not None and s["state"] not in ("unknown", "unavailable")

        # someone crosses the street line within the clip's first seconds: every entity gets a state
        wait_until(lambda: all(known(e) for e in entities), 75,
                   f"every entity to have a state in Home Assistant:\n{ha.log[-3000:]}")
        edge.send_signal(signal.SIGSTOP)  # freeze the edge (connection kept): the retained topics stop moving
        time.sleep(1.0)
        count = json.loads(retained(mosquitto.port, "count"))
        totals = json.loads(retained(mosquitto.port, "lines/street/totals"))["totals"]
        zone = json.loads(retained(mosquitto.port, "zones/street.all/count"))["count"]

        def states() -> dict[str, str]:
            return {e: ha.state(e)["state"] for e in entities}

        expected = {people: str(count["count"]), present: "on" if count["count"] else "off", zone_all: str(zone),
                    line_in: str(totals["in"]), line_out: str(totals["out"]), model: count["model"]["name"]}
        wait_until(lambda: all(states()[e] == v for e, v in expected.items()), 15,
                   f"Home Assistant's states to match the retained topics {expected}")
        assert totals["in"] + totals["out"] >= 1
        assert float(ha.state(fps)["state"]) > 0
        attrs = {e: ha.state(e)["attributes"] for e in entities}
        assert attrs[people]["state_class"] == "measurement" and attrs[people]["friendly_name"].endswith(
            "People in view")
        assert attrs[present]["device_class"] == "occupancy"
        assert attrs[line_in]["state_class"] == attrs[line_out]["state_class"] == "total_increasing"

        # the edge dies (kill -9): the broker sends its Last Will and Home Assistant marks every entity unavailable
        edge.send_signal(signal.SIGKILL)
        edge.wait(10)
        edge = None
        wait_until(lambda: set(states().values()) == {"unavailable"}, 30, "every entity to become unavailable")
        assert retained(mosquitto.port, "status") == b"offline"

        # the zone "street.all" is deleted from the config: the next start removes its entity from Home Assistant
        _edge_config(cfg, [pavement])
        proc = subprocess.run([sys.executable, "-m", "camera", "run", *common, "--max-frames", "3"], cwd=ROOT,
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert "removed 1 entities no longer in the config" in proc.stderr
        wait_until(lambda: ha.state(zone_all) is None, 15, "the deleted zone's entity to leave Home Assistant")
        assert ha.state(zone_pavement) is not None
    finally:
        if edge is not None:
            edge.kill()
            edge.wait(10)
        ha.stop()

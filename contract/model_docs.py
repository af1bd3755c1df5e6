"""The model-update documents of the wire: *desired* (cloud → camera) and *reported* (camera → cloud).

Topics (both retained, QoS 1; docs/models-ota.md is the reference)::

    smartcam/<site>/<camera_id>/model/desired   one camera's desired model  (model-desired.v1)
    smartcam/<site>/model/desired               every camera of the site    (model-desired.v1)
    smartcam/<site>/<camera_id>/model/reported  what the camera did / runs  (model-reported.v1)

A camera subscribes to both desired topics and follows the document issued last (:func:`effective_desired`):
a site-wide deploy after a canary replaces the canary's pin, a canary after a site deploy overrides it for that
camera, and a camera that joins later gets the site's model. The site topic has four levels, a camera topic five,
so they never collide (``model`` is a leaf, not a camera name, under ``smartcam/<site>/``).

>>> site_desired_topic("shop"), camera_desired_topic("shop", "door")
('smartcam/shop/model/desired', 'smartcam/shop/door/model/desired')
>>> a = {"issued": "2026-01-01T00:00:00.000Z", "deployment": "a"}
>>> b = {"issued": "2026-01-02T00:00:00.000Z", "deployment": "b"}
>>> effective_desired(a, b)["deployment"], effective_desired(None, a)["deployment"]
('b', 'a')
"""

from __future__ import annotations

from typing import Any

from contract.timestamps import format_ts
from contract.topics import TOPIC_ROOT, topic_for

DESIRED_LEAF, REPORTED_LEAF = "model/desired", "model/reported"
DESIRED_SCHEMA_FILE, REPORTED_SCHEMA_FILE = "model-desired.v1.schema.json", "model-reported.v1.schema.json"
DESIRED_KIND, REPORTED_KIND = "model.desired", "model.reported"
#: Reported states: the steps of an update, and how it ended.
STATES = ("downloading", "verifying", "checking", "probation", "active", "rejected", "rolled_back")
FAILED_STATES = ("rejected", "rolled_back")


def site_desired_topic(site: str) -> str:
    return f"{TOPIC_ROOT}/{site}/{DESIRED_LEAF}"


def camera_desired_topic(site: str, camera_id: str) -> str:
    return topic_for(site, camera_id, DESIRED_LEAF)


def reported_topic(site: str, camera_id: str) -> str:
    return topic_for(site, camera_id, REPORTED_LEAF)


def effective_desired(camera_doc: dict[str, Any] | None, site_doc: dict[str, Any] | None) -> dict[str, Any] | None:
    """The desired document a camera follows: the later-issued of its own and its site's (ties: its own)."""
    if camera_doc is None or site_doc is None:
        return camera_doc or site_doc
    return site_doc if site_doc["issued"] > camera_doc["issued"] else camera_doc


def desired_document(*, deployment: str, url: str, entry: dict[str, Any], issued_s: float,
                     previous: dict[str, Any] | None = None) -> dict[str, Any]:
    """A ``model-desired.v1`` document for one registry entry (``{"manifest", "signature"}``) fetched at ``url``.

    ``previous`` is the desired document this one replaces (its own ``previous`` is dropped: one step back)."""
    prev = None
    if previous is not None:
        prev = {k: previous[k] for k in ("deployment", "url", "manifest", "signature")}
    return {"schema_version": 1, "kind": DESIRED_KIND, "deployment": deployment, "issued": format_ts(issued_s),
            "url": url, "manifest": entry["manifest"], "signature": entry["signature"], "previous": prev}


def model_ref(version: str | None, name: str, sha256: str) -> dict[str, Any]:
    """How a reported document names a model."""
    return {"version": version, "name": name, "sha256": sha256}


def reported_document(*, site: str, camera_id: str, ts_s: float, state: str, version: str | None,
                      sha256: str | None, deployment: str | None, reason: str | None, active: dict[str, Any],
                      previous: dict[str, Any] | None) -> dict[str, Any]:
    """A ``model-reported.v1`` document."""
    if state not in STATES:
        raise ValueError(f"unknown model state {state!r}")
    return {"schema_version": 1, "kind": REPORTED_KIND, "ts": format_ts(ts_s), "site": site, "camera_id": camera_id,
            "state": state, "version": version, "sha256": sha256, "deployment": deployment,
            "reason": reason[:500] if reason else None, "active": active, "previous": previous}

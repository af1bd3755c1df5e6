"""The wire contract between the edge (``camera``) and the cloud (``cloud_sink``, ``models``).

Both sides import it; it imports neither. Standard library only at import time (paho-mqtt and jsonschema are
imported lazily by the functions that need them), so the edge install stays small.

- :mod:`contract.schema`: the versioned JSON Schemas in ``contract/schemas/`` and validation
- :mod:`contract.topics`: the topic tree and the name rule
- :mod:`contract.ids`, :mod:`contract.timestamps`: idempotency keys, the one timestamp form
- :mod:`contract.batch`: the zlib JSON Lines ``batch`` envelope
- :mod:`contract.rollup`: the rollup increments of events and the ``summary.v1`` message
- :mod:`contract.broker`: broker URLs and paho-mqtt client construction
"""

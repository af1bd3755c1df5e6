"""Write contract/schemas/event.v1.zdict.json: the zlib preset dictionary of the ``batch`` topic (docs/mqtt.md).

The dictionary is the sample events (samples/events/*.json, by file name) as compact JSON Lines, with the
common fields in the order the edge emits them, so the first batch of a connection already finds
``{"schema_version":1,"site":...`` in its window. It was measured on the street clip's events (2-s batches:
6.6x without, 9.1x with it; bench/bytes_published.py).

The dictionary is part of the v1 contract: an edge and a sink must hold the same bytes (its Adler-32 is the
DICTID in every batch's zlib header). Do not regenerate it for an existing version; a new dictionary means a
new file that the sink learns *before* any edge uses it (contract.batch keeps every known one by DICTID).

    .venv/bin/python scripts/make_zdict.py [--check]
"""

from __future__ import annotations

import argparse
import json
import sys
import zlib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "camera" / "schemas" / "event.v1.zdict.json"
#: The order of the common fields in an edge event (camera/events.py); the rest keep the sample's order.
EDGE_ORDER = ("schema_version", "site", "camera_id", "model", "event_id", "type", "ts", "frame")


def build(samples_dir: Path = ROOT / "samples" / "events") -> dict:
    """The dictionary document: its text and its zlib DICTID (Adler-32)."""
    lines = []
    for path in sorted(samples_dir.glob("*.json")):
        doc = json.loads(path.read_text(encoding="utf-8"))
        ordered = {k: doc[k] for k in EDGE_ORDER if k in doc} | {k: v for k, v in doc.items() if k not in EDGE_ORDER}
        lines.append(json.dumps(ordered, separators=(",", ":")) + "\n")
    text = "".join(lines)
    return {"description": "zlib preset dictionary of smartcam/<site>/<camera>/batch (scripts/make_zdict.py)",
            "dictid": zlib.adler32(text.encode()), "text": text}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--check", action="store_true", help="exit 1 if the shipped file differs from the samples")
    args = ap.parse_args(argv)
    doc = build()
    if args.check:
        same = OUT.exists() and json.loads(OUT.read_text(encoding="utf-8")) == doc
        print(f"{OUT.relative_to(ROOT)}: {'up to date' if same else 'differs from samples/events'}")
        return 0 if same else 1
    OUT.write_text(json.dumps(doc, indent=1) + "\n", encoding="utf-8")
    print(f"wrote {OUT.relative_to(ROOT)} ({len(doc['text'])} chars, dictid {doc['dictid']:#010x})")
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env bash
# The README's first command: installs the demo's dependencies (edge + model tools + sink + an embedded broker; no
# torch) into .venv, then runs scripts/demo.py: a sample clip through the edge, a broker, the sink on SQLite, and a
# printed analytics report with the dashboard URL. Extra arguments go to demo.py (see --help; --serve keeps it up).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh demo
exec "${SMARTCAM_VENV:-.venv}/bin/python" scripts/demo.py "$@"

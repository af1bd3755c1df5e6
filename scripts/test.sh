#!/usr/bin/env bash
# The README's test command: installs everything (system packages + venv) and runs every test, slow ones included.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh dev
VENV="${SMARTCAM_VENV:-.venv}"
echo "==> ruff"
"$VENV/bin/ruff" check .
echo "==> pytest"
# two workers (pytest-xdist): most of the slow tests wait on real time (outages, reconnects, clocks), so two run
# side by side on 2 cores in ~14 min where one at a time took ~20; SMARTCAM_TEST_WORKERS=0 runs them in one process
"$VENV/bin/python" -m pytest -n "${SMARTCAM_TEST_WORKERS:-2}" "$@"

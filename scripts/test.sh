#!/usr/bin/env bash
# The README's test command: installs everything (system packages + venv) and runs every test, slow ones included.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh dev
VENV="${SMARTCAM_VENV:-.venv}"
echo "==> ruff"
"$VENV/bin/ruff" check .
echo "==> pytest"
"$VENV/bin/python" -m pytest "$@"

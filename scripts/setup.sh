#!/usr/bin/env bash
# Installs everything smartcam needs on a Debian machine, idempotently:
#   system packages (Mosquitto, PostgreSQL, Chromium) via apt-get when missing,
#   a virtualenv at $SMARTCAM_VENV (default .venv) with the project and the given extras.
# Usage: scripts/setup.sh [EXTRAS]   (default: dev = everything, for tests)
set -euo pipefail
cd "$(dirname "$0")/.."
EXTRAS="${1:-dev}"
VENV="${SMARTCAM_VENV:-.venv}"
PY="${PYTHON:-python3}"

need_apt=()
if [ "$EXTRAS" = "dev" ]; then
  command -v mosquitto >/dev/null || [ -x /usr/sbin/mosquitto ] || need_apt+=(mosquitto mosquitto-clients)
  command -v pg_ctl >/dev/null || ls /usr/lib/postgresql/*/bin/pg_ctl >/dev/null 2>&1 || need_apt+=(postgresql)
  command -v chromium >/dev/null || need_apt+=(chromium chromium-driver)
  command -v openssl >/dev/null || need_apt+=(openssl)
  command -v ffmpeg >/dev/null || need_apt+=(ffmpeg)
  command -v prometheus >/dev/null || need_apt+=(prometheus)   # Prometheus 2.42 + promtool: metrics tests
  # network and clock fault tests (tests/netns.py, tests/test_time_faults.py)
  command -v iptables >/dev/null || [ -x /usr/sbin/iptables ] || need_apt+=(iptables)
  command -v faketime >/dev/null || need_apt+=(faketime)
fi
if [ ${#need_apt[@]} -gt 0 ]; then
  echo "==> apt-get install ${need_apt[*]}"
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need_apt[@]}" >/dev/null
fi

if [ ! -x "$VENV/bin/python" ]; then
  echo "==> creating virtualenv $VENV"
  "$PY" -m venv "$VENV"
  "$VENV/bin/pip" install -q --upgrade pip
fi
stamp="$VENV/.smartcam-installed-$EXTRAS"
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  echo "==> pip install -e .[$EXTRAS] (first time with torch/ultralytics takes a few minutes)"
  "$VENV/bin/pip" install -q -e ".[$EXTRAS]"
  touch "$stamp"
fi
if [ "$EXTRAS" = "dev" ]; then
  # Home Assistant for the discovery tests, in its OWN venv: it pins its own SQLAlchemy, pydantic, aiohttp...
  HA_VENV="${SMARTCAM_HA_VENV:-.venv-ha}"
  ha_stamp="$HA_VENV/.smartcam-installed"
  if [ ! -f "$ha_stamp" ] || [ scripts/homeassistant-requirements.txt -nt "$ha_stamp" ]; then
    echo "==> Home Assistant 2024.3.3 into $HA_VENV (~2 min, ~570 MB, first time only)"
    [ -x "$HA_VENV/bin/python" ] || "$PY" -m venv "$HA_VENV"
    "$HA_VENV/bin/pip" install -q --upgrade pip
    "$HA_VENV/bin/pip" install -q -r scripts/homeassistant-requirements.txt
    touch "$ha_stamp"
  fi
fi
echo "==> environment ready: $VENV"

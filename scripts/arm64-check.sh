#!/usr/bin/env bash
# Proves the Raspberry Pi install: an arm64 Debian root (debootstrap + qemu-user-static via binfmt_misc), the
# edge installed into it from PyPI exactly as a Pi user would (`pip install ".[edge]"`), then
# `smartcam-edge detect` on shared images and a short `smartcam-edge run` on a shared clip, under emulation.
# Compares the arm64 detections with this machine's (x86) ones and writes a JSON report.
#
# Speed under emulation means nothing: this script reports correctness, install size and which onnxruntime
# kernels ran, never frames per second.
#
# Usage: scripts/arm64-check.sh [--model M.onnx] [--root DIR] [--out REPORT.json]
#   needs root (debootstrap, chroot, binfmt_misc), ~1.5 GB of disk, network access to Debian and PyPI.
#   The arm64 root is kept in --root (default /var/tmp/smartcam-arm64) and reused on the next run.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOTFS=/var/tmp/smartcam-arm64
OUT=docs/arm64-check.json
MODEL=""
SHARED="${SMARTCAM_SHARED:-../shared}"
while [ $# -gt 0 ]; do
  case "$1" in
    --model) MODEL="$2"; shift 2 ;;
    --root) ROOTFS="$2"; shift 2 ;;
    --out) OUT="$2"; shift 2 ;;
    -h|--help) sed -n '2,14p' "$0"; exit 0 ;;
    *) echo "unknown option: $1 (see --help)" >&2; exit 2 ;;
  esac
done
[ "$(id -u)" -eq 0 ] || { echo "arm64-check: needs root (debootstrap, chroot, binfmt_misc)" >&2; exit 2; }
VENV="${SMARTCAM_VENV:-.venv}"
[ -x "$VENV/bin/python" ] || { echo "arm64-check: run scripts/setup.sh first (no $VENV)" >&2; exit 2; }

echo "==> host tools: debootstrap, qemu-user-static"
if ! command -v debootstrap >/dev/null || [ ! -x /usr/bin/qemu-aarch64-static ]; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends debootstrap qemu-user-static >/dev/null
fi
echo "==> binfmt_misc: aarch64 interpreter"
[ -e /proc/sys/fs/binfmt_misc/register ] || mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc
if [ ! -e /proc/sys/fs/binfmt_misc/qemu-aarch64 ]; then
  # Debian's own registration line (flags OPF: F = the interpreter is opened now, so the chroot needs no copy)
  grep -v '^#' /usr/lib/binfmt.d/qemu-aarch64.conf > /proc/sys/fs/binfmt_misc/register
fi

if [ -z "$MODEL" ]; then
  MODEL=models/arm64-check-int8-320.onnx
  if [ ! -f "$MODEL" ]; then
    echo "==> building the Pi model $MODEL (x86, once)"
    "$VENV/bin/smartcam-model" build --weights "$SHARED/models/yolov8n-coco.onnx" --imgsz 320 \
      --calib "$SHARED/data/videos" --no-eval --out "$MODEL" >/dev/null
  fi
fi

if [ ! -x "$ROOTFS/usr/bin/python3" ]; then
  echo "==> debootstrap arm64 bookworm into $ROOTFS (emulated second stage: several minutes)"
  rm -rf "$ROOTFS"
  debootstrap --arch=arm64 --variant=minbase --include=python3,python3-venv,python3-pip,ca-certificates \
    bookworm "$ROOTFS" http://deb.debian.org/debian >/tmp/arm64-debootstrap.log 2>&1 \
    || { tail -20 /tmp/arm64-debootstrap.log; exit 1; }
fi
cp /etc/resolv.conf "$ROOTFS/etc/resolv.conf"
# The host's CA bundle, so pip inside the root trusts what the host trusts (a TLS-inspecting proxy, a mirror).
cp "${PIP_CERT:-/etc/ssl/certs/ca-certificates.crt}" "$ROOTFS/etc/ssl/certs/host-ca-bundle.crt"
# A clean environment inside: the host's pip settings (find-links, constraints) name host paths.
IN_ROOT=(env -i PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin HOME=/root LANG=C.UTF-8
         PIP_CERT=/etc/ssl/certs/host-ca-bundle.crt PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_DEFAULT_TIMEOUT=180)

echo "==> copying the project, model, images and clip into the arm64 root"
WORK="$ROOTFS/smartcam"
rm -rf "$WORK" && mkdir -p "$WORK/src" "$WORK/data"
git ls-files -z | tar --null -T - -cf - | tar -xf - -C "$WORK/src"
cp "$MODEL" "$WORK/data/model.onnx"
IMAGES=(MOT17-02-FRCNN_000001.jpg MOT17-05-FRCNN_000003.jpg MOT17-11-FRCNN_000004.jpg)
for img in "${IMAGES[@]}"; do cp "$SHARED/data/persons-eval/images/$img" "$WORK/data/"; done
cp "$SHARED/data/videos/indoor_webcam_2people_with_overlay.mp4" "$WORK/data/clip.mp4"

mounted=()
cleanup() { for m in "${mounted[@]}"; do umount -l "$m" 2>/dev/null || true; done; }
trap cleanup EXIT
for m in proc dev; do  # not /sys: the host's (x86) sysfs crashes onnxruntime's cpuinfo under emulation
  mountpoint -q "$ROOTFS/$m" || { mount --bind "/$m" "$ROOTFS/$m"; mounted+=("$ROOTFS/$m"); }
done

echo "==> pip install .[edge] inside arm64 (from PyPI, emulated)"
"${IN_ROOT[@]}" chroot "$ROOTFS" /bin/sh -c '
  set -e
  [ -x /opt/edge/bin/python ] || python3 -m venv /opt/edge
  /opt/edge/bin/pip install -q --upgrade pip >/dev/null
  /opt/edge/bin/pip install -q "/smartcam/src[edge]"
' 2>&1 | tail -5

echo "==> detect and run under emulation"
imgs=""; for img in "${IMAGES[@]}"; do imgs="$imgs /smartcam/data/$img"; done
"${IN_ROOT[@]}" chroot "$ROOTFS" /bin/sh -c "
  set -e
  cd /smartcam
  uname -m > data/arch.txt
  /opt/edge/bin/smartcam-edge detect --model data/model.onnx --threads 1 --json $imgs > data/arm64-detect.json
  /opt/edge/bin/smartcam-edge run --source data/clip.mp4 --model data/model.onnx --camera-id arm64 --site check \
      --threads 1 --max-frames 40 --events-file data/arm64-events.jsonl --outbox data/outbox.db > data/run.log 2>&1
  /opt/edge/bin/python - <<'PY' > data/ort.json
import json, platform, onnxruntime as ort
import numpy as np
info = {'machine': platform.machine(), 'onnxruntime': ort.__version__, 'providers': ort.get_available_providers()}
so = ort.SessionOptions(); so.enable_profiling = True; so.profile_file_prefix = '/smartcam/data/ort-profile'
s = ort.InferenceSession('data/model.onnx', so, providers=['CPUExecutionProvider'])
inp = s.get_inputs()[0]
shape = [d if isinstance(d, int) else 1 for d in inp.shape]
s.run(None, {inp.name: np.random.rand(*shape).astype(np.float32)})
prof = json.load(open(s.end_profiling()))
ops = sorted({e['args'].get('op_name') for e in prof if e.get('cat') == 'Node' and 'op_name' in e.get('args', {})})
info['int8_ops'] = [o for o in ops if 'Integer' in o or 'QLinear' in o or o in ('QuantizeLinear', 'DequantizeLinear')]
info['ops'] = ops
print(json.dumps(info))
PY
  du -sk /opt/edge | cut -f1 > data/venv-kb.txt
"

echo "==> the same detections on this machine ($(uname -m))"
"$VENV/bin/smartcam-edge" detect --model "$MODEL" --threads 1 --json \
  $(for img in "${IMAGES[@]}"; do printf '%s ' "$SHARED/data/persons-eval/images/$img"; done) > /tmp/x86-detect.json
rm -f /tmp/x86-events.jsonl /tmp/x86-outbox.db*
"$VENV/bin/smartcam-edge" run --source "$WORK/data/clip.mp4" --model "$MODEL" --camera-id arm64 --site check \
  --threads 1 --max-frames 40 --events-file /tmp/x86-events.jsonl --outbox /tmp/x86-outbox.db >/dev/null 2>&1
"$VENV/bin/python" scripts/arm64_compare.py --x86-events /tmp/x86-events.jsonl --arm "$WORK/data/arm64-detect.json" --x86 /tmp/x86-detect.json \
  --ort "$WORK/data/ort.json" --venv-kb "$(cat "$WORK/data/venv-kb.txt")" --arch "$(cat "$WORK/data/arch.txt")" \
  --events "$WORK/data/arm64-events.jsonl" --run-log "$WORK/data/run.log" --out "$OUT"

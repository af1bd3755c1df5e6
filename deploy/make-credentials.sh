#!/usr/bin/env bash
# Create everything a new smartcam broker install needs: a CA, a server certificate signed by it, one user and
# random password per camera and sink, the Mosquitto password file, the ACL and a ready mosquitto.conf.
#
#   deploy/make-credentials.sh OUTDIR --site lobby --camera cam1 --camera cam2 --sink sink [--deployer ops] \
#       [--hostname broker.example.org ...] [--conf-dir /etc/mosquitto/smartcam] [--data-dir /var/lib/mosquitto] \
#       [--days 825] [--force]
#
# OUTDIR gets:
#   ca.crt                 give to every client (cameras, sinks) so they can verify the broker
#   private/ca.key         the CA key: keep it offline; needed only to issue a new server certificate
#   server.crt server.key  the broker's TLS identity (SAN: every --hostname, localhost, 127.0.0.1)
#   passwd acl             Mosquitto password file (hashed) and ACL
#   mosquitto.conf         deploy/mosquitto/mosquitto.conf with @CONF_DIR@/@DATA_DIR@ filled in
#   clients/<user>.env     SMARTCAM_MQTT_PASSWORD=... for each user (0600): hand each device only its own
# An existing CA in OUTDIR is reused (clients keep trusting the broker); users and passwords are regenerated
# only with --force. Mosquitto drops to user "mosquitto" when started as root, so the files it reads are made
# readable by group mosquitto when that group exists.
set -euo pipefail

usage() { sed -n '2,19p' "$0" | sed 's/^# \{0,1\}//'; }
die() { echo "make-credentials.sh: $*" >&2; exit 2; }

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
TEMPLATE="$HERE/mosquitto/mosquitto.conf"
NAME_RE='^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$'   # contract/topics.py NAME_RE, character for character (tests/test_contract.py checks)

OUTDIR="" SITE="" SINKS=() DEPLOYERS=() CAMERAS=() HOSTNAMES=() CONF_DIR="" DATA_DIR="/var/lib/mosquitto" DAYS=825 FORCE=0
while [[ $# -gt 0 ]]; do
  case "$1" in
    -h|--help) usage; exit 0 ;;
    --site) SITE="${2:?--site needs a value}"; shift 2 ;;
    --camera) CAMERAS+=("${2:?--camera needs a value}"); shift 2 ;;
    --sink) SINKS+=("${2:?--sink needs a value}"); shift 2 ;;
    --deployer) DEPLOYERS+=("${2:?--deployer needs a value}"); shift 2 ;;
    --hostname) HOSTNAMES+=("${2:?--hostname needs a value}"); shift 2 ;;
    --conf-dir) CONF_DIR="${2:?--conf-dir needs a value}"; shift 2 ;;
    --data-dir) DATA_DIR="${2:?--data-dir needs a value}"; shift 2 ;;
    --days) DAYS="${2:?--days needs a value}"; shift 2 ;;
    --force) FORCE=1; shift ;;
    -*) die "unknown option $1 (see --help)" ;;
    *) [[ -z "$OUTDIR" ]] || die "only one OUTDIR, got '$OUTDIR' and '$1'"; OUTDIR="$1"; shift ;;
  esac
done

[[ -n "$OUTDIR" ]] || die "OUTDIR is required (see --help)"
[[ -n "$SITE" ]] || die "--site is required"
[[ ${#CAMERAS[@]} -gt 0 ]] || die "at least one --camera is required"
[[ ${#SINKS[@]} -gt 0 ]] || SINKS=(sink)
[[ "$DAYS" =~ ^[0-9]+$ ]] || die "--days must be a whole number"
for name in "$SITE" "${CAMERAS[@]}" "${SINKS[@]}" ${DEPLOYERS[@]+"${DEPLOYERS[@]}"}; do
  [[ "$name" =~ $NAME_RE ]] || die "'$name' is not a valid name (letters, digits, _ . -; no / + #)"
done
dupes="$(printf '%s\n' "${CAMERAS[@]}" "${SINKS[@]}" ${DEPLOYERS[@]+"${DEPLOYERS[@]}"} | sort | uniq -d)"
[[ -z "$dupes" ]] || die "user names must be unique: $dupes"
for tool in openssl mosquitto_passwd; do
  command -v "$tool" >/dev/null || die "$tool not found (apt-get install -y openssl mosquitto)"
done

mkdir -p "$OUTDIR"
OUTDIR="$(cd "$OUTDIR" && pwd)"
CONF_DIR="${CONF_DIR:-$OUTDIR}"
if [[ -e "$OUTDIR/passwd" && $FORCE -eq 0 ]]; then
  die "$OUTDIR/passwd exists: pass --force to regenerate users and passwords"
fi
umask 077
mkdir -p "$OUTDIR/private" "$OUTDIR/clients"

# ---------------------------------------------------------------------------- CA (reused when present)
if [[ ! -s "$OUTDIR/private/ca.key" ]]; then
  openssl req -x509 -new -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -sha256 -days "$DAYS" \
    -subj "/O=smartcam/CN=smartcam ${SITE} CA" -keyout "$OUTDIR/private/ca.key" -out "$OUTDIR/ca.crt" \
    -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" 2>/dev/null
  echo "created CA $OUTDIR/ca.crt"
else
  echo "reusing CA $OUTDIR/ca.crt"
fi

# ---------------------------------------------------------------------------- server certificate
san="DNS:localhost,IP:127.0.0.1"
for h in "${HOSTNAMES[@]}"; do
  if [[ "$h" =~ ^[0-9.]+$ || "$h" == *:* ]]; then san="$san,IP:$h"; else san="$san,DNS:$h"; fi
done
cn="${HOSTNAMES[0]:-localhost}"
tmp="$(mktemp -d)"; trap 'rm -rf "$tmp"' EXIT
openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -sha256 -subj "/O=smartcam/CN=$cn" \
  -keyout "$OUTDIR/server.key" -out "$tmp/server.csr" 2>/dev/null
printf 'subjectAltName=%s\nbasicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\n' \
  "$san" >"$tmp/ext.cnf"
openssl x509 -req -in "$tmp/server.csr" -CA "$OUTDIR/ca.crt" -CAkey "$OUTDIR/private/ca.key" -CAcreateserial \
  -CAserial "$OUTDIR/private/ca.srl" -days "$DAYS" -sha256 -extfile "$tmp/ext.cnf" -out "$OUTDIR/server.crt" 2>/dev/null
echo "created server certificate $OUTDIR/server.crt ($san)"

# ---------------------------------------------------------------------------- users, passwords, ACL
rm -f "$OUTDIR/passwd" "$OUTDIR"/clients/*.env   # users not named again are removed
: >"$OUTDIR/passwd"
{
  echo "# smartcam ACL for site $SITE, generated by deploy/make-credentials.sh on $(date -u +%Y-%m-%dT%H:%M:%SZ)."
  echo "# Each camera may only write under smartcam/$SITE/<camera>/# and read its own .../ack (the sink's"
  echo "# confirmations, publish.confirm: sink) and its desired model (.../model/desired and the site's"
  echo "# smartcam/$SITE/model/desired, docs/models-ota.md); sink users may only read smartcam/# and write"
  echo "# smartcam/+/+/ack; deployer users (smartcam-model deploy/rollback) read smartcam/$SITE/# and write only"
  echo "# the desired-model topics of the site."
  echo "# Everything else is denied. No rules before the first 'user' line and no 'pattern' lines on purpose."
} >"$OUTDIR/acl"
add_user() {  # name, acl-rule
  local user="$1" rule="$2" pw
  pw="$(openssl rand -hex 24)"
  mosquitto_passwd -b "$OUTDIR/passwd" "$user" "$pw"
  printf '# broker user %s (keep secret; contract/broker.py reads SMARTCAM_MQTT_PASSWORD)\nSMARTCAM_MQTT_USER=%s\nSMARTCAM_MQTT_PASSWORD=%s\n' \
    "$user" "$user" "$pw" >"$OUTDIR/clients/$user.env"
  printf '\nuser %s\n%s\n' "$user" "$rule" >>"$OUTDIR/acl"
}
for cam in "${CAMERAS[@]}"; do
  add_user "$cam" "topic write smartcam/$SITE/$cam/#
topic read smartcam/$SITE/$cam/ack
topic read smartcam/$SITE/$cam/model/desired
topic read smartcam/$SITE/model/desired"
done
for deployer in ${DEPLOYERS[@]+"${DEPLOYERS[@]}"}; do add_user "$deployer" "topic read smartcam/$SITE/#
topic write smartcam/$SITE/+/model/desired
topic write smartcam/$SITE/model/desired"; done
for sink in "${SINKS[@]}"; do add_user "$sink" "topic read smartcam/#
topic write smartcam/+/+/ack"; done

sed -e "s|@CONF_DIR@|$CONF_DIR|g" -e "s|@DATA_DIR@|$DATA_DIR|g" "$TEMPLATE" >"$OUTDIR/mosquitto.conf"

# ---------------------------------------------------------------------------- permissions
chmod 755 "$OUTDIR" "$OUTDIR/clients"
chmod 700 "$OUTDIR/private"
chmod 600 "$OUTDIR"/private/* "$OUTDIR"/clients/*.env
chmod 644 "$OUTDIR/ca.crt" "$OUTDIR/server.crt" "$OUTDIR/acl" "$OUTDIR/mosquitto.conf"
chmod 640 "$OUTDIR/server.key" "$OUTDIR/passwd"
if [[ $EUID -eq 0 ]] && getent group mosquitto >/dev/null; then
  chgrp mosquitto "$OUTDIR/server.key" "$OUTDIR/passwd"
else
  echo "note: group 'mosquitto' not found or not root: make server.key and passwd readable by the broker user" >&2
fi

echo "wrote $OUTDIR: users ${CAMERAS[*]} ${SINKS[*]}; passwords in $OUTDIR/clients/"
echo "next: install as $CONF_DIR and run 'mosquitto -c $CONF_DIR/mosquitto.conf' (see docs/security.md)"

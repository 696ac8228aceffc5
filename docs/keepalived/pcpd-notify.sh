#!/usr/bin/env bash
# keepalived notify script for a pcpd pair (see docs/HA.md, "keepalived").
#
# keepalived calls it as: pcpd-notify.sh TYPE NAME STATE [PRIORITY]
#   STATE MASTER              the service address is now on this node. The serving
#                             file (pcpd's `[ha] serving_file`, keepalived's track_file)
#                             lets a node become MASTER only while its pcpd is active,
#                             so normally there is nothing to do. If pcpd is a backup
#                             (it stepped down a moment ago) whose active is still
#                             heard, nothing is done either: pcpd decides roles, and its
#                             file gives the address back. Only a backup that no longer hears any active is
#                             promoted (`pcpctl promote`): what it holds is all there is,
#                             and pcpd would serve by itself after its join time anyway.
#   STATE BACKUP, FAULT, STOP log only. pcpd has no "demote" on purpose: a node steps
#                             down when it hears a newer active's higher term (fencing),
#                             which is always safe; demoting here would throw away a
#                             healthy active's mappings whenever keepalived restarts or
#                             VRRP hiccups. A stale active cannot make new promises
#                             anyway: its backup no longer acknowledges it.
#
# Environment: PCPCTL (default /usr/local/bin/pcpctl), PCPD_ADMIN (default
# 127.0.0.1:8351).
set -euo pipefail

PCPCTL=${PCPCTL:-/usr/local/bin/pcpctl}
ADMIN=${PCPD_ADMIN:-127.0.0.1:8351}

type=${1:-?}
name=${2:-?}
state=${3:-?}

log() {
  logger -t pcpd-notify -- "$*" 2>/dev/null || echo "pcpd-notify: $*" >&2
}

# field NAME JSON: the value of a top-level scalar field of pcpd's compact JSON.
field() {
  sed -n "s/.*\"$1\":\"\{0,1\}\([^\",}]*\)\"\{0,1\}[,}].*/\1/p" <<<"$2"
}

promote() {
  local out
  if out=$("$PCPCTL" --admin "$ADMIN" --timeout 2 promote 2>&1); then
    log "VRRP MASTER for $type $name: pcpd promoted (no active heard): $out"
  elif [[ $out == *"already active"* ]]; then
    log "VRRP MASTER for $type $name: pcpd already active"
  else
    log "VRRP MASTER for $type $name: promote failed: $out"
    return 1
  fi
}

on_master() {
  local status role peer
  if ! status=$("$PCPCTL" --admin "$ADMIN" --timeout 2 ha --json 2>&1); then
    # The liveness check will put this node in FAULT and the address moves on.
    log "VRRP MASTER for $type $name: pcpd does not answer: $status"
    return 1
  fi
  role=$(field role "$status")
  peer=$(field peer_connected "$status")
  case "$role" in
    active | promoting)
      log "VRRP MASTER for $type $name: pcpd $role (term $(field term "$status"))"
      ;;
    draining)
      # A planned switchover away from this node: its file says 1 and the address
      # follows the backup that takes over.
      log "VRRP MASTER for $type $name: pcpd is draining (switchover); not promoting"
      ;;
    backup | joining)
      if [ "$peer" = true ]; then
        # A live active exists: promoting would make it drop its state. pcpd decides;
        # the serving files move the address to the node that serves.
        log "VRRP MASTER for $type $name: pcpd is $role and its active is alive; not promoting"
      else
        promote
      fi
      ;;
    *)
      log "VRRP MASTER for $type $name: pcpd not in pair mode (role ${role:-unknown})"
      ;;
  esac
}

case "$state" in
  MASTER)
    on_master
    ;;
  BACKUP | FAULT | STOP)
    log "VRRP $state for $type $name: nothing to do (pcpd fencing demotes a stale active)"
    ;;
  *)
    log "unexpected notify arguments: $*"
    ;;
esac

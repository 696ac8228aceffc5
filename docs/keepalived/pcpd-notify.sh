#!/usr/bin/env bash
# keepalived notify script for a pcpd pair (see docs/HA.md, "keepalived").
#
# keepalived calls it as: pcpd-notify.sh TYPE NAME STATE [PRIORITY]
#   STATE MASTER              the service address is now on this node: make sure this
#                             node's pcpd is active (`pcpctl promote` unless it already is)
#   STATE BACKUP, FAULT, STOP log only. pcpd has no "demote" on purpose: a node steps
#                             down when it hears a newer active's higher term (fencing),
#                             which is always safe; demoting here would throw away a
#                             healthy active's mappings whenever keepalived restarts or
#                             VRRP hiccups. A stale active cannot make new promises
#                             anyway: its backup no longer acknowledges it.
#
# Environment: PCPCTL (default /usr/local/bin/pcpctl), PCPD_ADMIN (default
# 127.0.0.1:8351), PCPD_READY_WAIT (seconds a backup still receiving its copy from a
# live active may take before it is promoted anyway; default 30).
set -euo pipefail

PCPCTL=${PCPCTL:-/usr/local/bin/pcpctl}
ADMIN=${PCPD_ADMIN:-127.0.0.1:8351}
READY_WAIT=${PCPD_READY_WAIT:-30}

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

# ha: pcpd's GET /ha, or nothing when pcpd does not answer.
ha() {
  "$PCPCTL" --admin "$ADMIN" --timeout 2 ha --json 2>/dev/null || true
}

promote() {
  local out
  if out=$("$PCPCTL" --admin "$ADMIN" --timeout 2 promote 2>&1); then
    log "VRRP MASTER for $type $name: pcpd promoted: $out"
  elif [[ $out == *"already active"* ]]; then
    log "VRRP MASTER for $type $name: pcpd already active"
  else
    log "VRRP MASTER for $type $name: promote failed: $out"
    return 1
  fi
}

on_master() {
  local deadline=$((SECONDS + READY_WAIT)) status role ready peer
  while :; do
    status=$(ha)
    if [ -z "$status" ]; then
      # pcpd restarting: give it a moment, the health check will FAULT us otherwise.
      if [ "$SECONDS" -ge "$deadline" ]; then
        log "VRRP MASTER for $type $name: pcpd admin API at $ADMIN does not answer"
        return 1
      fi
      sleep 1
      continue
    fi
    role=$(field role "$status")
    ready=$(field ready "$status")
    peer=$(field peer_connected "$status")
    case "$role" in
      active)
        log "VRRP MASTER for $type $name: pcpd already active (term $(field term "$status"))"
        return 0
        ;;
      draining)
        # A planned switchover away from this node is under way; its backup takes over.
        log "VRRP MASTER for $type $name: pcpd is draining (switchover); not promoting"
        return 0
        ;;
      backup | joining)
        # Promote when this node holds a complete copy, or when the active is gone
        # (what we hold is then all there is). While a live active is still sending
        # the copy, promoting would make it drop its state: wait for the copy first.
        if [ "$ready" = true ] || [ "$peer" != true ] || [ "$SECONDS" -ge "$deadline" ]; then
          promote
          return
        fi
        log "VRRP MASTER for $type $name: backup copy not complete yet, waiting"
        sleep 1
        ;;
      *)
        log "VRRP MASTER for $type $name: pcpd not in pair mode (role ${role:-unknown})"
        return 0
        ;;
    esac
  done
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

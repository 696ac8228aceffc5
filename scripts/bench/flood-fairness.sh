#!/usr/bin/env bash
# Flood fairness (issue 7): the share of its idle success rate a well-behaved host keeps
# while another host floods pcpd as fast as one core can send.
#
#   cargo build --release -p pcpd -p pcpperf
#   scripts/bench/flood-fairness.sh
#
# Per mode, two runs of the same well-behaved load (one client, 127.0.8.1, one mapping
# renewed RATE times a second with up to 16 outstanding, MAP + option 192): alone ("idle"), then beside
# `pcpperf flood` from 127.0.9.1 ("flooded"). Success = SUCCESS answers with option 192
# echoed, per request sent; the figure is flooded / idle.
#   limits      pcpd standalone, [limits] defaults (the per-host rate limit on)
#   no-limits   pcpd standalone, [limits] host_rate = 0 (the limit off: the baseline)
#   pair        an active and its backup, limits on: every checkpoint waits for the
#               backup's acknowledgement, so replication starving shows as lost 192s
# pcpd (the active) on CPU $SERVER_CPU; pcpperf, the flood and the backup on $LOAD_CPU.
# Settings (environment): DURATION (10 s), RATE (50/s), MODES ("limits no-limits pair").
set -euo pipefail
cd "$(dirname "$0")/../.."
# shellcheck source=scripts/bench/common.sh
. scripts/bench/common.sh

DURATION=${DURATION:-10}
RATE=${RATE:-50}
MODES=${MODES:-limits no-limits pair}
SERVER_CPU=${SERVER_CPU:-0}
LOAD_CPU=${LOAD_CPU:-1}
A=127.0.0.231
B=127.0.0.232
require_bins pcpd pcpperf

base_config() {
  cat <<TOML
[pool]
addresses = ["198.18.0.1"]

[checkpoint]
without_backup = "honour"
$1
TOML
}

# good: the well-behaved host's run; prints "requests success" from its JSON.
good() {
  taskset -c "$LOAD_CPU" "$BIN/pcpperf" map --server "$A:15351" --checkpoint \
    --clients 1 --window 16 --rate "$RATE" --duration "$DURATION" --warmup 1 \
    --source-base 127.0.8.1 --json |
    jq -r '[.requests, (.checkpoint_echoed)] | @tsv'
}

ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (b == 0) print "n/a"; else printf "%.3f", a / b }'; }

machine
echo
printf '%-10s %-8s %8s %8s %8s  %s\n' mode run requests success rate extra
for mode in $MODES; do
  limits=""
  [ "$mode" = no-limits ] && limits=$'\n[limits]\nhost_rate = 0'
  base_config "$limits" >"$WORK/a.toml"
  if [ "$mode" = pair ]; then
    { base_config ""; ha_section "$A:15352" "$B:15352" active; } >"$WORK/a.toml"
    { base_config ""; ha_section "$B:15352" "$A:15352" backup; } >"$WORK/b.toml"
  fi
  start "a-$mode" "$SERVER_CPU" "$BIN/pcpd" --config "$WORK/a.toml" --listen "$A:15351" --admin "$A:18351"
  a_pid=$LAST_PID
  b_pid=
  if [ "$mode" = pair ]; then
    start "b-$mode" "$LOAD_CPU" "$BIN/pcpd" --config "$WORK/b.toml" --listen "$B:15351" --admin "$B:18351"
    b_pid=$LAST_PID
    wait_until 20 "pair ready" ha_is "$A:18351" '.role == "active" and .ready'
  else
    wait_until 10 "pcpd up" api "$A:18351" /status >/dev/null
  fi
  read -r req_idle ok_idle < <(good)
  rate_idle=$(ratio "$ok_idle" "$req_idle")
  printf '%-10s %-8s %8s %8s %8s\n' "$mode" idle "$req_idle" "$ok_idle" "$rate_idle"
  start "flood-$mode" "$LOAD_CPU" "$BIN/pcpperf" flood --server "$A:15351" --source 127.0.9.1 \
    --duration $((DURATION + 3)) --checkpoint
  flood_pid=$LAST_PID
  sleep 1
  read -r req_fl ok_fl < <(good)
  limited=$(api "$A:18351" /metrics | awk '$1 == "pcp_rate_limited_total" { print $2 }')
  extra="rate_limited=$limited"
  if [ "$mode" = pair ]; then
    extra="$extra $(api "$A:18351" /ha | jq -c '{ready, lag, ack_timeouts}')"
  fi
  wait_until $((DURATION + 10)) "flood done" gone "$flood_pid"
  rate_fl=$(ratio "$ok_fl" "$req_fl")
  printf '%-10s %-8s %8s %8s %8s  %s\n' "$mode" flooded "$req_fl" "$ok_fl" "$rate_fl" "$extra"
  tail -1 "$WORK/flood-$mode.log"
  echo "$mode: flooded/idle = $(ratio "$rate_fl" "$rate_idle")"
  kill9 "$a_pid"
  [ -n "$b_pid" ] && kill9 "$b_pid"
  sleep 0.5
done

#!/usr/bin/env bash
# Planned switchover of a pcpd pair holding many checkpointed mappings: time until the
# new active answers, and whether every mapping is still held afterwards
# (docs/BENCHMARKS.md, "pcpd pair mode"; the failing test
# `switchover_of_a_large_table_keeps_it` in crates/pcpd/tests/failover.rs).
#
#   cargo build --release -p pcpd -p pcpperf
#   scripts/bench/ha-switchover.sh
#
# 1. fill: an active (CPU $SERVER_CPU) and its backup (CPU $LOAD_CPU); pcpperf (CPU
#    $LOAD_CPU) creates $CLIENTS x $MAPPINGS checkpointed mappings (window $WINDOW,
#    $FILL s); wait until the backup stores them all;
# 2. pcp_probe.py POSTs /ha/switchover to the active and renews one of the mappings at
#    the backup every 2 ms until it answers;
# 3. 3 s later: the node that is active must hold every checkpointed mapping. Exit 1
#    (FAILED) otherwise.
# Settings (environment): CLIENTS (100), MAPPINGS (9000), WINDOW (1), FILL (30),
# ADDRS (32), DETECTION_MS (500), HEARTBEAT_MS (100), SERVER_CPU (0), LOAD_CPU (1).
# Loopback only: nodes on 127.0.0.241/.242, clients from 127.0.10.1 up.
set -euo pipefail
cd "$(dirname "$0")/../.."
# shellcheck source=scripts/bench/common.sh
. scripts/bench/common.sh

CLIENTS=${CLIENTS:-100}
MAPPINGS=${MAPPINGS:-9000}
WINDOW=${WINDOW:-1}
FILL=${FILL:-30}
ADDRS=${ADDRS:-32}
SERVER_CPU=${SERVER_CPU:-0}
LOAD_CPU=${LOAD_CPU:-1}
SOURCE=127.0.10.1
A=127.0.0.241
B=127.0.0.242

require_bins pcpd pcpperf
write_pair_configs "$A" "$B"

machine
echo "== fill: $CLIENTS clients x $MAPPINGS mappings, window $WINDOW, ${FILL}s"
start a "$SERVER_CPU" "$BIN/pcpd" --config "$WORK/a.toml" --listen "$A:15351" --admin "$A:18351"
start b "$LOAD_CPU" "$BIN/pcpd" --config "$WORK/b.toml" --listen "$B:15351" --admin "$B:18351"
wait_until 15 "active with a ready backup" ha_is "$A:18351" '.role == "active" and .backup_status == "ready"'
taskset -c "$LOAD_CPU" "$BIN/pcpperf" map --server "$A:15351" --checkpoint \
  --clients "$CLIENTS" --mappings "$MAPPINGS" --window "$WINDOW" --lifetime 3600 \
  --duration "$FILL" --warmup 0 --source-base "$SOURCE" --json |
  jq -c '{rps: (.rps | floor), responses, timeouts, checkpoint_echoed}'
if ! ha_is "$A:18351" '.role == "active"'; then
  echo "FAILED: the backup took over from the live active during the fill (spurious takeover):" >&2
  grep -h "took over\|stepping down" "$WORK/a.log" "$WORK/b.log" | sort >&2 || true
  exit 1
fi
n=$(api "$A:18351" /status | jq .checkpointed)
echo "active holds $n checkpointed mappings"
wait_until 120 "backup stores $n" ha_is "$B:18351" ".stored == $n and .ready"
wait_until 10 "active sees it ready" ha_is "$A:18351" '.role == "active" and .backup_status == "ready"'

echo "== switchover"
after=$(python3 -B scripts/bench/pcp_probe.py failover "$B:15351" "$SOURCE" \
  --post "$A:18351/ha/switchover" --admin "$B:18351")
echo "probe on the new active: $after"
sleep 3
held=0
for node in "$A" "$B"; do
  ha=$(api "$node:18351" /ha)
  status=$(api "$node:18351" /status)
  echo "$node: $(jq -c '{role, term, ready, stored, adopted}' <<<"$ha") $(jq -c '{mappings, checkpointed}' <<<"$status")"
  if [ "$(jq -r .role <<<"$ha")" = active ]; then
    held=$(jq .mappings <<<"$status")
  fi
done
grep -h "took over\|stepping down" "$WORK/a.log" "$WORK/b.log" | sort || true
if [ "$held" != "$n" ]; then
  echo "FAILED: the active holds $held of $n mappings after the switchover" >&2
  exit 1
fi
echo "switchover: answered after $(jq .answer_ms <<<"$after") ms, all $n mappings held"

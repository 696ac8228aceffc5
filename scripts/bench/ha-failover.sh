#!/usr/bin/env bash
# Failover time and bulk resync rate of a pcpd pair holding many checkpointed mappings
# (docs/BENCHMARKS.md, "pcpd pair mode").
#
#   cargo build --release -p pcpd -p pcpperf
#   scripts/bench/ha-failover.sh
#
# 1. fill:     an active (CPU $SERVER_CPU) and its backup (CPU $LOAD_CPU); pcpperf (CPU
#              $LOAD_CPU) creates checkpointed mappings for $FILL s: $CLIENTS clients x
#              $MAPPINGS mappings, option 192, lifetime 3600 s;
# 2. resync:   kill -9 the backup, start it again, time until it holds a complete copy
#              (its GET /ha: ready, stored = the active's checkpointed count);
# 3. failover: kill -9 the active (scripts/bench/pcp_probe.py does it and then probes),
#              time until the backup answers a renewal of a mapping made in step 1 with
#              the same external port; its GET /status then counts every mapping.
# Settings (environment): CLIENTS (100), MAPPINGS (10000 per client), WINDOW (16), FILL
# (60 s), ADDRS (pool addresses, 32), DETECTION_MS (500), HEARTBEAT_MS (100),
# SERVER_CPU (0), LOAD_CPU (1), RESYNC_CPU (CPUs of the restarted backup in step 2;
# $LOAD_CPU: one CPU, as in step 1; "0,1" lets its replication thread and core task
# run side by side, as on a backup with CPUs of its own). Loopback only: nodes on 127.0.0.211/.212, clients from
# 127.0.8.1 up.
set -euo pipefail
cd "$(dirname "$0")/../.."
# shellcheck source=scripts/bench/common.sh
. scripts/bench/common.sh

CLIENTS=${CLIENTS:-100}
MAPPINGS=${MAPPINGS:-10000}
WINDOW=${WINDOW:-16}
FILL=${FILL:-60}
ADDRS=${ADDRS:-32}
SERVER_CPU=${SERVER_CPU:-0}
LOAD_CPU=${LOAD_CPU:-1}
RESYNC_CPU=${RESYNC_CPU:-$LOAD_CPU}
SOURCE=127.0.8.1
A=127.0.0.211
B=127.0.0.212

require_bins pcpd pcpperf
write_pair_configs "$A" "$B"

start_a() {
  start a "$SERVER_CPU" "$BIN/pcpd" --config "$WORK/a.toml" --listen "$A:15351" --admin "$A:18351"
  a_pid=$LAST_PID
}
start_b() {
  start b "${1:-$LOAD_CPU}" "$BIN/pcpd" --config "$WORK/b.toml" --listen "$B:15351" --admin "$B:18351"
  b_pid=$LAST_PID
}

machine
echo "== fill: $CLIENTS clients x $MAPPINGS mappings, window $WINDOW, ${FILL}s, $ADDRS pool addresses"
start_a
start_b
wait_until 15 "active with a ready backup" ha_is "$A:18351" '.role == "active" and .backup_status == "ready"'
taskset -c "$LOAD_CPU" "$BIN/pcpperf" map --server "$A:15351" --checkpoint \
  --clients "$CLIENTS" --mappings "$MAPPINGS" --window "$WINDOW" --lifetime 3600 \
  --duration "$FILL" --warmup 0 --source-base "$SOURCE" --json >"$WORK/fill.json"
jq -c '{rps: (.rps | floor), responses, timeouts, checkpoint_echoed, results, p99_us: .latency_us.p99}' "$WORK/fill.json"
if ! ha_is "$A:18351" '.role == "active"'; then
  echo "FAILED: the backup took over from the live active during the fill (spurious takeover):" >&2
  grep -h "took over\|stepping down" "$WORK/a.log" "$WORK/b.log" | sort >&2 || true
  exit 1
fi
n=$(api "$A:18351" /status | jq .checkpointed)
echo "active holds $n checkpointed mappings ($(api "$A:18351" /status | jq .mappings) in all)"
wait_until 120 "backup stores $n" ha_is "$B:18351" ".stored == $n and .ready and .standby_backlog == 0"
echo "backup stores $n; RSS active $(rss_mib "$a_pid") MiB, backup $(rss_mib "$b_pid") MiB"
before=$(python3 -B scripts/bench/pcp_probe.py once "$A:15351" "$SOURCE")
echo "probe on the active: $before"

# CPU time (user + system) a process has used, in ms: on a shared machine the wall
# time also counts other processes' turns, CPU time does not.
cpu_ms() {
  local tck; tck=$(getconf CLK_TCK)
  awk -v t="$tck" '{ sub(/^.*\) /, ""); print int(($12 + $13) * 1000 / t) }' "/proc/$1/stat"
}

echo "== resync: kill -9 the backup, start it again (on CPU $RESYNC_CPU)"
kill9 "$b_pid"
wait_until 10 "active notices" ha_is "$A:18351" '.backup_status == "not_ready"'
a_cpu0=$(cpu_ms "$a_pid")
t0=$(now_ms)
start_b "$RESYNC_CPU"
wait_until 300 "backup complete" ha_is "$B:18351" ".ready and .stored == $n"
t1=$(now_ms)
wait_until 300 "standby core caught up" ha_is "$B:18351" ".standby_backlog == 0"
t3=$(now_ms)
b_cpu=$(cpu_ms "$b_pid")
a_cpu=$(( $(cpu_ms "$a_pid") - a_cpu0 ))
wait_until 10 "active sees it ready" ha_is "$A:18351" '.backup_status == "ready"'
t2=$(now_ms)
echo "resync: $n mappings; backup complete after $((t1 - t0)) ms (process start included), standby core caught up after $((t3 - t0)) ms, active ready after $((t2 - t0)) ms"
echo "resync rate: $(( n * 1000 / (t1 - t0 > 0 ? t1 - t0 : 1) )) mappings/s (copy held), $(( n * 1000 / (t3 - t0 > 0 ? t3 - t0 : 1) )) mappings/s (installed in the standby core)"
echo "resync CPU: backup $b_cpu ms (start included: $(( n * 1000 / (b_cpu > 0 ? b_cpu : 1) )) mappings per CPU-s), active $a_cpu ms ($(( n * 1000 / (a_cpu > 0 ? a_cpu : 1) )) per CPU-s); the machine: $(cut -d' ' -f1-3 /proc/loadavg)"

echo "== failover: kill -9 the active"
after=$(python3 -B scripts/bench/pcp_probe.py failover "$B:15351" "$SOURCE" --kill "$a_pid" --admin "$B:18351")
echo "probe on the backup: $after"
# (The probe's own renewal asked for 192 from a node that has no backup now: that one
# mapping is no longer checkpointed, so count adopted and held mappings.)
port_before=$(jq .external_port <<<"$before")
port_after=$(jq .external_port <<<"$after")
adopted=$(jq .adopted <<<"$after")
held=$(jq .mappings <<<"$after")
if [ "$port_before" != "$port_after" ] || [ "$adopted" != "$n" ] || [ "$held" != "$n" ]; then
  echo "FAILED: external port $port_before -> $port_after, adopted $adopted and holds $held of $n" >&2
  exit 1
fi
echo "failover: answered after $(jq .answer_ms <<<"$after") ms (GET /ha active after $(jq .role_active_ms <<<"$after") ms), all $n mappings installed, same external port"
grep -h "took over" "$WORK/b.log" || true

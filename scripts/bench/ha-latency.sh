#!/usr/bin/env bash
# Open-loop latency of checkpointed MAP with a live backup acking, against the echo
# floor at the same offered rate (docs/BENCHMARKS.md, "Pair latency, open loop").
#
#   cargo build --release -p pcpd -p pcpperf
#   scripts/bench/ha-latency.sh
#
# Per round:
#   1. echo, closed loop (CLIENTS x WINDOW): the echo maximum E of this round;
#   2. for each fraction f in FRACTIONS: echo, then the pair (and, with BASE_BIN, the
#      pair built from BASE_BIN), each offered f x E requests/s in total, open loop
#      (`pcpperf --rate`: request k of a client is due at k / rate, whatever the
#      answers do, within a cap of OPEN_WINDOW in flight; requests go out in 1 ms
#      bursts, the timer's resolution, the same for echo and pair).
# A closed loop's latency with N requests always in flight is at least
# N / throughput (Little's law): it measures the queue the load generator builds, not
# the server. At a fixed offered rate below saturation the queue is the server's own.
# Servers run on CPU $SERVER_CPU, pcpperf and the backup on CPU $LOAD_CPU.
# Settings: ROUNDS (3), DURATION (5 s), WARMUP (1 s), CLIENTS (4), WINDOW (8, closed
# loop), OPEN_WINDOW (64, the open loop's cap on requests in flight per client),
# MAPPINGS (64 per client), FRACTIONS ("0.4 0.8"), BASE_BIN (unset: no baseline
# build), SERVER_CPU (0), LOAD_CPU (1).
set -euo pipefail
cd "$(dirname "$0")/../.."
# shellcheck source=scripts/bench/common.sh
. scripts/bench/common.sh

ROUNDS=${ROUNDS:-3}
DURATION=${DURATION:-5}
WARMUP=${WARMUP:-1}
CLIENTS=${CLIENTS:-4}
WINDOW=${WINDOW:-8}
OPEN_WINDOW=${OPEN_WINDOW:-64}
MAPPINGS=${MAPPINGS:-64}
FRACTIONS=${FRACTIONS:-0.4 0.8}
SERVER_CPU=${SERVER_CPU:-0}
LOAD_CPU=${LOAD_CPU:-1}
require_bins pcpd pcpperf

SERVER_TOML="[pool]
addresses = [\"192.0.2.1\", \"192.0.2.2\"]

[tiers.default]
mapping_quota = 100000
checkpoint_quota = 100000
checkpoint_rate = 1000000000.0
checkpoint_burst = 1000000000

[limits]
host_rate = 0.0"
{ echo "$SERVER_TOML"; ha_section 127.0.0.213:15352 127.0.0.214:15352 active; } >"$WORK/active.toml"
{ echo "$SERVER_TOML"; ha_section 127.0.0.214:15352 127.0.0.213:15352 backup; } >"$WORK/backup.toml"

# load NAME SERVER RATE WINDOW: one pcpperf run (RATE 0: closed loop; else the total
# offered rate); its JSON report goes to results.jsonl.
load() {
  local out per_client
  per_client=$(jq -n --argjson r "$3" --argjson c "$CLIENTS" '$r / $c')
  out=$(taskset -c "$LOAD_CPU" "$BIN/pcpperf" map --server "$2" --checkpoint \
    --clients "$CLIENTS" --window "$4" --mappings "$MAPPINGS" --rate "$per_client" \
    --duration "$DURATION" --warmup "$WARMUP" --source-base 127.0.5.1 --json)
  jq -c --arg config "$1" --argjson round "$round" --argjson offered "$3" \
    '{config: $config, round: $round, offered: $offered} + .' <<<"$out" |
    tee -a "$WORK/results.jsonl" |
    jq -r '"  \(.config): offered \(.offered | floor)/s, got \(.rps | floor) req/s, p50 \(.latency_us.p50) us, p99 \(.latency_us.p99) us, p99.9 \(.latency_us.p999) us, 192 echoed \(.checkpoint_echoed)/\(.responses), timeouts \(.timeouts)"'
}

# pair NAME BIN RATE: an active/backup pair from BIN, loaded at RATE.
pair() {
  local a b
  start "$1-active" "$SERVER_CPU" "$2/pcpd" --config "$WORK/active.toml" \
    --listen 127.0.0.213:15351 --admin 127.0.0.213:18351
  a=$LAST_PID
  start "$1-backup" "$LOAD_CPU" "$2/pcpd" --config "$WORK/backup.toml" \
    --listen 127.0.0.214:15351 --admin 127.0.0.214:18351
  b=$LAST_PID
  wait_until 15 "active with a ready backup" \
    ha_is 127.0.0.213:18351 '.role == "active" and .backup_status == "ready"'
  load "$1" 127.0.0.213:15351 "$3" "$OPEN_WINDOW"
  kill9 "$a"
  kill9 "$b"
}

machine
echo "load: $CLIENTS clients; closed loop window $WINDOW; open loop window cap $OPEN_WINDOW; $MAPPINGS mappings each; option 192; ${DURATION}s after ${WARMUP}s warm-up"
[ -n "${BASE_BIN:-}" ] && echo "baseline binaries: $BASE_BIN"
for round in $(seq 1 "$ROUNDS"); do
  echo "round $round (load average $(cut -d' ' -f1-3 /proc/loadavg))"
  start echo "$SERVER_CPU" "$BIN/pcpperf" echo --bind 127.0.0.211:15351
  echo_pid=$LAST_PID
  sleep 0.3
  load echo-max 127.0.0.211:15351 0 "$WINDOW"
  max=$(tail -1 "$WORK/results.jsonl" | jq '.rps')
  for f in $FRACTIONS; do
    rate=$(jq -n --argjson m "$max" --argjson f "$f" '$m * $f | floor')
    load "echo@$f" 127.0.0.211:15351 "$rate" "$OPEN_WINDOW"
    pair "pair@$f" "$BIN" "$rate"
    if [ -n "${BASE_BIN:-}" ]; then
      pair "base-pair@$f" "$BASE_BIN" "$rate"
    fi
  done
  kill9 "$echo_pid"
done

echo "summary (median of $ROUNDS rounds; latency in us; ratio = pair / echo of the same round and rate):"
jq -s -r '
  def median: sort | if length == 0 then null else .[(length - 1) / 2 | floor] end;
  (map(select(.config | startswith("echo@"))) | map({key: "\(.round) \(.config | ltrimstr("echo"))", value: .latency_us}) | from_entries) as $echo
  | group_by(.config)
  | map({config: .[0].config,
         offered: (map(.offered) | median | floor),
         rps: (map(.rps) | median | floor),
         p50: (map(.latency_us.p50) | median),
         p99: (map(.latency_us.p99) | median),
         p999: (map(.latency_us.p999) | median),
         r99: (map(($echo["\(.round) @\(.config | split("@")[1])"] // null) as $e
                   | if $e == null then null else .latency_us.p99 / $e.p99 end)
               | map(select(. != null)) | median),
         timeouts: (map(.timeouts) | add)})
  | .[] | "  \(.config): offered \(.offered)/s, got \(.rps)/s, p50 \(.p50), p99 \(.p99), p99.9 \(.p999)\(if .r99 then ", p99 / echo p99 \(.r99 * 100 | round / 100)" else "" end), timeouts \(.timeouts)"
' "$WORK/results.jsonl"
if [ -n "${RESULTS:-}" ]; then
  cp "$WORK/results.jsonl" "$RESULTS"
fi

#!/usr/bin/env bash
# Cost of the host records for hosts holding unprotected mappings (docs/HA.md,
# "Replication"; docs/BENCHMARKS.md, "Host records for unprotected hosts"): MAP requests
# WITHOUT option 192 against a pair, where a host's first mapping now queues one record
# for the backup (never waited for). Compares two pcpd builds in the same run, each as a
# ratio to the echo floor of the same round.
#
#   BASE_BIN=/path/to/old/release NEW_BIN=target/release scripts/bench/ha-unprotected.sh
#
# Per round: echo, pair with BASE_BIN's pcpd, pair with NEW_BIN's pcpd; the same load:
#   first   $CLIENTS fresh hosts (default 8192), window 1, one mapping each, no warm-up,
#           $DURATION s (default 1): mostly first mappings (host transitions)
# pcpperf comes from $BIN (default target/release). Servers (the active) on CPU
# $SERVER_CPU, pcpperf and the backup on $LOAD_CPU. Loopback only.
set -euo pipefail
cd "$(dirname "$0")/../.."
# shellcheck source=scripts/bench/common.sh
. scripts/bench/common.sh

ROUNDS=${ROUNDS:-3}
DURATION=${DURATION:-1}
CLIENTS=${CLIENTS:-8192}
SERVER_CPU=${SERVER_CPU:-0}
LOAD_CPU=${LOAD_CPU:-1}
BASE_BIN=${BASE_BIN:?set BASE_BIN to the directory of the baseline pcpd}
NEW_BIN=${NEW_BIN:-target/release}
require_bins pcpperf
for d in "$BASE_BIN" "$NEW_BIN"; do
  [ -x "$d/pcpd" ] || { echo "$d/pcpd missing" >&2; exit 1; }
done

SERVER_TOML="[pool]
addresses = [\"192.0.2.1\", \"192.0.2.2\"]

[tiers.default]
mapping_quota = 100000
checkpoint_quota = 100000

[limits]
host_rate = 0.0"
{ echo "$SERVER_TOML"; ha_section 127.0.0.213:15352 127.0.0.214:15352 active; } >"$WORK/active.toml"
{ echo "$SERVER_TOML"; ha_section 127.0.0.214:15352 127.0.0.213:15352 backup; } >"$WORK/backup.toml"

load() {
  local out
  out=$(taskset -c "$LOAD_CPU" "$BIN/pcpperf" map --server "$2" \
    --clients "$CLIENTS" --window 1 --mappings 1 \
    --duration "$DURATION" --warmup 0 --source-base 127.0.64.1 --json)
  jq -c --arg config "$1" --argjson round "$round" '{config: $config, round: $round} + .' \
    <<<"$out" | tee -a "$WORK/results.jsonl" |
    jq -r '"  \(.config): \(.rps | floor) req/s, responses \(.responses), p50 \(.latency_us.p50) us, p99 \(.latency_us.p99) us, timeouts \(.timeouts)"'
}

pair() {
  local name=$1 bin=$2
  start "$name-active" "$SERVER_CPU" "$bin/pcpd" --config "$WORK/active.toml" \
    --listen 127.0.0.213:15351 --admin 127.0.0.213:18351
  local a=$LAST_PID
  start "$name-backup" "$LOAD_CPU" "$bin/pcpd" --config "$WORK/backup.toml" \
    --listen 127.0.0.214:15351 --admin 127.0.0.214:18351
  local b=$LAST_PID
  wait_until 15 "active with a ready backup" \
    ha_is 127.0.0.213:18351 '.role == "active" and .backup_status == "ready"'
  load "$name" 127.0.0.213:15351
  # Every host record reached the backup (lag 0 once acknowledged).
  sleep 0.5
  api 127.0.0.213:18351 /ha | jq -c --arg n "$name" '{($n): {lag, ack_timeouts}}'
  kill9 "$a"
  kill9 "$b"
}

machine
echo "load: $CLIENTS fresh hosts x window 1, 1 mapping each, no option 192, ${DURATION}s, no warm-up"
for round in $(seq 1 "$ROUNDS"); do
  echo "round $round"
  start echo "$SERVER_CPU" "$BIN/pcpperf" echo --bind 127.0.0.211:15351
  echo_pid=$LAST_PID
  sleep 0.3
  load echo 127.0.0.211:15351
  kill9 "$echo_pid"
  pair base "$BASE_BIN"
  pair new "$NEW_BIN"
done

echo "summary (median of $ROUNDS rounds; ratio = req/s / echo req/s of the same round):"
jq -s -r '
  def median: sort | if length == 0 then null else .[(length - 1) / 2 | floor] end;
  (map(select(.config == "echo")) | map({key: (.round | tostring), value: .rps}) | from_entries) as $echo
  | group_by(.config)
  | map({config: .[0].config,
         rps: (map(.rps) | median | floor),
         ratio: (map(.rps / $echo[.round | tostring]) | median * 1000 | round / 1000),
         p50: (map(.latency_us.p50) | median),
         p99: (map(.latency_us.p99) | median),
         responses: (map(.responses) | median)})
  | .[] | "  \(.config): \(.rps) req/s, ratio \(.ratio), p50 \(.p50) us, p99 \(.p99) us, responses \(.responses)"
' "$WORK/results.jsonl"

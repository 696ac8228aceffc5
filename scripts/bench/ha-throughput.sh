#!/usr/bin/env bash
# Checkpointed throughput and latency of pcpd, as ratios to the echo floor measured in
# the same run (docs/BENCHMARKS.md, "pcpd pair mode").
#
#   cargo build --release -p pcpd -p pcpperf
#   scripts/bench/ha-throughput.sh
#
# Per round, in this order, each with the same pcpperf load (MAP + option 192, every
# request after the first pass a renewal of a checkpointed mapping):
#   echo        pcpperf echo: the floor (no server logic at all)
#   standalone  pcpd without a backup, [checkpoint] without_backup = "honour"
#   standalone-1t  the same with [pcpd] threads = 1 (one runtime thread)
#   pair        pcpd active with a live backup: every reply waits for the backup's ACK
# Servers run on CPU $SERVER_CPU, pcpperf (and the backup) on CPU $LOAD_CPU.
# Settings (environment): ROUNDS (3), DURATION (5 s), WARMUP (1 s), CLIENTS (4),
# WINDOW (8), MAPPINGS (64 per client), SERVER_CPU (0), LOAD_CPU (1).
# Loopback only: servers on 127.0.0.20x, clients from 127.0.4.1 up.
set -euo pipefail
cd "$(dirname "$0")/../.."
# shellcheck source=scripts/bench/common.sh
. scripts/bench/common.sh

ROUNDS=${ROUNDS:-3}
DURATION=${DURATION:-5}
WARMUP=${WARMUP:-1}
CLIENTS=${CLIENTS:-4}
WINDOW=${WINDOW:-8}
MAPPINGS=${MAPPINGS:-64}
SERVER_CPU=${SERVER_CPU:-0}
LOAD_CPU=${LOAD_CPU:-1}

for b in pcpd pcpperf; do
  [ -x "$BIN/$b" ] || { echo "$BIN/$b missing: cargo build --release -p pcpd -p pcpperf" >&2; exit 1; }
done

SERVER_TOML="[pool]
addresses = [\"192.0.2.1\", \"192.0.2.2\"]

[tiers.default]
mapping_quota = 100000
checkpoint_quota = 100000
checkpoint_rate = 1000000000.0
checkpoint_burst = 1000000000

# A benchmark's clients send far beyond the per-host rate a real host needs.
[limits]
host_rate = 0.0"

printf '%s\n\n[checkpoint]\nwithout_backup = "honour"\n' "$SERVER_TOML" >"$WORK/standalone.toml"
printf '[pcpd]\nthreads = 1\n\n%s\n\n[checkpoint]\nwithout_backup = "honour"\n' "$SERVER_TOML" \
  >"$WORK/standalone-1t.toml"
# HUGE_PAGES=false: the pair without transparent huge pages ([pcpd] huge_pages).
PAIR_PCPD=${HUGE_PAGES:+$(printf '[pcpd]\nhuge_pages = %s\n' "$HUGE_PAGES")}
{ echo "$PAIR_PCPD"; echo "$SERVER_TOML"; ha_section 127.0.0.203:15352 127.0.0.204:15352 active; } >"$WORK/active.toml"
{ echo "$PAIR_PCPD"; echo "$SERVER_TOML"; ha_section 127.0.0.204:15352 127.0.0.203:15352 backup; } >"$WORK/backup.toml"

# load NAME SERVER: one pcpperf run; its JSON report goes to results.jsonl.
load() {
  local out
  out=$(taskset -c "$LOAD_CPU" "$BIN/pcpperf" map --server "$2" --checkpoint \
    --clients "$CLIENTS" --window "$WINDOW" --mappings "$MAPPINGS" \
    --duration "$DURATION" --warmup "$WARMUP" --source-base 127.0.4.1 --json)
  jq -c --arg config "$1" --argjson round "$round" '{config: $config, round: $round} + .' \
    <<<"$out" | tee -a "$WORK/results.jsonl" |
    jq -r '"  \(.config): \(.rps | floor) req/s, p50 \(.latency_us.p50) us, p99 \(.latency_us.p99) us, 192 echoed \(.checkpoint_echoed)/\(.responses), timeouts \(.timeouts)"'
}

machine
echo "load: $CLIENTS clients x window $WINDOW, $MAPPINGS mappings each, option 192, ${DURATION}s after ${WARMUP}s warm-up"
for round in $(seq 1 "$ROUNDS"); do
  echo "round $round"

  start echo "$SERVER_CPU" "$BIN/pcpperf" echo --bind 127.0.0.201:15351
  echo_pid=$LAST_PID
  sleep 0.3
  load echo 127.0.0.201:15351
  kill9 "$echo_pid"

  start standalone "$SERVER_CPU" "$BIN/pcpd" --config "$WORK/standalone.toml" \
    --listen 127.0.0.202:15351 --admin 127.0.0.202:18351
  pcpd_pid=$LAST_PID
  wait_until 10 "standalone pcpd up" api 127.0.0.202:18351 /status >/dev/null
  load standalone 127.0.0.202:15351
  kill9 "$pcpd_pid"

  start standalone-1t "$SERVER_CPU" "$BIN/pcpd" --config "$WORK/standalone-1t.toml" \
    --listen 127.0.0.205:15351 --admin 127.0.0.205:18351
  pcpd_pid=$LAST_PID
  wait_until 10 "standalone-1t pcpd up" api 127.0.0.205:18351 /status >/dev/null
  load standalone-1t 127.0.0.205:15351
  kill9 "$pcpd_pid"

  start active "$SERVER_CPU" "$BIN/pcpd" --config "$WORK/active.toml" \
    --listen 127.0.0.203:15351 --admin 127.0.0.203:18351
  active_pid=$LAST_PID
  start backup "$LOAD_CPU" "$BIN/pcpd" --config "$WORK/backup.toml" \
    --listen 127.0.0.204:15351 --admin 127.0.0.204:18351
  backup_pid=$LAST_PID
  wait_until 15 "active with a ready backup" \
    ha_is 127.0.0.203:18351 '.role == "active" and .backup_status == "ready"'
  load pair 127.0.0.203:15351
  api 127.0.0.203:18351 /ha | jq -c '{active_ha: {released_responses, ack_timeouts, lag}}'
  kill9 "$active_pid"
  kill9 "$backup_pid"
done

echo "summary (median of $ROUNDS rounds; ratio = req/s / echo req/s of the same round, median):"
jq -s -r '
  def median: sort | if length == 0 then null else .[(length - 1) / 2 | floor] end;
  (map(select(.config == "echo")) | map({key: (.round | tostring), value: .rps}) | from_entries) as $echo
  | group_by(.config)
  | map({config: .[0].config,
         rps: (map(.rps) | median | floor),
         ratio: (map(.rps / $echo[.round | tostring]) | median * 1000 | round / 1000),
         p50: (map(.latency_us.p50) | median),
         p99: (map(.latency_us.p99) | median),
         echoed: (map(.checkpoint_echoed / ([.responses, 1] | max)) | median * 1000 | round / 1000)})
  | sort_by(-.rps)
  | .[] | "  \(.config): \(.rps) req/s, ratio \(.ratio), p50 \(.p50) us, p99 \(.p99) us, share echoing 192 \(.echoed)"
' "$WORK/results.jsonl"
if [ -n "${RESULTS:-}" ]; then
  cp "$WORK/results.jsonl" "$RESULTS"
fi

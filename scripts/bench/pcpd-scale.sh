#!/usr/bin/env bash
# pcpd at scale (docs/BENCHMARKS.md, "pcpd at 1 M mappings"): resident memory per mapping
# (the pcpd issue bounds it at 300 B at 1 M) and the cost of a renewal with 1 M live
# mappings against the cost with 1 000 (the issue wants >= 0.8 x).
#
#   cargo build --release -p pcpd -p pcpperf
#   scripts/bench/pcpd-scale.sh
#
# Two standalone pcpd (embedded in-memory data plane): "large" gets $CLIENTS x $MAPPINGS
# mappings (lifetime 3600 s, option 192), its VmRSS read before and after; "small" gets
# $CLIENTS x $SMALL. Then pcpperf renews mappings of each in alternating rounds of
# $ROUND s, $ROUNDS per server, so whatever else the machine does falls on both alike;
# the median round of each counts.
# Settings (environment): CLIENTS (100), MAPPINGS (10000), SMALL (10), WINDOW (16),
# ROUND (5), ROUNDS (5), ADDRS (32), SERVER_CPU (0), LOAD_CPU (1). Loopback only:
# pcpd on 127.0.0.213 (large) and 127.0.0.214 (small), clients from 127.0.9.1.
set -euo pipefail
cd "$(dirname "$0")/../.."
# shellcheck source=scripts/bench/common.sh
. scripts/bench/common.sh

CLIENTS=${CLIENTS:-100}
MAPPINGS=${MAPPINGS:-10000}
SMALL=${SMALL:-10}
WINDOW=${WINDOW:-16}
ROUND=${ROUND:-5}
ROUNDS=${ROUNDS:-5}
ADDRS=${ADDRS:-32}
SERVER_CPU=${SERVER_CPU:-0}
LOAD_CPU=${LOAD_CPU:-1}
L=127.0.0.213
S=127.0.0.214

require_bins pcpd pcpperf
server_config >"$WORK/s.toml"
machine
start large "$SERVER_CPU" "$BIN/pcpd" --config "$WORK/s.toml" --listen "$L:15351" --admin "$L:18351"
pid=$LAST_PID
start small "$SERVER_CPU" "$BIN/pcpd" --config "$WORK/s.toml" --listen "$S:15351" --admin "$S:18351"
wait_until 10 "pcpd answers" api "$L:18351" /status >/dev/null
wait_until 10 "pcpd answers" api "$S:18351" /status >/dev/null

# load SERVER PER_CLIENT DURATION: pcpperf MAP load, its JSON report on stdout.
load() {
  taskset -c "$LOAD_CPU" "$BIN/pcpperf" map --server "$1:15351" --checkpoint \
    --clients "$CLIENTS" --mappings "$2" --window "$WINDOW" --lifetime 3600 \
    --duration "$3" --warmup 0 --source-base 127.0.9.1 --json
}

before=$(rss_kib "$pid")
want=$((CLIENTS * MAPPINGS))
# Each pass creates the mappings still missing (a pass may time out some under load).
for pass in 1 2 3 4 5; do
  load "$L" "$MAPPINGS" $((want / 20000 + 10)) >/dev/null
  n=$(api "$L:18351" /status | jq .mappings)
  echo "fill pass $pass: $n mappings"
  [ "$n" -ge "$want" ] && break
done
after=$(rss_kib "$pid")
load "$S" "$SMALL" 2 >/dev/null
echo "large: $n mappings; small: $(api "$S:18351" /status | jq .mappings) mappings"
echo "RSS of large before: $before KiB, after: $after KiB"
echo "resident memory per mapping: $(((after - before) * 1024 / n)) B"

small_rps=()
large_rps=()
for r in $(seq 1 "$ROUNDS"); do
  s=$(load "$S" "$SMALL" "$ROUND" | jq '.rps | floor')
  l=$(load "$L" "$MAPPINGS" "$ROUND" | jq '.rps | floor')
  echo "round $r: small $s req/s, large $l req/s"
  small_rps+=("$s")
  large_rps+=("$l")
done
median() { printf '%s\n' "$@" | sort -n | awk '{ v[NR] = $1 } END { print v[int((NR + 1) / 2)] }'; }
ms=$(median "${small_rps[@]}")
ml=$(median "${large_rps[@]}")
echo "median renewals: small $ms req/s, large $ml req/s; ratio large/small $(awk -v l="$ml" -v s="$ms" 'BEGIN { printf "%.2f", l / s }')"

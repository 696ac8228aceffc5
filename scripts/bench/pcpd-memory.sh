#!/usr/bin/env bash
# Resident memory per mapping of a standalone pcpd (embedded in-memory data plane), the
# figure the pcpd issue bounds at 300 B per mapping at 1 M (docs/BENCHMARKS.md).
#
#   cargo build --release -p pcpd -p pcpperf
#   scripts/bench/pcpd-memory.sh
#
# pcpperf creates $CLIENTS x $MAPPINGS mappings (lifetime 3600 s, option 192)
# until every one exists; the script reads pcpd's VmRSS before and after.
# Settings (environment): CLIENTS (100), MAPPINGS (10000), WINDOW (16), ADDRS (32),
# SERVER_CPU (0), LOAD_CPU (1). Loopback only: pcpd on 127.0.0.213, clients from 127.0.9.1.
set -euo pipefail
cd "$(dirname "$0")/../.."
# shellcheck source=scripts/bench/common.sh
. scripts/bench/common.sh

CLIENTS=${CLIENTS:-100}
MAPPINGS=${MAPPINGS:-10000}
WINDOW=${WINDOW:-16}
ADDRS=${ADDRS:-32}
SERVER_CPU=${SERVER_CPU:-0}
LOAD_CPU=${LOAD_CPU:-1}
S=127.0.0.213

require_bins pcpd pcpperf
server_config >"$WORK/s.toml"
machine
start s "$SERVER_CPU" "$BIN/pcpd" --config "$WORK/s.toml" --listen "$S:15351" --admin "$S:18351"
pid=$LAST_PID
wait_until 10 "pcpd answers" api "$S:18351" /status >/dev/null
before=$(rss_kib "$pid")
want=$((CLIENTS * MAPPINGS))
# Each pass creates the mappings still missing (a pass may time out some under load).
for pass in 1 2 3 4 5; do
  taskset -c "$LOAD_CPU" "$BIN/pcpperf" map --server "$S:15351" --checkpoint \
    --clients "$CLIENTS" --mappings "$MAPPINGS" --window "$WINDOW" --lifetime 3600 \
    --duration $((want / 20000 + 10)) --warmup 0 --source-base 127.0.9.1 --json >"$WORK/fill.json"
  n=$(api "$S:18351" /status | jq .mappings)
  echo "pass $pass: $n mappings"
  [ "$n" -ge "$want" ] && break
done
after=$(rss_kib "$pid")
echo "mappings:    $n ($(api "$S:18351" /status | jq .checkpointed) checkpointed)"
echo "RSS before:  $before KiB"
echo "RSS after:   $after KiB"
echo "per mapping: $(((after - before) * 1024 / n)) B"

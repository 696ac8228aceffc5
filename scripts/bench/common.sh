# shellcheck shell=bash
# Helpers shared by the HA benchmarks; sourced, not run. Needs taskset, curl, jq.
#
# Every process a benchmark starts goes through `start`, which records its PID; on exit
# (normal, error or Ctrl-C) each recorded PID, and only those, gets SIGKILL.

BIN=${BIN:-target/release}
export NO_COLOR=1
PIDS=()
WORK=$(mktemp -d "${TMPDIR:-/tmp}/pcp-bench.XXXXXX")
LAST_PID=

cleanup() {
  local pid
  for pid in "${PIDS[@]}"; do
    kill -9 "$pid" 2>/dev/null || true
  done
  if [ -n "${KEEP_LOGS:-}" ]; then
    echo "logs kept in $WORK" >&2
  else
    rm -rf "$WORK"
  fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# start NAME CPU COMMAND...: runs COMMAND pinned to CPU in the background, its output in
# $WORK/NAME.log; its PID in LAST_PID.
start() {
  local name=$1 cpu=$2
  shift 2
  taskset -c "$cpu" "$@" >>"$WORK/$name.log" 2>&1 &
  LAST_PID=$!
  PIDS+=("$LAST_PID")
  # No "Killed" notice from the shell when a benchmark kills it on purpose.
  disown "$LAST_PID"
}

# gone PID: whether the process has exited and been reaped.
gone() {
  ! kill -0 "$1" 2>/dev/null
}

# kill9 PID: SIGKILL one process this script started; returns once it is gone.
kill9() {
  kill -9 "$1" 2>/dev/null || true
  wait_until 10 "process $1 gone" gone "$1"
}

# api ADMIN PATH: GET http://ADMIN/PATH (fails when pcpd does not answer).
api() {
  curl -sf --noproxy '*' --max-time 5 "http://$1$2"
}

# ha_is ADMIN JQ_FILTER: whether GET /ha satisfies the filter.
ha_is() {
  local body
  body=$(api "$1" /ha) || return 1
  jq -e "$2" >/dev/null <<<"$body"
}

# wait_until SECONDS WHAT COMMAND...: runs COMMAND every 10 ms until it succeeds; gives
# up (exit 1) after SECONDS.
wait_until() {
  local limit=$1 what=$2
  shift 2
  local deadline=$((SECONDS + limit))
  until "$@"; do
    if [ "$SECONDS" -ge "$deadline" ]; then
      echo "timed out after ${limit}s waiting for: $what" >&2
      return 1
    fi
    sleep 0.01
  done
}

# now_ms: wall clock in milliseconds.
now_ms() {
  date +%s%3N
}

# machine: what the figures were measured on.
machine() {
  echo "date:    $(date -u '+%Y-%m-%d %H:%M UTC')"
  echo "nproc:   $(nproc)"
  echo "uptime:  $(uptime)"
  echo "commit:  $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
  echo "rustc:   $(rustc --version 2>/dev/null || echo unknown)"
  lscpu | head -20
}

# ha_section LISTEN PEER ROLE: the [ha] table of one node (HA_KEY_FILE: sealed link).
ha_section() {
  cat <<TOML

[ha]
listen = "$1"
peer = "$2"
role = "$3"
heartbeat_ms = ${HEARTBEAT_MS:-100}
detection_ms = ${DETECTION_MS:-500}
ack_timeout_ms = ${ACK_TIMEOUT_MS:-250}
${HA_KEY_FILE:+key_file = \"$HA_KEY_FILE\"}
TOML
}

# require_bins NAME...: the release binaries the script runs must be built.
require_bins() {
  local b
  for b in "$@"; do
    [ -x "$BIN/$b" ] || { echo "$BIN/$b missing: cargo build --release -p pcpd -p pcpperf" >&2; exit 1; }
  done
}

# server_config: the [pool], [tiers] and [checkpoint] tables of a node, with a pool of
# $ADDRS addresses, tier quotas of $MAPPINGS and a capacity of twice the fill.
server_config() {
  local pool
  pool=$(seq 1 "$ADDRS" | sed 's/.*/"198.18.0.&"/' | paste -sd, -)
  # HUGE_PAGES=false: pcpd without transparent huge pages ([pcpd] huge_pages).
  if [ -n "${HUGE_PAGES:-}" ]; then printf '[pcpd]\nhuge_pages = %s\n\n' "$HUGE_PAGES"; fi
  cat <<TOML
[pool]
addresses = [$pool]

[tiers.default]
mapping_quota = $MAPPINGS
checkpoint_quota = $MAPPINGS
checkpoint_rate = 1000000000.0
checkpoint_burst = 1000000000

[checkpoint]
capacity = $((CLIENTS * MAPPINGS * 2))

# A benchmark's clients send far beyond the per-host rate a real host needs.
[limits]
host_rate = 0.0
TOML
}

# write_pair_configs A B: $WORK/a.toml and $WORK/b.toml for a pair on A and B.
write_pair_configs() {
  { server_config; ha_section "$1:15352" "$2:15352" active; } >"$WORK/a.toml"
  { server_config; ha_section "$2:15352" "$1:15352" backup; } >"$WORK/b.toml"
}

# rss_mib PID: resident memory of a process in MiB.
rss_mib() {
  awk '/VmRSS/ { printf "%d", $2 / 1024 }' "/proc/$1/status"
}

# rss_kib PID: resident memory of a process in KiB.
rss_kib() {
  awk '/VmRSS/ { print $2 }' "/proc/$1/status"
}

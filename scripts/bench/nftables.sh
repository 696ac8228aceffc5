#!/usr/bin/env bash
# The nftables data plane's benchmarks (docs/BENCHMARKS.md, "nftables data plane").
# Root: every server runs in a network namespace of its own that this script creates
# and deletes (pcpperf runs there too, on that namespace's loopback).
#
#   cargo build --release -p pcpd -p pcpperf
#   cargo build --release -p pcp-dataplane --features nftables --example nft_installs
#   scripts/bench/nftables.sh
#
# 1. installs: nft_installs — MAP entries per second into the nftables data plane at
#    batch sizes 1, 64, 1024, cost per entry by tenth of a TOTAL-entry fill, against
#    the in-memory data plane in the same run.
# 2. new MAPs over PCP: pcpperf map where every request is a new mapping (CLIENTS
#    sources × MAPPINGS internal ports, more than a run can use), against, each in a
#    fresh namespace: pcpd with the memory data plane (baseline) and pcpd with
#    nftables, alternating for ROUNDS rounds, then Debian's miniupnpd-nftables (its
#    PCP server; MU_CLIENTS clients, window 1: it answers in tens of milliseconds and
#    pcpperf would otherwise time out and retry). Each server is loaded twice in a
#    row from new sources: the second run starts with the first run's mappings in the
#    table (cost per mapping as the table grows). "New mappings/s" is what the server
#    holds after a run minus before, over the run's duration (pcpd: GET /metrics;
#    miniupnpd: its DNAT rules), so retries and renewals never count.
#    OTHER_PCPD=path adds a third pcpd to every round (nftables data plane), e.g. a
#    build of an earlier commit, for a same-run before/after comparison.
# Settings (environment): TOTAL (100000), ROUNDS (3), CLIENTS (100), MAPPINGS (4000),
# WINDOW (2), DURATION (5 s), MU_CLIENTS (4), MU_DURATION (20 s), SERVER_CPU (0),
# LOAD_CPU (1), OTHER_PCPD (none), SKIP_MINIUPNPD (unset).
set -euo pipefail
cd "$(dirname "$0")/../.."
# shellcheck source=scripts/bench/common.sh
. scripts/bench/common.sh

TOTAL=${TOTAL:-100000}
ROUNDS=${ROUNDS:-3}
CLIENTS=${CLIENTS:-100}
MAPPINGS=${MAPPINGS:-4000}
WINDOW=${WINDOW:-2}
DURATION=${DURATION:-5}
MU_CLIENTS=${MU_CLIENTS:-4}
MU_DURATION=${MU_DURATION:-20}
SERVER_CPU=${SERVER_CPU:-0}
LOAD_CPU=${LOAD_CPU:-1}
EXAMPLE=${EXAMPLE:-target/release/examples/nft_installs}

[ "$(id -u)" = 0 ] || { echo "needs root (network namespaces, nftables)" >&2; exit 1; }
for b in "$BIN/pcpd" "$BIN/pcpperf" "$EXAMPLE"; do
  [ -x "$b" ] || { echo "$b missing (see the build commands at the top)" >&2; exit 1; }
done

P="pcpb$$"
NAMESPACES=()
ns_cleanup() {
  local ns
  for ns in "${NAMESPACES[@]}"; do
    ip netns del "$ns" 2>/dev/null || true
  done
}
trap 'cleanup; ns_cleanup' EXIT

# netns NAME: a fresh namespace with loopback up.
netns() {
  ip netns add "$1"
  NAMESPACES+=("$1")
  ip -n "$1" link set lo up
}

machine
echo

echo "== 1. installs into the nftables data plane ($TOTAL MAP entries per fill)"
netns "$P-inst"
ip netns exec "$P-inst" taskset -c "$SERVER_CPU" "$EXAMPLE" "$TOTAL"
echo

# server_toml DATAPLANE: pcpd's config (limits that never refuse this load).
server_toml() {
  cat <<TOML
[pcpd]
listen = ["127.0.0.1:5351"]
admin = "127.0.0.1:8351"
threads = 1
log = "warn"
dataplane = "$1"

[pool]
addresses = ["192.0.2.1", "192.0.2.2", "192.0.2.3", "192.0.2.4", "192.0.2.5", "192.0.2.6",
  "192.0.2.7", "192.0.2.8", "192.0.2.9", "192.0.2.10", "192.0.2.11", "192.0.2.12"]

[tiers.default]
mapping_quota = 1000000
checkpoint_quota = 1000000
checkpoint_rate = 1000000000.0
checkpoint_burst = 1000000000
TOML
}

# load NS CLIENTS WINDOW SOURCE_BASE DURATION: one pcpperf run inside NS; prints its
# summary line.
load() {
  local out
  out=$(ip netns exec "$1" taskset -c "$LOAD_CPU" "$BIN/pcpperf" map --server 127.0.0.1:5351 \
    --clients "$2" --window "$3" --mappings "$MAPPINGS" \
    --duration "$5" --warmup 0 --source-base "$4" --json)
  echo "$out" >>"$WORK/results.jsonl"
  jq -r '"responses \(.responses) (\(.rps | floor)/s), p50 \(.latency_us.p50) us, p99 \(.latency_us.p99) us, timeouts \(.timeouts)"' <<<"$out"
}

# held NS: how many mappings pcpd in NS holds.
held() {
  ip netns exec "$1" curl -sf --noproxy '*' --max-time 5 http://127.0.0.1:8351/metrics |
    awk '$1 == "pcp_mappings" { print $2 }'
}

# measure NAME NS COUNT_FN CLIENTS WINDOW SOURCE_BASE DURATION: one run, as new
# mappings per second.
measure() {
  local before after line
  before=$($3 "$2")
  line=$(load "$2" "$4" "$5" "$6" "$7")
  after=$($3 "$2")
  echo "  $1: $(((after - before) / $7)) new mappings/s ($before -> $after held; pcpperf: $line)"
}

echo "== 2. new MAPs over PCP: $CLIENTS clients x window $WINDOW, every request a new mapping"
for round in $(seq 1 "$ROUNDS"); do
  echo "round $round"
  for run in memory nftables ${OTHER_PCPD:+other}; do
    dp=$run; pcpd=$BIN/pcpd; label=$run
    if [ "$run" = other ]; then
      dp=nftables; pcpd=$OTHER_PCPD; label="nftables, $OTHER_PCPD"
    fi
    ns="$P-$run-$round"
    netns "$ns"
    server_toml "$dp" >"$WORK/$run.toml"
    start "$run" "$SERVER_CPU" ip netns exec "$ns" "$pcpd" --config "$WORK/$run.toml"
    pid=$LAST_PID
    wait_until 10 "pcpd ($label) up" ip netns exec "$ns" curl -sf --noproxy '*' http://127.0.0.1:8351/status >/dev/null
    measure "pcpd $label, from empty" "$ns" held "$CLIENTS" "$WINDOW" 127.0.4.1 "$DURATION"
    measure "pcpd $label, from the first run's" "$ns" held "$CLIENTS" "$WINDOW" 127.1.4.1 "$DURATION"
    kill9 "$pid"
    ip netns del "$ns"
  done
done
echo

# dnat_rules NS: how many DNAT rules miniupnpd in NS holds.
dnat_rules() {
  ip netns exec "$1" nft list chain inet filter prerouting_miniupnpd | grep -c dnat || true
}

if [ -z "${SKIP_MINIUPNPD:-}" ] && [ -x /usr/sbin/miniupnpd ]; then
  # miniupnpd's table and chains (what Debian's nft_init.sh would make), its external
  # interface on a veth towards a WAN namespace whose STUN responder shows it a 1:1
  # mapping (miniupnpd refuses to forward from a reserved external address otherwise).
  gw="$P-mu"; wan="$P-wan"
  netns "$gw"; netns "$wan"
  ip link add "${P}g" type veth peer name "${P}w"
  ip link set "${P}g" netns "$gw"; ip link set "${P}w" netns "$wan"
  ip -n "$gw" addr add 198.51.100.1/24 dev "${P}g"; ip -n "$gw" link set "${P}g" up
  ip -n "$wan" addr add 198.51.100.2/24 dev "${P}w"; ip -n "$wan" link set "${P}w" up
  ip netns exec "$gw" nft -f - <<'NFT'
table inet filter {
  chain forward { type filter hook forward priority 0; policy accept; jump miniupnpd; }
  chain miniupnpd { }
  chain prerouting { type nat hook prerouting priority -100; policy accept; jump prerouting_miniupnpd; }
  chain postrouting { type nat hook postrouting priority 100; policy accept; jump postrouting_miniupnpd; }
  chain prerouting_miniupnpd { }
  chain postrouting_miniupnpd { }
}
NFT
  cat >"$WORK/stun.py" <<'PY'
import socket, struct
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("198.51.100.2", 3478))
while True:
    b, a = s.recvfrom(1024)
    if len(b) < 20 or b[:2] != b"\x00\x01":
        continue
    attr = struct.pack("!HHBBH4s", 1, 8, 0, 1, a[1], socket.inet_aton(a[0]))
    s.sendto(struct.pack("!HH", 0x0101, len(attr)) + b[4:20] + attr, a)
PY
  start stun "$LOAD_CPU" ip netns exec "$wan" python3 "$WORK/stun.py"
  cat >"$WORK/miniupnpd.conf" <<CONF
ext_ifname=${P}g
listening_ip=lo
enable_natpmp=yes
enable_upnp=no
ext_perform_stun=yes
ext_stun_host=198.51.100.2
ext_stun_port=3478
secure_mode=no
min_lifetime=120
max_lifetime=86400
lease_file=$WORK/leases
uuid=3d3cec3a-8cf0-11e0-98ee-001a6bd2d07b
allow 1024-65535 0.0.0.0/0 1024-65535
deny 0-65535 0.0.0.0/0 0-65535
CONF
  # -d: stay in the foreground (its PID is the one recorded), logging to its log.
  start miniupnpd "$SERVER_CPU" ip netns exec "$gw" /usr/sbin/miniupnpd -d -f "$WORK/miniupnpd.conf"
  mu_pid=$LAST_PID
  # STUN takes a few seconds; it listens for PCP only after.
  wait_until 20 "miniupnpd listening" grep -q "Listening for NAT-PMP/PCP" "$WORK/miniupnpd.log"
  echo "== miniupnpd-nftables: $MU_CLIENTS clients x window 1"
  measure "miniupnpd-nftables, from empty" "$gw" dnat_rules "$MU_CLIENTS" 1 127.0.4.1 "$MU_DURATION"
  measure "miniupnpd-nftables, from the first run's" "$gw" dnat_rules "$MU_CLIENTS" 1 127.1.4.1 "$MU_DURATION"
  kill9 "$mu_pid"
else
  echo "  miniupnpd not installed (apt-get install miniupnpd-nftables): skipped"
fi

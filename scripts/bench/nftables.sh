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
#    fresh namespace with the same load: pcpd with the memory data plane (baseline),
#    pcpd with nftables, and Debian's miniupnpd-nftables (its PCP server). pcpd is
#    loaded twice in a row from new sources: the second run starts with the first
#    run's mappings in the table (cost per mapping as the table grows).
# Settings (environment): TOTAL (100000), CLIENTS (100), MAPPINGS (1000), WINDOW (4),
# DURATION (5 s), MU_DURATION (10 s, miniupnpd), SERVER_CPU (0), LOAD_CPU (1).
set -euo pipefail
cd "$(dirname "$0")/../.."
# shellcheck source=scripts/bench/common.sh
. scripts/bench/common.sh

TOTAL=${TOTAL:-100000}
CLIENTS=${CLIENTS:-100}
MAPPINGS=${MAPPINGS:-1000}
WINDOW=${WINDOW:-4}
DURATION=${DURATION:-5}
MU_DURATION=${MU_DURATION:-10}
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
addresses = ["192.0.2.1", "192.0.2.2", "192.0.2.3"]

[tiers.default]
mapping_quota = 1000000
checkpoint_quota = 1000000
checkpoint_rate = 1000000000.0
checkpoint_burst = 1000000000
TOML
}

# load NS NAME SOURCE_BASE DURATION: one pcpperf run inside NS.
load() {
  local out
  out=$(ip netns exec "$1" taskset -c "$LOAD_CPU" "$BIN/pcpperf" map --server 127.0.0.1:5351 \
    --clients "$CLIENTS" --window "$WINDOW" --mappings "$MAPPINGS" \
    --duration "$4" --warmup 0 --source-base "$3" --json)
  jq -c --arg config "$2" '{config: $config} + .' <<<"$out" | tee -a "$WORK/results.jsonl" |
    jq -r '"  \(.config): \(.rps | floor) new mappings/s, p50 \(.latency_us.p50) us, p99 \(.latency_us.p99) us, responses \(.responses), timeouts \(.timeouts)"'
}

# status NS: pcpd's mapping and data plane entry counts.
status() {
  ip netns exec "$1" curl -sf --noproxy '*' --max-time 5 http://127.0.0.1:8351/metrics |
    grep -E '^pcp_(mappings|dataplane_entries|dataplane_failures_total) ' | tr '\n' ' '
  echo
}

echo "== 2. new MAPs over PCP: $CLIENTS clients x window $WINDOW, each request a new mapping"
for dp in memory nftables; do
  ns="$P-$dp"
  netns "$ns"
  server_toml "$dp" >"$WORK/$dp.toml"
  start "$dp" "$SERVER_CPU" ip netns exec "$ns" "$BIN/pcpd" --config "$WORK/$dp.toml"
  wait_until 10 "pcpd ($dp) up" ip netns exec "$ns" curl -sf --noproxy '*' http://127.0.0.1:8351/status >/dev/null
  load "$ns" "pcpd $dp, empty table" 127.0.4.1 "$DURATION"
  echo -n "    after: "; status "$ns"
  load "$ns" "pcpd $dp, table holding the first run's" 127.1.4.1 "$DURATION"
  echo -n "    after: "; status "$ns"
  kill9 "$LAST_PID"
done

if [ -x /usr/sbin/miniupnpd ]; then
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
  start stun "$LOAD_CPU" ip netns exec "$wan" python3 - <<'PY'
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
  start miniupnpd "$SERVER_CPU" ip netns exec "$gw" /usr/sbin/miniupnpd -d -f "$WORK/miniupnpd.conf"
  mu_pid=$LAST_PID
  sleep 2
  load "$gw" "miniupnpd-nftables, empty table" 127.0.4.1 "$MU_DURATION"
  echo "    after: $(ip netns exec "$gw" nft list chain inet filter prerouting_miniupnpd | grep -c dnat) DNAT rules"
  load "$gw" "miniupnpd-nftables, table holding the first run's" 127.1.4.1 "$MU_DURATION"
  echo "    after: $(ip netns exec "$gw" nft list chain inet filter prerouting_miniupnpd | grep -c dnat) DNAT rules"
  kill9 "$mu_pid"
else
  echo "  miniupnpd not installed (apt-get install miniupnpd-nftables): skipped"
fi

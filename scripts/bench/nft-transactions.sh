#!/usr/bin/env bash
# Requests per netlink transaction: pcpd PCPD (default target/release/pcpd) with the
# nftables data plane in a namespace of its own, 3 s of pcpperf new MAPs (100 clients x
# window 2), its sends counted with strace: UDP replies vs netlink transactions (one
# sendto each). strace slows every syscall, so the rates it prints are not throughput
# figures; the counts are exact. Root.
#
#   cargo build --release -p pcpd -p pcpperf
#   scripts/bench/nft-transactions.sh [PCPD]
set -u
cd "$(dirname "$0")/../.." || exit 1
PCPD=${1:-target/release/pcpd}
[ "$(id -u)" = 0 ] || { echo "needs root (network namespaces, nftables)" >&2; exit 1; }
command -v strace >/dev/null || { echo "needs strace" >&2; exit 1; }
TMP=$(mktemp -d)
ns=pcpg$$
trap 'ip netns del $ns 2>/dev/null; rm -rf "$TMP"' EXIT
cat >"$TMP/g.toml" <<TOML
[pcpd]
listen = ["127.0.0.1:5351"]
admin = "127.0.0.1:8351"
threads = 1
log = "warn"
dataplane = "nftables"

[pool]
addresses = ["192.0.2.1", "192.0.2.2", "192.0.2.3", "192.0.2.4", "192.0.2.5", "192.0.2.6",
  "192.0.2.7", "192.0.2.8", "192.0.2.9", "192.0.2.10", "192.0.2.11", "192.0.2.12"]

[tiers.default]
mapping_quota = 1000000
TOML
ip netns add $ns; ip -n $ns link set lo up
ip netns exec $ns "$PCPD" --config "$TMP/g.toml" >"$TMP/pcpd.log" 2>&1 &
pid=$!
for _ in $(seq 50); do ip netns exec $ns curl -sf --noproxy '*' http://127.0.0.1:8351/status >/dev/null && break; sleep 0.1; done
strace -f -qq -e trace=sendto,sendmsg -o "$TMP/strace" -p $pid &
st=$!
sleep 0.5
ip netns exec $ns target/release/pcpperf map --server 127.0.0.1:5351 --clients 100 --window 2 --mappings 4000 --duration 3 --warmup 0 --source-base 127.0.4.1 --json | jq -c '{responses, rps}'
kill $st; sleep 0.3
held=$(ip netns exec $ns curl -sf --noproxy '*' http://127.0.0.1:8351/metrics | awk '$1=="pcp_mappings"{print $2}')
kill -9 $pid; wait $pid 2>/dev/null
# UDP replies name an AF_INET destination; the netlink socket's sends name none.
nl=$(grep -E "send(to|msg)\(" "$TMP/strace" | grep -vc AF_INET)
udp=$(grep -c 'AF_INET' "$TMP/strace")
echo "$PCPD: $held mappings held, $udp replies, $nl netlink transactions"

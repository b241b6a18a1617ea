#!/usr/bin/env bash
# The NAT lab: real kernel NAT in network namespaces, for the direct-path tests
# (tests/tests/direct_netns.rs) and by hand. Needs root, iproute2 and nftables.
#
#                       PREFIX-pub: bridge br0, 198.18.0.1 (the relay)
#                  /                    |                     \
#   PREFIX-ra: wan 198.18.0.2   PREFIX-x: 198.18.0.4   PREFIX-rb: wan 198.18.0.3
#   (router A, masquerades)     (a third party)        (router B, masquerades)
#       lan 10.1.0.1                                         lan 10.2.0.1
#            |                                                    |
#   PREFIX-a: 10.1.0.2 (the inlet)                     PREFIX-b: 10.2.0.2 (the outlet)
#   PREFIX-a2: 10.1.0.3 (a second host behind router A, on the same LAN bridge as PREFIX-a)
#
# 198.18.0.0/15 is reserved for benchmarking (RFC 2544) and never routed; nothing here
# touches the host's own network.
#
# Usage:
#   natlab.sh up PREFIX              create everything, both routers doing plain masquerade
#                                    (endpoint-independent mapping, the source port kept)
#   natlab.sh nat PREFIX a|b eim|symmetric
#                                    switch a router's NAT: `symmetric` is
#                                    `masquerade random,fully-random`, a fresh random port for
#                                    each new destination
#   natlab.sh block-udp PREFIX       routers drop UDP between the private networks (UDP to and
#                                    from the relay still passes)
#   natlab.sh unblock-udp PREFIX
#   natlab.sh block-relay-udp PREFIX a|b
#                                    router a or b drops UDP from its private network to the
#                                    relay (its nodes fall back to TLS/TCP); UDP to the other
#                                    network still passes
#   natlab.sh rebind PREFIX a|b      a NAT rebinding on router a or b: UDP to anywhere but the
#                                    relay gets a source port from 20000-29999 from now on, and
#                                    the router forgets (conntrack -D) its mappings of UDP to
#                                    the other router, so the host's next packet to the other
#                                    network leaves from a new public port (the mapping towards
#                                    the relay is kept). Needs `conntrack` (conntrack-tools)
#   natlab.sh forward PREFIX a|b PORT
#                                    port-forward TCP PORT on the router's public address to
#                                    the same port of the host behind it (DNAT), for a plain
#                                    TCP baseline across both NATs (the bench's `direct` rows)
#   natlab.sh down PREFIX            delete every namespace of the lab
#   natlab.sh exec PREFIX NS CMD...  run CMD in namespace PREFIX-NS (pub, ra, rb, a, a2, b, x)
set -euo pipefail

RELAY=198.18.0.1

ns() { ip netns exec "$1" "${@:2}"; }

set_nat() {
  local p=$1 side=$2 mode=$3 flags=""
  case $mode in
    eim) ;;
    symmetric) flags=" random,fully-random" ;;
    *) echo "natlab: unknown NAT mode $mode (eim or symmetric)" >&2; exit 2 ;;
  esac
  local r="$p-r$side"
  ns "$r" nft flush table ip nat 2>/dev/null || ns "$r" nft add table ip nat
  ns "$r" nft add chain ip nat post '{ type nat hook postrouting priority srcnat; }'
  ns "$r" nft add rule ip nat post oifname '"wan"' "masquerade$flags"
  # New mappings only: flush the conntrack entries made under the old rule.
  if command -v conntrack >/dev/null; then ns "$r" conntrack -F >/dev/null 2>&1 || true; fi
}

up() {
  local p=$1
  for n in pub ra rb a a2 b x; do
    ip netns add "$p-$n"
    ns "$p-$n" ip link set lo up
  done
  ns "$p-pub" ip link add br0 type bridge
  ns "$p-pub" ip addr add "$RELAY/24" dev br0
  ns "$p-pub" ip link set br0 up
  local side wan lan host
  for side in a b; do
    case $side in a) wan=198.18.0.2 lan=10.1.0 ;; b) wan=198.18.0.3 lan=10.2.0 ;; esac
    # Router's WAN port on the bridge.
    ip -n "$p-pub" link add "p$side" type veth peer name wan netns "$p-r$side"
    ns "$p-pub" ip link set "p$side" master br0 up
    ns "$p-r$side" ip addr add "$wan/24" dev wan
    ns "$p-r$side" ip link set wan up
    # Router's LAN port to its host (router A: a bridge, with a second host on it).
    if [ "$side" = a ]; then
      ns "$p-ra" ip link add lan type bridge
      ip -n "$p-ra" link add la type veth peer name eth0 netns "$p-a"
      ip -n "$p-ra" link add la2 type veth peer name eth0 netns "$p-a2"
      ns "$p-ra" ip link set la master lan up
      ns "$p-ra" ip link set la2 master lan up
      ns "$p-a2" ip addr add "$lan.3/24" dev eth0
      ns "$p-a2" ip link set eth0 up
      ns "$p-a2" ip route add default via "$lan.1"
    else
      ip -n "$p-r$side" link add lan type veth peer name eth0 netns "$p-$side"
    fi
    ns "$p-r$side" ip addr add "$lan.1/24" dev lan
    ns "$p-r$side" ip link set lan up
    ns "$p-r$side" sysctl -qw net.ipv4.ip_forward=1
    # As home routers do: nothing from the internet reaches the router itself unless it
    # answers something the router sent. The drop happens before conntrack confirms the
    # packet's entry, so a peer's probe that arrives before our own has left leaves no entry
    # behind (without this, that entry would take our mapping's port and the router would
    # give our own probes another one: hole punching would depend on who sent first).
    ns "$p-r$side" nft add table inet fw
    ns "$p-r$side" nft add chain inet fw input '{ type filter hook input priority 0; policy accept; }'
    ns "$p-r$side" nft add rule inet fw input iifname '"wan"' ct state established,related accept
    ns "$p-r$side" nft add rule inet fw input iifname '"wan"' drop
    ns "$p-$side" ip addr add "$lan.2/24" dev eth0
    ns "$p-$side" ip link set eth0 up
    ns "$p-$side" ip route add default via "$lan.1"
    set_nat "$p" "$side" eim
  done
  ip -n "$p-pub" link add px type veth peer name eth0 netns "$p-x"
  ns "$p-pub" ip link set px master br0 up
  ns "$p-x" ip addr add 198.18.0.4/24 dev eth0
  ns "$p-x" ip link set eth0 up
}

block_udp() {
  local p=$1 side
  for side in a b; do
    local r="$p-r$side"
    ns "$r" nft add table inet lab
    ns "$r" nft add chain inet lab between '{ type filter hook forward priority 0; }'
    ns "$r" nft add rule inet lab between oifname '"wan"' ip daddr != "$RELAY" meta l4proto udp drop
    ns "$r" nft add rule inet lab between iifname '"wan"' ip saddr != "$RELAY" meta l4proto udp drop
  done
}

unblock_udp() {
  local p=$1 side
  for side in a b; do
    ns "$p-r$side" nft delete table inet lab 2>/dev/null || true
  done
}

block_relay_udp() {
  local p=$1 side=$2
  case $side in a|b) ;; *) echo "natlab: unknown side $side (a or b)" >&2; exit 2 ;; esac
  # A table of its own: `unblock-udp` and NAT switches leave it alone.
  ns "$p-r$side" nft add table inet relayudp
  ns "$p-r$side" nft add chain inet relayudp out '{ type filter hook forward priority 0; }'
  ns "$p-r$side" nft add rule inet relayudp out oifname '"wan"' ip daddr "$RELAY" meta l4proto udp drop
}

rebind() {
  local p=$1 side=$2 other
  case $side in
    a) other=198.18.0.3 ;;
    b) other=198.18.0.2 ;;
    *) echo "natlab: unknown side $side (a or b)" >&2; exit 2 ;;
  esac
  command -v conntrack >/dev/null || { echo "natlab: rebind needs conntrack (conntrack-tools)" >&2; exit 3; }
  local r="$p-r$side"
  ns "$r" nft insert rule ip nat post oifname '"wan"' ip daddr != "$RELAY" meta l4proto udp masquerade to :20000-29999
  # conntrack -D exits 1 when nothing matched: the host may not have sent there yet.
  ns "$r" conntrack -D -p udp --orig-dst "$other" >/dev/null 2>&1 || true
}

forward() {
  local p=$1 side=$2 port=$3 host
  case $side in
    a) host=10.1.0.2 ;;
    b) host=10.2.0.2 ;;
    *) echo "natlab: unknown side $side (a or b)" >&2; exit 2 ;;
  esac
  local r="$p-r$side"
  # A table of its own: switching the NAT mode (which flushes `ip nat`) leaves it alone.
  ns "$r" nft add table ip portfwd
  ns "$r" nft add chain ip portfwd pre '{ type nat hook prerouting priority dstnat; }'
  ns "$r" nft add rule ip portfwd pre iifname '"wan"' tcp dport "$port" dnat to "$host:$port"
}

down() {
  local p=$1 n
  for n in pub ra rb a a2 b x; do
    ip netns del "$p-$n" 2>/dev/null || true
  done
}

cmd=${1:-}
case $cmd in
  up) up "$2" ;;
  nat) set_nat "$2" "$3" "$4" ;;
  block-udp) block_udp "$2" ;;
  unblock-udp) unblock_udp "$2" ;;
  block-relay-udp) block_relay_udp "$2" "$3" ;;
  rebind) rebind "$2" "$3" ;;
  forward) forward "$2" "$3" "$4" ;;
  down) down "$2" ;;
  exec) p=$2 n=$3; shift 3; ns "$p-$n" "$@" ;;
  *) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 2 ;;
esac

#!/usr/bin/env bash
# Host routing and NAT for connect-ip (RFC 9484) address pools.
#
# The dataplane creates one TUN device per worker (<interface_prefix><N>,
# "masq0", "masq1", ...) holding the worker's share of the pools, so the
# kernel already routes the pools to the right worker. This script does the
# rest a relay host needs: IP forwarding, source NAT of the pools to the
# host's public addresses on the way out, and a forwarding policy that only
# lets pool traffic out to the Internet (the relay also enforces each
# tunnel's scope and the target policy per packet).
#
# Usage: connect-ip-nat.sh IPV4_POOL IPV6_POOL UPLINK [PREFIX]
#   e.g. connect-ip-nat.sh 10.89.0.0/16 fd89::/64 eth0 masq
# Idempotent: the nftables table is replaced on every run. Needs nft.
set -euo pipefail

if [ $# -lt 3 ]; then
  echo "usage: $0 IPV4_POOL IPV6_POOL UPLINK [INTERFACE_PREFIX]" >&2
  exit 2
fi
v4_pool=$1
v6_pool=$2
uplink=$3
prefix=${4:-masq}

sysctl -q -w net.ipv4.ip_forward=1
sysctl -q -w net.ipv6.conf.all.forwarding=1

nft -f - <<NFT
table inet masque_relay
delete table inet masque_relay
table inet masque_relay {
  chain forward {
    type filter hook forward priority filter; policy accept;
    # Pool traffic leaves only through the uplink...
    iifname "${prefix}*" oifname != "${uplink}" drop
    # ...and comes back only as replies.
    iifname "${uplink}" oifname "${prefix}*" ct state established,related accept
    iifname "${uplink}" oifname "${prefix}*" drop
  }
  chain postrouting {
    type nat hook postrouting priority srcnat; policy accept;
    oifname "${uplink}" ip saddr ${v4_pool} masquerade
    oifname "${uplink}" ip6 saddr ${v6_pool} masquerade
  }
}
NFT
echo "connect-ip: forwarding on, ${v4_pool} and ${v6_pool} NATed out of ${uplink}"

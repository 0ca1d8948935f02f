#!/usr/bin/env bash
# Make the client <-> login link slow like a laptop's, or fast again: a token bucket on BOTH ends (one end alone
# does not cap downloads): the host's end is the bridge of the "front" network (what the host sends the login
# node leaves through it), the login node's end is its interface on that network (entered by nsenter).
#   usage: link.sh slow [RATE]   RATE defaults to 100mbit (tc syntax: 20mbit, 1gbit ...)
#          link.sh fast          remove it
#          link.sh status        print the qdiscs
# check.sh always leaves the link fast.
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
require_root
rate=${2:-100mbit}
running "$LOGIN_HOST" || die "the test cluster is not up (no container $(container_of "$LOGIN_HOST"))"
login_dev=$(in_netns "$LOGIN_HOST" ip -o -4 addr show | awk -v ip="$LOGIN_IP/" 'index($4, ip) == 1 {print $2}')
[ -n "$login_dev" ] || die "no interface with $LOGIN_IP on the login node"
case "${1:-}" in
  slow)
    tc qdisc replace dev "$FRONT_BRIDGE" root tbf rate "$rate" burst 64kb latency 50ms
    in_netns "$LOGIN_HOST" tc qdisc replace dev "$login_dev" root tbf rate "$rate" burst 64kb latency 50ms
    log "link slow: $rate each way" ;;
  fast)
    tc qdisc del dev "$FRONT_BRIDGE" root 2>/dev/null || true
    in_netns "$LOGIN_HOST" tc qdisc del dev "$login_dev" root 2>/dev/null || true
    log "link fast" ;;
  status)
    tc qdisc show dev "$FRONT_BRIDGE"
    in_netns "$LOGIN_HOST" tc qdisc show dev "$login_dev" ;;
  *) echo "usage: $0 slow [RATE] | fast | status" >&2; exit 2 ;;
esac

#!/usr/bin/env bash
# Make the client <-> login link (root <-> login namespace veth pair) slow like a laptop's, or fast again.
#   usage: link.sh slow [RATE]   token bucket on BOTH ends (one end alone does not cap downloads);
#                                RATE defaults to 100mbit (tc syntax: 20mbit, 1gbit ...)
#          link.sh fast          remove it
#          link.sh status        print the qdiscs
# up.sh always leaves the link fast.
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
require_root
rate=${2:-100mbit}
[ -e "/run/netns/$NS_LOGIN" ] || die "the test cluster is not up (no namespace $NS_LOGIN)"
in_login() { nsenter --net="/run/netns/$NS_LOGIN" "$@"; }
case "${1:-}" in
  slow)
    tc qdisc replace dev "$VETH_ROOT" root tbf rate "$rate" burst 64kb latency 50ms
    in_login tc qdisc replace dev "$VETH_LOGIN" root tbf rate "$rate" burst 64kb latency 50ms
    log "link slow: $rate each way" ;;
  fast)
    tc qdisc del dev "$VETH_ROOT" root 2>/dev/null || true
    in_login tc qdisc del dev "$VETH_LOGIN" root 2>/dev/null || true
    log "link fast" ;;
  status)
    tc qdisc show dev "$VETH_ROOT"
    in_login tc qdisc show dev "$VETH_LOGIN" ;;
  *) echo "usage: $0 slow [RATE] | fast | status" >&2; exit 2 ;;
esac

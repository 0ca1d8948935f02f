#!/usr/bin/env bash
# Stop the container test cluster: cancel jobs (so accounting records them as CANCELLED), `docker-compose down`,
# delete the host's unreachable route and a slow link's qdisc. Keeps $STATE (host key, client keys, the shared
# home, the controller's state and database: job ids keep increasing), the images and the venv.
#   usage: down.sh [--purge]    --purge also deletes $STATE and the cluster's software tree (venvs, images)
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
require_root
PURGE=0
[ "${1:-}" = --purge ] && PURGE=1
take_lock
T0=$(date +%s%N)
if running "$LOGIN_HOST" && ctld_up; then
  ids=$(on "$LOGIN_HOST" timeout 5 squeue -h -o %i 2>/dev/null | tr '\n' ' ' || true)
  if [ -n "${ids// }" ]; then
    # shellcheck disable=SC2086
    on "$LOGIN_HOST" timeout 5 scancel $ids 2>/dev/null || true
    for i in $(seq 1 30); do [ -z "$(on "$LOGIN_HOST" timeout 5 squeue -h -o %i 2>/dev/null)" ] && break; sleep 0.2; done
  fi
fi
if [ -x "$DOCKER_COMPOSE" ] && "$DOCKER" info >/dev/null 2>&1; then
  compose down 9>&- >/dev/null 2>&1 || log "docker-compose down failed"
fi
tc qdisc del dev "$FRONT_BRIDGE" root 2>/dev/null || true
ip route del unreachable "$CLUSTER_NET" 2>/dev/null || true
rm -f "$STATE/containers.sha" "$STATE/containers.ids" "$STATE/mfa.checked"
if [ "$PURGE" = 1 ]; then
  rm -rf "$STATE" "$SOFTWARE"
fi
log "cluster down in $(( ($(date +%s%N) - T0) / 1000000 )) ms$([ "$PURGE" = 1 ] && echo ' (purged)')"

#!/usr/bin/env bash
# A Docker engine for building hpcseg's image, started by hand (no systemd here), and the Debian base image that
# builds start FROM (no image registry is reachable from these machines: debootstrap + `docker import`).
#
#   bash tests/cluster/docker.sh install   # docker.io, debootstrap, charliecloud (apt-get; no-op when present)
#   bash tests/cluster/docker.sh start     # dockerd, if not running (pid file $DOCKER_STATE/dockerd.pid)
#   bash tests/cluster/docker.sh base      # debian:bookworm-slim from debootstrap, unless that tag exists
#   bash tests/cluster/docker.sh stop      # stop the dockerd this script started, by its pid
#   bash tests/cluster/docker.sh up        # install + start + base (what tests/run.sh calls)
#
# Runs as root. The engine's data stays in /var/lib/docker, so images (and the build cache) survive a stop and a
# later start on the same machine. Stops only the dockerd whose pid it wrote, never by process name.
set -euo pipefail
umask 022

DOCKER_STATE=${HPCSEG_DOCKER_STATE:-/var/lib/hpcseg-docker}
PIDFILE=$DOCKER_STATE/dockerd.pid
LOGFILE=$DOCKER_STATE/dockerd.log
# The tag the Dockerfile's default BASE_IMAGE names: with a registry it would be pulled; here it is made locally.
BASE_TAG=${HPCSEG_BASE_IMAGE:-debian:bookworm-slim}
# Debian's docker.io client (a newer `docker` elsewhere on PATH may not speak to this engine's API).
DOCKER=${DOCKER:-/usr/bin/docker}
PKGS=(docker.io docker-compose debootstrap charliecloud ca-certificates)

log() { printf '[docker %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { printf '[docker] FAILED: %s\n' "$*" >&2; exit 1; }

install_pkgs() {
  local missing=() p
  for p in "${PKGS[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
  done
  [ ${#missing[@]} -eq 0 ] && return 0
  log "installing: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  local added=0
  if [ ! -e /usr/sbin/policy-rc.d ]; then  # packages must not start daemons (we start dockerd ourselves)
    printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d; chmod 0755 /usr/sbin/policy-rc.d; added=1
  fi
  if ! apt-get install -y -q --no-install-recommends "${missing[@]}"; then
    apt-get update -q
    apt-get install -y -q --no-install-recommends "${missing[@]}"
  fi
  [ "$added" = 1 ] && rm -f /usr/sbin/policy-rc.d
  return 0
}

running() { [ -s "$PIDFILE" ] && kill -0 "$(cat "$PIDFILE")" 2>/dev/null && "$DOCKER" info >/dev/null 2>&1; }

start() {
  mkdir -p "$DOCKER_STATE"
  running && return 0
  if "$DOCKER" info >/dev/null 2>&1; then log "an engine not started by this script answers: using it"; return 0; fi
  log "starting dockerd (log: $LOGFILE)"
  # setsid: the engine outlives this script and the test session that called it.
  # 9>&-: never hand a caller's lock (image.sh's flock on fd 9) to the daemon, which would hold it for its life
  setsid /usr/sbin/dockerd --pidfile "$DOCKER_STATE/engine.pid" >>"$LOGFILE" 2>&1 < /dev/null 9>&- &
  echo $! >"$PIDFILE"
  local i
  for i in $(seq 1 120); do
    "$DOCKER" info >/dev/null 2>&1 && { log "dockerd up (pid $(cat "$PIDFILE"))"; return 0; }
    kill -0 "$(cat "$PIDFILE")" 2>/dev/null || break
    sleep 0.5
  done
  tail -20 "$LOGFILE" >&2
  die "dockerd did not come up"
}

stop() {
  [ -s "$PIDFILE" ] || { log "no dockerd started by this script"; return 0; }
  local pid i
  pid=$(cat "$PIDFILE")
  if kill -0 "$pid" 2>/dev/null; then
    kill -TERM "$pid"
    for i in $(seq 1 60); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
  fi
  rm -f "$PIDFILE"
  log "dockerd stopped"
}

mirror() {  # the Debian mirror apt uses here (deb822 or one-line sources), else deb.debian.org
  local m
  m=$(grep -rhoE '^(URIs:|deb) *(\[[^]]*\] *)?https?://[^ ]+/debian/?( |$)' /etc/apt/sources.list \
        /etc/apt/sources.list.d/ 2>/dev/null | grep -oE 'https?://[^ ]+' | head -1 || true)
  echo "${m:-http://deb.debian.org/debian}"
}

base() {
  if "$DOCKER" image inspect "$BASE_TAG" >/dev/null 2>&1; then return 0; fi
  local root
  root=$(mktemp -d /var/tmp/hpcseg-base.XXXXXX)
  trap 'rm -rf "$root"' RETURN
  log "making $BASE_TAG: debootstrap --variant=minbase bookworm from $(mirror)"
  debootstrap --variant=minbase bookworm "$root" "$(mirror)" >"$DOCKER_STATE/debootstrap.log" 2>&1 \
    || { tail -20 "$DOCKER_STATE/debootstrap.log" >&2; die "debootstrap failed"; }
  # Lean like the registry's bookworm-slim: no apt lists, no docs, no caches.
  rm -rf "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/*.bin "$root"/usr/share/doc/* "$root"/usr/share/man/*
  tar -C "$root" -c . | "$DOCKER" import -c 'CMD ["/bin/bash"]' - "$BASE_TAG" >/dev/null
  log "$BASE_TAG imported ($("$DOCKER" image inspect -f '{{.Size}}' "$BASE_TAG") bytes)"
}

[ "$(id -u)" = 0 ] || die "must run as root"
case "${1:-up}" in
  install) install_pkgs ;;
  start) start ;;
  stop) stop ;;
  base) start; base ;;
  up) install_pkgs; start; base ;;
  *) die "usage: $0 install|start|stop|base|up" ;;
esac

#!/usr/bin/env bash
# hpcseg's real server/training image for the test cluster: Docker engine + Debian base (docker.sh), the image
# built from singularity/hpcseg-server.def's OCI twin with its %test passing (singularity/build.sh), then turned
# into a Charliecloud directory image that the cluster's jobs run with `ch-run` as the unprivileged test user.
# Every step is skipped when already done for the same sources, so a second run takes seconds.
#
#   bash tests/cluster/image.sh [REPO_DIR]     # prints the directory image's path on stdout
#
# HPCSEG_CLUSTER_IMAGE: the directory image (default /opt/hpcseg-cluster/images/hpcseg-server: on the cluster's
# shared software tree, readable by the test user on login and compute nodes). Runs as root.
set -euo pipefail
umask 022
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "${1:-$HERE/../..}" && pwd)
DIR=${HPCSEG_CLUSTER_IMAGE:-/opt/hpcseg-cluster/images/hpcseg-server}
TAG=${HPCSEG_IMAGE_TAG:-hpcseg-server:local}
DOCKER=${DOCKER:-/usr/bin/docker}
export DOCKER
log() { printf '[image %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }

[ "$(id -u)" = 0 ] || { echo "image.sh: must run as root (Docker)" >&2; exit 1; }
mkdir -p "$(dirname "$DIR")"
exec 9>"$(dirname "$DIR")/.image.lock"   # concurrent callers queue up
flock 9

bash "$HERE/docker.sh" up
BASE_IMAGE=debian:bookworm-slim bash "$REPO/singularity/build.sh" "$TAG" >/dev/null
id=$("$DOCKER" image inspect -f '{{.Id}}' "$TAG")
if [ -d "$DIR" ] && [ "$(cat "$DIR.id" 2>/dev/null)" = "$id" ]; then
  log "$DIR is up to date"
else
  log "ch-convert -i docker $TAG $DIR"
  start=$(date +%s)
  rm -rf "$DIR.new" "$DIR.old"
  USER=root ch-convert -i docker "$TAG" "$DIR.new" >&2
  chmod 0755 "$DIR.new"
  [ -d "$DIR" ] && mv "$DIR" "$DIR.old"
  mv "$DIR.new" "$DIR"
  echo "$id" >"$DIR.id"
  rm -rf "$DIR.old"
  log "directory image ready in $(( $(date +%s) - start )) s: $(du -sh "$DIR" | cut -f1)"
fi
echo "$DIR"

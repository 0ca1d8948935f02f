#!/usr/bin/env bash
# Install the Debian packages the machine hosting the test cluster needs (the cluster's own packages are in its
# node image, node/Dockerfile). Idempotent and quick when all are present. Run as root. Starts no service.
#   docker.io, docker-compose: the engine and the compose tool pytest-docker drives (compose.yml)
#   debootstrap: the Debian base image where no registry is reachable (docker.sh base)
#   charliecloud: ch-convert, turning hpcseg's image into the directory image the compute nodes run (image.sh)
#   openssh-client: the real ssh/scp the tests compare against; iptables, iproute2 (tc): network faults, link
#   emulation; python3-venv: the cluster's venv, made by Debian's python3 as on the nodes
set -euo pipefail
PKGS=(docker.io docker-compose debootstrap charliecloud ca-certificates openssh-client iproute2 iptables
      util-linux python3-venv)
missing=()
installed=" $( (dpkg-query -W -f='${Package}:${Status}\n' "${PKGS[@]}" 2>/dev/null || true) | awk -F: '/install ok installed/ {printf "%s ", $1}')"
for p in "${PKGS[@]}"; do
  [[ "$installed" == *" $p "* ]] || missing+=("$p")
done
[ ${#missing[@]} -eq 0 ] && exit 0
[ "$(id -u)" = 0 ] || { echo "install.sh: must run as root to install: ${missing[*]}" >&2; exit 1; }
echo "[testcluster] installing: ${missing[*]}" >&2
export DEBIAN_FRONTEND=noninteractive
added_policy=0
if [ ! -e /usr/sbin/policy-rc.d ]; then   # packages must not start daemons (dockerd is started by docker.sh)
  printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d; chmod 0755 /usr/sbin/policy-rc.d; added_policy=1
fi
cleanup() { [ "$added_policy" = 1 ] && rm -f /usr/sbin/policy-rc.d; return 0; }
trap cleanup EXIT
apt_install() { apt-get install -y -q --no-install-recommends "${missing[@]}"; }
if ! ls /var/lib/apt/lists/*_Packages >/dev/null 2>&1 || ! apt_install; then
  apt-get update -q
  apt_install
fi

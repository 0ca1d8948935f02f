#!/usr/bin/env bash
# Install the Debian packages the hpcseg test cluster needs. Idempotent and quick when all are present.
# Run as root. Starts no service (a temporary policy-rc.d forbids it; up.sh starts everything by hand).
set -euo pipefail
# libpam-modules: pam_exec/pam_unix/pam_permit for the MFA sshd's PAM service (always there on Debian; named here)
# iptables: the network-fault tests drop one SSH connection's packets silently (tests/integration/netfaults.py)
PKGS=(openssh-server openssh-client munge slurmctld slurmd slurm-client slurm-wlm-torque slurmdbd
      mariadb-server mariadb-client python3-venv iproute2 util-linux libpam-modules iptables)

missing=()
installed=" $( (dpkg-query -W -f='${Package}:${Status}\n' "${PKGS[@]}" 2>/dev/null || true) | awk -F: '/install ok installed/ {printf "%s ", $1}')"
for p in "${PKGS[@]}"; do
  [[ "$installed" == *" $p "* ]] || missing+=("$p")
done
[ ${#missing[@]} -eq 0 ] && exit 0
[ "$(id -u)" = 0 ] || { echo "install.sh: must run as root to install: ${missing[*]}" >&2; exit 1; }

echo "[testcluster] installing: ${missing[*]}" >&2
export DEBIAN_FRONTEND=noninteractive
# Packages must not start their daemons (no systemd here; a system sshd/mariadb would get in the way).
added_policy=0
if [ ! -e /usr/sbin/policy-rc.d ]; then
  printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d; chmod 0755 /usr/sbin/policy-rc.d; added_policy=1
fi
cleanup() { [ "$added_policy" = 1 ] && rm -f /usr/sbin/policy-rc.d; return 0; }
trap cleanup EXIT

apt_install() { apt-get install -y -q --no-install-recommends "${PKGS[@]}"; }
# apt-get update only when needed: no package lists yet, or the install fails with the lists we have.
if ! ls /var/lib/apt/lists/*_Packages >/dev/null 2>&1 || ! apt_install; then
  apt-get update -q
  apt_install
fi

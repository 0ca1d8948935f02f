#!/bin/bash
# A test-cluster node's start (PID 1 is docker's init, compose.yml `init: true`, which reaps what jobs leave).
#   node-entrypoint login|controller|compute
# Starts the role's daemons (tests/cluster/node/node-daemon.sh), writes /run/hpcseg/ready, then idles.
set -euo pipefail
role=${1:?role}
CFG=/etc/hpcseg-node
mkdir -p /run/hpcseg /var/log/hpcseg
rm -f /run/hpcseg/ready
echo "[$(hostname)] starting as $role"

# munge: the cluster's key (from the state dir, owned by whatever uid munge has here)
install -d -o munge -g munge -m 0700 /etc/munge
install -o munge -g munge -m 0400 $CFG/munge.key /etc/munge/munge.key

case "$role" in
  login|compute)
    # Charliecloud's ch-run (the jobs' container runtime; `hpcseg doctor` on the login node) moves its new root:
    # it needs private mounts here
    mount --make-rprivate / ;;&
  compute)
    # fake GPUs: character devices (slurmd rejects regular files); gres.conf names them
    for i in 0 1 2 3; do [ -c /dev/nvidia$i ] || mknod -m 0666 /dev/nvidia$i c 195 $i; done ;;
  login|controller) ;;
  *) echo "unknown role $role" >&2; exit 2 ;;
esac
echo "$role" >/run/hpcseg/role
node-daemon start-role   # munged, then the role's daemons (node-daemon.sh: role_daemons)
touch /run/hpcseg/ready
echo "[$(hostname)] ready"
exec sleep infinity

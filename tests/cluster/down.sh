#!/usr/bin/env bash
# Stop the hpcseg test cluster: cancel jobs, stop every daemon, delete the namespaces and the unreachable route.
# Idempotent; run as root. Keeps $STATE (keys, accounting database, job id counter) and the venv, so the next
# up.sh is quick and the host key stays the same.
#   usage: down.sh [--purge]    --purge also deletes $STATE, /opt/hpcseg-cluster and the test user with its home
#                               (the next up.sh starts from scratch, as on a new machine)
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
require_root
PURGE=0
[ "${1:-}" = --purge ] && PURGE=1
take_lock
T0=$(date +%s%N)

# Cancel jobs first, so they end as CANCELLED in accounting rather than as node failures at the next start.
if [ -f "$SLURM_CONF" ] && pid_ok "$SLURM_RUN/slurmctld.pid" slurmctld; then
  ids=$(timeout 5 squeue -h -o %i 2>/dev/null | tr '\n' ' ' || true)
  if [ -n "${ids// }" ]; then
    # shellcheck disable=SC2086
    timeout 5 scancel $ids 2>/dev/null || true
    for i in $(seq 1 30); do [ -z "$(timeout 5 squeue -h -o %i 2>/dev/null)" ] && break; sleep 0.1; done
  fi
fi

stop_pid "$RUN/sshd.pid" sshd
stop_pid "$RUN/sshd-mfa.pid" "$MFA_PAM_SERVICE"
stop_pid "$RUN/slurmd.pid" slurmd   # (a single-node cluster's, before compute2)
for host in $COMPUTE_HOSTS; do stop_pid "$(slurmd_pid_file "$host")" slurmd; done
stop_pid "$SLURM_RUN/slurmctld.pid" slurmctld
stop_pid "$SLURM_RUN/slurmdbd.pid" slurmdbd
stop_pid "$MYSQL_RUN/mysqld.pid" mariadbd
stop_pid "$MUNGE_RUN/munged.pid" munged          # only a munged this cluster started
rm -f "$RUN"/*.confsha 2>/dev/null || true

# whatever is left in our namespaces (job processes, ssh sessions) goes with them
net_down
ip route del unreachable "$COMPUTE_NET" 2>/dev/null || true
ip route del unreachable "$COMPUTE2_NET" 2>/dev/null || true

if [ "$PURGE" = 1 ]; then
  # job ids restart at 1 with a new database: the test user's old job folders must not outlive them
  id "$TEST_USER" >/dev/null 2>&1 && userdel -r "$TEST_USER" >/dev/null 2>&1 || true
  rm -rf "$TEST_HOME" "$STATE" "$(dirname "$VENV")"
  rm -f "$MFA_PAM_FILE"
fi
log "cluster down in $(( ($(date +%s%N) - T0) / 1000000 )) ms$([ "$PURGE" = 1 ] && echo ' (purged)')"

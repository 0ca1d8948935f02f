#!/usr/bin/env bash
# Switch Slurm accounting of the running test cluster off or on, for real:
#   off: slurmctld restarts with AccountingStorageType=accounting_storage/none; `sacct` then fails with
#        "Slurm accounting storage is disabled" (exit 1), as on a site without slurmdbd.
#   on:  slurmctld restarts with accounting_storage/slurmdbd again; `sacct` works.
# Jobs keep running across the switch: slurmctld saves its state on SIGTERM in StateSaveLocation and recovers it,
# and slurmd (with the jobs' slurmstepd) is not touched. slurmdbd and MariaDB stay up while accounting is off.
# Jobs that end while accounting is off are never recorded in the database.
#   usage: accounting.sh on|off|status       (run as root; the cluster must be up)
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
require_root
want=${1:-}
case "$want" in
  on|off) ;;
  status) accounting_mode; exit 0 ;;
  *) echo "usage: $0 on|off|status" >&2; exit 2 ;;
esac
take_lock
T0=$(date +%s%N)
[ -f "$SLURM_CONF" ] && pid_ok "$SLURM_RUN/slurmctld.pid" slurmctld "$NS_LOGIN" \
  || die "the test cluster is not up (no slurmctld): run tests/cluster/up.sh first"

echo "$want" >"$ACCOUNTING_FLAG"
write_slurm_conf
if [ "$want" = on ]; then
  ensure_dbd
  ensure_associations
  expected=accounting_storage/slurmdbd
else
  expected=accounting_storage/none
fi
ensure_slurmctld        # restarts it when slurm.conf changed since it started
if [ "$(running_config_accounting)" != "$expected" ]; then
  stop_slurmctld; start_slurmctld
fi
[ "$(running_config_accounting)" = "$expected" ] || die "slurmctld runs with $(running_config_accounting), not $expected"
wait_node_ready 60 || die "node $COMPUTE_HOST is not ready after the restart"
if [ "$want" = on ]; then
  wait_until 30 "sacct works" sacct_works || die "sacct does not work with accounting on"
else
  sacct_disabled || die "sacct still answers with accounting off"
fi
write_cluster_json
log "accounting $want ($expected) in $(( ($(date +%s%N) - T0) / 1000000 )) ms"

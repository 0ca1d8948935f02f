#!/usr/bin/env bash
# Switch Slurm accounting of the running test cluster off or on, for real, for every user of the cluster.
#   off: slurmdbd (on the controller) is stopped, and the slurm.conf that users, jobs and slurmd read says
#        AccountingStorageType=accounting_storage/none: `sacct` fails with "Slurm accounting storage is disabled"
#        (exit 1), nothing answers for finished jobs but the jobs' own files.
#   on:  slurmdbd is started again, the users' slurm.conf names it again; waits until slurmctld has handed
#        slurmdbd what it queued meanwhile, so sacct is complete when this returns.
# slurmctld is never restarted: running and queued jobs are not disturbed. It keeps its own config
# (slurmctld.conf, accounting via slurmdbd) and queues accounting messages while slurmdbd is down, as a site's
# controller does when its database goes away.
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
running "$CTL_HOST" && ctld_up || die "the test cluster is not up (no slurmctld): run tests/cluster/up.sh first"
echo "$want" >"$ACCOUNTING_FLAG"
write_slurm_conf   # the nodes mount this directory: every node reads the new slurm.conf at once
on "$CTL_HOST" node-daemon accounting "$want" || die "node-daemon accounting $want failed"
if [ "$want" = off ]; then
  sacct_disabled || die "sacct still answers with accounting off"
else
  wait_until 30 "sacct works" sacct_works || die "sacct does not work with accounting on"
  wait_dbd_queue 25
fi
write_cluster_json
log "accounting $want in $(( ($(date +%s%N) - T0) / 1000000 )) ms"

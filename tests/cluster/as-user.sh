#!/usr/bin/env bash
# Run a command as the test user on the login node (docker exec into its container: the cluster's hosts, Slurm
# config and shared home; clean environment; cwd = home), without SSH. No command: an interactive login shell.
#   usage: as-user.sh [CMD ARGS...]        e.g. as-user.sh squeue -a ; as-user.sh sacct -X
# Run as root.
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
require_root
running "$LOGIN_HOST" || die "the test cluster is not up (no container $(container_of "$LOGIN_HOST"))"
[ $# -gt 0 ] || set -- bash -l
as_user_argv
if [ -t 0 ]; then exec "${AS_USER[@]:0:2}" -t "${AS_USER[@]:2}" "$@"; fi
exec "${AS_USER[@]}" "$@"

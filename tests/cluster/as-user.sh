#!/usr/bin/env bash
# Run a command as the test user on the login node (namespace hpcseg-login, its hosts file and Slurm config,
# SLURM_CONF set, clean environment, cwd = home), without SSH. No command: an interactive login shell.
#   usage: as-user.sh [CMD ARGS...]        e.g. as-user.sh squeue -a ; as-user.sh sacct -X
# Run as root.
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
require_root
[ -e "/run/netns/$NS_LOGIN" ] || die "the test cluster is not up (no namespace $NS_LOGIN)"
[ $# -gt 0 ] || set -- bash -l
cd "$TEST_HOME"
ns_cmd "$NS_LOGIN" "$LOGIN_HOST"
exec "${NS_CMD[@]}" runuser -u "$TEST_USER" -- env -i HOME="$TEST_HOME" USER="$TEST_USER" LOGNAME="$TEST_USER" \
  SHELL=/bin/bash PATH=/usr/local/bin:/usr/bin:/bin LANG=C.UTF-8 SLURM_CONF="$SLURM_CONF" "$@"

#!/usr/bin/env bash
# Start (or repair) the container test cluster outside pytest (benchmarks, a developer's shell): prepare.sh,
# `docker-compose up -d`, check.sh. Idempotent; run as root. Under pytest, pytest-docker does the `up`.
#   usage: up.sh [REPO_DIR]
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
require_root
bash "$CLUSTER_DIR/prepare.sh" "$@"
compose up -d 9>&- >"$LOG/compose-up.log" 2>&1 || { tail -n 30 "$LOG/compose-up.log" >&2; die "docker-compose up failed"; }
exec bash "$CLUSTER_DIR/check.sh"

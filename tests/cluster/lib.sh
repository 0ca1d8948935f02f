# shellcheck shell=bash
# Shared definitions for the hpcseg test cluster's host-side scripts (sourced, never run). The cluster itself is
# containers (compose.yml, node/); these scripts prepare its state, start and check it, and act on it through
# the containers. Everything here runs as root on the machine that hosts the cluster (the "client").
set -euo pipefail
umask 022

CLUSTER_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
STATE=${HPCSEG_TESTCLUSTER_DIR:-/var/lib/hpcseg-testcluster}
export HPCSEG_TESTCLUSTER_DIR=$STATE
COMPOSE_FILE=$CLUSTER_DIR/compose.yml
PROJECT=hpcseg-testcluster
DOCKER=${DOCKER:-/usr/bin/docker}
DOCKER_COMPOSE=${DOCKER_COMPOSE:-/usr/bin/docker-compose}
export HPCSEG_BASE_IMAGE=${HPCSEG_BASE_IMAGE:-debian:bookworm-slim}

# ---- names and addresses (compose.yml holds the same) ------------------------------------------------------------
LOGIN_HOST=login1
CTL_HOST=slurmctl
COMPUTE_HOST=compute1
COMPUTE2_HOST=compute2
COMPUTE_HOSTS="$COMPUTE_HOST $COMPUTE2_HOST"
LOGIN_IP=10.210.0.2          # on "front": the only cluster address the client reaches
LOGIN_INNER_IP=10.211.0.2
CTL_IP=10.211.0.3
COMPUTE_IP=10.211.0.11
COMPUTE2_IP=10.211.0.12
CLUSTER_NET=10.211.0.0/24    # internal: no host address, an unreachable route on the host
FRONT_BRIDGE=hpcseg-front
container_of() {
  case "$1" in
    "$LOGIN_HOST") echo hpcseg-login ;;
    "$CTL_HOST") echo hpcseg-slurmctl ;;
    "$COMPUTE_HOST") echo hpcseg-compute1 ;;
    "$COMPUTE2_HOST") echo hpcseg-compute2 ;;
    *) die "no node $1" ;;
  esac
}
NODES="$LOGIN_HOST $CTL_HOST $COMPUTE_HOST $COMPUTE2_HOST"

TEST_USER=hpcuser
TEST_UID=2000                # node/Dockerfile's TEST_UID
TEST_HOME=/home/hpcuser
ACCOUNT=hpcseg-test
CLUSTER_NAME=hpcseg
PARTITION=gpu
NGPUS=4
NCPUS=8
# The cluster's software tree, mounted read-only on login and compute nodes at the same path. The venv is built
# there by Debian's python3 (the nodes run the same Debian). HPCSEG_CLUSTER_VENV: a venv of one checkout's own.
SOFTWARE=${HPCSEG_CLUSTER_SOFTWARE:-/opt/hpcseg-cluster}
export HPCSEG_CLUSTER_SOFTWARE=$SOFTWARE
VENV=${HPCSEG_CLUSTER_VENV:-$SOFTWARE/venv}
SYS_PYTHON=/usr/bin/python3
DBD_PORT=6819
MFA_PORT=2222
MFA_PAM_SERVICE=hpcseg-sshd-mfa
SLURM_CONF_NODE=/etc/slurm/slurm.conf    # the path on the nodes

# ---- paths under $STATE (host) ----------------------------------------------------------------------------------
NODE_CFG=$STATE/node          # -> /etc/hpcseg-node on every node (read-only; /etc/hpcseg is left to hpcseg's own admin location)
SLURM_DIR=$STATE/etc/slurm    # -> /etc/slurm on every node (read-only; rewritten here, seen there at once)
SLURM_CONF=$SLURM_DIR/slurm.conf
CTLD_CONF=$SLURM_DIR/slurmctld.conf
HOME_DIR=$STATE/home          # -> /home on login and compute nodes
CTL_STATE=$STATE/ctl          # -> /var/lib/hpcseg-ctl on the controller (slurmctld state, MariaDB)
LOG=$STATE/log                # LOG/NODE -> /var/log/hpcseg on that node
SSHD_DIR=$NODE_CFG/sshd
HOST_KEY=$SSHD_DIR/ssh_host_ed25519_key
OTP_FILE=$SSHD_DIR/otp
CLIENT_DIR=$STATE/client
CLIENT_KEY=$CLIENT_DIR/id_ed25519
WRONG_KEY=$CLIENT_DIR/wrong_key
KNOWN_HOSTS=$CLIENT_DIR/known_hosts
ACCOUNTING_FLAG=$NODE_CFG/accounting
CLUSTER_JSON=$STATE/cluster.json

# ---- small helpers -----------------------------------------------------------------------------------------------
log() { printf '[testcluster %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { printf '[testcluster] FAILED: %s\n' "$*" >&2; exit 1; }
require_root() { [ "$(id -u)" = 0 ] || die "must run as root (Docker, iptables, tc)"; }

# Serialise every script that changes the cluster. fd 9 is closed for everything we start (9>&-).
take_lock() {
  mkdir -p "$STATE"
  exec 9>"$STATE/.lock"
  flock -w 900 9 || die "could not lock $STATE/.lock within 900 s (another up/down/accounting run?)"
}

# write_if_changed FILE MODE OWNER  (content on stdin); prints "changed" when it rewrote the file
write_if_changed() {
  local f=$1 mode=$2 owner=$3 content tmp
  content=$(cat; echo .); content=${content%.}
  if [ -f "$f" ] && printf '%s' "$content" | cmp -s "$f" -; then
    [ "$(stat -c '%a %u:%g' "$f")" = "${mode#0} $owner" ] || { chmod "$mode" "$f"; chown "$owner" "$f"; }
    return 0
  fi
  tmp=$(mktemp "$f.XXXXXX")
  printf '%s' "$content" >"$tmp"
  chmod "$mode" "$tmp"; chown "$owner" "$tmp"
  mv -f "$tmp" "$f"
  echo changed
}

# wait_until SECONDS DESCRIPTION CMD... : retry CMD every 0.2 s until it succeeds
wait_until() {
  local secs=$1 what=$2; shift 2
  local deadline=$(( $(date +%s) + secs ))
  while :; do
    if "$@" >/dev/null 2>&1; then return 0; fi
    if [ "$(date +%s)" -ge "$deadline" ]; then log "timed out after ${secs}s waiting for: $what"; return 1; fi
    sleep 0.2
  done
}

compose() { "$DOCKER_COMPOSE" --ansi never -f "$COMPOSE_FILE" -p "$PROJECT" "$@"; }

# on NODE CMD...: run CMD as root inside that node's container
on() { local c; c=$(container_of "$1"); shift; "$DOCKER" exec -i "$c" "$@"; }
# on_login_as_user CMD...: as the test user on the login node, clean environment, cwd = home
as_user_argv() {
  AS_USER=("$DOCKER" exec -i -u "$TEST_USER" -w "$TEST_HOME" -e HOME="$TEST_HOME" -e USER="$TEST_USER"
           -e LOGNAME="$TEST_USER" -e SHELL=/bin/bash -e PATH=/usr/local/bin:/usr/bin:/bin -e LANG=C.UTF-8
           -e SLURM_CONF="$SLURM_CONF_NODE" "$(container_of "$LOGIN_HOST")")
}

running() { [ "$("$DOCKER" inspect -f '{{.State.Running}}' "$(container_of "$1")" 2>/dev/null)" = true ]; }
node_ready_file() { on "$1" test -f /run/hpcseg/ready; }
# the pid of a container's init on the host (for nsenter into its network namespace)
host_pid() { "$DOCKER" inspect -f '{{.State.Pid}}' "$(container_of "$1")"; }
in_netns() { local p; p=$(host_pid "$1"); shift; nsenter --net="/proc/$p/ns/net" "$@"; }

accounting_mode() { if [ -f "$ACCOUNTING_FLAG" ] && [ "$(cat "$ACCOUNTING_FLAG")" = off ]; then echo off; else echo on; fi; }

# ---- Slurm (asked on the login node, as root) ---------------------------------------------------------------------
node_state() { on "$LOGIN_HOST" sinfo -h -n "$1" -o %t 2>/dev/null | head -n1; }
ctld_up() { on "$LOGIN_HOST" scontrol ping 2>/dev/null | grep -q 'is UP'; }
sacct_works() { on "$LOGIN_HOST" sacct -n -X -a -S now-1minutes -o JobID >/dev/null 2>&1; }
sacct_disabled() { local out; out=$(on "$LOGIN_HOST" sacct -n -X -S now-1minutes 2>&1) && return 1; echo "$out" | grep -qi disabled; }
dbd_queue() { on "$LOGIN_HOST" sdiag 2>/dev/null | awk -F: '/DBD Agent queue size/ {gsub(/ /, "", $2); print $2}'; }
dbd_queue_empty() { [ "$(dbd_queue)" = 0 ]; }
wait_dbd_queue() {
  wait_until "${1:-25}" "slurmctld's queue for slurmdbd to empty" dbd_queue_empty \
    || log "slurmctld still holds $(dbd_queue) messages for slurmdbd: recent jobs may reach sacct a little later"
}

# node_ready HOST: idle, or a busy healthy node; never idle* (not responding), drain, down, inval
node_ready() { case "$(node_state "$1")" in idle|mix|mix+|alloc|alloc+|comp) return 0 ;; esac; return 1; }
wait_node_ready() {
  local secs=${1:-60} host deadline st resumed
  for host in $COMPUTE_HOSTS; do
    deadline=$(( $(date +%s) + secs )); resumed=0
    until node_ready "$host"; do
      st=$(node_state "$host")
      case "$st" in
        drain*|drng*|down|down\*|fail*)
          if [ "$resumed" = 0 ]; then
            log "node $host is '$st': resuming it"
            on "$LOGIN_HOST" scontrol update nodename="$host" state=resume >/dev/null 2>&1 || true
            resumed=1
          fi ;;
      esac
      if [ "$(date +%s)" -ge "$deadline" ]; then
        log "node $host is '$st', not idle, after ${secs}s"; on "$LOGIN_HOST" scontrol show node "$host" >&2 || true
        return 1
      fi
      sleep 0.2
    done
  done
}

# ---- Slurm config ---------------------------------------------------------------------------------------------------
render_slurm_conf() {
  local acct=$1 acct_lines
  if [ "$acct" = on ]; then
    acct_lines="AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=$CTL_HOST
AccountingStoragePort=$DBD_PORT
AccountingStorageTRES=gres/gpu"
  else
    acct_lines="AccountingStorageType=accounting_storage/none"
  fi
  cat <<EOF
# Generated by tests/cluster/prepare.sh: edit the script, not this file. Paths are the nodes' (containers').
ClusterName=$CLUSTER_NAME
SlurmctldHost=$CTL_HOST($CTL_IP)
SlurmUser=slurm
SlurmdUser=root
AuthType=auth/munge
CryptoType=crypto/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
SwitchType=switch/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
GresTypes=gpu
ReturnToService=2
SchedulerType=sched/backfill
SchedulerParameters=batch_sched_delay=0,sched_min_interval=0
SlurmdParameters=config_overrides
MinJobAge=2
KillWait=10
InactiveLimit=0
Waittime=0
SlurmctldTimeout=120
SlurmdTimeout=300
MessageTimeout=10
DebugFlags=NO_CONF_HASH
SlurmctldPort=6817
SlurmdPort=6818
StateSaveLocation=/var/lib/hpcseg-ctl/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=/run/hpcseg/slurm/slurmctld.pid
SlurmdPidFile=/run/hpcseg/slurmd.pid
SlurmctldLogFile=/var/log/hpcseg/slurmctld.log
SlurmdLogFile=/var/log/hpcseg/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
PlugStackConfig=/etc/slurm/plugstack.conf
$acct_lines
JobCompType=jobcomp/none
MailProg=/bin/true
NodeName=$COMPUTE_HOST NodeAddr=$COMPUTE_IP CPUs=$NCPUS Boards=1 SocketsPerBoard=1 CoresPerSocket=$NCPUS ThreadsPerCore=1 RealMemory=16000 Gres=gpu:$NGPUS State=UNKNOWN
NodeName=$COMPUTE2_HOST NodeAddr=$COMPUTE2_IP CPUs=$NCPUS Boards=1 SocketsPerBoard=1 CoresPerSocket=$NCPUS ThreadsPerCore=1 RealMemory=16000 Gres=gpu:$NGPUS State=UNKNOWN
PartitionName=$PARTITION Nodes=$COMPUTE_HOST,$COMPUTE2_HOST Default=YES MaxTime=INFINITE State=UP
EOF
}

write_slurm_conf() {
  write_if_changed "$SLURM_CONF" 0644 0:0 < <(render_slurm_conf "$(accounting_mode)") >/dev/null
  write_if_changed "$CTLD_CONF" 0644 0:0 < <(render_slurm_conf on) >/dev/null
}

# ---- cluster.json --------------------------------------------------------------------------------------------------
write_cluster_json() {
  local fp ktype acct
  fp=$(ssh-keygen -lf "$HOST_KEY.pub" | awk '{print $2}')
  ktype=$(awk '{print $1}' "$HOST_KEY.pub")
  if [ "$(accounting_mode)" = on ]; then acct=True; else acct=False; fi
  "$SYS_PYTHON" - "$CLUSTER_JSON" <<EOF
import json, os, sys
path = sys.argv[1]
data = {
    "host": "$LOGIN_IP",
    "port": 22,
    "user": "$TEST_USER",
    "key_path": "$CLIENT_KEY",
    "wrong_key_path": "$WRONG_KEY",
    "known_hosts": "$KNOWN_HOSTS",
    "host_key_fingerprint": "$fp",
    "host_key_type": "$ktype",
    "login_node": "$LOGIN_HOST",
    "controller": "$CTL_HOST",
    "compute_node": "$COMPUTE_HOST",
    "compute_ip": "$COMPUTE_IP",
    "compute_nodes": ["$COMPUTE_HOST", "$COMPUTE2_HOST"],
    "compute_ips": {"$COMPUTE_HOST": "$COMPUTE_IP", "$COMPUTE2_HOST": "$COMPUTE2_IP"},
    "containers": {"$LOGIN_HOST": "$(container_of $LOGIN_HOST)", "$CTL_HOST": "$(container_of $CTL_HOST)",
                   "$COMPUTE_HOST": "$(container_of $COMPUTE_HOST)", "$COMPUTE2_HOST": "$(container_of $COMPUTE2_HOST)"},
    "compose_file": "$COMPOSE_FILE",
    "compose_project": "$PROJECT",
    "partition": "$PARTITION",
    "gpus": $NGPUS,
    "cpus": $NCPUS,
    "slurm_conf": "$SLURM_CONF_NODE",
    "python": "$VENV/bin/python",
    "venv": "$VENV",
    "home": "$TEST_HOME",
    "account": "$ACCOUNT",
    "cluster_name": "$CLUSTER_NAME",
    "accounting": $acct,
    "link_devices": ["$FRONT_BRIDGE", "$LOGIN_HOST:$LOGIN_IP"],
    "scripts_dir": "$CLUSTER_DIR",
    "state_dir": "$STATE",
    "mfa_port": $MFA_PORT,
    "otp_path": "$OTP_FILE",
    "mfa_pam_service": "$MFA_PAM_SERVICE",
}
tmp = path + ".tmp"
with open(tmp, "w") as f:
    json.dump(data, f, indent=2)
    f.write("\n")
os.chmod(tmp, 0o644)
os.replace(tmp, path)
EOF
}

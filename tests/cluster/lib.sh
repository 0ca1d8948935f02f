# shellcheck shell=bash
# Shared definitions and helpers for the hpcseg test cluster scripts (sourced, never run).
# Everything here runs as root on the machine that hosts the cluster.

set -euo pipefail
umask 022

CLUSTER_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
STATE=${HPCSEG_TESTCLUSTER_DIR:-/var/lib/hpcseg-testcluster}

# ---- names and addresses -------------------------------------------------------------------------------
NS_LOGIN=hpcseg-login
NS_COMPUTE=hpcseg-compute
LOGIN_HOST=login1
COMPUTE_HOST=compute1
VETH_ROOT=hpcseg-r      # root end of root<->login
VETH_LOGIN=hpcseg-l     # login end of root<->login
VETH_LC=hpcseg-lc       # login end of login<->compute
VETH_COMPUTE=hpcseg-c   # compute end of login<->compute
ROOT_IP=10.210.0.1
LOGIN_IP=10.210.0.2
LOGIN_INNER_IP=10.211.0.1
COMPUTE_IP=10.211.0.2
COMPUTE_NET=10.211.0.0/24
# the second compute node: its own namespace and link to login, its own subnet (login does not forward)
NS_COMPUTE2=hpcseg-compute2
COMPUTE2_HOST=compute2
VETH_LC2=hpcseg-lc2
VETH_COMPUTE2=hpcseg-c2
LOGIN_INNER2_IP=10.212.0.1
COMPUTE2_IP=10.212.0.2
COMPUTE2_NET=10.212.0.0/24
COMPUTE_HOSTS="$COMPUTE_HOST $COMPUTE2_HOST"
# compute_ns HOST: the network namespace of a compute node
compute_ns() { if [ "$1" = "$COMPUTE2_HOST" ]; then echo "$NS_COMPUTE2"; else echo "$NS_COMPUTE"; fi; }

TEST_USER=hpcuser
TEST_HOME=/home/hpcuser
ACCOUNT=hpcseg-test
CLUSTER_NAME=hpcseg
PARTITION=gpu
NGPUS=4
NCPUS=8
# HPCSEG_CLUSTER_VENV: a venv of its own for one checkout (parallel work trees share one cluster, not one venv)
VENV=${HPCSEG_CLUSTER_VENV:-/opt/hpcseg-cluster/venv}
SYS_PYTHON=/usr/bin/python3
DB_PORT=3306
DBD_PORT=6819

# ---- paths under $STATE --------------------------------------------------------------------------------
ETC=$STATE/etc
SLURM_DIR=$ETC/slurm
SLURM_CONF=$SLURM_DIR/slurm.conf          # what users, jobs and slurmd read (accounting on or off)
CTLD_CONF=$SLURM_DIR/slurmctld.conf       # what slurmctld and slurmdbd read: accounting always via slurmdbd
HOSTS_FILE=$ETC/hosts
RUN=$STATE/run
SLURM_RUN=$RUN/slurm
MYSQL_RUN=$RUN/mysqld
MUNGE_RUN=$RUN/munge
LOG=$STATE/log
SPOOL=$STATE/spool
GPU_DEV_DIR=$STATE/dev
SSHD_DIR=$STATE/sshd

# The second login sshd (MFA): key, then a one-time code through PAM. Used by up.sh, down.sh and cluster.json.
MFA_PORT=2222
MFA_DIR=$SSHD_DIR/mfa
MFA_CONFIG=$MFA_DIR/sshd_config
MFA_PAM_SERVICE=hpcseg-sshd-mfa         # OpenSSH 9.2 has no PAMServiceName: sshd uses its program name...
MFA_BIN=$MFA_DIR/$MFA_PAM_SERVICE       # ...so it runs as this link to /usr/sbin/sshd (comm: hpcseg-sshd-mfa)
MFA_PAM_FILE=/etc/pam.d/$MFA_PAM_SERVICE
OTP_FILE=$STATE/otp                     # the one-time code: root 0600 (PAM runs as root in sshd's monitor)
SSHD_CONFIG=$SSHD_DIR/sshd_config
HOST_KEY=$SSHD_DIR/ssh_host_ed25519_key
CLIENT_DIR=$STATE/client
CLIENT_KEY=$CLIENT_DIR/id_ed25519
WRONG_KEY=$CLIENT_DIR/wrong_key
KNOWN_HOSTS=$CLIENT_DIR/known_hosts
MYSQL_DIR=$STATE/mysql
MYCNF=$MYSQL_DIR/my.cnf
ACCOUNTING_FLAG=$STATE/accounting
CLUSTER_JSON=$STATE/cluster.json

export SLURM_CONF

# ---- small helpers -------------------------------------------------------------------------------------
log() { printf '[testcluster %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { printf '[testcluster] FAILED: %s\n' "$*" >&2; exit 1; }

require_root() { [ "$(id -u)" = 0 ] || die "must run as root (it creates network namespaces and starts daemons)"; }

# Serialise every script that changes the cluster. fd 9 is closed for every daemon we start (9>&-).
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
    [ "$(stat -c '%a %U:%G' "$f")" = "${mode#0} $owner" ] || { chmod "$mode" "$f"; chown "$owner" "$f"; }
    return 0
  fi
  tmp=$(mktemp "$f.XXXXXX")
  printf '%s' "$content" >"$tmp"
  chmod "$mode" "$tmp"; chown "$owner" "$tmp"
  mv -f "$tmp" "$f"
  echo changed
}

sha_of() { cat "$@" 2>/dev/null | sha256sum | cut -c1-64; }

# wait_until SECONDS DESCRIPTION CMD... : retry CMD every 0.1 s until it succeeds
wait_until() {
  local secs=$1 what=$2; shift 2
  local deadline=$(( $(date +%s%N) / 1000000 + secs * 1000 ))
  while :; do
    if "$@" >/dev/null 2>&1; then return 0; fi
    if [ $(( $(date +%s%N) / 1000000 )) -ge "$deadline" ]; then
      log "timed out after ${secs}s waiting for: $what"
      return 1
    fi
    sleep 0.1
  done
}

ns_inode() { stat -L -c %i "/run/netns/$1" 2>/dev/null || echo none; }

# alive PID: the process exists and is not a zombie (reaping by PID 1 can lag here). Builtins only: it runs often.
alive() {
  local _a _b st _rest
  [ -r "/proc/$1/stat" ] || return 1
  read -r _a _b st _rest <"/proc/$1/stat" 2>/dev/null || return 1
  [ -n "$st" ] && [ "$st" != Z ] && [ "$st" != X ]
}

# pid_ok PIDFILE COMM [NETNS]: the pid file names a live process with that command name (in that namespace)
pid_ok() {
  local pidfile=$1 comm=$2 ns=${3:-} pid="" c=""
  [ -s "$pidfile" ] || return 1
  read -r pid <"$pidfile" 2>/dev/null || true
  pid=${pid//[!0-9]/}
  [ -n "$pid" ] && alive "$pid" || return 1
  read -r c <"/proc/$pid/comm" 2>/dev/null || return 1
  [ "$c" = "$comm" ] || return 1
  if [ -n "$ns" ]; then
    [ "$(readlink "/proc/$pid/ns/net" 2>/dev/null)" = "net:[$(ns_inode "$ns")]" ] || return 1
  fi
  return 0
}

# stop_pid PIDFILE COMM: TERM the process named by the pid file (only if it is that command), wait, KILL
stop_pid() {
  local pidfile=$1 comm=$2 pid i
  [ -s "$pidfile" ] || { rm -f "$pidfile"; return 0; }
  pid=$(head -n1 "$pidfile" 2>/dev/null | tr -dc 0-9)
  if [ -n "$pid" ] && alive "$pid" && [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = "$comm" ]; then
    kill -TERM "$pid" 2>/dev/null || true
    for i in $(seq 1 150); do alive "$pid" || break; sleep 0.05; done
    if alive "$pid"; then
      log "$comm ($pid) ignored SIGTERM for 7.5 s: killing it"
      kill -KILL "$pid" 2>/dev/null || true
      for i in $(seq 1 40); do alive "$pid" || break; sleep 0.05; done
    fi
  fi
  rm -f "$pidfile"
}

# kill_ns_pids NS: end every process inside our network namespace NS (daemons and the jobs they started)
kill_ns_pids() {
  local ns=$1 pids i
  [ -e "/run/netns/$ns" ] || return 0
  pids=$(ip netns pids "$ns" 2>/dev/null | tr '\n' ' ')
  [ -n "${pids// }" ] || return 0
  # shellcheck disable=SC2086
  kill -TERM $pids 2>/dev/null || true
  for i in $(seq 1 50); do
    pids=$(ip netns pids "$ns" 2>/dev/null | tr '\n' ' ')
    [ -n "${pids// }" ] || return 0
    sleep 0.1
  done
  # shellcheck disable=SC2086
  kill -KILL $pids 2>/dev/null || true
  sleep 0.2
}

# The client's own files, hidden from the cluster's nodes: a cluster shares its home and software tree between
# login and compute nodes, never with a user's laptop, so a client path that leaks into a job must fail here as
# it would there. Each node sees an empty tmpfs in their place (its own /tmp; no client home, no checkout).
CLIENT_ONLY_DIRS="$(cd "$CLUSTER_DIR/../.." && pwd) /root /tmp ${HPCSEG_CLUSTER_HIDE:-}"

# ns_cmd NS HOSTNAME: prints nothing; fills the array NS_CMD with the launcher prefix the notes prescribe:
# a new mount + UTS namespace inside network namespace NS, our hosts file and Slurm config dir bind-mounted
# over /etc/hosts and /etc/slurm, the client's directories hidden, the hostname set. Append the command to run.
NS_SH='mount --bind "$1" /etc/hosts && mount --bind "$2" /etc/slurm && hostname "$3" && for d in $4; do
  if [ -d "$d" ]; then mount -t tmpfs -o mode=1777,size=2g hpcseg-node-local "$d" || exit 1; fi; done && shift 4 && exec "$@"'
ns_cmd() {
  NS_CMD=(nsenter "--net=/run/netns/$1" unshare --mount --uts --propagation slave
          sh -c "$NS_SH" sh "$HOSTS_FILE" "$SLURM_DIR" "$2" "$CLIENT_ONLY_DIRS")
}
# what every daemon's recorded config hash includes: a daemon started with another launcher is restarted
ns_sha() { printf '%s\n%s\n' "$NS_SH" "$CLIENT_ONLY_DIRS" | sha256sum | cut -c1-64; }

# start_daemon NAME NS HOST CMD...: start CMD detached (own session, no inherited stdio or lock fd)
start_daemon() {
  local name=$1 ns=$2 host=$3; shift 3
  ns_cmd "$ns" "$host"
  setsid "${NS_CMD[@]}" "$@" </dev/null >>"$LOG/$name.out" 2>&1 9>&- &
  disown 2>/dev/null || true
}

tail_log() { local f; for f in "$@"; do [ -f "$f" ] && { echo "--- tail of $f:" >&2; tail -n 25 "$f" >&2; }; done; return 0; }

accounting_mode() { if [ -f "$ACCOUNTING_FLAG" ] && [ "$(cat "$ACCOUNTING_FLAG")" = off ]; then echo off; else echo on; fi; }

# ---- network -------------------------------------------------------------------------------------------
net_ok() {
  [ -e "/run/netns/$NS_LOGIN" ] && [ -e "/run/netns/$NS_COMPUTE" ] && [ -e "/run/netns/$NS_COMPUTE2" ] || return 1
  ip route show "$COMPUTE_NET" 2>/dev/null | grep -q '^unreachable' || return 1
  ip route show "$COMPUTE2_NET" 2>/dev/null | grep -q '^unreachable' || return 1
  ip -br addr show dev "$VETH_ROOT" 2>/dev/null | grep -q "UP .*$ROOT_IP/24" || return 1
  ip -n "$NS_LOGIN" -br addr show dev "$VETH_LOGIN" 2>/dev/null | grep -q "UP .*$LOGIN_IP/24" || return 1
  ip -n "$NS_LOGIN" -br addr show dev "$VETH_LC" 2>/dev/null | grep -q "UP .*$LOGIN_INNER_IP/24" || return 1
  ip -n "$NS_COMPUTE" -br addr show dev "$VETH_COMPUTE" 2>/dev/null | grep -q "UP .*$COMPUTE_IP/24" || return 1
  ip -n "$NS_COMPUTE" route show "$LOGIN_IP" 2>/dev/null | grep -q "via $LOGIN_INNER_IP" || return 1
  ip -n "$NS_LOGIN" -br addr show dev "$VETH_LC2" 2>/dev/null | grep -q "UP .*$LOGIN_INNER2_IP/24" || return 1
  ip -n "$NS_COMPUTE2" -br addr show dev "$VETH_COMPUTE2" 2>/dev/null | grep -q "UP .*$COMPUTE2_IP/24" || return 1
  ip -n "$NS_COMPUTE2" route show "$LOGIN_IP" 2>/dev/null | grep -q "via $LOGIN_INNER2_IP" || return 1
  [ "$(nsenter --net=/run/netns/$NS_LOGIN cat /proc/sys/net/ipv4/ip_forward)" = 0 ] || return 1
  return 0
}

ensure_unreachable_route() {
  # Mandatory: without it root's default route would send compute-subnet traffic out of the machine.
  ip route replace unreachable "$COMPUTE_NET"
  ip route replace unreachable "$COMPUTE2_NET"
}

net_down() {
  local ns
  for ns in "$NS_COMPUTE2" "$NS_COMPUTE" "$NS_LOGIN"; do
    kill_ns_pids "$ns"
    [ -e "/run/netns/$ns" ] && ip netns del "$ns" 2>/dev/null || true
  done
  ip link del "$VETH_ROOT" 2>/dev/null || true
}

# ns_sysctls NS: no forwarding, no IPv6, loopback up
ns_sysctls() {
  nsenter --net=/run/netns/$1 sh -c 'echo 0 > /proc/sys/net/ipv4/ip_forward; echo 1 > /proc/sys/net/ipv6/conf/all/disable_ipv6; echo 1 > /proc/sys/net/ipv6/conf/default/disable_ipv6' 2>/dev/null || true
  ip -n "$1" link set lo up
}

# compute_link NS VETH_LOGIN_END VETH_NODE_END LOGIN_INNER_IP NODE_IP: a compute node's namespace and its own
# link (and /24) to the login node. The node reaches the controller's address (10.210.0.2, owned by login) via
# login's inner address: local delivery on login, no forwarding. It has no other route (no default route).
compute_link() {
  local ns=$1 lend=$2 nend=$3 inner=$4 ip_=$5
  ip netns add "$ns"
  ns_sysctls "$ns"
  ip -n "$NS_LOGIN" link add "$lend" type veth peer name "$nend" netns "$ns"
  ip -n "$NS_LOGIN" addr add "$inner/24" dev "$lend"
  ip -n "$NS_LOGIN" link set "$lend" up
  ip -n "$ns" addr add "$ip_/24" dev "$nend"
  ip -n "$ns" link set "$nend" up
  ip -n "$ns" route add "$LOGIN_IP/32" via "$inner"
}

net_up() {
  ensure_unreachable_route
  if net_ok; then return 0; fi
  log "network: (re)creating namespaces $NS_LOGIN, $NS_COMPUTE, $NS_COMPUTE2"
  net_down
  ensure_unreachable_route
  ip netns add "$NS_LOGIN"
  ns_sysctls "$NS_LOGIN"
  ip link add "$VETH_ROOT" type veth peer name "$VETH_LOGIN" netns "$NS_LOGIN"
  ip addr add "$ROOT_IP/24" dev "$VETH_ROOT"
  ip link set "$VETH_ROOT" up
  ip -n "$NS_LOGIN" addr add "$LOGIN_IP/24" dev "$VETH_LOGIN"
  ip -n "$NS_LOGIN" link set "$VETH_LOGIN" up
  compute_link "$NS_COMPUTE" "$VETH_LC" "$VETH_COMPUTE" "$LOGIN_INNER_IP" "$COMPUTE_IP"
  compute_link "$NS_COMPUTE2" "$VETH_LC2" "$VETH_COMPUTE2" "$LOGIN_INNER2_IP" "$COMPUTE2_IP"
  net_ok || die "network namespaces did not come up as expected"
}

# ---- Slurm client calls from the root namespace (they reach slurmctld at 10.210.0.2) -----------------------
node_state() { sinfo -h -n "${1:-$COMPUTE_HOST}" -o %t 2>/dev/null | head -n1; }
ctld_up() { scontrol ping 2>/dev/null | grep -q 'is UP'; }
running_config_accounting() { scontrol show config 2>/dev/null | awk -F'= ' '/^AccountingStorageType/ {print $2}' | tr -d ' '; }

# node_ready [HOST]: "idle", or a busy healthy node: "mix", "alloc", "alloc+" (some jobs completing), "comp".
# slurmctld may report "mix" for a while after the last job left the queue, so the queue is not consulted. Never
# "idle*" (not responding), drain, down, inval...
node_ready() {
  case "$(node_state "${1:-$COMPUTE_HOST}")" in
    idle|mix|mix+|alloc|alloc+|comp) return 0 ;;
  esac
  return 1
}

# wait_node_ready SECS: every compute node ready (a drained or down one is resumed once)
wait_node_ready() {
  local secs=${1:-60} host
  for host in $COMPUTE_HOSTS; do wait_one_node_ready "$secs" "$host" || return 1; done
}

wait_one_node_ready() {
  local secs=$1 host=$2 deadline st resumed=0
  deadline=$(( $(date +%s) + secs ))
  while :; do
    node_ready "$host" && return 0
    st=$(node_state "$host")
    case "$st" in
      drain*|drng*|down|down\*|fail*|inval*)
        if [ "$resumed" = 0 ] && [ "${st%\*}" != inval ]; then
          log "node $host is '$st': resuming it"
          scontrol update nodename="$host" state=resume >/dev/null 2>&1 || true
          resumed=1
        fi ;;
    esac
    if [ "$(date +%s)" -ge "$deadline" ]; then
      log "node $host state is '$st', not idle, after ${secs}s"
      scontrol show node "$host" >&2 2>/dev/null || true
      return 1
    fi
    sleep 0.1
  done
}

sacct_works() { sacct -n -X -a -S now-1minutes -o JobID >/dev/null 2>&1; }
sacct_disabled() { local out; out=$(sacct -n -X -S now-1minutes 2>&1) && return 1; echo "$out" | grep -qi 'disabled'; }

# ---- Slurm config generation -----------------------------------------------------------------------------
render_slurm_conf() {
  local acct=$1 acct_lines
  if [ "$acct" = on ]; then
    acct_lines="AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=$LOGIN_IP
AccountingStoragePort=$DBD_PORT
AccountingStorageTRES=gres/gpu"
  else
    acct_lines="AccountingStorageType=accounting_storage/none"
  fi
  cat <<EOF
# Generated by tests/cluster/up.sh: edit the script, not this file.
ClusterName=$CLUSTER_NAME
SlurmctldHost=$LOGIN_HOST($LOGIN_IP)
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
StateSaveLocation=$SPOOL/slurmctld
SlurmdSpoolDir=$SPOOL/slurmd/%n
SlurmctldPidFile=$SLURM_RUN/slurmctld.pid
SlurmdPidFile=$RUN/slurmd-%n.pid
SlurmctldLogFile=$LOG/slurmctld.log
SlurmdLogFile=$LOG/slurmd-%n.log
SlurmctldDebug=info
SlurmdDebug=info
PlugStackConfig=$SLURM_DIR/plugstack.conf
$acct_lines
JobCompType=jobcomp/none
MailProg=/bin/true
NodeName=$COMPUTE_HOST NodeAddr=$COMPUTE_IP CPUs=$NCPUS Boards=1 SocketsPerBoard=1 CoresPerSocket=$NCPUS ThreadsPerCore=1 RealMemory=16000 Gres=gpu:$NGPUS State=UNKNOWN
NodeName=$COMPUTE2_HOST NodeAddr=$COMPUTE2_IP CPUs=$NCPUS Boards=1 SocketsPerBoard=1 CoresPerSocket=$NCPUS ThreadsPerCore=1 RealMemory=16000 Gres=gpu:$NGPUS State=UNKNOWN
PartitionName=$PARTITION Nodes=$COMPUTE_HOST,$COMPUTE2_HOST Default=YES MaxTime=INFINITE State=UP
EOF
}

write_slurm_conf() {
  write_if_changed "$SLURM_CONF" 0644 root:root < <(render_slurm_conf "$(accounting_mode)") >/dev/null
  write_if_changed "$CTLD_CONF" 0644 root:root < <(render_slurm_conf on) >/dev/null
}

# config hashes remembered when a daemon starts: a differing hash means it must restart
ctld_conf_sha() { { echo "$CTLD_CONF"; ns_sha; cat "$CTLD_CONF" "$SLURM_DIR/gres.conf" "$SLURM_DIR/plugstack.conf"; } | sha256sum | cut -c1-64; }
slurmd_conf_sha() { { ns_sha; grep -v '^AccountingStorage' "$SLURM_CONF"; cat "$SLURM_DIR/gres.conf" "$SLURM_DIR/plugstack.conf"; } | sha256sum | cut -c1-64; }

start_slurmctld() {
  log "starting slurmctld in $NS_LOGIN"
  install -d -o slurm -g slurm -m 0755 "$SPOOL/slurmctld" "$SLURM_RUN"
  touch "$LOG/slurmctld.log"; chown slurm:slurm "$LOG/slurmctld.log"
  start_daemon slurmctld "$NS_LOGIN" "$LOGIN_HOST" env SLURM_CONF="$CTLD_CONF" /usr/sbin/slurmctld -i
  if ! wait_until 30 "slurmctld answers scontrol ping" ctld_up; then
    tail_log "$LOG/slurmctld.out" "$LOG/slurmctld.log"; die "slurmctld did not start"
  fi
  ctld_conf_sha >"$RUN/slurmctld.confsha"
}

stop_slurmctld() { stop_pid "$SLURM_RUN/slurmctld.pid" slurmctld; rm -f "$RUN/slurmctld.confsha"; }

ensure_slurmctld() {
  if pid_ok "$SLURM_RUN/slurmctld.pid" slurmctld "$NS_LOGIN" && ctld_up \
     && [ "$(cat "$RUN/slurmctld.confsha" 2>/dev/null)" = "$(ctld_conf_sha)" ]; then
    return 0
  fi
  stop_slurmctld
  start_slurmctld
}

ensure_slurmd() {
  local host
  for host in $COMPUTE_HOSTS; do ensure_node_slurmd "$host" "$(compute_ns "$host")"; done
}

slurmd_pid_file() { echo "$RUN/slurmd-$1.pid"; }

# ensure_node_slurmd HOST NS: that node's slurmd (-N HOST, in NS, hostname HOST), restarted on a config change
ensure_node_slurmd() {
  local host=$1 ns=$2 pidf
  pidf=$(slurmd_pid_file "$host")
  if pid_ok "$pidf" slurmd "$ns" \
     && [ "$(cat "$RUN/slurmd-$host.confsha" 2>/dev/null)" = "$(slurmd_conf_sha)" ]; then
    return 0
  fi
  stop_pid "$pidf" slurmd
  stop_pid "$RUN/slurmd.pid" slurmd   # a single-node cluster's slurmd (before compute2 existed)
  log "starting slurmd ($host) in $ns"
  install -d -m 0755 "$SPOOL/slurmd/$host"
  start_daemon "slurmd-$host" "$ns" "$host" env SLURM_CONF="$SLURM_CONF" /usr/sbin/slurmd -N "$host"
  if ! wait_until 30 "slurmd pid file ($host)" pid_ok "$pidf" slurmd "$ns"; then
    tail_log "$LOG/slurmd-$host.out" "$LOG/slurmd-$host.log"; die "slurmd did not start on $host"
  fi
  slurmd_conf_sha >"$RUN/slurmd-$host.confsha"
}

slurmds_alive() {
  local host
  for host in $COMPUTE_HOSTS; do pid_ok "$(slurmd_pid_file "$host")" slurmd "$(compute_ns "$host")" || return 1; done
}

# ---- MariaDB + slurmdbd ------------------------------------------------------------------------------------
db_ping() { mariadb-admin --defaults-file="$MYCNF" --connect-timeout=2 ping; }
dbd_up() { sacctmgr -n -P show cluster format=cluster; }

ensure_dbd() {
  local force=${1:-}
  if [ -z "$force" ] && pid_ok "$SLURM_RUN/slurmdbd.pid" slurmdbd "$NS_LOGIN" && pid_ok "$MYSQL_RUN/mysqld.pid" mariadbd "$NS_LOGIN" \
     && [ "$(cat "$RUN/slurmdbd.confsha" 2>/dev/null)" = "$(sha_of "$SLURM_DIR/slurmdbd.conf" "$MYCNF")" ]; then
    return 0   # ensure_associations checks that it answers
  fi
  # MariaDB
  if ! { pid_ok "$MYSQL_RUN/mysqld.pid" mariadbd "$NS_LOGIN" && db_ping >/dev/null 2>&1 \
         && [ "$(cat "$RUN/mariadb.confsha" 2>/dev/null)" = "$(sha_of "$MYCNF")" ]; }; then
    stop_pid "$SLURM_RUN/slurmdbd.pid" slurmdbd
    stop_pid "$MYSQL_RUN/mysqld.pid" mariadbd
    if [ ! -d "$MYSQL_DIR/data/mysql" ]; then
      log "initialising MariaDB data dir"
      rm -rf "$MYSQL_DIR/data"
      install -d -o mysql -g mysql -m 0750 "$MYSQL_DIR/data"
      mariadb-install-db --defaults-file="$MYCNF" --user=mysql --auth-root-authentication-method=socket \
        --skip-test-db >"$LOG/mariadb-install.out" 2>&1 || { tail_log "$LOG/mariadb-install.out"; die "mariadb-install-db failed"; }
    fi
    log "starting MariaDB in $NS_LOGIN (127.0.0.1:$DB_PORT there)"
    rm -f "$MYSQL_RUN/mysqld.sock"
    start_daemon mariadb "$NS_LOGIN" "$LOGIN_HOST" /usr/sbin/mariadbd --defaults-file="$MYCNF"
    if ! wait_until 60 "MariaDB answers ping" db_ping; then
      tail_log "$LOG/mariadb.out" "$LOG/mariadb.err"; die "MariaDB did not start"
    fi
    sha_of "$MYCNF" >"$RUN/mariadb.confsha"
  fi
  local pw; pw=$(cat "$MYSQL_DIR/slurm.pass")
  mariadb --defaults-file="$MYCNF" -uroot <<SQL || die "could not set up the accounting database"
CREATE DATABASE IF NOT EXISTS slurm_acct_db;
CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY '$pw';
CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY '$pw';
ALTER USER 'slurm'@'127.0.0.1' IDENTIFIED BY '$pw';
ALTER USER 'slurm'@'localhost' IDENTIFIED BY '$pw';
GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';
GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost';
FLUSH PRIVILEGES;
SQL
  # slurmdbd
  DBD_STARTED=1
  stop_pid "$SLURM_RUN/slurmdbd.pid" slurmdbd
  log "starting slurmdbd in $NS_LOGIN"
  touch "$LOG/slurmdbd.log"; chown slurm:slurm "$LOG/slurmdbd.log"
  start_daemon slurmdbd "$NS_LOGIN" "$LOGIN_HOST" env SLURM_CONF="$CTLD_CONF" /usr/sbin/slurmdbd
  if ! wait_until 60 "slurmdbd answers sacctmgr" dbd_up; then
    tail_log "$LOG/slurmdbd.out" "$LOG/slurmdbd.log"; die "slurmdbd did not start"
  fi
  sha_of "$SLURM_DIR/slurmdbd.conf" "$MYCNF" >"$RUN/slurmdbd.confsha"
}

# sacctmgr needs a slurm.conf that names slurmdbd, also while accounting is off for the users
sacctmgr_acct() { SLURM_CONF=$CTLD_CONF sacctmgr "$@"; }

# messages slurmctld holds for slurmdbd (job starts/ends while slurmdbd was down)
dbd_queue() { sdiag 2>/dev/null | awk -F: '/DBD Agent queue size/ {gsub(/ /, "", $2); print $2}'; }
dbd_queue_empty() { [ "$(dbd_queue)" = 0 ]; }
# slurmctld retries slurmdbd every 10 s: wait (bounded) until it has handed over what it queued
wait_dbd_queue() {
  wait_until "${1:-25}" "slurmctld's queue for slurmdbd to empty" dbd_queue_empty \
    || log "slurmctld still holds $(dbd_queue) messages for slurmdbd: recent jobs may reach sacct a little later"
}

# cluster, account and the test user's association in the accounting database (one query when all exist)
ensure_associations() {
  local want="$CLUSTER_NAME|$ACCOUNT|$TEST_USER" out
  # known to exist in this database, and slurmdbd was not restarted here (sacct_works checks it answers)
  [ -z "${DBD_STARTED:-}" ] && [ -f "$MYSQL_DIR/assoc.ok" ] && return 0
  if ! out=$(sacctmgr_acct -n -P show assoc where cluster="$CLUSTER_NAME" account="$ACCOUNT" user="$TEST_USER" \
             format=cluster,account,user 2>&1); then
    log "slurmdbd does not answer ($out): restarting it"
    ensure_dbd force
    out=$(sacctmgr_acct -n -P show assoc where cluster="$CLUSTER_NAME" account="$ACCOUNT" user="$TEST_USER" \
          format=cluster,account,user) || die "slurmdbd does not answer"
  fi
  if echo "$out" | grep -qxF "$want"; then touch "$MYSQL_DIR/assoc.ok"; return 0; fi
  sacctmgr_acct -n -P show cluster format=cluster | grep -qx "$CLUSTER_NAME" \
    || sacctmgr_acct -i add cluster "$CLUSTER_NAME" >/dev/null || die "sacctmgr add cluster failed"
  sacctmgr_acct -n -P show account "$ACCOUNT" format=account | grep -qx "$ACCOUNT" \
    || sacctmgr_acct -i add account "$ACCOUNT" Cluster="$CLUSTER_NAME" Description="hpcseg tests" Organization=hpcseg >/dev/null \
    || die "sacctmgr add account failed"
  sacctmgr_acct -i add user "$TEST_USER" Account="$ACCOUNT" DefaultAccount="$ACCOUNT" Cluster="$CLUSTER_NAME" >/dev/null \
    || die "sacctmgr add user failed"
  touch "$MYSQL_DIR/assoc.ok"
}

# ---- cluster.json ------------------------------------------------------------------------------------------
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
    "compute_node": "$COMPUTE_HOST",
    "compute_ip": "$COMPUTE_IP",
    "compute_nodes": ["$COMPUTE_HOST", "$COMPUTE2_HOST"],
    "compute_ips": {"$COMPUTE_HOST": "$COMPUTE_IP", "$COMPUTE2_HOST": "$COMPUTE2_IP"},
    "netns_computes": {"$COMPUTE_HOST": "$NS_COMPUTE", "$COMPUTE2_HOST": "$NS_COMPUTE2"},
    "partition": "$PARTITION",
    "gpus": $NGPUS,
    "cpus": $NCPUS,
    "slurm_conf": "$SLURM_CONF",
    "python": "$VENV/bin/python",
    "venv": "$VENV",
    "home": "$TEST_HOME",
    "account": "$ACCOUNT",
    "cluster_name": "$CLUSTER_NAME",
    "accounting": $acct,
    "netns_login": "$NS_LOGIN",
    "netns_compute": "$NS_COMPUTE",
    "link_devices": ["$VETH_ROOT", "$NS_LOGIN:$VETH_LOGIN"],
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

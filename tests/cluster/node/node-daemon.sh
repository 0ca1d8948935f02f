#!/bin/bash
# Inside a test-cluster node container (tests/cluster/node/Dockerfile): start, stop and check its daemons by
# their pid files, never by process name. The host reaches it through the container:
#   docker exec hpcseg-login node-daemon restart sshd
#   node-daemon start|stop|restart|status NAME    NAME: munged sshd sshd-mfa mariadb slurmdbd slurmctld slurmd
#   node-daemon pid NAME                          the daemon's pid (in this container's pid namespace)
#   node-daemon start-role                        every daemon of this node's role (/run/hpcseg/role, written by
#                                                 the entrypoint): at start, and check.sh's repair
#   node-daemon accounting on|off                 (controller) slurmdbd started + associations / stopped
#   node-daemon otp-banner | otp-check            the MFA sshd's PAM helpers (pam_exec)
set -euo pipefail
RUN=/run/hpcseg
LOG=/var/log/hpcseg
CFG=/etc/hpcseg-node
CTL_CONF=/etc/slurm/slurmctld.conf

log() { printf '[%s %s] %s\n' "$(hostname)" "$(date +%H:%M:%S)" "$*" >&2; }
die() { log "FAILED: $*"; exit 1; }

pidfile() {
  case "$1" in
    munged) echo /run/munge/munged.pid ;;
    sshd) echo $RUN/sshd.pid ;;
    sshd-mfa) echo $RUN/sshd-mfa.pid ;;
    mariadb) echo $RUN/mysqld/mysqld.pid ;;
    slurmdbd) echo $RUN/slurm/slurmdbd.pid ;;
    slurmctld) echo $RUN/slurm/slurmctld.pid ;;
    slurmd) echo $RUN/slurmd.pid ;;
    *) die "unknown daemon $1" ;;
  esac
}
comm_of() {
  case "$1" in
    sshd-mfa) echo hpcseg-sshd-mfa ;;
    mariadb) echo mariadbd ;;
    *) echo "$1" ;;
  esac
}

alive() { local st; st=$(awk '{print $3}' "/proc/$1/stat" 2>/dev/null) || return 1; [ -n "$st" ] && [ "$st" != Z ]; }

# pid NAME: prints the pid when the pid file names a live process of that command
pid() {
  local f p c
  f=$(pidfile "$1")
  [ -s "$f" ] || return 1
  p=$(head -n1 "$f" | tr -dc 0-9)
  [ -n "$p" ] && alive "$p" || return 1
  c=$(cat "/proc/$p/comm" 2>/dev/null) || return 1
  [ "$c" = "$(comm_of "$1")" ] || return 1
  echo "$p"
}

wait_until() {  # SECONDS WHAT CMD...
  local secs=$1 what=$2 i; shift 2
  for i in $(seq 1 $((secs * 10))); do "$@" >/dev/null 2>&1 && return 0; sleep 0.1; done
  log "timed out after ${secs}s waiting for: $what"; return 1
}

tail_logs() { local f; for f in "$@"; do [ -f "$f" ] && { echo "--- $f" >&2; tail -n 20 "$f" >&2; }; done; return 0; }

launch() {  # NAME CMD...: detached, own session, output appended to $LOG/NAME.out
  local name=$1; shift
  setsid "$@" </dev/null >>"$LOG/$name.out" 2>&1 &
}

db_ping() { mariadb-admin --defaults-file=$CFG/my.cnf --connect-timeout=2 ping; }
dbd_up() { SLURM_CONF=$CTL_CONF sacctmgr -n -P show cluster format=cluster; }
ctld_up() { scontrol ping 2>/dev/null | grep -q 'is UP'; }
munge_ok() { munge -n 2>/dev/null | unmunge >/dev/null 2>&1; }

start() {
  local name=$1
  if pid "$name" >/dev/null; then return 0; fi
  case "$name" in
    munged)
      install -d -o munge -g munge -m 0755 /run/munge "$LOG/munge"
      launch munged runuser -u munge -- /usr/sbin/munged --pid-file=/run/munge/munged.pid \
        --log-file="$LOG/munge/munged.log"
      wait_until 20 "munge works" munge_ok || { tail_logs "$LOG/munged.out" "$LOG/munge/munged.log"; die "munged"; } ;;
    sshd)
      /usr/sbin/sshd -t -f $CFG/sshd/sshd_config || die "sshd config test failed"
      launch sshd /usr/sbin/sshd -f $CFG/sshd/sshd_config -E "$LOG/sshd.log"
      wait_until 20 "sshd pid file" pid sshd || { tail_logs "$LOG/sshd.out" "$LOG/sshd.log"; die "sshd"; } ;;
    sshd-mfa)
      /usr/local/sbin/hpcseg-sshd-mfa -t -f $CFG/sshd/sshd_config.mfa || die "MFA sshd config test failed"
      launch sshd-mfa /usr/local/sbin/hpcseg-sshd-mfa -f $CFG/sshd/sshd_config.mfa -E "$LOG/sshd-mfa.log"
      wait_until 20 "MFA sshd pid file" pid sshd-mfa || { tail_logs "$LOG/sshd-mfa.out" "$LOG/sshd-mfa.log"; die "sshd-mfa"; } ;;
    mariadb)
      install -d -o mysql -g mysql -m 0755 $RUN/mysqld
      install -d -o mysql -g mysql -m 0750 /var/lib/hpcseg-ctl/mysql
      touch "$LOG/mariadb.err"; chown mysql:mysql "$LOG/mariadb.err"
      chown -R mysql:mysql /var/lib/hpcseg-ctl/mysql
      if [ ! -d /var/lib/hpcseg-ctl/mysql/mysql ]; then
        log "initialising MariaDB's data dir"
        mariadb-install-db --defaults-file=$CFG/my.cnf --user=mysql --auth-root-authentication-method=socket \
          --skip-test-db >"$LOG/mariadb-install.out" 2>&1 || { tail_logs "$LOG/mariadb-install.out"; die "mariadb-install-db"; }
      fi
      rm -f $RUN/mysqld/mysqld.sock
      launch mariadb /usr/sbin/mariadbd --defaults-file=$CFG/my.cnf
      wait_until 60 "MariaDB answers" db_ping || { tail_logs "$LOG/mariadb.out" "$LOG/mariadb.err"; die "mariadb"; }
      local pw; pw=$(cat $CFG/db/slurm.pass)
      mariadb --defaults-file=$CFG/my.cnf -uroot <<SQL || die "could not set up the accounting database"
CREATE DATABASE IF NOT EXISTS slurm_acct_db;
CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY '$pw';
CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY '$pw';
ALTER USER 'slurm'@'127.0.0.1' IDENTIFIED BY '$pw';
ALTER USER 'slurm'@'localhost' IDENTIFIED BY '$pw';
GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';
GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost';
FLUSH PRIVILEGES;
SQL
      ;;
    slurmdbd)
      install -d -o slurm -g slurm -m 0755 $RUN/slurm
      touch "$LOG/slurmdbd.log"; chown slurm:slurm "$LOG/slurmdbd.log"
      launch slurmdbd env SLURM_CONF=$CTL_CONF /usr/sbin/slurmdbd
      wait_until 60 "slurmdbd answers sacctmgr" dbd_up || { tail_logs "$LOG/slurmdbd.out" "$LOG/slurmdbd.log"; die "slurmdbd"; }
      associations ;;
    slurmctld)
      install -d -o slurm -g slurm -m 0755 $RUN/slurm /var/lib/hpcseg-ctl/slurmctld
      chown -R slurm:slurm /var/lib/hpcseg-ctl/slurmctld
      touch "$LOG/slurmctld.log"; chown slurm:slurm "$LOG/slurmctld.log"
      launch slurmctld env SLURM_CONF=$CTL_CONF /usr/sbin/slurmctld -i
      wait_until 30 "slurmctld answers scontrol ping" ctld_up || { tail_logs "$LOG/slurmctld.out" "$LOG/slurmctld.log"; die "slurmctld"; } ;;
    slurmd)
      install -d -m 0755 /var/spool/slurmd
      launch slurmd /usr/sbin/slurmd -N "$(hostname)"
      wait_until 30 "slurmd pid file" pid slurmd || { tail_logs "$LOG/slurmd.out" "$LOG/slurmd.log"; die "slurmd"; } ;;
  esac
  log "$name started (pid $(pid "$name"))"
}

stop() {
  local name=$1 p i
  p=$(pid "$name") || return 0
  kill -TERM "$p" 2>/dev/null || true
  for i in $(seq 1 150); do alive "$p" || break; sleep 0.05; done
  if alive "$p"; then log "$name ($p) ignored SIGTERM: killing it"; kill -KILL "$p" 2>/dev/null || true; fi
  for i in $(seq 1 40); do alive "$p" || break; sleep 0.05; done
  rm -f "$(pidfile "$name")"
  log "$name stopped"
}

# cluster, account and the test user's association in the accounting database
associations() {
  local acm=(env SLURM_CONF=$CTL_CONF sacctmgr) c a u
  c=$(cat $CFG/cluster_name) a=$(cat $CFG/account) u=hpcuser
  if "${acm[@]}" -n -P show assoc where cluster="$c" account="$a" user="$u" format=cluster,account,user \
     | grep -qxF "$c|$a|$u"; then return 0; fi
  "${acm[@]}" -n -P show cluster format=cluster | grep -qx "$c" || "${acm[@]}" -i add cluster "$c" >/dev/null
  "${acm[@]}" -n -P show account "$a" format=account | grep -qx "$a" \
    || "${acm[@]}" -i add account "$a" Cluster="$c" Description="hpcseg tests" Organization=hpcseg >/dev/null
  "${acm[@]}" -i add user "$u" Account="$a" DefaultAccount="$a" Cluster="$c" >/dev/null
}

# the daemons of a role, in start order (slurmdbd only while accounting is on)
role_daemons() {
  case "$1" in
    login) echo munged sshd sshd-mfa ;;
    controller)
      if [ "$(cat $CFG/accounting 2>/dev/null || echo on)" = off ]; then echo munged mariadb slurmctld
      else echo munged mariadb slurmdbd slurmctld; fi ;;
    compute) echo munged slurmd ;;
    *) die "unknown role $1" ;;
  esac
}

case "${1:-}" in
  start) start "$2" ;;
  start-role)
    role=$(cat $RUN/role 2>/dev/null) || die "no $RUN/role: the entrypoint has not run"
    for d in $(role_daemons "$role"); do start "$d"; done ;;
  stop) stop "$2" ;;
  restart) stop "$2"; start "$2" ;;
  status) pid "$2" >/dev/null ;;
  pid) pid "$2" ;;
  accounting)
    case "${2:-}" in
      on) start slurmdbd ;;
      off) stop slurmdbd ;;
      *) die "usage: node-daemon accounting on|off" ;;
    esac ;;
  otp-banner) echo "hpcseg test cluster: enter your one-time code." ;;
  otp-check)
    # pam_exec expose_authtok: the typed answer arrives on stdin, NUL-terminated
    code=$(head -c 256 | tr -d '\000\r\n')
    want=$(cat $CFG/sshd/otp 2>/dev/null) || exit 1
    [ -n "$want" ] && [ "$code" = "$want" ] ;;
  *) echo "usage: node-daemon start|stop|restart|status|pid NAME | start-role | accounting on|off" >&2; exit 2 ;;
esac

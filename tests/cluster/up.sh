#!/usr/bin/env bash
# Start (or repair) the hpcseg test cluster and write $STATE/cluster.json. Idempotent; run as root.
#   usage: up.sh [REPO_DIR]      REPO_DIR: the hpcseg checkout to install into the cluster's venv
#                                (default: the repo that holds this script)
# Exit 0 only when every check passed; otherwise prints the reason and exits non-zero.
# Leaves accounting ON and the root<->login link fast (the state every test session starts from).
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
require_root

REPO_DIR=${1:-$(cd "$CLUSTER_DIR/../.." && pwd)}
REPO_DIR=$(cd "$REPO_DIR" && pwd) || die "no such repo dir: ${1:-}"
[ -f "$REPO_DIR/pyproject.toml" ] || die "$REPO_DIR has no pyproject.toml"

T0=$(date +%s%N)
take_lock

# Packages: quick when all present.
bash "$CLUSTER_DIR/install.sh" || die "install.sh failed"

# ---- directories --------------------------------------------------------------------------------------------
install -d -m 0755 "$STATE" "$ETC" "$SLURM_DIR" "$RUN" "$SPOOL" "$SPOOL/slurmd" "$GPU_DEV_DIR" "$SSHD_DIR" "$MYSQL_DIR"
install -d -m 0700 "$CLIENT_DIR"
install -d -o root -g slurm -m 0775 "$LOG"          # slurmctld/slurmdbd (user slurm) chdir there
install -d -o munge -g munge -m 0755 "$LOG/munge"   # munged wants a log dir only it can write
install -d -o slurm -g slurm -m 0755 "$SLURM_RUN" "$SPOOL/slurmctld"
install -d -o mysql -g mysql -m 0755 "$MYSQL_RUN"
install -d -o munge -g munge -m 0755 "$MUNGE_RUN"
install -d -m 0755 /run/sshd
install -d -m 0755 "$MFA_DIR"

# ---- the cluster's Python environment: built in the background while the daemons start ---------------------
VENV_LOG=$LOG/$(basename "$VENV").log
VENV_SHA=$STATE/$(basename "$VENV")
(
  exec 9>&- </dev/null >"$VENV_LOG" 2>&1
  set -euo pipefail
  src_sha=$(cd "$REPO_DIR" && {
      echo "$REPO_DIR"
      find hpcseg templates slurm pbs singularity pyproject.toml -type f \
        ! -path '*/__pycache__/*' ! -name '*.pyc' -print0 2>/dev/null | LC_ALL=C sort -z | xargs -0 -r sha256sum
    } | sha256sum | cut -c1-64)
  deps_sha=$(cat "$REPO_DIR/pyproject.toml" "$REPO_DIR/constraints.txt" 2>/dev/null | sha256sum | cut -c1-64)
  py=$VENV/bin/python
  if ! [ -x "$py" ] || ! "$py" -c 'import sys' >/dev/null 2>&1; then
    echo "creating $VENV with $SYS_PYTHON"
    rm -rf "$VENV" "$VENV_SHA.deps.sha" "$VENV_SHA.src.sha"
    install -d -m 0755 "$(dirname "$VENV")"
    "$SYS_PYTHON" -m venv "$VENV"
  fi
  constraints=()
  [ -f "$REPO_DIR/constraints.txt" ] && constraints=(-c "$REPO_DIR/constraints.txt")
  reinstall_self() {
    # hatchling inside the venv lets the package be rebuilt without an isolated build env (~1 s instead of ~4 s)
    if "$py" -c 'import hatchling' >/dev/null 2>&1; then
      "$py" -m pip install --no-input --no-deps --force-reinstall --no-build-isolation "$REPO_DIR"
    else
      "$py" -m pip install --no-input --no-deps --force-reinstall "$REPO_DIR"
    fi
  }
  if [ "$(cat "$VENV_SHA.deps.sha" 2>/dev/null)" != "$deps_sha" ]; then
    echo "installing $REPO_DIR[server] with its dependencies"
    "$py" -m pip install --no-input "${constraints[@]}" "$REPO_DIR[server]" hatchling
    reinstall_self
    (cd / && "$py" -c 'import torch, monai, hpcseg; print("torch", torch.__version__, "monai", monai.__version__, "hpcseg", hpcseg.__file__)')
    echo "$deps_sha" >"$VENV_SHA.deps.sha"
    echo "$src_sha" >"$VENV_SHA.src.sha"
  elif [ "$(cat "$VENV_SHA.src.sha" 2>/dev/null)" != "$src_sha" ]; then
    echo "reinstalling the hpcseg package only (sources changed)"
    reinstall_self
    (cd / && "$py" -c 'import hpcseg; print("hpcseg", hpcseg.__file__)')
    echo "$src_sha" >"$VENV_SHA.src.sha"
  else
    echo "venv up to date"
    exit 0
  fi
  chmod -R a+rX "$VENV"   # the test user runs it
) &
VENV_PID=$!
# never leave a pip run behind (a later up.sh would race with it)
trap 'kill -0 $VENV_PID 2>/dev/null && { log "waiting for the venv build to finish"; wait $VENV_PID; } || true' EXIT

# ---- munge key, users, keys -------------------------------------------------------------------------------
if [ ! -s /etc/munge/munge.key ]; then
  log "creating /etc/munge/munge.key"
  install -d -o munge -g munge -m 0700 /etc/munge
  mungekey --create --keyfile=/etc/munge/munge.key 2>/dev/null || dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=1024 2>/dev/null
  chown munge:munge /etc/munge/munge.key; chmod 0400 /etc/munge/munge.key
fi

if ! id "$TEST_USER" >/dev/null 2>&1; then
  log "creating user $TEST_USER"
  useradd -m -d "$TEST_HOME" -s /bin/bash -c "hpcseg test user" "$TEST_USER"
fi
[ "$(getent passwd "$TEST_USER" | cut -d: -f7)" = /bin/bash ] || usermod -s /bin/bash "$TEST_USER"
[ "$(getent shadow "$TEST_USER" | cut -d: -f2)" = '*' ] || usermod -p '*' "$TEST_USER"   # unlocked, no password
install -d -o "$TEST_USER" -g "$TEST_USER" -m 0755 "$TEST_HOME"
install -d -o "$TEST_USER" -g "$TEST_USER" -m 0700 "$TEST_HOME/.ssh"

new_client_key=0
if [ ! -s "$CLIENT_KEY" ] || [ ! -s "$CLIENT_KEY.pub" ]; then
  rm -f "$CLIENT_KEY" "$CLIENT_KEY.pub"
  ssh-keygen -q -t ed25519 -N '' -C hpcseg-testcluster-client -f "$CLIENT_KEY"
  new_client_key=1
fi
if [ ! -s "$WRONG_KEY" ] || [ ! -s "$WRONG_KEY.pub" ]; then
  rm -f "$WRONG_KEY" "$WRONG_KEY.pub"
  ssh-keygen -q -t ed25519 -N '' -C hpcseg-testcluster-unauthorized -f "$WRONG_KEY"
fi
AUTH_KEYS=$TEST_HOME/.ssh/authorized_keys
if [ "$new_client_key" = 1 ] || ! grep -qxF "$(cat "$CLIENT_KEY.pub")" "$AUTH_KEYS" 2>/dev/null; then
  # a new client key replaces the old list; otherwise just make sure ours is in it
  if [ "$new_client_key" = 1 ]; then cat "$CLIENT_KEY.pub" >"$AUTH_KEYS"; else cat "$CLIENT_KEY.pub" >>"$AUTH_KEYS"; fi
fi
chown "$TEST_USER:$TEST_USER" "$AUTH_KEYS"; chmod 0600 "$AUTH_KEYS"

if [ ! -s "$HOST_KEY" ] || [ ! -s "$HOST_KEY.pub" ]; then
  rm -f "$HOST_KEY" "$HOST_KEY.pub"
  ssh-keygen -q -t ed25519 -N '' -C "$LOGIN_HOST" -f "$HOST_KEY"
fi
chmod 0600 "$HOST_KEY"
write_if_changed "$KNOWN_HOSTS" 0644 root:root >/dev/null <<EOF
$LOGIN_IP $(cut -d' ' -f1,2 "$HOST_KEY.pub")
[$LOGIN_IP]:$MFA_PORT $(cut -d' ' -f1,2 "$HOST_KEY.pub")
EOF

[ -s "$MYSQL_DIR/slurm.pass" ] || { head -c 24 /dev/urandom | base64 | tr -dc 'A-Za-z0-9' >"$MYSQL_DIR/slurm.pass"; }
chmod 0600 "$MYSQL_DIR/slurm.pass"

# ---- fake GPUs: character devices (regular files are rejected by slurmd) ---------------------------------
for i in $(seq 0 $((NGPUS - 1))); do
  dev=$GPU_DEV_DIR/nvidia$i
  if [ ! -c "$dev" ]; then rm -f "$dev"; mknod -m 0666 "$dev" c 195 "$i"; fi
done

# ---- config files -------------------------------------------------------------------------------------------
write_if_changed "$HOSTS_FILE" 0644 root:root >/dev/null <<EOF
127.0.0.1 localhost
::1 localhost ip6-localhost ip6-loopback
$LOGIN_IP $LOGIN_HOST
$COMPUTE_IP $COMPUTE_HOST
$COMPUTE2_IP $COMPUTE2_HOST
EOF

# Every test session starts with accounting on (accounting.sh off switches it off for a test).
echo on >"$ACCOUNTING_FLAG"
write_slurm_conf

write_if_changed "$SLURM_DIR/gres.conf" 0644 root:root >/dev/null <<EOF
NodeName=$COMPUTE_HOST,$COMPUTE2_HOST Name=gpu File=$GPU_DEV_DIR/nvidia[0-$((NGPUS - 1))]
EOF
SPANK_PBS=$(ls /usr/lib/*/slurm-wlm/spank_pbs.so 2>/dev/null | head -n1)
[ -n "$SPANK_PBS" ] || die "spank_pbs.so not found (package slurm-wlm-torque?)"
write_if_changed "$SLURM_DIR/plugstack.conf" 0644 root:root >/dev/null <<EOF
optional $SPANK_PBS
EOF
write_if_changed "$SLURM_DIR/slurmdbd.conf" 0600 slurm:slurm >/dev/null <<EOF
AuthType=auth/munge
DbdHost=$LOGIN_HOST
DbdPort=$DBD_PORT
SlurmUser=slurm
DebugLevel=info
LogFile=$LOG/slurmdbd.log
PidFile=$SLURM_RUN/slurmdbd.pid
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$DB_PORT
StorageUser=slurm
StoragePass=$(cat "$MYSQL_DIR/slurm.pass")
StorageLoc=slurm_acct_db
EOF
touch "$LOG/mariadb.err"; chown mysql:mysql "$LOG/mariadb.err"
write_if_changed "$MYCNF" 0644 root:root >/dev/null <<EOF
[client]
socket=$MYSQL_RUN/mysqld.sock

[mysqld]
user=mysql
datadir=$MYSQL_DIR/data
socket=$MYSQL_RUN/mysqld.sock
pid-file=$MYSQL_RUN/mysqld.pid
log-error=$LOG/mariadb.err
bind-address=127.0.0.1
port=$DB_PORT
skip-name-resolve
performance_schema=OFF
innodb_buffer_pool_size=512M
innodb_log_file_size=64M
innodb_flush_log_at_trx_commit=2
innodb_use_native_aio=0
innodb_lock_wait_timeout=900
max_connections=100
EOF

# What both login sshds (key only on 22; key + one-time code on $MFA_PORT) share, after their own lines
sshd_common() {
  cat <<EOF
StrictModes yes
AllowTcpForwarding yes
AllowStreamLocalForwarding yes
GatewayPorts no
X11Forwarding no
PermitTunnel no
UseDNS no
PrintMotd no
PrintLastLog no
MaxSessions 100
MaxStartups 100:30:200
LogLevel VERBOSE
Subsystem sftp internal-sftp
SetEnv SLURM_CONF=$SLURM_CONF
EOF
}

{ cat <<EOF
# hpcseg test cluster login node (network namespace $NS_LOGIN). Generated by tests/cluster/up.sh.
ListenAddress $LOGIN_IP:22
HostKey $HOST_KEY
PidFile $RUN/sshd.pid
AllowUsers $TEST_USER
PermitRootLogin no
PubkeyAuthentication yes
AuthorizedKeysFile .ssh/authorized_keys
PasswordAuthentication no
KbdInteractiveAuthentication no
PermitEmptyPasswords no
UsePAM no
EOF
  sshd_common; } | write_if_changed "$SSHD_CONFIG" 0644 root:root >/dev/null

# ---- the MFA login sshd (port $MFA_PORT): publickey, then keyboard-interactive answered through real PAM -------
# Same login node and host key, like a site whose login nodes ask for a one-time code after the key. The code
# is checked by pam_exec (expose_authtok) against $OTP_FILE; pam_exec's `stdout` line adds the site's text.
if [ ! -s "$OTP_FILE" ]; then
  (umask 077; printf '%06d\n' "$(shuf -i 0-999999 -n 1)" >"$OTP_FILE")
fi
chown root:root "$OTP_FILE"; chmod 0600 "$OTP_FILE"
[ "$(readlink "$MFA_BIN" 2>/dev/null)" = /usr/sbin/sshd ] || ln -sfn /usr/sbin/sshd "$MFA_BIN"
write_if_changed "$MFA_DIR/otp-check" 0755 root:root >/dev/null <<EOF
#!/bin/sh
# pam_exec expose_authtok: the answer typed arrives on stdin, NUL-terminated. Generated by tests/cluster/up.sh.
code=\$(head -c 256 | tr -d '\000\r\n')
want=\$(cat "$OTP_FILE" 2>/dev/null) || exit 1
[ -n "\$want" ] && [ "\$code" = "\$want" ]
EOF
write_if_changed "$MFA_DIR/otp-banner" 0755 root:root >/dev/null <<'EOF'
#!/bin/sh
echo "hpcseg test cluster: enter your one-time code."
EOF
write_if_changed "$MFA_PAM_FILE" 0644 root:root >/dev/null <<EOF
# PAM service of the hpcseg test cluster's MFA sshd (port $MFA_PORT). Generated by tests/cluster/up.sh.
auth     optional pam_exec.so quiet stdout $MFA_DIR/otp-banner
auth     required pam_exec.so quiet expose_authtok $MFA_DIR/otp-check
auth     optional pam_permit.so
account  required pam_unix.so
session  required pam_permit.so
password required pam_deny.so
EOF
{ cat <<EOF
# hpcseg test cluster login node, MFA instance (network namespace $NS_LOGIN). Generated by tests/cluster/up.sh.
# Runs as $MFA_BIN so that its PAM service is $MFA_PAM_SERVICE (OpenSSH 9.2 has no PAMServiceName).
ListenAddress $LOGIN_IP:$MFA_PORT
HostKey $HOST_KEY
PidFile $RUN/sshd-mfa.pid
AllowUsers $TEST_USER
PermitRootLogin no
PubkeyAuthentication yes
AuthorizedKeysFile .ssh/authorized_keys
PasswordAuthentication no
KbdInteractiveAuthentication yes
AuthenticationMethods publickey,keyboard-interactive
UsePAM yes
PermitEmptyPasswords no
EOF
  sshd_common; } | write_if_changed "$MFA_CONFIG" 0644 root:root >/dev/null
write_if_changed "$MFA_DIR/askpass" 0700 root:root >/dev/null <<EOF
#!/bin/sh
# SSH_ASKPASS for up.sh's own check of the MFA sshd: answers the code prompt
cat "$OTP_FILE"
EOF

# ---- network ----------------------------------------------------------------------------------------------
net_up
# the link is fast unless a test makes it slow (link.sh slow); a crashed test must not leave it slow
tc qdisc del dev "$VETH_ROOT" root >/dev/null 2>&1 || true
nsenter --net="/run/netns/$NS_LOGIN" tc qdisc del dev "$VETH_LOGIN" root >/dev/null 2>&1 || true

munge_ok() { munge -n 2>/dev/null | unmunge >/dev/null 2>&1; }
sshd_sha() { { ns_sha; sha_of "$SSHD_CONFIG" "$HOST_KEY"; } | sha256sum | cut -c1-64; }
mfa_sha() { { ns_sha; sha_of "$MFA_CONFIG" "$HOST_KEY" "$MFA_PAM_FILE" "$MFA_DIR/otp-check" "$MFA_DIR/otp-banner"; } | sha256sum | cut -c1-64; }

# Start whatever is not running (or runs an old config). Each step checks before it acts.
daemons_up() {
  # ---- munge (root namespace; its socket file serves every namespace) ------------------------------------------
  if ! munge_ok; then
    stop_pid "$MUNGE_RUN/munged.pid" munged
    log "starting munged"
    install -d -o munge -g munge -m 0755 /run/munge /var/lib/munge /var/log/munge
    setsid runuser -u munge -- /usr/sbin/munged --pid-file="$MUNGE_RUN/munged.pid" --log-file="$LOG/munge/munged.log" \
      </dev/null >>"$LOG/munged.out" 2>&1 9>&- || { tail_log "$LOG/munged.out" "$LOG/munge/munged.log"; die "munged failed to start"; }
    wait_until 20 "munge -n | unmunge" munge_ok || { tail_log "$LOG/munge/munged.log"; die "munge does not work"; }
  fi

  # ---- accounting database, controller, compute node ---------------------------------------------------------
  ensure_dbd
  ensure_associations
  ensure_slurmctld
  if [ "$(running_config_accounting)" != accounting_storage/slurmdbd ]; then
    log "slurmctld runs without accounting: restarting it with accounting"
    stop_slurmctld; start_slurmctld
  fi
  ensure_slurmd
  wait_node_ready 60 || { tail_log "$LOG/slurmd-$COMPUTE_HOST.log" "$LOG/slurmd-$COMPUTE2_HOST.log" "$LOG/slurmctld.log"; die "the compute nodes are not idle"; }
  if ! wait_until 10 "sacct answers" sacct_works; then
    log "sacct gets no answer: restarting slurmdbd"
    ensure_dbd force
    ensure_associations
    wait_until 30 "sacct answers" sacct_works || { sacct -n -X -S now-1minutes >&2 || true; die "sacct does not work"; }
  fi
  wait_dbd_queue 25   # instant unless slurmdbd was down (accounting off, or a crash)

  # ---- sshd on the login node -------------------------------------------------------------------------------
  if ! { pid_ok "$RUN/sshd.pid" sshd "$NS_LOGIN" && [ "$(cat "$RUN/sshd.confsha" 2>/dev/null)" = "$(sshd_sha)" ]; }; then
    stop_pid "$RUN/sshd.pid" sshd
    /usr/sbin/sshd -t -f "$SSHD_CONFIG" || die "sshd config test failed"
    log "starting sshd on $LOGIN_IP:22 in $NS_LOGIN"
    start_daemon sshd "$NS_LOGIN" "$LOGIN_HOST" /usr/sbin/sshd -f "$SSHD_CONFIG" -E "$LOG/sshd.log"
    wait_until 20 "sshd pid file" pid_ok "$RUN/sshd.pid" sshd "$NS_LOGIN" || { tail_log "$LOG/sshd.out" "$LOG/sshd.log"; die "sshd did not start"; }
    sshd_sha >"$RUN/sshd.confsha"
  fi

  # ---- the MFA sshd (same login node, port $MFA_PORT) -----------------------------------------------------
  if ! { pid_ok "$RUN/sshd-mfa.pid" "$MFA_PAM_SERVICE" "$NS_LOGIN" && [ "$(cat "$RUN/sshd-mfa.confsha" 2>/dev/null)" = "$(mfa_sha)" ]; }; then
    stop_pid "$RUN/sshd-mfa.pid" "$MFA_PAM_SERVICE"
    "$MFA_BIN" -t -f "$MFA_CONFIG" || die "MFA sshd config test failed"
    log "starting the MFA sshd on $LOGIN_IP:$MFA_PORT in $NS_LOGIN (PAM service $MFA_PAM_SERVICE)"
    start_daemon sshd-mfa "$NS_LOGIN" "$LOGIN_HOST" "$MFA_BIN" -f "$MFA_CONFIG" -E "$LOG/sshd-mfa.log"
    wait_until 20 "MFA sshd pid file" pid_ok "$RUN/sshd-mfa.pid" "$MFA_PAM_SERVICE" "$NS_LOGIN" \
      || { tail_log "$LOG/sshd-mfa.out" "$LOG/sshd-mfa.log"; die "the MFA sshd did not start"; }
    mfa_sha >"$RUN/sshd-mfa.confsha"
    MFA_STARTED=1
  fi
}

# All still alive at the end (a daemon that was dying when we looked would have passed the first checks)
daemons_alive() {
  munge_ok && pid_ok "$MYSQL_RUN/mysqld.pid" mariadbd "$NS_LOGIN" && pid_ok "$SLURM_RUN/slurmdbd.pid" slurmdbd "$NS_LOGIN" \
    && pid_ok "$SLURM_RUN/slurmctld.pid" slurmctld "$NS_LOGIN" && ctld_up && slurmds_alive \
    && pid_ok "$RUN/sshd.pid" sshd "$NS_LOGIN" && pid_ok "$RUN/sshd-mfa.pid" "$MFA_PAM_SERVICE" "$NS_LOGIN"
}

# ---- end-to-end check: key login with strict host key checking, Slurm and the venv as the test user ---------
ssh_check() {
  ssh -F /dev/null -i "$CLIENT_KEY" -o IdentitiesOnly=yes -o BatchMode=yes -o StrictHostKeyChecking=yes \
    -o UserKnownHostsFile="$KNOWN_HOSTS" -o ConnectTimeout=5 -o LogLevel=ERROR "$TEST_USER@$LOGIN_IP" \
    "set -e; sinfo -h -n $COMPUTE_HOST -o %t >/dev/null; test -x $VENV/bin/python; test \"\$SLURM_CONF\" = $SLURM_CONF; echo ok"
}
ssh_ok_retry() {
  local i
  SSH_OUT=""
  for i in 1 2 3 4 5 6 7 8 9 10; do
    SSH_OUT=$(ssh_check 2>&1) && [ "$(echo "$SSH_OUT" | tail -n1)" = ok ] && return 0
    sleep 0.3
  done
  return 1
}

# The MFA sshd, end to end with the real OpenSSH client (only after it (re)started: ~0.5 s): the key alone is
# refused, the key plus the code (answered by SSH_ASKPASS) logs in. When it was already up, it must just answer.
mfa_ssh() {
  ssh -F /dev/null -i "$CLIENT_KEY" -o IdentitiesOnly=yes -o StrictHostKeyChecking=yes \
    -o UserKnownHostsFile="$KNOWN_HOSTS" -o ConnectTimeout=5 -o LogLevel=ERROR -p "$MFA_PORT" "$@"
}
mfa_check() {
  local out
  if out=$(mfa_ssh -o BatchMode=yes "$TEST_USER@$LOGIN_IP" true </dev/null 2>&1); then
    MFA_OUT="the key alone was accepted: MFA is not enforced"; return 1
  fi
  # SSH_ASKPASS_REQUIRE=force: the prompt goes to askpass even when up.sh runs at a terminal
  MFA_OUT=$(SSH_ASKPASS="$MFA_DIR/askpass" SSH_ASKPASS_REQUIRE=force DISPLAY= mfa_ssh -o BatchMode=no \
    -o PreferredAuthentications=publickey,keyboard-interactive -o NumberOfPasswordPrompts=1 \
    "$TEST_USER@$LOGIN_IP" 'test "$SLURM_CONF" = '"$SLURM_CONF"' && echo ok' </dev/null 2>&1) \
    && [ "$(echo "$MFA_OUT" | tail -n1)" = ok ]
}
mfa_answers() { # the SSH banner on the MFA port (no login: a few ms)
  (
    exec 8<>"/dev/tcp/$LOGIN_IP/$MFA_PORT" || exit 1
    read -r -t 5 banner <&8 || exit 1
    [[ "$banner" == SSH-2.0-* ]]
  )
}
mfa_ok() {
  if [ -n "${MFA_STARTED:-}" ]; then
    local i
    for i in 1 2 3 4 5; do mfa_check && return 0; sleep 0.3; done
    return 1
  fi
  mfa_answers 2>/dev/null || { MFA_OUT="no SSH banner on $LOGIN_IP:$MFA_PORT"; return 1; }
}

for pass in 1 2 3; do
  daemons_up
  if [ "$pass" = 1 ] && ! wait "$VENV_PID"; then
    tail -n 40 "$VENV_LOG" >&2 || true
    die "building $VENV failed (log: $VENV_LOG)"
  fi
  ssh_ok_retry || { echo "$SSH_OUT" >&2; tail_log "$LOG/sshd.log"; die "ssh login as $TEST_USER to $LOGIN_IP failed"; }
  mfa_ok || { echo "$MFA_OUT" >&2; tail_log "$LOG/sshd-mfa.log"; die "MFA login (key + one-time code) to $LOGIN_IP:$MFA_PORT failed"; }
  daemons_alive && break
  [ "$pass" = 3 ] && die "daemons keep dying (logs in $LOG)"
  log "a daemon died while starting the others: another pass"
done

net_ok || die "network check failed at the end"
for ip in "$COMPUTE_IP" "$COMPUTE2_IP"; do
  ip route get "$ip" >/dev/null 2>&1 && die "$ip is routable from the root namespace" || true
done

write_cluster_json
log "cluster up in $(( ($(date +%s%N) - T0) / 1000000 )) ms: ssh $TEST_USER@$LOGIN_IP (MFA: port $MFA_PORT), nodes $COMPUTE_HOST $(node_state "$COMPUTE_HOST"), $COMPUTE2_HOST $(node_state "$COMPUTE2_HOST"), $CLUSTER_JSON"

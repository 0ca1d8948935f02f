#!/usr/bin/env bash
# Everything the container cluster (compose.yml) needs before `docker-compose up`: host packages, the Docker
# engine and base image, the node image, the state dir (configs, keys, the shared home), the cluster's venv on
# its software tree, and the host's `unreachable` route to the cluster's internal network. Idempotent; root.
#   usage: prepare.sh [REPO_DIR]     REPO_DIR: the checkout installed into the cluster's venv
# pytest runs it from the docker_compose_file fixture (tests/conftest.py); up.sh runs it before `up`.
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
require_root
REPO_DIR=${1:-$(cd "$CLUSTER_DIR/../.." && pwd)}
REPO_DIR=$(cd "$REPO_DIR" && pwd) || die "no such repo dir: ${1:-}"
[ -f "$REPO_DIR/pyproject.toml" ] || die "$REPO_DIR has no pyproject.toml"
T0=$(date +%s)
take_lock

bash "$CLUSTER_DIR/install.sh" || die "install.sh failed"
# The earlier namespace cluster of this project held 10.210.0.1 on a veth (hpcseg-r) and a route to 10.212.0.0/24:
# gone, or Docker cannot make the "front" network (its subnet would overlap)
if ip link show hpcseg-r >/dev/null 2>&1; then
  log "removing the old namespace test cluster's link (hpcseg-r) and namespaces"
  ip link del hpcseg-r 2>/dev/null || true
  for ns in hpcseg-login hpcseg-compute hpcseg-compute2; do ip netns del "$ns" 2>/dev/null || true; done
  ip route del unreachable 10.212.0.0/24 2>/dev/null || true
fi
bash "$CLUSTER_DIR/docker.sh" up 9>&- || die "docker.sh up failed"

# ---- the cluster's Python environment (software tree): built in the background meanwhile -----------------------
install -d -m 0755 "$STATE" "$LOG" "$SOFTWARE"
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
    "$SYS_PYTHON" -m venv "$VENV"
  fi
  constraints=()
  [ -f "$REPO_DIR/constraints.txt" ] && constraints=(-c "$REPO_DIR/constraints.txt")
  reinstall_self() {
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
    echo "$deps_sha" >"$VENV_SHA.deps.sha"
    echo "$src_sha" >"$VENV_SHA.src.sha"
  elif [ "$(cat "$VENV_SHA.src.sha" 2>/dev/null)" != "$src_sha" ]; then
    echo "reinstalling the hpcseg package only (sources changed)"
    reinstall_self
    echo "$src_sha" >"$VENV_SHA.src.sha"
  else
    echo "venv up to date"
    exit 0
  fi
  (cd / && "$py" -c 'import torch, monai, hpcseg; print("torch", torch.__version__, "monai", monai.__version__, "hpcseg", hpcseg.__file__)')
  chmod -R a+rX "$VENV"
) &
VENV_PID=$!
trap 'kill -0 $VENV_PID 2>/dev/null && { log "waiting for the venv build to finish"; wait $VENV_PID; } || true' EXIT

# ---- the node image (cached layers: seconds when nothing changed) -------------------------------------------------
log "building the node image (compose build; base $HPCSEG_BASE_IMAGE)"
compose build -q 9>&- >"$LOG/node-image.log" 2>&1 || { tail -n 30 "$LOG/node-image.log" >&2; die "node image build failed"; }

# ---- state dirs ----------------------------------------------------------------------------------------------------
install -d -m 0755 "$NODE_CFG" "$SSHD_DIR" "$STATE/etc" "$SLURM_DIR" "$HOME_DIR" "$CTL_STATE"
install -d -m 0700 "$CLIENT_DIR" "$NODE_CFG/db"
for n in $NODES; do install -d -m 0755 "$LOG/$n"; done

[ -s "$NODE_CFG/munge.key" ] || { dd if=/dev/urandom of="$NODE_CFG/munge.key" bs=1 count=1024 2>/dev/null; }
chmod 0600 "$NODE_CFG/munge.key"

# keys: the client's (authorized on the cluster), one the cluster does not know, the login node's host key
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
if [ ! -s "$HOST_KEY" ] || [ ! -s "$HOST_KEY.pub" ]; then
  rm -f "$HOST_KEY" "$HOST_KEY.pub"
  ssh-keygen -q -t ed25519 -N '' -C "$LOGIN_HOST" -f "$HOST_KEY"
fi
chmod 0600 "$HOST_KEY"
write_if_changed "$KNOWN_HOSTS" 0644 0:0 >/dev/null <<EOF
$LOGIN_IP $(cut -d' ' -f1,2 "$HOST_KEY.pub")
[$LOGIN_IP]:$MFA_PORT $(cut -d' ' -f1,2 "$HOST_KEY.pub")
EOF

# the shared home (login and compute nodes), owned by the test user's uid on the nodes
install -d -o "$TEST_UID" -g "$TEST_UID" -m 0755 "$HOME_DIR/$TEST_USER"
install -d -o "$TEST_UID" -g "$TEST_UID" -m 0700 "$HOME_DIR/$TEST_USER/.ssh"
AUTH_KEYS=$HOME_DIR/$TEST_USER/.ssh/authorized_keys
if [ "$new_client_key" = 1 ] || ! grep -qxF "$(cat "$CLIENT_KEY.pub")" "$AUTH_KEYS" 2>/dev/null; then
  if [ "$new_client_key" = 1 ]; then cat "$CLIENT_KEY.pub" >"$AUTH_KEYS"; else cat "$CLIENT_KEY.pub" >>"$AUTH_KEYS"; fi
fi
chown "$TEST_UID:$TEST_UID" "$AUTH_KEYS"; chmod 0600 "$AUTH_KEYS"

# the MFA sshd's one-time code (fixed per state dir, so tests can log in many times)
[ -s "$OTP_FILE" ] || (umask 077; printf '%06d\n' "$(shuf -i 0-999999 -n 1)" >"$OTP_FILE")
chown 0:0 "$OTP_FILE"; chmod 0600 "$OTP_FILE"

[ -s "$NODE_CFG/db/slurm.pass" ] || { head -c 24 /dev/urandom | base64 | tr -dc 'A-Za-z0-9' >"$NODE_CFG/db/slurm.pass"; }
chmod 0600 "$NODE_CFG/db/slurm.pass"
echo "$CLUSTER_NAME" >"$NODE_CFG/cluster_name"
echo "$ACCOUNT" >"$NODE_CFG/account"

# ---- configs (node paths) -------------------------------------------------------------------------------------------
# Every test session starts with accounting on (accounting.sh off switches it off for a test).
echo on >"$ACCOUNTING_FLAG"
write_slurm_conf
write_if_changed "$SLURM_DIR/gres.conf" 0644 0:0 >/dev/null <<EOF
NodeName=$COMPUTE_HOST,$COMPUTE2_HOST Name=gpu File=/dev/nvidia[0-$((NGPUS - 1))]
EOF
write_if_changed "$SLURM_DIR/plugstack.conf" 0644 0:0 >/dev/null <<EOF
optional /usr/lib/x86_64-linux-gnu/slurm-wlm/spank_pbs.so
EOF
# slurmdbd insists on 0600 and its SlurmUser as owner: Debian's slurm is uid 64030 on the host and the nodes
write_if_changed "$SLURM_DIR/slurmdbd.conf" 0600 64030:64030 >/dev/null <<EOF
AuthType=auth/munge
DbdHost=$CTL_HOST
DbdPort=$DBD_PORT
SlurmUser=slurm
DebugLevel=info
LogFile=/var/log/hpcseg/slurmdbd.log
PidFile=/run/hpcseg/slurm/slurmdbd.pid
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=3306
StorageUser=slurm
StoragePass=$(cat "$NODE_CFG/db/slurm.pass")
StorageLoc=slurm_acct_db
EOF
write_if_changed "$NODE_CFG/my.cnf" 0644 0:0 >/dev/null <<EOF
[client]
socket=/run/hpcseg/mysqld/mysqld.sock

[mysqld]
user=mysql
datadir=/var/lib/hpcseg-ctl/mysql
socket=/run/hpcseg/mysqld/mysqld.sock
pid-file=/run/hpcseg/mysqld/mysqld.pid
log-error=/var/log/hpcseg/mariadb.err
bind-address=127.0.0.1
port=3306
skip-name-resolve
performance_schema=OFF
innodb_buffer_pool_size=256M
innodb_log_file_size=64M
innodb_flush_log_at_trx_commit=2
innodb_use_native_aio=0
innodb_lock_wait_timeout=900
max_connections=100
EOF

sshd_common() {
  cat <<EOF
HostKey /etc/hpcseg-node/sshd/ssh_host_ed25519_key
AllowUsers $TEST_USER
PermitRootLogin no
PubkeyAuthentication yes
AuthorizedKeysFile .ssh/authorized_keys
PasswordAuthentication no
PermitEmptyPasswords no
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
SetEnv SLURM_CONF=$SLURM_CONF_NODE
EOF
}
{ cat <<EOF
# The login node's sshd: key only. Generated by tests/cluster/prepare.sh.
ListenAddress 0.0.0.0:22
PidFile /run/hpcseg/sshd.pid
KbdInteractiveAuthentication no
UsePAM no
EOF
  sshd_common; } | write_if_changed "$SSHD_DIR/sshd_config" 0644 0:0 >/dev/null
{ cat <<EOF
# The login node's MFA sshd: the key, then a one-time code through PAM (service $MFA_PAM_SERVICE: OpenSSH 9.2 has
# no PAMServiceName, so it runs as /usr/local/sbin/$MFA_PAM_SERVICE). Generated by tests/cluster/prepare.sh.
ListenAddress 0.0.0.0:$MFA_PORT
PidFile /run/hpcseg/sshd-mfa.pid
KbdInteractiveAuthentication yes
AuthenticationMethods publickey,keyboard-interactive
UsePAM yes
EOF
  sshd_common; } | write_if_changed "$SSHD_DIR/sshd_config.mfa" 0644 0:0 >/dev/null

# Mandatory: the host must not reach the cluster's internal network, and without this its default route would
# carry such traffic off the machine (docker gives the host no address on it: compose.yml inhibit_ipv4).
ip route replace unreachable "$CLUSTER_NET"

if ! wait "$VENV_PID"; then tail -n 40 "$VENV_LOG" >&2 || true; die "building $VENV failed (log: $VENV_LOG)"; fi
log "prepared in $(( $(date +%s) - T0 )) s"

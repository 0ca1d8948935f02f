#!/usr/bin/env bash
# Wait until the container cluster answers, repair what is not running, restore the state every test session
# starts from (accounting on, link fast), check it end to end and write $STATE/cluster.json. Idempotent; root.
# Exit 0 only when: every node's entrypoint finished and its daemons run; compute1 and compute2 read idle (or a
# busy healthy state); sacct answers; a real `ssh` login with strict host key checking runs sinfo as the test
# user and finds the venv; the MFA sshd refuses the key alone and accepts key + code (after a (re)start); the
# host cannot route to the cluster's internal network.
#   usage: check.sh              (after `docker-compose up`: up.sh, or pytest-docker's docker_services)
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
require_root
T0=$(date +%s%N)
take_lock

for n in $NODES; do running "$n" || die "container $(container_of "$n") is not running: start the cluster with tests/cluster/up.sh"; done
ip route replace unreachable "$CLUSTER_NET"

# a config changed since these containers started: restart them (their entrypoints start the daemons again)
ids=$(for n in $NODES; do "$DOCKER" inspect -f '{{.Id}}' "$(container_of "$n")"; done | sha256sum | cut -c1-64)
conf_sha=$(cat "$SLURM_DIR/slurmctld.conf" "$SLURM_DIR/gres.conf" "$SLURM_DIR/plugstack.conf" "$SLURM_DIR/slurmdbd.conf" \
               "$NODE_CFG/my.cnf" "$SSHD_DIR/sshd_config" "$SSHD_DIR/sshd_config.mfa" "$NODE_CFG/munge.key" \
           | sha256sum | cut -c1-64)
if [ "$(cat "$STATE/containers.ids" 2>/dev/null)" = "$ids" ] && [ "$(cat "$STATE/containers.sha")" != "$conf_sha" ]; then
  log "the cluster's configs changed since its containers started: restarting them"
  compose restart 9>&- >/dev/null 2>&1 || die "docker-compose restart failed"
fi

for n in $NODES; do
  wait_until 180 "$n's entrypoint (/run/hpcseg/ready)" node_ready_file "$n" \
    || { "$DOCKER" logs --tail 40 "$(container_of "$n")" >&2; die "node $n did not start"; }
done

# repair: start whatever died (each is a no-op when its pid file names a live daemon); every session starts
# with accounting on, so the controller's role includes slurmdbd again
echo on >"$ACCOUNTING_FLAG"; write_slurm_conf
for n in $NODES; do on "$n" node-daemon start-role || die "the daemons of $n"; done
MFA_PID=$(on "$LOGIN_HOST" node-daemon pid sshd-mfa)

# the link is fast unless a test makes it slow (link.sh slow); a crashed test must not leave it slow
bash "$CLUSTER_DIR/link.sh" fast >/dev/null 2>&1 || true

wait_until 30 "slurmctld answers" ctld_up || die "slurmctld does not answer"
wait_node_ready 60 || die "the compute nodes are not idle"
wait_until 30 "sacct answers" sacct_works || { on "$LOGIN_HOST" sacct -n -X -S now-1minutes >&2 || true; die "sacct does not work"; }
wait_dbd_queue 25

ssh_check() {
  ssh -F /dev/null -i "$CLIENT_KEY" -o IdentitiesOnly=yes -o BatchMode=yes -o StrictHostKeyChecking=yes \
    -o UserKnownHostsFile="$KNOWN_HOSTS" -o ConnectTimeout=5 -o LogLevel=ERROR "$TEST_USER@$LOGIN_IP" \
    "set -e; sinfo -h -n $COMPUTE_HOST -o %t >/dev/null; test -x $VENV/bin/python; test \"\$SLURM_CONF\" = $SLURM_CONF_NODE; echo ok"
}
ok=0
for i in 1 2 3 4 5 6 7 8 9 10; do
  SSH_OUT=$(ssh_check 2>&1) && [ "$(echo "$SSH_OUT" | tail -n1)" = ok ] && { ok=1; break; }
  sleep 0.3
done
[ "$ok" = 1 ] || { echo "$SSH_OUT" >&2; die "ssh login as $TEST_USER to $LOGIN_IP failed"; }

# The MFA sshd, end to end with the real OpenSSH client, once per start of it: the key alone is refused, the key
# plus the code (answered by SSH_ASKPASS) logs in.
if [ "$(cat "$STATE/mfa.checked" 2>/dev/null)" != "$MFA_PID $(host_pid "$LOGIN_HOST")" ]; then
  mfa_ssh() {
    ssh -F /dev/null -i "$CLIENT_KEY" -o IdentitiesOnly=yes -o StrictHostKeyChecking=yes \
      -o UserKnownHostsFile="$KNOWN_HOSTS" -o ConnectTimeout=5 -o LogLevel=ERROR -p "$MFA_PORT" "$@"
  }
  if mfa_ssh -o BatchMode=yes "$TEST_USER@$LOGIN_IP" true </dev/null >/dev/null 2>&1; then
    die "the MFA sshd accepted the key alone"
  fi
  askpass=$(mktemp "$STATE/askpass.XXXXXX"); chmod 0700 "$askpass"
  printf '#!/bin/sh\ncat %s\n' "$OTP_FILE" >"$askpass"
  MFA_OUT=$(SSH_ASKPASS="$askpass" SSH_ASKPASS_REQUIRE=force DISPLAY= mfa_ssh -o BatchMode=no \
    -o PreferredAuthentications=publickey,keyboard-interactive -o NumberOfPasswordPrompts=1 \
    "$TEST_USER@$LOGIN_IP" 'test "$SLURM_CONF" = '"$SLURM_CONF_NODE"' && echo ok' </dev/null 2>&1) || true
  rm -f "$askpass"
  [ "$(echo "$MFA_OUT" | tail -n1)" = ok ] || { echo "$MFA_OUT" >&2; die "MFA login (key + one-time code) failed"; }
  echo "$MFA_PID $(host_pid "$LOGIN_HOST")" >"$STATE/mfa.checked"
fi

for ip in "$COMPUTE_IP" "$COMPUTE2_IP" "$CTL_IP" "$LOGIN_INNER_IP"; do
  ip route get "$ip" >/dev/null 2>&1 && die "$ip is routable from the host" || true
done

echo "$conf_sha" >"$STATE/containers.sha"
echo "$ids" >"$STATE/containers.ids"
write_cluster_json
log "cluster checked in $(( ($(date +%s%N) - T0) / 1000000 )) ms: ssh $TEST_USER@$LOGIN_IP (MFA: port $MFA_PORT), nodes $COMPUTE_HOST $(node_state "$COMPUTE_HOST"), $COMPUTE2_HOST $(node_state "$COMPUTE2_HOST")"

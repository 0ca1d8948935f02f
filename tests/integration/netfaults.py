"""Real network faults on the shared test cluster, each confined to ONE test's own SSH connection or kept short.

- :func:`blackhole`: packets of one SSH connection (its local port to the login sshd) silently dropped both ways by
  iptables rules on this machine (where the client runs), as a laptop changing Wi-Fi or a NAT that forgot
  the mapping: no reset, nothing. Other connections (other helpers' tests) are untouched. Removed in ``finally``.
- :func:`kill_session`: the login node's sshd processes serving one connection (found by its client port with
  ``ss`` in the login container's network namespace) are killed by pid: the connection ends with a reset, as when
  a session is killed.
- :func:`restart_sshd`: the listening login sshd is stopped by its pid file and started again inside the login
  container (tests/cluster/node/node-daemon.sh; sessions already open are separate processes and survive).
- :func:`stop_slurmctld` / :func:`start_slurmctld`: the controller stopped by its pid file and started again,
  inside the controller's container.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

from tests.cluster.harness import TestCluster, container_pid, daemon, run_as_user


def have_iptables() -> bool:
    return shutil.which("iptables") is not None and subprocess.run(
        ["iptables", "-S", "OUTPUT"], capture_output=True).returncode == 0


def local_port(shell) -> int:
    """The client-side TCP port of an :class:`~hpcseg.ssh.SSHShell`'s current connection."""
    return shell.transport.sock.getsockname()[1]


def _rules(cluster, port: int) -> list[list[str]]:
    return [["OUTPUT", "-p", "tcp", "-d", cluster.host, "--dport", str(cluster.port), "--sport", str(port),
             "-j", "DROP"],
            ["INPUT", "-p", "tcp", "-s", cluster.host, "--sport", str(cluster.port), "--dport", str(port),
             "-j", "DROP"]]


@contextlib.contextmanager
def _dropping(rules: list[list[str]]) -> Iterator[None]:
    """iptables DROP ``rules`` inserted while inside, removed afterwards (also those added before a failure)."""
    added: list[list[str]] = []
    try:
        for rule in rules:
            subprocess.run(["iptables", "-I", *rule], check=True, capture_output=True)
            added.append(rule)
        yield
    finally:
        for rule in added:
            subprocess.run(["iptables", "-D", *rule], capture_output=True)


def blackhole(cluster, port: int):
    """Silently drop every packet of the SSH connection from local ``port`` (both ways) while inside."""
    return _dropping(_rules(cluster, port))


def blackhole_login(cluster):
    """Silently drop every packet between this machine and the login sshd, new connections too (the network is
    gone, as on a train): no re-login can succeed while inside."""
    return _dropping([["OUTPUT", "-p", "tcp", "-d", cluster.host, "--dport", str(cluster.port), "-j", "DROP"],
                      ["INPUT", "-p", "tcp", "-s", cluster.host, "--sport", str(cluster.port), "-j", "DROP"]])


def session_pids(cluster: TestCluster, port: int) -> list[int]:
    """Host pids of the login sshd processes that hold the connection from client port ``port``: ``ss`` run in the
    login container's network namespace (nsenter), mapping sockets to processes through the host's /proc (inside
    the container, sshd's non-dumpable processes hide their sockets from a root without CAP_SYS_PTRACE)."""
    net = f"/proc/{container_pid(cluster, cluster.login_node)}/ns/net"
    out = subprocess.run(["nsenter", f"--net={net}", "ss", "-tnpH", "state", "established", f"( dport = :{port} )"],
                         capture_output=True, text=True, timeout=30).stdout
    return sorted({int(p) for p in re.findall(r"pid=(\d+)", out)})


def kill_session(cluster: TestCluster, port: int) -> list[int]:
    """Kill the sshd processes serving the connection from client ``port`` by their pids (the connection resets)."""
    pids = session_pids(cluster, port)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    return pids


def _state(cluster) -> Path:
    return Path(getattr(cluster, "state_dir", "/var/lib/hpcseg-testcluster"))


def _daemon(cluster: TestCluster, node: str, action: str, name: str) -> None:
    res = daemon(cluster, node, action, name)
    if res.returncode != 0:
        raise RuntimeError(f"node-daemon {action} {name} on {node} failed: {res.stderr[-2000:]}")


def restart_sshd(cluster: TestCluster) -> None:
    """Stop the listening login sshd by its pid file and start it again (open sessions survive)."""
    if daemon(cluster, cluster.login_node, "status", "sshd").returncode != 0:
        raise RuntimeError("the login sshd's pid file names no running sshd")
    _daemon(cluster, cluster.login_node, "restart", "sshd")


def slurmctld_pid(cluster: TestCluster) -> int | None:
    """slurmctld's pid inside the controller's container, or None when it does not run."""
    res = daemon(cluster, cluster.controller, "pid", "slurmctld")
    return int(res.stdout) if res.returncode == 0 and res.stdout.strip().isdigit() else None


def stop_slurmctld(cluster: TestCluster) -> None:
    if slurmctld_pid(cluster) is None:
        raise RuntimeError("slurmctld's pid file names no running slurmctld")
    _daemon(cluster, cluster.controller, "stop", "slurmctld")


def start_slurmctld(cluster: TestCluster) -> None:
    """Start the controller again (no-op when it runs)."""
    _daemon(cluster, cluster.controller, "start", "slurmctld")


def queue_ids(cluster: TestCluster, user: str | None = None) -> list[str]:
    """Job ids squeue lists for the test user (slurmctld must be up)."""
    out = run_as_user(cluster, ["squeue", "-h", "-o", "%i", "-u", user or cluster.user], timeout=30)
    return out.stdout.split()


def cluster_json(cluster) -> dict:
    return json.loads((_state(cluster) / "cluster.json").read_text())

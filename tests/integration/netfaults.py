"""Real network faults on the shared test cluster, each confined to ONE test's own SSH connection or kept short.

- :func:`blackhole`: packets of one SSH connection (its local port to the login sshd) silently dropped both ways by
  iptables rules in the root namespace (where the client runs), as a laptop changing Wi-Fi or a NAT that forgot
  the mapping: no reset, nothing. Other connections (other helpers' tests) are untouched. Removed in ``finally``.
- :func:`kill_session`: the login node's sshd processes serving one connection (found by its client port with
  ``ss`` in the login namespace) are killed: the connection ends with a reset, as when a session is killed.
- :func:`restart_sshd`: the listening login sshd is stopped by its pid and started again the way
  tests/cluster/up.sh starts it (sessions already open are separate processes and survive).
- :func:`stop_slurmctld` / :func:`start_slurmctld`: the controller stopped by its pid and started again with
  tests/cluster/lib.sh's own ``start_slurmctld``.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

LOGIN_NS = "hpcseg-login"
CLUSTER_DIR = Path(__file__).resolve().parents[1] / "cluster"


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


def session_pids(port: int) -> list[int]:
    """Pids of the login sshd processes that hold the connection coming from client port ``port``."""
    out = subprocess.run(["ip", "netns", "exec", LOGIN_NS, "ss", "-tnpH", "state", "established",
                          f"( dport = :{port} )"], capture_output=True, text=True).stdout
    return sorted({int(p) for p in re.findall(r"pid=(\d+)", out)})


def kill_session(port: int) -> list[int]:
    """Kill the sshd processes serving the connection from client ``port`` (the connection resets)."""
    pids = session_pids(port)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    return pids


def _state(cluster) -> Path:
    return Path(getattr(cluster, "state_dir", "/var/lib/hpcseg-testcluster"))


def _pid(path: Path, comm: str) -> int | None:
    try:
        pid = int(path.read_text().split()[0])
        if Path(f"/proc/{pid}/comm").read_text().strip() == comm:
            return pid
    except (OSError, ValueError, IndexError):
        pass
    return None


def _lib(script: str, timeout: float = 60) -> None:
    subprocess.run(["bash", "-c", f"source {CLUSTER_DIR / 'lib.sh'}; {script}"], check=True, capture_output=True,
                   timeout=timeout)


def _stop(pid: int, timeout: float = 10) -> None:
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    if Path(f"/proc/{pid}").exists():
        os.kill(pid, signal.SIGKILL)


def restart_sshd(cluster) -> None:
    """Stop the listening login sshd by its pid and start it again as up.sh does (open sessions survive)."""
    run = _state(cluster) / "run"
    pid = _pid(run / "sshd.pid", "sshd")
    if pid is None:
        raise RuntimeError("the login sshd's pid file names no running sshd")
    _stop(pid)
    _lib('start_daemon sshd "$NS_LOGIN" "$LOGIN_HOST" /usr/sbin/sshd -f "$SSHD_CONFIG" -E "$LOG/sshd.log"; '
         'wait_until 20 "sshd pid file" pid_ok "$RUN/sshd.pid" sshd "$NS_LOGIN"')


def slurmctld_pid(cluster) -> int | None:
    return _pid(_state(cluster) / "run" / "slurm" / "slurmctld.pid", "slurmctld")


def stop_slurmctld(cluster) -> None:
    pid = slurmctld_pid(cluster)
    if pid is None:
        raise RuntimeError("slurmctld's pid file names no running slurmctld")
    _stop(pid)


def start_slurmctld(cluster) -> None:
    """Start the controller with lib.sh's own function (no-op when it runs)."""
    if slurmctld_pid(cluster) is None:
        _lib("start_slurmctld", timeout=90)


def queue_ids(cluster, user: str | None = None) -> list[str]:
    """Job ids squeue lists for the test user (slurmctld must be up)."""
    out = subprocess.run(["squeue", "-h", "-o", "%i", "-u", user or cluster.user], capture_output=True, text=True,
                         env={"SLURM_CONF": cluster.slurm_conf, "PATH": "/usr/bin:/bin"}, timeout=30)
    return out.stdout.split()


def cluster_json(cluster) -> dict:
    return json.loads((_state(cluster) / "cluster.json").read_text())

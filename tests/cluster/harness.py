"""Python side of the real test cluster (tests/cluster/: containers from compose.yml): start it once, describe
it, act on it.

    from tests.cluster.harness import ensure_cluster, run_as_user, accounting

`ensure_cluster(repo_dir)` runs up.sh (prepare.sh, `docker-compose up -d`, check.sh), or only check.sh when
pytest-docker already brought the containers up (tests/conftest.py), once per process, and returns a
`TestCluster` read from `$STATE/cluster.json`. Everything here needs root: Docker, iptables, tc.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import threading
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
DEFAULT_STATE = "/var/lib/hpcseg-testcluster"
_TAIL = 6000


def state_dir() -> Path:
    return Path(os.environ.get("HPCSEG_TESTCLUSTER_DIR") or DEFAULT_STATE)


@dataclass
class TestCluster:
    """What a test needs to reach the cluster: mirrors cluster.json (plus `path`, the file it came from)."""

    __test__ = False  # not a pytest test class

    host: str
    port: int
    user: str
    key_path: str
    wrong_key_path: str
    known_hosts: str
    host_key_fingerprint: str
    host_key_type: str
    compute_node: str
    partition: str
    slurm_conf: str
    python: str
    venv: str
    home: str
    account: str
    accounting: bool
    state_dir: str
    path: str = ""
    login_node: str = "login1"
    controller: str = "slurmctl"
    compute_ip: str = "10.211.0.11"
    gpus: int = 4
    cpus: int = 8
    cluster_name: str = "hpcseg"
    # every compute node (compute1 is `compute_node` above): name -> address
    compute_nodes: list = field(default_factory=lambda: ["compute1"])
    compute_ips: dict = field(default_factory=dict)
    # every node (login1, slurmctl, compute1, compute2) -> its container's name
    containers: dict = field(default_factory=dict)
    compose_file: str = ""
    compose_project: str = ""
    link_devices: list = field(default_factory=list)
    scripts_dir: str = str(HERE)
    # the second login sshd (port 2222): publickey then keyboard-interactive (a one-time code checked by real PAM)
    mfa_port: int = 0
    otp_path: str = ""  # the code it accepts (root-only file)
    mfa_pam_service: str = ""
    extra: dict = field(default_factory=dict)

    @classmethod
    def load(cls, path: str | os.PathLike | None = None) -> TestCluster:
        p = Path(path) if path else state_dir() / "cluster.json"
        data = json.loads(p.read_text())
        names = {f.name for f in dataclasses.fields(cls)}
        known = {k: v for k, v in data.items() if k in names and k not in ("path", "extra")}
        return cls(**known, path=str(p), extra={k: v for k, v in data.items() if k not in names})

    # conveniences, so a test holding the fixture needs no import
    def ssh_argv(self, *command: str, key: str | None = None, options: tuple[str, ...] = ()) -> list[str]:
        """The real OpenSSH client, strict host key checking against the cluster's known_hosts."""
        return ssh_argv(self, *command, key=key, options=options)

    def one_time_code(self) -> str:
        """The code the MFA sshd (port `mfa_port`) accepts after the key."""
        return Path(self.otp_path).read_text().strip()

    def run_as_user(self, argv, **kw) -> subprocess.CompletedProcess:
        return run_as_user(self, argv, **kw)

    def set_accounting(self, on: bool) -> None:
        accounting(self, on)

    def set_link(self, slow: bool, rate: str = "100mbit") -> None:
        link(self, slow, rate)

    def node_exec(self, node: str, argv, **kw) -> subprocess.CompletedProcess:
        return node_exec(self, node, argv, **kw)

    def daemon(self, node: str, action: str, name: str, **kw) -> subprocess.CompletedProcess:
        return daemon(self, node, action, name, **kw)

    def container_pid(self, node: str) -> int:
        return container_pid(self, node)


_lock = threading.Lock()
_cache: dict[str, TestCluster | RuntimeError] = {}


def _script(name: str) -> str:
    return str(HERE / name)


def _run_script(args: list[str], what: str, timeout: float, state: str | None = None) -> str:
    env = dict(os.environ)
    if state:
        env["HPCSEG_TESTCLUSTER_DIR"] = state
    try:
        res = subprocess.run(["bash", *args], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired as e:
        out = e.stdout if isinstance(e.stdout, str) else (e.stdout or b"").decode(errors="replace")
        raise RuntimeError(
            f"test cluster: {what} timed out after {timeout:.0f} s; output tail:\n{out[-_TAIL:]}") from None
    if res.returncode != 0:
        raise RuntimeError(f"test cluster: {what} failed (exit {res.returncode}); output tail:\n{res.stdout[-_TAIL:]}")
    return res.stdout


def ensure_cluster(repo_dir: str | os.PathLike | None = None, *, started: bool = False,
                   timeout: float = 1800) -> TestCluster:
    """Prepare, start and check the test cluster once per process; return its description.

    `started`: the containers are already up (pytest-docker's ``docker_services`` ran ``docker-compose up``
    after :func:`prepare`): only check.sh runs. Raises RuntimeError with the reason (not root, or the scripts'
    output tail) when it cannot be had. A failure is remembered: later calls raise the same error at once.
    """
    repo = str(Path(repo_dir or HERE.parent.parent).resolve())
    with _lock:
        cached = _cache.get(repo)
        if isinstance(cached, RuntimeError):
            raise cached
        if cached is not None:
            return cached
        try:
            _need_root()
            if started:
                _run_script([_script("check.sh")], "check.sh", timeout)
            else:  # prepare.sh, docker-compose up -d, check.sh
                _run_script([_script("up.sh"), repo], "up.sh", timeout)
            cluster = TestCluster.load()
            venv = os.environ.get("HPCSEG_CLUSTER_VENV")
            if venv:  # this checkout's own venv (prepare.sh built it); cluster.json names whichever ran last
                cluster.venv, cluster.python = venv, f"{venv}/bin/python"
        except RuntimeError as e:
            _cache[repo] = e
            raise
        _cache[repo] = cluster
        return cluster


def _need_root() -> None:
    if os.geteuid() != 0:
        raise RuntimeError(
            "test cluster: needs root (Docker, iptables, tc, the cluster's state dir); "
            f"running as uid {os.geteuid()}. Run the tests as root (CI does).")


def prepare(repo_dir: str | os.PathLike | None = None, *, timeout: float = 1800) -> None:
    """prepare.sh: packages, Docker, the node image, the state dir, the cluster's venv (what `up` needs)."""
    _need_root()
    repo = str(Path(repo_dir or HERE.parent.parent).resolve())
    _run_script([_script("prepare.sh"), repo], "prepare.sh", timeout)


def ssh_argv(cluster: TestCluster, *command: str, key: str | None = None, options: tuple[str, ...] = ()) -> list[str]:
    return ["ssh", "-F", "/dev/null", "-i", key or cluster.key_path, "-o", "IdentitiesOnly=yes",
            "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=yes", "-o", f"UserKnownHostsFile={cluster.known_hosts}",
            "-o", "ConnectTimeout=10", "-o", "LogLevel=ERROR", "-p", str(cluster.port), *options,
            f"{cluster.user}@{cluster.host}", *command]


def run_as_user(cluster: TestCluster, argv, *, input: str | None = None, timeout: float = 60,
                check: bool = False) -> subprocess.CompletedProcess:
    """Run argv as the test user on the login node (docker exec into its container), without SSH.

    Returns the CompletedProcess with text stdout/stderr; e.g. run_as_user(c, ["squeue", "-h", "-j", job_id]).
    """
    if isinstance(argv, str):
        argv = ["bash", "-c", argv]
    return subprocess.run(["bash", _script("as-user.sh"), *map(str, argv)],
                          input=input, capture_output=True, text=True, timeout=timeout, check=check,
                          stdin=None if input is not None else subprocess.DEVNULL,
                          env={**os.environ, "HPCSEG_TESTCLUSTER_DIR": cluster.state_dir})


def accounting(cluster: TestCluster, on: bool, *, timeout: float = 180) -> None:
    """Switch Slurm accounting off (slurmdbd stopped, users' slurm.conf says none: sacct says "disabled") or back
    on (returns once sacct also knows the jobs that ended meanwhile). Jobs are never disturbed."""
    _run_script([_script("accounting.sh"), "on" if on else "off"], f"accounting.sh {'on' if on else 'off'}",
                timeout, cluster.state_dir)
    cluster.accounting = on


def link(cluster: TestCluster, slow: bool, rate: str = "100mbit") -> None:
    """Throttle the client<->login link like a laptop's (both directions), or make it fast again."""
    args = ["slow", rate] if slow else ["fast"]
    _run_script([_script("link.sh"), *args], f"link.sh {' '.join(args)}", 60, cluster.state_dir)


def node_exec(cluster: TestCluster, node: str, argv, *, input: str | None = None, timeout: float = 60,
              check: bool = False) -> subprocess.CompletedProcess:
    """Run argv as root inside a node's container, e.g. node_exec(c, "compute1", ["ps", "-ef"])."""
    if isinstance(argv, str):
        argv = ["bash", "-c", argv]
    return subprocess.run(["/usr/bin/docker", "exec", "-i", cluster.containers[node], *map(str, argv)],
                          input=input, capture_output=True, text=True, timeout=timeout, check=check,
                          stdin=None if input is not None else subprocess.DEVNULL)


def daemon(cluster: TestCluster, node: str, action: str, name: str, *,
           timeout: float = 120) -> subprocess.CompletedProcess:
    """A node's daemon through its container (tests/cluster/node/node-daemon.sh), by its pid file:
    `action` start|stop|restart|status|pid, `name` sshd, sshd-mfa, slurmctld, slurmdbd, slurmd, mariadb, munged."""
    return node_exec(cluster, node, ["node-daemon", action, name], timeout=timeout)


def container_pid(cluster: TestCluster, node: str) -> int:
    """The host pid of a node container's init (its namespaces: /proc/PID/ns/net ...)."""
    out = subprocess.run(["/usr/bin/docker", "inspect", "-f", "{{.State.Pid}}", cluster.containers[node]],
                         capture_output=True, text=True, check=True, timeout=30)
    return int(out.stdout.strip())


def host_pid(cluster: TestCluster, node: str, pid: int) -> int:
    """The host's pid of the process that is `pid` inside a node's container (its pid namespace), read from the
    NSpid lines of /proc: e.g. a server pid from a connection file, to look at its namespaces from the machine."""
    ns = os.readlink(f"/proc/{container_pid(cluster, node)}/ns/pid")
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if os.readlink(entry / "ns" / "pid") != ns:
                continue
            nspid = next(line.split()[1:] for line in (entry / "status").read_text().splitlines()
                         if line.startswith("NSpid:"))
        except (OSError, StopIteration):
            continue
        if nspid and int(nspid[-1]) == pid:
            return int(entry.name)
    raise LookupError(f"no process {pid} in {node}'s container")

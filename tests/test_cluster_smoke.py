"""The real test cluster itself works as the rest of the suite assumes (tests/cluster/, README there).

Everything goes through the real OpenSSH client with strict host key checking, as a user would.
"""

from __future__ import annotations

import re
import shlex
import socket
import subprocess
import time
import urllib.request
import uuid

import pytest

pytestmark = pytest.mark.cluster

TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE",
            "PREEMPTED"}


def ssh(cluster, command: str, *, input: str | None = None, timeout: float = 60, key: str | None = None):
    return subprocess.run(cluster.ssh_argv(command, key=key), input=input, capture_output=True, text=True,
                          timeout=timeout, stdin=None if input is not None else subprocess.DEVNULL)


def ssh_ok(cluster, command: str, **kw) -> str:
    res = ssh(cluster, command, **kw)
    assert res.returncode == 0, f"ssh {command!r} exited {res.returncode}: {res.stderr.strip()}"
    return res.stdout


@pytest.fixture
def workdir(cluster):
    """A fresh directory in the test user's (shared) home, removed afterwards."""
    d = f"{cluster.home}/smoke-{uuid.uuid4().hex[:10]}"
    ssh_ok(cluster, f"mkdir -p {d}")
    yield d
    ssh(cluster, f"rm -rf {d}")


def sbatch(cluster, *args: str) -> str:
    out = ssh_ok(cluster, "sbatch --parsable " + " ".join(shlex.quote(a) for a in args))
    job_id = out.strip().splitlines()[-1].split(";")[0]
    assert job_id.isdigit(), out
    return job_id


def wait_finished(cluster, job_id: str, timeout: float = 120) -> tuple[str, str]:
    """Poll until the job left the queue and sacct has its final record: (State, ExitCode)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        out = ssh_ok(cluster, f"squeue -h -j {job_id} -o %T 2>/dev/null; echo '|'; "
                              f"sacct -X -P -n -j {job_id} -o State,ExitCode")
        queued, _, acct = out.partition("|")
        if not queued.strip() and acct.strip():
            state, _, code = acct.strip().splitlines()[-1].partition("|")
            state = state.split()[0]
            if state in TERMINAL:
                return state, code
        time.sleep(0.3)
    raise AssertionError(f"job {job_id} did not finish within {timeout} s")


def wait_for_file(cluster, path: str, timeout: float = 60) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        res = ssh(cluster, f"cat {path}")
        if res.returncode == 0 and res.stdout.strip():
            return res.stdout
        time.sleep(0.3)
    raise AssertionError(f"{path} did not appear within {timeout} s")


def test_key_login_with_strict_host_key_checking(cluster):
    assert ssh_ok(cluster, "whoami").strip() == cluster.user
    out = subprocess.run(["ssh-keygen", "-lf", cluster.known_hosts], capture_output=True, text=True).stdout
    assert cluster.host_key_fingerprint in out


def test_wrong_key_is_refused(cluster):
    res = ssh(cluster, "true", key=cluster.wrong_key_path)
    assert res.returncode == 255 and "Permission denied" in res.stderr


@pytest.mark.parametrize("node", ["compute1", "compute2"])
def test_sbatch_hostname_runs_on_each_compute_node(cluster, workdir, node):
    assert node in cluster.compute_nodes
    job_id = sbatch(cluster, "-w", node, "-o", f"{workdir}/%j.out", "--wrap", "hostname")
    state, code = wait_finished(cluster, job_id)
    assert (state, code) == ("COMPLETED", "0:0")
    assert ssh_ok(cluster, f"cat {workdir}/{job_id}.out").strip() == node


def test_gpu_job_sees_cuda_visible_devices(cluster, workdir):
    job_id = sbatch(cluster, "--gres=gpu:1", "-o", f"{workdir}/%j.out", "--wrap", "echo CVD=$CUDA_VISIBLE_DEVICES")
    assert wait_finished(cluster, job_id)[0] == "COMPLETED"
    out = ssh_ok(cluster, f"cat {workdir}/{job_id}.out")
    assert re.fullmatch(r"CVD=\d", out.strip()), out


def test_qsub_runs_a_tiny_script(cluster, workdir):
    script = "#!/bin/bash\n#PBS -N smoke\n#PBS -l walltime=00:05:00\nhostname\necho PBS_JOBID=$PBS_JOBID\n"
    ssh_ok(cluster, f"cat > {workdir}/tiny.pbs", input=script)
    out = ssh_ok(cluster, f"cd {workdir} && qsub -o {workdir}/tiny.out -e {workdir}/tiny.err tiny.pbs")
    job_id = out.strip().splitlines()[-1].split(".")[0]
    assert job_id.isdigit(), out
    assert wait_finished(cluster, job_id)[0] == "COMPLETED"
    lines = ssh_ok(cluster, f"cat {workdir}/tiny.out").split()
    assert lines[0] in cluster.compute_nodes and f"PBS_JOBID={job_id}" in lines


def test_sacct_lists_a_finished_job(cluster, workdir):
    job_id = sbatch(cluster, "-o", "/dev/null", "--wrap", "exit 3")
    assert wait_finished(cluster, job_id) == ("FAILED", "3:0")
    # (fields such as Partition can lag a moment behind State in slurmdbd: not asserted here)
    out = ssh_ok(cluster, f"sacct -X -P -n -j {job_id} -o JobID,State,ExitCode,Account,User")
    assert f"{job_id}|FAILED|3:0|{cluster.account}|{cluster.user}" in out.splitlines()


def test_compute_nodes_unreachable_from_client(cluster):
    assert len(cluster.compute_ips) == 2
    for ip in cluster.compute_ips.values():
        with pytest.raises(OSError):
            socket.create_connection((ip, 6818), timeout=3).close()


def _free_local_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


HTTP_JOB = r"""
cd "$1"
echo "hello from $(hostname)" > hello.txt
python3 -u -m http.server 0 --bind 0.0.0.0 > http.log 2>&1 &
pid=$!
for i in $(seq 200); do
  port=$(sed -n 's/.* port \([0-9][0-9]*\) .*/\1/p' http.log | head -n1)
  [ -n "$port" ] && break
  sleep 0.1
done
echo "$port" > port.tmp && mv port.tmp port
wait $pid
"""


@pytest.mark.parametrize("node", ["compute1", "compute2"])
def test_http_server_on_compute_reachable_only_through_login(cluster, workdir, node):
    ssh_ok(cluster, f"cat > {workdir}/serve.sh", input=HTTP_JOB)
    job_id = sbatch(cluster, "-w", node, "-o", f"{workdir}/job.out", "-t", "10", "--wrap",
                    f"bash {workdir}/serve.sh {workdir}")
    tunnel = None
    try:
        port = int(wait_for_file(cluster, f"{workdir}/port").strip())
        # no route from the client (this machine) to the compute node
        with pytest.raises(OSError):
            socket.create_connection((cluster.compute_ips[node], port), timeout=3).close()
        local = _free_local_port()
        tunnel = subprocess.Popen(
            cluster.ssh_argv(options=("-N", "-o", "ExitOnForwardFailure=yes",
                                       "-L", f"127.0.0.1:{local}:{node}:{port}")),
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        deadline = time.monotonic() + 30
        body = None
        while time.monotonic() < deadline and tunnel.poll() is None:
            try:
                with opener.open(f"http://127.0.0.1:{local}/hello.txt", timeout=5) as r:
                    body = r.read().decode()
                break
            except OSError:
                time.sleep(0.2)
        assert tunnel.poll() is None, f"ssh -L exited: {tunnel.stderr.read()}"
        assert body == f"hello from {node}\n"
    finally:
        if tunnel is not None:
            tunnel.terminate()
            tunnel.wait(10)
        ssh(cluster, f"scancel {job_id}")


def test_cluster_venv_runs_on_compute_as_user(cluster, workdir):
    code = "import torch, monai, hpcseg, socket; print('OK', socket.gethostname(), torch.__version__)"
    job_id = sbatch(cluster, "-o", f"{workdir}/%j.out", "--wrap", f"cd / && {cluster.python} -c {shlex.quote(code)}")
    state, _ = wait_finished(cluster, job_id, timeout=300)
    out = ssh_ok(cluster, f"cat {workdir}/{job_id}.out")
    assert state == "COMPLETED", out
    assert out.split()[0] == "OK" and out.split()[1] in cluster.compute_nodes, out


def test_finished_job_leaves_the_controller_quickly(cluster):
    """MinJobAge=2: tests of the sacct and exit-code-file fallbacks need slurmctld to forget jobs fast."""
    job_id = sbatch(cluster, "-o", "/dev/null", "--wrap", "true")
    wait_finished(cluster, job_id)
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        if cluster.run_as_user(["scontrol", "show", "job", job_id]).returncode != 0:
            return
        time.sleep(0.5)
    raise AssertionError(f"slurmctld still knows job {job_id} 90 s after it finished")


def test_accounting_off_and_on_again(cluster, workdir):
    from tests.cluster.harness import accounting

    running = sbatch(cluster, "-o", "/dev/null", "-t", "5", "--wrap", "sleep 300")
    accounting(cluster, False)
    try:
        assert cluster.accounting is False
        res = ssh(cluster, "sacct -X -n")
        assert res.returncode != 0 and "disabled" in res.stderr.lower(), res
        during = sbatch(cluster, "-o", "/dev/null", "--wrap", "true")
        deadline = time.monotonic() + 60
        while ssh_ok(cluster, f"squeue -h -j {during} -o %T 2>/dev/null").strip():
            assert time.monotonic() < deadline
            time.sleep(0.3)
    finally:
        accounting(cluster, True)
    assert cluster.accounting is True
    assert ssh_ok(cluster, f"squeue -h -j {running} -o %T").strip() == "RUNNING"  # not disturbed
    # the job that ended while accounting was off is known once it is back on
    out = ssh_ok(cluster, f"sacct -X -P -n -j {during},{running} -o JobID,State")
    assert f"{during}|COMPLETED" in out.splitlines() and f"{running}|RUNNING" in out.splitlines(), out
    ssh_ok(cluster, f"scancel {running}")


def test_client_files_are_not_visible_on_the_cluster(cluster, workdir, tmp_path):
    """A cluster shares its home and software tree between its nodes, never with the user's machine: a path that
    exists only on the client (a temp file, this checkout) is missing on the login node and in a job on each
    compute node, so a client path that leaks into a job script fails here as it would on a real cluster."""
    from pathlib import Path

    mine = tmp_path / "only-on-the-client.txt"
    mine.write_text("client\n")
    checkout = Path(__file__).resolve().parent.parent / "pyproject.toml"
    for path in (str(mine), str(checkout)):
        assert Path(path).is_file()
        res = ssh(cluster, f"cat {shlex.quote(path)}")
        assert res.returncode != 0 and "No such file" in res.stderr, (path, res.stdout, res.stderr)
        for node in cluster.compute_nodes:
            job_id = sbatch(cluster, "-w", node, "-o", f"{workdir}/%j.out", "--wrap", f"cat {shlex.quote(path)}")
            assert wait_finished(cluster, job_id) == ("FAILED", "1:0"), (node, path)
            assert "No such file" in ssh_ok(cluster, f"cat {workdir}/{job_id}.out"), (node, path)
    # while the cluster's own shared tree is the same on every node
    ssh_ok(cluster, f"echo shared > {workdir}/mark")
    for node in cluster.compute_nodes:
        job_id = sbatch(cluster, "-w", node, "-o", f"{workdir}/{node}.out", "--wrap", f"cat {workdir}/mark")
        assert wait_finished(cluster, job_id)[0] == "COMPLETED"
        assert ssh_ok(cluster, f"cat {workdir}/{node}.out").strip() == "shared"

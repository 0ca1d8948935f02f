"""Small job-lifecycle edges on the real cluster: `stop` of a server job that had already ended, a refused sbatch
(no folder left holding only job.sh), and the exit code of a cancelled job (the job's own exit_code file: 143)."""

from __future__ import annotations

import time
import uuid

import pytest

from hpcseg.cli.job_cmds import describe
from hpcseg.errors import SubmitFailed
from hpcseg.jobs import JobManager, JobStore
from hpcseg.schedulers import JobState
from hpcseg.serverjobs import stop_servers

from .conftest import cluster_profile
from .test_lifecycle import _forgotten_by_scontrol

pytestmark = [pytest.mark.cluster]


def _jobs(cluster, ssh_shell, tmp_path, tag: str, **over) -> JobManager:
    prof = cluster_profile(cluster, "slurm", work_dir=f"~/.hpcseg-{tag}", **over)
    return JobManager(prof, shell=ssh_shell, store=JobStore(tmp_path / "jobs.json"))


def _gone_from_squeue(cluster, job_id: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        out = cluster.run_as_user(["squeue", "-h", "-j", job_id, "-o", "%T"], timeout=60)
        if out.returncode == 0 and not out.stdout.strip():
            return
        time.sleep(1)
    raise AssertionError(f"job {job_id} still in squeue after {timeout} s")


def test_stop_does_not_claim_to_stop_a_server_that_already_ended(cluster, ssh_shell, tmp_path):
    jm = _jobs(cluster, ssh_shell, tmp_path, f"edge-{uuid.uuid4().hex[:8]}", python="/bin/false")
    rec = jm.submit("server", {})  # its python exits at once: the job ends by itself
    _gone_from_squeue(cluster, rec.job_id)  # (squeue asked directly: the local record still says it is active)
    assert not JobState(jm.store.find(jm.profile.name, rec.job_id).last_state).terminal
    ended: list[str] = []
    assert stop_servers(jm, ended) == []
    assert ended == [rec.job_id]


def test_refused_sbatch_leaves_no_job_folder(cluster, ssh_shell, tmp_path):
    tag = f"edge-{uuid.uuid4().hex[:8]}"
    jm = _jobs(cluster, ssh_shell, tmp_path, tag, extra_directives=["--partition=no-such-partition"])
    with pytest.raises(SubmitFailed):
        jm.submit("run", {"command": ["true"]})
    listing = ssh_shell.run(f"ls -A ~/.hpcseg-{tag}/jobs 2>/dev/null").stdout.split()
    assert listing == [], listing
    assert jm.store.list(jm.profile.name) == []


def test_a_cancelled_job_shows_the_exit_code_it_wrote(cluster, ssh_shell, tmp_path):
    jm = _jobs(cluster, ssh_shell, tmp_path, f"edge-{uuid.uuid4().hex[:8]}")
    rec = jm.submit("run", {"command": ["sleep", "300"]})
    jm.wait(rec.job_id, lambda s: s.state is JobState.RUNNING, timeout=120)
    time.sleep(1)  # the job script's EXIT trap is set
    jm.cancel([rec.job_id])
    st = jm.wait(rec.job_id, lambda s: s.state.terminal, timeout=120)
    written = ssh_shell.run(f"cat {rec.job_dir}/exit_code").stdout.strip()
    assert written == "143"
    assert st.state is JobState.CANCELLED and st.exit_code == 143, st
    # once slurmctld forgets it, sacct answers: job-level ExitCode 0:0 for a cancelled job; the file says 143
    assert _forgotten_by_scontrol(cluster, rec.job_id), "MinJobAge should make slurmctld forget the job"
    st = jm.status([rec.job_id])[rec.job_id]
    assert st.state is JobState.CANCELLED and st.exit_code == 143, st
    assert "exit code 143" in describe(st)

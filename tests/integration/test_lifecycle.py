"""A job's whole life through the real sshd into the real Slurm, and again through the PBS commands.

Each scheduler gets: pending → running → completed; cancelled; `exit 3` → failed (3); walltime → timeout;
a finished job resolved after squeue/scontrol forget it (sacct, and with accounting off the exit-code file);
a failed scheduler query → unknown, never finished.
"""

from __future__ import annotations

import contextlib
import subprocess
import time
from pathlib import Path

import pytest

from hpcseg.schedulers import JobState

pytestmark = [pytest.mark.cluster, pytest.mark.slow]

SCHEDULERS = ["slurm", "pbs"]


def observed(jm, job_id, until, timeout=240):
    """Wait for a condition, recording every distinct state seen on the way."""
    seen: list[JobState] = []

    def note(st):
        if not seen or seen[-1] is not st.state:
            seen.append(st.state)

    st = jm.wait(job_id, until, timeout=timeout, on_update=note)
    return st, seen


def run_job(jm, *command: str):
    return jm.submit("run", {"command": list(command)})


@pytest.fixture(scope="module")
def timeout_jobs(cluster, ssh_shell, tmp_path_factory):
    """Walltime jobs start first (Slurm kills at whole minutes), so the rest of the module overlaps the wait."""
    from hpcseg.jobs import JobManager, JobStore

    from .conftest import cluster_profile

    store = JobStore(tmp_path_factory.mktemp("timeout") / "jobs.json")
    out = {}
    for sched in SCHEDULERS:
        jm = JobManager(cluster_profile(cluster, sched, walltime="00:01:00"), shell=ssh_shell, store=store)
        out[sched] = (jm, run_job(jm, "sleep", "600"))
    return out


@pytest.mark.parametrize("sched", SCHEDULERS)
def test_pending_running_completed(jobs_for, sched, timeout_jobs):
    # A start time 4 s ahead keeps the job visibly pending first, the way a busy queue would.
    begin = ["--begin=now+4"] if sched == "slurm" else []
    jm = jobs_for(sched, extra_directives=begin)
    rec = run_job(jm, "bash", "-c", "sleep 12; echo done-$((6*7))")  # longer than the longest poll interval
    st, seen = observed(jm, rec.job_id, lambda s: s.state.terminal)
    assert st.state is JobState.COMPLETED and st.exit_code in (0, None)
    assert JobState.RUNNING in seen and seen[-1] is JobState.COMPLETED
    if sched == "slurm":
        assert seen[0] is JobState.PENDING
    assert seen.index(JobState.RUNNING) < seen.index(JobState.COMPLETED)
    assert "done-42" in jm.logs(rec.job_id)["job.out"]


@pytest.mark.parametrize("sched", SCHEDULERS)
def test_cancelled(jobs_for, sched):
    jm = jobs_for(sched)
    rec = run_job(jm, "sleep", "300")
    jm.wait(rec.job_id, lambda s: s.state is JobState.RUNNING, timeout=120)
    jm.cancel([rec.job_id])
    st = jm.wait(rec.job_id, lambda s: s.state.terminal, timeout=120)
    assert st.state is JobState.CANCELLED


@pytest.mark.parametrize("sched", SCHEDULERS)
def test_exit_3_reads_failed_with_code(jobs_for, sched):
    jm = jobs_for(sched)
    rec = run_job(jm, "bash", "-c", "exit 3")
    st = jm.wait(rec.job_id, lambda s: s.state.terminal, timeout=120)
    assert st.state is JobState.FAILED and st.exit_code == 3


def _forgotten_by_scontrol(cluster, job_id, timeout=60):
    from tests.cluster.harness import run_as_user

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        res = run_as_user(cluster, ["scontrol", "show", "job", job_id])
        if res.returncode != 0:
            return True
        time.sleep(1)
    return False


def test_forgotten_job_resolved_by_sacct(cluster, jobs_for):
    jm = jobs_for("slurm")
    rec = run_job(jm, "true")
    jm.wait(rec.job_id, lambda s: s.state.terminal, timeout=120)
    assert _forgotten_by_scontrol(cluster, rec.job_id), "MinJobAge should make slurmctld forget the job"
    st = jm.status([rec.job_id])[rec.job_id]
    assert st.state is JobState.COMPLETED and st.source == "sacct"


def test_forgotten_job_resolved_by_exit_code_file_without_accounting(cluster, jobs_for):
    from tests.cluster.harness import accounting

    accounting(cluster, False)
    try:
        jm = jobs_for("slurm")
        ok = run_job(jm, "true")
        bad = run_job(jm, "bash", "-c", "exit 5")
        for rec in (ok, bad):
            jm.wait(rec.job_id, lambda s: s.state.terminal, timeout=120)
            assert _forgotten_by_scontrol(cluster, rec.job_id)
        states = jm.status([ok.job_id, bad.job_id])
        assert states[ok.job_id].state is JobState.COMPLETED and states[ok.job_id].source == "exit-code-file"
        assert states[bad.job_id].state is JobState.FAILED and states[bad.job_id].exit_code == 5
    finally:
        accounting(cluster, True)


@contextlib.contextmanager
def _slurmctld_stopped():
    """slurmctld stopped by its pid file inside the controller's container and started again the same way
    (tests/cluster/node/node-daemon.sh, in a finally), holding the cluster's lock all along: the cluster is
    shared, and another process's check.sh must not start the controller again while this test wants it down."""
    lib = Path(__file__).resolve().parent.parent / "cluster" / "lib.sh"
    script = ('source "$1" && require_root && take_lock && on "$CTL_HOST" node-daemon stop slurmctld && echo stopped '
              '&& read -r _; on "$CTL_HOST" node-daemon start slurmctld && echo started')
    proc = subprocess.Popen(["bash", "-c", script, "lib", str(lib)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "stopped", proc.stderr
        yield
    finally:
        out, err = proc.communicate("go\n", timeout=180)  # ensure_slurmctld runs even when the test failed
        assert proc.returncode == 0 and "started" in out, err[-2000:]


def test_failed_query_reads_unknown_never_finished(cluster, jobs_for):
    jm = jobs_for("slurm")
    rec = run_job(jm, "sleep", "120")
    jm.wait(rec.job_id, lambda s: s.state is JobState.RUNNING, timeout=120)
    # Stop the controller for real: every query now fails the way a busy or down slurmctld does. By its pid file
    # in its container (never by process name), under the cluster's lock; started again the same way.
    with _slurmctld_stopped():
        st = jm.status([rec.job_id])[rec.job_id]
        assert st.state is JobState.UNKNOWN and not st.state.terminal
    st = jm.wait(rec.job_id, lambda s: s.state is JobState.RUNNING, timeout=60)
    assert st.state is JobState.RUNNING  # the job survived; the unknown never ended it
    jm.cancel([rec.job_id])


@pytest.mark.parametrize("sched", SCHEDULERS)
def test_walltime_reads_timeout(timeout_jobs, sched):
    jm, rec = timeout_jobs[sched]
    st = jm.wait(rec.job_id, lambda s: s.state.terminal, timeout=300)
    assert st.state is JobState.TIMEOUT

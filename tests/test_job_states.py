"""How a job the scheduler forgot is read from what it wrote itself (templates/base.sh.j2: exit_code, started,
ending), with real files through the real LocalShell. Issue 13, point 12."""

from __future__ import annotations

import os

import pytest

from hpcseg.config import local_profile
from hpcseg.jobs import JobManager, JobRecord, JobStore
from hpcseg.schedulers.base import JobState
from hpcseg.shell import LocalShell


@pytest.fixture
def jm(tmp_path):
    prof = local_profile()
    prof.work_dir = str(tmp_path / "work")
    return JobManager(prof, shell=LocalShell(), store=JobStore(tmp_path / "jobs.json"))


def _forgotten_job(jm, tmp_path, name, **extra) -> JobRecord:
    """A record whose id no scheduler knows (LOST), with its job folder."""
    job_dir = tmp_path / "work" / "jobs" / name
    job_dir.mkdir(parents=True)
    rec = JobRecord(profile=jm.profile.name, job_id=f"forgotten-{name}", template="run", job_dir=str(job_dir),
                    name=name, scheduler="local", created="2026-01-01T00:00:00+00:00", extra=extra)
    jm.store.add(rec)
    return rec


def _ended(rec: JobRecord, code: int, ran_seconds: int) -> None:
    started = 1_700_000_000
    with open(os.path.join(rec.job_dir, "started"), "w") as fh:
        fh.write(f"{started}\n")
    path = os.path.join(rec.job_dir, "exit_code")
    with open(path, "w") as fh:
        fh.write(f"{code}\n")
    os.utime(path, (started + ran_seconds, started + ran_seconds))


def test_sigterm_at_the_submitted_walltime_is_timeout_after_the_profile_changes(jm, tmp_path):
    """The job ran for its 1-minute walltime; the profile's walltime is 2 h now: still a timeout."""
    rec = _forgotten_job(jm, tmp_path, "t", walltime="00:01:00")
    _ended(rec, 143, 60)
    jm.profile.walltime = "02:00:00"
    st = jm.status([rec.job_id])[rec.job_id]
    assert st.state is JobState.TIMEOUT and st.source == "exit-code-file"
    early = _forgotten_job(jm, tmp_path, "f", walltime="00:10:00")
    _ended(early, 143, 60)  # killed well before its limit and not by us: a failure
    assert jm.status([early.job_id])[early.job_id].state is JobState.FAILED


def test_a_job_cancelled_before_it_started_reads_cancelled(jm, tmp_path):
    rec = _forgotten_job(jm, tmp_path, "c", walltime="00:10:00", cancelled=True)  # no exit_code: it never ran
    st = jm.status([rec.job_id])[rec.job_id]
    assert st.state is JobState.CANCELLED and "before" in st.reason
    other = _forgotten_job(jm, tmp_path, "l", walltime="00:10:00")  # not cancelled by us: still LOST
    assert jm.status([other.job_id])[other.job_id].state is JobState.LOST


def test_submit_remembers_the_walltime(jm):
    rec = jm.submit("run", {"command": ["true"]})
    assert rec.extra["walltime"] == jm.profile.walltime
    jm.wait(rec.job_id, lambda s: s.state.terminal, timeout=60)


def test_a_cancelled_job_that_is_still_ending_reads_stopping(jm):
    """Issue 13, point 10: right after a cancel (`hpcseg stop`), a job that takes a while to end (a server
    unloading, a trap cleaning up) read `running`; it is `stopping` until it is gone, and then `cancelled`."""
    script = "trap 'sleep 4; exit 143' TERM; sleep 300 & wait $!; sleep 300"
    rec = jm.submit("run", {"command": ["bash", "-c", script]})
    jm.wait(rec.job_id, lambda s: s.state is JobState.RUNNING, timeout=60)
    jm.cancel([rec.job_id])
    st = jm.status([rec.job_id])[rec.job_id]
    assert st.state is JobState.STOPPING and st.state.active and not st.state.terminal, st
    end = jm.wait(rec.job_id, lambda s: s.state.terminal, timeout=60)
    assert end.state is JobState.CANCELLED

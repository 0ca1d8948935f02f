"""local backend: real processes started, read back and cancelled through LocalShell (no mocks of subprocess)."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Callable

import pytest

from hpcseg.errors import SchedulerError, SubmitFailed
from hpcseg.schedulers.base import JobState, JobStatus, SubmitSpec, drive
from hpcseg.schedulers.local import Local, parse_job_id
from hpcseg.shell import LocalShell

from .conversation import result

L = Local()
SH = LocalShell()


def until(job_id: str, ok: Callable[[JobStatus], bool], timeout: float = 10.0) -> JobStatus:
    deadline = time.monotonic() + timeout
    while True:
        st = drive(L.status_query([job_id]), SH)[job_id]
        if ok(st) or time.monotonic() > deadline:
            return st
        time.sleep(0.05)


def submit(tmp_path, body: str, executable: bool = True) -> tuple[str, str]:
    job_dir = tmp_path / "job dir"  # a space, on purpose
    job_dir.mkdir()
    script = job_dir / "job.sh"
    script.write_text("#!/bin/bash\n" + body)
    if executable:
        script.chmod(0o700)
    cmd = L.submit_command(SubmitSpec(str(script), str(job_dir), "t"))
    return L.parse_submit(SH.run(list(cmd.argv), stdin=cmd.stdin)), str(job_dir)


def test_a_real_job_runs_detached_in_its_own_session_and_is_cancelled(tmp_path):
    job_id, job_dir = submit(tmp_path, 'echo "hello from $$"; echo oops >&2; trap "exit 143" TERM; sleep 60 & wait\n')
    pid, start = parse_job_id(job_id)
    assert job_id.startswith(f"local-{pid}-") and start is not None
    try:
        st = until(job_id, lambda s: s.state is JobState.RUNNING)
        assert (st.state, st.node, st.source, st.start_time) == (JobState.RUNNING, "localhost", "ps", start)
        ids = SH.run(["ps", "-o", "pid=,pgid=,sid=", "-p", str(pid)]).stdout.split()
        assert ids == [str(pid)] * 3  # its own session and process group: the caller's end does not touch it
        deadline = time.monotonic() + 5
        while "hello" not in open(os.path.join(job_dir, "job.out")).read() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert open(os.path.join(job_dir, "job.out")).read() == f"hello from {pid}\n"
        assert open(os.path.join(job_dir, "job.err")).read() == "oops\n"
    finally:
        res = SH.run(list(L.cancel_command([job_id]).argv))
        L.parse_cancel(res, [job_id])
    st = until(job_id, lambda s: s.state is JobState.LOST)
    assert st.state is JobState.LOST and st.state.terminal
    # the whole group got SIGTERM, the background sleep too: nothing of the session is left but zombies
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        left = [s for s in SH.run(["ps", "-o", "stat=", "-s", str(pid)]).stdout.split() if not s.startswith("Z")]
        if not left:
            break
        time.sleep(0.05)
    assert left == []
    L.parse_cancel(SH.run(list(L.cancel_command([job_id]).argv)), [job_id])  # cancelling again is fine


def test_a_non_executable_script_runs_with_bash_and_its_end_reads_lost(tmp_path):
    job_id, job_dir = submit(tmp_path, "echo done\n", executable=False)
    st = until(job_id, lambda s: s.state is JobState.LOST)
    assert st.state is JobState.LOST and "exited" in st.reason
    assert open(os.path.join(job_dir, "job.out")).read() == "done\n"


def test_many_jobs_in_one_ps_call(tmp_path):
    proc = subprocess.Popen(["sleep", "30"], start_new_session=True)
    try:
        cmd_ids = [f"local-{proc.pid}", "local-999999999", "not-a-job"]
        query = L.status_query(cmd_ids)
        cmd = next(query)
        assert cmd.argv[-2:] == ("-p", f"{proc.pid},999999999")
        with pytest.raises(StopIteration) as stop:
            query.send(SH.run(list(cmd.argv)))
        st = stop.value.value
        assert st[f"local-{proc.pid}"].state is JobState.RUNNING
        assert st["local-999999999"].state is JobState.LOST and st["not-a-job"].state is JobState.LOST
    finally:
        proc.kill()
        proc.wait()


def test_a_reused_pid_is_neither_reported_running_nor_signalled(tmp_path):
    proc = subprocess.Popen(["sleep", "30"], start_new_session=True)
    try:
        impostor = f"local-{proc.pid}-20000101T000000"  # same pid, another start time: not our job
        st = drive(L.status_query([impostor]), SH)[impostor]
        assert st.state is JobState.LOST and "belongs to a process started" in st.reason
        res = SH.run(list(L.cancel_command([impostor]).argv))
        with pytest.raises(SchedulerError, match="another process"):
            L.parse_cancel(res, [impostor])
        time.sleep(0.2)
        assert proc.poll() is None  # still alive: never signalled
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()


def test_ps_answers_and_failures():
    jobs = {"local-5": (5, None)}
    assert L.parse_ps(result("", "", 1), jobs)["local-5"].state is JobState.LOST  # none of the pids exists
    assert L.parse_ps(result("", "ps: bad option\n", 1), jobs)["local-5"].state is JobState.UNKNOWN
    stopped = L.parse_ps(result("    5 T    Mon Nov 23 18:13:55 2026\n"), jobs)["local-5"]
    assert stopped.state is JobState.PENDING and "stopped" in stopped.reason


def test_submit_into_a_missing_folder_fails(tmp_path):
    cmd = L.submit_command(SubmitSpec(str(tmp_path / "nope" / "job.sh"), str(tmp_path / "nope")))
    with pytest.raises(SubmitFailed, match="could not start the job script"):
        L.parse_submit(SH.run(list(cmd.argv)))
    with pytest.raises(SchedulerError):
        L.cancel_command(["12.pbshost"])

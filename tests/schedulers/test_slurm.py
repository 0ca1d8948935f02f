"""Slurm backend: commands built, and real Slurm 22.05 output parsed (tests/fixtures/slurm, recorded on the
test cluster), plus the failures a real controller shows only when it is in trouble (built here, marked)."""

from __future__ import annotations

import os
import stat
import subprocess
from datetime import datetime

import pytest

from hpcseg.errors import SchedulerError, SubmitFailed
from hpcseg.schedulers.base import JobState, SubmitSpec
from hpcseg.schedulers.slurm import _STATES, Slurm, _exit_from_wait_status, _node, human_reason

from .conversation import converse, recorded, result

S = Slurm()
FMT = ("JobID:\x1f,State:\x1f,Reason:\x1f,NodeList:\x1f,BatchHost:\x1f,StartTime:\x1f,EndTime:\x1f,"
       "exit_code:\x1f")
SACCT_FMT = "--format=JobID,State,ExitCode,Start,End,NodeList,Reason"


def squeue(*ids: str) -> list[str]:
    return ["squeue", "-h", "-t", "all", "-j", ",".join(ids), "-O", FMT]


def sacct(*ids: str) -> list[str]:
    return ["sacct", "-X", "-P", "-n", "-j", ",".join(ids), SACCT_FMT]


# -- submit ------------------------------------------------------------------------------------------------------
def test_submit_command_is_the_documented_sbatch_line():
    spec = SubmitSpec("/home/u/my jobs/7/job.sh", "/home/u/my jobs/7", "hpcseg-server", ["--gres=gpu:1"])
    assert S.submit_command(spec).argv == (
        "sbatch", "--parsable", "--chdir=/home/u/my jobs/7", "--output=/home/u/my jobs/7/job.out",
        "--error=/home/u/my jobs/7/job.err", "--job-name", "hpcseg-server", "--gres=gpu:1",
        "/home/u/my jobs/7/job.sh")


def test_percent_in_a_job_dir_is_not_read_as_an_sbatch_pattern():
    argv = S.submit_command(SubmitSpec("/d/100%/job.sh", "/d/100%")).argv
    assert "--output=/d/100%%/job.out" in argv and "--chdir=/d/100%" in argv


def test_a_backslash_in_a_job_dir_is_refused_before_sbatch():
    """sbatch drops a backslash from --output (its "no patterns" marker): the job would fail silently."""
    with pytest.raises(SubmitFailed, match="backslash") as err:
        S.submit_command(SubmitSpec("/d/a\\b/job.sh", "/d/a\\b"))
    assert "work_dir" in (err.value.hint or "")


def test_parse_submit_real_and_wrapped_outputs():
    assert S.parse_submit(recorded("slurm", "sbatch_ok")) == "4"
    assert S.parse_submit(result("123;cluster2\n")) == "123"
    site_wrapper = "Welcome to HPC!\nYour job will be charged to project abc.\n4242\nGood luck\n"
    assert S.parse_submit(result(site_wrapper)) == "4242"


def test_parse_submit_failure_carries_sbatch_stderr():
    with pytest.raises(SubmitFailed, match="Invalid partition name specified"):
        S.parse_submit(recorded("slurm", "sbatch_bad_partition"))
    with pytest.raises(SubmitFailed, match="Requested node configuration is not available"):
        S.parse_submit(recorded("slurm", "sbatch_too_many_gpus"))
    with pytest.raises(SubmitFailed, match="no job id"):
        S.parse_submit(result("Submitted batch job somewhere\n"))


# -- status: one squeue call answers everything it holds -----------------------------------------------------------
def test_mixed_live_jobs_in_one_squeue_call():
    ids = ["4", "5", "6", "7", "8", "9"]
    st = converse(S.status_query(ids), [(squeue(*ids), recorded("slurm", "squeue_mixed"))])
    assert {j: s.state for j, s in st.items()} == {
        "4": JobState.RUNNING, "5": JobState.PENDING, "6": JobState.PENDING, "7": JobState.RUNNING,
        "8": JobState.PENDING, "9": JobState.RUNNING}
    assert st["4"].node == "compute1" and st["4"].start_time == datetime(2026, 11, 23, 18, 33, 34)
    assert st["4"].source == "squeue" and st["4"].exit_code is None and st["4"].end_time is None
    assert "held by you" in st["5"].reason and "(JobHeldUser)" in st["5"].reason and st["5"].node == ""
    # a pending job's StartTime is its expected start (here its --begin time); N/A gives none
    assert st["6"].expected_start == datetime(2026, 11, 23, 18, 43, 34) and st["6"].start_time is None
    assert "requested start time" in st["6"].reason
    assert st["8"].expected_start is None and "(Dependency)" in st["8"].reason


def test_failed_cancelled_and_timeout_read_from_squeue():
    st = converse(S.status_query(["9"]), [(squeue("9"), recorded("slurm", "squeue_failed_exit3"))])["9"]
    assert (st.state, st.exit_code, st.signal, st.node) == (JobState.FAILED, 3, None, "compute1")
    assert "non-zero" in st.reason and st.end_time == datetime(2026, 11, 23, 18, 33, 38)

    both = converse(S.status_query(["7", "8"]), [(squeue("7", "8"), recorded("slurm", "squeue_right_after_scancel"))])
    assert (both["7"].state, both["7"].signal, both["7"].exit_code) == (JobState.CANCELLED, 15, 143)
    assert both["8"].state is JobState.PENDING and "never be satisfied" in both["8"].reason

    tmo = converse(S.status_query(["11"]), [(squeue("11"), recorded("slurm", "squeue_timeout"))])["11"]
    assert tmo.state is JobState.TIMEOUT and tmo.state.terminal and tmo.reason == "time limit reached (TimeLimit)"


# -- status: ids squeue no longer holds go to sacct ---------------------------------------------------------------
def test_single_forgotten_id_fails_squeue_then_sacct_answers():
    st = converse(S.status_query(["9"]), [
        (squeue("9"), recorded("slurm", "squeue_single_unknown")),  # exit 1: Invalid job id specified
        (sacct("9"), recorded("slurm", "sacct_finished")),
    ])["9"]
    assert (st.state, st.exit_code, st.source, st.node) == (JobState.FAILED, 3, "sacct", "compute1")


def test_several_ids_one_unknown_stays_one_squeue_call():
    st = converse(S.status_query(["7", "999999"]), [
        (squeue("7", "999999"), recorded("slurm", "squeue_two_one_unknown")),  # exit 0, 999999 simply absent
        (sacct("999999"), result("")),
    ])
    assert st["7"].state is JobState.RUNNING
    assert st["999999"].state is JobState.LOST and "neither squeue nor sacct" in st["999999"].reason


def test_finished_jobs_after_purge_read_from_sacct():
    ids = ["4", "7", "9", "11"]
    st = converse(S.status_query(ids), [
        (squeue(*ids), recorded("slurm", "squeue_after_purge")),
        (sacct("4", "7", "9"), recorded("slurm", "sacct_finished")),
    ])
    assert (st["4"].state, st["4"].exit_code, st["4"].source) == (JobState.COMPLETED, 0, "sacct")
    assert st["7"].state is JobState.CANCELLED and st["7"].native_state == "CANCELLED"
    assert "cancelled by uid 1001" in st["7"].reason
    assert st["9"].state is JobState.FAILED and st["9"].exit_code == 3
    assert st["11"].state is JobState.RUNNING and st["11"].source == "squeue"


def test_sacct_reason_of_an_ended_job_is_not_shown():
    # sacct_mixed: job 5 is PENDING with JobHeldUser; the same row as if it had since completed
    row = recorded("slurm", "sacct_mixed").stdout.splitlines()[1].replace("PENDING", "COMPLETED")
    assert S.parse_sacct(result(row + "\n"), ["5"])["5"].reason == ""


def test_sacct_timeout_and_cancelled_by():
    tmo = S.parse_sacct(recorded("slurm", "sacct_timeout"), ["11"])["11"]
    assert tmo.state is JobState.TIMEOUT and tmo.end_time == datetime(2026, 11, 23, 18, 34, 46)
    cancelled = S.parse_sacct(recorded("slurm", "sacct_cancelled"), ["7"])["7"]
    assert cancelled.state is JobState.CANCELLED and cancelled.exit_code == 0


def test_sacct_still_running_but_slurmctld_forgot_is_lost_not_waited_on_forever():
    # sacct_mixed was recorded while 7 ran; asked for an id squeue did not show, that record is stale.
    st = S.parse_sacct(recorded("slurm", "sacct_mixed"), ["7"])["7"]
    assert st.state is JobState.LOST and "no longer knows" in st.reason


def test_squeue_rejecting_a_batch_falls_back_to_one_unfiltered_call():
    # Synthetic: Slurm 22.05 never fails a multi-id squeue (it filters), but a future one or a wrapper might.
    rejected = result("", "slurm_load_jobs error: Invalid job id specified\n", 1)
    st = converse(S.status_query(["4", "5", "404"]), [
        (squeue("4", "5", "404"), rejected),
        (["squeue", "-h", "-t", "all", "-a", "--me", "-O", FMT], recorded("slurm", "squeue_me")),
        (sacct("404"), result("")),
    ])
    assert st["4"].state is JobState.RUNNING and st["5"].state is JobState.PENDING
    assert st["404"].state is JobState.LOST


# -- status: failed queries are UNKNOWN, never finished -----------------------------------------------------------
@pytest.mark.parametrize("res", [
    # synthetic: what squeue prints with slurmctld down or overloaded
    result("", "slurm_load_jobs error: Unable to contact slurm controller (connect failure)\n", 1),
    result("", "slurm_load_jobs error: Socket timed out on send/recv operation\n", 0),  # exit 0! OSC/ood_core#149
    result("4\x1fRUNNING\x1fNone\x1f\n", "", 0),  # truncated line: fields missing
    result("", "ssh: connect to host login1 port 22: Connection refused\n", 255),
], ids=["controller-down", "load-error-with-exit-0", "unparsable", "ssh-failed"])
def test_failed_squeue_reads_unknown_and_asks_nothing_more(res):
    st = converse(S.status_query(["4", "5"]), [(squeue("4", "5"), res)])
    assert all(s.state is JobState.UNKNOWN and not s.state.terminal for s in st.values())
    assert "squeue failed" in st["4"].reason


def test_banner_lines_without_separator_are_skipped():
    banner = "*** maintenance on Friday ***\n" + recorded("slurm", "squeue_failed_exit3").stdout
    assert S.parse_squeue(result(banner), ["9"])["9"].state is JobState.FAILED


def test_accounting_disabled_is_an_answer_lost_not_unknown():
    # synthetic: sacct's message with AccountingStorageType=accounting_storage/none (tests/cluster toggles it)
    off = result("", "sacct: error: Slurm accounting storage is disabled\n", 1)
    st = converse(S.status_query(["9"]), [(squeue("9"), recorded("slurm", "squeue_single_unknown")), (sacct("9"), off)])
    assert st["9"].state is JobState.LOST and "accounting is disabled" in st["9"].reason


def test_sacct_failing_reads_unknown():
    # as seen on the test cluster while slurmdbd restarted (exit code assumed)
    down = result("", "sacct: error: Sending PersistInit msg: Connection refused\n"
                      "sacct: error: Problem talking to the database: Connection refused\n", 1)
    st = S.parse_sacct(down, ["9", "10"])
    assert {s.state for s in st.values()} == {JobState.UNKNOWN}


# -- tables and small parsers -------------------------------------------------------------------------------------
ALL_STATES = ("PENDING CONFIGURING RUNNING COMPLETING COMPLETED CANCELLED FAILED TIMEOUT NODE_FAIL BOOT_FAIL "
              "OUT_OF_MEMORY DEADLINE PREEMPTED SUSPENDED STOPPED REQUEUED REQUEUE_HOLD RESV_DEL_HOLD REQUEUE_FED "
              "RESIZING REVOKED SIGNALING SPECIAL_EXIT STAGE_OUT").split()


def test_every_slurm_state_is_mapped_and_only_endings_are_terminal():
    assert set(ALL_STATES) == set(_STATES)
    terminal = {s for s in ALL_STATES if _STATES[s][0].terminal}
    assert terminal == {"COMPLETED", "CANCELLED", "FAILED", "TIMEOUT", "NODE_FAIL", "BOOT_FAIL", "OUT_OF_MEMORY",
                        "DEADLINE", "PREEMPTED", "REVOKED"}
    for waiting in ("SUSPENDED", "STOPPED", "REQUEUED", "REQUEUE_HOLD", "SPECIAL_EXIT", "CONFIGURING"):
        assert _STATES[waiting][0] is JobState.PENDING
    assert S.parse_squeue(result("4\x1fWEIRD_NEW\x1f\x1f\x1f\x1f\x1f\x1f0\x1f\n"), ["4"])["4"].state is JobState.UNKNOWN


@pytest.mark.parametrize("code, words", [
    ("Priority", "higher priority"), ("Resources", "resources"), ("QOSMaxJobsPerUser", "QOS allows"),
    ("JobHeldUser", "held by you"), ("ReqNodeNotAvail", "unavailable"), ("Dependency", "another job"),
    ("BeginTime", "start time"), ("PartitionTimeLimit", "partition's maximum"),
    ("AssocGrpGRES", "your account's group limit on GPUs"), ("QOSMaxGRESPerUser", "per-user limit on GPUs"),
    ("AssocGrpCPUMinutesLimit", "CPUs-minutes"), ("SomethingNew", "SomethingNew"),
])
def test_reason_codes_in_words_keep_the_code(code, words):
    text = human_reason(code)
    assert words in text and code in text


def test_no_reason_is_empty():
    assert human_reason("None") == "" and human_reason("") == ""


def test_exit_code_and_node_list_decoding():
    assert _exit_from_wait_status("768") == (3, None)
    assert _exit_from_wait_status("9") == (137, 9)
    assert _exit_from_wait_status("4294967294") == (None, None)
    assert _node("gpu[03-04],cpu1") == "gpu03" and _node("compute1") == "compute1" and _node("n/a") == ""


# -- cancel and checks ---------------------------------------------------------------------------------------------
def test_cancel_treats_gone_jobs_as_done():
    assert S.cancel_command(["7", "8"]).argv == ("scancel", "7", "8")
    for name in ("scancel_running", "scancel_unknown", "scancel_finished"):  # all exit 0, as the notes say
        S.parse_cancel(recorded("slurm", name), ["7"])
    S.parse_cancel(result("", "scancel: error: Kill job error on job id 9: Job/step already completing or "
                              "completed\n", 1), ["9"])
    with pytest.raises(SchedulerError, match="Access/permission denied"):
        S.parse_cancel(result("", "scancel: error: Kill job error on job id 3: Access/permission denied\n", 1), ["3"])


def _fake_sinfo(tmp_path, output: str) -> dict:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    fake = bin_dir / "sinfo"
    fake.write_text(f"#!/bin/sh\nprintf '%s' '{output}'\n")
    fake.chmod(fake.stat().st_mode | stat.S_IXUSR)
    return {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"}


def test_partition_check_fails_when_sinfo_prints_nothing(tmp_path):
    """sinfo exits 0 for an unknown partition (recorded: sinfo_p_nosuch); the check's shell test must not."""
    assert recorded("slurm", "sinfo_p_nosuch").exit_code == 0
    checks = dict(S.check_commands("gpu"))
    assert checks["Slurm client (sinfo)"].argv == ("sinfo", "--version")
    argv = list(checks["partition gpu"].argv)
    assert subprocess.run(argv, env=_fake_sinfo(tmp_path, "gpu*\n")).returncode == 0
    bad = subprocess.run(argv, env=_fake_sinfo(tmp_path, ""), capture_output=True, text=True)
    assert bad.returncode != 0 and bad.stderr.startswith("no partition gpu; partitions here:")

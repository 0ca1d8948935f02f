"""PBS backend: both dialects against real output. PBS Pro: the recorded OpenPBS 23.06.06 samples
(tests/fixtures/pbspro). Torque: Slurm's Torque wrapper recorded on the test cluster (tests/fixtures/torque).
Outputs built here (real Torque, a dead server) are marked synthetic."""

from __future__ import annotations

import json
import os
import subprocess
from datetime import datetime

import pytest

from hpcseg.errors import ConfigError, SchedulerError, SubmitFailed
from hpcseg.schedulers.base import JobState, SubmitSpec
from hpcseg.schedulers.pbs import PBS, _ended, parse_full

from .conversation import FIXTURES, converse, pbspro, recorded, result


def pro() -> PBS:
    return PBS(dialect="pro")


def torque() -> PBS:
    return PBS(dialect="torque")


def test_unknown_dialect_is_a_config_error():
    with pytest.raises(ConfigError, match="auto, pro, torque"):
        PBS(dialect="lsf")


# -- submit ------------------------------------------------------------------------------------------------------
def test_submit_command_gives_output_paths_on_the_command_line():
    argv = pro().submit_command(SubmitSpec("/h/u/jobs/7/job.sh", "/h/u/jobs/7", "hpcseg-server", ["-q", "gpu"])).argv
    assert argv[:5] == ("sh", "-c", 'cd "$1" && shift && exec qsub "$@"', "sh", "/h/u/jobs/7")
    assert argv[5:] == ("-o", "job.out", "-e", "job.err", "-N", "hpcseg-server", "-q", "gpu", "job.sh")


def test_submit_from_a_folder_with_spaces_passes_only_plain_words_to_qsub(tmp_path):
    """The Torque wrapper re-parses its arguments with /bin/sh: submit from the folder with plain names."""
    from hpcseg.shell import LocalShell

    job_dir = tmp_path / "my jobs; $(touch CANARY)" / "7"
    job_dir.mkdir(parents=True)
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "qsub").write_text('#!/bin/sh\nprintf "%s\\n" "$PWD" "$@"\n')
    (fake / "qsub").chmod(0o755)
    cmd = pro().submit_command(SubmitSpec(f"{job_dir}/job.sh", str(job_dir), "hpcseg-run"))
    res = LocalShell().run(list(cmd.argv), env={"PATH": f"{fake}:/usr/bin:/bin"})
    assert res.ok and res.stdout.splitlines() == [str(job_dir), "-o", "job.out", "-e", "job.err", "-N",
                                                  "hpcseg-run", "job.sh"]
    assert not (tmp_path / "CANARY").exists()


def test_job_name_fits_posix_qsub():
    argv = pro().submit_command(SubmitSpec("/j.sh", "/d", "7 seg server for liver")).argv
    name = argv[argv.index("-N") + 1]
    assert name == "j7_seg_server_f" and len(name) <= 15 and name[0].isalpha()


def test_parse_submit_both_dialects():
    assert pro().parse_submit(pbspro("01")) == "0.pbshost"
    assert torque().parse_submit(recorded("torque", "qsub_ok")) == "19"


def test_parse_submit_failures_carry_the_message():
    with pytest.raises(SubmitFailed, match="Illegal attribute or resource value"):
        pro().parse_submit(pbspro("47"))  # bad walltime, exit 166
    with pytest.raises(SubmitFailed, match="Invalid partition name specified"):
        torque().parse_submit(recorded("torque", "qsub_bad_queue"))  # the wrapper prints sbatch's error on stdout
    with pytest.raises(SubmitFailed, match="Unable to open file"):
        torque().parse_submit(recorded("torque", "qsub_missing_script"))


# -- the text form of qstat -f -----------------------------------------------------------------------------------
def test_continuation_lines_are_unwrapped_even_mid_word():
    attrs = parse_full(pbspro("30").stdout)["2.pbshost"]
    assert attrs["comment"] == "Job run at Mon Nov 23 at 18:14 on (pbshost:ncpus=1) and terminated by pbsuser@pbshost"
    assert attrs["Variable_List"].endswith("PBS_O_QUEUE=workq,PBS_O_HOST=pbshost")
    assert parse_full(pbspro("17").stdout)["3.pbshost"]["Submit_arguments"].endswith("walltime=00:01:00 long.sh")


def test_continuation_keeps_the_space_at_the_wrap_point():
    """Issue 13, point 11: qstat -f wraps by column; a space that ends the first part is part of the value."""
    text = ("Job Id: 7.pbshost\n"
            "    Job_Name = x\n"
            "    comment = Can Never Run: Insufficient amount of resource: ncpus (R: 4 A: 2 \n"
            "\tT: 2)   \n"
            "    job_state = Q\n")
    attrs = parse_full(text)["7.pbshost"]
    assert attrs["comment"] == "Can Never Run: Insufficient amount of resource: ncpus (R: 4 A: 2 T: 2)"
    assert attrs["Job_Name"] == "x" and attrs["job_state"] == "Q"


def test_wrapper_tab_indented_attributes_are_not_continuations():
    jobs = parse_full(recorded("torque", "qstat_f_mixed").stdout)
    assert list(jobs) == ["5", "7", "9"]
    assert jobs["7"]["exec_host"] == "compute1/1" and jobs["9"]["job_state"] == "C"


# -- dialect detection -------------------------------------------------------------------------------------------
def test_auto_detects_the_wrapper_once_then_uses_plain_qstat_f():
    pbs = PBS()
    st = converse(pbs.status_query(["7"]), [
        (["qstat", "--version"], recorded("torque", "qstat_version")),  # usage error, exit 2
        (["qstat", "-f", "7"], recorded("torque", "qstat_f_running")),
    ])
    assert pbs.resolved == "torque" and st["7"].state is JobState.RUNNING
    converse(pbs.status_query(["7"]), [(["qstat", "-f", "7"], recorded("torque", "qstat_f_running"))])


def test_auto_detects_pbs_pro_and_asks_history():
    pbs = PBS()
    st = converse(pbs.status_query(["5.pbshost"]), [
        (["qstat", "--version"], result("pbs_version = 23.06.06\n")),  # OpenPBS's answer (not in the samples)
        (["qstat", "-x", "-f", "5.pbshost"], pbspro("35")),
    ])
    assert pbs.resolved == "pro" and st["5.pbshost"].state is JobState.FAILED


def test_detection_of_real_torque_and_of_no_answer():
    assert PBS.detect_dialect(result("Version: 6.1.3\nCommit: abc\n")) == "torque"  # synthetic: Torque 6
    assert PBS.detect_dialect(result("", "bash: qstat: command not found\n", 127)) is None
    missing = result("", "bash: qstat: command not found", 127)
    st = converse(PBS().status_query(["1"]), [(["qstat", "--version"], missing)])
    assert st["1"].state is JobState.UNKNOWN and "PBS flavour" in st["1"].reason


# -- PBS Pro: every recorded case that matters ----------------------------------------------------------------------
@pytest.mark.parametrize("sample, job_id, state, exit_code, reason", [
    ("05", "0.pbshost", JobState.RUNNING, None, ""),
    ("19", "2.pbshost", JobState.PENDING, None, "Not enough free nodes available"),
    ("17", "3.pbshost", JobState.PENDING, None, "held by you"),
    ("12", "1.pbshost", JobState.COMPLETING, 3, "exiting"),
    ("27", "2.pbshost", JobState.RUNNING, None, "being deleted"),  # qdel'd, still R for ~15 s
    ("22", "0.pbshost", JobState.COMPLETED, 0, ""),
    ("35", "5.pbshost", JobState.FAILED, 3, "exited with code 3"),
    ("32", "1.pbshost", JobState.FAILED, 3, "exited with code 3"),  # stage-out failed, exit still 3
    ("30", "2.pbshost", JobState.CANCELLED, 143, "signal 15"),  # Exit_status 271 after qdel
    ("60", "4.pbshost", JobState.TIMEOUT, None, "walltime exceeded"),  # Exit_status -29
    ("53", "3.pbshost", JobState.CANCELLED, None, "deleted before it ran"),  # held, then qdel: no Exit_status
])
def test_pro_samples(sample, job_id, state, exit_code, reason):
    st = converse(pro().status_query([job_id]), [(["qstat", "-x", "-f", job_id], pbspro(sample))])[job_id]
    assert (st.state, st.exit_code, st.source) == (state, exit_code, "qstat-x")
    assert reason in st.reason


def test_pro_times_and_node():
    st = pro().parse_qstat(pbspro("22"), ["0.pbshost"])[0]["0.pbshost"]
    assert st.node == "pbshost" and st.native_state == "F"
    assert st.start_time == datetime(2026, 11, 23, 18, 13, 55) and st.end_time == datetime(2026, 11, 23, 18, 14, 21)
    killed = pro().parse_qstat(pbspro("30"), ["2.pbshost"])[0]["2.pbshost"]
    assert killed.signal == 15


def test_pro_nonexistent_is_lost():
    st = converse(pro().status_query(["999.pbshost"]), [(["qstat", "-x", "-f", "999.pbshost"], pbspro("41"))])
    assert st["999.pbshost"].state is JobState.LOST


def test_pro_queued_then_deleted_has_no_exit_status():
    """Sample 65 exists only as JSON: it shows the same shape as 53 (F, no Exit_status), read the same way."""
    job = json.loads((FIXTURES / "pbspro" / "65_qstat_x_f_F_json_queued_deleted.out").read_text())["Jobs"]["6.pbshost"]
    assert job["job_state"] == "F" and "Exit_status" not in job
    flat = {k: str(v) for k, v in job.items() if not isinstance(v, dict)}
    st = pro().status_from_attrs("6.pbshost", flat)
    assert st.state is JobState.CANCELLED and "Can Never Run" in st.reason


def test_pro_several_ids_in_one_call():
    st = converse(pro().status_query(["0.pbshost", "5.pbshost"]),
                  [(["qstat", "-x", "-f", "0.pbshost", "5.pbshost"], pbspro("71"))])
    assert (st["0.pbshost"].state, st["5.pbshost"].state) == (JobState.COMPLETED, JobState.FAILED)


def test_pro_one_unknown_among_several_is_named_and_the_rest_answered():
    # 73 is the JSON form; its stderr and exit code with 71's text for 5.pbshost show the text form's shape.
    text5 = pbspro("71").stdout.split("\n\n")[1] + "\n\n"
    res = result(text5, pbspro("73").stderr, 153)
    st = converse(pro().status_query(["999.pbshost", "5.pbshost"]),
                  [(["qstat", "-x", "-f", "999.pbshost", "5.pbshost"], res)])
    assert st["999.pbshost"].state is JobState.LOST and st["5.pbshost"].state is JobState.FAILED


def test_a_batch_upset_by_an_unknown_id_is_asked_again_one_by_one():
    # synthetic: a server that fails the whole batch for one unknown id (stdout empty)
    upset = result("", pbspro("41").stderr, 153)
    st = converse(pro().status_query(["999.pbshost", "5.pbshost"]), [
        (["qstat", "-x", "-f", "999.pbshost", "5.pbshost"], upset),
        (["qstat", "-x", "-f", "5.pbshost"], pbspro("35")),
    ])
    assert st["999.pbshost"].state is JobState.LOST and st["5.pbshost"].exit_code == 3


def test_server_down_is_unknown_without_retries():
    # synthetic: OpenPBS's message when pbs_server does not answer
    down = result("", "Connection refused\nqstat: cannot connect to server pbshost (errno=15010)\n", 1)
    st = converse(pro().status_query(["0.pbshost", "5.pbshost"]),
                  [(["qstat", "-x", "-f", "0.pbshost", "5.pbshost"], down)])
    assert {s.state for s in st.values()} == {JobState.UNKNOWN}


def test_pro_finished_asked_without_history_says_so():
    st = converse(torque().status_query(["0.pbshost"]), [(["qstat", "-f", "0.pbshost"], pbspro("20"))])["0.pbshost"]
    assert st.state is JobState.LOST and "qstat -x" in st.reason
    short = converse(torque().status_query(["3"]), [(["qstat", "-f", "3"], pbspro("55"))])["3"]  # "3.pbshost"
    assert short.state is JobState.LOST and "qstat -x" in short.reason


@pytest.mark.parametrize("exit_status, comment, state, code", [
    ("-27", "", JobState.OUT_OF_MEMORY, None), ("-28", "", JobState.TIMEOUT, None),
    ("-1", "", JobState.FAILED, None), ("265", "", JobState.FAILED, 137), ("0", "", JobState.COMPLETED, 0),
    ("271", "", JobState.CANCELLED, 143), ("", "", JobState.CANCELLED, None),
])
def test_exit_status_rules(exit_status, comment, state, code):
    got = _ended(exit_status, comment, {})
    assert (got[0], got[2]) == (state, code)


def test_signal_at_the_walltime_is_timeout():
    attrs = {"resources_used.walltime": "00:10:02", "Resource_List.walltime": "00:10:00"}
    assert _ended("271", "", attrs)[0] is JobState.TIMEOUT


# -- Torque: Slurm's wrapper, recorded ------------------------------------------------------------------------------
def test_wrapper_mixed_batch_with_an_unknown_id():
    st = converse(torque().status_query(["5", "7", "9", "999999"]),
                  [(["qstat", "-f", "5", "7", "9", "999999"], recorded("torque", "qstat_f_mixed"))])
    assert st["5"].state is JobState.PENDING  # held, but the wrapper prints Q
    assert (st["7"].state, st["7"].node) == (JobState.RUNNING, "compute1")
    assert st["7"].start_time == datetime(2026, 11, 23, 18, 33, 35) and st["7"].end_time is None
    assert st["9"].state is JobState.LOST and "exit-code file" in st["9"].reason  # exit 3, but C says nothing
    assert st["9"].end_time == datetime(2026, 11, 23, 18, 33, 38)
    assert st["999999"].state is JobState.LOST  # left out silently, exit 0


def test_wrapper_none_known_exits_153_silently():
    st = converse(torque().status_query(["999998", "999999"]),
                  [(["qstat", "-f", "999998", "999999"], recorded("torque", "qstat_f_two_unknown"))])
    assert {s.state for s in st.values()} == {JobState.LOST}


def test_wrapper_timeout_from_start_and_end():
    st = torque().parse_qstat(recorded("torque", "qstat_f_timeout"), ["11"])[0]["11"]
    assert st.state is JobState.TIMEOUT


def test_wrapper_cancel_is_remembered():
    pbs = torque()
    assert pbs.parse_qstat(recorded("torque", "qstat_f_cancelled"), ["7"])[0]["7"].state is JobState.LOST
    pbs.parse_cancel(recorded("torque", "qdel_running"), ["7"])
    assert pbs.parse_qstat(recorded("torque", "qstat_f_cancelled"), ["7"])[0]["7"].state is JobState.CANCELLED
    # and once the wrapper no longer lists it (Slurm purged it)
    assert pbs.parse_qstat(recorded("torque", "qstat_f_unknown"), ["7"])[0]["7"].state is JobState.CANCELLED


def test_wrapper_failure_is_unknown():
    # synthetic: the wrapper dies when it cannot load jobs from slurmctld
    st = torque().parse_qstat(result("", "Problem loading jobs.\n", 111), ["7"])[0]
    assert st["7"].state is JobState.UNKNOWN


def test_real_torque_exit_status():
    # synthetic: real Torque prints 4-space attributes and exit_status for C jobs
    text = ("Job Id: 12.torque.example.org\n    Job_Name = x\n    job_state = C\n    exit_status = 271\n"
            "    start_time = Mon Nov 23 10:00:00 2026\n    comp_time = Mon Nov 23 10:05:00 2026\n"
            "    exec_host = n01/0+n01/1\n\n")
    st = torque().parse_qstat(result(text), ["12.torque.example.org"])[0]["12.torque.example.org"]
    assert (st.state, st.exit_code, st.node) == (JobState.CANCELLED, 143, "n01")
    assert st.end_time == datetime(2026, 11, 23, 10, 5)


# -- cancel and checks ---------------------------------------------------------------------------------------------
def test_cancel_already_gone_is_fine_in_both_dialects():
    assert pro().cancel_command(["2.pbshost"]).argv == ("qdel", "2.pbshost")
    pro().parse_cancel(pbspro("43"), ["999.pbshost"])  # 153 Unknown Job Id
    pro().parse_cancel(pbspro("44"), ["0.pbshost"])  # 35 Job has finished
    for name in ("qdel_unknown", "qdel_finished", "qdel_mixed"):  # wrapper: silent, exit = number not killed
        torque().parse_cancel(recorded("torque", name), ["19"])
    with pytest.raises(SchedulerError, match="Unauthorized"):
        pro().parse_cancel(result("", "qdel: Unauthorized Request  5.pbshost\n", 159), ["5.pbshost"])


def test_queue_check_uses_qstat_Q_which_fails_for_an_unknown_queue(tmp_path):
    """`qstat -Q QUEUE` fails for an unknown queue (recorded); the check then lists the queues there are."""
    gpu, nosuch = recorded("torque", "qstat_Q_gpu"), recorded("torque", "qstat_Q_nosuch")
    assert gpu.exit_code == 0 and nosuch.exit_code == 153
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (tmp_path / "gpu.out").write_text(gpu.stdout)
    fake = bin_dir / "qstat"  # replays the recordings: `-Q gpu` and `-Q` list the queue, any other queue fails
    fake.write_text(f'#!/bin/sh\ncase "$2" in gpu|"") cat {tmp_path / "gpu.out"};; *) exit {nosuch.exit_code};; esac\n')
    fake.chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    for queue, ok in (("gpu", True), ("nosuch", False)):
        (what, cmd), = [c for c in torque().check_commands(queue) if c[0].startswith("queue")]
        res = subprocess.run(list(cmd.argv), env=env, capture_output=True, text=True)
        assert (res.returncode == 0) is ok and what == f"queue {queue}"
        if ok:
            assert res.stdout.split()[0] == "gpu"
        else:
            assert res.stderr.strip() == "no queue nosuch (qstat -Q: exit 153); queues here: gpu"

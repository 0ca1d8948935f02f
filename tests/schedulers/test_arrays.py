"""Job arrays in every backend: submit commands, ids as each scheduler prints them, per-task states, exit codes and
history, against real output. Slurm and the Torque wrapper: recorded on the test cluster (``fixtures/slurm/array_*``,
``fixtures/torque/array_*``). PBS Pro: real OpenPBS 23.06.06 recordings (``fixtures/pbspro/arrays/``). local: real
processes."""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest

from hpcseg.schedulers.base import JobState, SubmitSpec, drive, expand_indices
from hpcseg.schedulers.local import Local
from hpcseg.schedulers.pbs import PBS, parse_pbs_array_id
from hpcseg.schedulers.slurm import Slurm, parse_slurm_array_id
from hpcseg.shell import LocalShell, Result

from .conversation import FIXTURES, converse, recorded, result

SPEC = SubmitSpec("/h/u/jobs/b1/job.sh", "/h/u/jobs/b1", "hpcseg-batch")
ARRAYS = FIXTURES / "pbspro" / "arrays"


def pro_sample(number: str) -> Result:
    """An OpenPBS array recording by number: stdout, stderr and the exit code from its INDEX.txt."""
    out = next(ARRAYS.glob(f"{number}-*.out"))
    err = out.with_suffix(".err")
    m = re.search(rf"^{number} \| (.*?) \| (-?\d+) \|", (ARRAYS / "INDEX.txt").read_text(), re.M)
    assert m, number
    return Result(m.group(1), int(m.group(2)), out.read_text(), err.read_text() if err.exists() else "")


def states(statuses) -> dict[int, str]:
    return {i: st.state.value for i, st in statuses.items()}


# -- index ranges and ids ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("text, indices", [("4", [4]), ("[5-9]", [5, 6, 7, 8, 9]), ("2-5%2", [2, 3, 4, 5]),
                                           ("1,3-4", [1, 3, 4]), ("1-10:3", [1, 4, 7, 10]), ("[4-5%2]", [4, 5])])
def test_expand_indices(text, indices):
    assert expand_indices(text) == indices


@pytest.mark.parametrize("text", ["", "N/A", "a-b", "[1-"])
def test_expand_indices_refuses_what_is_not_a_range(text):
    with pytest.raises(ValueError):
        expand_indices(text)


@pytest.mark.parametrize("text, parsed", [("123_4", ("123", [4])), ("123_[5-9]", ("123", [5, 6, 7, 8, 9])),
                                          ("53_[4-5%2]", ("53", [4, 5])), ("123", None), ("123.4", None)])
def test_slurm_array_ids(text, parsed):
    assert parse_slurm_array_id(text) == parsed


@pytest.mark.parametrize("text, parsed", [("12[].server", ("12", None)), ("12[3].server", ("12", 3)),
                                          ("19[2].pbshost", ("19", 2)), ("12-3", ("12", 3)), ("12[3]", ("12", 3)),
                                          ("12.server", None), ("12", None)])
def test_pbs_array_ids(text, parsed):
    assert parse_pbs_array_id(text) == parsed


# -- Slurm ---------------------------------------------------------------------------------------------------------
def test_slurm_array_submit_command_and_id():
    argv = Slurm().array_submit_command(SPEC, 16, 4).argv
    assert argv[:3] == ("sbatch", "--parsable", "--array=0-15%4")
    assert "--output=/h/u/jobs/b1/task-%a.out" in argv and argv[-1] == SPEC.script_path
    assert Slurm().parse_array_submit(recorded("slurm", "array_sbatch")) == "53"


def test_slurm_array_right_after_submission_needs_no_sacct():
    s = Slurm()
    out = converse(s.array_status_query("53", 6), [(s.array_squeue_command("53").argv,
                                                    recorded("slurm", "array_squeue_start"))])
    assert states(out) == {0: "running", 1: "running", 2: "pending", 3: "pending", 4: "pending", 5: "pending"}
    assert out[0].node == "compute1" and out[0].job_id == "53_0"
    assert "JobArrayTaskLimit" in out[3].reason


def test_slurm_array_mixed_states_and_exit_codes():
    s = Slurm()
    out = converse(s.array_status_query("53", 6), [(s.array_squeue_command("53").argv,
                                                    recorded("slurm", "array_squeue_after_scancel"))])
    assert states(out) == {0: "completed", 1: "completed", 2: "failed", 3: "running", 4: "completed",
                           5: "cancelled"}
    assert (out[2].exit_code, out[0].exit_code) == (3, 0)


def test_slurm_array_forgotten_by_slurmctld_comes_from_sacct_where_a_task_row_beats_the_range_row():
    s = Slurm()
    out = converse(s.array_status_query("53", 7), [
        (s.array_squeue_command("53").argv, recorded("slurm", "array_squeue_end")),
        (s.array_sacct_command("53").argv, recorded("slurm", "array_sacct_end"))])
    assert states(out) == {0: "completed", 1: "completed", 2: "failed", 3: "cancelled", 4: "completed",
                           5: "cancelled", 6: "lost"}
    assert out[2].exit_code == 3 and out[2].source == "sacct"
    assert out[3].reason == "cancelled by uid 1001"


def test_slurm_array_tasks_squeue_no_longer_shows_come_from_sacct():
    s = Slurm()
    out = converse(s.array_status_query("53", 6), [
        (s.array_squeue_command("53").argv, result()),  # synthetic: squeue answered, with no task
        (s.array_sacct_command("53").argv, recorded("slurm", "array_sacct_mixed"))])
    # sacct still says RUNNING for task 3, but squeue (which answered) no longer has it: LOST, never a wait forever
    assert states(out)[3] == "lost" and states(out)[2] == "failed"


def test_slurm_array_failed_query_is_unknown_never_finished():
    s = Slurm()
    out = converse(s.array_status_query("53", 3), [(s.array_squeue_command("53").argv, result(
        stderr="slurm_load_jobs error: Socket timed out on send/recv operation", exit_code=1))])  # synthetic
    assert set(states(out).values()) == {"unknown"}


def test_slurm_array_cancel():
    assert Slurm().array_cancel_command("53").argv == ("scancel", "53")


# -- PBS Pro -------------------------------------------------------------------------------------------------------
def pro() -> PBS:
    return PBS(dialect="pro")


def test_pbspro_array_submit_command_uses_J_and_never_a_single_index():
    argv = pro().array_submit_command(SPEC, 8, 2).argv
    assert argv[-3:] == ("-J", "0-7%2", "job.sh")
    assert pro().array_submit_command(SPEC, 1, 1).argv[-3:] == ("-J", "0-1%1", "job.sh")  # `-J 0` is illegal
    assert pro_sample("85").exit_code == 2 and "illegal -J value" in pro_sample("85").stderr
    assert pro().parse_array_submit(pro_sample("01")) == "19[].pbshost"


def test_pbspro_running_array_every_subjob():
    p = pro()
    out = converse(p.array_status_query("19[].pbshost", 4), [(p.array_qstat_command("19[].pbshost").argv,
                                                              pro_sample("12"))])
    assert p.array_qstat_command("19[].pbshost").argv == ("qstat", "-x", "-f", "-t", "19[].pbshost")
    assert states(out) == {0: "running", 1: "running", 2: "running", 3: "running"}
    assert out[2].job_id == "19[2].pbshost" and out[2].node == "pbshost"


def test_pbspro_finished_subjobs_exit_codes_walltime_and_qdel():
    """Blocks concatenated from single-id recordings of the same server (qstat prints them one after another)."""
    p = pro()
    text = pro_sample("21").stdout + "\n" + pro_sample("19").stdout
    out = p.parse_array_qstat(Result("qstat", 0, text, ""), "19[].pbshost", 4)
    assert out[2].state is JobState.FAILED and out[2].exit_code == 3
    assert {out[i].state for i in (0, 1, 3)} == {JobState.LOST}  # finished array, subjob not listed
    wall = p.parse_array_qstat(pro_sample("73"), "23[].pbshost", 3)
    assert wall[1].state is JobState.TIMEOUT and "walltime" in wall[1].reason
    killed = p.parse_array_qstat(pro_sample("59"), "21[].pbshost", 8)
    assert killed[2].state is JobState.CANCELLED and killed[2].signal == 15


def test_pbspro_history_rewritten_by_an_array_qdel_reads_cancelled_after_our_cancel():
    p = pro()
    assert p.parse_array_qstat(pro_sample("94"), "21[].pbshost", 8)[0].state is JobState.FAILED  # exit 1, as PBS says
    p.parse_cancel(result(), ["21[].pbshost"])
    assert p.parse_array_qstat(pro_sample("94"), "21[].pbshost", 8)[0].state is JobState.CANCELLED


def test_pbspro_queued_subjob_and_unknown_array():
    p = pro()
    queued = p.parse_array_qstat(pro_sample("38"), "21[].pbshost", 8)
    assert queued[5].state is JobState.PENDING
    gone = p.parse_array_qstat(pro_sample("16"), "19[].pbshost", 4)
    assert set(states(gone).values()) == {"lost"}


def test_pbspro_expired_subjob_while_the_parent_runs():
    out = pro().parse_array_qstat(pro_sample("52"), "21[].pbshost", 8)
    assert out[0].state is JobState.COMPLETED and out[0].exit_code == 0


# -- Torque (Slurm's wrapper on the test cluster) -----------------------------------------------------------------
def test_torque_array_submit_uses_t():
    argv = PBS(dialect="torque").array_submit_command(SPEC, 4, 2).argv
    assert argv[-3:] == ("-t", "0-3%2", "job.sh")
    assert PBS(dialect="torque").parse_array_submit(recorded("torque", "array_qsub")) == "59"


def test_torque_wrapper_shows_the_whole_array_as_one_job():
    p = PBS(dialect="auto")
    out = converse(p.array_status_query("59", 4), [
        (("qstat", "--version"), recorded("torque", "qstat_version")),
        (("qstat", "-f", "-t", "59"), recorded("torque", "array_qstat_f_t")),
        (("qstat", "-f", "59"), recorded("torque", "array_qstat_f_running"))])
    assert set(states(out).values()) == {"pending"}
    assert "whole array" in out[3].reason
    done = p.parse_array_qstat(recorded("torque", "array_qstat_f_finished"), "59", 4, whole=True)
    assert set(states(done).values()) == {"lost"}  # C without an exit status: the tasks' own files decide


# -- local ---------------------------------------------------------------------------------------------------------
def test_local_array_runs_every_index_in_lanes(tmp_path: Path):
    job = tmp_path / "a b"
    job.mkdir()
    (job / "job.sh").write_text('echo "task $HPCSEG_ARRAY_TASK_ID"; sleep 0.3\n')
    L, sh = Local(), LocalShell()
    cmd = L.array_submit_command(SubmitSpec(str(job / "job.sh"), str(job)), 5, 2)
    array_id = L.parse_array_submit(sh.run(list(cmd.argv)))
    assert array_id.startswith("local-array:2:")
    assert set(states(drive(L.array_status_query(array_id, 5), sh)).values()) == {"running"}
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and not all(
            st.state is JobState.LOST for st in drive(L.array_status_query(array_id, 5), sh).values()):
        time.sleep(0.1)
    assert [(job / f"task-{i}.out").read_text() for i in range(5)] == [f"task {i}\n" for i in range(5)]

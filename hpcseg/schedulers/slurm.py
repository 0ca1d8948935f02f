"""Slurm: the commands for sbatch, squeue, sacct and scancel, and parsers for their output. No I/O here.

Modelled on PSI/J's Slurm executor (``ExaWorks/psij-python:src/psij/executors/batch/slurm.py``): a state table
with a link to the Slurm docs, nothing that runs, connects or sleeps.

Status of many jobs uses as few calls as possible:

1. ``squeue -h -t all -j ID1,ID2 -O <fields>`` shows every job slurmctld still holds in memory: live jobs, and
   finished ones for ``MinJobAge`` (300 s by default). Each field ends with ``\\x1f`` (ASCII unit separator),
   which no field contains. With *one* id that slurmctld has forgotten, squeue fails with "Invalid job id
   specified" (it calls ``slurm_load_job`` for a single id). With several ids it loads all jobs and filters
   them, so an unknown id is just absent (``SchedMD/slurm:src/squeue/squeue.c``, ``_print_job``). If a Slurm
   version or a site wrapper fails the whole call anyway, we ask once more without ``-j``
   (``squeue -h -t all -a --me -O ...``, Slurm 20.11 or later) and keep only our ids. That is still one call.
2. ids that squeue does not show: ``sacct -X -P -n -j ID1,ID2 --format=...`` (the accounting database).
   ``scontrol show job`` is never asked. It reads the same slurmctld memory as ``squeue -t all``, so it cannot
   know a job squeue did not show, and it takes only one id per call. ``scontrol show job 7,5`` fails
   with "Invalid job id specified" (``src/scontrol/info_job.c``; recorded in ``tests/fixtures/slurm``).
3. an id that no source knows is LOST. With accounting disabled ("Slurm accounting storage is disabled") the
   remaining ids are LOST too, and :mod:`hpcseg.jobs` reads the job's exit-code file.

A query that fails leaves its ids UNKNOWN and never reads them as finished. Failure means a non-zero exit, a
``slurm_load_jobs error`` on stderr even with exit 0 (``OSC/ood_core#149``), or lines we cannot parse.

Example::

    s = Slurm()
    cmd = s.submit_command(SubmitSpec("/home/u/jobs/7/job.sh", "/home/u/jobs/7", "seg-server"))
    job_id = s.parse_submit(shell.run(cmd.argv))
    drive(s.status_query([job_id]), shell)[job_id].state
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from datetime import datetime

from ..errors import SubmitFailed
from ..shell import Result
from .base import (
    ArrayStatusQuery,
    Command,
    JobState,
    JobStatus,
    Scheduler,
    StatusQuery,
    SubmitSpec,
    array_statuses,
    expand_indices,
    stderr_tail,
    unknown_statuses,
)

#: Every state Slurm prints, mapped by an explicit table. Source: "JOB STATE CODES" in
#: https://slurm.schedmd.com/squeue.html#lbAG and https://slurm.schedmd.com/sacct.html#SECTION_JOB-STATE-CODES.
#: Terminal states form an allow-list (``JobState.terminal``). Any word not listed here maps to UNKNOWN, never
#: to finished. We decided these on purpose:
#:
#: - SUSPENDED and STOPPED become PENDING. The processes are frozen and the server does not answer, but the job
#:   will resume, so a wait must not end.
#: - REQUEUED, REQUEUE_HOLD, REQUEUE_FED, RESV_DEL_HOLD and SPECIAL_EXIT become PENDING. The job will, or may,
#:   run again, on a new node and port, so :mod:`hpcseg.jobs` re-reads the connection file.
#: - PREEMPTED is final. Slurm's ``job_state_string`` checks the REQUEUE flag before the base state, so a
#:   preempted job that will be requeued reads REQUEUED, then PENDING. A bare PREEMPTED job was killed and will
#:   not come back. We map it to FAILED, with "preempted" as the reason.
#: - CONFIGURING becomes PENDING: nodes are allocated but still booting, and the script has not started.
#: - REVOKED becomes LOST. A federated sibling started on another cluster, so this cluster will not run it.
_STATES: dict[str, tuple[JobState, str]] = {
    "PENDING": (JobState.PENDING, ""),
    "CONFIGURING": (JobState.PENDING, "allocated nodes are booting"),
    "RUNNING": (JobState.RUNNING, ""),
    "RESIZING": (JobState.RUNNING, "the job is changing size"),
    "SIGNALING": (JobState.RUNNING, "the job is being signalled"),
    "COMPLETING": (JobState.COMPLETING, ""),
    "STAGE_OUT": (JobState.COMPLETING, "staging out files"),
    "SUSPENDED": (JobState.PENDING, "suspended by the scheduler"),
    "STOPPED": (JobState.PENDING, "stopped by the scheduler"),
    "REQUEUED": (JobState.PENDING, "requeued: it will run again, maybe on another node"),
    "REQUEUE_HOLD": (JobState.PENDING, "requeued and held"),
    "REQUEUE_FED": (JobState.PENDING, "being requeued by the federation"),
    "RESV_DEL_HOLD": (JobState.PENDING, "held: its reservation was deleted"),
    "SPECIAL_EXIT": (JobState.PENDING, "requeued in special-exit state (held)"),
    "COMPLETED": (JobState.COMPLETED, ""),
    "FAILED": (JobState.FAILED, ""),
    "CANCELLED": (JobState.CANCELLED, ""),
    "TIMEOUT": (JobState.TIMEOUT, "time limit reached"),
    "DEADLINE": (JobState.TIMEOUT, "deadline reached"),
    "NODE_FAIL": (JobState.NODE_FAIL, "a node of the job failed"),
    "BOOT_FAIL": (JobState.NODE_FAIL, "a node failed to boot"),
    "OUT_OF_MEMORY": (JobState.OUT_OF_MEMORY, "out of memory"),
    "PREEMPTED": (JobState.FAILED, "preempted by another job and not requeued"),
    "REVOKED": (JobState.LOST, "revoked: a federated sibling job runs on another cluster"),
}

#: Common ``Reason`` codes in words. The rest keep their code. Source: "JOB REASON CODES" in
#: https://slurm.schedmd.com/squeue.html#lbAF and https://slurm.schedmd.com/resource_limits.html
_REASONS = {
    "Priority": "waiting behind jobs of higher priority",
    "Resources": "waiting for resources (GPUs, CPUs or memory) to become free",
    "Dependency": "waiting for another job to finish (dependency)",
    "DependencyNeverSatisfied": "its dependency can never be satisfied",
    "BeginTime": "waiting for its requested start time",
    "JobHeldUser": "held by you (release it with `scontrol release`)",
    "JobHeldAdmin": "held by an administrator",
    "ReqNodeNotAvail": "a node it needs is unavailable (down, drained or reserved)",
    "PartitionTimeLimit": "its time limit exceeds the partition's maximum: ask for less time",
    "PartitionNodeLimit": "its node count is outside the partition's limits",
    "PartitionDown": "the partition is down",
    "PartitionInactive": "the partition is inactive",
    "NodeDown": "a node it needs is down",
    "Reservation": "waiting for its reservation",
    "Licenses": "waiting for a license",
    "InvalidAccount": "the account is invalid",
    "InvalidQOS": "the QOS is invalid",
    "BadConstraints": "its constraints cannot be satisfied",
    "Cleaning": "being requeued, still cleaning up its previous run",
    "Prolog": "the prolog is still running",
    "WaitingForScheduling": "waiting for the scheduler to consider it",
    "QOSMaxJobsPerUser": "you already run as many jobs as your QOS allows",
    "QOSMaxSubmitJobPerUserLimit": "you already have as many jobs queued as your QOS allows",
    "AssociationJobLimit": "your account runs as many jobs as it may",
    "NonZeroExitCode": "the job script exited with a non-zero code",
    "TimeLimit": "time limit reached",
    "JobLaunchFailure": "the job could not be launched",
    "SystemFailure": "failure of Slurm, a file system or the network",
    "InactiveLimit": "the system's InactiveLimit was reached",
    "OutOfMemory": "out of memory",
}
_LIMIT_WHAT = {"Cpu": "CPUs", "CPU": "CPUs", "Mem": "memory", "Memory": "memory", "Node": "nodes", "Nodes": "nodes",
               "GRES": "GPUs (GRES)", "Jobs": "running jobs", "SubmitJob": "queued jobs", "SubmitJobs": "queued jobs",
               "Wall": "run time", "WallDuration": "run time", "Billing": "billing units", "Energy": "energy",
               "License": "licenses"}
_LIMIT = re.compile(r"^(Assoc|QOS)(Grp|Max)([A-Z][A-Za-z]*?)(Minutes|RunMinutes)?(Per\w+?)?(Limit)?$")

_FIELDS = ("JobID", "State", "Reason", "NodeList", "BatchHost", "StartTime", "EndTime", "exit_code")
_SEP = "\x1f"
_FORMAT = ",".join(f"{f}:{_SEP}" for f in _FIELDS)
_SACCT_FIELDS = "JobID,State,ExitCode,Start,End,NodeList,Reason"
_ID_LINE = re.compile(r"^(\d+)(?:;(\S+))?$")


def human_reason(code: str) -> str:
    """A phrase for a Slurm reason code, with the code in parentheses. "" for None/empty."""
    code = code.strip()
    if code in ("", "None", "(null)", "N/A"):
        return ""
    if code in _REASONS:
        return f"{_REASONS[code]} ({code})"
    m = _LIMIT.match(code)
    if m:
        owner = "your account's" if m.group(1) == "Assoc" else "the QOS's"
        kind = "group" if m.group(2) == "Grp" else "per-job"
        if m.group(5):
            kind = {"PerUser": "per-user", "PerAccount": "per-account", "PerNode": "per-node"}.get(m.group(5), kind)
        what = _LIMIT_WHAT.get(m.group(3), m.group(3))
        if m.group(4):
            what += "-minutes"
        return f"{owner} {kind} limit on {what} is reached ({code})"
    return code


def _time(text: str) -> datetime | None:
    """Slurm's ISO time (``2026-11-23T18:13:55``); N/A, Unknown, None or a site's SLURM_TIME_FORMAT give None."""
    try:
        return datetime.fromisoformat(text.strip())
    except ValueError:
        return None


def _exit_from_wait_status(raw: str) -> tuple[int | None, int | None]:
    """squeue's ``exit_code`` is a wait(2) status: code in bits 8-15, the signal in bits 0-6."""
    try:
        value = int(raw)
    except ValueError:
        return None, None
    if value < 0 or value > 0xFFFF:  # NO_VAL and friends
        return None, None
    sig = value & 0x7F
    return (128 + sig, sig) if sig else ((value >> 8) & 0xFF, None)


def _exit_from_pair(text: str) -> tuple[int | None, int | None]:
    """sacct's ``ExitCode`` reads ``code:signal`` (``3:0``, ``0:15``)."""
    m = re.match(r"^(\d+):(\d+)$", text.strip())
    if not m:
        return None, None
    code, sig = int(m.group(1)), int(m.group(2))
    return (128 + sig, sig) if sig else (code, None)


def _node(text: str) -> str:
    """The first host of a node list (``gpu[03-04],cpu1`` gives ``gpu03``): where the batch script runs."""
    text = text.strip()
    if text.lower() in ("", "(null)", "none assigned", "n/a", "none"):  # squeue prints n/a for a pending BatchHost
        return ""
    m = re.match(r"^([^,\[]*)(?:\[([^\]\-,]+)[^\]]*\]([^,]*))?", text)
    return m.group(1) + (m.group(2) or "") + (m.group(3) or "") if m else text


def _output_dir(job_dir: str) -> str:
    """``job_dir`` as sbatch's ``--output``/``--error`` need it: ``%`` doubled (sbatch reads ``%j``, ``%x``... as
    file-name patterns). A backslash is refused: sbatch reads it as "expand no pattern" and drops it, so the job
    could not open its output file and would fail without a word (found by a hypothesis-drawn job folder)."""
    if "\\" in job_dir:
        raise SubmitFailed(f"Slurm cannot write job output under {job_dir!r}: sbatch drops the backslash",
                           hint="set work_dir to a path without '\\'")
    return job_dir.replace("%", "%%")


def _sacct_status(job_id: str, cells: list[str], what: str) -> JobStatus:
    """One sacct row (JobID, State, ExitCode, Start, End, NodeList, Reason) of a job or array task that squeue no
    longer shows."""
    _, state, exit_pair, start, end, nodes, reason = cells
    # sacct's Reason is the last reason the job *waited* (man sacct): for an ended job it misleads
    ended = _STATES.get(state.split()[0] if state.strip() else "", (JobState.UNKNOWN, ""))[0].terminal
    st = _status(job_id, state, "" if ended else reason, "sacct")
    st.node = _node(nodes)
    st.start_time = _time(start)
    if st.state.terminal:
        st.end_time = _time(end)
        st.exit_code, st.signal = _exit_from_pair(exit_pair)
    elif st.state is not JobState.UNKNOWN:
        # squeue answered without it, so slurmctld does not hold it: a record the database never closed
        # (e.g. slurmctld lost its state). Waiting on it would never end.
        st.reason = f"accounting still says {st.native_state}, but slurmctld no longer knows the {what}"
        st.state = JobState.LOST
    return st


def _status(job_id: str, state_text: str, reason: str, source: str) -> JobStatus:
    native = state_text.split()[0] if state_text.strip() else ""  # sacct: "CANCELLED by 1234"
    state, phrase = _STATES.get(native, (JobState.UNKNOWN, f"unrecognised Slurm state {native!r}"))
    why = human_reason(reason)
    if phrase and why.startswith(phrase):  # TIMEOUT with TimeLimit: say it once
        phrase = ""
    if state_text.startswith("CANCELLED by"):
        phrase = f"cancelled by uid {state_text.split()[-1]}"
    return JobStatus(job_id, state, native_state=native, reason="; ".join(p for p in (phrase, why) if p),
                     source=source)


def _load_error(res: Result) -> bool:
    return "slurm_load_jobs error" in res.stderr or "slurm_load_job error" in res.stderr


# -- job arrays (``sbatch --array``) ------------------------------------------------------------------------------
# Ids as Slurm prints them (recorded on the test cluster, tests/fixtures/slurm/array_*.json): sbatch --parsable
# prints the array's id (``25``). squeue's ``JobID`` field shows each started task's *own* job id (``26``), so we
# ask for ``ArrayJobID`` and ``ArrayTaskID`` instead: ``25`` and ``4``, or a range of tasks not yet started,
# ``2-5%2`` (``%2``: at most 2 run at once). sacct names tasks ``25_4`` and the pending rest ``25_[4-5%2]``; after a
# ``scancel 25_5`` that range row stays in the database as ``CANCELLED by UID`` even though task 4 then ran: a
# row for one task always wins over a range row.
_ARRAY_FIELDS = ("ArrayJobID", "ArrayTaskID", "State", "Reason", "NodeList", "BatchHost", "StartTime", "EndTime",
                 "exit_code")
_ARRAY_FORMAT = ",".join(f"{f}:{_SEP}" for f in _ARRAY_FIELDS)
_SLURM_ARRAY_ID = re.compile(r"^(\d+)_(\d+|\[[\d,\-:%]+\])$")


def parse_slurm_array_id(text: str) -> tuple[str, list[int]] | None:
    """``123_4`` -> ("123", [4]); ``123_[5-9%2]`` -> ("123", [5, 6, 7, 8, 9]); None if not an array task id."""
    m = _SLURM_ARRAY_ID.match(text.strip())
    if not m:
        return None
    try:
        return m.group(1), expand_indices(m.group(2))
    except ValueError:
        return None


def _array_sacct_rows(text: str, array_id: str) -> tuple[dict[int, list[str]], dict[int, list[str]]] | None:
    """sacct rows of an array: (one task's rows, range rows) by index; None if a line cannot be parsed."""
    single: dict[int, list[str]] = {}
    ranged: dict[int, list[str]] = {}
    for line in text.splitlines():
        cells = line.split("|")
        if len(cells) != 7:
            if line.strip():
                return None
            continue
        parsed = parse_slurm_array_id(cells[0])
        if parsed is None or parsed[0] != array_id:
            continue
        target = single if re.fullmatch(r"\d+_\d+", cells[0].strip()) else ranged
        for i in parsed[1]:
            target[i] = cells
    return single, ranged


class SlurmArrays:
    """Job arrays for :class:`Slurm` (mixed in): ``sbatch --array=0-N%K``, per-task status from squeue, then sacct."""

    def array_submit_command(self, spec: SubmitSpec, size: int, max_running: int) -> Command:
        """sbatch with ``--array=0-(size-1)%max_running``; each task's output goes to ``task-<index>.out``."""
        if size < 1 or max_running < 1:
            raise ValueError("an array needs size >= 1 and max_running >= 1")
        out = _output_dir(spec.job_dir)
        return Command(["sbatch", "--parsable", f"--array=0-{size - 1}%{max_running}", f"--chdir={spec.job_dir}",
                        f"--output={out}/task-%a.out", f"--error={out}/task-%a.err", "--job-name", spec.job_name,
                        *spec.extra_args, spec.script_path])

    def array_squeue_command(self, array_id: str) -> Command:
        return Command(["squeue", "-h", "-t", "all", "-j", array_id, "-O", _ARRAY_FORMAT])

    def array_sacct_command(self, array_id: str) -> Command:
        return Command(["sacct", "-X", "-P", "-n", "-j", array_id, f"--format={_SACCT_FIELDS}"])

    def array_status_query(self, array_id: str, size: int) -> ArrayStatusQuery:
        res = yield self.array_squeue_command(array_id)
        found: dict[int, JobStatus] = {}
        if "Invalid job id specified" not in res.stderr:  # else: slurmctld forgot the whole array; ask sacct
            parsed = self.parse_array_squeue(res, array_id)
            if parsed is None:
                return array_statuses(size, {}, JobStatus(array_id, JobState.UNKNOWN, source="squeue",
                                                          reason=f"squeue failed: {stderr_tail(res)}"))
            found = parsed
        if all(i in found for i in range(size)):
            return {i: found[i] for i in range(size)}
        res = yield self.array_sacct_command(array_id)
        return self.parse_array_sacct(res, array_id, size, found)

    def parse_array_squeue(self, res: Result, array_id: str) -> dict[int, JobStatus] | None:
        """The tasks slurmctld holds, by index (a pending range gives each of its indices); None if it failed."""
        if not res.ok or _load_error(res):
            return None
        out: dict[int, JobStatus] = {}
        for line in res.stdout.splitlines():
            if _SEP not in line:
                continue
            cells = [c.strip() for c in line.split(_SEP)]
            if len(cells) != len(_ARRAY_FIELDS) + 1:
                return None
            parent, task, state, reason, nodes, batch, start, end, raw_exit = cells[:-1]
            if parent != array_id:
                continue
            try:
                indices = expand_indices(task)
            except ValueError:
                continue  # N/A: not an array (an id that is a plain job)
            for i in indices:
                st = _status(f"{array_id}_{i}", state, reason, "squeue")
                st.node = _node(batch) or _node(nodes)
                if st.native_state == "PENDING":
                    st.expected_start = _time(start)
                else:
                    st.start_time = _time(start)
                if st.state.terminal:
                    st.end_time = _time(end)
                    st.exit_code, st.signal = _exit_from_wait_status(raw_exit)
                out[i] = st
        return out

    def parse_array_sacct(self, res: Result, array_id: str, size: int,
                          found: dict[int, JobStatus]) -> dict[int, JobStatus]:
        """Tasks squeue did not show, from sacct (a row for one task wins over a range row); LOST if unknown."""
        text = f"{res.stderr}\n{res.stdout}"
        if "accounting storage is disabled" in text:
            return array_statuses(size, found, JobStatus(array_id, JobState.LOST, source="sacct", reason=(
                "not in the queue any more, and Slurm accounting is disabled")))
        rows = _array_sacct_rows(res.stdout, array_id) if res.ok and not re.search(r"\berror\b", res.stderr) \
            else None
        if rows is None:
            return array_statuses(size, found, JobStatus(array_id, JobState.UNKNOWN, source="sacct",
                                                         reason=f"sacct failed: {stderr_tail(res)}"))
        single, ranged = rows
        out = dict(found)
        for i in range(size):
            cells = single.get(i) or ranged.get(i)
            if i in out or cells is None:
                continue
            out[i] = _sacct_status(f"{array_id}_{i}", cells, "task")
        return array_statuses(size, out, JobStatus(array_id, JobState.LOST, source="sacct",
                                                   reason="neither squeue nor sacct knows this task"))

    def array_cancel_command(self, array_id: str) -> Command:
        """``scancel ID``: every task of the array that has not ended."""
        return Command(["scancel", array_id])


class Slurm(SlurmArrays, Scheduler):
    """Slurm through its command-line tools (tested against Slurm 22.05)."""

    name = "slurm"

    def submit_command(self, spec: SubmitSpec) -> Command:
        """``sbatch --parsable --chdir=DIR --output=DIR/job.out --error=DIR/job.err --job-name NAME SCRIPT``.

        A ``%`` in a path is doubled: sbatch reads ``%j``, ``%x`` and so on in ``--output`` as file-name patterns.
        """
        out = _output_dir(spec.job_dir)
        return Command(["sbatch", "--parsable", f"--chdir={spec.job_dir}", f"--output={out}/job.out",
                        f"--error={out}/job.err", "--job-name", spec.job_name, *spec.extra_args,
                        spec.script_path])

    def test_submit_command(self, spec: SubmitSpec) -> Command:
        """``sbatch --test-only``: Slurm checks the script's request (partition, GRES, limits) and says when it
        would start, without queuing a job (sbatch(1)); it exits non-zero for a request it would refuse."""
        cmd = self.submit_command(spec)
        return Command([cmd.argv[0], "--test-only", *cmd.argv[2:]])

    def parse_submit(self, result: Result) -> str:
        """The id from ``--parsable`` output (``123`` or ``123;cluster``, whose cluster part is dropped).

        We take the last line that is only an id, because site wrappers print extra lines
        (dask/dask-jobqueue#209). An id is accepted even with a non-zero exit code: the job then exists, and
        forgetting it would leave an orphan.
        """
        for line in reversed(result.stdout.strip().splitlines()):
            m = _ID_LINE.match(line.strip())
            if m:
                return m.group(1)
        if not result.ok:
            raise SubmitFailed(f"sbatch failed: {stderr_tail(result, 5)}",
                               hint="read the message above; `hpcseg submit --dry-run` shows the script")
        raise SubmitFailed(f"sbatch printed no job id: {result.stdout.strip()[-300:]!r}",
                           hint="a site wrapper may hide the id; check that `sbatch --parsable` prints it")

    def squeue_command(self, job_ids: Sequence[str] | None) -> Command:
        """The live-queue query for these ids, or with ``None``, for all of the user's jobs."""
        select = ["-j", ",".join(job_ids)] if job_ids is not None else ["-a", "--me"]
        return Command(["squeue", "-h", "-t", "all", *select, "-O", _FORMAT])

    def sacct_command(self, job_ids: Sequence[str]) -> Command:
        return Command(["sacct", "-X", "-P", "-n", "-j", ",".join(job_ids), f"--format={_SACCT_FIELDS}"])

    def status_query(self, job_ids: Sequence[str]) -> StatusQuery:
        ids = list(dict.fromkeys(job_ids))
        if not ids:
            return {}
        res = yield self.squeue_command(ids)
        invalid = "Invalid job id specified" in res.stderr
        if invalid and len(ids) > 1:  # should not happen (see module doc), but if it does: one unfiltered call
            res = yield self.squeue_command(None)
            invalid = False
        found = self.parse_squeue(res, ids) if not invalid else {}
        if found is None:
            return unknown_statuses(ids, f"squeue failed: {stderr_tail(res)}", "squeue")
        rest = [j for j in ids if j not in found]
        if not rest:
            return found
        res = yield self.sacct_command(rest)
        return {**found, **self.parse_sacct(res, rest)}

    def parse_squeue(self, res: Result, job_ids: Sequence[str]) -> dict[str, JobStatus] | None:
        """Statuses of the asked ids squeue shows, or None when the query failed or printed garbage."""
        if not res.ok or _load_error(res):
            return None
        wanted = set(job_ids)
        out: dict[str, JobStatus] = {}
        for line in res.stdout.splitlines():
            if _SEP not in line:
                continue  # a banner from a site wrapper, not a job line
            cells = line.split(_SEP)
            if len(cells) != len(_FIELDS) + 1 or not cells[0].strip():
                return None
            job_id, state, reason, nodes, batch, start, end, raw_exit = (c.strip() for c in cells[:-1])
            if job_id not in wanted:
                continue
            st = _status(job_id, state, reason, "squeue")
            st.node = _node(batch) or _node(nodes)
            if st.native_state == "PENDING":  # not SUSPENDED & co., whose StartTime is the real start
                st.expected_start = _time(start)
            else:
                st.start_time = _time(start)
            if st.state.terminal:
                st.end_time = _time(end)
                st.exit_code, st.signal = _exit_from_wait_status(raw_exit)
            out[job_id] = st
        return out

    def parse_sacct(self, res: Result, job_ids: Sequence[str]) -> dict[str, JobStatus]:
        """Statuses from sacct for ids that squeue (which answered) does not show.

        Ids sacct does not know are LOST, and so are ids it still calls active (see below). If sacct failed,
        they are UNKNOWN.
        """
        text = f"{res.stderr}\n{res.stdout}"
        if "accounting storage is disabled" in text:
            return {j: JobStatus(j, JobState.LOST, reason="not in the queue any more, and Slurm accounting is "
                                 "disabled: the job's exit-code file tells how it ended", source="sacct")
                    for j in job_ids}
        if not res.ok or re.search(r"\berror\b", res.stderr):
            return unknown_statuses(job_ids, f"sacct failed: {stderr_tail(res)}", "sacct")
        rows: dict[str, list[str]] = {}
        for line in res.stdout.splitlines():
            cells = line.split("|")
            if len(cells) != 7:
                if line.strip():
                    return unknown_statuses(job_ids, f"unparsable sacct line {line[:120]!r}", "sacct")
                continue
            rows[cells[0].strip()] = cells  # a reused id appears once per job; the last is the newest
        out = {}
        for job_id in job_ids:
            cells = rows.get(job_id)
            if cells is None:
                out[job_id] = JobStatus(job_id, JobState.LOST, reason="neither squeue nor sacct knows this job",
                                        source="sacct")
                continue
            out[job_id] = _sacct_status(job_id, cells, "job")
        return out

    def cancel_command(self, job_ids: Sequence[str]) -> Command:
        """``scancel ID...``. It exits 0 even for ids slurmctld does not know."""
        return Command(["scancel", *job_ids])

    def parse_cancel(self, result: Result, job_ids: Sequence[str]) -> None:
        """Jobs that are already gone or finishing count as cancelled; any other error raises."""
        if result.ok:
            return
        gone = ("Invalid job id specified", "already completing or completed", "Job/step already")
        errors = [ln for ln in result.stderr.splitlines() if ln.strip() and not any(g in ln for g in gone)]
        if errors or not result.stderr.strip():
            super().parse_cancel(result, job_ids)

    def check_commands(self, partition: str | None = None) -> list[tuple[str, Command]]:
        """sinfo and sbatch answer, and the partition exists. ``sinfo -p`` exits 0 for an unknown
        partition, so a little shell test checks that it printed the partition's name."""
        checks = [("Slurm client (sinfo)", Command(["sinfo", "--version"])),
                  ("sbatch", Command(["sbatch", "--version"]))]
        if partition:
            checks.append((f"partition {partition}", Command(
                ["sh", "-c", 'out=$(sinfo -h -p "$1" -o "%P %a, %D node(s), GRES %G, time limit %l") || exit; '
                 'if test -n "$out"; then printf "%s\\n" "$out"; else '
                 'echo "no partition $1; partitions here: $(sinfo -h -o %R | sort -u | tr "\\n" " ")" >&2; exit 1; fi',
                 "sh", partition])))
        return checks


"""PBS: qsub, qstat -f and qdel, for PBS Pro / OpenPBS (``pro``) and Torque (``torque``). No I/O here.

Two dialects, chosen with ``PBS(dialect=...)``:

- ``pro`` (PBS Pro, OpenPBS): ``qstat -x -f ID...``. With ``-x`` the one call shows live jobs and finished ones
  (``job_state = F``) while the server keeps history (``job_history_enable``). Without history a finished job
  is unknown to qstat, so it is LOST, and :mod:`hpcseg.jobs` reads the job's exit-code file.
- ``torque`` (Torque, and Slurm's ``slurm-wlm-torque`` wrapper on the test cluster): ``qstat -f ID...``.
  In Torque, ``-x`` means XML. Finished jobs show ``C`` for ``keep_completed`` seconds (in the wrapper, for
  Slurm's MinJobAge). The wrapper (``/usr/bin/qstat``, a Perl script) prints ``C`` for completed, cancelled,
  failed and timed-out jobs alike, with no exit status, so such a ``C`` is LOST with a reason that says so. It
  prints ``U`` for Slurm states it cannot name (out of memory, deadline), and no ``comment``. Its ``mtime`` is
  the start time and its ``ctime`` the end time (the expected end while it runs). A held job reads ``Q``. From
  a silent ``C`` we still tell TIMEOUT (it ran its whole walltime, ``ctime - mtime``) and CANCELLED (this
  object deleted it). Real output: ``tests/fixtures/torque/``.
- ``auto`` asks ``qstat --version`` once, before the first status query, and remembers the answer. PBS Pro
  prints ``pbs_version = 23.06.06``. Torque prints ``Version: 6.1.3``. The wrapper rejects the option (Getopt
  usage, exit 2). Ids with a ``.server`` suffix cannot decide it, because Torque prints them too.

We parse the text form of ``qstat -f``. Long values wrap at about 79 columns onto continuation lines that start
with a TAB and may split a word, so we unwrap them first. Attribute lines are indented with 4 spaces (Pro,
Torque) or with a TAB (the wrapper, which never wraps). ``-F json`` is not used: it is Pro-only and often
invalid (openpbs#1255, #2049), and it prints only the first of several ids.

Batching: one qstat call for all ids. Real PBS prints the jobs it knows, names each unknown one on stderr
(``qstat: Unknown Job Id 999.pbshost``) and exits 153. The wrapper leaves unknown ids out and exits 0, or 153
with no output when it knows none of them. An id that is neither printed nor named, after a call that failed,
is asked again on its own, but only when unknown ids made the call fail. Otherwise it is UNKNOWN.

Exit_status (https://help.altair.com/2022.1.0/PBS%20Professional/PBSAdminGuide2022.1.pdf, "Job Exit Status
Codes"): 0-255 is the script's exit code. Above 256 means killed by signal N = status - 256, so 271 is SIGTERM,
as after qdel. Negative values are PBS's own codes: -29 walltime, -27/-26 memory, -28 CPU time; the others mean
the job did not start.
"""

from __future__ import annotations

import posixpath
import re
from collections.abc import Sequence

from ..errors import ConfigError, SubmitFailed
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
    parse_ctime,
    stderr_tail,
    unknown_statuses,
)

_ACTIVE: dict[str, tuple[JobState, str]] = {
    "Q": (JobState.PENDING, ""),
    "H": (JobState.PENDING, "held"),
    "W": (JobState.PENDING, "waiting for its requested start time"),
    "T": (JobState.PENDING, "being moved to another queue"),
    "R": (JobState.RUNNING, ""),
    "B": (JobState.RUNNING, "array job has started"),
    "E": (JobState.COMPLETING, "exiting (staging out files)"),
    "S": (JobState.PENDING, "suspended"),
}
#: the states that differ by dialect; F, X (Pro) and C (Torque) are finished and judged by Exit_status
_PRO_ONLY = {"U": (JobState.PENDING, "suspended: the workstation is busy"),
             "M": (JobState.LOST, "moved to another PBS server")}
_TORQUE_ONLY = {"U": (JobState.LOST, "ended in a state the Torque wrapper cannot name (e.g. out of memory)")}
_FINISHED = {"pro": ("F", "X"), "torque": ("C",)}
_HOLDS = {"u": "held by you (release it with `qrls`)", "o": "held by an operator", "s": "held by the system",
          "p": "held: bad password", "a": "held"}
_NEG = {-29: (JobState.TIMEOUT, "walltime exceeded"), -28: (JobState.TIMEOUT, "CPU-time limit exceeded"),
        -27: (JobState.OUT_OF_MEMORY, "memory limit exceeded"), -26: (JobState.OUT_OF_MEMORY, "vmem limit exceeded"),
        -25: (JobState.FAILED, "used more CPUs than requested"), -24: (JobState.FAILED, "CPU burst limit exceeded")}
_ID_LINE = re.compile(r"^\d+(?:\[\d*\])?(?:\.[\w.-]+)?$")
_ATTR = re.compile(r"^(\s+)([A-Za-z_][\w.\-]*) = ?(.*)$")
_UNKNOWN = re.compile(r"Unknown Job Id(?: Error)?\s+(\S+)")
_FINISHED_NO_X = re.compile(r"qstat: (\S+) Job has finished")


def parse_full(text: str) -> dict[str, dict[str, str]]:
    """``qstat -f`` text as {job id: {attribute: value}}, continuation lines unwrapped."""
    jobs: dict[str, dict[str, str]] = {}
    cur: dict[str, str] | None = None
    indent = key = None
    for line in text.splitlines():
        if line.startswith("Job Id:"):
            cur, indent, key = {}, None, None
            jobs[line[len("Job Id:"):].strip()] = cur
            continue
        if cur is None or not line.strip():
            continue
        line = line.rstrip("\r")
        m = _ATTR.match(line)
        if m and indent in (None, m.group(1)):
            indent, key = m.group(1), m.group(2)
            cur[key] = m.group(3)
        elif key is not None:  # continuation: one TAB, then the rest of the value (maybe mid-word)
            # qstat wraps by column, so a space at the wrap point ends the line before: keep it
            cur[key] += line[1:] if line.startswith("\t") else line.strip()
    return {job: {k: v.rstrip() for k, v in attrs.items()} for job, attrs in jobs.items()}


def _get(attrs: dict[str, str], name: str) -> str:
    """Attribute by name, case-insensitively (Pro ``Exit_status``, Torque ``exit_status``)."""
    for k, v in attrs.items():
        if k.lower() == name.lower():
            return v
    return ""


def _seconds(hms: str) -> int | None:
    parts = hms.strip().split(":")
    if not parts or not all(p.isdigit() for p in parts):
        return None
    total = 0
    for p in parts:
        total = total * 60 + int(p)
    return total


def _seq(job_id: str) -> str:
    return job_id.split(".", 1)[0]


def _ended(exit_text: str, comment: str, attrs: dict[str, str]) -> tuple[JobState, str, int | None, int | None]:
    """(state, reason, exit code, signal) of a finished job from its Exit_status and comment."""
    low = comment.lower()
    try:
        code = int(exit_text)
    except ValueError:
        return JobState.CANCELLED, "deleted before it ran" + (f": {comment}" if comment else ""), None, None
    used = _seconds(_get(attrs, "resources_used.walltime"))
    limit = _seconds(_get(attrs, "Resource_List.walltime"))
    over_time = used is not None and limit is not None and used >= limit
    if "exceeded resource walltime" in low:
        return JobState.TIMEOUT, "walltime exceeded", None, None
    if code in _NEG:
        state, why = _NEG[code]
        return state, f"{why} (Exit_status {code})", None, None
    if code < 0:
        if over_time:
            return JobState.TIMEOUT, f"walltime exceeded (Exit_status {code})", None, None
        return JobState.FAILED, f"PBS could not start or run the job (Exit_status {code})", None, None
    if code > 256:
        sig = code - 256
        if over_time:
            return JobState.TIMEOUT, f"walltime exceeded, killed by signal {sig}", 128 + sig, sig
        if "terminated" in low or sig == 15:
            return JobState.CANCELLED, f"deleted (killed by signal {sig})", 128 + sig, sig
        return JobState.FAILED, f"killed by signal {sig}", 128 + sig, sig
    if code == 0:
        return JobState.COMPLETED, "", 0, None
    return JobState.FAILED, f"exited with code {code}", code, None


# -- job arrays (PBS Pro ``qsub -J``, Torque ``qsub -t``) ----------------------------------------------------------
# Ids as each prints them (real OpenPBS 23.06.06 recordings in tests/fixtures/pbspro/arrays/, their README lists
# the surprises): qsub prints the parent ``19[].pbshost``; subjobs are ``19[2].pbshost``. ``qstat 19`` (no
# brackets) is an unknown job (153). Subjob states: Q, R, ``X`` (done while the parent still runs), ``F`` once the
# parent is F. A qdel of the whole array rewrites the history of subjobs that had already ended: they read ``F``,
# ``Exit_status = 1``, comment ``Subjob finished``; after our own cancel we read that as CANCELLED. ``-J`` needs at
# least two indices (``-J 5`` is "illegal"), so an array of one is submitted as ``-J 0-1``: the batch worker of the
# spare task finds no work and exits. Torque prints ``12[].server`` and subjobs ``12[3].server`` (older versions
# ``12-3``). Slurm's Torque wrapper (the test cluster) turns ``-t`` into ``sbatch --array`` and prints the bare id
# (``31``); its qstat knows no ``-t`` ("Unknown option: t", exit 2) and shows the array as one job, so every task
# reads that one state there (tests/fixtures/torque/array_*.json).
_PBS_ARRAY_ID = re.compile(r"^(\d+)(?:\[(\d*)\]|-(\d+))(\.[\w.-]+)?$")


def parse_pbs_array_id(text: str) -> tuple[str, int | None] | None:
    """``12[].server`` -> ("12", None) (the array); ``12[3].server``, ``12[3]`` or ``12-3`` -> ("12", 3)."""
    m = _PBS_ARRAY_ID.match(text.strip())
    if not m:
        return None
    index = m.group(2) if m.group(2) is not None else m.group(3)
    return m.group(1), (int(index) if index else None)


class PBSArrays:
    """Job arrays for :class:`PBS` (mixed in): submit with ``-J`` (Pro) or ``-t`` (Torque), per-subjob status."""

    resolved: str | None
    _cancelled: set[str]

    @property
    def min_array_size(self) -> int:
        return 2 if self.resolved == "pro" else 1

    def array_submit_command(self, spec: SubmitSpec, size: int, max_running: int) -> Command:
        """``qsub -J 0-N%K`` (Pro) or ``qsub -t 0-N%K`` (Torque), from the job folder like :meth:`submit_command`."""
        if size < 1 or max_running < 1:
            raise ValueError("an array needs size >= 1 and max_running >= 1")
        size = max(size, self.min_array_size)
        flag = "-J" if self.resolved == "pro" else "-t"
        cmd = self.submit_command(spec)  # type: ignore[attr-defined]
        argv = list(cmd.argv)
        return Command([*argv[:-1], flag, f"0-{size - 1}%{max_running}", argv[-1]], cmd.stdin)

    def parse_array_submit(self, result: Result) -> str:
        """``19[].pbshost`` (Pro, Torque) or ``31`` (the wrapper): the last line that is an id."""
        for line in reversed(result.stdout.strip().splitlines()):
            if _ID_LINE.match(line.strip()):
                return line.strip()
        raise SubmitFailed(f"qsub failed: {stderr_tail(result, 5)}" if result.stderr.strip() or not result.ok
                           else f"qsub printed no array id: {result.stdout.strip()[-300:]!r}",
                           hint="read the message above; `hpcseg batch --dry-run` shows the script")

    def array_qstat_command(self, array_id: str, *, subjobs: bool = True) -> Command:
        history = ["-x"] if self.resolved == "pro" else []
        return Command(["qstat", *history, "-f", *(["-t"] if subjobs else []), array_id])

    def array_status_query(self, array_id: str, size: int) -> ArrayStatusQuery:
        size = max(size, self.min_array_size)
        if self.resolved is None:
            res = yield self.version_command()  # type: ignore[attr-defined]
            self.resolved = self.detect_dialect(res)  # type: ignore[attr-defined]
            if self.resolved is None:
                return array_statuses(size, {}, JobStatus(array_id, JobState.UNKNOWN, source="qstat",
                                                          reason=f"cannot tell the PBS flavour: {stderr_tail(res)}"))
        res = yield self.array_qstat_command(array_id)
        if self.resolved == "torque" and "Unknown option" in f"{res.stderr}{res.stdout}":
            res = yield self.array_qstat_command(array_id, subjobs=False)  # the wrapper: one state for all tasks
            return self.parse_array_qstat(res, array_id, size, whole=True)
        return self.parse_array_qstat(res, array_id, size)

    def parse_array_qstat(self, res: Result, array_id: str, size: int, *, whole: bool = False
                          ) -> dict[int, JobStatus]:
        """Per-index statuses from ``qstat -f -t`` (``whole``: the wrapper's one block stands for every task)."""
        source = "qstat-x" if self.resolved == "pro" else "qstat"
        blocks = parse_full(res.stdout)
        wrapper = "Job Id:\t" in res.stdout
        seq = (parse_pbs_array_id(array_id) or (_seq(array_id), None))[0]
        unknown = _UNKNOWN.search(res.stderr) or (res.exit_code == 153 and not res.stdout.strip())
        if not blocks:
            if unknown or (res.ok and not res.stdout.strip()):
                return array_statuses(size, {}, JobStatus(array_id, JobState.LOST, source=source,
                                                          reason="PBS no longer knows this array"))
            return array_statuses(size, {}, JobStatus(array_id, JobState.UNKNOWN, source=source,
                                                      reason=f"qstat failed: {stderr_tail(res)}"))
        found: dict[int, JobStatus] = {}
        parent: JobStatus | None = None
        for key, attrs in blocks.items():
            parsed = parse_pbs_array_id(key)
            if whole or (parsed is None and _seq(key) == seq):
                parent = self.status_from_attrs(array_id, attrs, source, wrapper=wrapper)  # type: ignore
                continue
            if parsed is None or parsed[0] != seq:
                continue
            if parsed[1] is None:
                parent = self.status_from_attrs(key, attrs, source, wrapper=wrapper)  # type: ignore
                continue
            st = self.status_from_attrs(key, attrs, source, wrapper=wrapper)  # type: ignore[attr-defined]
            if array_id in self._cancelled and _get(attrs, "comment") == "Subjob finished":
                st.state, st.reason, st.exit_code = JobState.CANCELLED, "the array was deleted", None
            found[parsed[1]] = st
        if whole and parent is not None:
            parent.reason = "; ".join(p for p in (parent.reason, "the whole array's state (this qstat shows no "
                                                  "tasks)") if p)
            return array_statuses(size, {}, parent)
        missing = JobStatus(array_id, JobState.LOST, source=source, reason="qstat does not list this subjob")
        if parent is not None and not parent.state.terminal:
            missing = JobStatus(array_id, JobState.UNKNOWN, source=source, reason=f"the array is {parent.state}")
        return array_statuses(size, found, missing)


class PBS(PBSArrays, Scheduler):
    """PBS Pro / OpenPBS and Torque (including Slurm's Torque wrapper) through qsub, qstat and qdel."""

    name = "pbs"

    def __init__(self, dialect: str = "auto") -> None:
        if dialect not in ("auto", "pro", "torque"):
            raise ConfigError(f"scheduler dialect {dialect!r} is not one of auto, pro, torque",
                              hint="set the profile's pbs dialect to auto, pro or torque")
        self.dialect = dialect
        #: the dialect in use: set at once, or by ``auto`` after the first ``qstat --version``
        self.resolved: str | None = None if dialect == "auto" else dialect
        #: ids this object deleted: the wrapper's ``C`` cannot tell a cancelled job from a finished one
        self._cancelled: set[str] = set()

    # -- submit ----------------------------------------------------------------------------------------------
    def submit_command(self, spec: SubmitSpec) -> Command:
        """``qsub -o DIR/job.out -e DIR/job.err -N NAME SCRIPT``.

        We give ``-o`` and ``-e`` on the command line because the Torque wrapper ignores ``#PBS -o/-e``. The
        script changes to its job folder itself, so ``-d``/``-w`` are not used: the wrapper knows neither, and
        PBS Pro has no such option. The name is cut to POSIX qsub's limit: 15 characters, the first a letter.
        The wrapper runs sbatch through a shell without quoting, so a path with a space breaks there.
        PBS Pro spools job.out on the node and copies it at the end; add ``-k oed`` (Pro 19 or later) to
        ``extra_args`` for a live log.
        """
        name = re.sub(r"[^A-Za-z0-9_.-]", "_", spec.job_name) or "hpcseg"
        if not name[0].isalpha():
            name = "j" + name
        # Slurm's Torque wrapper pastes its arguments unquoted into a /bin/sh command line, so a path with a
        # space or a shell character would break (or run). Submit from the job's folder with plain names instead.
        script = posixpath.relpath(spec.script_path, spec.job_dir) if spec.script_path.startswith(
            spec.job_dir.rstrip("/") + "/") else spec.script_path
        return Command(["sh", "-c", 'cd "$1" && shift && exec qsub "$@"', "sh", spec.job_dir,
                        "-o", "job.out", "-e", "job.err", "-N", name[:15], *spec.extra_args, script])

    def parse_submit(self, result: Result) -> str:
        """``123.server`` (PBS Pro, Torque) or ``123`` (the wrapper): the last line that is only an id."""
        for line in reversed(result.stdout.strip().splitlines()):
            if _ID_LINE.match(line.strip()):
                return line.strip()
        raise SubmitFailed(f"qsub failed: {stderr_tail(result, 5)}" if result.stderr.strip() or not result.ok
                           else f"qsub printed no job id: {result.stdout.strip()[-300:]!r}",
                           hint="read the message above; `hpcseg submit --dry-run` shows the script")

    # -- status ----------------------------------------------------------------------------------------------
    def version_command(self) -> Command:
        return Command(["qstat", "--version"])

    @staticmethod
    def detect_dialect(res: Result) -> str | None:
        """``pro``, ``torque`` or None (qstat missing, or we cannot reach the machine) from ``qstat --version``."""
        text = f"{res.stdout}\n{res.stderr}"
        if "pbs_version" in text:
            return "pro"
        if re.search(r"^Version:\s*\d", text, re.M) or "Unknown option" in text or "Usage:" in text:
            return "torque"
        return None

    def qstat_command(self, job_ids: Sequence[str]) -> Command:
        history = ["-x"] if self.resolved == "pro" else []
        return Command(["qstat", *history, "-f", *job_ids])

    def status_query(self, job_ids: Sequence[str]) -> StatusQuery:
        ids = list(dict.fromkeys(job_ids))
        if not ids:
            return {}
        if self.resolved is None:
            res = yield self.version_command()
            self.resolved = self.detect_dialect(res)
            if self.resolved is None:
                return unknown_statuses(ids, f"cannot tell the PBS flavour: {stderr_tail(res)}", "qstat")
        res = yield self.qstat_command(ids)
        statuses, retry = self.parse_qstat(res, ids)
        for job_id in retry:  # only after unknown ids upset a batched call (see the module doc)
            res = yield self.qstat_command([job_id])
            statuses.update(self.parse_qstat(res, [job_id])[0])
        return statuses

    def parse_qstat(self, res: Result, job_ids: Sequence[str]) -> tuple[dict[str, JobStatus], list[str]]:
        """Statuses for the ids this qstat answered, and the ids to ask again one by one."""
        source = "qstat-x" if self.resolved == "pro" else "qstat"
        blocks = parse_full(res.stdout)
        wrapper = "Job Id:\t" in res.stdout  # the wrapper's print_job_full; PBS and Torque print "Job Id: "
        by_seq = {_seq(k): k for k in blocks}
        unknown = {_seq(m) for m in _UNKNOWN.findall(res.stderr)}
        finished = {_seq(m) for m in _FINISHED_NO_X.findall(res.stderr)}
        odd = [ln for ln in res.stderr.splitlines() if ln.strip() and not _UNKNOWN.search(ln)
               and not _FINISHED_NO_X.search(ln) and "warning" not in ln.lower()]
        # exit 0: every id not printed is unknown (the wrapper leaves them out). The wrapper exits 153 with no
        # output at all when it knows none of them.
        complete = res.ok or (res.exit_code == 153 and not res.stdout.strip() and not odd and not unknown)
        out: dict[str, JobStatus] = {}
        retry: list[str] = []
        for job_id in job_ids:
            key = job_id if job_id in blocks else by_seq.get(_seq(job_id))
            if key is not None:
                out[job_id] = self.status_from_attrs(job_id, blocks[key], source, wrapper=wrapper)
            elif _seq(job_id) in finished:
                out[job_id] = JobStatus(job_id, JobState.LOST, native_state="F", source=source,
                                        reason="finished; its history needs `qstat -x`: use dialect 'pro'")
            elif (_seq(job_id) in unknown or complete) and job_id in self._cancelled:
                out[job_id] = JobStatus(job_id, JobState.CANCELLED, source=source,
                                        reason="deleted with qdel through hpcseg; PBS no longer lists it")
            elif _seq(job_id) in unknown or complete:
                out[job_id] = JobStatus(job_id, JobState.LOST, source=source,
                                        reason="PBS no longer knows this job (history expired or disabled)")
            elif unknown and not odd and len(job_ids) > 1:
                retry.append(job_id)
            else:
                out[job_id] = JobStatus(job_id, JobState.UNKNOWN, source=source,
                                        reason=f"qstat failed: {stderr_tail(res)}")
        return out, retry

    def status_from_attrs(self, job_id: str, attrs: dict[str, str], source: str = "qstat", *,
                          wrapper: bool = False) -> JobStatus:
        """One job's status from its ``qstat -f`` attributes (``wrapper``: printed by slurm-wlm-torque)."""
        dialect = self.resolved or "torque"
        native = _get(attrs, "job_state")
        comment = _get(attrs, "comment")
        st = JobStatus(job_id, JobState.UNKNOWN, native_state=native, source=source)
        exec_host = _get(attrs, "exec_host")
        st.node = re.split(r"[/+]", exec_host, maxsplit=1)[0] if exec_host and exec_host != "--" else ""
        st.start_time = parse_ctime(_get(attrs, "mtime") if wrapper else
                                    (_get(attrs, "stime") or _get(attrs, "start_time")))
        exit_text = _get(attrs, "Exit_status")
        if native in _FINISHED[dialect]:
            st.end_time = parse_ctime(_get(attrs, "ctime") if wrapper else
                                      (_get(attrs, "obittime") or _get(attrs, "comp_time")))
            if dialect == "torque" and not exit_text:
                st.state, st.reason = self._ended_silently(job_id, st, attrs)
            else:
                st.state, st.reason, st.exit_code, st.signal = _ended(exit_text, comment, attrs)
            return st
        table = {**_ACTIVE, **(_PRO_ONLY if dialect == "pro" else _TORQUE_ONLY)}
        st.state, phrase = table.get(native, (JobState.UNKNOWN, f"unrecognised PBS state {native!r}"))
        if native == "H":
            phrase = _HOLDS.get(_get(attrs, "Hold_Types")[:1], "held")
        if st.state is JobState.PENDING:
            st.expected_start = parse_ctime(_get(attrs, "estimated.start_time"))
            st.start_time = None
        if st.state is JobState.COMPLETING and exit_text.isdigit() and int(exit_text) <= 255:
            st.exit_code = int(exit_text)
        extra = ""
        if st.state is JobState.PENDING and not comment.startswith("Job run at"):
            extra = comment  # e.g. "Not Running: Not enough free nodes available"
        elif st.state is JobState.RUNNING and "terminated" in comment:
            extra = "being deleted"
        st.reason = "; ".join(p for p in (phrase, extra) if p)
        return st

    def _ended_silently(self, job_id: str, st: JobStatus, attrs: dict[str, str]) -> tuple[JobState, str]:
        """A ``C`` with no exit status (the wrapper). What we can still tell: it ran its whole walltime (Slurm
        kills at the limit), or we deleted it ourselves. Anything else is LOST: the exit-code file decides."""
        limit = _seconds(_get(attrs, "Resource_List.walltime"))
        if st.start_time and st.end_time and limit and (st.end_time - st.start_time).total_seconds() >= limit:
            return JobState.TIMEOUT, "ran for its whole walltime"
        if job_id in self._cancelled:
            return JobState.CANCELLED, "deleted with qdel through hpcseg"
        return JobState.LOST, "finished, but PBS does not say how: the job's exit-code file does"

    # -- cancel ----------------------------------------------------------------------------------------------
    def cancel_command(self, job_ids: Sequence[str]) -> Command:
        """``qdel ID...``. Note that the wrapper's qdel sends SIGKILL, so the job gets no graceful stop."""
        return Command(["qdel", *job_ids])

    def parse_cancel(self, result: Result, job_ids: Sequence[str]) -> None:
        """A job that is already gone counts as cancelled. Pro: unknown 153, finished 35. Torque: "invalid state
        for job - COMPLETE". The wrapper exits 1 with no message."""
        gone = ("Unknown Job Id", "Job has finished", "invalid state for job - COMPLETE", "already")
        lines = [ln for ln in (result.stdout + "\n" + result.stderr).splitlines() if ln.strip()]
        if not result.ok and any(not any(g in ln for g in gone) for ln in lines):
            super().parse_cancel(result, job_ids)
        self._cancelled.update(job_ids)

    def check_commands(self, partition: str | None = None) -> list[tuple[str, Command]]:
        """qsub and qstat exist, and the queue exists: ``qstat -Q QUEUE`` fails for an unknown queue, in both
        PBS and the wrapper."""
        checks = [("qsub", Command(["sh", "-c", "command -v qsub"])),
                  ("qstat", Command(["sh", "-c", "command -v qstat"]))]
        if partition:
            checks.append((f"queue {partition}", Command(
                ["sh", "-c", 'if out=$(qstat -Q "$1" 2>&1); then printf "%s\\n" "$out" | tail -n 1 | tr -s " "; '
                 'else rc=$?; echo "no queue $1 (qstat -Q: exit $rc${out:+, $(printf "%s" "$out" | head -n 1)}); '
                 'queues here: $(qstat -Q 2>/dev/null | awk "NR>2 {print \\$1}" | tr "\\n" " ")" >&2; exit 1; fi',
                 "sh", partition])))
        return checks

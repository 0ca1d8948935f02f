"""What every scheduler backend provides: build commands and parse their output, no I/O.

A backend never runs anything. It hands out :class:`Command` objects and parses :class:`~hpcseg.shell.Result`
objects; :mod:`hpcseg.jobs` runs them through a :class:`~hpcseg.shell.Shell`. Multi-step queries (live queue,
then history, then accounting) are written as *sans-IO generators*: ``status_query`` yields a Command, receives
its Result, and finally returns the statuses. :func:`drive` runs one against a shell; tests drive it with canned
results instead.

Example::

    statuses = drive(Slurm().status_query(["12", "13"]), shell)
    statuses["12"].state  # JobState.RUNNING

Polling lives in :mod:`hpcseg.jobs`; :func:`backoff_intervals` gives it the delays between polls.
"""

from __future__ import annotations

import enum
import re
from abc import ABC, abstractmethod
from collections.abc import Generator, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime

from ..errors import SchedulerError
from ..shell import Result, Shell


class JobState(str, enum.Enum):
    """The common job state. Terminal states are an allow-list (see :attr:`terminal`)."""

    PENDING = "pending"
    RUNNING = "running"
    COMPLETING = "completing"
    #: this client cancelled the job and the scheduler still shows it active (it is handling SIGTERM, cleaning
    #: up): set by :mod:`hpcseg.jobs`, never parsed from scheduler output; not reused as a server
    STOPPING = "stopping"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"
    TIMEOUT = "timeout"
    NODE_FAIL = "node_fail"
    OUT_OF_MEMORY = "out_of_memory"
    #: the job is over but the scheduler cannot say how: no source (queue, history, accounting) knows it any more,
    #: or (Torque wrapper of Slurm) it reports "finished" without an exit status. The caller resolves it from the
    #: exit-code file the job writes itself; the ``reason`` says which case it is.
    LOST = "lost"
    #: the query itself failed: keep the last known state and ask again; never read as finished
    UNKNOWN = "unknown"

    @property
    def terminal(self) -> bool:
        return self in _TERMINAL

    @property
    def active(self) -> bool:
        return self in (JobState.PENDING, JobState.RUNNING, JobState.COMPLETING, JobState.STOPPING)

    def __str__(self) -> str:
        return self.value


_TERMINAL = frozenset({JobState.COMPLETED, JobState.FAILED, JobState.CANCELLED, JobState.TIMEOUT,
                       JobState.NODE_FAIL, JobState.OUT_OF_MEMORY, JobState.LOST})


@dataclass
class JobStatus:
    """One job as the scheduler sees it.

    ``native_state`` is the scheduler's own word (``PENDING``, ``F``, ``S``); ``reason`` a phrase for the user
    (why it waits, how it ended), with the scheduler's code in parentheses where it has one. Times are naive
    datetimes in the cluster's local time, as the scheduler prints them. ``node`` is the host that runs the job
    script (the first of the job's nodes), ``localhost`` for the local backend.
    """

    job_id: str
    state: JobState
    native_state: str = ""
    reason: str = ""
    node: str = ""
    start_time: datetime | None = None
    expected_start: datetime | None = None
    end_time: datetime | None = None
    #: the job script's exit code as a shell reports it: 0-255, or 128+N when killed by signal N; None if unknown
    exit_code: int | None = None
    #: the signal that killed the job script, when the scheduler says so
    signal: int | None = None
    #: which query answered: squeue, scontrol, sacct, qstat, qstat-x, exit-code-file, ps, ...
    source: str = ""

    def to_dict(self) -> dict:
        d = asdict(self)
        d["state"] = self.state.value
        for k in ("start_time", "expected_start", "end_time"):
            d[k] = d[k].isoformat() if d[k] else None
        return d


@dataclass(frozen=True)
class Command:
    """A command to run on the login node (or locally): argv words, quoted when run remotely."""

    argv: tuple[str, ...]
    stdin: str | None = None

    def __init__(self, argv: Sequence[str], stdin: str | None = None) -> None:
        object.__setattr__(self, "argv", tuple(argv))
        object.__setattr__(self, "stdin", stdin)


@dataclass
class SubmitSpec:
    """What a submission needs beyond the rendered script (which carries the directives itself)."""

    script_path: str          # absolute path of the rendered script on the target machine
    job_dir: str              # absolute path of the job's folder; stdout/stderr go to job.out / job.err there
    job_name: str = "hpcseg"
    extra_args: list[str] = field(default_factory=list)


StatusQuery = Generator[Command, Result, dict[str, JobStatus]]
#: a job array's status: task index -> that task's status (see :meth:`Scheduler.array_status_query`)
ArrayStatusQuery = Generator[Command, Result, dict[int, JobStatus]]


class Scheduler(ABC):
    """A scheduler dialect: commands to build, output to parse."""

    #: profile value that selects this backend: slurm, pbs, local
    name: str = ""

    @abstractmethod
    def submit_command(self, spec: SubmitSpec) -> Command:
        """The command that submits ``spec.script_path``."""

    @abstractmethod
    def parse_submit(self, result: Result) -> str:
        """The job id from the submit command's result; raises SubmitFailed (with stderr) if none."""

    @abstractmethod
    def status_query(self, job_ids: Sequence[str]) -> StatusQuery:
        """Status of many jobs in as few calls as possible: live queue first, then history/accounting.

        Returns a status for every id asked: UNKNOWN when a query failed (never a guess), LOST when every
        source answered and none knows the job (the caller may still resolve it from the job's exit-code file).
        """

    @abstractmethod
    def cancel_command(self, job_ids: Sequence[str]) -> Command:
        """The command that cancels these jobs."""

    def parse_cancel(self, result: Result, job_ids: Sequence[str]) -> None:
        """Raise SchedulerError if the cancel failed for a reason other than the job being gone already."""
        if not result.ok:
            raise SchedulerError(f"cancelling {', '.join(job_ids)} failed: {stderr_tail(result)}",
                                 hint="check the job with the scheduler's own tools", retryable=True)

    def test_submit_command(self, spec: SubmitSpec) -> Command | None:
        """The scheduler's own dry run of a submission (nothing queued), or None where it has none."""
        return None

    def check_commands(self, partition: str | None = None) -> list[tuple[str, Command]]:
        """(what, command) pairs for ``hpcseg config check``: each command exits 0 when that part is fine."""
        return []

    # -- job arrays: one submission, ``size`` tasks numbered 0..size-1, at most ``max_running`` at a time --------
    def array_submit_command(self, spec: SubmitSpec, size: int, max_running: int) -> Command:
        """The command that submits ``spec.script_path`` as an array of ``size`` tasks."""
        raise SchedulerError(f"the {self.name} backend has no job arrays")

    def parse_array_submit(self, result: Result) -> str:
        """The array's id (what :meth:`array_status_query` and :meth:`array_cancel_command` take)."""
        return self.parse_submit(result)

    def array_status_query(self, array_id: str, size: int) -> ArrayStatusQuery:
        """Status of every task 0..size-1 of an array (sans-IO, like :meth:`status_query`).

        Every index gets a status: UNKNOWN when a query failed, LOST when every source answered and none knows it.
        """
        raise SchedulerError(f"the {self.name} backend has no job arrays")
        yield  # pragma: no cover  (makes this a generator)

    def array_cancel_command(self, array_id: str) -> Command:
        """The command that cancels every task of an array that has not ended."""
        return self.cancel_command([array_id])


def expand_indices(text: str) -> list[int]:
    """Task indices from a scheduler's range text: ``4``, ``[5-9]``, ``2-5%2``, ``1,3-4``, ``1-10:3`` (a step).

    ``%N`` (the limit on running tasks, Slurm and PBS Pro) is dropped. Raises ValueError for anything else.

    >>> expand_indices("[1,3-7:2%2]")
    [1, 3, 5, 7]
    """
    text = text.strip().removeprefix("[").removesuffix("]").split("%", 1)[0]
    out: list[int] = []
    for part in text.split(","):
        m = re.fullmatch(r"(\d+)(?:-(\d+)(?::(\d+))?)?", part.strip())
        if not m:
            raise ValueError(f"not a task index range: {text!r}")
        lo = int(m.group(1))
        hi = int(m.group(2)) if m.group(2) else lo
        out.extend(range(lo, hi + 1, int(m.group(3) or 1)))
    return out


def array_statuses(size: int, found: dict[int, JobStatus], missing: JobStatus) -> dict[int, JobStatus]:
    """A status for every index 0..size-1: what was found, else a copy of ``missing`` (named for its index)."""
    out = {}
    for i in range(size):
        st = found.get(i)
        if st is None:
            st = JobStatus(**{**missing.__dict__})
            st.job_id = f"{missing.job_id}[{i}]"
        out[i] = st
    return out


def unknown_statuses(job_ids: Sequence[str], reason: str, source: str) -> dict[str, JobStatus]:
    """UNKNOWN for every id: the query failed, so the caller keeps the last state and asks again."""
    return {j: JobStatus(j, JobState.UNKNOWN, reason=reason, source=source) for j in job_ids}


def stderr_tail(result: Result, lines: int = 2) -> str:
    """The last lines of a failed command's stderr (or stdout), joined for a reason or message."""
    text = (result.stderr.strip() or result.stdout.strip()).splitlines()
    return " / ".join(t.strip() for t in text[-lines:]) or f"exit code {result.exit_code}"


_MONTHS = {m: i for i, m in enumerate(
    ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"), 1)}
_CTIME = re.compile(r"^[A-Z][a-z]{2}\s+([A-Z][a-z]{2})\s+(\d{1,2})\s+(\d{1,2}):(\d{2}):(\d{2})\s+(\d{4})$")


def parse_ctime(text: str) -> datetime | None:
    """``Mon Nov  3 18:13:55 2026`` (C's ctime(3): PBS ``qstat -f``, Perl's ``localtime``, ``ps -o lstart``).

    Parsed by hand, not with ``strptime("%a %b")``, whose names follow the process locale (Slicer sets one).
    """
    m = _CTIME.match(text.strip())
    if not m or m.group(1) not in _MONTHS:
        return None
    mon, day, hh, mm, ss, year = m.groups()
    try:
        return datetime(int(year), _MONTHS[mon], int(day), int(hh), int(mm), int(ss))
    except ValueError:
        return None


def drive(query: StatusQuery, shell: Shell, timeout: float = 60) -> dict[str, JobStatus]:
    """Run a sans-IO status query against a shell and return its result."""
    try:
        cmd = next(query)
        while True:
            res = shell.run(list(cmd.argv), stdin=cmd.stdin, timeout=timeout)
            cmd = query.send(res)
    except StopIteration as stop:
        return stop.value


def backoff_intervals(start: float = 1.0, factor: float = 1.5, cap: float = 30.0) -> Iterator[float]:
    """Endless delays (seconds) between status polls: ``start``, then times ``factor`` each time, at most ``cap``.

    Pure (no sleeping, no clock): :mod:`hpcseg.jobs` sleeps them and restarts the generator when the state
    changes. Polling fast at first catches a job that starts at once; backing off spares a busy controller
    (Slurm's docs ask users not to poll squeue in tight loops).

    >>> from itertools import islice
    >>> [round(x, 2) for x in islice(backoff_intervals(1, 2, 5), 5)]
    [1, 2, 4, 5, 5]
    """
    if start <= 0 or factor < 1 or cap < start:
        raise ValueError("backoff_intervals needs start > 0, factor >= 1 and cap >= start")
    delay = start
    while True:
        yield delay
        delay = min(delay * factor, cap)

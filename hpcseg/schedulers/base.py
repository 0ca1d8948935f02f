"""What every scheduler backend provides: build commands and parse their output, no I/O.

A backend never runs anything. It hands out :class:`Command` objects and parses :class:`~hpcseg.shell.Result`
objects; :mod:`hpcseg.jobs` runs them through a :class:`~hpcseg.shell.Shell`. Multi-step queries (live queue,
then history, then accounting) are written as *sans-IO generators*: ``status_query`` yields a Command, receives
its Result, and finally returns the statuses. :func:`drive` runs one against a shell; tests drive it with canned
results instead.

Example::

    statuses = drive(Slurm().status_query(["12", "13"]), shell)
    statuses["12"].state  # JobState.RUNNING
"""

from __future__ import annotations

import enum
from abc import ABC, abstractmethod
from collections.abc import Generator, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime

from ..shell import Result, Shell


class JobState(str, enum.Enum):
    """The common job state. Terminal states are an allow-list (see :attr:`terminal`)."""

    PENDING = "pending"
    RUNNING = "running"
    COMPLETING = "completing"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"
    TIMEOUT = "timeout"
    NODE_FAIL = "node_fail"
    OUT_OF_MEMORY = "out_of_memory"
    #: no source (queue, history, accounting, exit-code file) knows the job any more
    LOST = "lost"
    #: the query itself failed: keep the last known state and ask again; never read as finished
    UNKNOWN = "unknown"

    @property
    def terminal(self) -> bool:
        return self in _TERMINAL

    @property
    def active(self) -> bool:
        return self in (JobState.PENDING, JobState.RUNNING, JobState.COMPLETING)

    def __str__(self) -> str:
        return self.value


_TERMINAL = frozenset({JobState.COMPLETED, JobState.FAILED, JobState.CANCELLED, JobState.TIMEOUT,
                       JobState.NODE_FAIL, JobState.OUT_OF_MEMORY, JobState.LOST})


@dataclass
class JobStatus:
    """One job as the scheduler sees it."""

    job_id: str
    state: JobState
    native_state: str = ""
    reason: str = ""
    node: str = ""
    start_time: datetime | None = None
    expected_start: datetime | None = None
    end_time: datetime | None = None
    exit_code: int | None = None
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

    def check_commands(self, partition: str | None = None) -> list[tuple[str, Command]]:
        """(what, command) pairs for ``hpcseg config check``: each command exits 0 when that part is fine."""
        return []


def drive(query: StatusQuery, shell: Shell, timeout: float = 60) -> dict[str, JobStatus]:
    """Run a sans-IO status query against a shell and return its result."""
    try:
        cmd = next(query)
        while True:
            res = shell.run(list(cmd.argv), stdin=cmd.stdin, timeout=timeout)
            cmd = query.send(res)
    except StopIteration as stop:
        return stop.value

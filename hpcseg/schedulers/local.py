"""local: the job script runs as a detached process on the shell's machine, with no scheduler.

This is the embedded default, for a workstation with its own GPU. With a LocalShell it runs on this computer.
Through an SSH shell it runs on a remote machine that has no scheduler. Like the other backends it only builds
commands and parses their output, and it needs a POSIX ``sh`` and ``ps`` (Linux, macOS).

- **submit**: a small ``sh`` script starts the job script in a new session, so it has its own process group
  and no controlling terminal, and it survives the caller exiting or a closed terminal (SIGHUP). It uses
  ``setsid``, or ``python3 -c 'os.setsid()'`` where ``setsid`` is missing (macOS). stdin is ``/dev/null``,
  stdout and stderr go to ``JOBDIR/job.out`` and ``job.err``. The job is started as a background job of a
  non-interactive ``sh``, so it is not a process-group leader, and ``setsid`` does not fork: ``$!`` is the job's
  pid, and the pid is also its session and process-group id. The script then prints that pid and the process
  start time from ``ps -o lstart=``.
- **job id**: ``local-<pid>-<start, YYYYmmddTHHMMSS local time>``, e.g. ``local-4242-20261123T181355``, or
  ``local-<pid>`` if the job ended before ``ps`` saw it.
- **status**: one ``ps -o pid=,stat=,lstart= -p PID1,PID2`` for all jobs. A pid that is gone, or a zombie,
  is LOST, and :mod:`hpcseg.jobs` reads the exit-code file the job writes (the job is not our child, so nobody
  can collect its exit status). A live pid whose start time is not the one in the id is another process that
  reuses the pid. It is LOST too.
- **cancel**: SIGTERM to the job's process group (``kill -TERM -PGID``). We leave out ``--`` because dash's
  builtin kill rejects it. The script first checks the start time again, so a reused pid is never signalled.

Limits of the pid-reuse check: ``lstart`` has one-second resolution, and ps computes it from the boot time. If
the wall clock is stepped by more than a second after submit (NTP after a long suspend), a live job reads as
LOST and cannot be cancelled through hpcseg. A pid reused within the same second as the job's start would not
be caught, but that needs the pid space to wrap in under a second.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from datetime import datetime

from ..errors import SchedulerError, SubmitFailed
from ..shell import Result
from .base import (
    ArrayStatusQuery,
    Command,
    JobState,
    JobStatus,
    Scheduler,
    StatusQuery,
    SubmitSpec,
    parse_ctime,
    stderr_tail,
    unknown_statuses,
)

_SUBMIT = r"""
dir=$1 script=$2
cd "$dir" || exit 1
if [ -x "$script" ]; then set -- "$script"; else set -- bash "$script"; fi
if command -v setsid >/dev/null 2>&1; then
  setsid "$@" </dev/null >"$dir/job.out" 2>"$dir/job.err" &
else
  python3 -c 'import os, sys; os.setsid(); os.execvp(sys.argv[1], sys.argv[1:])' "$@" \
    </dev/null >"$dir/job.out" 2>"$dir/job.err" &
fi
pid=$!
echo "$pid $(LC_ALL=C ps -o lstart= -p "$pid" 2>/dev/null)"
"""

#: An array: ``K`` lanes, each a detached process that runs its indices (lane, lane+K, ...) one after another with
#: ``HPCSEG_ARRAY_TASK_ID`` set. Prints one ``<pid> <lstart>`` line per lane.
_SUBMIT_ARRAY = r"""
dir=$1 size=$3 lanes=$4
export HPCSEG_ARRAY_SCRIPT=$2
cd "$dir" || exit 1
loop='i=$1; while [ "$i" -lt "$2" ]; do
  HPCSEG_ARRAY_TASK_ID=$i bash "$HPCSEG_ARRAY_SCRIPT" >"task-$i.out" 2>"task-$i.err"; i=$((i + $3)); done'
lane=0
while [ "$lane" -lt "$lanes" ]; do
  if command -v setsid >/dev/null 2>&1; then
    setsid sh -c "$loop" sh "$lane" "$size" "$lanes" </dev/null >/dev/null 2>&1 &
  else
    python3 -c 'import os, sys; os.setsid(); os.execvp("sh", ["sh", "-c"] + sys.argv[1:])' \
      "$loop" sh "$lane" "$size" "$lanes" </dev/null >/dev/null 2>&1 &
  fi
  pid=$!
  echo "$pid $(LC_ALL=C ps -o lstart= -p "$pid" 2>/dev/null)"
  lane=$((lane + 1))
done
"""

_CANCEL = r"""
status=0
for spec do
  pid=${spec%%=*} want=${spec#*=}
  now=$(LC_ALL=C ps -o lstart= -p "$pid" 2>/dev/null) || continue
  now=$(echo $now)
  if [ -n "$want" ] && [ "$now" != "$want" ]; then
    echo "hpcseg: pid $pid now belongs to another process (started $now, not $want): not signalled" >&2
    status=3
    continue
  fi
  kill -TERM "-$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null || true
done
exit $status
"""

_ID = re.compile(r"^(?:local-)?(\d+)(?:-(\d{8}T\d{6}))?$")
_STAMP = "%Y%m%dT%H%M%S"
_DAYS = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")
_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")


def parse_job_id(job_id: str) -> tuple[int, datetime | None] | None:
    """(pid, start time) from a local job id, or None if it is not one."""
    m = _ID.match(job_id.strip())
    if not m:
        return None
    start = datetime.strptime(m.group(2), _STAMP) if m.group(2) else None
    return int(m.group(1)), start


def _lstart(dt: datetime) -> str:
    """``ps -o lstart`` as the cancel script sees it once ``echo`` has squeezed the spaces."""
    return f"{_DAYS[dt.weekday()]} {_MONTHS[dt.month - 1]} {dt.day} {dt:%H:%M:%S} {dt.year}"


class Local(Scheduler):
    """Jobs as detached processes, on the machine the shell runs on."""

    name = "local"

    #: seconds of slack when we compare start times (ps rounds, and clock slews move lstart a little)
    start_tolerance = 1.0

    def submit_command(self, spec: SubmitSpec) -> Command:
        """``sh -c <start script> sh JOBDIR SCRIPT``. ``extra_args`` are scheduler options, so we ignore them."""
        return Command(["sh", "-c", _SUBMIT, "sh", spec.job_dir, spec.script_path])

    def parse_submit(self, result: Result) -> str:
        """``local-<pid>-<start>`` from the ``<pid> <lstart>`` line of the start script."""
        line = result.stdout.strip().splitlines()[-1] if result.stdout.strip() else ""
        pid, _, lstart = line.partition(" ")
        if not result.ok or not pid.isdigit():
            raise SubmitFailed(f"could not start the job script: {stderr_tail(result, 5)}",
                               hint="check that the job folder exists and the script is readable")
        start = parse_ctime(lstart)
        return f"local-{pid}-{start:{_STAMP}}" if start else f"local-{pid}"

    def ps_command(self, pids: Sequence[int]) -> Command:
        return Command(["env", "LC_ALL=C", "ps", "-o", "pid=,stat=,lstart=", "-p", ",".join(map(str, pids))])

    def status_query(self, job_ids: Sequence[str]) -> StatusQuery:
        ids = list(dict.fromkeys(job_ids))
        parsed = {j: parse_job_id(j) for j in ids}
        out = {j: JobStatus(j, JobState.LOST, reason="not a local job id", source="ps")
               for j, p in parsed.items() if p is None}
        good = {j: p for j, p in parsed.items() if p is not None}
        if not good:
            return out
        res = yield self.ps_command(sorted({p[0] for p in good.values()}))
        return {**out, **self.parse_ps(res, good)}

    def parse_ps(self, res: Result, jobs: dict[str, tuple[int, datetime | None]]) -> dict[str, JobStatus]:
        """Statuses from ``ps`` output. It exits 1 with no output when none of the pids exists."""
        if not res.ok and (res.exit_code != 1 or res.stdout.strip() or res.stderr.strip()):
            return unknown_statuses(list(jobs), f"ps failed: {stderr_tail(res)}", "ps")
        seen: dict[int, tuple[str, datetime | None]] = {}
        for line in res.stdout.splitlines():
            parts = line.split(None, 2)
            if len(parts) == 3 and parts[0].isdigit():
                seen[int(parts[0])] = (parts[1], parse_ctime(parts[2]))
            elif line.strip():
                return unknown_statuses(list(jobs), f"unparsable ps line {line[:120]!r}", "ps")
        out = {}
        for job_id, (pid, start) in jobs.items():
            st = JobStatus(job_id, JobState.LOST, node="localhost", start_time=start, source="ps")
            stat, now_start = seen.get(pid, ("", None))
            if not stat:
                st.reason = "the process has exited: its exit-code file tells how"
            elif stat.startswith("Z"):
                st.native_state, st.reason = stat, "the process has exited (zombie)"
            elif start and (now_start is None or abs((now_start - start).total_seconds()) > self.start_tolerance):
                st.reason = f"the job's process is gone; pid {pid} now belongs to a process started {now_start}"
            else:
                st.native_state, st.start_time = stat, start or now_start
                st.state = JobState.PENDING if stat.startswith("T") else JobState.RUNNING
                st.reason = "stopped (SIGSTOP)" if stat.startswith("T") else ""
            out[job_id] = st
        return out

    def cancel_command(self, job_ids: Sequence[str]) -> Command:
        """SIGTERM to each job's process group, after checking that its pid is still the job (see module doc)."""
        specs = []
        for job_id in job_ids:
            parsed = parse_job_id(job_id)
            if parsed is None:
                raise SchedulerError(f"{job_id!r} is not a local job id")
            pid, start = parsed
            specs.append(f"{pid}={_lstart(start) if start else ''}")
        return Command(["sh", "-c", _CANCEL, "sh", *specs])

    def parse_cancel(self, result: Result, job_ids: Sequence[str]) -> None:
        """Jobs already gone count as cancelled. A pid that now belongs to another process raises."""
        if result.exit_code == 3:
            raise SchedulerError(stderr_tail(result, 5), hint="the job has probably ended already")
        super().parse_cancel(result, job_ids)

    def check_commands(self, partition: str | None = None) -> list[tuple[str, Command]]:
        return [("setsid (or python3)", Command(["sh", "-c", "command -v setsid || command -v python3"])),
                ("ps", Command(["ps", "-o", "pid=", "-p", "1"]))]

    # -- arrays: K lanes of detached processes (see _SUBMIT_ARRAY); id ``local-array:<size>:<lane id>,<lane id>...``
    def array_submit_command(self, spec: SubmitSpec, size: int, max_running: int) -> Command:
        """Start ``min(size, max_running)`` lanes; lane n runs tasks n, n+K, ... in turn (``task-<i>.out``)."""
        if size < 1 or max_running < 1:
            raise ValueError("an array needs size >= 1 and max_running >= 1")
        return Command(["sh", "-c", _SUBMIT_ARRAY, "sh", spec.job_dir, spec.script_path, str(size),
                        str(min(size, max_running))])

    def parse_array_submit(self, result: Result) -> str:
        lanes = []
        for line in result.stdout.strip().splitlines():
            lanes.append(self.parse_submit(Result(result.command, result.exit_code, line, result.stderr)))
        if not lanes:
            self.parse_submit(result)  # raises with the reason
        return f"local-array:{len(lanes)}:{','.join(lanes)}"

    def array_status_query(self, array_id: str, size: int) -> ArrayStatusQuery:
        """A task reads RUNNING while its lane runs (queued behind its lane's earlier tasks too), else LOST: the
        task's own files tell how it ended."""
        lanes = array_id.split(":", 2)[2].split(",") if array_id.startswith("local-array:") else []
        statuses = yield from self.status_query(lanes) if lanes else iter(())  # type: ignore[misc]
        out = {}
        for i in range(size):
            lane = lanes[i % len(lanes)] if lanes else ""
            st = statuses.get(lane) if lanes else None
            st = JobStatus(f"{array_id}[{i}]", st.state, st.native_state, st.reason, st.node, st.start_time,
                           source="ps") if st else JobStatus(f"{array_id}[{i}]", JobState.LOST,
                                                             reason="not a local array id", source="ps")
            out[i] = st
        return out

    def array_cancel_command(self, array_id: str) -> Command:
        lanes = array_id.split(":", 2)[2].split(",") if array_id.startswith("local-array:") else [array_id]
        return self.cancel_command(lanes)

"""The shared pieces of hpcseg.schedulers.base: backoff, ctime parsing, statuses, drive()."""

from __future__ import annotations

from datetime import datetime
from itertools import islice

import pytest

from hpcseg.errors import SchedulerError
from hpcseg.schedulers import get_scheduler
from hpcseg.schedulers.base import (
    Command,
    JobState,
    JobStatus,
    backoff_intervals,
    drive,
    parse_ctime,
    unknown_statuses,
)

from .conversation import result


def test_backoff_grows_then_stays_at_the_cap():
    assert list(islice(backoff_intervals(), 10)) == pytest.approx(
        [1.0, 1.5, 2.25, 3.375, 5.0625, 7.59375, 11.390625, 17.0859375, 25.62890625, 30.0])
    assert list(islice(backoff_intervals(0.5, 2, 3), 4)) == [0.5, 1.0, 2.0, 3.0]
    assert list(islice(backoff_intervals(2, 1, 2), 3)) == [2, 2, 2]


@pytest.mark.parametrize("args", [(0, 1.5, 30), (1, 0.5, 30), (5, 1.5, 1)])
def test_backoff_rejects_nonsense(args):
    with pytest.raises(ValueError):
        next(backoff_intervals(*args))


def test_parse_ctime_forms():
    assert parse_ctime("Mon Nov 23 18:13:55 2026") == datetime(2026, 11, 23, 18, 13, 55)
    assert parse_ctime("Thu Sep  3 08:01:02 2026") == datetime(2026, 9, 3, 8, 1, 2)  # ctime pads the day
    assert parse_ctime("Mo Nov 23 18:13:55 2026") is None and parse_ctime("") is None
    assert parse_ctime("Mon Foo 23 18:13:55 2026") is None and parse_ctime("Mon Feb 30 18:13:55 2026") is None


def test_states_and_to_dict():
    assert JobState.LOST.terminal and not JobState.UNKNOWN.terminal and not JobState.UNKNOWN.active
    d = JobStatus("7", JobState.CANCELLED, exit_code=143, signal=15, end_time=datetime(2026, 1, 2, 3, 4, 5)).to_dict()
    assert d["state"] == "cancelled" and d["signal"] == 15 and d["end_time"] == "2026-01-02T03:04:05"
    assert unknown_statuses(["1", "2"], "why", "squeue")["2"].state is JobState.UNKNOWN


def test_default_parse_cancel_raises_on_failure_only():
    sched = get_scheduler("slurm")
    super(type(sched), sched).parse_cancel(result("", "", 0), ["1"])
    with pytest.raises(SchedulerError, match="boom"):
        super(type(sched), sched).parse_cancel(result("", "boom\n", 1), ["1"])


class _Shell:
    name = "fake"

    def __init__(self):
        self.calls = []

    def run(self, argv, *, stdin=None, timeout=60, env=None, check=False):
        self.calls.append((argv, stdin, timeout))
        return result(" ".join(argv))


def test_drive_runs_each_command_and_returns_the_value():
    def query():
        first = yield Command(["echo", "a"])
        second = yield Command(["echo", "b"], stdin="x")
        return {"1": JobStatus("1", JobState.RUNNING, reason=first.stdout + second.stdout)}

    shell = _Shell()
    assert drive(query(), shell, timeout=5)["1"].reason == "echo aecho b"
    assert shell.calls == [(["echo", "a"], None, 5), (["echo", "b"], "x", 5)]


def test_get_scheduler_builds_each_backend():
    assert [get_scheduler(n).name for n in ("slurm", "pbs", "local")] == ["slurm", "pbs", "local"]
    assert get_scheduler("pbs", dialect="pro").resolved == "pro"

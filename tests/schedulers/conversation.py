"""Drive a sans-IO status query through a scripted conversation: expected argv → canned Result.

Like invoke's MockContext and batchspawner's tests: each step names the command the backend must ask for and the
output it gets back. Outputs come from real recordings in ``tests/fixtures/`` wherever one exists; the few
synthetic ones (a dead controller, disabled accounting) say so where they are built.
"""

from __future__ import annotations

import json
import re
import shlex
from collections.abc import Sequence
from pathlib import Path

from hpcseg.schedulers.base import JobStatus, StatusQuery
from hpcseg.shell import Result

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"


def result(stdout: str = "", stderr: str = "", exit_code: int = 0, command: str = "canned") -> Result:
    return Result(command, exit_code, stdout, stderr)


def recorded(kind: str, name: str) -> Result:
    """A command recorded on the test cluster (``fixtures/slurm``, ``fixtures/torque``)."""
    data = json.loads((FIXTURES / kind / f"{name}.json").read_text())
    return Result(shlex.join(data["argv"]), data["exit_code"], data["stdout"], data["stderr"])


def pbspro(number: str) -> Result:
    """A recorded OpenPBS sample by its number: stdout, stderr, and the exit code from INDEX.txt."""
    folder = FIXTURES / "pbspro"
    out = next(folder.glob(f"{number}_*.out"), None)
    err = next(folder.glob(f"{number}_*.err"), None)
    stem = (out or err).name.rsplit(".", 1)[0]
    m = re.search(rf"rc=(-?\d+)\s+{re.escape(stem)}\s+::\s+(.*)", (folder / "INDEX.txt").read_text())
    assert m, f"{stem} is not in INDEX.txt"
    return Result(m.group(2).strip(), int(m.group(1)), out.read_text() if out else "",
                  err.read_text() if err else "")


def converse(query: StatusQuery, steps: Sequence[tuple[Sequence[str], Result]]) -> dict[str, JobStatus]:
    """Run ``query``, checking that it asks exactly for each step's argv, in order, and for nothing more."""
    asked: list[list[str]] = []
    try:
        cmd = next(query)
        for expected, res in steps:
            asked.append(list(cmd.argv))
            assert list(cmd.argv) == list(expected), f"step {len(asked)}: asked {cmd.argv}, expected {expected}"
            cmd = query.send(res)
        raise AssertionError(f"the query asked for more after {len(steps)} steps: {cmd.argv}")
    except StopIteration as stop:
        assert len(asked) == len(steps), f"the query stopped after {len(asked)} of {len(steps)} steps"
        return stop.value

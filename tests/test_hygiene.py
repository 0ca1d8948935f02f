"""Checks on the tests themselves: what a test may do to the shared machine, and tests that cannot fail."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_no_test_kills_processes_by_name():
    """Issue 13, point 14: `pkill -x slurmctld`, run "inside" the old namespace test cluster, killed every slurmctld
    on the machine. Tests and benchmarks stop what they started by its pid, or inside a node's container by its
    pid file (tests/cluster/node/node-daemon.sh)."""
    broad = re.compile(r"""(?:^|[\s"'\[(,;|&])(pkill|killall)(?:["'\s,]|$)""")
    offenders = []
    for folder in ("tests", "bench"):
        for path in sorted((ROOT / folder).rglob("*")):
            if path.suffix not in (".py", ".sh") or path == Path(__file__).resolve():
                continue
            for n, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
                if broad.search(line) and not line.lstrip().startswith("#"):
                    offenders.append(f"{path.relative_to(ROOT)}:{n}: {line.strip()}")
    assert offenders == [], "kill by pid, not by name:\n" + "\n".join(offenders)

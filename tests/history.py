"""A real older release of hpcseg, taken from this repository's own history (for version-skew tests)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def export_hpcseg(commit: str) -> bytes:
    """``git archive`` of the ``hpcseg`` package at ``commit`` (a tar). Skips, saying why, only when this checkout
    does not hold that commit (a shallow clone has no history to take an older release from)."""
    known = subprocess.run(["git", "-C", str(REPO), "cat-file", "-e", f"{commit}^{{commit}}"],
                           capture_output=True, timeout=30)
    if known.returncode != 0:
        pytest.skip(f"this checkout does not hold commit {commit} (a shallow clone?): the older-release test "
                    "exports hpcseg from it; clone with history to run it")
    return subprocess.run(["git", "-C", str(REPO), "archive", "--format=tar", commit, "hpcseg"],
                          capture_output=True, check=True, timeout=60).stdout

"""Fixtures for the template tests; the hostile values and helpers live in tpl_support.py."""

from __future__ import annotations

import shutil
import stat
from pathlib import Path

import pytest
from tpl_support import FAKE_RUNTIME

from hpcseg.templates import TemplateEngine


@pytest.fixture
def engine(tmp_path_factory) -> TemplateEngine:
    """The built-in templates only: an empty user dir, so the tester's own templates never interfere."""
    return TemplateEngine(user_dir=tmp_path_factory.mktemp("no-user-templates"))


@pytest.fixture
def fake_runtime_bin(tmp_path_factory) -> Path:
    """A folder with the FAKE `singularity` and `apptainer` (tests/templates/fake-singularity) for PATH."""
    d = tmp_path_factory.mktemp("fake-runtime-bin")
    for name in ("singularity", "apptainer"):
        shutil.copyfile(FAKE_RUNTIME, d / name)
        (d / name).chmod(stat.S_IRWXU)
    return d

"""HPCSegLib (the Slicer plugin's behaviour) imports as Slicer imports it: from the module's own folder."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

MODULE_DIR = Path(__file__).resolve().parents[2] / "slicer_plugin" / "HPCSeg"
if str(MODULE_DIR) not in sys.path:
    sys.path.insert(0, str(MODULE_DIR))


@pytest.fixture
def isolated(tmp_path, monkeypatch):
    """hpcseg's config, job list and work dir inside tmp_path (as tests/test_cli_local.py does)."""
    monkeypatch.setenv("HPCSEG_CONFIG", str(tmp_path / "cfg" / "config.toml"))
    monkeypatch.setenv("HPCSEG_STATE_DIR", str(tmp_path / "state"))
    monkeypatch.delenv("HPCSEG_PROFILE", raising=False)
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data"))
    return tmp_path


REPO = MODULE_DIR.parents[1]

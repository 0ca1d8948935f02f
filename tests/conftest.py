"""Session-wide fixtures: the real test cluster (tests/cluster/) and a proxy-free environment.

Subfolders add their own fixtures in their own conftest.py.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # so `tests.cluster.harness` imports under plain `pytest` as under `python -m pytest`
    sys.path.append(str(REPO))

from tests.cluster.harness import TestCluster, ensure_cluster  # noqa: E402

PROXY_VARS = ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "all_proxy")


@pytest.fixture(scope="session")
def cluster() -> TestCluster:
    """The real test cluster, started once per session. A test that needs it fails (never skips) with the
    reason when it cannot be started."""
    try:
        return ensure_cluster(REPO)
    except RuntimeError as e:
        pytest.fail(str(e), pytrace=False)


@pytest.fixture(autouse=True)
def keep_locale():
    """GDCM (SimpleITK's DICOM I/O) switches the process to the C locale; undo that after each test, so one
    test's DICOM cannot change how the next one encodes text."""
    import locale

    saved = locale.setlocale(locale.LC_ALL)
    yield
    locale.setlocale(locale.LC_ALL, saved)


@pytest.fixture(autouse=True)
def no_proxy_env(monkeypatch):
    """A proxy in the environment must not capture requests to tunnels on localhost."""
    for name in PROXY_VARS:
        monkeypatch.delenv(name, raising=False)

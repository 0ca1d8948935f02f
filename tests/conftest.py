"""Session-wide fixtures: the real test cluster (tests/cluster/, containers brought up by pytest-docker) and a
proxy-free environment.

Subfolders add their own fixtures in their own conftest.py.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # so `tests.cluster.harness` imports under plain `pytest` as under `python -m pytest`
    sys.path.append(str(REPO))

from tests.cluster.harness import TestCluster, ensure_cluster, prepare, run_as_user  # noqa: E402

PROXY_VARS = ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "all_proxy")


# ---- pytest-docker: the cluster's containers (tests/cluster/compose.yml) ------------------------------------------
@pytest.fixture(scope="session")
def docker_compose_command() -> str:
    return "/usr/bin/docker-compose --ansi never"  # Debian 12's docker-compose (the engine is Debian's docker.io)


@pytest.fixture(scope="session")
def docker_compose_file() -> str:
    """compose.yml, once prepare.sh made what it needs (packages, dockerd, the node image, state, the venv)."""
    try:
        prepare(REPO)
    except RuntimeError as e:
        pytest.fail(str(e), pytrace=False)
    return str(REPO / "tests" / "cluster" / "compose.yml")


@pytest.fixture(scope="session")
def docker_compose_project_name() -> str:
    return "hpcseg-testcluster"  # tests/cluster/lib.sh's PROJECT: the scripts act on the same containers


@pytest.fixture(scope="session")
def docker_setup() -> list[str]:
    return ["up -d"]  # Compose v1 has no --wait; check.sh waits (the `cluster` fixture)


@pytest.fixture(scope="session")
def docker_cleanup() -> list[str]:
    """The cluster stays up after a session: another pytest process (a second checkout, a benchmark) may be using
    the same containers, and pytest-docker's `down` would pull them from under it. tests/run.sh takes it down at
    the end (tests/cluster/down.sh: jobs cancelled first); HPCSEG_CLUSTER_DOWN=1 makes this session do it."""
    return ["down"] if os.environ.get("HPCSEG_CLUSTER_DOWN") == "1" else []


@pytest.fixture(scope="session")
def cluster(docker_services) -> TestCluster:
    """The real test cluster, started once per session. A test that needs it fails (never skips) with the
    reason when it cannot be started. Jobs still queued at the end are cancelled before the containers go."""
    try:
        c = ensure_cluster(REPO, started=True)
    except RuntimeError as e:
        pytest.fail(str(e), pytrace=False)
    yield c
    run_as_user(c, ["scancel", "-u", c.user], timeout=60)


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

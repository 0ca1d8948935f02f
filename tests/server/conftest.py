"""Fixtures for the server tests: tiny model folders, a phantom CT, and the real server in a subprocess."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import SimpleITK as sitk

from hpcseg.client import ServerClient
from hpcseg.phantoms import make_phantom

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
TOKEN = "test-token-" + "k" * 32


def write_model(root: Path, name: str, loader: str = "tinymodels:Threshold", *, version: str = "1.0",
                kind: str = "segmentation", labels: dict[str, int] | None = None, extra: dict | None = None) -> Path:
    """A model folder ``root/name`` whose manifest names a class of tests/server/tinymodels.py."""
    folder = root / name
    folder.mkdir(parents=True, exist_ok=True)
    manifest = {"name": name, "version": version, "type": kind, "labels": labels or {"body": 1, "bone": 2},
                "description": f"test model {name}", "loader": loader, "extra": extra or {}}
    (folder / "hpcseg-model.json").write_text(json.dumps(manifest))
    return folder


def standard_models(root: Path) -> Path:
    """thr (segmentation), grow (deepgrow), fam (versions + `current`), broken (fails to load), garbage (bad JSON)."""
    root.mkdir(parents=True, exist_ok=True)
    write_model(root, "thr")
    write_model(root, "grow", "tinymodels:Grow", kind="deepgrow", labels={"object": 1})
    write_model(root / "fam", "v1", version="1.0")
    (root / "fam" / "current").symlink_to("v1")
    write_model(root, "broken", extra={"fail_load": True})
    (root / "garbage").mkdir()
    (root / "garbage" / "hpcseg-model.json").write_text("{not json")
    return root


@pytest.fixture(scope="session", autouse=True)
def _tinymodels_importable():
    """In-process apps load ``tinymodels:...`` too (the server subprocess gets it on its PYTHONPATH)."""
    sys.path.insert(0, str(HERE))
    yield
    sys.path.remove(str(HERE))


@pytest.fixture(scope="session")
def phantom() -> sitk.Image:
    """A 64x64x48 CT phantom with a non-trivial geometry (origin, anisotropic spacing, oblique direction)."""
    image, _, _ = make_phantom(3, shape=(64, 64, 48), spacing=(0.8, 0.9, 2.5))
    image.SetOrigin((-12.5, 20.25, 7.0))
    c, s = 0.9950041652780258, 0.09983341664682815  # a 0.1 rad rotation about z
    image.SetDirection((c, -s, 0.0, s, c, 0.0, 0.0, 0.0, 1.0))
    return image


@dataclass
class ServerProcess:
    """A ``python -m hpcseg.server`` subprocess and what it wrote."""

    proc: subprocess.Popen
    conn_file: Path
    log_file: Path
    stderr_file: Path
    info: dict

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.info['port']}"

    @property
    def token(self) -> str:
        return self.info["token"]

    def client(self, **kw) -> ServerClient:
        return ServerClient(self.url, self.token, **kw)

    def logs(self) -> str:
        return self.log_file.read_text() + self.stderr_file.read_text()

    def stop(self, timeout: float = 15) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


def start_server(workdir: Path, models_dir: Path, *args: str, timeout: float = 60,
                 all_models: bool = True) -> ServerProcess:
    """Start the real server on 127.0.0.1, port 0, and wait for its connection file (written when the first model
    is ready) and, with ``all_models``, until every model has loaded or failed."""
    workdir.mkdir(parents=True, exist_ok=True)
    conn, log, err = workdir / "connection.json", workdir / "server.log", workdir / "stderr.txt"
    env = {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")}
    env["PYTHONPATH"] = os.pathsep.join([str(HERE), str(REPO), env.get("PYTHONPATH", "")])
    with open(err, "wb") as errf:
        proc = subprocess.Popen(
            [sys.executable, "-m", "hpcseg.server", "--no-builtin-models", "--models-dir", str(models_dir),
             "--connection-file", str(conn),
             "--host", "127.0.0.1", "--port", "0", "--device", "cpu", "--log-file", str(log), *args],
            stdout=subprocess.DEVNULL, stderr=errf, cwd=workdir, env=env)
    deadline = time.monotonic() + timeout
    while not conn.exists():
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}:\n{err.read_text()}")
        if time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"server not ready after {timeout} s:\n{err.read_text()}")
        time.sleep(0.05)
    srv = ServerProcess(proc, conn, log, err, json.loads(conn.read_text()))
    if all_models:
        with srv.client() as c:
            c.wait_ready(timeout=max(1.0, deadline - time.monotonic()), poll=0.1, all_models=True)
        while srv.info.get("loading") and time.monotonic() < deadline:  # written again once all have loaded
            time.sleep(0.05)
            srv.info = json.loads(conn.read_text())
    return srv


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> ServerProcess:
    """One real server for a test module, serving :func:`standard_models`."""
    root = tmp_path_factory.mktemp("srv")
    srv = start_server(root / "run", standard_models(root / "models"))
    yield srv
    srv.stop()


@pytest.fixture
def client(server):
    with server.client() as c:
        yield c


@contextlib.contextmanager
def running(workdir: Path, models_dir: Path, *args: str, all_models: bool = True):
    """A server for one test, always stopped."""
    srv = start_server(workdir, models_dir, *args, all_models=all_models)
    try:
        yield srv
    finally:
        srv.stop()

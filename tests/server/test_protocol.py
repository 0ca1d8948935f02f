"""Version skew: client and server agree on a protocol version at connect; an incompatible pair gives one line on
both sides. The old server here is real: hpcseg as it was before protocol versions (a commit of this repository,
exported with git archive), started as a process like any server."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest
import requests

from hpcseg.client import ServerClient
from hpcseg.errors import ServerError
from hpcseg.protocol import HEADER, PROTOCOL_VERSION
from tests.history import export_hpcseg

from .conftest import REPO

#: main before protocol versions existed (the commit this feature was built on)
PRE_PROTOCOL_COMMIT = "1dd9bb2"


def test_health_names_the_protocol_and_a_matching_client_connects(server):
    with server.client() as c:
        body = c.wait_ready(timeout=60)
        assert body["protocol"] == PROTOCOL_VERSION
        assert c.session.headers[HEADER] == str(PROTOCOL_VERSION)
        assert "thr" in c.info()["models"]


def test_a_client_of_another_protocol_gets_one_line_and_the_server_logs_one(server):
    r = requests.get(server.url + "/info/", headers={"Authorization": f"Bearer {server.token}", HEADER: "7"},
                     timeout=10)
    assert r.status_code == 426
    line = r.json()["detail"]
    assert "\n" not in line and f"speaks protocol {PROTOCOL_VERSION}" in line and "'7'" in line
    assert "upgrade the server image or venv" in line
    time.sleep(0.3)
    logged = [ln for ln in server.logs().splitlines() if "refused a request" in ln]
    assert logged and line in logged[-1] and "Traceback" not in server.logs()
    # the client side: the same line as a ServerError, not retried, no traceback
    with server.client() as c:
        c.session.headers[HEADER] = "0"
        with pytest.raises(ServerError) as exc:
            c.info()
        assert exc.value.status == 426 and "the client speaks '0'" in exc.value.message
        assert "upgrade the client" in exc.value.message
    # no token, no version: the token check comes first
    r = requests.get(server.url + "/info/", headers={HEADER: "7"}, timeout=10)
    assert r.status_code == 401


def test_requests_without_the_header_are_served_as_before(server):
    r = requests.get(server.url + "/info/", headers={"Authorization": f"Bearer {server.token}"}, timeout=10)
    assert r.status_code == 200  # MONAI Label's Slicer plugin sends no protocol header


@pytest.fixture(scope="module")
def old_hpcseg(tmp_path_factory):
    root = tmp_path_factory.mktemp("old-hpcseg")
    archive = export_hpcseg(PRE_PROTOCOL_COMMIT)
    subprocess.run(["tar", "-x", "-C", str(root)], input=archive, check=True, timeout=60)
    assert not (root / "hpcseg" / "protocol.py").exists()
    return root


def test_an_older_server_is_refused_with_one_line(tmp_path, old_hpcseg):
    models = tmp_path / "models"  # empty: the old server serves its own built-in models
    models.mkdir()
    conn, log = tmp_path / "connection.json", tmp_path / "server.log"
    env = {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")}
    env["PYTHONPATH"] = str(old_hpcseg)
    proc = subprocess.Popen([sys.executable, "-m", "hpcseg.server", "--models-dir",
                             str(models), "--connection-file", str(conn), "--host", "127.0.0.1", "--port", "0",
                             "--device", "cpu", "--log-file", str(log)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=tmp_path, env=env)
    try:
        deadline = time.monotonic() + 60
        while not conn.exists():
            assert proc.poll() is None and time.monotonic() < deadline, "old server did not start"
            time.sleep(0.05)
        info = json.loads(conn.read_text())
        with ServerClient(f"http://127.0.0.1:{info['port']}", info["token"]) as c:
            with pytest.raises(ServerError) as exc:
                c.wait_ready(timeout=60)
        msg = exc.value.message
        assert "\n" not in msg and "no protocol version (older)" in msg
        assert f"speaking protocol {PROTOCOL_VERSION}: upgrade the server image or venv" in msg
    finally:
        proc.terminate()
        proc.wait(15)


def test_python_m_hpcseg_protocol_prints_what_doctor_reads():
    out = subprocess.run([sys.executable, "-m", "hpcseg.protocol"], capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=60).stdout
    assert f'"protocol": {PROTOCOL_VERSION}' in out


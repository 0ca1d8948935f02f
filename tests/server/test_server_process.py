"""The real server: ``python -m hpcseg.server`` in a subprocess, spoken to over real HTTP by hpcseg's client."""

from __future__ import annotations

import json
import os
import signal
import socket
import stat
import threading
import time

import numpy as np
import pytest
import requests
import SimpleITK as sitk

from hpcseg import imaging
from hpcseg.client import ServerClient, Timeouts
from hpcseg.errors import ServerError

from .conftest import running, standard_models, write_model


def test_connection_file_is_private_complete_and_true(server):
    st = server.conn_file.stat()
    assert stat.S_IMODE(st.st_mode) == 0o600
    info = json.loads(server.conn_file.read_text())
    assert set(info) >= {"host", "port", "token", "pid", "started", "models", "version", "url"}
    assert info["pid"] == server.proc.pid and info["host"] == "127.0.0.1"
    assert info["url"] == f"http://127.0.0.1:{info['port']}" and info["port"] > 0
    assert set(info["models"]) == {"thr", "grow", "fam"} and set(info["failed"]) == {"broken", "garbage"}
    assert len(info["token"]) >= 40
    with socket.create_connection(("127.0.0.1", info["port"]), timeout=2):
        pass
    assert not list(server.conn_file.parent.glob(".connection.json*"))  # no temp file left behind


def test_token_is_not_in_argv_environment_or_logs(server, client, phantom):
    token = server.token.encode()
    cmdline = open(f"/proc/{server.proc.pid}/cmdline", "rb").read()
    assert b"hpcseg.server" in cmdline and token not in cmdline
    assert token not in open(f"/proc/{server.proc.pid}/environ", "rb").read()
    # requests that carry the token in a header, in a path prefix, in a form, plus a patient-like query
    client.segment(phantom, "thr")
    requests.get(f"{server.url}/token/{server.token}/info/?image=DOE%5EJOHN", timeout=5)
    requests.post(f"{server.url}/auth/token", data={"username": "u", "password": server.token}, timeout=5)
    requests.get(f"{server.url}/info/", headers={"Authorization": "Bearer wrong-" + server.token[6:]}, timeout=5)
    time.sleep(0.2)
    logs = server.logs()
    assert "GET /info/ 200" in logs and "POST /infer/thr 200" in logs  # requests are logged...
    assert server.token not in logs and server.token[6:] not in logs  # ...never the token
    assert "DOE" not in logs  # nor query strings


def test_broken_models_are_reported_while_the_others_serve(client, phantom):
    info = client.info()
    assert "corrupt" in info["failed"]["broken"] and "not valid JSON" in info["failed"]["garbage"]
    assert set(info["models"]) == {"thr", "grow", "fam"}
    assert info["models"]["thr"]["version"] == "1.0" and info["hpcseg"]["state"] == "ready"
    assert client.health()["ready"] is True
    assert client.segment(phantom, "thr").model_version == "1.0"
    with pytest.raises(ServerError) as err:
        client.segment(phantom, "broken")
    assert err.value.status == 503 and "failed to load" in err.value.message


@pytest.mark.parametrize("compression", ["zstd", "gzip"])
def test_segment_returns_the_mask_in_the_input_geometry(server, phantom, compression):
    ups, downs = [], []
    with server.client(compression=compression) as c:
        mask, names, version = c.segment(phantom, "thr", upload_progress=lambda d, t: ups.append((d, t)),
                                         download_progress=lambda d, t: downs.append((d, t)))
    assert names == {"body": 1, "bone": 2} and version == "1.0"
    for get in ("GetSize", "GetSpacing", "GetOrigin", "GetDirection"):
        assert getattr(mask, get)() == pytest.approx(getattr(phantom, get)(), abs=1e-6), get
    arr = sitk.GetArrayFromImage(phantom)
    assert np.array_equal(sitk.GetArrayFromImage(mask), np.where(arr > 300, 2, np.where(arr > -500, 1, 0)))
    assert ups[-1][0] == ups[-1][1] > 0 and downs[-1][0] == downs[-1][1] > 0


def test_a_click_sends_under_one_percent_of_the_image(client, phantom):
    raw = phantom.GetNumberOfPixels() * 2
    sid = client.create_session(phantom)
    created = client.get_session(sid)
    upload = created["upload_bytes"]
    res = client.click(sid, "grow", foreground=[[30, 30, 20]], background=[[33, 30, 20]])
    assert res.label_names == {"object": 1} and res.mask.GetSize() == phantom.GetSize()
    arr = sitk.GetArrayFromImage(res.mask)  # (z, y, x)
    assert arr[20, 30, 27] == 1 and arr[20, 30, 32] == 0 and arr.sum() > 0
    after = client.get_session(sid)
    click_bytes = after["last_request_bytes"]
    assert click_bytes == res.request_bytes and after["bytes_received"] == upload + click_bytes
    assert click_bytes < 0.01 * upload and click_bytes < 0.01 * raw
    print(f"\nclick: {click_bytes} B; upload {upload} B ({100 * click_bytes / upload:.2f} %); "
          f"raw image {raw} B ({100 * click_bytes / raw:.3f} %)")
    ep = client.extreme_points(sid, "grow", [[20, 30, 20], [40, 30, 20]])
    assert ep.request_bytes < 0.01 * upload
    client.delete_session(sid)
    with pytest.raises(ServerError) as err:
        client.click(sid, "grow", foreground=[[1, 1, 1]])
    assert err.value.status == 404 and "not found" in err.value.message and "upload" in err.value.hint
    client.delete_session(sid)  # already gone: fine by default
    with pytest.raises(ServerError):
        client.delete_session(sid, missing_ok=False)


def test_client_errors_are_sentences(server, phantom):
    with ServerClient(server.url, "not-the-" + server.token) as bad:
        with pytest.raises(ServerError) as err:
            bad.info()
    assert err.value.status == 401 and "token refused" in err.value.message and "hpcseg connect" in err.value.message
    with server.client() as c, pytest.raises(ServerError) as err:
        c.segment(phantom, "nope")
    assert err.value.status == 404 and "not served here" in err.value.message
    free = socket.socket()
    free.bind(("127.0.0.1", 0))
    port = free.getsockname()[1]
    free.close()
    with ServerClient(f"http://127.0.0.1:{port}", server.token, retries=1) as gone:
        with pytest.raises(ServerError) as err:
            gone.info()
    assert err.value.retryable and "went away" in err.value.message


def test_proxies_from_the_environment_are_ignored(server, monkeypatch):
    monkeypatch.setenv("HTTP_PROXY", "http://127.0.0.1:9")
    monkeypatch.setenv("http_proxy", "http://127.0.0.1:9")
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    with server.client() as c:
        assert "thr" in c.info()["models"]


def test_reload_serves_a_new_fine_tuned_version(server, client, phantom):
    models = server.conn_file.parent.parent / "models"
    write_model(models / "fam", "v2", version="2.0")
    (models / "fam" / "current").unlink()
    (models / "fam" / "current").symlink_to("v2")
    assert client.segment(phantom, "fam").model_version == "1.0"  # nothing changes before a reload
    info = client.reload()
    assert info["models"]["fam"]["version"] == "2.0"
    res = client.segment(phantom, "fam")
    assert res.model_version == "2.0" and res.params["model_version"] == "2.0"


def test_idle_timeout_ends_the_server_and_sessions_expire(tmp_path, phantom):
    models = tmp_path / "models"
    write_model(models, "grow", "tinymodels:Grow", kind="deepgrow", labels={"object": 1})
    with running(tmp_path / "run", models, "--idle-timeout", "3", "--session-ttl", "1") as srv:
        with srv.client() as c:
            sid = c.create_session(phantom)
            time.sleep(1.6)
            with pytest.raises(ServerError) as err:
                c.click(sid, "grow", foreground=[[3, 3, 3]])
        assert err.value.status == 410 and "expired" in err.value.message
        t0 = time.monotonic()
        assert srv.proc.wait(timeout=20) == 0
        assert 2 < time.monotonic() - t0 < 15
        assert not srv.conn_file.exists()
        assert "idle timeout" in srv.logs()


def test_sigterm_during_a_long_request_gives_a_clear_error_fast(tmp_path, phantom):
    models = tmp_path / "models"
    write_model(models, "thr")
    with running(tmp_path / "run", models) as srv:
        outcome: dict = {}

        def long_request() -> None:
            with srv.client(timeouts=Timeouts(infer=120)) as c:
                try:
                    c.segment(phantom, "thr", params={"sleep": 60})
                except ServerError as exc:
                    outcome["error"], outcome["at"] = exc, time.monotonic()

        t = threading.Thread(target=long_request)
        t.start()
        time.sleep(1.0)  # the request is in the model now
        sent = time.monotonic()
        os.kill(srv.proc.pid, signal.SIGTERM)
        t.join(timeout=15)
        assert not t.is_alive(), "the client hung"
        err = outcome["error"]
        assert outcome["at"] - sent < 5
        assert err.retryable and ("shutting down" in err.message or "went away" in err.message)
        assert srv.proc.wait(timeout=15) == 0
        assert not srv.conn_file.exists()
        assert "SIGTERM" in srv.logs()


def test_no_loadable_model_exits_3_without_a_connection_file(tmp_path):
    models = tmp_path / "models"
    write_model(models, "bad", extra={"fail_load": True})
    import subprocess
    import sys

    from .conftest import HERE, REPO

    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE), str(REPO)])}
    conn = tmp_path / "connection.json"
    res = subprocess.run([sys.executable, "-m", "hpcseg.server", "--no-builtin-models", "--models-dir", str(models),
                          "--connection-file",
                          str(conn), "--device", "cpu"], env=env, capture_output=True, text=True, timeout=60)
    assert res.returncode == 3 and not conn.exists()
    assert "no model could be loaded" in res.stderr and "corrupt" in res.stderr


def test_the_server_answers_once_its_first_model_is_ready_and_a_request_waits_for_one_still_loading(tmp_path,
                                                                                                      phantom):
    models = tmp_path / "models"
    write_model(models, "fast")
    write_model(models, "slow", extra={"load_seconds": 6})  # loads after "fast" (discovery order)
    with running(tmp_path / "run", models, all_models=False) as srv:
        assert srv.info["models"] == ["fast"] and srv.info["loading"] == ["slow"]
        with srv.client() as c:
            info = c.info()
            assert info["hpcseg"]["models"]["slow"]["state"] in ("pending", "loading") and info["loading"] == ["slow"]
            assert info["hpcseg"]["models"]["fast"]["state"] == "ready" and "fast" in info["models"]
            assert c.health()["ready"] is True and c.health()["loading"] is True
            t0 = time.monotonic()
            mask, names, version = c.segment(phantom, "slow")  # waits for the load instead of failing
            assert version == "1.0" and names == {"body": 1, "bone": 2} and time.monotonic() - t0 > 1
            assert c.info()["hpcseg"]["models"]["slow"]["state"] == "ready"
        deadline = time.monotonic() + 10
        while json.loads(srv.conn_file.read_text())["loading"] and time.monotonic() < deadline:
            time.sleep(0.1)
        final = json.loads(srv.conn_file.read_text())
        assert sorted(final["models"]) == ["fast", "slow"] and final["loading"] == []
        assert "still loading slow" in srv.logs() and "all models loaded" in srv.logs()


def test_a_request_for_a_model_still_loading_gives_up_after_model_wait(tmp_path, phantom):
    models = tmp_path / "models"
    write_model(models, "fast")
    write_model(models, "slow", extra={"load_seconds": 30})
    with running(tmp_path / "run", models, "--model-wait", "1", all_models=False) as srv, srv.client() as c:
        with pytest.raises(ServerError, match="still loading after 1 s"):
            c.segment(phantom, "slow")


def test_standard_models_helper_is_complete(tmp_path):
    root = standard_models(tmp_path / "m")
    assert sorted(p.name for p in root.iterdir()) == ["broken", "fam", "garbage", "grow", "thr"]
    assert imaging.CONTENT_TYPE_ZSTD

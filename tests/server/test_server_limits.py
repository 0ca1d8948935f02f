"""What a client can hold on the real server process, and work nobody waits for (hpcseg.server.guard).

A client that sends half a body and stalls, one that claims a huge body, connections that never send a request
with the token, a client that hangs up during a long inference, and a retried inference (same idempotency key)
that must not run twice. Real server subprocess, real sockets; the network model is the built-in phantom UNet
run with tiny windows so that an inference lasts long enough to be interrupted.
"""

from __future__ import annotations

import contextlib
import json
import re
import socket
import threading
import time
import uuid

import pytest
import requests

from hpcseg import imaging
from hpcseg.client import REQUEST_ID_HEADER, ServerClient
from hpcseg.phantoms import make_phantom
from hpcseg.server.models import builtin_models_dir

from .conftest import TOKEN, running, standard_models  # noqa: F401

LONG = {"roi_size": [16, 16, 16], "overlap": 0.9}  # ~20 000 windows: minutes, even with OpenVINO
SHORT = {"roi_size": [16, 16, 16], "overlap": 0.75}  # ~500 windows: seconds


def _wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} did not happen within {timeout} s")
        time.sleep(0.1)


def _infer_body(image, params: dict) -> tuple[bytes, str]:
    data = imaging.encode(image, imaging.CONTENT_TYPE_NIFTI)
    b = uuid.uuid4().hex
    body = (f'--{b}\r\nContent-Disposition: form-data; name="params"\r\n\r\n{json.dumps(params)}\r\n'
            f'--{b}\r\nContent-Disposition: form-data; name="file"; filename="image.nii.gz"\r\n'
            f"Content-Type: {imaging.CONTENT_TYPE_NIFTI}\r\n\r\n").encode() + data + f"\r\n--{b}--\r\n".encode()
    return body, f"multipart/form-data; boundary={b}"


def _raw_head(port: int, length: int, path: str = "/session/", token: str | None = None) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=30)
    auth = f"Authorization: Bearer {token}\r\n" if token else ""
    s.sendall(f"PUT {path} HTTP/1.1\r\nHost: x\r\n{auth}Content-Type: multipart/form-data; boundary=zz\r\n"
              f"Content-Length: {length}\r\n\r\n".encode())
    return s


def _read_status(s: socket.socket) -> int | None:
    """The status of the answer on ``s``, or None when the server closed without one."""
    data = b""
    try:
        while b"\r\n" not in data:
            chunk = s.recv(4096)
            if not chunk:
                break
            data += chunk
    except (ConnectionResetError, TimeoutError):
        pass
    m = re.match(rb"HTTP/1\.1 (\d+)", data)
    return int(m.group(1)) if m else None


def test_stalled_half_body_is_cut_at_its_deadline_others_served_and_idle_timeout_ends_the_job(tmp_path):
    models = standard_models(tmp_path / "models")
    with running(tmp_path / "run", models, "--body-grace", "2", "--idle-timeout", "4") as srv:
        s = _raw_head(srv.info["port"], 10_000_000, token=srv.token)
        s.sendall(b'--zz\r\nContent-Disposition: form-data; name="files"; filename="a.nii.gz"\r\n'
                  b"Content-Type: application/octet-stream\r\n\r\n" + b"x" * 1_000_000)  # a tenth, then nothing
        t0 = time.monotonic()
        with srv.client() as c:  # another client is served while the first one stalls
            assert "thr" in c.info()["models"]
        status = _read_status(s)
        waited = time.monotonic() - t0
        s.close()
        assert status == 408
        assert waited < 30, f"the stalled body held its request {waited:.0f} s (deadline: 2 s pause)"
        assert "the request body came too slowly" in srv.logs()
        # nothing else comes: the stalled request is no activity, so the idle timeout ends the server
        srv.proc.wait(60)
        assert srv.proc.returncode == 0
        assert "idle timeout" in srv.logs()


def test_a_body_larger_than_the_limit_is_refused_before_it_is_read(tmp_path):
    models = standard_models(tmp_path / "models")
    with running(tmp_path / "run", models, "--max-body-mb", "1") as srv:
        s = _raw_head(srv.info["port"], 50 << 20, token=srv.token)
        assert _read_status(s) == 413
        s.close()
        with srv.client() as c:
            assert c.info()["models"]


def test_connections_without_the_token_are_capped_and_timed_out(tmp_path):
    models = standard_models(tmp_path / "models")
    with running(tmp_path / "run", models, "--max-unauthenticated", "3", "--header-timeout", "2") as srv:
        port = srv.info["port"]
        idle = [socket.create_connection(("127.0.0.1", port), timeout=30) for _ in range(3)]
        extra = socket.create_connection(("127.0.0.1", port), timeout=30)
        assert extra.recv(1) == b"", "a 4th connection without a request was kept open"
        extra.close()
        for s in idle:  # closed after the header timeout: recv sees the end
            assert s.recv(1) == b""
            s.close()
        with srv.client() as c:  # a client with the token is served after them
            assert c.info()["models"]
        assert "no request with the token within 2 s" in srv.logs()


@pytest.fixture(scope="module")
def big_phantom():
    """A torso of adult size: phantom-unet runs on a 3 mm grid, where the 64x64x48 phantom is a few windows."""
    image, _, _ = make_phantom(3, shape=(256, 256, 100), spacing=(1.5, 1.5, 2.5), body_mm=330.0)
    return image


def _all_loaded(srv) -> None:
    _wait_for(lambda: "all models loaded" in srv.log_file.read_text(), 120, "loading every model")


def test_a_client_that_hangs_up_cancels_its_long_inference(tmp_path, big_phantom):
    """The client leaves after 3 s whatever the server is doing by then (reading the upload, preparing the image,
    in the windows): the inference stops at its next window (120 s is only a bound for "it happens at all")."""
    phantom = big_phantom
    with running(tmp_path / "run", builtin_models_dir()) as srv:
        _all_loaded(srv)
        body, ctype = _infer_body(phantom, LONG)
        url = f"{srv.url}/infer/phantom-unet?output=image"
        headers = {"Authorization": f"Bearer {srv.token}", "Content-Type": ctype}
        with pytest.raises(requests.ReadTimeout):  # the client gives up and closes its connection
            requests.post(url, data=body, headers=headers, timeout=(5, 3), proxies={"http": None})
        _wait_for(lambda: "cancelled after" in srv.logs(), 120, "the cancellation")
        logs = srv.logs()
        assert "the client disconnected" in logs
        assert re.search(r"infer phantom-unet: cancelled after (\d+) of (\d+) windows", logs)
        done, total = map(int, re.search(r"cancelled after (\d+) of (\d+) windows", logs).groups())
        assert done < total  # stopped before the end
        assert not re.search(r"infer phantom-unet v\S+: \d+x\d+x\d+ voxels", logs), "it ran to the end"
        with srv.client() as c:  # the GPU slot is free again
            assert c.segment(phantom, "phantom-unet", params={"roi_size": [64, 64, 48]}).mask is not None


def test_a_retried_inference_runs_once(tmp_path, big_phantom):
    phantom = big_phantom
    with running(tmp_path / "run", builtin_models_dir()) as srv:
        _all_loaded(srv)
        body, ctype = _infer_body(phantom, SHORT)
        key = uuid.uuid4().hex
        url = f"{srv.url}/infer/phantom-unet?output=image"
        headers = {"Authorization": f"Bearer {srv.token}", "Content-Type": ctype, REQUEST_ID_HEADER: key}
        # The first try loses its connection once its inference runs (GET /progress/{key} says so), not after a
        # fixed second: with OpenVINO the whole inference can end within that second, and then no try was lost.
        first = socket.create_connection(("127.0.0.1", srv.info["port"]), timeout=30)
        head = "".join(f"{k}: {v}\r\n" for k, v in {**headers, "Host": "x", "Content-Length": len(body)}.items())
        first.sendall(f"POST /infer/phantom-unet?output=image HTTP/1.1\r\n{head}\r\n".encode() + body)

        def running_or_done() -> bool:
            r = requests.get(f"{srv.url}/progress/{key}", headers={"Authorization": f"Bearer {srv.token}"},
                             timeout=30, proxies={"http": None})
            return r.status_code == 200 and (r.json()["done"] > 0 or r.json()["state"] != "running")

        _wait_for(running_or_done, 120, "the first try's inference")
        first.close()
        answers: list[requests.Response] = []
        retry = threading.Thread(target=lambda: answers.append(
            requests.post(url, data=body, headers=headers, timeout=(5, 600), proxies={"http": None})))
        retry.start()
        retry.join(600)
        assert answers and answers[0].status_code == 200
        again = requests.post(url, data=body, headers=headers, timeout=(5, 600), proxies={"http": None})
        assert again.status_code == 200 and again.content == answers[0].content  # from the finished result
        logs = srv.log_file.read_text()  # (logs() is the log file and stderr: every line twice)
        runs = re.findall(rf"infer phantom-unet v\S+ request={key[:8]}:", logs)
        assert len(runs) == 1, logs
        assert logs.count(f"request={key[:8]}: a retry, answered from its first run") == 2
        other_body, other_ctype = _infer_body(phantom, LONG)
        other = requests.post(url, data=other_body, proxies={"http": None}, timeout=30,
                              headers={**headers, "Content-Type": other_ctype})
        assert other.status_code == 409  # the same key for another request is refused


def test_a_late_copy_of_an_answered_request_is_refused_not_run_again(tmp_path):
    """The soak's case: bytes of a first try held back by a blackholed link reach the server when it heals, after
    the retry was answered and more requests than the server keeps answers for came in between."""
    small, _, _ = make_phantom(3, shape=(32, 32, 24))
    with running(tmp_path / "run", builtin_models_dir()) as srv:
        _all_loaded(srv)
        body, ctype = _infer_body(small, {})
        url = f"{srv.url}/infer/ct-body?output=image"
        auth = {"Authorization": f"Bearer {srv.token}", "Content-Type": ctype}

        def post(key: str) -> requests.Response:
            return requests.post(url, data=body, headers={**auth, REQUEST_ID_HEADER: key}, timeout=(5, 120),
                                 proxies={"http": None})

        key = uuid.uuid4().hex
        assert post(key).status_code == 200
        for _ in range(17):  # the server keeps the answers of the last 16 keyed requests
            assert post(uuid.uuid4().hex).status_code == 200
        late = post(key)
        assert late.status_code == 409 and "already answered" in late.json()["detail"], late.text
        logs = srv.log_file.read_text()
        assert len(re.findall(rf"infer ct-body v\S+ request={key[:8]}:", logs)) == 1, logs
        assert f"request={key[:8]}: a late copy of a request already answered; not run again" in logs


class _DroppingProxy:
    """A real TCP proxy in front of the server that drops the first inference's answer: it forwards the request,
    then closes the client's connection when the answer starts (as a lost SSH connection does)."""

    def __init__(self, upstream_port: int, on_drop=None) -> None:
        self.upstream = upstream_port
        self.on_drop = on_drop  # called when the answer is dropped, before the client's connection closes
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.dropped = 0
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        up = socket.create_connection(("127.0.0.1", self.upstream))
        drop = {"armed": False}

        def forward() -> None:
            try:
                while data := client.recv(1 << 16):
                    if b"POST /infer/" in data and not self.dropped:
                        drop["armed"] = True
                    up.sendall(data)
            except OSError:
                pass

        threading.Thread(target=forward, daemon=True).start()
        try:
            while data := up.recv(1 << 16):
                if drop["armed"]:
                    self.dropped += 1
                    if self.on_drop is not None:
                        self.on_drop()
                    break
                client.sendall(data)
        except OSError:
            pass
        for s in (client, up):  # shutdown, not only close: it wakes the other thread's recv and sends the FIN
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()

    def close(self) -> None:
        self.listener.close()


def _segment_losing_the_first_answer(srv, phantom, params: dict, on_drop=None) -> None:
    """``thr`` through a :class:`_DroppingProxy`: the first answer is lost, the client retries once and gets a mask."""
    proxy = _DroppingProxy(srv.info["port"], on_drop=on_drop)
    try:
        with ServerClient(f"http://127.0.0.1:{proxy.port}", srv.token) as c:
            res = c.segment(phantom, "thr", params=params)
            assert proxy.dropped == 1 and c.retried == 1
            assert res.mask.GetSize() == phantom.GetSize()
    finally:
        proxy.close()


def test_the_client_sends_a_lost_inference_once_more_and_the_server_runs_it_once(tmp_path, phantom):
    with running(tmp_path / "run", standard_models(tmp_path / "models")) as srv:
        _segment_losing_the_first_answer(srv, phantom, {"sleep": 1})
        logs = srv.log_file.read_text()
        assert len(re.findall(r"infer thr v\S+ request=\w+:", logs)) == 1, logs
        assert "a retry, answered from its first run" in logs


def test_a_lost_answer_the_server_no_longer_keeps_is_asked_for_again_under_a_new_id(tmp_path, phantom):
    """The first try's answer is lost, and 17 other keyed requests push it out of the server's kept answers before
    the retry comes: the server refuses the retry (409, already answered, never run twice under one id) and the
    client sends the request once more under a new id, so the user still gets the mask."""
    with running(tmp_path / "run", standard_models(tmp_path / "models")) as srv:
        body, ctype = _infer_body(phantom, {})
        others = {"Authorization": f"Bearer {srv.token}", "Content-Type": ctype}

        def push_out() -> None:
            for _ in range(17):
                r = requests.post(f"{srv.url}/infer/thr?output=image", data=body, timeout=60, proxies={"http": None},
                                  headers={**others, REQUEST_ID_HEADER: uuid.uuid4().hex})
                assert r.status_code == 200

        _segment_losing_the_first_answer(srv, phantom, {}, on_drop=push_out)
        logs = srv.log_file.read_text()
        assert len(re.findall(r"a late copy of a request already answered; not run again", logs)) == 1, logs
        assert len(re.findall(r"infer thr v\S+ request=\w+:", logs)) == 17 + 2  # the first try, then the new id

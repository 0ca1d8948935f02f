"""The worker process driven as the Slicer module drives it (HPCSegLib.worker.WorkerClient: call + pump on a
timer, images as files), against the real local server: connect, segment, clicks, upload, crash, quit."""

from __future__ import annotations

import json
import os
import stat
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from HPCSegLib.worker import WorkerClient, WorkerCrashed, WorkerError, stack_segments

from hpcseg.config import local_profile
from hpcseg.jobs import JobManager
from hpcseg.phantoms import make_phantom
from hpcseg.serverjobs import stop_servers
from hpcseg.worker.geometry import VolumeArray, ijk_to_ras

from .conftest import REPO


@pytest.fixture
def worker_env(isolated):
    """The worker sees this tree's hpcseg and the test's config/state (as Slicer's PythonSlicer would see its
    own site-packages and the user's config)."""
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_worker_segments_clicks_and_uploads_on_the_local_server(worker_env, isolated):
    profile = local_profile()
    image, truth_img, names = make_phantom(5, shape=(48, 48, 32))
    image.SetDirection((1, 0, 0, 0, -1, 0, 0, 0, 1))
    truth = sitk.GetArrayFromImage(truth_img)
    volume = VolumeArray.from_image(image, key="vtkMRMLScalarVolumeNode1:1234")
    client = WorkerClient("local", python=sys.executable, env=worker_env)
    progress: list[str] = []
    try:
        info = client.request("connect", {"timeout": 120}, on_progress=lambda m: progress.append(m["message"]))
        assert "ct-body" in info["models"]["segmentation"] and "deepgrow-regiongrow" in info["models"]["deepgrow"]
        assert progress and progress[-1].startswith("ready")
        folder = client.folder
        assert stat.S_IMODE(folder.stat().st_mode) == 0o700  # patients' images pass here
        pid = client.hello["pid"]

        spec = client.write_volume(volume.array, volume.ijk_to_ras, volume.key)
        phases: list[dict] = []
        seg = client.request("segment", {"volume": spec, "model": "ct-body"}, on_progress=phases.append)
        labels = client.read_labels(seg)
        assert {p["phase"] for p in phases} >= {"upload", "download"}  # the status line follows the phases
        assert all(p["done"] == p["total"] for p in phases if p is phases[-1])
        assert seg["label_names"] == {"body": 1, "lungs": 2, "bone": 3} and labels.shape == volume.array.shape
        assert not Path(seg["labels_path"]).exists()  # read once, then gone
        assert 2.0 * ((labels > 0) & (truth > 0)).sum() / ((labels > 0).sum() + (truth > 0).sum()) > 0.95

        liver = np.argwhere(truth == names["liver"])
        mtime = (folder / Path(spec["path"]).name).stat().st_mtime_ns
        for n in range(5):  # five clicks: the volume file is not written again, the image not sent again
            k, j, i = liver[(n + 1) * len(liver) // 7]
            spec = client.write_volume(volume.array, volume.ijk_to_ras, volume.key)
            res = client.request("click", {"volume": spec, "model": "deepgrow-regiongrow", "label": "liver",
                                           "foreground": ijk_to_ras([(i, j, k)], volume.ijk_to_ras).tolist()})
            obj = client.read_labels(res)
            assert res["label_names"] == {"liver": 1} and obj[k, j, i] == 1
            if n:
                assert res["request_bytes"] < 4000 < volume.array.nbytes
        assert (folder / Path(spec["path"]).name).stat().st_mtime_ns == mtime

        mask, seg_names = stack_segments({"body": labels == 1, "liver": obj == 1})
        up = client.request("upload", {"volume": spec, "labels_path": client.write_labels(mask), "names": seg_names,
                                       "dataset": "phantoms", "split": "val"})
        assert up["status"] == "uploaded" and up["split"] == "val"
        manifest = json.loads((Path(profile.datasets_path) / "phantoms" / "dataset.json").read_text())
        assert manifest["labels"] == {"0": "background", "1": "body", "4": "liver"}  # ct-body's value; next free

        status = client.request("poll")
        assert status["ready"] and status["text"].endswith("Server: ready") and status["severity"] == "ok"
        assert client.hello["pid"] == pid  # one worker served every call

        with pytest.raises(WorkerError) as err:  # hpcseg's sentence and hint come through
            client.request("upload", {"volume": spec, "labels_path": client.write_labels(mask), "names": seg_names,
                                      "dataset": "../etc"})
        assert "dataset name '../etc' is not allowed" in err.value.message and not err.value.details
    finally:
        client.quit()
        stop_servers(JobManager(profile))
    assert not folder.exists() and not client.running and not _alive(pid)


def test_a_killed_worker_is_reported_in_one_line_and_the_next_call_restarts_it(worker_env, isolated):
    profile = local_profile()
    crashes: list[str] = []
    client = WorkerClient("local", python=sys.executable, env=worker_env, on_crash=crashes.append)
    try:
        client.request("connect", {"timeout": 120})
        first = client.hello["pid"]
        errors: list[BaseException] = []
        call_id = client.call("poll", on_error=errors.append)
        client.kill()
        client.wait(call_id, timeout=10)
        assert len(errors) == 1 and isinstance(errors[0], WorkerCrashed), (errors, client.last_crash)
        line = str(errors[0])
        assert "\n" not in line and "was killed (SIGKILL)" in line and "starts again with the next action" in line
        assert crashes == [line]
        image, _, _ = make_phantom(2, shape=(40, 40, 24))
        volume = VolumeArray.from_image(image, key="v:1")
        # the next call starts a new worker, which reattaches to the running server (no second job)
        res = client.request("segment", {"volume": client.write_volume(volume.array, volume.ijk_to_ras, volume.key),
                                         "model": "ct-body"})
        assert client.hello["pid"] != first and client.read_labels(res).shape == volume.array.shape
        servers = [r for r in JobManager(profile).store.list("local") if r.template == "server"]
        assert len(servers) == 1, servers
    finally:
        client.quit()
        stop_servers(JobManager(profile))


def test_a_worker_that_cannot_start_says_why(worker_env, tmp_path):
    client = WorkerClient("local", python=str(tmp_path / "no-such-python"), env=worker_env)
    with pytest.raises(OSError):
        client.request("poll")
    client.python = sys.executable
    client.profile = "no-such-profile"
    with pytest.raises(WorkerCrashed, match="no-such-profile"):
        client.request("poll", timeout=60)
    client.quit()


def test_quit_ends_the_worker_at_once_even_mid_call(worker_env, isolated):
    client = WorkerClient("local", python=sys.executable, env=worker_env)
    errors: list[BaseException] = []
    call_id = client.call("connect", {"timeout": 120}, on_error=errors.append)
    deadline = time.monotonic() + 30
    while client.running and not client.hello and time.monotonic() < deadline:
        client.pump()
        time.sleep(0.01)
    pid = client.hello["pid"]
    client.quit()
    assert client.exit_code == 0 and not _alive(pid)  # ended by itself: the client kills only after 2 s
    assert call_id is not None and len(errors) == 1 and errors[0].cancelled  # no dialog for it
    stop_servers(JobManager(local_profile()))

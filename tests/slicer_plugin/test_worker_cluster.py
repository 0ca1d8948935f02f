"""The worker as the Slicer module drives it, against the real test cluster (sshd, Slurm, a server job reached
through an SSH tunnel): a segment, five clicks and an upload; the worker killed mid-upload; quit while queued."""

from __future__ import annotations

import json
import os
import posixpath
import sys
import time
import uuid

import numpy as np
import pytest
import SimpleITK as sitk
from HPCSegLib.worker import WorkerClient, WorkerCrashed, stack_segments

from hpcseg.config import load_config
from hpcseg.jobs import JobManager
from hpcseg.phantoms import make_phantom
from hpcseg.schedulers import JobState
from hpcseg.serverjobs import stop_servers
from hpcseg.ssh import SSHShell
from hpcseg.worker.geometry import VolumeArray, ijk_to_ras
from tests.integration.conftest import cluster_profile

from .conftest import REPO

pytestmark = [pytest.mark.cluster, pytest.mark.slow]


@pytest.fixture
def on_cluster(cluster, tmp_path, monkeypatch):
    """A profile for the test cluster saved in the config file the worker reads (as Application Settings saves
    it), this test's own state and known_hosts, and a worker environment that imports this tree's hpcseg."""
    for var, name in (("HPCSEG_CONFIG", "config.toml"), ("HPCSEG_STATE_DIR", "state"),
                      ("HPCSEG_KNOWN_HOSTS", "known_hosts"), ("HPCSEG_SSH_CONFIG", "ssh_config")):
        monkeypatch.setenv(var, str(tmp_path / name))

    def make(**overrides):
        prof = cluster_profile(cluster, "slurm", walltime="00:30:00", idle_timeout=300, **overrides)
        prof.name = f"slicer-{uuid.uuid4().hex[:6]}"
        cfg = load_config()
        cfg.set_profile(prof, make_default=True)
        cfg.save()
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
        return prof, WorkerClient(prof.name, python=sys.executable, env=env)

    return make


def _shell(cluster) -> SSHShell:
    return SSHShell(cluster.host, user=cluster.user, port=cluster.port, identity_file=cluster.key_path,
                    known_hosts=[cluster.known_hosts], interactive=False)


def _listing(sh: SSHShell, folder: str) -> list[str]:
    res = sh.run(f"ls -A {folder} 2>/dev/null || true")
    return sorted(res.stdout.split())


def test_segment_five_clicks_and_an_upload_through_the_worker(cluster, on_cluster):
    prof, client = on_cluster()
    image, truth_img, names = make_phantom(31, shape=(64, 64, 40))
    truth = sitk.GetArrayFromImage(truth_img)
    volume = VolumeArray.from_image(image, key="vtkMRMLScalarVolumeNode1:77")
    dataset = f"slicer-{uuid.uuid4().hex[:8]}"
    sh = _shell(cluster)
    try:
        info = client.request("connect", {"timeout": 300})
        assert info["url"].startswith("http://127.0.0.1:") and info["job_id"]  # through the tunnel
        pid = client.hello["pid"]
        spec = client.write_volume(volume.array, volume.ijk_to_ras, volume.key)
        seg = client.request("segment", {"volume": spec, "model": "phantom-unet"})
        labels = client.read_labels(seg)
        assert labels.shape == volume.array.shape and set(seg["label_names"]) == set(names)
        liver = np.argwhere(truth == names["liver"])
        for n in range(5):
            k, j, i = liver[(n + 1) * len(liver) // 7]
            spec = client.write_volume(volume.array, volume.ijk_to_ras, volume.key)
            res = client.request("click", {"volume": spec, "model": "deepgrow-regiongrow", "label": "liver",
                                           "foreground": ijk_to_ras([(i, j, k)], volume.ijk_to_ras).tolist()})
            assert client.read_labels(res)[k, j, i] == 1
            if n:  # the image went up with the first click only
                assert res["request_bytes"] < 4000
        mask, seg_names = stack_segments({"body": labels == seg["label_names"]["body"],
                                          "liver": labels == seg["label_names"]["liver"]})
        up = client.request("upload", {"volume": spec, "labels_path": client.write_labels(mask),
                                       "names": seg_names, "dataset": dataset, "split": "train"})
        assert up["status"] == "uploaded"
        root = posixpath.join(JobManager(prof, shell=sh).abs_path(prof.datasets_path), dataset)
        assert _listing(sh, root + "/imagesTr") == [f"{up['case_id']}.nii.gz"]
        manifest = json.loads(sh.read_text(root + "/dataset.json"))
        assert manifest["hpcseg"]["cases"][up["case_id"]]["split"] == "train"
        assert client.hello["pid"] == pid  # one worker, one SSH connection, for all of it
    finally:
        client.quit()
        stop_servers(JobManager(prof, shell=sh))
        sh.run(f"rm -rf {JobManager(prof, shell=sh).abs_path(prof.datasets_path)}/{dataset}")
        sh.close()


def test_worker_killed_mid_upload_leaves_no_partial_file_and_the_next_call_restarts_it(cluster, on_cluster):
    prof, client = on_cluster()
    rng = np.random.default_rng(7)
    array = rng.integers(-1000, 1500, size=(160, 256, 256), dtype=np.int16)  # noise: ~20 MB even compressed
    volume = VolumeArray(array, np.diag([0.8, 0.8, 1.5, 1.0]), key="big:1")
    mask, seg_names = stack_segments({"body": array > 0})
    dataset = f"slicer-{uuid.uuid4().hex[:8]}"
    sh = _shell(cluster)
    root = posixpath.join(JobManager(prof, shell=sh).abs_path(prof.datasets_path), dataset)
    try:
        # a dataset with one case already, so there is something a half-done upload could spoil
        small = VolumeArray(array[:8, :32, :32].copy(), volume.ijk_to_ras, key="small:1")
        small_mask, _ = stack_segments({"body": small.array > 0})
        first = client.request("upload", {"volume": client.write_volume(small.array, small.ijk_to_ras, small.key),
                                          "labels_path": client.write_labels(small_mask), "names": seg_names,
                                          "dataset": dataset})
        before = sh.read_text(root + "/dataset.json")
        seen: list[dict] = []

        def on_progress(msg: dict) -> None:
            seen.append(msg)
            if 0 < msg["done"] < msg["total"] and client.running:
                client.kill()  # as a crash would, in the middle of the copy

        with pytest.raises(WorkerCrashed, match="was killed .* during upload"):
            client.request("upload", {"volume": client.write_volume(array, volume.ijk_to_ras, volume.key),
                                      "labels_path": client.write_labels(mask), "names": seg_names,
                                      "dataset": dataset}, on_progress=on_progress)
        assert seen and seen[-1]["done"] < seen[-1]["total"]
        # nothing half-written in the dataset: its manifest and its two folders are as they were
        assert sh.read_text(root + "/dataset.json") == before
        assert _listing(sh, root + "/imagesTr") == [f"{first['case_id']}.nii.gz"]
        assert _listing(sh, root + "/labelsTr") == [f"{first['case_id']}.nii.gz"]
        assert all(n.startswith(".") and n.endswith(".part") or n.endswith("_image.nii.gz")
                   for n in _listing(sh, root + "/.incoming"))  # only temp names on the way in

        up = client.request("upload", {"volume": client.write_volume(array, volume.ijk_to_ras, volume.key),
                                       "labels_path": client.write_labels(mask), "names": seg_names,
                                       "dataset": dataset})
        assert up["status"] == "uploaded"
        assert _listing(sh, root + "/imagesTr") == sorted([f"{first['case_id']}.nii.gz", f"{up['case_id']}.nii.gz"])
        assert len(json.loads(sh.read_text(root + "/dataset.json"))["training"]
                   + json.loads(sh.read_text(root + "/dataset.json"))["validation"]) == 2
    finally:
        client.quit()
        sh.run(f"rm -rf {root}")
        sh.close()


def test_quit_while_the_server_job_is_queued_cancels_it_and_ends_the_worker(cluster, on_cluster):
    prof, client = on_cluster(extra_directives=["--begin=now+3600"])  # stays queued (BeginTime) for an hour
    jm = JobManager(prof, shell=_shell(cluster))
    progress: list[str] = []
    errors: list[BaseException] = []
    try:
        client.call("connect", {"timeout": 600}, on_progress=lambda m: progress.append(m["message"]),
                    on_error=errors.append)
        deadline = time.monotonic() + 120
        while not any(p.startswith("queued") for p in progress) and time.monotonic() < deadline:
            time.sleep(0.01)  # the module's timer
            client.pump()
            assert client.running, client.last_crash
        job_id = next(p.split()[-1] for p in progress if p.startswith("submitted server job"))
        assert jm.status([job_id])[job_id].state is JobState.PENDING
        pid = client.hello["pid"]
        client.quit()
        # it ended by itself (the client kills a worker only after 2 s: exit code 0 means it did not have to)
        assert client.exit_code == 0 and not _alive(pid)
        assert len(errors) == 1 and errors[0].cancelled  # the waiting Connect ends quietly
        deadline = time.monotonic() + 60  # scancel is immediate for a queued job; the scheduler may lag a moment
        while (state := jm.status([job_id])[job_id].state).active and time.monotonic() < deadline:
            time.sleep(0.5)
        assert state is JobState.CANCELLED
        assert jm.store.find(prof.name, job_id).extra.get("cancelled")
    finally:
        client.quit()
        stop_servers(jm)
        jm.shell.close()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True

"""Closing the loop on the real test cluster: validated uploads, fine-tuning jobs, new model versions served."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import SimpleITK as sitk

from hpcseg.datasets import DatasetUploader
from hpcseg.jobs import JobManager, JobStore
from hpcseg.phantoms import make_phantom
from hpcseg.schedulers import JobState
from hpcseg.server.models import ModelManifest, builtin_models_dir
from hpcseg.serverjobs import ServerConnection, stop_servers
from hpcseg.ssh import SSHShell

from .conftest import cluster_profile

pytestmark = [pytest.mark.cluster, pytest.mark.slow]

LABELS = {"body": 1, "lungs": 2, "bone": 3, "liver": 4}


def new_shell(cluster) -> SSHShell:
    return SSHShell(cluster.host, user=cluster.user, port=cluster.port, identity_file=cluster.key_path,
                    known_hosts=[cluster.known_hosts], interactive=False)


def phantom_pair(tmp, seed, shape=(48, 48, 32), **kw):
    image, labels, _ = make_phantom(seed, shape=shape, **kw)
    ip, mp = tmp / f"ct{seed}.nii.gz", tmp / f"seg{seed}.nii.gz"
    sitk.WriteImage(image, str(ip))
    sitk.WriteImage(labels, str(mp))
    return ip, mp


def unique_name(prefix: str) -> str:
    return f"{prefix}-{os.getpid()}-{int(time.time() * 1000) % 10**8}"


def test_killed_upload_leaves_nothing_and_rerun_completes(cluster, tmp_path):
    from tests.cluster.harness import link

    # An incompressible 32 MB image over a 100 Mbit/s link takes seconds: time enough to kill the upload midway.
    rng = np.random.default_rng(1)
    big = sitk.GetImageFromArray(rng.integers(-1000, 2000, size=(200, 256, 320), dtype=np.int16))
    seg = sitk.GetImageFromArray((sitk.GetArrayFromImage(big) > 1500).astype(np.uint8))
    seg.CopyInformation(big)
    ip, mp = tmp_path / "big.nii.gz", tmp_path / "bigseg.nii.gz"
    sitk.WriteImage(big, str(ip))
    sitk.WriteImage(seg, str(mp))
    name = unique_name("killed")
    env = {**os.environ, "HPCSEG_PROFILE": "c"}
    cfg = tmp_path / "config.toml"
    env["HPCSEG_CONFIG"] = str(cfg)
    prof = cluster_profile(cluster, "slurm")
    from hpcseg.config import Config

    c = Config(path=cfg)
    prof.name = "c"
    c.set_profile(prof)
    c.save()
    sh = new_shell(cluster)
    ds = f"{cluster.home}/.hpcseg/datasets/{name}"
    cmd = [sys.executable, "-m", "hpcseg.cli", "upload", str(ip), str(mp), "-d", name, "--labels", "x=1"]
    link(cluster, True)
    try:
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:  # wait until bytes are really on their way
            if sh.run(f"ls -a {ds}/.incoming 2>/dev/null | grep -q part").ok:
                break
            time.sleep(0.2)
        else:
            pytest.fail("the upload never started: " + proc.stderr.read().decode()[-500:])
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    finally:
        link(cluster, False)
    listing = sh.run(f"ls -A {ds}/imagesTr {ds}/labelsTr").stdout
    assert ".nii.gz" not in listing, listing  # nothing partial (or complete) reached the dataset
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    again = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert "skipped" in again.stdout
    man = json.loads(sh.read_text(f"{ds}/dataset.json"))
    assert len(man["training"] + man["validation"]) == 1
    sh.run(["rm", "-rf", ds])


def test_two_uploaders_in_parallel(cluster, tmp_path):
    name = unique_name("parallel")
    root = f"{cluster.home}/.hpcseg/datasets"
    pairs = [phantom_pair(tmp_path, s, shape=(24, 24, 16)) for s in range(22)]
    DatasetUploader(new_shell(cluster), root).upload(*pairs[0], dataset=name, labels=LABELS)
    errors: list[Exception] = []

    def worker(chunk):
        sh = new_shell(cluster)  # each uploader has its own connection, like two people
        try:
            for ip, mp in chunk:
                DatasetUploader(sh, root).upload(ip, mp, dataset=name)
        except Exception as exc:
            errors.append(exc)
        finally:
            sh.close()

    threads = [threading.Thread(target=worker, args=(pairs[1 + i::2],)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    sh = new_shell(cluster)
    man = json.loads(sh.read_text(f"{root}/{name}/dataset.json"))
    entries = man["training"] + man["validation"]
    assert len(entries) == 22 and len({e["image"] for e in entries}) == 22
    sums = dict(line.split()[::-1] for line in sh.run(
        f"cd {root}/{name} && sha256sum imagesTr/* labelsTr/*", check=True).stdout.splitlines())
    for case, prov in man["hpcseg"]["cases"].items():
        assert sums[f"imagesTr/{case}.nii.gz"] == prov["image_sha256"]
        assert sums[f"labelsTr/{case}.nii.gz"] == prov["label_sha256"]
    sh.run(["rm", "-rf", f"{root}/{name}"])


@pytest.mark.parametrize("sched", ["slurm", "pbs"])
def test_upload_finetune_serve_new_version(cluster, tmp_path, sched):
    """4 phantom pairs up, a short CPU fine-tune as a batch job, a new version with metrics, served next."""
    models_dir = f"~/hpcseg-loop-{sched}-{os.getpid()}/models"
    jm = JobManager(cluster_profile(cluster, sched, models_dir=models_dir, walltime="00:20:00", cpus=2),
                    shell=new_shell(cluster), store=JobStore(tmp_path / "jobs.json"))
    name = unique_name(f"loop-{sched}")
    up = DatasetUploader(jm.shell, jm.abs_path(jm.profile.datasets_path))
    for seed in (11, 12, 13, 14):
        # adult-size torsos on a coarse grid: what phantom-unet is trained on, small on the wire
        ip, mp = phantom_pair(tmp_path, seed, shape=(112, 112, 48), spacing=(3.0, 3.0, 3.5), body_mm=330.0)
        assert up.upload(ip, mp, dataset=name, labels=LABELS, model_version="phantom-unet 1.0.0",
                         split="val" if seed == 14 else "train").status == "uploaded"
    rec = jm.submit("finetune", {"model": "phantom-unet", "epochs": 2, "force": True,
                                 "dataset": f"{jm.abs_path(jm.profile.datasets_path)}/{name}"})
    st = jm.wait(rec.job_id, lambda s: s.state.terminal, timeout=900)
    log = jm.logs(rec.job_id).get("job.out", "")
    assert st.state is JobState.COMPLETED, log[-3000:]
    assert "epoch 2/2" in log and "promoted" in log
    # one validation case: the gate warns, and only --force promotes; the per-label table is in the job's log
    assert "warning: only 1 validation case" in log and "forced despite: too few validation cases" in log
    assert "reference  liver" in log and "validation body" in log
    root = jm.abs_path(models_dir)
    new = str(int(ModelManifest.load(builtin_models_dir() / "phantom-unet").version.split(".")[0]) + 1)
    assert jm.shell.run(["readlink", f"{root}/phantom-unet/current"]).stdout.strip() == new
    metrics = json.loads(jm.shell.read_text(f"{root}/phantom-unet/{new}/metrics.json"))
    assert set(metrics["val_dice"]) == set(LABELS)
    if sched == "slurm":
        with ServerConnection(jm.profile, jobs=jm, timeout=300) as conn:
            image, _, _ = make_phantom(99, shape=(96, 96, 40), spacing=(3.5, 3.5, 4.0), body_mm=320.0)
            res = conn.client.segment(image, model="phantom-unet")
            assert res.model_version == new
        stop_servers(jm)
    jm.shell.run(["rm", "-rf", root.rsplit("/", 1)[0], f"{jm.abs_path(jm.profile.datasets_path)}/{name}"])


def test_failed_training_leaves_current_and_says_why(cluster, tmp_path):
    models_dir = f"~/hpcseg-fail-{os.getpid()}/models"
    jm = JobManager(cluster_profile(cluster, "slurm", models_dir=models_dir),
                    shell=new_shell(cluster), store=JobStore(tmp_path / "jobs.json"))
    root = jm.abs_path(models_dir)
    jm.shell.run(f"mkdir -p {root}/phantom-unet", check=True)
    rec = jm.submit("finetune", {"model": "phantom-unet", "epochs": 1, "dataset": f"{root}/no-such-dataset"})
    st = jm.wait(rec.job_id, lambda s: s.state.terminal, timeout=600)
    assert st.state is JobState.FAILED
    log = jm.logs(rec.job_id)
    assert "training failed, current version untouched" in log.get("job.out", "")
    assert not jm.shell.run(["test", "-e", f"{root}/phantom-unet/current"]).ok
    jm.shell.run(["rm", "-rf", root.rsplit("/", 1)[0]])

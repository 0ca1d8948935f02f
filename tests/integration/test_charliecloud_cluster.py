"""hpcseg's real image on the test cluster: Charliecloud's ``ch-run`` runs the server and a fine-tune job inside the
image built from ``singularity/hpcseg-server.def`` (its OCI twin, by Docker; ``tests/cluster/image.sh``), on the
compute node, as the unprivileged test user, through Slurm and through the PBS commands, driven by the CLI.

No fake here: the image is the one a site would turn into a ``.sif``, converted to a Charliecloud directory image
on the cluster's shared software tree; the cluster's own venv plays no part in these jobs (``python = "python3"``
is the image's interpreter).
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from click.testing import CliRunner

from hpcseg.cli import main
from hpcseg.phantoms import make_phantom
from hpcseg.server.models import ModelManifest, builtin_models_dir
from tests.cluster.harness import host_pid, run_as_user

pytestmark = [pytest.mark.cluster, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
LABELS = {"body": 1, "lungs": 2, "bone": 3, "liver": 4}


@pytest.fixture(scope="session")
def ch_image(cluster) -> str:
    """The directory image, built (or found up to date) by tests/cluster/image.sh."""
    res = subprocess.run(["bash", str(REPO / "tests/cluster/image.sh"), str(REPO)], capture_output=True,
                         text=True, timeout=3600)
    if res.returncode != 0:
        pytest.fail(f"tests/cluster/image.sh failed:\n{res.stderr[-4000:]}")
    return res.stdout.strip().splitlines()[-1]


def dice(a: np.ndarray, b: np.ndarray) -> float:
    s = a.sum() + b.sum()
    return 1.0 if s == 0 else 2.0 * np.logical_and(a, b).sum() / s


def make_cli(cluster, image: str, scheduler: str, **extra: str):
    runner = CliRunner()

    def run(*args, ok=True):
        res = runner.invoke(main, ["-p", f"ch-{scheduler}", *args], catch_exceptions=False)
        if ok:
            assert res.exit_code == 0, res.output
        return res

    settings = {"user": cluster.user, "identity_file": cluster.key_path, "known_hosts": cluster.known_hosts,
                "partition": cluster.partition, "container_runtime": "charliecloud", "image": image,
                "python": "python3", "cpus": "1", "memory": "1G", "walltime": "00:20:00", "device": "cpu",
                "idle_timeout": "300", "pbs_dialect": "torque", **extra}
    args = ["config", "init", "--host", cluster.host, "--scheduler", scheduler]
    for k, v in settings.items():
        args += ["--set", f"{k}={v}"]
    run(*args)
    return run


def server_process(cluster, job_dir: str) -> int:
    """The server's pid from its connection file (ch-run makes no pid namespace: it is the compute node's pid)."""
    out = run_as_user(cluster, ["cat", f"{job_dir}/connection.json"])
    assert out.returncode == 0, out.stderr
    return int(json.loads(out.stdout)["pid"])


def assert_runs_in_image(cluster, job_id: str, pid: int, image: str) -> None:
    """The compute node's process list shows the server as the test user, and the process lives in the image."""
    # The compute node's own view: a Slurm step on the node the server's job runs on lists the server's process.
    node = run_as_user(cluster, ["squeue", "-h", "-j", job_id, "-o", "%N"]).stdout.strip()
    assert node in cluster.compute_nodes
    ps = run_as_user(cluster, ["srun", "-w", node, "-N1", "-n1", "-t", "1", "--mem=10M", "sh", "-c",
                               f"hostname; ps -o user:20,pid,ppid,args -p {pid}"], timeout=120)
    assert ps.returncode == 0, ps.stderr
    lines = ps.stdout.splitlines()
    assert lines[0] == node, ps.stdout
    rows = [line.split(None, 3) for line in lines[2:]]
    assert len(rows) == 1 and rows[0][1] == str(pid), ps.stdout
    user, _, _, args = rows[0]
    assert user == cluster.user and "-m hpcseg.server" in args, ps.stdout
    # From the machine's side (the same process by its host pid): not root, in the compute node's network, in a
    # user namespace of its own (ch-run is unprivileged), with the image as its root file system and the image's
    # torch loaded.
    pid = host_pid(cluster, node, pid)
    status = Path(f"/proc/{pid}/status").read_text()
    uid = next(line.split()[1] for line in status.splitlines() if line.startswith("Uid:"))
    assert int(uid) == int(run_as_user(cluster, ["id", "-u"]).stdout) != 0
    assert os.stat(f"/proc/{pid}/ns/net").st_ino == os.stat(f"/proc/{cluster.container_pid(node)}/ns/net").st_ino
    assert os.readlink(f"/proc/{pid}/ns/user") != os.readlink("/proc/self/ns/user")
    root = Path(f"/proc/{pid}/root")
    assert (root / "ch/environment").is_file() and (root / "opt/hpcseg/test.sh").is_file()
    assert os.stat(root).st_ino == os.stat(image).st_ino  # its / is the directory image
    maps = Path(f"/proc/{pid}/maps").read_text()
    assert "/usr/local/lib/python3.11/dist-packages/torch/lib/libtorch_cpu.so" in maps


@pytest.mark.parametrize("sched", ["slurm", "pbs"])
def test_segment_in_the_image_under_ch_run(cluster, ch_image, tmp_path, sched):
    run = make_cli(cluster, ch_image, sched)
    image, truth, names = make_phantom(4242, shape=(64, 64, 48), spacing=(1.5, 1.5, 2.0))
    image.SetOrigin((-31.0, 12.5, 140.0))
    truth.CopyInformation(image)
    ip, out = tmp_path / "ct.nii.gz", tmp_path / "ct-seg.nii.gz"
    sitk.WriteImage(image, str(ip))
    if sched == "slurm":  # doctor finds ch-run and asks the image's hpcseg for its protocol, through ch-run
        items = {i["item"]: i for i in json.loads(run("doctor", "--json", ok=False).stdout)["items"]}
        assert items["container runtime and image"]["ok"], items["container runtime and image"]
        assert items["server protocol"]["ok"], items["server protocol"]
    try:
        res = json.loads(run("segment", str(ip), "-o", str(out), "--model", "ct-body", "--timeout", "600",
                             "--json").stdout)
        job_id = res["job_id"]
        job = next(r for r in json.loads(run("jobs", "--json").stdout) if r["job_id"] == job_id)
        job_sh = run_as_user(cluster, ["cat", f"{job['job_dir']}/job.sh"]).stdout
        assert f"exec ch-run --home --set-env -b {cluster.home}/.hpcseg {ch_image} -- " in job_sh
        assert_runs_in_image(cluster, job_id, server_process(cluster, job["job_dir"]), ch_image)
    finally:
        run("stop", ok=False)
    mask = sitk.ReadImage(str(out))
    for attr in ("GetSize", "GetSpacing", "GetOrigin", "GetDirection"):
        assert getattr(mask, attr)() == pytest.approx(getattr(image, attr)()), attr
    # ct-body segments body, lungs and bone; the phantom's liver is soft tissue to it, so it counts as body.
    label_of = res["labels"]
    assert set(label_of) == {"body", "lungs", "bone"}
    got, want = sitk.GetArrayFromImage(mask), sitk.GetArrayFromImage(truth)
    truth_of = {"body": np.isin(want, [names["body"], names["liver"]]), "lungs": want == names["lungs"],
                "bone": want == names["bone"]}
    for name, expected in truth_of.items():
        d = dice(got == label_of[name], expected)
        assert d >= 0.9, f"{name}: Dice {d:.3f}"


def test_finetune_in_the_image_then_serve_the_new_version(cluster, ch_image, tmp_path):
    """Upload 4 phantom pairs, fine-tune phantom-unet in a PBS job inside the image, then a Slurm server job in the
    same image serves the new version (the built-in's major + 1; ``hpcseg models`` lists it, through ch-run on the
    login node)."""
    root = f"~/hpcseg-ch-{os.getpid()}-{int(time.time())}"
    dataset = "chloop"
    pbs = make_cli(cluster, ch_image, "pbs", models_dir=f"{root}/models", datasets_dir=f"{root}/datasets",
                   cpus="2")
    for seed in (11, 12, 13, 14):
        img, lab, _ = make_phantom(seed, shape=(64, 64, 48))
        ip, mp = tmp_path / f"ct{seed}.nii.gz", tmp_path / f"seg{seed}.nii.gz"
        sitk.WriteImage(img, str(ip))
        sitk.WriteImage(lab, str(mp))
        pbs("upload", str(ip), str(mp), "-d", dataset, "--labels", ",".join(f"{k}={v}" for k, v in LABELS.items()),
            "--split", "val" if seed == 14 else "train")
    try:
        done = pbs("train", "-m", "phantom-unet", "-d", dataset, "--epochs", "2", "--force", "--wait", "--json")
        rec = json.loads(done.stdout)
        assert rec["status"]["state"] == "completed", done.output[-3000:]
        log = json.loads(pbs("logs", rec["job_id"], "--json").stdout)["job.out"]
        assert "epoch 2/2" in log and "promoted" in log
        job_sh = run_as_user(cluster, ["cat", f"{rec['job_dir']}/job.sh"]).stdout
        assert f"exec ch-run --home --set-env -b {cluster.home}/.hpcseg" in job_sh
        assert "-m hpcseg.modelstore finetune" in job_sh
        new = str(int(ModelManifest.load(builtin_models_dir() / "phantom-unet").version.split(".")[0]) + 1)
        models = {m["name"]: m for m in json.loads(pbs("models", "--json").stdout)}
        assert models["phantom-unet"]["current"] == new
        slurm = make_cli(cluster, ch_image, "slurm", models_dir=f"{root}/models", datasets_dir=f"{root}/datasets")
        ip, out = tmp_path / "new.nii.gz", tmp_path / "new-seg.nii.gz"
        sitk.WriteImage(make_phantom(99, shape=(48, 48, 32))[0], str(ip))
        res = json.loads(slurm("segment", str(ip), "-o", str(out), "--model", "phantom-unet", "--timeout", "600",
                               "--json").stdout)
        assert res["model_version"] == new
        slurm("stop")
    finally:
        run_as_user(cluster, ["rm", "-rf", root.replace("~", cluster.home, 1)])

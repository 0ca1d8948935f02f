"""The hpcseg command itself, through CliRunner, against the real test cluster."""

from __future__ import annotations

import json
import re
import time

import pytest
import SimpleITK as sitk
from click.testing import CliRunner

from hpcseg import imaging
from hpcseg.cli import main
from hpcseg.phantoms import make_phantom

pytestmark = [pytest.mark.cluster, pytest.mark.slow]


@pytest.fixture
def cli(cluster, tmp_path):
    runner = CliRunner()

    def run(*args, ok=True):
        res = runner.invoke(main, ["-p", "c", *args], catch_exceptions=False)
        if ok:
            assert res.exit_code == 0, res.output
        return res

    res = runner.invoke(main, ["-p", "c", "config", "init", "--host", cluster.host, "--scheduler", "slurm",
                               "--set", f"user={cluster.user}", "--set", f"identity_file={cluster.key_path}",
                               "--set", f"known_hosts={cluster.known_hosts}", "--set", f"partition={cluster.partition}",
                               "--set", f"python={cluster.python}", "--set", "cpus=1", "--set", "memory=500M",
                               "--set", "walltime=00:15:00", "--set", "device=cpu", "--set", "idle_timeout=300"],
                        catch_exceptions=False)
    assert res.exit_code == 0, res.output
    return run


def test_config_show_and_check(cli, cluster):
    shown = json.loads(cli("config", "show", "--json").output)
    assert shown["profile"] == "c" and shown["host"] == cluster.host and shown["scheduler"] == "slurm"
    checks = json.loads(cli("config", "check", "--json").output)
    assert all(c["ok"] for c in checks), checks
    assert {"connect", "work dir", "python + hpcseg on the cluster"} <= {c["check"] for c in checks}
    bad = cli("config", "set", "partition", "nosuchpartition")
    assert bad.exit_code == 0
    res = cli("config", "check", ok=False)
    assert res.exit_code == 1 and "FIX" in res.output


def test_wrong_value_refused_with_key_path(cli):
    res = cli("config", "set", "walltime", "two hours", ok=False)
    assert res.exit_code == 1 and "profiles.c.walltime" in res.output


def test_templates_commands(cli):
    names = {t["name"] for t in json.loads(cli("templates", "list", "--json").output)}
    assert {"server.sh.j2", "run.sh.j2", "train.sh.j2"} <= names
    assert "params.command|words" in cli("templates", "show", "run").output
    assert cli("templates", "validate").exit_code == 0
    dry = cli("submit", "--dry-run").output
    assert dry.startswith("#!/bin/bash") and "#SBATCH --partition=gpu" in dry and "hpcseg.server" in dry


def test_job_commands_with_json(cli):
    job = json.loads(cli("submit", "-t", "run", "--json", "--", "bash", "-c", "echo from-the-job; exit 3").output)
    jid = job["job_id"]
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        st = json.loads(cli("status", jid, "--json").output)[jid]
        if st["state"] not in ("pending", "running", "completing", "unknown"):
            break
        time.sleep(1)
    assert st["state"] == "failed" and st["exit_code"] == 3
    rows = json.loads(cli("jobs", "--all", "--json").output)
    assert jid in {r["job_id"] for r in rows}
    logs = json.loads(cli("logs", jid, "--json").output)
    assert "from-the-job" in logs["job.out"]
    long = json.loads(cli("submit", "-t", "run", "--json", "--", "sleep", "300").output)["job_id"]
    assert json.loads(cli("cancel", long, "--json").output) == {"cancelled": [long]}
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        st = json.loads(cli("status", long, "--json").output)[long]
        if st["state"] == "cancelled":
            break
        time.sleep(1)
    assert st["state"] == "cancelled"


def test_submit_server_waits_until_ready_then_segment_reuses_it(cli, tmp_path):
    ready = json.loads(cli("submit", "--json").output)
    assert ready["ready"] is True and ready["host"] in ("compute1", "compute2")
    image, _, _ = make_phantom(3, shape=(48, 48, 32))
    sitk.WriteImage(image, str(tmp_path / "ct.nii.gz"))
    out = json.loads(cli("segment", str(tmp_path / "ct.nii.gz"), "-o", str(tmp_path / "seg.seg.nrrd"),
                         "--model", "ct-body", "--no-start", "--json").output)
    assert out["job_id"] == ready["job_id"]  # reused, not a second job
    mask = sitk.ReadImage(str(tmp_path / "seg.seg.nrrd"))
    assert mask.GetSize() == image.GetSize() and mask.GetSpacing() == pytest.approx(image.GetSpacing())
    # the segment names came back from the cluster into Slicer's fields (was `... or file exists`: always true)
    assert out["labels"] == {"body": 1, "lungs": 2, "bone": 3}
    assert [mask.GetMetaData(f"Segment{i}_Name") for i in range(3)] == ["body", "lungs", "bone"]
    assert imaging.read_mask(tmp_path / "seg.seg.nrrd")[1] == out["labels"]
    assert json.loads(cli("stop", "--json").output)["stopped"] == [ready["job_id"]]


def test_failed_server_start_cancels_and_shows_the_log(cli, cluster):
    from tests.cluster.harness import run_as_user

    cli("config", "set", "python", "/nonexistent/python3")
    res = cli("submit", "--timeout", "120", ok=False)
    assert res.exit_code == 1 and "ended before it was ready" in res.output
    assert "job.err" in res.output or "job.out" in res.output  # the log tail is shown
    job_id = re.search(r"server job (\d+) ended before it was ready", res.output).group(1)
    # no orphan: the job this submit started is gone. Only that one: the cluster user is shared, and other
    # server jobs (another test's, a benchmark's) may be running meanwhile
    left = run_as_user(cluster, ["squeue", "-h", "-u", cluster.user, "-n", "hpcseg-server", "-o", "%i %T"])
    assert job_id not in [line.split()[0] for line in left.stdout.splitlines() if line.strip()], left.stdout

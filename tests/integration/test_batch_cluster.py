"""hpcseg batch on the real test cluster (two compute nodes): a cohort as one job array through Slurm and again
through the PBS commands, the client SIGKILLed mid-upload and mid-run then `batch collect`, and a task killed
by its walltime. The `hpcseg` command runs as a real process (killed with SIGKILL), or in-process via CliRunner."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest
from click.testing import CliRunner

from hpcseg.cli import main
from hpcseg.imaging import read_mask
from hpcseg.ssh import SSHShell
from tests.batchkit import check_outputs, make_cohort

pytestmark = [pytest.mark.cluster, pytest.mark.slow]


@pytest.fixture
def cluster_cli(cluster, tmp_path):
    """Profiles `s` (Slurm) and `p` (the PBS commands) in a config of this test, each with a work dir of its own
    on the cluster (removed afterwards), and a runner for the hpcseg command."""
    import hpcseg

    work = f"~/.hpcseg-batchtest/{uuid.uuid4().hex[:10]}"
    runner = CliRunner()
    for name, sched in (("s", "slurm"), ("p", "pbs")):
        res = runner.invoke(main, ["-p", name, "config", "init", "--host", cluster.host, "--scheduler", sched,
                                   "--set", f"user={cluster.user}", "--set", f"identity_file={cluster.key_path}",
                                   "--set", f"known_hosts={cluster.known_hosts}",
                                   "--set", f"partition={cluster.partition}", "--set", f"python={cluster.python}",
                                   "--set", "cpus=1", "--set", "memory=500M", "--set", "walltime=00:10:00",
                                   "--set", "device=cpu", "--set", f"work_dir={work}"]
                            + (["--set", "pbs_dialect=torque"] if sched == "pbs" else []),
                            catch_exceptions=False)
        assert res.exit_code == 0, res.output
    env = {**os.environ, "PYTHONPATH": str(Path(hpcseg.__file__).resolve().parent.parent)}
    shell = SSHShell(cluster.host, user=cluster.user, port=cluster.port, identity_file=cluster.key_path,
                     known_hosts=[cluster.known_hosts], interactive=False)

    class Cli:
        work_dir = work
        ssh = shell

        def run(self, *args, code=0):
            res = runner.invoke(main, list(args), catch_exceptions=False)
            assert res.exit_code == code, res.output
            return res

        def popen(self, *args):
            return subprocess.Popen([sys.executable, "-m", "hpcseg", *args], env=env, stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, text=True)

        def remote(self, command: str) -> str:
            res = shell.run(["sh", "-c", f'mkdir -p "$HOME"/{work[2:]} && cd "$HOME"/{work[2:]} && {command}'],
                            timeout=120)
            assert res.ok, res.stderr
            return res.stdout

    yield Cli()
    for name in ("s", "p"):
        runner.invoke(main, ["-p", name, "batch", "cancel"])
    shell.run(["sh", "-c", f'rm -rf -- "$HOME"/{work[2:]}'], timeout=120)
    shell.close()


def state_of(out: Path) -> dict:
    try:
        return json.loads((out / ".hpcseg-batch" / "state.json").read_text())
    except (OSError, ValueError):
        return {}


@pytest.mark.parametrize("profile", ["s", "p"], ids=["slurm", "pbs"])
def test_a_cohort_as_one_job_array(cluster_cli, cluster, tmp_path, profile):
    """17 inputs: 15 phantom CTs, a copy of one of them, and a corrupt file. Each task asks for 5 of a node's 8
    CPUs, so no two tasks share a node: the array runs on both compute nodes."""
    cohort = make_cohort(tmp_path / "in", 15)
    cluster_cli.run("-p", profile, "config", "set", "cpus", "5")
    deadline = time.monotonic() + 120  # both nodes free (the previous test's tasks may still be completing)
    while cluster_cli.remote("squeue -h -u $USER -o %i").strip() and time.monotonic() < deadline:
        time.sleep(1)
    out = json.loads(cluster_cli.run("-p", profile, "batch", str(tmp_path / "in"), "-o", str(tmp_path / "out"),
                                     "--model", "ct-body", "--tasks", "4", "--json").stdout)
    assert out["finished"] and (out["done"], out["invalid"], out["failed"]) == (16, 1, 0), out
    assert len(out["rounds"]) == 1 and out["rounds"][0]["size"] == 4
    check_outputs(tmp_path / "out", cohort)
    st = state_of(tmp_path / "out")
    assert len(st["uploaded"]) == 15  # the duplicate was uploaded once
    assert len(cluster_cli.remote("ls batches/inputs").split()) == 15
    results = cluster_cli.remote(f"ls batches/{out['batch_id']}/results").split()
    assert len([r for r in results if r.endswith(".json")]) == 15  # and segmented once
    tasks_used = {json.loads(cluster_cli.remote(f"cat batches/{out['batch_id']}/results/{r}"))["task"]
                  for r in results if r.endswith(".json")}
    assert tasks_used <= {0, 1, 2, 3}  # tasks of the one array (how many got work depends on who loads first)
    array_id = re.match(r"\d+", st["rounds"][0]["array_id"]).group(0)
    deadline = time.monotonic() + 60  # slurmdbd gets each task's record a moment after it ends
    while True:
        rows = [r.split("|") for r in cluster_cli.remote(f"sacct -X -n -P -j {array_id} -o JobID,NodeList,State")
                .split()]
        if len([r for r in rows if r[2] == "COMPLETED"]) == 4 or time.monotonic() > deadline:
            break
        time.sleep(1)
    nodes = {r[1] for r in rows}
    assert nodes == set(cluster.compute_nodes), (nodes, st["rounds"][0]["array_id"])  # tasks ran on both nodes
    status = json.loads(cluster_cli.run("-p", profile, "batch", "status", "--json").stdout)
    assert status["done"] == 16 and status["finished"]


def test_sigkill_mid_upload_and_mid_run_then_collect(cluster_cli, tmp_path):
    cohort = make_cohort(tmp_path / "in", 15, shape=(96, 96, 64))
    out = tmp_path / "out"
    seen_partial: list[str] = []
    stop = threading.Event()

    def watch() -> None:  # no partial mask under a mask's name, at any moment (hidden temp names are the writes)
        while not stop.is_set():
            for p in [p for p in out.glob("*.seg.nrrd") if not p.name.startswith(".")]:
                try:
                    read_mask(p)
                except Exception as exc:  # noqa: BLE001 - any failure to read is what we look for
                    if p.exists():
                        seen_partial.append(f"{p.name}: {exc}")
            time.sleep(0.05)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        proc = cluster_cli.popen("-p", "s", "batch", str(tmp_path / "in"), "-o", str(out), "--model", "ct-body",
                                 "--tasks", "2", "--json")
        deadline = time.monotonic() + 300
        while len(state_of(out).get("uploaded", [])) < 3 and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.005)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        st = state_of(out)
        arrived = len(st["uploaded"])
        assert 3 <= arrived < 15 and not st["rounds"], (arrived, st["rounds"])
        before = dict(line.rsplit(" ", 1) for line in cluster_cli.remote(
            "find batches/inputs -name '*.hsv' -printf '%f %T@\\n'").splitlines())
        assert len(before) >= arrived

        proc = cluster_cli.popen("-p", "s", "batch", "collect", "--json")
        deadline = time.monotonic() + 600
        while proc.poll() is None and time.monotonic() < deadline:
            st = state_of(out)
            if 2 <= sum(c["status"] == "done" for c in st.get("cases", [])) < 10:
                break
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        st = state_of(out)
        collected = {c["case_id"]: (out / f"{c['case_id']}.seg.nrrd").stat().st_mtime_ns
                     for c in st["cases"] if c["status"] == "done"}
        assert 2 <= len(collected) < 16 and len(st["rounds"]) == 1, len(collected)

        res = cluster_cli.run("-p", "s", "batch", "collect", st["batch_id"], "--json")
        summary = json.loads(res.stdout)
    finally:
        stop.set()
        watcher.join()
    assert summary["finished"] and (summary["done"], summary["invalid"]) == (16, 1), summary
    check_outputs(out, cohort, shape=(96, 96, 64))
    assert not seen_partial, seen_partial
    after = dict(line.rsplit(" ", 1) for line in cluster_cli.remote(
        "find batches/inputs -name '*.hsv' -printf '%f %T@\\n'").splitlines())
    assert len(after) == 15 and all(after[name] == stamp for name, stamp in before.items())  # not sent again
    claims = cluster_cli.remote(f"ls batches/{st['batch_id']}/claims").split()
    assert len(claims) == 15 and all(c.endswith(".0.1") for c in claims)  # each case ran once, in round 0
    assert len(summary["rounds"]) == 1
    for case_id, mtime in collected.items():  # what was collected before the kill was not fetched again
        assert (out / f"{case_id}.seg.nrrd").stat().st_mtime_ns == mtime, case_id


SLOW_MODEL = '''
import time
from hpcseg.server.classical_models import CTBodyModel


class SlowCTBody(CTBodyModel):
    """ct-body that takes 14 s a case: so a task runs into its walltime in the middle of a batch."""

    def infer(self, image, params):
        time.sleep(14)
        return super().infer(image, params)
'''


def test_a_task_killed_by_its_walltime_keeps_its_results_and_the_rest_runs_again(cluster_cli, tmp_path, cluster):
    """One task, a 1-minute walltime, 7 cases of 14 s each: round 0 is killed mid-batch (Slurm TIMEOUT, which
    slurmctld enforces 60 to 90 s after the start), round 1 finishes the 1 to 3 cases left."""
    work = cluster_cli.remote("pwd").strip()
    extra = f"{work}/slowmodels"
    cluster_cli.ssh.write_text(f"{extra}/slowmodels.py", SLOW_MODEL)
    cluster_cli.ssh.write_text(f"{extra}/python", f'#!/bin/sh\nPYTHONPATH={extra} exec {cluster.python} "$@"\n',
                               mode=0o755)
    cluster_cli.ssh.write_text(f"{work}/models/slow-ct/hpcseg-model.json", json.dumps({
        "name": "slow-ct", "version": "1.0.0", "type": "segmentation", "labels": {"body": 1, "lungs": 2, "bone": 3},
        "loader": "slowmodels:SlowCTBody", "extra": {"expect": {"modality": "CT"}}}))
    cluster_cli.run("-p", "s", "config", "set", "python", f"{extra}/python")
    cluster_cli.run("-p", "s", "config", "set", "walltime", "00:01:00")
    cohort = make_cohort(tmp_path / "in", 7, first_seed=40)
    (tmp_path / "in" / "dup.nii.gz").unlink()
    (tmp_path / "in" / "bad.nii.gz").unlink()
    del cohort["dup"]
    out = json.loads(cluster_cli.run("-p", "s", "batch", str(tmp_path / "in"), "-o", str(tmp_path / "out"),
                                     "--model", "slow-ct", "--tasks", "1", "--json").stdout)
    assert out["finished"] and out["done"] == 7 and out["failed"] == 0, out
    st = state_of(tmp_path / "out")
    assert len(st["rounds"]) >= 2
    assert st["rounds"][0]["tasks"]["0"]["state"] == "timeout", st["rounds"][0]
    batch = f"batches/{st['batch_id']}"
    rounds = [json.loads(cluster_cli.remote(f"cat {batch}/results/{r}"))["round"]
              for r in cluster_cli.remote(f"ls {batch}/results").split() if r.endswith(".json")]
    assert len(rounds) == 7 and 0 < rounds.count(0) < 7  # round 0's finished cases were kept, the rest ran again
    claims = cluster_cli.remote(f"ls {batch}/claims").split()
    requeued = {c.split(".")[0] for c in claims if c.split(".")[1] == "0"} & \
        {c.split(".")[0] for c in claims if c.split(".")[1] == "1"}
    assert len(requeued) == 1  # the case the killed task was working on ran again in round 1
    check_outputs_no_bad(tmp_path / "out", cohort)


def check_outputs_no_bad(out: Path, cohort: dict) -> None:
    import csv

    rows = {r["case_id"]: r for r in csv.DictReader((out / "report.csv").open())}
    assert set(rows) == set(cohort) and all(r["status"] == "done" for r in rows.values())
    for case_id in cohort:
        read_mask(out / f"{case_id}.seg.nrrd")

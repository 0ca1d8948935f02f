"""Rendered scripts submitted as REAL jobs to the test cluster (tests/cluster/) through the real OpenSSH client.

1,100 hostile words travel in five jobs: four through ``sbatch`` (Slurm header, GPUs by --gres and --gpus, a job
folder whose name is itself hostile) and one through the Torque-style ``qsub`` wrapper (PBS header). Each job
prints its words NUL-separated; the output must equal them byte for byte, ``exit_code`` must read 0, and no
injected ``touch CANARY`` may have run anywhere under the test folder. Beside that fixed, seeded list,
hypothesis draws new words (and a hostile job folder name) for a bounded number of real Slurm jobs per run.
"""

from __future__ import annotations

import shlex
import subprocess
import time
import uuid

import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from tpl_support import hostile_text, hostile_words

from hpcseg.config import Profile
from hpcseg.errors import SubmitFailed
from hpcseg.schedulers.base import SubmitSpec
from hpcseg.schedulers.slurm import Slurm
from hpcseg.templates import TemplateEngine, build_context, check_script

pytestmark = pytest.mark.cluster

ENGINE = TemplateEngine(user_dir="/nonexistent/hpcseg-test-user-templates")


def ssh(cluster, command: str, *, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(cluster.ssh_argv(command), capture_output=True, timeout=timeout, stdin=subprocess.DEVNULL)


def ssh_ok(cluster, command: str, **kw) -> bytes:
    res = ssh(cluster, command, **kw)
    assert res.returncode == 0, f"ssh {command!r} exited {res.returncode}: {res.stderr.decode(errors='replace')}"
    return res.stdout


def scp_to(cluster, local, remote: str) -> None:
    argv = ["scp", "-F", "/dev/null", "-i", cluster.key_path, "-o", "IdentitiesOnly=yes", "-o", "BatchMode=yes",
            "-o", "StrictHostKeyChecking=yes", "-o", f"UserKnownHostsFile={cluster.known_hosts}",
            "-o", "LogLevel=ERROR", "-P", str(cluster.port), str(local), f"{cluster.user}@{cluster.host}:{remote}"]
    res = subprocess.run(argv, capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert res.returncode == 0, f"scp exited {res.returncode}: {res.stderr}"


@pytest.fixture
def remote_base(cluster):
    base = f"{cluster.home}/tpl-{uuid.uuid4().hex[:10]}"
    ssh_ok(cluster, f"mkdir -p {shlex.quote(base)}")
    yield base
    ssh(cluster, f"rm -rf {shlex.quote(base)}")


JOBS = [  # (name, scheduler, profile fields, job folder name)
    ("gres", "slurm", {"gpu_directive": "gres"}, "job $(touch CANARY) `touch CANARY`; 'q' \"d\" é ~ * -x"),
    ("gpus", "slurm", {"gpu_directive": "gpus"}, "job && touch CANARY | spaces  and\ttab"),
    ("nogpu", "slurm", {"gpus": 0}, "job\nnewline ü 日本"),
    ("dash-glob", "slurm", {"gpus": 1}, "-job [a-z]* {a,b} !! #x"),
    # the Torque wrapper pastes its arguments into a /bin/sh command line unquoted: a plain folder name here
    ("torque", "pbs", {"pbs_dialect": "torque"}, "torque-job"),
]


def test_hostile_words_survive_real_slurm_and_qsub_jobs(cluster, remote_base, tmp_path):
    words = hostile_words(1100, seed=7)
    chunks = [words[i::len(JOBS)] for i in range(len(JOBS))]
    submitted = []
    for (name, scheduler, fields, folder), chunk in zip(JOBS, chunks, strict=True):
        job_dir = f"{remote_base}/{folder}"
        prof = Profile(name="cluster", scheduler=scheduler, host=cluster.host, partition=cluster.partition,
                       cpus=1, memory="100M", walltime="00:05:00", work_dir=remote_base, **fields)
        ctx = build_context(prof, template="run", job_dir=job_dir, work_dir=remote_base, job_name=f"tpl-{name}",
                            params={"command": ["printf", "%s\\0", *chunk]}, home=cluster.home)
        script = ENGINE.render("run.sh.j2", ctx)
        assert check_script(script) == []
        local = tmp_path / f"{name}.sh"
        local.write_text(script)
        staged = f"{remote_base}/{name}.sh"
        scp_to(cluster, local, staged)
        q = shlex.quote
        ssh_ok(cluster, f"mkdir -p -- {q(job_dir)} && mv -- {q(staged)} {q(job_dir + '/job.sh')}")
        out = f"{job_dir}/job.out"
        if scheduler == "slurm":
            cmd = f"cd -- {q(job_dir)} && sbatch --parsable -o {q(out)} -e {q(job_dir + '/job.err')} job.sh"
        else:
            cmd = f"cd -- {q(job_dir)} && qsub -o {q(out)} -e {q(job_dir + '/job.err')} job.sh"
        job_id = ssh_ok(cluster, cmd).decode().strip().splitlines()[-1].split(";")[0]
        assert job_id.isdigit(), job_id
        submitted.append((name, job_id, job_dir, chunk))

    ids = ",".join(j for _, j, _, _ in submitted)
    deadline = time.monotonic() + 180
    while ssh_ok(cluster, f"squeue -h -j {ids} -o %i 2>/dev/null || true").strip():
        assert time.monotonic() < deadline, ssh_ok(cluster, f"squeue -j {ids}").decode()
        time.sleep(0.5)

    for name, job_id, job_dir, chunk in submitted:
        q = shlex.quote
        exit_code = ssh_ok(cluster, f"cat -- {q(job_dir + '/exit_code')} || cat -- {q(job_dir + '/job.err')}")
        assert exit_code == b"0\n", f"job {name} ({job_id}): {exit_code!r}"
        got = ssh_ok(cluster, f"cat -- {q(job_dir + '/job.out')}")
        assert got == b"".join(w.encode() + b"\0" for w in chunk), f"job {name} ({job_id}) printed other words"
    assert ssh_ok(cluster, f"find {shlex.quote(remote_base)} -name 'CANARY*'") == b""


def test_scancel_is_recorded_in_exit_code_and_usr2_in_ending(cluster, remote_base, tmp_path):
    """On real Slurm: the walltime warning (sent here by hand, as --signal=B:USR2@90 would) leaves `ending`,
    and scancel (SIGTERM to the batch shell, as at the walltime) leaves exit_code 143 before KillWait's SIGKILL."""
    q = shlex.quote
    job_dir = f"{remote_base}/cancel me"
    prof = Profile(name="cluster", scheduler="slurm", host=cluster.host, partition=cluster.partition, cpus=1,
                   memory="100M", walltime="00:05:00", gpus=0, work_dir=remote_base)
    ctx = build_context(prof, template="run", job_dir=job_dir, work_dir=remote_base, job_name="tpl-cancel",
                        params={"command": ["bash", "-c", "touch running; exec sleep 300"]})
    (tmp_path / "job.sh").write_text(ENGINE.render("run.sh.j2", ctx))
    scp_to(cluster, tmp_path / "job.sh", f"{remote_base}/cancel.sh")
    job_id = ssh_ok(cluster, f"mkdir -p -- {q(job_dir)} && mv {q(remote_base + '/cancel.sh')} {q(job_dir + '/job.sh')}"
                             f" && cd -- {q(job_dir)} && sbatch --parsable -o job.out job.sh").decode().strip()

    def wait_file(name: str, timeout: float = 60) -> bytes:
        deadline = time.monotonic() + timeout
        while True:
            res = ssh(cluster, f"cat -- {q(job_dir + '/' + name)}")
            if res.returncode == 0:
                return res.stdout
            assert time.monotonic() < deadline, f"{name} never appeared for job {job_id}"
            time.sleep(0.3)

    wait_file("running")  # the command's own mark (the job writes `started`)
    ssh_ok(cluster, f"scancel --batch --signal=USR2 {job_id}")
    assert wait_file("ending") == b"walltime\n"
    ssh_ok(cluster, f"scancel {job_id}")
    assert wait_file("exit_code", timeout=30) == b"143\n"


#: real Slurm jobs per run for the hypothesis-drawn words: bounded (each is a real job), no shrinking (a failing
#: example is reported as drawn, with its words, rather than resubmitted dozens of times)
DRAWN_JOBS = 4


@settings(max_examples=DRAWN_JOBS, deadline=None, phases=[Phase.generate], database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                 HealthCheck.data_too_large])
@given(words=st.lists(hostile_text, min_size=1, max_size=120),
       folder=hostile_text.filter(lambda t: t.strip(".") != "" and "/" not in t))
def test_hypothesis_drawn_words_run_as_real_slurm_jobs(cluster, remote_base, tmp_path, words, folder):
    """Issue 13, point 15: the values hypothesis draws (not only the seeded list above) run as real Slurm jobs."""
    q = shlex.quote
    base = f"{remote_base}/{uuid.uuid4().hex[:8]}"
    job_dir = f"{base}/{folder}"
    prof = Profile(name="cluster", scheduler="slurm", host=cluster.host, partition=cluster.partition, cpus=1,
                   memory="100M", walltime="00:05:00", gpus=0, work_dir=base)
    ctx = build_context(prof, template="run", job_dir=job_dir, work_dir=base, job_name="tpl-drawn",
                        params={"command": ["printf", "%s\\0", *words]}, home=cluster.home)
    script = ENGINE.render("run.sh.j2", ctx)
    assert check_script(script) == []
    local = tmp_path / f"drawn-{uuid.uuid4().hex[:8]}.sh"
    local.write_text(script)
    ssh_ok(cluster, f"mkdir -p -- {q(job_dir)}")
    scp_to(cluster, local, f"{base}/drawn.sh")
    # submitted as hpcseg submits (its Slurm backend's command: a drawn '%' in the folder is doubled for sbatch)
    spec = SubmitSpec(script_path=f"{job_dir}/job.sh", job_dir=job_dir, job_name="tpl-drawn")
    if "\\" in folder:  # sbatch drops a backslash from --output: refused before submitting, with the reason
        with pytest.raises(SubmitFailed, match="backslash"):
            Slurm().submit_command(spec)
        return
    sbatch = Slurm().submit_command(spec)
    job_id = ssh_ok(cluster, f"mv -- {q(base + '/drawn.sh')} {q(job_dir + '/job.sh')} && "
                             f"{shlex.join(sbatch.argv)}").decode().strip().split(";")[0]
    assert job_id.isdigit(), job_id
    deadline = time.monotonic() + 120
    while ssh_ok(cluster, f"squeue -h -j {job_id} -o %i 2>/dev/null || true").strip():
        assert time.monotonic() < deadline, f"job {job_id} still queued"
        time.sleep(0.5)
    exit_code = ssh_ok(cluster, f"cat -- {q(job_dir + '/exit_code')} || cat -- {q(job_dir + '/job.err')}")
    assert exit_code == b"0\n", f"job {job_id}: {exit_code!r}"
    assert ssh_ok(cluster, f"cat -- {q(job_dir + '/job.out')}") == b"".join(w.encode() + b"\0" for w in words)
    assert ssh_ok(cluster, f"find {q(base)} -name 'CANARY*'") == b""

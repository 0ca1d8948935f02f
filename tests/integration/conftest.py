"""Profiles that point at the real test cluster of tests/cluster/ (sshd, Slurm, PBS-style commands)."""

from __future__ import annotations

import pytest

from hpcseg.config import Profile
from hpcseg.jobs import JobManager, JobStore
from hpcseg.ssh import SSHShell


def cluster_profile(cluster, scheduler: str = "slurm", **overrides) -> Profile:
    prof = Profile(name=f"test-{scheduler}", host=cluster.host, user=cluster.user, port=cluster.port,
                   identity_file=cluster.key_path, known_hosts=cluster.known_hosts, scheduler=scheduler,
                   partition=cluster.partition, gpus=1, cpus=1, memory="500M", walltime="00:10:00",
                   work_dir="~/.hpcseg", python=cluster.python, idle_timeout=120, device="cpu",
                   pbs_dialect="torque")
    for k, v in overrides.items():
        setattr(prof, k, v)
    prof.validate()
    return prof


@pytest.fixture(autouse=True)
def isolated_user_files(tmp_path, monkeypatch):
    """Never read or write the real user's config, state or known_hosts."""
    monkeypatch.setenv("HPCSEG_CONFIG", str(tmp_path / "config.toml"))
    monkeypatch.setenv("HPCSEG_STATE_DIR", str(tmp_path / "state"))
    monkeypatch.setenv("HPCSEG_KNOWN_HOSTS", str(tmp_path / "known_hosts"))
    monkeypatch.setenv("HPCSEG_SSH_CONFIG", str(tmp_path / "ssh_config"))


@pytest.fixture(scope="module")
def ssh_shell(cluster):
    sh = SSHShell(cluster.host, user=cluster.user, port=cluster.port, identity_file=cluster.key_path,
                  known_hosts=[cluster.known_hosts], interactive=False)
    yield sh
    sh.close()


@pytest.fixture
def jobs_for(cluster, ssh_shell, tmp_path):
    """A JobManager on the cluster for a scheduler, sharing the module's SSH connection."""

    def make(scheduler: str = "slurm", **overrides) -> JobManager:
        return JobManager(cluster_profile(cluster, scheduler, **overrides), shell=ssh_shell,
                          store=JobStore(tmp_path / "jobs.json"))

    return make

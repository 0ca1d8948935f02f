"""Never a second server job while the scheduler cannot say (issue: a short slurmctld outage made `segment` submit a
duplicate). slurmctld is really stopped by its pid and started again with tests/cluster/lib.sh's start_slurmctld;
squeue is asked, after the outage, which jobs run from this test's own work directory: never more than one."""

from __future__ import annotations

import threading
import uuid

import pytest

from hpcseg.errors import JobError
from hpcseg.jobs import JobManager, JobStore
from hpcseg.phantoms import make_phantom
from hpcseg.schedulers import JobState
from hpcseg.serverjobs import ServerConnection, UncertainServer, stop_servers
from hpcseg.ssh import SSHShell

from . import netfaults
from .conftest import cluster_profile

pytestmark = [pytest.mark.cluster, pytest.mark.slow]


def _jobs(cluster, tmp_path, tag: str, **over) -> JobManager:
    sh = SSHShell(cluster.host, user=cluster.user, port=cluster.port, identity_file=cluster.key_path,
                  known_hosts=[cluster.known_hosts], interactive=False)
    prof = cluster_profile(cluster, "slurm", work_dir=f"~/.hpcseg-{tag}", walltime="00:20:00", idle_timeout=600,
                           **over)
    return JobManager(prof, shell=sh, store=JobStore(tmp_path / "jobs.json"))


def _our_jobs(cluster, tag: str) -> list[str]:
    """squeue's jobs (any state) whose working directory lies in this test's work dir."""
    out = cluster.run_as_user(["squeue", "-h", "-u", cluster.user, "-o", "%i %Z"], timeout=60, check=True)
    return [line.split()[0] for line in out.stdout.splitlines() if f"/.hpcseg-{tag}/" in line]


@pytest.fixture
def outage(cluster):
    """Stop slurmctld by its pid file in its container; always start it again at the end."""
    state = {"stopped": False}

    def stop():
        netfaults.stop_slurmctld(cluster)
        state["stopped"] = True

    def start():
        netfaults.start_slurmctld(cluster)
        state["stopped"] = False

    try:
        yield stop, start
    finally:
        netfaults.start_slurmctld(cluster)


def test_scheduler_down_during_segment_uses_the_running_server(cluster, tmp_path, outage):
    stop, start = outage
    tag = f"nodup-{uuid.uuid4().hex[:8]}"
    jm = _jobs(cluster, tmp_path, tag)
    first = ServerConnection(jm.profile, jobs=jm, timeout=300).open()
    job_id = first.record.job_id
    first.close()
    image, _, _ = make_phantom(5, shape=(48, 48, 32))
    try:
        stop()
        said: list[str] = []
        with ServerConnection(jm.profile, jobs=jm, timeout=300, progress=said.append) as conn:  # as `segment` does
            assert conn.record.job_id == job_id  # the known job's connection.json and readiness answered
            assert any("the scheduler does not answer" in m for m in said), said
            restarter = threading.Thread(target=start)  # the scheduler comes back in the middle of the call
            restarter.start()
            res = conn.client.segment(image, model="phantom-unet", params={"roi_size": [48, 48, 32]})
            assert res.mask.GetSize() == image.GetSize()
            restarter.join()
        start()
        assert [r.job_id for r in jm.store.list(jm.profile.name)] == [job_id]  # nothing else submitted
        assert _our_jobs(cluster, tag) == [job_id]  # and squeue agrees: one job, ever
        # once the scheduler answers again, the same server is found the ordinary way
        with ServerConnection(jm.profile, jobs=jm, timeout=300) as conn:
            assert conn.record.job_id == job_id
        assert _our_jobs(cluster, tag) == [job_id]
    finally:
        start()
        stop_servers(jm)
        jm.shell.close()


def test_scheduler_down_and_no_server_answering_refuses_in_one_line(cluster, tmp_path, outage):
    stop, start = outage
    tag = f"nodup-{uuid.uuid4().hex[:8]}"
    jm = _jobs(cluster, tmp_path, tag, extra_directives=["--begin=now+3600"])  # stays queued: no server answers
    rec = jm.submit("server", {})
    try:
        jm.wait(rec.job_id, lambda s: s.state is JobState.PENDING, timeout=60)
        refused = None
        for _ in range(3):  # squeue waits out a short outage by itself, and the shared cluster's other tests may
            stop()          # start slurmctld again early (their ensure_cluster): then the job reads pending; again
            try:
                ServerConnection(jm.profile, jobs=jm, timeout=20).open()
            except UncertainServer as exc:
                refused = exc
                break
            except JobError as exc:  # the scheduler answered after all: still pending, not ready within 20 s
                assert "was not ready after" in exc.message, exc
            finally:
                start()
        assert refused is not None, "the scheduler never failed to answer while it was stopped"
        assert refused.message == (f"cannot tell whether job {rec.job_id} is still running: the scheduler does "
                                   f"not answer; retry, or `hpcseg stop` it first")
        assert isinstance(refused, JobError) and "\n" not in refused.message
        start()
        assert [r.job_id for r in jm.store.list(jm.profile.name)] == [rec.job_id]
        assert _our_jobs(cluster, tag) == [rec.job_id]
    finally:
        start()
        jm.cancel([rec.job_id], quiet=True)
        jm.shell.close()

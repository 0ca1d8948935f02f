"""Two server jobs at the same time on the two compute nodes: each profile's job asks for 3 of a node's 4 GPUs, so
the scheduler cannot put both on one node; each is reached through its own tunnel via the login node."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import SimpleITK as sitk

from hpcseg.jobs import JobManager, JobStore
from hpcseg.phantoms import make_phantom
from hpcseg.serverjobs import ServerConnection, stop_servers
from hpcseg.ssh import SSHShell

from .conftest import cluster_profile

pytestmark = [pytest.mark.cluster, pytest.mark.slow]


def test_two_profiles_run_a_server_on_each_compute_node_at_once(cluster, tmp_path):
    assert sorted(cluster.compute_nodes) == ["compute1", "compute2"]
    jms: list[JobManager] = []
    conns: list[ServerConnection] = []
    try:
        for name in ("a", "b"):
            sh = SSHShell(cluster.host, user=cluster.user, port=cluster.port, identity_file=cluster.key_path,
                          known_hosts=[cluster.known_hosts], interactive=False)
            (tmp_path / name).mkdir()
            prof = cluster_profile(cluster, "slurm", name=f"two-nodes-{name}", gpus=3, idle_timeout=300)
            jm = JobManager(prof, shell=sh, store=JobStore(tmp_path / name / "jobs.json"))
            jms.append(jm)
            conns.append(ServerConnection(prof, jobs=jm, timeout=300).open())
        assert {c.info.host for c in conns} == {"compute1", "compute2"}
        ids = {c.record.job_id for c in conns}
        queue = jms[0].shell.run("squeue -h -t R -o '%i %N'", check=True).stdout.split("\n")
        running = dict(line.split() for line in queue if line.strip())
        assert {running.get(i) for i in ids} == {"compute1", "compute2"}, queue  # both running, one per node

        # both segment at the same moment, each through its own tunnel
        image, truth, names = make_phantom(4242, shape=(112, 112, 48), spacing=(3.0, 3.0, 3.5), body_mm=320.0)
        results: dict[int, object] = {}

        def segment(k: int) -> None:
            try:
                results[k] = conns[k].client.segment(image, model="phantom-unet")
            except Exception as exc:  # reported below
                results[k] = exc

        threads = [threading.Thread(target=segment, args=(k,)) for k in (0, 1)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(300)
        want = sitk.GetArrayFromImage(truth)
        for k in (0, 1):
            res = results.get(k)
            assert res is not None and not isinstance(res, Exception), res
            got = sitk.GetArrayFromImage(res.mask)
            assert res.mask.GetSize() == image.GetSize()
            body = names["body"]
            inter = np.logical_and(got == res.label_names["body"], want == body).sum()
            d = 2.0 * inter / ((got == res.label_names["body"]).sum() + (want == body).sum())
            assert d >= 0.9, f"server on {conns[k].info.host}: body Dice {d:.3f}"
    finally:
        for c in conns:
            c.close()
        for jm in jms:
            stop_servers(jm)
            jm.shell.close()

"""The bounded network soak (a few minutes; bench/bench_soak.py runs the same for 30): interactive requests through
the tunnel while the carrying SSH session is killed at random moments, the login sshd is restarted once and the
connection is silently blackholed once for longer than the keepalive window (see tests/integration/soak.py)."""

from __future__ import annotations

import pytest

from hpcseg.jobs import JobManager, JobStore
from hpcseg.serverjobs import ServerConnection, stop_servers
from hpcseg.ssh import SSHShell

from . import netfaults
from .conftest import cluster_profile
from .soak import run_soak

pytestmark = [pytest.mark.cluster, pytest.mark.slow]

KEEPALIVE = 4.0  # s: a silent drop is noticed within two of these


def test_network_soak(cluster, tmp_path):
    if not netfaults.have_iptables():
        pytest.fail("iptables is missing: tests/cluster/install.sh installs it", pytrace=False)
    sh = SSHShell(cluster.host, user=cluster.user, port=cluster.port, identity_file=cluster.key_path,
                  known_hosts=[cluster.known_hosts], interactive=False, keepalive=KEEPALIVE)
    jm = JobManager(cluster_profile(cluster, "slurm", walltime="00:20:00", idle_timeout=600), shell=sh,
                    store=JobStore(tmp_path / "jobs.json"))
    conn = ServerConnection(jm.profile, jobs=jm, timeout=300).open()
    try:
        counts = run_soak(conn, cluster, duration=150, kill_every=(8.0, 20.0), restart_at=45, blackhole_at=95,
                          blackhole_for=3 * KEEPALIVE, deadline=120)
        print("\n".join(counts.lines()))
        assert counts.failed == []
        assert counts.hangs == 0
        assert counts.wrong_masks == 0
        assert counts.sshd_restarts == 1 and counts.blackholes == 1 and counts.kills >= 3
        assert counts.logins == counts.drops  # one login per drop, no more
        assert counts.inferences_logged > 0
        assert counts.requests > 50
        assert counts.ran_twice == 0  # a retried request, and a late copy of one, never runs twice
    finally:
        conn.close()
        stop_servers(jm)
        sh.close()

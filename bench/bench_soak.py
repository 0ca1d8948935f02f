"""The 30-minute network soak: interactive requests through the tunnel while the carrying SSH connection fails.

On the real test cluster (tests/cluster, started by ``ensure_cluster()``): one server job (Slurm), one
ServerConnection (tunnel + client over one SSHShell with a 15 s keepalive, hpcseg's default). First a baseline with
no fault at all (``--baseline`` minutes), then the soak (``--minutes``): clicks on a session (deepgrow), whole-image
segmentations (phantom UNet, upload kept locally), ``/info/`` and session reads at a person's pace, while this
connection's sshd session is killed at random moments (every ``--kill-every`` seconds on average), the login sshd
is restarted once (a third of the way) and the connection is silently blackholed once (two thirds of the way, for
``--blackhole`` seconds, longer than the keepalive window). What is done and counted is tests/integration/soak.py,
the same code as the suite's bounded soak test (tests/integration/test_network_soak.py).

Printed: the counts (failed requests, hangs over the request deadline, wrong masks, re-logins per drop, requests
sent again, inferences the server ran more than once) and the ratios soak / baseline of requests per minute and of
the median and 99th-percentile request time. Nothing is asserted. The server job is cancelled at the end.

Run as root (the cluster is Docker containers)::

    python bench/bench_soak.py                        # 5 min baseline, 30 min soak
    python bench/bench_soak.py --minutes 5 --baseline 2
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def _pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--minutes", type=float, default=30.0, help="length of the soak with faults")
    ap.add_argument("--baseline", type=float, default=5.0, help="minutes of the same requests with no fault first")
    ap.add_argument("--kill-every", type=float, default=60.0, help="mean seconds between session kills")
    ap.add_argument("--blackhole", type=float, default=45.0, help="seconds of the silent blackhole")
    ap.add_argument("--deadline", type=float, default=120.0, help="a request longer than this is a hang")
    args = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="hpcseg-soak-"))
    for var, name in (("HPCSEG_CONFIG", "config.toml"), ("HPCSEG_STATE_DIR", "state"),
                      ("HPCSEG_KNOWN_HOSTS", "known_hosts"), ("HPCSEG_SSH_CONFIG", "ssh_config")):
        os.environ[var] = str(tmp / name)
    from hpcseg.jobs import JobManager, JobStore
    from hpcseg.serverjobs import ServerConnection, stop_servers
    from hpcseg.ssh import KEEPALIVE, SSHShell
    from tests.cluster.harness import ensure_cluster
    from tests.integration.conftest import cluster_profile
    from tests.integration.soak import run_soak

    cluster = ensure_cluster(ROOT)
    sh = SSHShell(cluster.host, user=cluster.user, port=cluster.port, identity_file=cluster.key_path,
                  known_hosts=[cluster.known_hosts], interactive=False)
    walltime = int(args.minutes + args.baseline + 20)
    jm = JobManager(cluster_profile(cluster, "slurm", walltime=f"{walltime // 60:02d}:{walltime % 60:02d}:00",
                                    idle_timeout=900), shell=sh, store=JobStore(tmp / "jobs.json"))
    print(f"keepalive {KEEPALIVE:.0f} s; baseline {args.baseline:g} min, soak {args.minutes:g} min, a session kill "
          f"every ~{args.kill_every:.0f} s, one sshd restart, one {args.blackhole:.0f} s blackhole", flush=True)
    conn = ServerConnection(jm.profile, jobs=jm, timeout=600, progress=lambda m: print(" ", m, flush=True)).open()
    try:
        t0 = time.monotonic()
        base = run_soak(conn, cluster, duration=args.baseline * 60, faults=False, deadline=args.deadline)
        base_min = (time.monotonic() - t0) / 60
        print("baseline (no faults):")
        print("\n".join("  " + line for line in base.lines()), flush=True)
        t0 = time.monotonic()
        soak = run_soak(conn, cluster, duration=args.minutes * 60, deadline=args.deadline, seed=30,
                        kill_every=(args.kill_every / 2, args.kill_every * 1.5), blackhole_for=args.blackhole,
                        say=lambda m: print(f"  [{(time.monotonic() - t0) / 60:5.1f} min]{m}", flush=True))
        soak_min = (time.monotonic() - t0) / 60
        print("soak (with faults):")
        print("\n".join("  " + line for line in soak.lines()))
        rate_b, rate_s = base.requests / base_min, soak.requests / soak_min
        med_b, med_s = statistics.median(base.seconds), statistics.median(soak.seconds)
        p99_b, p99_s = _pct(base.seconds, 0.99), _pct(soak.seconds, 0.99)
        print(f"requests per minute: baseline {rate_b:.1f}, soak {rate_s:.1f}, ratio {rate_s / rate_b:.2f}")
        print(f"median request: baseline {med_b * 1000:.0f} ms, soak {med_s * 1000:.0f} ms, ratio {med_s / med_b:.2f}")
        print(f"p99 request: baseline {p99_b * 1000:.0f} ms, soak {p99_s * 1000:.0f} ms, ratio {p99_s / p99_b:.2f}")
        print(f"verdict: failed {len(soak.failed)}, hangs {soak.hangs}, wrong masks {soak.wrong_masks}, "
              f"re-logins {soak.logins} for {soak.drops} drops, inferences run twice {soak.ran_twice}")
    finally:
        conn.close()
        stop_servers(jm)
        sh.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())

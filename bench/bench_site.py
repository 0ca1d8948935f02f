"""What the site layer costs a command: resolving a profile over a site bundle, cold (nothing cached) and warm
(cached by content hash), against one bare command on the same SSH connection.

On the real test cluster (tests/cluster, started by ``ensure_cluster()``), a bundle of ``site.toml`` (two presets,
limits) and ``--templates`` template overrides is installed into a fresh folder under the test user's home. Over
one SSH connection opened before the clock starts, interleaved ``--repeat`` times:

- cold: ``hpcseg.site.resolve(profile)`` with an empty cache folder (one listing command, then every file read);
- warm: the same with the cache filled (the listing command only: unchanged hash, nothing read);
- baseline: ``shell.run(["true"])``, the least one command over that connection costs.

Printed: the median seconds of each and the ratios cold / warm and warm / baseline (the site layer's cost per
command, in round trips). Nothing asserts on time. The folder on the cluster is removed in ``finally``.

Run as root (the cluster is Docker containers), ~10 s on 2 cores::

    python bench/bench_site.py [--templates 8] [--repeat 20]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(HERE))

from bench_tunnel import isolate_user_files, loadavg  # noqa: E402

SITE = """
[site]
contact = "bench@example.org"
default_preset = "gpu"
[defaults]
scheduler = "slurm"
python = "/usr/bin/python3"
[presets.gpu]
partition = "gpu"
gpus = 1
[presets.cpu]
partition = "gpu"
gpus = 0
[limits]
partitions = ["gpu"]
max_gpus = 2
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--templates", type=int, default=8, help="template overrides in the bundle (default 8)")
    ap.add_argument("--repeat", type=int, default=20)
    args = ap.parse_args()

    from hpcseg.config import Profile
    from hpcseg.site import resolve
    from hpcseg.ssh import SSHShell
    from tests.cluster.harness import ensure_cluster

    tmp = Path(tempfile.mkdtemp(prefix="bench-site-"))
    isolate_user_files(tmp)
    cluster = ensure_cluster(ROOT)
    shell = SSHShell(cluster.host, user=cluster.user, port=cluster.port, identity_file=cluster.key_path,
                     known_hosts=[cluster.known_hosts], interactive=False)
    folder = f"{cluster.home}/bench-site-{uuid.uuid4().hex[:8]}"
    try:
        shell.run(["mkdir", "-p", f"{folder}/templates"], check=True)
        shell.write_text(f"{folder}/site.toml", SITE, mode=0o644)
        for i in range(args.templates):
            shell.write_text(f"{folder}/templates/t{i}.sh.j2",
                             '{% extends "builtin/server.sh.j2" %}\n{% block setup %}{{ super() }}\n'
                             f'export SITE_T{i}=1\n{{% endblock %}}\n' + "# padding\n" * 50, mode=0o644)
        prof = Profile(name="bench", host=cluster.host, user=cluster.user, port=cluster.port,
                       identity_file=cluster.key_path, known_hosts=cluster.known_hosts, site=folder)
        keys = {"host", "user", "port", "identity_file", "known_hosts", "site"}
        shell.run(["true"], check=True)  # connect before the clock
        cold, warm, base = [], [], []
        for i in range(args.repeat):
            cache = tmp / f"cache-{i}"
            t = time.perf_counter()
            r1 = resolve(prof, shell=shell, user_keys=keys, cache=cache)
            cold.append(time.perf_counter() - t)
            t = time.perf_counter()
            r2 = resolve(prof, shell=shell, user_keys=keys, cache=cache)
            warm.append(time.perf_counter() - t)
            assert r1.bundle.digest == r2.bundle.digest
            t = time.perf_counter()
            shell.run(["true"], check=True)
            base.append(time.perf_counter() - t)
        c, w, b = (statistics.median(x) for x in (cold, warm, base))
        print(f"site bundle: site.toml + {args.templates} templates, {args.repeat} rounds, load {loadavg()}")
        print(f"cold (list + read every file): {c * 1000:8.1f} ms")
        print(f"warm (list only, cached)     : {w * 1000:8.1f} ms")
        print(f"one bare command (baseline)  : {b * 1000:8.1f} ms")
        print(f"ratio cold / warm: {c / w:.2f}   warm / one command: {w / b:.2f}")
    finally:
        shell.run(["rm", "-rf", "--", folder], timeout=60)
        shell.close()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()

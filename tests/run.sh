#!/usr/bin/env bash
# Every test of hpcseg, on a fresh machine: installs what the tests need (Debian packages for the real test
# cluster, the package with its server and test extras, torch pinned to the CPU build by constraints.txt),
# builds hpcseg's container image (tests/cluster/image.sh: Docker, Charliecloud), then runs pytest. The cluster
# (sshd, munge, Slurm + slurmdbd, PBS-style commands, network namespaces) is started by the session fixture in
# tests/conftest.py through tests/cluster/up.sh. Needs root (apt-get, namespaces, dockerd).
# Extra arguments go to pytest, e.g. `bash tests/run.sh -k slurm -x`.
set -euo pipefail
cd "$(dirname "$0")/.."
export PIP_DISABLE_PIP_VERSION_CHECK=1
echo "== installing system packages for the test cluster"
bash tests/cluster/install.sh
echo "== installing hpcseg with its server and test extras"
python3 -m pip install -q -c constraints.txt -e ".[server,test]"
# MONAI Label's own client, to prove its clients work against hpcseg's server (without its server's deps).
python3 -m pip install -q --no-deps "monailabel==0.8.5" || python3 -m pip install -q --no-deps monailabel
echo "== building hpcseg's image (Docker engine, Debian base, OCI twin of singularity/hpcseg-server.def + its %test,"
echo "   Charliecloud directory image for the cluster; each step skipped when done for the same sources)"
bash tests/cluster/image.sh
echo "== running the tests"
rc=0
python3 -m pytest "$@" || rc=$?
bash tests/cluster/docker.sh stop   # the dockerd image.sh started (by its pid); images stay for the next run
exit "$rc"

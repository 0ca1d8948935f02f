#!/usr/bin/env bash
# Every test of hpcseg, on a fresh machine: installs what the tests need (Debian packages: Docker, docker-compose,
# debootstrap, Charliecloud, ...; the package with its server and test extras, torch pinned to the CPU build by
# constraints.txt), starts the Docker engine and builds hpcseg's container image (tests/cluster/image.sh), then
# runs pytest. The test cluster (containers: login node with sshd, controller with Slurm + slurmdbd/MariaDB, two
# compute nodes; tests/cluster/compose.yml) is built and brought up by the session fixtures in tests/conftest.py
# with pytest-docker (tests/cluster/prepare.sh builds its node image, cached). Needs root (apt-get, dockerd).
# Extra arguments go to pytest, e.g. `bash tests/run.sh -k slurm -x`.
set -euo pipefail
cd "$(dirname "$0")/.."
export PIP_DISABLE_PIP_VERSION_CHECK=1
echo "== installing system packages for the test cluster (Docker, docker-compose, ...)"
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
bash tests/cluster/down.sh || true   # the cluster's containers (jobs cancelled first); state and images stay
bash tests/cluster/docker.sh stop   # the dockerd image.sh started (by its pid), images stay for the next run
exit "$rc"

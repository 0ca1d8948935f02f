#!/bin/sh
# The image's build step (the .def's %post, the Dockerfile's RUN): install hpcseg's wheel with its [server] extra
# into the base image's Python. Runs as root inside the build, with the network (pip, apt-get); never at run time.
#
# /opt/hpcseg/dist (copied in from the build context's dist/) holds:
#   hpcseg-*.whl       exactly one (a stale second one would make the build ambiguous)
#   *.whl              optional other wheels installed first, e.g. the CPU torch wheel for a base without torch
#                      (pip then keeps it: hpcseg asks for torch>=2.2,<3, never a particular build)
#   constraints.txt    optional pins for every pip call (e.g. torch==2.13.0 so nothing pulls a CUDA torch)
#   ca-certificates.crt  optional CA bundle for pip (the build host's, where its HTTPS goes through a proxy with
#                      a CA of its own); removed with the rest of dist/ at the end
# A base image with no Python of its own (a plain Debian) gets Debian's python3 and pip, without recommends.
set -eu
export PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore
# Debian's Python is "externally managed" (PEP 668); in an image there is no system to break.
export PIP_BREAK_SYSTEM_PACKAGES=1
D=/opt/hpcseg/dist
[ -f "$D/ca-certificates.crt" ] && export PIP_CERT="$D/ca-certificates.crt"

if ! python3 -m pip --version >/dev/null 2>&1; then
    command -v apt-get >/dev/null || { echo "post.sh: the base image has no python3 + pip and no apt-get" >&2; exit 1; }
    apt-get update -q
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends python3 python3-pip ca-certificates
    apt-get clean
    rm -rf /var/lib/apt/lists/*
fi

[ "$(ls "$D"/hpcseg-*.whl 2>/dev/null | wc -l)" -eq 1 ] \
    || { echo "post.sh: dist/ must hold exactly one hpcseg wheel (rm -rf dist; pip wheel --no-deps -w dist .)" >&2; exit 1; }
set --
[ -f "$D/constraints.txt" ] && set -- -c "$D/constraints.txt"
extra=
for w in "$D"/*.whl; do
    case "$w" in */hpcseg-*.whl) ;; *) extra="$extra $w" ;; esac
done
# shellcheck disable=SC2086  # wheel paths hold no spaces (pip wheel names)
[ -z "$extra" ] || python3 -m pip install -q "$@" $extra
python3 -m pip install -q "$@" "$(ls "$D"/hpcseg-*.whl)[server]"
rm -rf "$D" /root/.cache
# Everything the server and training import at start, so a broken install fails the build, not the first job.
python3 -c "import hpcseg, torch, monai, fastapi, uvicorn, SimpleITK; print('hpcseg', hpcseg.__version__, 'torch', torch.__version__)"

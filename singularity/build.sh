#!/usr/bin/env bash
# Build hpcseg's server/training image with Docker from the OCI twin of hpcseg-server.def, then run its %test twin
# in the built image with no network. Skips the build when an image of that tag was built from the same sources.
#
#   bash singularity/build.sh [TAG]      # default hpcseg-server:local; prints the tag on stdout when done
#
# Environment:
#   BASE_IMAGE   the base image (the Dockerfile's default is a CUDA PyTorch image; here a local Debian bookworm)
#   TORCH_WHEEL  "cpu" (default when BASE_IMAGE has no torch, i.e. not a pytorch/* image): put the CPU torch wheel
#                that `pip download torch==<constraints.txt pin>` finds into the context, and pin it, so the build
#                never pulls a CUDA torch; "none": leave torch to the base image
#   DOCKER       the docker client (default: /usr/bin/docker when present, else docker)
# The context is staged in $HPCSEG_IMAGE_CTX (default /var/lib/hpcseg-docker/context): dist/ (hpcseg's wheel,
# the torch wheel, constraints.txt) and singularity/ (post.sh, test.sh): the layout the .def's %files expects.
set -euo pipefail
umask 022
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
TAG=${1:-hpcseg-server:local}
BASE_IMAGE=${BASE_IMAGE:-debian:bookworm-slim}
case "$BASE_IMAGE" in pytorch/*) TORCH_WHEEL=${TORCH_WHEEL:-none} ;; *) TORCH_WHEEL=${TORCH_WHEEL:-cpu} ;; esac
if [ -z "${DOCKER:-}" ]; then
  if [ -x /usr/bin/docker ]; then DOCKER=/usr/bin/docker; else DOCKER=docker; fi
fi
CTX=${HPCSEG_IMAGE_CTX:-/var/lib/hpcseg-docker/context}
PY=${PYTHON:-python3}
log() { printf '[image %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }

# What the image is made of: hpcseg's sources as packaged (not the docs), the recipe, the pins, the base image and
# the torch choice.
sources_hash() {
  (
    cd "$REPO"
    find hpcseg templates slurm pbs singularity -type f ! -path '*/__pycache__/*' ! -name '*.pyc' ! -name '*.md' \
      -print0 | LC_ALL=C sort -z | xargs -0 sha256sum
    sha256sum pyproject.toml constraints.txt
    "$DOCKER" image inspect -f '{{.Id}}' "$BASE_IMAGE"
    echo "torch=$TORCH_WHEEL"
  ) | sha256sum | cut -c1-32
}

"$DOCKER" image inspect "$BASE_IMAGE" >/dev/null 2>&1 || [ "$BASE_IMAGE" != debian:bookworm-slim ] \
  || { echo "build.sh: no $BASE_IMAGE image: make it with bash tests/cluster/docker.sh base" >&2; exit 1; }
HASH=$(sources_hash)
if [ "$("$DOCKER" image inspect -f '{{index .Config.Labels "org.hpcseg.sources"}}' "$TAG" 2>/dev/null)" = "$HASH" ]; then
  log "$TAG is up to date (sources $HASH)"
  echo "$TAG"
  exit 0
fi

log "staging the build context in $CTX"
rm -rf "$CTX"
mkdir -p "$CTX/dist" "$CTX/singularity"
"$PY" -m pip wheel -q --no-deps --no-build-isolation -w "$CTX/dist" "$REPO" >&2
cp "$REPO/singularity/post.sh" "$REPO/singularity/test.sh" "$CTX/singularity/"
"$PY" "$REPO/singularity/oci.py" --check
cp "$REPO/singularity/Dockerfile" "$CTX/Dockerfile"
# pip inside the build trusts what pip here trusts (an HTTPS proxy's CA on some networks); not kept in the image.
cert=$("$PY" -m pip config get global.cert 2>/dev/null || true)
[ -f "$cert" ] || cert=/etc/ssl/certs/ca-certificates.crt
[ -f "$cert" ] && cp "$cert" "$CTX/dist/ca-certificates.crt"
if [ "$TORCH_WHEEL" = cpu ]; then
  cp "$REPO/constraints.txt" "$CTX/dist/constraints.txt"
  pin=$(grep -E '^torch==' "$REPO/constraints.txt")
  # pip's configured local wheel folder holds the CPU build; the registry's default torch is a multi-GB CUDA one.
  "$PY" -m pip download -q --no-deps --only-binary=:all: "$pin" -d "$CTX/dist" >&2
  ls "$CTX"/dist/torch-*+cpu-*.whl >/dev/null 2>&1 \
    || { echo "build.sh: pip download $pin did not give a CPU wheel (+cpu): refusing a CUDA torch" >&2; exit 1; }
fi

log "docker build $TAG from $BASE_IMAGE (sources $HASH)"
start=$(date +%s)
"$DOCKER" build --pull=false --build-arg "BASE_IMAGE=$BASE_IMAGE" --label "org.hpcseg.sources=$HASH" \
  -t "$TAG" "$CTX" >&2
built=$(date +%s)
test_cmd=$("$PY" "$REPO/singularity/oci.py" --test-command)
log "running the %test twin with no network: $test_cmd"
"$DOCKER" run --rm --network none --entrypoint sh "$TAG" -c "$test_cmd" >&2
log "$TAG built in $((built - start)) s, tested in $(( $(date +%s) - built )) s, size $("$DOCKER" image inspect -f '{{.Size}}' "$TAG") bytes"
"$DOCKER" image prune -f >/dev/null 2>&1 || true   # the previous build's image, now untagged
echo "$TAG"

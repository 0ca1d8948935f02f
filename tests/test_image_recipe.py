"""The image recipe: singularity/hpcseg-server.def is the source, singularity/Dockerfile its generated OCI twin.

The image itself is built for real by tests/cluster/image.sh (Docker, then its %test twin with no network) and run
under Charliecloud in tests/integration/test_charliecloud_cluster.py; here: the two recipes agree, the translation
refuses what has no twin, and the Charliecloud runtime is a valid profile value with its own command line.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

from hpcseg.config import RUNTIMES, Profile
from hpcseg.containers import RUNTIME_PROGRAM, exec_prefix
from hpcseg.errors import ConfigError
from hpcseg.templates import sample_context

REPO = Path(__file__).resolve().parents[1]
SING = REPO / "singularity"


def _oci():
    spec = importlib.util.spec_from_file_location("hpcseg_oci", SING / "oci.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_dockerfile_is_the_def_translated():
    oci = _oci()
    text = (SING / "hpcseg-server.def").read_text()
    assert (SING / "Dockerfile").read_text() == oci.dockerfile(text), "run: python3 singularity/oci.py --write"
    res = subprocess.run([sys.executable, str(SING / "oci.py"), "--check"], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr


def test_both_recipes_run_the_same_steps():
    oci = _oci()
    header, sec = oci.parse_def((SING / "hpcseg-server.def").read_text())
    docker = (SING / "Dockerfile").read_text().splitlines()
    assert header["From"] == "{{ BASE_IMAGE }}" and "FROM ${BASE_IMAGE}" in docker
    default = next(a for a in sec["arguments"] if a.startswith("BASE_IMAGE="))
    assert "cuda" in default and f"ARG {default}" in docker  # a site's default: a CUDA PyTorch image
    assert sec["post"] == ["sh /opt/hpcseg/post.sh"] and "RUN sh /opt/hpcseg/post.sh" in docker
    for line in sec["files"]:
        src, dst = line.split()
        assert (REPO / src).exists() or src == "dist", src  # dist/ is staged by the build (hpcseg's wheel)
        assert f"COPY {src} {dst}" in docker
    assert docker.index("RUN sh /opt/hpcseg/post.sh") < docker.index("ENV PYTHONNOUSERSITE=1")
    assert 'ENTRYPOINT ["python3", "-m", "hpcseg.server"]' in docker
    assert oci.test_command((SING / "hpcseg-server.def").read_text()) == "sh /opt/hpcseg/test.sh"


@pytest.mark.parametrize("bad, why", [
    ("Bootstrap: library\nFrom: x\n", "Bootstrap: docker"),
    ("Bootstrap: docker\nFrom: x\n%setup\n    touch /x\n", "%setup"),
    ("Bootstrap: docker\nFrom: x\n%environment\n    PATH=/x\n", "export NAME=VALUE"),
    ("Bootstrap: docker\nFrom: x\n%runscript\n    python3 -m x\n", "%runscript"),
    ("Bootstrap: docker\nFrom: x\n%files\n    a b c\n", "SRC DST"),
])
def test_translation_refuses_what_has_no_twin(bad, why):
    oci = _oci()
    with pytest.raises(oci.RecipeError, match=why):
        oci.dockerfile(bad)


def test_scripts_are_valid_shell_and_build_lean():
    for script in ("post.sh", "test.sh", "build.sh"):
        assert subprocess.run(["bash", "-n", str(SING / script)]).returncode == 0, script
    for script in ("docker.sh", "image.sh"):
        assert subprocess.run(["bash", "-n", str(REPO / "tests/cluster" / script)]).returncode == 0, script
    post = (SING / "post.sh").read_text()
    assert "--no-install-recommends" in post and "PIP_NO_CACHE_DIR=1" in post and 'rm -rf "$D"' in post
    build = (SING / "build.sh").read_text()
    assert "+cpu" in build and "--network none" in build  # never a CUDA torch here; %test twin offline


def test_charliecloud_is_a_runtime_with_its_own_command_line():
    assert "charliecloud" in RUNTIMES and RUNTIME_PROGRAM["charliecloud"] == "ch-run"
    Profile(name="c", container_runtime="charliecloud", image="/sw/hpcseg").validate()
    with pytest.raises(ConfigError, match="directory image"):
        Profile(name="c", container_runtime="charliecloud").validate()
    assert exec_prefix("charliecloud", "/sw/hpcseg") == ["ch-run", "--home", "--set-env", "/sw/hpcseg", "--"]
    assert exec_prefix("apptainer", "/sw/h.sif") == ["apptainer", "exec", "/sw/h.sif"]
    assert exec_prefix("none", "") == []
    ctx = sample_context("slurm", container_runtime="charliecloud", image="/sw/hpcseg", binds=["/scratch:/mnt/0"])
    assert ctx["container_binds"][-1] == "/scratch:/mnt/0"
    with pytest.raises(ConfigError, match="SRC\\[:DST\\] only"):
        sample_context("slurm", container_runtime="charliecloud", image="/sw/hpcseg", binds=["/data:/data:ro"])

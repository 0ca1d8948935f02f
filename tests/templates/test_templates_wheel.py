"""An installed wheel finds its templates: templates/, slurm/, pbs/ and singularity/ ship as hpcseg/_data/...

The source checkout finds them at the top level; a wheel must carry them (pyproject's hatch force-include).
Built here without build isolation (hatchling is installed with the test extras), installed into a fresh venv
that sees this interpreter's dependencies, and used from outside the checkout.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

CHECK = textwrap.dedent("""
    import json, hpcseg
    from hpcseg.resources import resource_dir
    from hpcseg.templates import TemplateEngine, sample_context, check_script
    dirs = {n: str(resource_dir(n)) for n in ("templates", "slurm", "pbs", "singularity")}
    eng = TemplateEngine(user_dir="/nonexistent")
    out = {"hpcseg": hpcseg.__file__, "dirs": dirs,
           "files": {n: sorted(p.name for p in resource_dir(n).iterdir()) for n in dirs},
           "problems": {t: check_script(eng.render(t, sample_context("slurm")))
                        for t in ("server.sh.j2", "train.sh.j2", "run.sh.j2")},
           "validate": eng.validate("server"), "listed": [i.name for i in eng.list()]}
    print(json.dumps(out))
""")


@pytest.mark.slow
def test_installed_wheel_finds_and_renders_templates(tmp_path):
    import hatchling  # noqa: F401  (test extra: the wheel is built without isolation)
    dist = tmp_path / "dist"
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                            "-w", str(dist), str(REPO)], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert build.returncode == 0, build.stderr
    (wheel,) = dist.glob("hpcseg-*.whl")
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(venv)], check=True,
                   timeout=120)
    py = venv / "bin" / "python"
    inst = subprocess.run([str(py), "-m", "pip", "install", "--no-deps", "--no-index", "-q", str(wheel)],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert inst.returncode == 0, inst.stderr
    res = subprocess.run([str(py), "-c", CHECK], capture_output=True, text=True, timeout=120, cwd=tmp_path,
                         env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)})
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    site = str(venv / "lib")
    assert out["hpcseg"].startswith(site), f"imported {out['hpcseg']}, not the installed wheel"
    for name, path in out["dirs"].items():
        assert path.startswith(site) and path.endswith(f"hpcseg/_data/{name}"), path
    assert {"base.sh.j2", "server.sh.j2", "train.sh.j2", "run.sh.j2", "README.md"} <= set(out["files"]["templates"])
    assert {"header.sh.j2", "site-example", "README.md"} <= set(out["files"]["slurm"])
    assert {"header.sh.j2", "site-example", "README.md"} <= set(out["files"]["pbs"])
    assert {"hpcseg-server.def", "README.md"} <= set(out["files"]["singularity"])
    assert out["problems"] == {"server.sh.j2": [], "train.sh.j2": [], "run.sh.j2": []}
    assert out["validate"] == [] and {"server.sh.j2", "slurm/header.sh.j2"} <= set(out["listed"])

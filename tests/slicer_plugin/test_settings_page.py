"""Application Settings → HPCSeg, its logic without its widgets: it enables itself once hpcseg is installed, in the
same process (no restart), and turns every error into its message line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time

import pytest

from .conftest import MODULE_DIR, REPO

# A Python like Slicer's before hpcseg is installed: site-packages without their .pth files (so the editable
# hpcseg of this machine is not importable), and an empty folder first on sys.path where pip will install it.
DRIVER = textwrap.dedent("""
    import json, site, sys
    sys.path[:0] = [sys.argv[1], sys.argv[2]]
    sys.path += site.getsitepackages()
    from dataclasses import asdict
    from HPCSegLib.settingspage import SettingsPageLogic
    logic = SettingsPageLogic()
    for line in sys.stdin:
        req = json.loads(line)
        state = getattr(logic, req["op"])(*req.get("args", []))
        print(json.dumps(asdict(state)), flush=True)
""")


def test_settings_page_enables_itself_after_an_install_without_a_restart(isolated, tmp_path):
    target = tmp_path / "site"
    target.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    page = subprocess.Popen([sys.executable, "-S", "-c", DRIVER, str(target), str(MODULE_DIR)], env=env, text=True,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, cwd=tmp_path)

    def ask(op: str, *args: object) -> dict:
        page.stdin.write(json.dumps({"op": op, "args": list(args)}) + "\n")
        page.stdin.flush()
        return json.loads(page.stdout.readline())

    try:
        before = ask("refresh")
        assert not before["enabled"] and "not installed" in before["message"] and not before["fields"]
        assert not ask("save", "x", {})["enabled"]  # nothing to save into: no traceback either
        # the install, as pip_ensure / pip_install runs it (into a folder already on this process's sys.path)
        subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                        "--target", str(target), str(REPO)], check=True, env=env, timeout=300)
        after = ask("refresh")
        assert after["enabled"] and not after["error"], after
        assert after["profiles"] == ["local"] and after["current"] == "local"
        assert {"host", "scheduler", "walltime"} <= {f["key"] for f in after["fields"]}
        values = {**after["values"], "host": "karolina", "scheduler": "slurm", "partition": "qgpu",
                  "python": "python3"}
        saved = ask("save", "karolina", values, True)
        assert saved["enabled"] and not saved["error"] and saved["message"].startswith("saved profile karolina")
        assert saved["profiles"] == ["karolina", "local"]
        assert "karolina" in (isolated / "cfg" / "config.toml").read_text()
        wrong = ask("save", "karolina", {**values, "walltime": "2h"})
        assert wrong["error"] and "walltime" in wrong["message"] and wrong["enabled"]
        new = ask("load", "bigcluster")
        assert new["current"] == "bigcluster" and new["message"].startswith("new profile") and not new["error"]
    finally:
        page.stdin.close()
        page.wait(30)


def test_settings_page_reports_a_broken_config_file_on_its_message_line(isolated):
    from HPCSegLib.settingspage import SettingsPageLogic

    cfg = isolated / "cfg" / "config.toml"
    cfg.parent.mkdir(parents=True)
    cfg.write_text("[profiles.x\n")
    state = SettingsPageLogic().refresh()
    assert state.error and str(cfg) in state.message and "\n" not in state.message.split("\n\nHint")[0]


@pytest.mark.parametrize(("version", "problem", "method"), [
    ((5, 8), "HPCSeg needs 3D Slicer 5.10 or newer (Python 3.12); this is Slicer 5.8.", None),
    ((5, 6), "HPCSeg needs 3D Slicer 5.10 or newer (Python 3.12); this is Slicer 5.6.", None),
    ((5, 10), None, "pip_install"),
    ((5, 11), None, "pip_install"),
    ((5, 12), None, "pip_ensure"),
    ((6, 0), None, "pip_ensure"),
])
def test_slicer_versions(version, problem, method):
    from HPCSegLib import dependencies

    got = dependencies.slicer_problem(*version)
    assert (got is None) == (problem is None)
    if problem:
        assert got.startswith(problem) and "\n" not in got
    else:
        assert dependencies.install_method(*version) == method
    assert dependencies.python_problem((3, 9, 10)).startswith("HPCSeg needs 3D Slicer 5.10 or newer")


def test_readme_and_cmakelists_state_the_same_minimum_slicer():
    from HPCSegLib import dependencies

    need = f"{dependencies.MIN_SLICER[0]}.{dependencies.MIN_SLICER[1]}"
    readme = (MODULE_DIR.parent / "README.md").read_text()
    cmake = (MODULE_DIR.parent / "CMakeLists.txt").read_text()
    assert f"Slicer {need} or newer" in readme and f"Slicer {need} or newer" in cmake
    assert "5.8 or newer" not in readme + cmake


SITE = """
[site]
name = "Test site"
contact = "hpc-help@example.org"
default_preset = "gpu"

[presets.gpu]
description = "one GPU"
gpus = 1

[presets.cpu]
description = "no GPU"
gpus = 0

[limits]
max_gpus = 0
"""


def test_site_presets_come_from_a_worker_without_blocking_the_page(isolated, monkeypatch):
    from HPCSegLib.settingspage import SettingsPageLogic

    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    bundle = isolated / "site"
    bundle.mkdir()
    (bundle / "site.toml").write_text(SITE)
    cfg = isolated / "cfg" / "config.toml"
    cfg.parent.mkdir(parents=True)
    cfg.write_text(f'default = "me"\n[profiles.me]\nsite = "{bundle}"\n')
    logic = SettingsPageLogic(worker_python=sys.executable)
    assert logic.refresh().current == "me"
    asking = logic.request_presets("me")
    assert logic.busy and asking.message.startswith("asking the site of me")
    state = None
    for _ in range(3000):  # the panel's timer
        state = logic.pump()
        if state is not None:
            break
        time.sleep(0.02)
    assert state is not None and not logic.busy and not state.error, state
    by = {r["name"]: r for r in state.presets}
    assert set(by) == {"gpu", "cpu"} and by["gpu"]["default"] and by["cpu"]["refusal"] is None
    assert "max_gpus" in by["gpu"]["refusal"]  # the sentence submit would give, shown before anyone submits
    assert state.message == "2 site preset(s), 1 refused with this profile"
    picked = logic.pick_preset("cpu")
    assert picked.values["preset"] == "cpu"
    saved = logic.save("me", picked.values)
    assert not saved.error, saved.message
    assert 'preset = "cpu"' in cfg.read_text()


def test_test_connection_runs_hpcseg_doctor_in_a_worker(isolated, tmp_path, monkeypatch):
    from HPCSegLib.settingspage import SettingsPageLogic

    from .test_settings_site import _site

    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    cfg = isolated / "cfg" / "config.toml"
    cfg.parent.mkdir(parents=True)
    cfg.write_text(f'default = "me"\n[profiles.me]\nsite = "{_site(tmp_path, max_gpus=1)}"\n')
    logic = SettingsPageLogic(worker_python=sys.executable)
    logic.refresh()
    assert logic.request_test("me").message.startswith("testing profile me")
    state = None
    for _ in range(3000):
        if (state := logic.pump()) is not None:
            break
        time.sleep(0.02)
    assert state is not None and state.message == "all ok" and not state.error, state.checks
    assert {"site bundle", "server protocol", "work dir private"} <= {c["item"] for c in state.checks}


def test_an_old_slicer_can_import_the_module_to_read_its_refusal():
    """Slicer 5.8 runs Python 3.9.10: what HPCSeg.py imports before its version check must parse there, or the
    user would see a SyntaxError instead of "HPCSeg needs 3D Slicer 5.10 or newer"."""
    import ast

    early = ("__init__.py", "dependencies.py", "worker.py", "settingspage.py")
    files = [MODULE_DIR / "HPCSeg.py", *sorted((MODULE_DIR / "HPCSegUI").glob("*.py")),
             *(MODULE_DIR / "HPCSegLib" / n for n in early)]
    for f in files:
        text = f.read_text(encoding="utf-8")
        ast.parse(text, str(f), feature_version=(3, 9))
        for newer in ("strict=", "slots=", "kw_only=", "match "):  # 3.10 calls the grammar check does not see
            assert newer not in text.replace("# match", ""), f"{f.name} uses {newer!r} (Python 3.10)"

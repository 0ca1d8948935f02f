"""A server's start: nothing heavy before a model needs it, cheap models first, reloads during a load not lost."""

from __future__ import annotations

import subprocess
import sys
import time

from hpcseg.server.models import builtin_models_dir
from hpcseg.server.registry import ModelRegistry

from .conftest import REPO, write_model


def test_the_app_and_the_classical_models_never_import_torch():
    code = ("import sys, secrets; from hpcseg.server import ServerSettings, create_app; "
            "from hpcseg.server.models import load_model, builtin_models_dir; "
            "create_app(ServerSettings(models_dirs=[builtin_models_dir()], token=secrets.token_urlsafe(32), "
            "device='auto')); "
            "[load_model(builtin_models_dir() / n, 'auto').warmup() for n in "
            "('ct-body', 'deepgrow-regiongrow', 'dextr3d-geodesic')]; "
            "print(sorted(m for m in ('torch', 'monai') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_models_without_torch_load_first_and_a_reload_during_a_load_is_not_lost(tmp_path):
    root = tmp_path / "models"
    net = root / "a-net"  # first in discovery order, but a network: loads after the loader-based ones
    net.mkdir(parents=True)
    (net / "hpcseg-model.json").write_text('{"name": "a-net", "version": "1", "type": "segmentation", '
                                           '"labels": {"x": 1}, "network": {"name": "UNet"}, "weights": "w.pt"}')
    write_model(root, "b-fast")
    order = []

    def loader(folder, device):
        order.append(folder.name)
        time.sleep(0.3)
        from hpcseg.server.models import load_model

        return load_model(folder, device)

    reg = ModelRegistry([root], device="cpu", loader=loader, warmup=False)
    reg.start()
    deadline = time.monotonic() + 10
    while not order and time.monotonic() < deadline:
        time.sleep(0.01)
    write_model(root, "c-late")  # appears while the first load runs (discovery is over)
    reg.reload(background=True)
    assert reg.wait(30)
    assert order[:3] == ["b-fast", "a-net", "c-late"]  # (a failed model is tried again by the second pass)
    assert reg.get("b-fast") and reg.get("c-late") and reg.entry("a-net").state == "failed"
    assert builtin_models_dir().is_dir()

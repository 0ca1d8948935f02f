"""The optimised CPU runtime (OpenVINO) against torch: the same labels, one export per weights, reused."""

from __future__ import annotations

import logging
import shutil

import numpy as np
import pytest
import SimpleITK as sitk

from hpcseg.errors import ModelLoadError
from hpcseg.phantoms import make_phantom
from hpcseg.server import cpu_runtime
from hpcseg.server.models import builtin_models_dir, load_model

pytestmark = pytest.mark.skipif(not cpu_runtime.openvino_available(), reason="openvino is not installed")


@pytest.fixture
def unet_folder(tmp_path):
    folder = tmp_path / "phantom-unet"
    shutil.copytree(builtin_models_dir() / "phantom-unet", folder, ignore=shutil.ignore_patterns(".hpcseg-cache"))
    return folder


def test_openvino_labels_match_torch_and_the_export_is_made_once(unet_folder, monkeypatch, caplog):
    image, _, _ = make_phantom(4, shape=(96, 96, 56), spacing=(1.5, 1.5, 2.0))
    monkeypatch.setenv("HPCSEG_CPU_RUNTIME", "torch")
    model = load_model(unet_folder, "cpu")
    torch_labels = sitk.GetArrayFromImage(model.infer(image, {}))
    assert not (unet_folder / ".hpcseg-cache").exists()  # torch exports nothing

    monkeypatch.setenv("HPCSEG_CPU_RUNTIME", "openvino")
    ov_labels = sitk.GetArrayFromImage(model.infer(image, {}))
    assert len(np.unique(torch_labels)) >= 3  # the comparison is about real labels, not all background
    assert (ov_labels == torch_labels).mean() >= 0.999
    exports = sorted(p.name for p in (unet_folder / ".hpcseg-cache").iterdir())
    assert len(exports) == 2 and exports[0].endswith(".bin") and exports[1].endswith(".xml")
    mtime = (unet_folder / ".hpcseg-cache" / exports[1]).stat().st_mtime_ns

    caplog.set_level(logging.INFO, logger="hpcseg.server.models")
    again = load_model(unet_folder, "cpu")  # a new server process: reuses the export, does not convert again
    assert np.array_equal(sitk.GetArrayFromImage(again.infer(image, {})), ov_labels)
    assert "reusing the export" in caplog.text and "exported the network" not in caplog.text
    assert (unet_folder / ".hpcseg-cache" / exports[1]).stat().st_mtime_ns == mtime
    assert sorted(p.name for p in (unet_folder / ".hpcseg-cache").iterdir()) == exports


def test_the_cache_key_follows_the_weights(unet_folder):
    weights = unet_folder / "model.pt"
    spec = {"network": {"name": "UNet"}}
    before = cpu_runtime.cache_key(weights, spec)
    assert cpu_runtime.cache_key(weights, spec) == before
    assert cpu_runtime.cache_key(weights, {"network": {"name": "UNet", "args": {"x": 1}}}) != before
    weights.write_bytes(weights.read_bytes() + b"\0")
    assert cpu_runtime.cache_key(weights, spec) != before


def test_choosing_the_runtime(monkeypatch):
    monkeypatch.delenv("HPCSEG_CPU_RUNTIME", raising=False)
    assert cpu_runtime.choose_runtime({}, "cpu") == "openvino"  # auto on a CPU, the package installed
    assert cpu_runtime.choose_runtime({}, "cuda") == "torch"  # a GPU always runs torch
    assert cpu_runtime.choose_runtime({"runtime": "torch"}, "cpu") == "torch"
    monkeypatch.setenv("HPCSEG_CPU_RUNTIME", "torch")
    assert cpu_runtime.choose_runtime({}, "cpu") == "torch"
    assert cpu_runtime.choose_runtime({"runtime": "openvino"}, "cpu") == "openvino"  # the manifest wins
    with pytest.raises(ModelLoadError, match="runtime 'onnx' is not one of"):
        cpu_runtime.choose_runtime({"runtime": "onnx"}, "cpu")

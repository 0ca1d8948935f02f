"""`hpcseg models check DIR [--image IMG]` (issue 13, point 4): validates a model folder here, prints what the
server will do to an input, and runs the model once."""

from __future__ import annotations

import json

import SimpleITK as sitk
import torch
from click.testing import CliRunner

from hpcseg.cli import main
from hpcseg.server.models import MANIFEST_NAME

from .test_crop import FRAME, FramedObject, _head


def _run(*args, code=0):
    res = CliRunner().invoke(main, list(args), catch_exceptions=False)
    assert res.exit_code == code, res.output
    return res


def test_check_plans_and_runs_a_cropping_torchscript_model(tmp_path):
    folder = tmp_path / "brain"
    folder.mkdir()
    torch.jit.script(FramedObject()).save(str(folder / "net.ts"))
    (folder / MANIFEST_NAME).write_text(json.dumps({
        "name": "brain", "version": "2", "type": "segmentation", "labels": {"brain": 1}, "weights": "net.ts",
        "spacing": [1.5, 1.5, 1.5], "intensity": [{"normalize": True}, {"minv": -1, "maxv": 1}],
        "extra": {"orientation": "RAS", "crop": {"threshold": 50, "margin_mm": 3, "resize": [FRAME] * 3},
                  "expect": {"modality": "MR"}}}))
    image, truth = _head()
    sitk.WriteImage(image, str(tmp_path / "t1.nii.gz"))
    out = _run("models", "check", str(folder), "--image", str(tmp_path / "t1.nii.gz")).stdout
    assert "brain 2 (segmentation; labels brain 1) served by hpcseg.server.network_models.TorchScriptModel" in out
    assert "axes reoriented to RAS" in out
    assert "1 x 1.2 x 1.5 mm -> 1.5 x 1.5 x 1.5 mm" in out
    assert f"resized to {FRAME} x {FRAME} x {FRAME} voxels" in out and "margin 3 mm" in out
    assert "z-score (mean 0, sd 1), then image min..max onto -1..1" in out
    assert f"sliding window {FRAME} x {FRAME} x {FRAME} voxels" in out
    assert "(1, 1, X, Y, Z)" in out
    assert "ran once on cpu" in out and "brain " in out and "input's geometry: yes" in out
    report = json.loads(_run("models", "check", str(folder), "--json").stdout)  # no image: a phantom
    assert report["run"]["same_geometry"] is True and report["served_by"].endswith("TorchScriptModel")


def test_check_refuses_a_broken_folder_in_one_line(tmp_path):
    folder = tmp_path / "bad"
    folder.mkdir()
    (folder / MANIFEST_NAME).write_text(json.dumps({"name": "bad", "version": "1", "type": "segmentation",
                                                    "labels": {"a": 1}, "weights": "net.ts",
                                                    "extra": {"crop": {"resize": [1, 2]}}}))
    res = _run("models", "check", str(folder), code=1)
    assert res.output.startswith("error: ") and "extra.crop.resize" in res.output and "Traceback" not in res.output

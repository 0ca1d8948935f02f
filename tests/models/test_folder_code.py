"""A manifest's network code (and loader) living in the model folder (issue 13, point 4): a third-party
state-dict model needs only its folder, not a package installed into the server's environment."""

from __future__ import annotations

import json
import sys

import numpy as np
import SimpleITK as sitk
import torch

from hpcseg.server.models import MANIFEST_NAME, load_model

NET_PY = '''
import torch


class Net(torch.nn.Module):
    """Labels voxels above LEVEL (scaled intensity) as 1: a 1x1x1 convolution."""

    def __init__(self, level: float = {level}):
        super().__init__()
        self.conv = torch.nn.Conv3d(1, 2, 1)

    def forward(self, x):
        return self.conv(x)
'''


def _folder(tmp_path, name, level):
    folder = tmp_path / name
    folder.mkdir()
    (folder / "mynet.py").write_text(NET_PY.replace("{level}", str(level)))
    conv = torch.nn.Conv3d(1, 2, 1)
    with torch.no_grad():
        conv.weight[:] = torch.tensor([-1.0, 1.0]).reshape(2, 1, 1, 1, 1)
        conv.bias[:] = torch.tensor([level, -level])
    torch.save({"conv.weight": conv.weight.detach(), "conv.bias": conv.bias.detach()}, folder / "model.pt")
    (folder / MANIFEST_NAME).write_text(json.dumps({
        "name": name, "version": "1", "type": "segmentation", "labels": {"hot": 1},
        "network": {"name": "mynet:Net", "args": {"level": level}}, "weights": "model.pt",
        "intensity": {"a_min": 0, "a_max": 1000, "b_min": 0.0, "b_max": 1.0, "clip": True},
        "roi_size": [16, 16, 16]}))
    return folder


def test_network_code_is_imported_from_the_model_folder(tmp_path):
    arr = np.zeros((20, 20, 20), np.int16)
    arr[:, :, :10] = 300  # scaled 0.3
    arr[:, :, 10:] = 800  # scaled 0.8
    image = sitk.GetImageFromArray(arr)
    low = load_model(_folder(tmp_path, "low", 0.2), device="cpu")
    high = load_model(_folder(tmp_path, "high", 0.5), device="cpu")  # a second mynet.py: its own, not low's
    assert "mynet" not in sys.modules  # the folders' code never joins the server's environment
    assert type(low.net).__module__ == "mynet" and type(low.net) is not type(high.net)
    assert (sitk.GetArrayFromImage(low.infer(image, {})) == 1).all()
    out = sitk.GetArrayFromImage(high.infer(image, {}))
    assert (out[:, :, 10:] == 1).all() and (out[:, :, :10] == 0).all()

"""Cropping to the object (issue 13, point 5): a network made for inputs cut to the object's bounding box and
resized to its fixed input size, served with and without ``extra.crop`` in its manifest."""

from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from hpcseg import imaging
from hpcseg.errors import ModelLoadError
from hpcseg.server.models import MANIFEST_NAME, ModelManifest, load_model

FRAME = 32


class FramedObject(torch.nn.Module):
    """A stand-in for a brain-extraction network trained on crops: it labels the ellipsoid inscribed in its input
    frame, whatever the frame holds, as a network that learnt "the head fills the frame" does."""

    def __init__(self) -> None:
        super().__init__()
        g = (torch.arange(FRAME, dtype=torch.float32) + 0.5) / FRAME * 2 - 1
        x, y, z = torch.meshgrid(g, g, g, indexing="ij")
        inside = (x * x + y * y + z * z <= 1.0).float()
        self.register_buffer("logits", torch.stack([1 - inside, inside])[None] * 10 - 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.logits.expand(x.shape[0], -1, -1, -1, -1) + 0 * x.mean()


def _head(shape=(96, 80, 64), centre=(30, 50, 40), radii=(18, 14, 12)):
    """A bright ellipsoid ("head") off-centre in a larger dark volume, anisotropic voxels; (image, truth zyx)."""
    z, y, x = np.mgrid[: shape[2], : shape[1], : shape[0]]
    truth = ((x - centre[0]) / radii[0]) ** 2 + ((y - centre[1]) / radii[1]) ** 2 + \
            ((z - centre[2]) / radii[2]) ** 2 <= 1
    arr = np.where(truth, 100, 0).astype(np.int16)
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing((1.0, 1.2, 1.5))
    img.SetOrigin((-20.0, 5.0, 7.0))
    return img, truth


def _model(folder, crop):
    folder.mkdir()
    torch.jit.script(FramedObject()).save(str(folder / "net.ts"))
    manifest = {"name": "framed", "version": "1", "type": "segmentation", "labels": {"head": 1}, "weights": "net.ts",
                "intensity": {"normalize": True}, "extra": {"expect": {"modality": "MR"}}}
    if crop:
        manifest["extra"]["crop"] = {"threshold": 50, "margin_mm": 0, "resize": [FRAME] * 3}
    else:
        manifest["roi_size"] = [FRAME] * 3
    (folder / MANIFEST_NAME).write_text(json.dumps(manifest))
    return load_model(folder, device="cpu")


def _dice(a, b):
    return 2 * float((a & b).sum()) / float(a.sum() + b.sum())


def test_crop_to_the_object_and_back(tmp_path):
    image, truth = _head()
    whole = _model(tmp_path / "whole", crop=False).infer(image, {})
    cropped = _model(tmp_path / "cropped", crop=True).infer(image, {})
    assert imaging.same_geometry(cropped, image)
    d_whole = _dice(sitk.GetArrayViewFromImage(whole) == 1, truth)
    d_crop = _dice(sitk.GetArrayViewFromImage(cropped) == 1, truth)
    assert d_crop > 0.9 and d_whole < 0.6, (d_crop, d_whole)
    arr = sitk.GetArrayViewFromImage(cropped)
    assert not arr[:, :, :10].any()  # outside the object's box: 0


def test_crop_spec_is_checked_at_load():
    base = {"name": "m", "version": "1", "type": "segmentation", "labels": {"a": 1}}
    for bad, word in (({"resize": [32, 32]}, "resize"), ({"margin_mm": -1}, "margin_mm"),
                      ({"threshold": "high"}, "threshold"), ({"pad": 1}, "pad")):
        with pytest.raises(ModelLoadError, match=word):
            ModelManifest.from_dict({**base, "extra": {"crop": bad}})

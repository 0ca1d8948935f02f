"""Tiny real models for the server tests (real ``Model`` subclasses: the server cannot tell them from others).

They are named by ``"loader": "tinymodels:<Class>"`` in a test model folder's manifest; the server process finds
this module because the tests put ``tests/server`` on its ``PYTHONPATH``.
"""

from __future__ import annotations

import threading
import time

import numpy as np
import SimpleITK as sitk

from hpcseg.server.models import Model, bad_request
from hpcseg.server.progress import report


class Threshold(Model):
    """Segmentation: ``body`` above -500 HU, ``bone`` above 300 HU, with the manifest's values (1 and 2 by default).

    ``params["sleep"]`` makes it slow (reporting progress every 50 ms, like a network's windows); ``active``/``peak``
    count inferences running at once (in this process).
    """

    active = 0
    peak = 0
    lock = threading.Lock()

    def load(self, device: str) -> None:
        self.device = device
        if self.manifest.extra.get("fail_load"):
            raise RuntimeError("weights file is corrupt (on purpose)")
        time.sleep(float(self.manifest.extra.get("load_seconds", 0)))  # a big network's load, in the small

    def infer(self, image: sitk.Image, params: dict) -> sitk.Image:
        cls = type(self)
        with cls.lock:
            cls.active += 1
            cls.peak = max(cls.peak, cls.active)
        try:
            steps = int(float(params.get("sleep", 0)) / 0.05)
            for k in range(steps):  # a long inference (the SIGTERM and progress tests)
                time.sleep(0.05)
                report(k + 1, steps)
        finally:
            with cls.lock:
                cls.active -= 1
        arr = sitk.GetArrayViewFromImage(image)
        out = np.zeros(arr.shape, np.uint8)
        labels = self.manifest.labels
        out[arr > -500] = labels.get("body", 1)
        out[arr > 300] = labels.get("bone", 2)
        self.keep_labels(out, params)
        mask = sitk.GetImageFromArray(out)
        mask.CopyInformation(image)
        return mask


class Grow(Model):
    """Interactive (deepgrow): a ball of radius 3 voxels around each foreground click, minus background clicks."""

    def load(self, device: str) -> None:
        self.device = device

    def infer(self, image: sitk.Image, params: dict) -> sitk.Image:
        fg = params.get("foreground") or params.get("points")
        if not fg:
            raise bad_request("deepgrow needs at least one foreground point")
        size = image.GetSize()
        zz, yy, xx = np.ogrid[: size[2], : size[1], : size[0]]
        out = np.zeros((size[2], size[1], size[0]), np.uint8)
        for x, y, z in fg:
            out[(xx - x) ** 2 + (yy - y) ** 2 + (zz - z) ** 2 <= 9] = 1
        for x, y, z in params.get("background") or []:
            out[(xx - x) ** 2 + (yy - y) ** 2 + (zz - z) ** 2 <= 9] = 0
        mask = sitk.GetImageFromArray(out)
        mask.CopyInformation(image)
        return mask


class Shrinker(Model):
    """A buggy model: answers on a different grid (the server must refuse to pass that on)."""

    def load(self, device: str) -> None:
        self.device = device

    def warmup(self) -> None:
        pass

    def infer(self, image: sitk.Image, params: dict) -> sitk.Image:
        return sitk.Image([4, 4, 4], sitk.sitkUInt8)

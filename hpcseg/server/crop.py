"""Cropping to the object, for networks that expect their input cut to its bounding box and resized to a fixed size.

Some published models (brain extraction, organ-at-a-time networks) were trained on inputs cropped to the head's or
organ's bounding box and resized to the network's input: served on the whole field of view they see a small object
in a large frame and fail (a third-party brain-extraction model: Dice 0.54 on the whole image, 0.97 cropped). The
manifest declares the step under ``extra.crop``::

    "extra": {"crop": {"threshold": -500, "margin_mm": 5, "resize": [128, 128, 128]}}

- ``threshold`` (number, or ``"otsu"``): foreground is every voxel above it, in the input's own intensities (before
  the intensity chain); default ``"otsu"``.
- ``margin_mm`` (number ≥ 0, default 0): added around the foreground's bounding box on every side (clipped to the
  image).
- ``resize`` ([x, y, z] voxels, optional): the box is resampled (linear) to exactly this size; without it the box
  keeps the model grid's spacing.

The step runs after orientation and spacing (on the model grid) and before the intensity chain; the labels are
resampled back (nearest neighbour) into the input's exact geometry, 0 outside the box. With ``resize`` and no
``roi_size`` the window is the resized box, so the network sees the whole box at once.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import SimpleITK as sitk

from hpcseg.errors import ModelLoadError


def check_crop(spec: Any, source: str = "manifest") -> dict | None:
    """The ``extra.crop`` spec, validated (ModelLoadError naming the bad key), or None when absent."""
    if spec is None:
        return None
    if not isinstance(spec, dict):
        raise ModelLoadError(f"{source}: extra.crop must be an object like "
                             '{"threshold": -500, "margin_mm": 5, "resize": [128, 128, 128]}')
    unknown = sorted(set(spec) - {"threshold", "margin_mm", "resize"})
    if unknown:
        raise ModelLoadError(f"{source}: extra.crop has an unknown key {unknown[0]!r} (known: threshold, margin_mm, "
                             "resize)")
    thr = spec.get("threshold", "otsu")
    if not (thr == "otsu" or (isinstance(thr, (int, float)) and not isinstance(thr, bool))):
        raise ModelLoadError(f"{source}: extra.crop.threshold must be a number or \"otsu\", got {thr!r}")
    margin = spec.get("margin_mm", 0)
    if not (isinstance(margin, (int, float)) and not isinstance(margin, bool) and margin >= 0):
        raise ModelLoadError(f"{source}: extra.crop.margin_mm must be a number ≥ 0, got {margin!r}")
    size = spec.get("resize")
    if size is not None and not (isinstance(size, list) and len(size) == 3 and
                                 all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in size)):
        raise ModelLoadError(f"{source}: extra.crop.resize must be three positive integers (x, y, z), got {size!r}")
    return {"threshold": thr, "margin_mm": float(margin), "resize": size}


def foreground_box(image: sitk.Image, threshold: float | str, margin_mm: float) -> tuple[list[int], list[int]]:
    """(index, size) in voxels (x, y, z) of the box around every voxel above ``threshold``, plus the margin;
    the whole image when nothing is above it."""
    arr = sitk.GetArrayViewFromImage(image)
    if threshold == "otsu":
        threshold = _otsu(image)
    fg = np.argwhere(arr > float(threshold))  # (z, y, x)
    size = list(image.GetSize())
    if fg.size == 0:
        return [0, 0, 0], size
    lo, hi = fg.min(0)[::-1], fg.max(0)[::-1] + 1  # (x, y, z), hi exclusive
    pad = [int(np.ceil(margin_mm / s)) for s in image.GetSpacing()]
    start = [max(0, int(lo[i]) - pad[i]) for i in range(3)]
    stop = [min(size[i], int(hi[i]) + pad[i]) for i in range(3)]
    return start, [stop[i] - start[i] for i in range(3)]


def _otsu(image: sitk.Image) -> float:
    f = sitk.OtsuThresholdImageFilter()
    f.Execute(sitk.Cast(image, sitk.sitkFloat32))
    return float(f.GetThreshold())


def crop_to_foreground(grid: sitk.Image, spec: dict) -> sitk.Image:
    """``grid`` cut to the foreground's box (``spec`` from :func:`check_crop`) and, with ``resize``, resampled to
    exactly that many voxels over the same physical box."""
    start, size = foreground_box(grid, spec["threshold"], spec["margin_mm"])
    box = sitk.RegionOfInterest(grid, size, start)
    if not spec.get("resize"):
        return box
    new_size = [int(s) for s in spec["resize"]]
    spacing = [box.GetSpacing()[i] * size[i] / new_size[i] for i in range(3)]
    # keep the box's outer voxel edges: origin moves by half the change of the voxel size along each axis
    d = np.array(box.GetDirection()).reshape(3, 3)
    shift = d @ np.array([(spacing[i] - box.GetSpacing()[i]) / 2 for i in range(3)])
    origin = (np.array(box.GetOrigin()) + shift).tolist()
    return sitk.Resample(box, new_size, sitk.Transform(), sitk.sitkLinear, origin, spacing, box.GetDirection(),
                         float(np.min(sitk.GetArrayViewFromImage(box))), box.GetPixelID())


def describe_crop(spec: dict | None) -> str:
    """One line for ``hpcseg models check``."""
    if not spec:
        return "none (the whole field of view)"
    thr = spec["threshold"] if spec["threshold"] != "otsu" else "an Otsu threshold"
    text = f"to the box of voxels above {thr}, margin {spec['margin_mm']:g} mm"
    if spec.get("resize"):
        text += f", resized to {' x '.join(map(str, spec['resize']))} voxels (x y z)"
    return text + "; labels go back into the input's geometry, 0 outside the box"

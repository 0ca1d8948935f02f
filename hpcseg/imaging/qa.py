"""Input QA: warnings (sentences for a person) about an input a model may segment badly."""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk

from hpcseg.imaging._common import _fmt
from hpcseg.imaging.reading import nonfinite_warning, read_warnings


# --------------------------------------------------------------------------------------------- QA and geometry
def check_input(image: sitk.Image, expect: dict | None = None) -> list[str]:
    """Warnings (sentences for a person) about an input that a model may segment badly; [] when it looks fine.

    ``expect`` keys (all optional): ``modality`` ("CT" checks for Hounsfield units), ``max_slice_mm`` (5),
    ``max_anisotropy`` (3), ``min_size`` (voxels per axis, 16), ``max_voxels`` (1.5e9).

    Example::

        check_input(mri, {"modality": "CT"})
        # ['intensities span 0 to 1450: not CT-like (CT air is about -1000 HU, bone above 300 HU) ...']
    """
    expect = expect or {}
    warnings: list[str] = read_warnings(image)
    spacing, size = image.GetSpacing(), image.GetSize()
    view = sitk.GetArrayViewFromImage(image)
    if view.dtype.kind == "f":
        bad = int(np.count_nonzero(~np.isfinite(view)))
        if bad:
            warnings.append(nonfinite_warning(bad))
    if str(expect.get("modality", "")).upper() == "CT" and image.GetNumberOfComponentsPerPixel() == 1:
        sample = view[:: max(1, view.shape[0] // 32)]  # a few dozen slices are enough for a range
        finite = sample[np.isfinite(sample)] if sample.dtype.kind == "f" else sample
        lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 0.0)
        if lo > -500 or hi < 300:
            warnings.append(f"intensities span {lo:g} to {hi:g}: not CT-like (CT air is about -1000 HU, bone above "
                            "300 HU) but this model expects CT; is this an MRI, or a CT rescaled or windowed on "
                            "export? the result may be meaningless")
    thick = float(expect.get("max_slice_mm", 5.0))
    if max(spacing) > thick:
        warnings.append(f"voxels are {max(spacing):.3g} mm along one axis (over {thick:g} mm): thin structures "
                        "will be missed; use a thinner reconstruction if there is one")
    ratio = max(spacing) / max(min(spacing), 1e-9)
    if ratio > float(expect.get("max_anisotropy", 3.0)):
        warnings.append(f"spacing {_fmt(spacing)} mm is strongly anisotropic ({ratio:.1f}:1): results along the "
                        "coarse axis will be blocky")
    if min(size) < int(expect.get("min_size", 16)):
        warnings.append(f"the image is tiny ({_fmt(size)} voxels): is it a single slice or a thumbnail?")
    voxels = float(np.prod(size))
    if voxels > float(expect.get("max_voxels", 1.5e9)):
        warnings.append(f"the image is huge ({voxels / 1e6:.0f} M voxels): segmentation will be slow and may "
                        "run out of memory; crop it or use fast mode")
    return warnings


"""Input QA: warnings (sentences for a person) about an input a model may segment badly."""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk

from hpcseg.imaging._common import _fmt
from hpcseg.imaging.reading import nonfinite_warning, read_warnings


# --------------------------------------------------------------------------------------------- QA and geometry
def intensity_range(image: sitk.Image) -> tuple[float, float]:
    """(lowest, highest) finite intensity of a few dozen slices: enough to tell CT from MR, cheap on big images."""
    view = sitk.GetArrayViewFromImage(image)
    sample = view[:: max(1, view.shape[0] // 32)]
    finite = sample[np.isfinite(sample)] if sample.dtype.kind == "f" else sample
    return (float(finite.min()), float(finite.max())) if finite.size else (0.0, 0.0)


def looks_like_ct(image: sitk.Image) -> bool:
    """True when the intensities read as Hounsfield units: air near -1000 (below -500) and bone above 300."""
    if image.GetNumberOfComponentsPerPixel() != 1:
        return False
    lo, hi = intensity_range(image)
    return lo <= -500 and hi >= 300


def declared_modality(value: object) -> str:
    """A model's declared modality in one spelling: "CT", "MR" (also for "MRI"), or "" when it declares none."""
    text = str(value or "").strip().upper()
    return "MR" if text in ("MR", "MRI") else text


def modality_warning(image: sitk.Image, modality: object) -> str | None:
    """A sentence when ``image``'s intensities do not fit a model's declared ``modality`` (CT or MR), else None."""
    modality = declared_modality(modality)
    if modality not in ("CT", "MR") or image.GetNumberOfComponentsPerPixel() != 1:
        return None
    lo, hi = intensity_range(image)
    ct_like = lo <= -500 and hi >= 300
    if modality == "CT" and not ct_like:
        return (f"intensities span {lo:g} to {hi:g}: not CT-like (CT air is about -1000 HU, bone above 300 HU) but "
                "this model expects CT; is this an MRI, or a CT rescaled or windowed on export? the result may be "
                "meaningless")
    if modality == "MR" and ct_like:
        return (f"intensities span {lo:g} to {hi:g}: CT-like (Hounsfield units: air near -1000, bone above 300) but "
                "this model expects MR; the result may be meaningless (pick a CT model with -m, see hpcseg models)")
    return None


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
    mismatch = modality_warning(image, expect.get("modality"))
    if mismatch:
        warnings.append(mismatch)
    # 5 mm is the commonest thick reconstruction and already too thick: warn from the limit on, not past it
    thick = float(expect.get("max_slice_mm", 5.0))
    if max(spacing) >= thick - 1e-3:
        warnings.append(f"voxels are {max(spacing):.3g} mm along one axis ({thick:g} mm or more): thin structures "
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


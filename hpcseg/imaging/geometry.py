"""Geometry: comparing voxel grids, orientation codes, resampling to a spacing or onto a reference grid."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import SimpleITK as sitk

from hpcseg.imaging._common import GEOMETRY_TOLERANCE

_INTERPOLATORS = {"nearest": sitk.sitkNearestNeighbor, "linear": sitk.sitkLinear, "bspline": sitk.sitkBSpline}


def same_geometry(a: sitk.Image, b: sitk.Image, tol: float = GEOMETRY_TOLERANCE) -> bool:
    """True when a and b share a voxel grid: equal size, and spacing, origin and direction equal within ``tol``.

    Tolerance (default 1e-3) is relative: spacing within ``tol × spacing``, origin within ``tol × smallest
    spacing`` (mm), direction cosines within ``tol``. Looser than ITK's 1e-6 because NIfTI stores geometry in
    float32, so a NIfTI round trip moves the origin by ~1e-5 mm.
    """
    if a.GetSize() != b.GetSize() or a.GetDimension() != b.GetDimension():
        return False
    sa, sb = np.array(a.GetSpacing()), np.array(b.GetSpacing())
    if np.any(np.abs(sa - sb) > tol * np.maximum(sa, sb)):
        return False
    if np.any(np.abs(np.array(a.GetOrigin()) - np.array(b.GetOrigin())) > tol * float(min(sa.min(), sb.min()))):
        return False
    return bool(np.all(np.abs(np.array(a.GetDirection()) - np.array(b.GetDirection())) <= tol))


def orientation_direction(code: str) -> tuple[float, ...]:
    """The direction matrix (row-major, as SimpleITK wants) whose axes point to ``code``'s letters.

    Codes name where each axis points, as MONAI's ``Orientation(axcodes=...)`` and ``sitk.DICOMOrient`` do:
    "LPS" is the identity (DICOM), "RAS" flips x and y (NIfTI/MONAI's usual).
    """
    axes = {"L": (1, 0, 0), "R": (-1, 0, 0), "P": (0, 1, 0), "A": (0, -1, 0), "S": (0, 0, 1), "I": (0, 0, -1)}
    code = code.upper()
    if len(code) != 3 or any(c not in axes for c in code) or len({"LRPAIS".index(c) // 2 for c in code}) != 3:
        raise ValueError(f"orientation {code!r} is not three of L/R, P/A, S/I, one per axis (e.g. 'RAS')")
    cols = np.array([axes[c] for c in code], float).T
    return tuple(float(v) for v in cols.ravel())


def resample(image: sitk.Image, spacing: Sequence[float] | None = None, interpolator: str = "linear",
             direction: Sequence[float] | None = None, default_value: float | None = None) -> sitk.Image:
    """Resample onto a grid with ``spacing`` (and ``direction``) covering the same physical field of view.

    The new grid's outer voxel edges sit on the old ones (so down- then up-sampling lines up). ``spacing`` None keeps
    the spacing (each new axis that of the old axis it runs along); ``direction`` None keeps the direction.
    ``interpolator``: "linear", "nearest" (labels) or "bspline". Pixels outside the input get ``default_value``
    (default: the image minimum, e.g. air for CT; 0 for nearest).

    Example::

        iso = resample(ct, (1.5, 1.5, 1.5))
    """
    old_spacing, old_size = np.array(image.GetSpacing()), np.array(image.GetSize())
    old_dir = np.array(image.GetDirection()).reshape(3, 3)
    new_dir = old_dir if direction is None else np.array(direction, float).reshape(3, 3)
    if spacing is None:  # each new axis keeps the spacing of the old axis it runs along (a reorientation)
        new_spacing = old_spacing[np.argmax(np.abs(new_dir.T @ old_dir), axis=1)]
    else:
        new_spacing = np.array([float(s) for s in spacing])
    # The field of view: the 8 outer corners of the input's voxels, in physical space, then in the new axes.
    corners = np.array([[i, j, k] for i in (-0.5, old_size[0] - 0.5) for j in (-0.5, old_size[1] - 0.5)
                        for k in (-0.5, old_size[2] - 0.5)])
    phys = np.array(image.GetOrigin()) + (old_dir @ (corners * old_spacing).T).T
    local = phys @ new_dir  # coordinates along the new axes (new_dir is orthonormal)
    lo, hi = local.min(0), local.max(0)
    new_size = np.maximum(1, np.round((hi - lo) / new_spacing - 1e-6)).astype(int)
    centre = (lo + hi) / 2
    origin_local = centre - (new_size - 1) / 2 * new_spacing
    new_origin = new_dir @ origin_local
    if np.allclose(new_spacing, old_spacing) and np.allclose(new_dir, old_dir) and np.array_equal(new_size, old_size):
        return image
    if default_value is None:
        default_value = 0.0 if interpolator == "nearest" else float(np.min(sitk.GetArrayViewFromImage(image)))
    return sitk.Resample(image, [int(n) for n in new_size], sitk.Transform(), _interpolator(interpolator),
                         [float(v) for v in new_origin], [float(s) for s in new_spacing],
                         [float(v) for v in new_dir.ravel()], float(default_value), image.GetPixelID())


def resample_to_reference(mask: sitk.Image, reference: sitk.Image, interpolator: str = "nearest") -> sitk.Image:
    """Resample ``mask`` (labels: nearest neighbour) onto ``reference``'s grid; the result has its exact geometry."""
    out = sitk.Resample(mask, reference, sitk.Transform(), _interpolator(interpolator), 0.0, mask.GetPixelID())
    out.CopyInformation(reference)
    return out


def _interpolator(name: str) -> int:
    try:
        return _INTERPOLATORS[name]
    except KeyError:
        raise ValueError(f"interpolator {name!r} is not one of {sorted(_INTERPOLATORS)}") from None



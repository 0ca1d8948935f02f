"""The ct-body segmentation as it was before issue 11: scipy.ndimage morphology with an ellipsoid element.

Kept verbatim (only renamed) as the baseline of ``bench/bench_ct_body.py`` and of the tests that check the fast
implementation in :mod:`hpcseg.server.classical_models` gives the same labels. Not used by the server.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

BODY_HU, AIR_HU, BONE_HU = -500.0, -400.0, 250.0


def segment_ct_body_reference(hu: np.ndarray, spacing: tuple[float, ...], axial: int = 0) -> np.ndarray:
    """Label array (uint8: 1 body, 2 lungs, 3 bone) of a CT array in (z, y, x) order; see the module docstring."""
    sp = np.array(spacing[::-1], float)  # mm per voxel along (z, y, x)
    voxel_ml = float(np.prod(sp)) / 1000.0
    raw = hu > BODY_HU
    radius = np.maximum(1, np.round(3.0 / sp)).astype(int)  # ~3 mm, at least one voxel per axis
    opened = ndimage.binary_opening(raw, structure=_ellipsoid(radius))
    body = _largest_component(opened)
    if not body.any():
        return np.zeros(hu.shape, np.uint8)
    body = ndimage.binary_dilation(body, structure=_ellipsoid(radius)) & raw | body  # give back the opened rim
    body = _fill_slices(body, axial)

    air = (hu < AIR_HU) & body
    lab, n = ndimage.label(air)
    lungs = np.zeros(hu.shape, bool)
    if n:
        sizes = np.bincount(lab.ravel())[1:]
        keep = np.flatnonzero((sizes >= 0.2 * sizes.max()) & (sizes * voxel_ml >= 10.0)) + 1
        if keep.size:
            lungs = np.isin(lab, keep)
            lungs = ndimage.binary_closing(lungs, structure=_ellipsoid(radius), border_value=0) & body
            lungs = _fill_slices(lungs, axial)

    bone = (hu > BONE_HU) & body  # bone wins over lung: ribs bordering a lung were swallowed by its closing
    lab, n = ndimage.label(bone)
    if n:
        sizes = np.bincount(lab.ravel())
        small = sizes * voxel_ml < 0.1
        small[0] = False
        bone[small[lab]] = False
        bone = _fill_slices(bone, axial, max_hole_mm2=1000.0, spacing=sp) & body

    out = np.zeros(hu.shape, np.uint8)
    out[body] = 1
    out[lungs] = 2
    out[bone] = 3
    return out


def _largest_component(mask: np.ndarray) -> np.ndarray:
    lab, n = ndimage.label(mask)
    if n == 0:
        return mask
    sizes = np.bincount(lab.ravel())
    sizes[0] = 0
    return lab == int(np.argmax(sizes))


def _fill_slices(mask: np.ndarray, axis: int, max_hole_mm2: float | None = None,
                 spacing: np.ndarray | None = None) -> np.ndarray:
    """Fill holes in every 2D slice across ``axis`` (a 3D fill would miss holes open at the top or bottom).

    With ``max_hole_mm2`` only holes up to that area are filled: the inside of a vertebra, not the whole chest
    that ribs, sternum and spine enclose in some slices.
    """
    out = np.moveaxis(mask.copy(), axis, 0)
    for k in range(out.shape[0]):
        if out[k].any():
            out[k] = ndimage.binary_fill_holes(out[k])
    out = np.moveaxis(out, 0, axis)
    if max_hole_mm2 is not None and spacing is not None:
        holes = out & ~mask
        in_plane = np.zeros((3, 3, 3), bool)  # 4-connected within a slice, never across slices
        in_plane[tuple(slice(None) if i != axis else 1 for i in range(3))] = ndimage.generate_binary_structure(2, 1)
        lab, n = ndimage.label(holes, structure=in_plane)
        if n:
            area = float(np.prod(np.delete(spacing, axis)))
            big = np.bincount(lab.ravel()) * area > max_hole_mm2
            big[0] = False
            out[big[lab]] = False
    return out


def _ellipsoid(radius: np.ndarray) -> np.ndarray:
    """A boolean ellipsoid structuring element with per-axis radii in voxels."""
    grids = np.ogrid[tuple(slice(-r, r + 1) for r in radius)]
    return sum((g / max(r, 1)) ** 2 for g, r in zip(grids, radius, strict=True)) <= 1.0

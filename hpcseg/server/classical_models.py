"""``ct-body``: body, lungs and bone of any CT by Hounsfield thresholds and morphology (no network, no torch).

Why: a model that works on every real CT with nothing to download, fast on a CPU; the first thing a new user can
run, and a sanity check for a server. Steps (numpy arrays in (z, y, x) order, HU)::

    body   voxels > -500 HU, opened (3 mm) to cut the table and cables off, largest connected component,
           holes filled slice by slice along the axial axis (lungs and bowel gas are inside the body)
    lungs  air (< -400 HU) inside the body; connected components of at least 20 % of the largest air component
           and 10 mL (lungs, and the trachea where it joins them), closed and hole-filled so vessels count as lung
    bone   > 250 HU inside the body (over lung where they touch), components of at least 0.1 mL, holes filled per
           slice (cancellous bone inside cortical rims)

Labels: 1 body (everything else inside the body), 2 lungs, 3 bone. Known limits: contrast-filled vessels above
250 HU are called bone; a large pocket of bowel gas may be called lung; metal artefacts follow their HU.
A non-CT input (no air at -1000 HU, no bone) gets a QA warning in the log and is segmented anyway.

Example::

    model = load_model(builtin_models_dir() / "ct-body")
    mask = model.infer(read_image("ct.nii.gz"), {"label_names": ["lungs"], "fast": True})
"""

from __future__ import annotations

import logging

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from hpcseg import imaging
from hpcseg.errors import ImageError
from hpcseg.server.modelbase import Model

log = logging.getLogger("hpcseg.server.models")

BODY_HU, AIR_HU, BONE_HU = -500.0, -400.0, 250.0


class CTBodyModel(Model):
    """Threshold + morphology segmentation of body, lungs and bone (see the module docstring)."""

    def load(self, device: str) -> None:
        self.device = "cpu"  # scipy: the CPU whatever the server's device

    def warmup(self) -> None:
        """Nothing is lazily initialised; run a tiny volume anyway (without the QA warnings of a real request)."""
        segment_ct_body(np.full((8, 8, 8), -1000, np.int16), (1.0, 1.0, 1.0))

    def infer(self, image: sitk.Image, params: dict) -> sitk.Image:
        if image.GetDimension() != 3 or image.GetNumberOfComponentsPerPixel() != 1:
            raise ImageError("ct-body needs a 3D single-channel CT")
        wanted = self.wanted_labels(params)
        for warning in imaging.check_input(image, {"modality": "CT", **self.expect}):
            log.warning("ct-body: %s", warning)
        work = imaging.resample(image, [2 * s for s in image.GetSpacing()]) if params.get("fast") else image
        arr = sitk.GetArrayViewFromImage(work)
        labels = segment_ct_body(arr, work.GetSpacing(), axial_axis(work))
        labels[~np.isin(labels, list(wanted.values()))] = 0
        out = sitk.GetImageFromArray(labels)
        out.CopyInformation(work)
        return imaging.resample_to_reference(out, image) if work is not image else out


def axial_axis(image: sitk.Image) -> int:
    """The numpy axis (of the (z, y, x) array) that runs closest to head-feet: slices across it are axial."""
    d = np.array(image.GetDirection()).reshape(3, 3)
    itk_axis = int(np.argmax(np.abs(d[2])))
    return 2 - itk_axis


def segment_ct_body(hu: np.ndarray, spacing: tuple[float, ...], axial: int = 0) -> np.ndarray:
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

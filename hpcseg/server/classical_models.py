"""``ct-body``: body, lungs and bone of any CT by Hounsfield thresholds and morphology (no network, no torch).

Why: a model that works on every real CT with nothing to download, fast on a CPU; the first thing a new user can
run, and a sanity check for a server. Steps (numpy arrays in (z, y, x) order, HU)::

    body   voxels > -500 HU, opened (3 mm) to cut the table and cables off, largest connected component,
           holes filled slice by slice along the axial axis (lungs and bowel gas are inside the body)
    lungs  air (< -400 HU) inside the body; connected components of at least 20 % of the largest air component
           and 10 mL (lungs, and the trachea where it joins them), closed and hole-filled so vessels count as lung
    bone   > 250 HU inside the body (over lung where they touch), components of at least 0.1 mL, holes filled per
           slice (cancellous bone inside cortical rims)

Every step is linear in the voxels and exact: the ellipsoid opening/closing by row runs packed into bits
(:class:`_Ellipsoid`), connected components with ``cc3d``, hole filling with ``fill_voids``; lungs and bone in two
threads. The labels are those of the scipy implementation this replaced (``bench/ct_body_reference.py``, the
baseline of ``bench/bench_ct_body.py``), at about a tenth of its time.

Labels: 1 body (everything else inside the body), 2 lungs, 3 bone. Known limits: contrast-filled vessels above
250 HU are called bone; a large pocket of bowel gas may be called lung; metal artefacts follow their HU.
A non-CT input (no air at -1000 HU, no bone) gets a QA warning in the log and is segmented anyway.

Example::

    model = load_model(builtin_models_dir() / "ct-body")
    mask = model.infer(read_image("ct.nii.gz"), {"label_names": ["lungs"], "fast": True})
"""

from __future__ import annotations

import logging
import os
from concurrent.futures import ThreadPoolExecutor

import cc3d
import fastremap
import fill_voids
import numpy as np
import SimpleITK as sitk

from hpcseg import imaging
from hpcseg.errors import ImageError
from hpcseg.server.modelbase import Model
from hpcseg.server.progress import report

log = logging.getLogger("hpcseg.server.models")

BODY_HU, AIR_HU, BONE_HU = -500.0, -400.0, 250.0


class CTBodyModel(Model):
    """Threshold + morphology segmentation of body, lungs and bone (see the module docstring)."""

    cpu_only = True

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
        if len(wanted) < len(self.manifest.labels):
            labels[~np.isin(labels, list(wanted.values()))] = 0
        out = sitk.GetImageFromArray(labels)
        out.CopyInformation(work)
        return imaging.resample_to_reference(out, image) if work is not image else out


def axial_axis(image: sitk.Image) -> int:
    """The numpy axis (of the (z, y, x) array) that runs closest to head-feet: slices across it are axial."""
    d = np.array(image.GetDirection()).reshape(3, 3)
    itk_axis = int(np.argmax(np.abs(d[2])))
    return 2 - itk_axis


def segment_ct_body(hu: np.ndarray, spacing: tuple[float, ...], axial: int = 0,
                    threads: int | None = None) -> np.ndarray:
    """Label array (uint8: 1 body, 2 lungs, 3 bone) of a CT array in (z, y, x) order; see the module docstring.

    The same labels, voxel for voxel, as the scipy implementation this replaced (kept as the benchmark's baseline
    in ``bench/ct_body_reference.py``), from linear-time parts: the ellipsoid morphology of :class:`_Ellipsoid`,
    ``cc3d`` connected components, ``fill_voids`` per slice. Lungs and bone are found in two threads (``threads``,
    default: the CPUs this process may use). Progress (steps done of 5) goes to the request's callback, if any
    (:func:`hpcseg.server.progress.report`; it may raise to abort).
    """
    threads = threads or _cpus()
    sp = np.array(spacing[::-1], float)  # mm per voxel along (z, y, x)
    voxel_ml = float(np.prod(sp)) / 1000.0
    radius = np.maximum(1, np.round(3.0 / sp)).astype(int)  # ~3 mm, at least one voxel per axis
    ball = _Ellipsoid(radius)
    raw = _compare(hu, ">", BODY_HU)
    body = _largest_component(ball.dilate(ball.erode(raw)))  # opening: cut the table and cables off
    report(1, 5)
    out = np.zeros(hu.shape, np.uint8)
    if not body.any():
        report(5, 5)
        return out
    body |= ball.dilate(body) & raw  # give back the opened rim
    del raw
    report(2, 5)
    body = _fill_slices(body, axial, threads=threads)
    report(3, 5)
    # Everything from here on lies inside the body: work on its bounding box only.
    box = _bbox(body)
    body_b, hu_b = body[box], hu[box]

    def lungs_of() -> np.ndarray | None:
        air = _compare(hu_b, "<", AIR_HU) & body_b
        lab, sizes = _components(air)
        del air
        if sizes.size <= 1:
            return None
        sizes[0] = 0  # the background is no component
        keep = (sizes >= 0.2 * sizes.max()) & (sizes * voxel_ml >= 10.0)
        keep[0] = False
        if not keep.any():
            return None
        lungs = keep[lab]
        del lab
        lungs = ball.erode(ball.dilate(lungs)) & body_b  # closing (border 0, as scipy's border_value=0)
        return _fill_slices(lungs, axial, threads=1)

    def bone_of() -> np.ndarray:
        bone = _compare(hu_b, ">", BONE_HU) & body_b  # bone wins over lung: ribs bordering a lung were
        lab, sizes = _components(bone)                 # swallowed by its closing
        if sizes.size > 1:
            small = sizes * voxel_ml < 0.1
            small[0] = False
            if small.any():
                bone[small[lab]] = False
            del lab
            bone = _fill_slices(bone, axial, max_hole_mm2=1000.0, spacing=sp, threads=1) & body_b
        return bone

    if threads > 1:
        with ThreadPoolExecutor(2) as pool:
            lungs_f, bone_f = pool.submit(lungs_of), pool.submit(bone_of)
            lungs, bone = lungs_f.result(), bone_f.result()
    else:
        lungs, bone = lungs_of(), bone_of()
    report(4, 5)
    out_b = body_b.view(np.uint8).copy()  # 1 inside the body
    if lungs is not None:
        np.putmask(out_b, lungs, np.uint8(2))
    np.putmask(out_b, bone, np.uint8(3))
    out[box] = out_b
    report(5, 5)
    return out


def _compare(hu: np.ndarray, op: str, value: float) -> np.ndarray:
    """``hu > value`` or ``hu < value``, without promoting an integer array to float (4× less memory traffic)."""
    v: float | np.integer = value
    if np.issubdtype(hu.dtype, np.integer):
        info = np.iinfo(hu.dtype)
        # for integers, > v is > floor(v) and < v is < ceil(v); clip so the scalar fits the array's type
        v = hu.dtype.type(min(max(np.floor(value) if op == ">" else np.ceil(value), info.min), info.max))
        if op == ">" and np.floor(value) < info.min:
            return np.ones(hu.shape, bool)
        if op == "<" and np.ceil(value) > info.max:
            return np.ones(hu.shape, bool)
    return hu > v if op == ">" else hu < v


def _components(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """6-connected components (as scipy's ``label`` default) and their sizes (index 0: the background)."""
    lab, n = cc3d.connected_components(mask, connectivity=6, return_N=True)
    sizes = np.zeros(n + 1, np.int64)
    if n:
        values, counts = fastremap.unique(lab, return_counts=True)
        sizes[values] = counts
    return lab, sizes


def _bbox(mask: np.ndarray) -> tuple[slice, ...]:
    """The smallest box holding every True voxel of a non-empty ``mask``."""
    box = []
    for axis in range(mask.ndim):
        hit = np.flatnonzero(mask.any(axis=tuple(a for a in range(mask.ndim) if a != axis)))
        box.append(slice(int(hit[0]), int(hit[-1]) + 1))
    return tuple(box)


class _Ellipsoid:
    """Binary erosion/dilation by the ellipsoid element of :func:`_ellipsoid`, exactly as scipy's, in a few passes.

    Why not scipy: its ``binary_erosion`` visits every element offset for every voxel, single-threaded (47 of the
    65 s of a 512×512×300 CT before issue 11). Here the element is taken apart instead. For each offset ``(dz, dy)``
    of its projection onto the (z, y) plane it holds one contiguous run of x offsets ``[-h, h]``. So a voxel
    survives erosion when, for every ``(dz, dy)``, the row ``(z + dz, y + dy)`` is foreground over ``[x - h, x + h]``:

    1. row erosions ``R_h`` (h = 0..r_x) along x, each from the previous by two shifted ANDs (in place);
    2. each ``R_h`` packed 8 voxels to a byte along x (``np.packbits``);
    3. the packed ``R_h(dz, dy)`` shifted by ``(dz, dy)`` (slicing: whole bytes, no bit shifts) and ANDed.

    Step 3 is ~π·r_z·r_y ANDs over an eighth of the volume's bytes, so the whole erosion costs a few passes over the
    volume. Dilation is the complement's erosion (the element is symmetric), with the border counted as foreground
    of the complement: scipy's ``border_value=0`` in both cases. Every step is exact: the labels are identical.
    """

    def __init__(self, radius: np.ndarray, threads: int = 1) -> None:
        element = _ellipsoid(np.asarray(radius))
        cz, cy = element.shape[0] // 2, element.shape[1] // 2
        self.runs: list[tuple[int, int, int]] = []  # (dz, dy, h): row x offsets [-h, h] at (dz, dy)
        for iz in range(element.shape[0]):
            for iy in range(element.shape[1]):
                n = int(element[iz, iy].sum())
                if n:
                    self.runs.append((iz - cz, iy - cy, n // 2))
        self.threads = threads

    def erode(self, mask: np.ndarray, border: bool = False) -> np.ndarray:
        """Erosion of a (z, y, x) bool ``mask``; ``border`` is the value assumed outside the array."""
        nz, ny, nx = mask.shape
        hs = sorted({h for _, _, h in self.runs})
        packed: dict[int, np.ndarray] = {}
        row = np.ascontiguousarray(mask, dtype=bool)
        for h in range(hs[-1] + 1):
            if h:  # R_h[x] = R_{h-1}[x - 1] & R_{h-1}[x] & R_{h-1}[x + 1]; outside the row: ``border``
                nxt = row.copy()
                nxt[..., 1:] &= row[..., :-1]
                nxt[..., :-1] &= row[..., 1:]
                if not border:
                    nxt[..., 0] = False
                    nxt[..., -1] = False
                row = nxt
            if h in hs:
                packed[h] = np.packbits(row, axis=-1)
        out = np.full(packed[hs[0]].shape, 0xFF, np.uint8)
        for dz, dy, h in self.runs:
            z0, z1, y0, y1 = max(0, -dz), min(nz, nz - dz), max(0, -dy), min(ny, ny - dy)
            if z0 < z1 and y0 < y1:
                out[z0:z1, y0:y1] &= packed[h][z0 + dz : z1 + dz, y0 + dy : y1 + dy]
            if not border:  # rows of the element outside the array: background there
                out[:z0] = 0
                out[z1:] = 0
                out[:, :y0] = 0
                out[:, y1:] = 0
        return np.unpackbits(out, axis=-1, count=nx).view(bool)

    def dilate(self, mask: np.ndarray) -> np.ndarray:
        """Dilation of a (z, y, x) bool ``mask`` (nothing outside the array)."""
        return ~self.erode(~mask, border=True)


def _largest_component(mask: np.ndarray) -> np.ndarray:
    lab, sizes = _components(mask)
    if sizes.size <= 1:
        return mask
    sizes[0] = 0
    return lab == int(np.argmax(sizes))


def _fill_slices(mask: np.ndarray, axis: int, max_hole_mm2: float | None = None,
                 spacing: np.ndarray | None = None, threads: int = 1) -> np.ndarray:
    """Fill holes in every 2D slice across ``axis`` (a 3D fill would miss holes open at the top or bottom).

    With ``max_hole_mm2`` only holes up to that area are filled: the inside of a vertebra, not the whole chest
    that ribs, sternum and spine enclose in some slices. Slices go to ``threads`` threads (the fill releases the GIL).
    """
    out = np.moveaxis(mask.copy(), axis, 0)
    src = np.moveaxis(mask, axis, 0)
    max_px = None
    if max_hole_mm2 is not None and spacing is not None:
        max_px = max_hole_mm2 / float(np.prod(np.delete(spacing, axis)))

    def one(k: int) -> None:
        sl = src[k]
        if not sl.any():
            return
        filled = fill_voids.fill(np.ascontiguousarray(sl), in_place=False)
        if max_px is not None:
            holes = filled & ~sl
            if holes.any():
                lab, n = cc3d.connected_components(holes, connectivity=4, return_N=True)
                big = np.bincount(lab.ravel()) > max_px
                big[0] = False
                if big.any():
                    filled[big[lab]] = False
        out[k] = filled

    if threads > 1 and out.shape[0] > 1:
        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(one, range(out.shape[0])))
    else:
        for k in range(out.shape[0]):
            one(k)
    return np.moveaxis(out, 0, axis)


def _cpus() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def _ellipsoid(radius: np.ndarray) -> np.ndarray:
    """A boolean ellipsoid structuring element with per-axis radii in voxels."""
    grids = np.ogrid[tuple(slice(-r, r + 1) for r in radius)]
    return sum((g / max(r, 1)) ** 2 for g, r in zip(grids, radius, strict=True)) <= 1.0

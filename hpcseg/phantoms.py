"""Synthetic CT phantoms with known labels, deterministic from a seed.

Why: tests, benchmarks, the built-in ``phantom-unet`` model and README's first command all need CT-like volumes
whose true segmentation is known, without downloading patient data.

A phantom is a torso seen in an axial CT, in Hounsfield units (HU). Two layouts:

- ``body_mm=None`` (the default, for small fast tests): the torso fills the field of view whatever its shape and
  spacing (physical size = shape × spacing), so a 64×64×48 volume at 1.5 mm holds a torso about 75 mm wide.
- ``body_mm=W`` (realistic, for training and validating networks): the torso is W mm wide (left to right) wherever
  the field of view is; anatomy lives in world millimetres around (0, 0, 0), and the field of view (shape ×
  spacing, placed by ``origin``) is a window onto it: larger than the body (air around it) or smaller (the body
  cut at the image's edge, as in a reduced reconstruction field of view). :func:`body_width_mm` draws W in
  300–450 mm, the range of adult torsos; :func:`realistic_phantom` draws W, field of view, spacing and noise.

    label  name    what                                                       HU
    0      —       air outside the body (-1000) and the patient table (~200)
    1      body    soft tissue (~40) with a subcutaneous fat rim (~-90)       40 / -90
    2      lungs   two ellipsoids in the upper half, with a few small vessels  -850 (vessels 40)
    3      bone    a vertebral column (posterior) and rib-like rings           700
    4      liver   an ellipsoid on the patient's right, below the right lung   60

Axes follow DICOM/ITK (LPS, identity direction): +x is the patient's left, +y posterior (the table side), +z
superior. Each seed shifts, scales and slightly rotates the anatomy; a smooth bias field (±8 HU) and Gaussian noise
(σ 10 HU, then a 0.5-voxel blur as a reconstruction kernel would: about 6 HU left in soft tissue) are added. Pixels
are int16. The noise sets how well the liver can be told from muscle at its edge (20 HU apart: a contrast-to-noise
ratio of about 3); at σ 20 even a perfect per-voxel classifier would mislabel a third of the liver's edge voxels.

Example::

    image, labels, names = make_phantom(3, shape=(64, 64, 48), spacing=(1.5, 1.5, 2.0))
    names == {"body": 1, "lungs": 2, "bone": 3, "liver": 4}
    write_sample_ct("sample_ct.nii.gz")      # 256×256×120 at 1.5×1.5×2.5 mm (a torso 296 mm wide)
    image, labels, _ = make_phantom(3, shape=(128, 128, 64), spacing=(2.5, 2.5, 2.5), body_mm=body_width_mm(3))
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

LABELS: dict[str, int] = {"body": 1, "lungs": 2, "bone": 3, "liver": 4}
HU = {"air": -1000.0, "soft": 40.0, "fat": -90.0, "lung": -850.0, "bone": 700.0, "liver": 60.0, "table": 200.0}
#: Adult torso widths (left to right) that realistic phantoms are drawn from, in mm.
BODY_MM = (300.0, 450.0)
# The fill-the-view layout puts the body's semi-axis at 0.78 of the half field of view laterally, and the
# anatomy's z extent at 0.78 of the lateral scale (the sample CT: 384 mm wide, 300 mm high): realistic phantoms
# keep those proportions.
_BODY_SEMI = 0.78
_Z_RATIO = 0.78


def body_width_mm(seed: int) -> float:
    """A torso width in :data:`BODY_MM` drawn from ``seed`` (its own stream: the phantom's voxels do not change)."""
    return float(np.random.default_rng([seed, 7]).uniform(*BODY_MM))


def realistic_phantom(seed: int, fov_range: tuple[float, float] = (160.0, 520.0),
                      spacing_range: tuple[float, float] = (1.0, 2.5),
                      noise_range: tuple[float, float] = (5.0, 20.0),
                      z_fov_range: tuple[float, float] = (120.0, 400.0),
                      ) -> tuple[sitk.Image, sitk.Image, dict[str, int]]:
    """A phantom at a realistic size with field of view, spacing, noise and centre drawn from ``seed``.

    The in-plane field of view (mm) and spacing are drawn from the ranges (a 160 mm view cuts the torso, a
    520 mm one has air around it), the axial extent from ``z_fov_range`` at 1–2.5 times the in-plane spacing (at
    most 5 mm), and the view's centre is shifted by up to 10 % of the torso's width.

    Example::

        image, labels, names = realistic_phantom(12)
    """
    rng = np.random.default_rng([seed, 11])
    sp = float(rng.uniform(*spacing_range))
    n = max(16, round(float(rng.uniform(*fov_range)) / sp))
    sz = float(min(5.0, sp * rng.uniform(1.0, 2.5)))
    nz = max(16, round(float(rng.uniform(*z_fov_range)) / sz))
    width = body_width_mm(seed)
    centre = [float(c) for c in rng.uniform(-0.1, 0.1, 3) * width]
    shape, spacing = (n, n, nz), (sp, sp, sz)
    origin = [c - (k - 1) * s / 2 for c, k, s in zip(centre, shape, spacing, strict=True)]
    return make_phantom(seed, shape, spacing, origin=origin, noise=float(rng.uniform(*noise_range)), body_mm=width)


def make_phantom(seed: int, shape: Sequence[int] = (64, 64, 48), spacing: Sequence[float] = (1.5, 1.5, 2.0),
                 origin: Sequence[float] | None = None, noise: float = 10.0,
                 table: bool = True, body_mm: float | None = None) -> tuple[sitk.Image, sitk.Image, dict[str, int]]:
    """Make one phantom: ``(image int16 HU, labels uint8, label names)`` in the same geometry.

    ``shape`` and ``spacing`` are in ITK order (x, y, z). ``origin`` defaults to centring the field of view on
    (0, 0, 0). ``body_mm`` None fills the field of view with the torso; a width in mm draws a torso that wide in
    world coordinates (see the module docstring). The same seed and arguments always give the same voxels.

    Example::

        image, labels, names = make_phantom(7, shape=(80, 80, 40), spacing=(1.2, 1.2, 2.4))
    """
    if origin is None:
        origin = [-(n * s) / 2 + s / 2 for n, s in zip(shape, spacing, strict=True)]
    shape_t, spacing_t = tuple(int(s) for s in shape), tuple(float(s) for s in spacing)
    if body_mm is None:
        half = tuple(n * s / 2 for n, s in zip(shape_t, spacing_t, strict=True))
        centre = (0.0, 0.0, 0.0)
    else:
        # semi-axis = 0.78·sx·half: the seed's own scale jitter is divided out so that the width is body_mm
        sx = _scale_x(seed)
        half_xy = float(body_mm) / 2 / (_BODY_SEMI * sx)
        half = (half_xy, half_xy, half_xy * _Z_RATIO)
        centre = tuple(float(o) + (n - 1) * s / 2 for o, n, s in zip(origin, shape_t, spacing_t, strict=True))
    hu, lab = _draw(seed, shape_t, spacing_t, noise, table, half, centre, body_mm is not None)
    image = sitk.GetImageFromArray(hu)
    labels = sitk.GetImageFromArray(lab)
    for im in (image, labels):
        im.SetSpacing([float(s) for s in spacing])
        im.SetOrigin([float(o) for o in origin])
    return image, labels, dict(LABELS)


def write_sample_ct(path: str | Path, seed: int = 0, shape: Sequence[int] = (256, 256, 120),
                    spacing: Sequence[float] = (1.5, 1.5, 2.5), labels_path: str | Path | None = None) -> Path:
    """Write a realistic-size sample CT (NIfTI, int16 HU) for a first try; optionally its labels too.

    Example::

        write_sample_ct("sample_ct.nii.gz", labels_path="sample_ct_truth.nii.gz")
    """
    from hpcseg.imaging import write_mask  # imaging imports nothing from here: no cycle

    image, labels, names = make_phantom(seed, shape, spacing)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(image, str(path), useCompression=True)
    if labels_path is not None:
        write_mask(labels, labels_path, names, image)
    return path


def _scale_x(seed: int) -> float:
    """The lateral scale factor ``_draw`` draws for ``seed`` (the same first three draws)."""
    rng = np.random.default_rng(seed)
    scale = rng.uniform(0.88, 1.08)
    return float(scale * rng.uniform(0.95, 1.05))


def _draw(seed: int, shape: tuple[int, int, int], spacing: tuple[float, float, float], noise: float,
          table: bool, half: tuple[float, float, float], centre: tuple[float, float, float],
          physical: bool) -> tuple[np.ndarray, np.ndarray]:
    """The voxels, as numpy arrays in SimpleITK's (z, y, x) order.

    Anatomy is drawn in normalised coordinates: world millimetres over ``half`` (for the fill-the-view layout:
    the half field of view, so [-1, 1] spans it), ``centre`` being the field of view's centre in world mm.
    """
    rng = np.random.default_rng(seed)
    nx, ny, nz = shape

    def axis(n: int, sp: float, h: float, c: float) -> np.ndarray:
        if not physical:  # [-1, 1] across the field of view, centred on voxel centres
            return (np.arange(n, dtype=np.float32) + 0.5) / n * 2 - 1
        return ((np.float32(c) + (np.arange(n, dtype=np.float32) + np.float32(0.5) - np.float32(n / 2))
                 * np.float32(sp)) / np.float32(h))

    x = axis(nx, spacing[0], half[0], centre[0])[None, None, :]
    y = axis(ny, spacing[1], half[1], centre[1])[:, None][None]
    z = axis(nz, spacing[2], half[2], centre[2])[:, None, None]

    scale = rng.uniform(0.88, 1.08)
    sx, sy = scale * rng.uniform(0.95, 1.05), scale * rng.uniform(0.95, 1.05)
    cx, cy, cz = rng.uniform(-0.06, 0.06), rng.uniform(-0.1, 0.0), rng.uniform(-0.08, 0.08)
    theta = rng.uniform(-0.12, 0.12)
    c, s = np.float32(np.cos(theta)), np.float32(np.sin(theta))
    # Body frame: rotated about z around the body centre, in units of the body's semi-axes.
    u = (c * (x - cx) + s * (y - cy)) / np.float32(0.78 * sx)
    v = (-s * (x - cx) + c * (y - cy)) / np.float32(0.56 * sy)
    w = z - np.float32(cz)
    body_r2 = u * u + v * v  # 1 at the skin

    lab = np.zeros((nz, ny, nx), np.uint8)
    hu = np.full((nz, ny, nx), HU["air"], np.float32)
    body = np.broadcast_to(body_r2 <= 1.0, lab.shape)
    lab[body] = LABELS["body"]
    hu[body] = HU["soft"]
    fat = np.broadcast_to((body_r2 > 0.84) & (body_r2 <= 1.0), lab.shape)
    hu[fat] = HU["fat"]

    def ellipsoid(centre, axes, jitter=0.06):
        ax = [a * rng.uniform(1 - jitter, 1 + jitter) for a in axes]
        return ((u - centre[0]) / ax[0]) ** 2 + ((v - centre[1]) / ax[1]) ** 2 + ((w - centre[2]) / ax[2]) ** 2 <= 1

    inner = body_r2 <= 0.80
    # the liver keeps a band of muscle (two voxels or more) between itself and the fat under the skin: a
    # sub-voxel band would make its lateral edge a coin toss for any classifier
    liver = ellipsoid((-0.42, -0.05, -0.45 + rng.uniform(-0.05, 0.05)), (0.46, 0.62, 0.42)) & (body_r2 <= 0.68)
    lab[liver] = LABELS["liver"]
    hu[liver] = HU["liver"]

    lung_z = 0.38 + rng.uniform(-0.05, 0.05)
    lungs = np.zeros(lab.shape, bool)
    for side in (-1, 1):
        lungs |= ellipsoid((side * 0.43, -0.12, lung_z), (0.33, 0.55, 0.62)) & inner
    lab[lungs] = LABELS["lungs"]
    hu[lungs] = HU["lung"]
    # Small vessels inside the lungs: soft-tissue density, lung label (as lung masks in real datasets).
    if physical:  # vessels about 4 mm in radius, at least 12 mm inside the lung's edge
        vessel_mask = _vessels(rng, lungs, 4.0 / min(spacing), max(2, round(12.0 / min(spacing))))
    else:
        vessel_mask = _vessels(rng, lungs)
    hu[vessel_mask] = HU["soft"]

    # Vertebral column: a cylinder along z, posterior in the body (in normalised field-of-view units).
    ux, vy = u * np.float32(0.78 * sx), v * np.float32(0.56 * sy)
    spine = np.broadcast_to(ux * ux + (vy - np.float32(0.34 * sy)) ** 2 <= (0.14 * scale) ** 2, lab.shape)
    bone = spine.copy()
    for zk in (-0.15, 0.12, 0.39, 0.66):
        zk += rng.uniform(-0.04, 0.04)
        bone |= (body_r2 >= 0.50) & (body_r2 <= 0.76) & (np.abs(w - zk) <= 0.09) & (v > -0.75)
    bone &= np.broadcast_to(body_r2 <= 1.0, lab.shape)
    lab[bone] = LABELS["bone"]
    hu[bone] = HU["bone"]

    if table:
        yt = cy + 0.56 * sy * 1.05 + 0.14
        slab = (np.abs(x) <= 0.9) & (y >= yt) & (y <= yt + 0.07)
        hu[np.broadcast_to(slab, hu.shape) & (lab == 0)] = HU["table"]

    hu += _bias_field(rng, lab.shape) * np.float32(8.0)
    hu += rng.normal(0.0, noise, lab.shape).astype(np.float32)
    hu = ndimage.gaussian_filter(hu, 0.5) if noise > 0 else hu  # a little correlation, as in reconstructed CT
    return np.clip(np.rint(hu), -1024, 3071).astype(np.int16), lab


def _vessels(rng: np.random.Generator, lungs: np.ndarray, radius: float | None = None,
             inset: int | None = None) -> np.ndarray:
    """A few small spheres well inside the lungs (default: about 6 % of the smallest extent across)."""
    out = np.zeros(lungs.shape, bool)
    core = ndimage.binary_erosion(lungs, iterations=inset or max(2, min(lungs.shape) // 12))
    idx = np.argwhere(core)
    if len(idx) == 0:
        return out
    r = radius if radius is not None else max(1.0, min(lungs.shape) * 0.03)
    zz, yy, xx = np.ogrid[: lungs.shape[0], : lungs.shape[1], : lungs.shape[2]]
    for k in rng.choice(len(idx), size=min(6, len(idx)), replace=False):
        cz, cy, cx = idx[k]
        lo = [max(0, int(c - r - 1)) for c in (cz, cy, cx)]
        hi = [int(c + r + 2) for c in (cz, cy, cx)]
        box = (slice(lo[0], hi[0]), slice(lo[1], hi[1]), slice(lo[2], hi[2]))
        out[box] |= (zz[box[0]] - cz) ** 2 + (yy[:, box[1]] - cy) ** 2 + (xx[:, :, box[2]] - cx) ** 2 <= r * r
    return out & lungs


def _bias_field(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """A smooth field in about [-1, 1]: a coarse random grid, interpolated."""
    coarse = rng.uniform(-1, 1, (4, 4, 4)).astype(np.float32)
    return ndimage.zoom(coarse, [n / 4 for n in shape], order=1, mode="nearest", grid_mode=True)[
        : shape[0], : shape[1], : shape[2]
    ]

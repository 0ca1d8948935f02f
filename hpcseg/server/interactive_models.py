"""Interactive classical models: ``deepgrow-regiongrow`` (clicks) and ``dextr3d-geodesic`` (extreme points).

No network: intensity windows, a marker-controlled watershed on the gradient magnitude (ITK's
``MorphologicalWatershedFromMarkers``: a flood from the seeds that meets where the image's edges are) and a few
morphological clean-ups. They answer MONAI Label's deepgrow/dextr3d requests with a binary mask (value 1).

Points are [x, y, z] voxel indices of the input image (MONAI Label's request shape), integers or numbers that are
rounded. Guarantees, enforced after the segmentation whatever the image:

- deepgrow-regiongrow: every ``foreground`` point is 1, every ``background`` point is 0 (a point in both lists is
  refused).
- dextr3d-geodesic: every one of ``points`` is 1 (``foreground`` is read when ``points`` is absent).

How deepgrow-regiongrow segments: within a box around the points (``margin_mm``, default 50 mm) the image is
smoothed (σ 1 voxel); voxels far in intensity from the foreground points (beyond a quarter of the box's intensity
range: lung vs soft tissue, bone vs muscle) and the background points seed the background, the foreground points
seed the object, and a watershed on the gradient magnitude decides the rest, so the object ends on the image's
edges. Holes are filled and only the parts touching a foreground point kept. Objects that differ little from their
neighbours (liver vs muscle) need background clicks around them, as with any region growing.

dextr3d-geodesic does the same inside the bounding box of the extreme points plus a margin: the object is seeded
with a small ball at the points' centroid, everything outside the points' bounding box (which by definition holds
the object) is background, and each extreme point is joined to the object by a straight line of voxels so the
mask stays connected.

Example::

    model = load_model(builtin_models_dir() / "deepgrow-regiongrow")
    mask = model.infer(ct, {"foreground": [[120, 200, 40]], "background": [[60, 200, 40]]})
"""

from __future__ import annotations

from typing import Any

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from hpcseg.errors import ImageError
from hpcseg.server.modelbase import Model, bad_request


def parse_points(params: dict, key: str, image: sitk.Image, required: bool = False) -> np.ndarray:
    """``params[key]`` as an (n, 3) int array of [x, y, z] indices inside ``image``; ServerError(400) if wrong."""
    raw = params.get(key) or []
    if not isinstance(raw, (list, tuple)) or not all(isinstance(p, (list, tuple)) and len(p) == 3 and
                                                     all(isinstance(c, (int, float)) for c in p) for p in raw):
        raise bad_request(f"{key} must be a list of [x, y, z] voxel indices, got {raw!r}"[:300])
    if required and not raw:
        raise bad_request(f"{key}: give at least one point ([x, y, z] voxel indices of the image)")
    pts = np.rint(np.array(raw, float).reshape(-1, 3)).astype(int)
    size = np.array(image.GetSize())
    outside = [p.tolist() for p in pts if np.any(p < 0) or np.any(p >= size)]
    if outside:
        raise bad_request(f"{key}: point {outside[0]} is outside the image (size {list(map(int, size))})")
    return pts


class _Interactive(Model):
    cpu_only = True  # ITK and scipy: the server's device does not matter, and "auto" need not import torch

    def load(self, device: str) -> None:
        self.device = "cpu"  # ITK and scipy on the CPU

    def _check(self, image: sitk.Image) -> np.ndarray:
        if image.GetDimension() != 3 or image.GetNumberOfComponentsPerPixel() != 1:
            raise ImageError(f"{self.manifest.name} needs a 3D single-channel image")
        return sitk.GetArrayViewFromImage(image)

    @staticmethod
    def _result(mask: np.ndarray, box: tuple[slice, ...], image: sitk.Image) -> sitk.Image:
        full = np.zeros(tuple(reversed(image.GetSize())), np.uint8)
        full[box] = mask
        out = sitk.GetImageFromArray(full)
        out.CopyInformation(image)
        return out


class RegionGrowModel(_Interactive):
    """deepgrow-regiongrow: foreground/background clicks → one object (see the module docstring)."""

    def infer(self, image: sitk.Image, params: dict) -> sitk.Image:
        arr = self._check(image)
        fg = parse_points(params, "foreground", image, required=True)
        bg = parse_points(params, "background", image)
        both = {tuple(p) for p in fg} & {tuple(p) for p in bg}
        if both:
            raise bad_request(f"point {list(next(iter(both)))} is both foreground and background")
        margin = _margin_voxels(image, float(params.get("margin_mm", 50.0)))
        box = _box(np.vstack([fg, bg]) if len(bg) else fg, margin, image.GetSize())
        smooth = ndimage.gaussian_filter(arr[box].astype(np.float32), 1.0)
        fg_l, bg_l = _local(fg, box), _local(bg, box)
        lo, hi = _window(smooth, fg_l)
        inside = (smooth >= lo) & (smooth <= hi)
        markers = np.where(inside, 0, 2).astype(np.uint8)
        _put(markers, bg_l, 2)
        _put(markers, fg_l, 1)
        mask = _watershed(smooth, markers, image.GetSpacing())
        mask = ndimage.binary_fill_holes(mask)
        mask = _touching(mask, fg_l)
        _put(mask, fg_l, True)  # the guarantees, whatever happened above
        _put(mask, bg_l, False)
        return self._result(mask.astype(np.uint8), box, image)


class GeodesicDextrModel(_Interactive):
    """dextr3d-geodesic: extreme points → the object inside their bounding box (see the module docstring)."""

    def infer(self, image: sitk.Image, params: dict) -> sitk.Image:
        arr = self._check(image)
        key = "points" if params.get("points") else "foreground"
        pts = parse_points(params, key, image, required=True)
        lo_p, hi_p = pts.min(0), pts.max(0)
        margin = np.maximum(3, np.ceil(0.1 * (hi_p - lo_p + 1))).astype(int)
        box = _box(pts, margin, image.GetSize())
        smooth = ndimage.gaussian_filter(arr[box].astype(np.float32), 1.0)
        pts_l = _local(pts, box)
        centre = np.rint(pts_l.mean(0)).astype(int)[None]
        a, b = pts_l.min(0), pts_l.max(0)  # (x, y, z) local
        lo, hi = _window(smooth, centre)
        inside = (smooth >= lo) & (smooth <= hi)
        in_bbox = np.zeros(smooth.shape, bool)
        in_bbox[a[2] : b[2] + 1, a[1] : b[1] + 1, a[0] : b[0] + 1] = True
        markers = np.where(inside & in_bbox, 0, 2).astype(np.uint8)
        # seed the object with a small ball at the centroid: one voxel can be walled in by noise edges
        r = max(1.0, 0.2 * float((b - a).min()) / 2)
        zz, yy, xx = np.ogrid[: smooth.shape[0], : smooth.shape[1], : smooth.shape[2]]
        cx, cy, cz = centre[0]
        ball = (xx - cx) ** 2 + (yy - cy) ** 2 + (zz - cz) ** 2 <= r * r
        markers[ball & inside & in_bbox] = 1
        _put(markers, centre, 1)
        mask = _watershed(smooth, markers, image.GetSpacing())
        mask = ndimage.binary_fill_holes(mask)
        mask = _touching(mask, centre)
        for p in pts_l:  # join every extreme point to the object: a straight line towards the centroid
            _join(mask, p, centre[0])
        _put(mask, pts_l, True)
        return self._result(mask.astype(np.uint8), box, image)


# ---------------------------------------------------------------------------------------------------- helpers
def _margin_voxels(image: sitk.Image, mm: float) -> np.ndarray:
    return np.maximum(2, np.ceil(mm / np.array(image.GetSpacing()))).astype(int)


def _box(pts: np.ndarray, margin: np.ndarray, size: Any) -> tuple[slice, ...]:
    """A numpy (z, y, x) box around ``pts`` ([x, y, z]) widened by ``margin`` voxels, clipped to the image."""
    lo = np.maximum(pts.min(0) - margin, 0)
    hi = np.minimum(pts.max(0) + margin + 1, np.array(size))
    return tuple(slice(int(lo[a]), int(hi[a])) for a in (2, 1, 0))


def _local(pts: np.ndarray, box: tuple[slice, ...]) -> np.ndarray:
    """[x, y, z] points relative to the box's corner."""
    return pts - np.array([box[2].start, box[1].start, box[0].start]) if len(pts) else pts.reshape(0, 3)


def _put(arr: np.ndarray, pts: np.ndarray, value: Any) -> None:
    if len(pts):
        arr[pts[:, 2], pts[:, 1], pts[:, 0]] = value


def _window(smooth: np.ndarray, seeds: np.ndarray) -> tuple[float, float]:
    """A generous intensity window around the seeds: their 5×5×5 medians ± a quarter of the box's 1–99 % range.

    Generous on purpose: it only keeps the flood out of clearly different tissue (lung from soft tissue, bone from
    muscle); where the object meets its neighbour is left to the watershed, which follows the image's edges
    instead of eroding them as a tight threshold would. Objects of close intensity need background clicks.
    """
    centres = [float(np.median(smooth[max(z - 2, 0) : z + 3, max(y - 2, 0) : y + 3, max(x - 2, 0) : x + 3]))
               for x, y, z in seeds]
    sub = smooth[:: 2, :: 2, :: 2] if smooth.size > 4_000_000 else smooth
    p1, p99 = np.percentile(sub, [1, 99])
    t = max(0.25 * float(p99 - p1), 1e-6)
    return min(centres) - t, max(centres) + t


def _watershed(smooth: np.ndarray, markers: np.ndarray, spacing: tuple[float, ...]) -> np.ndarray:
    """Marker-controlled watershed on the gradient magnitude; True where the object's marker (1) won."""
    img = sitk.GetImageFromArray(smooth)
    img.SetSpacing(spacing)
    grad = sitk.GradientMagnitudeRecursiveGaussian(img, sigma=float(min(spacing)))  # ~1 voxel: edges over noise
    seeds = sitk.GetImageFromArray(markers)
    seeds.CopyInformation(grad)
    ws = sitk.MorphologicalWatershedFromMarkers(grad, seeds, markWatershedLine=False,
                                                fullyConnected=False)
    return sitk.GetArrayFromImage(ws) == 1


def _touching(mask: np.ndarray, seeds: np.ndarray) -> np.ndarray:
    """The connected parts of ``mask`` that hold at least one seed."""
    lab, n = ndimage.label(mask)
    if n == 0 or not len(seeds):
        return mask
    keep = {int(v) for v in lab[seeds[:, 2], seeds[:, 1], seeds[:, 0]] if v}
    return np.isin(lab, list(keep)) if keep else np.zeros_like(mask)


def _join(mask: np.ndarray, p: np.ndarray, centre: np.ndarray) -> None:
    """Set a face-connected path of voxels from ``p`` towards ``centre`` until the object is reached.

    One axis per step (the one with the most of its way left), so the path is connected in the 6-neighbour sense
    that ``ndimage.label`` uses by default.
    """
    cur, end = p.astype(int).copy(), centre.astype(int)
    total = np.maximum(np.abs(end - cur), 1)
    mask[cur[2], cur[1], cur[0]] = True
    while np.any(cur != end):
        axis = int(np.argmax(np.abs(end - cur) / total))
        cur[axis] += int(np.sign(end[axis] - cur[axis]))
        if mask[cur[2], cur[1], cur[0]]:
            return
        mask[cur[2], cur[1], cur[0]] = True

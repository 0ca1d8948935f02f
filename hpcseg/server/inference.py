"""Network inference for segmentation: model-space preprocessing, slab-stitched sliding windows, and back.

Why a slab: MONAI's ``sliding_window_inference`` stitches every class of the whole volume in float32 (512×512×300
at 14 classes: 4.4 GB plus a count map; 105 classes: 33 GB) and its final argmax over that is slow. Here only the
part of the volume that windows still reach is kept in float, and finished parts become uint8 labels at once,
in one of two layouts, whichever keeps fewer floats alive for the volume (``layout="auto"``):

- **x-slabs** (most volumes). MONAI visits its windows x-start by x-start (the first spatial axis is the slowest in
  ``dense_patch_slices``), so the volume is cut into x-slabs, one per x-group (the windows sharing an x-start):
  when a group is done, no later window reaches the slab left of the next group's start. Within a slab the
  accumulators are cut along y at the windows' edges, and a chunk is argmax'ed and freed as soon as the windows
  (in y order within a group) have moved past it. Between groups only the summed overlap with the next group
  survives, one tensor of ``classes × (roi_x - stride_x) × Y × Z``: every window of a group comes before every
  window of the next in MONAI's order, so summing a group's contributions before the next group's is MONAI's own
  order. Peak about ``classes × Z × (roi_x × roi_y + (roi_x - stride_x) × Y)`` floats; at 512×512×300, roi 96,
  overlap 0.25, under a tenth of MONAI's ``classes × X × Y × Z``.
- **z-slabs** (long volumes, e.g. a whole-body CT of 1 000+ slices, where x-slabs would grow with Z). Windows are
  visited z-group by z-group; a window's part below the next z-group is kept apart (its "tail") and added again
  just before the window at the same (x, y) position in the next group, which is MONAI's per-voxel order. Peak
  about ``classes × Y × (roi_x × slab + 1.8 × X × (roi_z - stride_z))``, independent of the number of slices.

The labels are identical to ``sliding_window_inference(...).argmax(1)``: same windows (MONAI's own
``dense_patch_slices`` and ``compute_importance_map``), same padding, and for every voxel the weighted predictions are
added in MONAI's window order, so the floating-point sums and hence the argmax agree bit for bit. (With
``sw_batch_size > 1`` windows are batched within an x-group rather than across groups; the result stays identical
as long as the network's per-window output does not depend on its batch neighbours, true in eval mode on CPU; on GPU
cuDNN may pick another algorithm per batch size, exactly as it may between two MONAI runs.) The argmax is a running
comparison class by class (first maximum wins, as ``torch.argmax``), 2-3× faster on the CPU than ``torch.argmax``
over the class axis. (Only where a network outputs NaN can the two differ: ``torch.argmax`` picks the NaN.)

Tensor layout follows MONAI: spatial axes (x, y, z), i.e. SimpleITK's array (z, y, x) transposed.

Example::

    labels = sliding_window_labels(x, net, roi_size=(96, 96, 96), sw_batch_size=2, overlap=0.25)  # (X, Y, Z) uint8
    mask = segment(image, net, manifest, {"fast": True}, device="cuda")                          # sitk, input grid
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import SimpleITK as sitk
import torch
import torch.nn.functional as F
from monai.data.utils import compute_importance_map, dense_patch_slices, get_valid_patch_size
from monai.utils import fall_back_tuple

from hpcseg import imaging
from hpcseg.errors import ImageError
from hpcseg.server import progress as request_progress
from hpcseg.server.crop import check_crop, crop_to_foreground
from hpcseg.server.modelbase import ModelManifest, bad_request, resolve_device

Predictor = Callable[[torch.Tensor], torch.Tensor]


def sliding_window_labels(inputs: torch.Tensor, predictor: Predictor, roi_size: Sequence[int] | int,
                          sw_batch_size: int = 1, overlap: float = 0.25, mode: str = "constant",
                          sigma_scale: float = 0.125, padding_mode: str = "constant", cval: float = 0.0,
                          sw_device: torch.device | str | None = None, device: torch.device | str | None = None,
                          threshold: float = 0.0, progress: Callable[[int, int], None] | None = None,
                          layout: str = "auto") -> torch.Tensor:
    """Label map (uint8, uint16 past 256 classes) of ``inputs`` (1, C_in, *spatial) by slab-stitched windows.

    Arguments mean what they mean for MONAI's ``sliding_window_inference``; ``device`` holds the slab buffers
    (default: the inputs' device), the labels come back on the CPU with shape ``spatial``. A single-channel output
    is thresholded at ``threshold`` instead of argmax'ed. ``progress(done, total)`` (windows) is called after each
    batch; the callback may raise to abort the request (the exception leaves this function at once). ``layout``:
    ``"x"`` or ``"z"`` slabs (see the module docstring), ``"auto"`` the one that keeps fewer floats alive.

    Example::

        labels = sliding_window_labels(torch.rand(1, 1, 64, 64, 40), net, (32, 32, 32), overlap=0.5)
    """
    if inputs.shape[0] != 1:
        raise ValueError(f"one image at a time: inputs has batch size {inputs.shape[0]}")
    nd = inputs.ndim - 2
    if nd < 2:
        raise ValueError("slab stitching needs at least two spatial axes")
    if not 0 <= overlap < 1:
        raise ValueError(f"overlap must be >= 0 and < 1, got {overlap}")
    compute_dtype = inputs.dtype
    device = torch.device(device) if device is not None else inputs.device
    sw_device = torch.device(sw_device) if sw_device is not None else inputs.device
    spatial_in = list(inputs.shape[2:])
    roi = fall_back_tuple(roi_size, spatial_in)
    image_size = [max(s, r) for s, r in zip(spatial_in, roi, strict=True)]
    pad: list[int] = []  # MONAI's padding, verbatim: last axis first, split in halves
    for k in range(inputs.ndim - 1, 1, -1):
        diff = max(roi[k - 2] - inputs.shape[k], 0)
        pad.extend([diff // 2, diff - diff // 2])
    if any(pad):
        inputs = F.pad(inputs, pad=pad, mode=padding_mode, value=cval)
    interval = [r if r == s else max(int(r * (1 - overlap)), 1) for r, s in zip(roi, image_size, strict=True)]
    slices = dense_patch_slices(image_size, roi, interval)  # MONAI's windows in MONAI's order (last axis fastest)
    w = compute_importance_map(get_valid_patch_size(image_size, roi), mode=mode, sigma_scale=sigma_scale,
                               device=sw_device, dtype=compute_dtype)[None, None].to(compute_dtype)
    w_out = w.to(device)[0]

    if layout == "auto":
        layout = "x" if _alive_x(image_size, roi, slices) <= _alive_z(image_size, roi, slices) else "z"
    if layout not in ("x", "z"):
        raise ValueError(f"layout must be 'auto', 'x' or 'z', got {layout!r}")
    run = _stitch_x if layout == "x" else _stitch_z
    counter = [0]

    def predict(batch: list[tuple[slice, ...]]) -> torch.Tensor:
        """Weighted predictions of a batch of windows (on ``device``); reports progress after it."""
        if len(batch) > 1:
            win = torch.cat([inputs[(slice(0, 1), slice(None), *s)] for s in batch]).to(sw_device)
        else:
            win = inputs[(slice(0, 1), slice(None), *batch[0])].to(sw_device)
        out = predictor(win)
        if tuple(out.shape[2:]) != tuple(roi):
            raise ValueError(f"the network returned windows of {tuple(out.shape[2:])} for input windows of "
                             f"{tuple(roi)}: only same-size outputs are supported")
        out *= w  # in place, as MONAI does: same products
        counter[0] += len(batch)
        if progress is not None:
            progress(counter[0], len(slices))
        return out.to(device)

    labels_zyx = run(slices, roi, image_size, predict, w_out, sw_batch_size, compute_dtype, device, threshold)
    out_labels = torch.from_numpy(labels_zyx).permute(*reversed(range(nd)))  # (X, Y, Z) view of a (Z, Y, X) array
    if any(pad):
        crop = tuple(slice(pad[2 * (nd - 1 - d)], pad[2 * (nd - 1 - d)] + spatial_in[d]) for d in range(nd))
        out_labels = out_labels[crop]
    return out_labels


def _starts(slices: list, axis: int) -> list[int]:
    return sorted({s[axis].start for s in slices})


def _max_overlap(starts: list[int], roi: int) -> int:
    """The most a window reaches past the next start along one axis (0 without overlap)."""
    return max([0] + [a + roi - b for a, b in zip(starts, starts[1:], strict=False)])


def _alive_x(size: Sequence[int], roi: Sequence[int], slices: list) -> int:
    """Floats per class alive at once with x-slabs: a window-high stack of y-chunks, all of z (and the further
    axes), plus the summed overlap carried to the next x-group over the whole of y."""
    rest = int(np.prod(size[2:]))
    return rest * (roi[0] * min(size[1], roi[1] + _max_overlap(_starts(slices, 1), roi[1]))
                   + _max_overlap(_starts(slices, 0), roi[0]) * size[1])


def _alive_z(size: Sequence[int], roi: Sequence[int], slices: list) -> int:
    """Floats per class alive at once with z-slabs: a window-wide stack of x-chunks of the slab, plus every window's
    own tail below the next z-group (the windows overlap in x and y, so the tails overlap too)."""
    zs = _starts(slices, -1)
    depth = max(b - a for a, b in zip(zs, [*zs[1:], size[-1]], strict=True))
    n_cols = len({tuple((t.start, t.stop) for t in s[:-1]) for s in slices})
    mid = int(np.prod(size[1:-1]))
    x_alive = min(size[0], roi[0] + _max_overlap(_starts(slices, 0), roi[0]))
    return depth * x_alive * mid + n_cols * int(np.prod(roi[:-1])) * _max_overlap(zs, roi[-1])


def _new_labels(image_size: Sequence[int], lab: torch.Tensor) -> np.ndarray:
    return np.zeros(list(reversed(image_size)), np.uint8 if lab.dtype == torch.uint8 else np.uint16)


def _stitch_x(slices, roi, image_size, predict, w_out, sw_batch_size, dtype, device, threshold) -> np.ndarray:
    """x-slabs: one summed overlap carried between x-groups. Memory ~ classes × Z × (roi_x × roi_y + overlap × Y)."""
    nd = len(image_size)
    starts = _starts(slices, 0)
    cuts = sorted({s[1].start for s in slices} | {s[1].stop for s in slices})  # y edges of the windows
    carry: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # y-chunk -> earlier groups' sums left of x0 + w
    labels_zyx: np.ndarray | None = None
    for g, x0 in enumerate(starts):
        x_next = starts[g + 1] if g + 1 < len(starts) else image_size[0]
        group = [s for s in slices if s[0].start == x0]  # MONAI order restricted to the group: y, then z, ...
        slab = _XSlab(cuts, roi[0], image_size[2:], dtype, device, carry)
        for b in range(0, len(group), sw_batch_size):
            batch = group[b : b + sw_batch_size]
            for s, pred in zip(batch, predict(batch), strict=True):
                slab.add(s, pred, w_out)
            # windows come in y order: chunks above the next window's start are final left of x_next
            y_next = group[b + sw_batch_size][1].start if b + sw_batch_size < len(group) else image_size[1]
            for c, acc, cnt in slab.finished(y_next):
                keep = x_next - x0
                if keep < acc.shape[1]:  # the next group's windows reach these columns: their sums so far
                    carry[c] = (acc[:, keep:].clone(), cnt[:, keep:].clone())
                    acc, cnt = acc[:, :keep], cnt[:, :keep]
                acc /= cnt  # in place, as MONAI divides
                lab = _to_labels(acc, threshold)  # (dx, dy, ...)
                del acc, cnt
                if labels_zyx is None:
                    labels_zyx = _new_labels(image_size, lab)
                labels_zyx[(*[slice(None)] * (nd - 2), slice(cuts[c], cuts[c + 1]), slice(x0, x_next))] = (
                    lab.permute(*reversed(range(nd))).cpu().numpy())
    assert labels_zyx is not None and not carry
    return labels_zyx


def _stitch_z(slices, roi, image_size, predict, w_out, sw_batch_size, dtype, device, threshold) -> np.ndarray:
    """z-slabs: every window's tail kept apart until its (x, y) position is visited again in the next z-group, and
    replayed before that window, which is MONAI's per-voxel order. Memory ~ classes × Y × (roi_x × slab + 1.8 × X
    × overlap_z): independent of the number of slices, so long volumes (whole-body CT) take this layout."""
    nd = len(image_size)
    z_len = image_size[-1]
    starts = _starts(slices, -1)
    cuts = sorted({s[0].start for s in slices} | {s[0].stop for s in slices})  # x edges of the windows
    # stored[xy] = [(z_from, offset in the window at z_from, weighted prediction for z >= z_from)]: the tails of
    # earlier z-groups' windows at this (x, y) position, oldest first
    stored: dict[tuple, list[tuple[int, int, torch.Tensor]]] = {}
    labels_zyx: np.ndarray | None = None
    done = 0
    for g, z0 in enumerate(starts):
        z_next = starts[g + 1] if g + 1 < len(starts) else z_len
        group = [s for s in slices if s[-1].start == z0]  # MONAI order restricted to the group: x, then y, ...
        slab = _ZSlab(cuts, [*image_size[1:-1], z_next - done], dtype, device)
        for b in range(0, len(group), sw_batch_size):
            batch = group[b : b + sw_batch_size]
            for s, pred in zip(batch, predict(batch), strict=True):
                xy = tuple((t.start, t.stop) for t in s[:-1])
                # the earlier groups' tails for this (x, y) first, then this window: MONAI's per-voxel order
                for zf, off, tail in stored.get(xy, []):  # tail: z in [zf, zf + len), window offset off at zf
                    lo, hi = max(zf, done), min(zf + tail.shape[-1], z_next)
                    if hi > lo:
                        slab.add(s, slice(lo - done, hi - done), tail[..., lo - zf : hi - zf],
                                 w_out[..., lo - zf + off : hi - zf + off])
                hi = min(z0 + roi[-1], z_next)
                slab.add(s, slice(z0 - done, hi - done), pred[..., : hi - z0], w_out[..., : hi - z0])
                if z0 + roi[-1] > z_next:  # keep what overlaps the next z-groups, nothing more
                    stored.setdefault(xy, []).append((z_next, z_next - z0, pred[..., z_next - z0 :].clone()))
            # windows come in x order: columns left of the next window's start are final in this slab
            x_next = group[b + sw_batch_size][0].start if b + sw_batch_size < len(group) else image_size[0]
            for a, e, acc in slab.finished(x_next):
                lab = _to_labels(acc, threshold)  # (dx, Y, ..., dz)
                if labels_zyx is None:
                    labels_zyx = _new_labels(image_size, lab)
                labels_zyx[(slice(done, z_next), *[slice(None)] * (nd - 2), slice(a, e))] = (
                    lab.permute(*reversed(range(nd))).cpu().numpy())
        done = z_next
        for xy, tails in stored.items():  # forget what lies below the finished slab
            stored[xy] = [(zf, off, t) if zf >= done else _trim(zf, off, t, done) for zf, off, t in tails
                          if zf + t.shape[-1] > done]
    assert labels_zyx is not None
    return labels_zyx


class _XSlab:
    """Weighted logits and weights of one x-slab (one x-group's windows, ``width`` = roi_x), cut along y at the
    windows' edges.

    A chunk is allocated when a window first touches it, starting from what the earlier groups left in ``carry``
    for its columns, and handed back by :meth:`finished` once no later window of the group can reach it, so at most
    about one window's height of chunks is alive: memory ~ classes × roi_x × roi_y × Z, not × Y.
    """

    def __init__(self, cuts: list[int], width: int, rest: Sequence[int], dtype: torch.dtype, device: torch.device,
                 carry: dict[int, tuple[torch.Tensor, torch.Tensor]]) -> None:
        self.cuts, self.width, self.rest, self.dtype, self.device = cuts, width, list(rest), dtype, device
        self.carry = carry
        self.acc: dict[int, torch.Tensor] = {}
        self.cnt: dict[int, torch.Tensor] = {}

    def add(self, window: tuple[slice, ...], values: torch.Tensor, weights: torch.Tensor) -> None:
        """Add ``values`` (C, roi_x, roi_y, ...) and ``weights`` (1, roi_x, roi_y, ...) of a window of the slab."""
        ya, yb = window[1].start, window[1].stop
        rest = window[2:]
        for c in range(bisect.bisect_left(self.cuts, ya), bisect.bisect_left(self.cuts, yb)):
            a, b = self.cuts[c], self.cuts[c + 1]
            if c not in self.acc:
                shape = [self.width, b - a, *self.rest]
                acc = torch.zeros([values.shape[0], *shape], dtype=self.dtype, device=self.device)
                cnt = torch.zeros([1, *shape], dtype=self.dtype, device=self.device)
                if c in self.carry:  # 0 + s == s exactly: the earlier groups' sums, as MONAI's buffer holds them
                    old_acc, old_cnt = self.carry.pop(c)
                    acc[:, : old_acc.shape[1]] = old_acc
                    cnt[:, : old_cnt.shape[1]] = old_cnt
                self.acc[c], self.cnt[c] = acc, cnt
            self.acc[c][(slice(None), slice(None), slice(None), *rest)] += values[:, :, a - ya : b - ya]
            self.cnt[c][(slice(None), slice(None), slice(None), *rest)] += weights[:, :, a - ya : b - ya]

    def finished(self, y_next: int):
        """Yield ``(chunk, summed logits, summed weights)`` of every chunk that ends at or before ``y_next``."""
        for c in sorted(self.acc):
            if self.cuts[c + 1] > y_next:
                break
            yield c, self.acc.pop(c), self.cnt.pop(c)


class _ZSlab:
    """Weighted logits and weights of one z-slab, cut along x at the windows' edges.

    A column chunk is allocated when a window first touches it and handed back by :meth:`finished` (divided by its
    weights, in place as MONAI divides) once no later window can reach it, so at most about one window's width of
    columns is alive: memory ~ classes × roi_x × Y × slab depth, not × X.
    """

    def __init__(self, cuts: list[int], rest: list[int], dtype: torch.dtype, device: torch.device) -> None:
        self.cuts, self.rest, self.dtype, self.device = cuts, rest, dtype, device
        self.acc: dict[int, torch.Tensor] = {}
        self.cnt: dict[int, torch.Tensor] = {}

    def add(self, window: tuple[slice, ...], z: slice, values: torch.Tensor, weights: torch.Tensor) -> None:
        """Add ``values`` (C, roi_x, ..., dz) and ``weights`` (1, roi_x, ..., dz) of a window at slab depth ``z``."""
        xa, xb = window[0].start, window[0].stop
        rest = (*window[1:-1], z)
        for c in range(bisect.bisect_left(self.cuts, xa), bisect.bisect_left(self.cuts, xb)):
            a, b = self.cuts[c], self.cuts[c + 1]
            if c not in self.acc:
                self.acc[c] = torch.zeros([values.shape[0], b - a, *self.rest], dtype=self.dtype, device=self.device)
                self.cnt[c] = torch.zeros([1, b - a, *self.rest], dtype=self.dtype, device=self.device)
            self.acc[c][(slice(None), slice(None), *rest)] += values[:, a - xa : b - xa]
            self.cnt[c][(slice(None), slice(None), *rest)] += weights[:, a - xa : b - xa]

    def finished(self, x_next: int):
        """Yield ``(x_from, x_to, averaged logits)`` of every chunk that ends at or before ``x_next``, in x order."""
        for c in sorted(self.acc):
            if self.cuts[c + 1] > x_next:
                break
            acc, cnt = self.acc.pop(c), self.cnt.pop(c)
            acc /= cnt
            yield self.cuts[c], self.cuts[c + 1], acc


def _trim(zf: int, off: int, t: torch.Tensor, done: int) -> tuple[int, int, torch.Tensor]:
    """A stored tail cut to z >= done (copied, so the memory of the cut part is released)."""
    return done, off + (done - zf), t[..., done - zf :].clone()


def _to_labels(avg: torch.Tensor, threshold: float) -> torch.Tensor:
    """Class index of the largest value along axis 0 (the first one on ties, as ``torch.argmax``); one channel is
    thresholded. A running comparison over the classes, each a contiguous pass, instead of ``torch.argmax`` over the
    strided class axis."""
    if avg.shape[0] == 1:
        return (avg[0] > threshold).to(torch.uint8)
    dtype = torch.uint8 if avg.shape[0] <= 256 else torch.int32
    best = avg[0].clone()
    lab = torch.zeros(avg.shape[1:], dtype=dtype, device=avg.device)
    for c in range(1, avg.shape[0]):
        more = avg[c] > best
        lab.masked_fill_(more, c)
        torch.maximum(best, avg[c], out=best)
    return lab


# ------------------------------------------------------------------------------------------------ the pipeline
def model_grid_params(manifest: ModelManifest, image: sitk.Image, params: dict) -> tuple[list[float] | None,
                                                                                           tuple | None]:
    """(spacing, direction) of the grid the network runs on for this request; None = keep the image's.

    ``fast`` runs at twice the model's spacing, unless the manifest's ``extra.fast`` says otherwise
    (``{"spacing": [...], "overlap": ...}``: a network trained at one scale may prefer fewer windows instead).
    """
    spacing = list(manifest.spacing) if manifest.spacing else None
    if params.get("fast"):
        fast = manifest.extra.get("fast")
        if isinstance(fast, dict):  # the model says what fast means for it (a network is scale-specific)
            spacing = fast.get("spacing", spacing)
        else:
            spacing = [2.0 * s for s in (spacing or image.GetSpacing())]
    orientation = manifest.extra.get("orientation")
    direction = imaging.orientation_direction(orientation) if orientation else None
    return spacing, direction


def to_model_space(image: sitk.Image, spacing: Sequence[float] | None, direction: Sequence[float] | None,
                   interpolator: str = "linear") -> sitk.Image:
    """``image`` resampled onto the model's grid (unchanged when it already is on one)."""
    if spacing is None and direction is None:
        return image
    grid = imaging.resample(image, spacing, interpolator, direction)
    return grid


def scale_intensity(arr: np.ndarray, intensity: dict | list | None) -> np.ndarray:
    """The manifest's intensity transform on a float32 array; a list is a chain of steps applied in order.

    One step is MONAI's ``ScaleIntensityRange`` (``a_min``, ``a_max``, ``b_min``, ``b_max``, ``clip``),
    ``NormalizeIntensity`` (``{"normalize": true, "nonzero": bool}``), ``ScaleIntensity`` (``minv``/``maxv``: the
    image's min..max onto that range, or ``factor``: times 1 + factor) or ``ScaleIntensityRangePercentiles``
    (``percentiles: [lower, upper]`` with ``b_min``, ``b_max``, ``clip``, ``relative``).

    Example::

        scale_intensity(ct, [{"normalize": True, "nonzero": True}, {"minv": -1.0, "maxv": 1.0}])  # wholeBody_ct
    """
    arr = arr.astype(np.float32, copy=False)
    if not intensity:
        return arr
    if isinstance(intensity, list):
        for step in intensity:
            arr = scale_intensity(arr, step)
        return arr
    if intensity.get("normalize"):
        sel = arr[arr != 0] if intensity.get("nonzero") else arr
        mean, std = (float(sel.mean()), float(sel.std())) if sel.size else (0.0, 1.0)
        out = (arr - mean) / (std or 1.0)
        if intensity.get("nonzero"):
            out[arr == 0] = 0
        return out.astype(np.float32)
    if "factor" in intensity:
        return (arr * (1.0 + float(intensity["factor"]))).astype(np.float32, copy=False)
    if "minv" in intensity or "maxv" in intensity:  # MONAI's rescale_array
        lo, hi = float(arr.min()) if arr.size else 0.0, float(arr.max()) if arr.size else 0.0
        minv, maxv = intensity.get("minv"), intensity.get("maxv")
        if minv is None or maxv is None:
            return arr
        if hi == lo:
            return (arr * float(minv)).astype(np.float32, copy=False)
        return ((arr - lo) / (hi - lo) * (float(maxv) - float(minv)) + float(minv)).astype(np.float32, copy=False)
    if "percentiles" in intensity:
        lower, upper = (float(p) for p in intensity["percentiles"])
        a_min, a_max = (float(v) for v in np.percentile(arr, [lower, upper])) if arr.size else (0.0, 1.0)
        b_min, b_max = intensity.get("b_min"), intensity.get("b_max")
        if intensity.get("relative") and b_min is not None and b_max is not None:
            b_min, b_max = ((float(b_max) - float(b_min)) * lower / 100 + float(b_min),
                            (float(b_max) - float(b_min)) * upper / 100 + float(b_min))
        intensity = {"a_min": a_min, "a_max": a_max, "b_min": b_min, "b_max": b_max, "clip": intensity.get("clip")}
    a_min, a_max = float(intensity["a_min"]), float(intensity["a_max"])
    b_min = 0.0 if intensity.get("b_min") is None else float(intensity["b_min"])
    b_max = 1.0 if intensity.get("b_max") is None else float(intensity["b_max"])
    if a_max == a_min:  # as MONAI: nothing to scale by
        return (arr - a_min).astype(np.float32, copy=False)
    out = (arr - a_min) / (a_max - a_min) * (b_max - b_min) + b_min
    if intensity.get("clip", False):
        np.clip(out, min(b_min, b_max), max(b_min, b_max), out=out)
    return out.astype(np.float32, copy=False)


def image_to_tensor(image: sitk.Image, intensity: dict | list | None) -> torch.Tensor:
    """(1, 1, X, Y, Z) float32 tensor of a scalar image, intensity-scaled."""
    arr = scale_intensity(sitk.GetArrayFromImage(image), intensity)
    return torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 1, 0)))[None, None]


def window_params(manifest: ModelManifest, params: dict) -> dict[str, Any]:
    """roi_size / overlap / sw_batch_size for this request: the request's, checked, else the manifest's."""
    roi = params.get("roi_size", manifest.roi_size) or [96, 96, 96]
    if isinstance(roi, int):
        roi = [roi] * 3
    if not (isinstance(roi, list) and len(roi) == 3 and all(isinstance(r, int) and r > 0 for r in roi)):
        raise bad_request(f"roi_size must be three positive integers, got {roi!r}")
    fast = manifest.extra.get("fast") if params.get("fast") else None
    default_overlap = fast.get("overlap", manifest.overlap) if isinstance(fast, dict) else manifest.overlap
    overlap = params.get("overlap", default_overlap)
    if not (isinstance(overlap, (int, float)) and 0 <= overlap < 1):
        raise bad_request(f"overlap must be a number in [0, 1), got {overlap!r}")
    sw = params.get("sw_batch_size", manifest.sw_batch_size)
    if not (isinstance(sw, int) and sw >= 1):
        raise bad_request(f"sw_batch_size must be a positive integer, got {sw!r}")
    return {"roi_size": roi, "overlap": float(overlap), "sw_batch_size": sw}


def segment(image: sitk.Image, predictor: Predictor, manifest: ModelManifest, params: dict,
            device: str = "cpu", wanted: Sequence[int] | None = None,
            progress: Callable[[int, int], None] | None = None) -> sitk.Image:
    """The whole path for a network: model grid → intensity → slab-stitched windows → labels on ``image``'s grid.

    ``wanted`` label values are kept, the others set to 0 (None keeps all). ``progress(done, total)`` follows the
    windows (default: the request's callback bound by :func:`hpcseg.server.progress.reporting`, if any); the
    callback may raise to abort the request.
    """
    if image.GetNumberOfComponentsPerPixel() != 1 or image.GetDimension() != 3:
        raise ImageError("the model needs a 3D single-channel image")
    spacing, direction = model_grid_params(manifest, image, params)
    grid = to_model_space(image, spacing, direction)
    crop = check_crop(manifest.extra.get("crop"))  # extra.crop: cut to the object (and resize), see server/crop.py
    if crop:
        grid = crop_to_foreground(grid, crop)
    x = image_to_tensor(grid, manifest.intensity)
    dev = torch.device(resolve_device(params.get("device") or device))
    win = window_params(manifest, params)
    if crop and crop["resize"] and manifest.roi_size is None and "roi_size" not in params:
        win["roi_size"] = list(crop["resize"])  # the network sees the whole resized box at once
    sw = manifest.extra.get("sliding_window") or {}  # a bundle's inferer: mode, sigma_scale, padding_mode, cval
    sw = {k: sw[k] for k in ("mode", "sigma_scale", "padding_mode", "cval") if k in sw}
    with torch.inference_mode():
        labels = sliding_window_labels(x.to(dev), predictor, win["roi_size"], win["sw_batch_size"], win["overlap"],
                                       sw_device=dev, device=dev, threshold=float(manifest.extra.get("threshold", 0)),
                                       progress=progress or request_progress.current(), **sw)
    arr = labels.numpy().transpose(2, 1, 0)  # (Z, Y, X), contiguous: the array the slabs were written into
    if wanted is not None:
        arr = arr.copy()
        arr[~np.isin(arr, list(wanted))] = 0
    out = sitk.GetImageFromArray(np.ascontiguousarray(arr))
    out.CopyInformation(grid)
    if grid is not image:
        out = imaging.resample_to_reference(out, image)
    else:
        out.CopyInformation(image)
    return out

"""``hpcseg models check DIR [--image IMG]``: validate a model folder here, say what the server will do to an input,
and run the model once, before the folder goes to a cluster.

Example::

    report = check_model(Path("models/brain"), image=read_image("t1.nii.gz"))
    for step, what in report.plan:
        print(f"{step}: {what}")
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from hpcseg import imaging
from hpcseg.server.crop import check_crop, crop_to_foreground, describe_crop
from hpcseg.server.modelbase import ModelManifest, resolve_device

#: what every network served through hpcseg.server.inference receives (hpcseg/models/README.md says the same)
AXES = ("a float32 tensor (1, 1, X, Y, Z): batch, channel, then x, y, z (MONAI's order: SimpleITK's array "
        "(z, y, x) transposed), x running along the grid's first direction column; output (1, C, X, Y, Z): "
        "channel c is label value c (argmax), or one channel thresholded")


@dataclass
class CheckReport:
    """What ``models check`` found: the manifest, the serving class, the plan for an input, one run."""

    folder: str
    name: str
    version: str
    type: str
    labels: dict[str, int]
    served_by: str
    plan: list[tuple[str, str]] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    run: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"folder": self.folder, "name": self.name, "version": self.version, "type": self.type,
                "labels": self.labels, "served_by": self.served_by, "plan": [list(p) for p in self.plan],
                "warnings": self.warnings, "run": self.run}


def _fmt(values) -> str:
    return " x ".join(f"{float(v):.4g}" for v in values)


def describe_intensity(intensity) -> str:
    """The manifest's intensity chain in words, step by step (see inference.scale_intensity for each kind)."""
    if not intensity:
        return "none: raw intensities as float32"
    steps = intensity if isinstance(intensity, list) else [intensity]
    words = []
    for s in steps:
        if s.get("normalize"):
            words.append("z-score (mean 0, sd 1" + (", over non-zero voxels" if s.get("nonzero") else "") + ")")
        elif "factor" in s:
            words.append(f"times {1 + float(s['factor']):g}")
        elif "minv" in s or "maxv" in s:
            words.append(f"image min..max onto {s.get('minv')}..{s.get('maxv')}")
        elif "percentiles" in s:
            lo, hi = s["percentiles"]
            words.append(f"percentiles {lo}..{hi} onto {s.get('b_min', 0)}..{s.get('b_max', 1)}"
                         + (", clipped" if s.get("clip") else ""))
        else:
            words.append(f"{s.get('a_min')}..{s.get('a_max')} onto {s.get('b_min', 0)}..{s.get('b_max', 1)}"
                         + (", clipped" if s.get("clip") else ""))
    return ", then ".join(words)


def network_plan(manifest: ModelManifest, image: sitk.Image | None) -> list[tuple[str, str]]:
    """The steps the server takes for a network model, with the sizes for ``image`` when one is given."""
    from hpcseg.server.inference import model_grid_params, to_model_space, window_params

    plan: list[tuple[str, str]] = []
    orientation = manifest.extra.get("orientation")
    plan.append(("orientation", f"axes reoriented to {orientation} (extra.orientation)" if orientation
                 else "the input's own axes (no extra.orientation)"))
    grid = None
    if image is not None:
        spacing, direction = model_grid_params(manifest, image, {})
        grid = to_model_space(image, spacing, direction)
        plan.append(("resampling", (f"{_fmt(image.GetSpacing())} mm -> {_fmt(grid.GetSpacing())} mm (linear), "
                                    f"{_fmt(image.GetSize())} -> {_fmt(grid.GetSize())} voxels")
                     if grid is not image else f"none: the input's spacing {_fmt(image.GetSpacing())} mm"))
    else:
        plan.append(("resampling", f"to {_fmt(manifest.spacing)} mm (linear)" if manifest.spacing
                     else "none: the input's own spacing"))
    crop = check_crop(manifest.extra.get("crop"))
    text = describe_crop(crop)
    if crop and grid is not None:
        box = crop_to_foreground(grid, crop)
        text += f"; for this image: {_fmt(box.GetSize())} voxels of {_fmt(box.GetSpacing())} mm"
        grid = box
    plan.append(("cropping", text))
    plan.append(("intensity", describe_intensity(manifest.intensity)))
    win = window_params(manifest, {})
    if crop and crop["resize"] and manifest.roi_size is None:
        win["roi_size"] = list(crop["resize"])
    size = f" over {_fmt(grid.GetSize())} voxels" if grid is not None else ""
    thr = manifest.extra.get("threshold")
    out = f"single channel thresholded at {thr:g}" if thr is not None else "argmax over channels"
    plan.append(("window", f"sliding window {_fmt(win['roi_size'])} voxels (x y z){size}, overlap "
                           f"{win['overlap']:g}, {win['sw_batch_size']} per batch, {out}"))
    plan.append(("network input", AXES))
    plan.append(("labels back", "nearest neighbour into the input's exact size, spacing, origin and direction"))
    return plan


def check_model(folder: Path, image: sitk.Image | None = None, device: str = "cpu", run: bool = True
                ) -> CheckReport:
    """Validate ``folder``, describe what the server does to ``image`` (or to any input), run the model once
    (on ``image``, else a synthetic CT phantom). ModelLoadError says what is wrong with the folder."""
    from hpcseg.server.models import model_class, read_manifest
    from hpcseg.server.network_models import TorchModel

    folder = Path(folder)
    manifest = read_manifest(folder)
    cls = model_class(manifest, folder)
    report = CheckReport(str(folder), manifest.name, manifest.version, manifest.type, dict(manifest.labels),
                         f"{cls.__module__}.{cls.__name__}")
    if issubclass(cls, TorchModel):
        report.plan = network_plan(manifest, image)
    else:
        report.plan = [("pipeline", f"{cls.__name__}'s own (not a network: no resampling, crop or window by the "
                                    "server)")]
    expect = dict(manifest.extra.get("expect") or {})
    report.plan.insert(0, ("input checks", ", ".join(f"{k} {v}" for k, v in expect.items()) or "the defaults"))
    if not run:
        return report
    if image is None:
        from hpcseg.phantoms import make_phantom

        image = make_phantom(0, shape=(64, 64, 48))[0]
    from hpcseg.server.models import load_model

    t0 = time.monotonic()
    model = load_model(folder, device=resolve_device(device))
    t1 = time.monotonic()
    report.warnings = model.check_input(image)
    params: dict = {}
    if manifest.type == "deepgrow":
        params["foreground"] = [[s // 2 for s in image.GetSize()]]
    elif manifest.type == "dextr3d":
        c = [s // 2 for s in image.GetSize()]
        q = [max(1, s // 4) for s in image.GetSize()]
        params["points"] = [[c[0] + d * q[0] if a == 0 else c[0], c[1] + d * q[1] if a == 1 else c[1],
                             c[2] + d * q[2] if a == 2 else c[2]] for a in range(3) for d in (-1, 1)]
    mask = model.infer(image, params)
    t2 = time.monotonic()
    values, counts = np.unique(sitk.GetArrayFromImage(mask), return_counts=True)
    names = {v: k for k, v in manifest.labels.items()}
    report.run = {"device": model.device, "load_seconds": round(t1 - t0, 2), "infer_seconds": round(t2 - t1, 2),
                  "same_geometry": imaging.same_geometry(mask, image),
                  "voxels": {names.get(int(v), f"label {int(v)}"): int(c) for v, c in zip(values, counts, strict=True)
                             if v != 0}}
    return report

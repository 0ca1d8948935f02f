"""MONAI bundles served as they are: drop the bundle folder into a models directory, no code to write.

What is read (``monai.bundle.ConfigParser``), and so which bundles work:

- ``configs/inference.json`` (or ``.yaml``/``.yml``) with a ``network_def`` any MONAI/torch class can build;
- weights ``models/model.pt`` (a state_dict, or a checkpoint holding one under ``model``/``state_dict``) or
  ``models/model.ts`` (TorchScript, then ``network_def`` is not needed);
- from ``preprocessing``: ``Orientationd`` (axcodes), ``Spacingd`` (pixdim), ``ScaleIntensityRanged`` and
  ``NormalizeIntensityd``, applied by hpcseg's own pipeline (SimpleITK resampling, slab-stitched sliding window);
  other transforms (cropping, extra channels, ...) are listed in the log and ignored;
- from ``inferer``: ``roi_size``, ``overlap``, ``sw_batch_size`` of a ``SlidingWindowInferer``;
- ``configs/metadata.json``: ``name``/``version``/``description`` and the label names from
  ``network_data_format.outputs.pred.channel_def`` (channel c is label value c).

Not supported: several input channels, point-prompted bundles (VISTA, deepedit), custom post-processing beyond
argmax (a single output channel is thresholded at 0, i.e. probability 0.5 on logits). An ``hpcseg-model.json`` in
the bundle folder overrides what is derived here.

Example::

    model = load_model(Path("models/spleen_ct_segmentation"))      # a bundle folder
    model.manifest.labels   # {"spleen": 1}
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch

from hpcseg.errors import ModelLoadError
from hpcseg.server.models import ModelManifest
from hpcseg.server.network_models import TorchModel, TorchScriptModel, build_network, is_torchscript, load_state_dict

log = logging.getLogger("hpcseg.server.models")

_USED = ("LoadImaged", "LoadImage", "EnsureChannelFirstd", "EnsureTyped", "EnsureType", "Orientationd", "Spacingd",
         "ScaleIntensityRanged", "NormalizeIntensityd", "CastToTyped", "ToTensord")


def inference_config(folder: Path) -> Path:
    """The bundle's inference config file; ModelLoadError when there is none."""
    for ext in ("json", "yaml", "yml"):
        path = folder / "configs" / f"inference.{ext}"
        if path.is_file():
            return path
    raise ModelLoadError(f"{folder}: a MONAI bundle needs configs/inference.json (or .yaml)")


def _parser(folder: Path):
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    try:
        parser.read_config(str(inference_config(folder)))
        meta = folder / "configs" / "metadata.json"
        if meta.is_file():
            parser.read_meta(str(meta))
    except ModelLoadError:
        raise
    except Exception as exc:
        raise ModelLoadError(f"{folder}: cannot read the bundle's configs: {exc}") from exc
    parser["bundle_root"] = str(folder)
    return parser


def _parsed(parser: Any, key: str, default: Any = None) -> Any:
    try:
        return parser.get_parsed_content(key, instantiate=False, eval_expr=True)
    except Exception:  # absent or not evaluable here: the caller falls back
        return default


def manifest_from_bundle(folder: Path) -> ModelManifest:
    """A manifest derived from a bundle's configs (see the module docstring for what is read)."""
    folder = Path(folder)
    parser = _parser(folder)
    meta_path = folder / "configs" / "metadata.json"
    try:
        meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelLoadError(f"{meta_path}: not valid JSON ({exc})") from exc
    pred = ((meta.get("network_data_format") or {}).get("outputs") or {}).get("pred") or {}
    labels: dict[str, int] = {}
    for k, v in (pred.get("channel_def") or {}).items():
        if str(k).isdigit() and int(k) > 0:
            labels[str(v)] = int(k)
    if not labels and isinstance(pred.get("num_channels"), int):
        labels = {f"label_{c}": c for c in range(1, max(pred["num_channels"], 2))}
    if not labels:
        raise ModelLoadError(f"{folder}: the bundle's metadata names no output labels",
                             hint="add network_data_format.outputs.pred.channel_def, or an hpcseg-model.json")
    extra: dict[str, Any] = {"bundle": True}
    spacing, intensity, ignored = None, None, []
    transforms = parser.get("preprocessing#transforms", []) or []  # the raw config: read, never instantiated
    for i, t in enumerate(transforms if isinstance(transforms, list) else []):
        target = str(t.get("_target_", "")) if isinstance(t, dict) else str(t)
        name = target.rsplit(".", 1)[-1]
        key = f"preprocessing#transforms#{i}"
        if name == "Orientationd":
            extra["orientation"] = str(_parsed(parser, f"{key}#axcodes", "RAS"))
        elif name == "Spacingd":
            pixdim = _parsed(parser, f"{key}#pixdim")
            if pixdim is not None:
                spacing = [float(p) for p in (list(pixdim) * 3 if isinstance(pixdim, (int, float)) else pixdim)][:3]
        elif name == "ScaleIntensityRanged":
            intensity = {k: _parsed(parser, f"{key}#{k}", d) for k, d in
                         (("a_min", None), ("a_max", None), ("b_min", 0.0), ("b_max", 1.0), ("clip", False))}
        elif name == "NormalizeIntensityd":
            intensity = {"normalize": True, "nonzero": bool(_parsed(parser, f"{key}#nonzero", False))}
        elif name not in _USED:
            ignored.append(name)
    if ignored:
        extra["ignored_transforms"] = ignored
    roi = _parsed(parser, "inferer#roi_size") or (meta.get("network_data_format", {}).get("inputs", {})
                                                 .get("image", {}).get("spatial_shape"))
    roi_size = [int(r) for r in roi] if isinstance(roi, (list, tuple)) and len(roi) == 3 else None
    weights = next((w for w in ("models/model.pt", "models/model.ts") if (folder / w).is_file()), None)
    if weights is None:
        raise ModelLoadError(f"{folder}: the bundle has no models/model.pt or models/model.ts")
    data = {"name": str(meta.get("name") or folder.name), "version": str(meta.get("version", "0")),
            "type": "segmentation", "labels": labels, "description": str(meta.get("description", "")),
            "spacing": spacing, "intensity": intensity, "weights": weights, "roi_size": roi_size, "extra": extra}
    overlap, sw = _parsed(parser, "inferer#overlap"), _parsed(parser, "inferer#sw_batch_size")
    if isinstance(overlap, (int, float)):
        data["overlap"] = float(overlap)
    if isinstance(sw, int):
        data["sw_batch_size"] = sw
    return ModelManifest.from_dict(data, source=f"bundle {folder}")


class BundleModel(TorchModel):
    """A MONAI bundle: ``network_def`` + ``models/model.pt`` (or ``models/model.ts``)."""

    def build(self, device: str) -> torch.nn.Module:
        path = self.weights_path()
        if self.manifest.extra.get("ignored_transforms"):
            log.warning("bundle %s: preprocessing transforms ignored: %s", self.manifest.name,
                        ", ".join(self.manifest.extra["ignored_transforms"]))
        if is_torchscript(path):
            return TorchScriptModel.build(self, device)
        parser = _parser(self.folder)
        try:
            net = parser.get_parsed_content("network_def", instantiate=True)
        except Exception as exc:
            raise ModelLoadError(f"{self.folder}: cannot build the bundle's network_def: {exc}") from exc
        if isinstance(net, dict):  # a config that gives args, not a class
            net = build_network(net)
        try:
            net.load_state_dict(load_state_dict(path, "cpu"))
        except (RuntimeError, ValueError) as exc:
            raise ModelLoadError(f"{path}: weights do not fit network_def: {str(exc).splitlines()[0][:300]}") from exc
        return net

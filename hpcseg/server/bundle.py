"""MONAI bundles served as they are: drop the bundle folder into a models directory, no code to write.

Checked against real MONAI Model Zoo bundles (their configs verbatim, see ``tests/fixtures/zoo_bundles/``):
``spleen_ct_segmentation`` (UNet), ``wholeBody_ct_segmentation`` (SegResNet, 105 classes),
``swin_unetr_btcv_segmentation`` (SwinUNETR) and ``renalStructures_UNEST_segmentation`` (its own ``scripts/``).

What is read (``monai.bundle.ConfigParser``: ``@`` references, ``$`` expressions and ``#``/``::`` ids are resolved,
nothing of the bundle's data, engine or handlers is run), and so which bundles work:

- ``configs/inference.json`` (or ``.yaml``/``.yml``) with a ``network_def`` (or, in old bundles, ``network``) that
  a MONAI/torch class or the bundle's own code builds: ``scripts.networks.X`` is imported from the bundle folder,
  as MONAI's runner does from the bundle root, each bundle's ``scripts`` kept apart from another's. Arguments MONAI
  has since removed and that had no effect (``SwinUNETR(img_size=...)``, gone in MONAI 1.5) are dropped;
- weights ``models/model.pt`` (a state_dict, or a checkpoint holding one under ``model``/``state_dict``) or
  ``models/model.ts`` (TorchScript, then ``network_def`` is not needed; also used when ``network_def`` cannot be
  built here but the bundle ships both);
- from ``preprocessing`` (followed through references such as ``"transforms": "$@transforms"``; ``_disabled_``
  honoured): ``Orientationd`` (axcodes), ``Spacingd`` (pixdim) and the intensity chain ``ScaleIntensityRanged``,
  ``NormalizeIntensityd``, ``ScaleIntensityd``, ``ScaleIntensityRangePercentilesd``, in the bundle's order,
  applied by hpcseg's own pipeline (SimpleITK resampling, slab-stitched sliding window);
  other transforms (cropping, ...) are listed in the log and ignored;
- from ``inferer``: ``roi_size``, ``overlap``, ``sw_batch_size``, ``mode`` (constant/gaussian), ``sigma_scale``,
  ``padding_mode`` and ``cval`` of a ``SlidingWindowInferer`` (a ``SimpleInferer`` runs in windows of the
  metadata's ``spatial_shape``, else 96³);
- from ``postprocessing``: the threshold of a single-channel sigmoid output;
- ``configs/metadata.json``: ``name``/``version``/``description`` and the label names from
  ``network_data_format.outputs.pred.channel_def`` (channel c is label value c).

Refused with a reason (the model is listed under ``failed`` in ``/info/``, the others serve): several input
channels (``inputs.image.num_channels`` > 1), multi-label sigmoid outputs (overlapping channels), and a bundle whose
network needs a package that is not installed (named in the reason, with the optional packages its metadata lists;
found at load, or at the warm-up when the network imports it only when it runs, as SwinUNETR does ``einops``).
Not supported either: point-prompted bundles (VISTA, deepedit), post-processing beyond argmax/threshold. An
``hpcseg-model.json`` in the bundle folder overrides what is derived here.

Example::

    model = load_model(Path("models/spleen_ct_segmentation"))      # a bundle folder
    model.manifest.labels   # {"spleen": 1}
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import logging
import math
import re
from pathlib import Path
from typing import Any

import SimpleITK as sitk
import torch

from hpcseg.errors import ModelLoadError
from hpcseg.server.foldercode import folder_imports as bundle_imports
from hpcseg.server.foldercode import local_modules as _local_modules
from hpcseg.server.modelbase import ModelManifest
from hpcseg.server.network_models import TorchModel, build_network, is_torchscript, load_state_dict, load_torchscript

log = logging.getLogger("hpcseg.server.models")

# transforms that change nothing hpcseg's pipeline has to reproduce (it reads, orients and types images itself)
_NO_OP = {"LoadImage", "EnsureChannelFirst", "AddChannel", "EnsureType", "CastToType", "ToTensor", "ToDevice",
          "Identity", "ToMetaTensor", "ToNumpy"}
_INTENSITY = {"ScaleIntensityRange", "NormalizeIntensity", "ScaleIntensity", "ScaleIntensityRangePercentiles"}
_POST_OK = {"Activations", "AsDiscrete", "Invert", "SaveImage", "EnsureType", "ToTensor", "CopyItems", "Identity",
            "ToDevice", "SqueezeDim"}
# constructor arguments MONAI removed that had no effect before (a bundle written for the older MONAI still loads)
_REMOVED_ARGS = {"SwinUNETR": ("img_size",)}
_SW_MODES = {"constant", "gaussian"}
_PAD_MODES = {"constant", "reflect", "replicate", "circular"}


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
    parser["bundle_root"] = str(folder)  # bundles say "." (run from their root) or a path on their author's disk
    return parser


def _parsed(parser: Any, key: str, default: Any = None) -> Any:
    if key not in parser:  # asking MONAI for a missing id costs ~0.3 s (it ranks every id as a suggestion)
        return default
    try:
        return parser.get_parsed_content(key, instantiate=False, eval_expr=True)
    except Exception:  # absent or not evaluable here: the caller falls back
        return default


_REF = re.compile(r"\$?@([\w#:-]+)")


def _follow(parser: Any, key: str, hops: int = 8) -> tuple[str, Any]:
    """(id, raw config) at ``key``, following plain references such as ``"@transforms"`` or ``"$@transforms"``."""
    raw = parser.get(key)
    for _ in range(hops):
        m = _REF.fullmatch(raw.strip()) if isinstance(raw, str) else None
        if m is None:
            break
        key, raw = m.group(1), parser.get(m.group(1))
    return key, raw


def _target_name(t: Any) -> str:
    """``"monai.transforms.Spacingd"`` -> ``"Spacing"`` (the dictionary ``d``/``D``/``Dict`` suffix dropped)."""
    target = t.get("_target_", "") if isinstance(t, dict) else t
    name = str(target).rsplit(".", 1)[-1]
    for suffix in ("Dict", "d", "D"):
        if name.endswith(suffix) and name[: -len(suffix)] in _NO_OP | _INTENSITY | _POST_OK | {
                "Orientation", "Spacing", "Invert", "AsDiscrete", "Activations", "SaveImage"}:
            return name[: -len(suffix)]
    return name


def _transforms(parser: Any, key: str) -> list[tuple[str, str, dict]]:
    """(id, name, raw) of each enabled transform of the Compose at ``key`` (``preprocessing``, ...)."""
    key, compose = _follow(parser, key)
    if isinstance(compose, dict) and "transforms" in compose:
        key, items = _follow(parser, f"{key}#transforms")
    else:
        items = compose
    out = []
    for i, _ in enumerate(items if isinstance(items, list) else []):
        tid, t = _follow(parser, f"{key}#{i}")
        if not isinstance(t, dict) or _parsed(parser, f"{tid}#_disabled_", False) in (True, "true", "True"):
            continue
        out.append((tid, _target_name(t), t))
    return out


def _intensity_step(parser: Any, tid: str, name: str) -> dict | None:
    def get(k: str, d: Any = None) -> Any:
        return _parsed(parser, f"{tid}#{k}", d)

    if name == "ScaleIntensityRange":
        return {"a_min": get("a_min"), "a_max": get("a_max"), "b_min": get("b_min", 0.0), "b_max": get("b_max", 1.0),
                "clip": bool(get("clip", False))}
    if name == "NormalizeIntensity":
        return {"normalize": True, "nonzero": bool(get("nonzero", False))}
    if name == "ScaleIntensity":
        minv, maxv, factor = get("minv", 0.0), get("maxv", 1.0), get("factor")
        if minv is None and maxv is None and factor is not None:
            return {"factor": float(factor)}
        return {"minv": minv, "maxv": maxv}
    if name == "ScaleIntensityRangePercentiles":
        return {"percentiles": [get("lower"), get("upper")], "b_min": get("b_min"), "b_max": get("b_max"),
                "clip": bool(get("clip", False)), "relative": bool(get("relative", False))}
    return None


def _labels(meta: dict, folder: Path) -> dict[str, int]:
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
    return labels


def manifest_from_bundle(folder: Path) -> ModelManifest:
    """A manifest derived from a bundle's configs (see the module docstring for what is read)."""
    folder = Path(folder)
    parser = _parser(folder)
    meta_path = folder / "configs" / "metadata.json"
    try:
        meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelLoadError(f"{meta_path}: not valid JSON ({exc})") from exc
    fmt = meta.get("network_data_format") or {}
    image_in = (fmt.get("inputs") or {}).get("image") or {}
    if isinstance(image_in.get("num_channels"), int) and image_in["num_channels"] > 1:
        names = ", ".join(map(str, (image_in.get("channel_def") or {}).values())) or "several images"
        raise ModelLoadError(f"{folder}: the bundle's network takes {image_in['num_channels']} input channels "
                             f"({names}); hpcseg serves networks that take one image")
    labels = _labels(meta, folder)
    n_out = ((fmt.get("outputs") or {}).get("pred") or {}).get("num_channels")
    extra: dict[str, Any] = {"bundle": True}
    if str(image_in.get("modality", "")).upper() in ("CT", "MR", "MRI"):  # input QA and default-model choice use it
        extra["expect"] = {"modality": str(image_in["modality"]).upper()}
    spacing, steps, ignored = None, [], []
    for tid, name, _ in _transforms(parser, "preprocessing"):
        if name == "Orientation":
            extra["orientation"] = str(_parsed(parser, f"{tid}#axcodes", "RAS"))
        elif name == "Spacing":
            pixdim = _parsed(parser, f"{tid}#pixdim")
            if isinstance(pixdim, (int, float)):
                pixdim = [pixdim] * 3
            if isinstance(pixdim, (list, tuple)) and len(pixdim) == 3 and all(float(p) > 0 for p in pixdim):
                spacing = [float(p) for p in pixdim]
            else:
                ignored.append(f"Spacingd(pixdim={pixdim!r})")
        elif name in _INTENSITY:
            steps.append(_intensity_step(parser, tid, name))
        elif name not in _NO_OP:
            ignored.append(name)
    if ignored:
        extra["ignored_transforms"] = ignored
    post_ignored, sigmoid, threshold = [], False, None
    for tid, name, _ in _transforms(parser, "postprocessing"):
        if name == "Activations":
            sigmoid = sigmoid or bool(_parsed(parser, f"{tid}#sigmoid", False))
        elif name == "AsDiscrete":
            t = _parsed(parser, f"{tid}#threshold")
            threshold = float(t) if isinstance(t, (int, float)) and not isinstance(t, bool) else threshold
        elif name not in _POST_OK:
            post_ignored.append(name)
    if post_ignored:
        extra["ignored_postprocessing"] = post_ignored
    if sigmoid and isinstance(n_out, int) and n_out > 1:
        raise ModelLoadError(f"{folder}: the bundle's {n_out} output channels are independent sigmoid masks "
                             "(labels may overlap); hpcseg serves one label per voxel (softmax/argmax or one channel)")
    if isinstance(n_out, int) and n_out == 1 and threshold is not None:
        p = min(max(threshold, 1e-6), 1 - 1e-6)
        extra["threshold"] = math.log(p / (1 - p)) if sigmoid else threshold  # on the network's raw output

    inf_id, inferer = _follow(parser, "inferer")
    sw: dict[str, Any] = {}
    roi = None
    if isinstance(inferer, dict):
        roi = _parsed(parser, f"{inf_id}#roi_size")
        for key, allowed in (("mode", _SW_MODES), ("padding_mode", _PAD_MODES)):
            v = _parsed(parser, f"{inf_id}#{key}")
            if isinstance(v, str) and v.lower() in allowed:
                sw[key] = v.lower()
            elif v is not None:
                log.warning("bundle %s: inferer %s=%r not supported, using the default", folder.name, key, v)
        for key in ("sigma_scale", "cval"):
            v = _parsed(parser, f"{inf_id}#{key}")
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                sw[key] = float(v)
    if isinstance(roi, int):
        roi = [roi] * 3
    if roi is None:
        roi = image_in.get("spatial_shape")
    roi_size = ([int(r) for r in roi] if isinstance(roi, (list, tuple)) and len(roi) == 3 and
                all(isinstance(r, int) and r > 0 for r in roi) else None)
    if sw:
        extra["sliding_window"] = sw
    weights = next((w for w in ("models/model.pt", "models/model.ts") if (folder / w).is_file()), None)
    if weights is None:
        raise ModelLoadError(f"{folder}: the bundle has no models/model.pt or models/model.ts")
    optional = meta.get("required_packages_version") or meta.get("optional_packages_version")
    if isinstance(optional, dict) and optional:
        extra["optional_packages"] = {str(k): str(v) for k, v in optional.items()}
    data = {"name": str(meta.get("name") or folder.name), "version": str(meta.get("version", "0")),
            "type": "segmentation", "labels": labels, "description": str(meta.get("description", "")),
            "spacing": spacing, "intensity": (steps[0] if len(steps) == 1 else steps) or None, "weights": weights,
            "roi_size": roi_size, "extra": extra}
    overlap = _parsed(parser, f"{inf_id}#overlap") if isinstance(inferer, dict) else None
    batch = _parsed(parser, f"{inf_id}#sw_batch_size") if isinstance(inferer, dict) else None
    if isinstance(overlap, (int, float)) and not isinstance(overlap, bool):
        data["overlap"] = float(overlap)
    if isinstance(batch, int) and not isinstance(batch, bool):
        data["sw_batch_size"] = batch
    return ModelManifest.from_dict(data, source=f"bundle {folder}")


# ------------------------------------------------------------------------------------------- building the network
def _root_cause(exc: BaseException) -> BaseException:
    """The innermost cause of ``exc`` (MONAI wraps the real error in 'Failed to instantiate component ...')."""
    seen = set()
    while id(exc) not in seen:
        seen.add(id(exc))
        inner = getattr(exc, "value", None) if type(exc).__name__ == "ErrorDuringImport" else None
        inner = inner if isinstance(inner, BaseException) else exc.__cause__ or exc.__context__
        if inner is None:
            break
        exc = inner
    return exc


def missing_module(exc: BaseException) -> str | None:
    """The module an import error is about (``einops`` of MONAI's OptionalImportError too), else None."""
    for e in (exc, _root_cause(exc)):
        if isinstance(e, ModuleNotFoundError) and e.name:
            return e.name
        m = re.search(r"No module named '([\w.]+)'", str(e))
        if m:
            return m.group(1)
    return None


def _unlocatable(exc: BaseException) -> str | None:
    """The ``_target_`` MONAI could not find ("Cannot locate class or function path: 'x.y.Z'"), else None."""
    m = re.search(r"Cannot locate class or function path: '([\w.]+)'", str(_root_cause(exc)))
    return m.group(1) if m else None


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return ""


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:300] if text else ''}".rstrip(": ")


class BundleModel(TorchModel):
    """A MONAI bundle: ``network_def`` + ``models/model.pt`` (or ``models/model.ts``)."""

    def build(self, device: str) -> torch.nn.Module:
        path = self.weights_path()
        for key, what in (("ignored_transforms", "preprocessing"), ("ignored_postprocessing", "postprocessing")):
            if self.manifest.extra.get(key):
                log.warning("bundle %s: %s transforms ignored: %s", self.manifest.name, what,
                            ", ".join(self.manifest.extra[key]))
        if is_torchscript(path):
            return load_torchscript(path, device)
        parser = _parser(self.folder)
        try:
            net = self._network(parser)
        except ModelLoadError as exc:
            ts = self.folder / "models" / "model.ts"
            if not ts.is_file():
                raise
            log.warning("bundle %s: %s; serving models/model.ts instead", self.manifest.name, exc.message)
            return load_torchscript(ts, device)
        try:
            net.load_state_dict(load_state_dict(path, "cpu"))
        except (RuntimeError, ValueError) as exc:
            raise ModelLoadError(f"{path}: weights do not fit network_def: {str(exc).splitlines()[0][:300]}") from exc
        return net

    def _network(self, parser: Any) -> torch.nn.Module:
        key = "network_def" if "network_def" in parser else "network"
        key, raw = _follow(parser, key)
        target = _target_name(raw) if isinstance(raw, dict) else ""
        dropped: list[str] = []
        while True:
            try:
                with bundle_imports(self.folder):
                    net = parser.get_parsed_content(key, instantiate=True)
                    if isinstance(net, dict):  # a config that gives args, not a class
                        net = build_network(net)
                break
            except Exception as exc:
                cause = _root_cause(exc)
                m = re.search(r"unexpected keyword argument '(\w+)'", str(cause))
                arg = m.group(1) if isinstance(cause, TypeError) and m else None
                if arg and arg in _REMOVED_ARGS.get(target, ()) and arg not in dropped and isinstance(raw, dict):
                    dropped.append(arg)
                    raw = {k: v for k, v in raw.items() if k != arg}
                    parser[key] = raw
                    continue
                raise self._failure(f"cannot build the bundle's network ({target or key})", exc) from exc
        if dropped:
            log.warning("bundle %s: %s(%s) is no longer a MONAI argument (it had no effect); dropped",
                        self.manifest.name, target, ", ".join(dropped))
        if not isinstance(net, torch.nn.Module):
            raise ModelLoadError(f"{self.folder}: the bundle's {key} is a {type(net).__name__}, not a torch network")
        return net

    def _failure(self, what: str, exc: BaseException) -> ModelLoadError:
        """A ModelLoadError saying what failed and why; a missing package is named, with the bundle's list."""
        optional = self.manifest.extra.get("optional_packages") or {}
        listed = ", ".join(f"{k} {v}" for k, v in optional.items())
        module, target = missing_module(exc), _unlocatable(exc)
        if target and module is None:
            top = target.split(".")[0]
            if top in _local_modules(self.folder) or importlib.util.find_spec(top) is None:
                module = target  # the bundle's own code is missing, or a package is not installed
            else:
                return ModelLoadError(f"{self.folder.name}: {what}: {target!r} does not exist in the installed "
                                      f"{top} {_version(top)}", hint="the bundle was written for another version")
        if module and module.split(".")[0] in _local_modules(self.folder):
            return ModelLoadError(
                f"{self.folder.name}: {what}: it imports {module!r}, which is not in the bundle folder",
                hint=f"copy the whole bundle, {module.split('.')[0]}/ included, as the model zoo ships it")
        if module:
            return ModelLoadError(
                f"{self.folder.name}: {what}: it needs the Python package {module.split('.')[0]!r}, which is not "
                "installed where the server runs",
                hint="install it into the server's environment (or container image)" +
                     (f"; the bundle's metadata lists: {listed}" if listed else ""))
        return ModelLoadError(f"{self.folder.name}: {what}: {_first_line(_root_cause(exc))}")

    def warmup(self) -> None:
        try:
            super().warmup()
        except ImportError as exc:  # e.g. SwinUNETR imports einops only when it runs
            raise self._failure("the network cannot run", exc) from exc

    def infer(self, image: sitk.Image, params: dict) -> sitk.Image:
        try:
            return super().infer(image, params)
        except ImportError as exc:
            raise self._failure("the network cannot run", exc) from exc

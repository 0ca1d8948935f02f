"""Models that are torch networks: a state_dict with a network spec, or a TorchScript file.

Both run through :func:`hpcseg.server.inference.segment` (model grid, intensity, slab-stitched sliding windows,
labels back on the input grid). Output channel ``c`` is label value ``c`` (channel 0: background).

Manifest examples::

    {"name": "phantom-unet", "version": "1", "type": "segmentation", "labels": {"body": 1, "lungs": 2},
     "network": {"name": "UNet", "args": {"spatial_dims": 3, "in_channels": 1, "out_channels": 3,
                                          "channels": [8, 16, 32, 64], "strides": [2, 2, 2]}},
     "weights": "model.pt", "spacing": [1.5, 1.5, 2.0], "roi_size": [64, 64, 48],
     "intensity": {"a_min": -1000, "a_max": 1000, "b_min": 0, "b_max": 1, "clip": true}}

    {"name": "my-net", "version": "3", "type": "segmentation", "labels": {"liver": 1}, "weights": "net.ts"}

``network.name`` is a class of ``monai.networks.nets`` or ``"module:Class"``; ``network.args`` its keyword arguments.
"""

from __future__ import annotations

import copy
import importlib
import logging
import threading
import warnings
import zipfile
from pathlib import Path
from typing import Any

import SimpleITK as sitk
import torch

from hpcseg.errors import ModelLoadError
from hpcseg.server.foldercode import folder_imports, import_attr
from hpcseg.server.inference import segment
from hpcseg.server.modelbase import Model, bad_request, resolve_device

log = logging.getLogger("hpcseg.server.models")


def is_torchscript(path: Path) -> bool:
    """True when ``path`` is a TorchScript archive (a zip with ``code/``), not a pickled state_dict."""
    path = Path(path)
    if not path.is_file():
        return False
    if path.suffix == ".ts":
        return True
    try:
        with zipfile.ZipFile(path) as z:
            return any(n.split("/")[1:2] == ["code"] for n in z.namelist())
    except (zipfile.BadZipFile, OSError):
        return False


def build_network(spec: dict, folder: Path | None = None) -> torch.nn.Module:
    """A network from ``{"name": ..., "args": {...}}`` (see the module docstring). A ``module:Class`` name is
    imported from the model ``folder`` when it ships ``module`` (``folder/module.py``), else from the environment."""
    name, args = spec["name"], dict(spec.get("args") or {})
    if ":" in name:
        if folder is not None:
            with folder_imports(folder):  # built inside, so the network's own imports find the folder's code
                return import_attr(name, folder)(**args)
        module, _, cls_name = name.partition(":")
        cls = getattr(importlib.import_module(module), cls_name)
    else:
        import monai.networks.nets as nets

        cls = getattr(nets, name, None)
        if cls is None:
            raise ModelLoadError(f"network {name!r} is not in monai.networks.nets",
                                 hint="use a MONAI network name (e.g. UNet, SegResNet) or 'module:Class'")
    return cls(**args)


def load_state_dict(path: Path, device: str) -> dict:
    """A state_dict from ``torch.save`` output (also accepts ``{"model"|"state_dict": ...}`` checkpoints)."""
    obj = torch.load(path, map_location=device, weights_only=True)
    if isinstance(obj, dict):
        for key in ("state_dict", "model", "network"):
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict):
        raise ModelLoadError(f"{path}: not a state_dict (a {type(obj).__name__})")
    return {k.removeprefix("module."): v for k, v in obj.items()}  # DataParallel checkpoints


class TorchModel(Model):
    """A segmentation network served through the slab-stitched sliding window. Subclasses build ``self.net``."""

    net: torch.nn.Module

    def load(self, device: str) -> None:
        self.device = device
        self.net = self.build(device).to(device).eval()
        self._copies: dict[str, torch.nn.Module] = {device: self.net}
        self._lock = threading.Lock()

    def net_on(self, device: str) -> torch.nn.Module:
        """The network on ``device``: the loaded one, or a copy made on first use (``params["device"]``)."""
        with self._lock:
            if device not in self._copies:
                try:
                    self._copies[device] = copy.deepcopy(self.net).to(device).eval()
                except (RuntimeError, AssertionError, ValueError) as exc:  # no such device, CUDA not compiled in
                    raise bad_request(f"device {device!r} is not usable on this server: {exc}") from exc
            return self._copies[device]

    def build(self, device: str) -> torch.nn.Module:  # pragma: no cover - abstract in spirit
        raise NotImplementedError

    @staticmethod
    def _logits(out: Any) -> torch.Tensor:
        """The logits of a network's output: the first element of a tuple (deep supervision) or of a dict."""
        if isinstance(out, (tuple, list)):
            out = out[0]
        if isinstance(out, dict):
            out = next(iter(out.values()))
        return out

    def infer(self, image: sitk.Image, params: dict) -> sitk.Image:
        wanted = self.wanted_labels(params)
        keep = None if len(wanted) == len(self.manifest.labels) else list(wanted.values())
        device = resolve_device(params.get("device") or self.device)
        return segment(image, self.predictor_on(device), self.manifest, {**params, "device": device},
                       device=device, wanted=keep)

    def predictor_on(self, device: str):
        """The network call for ``device``: torch, or on the CPU the optimised runtime the manifest (or ``auto``)
        chooses (:mod:`hpcseg.server.cpu_runtime`); exported once per weights, cached next to them."""
        from hpcseg.server import cpu_runtime

        net = self.net_on(device)
        torch_pred = cpu_runtime.torch_predictor(net, self._logits)
        if cpu_runtime.choose_runtime(self.manifest.extra, device) != "openvino":
            return torch_pred
        named = str(self.manifest.extra.get("runtime", "auto")).lower() == "openvino"
        with self._lock:
            ov = getattr(self, "_openvino", None)
            if ov is None:
                roi = list(self.manifest.roi_size or [96, 96, 96])
                weights = self.folder / self.manifest.weights if self.manifest.weights else None
                spec = {"network": self.manifest.network, "weights": self.manifest.weights}
                try:
                    ov = self._openvino = cpu_runtime.OpenVinoPredictor.for_model(
                        _FirstOutput(net, self._logits), weights, spec, (1, 1, *roi))
                except Exception as exc:  # a network OpenVINO cannot convert (e.g. SwinUNETR's reshapes)
                    if named:
                        raise  # asked for by name: say so, do not serve something else
                    ov = self._openvino_failed(exc)
        if ov is False:
            return torch_pred
        return ov if named else self._torch_if_openvino_fails(torch_pred)

    def _openvino_failed(self, exc: Exception) -> bool:
        """Chosen automatically, OpenVINO cannot run this network: say so once, serve it with torch from now on."""
        log.warning("model %s: OpenVINO cannot run this network (%s: %s); serving it with torch",
                    self.manifest.name, type(exc).__name__, str(exc).splitlines()[0][:200])
        self._openvino = False
        return False

    def _torch_if_openvino_fails(self, torch_pred):
        """Chosen automatically, OpenVINO must not cost a model its service: a network it converts but cannot
        run (SwinUNETR's reshapes fail at the first window) is served with torch from then on."""

        def predict(x):
            current = getattr(self, "_openvino", None)
            if current:
                try:
                    return current(x)
                except Exception as exc:
                    self._openvino_failed(exc)
            return torch_pred(x)

        return predict

    def weights_path(self) -> Path:
        if not self.manifest.weights:
            raise ModelLoadError(f"{self.folder}: the manifest names no \"weights\" file")
        path = self.folder / self.manifest.weights
        if not path.is_file():
            raise ModelLoadError(f"{self.folder}: weights file {self.manifest.weights!r} is missing")
        return path


class _FirstOutput(torch.nn.Module):
    """``logits(net(x))`` as a module: what the OpenVINO export traces (deep supervision's extra outputs dropped)."""

    def __init__(self, net: torch.nn.Module, logits) -> None:
        super().__init__()
        self.net, self._logits = net, logits

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._logits(self.net(x))


class NetworkModel(TorchModel):
    """``manifest.network`` built, then ``manifest.weights`` (a state_dict) loaded strictly."""

    def build(self, device: str) -> torch.nn.Module:
        path = self.weights_path()
        try:
            net = build_network(self.manifest.network or {}, self.folder)
        except ModelLoadError:
            raise
        except Exception as exc:
            raise ModelLoadError(f"{self.folder}: cannot build network {self.manifest.network!r}: {exc}") from exc
        try:
            net.load_state_dict(load_state_dict(path, "cpu"))
        except (RuntimeError, ValueError, OSError) as exc:
            first = str(exc).strip().splitlines()[0][:300]
            raise ModelLoadError(f"{path}: weights do not fit the network: {first}",
                                 hint="check \"network\" in the manifest against how the weights were trained") from exc
        return net


def load_torchscript(path: Path, device: str) -> torch.nn.Module:
    """``torch.jit.load`` of ``path`` onto ``device``; ModelLoadError when it is not TorchScript.

    Extra files in the archive (MONAI's ``ckpt_export`` puts the bundle's configs there) are ignored.
    """
    try:
        with warnings.catch_warnings():  # torch 2.9+ calls TorchScript deprecated; it still loads fine
            warnings.simplefilter("ignore", DeprecationWarning)
            return torch.jit.load(str(path), map_location=device)
    except (RuntimeError, ValueError) as exc:
        first = (str(exc).strip().splitlines() or [""])[0][:300]
        raise ModelLoadError(f"{path}: not a TorchScript model torch.jit.load can read: {first}") from exc


class TorchScriptModel(TorchModel):
    """``manifest.weights`` read with ``torch.jit.load``: no Python class needed."""

    def build(self, device: str) -> torch.nn.Module:
        return load_torchscript(self.weights_path(), device)

"""The model interface: a folder's manifest (:class:`ModelManifest`), the abstract :class:`Model` every served model
subclasses, and the small helpers models share (:func:`bad_request`, :func:`resolve_device`).

This module imports no model implementation: ``classical_models``, ``interactive_models``, ``inference``,
``network_models`` and ``bundle`` import it, and :mod:`hpcseg.server.models` (the loader) imports them, so the
arrows point one way: models (loader) -> implementations -> inference -> modelbase.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import SimpleITK as sitk

from hpcseg.errors import ModelLoadError, ServerError

log = logging.getLogger("hpcseg.server.models")  # one logger name for the model layer

MANIFEST_NAME = "hpcseg-model.json"
MODEL_TYPES = ("segmentation", "deepgrow", "dextr3d")


def builtin_models_dir() -> Path:
    """The folder of the models shipped inside hpcseg (one sub-folder per model)."""
    return Path(__file__).resolve().parent.parent / "models"


@dataclass
class ModelManifest:
    """A model folder's ``hpcseg-model.json``: what the model is and how to run it.

    ``labels`` maps structure names to label values (for networks: value = output channel). ``spacing`` (mm,
    x y z) is the grid the model runs on; ``intensity`` is either a range scaling ``{"a_min", "a_max", "b_min",
    "b_max", "clip"}`` (MONAI's ScaleIntensityRange) or ``{"normalize": true, "nonzero": false}`` (z-score), or a
    list of steps applied in order (see :func:`hpcseg.server.inference.scale_intensity` for every kind of step).
    ``extra`` holds the rest: ``orientation`` (e.g. "RAS": axes the network expects), ``expect`` (input QA, see
    :func:`hpcseg.imaging.check_input`), ``threshold`` (single-channel networks), ``augment`` (how fine-tunes
    augment: ``{"jitter": {"scale": s, "shift": t}}``, intensity jitter as fractions of the normalised range),
    training provenance (``trained``).

    Example::

        ModelManifest.load(Path("models/ct-body"))
    """

    name: str
    version: str
    type: str
    labels: dict[str, int]
    description: str = ""
    loader: str | None = None
    spacing: list[float] | None = None
    intensity: dict | list | None = None
    network: dict | None = None
    weights: str | None = None
    roi_size: list[int] | None = None
    overlap: float = 0.25
    sw_batch_size: int = 1
    extra: dict = field(default_factory=dict)

    FILE: ClassVar[str] = MANIFEST_NAME

    @classmethod
    def load(cls, folder: Path) -> ModelManifest:
        """Read and validate ``folder/hpcseg-model.json``. (A MONAI bundle without one:
        :func:`hpcseg.server.models.read_manifest` reads its configs instead.)

        Raises ModelLoadError naming the file and the bad key.
        """
        folder = Path(folder)
        path = folder / MANIFEST_NAME
        if not path.is_file():
            raise ModelLoadError(f"{folder}: no {MANIFEST_NAME} (and not a MONAI bundle: no configs/)",
                                 hint=f"a model folder needs {MANIFEST_NAME}; see hpcseg/models/ for examples")
        try:
            data = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ModelLoadError(f"{path}: not valid JSON ({exc})") from exc
        return cls.from_dict(data, source=str(path))

    @classmethod
    def from_dict(cls, data: Any, source: str = "manifest") -> ModelManifest:
        """Validate a manifest's JSON object; the error names the key that is wrong."""
        if not isinstance(data, dict):
            raise ModelLoadError(f"{source}: the manifest must be a JSON object")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ModelLoadError(f"{source}: unknown key {unknown[0]!r}", hint="put custom keys under \"extra\"")
        for key in ("name", "version", "type", "labels"):
            if key not in data:
                raise ModelLoadError(f"{source}: missing key {key!r}")

        def bad(key: str, why: str) -> ModelLoadError:
            return ModelLoadError(f"{source}: key {key!r} {why} (got {data.get(key)!r})")

        for key in ("name", "version", "type", "description"):
            if key in data and not isinstance(data[key], str):
                raise bad(key, "must be a string")
        if data["type"] not in MODEL_TYPES:
            raise bad("type", f"must be one of {', '.join(MODEL_TYPES)}")
        labels = data["labels"]
        if not isinstance(labels, dict) or not all(isinstance(v, int) and not isinstance(v, bool) and 0 < v < 65536
                                                   for v in labels.values()):
            raise bad("labels", "must map names to label values 1..65535")
        if len(set(labels.values())) != len(labels):
            raise bad("labels", "must not give two names the same value")
        for key in ("loader", "weights"):
            if data.get(key) is not None and not isinstance(data[key], str):
                raise bad(key, "must be a string")
        if data.get("loader") and ":" not in data["loader"]:
            raise bad("loader", "must be 'module:Class'")
        if data.get("spacing") is not None and not _numbers(data["spacing"], 3, positive=True):
            raise bad("spacing", "must be three positive numbers (mm, x y z)")
        if data.get("roi_size") is not None and not _numbers(data["roi_size"], 3, positive=True, integer=True):
            raise bad("roi_size", "must be three positive integers")
        for key in ("intensity", "network", "extra"):
            if data.get(key) is not None and not isinstance(data[key], dict):
                if key == "intensity" and isinstance(data[key], list) and all(isinstance(s, dict) for s in data[key]):
                    continue
                raise bad(key, "must be an object" + (" or a list of objects" if key == "intensity" else ""))
        if data.get("network") is not None and not isinstance(data["network"].get("name"), str):
            raise bad("network", "needs a 'name' (a monai.networks.nets class or 'module:Class')")
        if "overlap" in data and not (isinstance(data["overlap"], (int, float)) and 0 <= data["overlap"] < 1):
            raise bad("overlap", "must be a number in [0, 1)")
        if "sw_batch_size" in data and not (isinstance(data["sw_batch_size"], int) and data["sw_batch_size"] >= 1):
            raise bad("sw_batch_size", "must be a positive integer")
        clean = dict(data)
        clean["labels"] = {str(k): int(v) for k, v in labels.items()}
        clean["extra"] = dict(data.get("extra") or {})
        from hpcseg.server.crop import check_crop

        check_crop(clean["extra"].get("crop"), source)  # refused at load, naming the key, not at the first request
        return cls(**clean)

    def to_dict(self) -> dict[str, Any]:
        """The JSON object, keys with default values left out (so manifests stay short)."""
        out = asdict(self)
        defaults = {f.name: f.default for f in fields(self) if f.default is not field}
        return {k: v for k, v in out.items() if k in ("name", "version", "type", "labels") or
                (v not in (None, {}, "") and v != defaults.get(k))}

    def save(self, folder: Path) -> Path:
        """Write ``folder/hpcseg-model.json`` atomically."""
        folder.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{MANIFEST_NAME}.", dir=folder)
        with os.fdopen(fd, "w") as f:
            json.dump(self.to_dict(), f, indent=2)
            f.write("\n")
        from hpcseg.imaging import default_file_mode

        os.chmod(tmp, default_file_mode())
        os.replace(tmp, folder / MANIFEST_NAME)
        return folder / MANIFEST_NAME


def _numbers(v: Any, n: int, positive: bool = False, integer: bool = False) -> bool:
    if not isinstance(v, list) or len(v) != n:
        return False
    kinds = (int,) if integer else (int, float)
    return all(isinstance(x, kinds) and not isinstance(x, bool) and (not positive or x > 0) for x in v)


class Model(ABC):
    """One servable model. Subclasses do heavy work in :meth:`load`, never in ``__init__``.

    Example (a custom model, named by ``"loader": "mypkg.models:Threshold"`` in its manifest)::

        class Threshold(Model):
            def load(self, device): self.device = device
            def infer(self, image, params):
                return sitk.Cast(image > 300, sitk.sitkUInt8)
    """

    #: True for a model that runs on the CPU whatever the server's device: its loader then passes "cpu" instead of
    #: resolving "auto" (which imports torch, seconds of a server's start that a classical model does not need).
    cpu_only: ClassVar[bool] = False

    def __init__(self, manifest: ModelManifest, folder: Path) -> None:
        self.manifest = manifest
        self.folder = Path(folder)
        self.device = "cpu"

    @abstractmethod
    def load(self, device: str) -> None:
        """Load weights and build what inference needs on ``device`` ("cpu", "cuda", "cuda:1")."""

    @abstractmethod
    def infer(self, image: sitk.Image, params: dict) -> sitk.Image:
        """A uint8 label map (uint16 past 255) in ``image``'s exact geometry."""

    def warmup(self) -> None:
        """One tiny inference so the first request does not pay for lazy initialisation."""
        image = sitk.Image([24, 24, 24], sitk.sitkInt16)
        image.SetSpacing(self.manifest.spacing or [1.0, 1.0, 1.0])
        params: dict[str, Any] = {}
        if self.manifest.type == "deepgrow":
            params["foreground"] = [[12, 12, 12]]
        elif self.manifest.type == "dextr3d":
            params["points"] = [[6, 12, 12], [18, 12, 12], [12, 6, 12], [12, 18, 12], [12, 12, 6], [12, 12, 18]]
        self.infer(image, params)

    def info(self) -> dict:
        """This model's entry in MONAI Label's ``/info/`` ``models``."""
        m = self.manifest
        from hpcseg.imaging import declared_modality

        return {"type": m.type, "labels": dict(m.labels), "dimension": 3, "description": m.description,
                "version": m.version, "config": {"spacing": m.spacing, "roi_size": m.roi_size, "device": self.device},
                # what the model declares it is for (extra.expect.modality): clients pick a default by it
                "modality": declared_modality(self.expect.get("modality")) or None}

    @property
    def expect(self) -> dict:
        """What inputs this model is made for (``check_input``'s ``expect``), from ``extra.expect``."""
        return dict(self.manifest.extra.get("expect") or {})

    def check_input(self, image: sitk.Image) -> list[str]:
        """QA warnings for ``image`` against :attr:`expect` (see :func:`hpcseg.imaging.check_input`)."""
        from hpcseg.imaging import check_input

        return check_input(image, self.expect)

    # --- helpers for subclasses -------------------------------------------------------------------------------
    def wanted_labels(self, params: dict) -> dict[str, int]:
        """The labels to return: ``params["label_names"]`` (or ``labels``) checked against the manifest."""
        wanted = params.get("label_names") or params.get("labels")
        if not wanted:
            return dict(self.manifest.labels)
        if isinstance(wanted, str):
            wanted = [wanted]
        if not isinstance(wanted, list):
            raise bad_request(f"label_names must be a list of names, got {wanted!r}")
        unknown = [w for w in wanted if w not in self.manifest.labels]
        if unknown:
            raise bad_request(f"model {self.manifest.name} has no label {unknown[0]!r}; it has "
                              f"{', '.join(self.manifest.labels)}")
        return {w: self.manifest.labels[w] for w in wanted}

    def keep_labels(self, labels: np.ndarray, params: dict) -> np.ndarray:
        """Set every label not asked for to 0 (in place; returns the array)."""
        wanted = set(self.wanted_labels(params).values())
        if wanted != set(self.manifest.labels.values()):
            labels[~np.isin(labels, list(wanted))] = 0
        return labels


def bad_request(message: str) -> ServerError:
    """The error for a request parameter that is wrong (HTTP 400 when the server passes it on)."""
    return ServerError(message, status=400)


def resolve_device(device: str | None = "auto") -> str:
    """"auto" → "cuda" when a GPU is usable, else "cpu"; anything else unchanged."""
    if device in (None, "", "auto"):
        try:
            import torch
        except ImportError:
            return "cpu"
        return "cuda" if torch.cuda.is_available() else "cpu"
    return str(device)

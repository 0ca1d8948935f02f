"""Loading models: ``load_model(folder)`` picks the class that serves a model folder. The interface itself
(``ModelManifest``, ``Model``) lives in :mod:`hpcseg.server.modelbase` and is re-exported here.

A model folder holds ``hpcseg-model.json`` (a :class:`ModelManifest`) and whatever the model needs (weights). Which
class serves a folder::

    manifest "loader": "module:Class"        that class (a subclass of Model), e.g. the built-in classical models
    "weights" a TorchScript file (.ts/.pt)    TorchScriptModel       (hpcseg.server.network_models)
    "network" + "weights" (a state_dict)      NetworkModel           (hpcseg.server.network_models)
    configs/inference.json|yaml (a bundle)    BundleModel            (hpcseg.server.bundle); the manifest may be
                                                                     absent: it is then read from the bundle

Built-in models ship in ``hpcseg/models/<name>/`` (:func:`builtin_models_dir`): ``ct-body``, ``phantom-unet``,
``deepgrow-regiongrow`` and ``dextr3d-geodesic``.

Request ``params`` every model understands (all optional; unknown keys are ignored, as MONAI Label sends many):
``label_names`` (alias ``labels``: the structures to return, others set to 0), ``fast`` (coarser spacing),
``roi_size``, ``overlap``, ``sw_batch_size``, ``device``; interactive models also take ``foreground`` /
``background`` (deepgrow) or ``points`` (dextr3d): lists of [x, y, z] voxel indices of the input image. A bad
value raises ``ServerError(status=400)``; an unsuitable image ``ImageError``.

Example::

    model = load_model(builtin_models_dir() / "ct-body")
    model.warmup()
    mask = model.infer(read_image("ct.nii.gz"), {"label_names": ["lungs"]})
"""

from __future__ import annotations

import logging
from pathlib import Path

from hpcseg.errors import HpcsegError, ModelLoadError
from hpcseg.server.foldercode import import_attr
from hpcseg.server.modelbase import (  # noqa: F401  (re-exported: the model interface's public names)
    MANIFEST_NAME,
    MODEL_TYPES,
    Model,
    ModelManifest,
    bad_request,
    builtin_models_dir,
    resolve_device,
)

log = logging.getLogger("hpcseg.server.models")


def model_class(manifest: ModelManifest, folder: Path) -> type[Model]:
    """The class that serves ``folder`` (see the module docstring for the rules)."""
    if manifest.loader:
        module, _, name = manifest.loader.partition(":")
        try:
            cls = import_attr(manifest.loader, folder)  # the folder's own module:Class first (foldercode.py)
        except (ImportError, AttributeError) as exc:
            raise ModelLoadError(f"{folder}: loader {manifest.loader!r} cannot be imported ({exc})") from exc
        if not (isinstance(cls, type) and issubclass(cls, Model)):
            raise ModelLoadError(f"{folder}: loader {manifest.loader!r} is not a subclass of hpcseg's Model")
        return cls
    from hpcseg.server import network_models

    if manifest.weights and network_models.is_torchscript(folder / manifest.weights):
        return network_models.TorchScriptModel
    if manifest.network:
        return network_models.NetworkModel
    if any((folder / "configs" / f"inference.{ext}").is_file() for ext in ("json", "yaml", "yml")):
        from hpcseg.server.bundle import BundleModel

        return BundleModel
    raise ModelLoadError(f"{folder}: cannot tell how to load this model",
                         hint="set \"loader\", or \"network\" + \"weights\" (a state_dict), or \"weights\" to a "
                              "TorchScript file, or make the folder a MONAI bundle")


def read_manifest(folder: Path) -> ModelManifest:
    """A model folder's manifest: ``hpcseg-model.json``, or for a MONAI bundle without one, read from its configs.

    Example::

        manifest = read_manifest(Path("models/spleen_ct_segmentation"))
    """
    folder = Path(folder)
    if not (folder / MANIFEST_NAME).is_file() and (folder / "configs").is_dir():
        from hpcseg.server.bundle import manifest_from_bundle

        return manifest_from_bundle(folder)
    return ModelManifest.load(folder)


def load_model(folder: Path, device: str = "auto") -> Model:
    """Read the manifest, pick the class, build it and call ``.load(device)``; ModelLoadError says why not.

    Example::

        model = load_model(Path("models/phantom-unet"), device="auto")   # cuda when available
    """
    folder = Path(folder)
    manifest = read_manifest(folder)
    cls = model_class(manifest, folder)
    model = cls(manifest, folder)
    try:
        model.load("cpu" if cls.cpu_only else resolve_device(device))
    except HpcsegError:
        raise
    except Exception as exc:  # a broken weight file, a missing package, CUDA errors: one error for the registry
        raise ModelLoadError(f"model {manifest.name} in {folder} failed to load: {type(exc).__name__}: {exc}") from exc
    log.info("loaded model %s %s (%s) on %s", manifest.name, manifest.version, cls.__name__, model.device)
    return model

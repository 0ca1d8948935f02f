"""An optimised CPU runtime for network models: OpenVINO behind the same sliding window and slab stitching.

Why: on a CPU node (or ``hpcseg segment`` on a laptop) torch runs a 3D UNet window 3–5× slower than OpenVINO's CPU
plugin (measured on this 2-core machine: 0.22× torch's time per 96³ window, float32). Only the network call
changes: :func:`hpcseg.server.inference.segment` still cuts the windows, weights and stitches them.

Which runtime serves a request (:func:`choose_runtime`): the manifest's ``extra.runtime`` (``"torch"``,
``"openvino"`` or ``"auto"``, the default), else the environment variable ``HPCSEG_CPU_RUNTIME``; ``auto`` means
OpenVINO when the request runs on the CPU and the ``openvino`` package is installed, torch otherwise (a GPU always
runs torch). ``"openvino"`` without the package is a load error that says what to install.

The export (``openvino.convert_model`` of the torch module, with dynamic batch and spatial sizes) happens once per
weights and is cached as OpenVINO IR (``.xml`` + ``.bin``) keyed by a hash of the weights file, the network spec
and the OpenVINO version: next to the weights in ``.hpcseg-cache/`` when that folder is writable, else in the
user's cache folder (``~/.cache/hpcseg/openvino``). Written atomically (temp files, then rename), so a second
process or a crash never sees half an export. Each window shape is compiled once per process (a fraction of a
second), in float32 (``INFERENCE_PRECISION_HINT f32``: no bf16 on CPUs that have it, so labels match torch's).

Example::

    predictor = OpenVinoPredictor.for_model(net, weights=folder / "model.pt", spec=manifest.network)
    labels = sliding_window_labels(x, predictor, (96, 96, 96))
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from hpcseg.errors import ModelLoadError

log = logging.getLogger("hpcseg.server.models")

RUNTIMES = ("auto", "torch", "openvino")
CACHE_DIR_NAME = ".hpcseg-cache"
_FORMAT = "hpcseg-openvino-1"  # bump when the export changes: old cache entries are then ignored
_export_lock = threading.Lock()


def openvino_available() -> bool:
    """True when the ``openvino`` package can be imported (checked without importing it)."""
    import importlib.util

    return importlib.util.find_spec("openvino") is not None


def choose_runtime(manifest_extra: dict, device: str) -> str:
    """``"torch"`` or ``"openvino"`` for a request on ``device`` (see the module docstring)."""
    wanted = str(manifest_extra.get("runtime") or os.environ.get("HPCSEG_CPU_RUNTIME") or "auto").lower()
    if wanted not in RUNTIMES:
        raise ModelLoadError(f"runtime {wanted!r} is not one of {', '.join(RUNTIMES)}",
                             hint='set "extra": {"runtime": "auto"} in the manifest (or HPCSEG_CPU_RUNTIME)')
    if not str(device).startswith("cpu"):
        return "torch"
    if wanted == "openvino" and not openvino_available():
        raise ModelLoadError("the manifest asks for the openvino runtime but the openvino package is not installed",
                             hint="pip install openvino (or set extra.runtime to auto or torch)")
    if wanted == "auto":
        return "openvino" if openvino_available() else "torch"
    return wanted


def cache_key(weights: Path | None, spec: Any) -> str:
    """Hash of what the export depends on: the weights' bytes, the network spec, OpenVINO's version, the format."""
    import openvino

    h = hashlib.sha256()
    h.update(_FORMAT.encode())
    h.update(str(getattr(openvino, "__version__", "?")).encode())
    h.update(json.dumps(spec, sort_keys=True, default=str).encode())
    if weights is not None:
        with open(weights, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()[:32]


def cache_dirs(weights: Path | None) -> list[Path]:
    """Where an export may live, in order: next to the weights, then the user's cache folder."""
    dirs = []
    if weights is not None:
        dirs.append(Path(weights).parent / CACHE_DIR_NAME)
    from platformdirs import user_cache_dir

    dirs.append(Path(user_cache_dir("hpcseg")) / "openvino")
    return dirs


def _cached_export(key: str, weights: Path | None) -> Path | None:
    """The ``.xml`` of a complete export (its ``.bin`` beside it) under ``key`` in one of the cache folders."""
    for d in cache_dirs(weights):
        xml = d / f"{key}.xml"
        if xml.is_file() and xml.with_suffix(".bin").is_file():
            return xml
    return None


def export_openvino(net: Any, weights: Path | None, spec: Any, example_shape: tuple[int, ...]) -> Path:
    """The cached IR for ``net`` (exported now if no cache has it); returns the ``.xml`` path."""
    key = cache_key(weights, spec)
    if (xml := _cached_export(key, weights)) is not None:
        log.info("openvino: reusing the export %s", xml)
        return xml
    with _export_lock:
        if (xml := _cached_export(key, weights)) is not None:  # another thread wrote it meanwhile
            return xml
        import openvino as ov
        import torch

        example = torch.zeros(example_shape)
        dynamic = ov.PartialShape([-1, example_shape[1], *[-1] * (len(example_shape) - 2)])
        with torch.inference_mode(False), torch.no_grad():
            model = ov.convert_model(net, example_input=example, input=[dynamic])
        last: OSError | None = None
        for d in cache_dirs(weights):
            try:
                d.mkdir(parents=True, exist_ok=True)
                tmp = Path(tempfile.mkdtemp(prefix=f".{key}.", dir=d))
                try:
                    ov.save_model(model, str(tmp / "m.xml"), compress_to_fp16=False)
                    os.replace(tmp / "m.bin", d / f"{key}.bin")  # the weights first: an .xml always has its .bin
                    os.replace(tmp / "m.xml", d / f"{key}.xml")
                finally:
                    for f in tmp.iterdir():
                        f.unlink()
                    tmp.rmdir()
                log.info("openvino: exported the network to %s", d / f"{key}.xml")
                return d / f"{key}.xml"
            except OSError as exc:  # a read-only model folder: try the next place
                last = exc
        raise ModelLoadError(f"cannot write the openvino export anywhere ({last})",
                             hint="make the model folder or ~/.cache/hpcseg writable, or set extra.runtime to torch")


class OpenVinoPredictor:
    """A predictor for :func:`hpcseg.server.inference.sliding_window_labels`: torch tensor in, torch logits out.

    Compiles the IR once per input shape (windows have one shape per request; the last batch may be smaller).
    """

    def __init__(self, xml: Path, threads: int | None = None) -> None:
        import openvino as ov

        self.core = ov.Core()
        self.model = self.core.read_model(str(xml))
        self.xml = xml
        self.threads = threads
        self._compiled: dict[tuple[int, ...], Any] = {}
        self._lock = threading.Lock()

    @classmethod
    def for_model(cls, net: Any, weights: Path | None, spec: Any, example_shape: tuple[int, ...]) -> OpenVinoPredictor:
        return cls(export_openvino(net, weights, spec, example_shape))

    def _request(self, shape: tuple[int, ...]) -> Any:
        with self._lock:
            req = self._compiled.get(shape)
            if req is None:
                model = self.model.clone()
                model.reshape({model.inputs[0]: list(shape)})
                config: dict[str, Any] = {"INFERENCE_PRECISION_HINT": "f32", "PERFORMANCE_HINT": "LATENCY"}
                if self.threads:
                    config["INFERENCE_NUM_THREADS"] = int(self.threads)
                req = self.core.compile_model(model, "CPU", config).create_infer_request()
                self._compiled[shape] = req
            return req

    def __call__(self, x: Any) -> Any:
        import torch

        arr = np.ascontiguousarray(x.detach().cpu().numpy(), dtype=np.float32)
        req = self._request(tuple(arr.shape))
        out = req.infer({0: arr})
        first = out[req.model_outputs[0]] if hasattr(req, "model_outputs") else next(iter(out.values()))
        return torch.from_numpy(np.array(first, dtype=np.float32, copy=True))


def torch_predictor(net: Any, logits: Callable[[Any], Any]) -> Callable[[Any], Any]:
    """The torch predictor (the baseline): ``logits(net(x))``."""
    return lambda x: logits(net(x))

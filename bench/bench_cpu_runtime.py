"""Benchmark: a network's whole-volume inference on the CPU, OpenVINO runtime vs torch, in one run.

The server path (``Model.infer`` on a SimpleITK image, a model folder with a MONAI UNet of random weights:
channels 8-16-32-64, 14 classes, roi 96³, overlap 0.25; the same network as ``bench_inference.py``) on a synthetic
CT, once with ``extra.runtime = "torch"`` and once with ``"openvino"``, each after a warm-up (for OpenVINO the
warm-up is where the export happens, timed separately; a second model instance then shows the export is reused).
Prints seconds, the ratio openvino ÷ torch, and the share of voxels whose labels are identical.

Run::

    python bench/bench_cpu_runtime.py --size 256 256 150
    python bench/bench_cpu_runtime.py --size 512 512 300      # long on 2 cores: torch takes most of it
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def model_folder(tmp: Path, classes: int, roi: int, overlap: float, runtime: str) -> Path:
    import torch
    from monai.networks.nets import UNet

    folder = tmp / f"bench-{runtime}"
    folder.mkdir()
    torch.manual_seed(0)
    net = UNet(3, 1, classes, (8, 16, 32, 64), (2, 2, 2), num_res_units=1)
    weights = tmp / "model.pt"
    if not weights.exists():
        torch.save(net.state_dict(), weights)
    (folder / "model.pt").write_bytes(weights.read_bytes())
    manifest = {"name": "bench", "version": "1", "type": "segmentation",
                "labels": {f"class_{c}": c for c in range(1, classes)}, "weights": "model.pt",
                "network": {"name": "UNet", "args": {"spatial_dims": 3, "in_channels": 1, "out_channels": classes,
                                                     "channels": [8, 16, 32, 64], "strides": [2, 2, 2],
                                                     "num_res_units": 1}},
                "roi_size": [roi] * 3, "overlap": overlap, "extra": {"runtime": runtime},
                "intensity": {"a_min": -1000, "a_max": 1000, "b_min": 0, "b_max": 1, "clip": True}}
    (folder / "hpcseg-model.json").write_text(json.dumps(manifest))
    return folder


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", type=int, nargs=3, default=[256, 256, 150])
    p.add_argument("--classes", type=int, default=14)
    p.add_argument("--roi", type=int, default=96)
    p.add_argument("--overlap", type=float, default=0.25)
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)

    import SimpleITK as sitk
    import torch

    from hpcseg.phantoms import make_phantom
    from hpcseg.server.models import load_model

    x, y, z = args.size
    print(f"== CPU runtime: {x}×{y}×{z}, UNet 8-16-32-64, {args.classes} classes, roi {args.roi}³, overlap "
          f"{args.overlap}; {len(os.sched_getaffinity(0))} CPUs, torch threads {torch.get_num_threads()}, "
          f"load average {os.getloadavg()[0]:.1f}", flush=True)
    image, _, _ = make_phantom(0, (x, y, z), (0.8, 0.8, 1.0))
    image.SetSpacing((0.8, 0.8, 1.0))
    labels: dict[str, np.ndarray] = {}
    seconds: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="hpcseg-bench-rt-") as tmp:
        for runtime in ("torch", "openvino"):
            folder = model_folder(Path(tmp), args.classes, args.roi, args.overlap, runtime)
            model = load_model(folder, "cpu")
            t = time.perf_counter()
            model.warmup()  # openvino: the export (once per weights) happens here
            warm = time.perf_counter() - t
            t = time.perf_counter()
            labels[runtime] = sitk.GetArrayFromImage(model.infer(image, {}))
            seconds[runtime] = time.perf_counter() - t
            print(f"{runtime:8s}: {seconds[runtime]:7.1f} s for the volume (load + warm-up before it {warm:.1f} s)",
                  flush=True)
            if runtime == "openvino":
                t = time.perf_counter()
                again = load_model(folder, "cpu")
                again.warmup()
                took = time.perf_counter() - t
                print(f"openvino: a second model instance reuses the export: load + warm-up {took:.1f} s; cache "
                      f"{sorted(q.name for q in (folder / '.hpcseg-cache').iterdir())}", flush=True)
    same = float((labels["torch"] == labels["openvino"]).mean())
    print(f"ratio openvino/torch at {x}×{y}×{z}: time {seconds['openvino'] / seconds['torch']:.3f}; labels identical "
          f"on {100 * same:.4f} % of voxels; load average at the end {os.getloadavg()[0]:.1f}", flush=True)


if __name__ == "__main__":
    main()

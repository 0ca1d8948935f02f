"""Benchmark: slab-stitched inference vs MONAI's sliding_window_inference + argmax, and the wire codecs.

On a synthetic CT of 512×512×300 (hpcseg.phantoms, int16 HU), with a 3D UNet of random weights (channels
8-16-32-64, 14 or 105 output classes), roi 96³, overlap 0.25, sw_batch_size 1, on the CPU (or CUDA if present):

- time and peak resident memory of each variant, each in its own subprocess (peak RSS from getrusage in the child,
  its baseline after loading the volume and the network subtracted too), and whether the labels are identical;
- a variant that cannot fit is not run: its need is estimated first and reported as "fails: needs X GB"; one
  that is run gets an address-space limit (RLIMIT_AS) a little under the free memory, so it fails on its own
  instead of taking the machine down;
- the whole server path (``Model.infer`` on the SimpleITK image, via a model folder) at 14 classes;
- the codecs of hpcseg.imaging on the same volume: ratio and MB/s of raw voxel bytes both ways.

Run (minutes on 2 cores; prints as it goes)::

    python bench/bench_inference.py                 # everything
    python bench/bench_inference.py --size 256 256 150 --classes 14     # quicker
    python bench/bench_inference.py --classes 14 --runtime openvino     # the network through OpenVINO, both sides
    python bench/bench_inference.py --size 256 256 900 --classes 14 --layout x   # a long volume, layout forced

``--runtime`` picks the network's runtime for every variant (torch by default; openvino is what the server uses on
a CPU): the stitching is the same code either way, but the share of the time that is not the network grows as
the network gets faster.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def _mem_available() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 8 * 2**30


def _vm_size() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmSize:"):
            return int(line.split()[1]) * 1024
    return 0


def _rss_peak() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def estimate_bytes(variant: str, classes: int, size: tuple[int, int, int], roi: int, overlap: float,
                   layout: str = "auto") -> int:
    """What a variant's stitching needs beyond the input, in bytes (float32 logits, MONAI's int64 argmax)."""
    x, y, z = size
    stride = max(int(roi * (1 - overlap)), 1)
    window = classes * roi**3 * 4 * 8  # the network's last activations at C channels for one window (measured)
    if variant == "monai":  # output + count map + argmax (int64) + its uint8 copy
        return classes * x * y * z * 4 + x * y * z * (4 + 8 + 1) + window
    # the slab stitcher: the floats its layout keeps alive (x- or z-slabs, whichever is fewer: see inference.py)
    from monai.data.utils import dense_patch_slices

    from hpcseg.server.inference import _alive_x, _alive_z

    grid = [max(s, roi) for s in (x, y, z)]  # padded to the roi, as MONAI pads
    rois = (roi,) * 3
    slices = dense_patch_slices(grid, rois, [roi if roi == s else stride for s in grid])
    alive_x, alive_z = _alive_x(grid, rois, slices), _alive_z(grid, rois, slices)
    alive = {"x": alive_x, "z": alive_z}.get(layout, min(alive_x, alive_z))
    return (classes + 1) * alive * 4 + x * y * z + window


def child(args: argparse.Namespace) -> None:
    """One variant in this process; prints one JSON line."""
    import torch
    from monai.inferers import sliding_window_inference
    from monai.networks.nets import UNet

    from hpcseg.server.inference import sliding_window_labels

    vol = np.load(args.volume, mmap_mode="r")  # (z, y, x) int16
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    net = UNet(3, 1, args.classes, (8, 16, 32, 64), (2, 2, 2), num_res_units=1).eval().to(device)
    x = torch.from_numpy(np.clip((np.asarray(vol, np.float32).transpose(2, 1, 0) + 1000) / 2000, 0, 1).copy())
    x = x[None, None].to(device)
    net_seconds = [0.0]
    call = net
    if args.runtime == "openvino":  # the same network through the server's CPU runtime, for both variants
        from hpcseg.server.cpu_runtime import OpenVinoPredictor

        spec = {"bench": "UNet 8-16-32-64 res 1, seed 0", "classes": args.classes}
        call = OpenVinoPredictor.for_model(net, None, spec, (1, 1, args.roi, args.roi, args.roi))

    def predictor(w):
        t = time.perf_counter()
        out = call(w)
        if device == "cuda":
            torch.cuda.synchronize()
        net_seconds[0] += time.perf_counter() - t
        return out

    with torch.inference_mode():
        predictor(x[..., : args.roi, : args.roi, : args.roi])  # warm-up (and compile) outside the measurement
    net_seconds[0] = 0.0
    if args.limit:
        lim = _vm_size() + args.limit
        resource.setrlimit(resource.RLIMIT_AS, (lim, lim))
    base = _rss_peak()
    result = {"variant": args.variant, "classes": args.classes, "device": device, "baseline_gb": base / 2**30}
    roi = (args.roi,) * 3
    t0 = time.perf_counter()
    try:
        with torch.inference_mode():
            if args.variant == "monai":
                logits = sliding_window_inference(x, roi, 1, predictor, overlap=args.overlap)
                t1 = time.perf_counter()
                labels = logits.argmax(1)[0].to(torch.uint8)
                del logits
                result["argmax_s"] = time.perf_counter() - t1
            elif args.variant == "slab":
                labels = sliding_window_labels(x, predictor, roi, 1, args.overlap, layout=args.layout)
            else:  # the server path: a model folder, Model.infer on the SimpleITK image
                labels = _server_path(args, net, vol)
    except (RuntimeError, MemoryError) as exc:
        result.update(ok=False, error=str(exc).splitlines()[0][:200])
        print(json.dumps(result), flush=True)
        return
    result.update(ok=True, seconds=time.perf_counter() - t0, network_s=net_seconds[0],
                  peak_gb=_rss_peak() / 2**30)
    result["extra_gb"] = result["peak_gb"] - result["baseline_gb"]
    if args.labels_out:
        np.save(args.labels_out, np.asarray(labels.cpu() if hasattr(labels, "cpu") else labels))
    print(json.dumps(result), flush=True)


def _server_path(args: argparse.Namespace, net, vol: np.ndarray):
    import SimpleITK as sitk
    import torch

    from hpcseg.server.models import load_model

    with tempfile.TemporaryDirectory() as tmp:
        torch.save(net.state_dict(), Path(tmp) / "model.pt")
        labels = {f"class_{c}": c for c in range(1, args.classes)}
        manifest = {"name": "bench", "version": "1", "type": "segmentation", "labels": labels, "weights": "model.pt",
                    "network": {"name": "UNet", "args": {"spatial_dims": 3, "in_channels": 1,
                                                         "out_channels": args.classes,
                                                         "channels": [8, 16, 32, 64], "strides": [2, 2, 2],
                                                         "num_res_units": 1}},
                    "roi_size": [args.roi] * 3, "overlap": args.overlap, "extra": {"runtime": args.runtime},
                    "intensity": {"a_min": -1000, "a_max": 1000, "b_min": 0, "b_max": 1, "clip": True}}
        (Path(tmp) / "hpcseg-model.json").write_text(json.dumps(manifest))
        model = load_model(Path(tmp))
        image = sitk.GetImageFromArray(np.asarray(vol))
        image.SetSpacing((0.8, 0.8, 1.0))
        out = model.infer(image, {})
    return torch.from_numpy(sitk.GetArrayFromImage(out).transpose(2, 1, 0).copy())


def run_variant(variant: str, classes: int, volume: Path, args: argparse.Namespace, labels_out: Path | None) -> dict:
    need = estimate_bytes("monai" if variant == "monai" else "slab", classes, tuple(args.size), args.roi,
                          args.overlap, args.layout)
    free = _mem_available()
    head = {"variant": variant, "classes": classes, "estimate_gb": need / 2**30}
    if need > 0.85 * free:
        return {**head, "ok": False, "error": f"fails: needs {need / 2**30:.1f} GB, {free / 2**30:.1f} GB free "
                                              "(not run)"}
    cmd = [sys.executable, __file__, "--child", variant, "--classes", str(classes), "--volume", str(volume),
           "--runtime", args.runtime, "--layout", args.layout, "--roi", str(args.roi), "--overlap", str(args.overlap),
           "--limit", str(int(0.9 * free))]
    if labels_out:
        cmd += ["--labels-out", str(labels_out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if not lines:
        return {**head, "ok": False, "error": f"exit {proc.returncode}: {proc.stderr.strip()[-300:]}"}
    return {**head, **json.loads(lines[-1])}


def bench_codecs(image) -> list[dict]:
    from hpcseg import imaging

    raw = image.GetNumberOfPixels() * image.GetSizeOfPixelComponent()
    out = []
    for ctype in (imaging.CONTENT_TYPE_ZSTD, imaging.CONTENT_TYPE_NIFTI):
        enc, dec = [], []
        for _ in range(3):
            t = time.perf_counter()
            payload = imaging.encode(image, ctype)
            enc.append(time.perf_counter() - t)
            t = time.perf_counter()
            imaging.decode(payload, ctype)
            dec.append(time.perf_counter() - t)
        out.append({"codec": ctype, "ratio": raw / len(payload), "encode_MBps": raw / min(enc) / 1e6,
                    "decode_MBps": raw / min(dec) / 1e6, "bytes": len(payload)})
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", type=int, nargs=3, default=[512, 512, 300])
    p.add_argument("--classes", type=int, nargs="+", default=[14, 105])
    p.add_argument("--roi", type=int, default=96)
    p.add_argument("--overlap", type=float, default=0.25)
    p.add_argument("--skip-codecs", action="store_true")
    p.add_argument("--runtime", choices=["torch", "openvino"], default="torch",
                   help="the network's runtime in both variants (openvino: the server's CPU default)")
    p.add_argument("--layout", choices=["auto", "x", "z"], default="auto",
                   help="the slab stitcher's layout (auto: the one that keeps fewer floats alive)")
    p.add_argument("--child", choices=["slab", "monai", "server"])
    p.add_argument("--volume", type=Path)
    p.add_argument("--labels-out", type=Path)
    p.add_argument("--limit", type=int, default=0)
    args = p.parse_args()
    if args.child:
        args.variant, args.classes = args.child, args.classes[0]
        child(args)
        return

    import SimpleITK as sitk

    from hpcseg.phantoms import make_phantom

    x, y, z = args.size
    print(f"== synthetic CT {x}×{y}×{z} int16 ({x * y * z * 2 / 1e6:.0f} MB), {os.cpu_count()} CPUs", flush=True)
    image, _, _ = make_phantom(0, (x, y, z), (0.8, 0.8, 1.0))
    if not args.skip_codecs:
        for c in bench_codecs(image):
            print(f"codec {c['codec']:36s} ratio {c['ratio']:.2f}  encode {c['encode_MBps']:6.0f} MB/s  "
                  f"decode {c['decode_MBps']:6.0f} MB/s  ({c['bytes'] / 1e6:.0f} MB)", flush=True)
    with tempfile.TemporaryDirectory(prefix="hpcseg-bench-") as tmp:
        volume = Path(tmp) / "ct.npy"
        np.save(volume, sitk.GetArrayViewFromImage(image))
        del image
        for classes in args.classes:
            res = {}
            for variant in ("slab", "monai") + (("server",) if classes == min(args.classes) else ()):
                out = Path(tmp) / f"{variant}-{classes}.npy" if variant != "server" else None
                r = run_variant(variant, classes, volume, args, out)
                res[variant] = r
                if r.get("ok"):
                    extra = f", argmax {r['argmax_s']:.1f} s" if "argmax_s" in r else ""
                    print(f"{variant:6s} {classes:3d} classes: {r['seconds']:7.1f} s (network {r['network_s']:.1f} s"
                          f"{extra}), peak RSS {r['peak_gb']:.2f} GB (+{r['extra_gb']:.2f} GB over the "
                          f"{r['baseline_gb']:.2f} GB of volume and network; estimate {r['estimate_gb']:.1f} GB)",
                          flush=True)
                else:
                    print(f"{variant:6s} {classes:3d} classes: {r['error']}", flush=True)
            s, m = res["slab"], res["monai"]
            if s.get("ok") and m.get("ok"):
                same = np.array_equal(np.load(Path(tmp) / f"slab-{classes}.npy"),
                                      np.load(Path(tmp) / f"monai-{classes}.npy"))
                print(f"ratio slab/monai at {classes} classes: time {s['seconds'] / m['seconds']:.2f}, "
                      f"stitching time (total - network) {(s['seconds'] - s['network_s']) / max(m['seconds'] - m['network_s'], 1e-9):.2f}, "  # noqa: E501
                      f"peak RSS {s['peak_gb'] / m['peak_gb']:.2f}, extra memory {s['extra_gb'] / m['extra_gb']:.2f}; "
                      f"labels identical: {same}", flush=True)
            elif s.get("ok"):
                print(f"at {classes} classes only the slab stitcher runs ({s['peak_gb']:.1f} GB peak); MONAI: "
                      f"{m.get('error')}", flush=True)


if __name__ == "__main__":
    main()

"""Benchmark: ct-body's linear-time implementation vs the scipy one it replaced, side by side in one run.

On synthetic CTs (``hpcseg.phantoms.make_phantom``, as ``hpcseg sample-ct``; no real CT can be downloaded here):

- ``phantom``: 512×512×300 int16, 0.8×0.8×1.0 mm, σ 20 HU noise + a bias field (the round-trip benchmark's CT);
- ``ct-like``: 512×512×120 float32 HU, 0.7×0.7×2.5 mm (thick slices: another element shape), σ 40 HU;

each implementation runs ``segment_ct_body`` on the array in a subprocess of its own (so its peak resident memory
is its own: VmHWM in the child, the volume's baseline subtracted too). Printed per case: seconds, peak RSS,
the ratio new ÷ old of both, and per-label Dice of the new labels against the old (and whether they are identical).

Run::

    python bench/bench_ct_body.py                       # both cases (about 2 min on 2 quiet cores)
    python bench/bench_ct_body.py --cases phantom --size 256 256 150
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

CASES = {  # shape (x, y, z), spacing, noise, dtype
    "phantom": ((512, 512, 300), (0.8, 0.8, 1.0), 20.0, "int16"),
    "ct-like": ((512, 512, 120), (0.7, 0.7, 2.5), 40.0, "float32"),
}


def _rss_peak() -> int:
    """This process's peak RSS (VmHWM: unlike getrusage's ru_maxrss, not inherited from the parent across exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def child(impl: str, volume: Path, spacing: list[float], labels_out: Path) -> None:
    """Run one implementation on the saved volume; print one JSON line."""
    hu = np.load(volume)
    base = _rss_peak()
    if impl == "old":
        sys.path.insert(0, str(ROOT / "bench"))
        from ct_body_reference import segment_ct_body_reference as segment
    else:
        from hpcseg.server.classical_models import segment_ct_body as segment
    t0 = time.perf_counter()
    labels = segment(hu, tuple(spacing), 0)
    seconds = time.perf_counter() - t0
    peak = _rss_peak()
    np.save(labels_out, labels)
    print(json.dumps({"impl": impl, "seconds": seconds, "peak_gb": peak / 2**30, "extra_gb": (peak - base) / 2**30}),
          flush=True)


def run(impl: str, volume: Path, spacing: tuple[float, ...], labels_out: Path) -> dict:
    cmd = [sys.executable, __file__, "--child", impl, "--volume", str(volume), "--labels-out", str(labels_out),
           "--spacing", *map(str, spacing)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if not lines:
        raise SystemExit(f"{impl} failed (exit {proc.returncode}): {proc.stderr.strip()[-500:]}")
    return json.loads(lines[-1])


def dice(a: np.ndarray, b: np.ndarray, label: int) -> float:
    x, y = a == label, b == label
    total = int(x.sum()) + int(y.sum())
    return 1.0 if total == 0 else 2.0 * float((x & y).sum()) / total


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cases", nargs="+", choices=sorted(CASES), default=list(CASES))
    p.add_argument("--size", type=int, nargs=3, help="override every case's size (x y z)")
    p.add_argument("--child", choices=["old", "new"])
    p.add_argument("--volume", type=Path)
    p.add_argument("--labels-out", type=Path)
    p.add_argument("--spacing", type=float, nargs=3)
    args = p.parse_args()
    if args.child:
        child(args.child, args.volume, args.spacing, args.labels_out)
        return

    import SimpleITK as sitk

    from hpcseg.phantoms import make_phantom

    print(f"== ct-body: new (linear-time) vs old (scipy), {len(os.sched_getaffinity(0))} CPUs, "
          f"load average {os.getloadavg()[0]:.1f}", flush=True)
    with tempfile.TemporaryDirectory(prefix="hpcseg-bench-ctbody-") as tmp:
        for case in args.cases:
            shape, spacing, noise, dtype = CASES[case]
            shape = tuple(args.size) if args.size else shape
            image, _, _ = make_phantom(1, shape=shape, spacing=spacing, noise=noise)
            volume = Path(tmp) / f"{case}.npy"
            np.save(volume, sitk.GetArrayViewFromImage(image).astype(dtype))
            del image
            res = {impl: run(impl, volume, spacing, Path(tmp) / f"{case}-{impl}.npy") for impl in ("old", "new")}
            old, new = np.load(Path(tmp) / f"{case}-old.npy"), np.load(Path(tmp) / f"{case}-new.npy")
            dices = {label: dice(old, new, label) for label in (1, 2, 3)}
            for impl in ("old", "new"):
                r = res[impl]
                print(f"{case:8s} {'×'.join(map(str, shape))} {dtype:7s} {impl}: {r['seconds']:7.2f} s, "
                      f"peak RSS {r['peak_gb']:.2f} GB (+{r['extra_gb']:.2f} GB over the volume)", flush=True)
            o, n = res["old"], res["new"]
            print(f"{case:8s} ratio new/old: time {n['seconds'] / o['seconds']:.3f}, peak RSS "
                  f"{n['peak_gb'] / o['peak_gb']:.2f}, extra memory {n['extra_gb'] / max(o['extra_gb'], 1e-9):.2f}; "
                  f"Dice body {dices[1]:.4f} lungs {dices[2]:.4f} bone {dices[3]:.4f}; labels identical: "
                  f"{bool(np.array_equal(old, new))}", flush=True)
    print(f"load average at the end {os.getloadavg()[0]:.1f}", flush=True)


if __name__ == "__main__":
    main()

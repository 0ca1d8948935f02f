"""Benchmark: one interactive click through the hpcseg worker process ÷ the same click from the library in-process.

The Slicer module sends every click to its worker (``python -m hpcseg.worker``): the request as a JSON line,
the answer read by a timer tick (10 ms while a call is out, as the module's QTimer), the mask back as an ``.npy``
file in the private folder, read and deleted. The baseline is the same click made by
:class:`hpcseg.worker.session.SegmentationSession` in this process (what the module did with threads). Both talk
to the same local server job (profile ``local``), the volume already in the server's session, clicks
interleaved (worker, in-process, worker, ...) at the same points, so the server's work is the same for both.

Run (about a minute; prints the medians and the ratio; the goal is ≤ 1.2)::

    python bench/bench_click_worker.py                       # 256×256×160 phantom, 15 clicks each
    python bench/bench_click_worker.py --size 128 128 96 --clicks 30
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "slicer_plugin" / "HPCSeg"))

from HPCSegLib.worker import WorkerClient  # noqa: E402

from hpcseg.config import local_profile  # noqa: E402
from hpcseg.jobs import JobManager  # noqa: E402
from hpcseg.phantoms import make_phantom  # noqa: E402
from hpcseg.serverjobs import stop_servers  # noqa: E402
from hpcseg.worker.geometry import VolumeArray, ijk_to_ras  # noqa: E402
from hpcseg.worker.session import SegmentationSession  # noqa: E402

TICK = 0.01  # the module's QTimer interval while a call is out (HPCSeg.BUSY_TICK_MS)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, nargs=3, default=(256, 256, 160), metavar=("X", "Y", "Z"))
    ap.add_argument("--clicks", type=int, default=15)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="hpcseg-bench-"))
    os.environ.setdefault("HPCSEG_CONFIG", str(tmp / "config.toml"))
    os.environ.setdefault("HPCSEG_STATE_DIR", str(tmp / "state"))
    os.environ["PYTHONPATH"] = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
    for var in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY"):
        os.environ.pop(var, None)

    image, truth_img, names = make_phantom(11, shape=tuple(args.size), spacing=(0.8, 0.8, 1.5))
    volume = VolumeArray.from_image(image, key="bench:1")
    truth = sitk.GetArrayFromImage(truth_img)
    liver = np.argwhere(truth == names["liver"])
    rng = np.random.default_rng(0)
    points = [ijk_to_ras([tuple(int(v) for v in liver[i][::-1])], volume.ijk_to_ras).tolist()
              for i in rng.choice(len(liver), args.clicks + 1, replace=False)]
    print(f"volume {args.size[0]}×{args.size[1]}×{args.size[2]} ({volume.array.nbytes / 1e6:.1f} MB), "
          f"{args.clicks} clicks each, deepgrow-regiongrow on the local server")

    profile = local_profile()
    client = WorkerClient("local", python=sys.executable)
    session = SegmentationSession(profile, timeout=300)
    try:
        client.request("connect", {"timeout": 300})  # starts the local server job
        session.connect(start=False)                   # the same server, in this process
        model = "deepgrow-regiongrow"

        def by_worker(fg):
            spec = client.write_volume(volume.array, volume.ijk_to_ras, volume.key)
            res = client.request("click", {"volume": spec, "model": model, "foreground": fg, "label": "liver"},
                                 tick=TICK)
            return client.read_labels(res)

        def in_process(fg):
            return session.click(volume, model, foreground=fg, label="liver").labels

        by_worker(points[0])  # each side sends the image once into its own server session: not timed
        in_process(points[0])
        worker_s, local_s, inside_s = [], [], []
        for fg in points[1:]:
            for fn, out in ((by_worker, worker_s), (in_process, local_s)):
                t0 = time.perf_counter()
                labels = fn(fg)
                out.append(time.perf_counter() - t0)
                assert labels.shape == volume.array.shape and labels.any()
            inside_s.append(client.last_worker_s)
        w, p = statistics.median(worker_s), statistics.median(local_s)
        pairs = statistics.median(a / b for a, b in zip(worker_s, local_s, strict=True))
        overhead = statistics.median(a - b for a, b in zip(worker_s, inside_s, strict=True))
        print(f"in-process click: median {p * 1000:.1f} ms (min {min(local_s) * 1000:.1f}, "
              f"max {max(local_s) * 1000:.1f})")
        print(f"worker click:     median {w * 1000:.1f} ms (min {min(worker_s) * 1000:.1f}, "
              f"max {max(worker_s) * 1000:.1f}); inside the worker {statistics.median(inside_s) * 1000:.1f} ms")
        print(f"worker overhead (pipes, the mask's .npy file, the {TICK * 1000:.0f} ms tick): median "
              f"{overhead * 1000:.1f} ms a click")
        print(f"ratio worker / in-process: medians {w / p:.3f}, minima {min(worker_s) / min(local_s):.3f}, "
              f"median of the {len(worker_s)} interleaved pairs {pairs:.3f}  (goal <= 1.2)")
    finally:
        client.quit()
        session.close()
        stop_servers(JobManager(profile))


if __name__ == "__main__":
    main()

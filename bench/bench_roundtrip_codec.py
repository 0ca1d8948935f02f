"""Round trip of one segmentation through the real server, per wire codec, and what a click costs.

Starts ``python -m hpcseg.server`` on 127.0.0.1 with the built-in models, segments a synthetic CT (the size of
``hpcseg sample-ct``: 256x256x120 int16) with each codec, then clicks on a session. Prints bytes and seconds per
phase and the ratios zstd / gzip-NIfTI. Localhost hides the network: on a tunnel, time scales with the bytes.

    python bench/bench_roundtrip_codec.py [--model ct-body] [--repeat 3]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from hpcseg import imaging
from hpcseg.client import ServerClient
from hpcseg.phantoms import make_phantom
from hpcseg.server.models import builtin_models_dir


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="ct-body")
    ap.add_argument("--click-model", default="deepgrow-regiongrow")
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()

    image, _, _ = make_phantom(0, shape=(256, 256, 120), spacing=(1.5, 1.5, 2.5))
    raw = image.GetNumberOfPixels() * 2
    with tempfile.TemporaryDirectory() as tmp:
        conn = Path(tmp) / "connection.json"
        env = {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")}
        proc = subprocess.Popen([sys.executable, "-m", "hpcseg.server", "--models-dir", str(builtin_models_dir()),
                                 "--connection-file", str(conn), "--device", "auto", "--log-level", "WARNING"],
                                env=env)
        try:
            while not conn.exists():
                if proc.poll() is not None:
                    raise SystemExit(f"server exited with {proc.returncode}")
                time.sleep(0.1)
            info = json.loads(conn.read_text())
            rows = {}
            for codec in ("gzip", "zstd"):
                ctype = imaging.CONTENT_TYPE_ZSTD if codec == "zstd" else imaging.CONTENT_TYPE_NIFTI
                t0 = time.perf_counter()
                up = len(imaging.encode(image, ctype))
                t_enc = time.perf_counter() - t0
                with ServerClient(info["url"], info["token"], compression=codec) as c:
                    c.segment(image, args.model)  # warm the connection and the model
                    times, res = [], None
                    for _ in range(args.repeat):
                        t0 = time.perf_counter()
                        res = c.segment(image, args.model)
                        times.append(time.perf_counter() - t0)
                total = min(times)
                infer = res.params["latencies"]["infer"]
                rows[codec] = (up, res.response_bytes, t_enc, total, infer)
                print(f"{codec:5s} upload {up / 1e6:7.2f} MB ({raw / up:4.1f}x smaller than raw)  mask "
                      f"{res.response_bytes / 1e3:7.1f} kB  encode {t_enc:5.2f} s  round trip {total:5.2f} s "
                      f"(model {infer:5.2f} s, wire+codec {total - infer:5.2f} s)")
            g, z = rows["gzip"], rows["zstd"]
            print(f"zstd / gzip: upload bytes {z[0] / g[0]:.2f}, encode time {z[2] / g[2]:.2f}, "
                  f"wire+codec time {(z[3] - z[4]) / (g[3] - g[4]):.2f}")
            with ServerClient(info["url"], info["token"]) as c:
                sid = c.create_session(image)
                upload = c.get_session(sid)["upload_bytes"]
                x, y, z = (s // 2 for s in image.GetSize())
                t0 = time.perf_counter()
                res = c.click(sid, args.click_model, foreground=[[x, y, z]])
                dt = time.perf_counter() - t0
                print(f"click: {res.request_bytes} B sent ({100 * res.request_bytes / upload:.3f} % of the upload, "
                      f"{100 * res.request_bytes / raw:.4f} % of the raw image), {dt:.2f} s round trip")
        finally:
            proc.terminate()
            proc.wait(30)


if __name__ == "__main__":
    main()

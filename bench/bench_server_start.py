"""Benchmark: how soon a server answers after it starts, vs how long loading every built-in model takes.

Starts ``python -m hpcseg.server`` (the built-in models, ``--device cpu``, port 0) and measures from the
``Popen`` call:

- **first ready**: the connection file appears (written once the first model is loaded and warm: the server
  answers from then on; a request for a model still loading waits for it);
- **all ready**: ``/health/ready`` says no load is running any more (every built-in model loaded or failed). Before
  issue 11 the server answered only then: this is the baseline of the ratio;
- **python**: a bare ``python -c "import hpcseg.server.app"`` in the same run, the floor for any server start.

Each start runs ``--repeat`` times; the median is printed with the per-model load times from ``/info/``.

Run::

    python bench/bench_server_start.py [--repeat 3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parent.parent


def one_start(tmp: Path) -> dict:
    conn = tmp / "connection.json"
    conn.unlink(missing_ok=True)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "hpcseg.server", "--connection-file", str(conn), "--device",
                             "cpu", "--host", "127.0.0.1", "--port", "0", "--log-level", "WARNING"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        while not conn.exists():
            if proc.poll() is not None:
                raise SystemExit(f"the server exited with {proc.returncode}")
            time.sleep(0.01)
        first = time.perf_counter() - t0
        info = json.loads(conn.read_text())
        session = requests.Session()
        session.trust_env = False
        session.headers["Authorization"] = f"Bearer {info['token']}"
        url = f"http://127.0.0.1:{info['port']}"
        while True:
            body = session.get(f"{url}/health/ready", timeout=10).json()
            if not body.get("loading"):
                break
            time.sleep(0.02)
        all_ready = time.perf_counter() - t0
        models = session.get(f"{url}/info/", timeout=10).json()["hpcseg"]["models"]
        return {"first": first, "all": all_ready, "first_models": info["models"],
                "load_s": {k: v.get("load_seconds") for k, v in models.items()}}
    finally:
        proc.terminate()
        proc.wait(30)


def bare_python() -> float:
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import hpcseg.server.app"], check=True,
                   env={**os.environ, "PYTHONPATH": str(ROOT)})
    return time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeat", type=int, default=3)
    args = p.parse_args()
    print(f"== server start, built-in models, {len(os.sched_getaffinity(0))} CPUs, load average "
          f"{os.getloadavg()[0]:.1f}", flush=True)
    runs = []
    with tempfile.TemporaryDirectory(prefix="hpcseg-bench-start-") as tmp:
        for k in range(args.repeat):
            r = one_start(Path(tmp))
            runs.append(r)
            print(f"start {k + 1}: first ready {r['first']:.2f} s (serving {', '.join(r['first_models'])}), all "
                  f"ready {r['all']:.2f} s; load+warm-up per model {r['load_s']}", flush=True)
    py = statistics.median(bare_python() for _ in range(args.repeat))
    first, all_ready = statistics.median(r["first"] for r in runs), statistics.median(r["all"] for r in runs)
    print(f"median: first ready {first:.2f} s, all ready {all_ready:.2f} s, bare python + app import {py:.2f} s; "
          f"ratio first ready / all ready {first / all_ready:.2f}; load average at the end {os.getloadavg()[0]:.1f}",
          flush=True)


if __name__ == "__main__":
    main()

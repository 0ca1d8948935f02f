"""A cohort as one job array vs. the same cases through sequential ``hpcseg segment`` calls, on the test cluster.

On the real test cluster (tests/cluster, ``ensure_cluster()``; one compute node, compute1, 8 CPUs on the
machine's shared cores; the client<->login link as check.sh leaves it, fast), with ``ct-body``:

1. makes N synthetic CTs (default 16 of 256×256×120 int16, ``hpcseg.phantoms.make_phantom``, different seeds);
2. baseline: N ``hpcseg -p bench segment CT -o MASK --model ct-body`` processes one after another, as a shell
   loop would run them (the first starts the profile's server job and waits for it; the rest reuse it), then
   ``hpcseg stop``;
3. batch: one ``hpcseg -p bench batch IN -o OUT --model ct-body --tasks K`` process (one job array of K tasks);
4. prints both wall times, their ratio (batch ÷ sequential; the issue's goal is ≤ 0.5), cases per minute, and
   where the batch's wall time went, from the batch's own records (its state file, the tasks' ``started``
   files, each result's finish time and model seconds): local validation and staging, upload, queue (array
   submitted to the first task running), running (first task running to the last result written), and the
   collection tail; plus the model's own seconds summed over cases (inference) and that sum over the running
   window × K (how busy the K tasks kept the model).

Each side gets a work dir of its own on the cluster, removed at the end; nothing asserts on time. Run as root
(the cluster is Docker containers), a few minutes on 2 cores::

    python bench/bench_batch.py
    python bench/bench_batch.py --cases 8 --size 128 128 64 --tasks 4
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(HERE))

from bench_tunnel import isolate_user_files, loadavg  # noqa: E402


def hpcseg(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    res = subprocess.run([sys.executable, "-m", "hpcseg", *args], env=env, capture_output=True, text=True)
    if check and res.returncode != 0:
        raise SystemExit(f"hpcseg {' '.join(args)} failed:\n{res.stdout}\n{res.stderr}")
    return res


def configure(cluster, work_dir: str) -> None:
    hpcseg("-p", "bench", "config", "init", "--host", cluster.host, "--scheduler", "slurm",
           "--set", f"user={cluster.user}", "--set", f"identity_file={cluster.key_path}",
           "--set", f"known_hosts={cluster.known_hosts}", "--set", f"partition={cluster.partition}",
           "--set", f"python={cluster.python}", "--set", "cpus=1", "--set", "memory=2G",
           "--set", "walltime=00:30:00", "--set", "device=cpu", "--set", "idle_timeout=600",
           "--set", f"work_dir={work_dir}")


def remote(cluster, command: str) -> str:
    from hpcseg.ssh import SSHShell

    sh = SSHShell(cluster.host, user=cluster.user, port=cluster.port, identity_file=cluster.key_path,
                  known_hosts=[cluster.known_hosts], interactive=False)
    try:
        return sh.run(["sh", "-c", command], timeout=300).stdout
    finally:
        sh.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cases", type=int, default=16)
    ap.add_argument("--size", type=int, nargs=3, default=[256, 256, 120], metavar=("X", "Y", "Z"))
    ap.add_argument("--tasks", type=int, default=4)
    ap.add_argument("--keep", action="store_true", help="keep the local files (printed)")
    args = ap.parse_args()

    import SimpleITK as sitk

    from hpcseg.phantoms import make_phantom
    from tests.cluster.harness import ensure_cluster

    cluster = ensure_cluster()
    tmp = Path(tempfile.mkdtemp(prefix="bench-batch-"))
    isolate_user_files(tmp)
    tag = uuid.uuid4().hex[:8]
    seq_work, batch_work = f"~/.hpcseg-bench-{tag}-seq", f"~/.hpcseg-bench-{tag}-batch"
    try:
        inputs = tmp / "in"
        inputs.mkdir()
        for i in range(args.cases):
            image, _, _ = make_phantom(100 + i, tuple(args.size), (1.5, 1.5, 2.5))
            sitk.WriteImage(image, str(inputs / f"ct{i:02d}.nii.gz"), useCompression=True)
        mb = sum(p.stat().st_size for p in inputs.iterdir()) / 1e6
        print(f"{args.cases} CTs of {'x'.join(map(str, args.size))} ({mb:.0f} MB as .nii.gz); load {loadavg()}")

        # -- baseline: sequential hpcseg segment ----------------------------------------------------------------
        configure(cluster, seq_work)
        t0 = time.perf_counter()
        first = None
        for i, ct in enumerate(sorted(inputs.iterdir())):
            hpcseg("-p", "bench", "segment", str(ct), "-o", str(tmp / "seq" / f"{ct.name[:-7]}.seg.nrrd"),
                   "--model", "ct-body")
            if i == 0:
                first = time.perf_counter() - t0
        seq = time.perf_counter() - t0
        hpcseg("-p", "bench", "stop", check=False)
        print(f"sequential `hpcseg segment`: {seq:.1f} s (the first, which started the server job: {first:.1f} s); "
              f"load {loadavg()}")

        # -- batch ----------------------------------------------------------------------------------------------
        hpcseg("-p", "bench", "config", "set", "work_dir", batch_work)
        start = time.time()
        t0 = time.perf_counter()
        out = json.loads(hpcseg("-p", "bench", "batch", str(inputs), "-o", str(tmp / "batch"), "--model",
                                "ct-body", "--tasks", str(args.tasks), "--json").stdout)
        wall = time.perf_counter() - t0
        end = time.time()
        assert out["done"] == args.cases, out
        state = json.loads((tmp / "batch" / ".hpcseg-batch" / "state.json").read_text())
        bdir = f"{batch_work}/batches/{state['batch_id']}"
        # the `started` files' mtimes (ns), not their content (`date +%s`: whole seconds)
        started = [float(x) for x in remote(
            cluster, f"find {bdir}/tasks -name started -printf '%T@\\n'").split()]
        results = [json.loads(line) for line in remote(
            cluster, f"for f in {bdir}/results/*.json; do cat \"$f\"; echo; done").splitlines() if line.strip()]
        submitted = state["rounds"][0]["submitted"]
        staged = state["created"]
        first_run, last_result = min(started), max(r["finished"] for r in results)
        infer = sum(r["seconds"] for r in results)
        phases = {"validate + stage (client)": staged - start, "upload + submit": submitted - staged,
                  "queue (submitted -> first task running)": first_run - submitted,
                  "running (first task -> last result)": last_result - first_run,
                  "collection tail (last result -> done)": end - last_result}
        print(f"batch (one array of {state['rounds'][0]['size']} tasks): {wall:.1f} s; load {loadavg()}")
        for name, sec in phases.items():
            print(f"  {name:42s} {sec:7.1f} s  {100 * sec / wall:5.1f} %")
        print(f"  inference (model seconds summed over cases)  {infer:7.1f} s; ÷ (running window × tasks) "
              f"{infer / max(1e-9, phases['running (first task -> last result)'] * state['rounds'][0]['size']):.2f}")
        print(f"cases per minute: sequential {60 * args.cases / seq:.1f}, batch {60 * args.cases / wall:.1f}")
        print(f"RATIO batch ÷ sequential wall time: {wall / seq:.2f} (goal <= 0.5)")
    finally:
        for work in (seq_work, batch_work):
            remote(cluster, f'rm -rf -- "$HOME"/{work[2:]}')
        if args.keep:
            print(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()

"""One CT segmentation round trip through a Slurm server job and the SSH tunnel, behind a 100 Mbit/s link.

On the real test cluster (tests/cluster, started by ``ensure_cluster()``), with the client<->login link throttled
like a laptop's (``link(cluster, True)``: tbf 100 Mbit/s on both ends), this:

1. makes a synthetic CT of 512×512×300 int16 (``hpcseg.phantoms.make_phantom``: σ 20 HU noise + a bias field,
   as ``hpcseg sample-ct``) and encodes it locally with both wire codecs to show their sizes;
2. starts an inference-server job through Slurm (``ServerConnection``, as ``hpcseg segment`` does) and waits
   until it is ready (not timed in the ratio; printed);
3. baseline: pushes the same number of raw voxel bytes (int16) through an hpcseg ``Tunnel`` over the same SSH
   connection to a TCP sink on the compute node (a second tiny Slurm job, see ``bench_tunnel.py``), until the
   sink confirms them, before and after the round trips (their mean is the baseline); likewise the raw mask
   bytes (uint8) downloaded from it, for a "raw round trip";
4. times ``ServerClient.segment`` with the ``ct-body`` model, once per codec (zstd: hpcseg's byte-shuffled
   zstd-1; gzip: a gzip-1 .nii.gz), after a small warm-up request, and splits it into phases: client encode,
   upload (until the last body byte is handed to the socket), wait (upload draining through the link, server
   decode, inference, mask encode), download, client decode. The server's own ``latencies`` (infer, total)
   come from the answer.

Two ratios are printed, both over the raw image upload on the same link: the whole round trip (the model's own
time included), and its transfer part (round trip minus the server's total: encode, upload, server decode,
download, decode); under 1 means compression more than pays for its CPU time. Nothing asserts on time. The
shared cluster's link can be reset to fast by another process's check.sh: each timed step is checked and measured
again if that happened. The link is made fast again, the jobs cancelled and the files removed in ``finally``.

Run as root (the cluster is Docker containers), 3-6 minutes on 2 cores (mostly the model)::

    python bench/bench_roundtrip.py
    python bench/bench_roundtrip.py --size 256 256 120 --codecs zstd --rate 20mbit
"""

from __future__ import annotations

import argparse
import contextlib
import posixpath
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(HERE))

from bench_tunnel import LinkGuard, SinkJob, download, isolate_user_files, loadavg, upload  # noqa: E402


class Clock:
    """Timestamps of one segment call's phases, fed by the client's progress callbacks and wrapped codecs."""

    def __init__(self) -> None:
        self.t0 = 0.0
        self.encode_s = 0.0
        self.decode_s = 0.0
        self.up_first = self.up_done = self.down_first = self.down_done = 0.0

    def up(self, done: int, total: int) -> None:
        now = time.perf_counter()
        self.up_first = self.up_first or now
        if done >= total:
            self.up_done = now

    def down(self, done: int, total: int) -> None:
        now = time.perf_counter()
        self.down_first = self.down_first or now
        self.down_done = now


@contextlib.contextmanager
def timed_codecs(clock_ref: list[Clock | None]):
    """Time hpcseg.imaging.encode/decode as the client calls them (the client looks them up on the module)."""
    from hpcseg import imaging

    enc, dec = imaging.encode, imaging.decode

    def encode(*a, **kw):
        t = time.perf_counter()
        try:
            return enc(*a, **kw)
        finally:
            if clock_ref[0]:
                clock_ref[0].encode_s += time.perf_counter() - t

    def decode(*a, **kw):
        t = time.perf_counter()
        try:
            return dec(*a, **kw)
        finally:
            if clock_ref[0]:
                clock_ref[0].decode_s += time.perf_counter() - t

    imaging.encode, imaging.decode = encode, decode
    try:
        yield
    finally:
        imaging.encode, imaging.decode = enc, dec


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", type=int, nargs=3, default=[512, 512, 300], metavar=("X", "Y", "Z"))
    ap.add_argument("--spacing", type=float, nargs=3, default=[0.8, 0.8, 1.0], metavar=("SX", "SY", "SZ"))
    ap.add_argument("--noise", type=float, default=20.0, help="phantom noise σ in HU (default 20)")
    ap.add_argument("--model", default="ct-body")
    ap.add_argument("--codecs", nargs="+", default=["zstd", "gzip"], choices=["zstd", "gzip"])
    ap.add_argument("--rate", default="100mbit", help="tc rate of the client<->login link (default 100mbit)")
    ap.add_argument("--container", metavar="IMAGE_DIR", nargs="?", const="build",
                    help="run the server inside hpcseg's image under Charliecloud's ch-run (the directory image of "
                         "tests/cluster/image.sh; with no value it is built or found up to date)")
    args = ap.parse_args()

    from tests.cluster.harness import ensure_cluster, link

    cluster = ensure_cluster()
    tmp = Path(tempfile.mkdtemp(prefix="hpcseg-bench-roundtrip-"))
    isolate_user_files(tmp)

    from hpcseg import imaging
    from hpcseg.client import ServerClient
    from hpcseg.jobs import JobManager, JobStore
    from hpcseg.phantoms import make_phantom
    from hpcseg.serverjobs import ServerConnection, stop_servers
    from hpcseg.ssh import SSHShell
    from hpcseg.tunnel import Tunnel
    from tests.integration.conftest import cluster_profile

    print(f"load average at start: {loadavg()} (2 cores shared with anything else running)", flush=True)
    t = time.perf_counter()
    image, _truth, _names = make_phantom(1, shape=args.size, spacing=args.spacing, noise=args.noise)
    small, _, _ = make_phantom(2, shape=(64, 64, 48))
    nvox = image.GetNumberOfPixels()
    raw_img, raw_mask = nvox * image.GetSizeOfPixelComponent(), nvox  # int16 voxels up, uint8 labels down
    print(f"phantom {'×'.join(map(str, args.size))} int16, σ {args.noise:g} HU: {raw_img / 1e6:.1f} MB raw, "
          f"made in {time.perf_counter() - t:.1f} s")
    local = {}
    for codec in args.codecs:
        ctype = imaging.CONTENT_TYPE_ZSTD if codec == "zstd" else imaging.CONTENT_TYPE_NIFTI
        t = time.perf_counter()
        n = len(imaging.encode(image, ctype))
        local[codec] = (n, time.perf_counter() - t)
        print(f"  {codec}: {n / 1e6:.1f} MB (ratio {raw_img / n:.2f}), encoded in {local[codec][1]:.2f} s")

    profile = cluster_profile(cluster, "slurm", walltime="00:30:00", idle_timeout=900, memory="6G", cpus=2)
    if args.container:
        image_dir = args.container
        if image_dir == "build":
            repo = Path(__file__).resolve().parent.parent
            out = subprocess.run(["bash", str(repo / "tests/cluster/image.sh"), str(repo)], check=True,
                                 capture_output=True, text=True).stdout
            image_dir = out.strip().splitlines()[-1]
        profile.container_runtime, profile.image, profile.python = "charliecloud", image_dir, "python3"
        profile.validate()
        print(f"server: inside the image {image_dir} under ch-run (container_runtime = charliecloud)", flush=True)
    shell = SSHShell.from_profile(profile, interactive=False)
    jm = JobManager(profile, shell=shell, store=JobStore(tmp / "jobs.json"))
    sink = SinkJob(shell)
    conn = None
    base_up: list[float] = []
    base_down: list[float] = []
    rows: dict[str, dict] = {}
    try:
        guard = LinkGuard(cluster, True, args.rate)
        guard.ensure()
        print(f"link: slow, {args.rate} each way (tbf on both ends of client<->login)", flush=True)
        t = time.perf_counter()
        conn = ServerConnection(profile, jobs=jm, timeout=600).open()
        print(f"server job {conn.record.job_id} on {conn.info.host} ready after {time.perf_counter() - t:.1f} s",
              flush=True)
        sink.start()
        print(f"sink job {sink.job_id} on {sink.host}:{sink.port}", flush=True)

        def baseline(tunnel_port: int) -> None:
            upload(tunnel_port, 1 << 20)  # warm the channel
            base_up.append(guard.run(lambda _a: upload(tunnel_port, raw_img), "the baseline upload"))
            base_down.append(guard.run(lambda _a: download(tunnel_port, raw_mask), "the baseline download"))
            print(f"  baseline: {raw_img / 1e6:.1f} MB raw image up in {base_up[-1]:.2f} s "
                  f"({raw_img * 8 / base_up[-1] / 1e6:.1f} Mbit/s); {raw_mask / 1e6:.1f} MB raw mask down in "
                  f"{base_down[-1]:.2f} s ({raw_mask * 8 / base_down[-1] / 1e6:.1f} Mbit/s)", flush=True)

        with Tunnel(shell, sink.host, sink.port) as sport:
            baseline(sport)

        clock_ref: list[Clock | None] = [None]

        def round_trip(client: ServerClient) -> tuple[float, Clock, object]:
            clock = Clock()
            clock_ref[0] = clock
            clock.t0 = time.perf_counter()
            try:
                res = client.segment(image, args.model, upload_progress=clock.up, download_progress=clock.down)
            finally:
                clock_ref[0] = None
            return time.perf_counter() - clock.t0, clock, res

        with timed_codecs(clock_ref):
            for codec in args.codecs:
                with ServerClient(conn.url, conn.info.token, compression=codec) as client:
                    client.segment(small, args.model)  # warm: HTTP connection, model, codec paths
                    total, clock, res = guard.run(lambda _a, c=client: round_trip(c), f"the {codec} round trip")
                lat = res.params.get("latencies", {})
                rows[codec] = {"total": total, "encode": clock.encode_s, "decode": clock.decode_s,
                               "upload": clock.up_done - clock.t0 - clock.encode_s,
                               "wait": clock.down_first - clock.up_done,
                               "download": clock.down_done - clock.down_first,
                               "server_infer": lat.get("infer"), "server_total": lat.get("total"),
                               "up_bytes": res.request_bytes, "down_bytes": res.response_bytes,
                               "labels": res.label_names, "version": res.model_version}
                r = rows[codec]
                print(f"  {codec}: round trip {total:.2f} s; up {r['up_bytes'] / 1e6:.1f} MB, down "
                      f"{r['down_bytes'] / 1e6:.2f} MB; server infer {r['server_infer']} s", flush=True)

        with Tunnel(shell, sink.host, sink.port) as sport:
            baseline(sport)
    finally:
        try:
            link(cluster, False)
        finally:
            if conn is not None:
                conn.close()
            try:
                stop_servers(jm)
                for rec in jm.store.list(profile.name):  # the job's folder and its jobs/<id> link, nothing else
                    jm.wait(rec.job_id, lambda s: s.state.terminal, timeout=60)
                    shell.run(["rm", "-rf", "--", rec.job_dir, posixpath.join(posixpath.dirname(rec.job_dir),
                                                                              rec.job_id)], timeout=60)
            except Exception as exc:
                print(f"warning: cleaning up the server job: {exc}", file=sys.stderr)
            sink.stop()
            shell.close()
            subprocess.run(["rm", "-rf", str(tmp)])

    print(f"\nload average at end: {loadavg()}; measurements taken again because the link changed: "
          f"{guard.redone}")
    b_up, b_down = statistics.mean(base_up), statistics.mean(base_down)
    rate = raw_img * 8 / b_up / 1e6
    print(f"\nlink measured through the tunnel: {rate:.1f} Mbit/s up, {raw_mask * 8 / b_down / 1e6:.1f} Mbit/s "
          f"down (raw image up {', '.join(f'{x:.2f}' for x in base_up)} s)")
    print(f"baseline raw image upload: {b_up:.2f} s; raw round trip (image up + mask down): {b_up + b_down:.2f} s\n")
    cols = ["codec", "up MB", "raw/up", "encode", "upload", "wait", "srv infer", "srv total", "download",
            "decode", "total", "ratio", "transfer", "xfer ratio"]
    print(" ".join(f"{c:>9}" for c in cols))
    for codec, r in rows.items():
        xfer = r["total"] - (r["server_total"] or 0.0)
        vals = [codec, f"{r['up_bytes'] / 1e6:.1f}", f"{raw_img / r['up_bytes']:.2f}", f"{r['encode']:.2f}",
                f"{r['upload']:.2f}", f"{r['wait']:.2f}", f"{r['server_infer']}", f"{r['server_total']}",
                f"{r['download']:.2f}", f"{r['decode']:.2f}", f"{r['total']:.2f}", f"{r['total'] / b_up:.2f}",
                f"{xfer:.2f}", f"{xfer / b_up:.2f}"]
        print(" ".join(f"{v:>9}" for v in vals))
    print("\nseconds per phase. ratio = whole round trip / raw image upload on the same link (the model's own time "
          "included);\ntransfer = round trip - server total (encode, upload, server decode, mask download, decode); "
          "xfer ratio = transfer / raw image upload:\nunder 1 means compression pays. wait = upload draining + "
          "server decode + inference + mask encode; download = first to last 1 MiB\nchunk of the answer (a mask "
          "under 1 MiB arrives in one chunk: its time is in wait)")
    for codec, r in rows.items():
        print(f"{codec}: mask labels {r['labels']}, model version {r['version']}, mask {r['down_bytes']} bytes "
              f"(raw {raw_mask})")


if __name__ == "__main__":
    main()

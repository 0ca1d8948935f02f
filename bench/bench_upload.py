"""Image-mask pair upload (``DatasetUploader.upload``) vs OpenSSH ``scp`` of the same files, fast and slow link.

On the real test cluster (tests/cluster, started by ``ensure_cluster()``), with N synthetic CT pairs (default 4
of 256×256×160 int16 + uint8 labels, ``hpcseg.phantoms.make_phantom``, σ 20 HU noise) written as the user would
have them (.nii.gz from SimpleITK's default writer; also uncompressed .nii for a second baseline), for each link
setting (fast; 100 Mbit/s tbf on both ends of the client<->login link):

- hpcseg: ``DatasetUploader(shell, root).upload_many(pairs, dataset=...)`` (what ``hpcseg upload`` does: the next
  pair is prepared while one is sent), and ``upload(image, mask, ...)`` pair by pair, each into a fresh dataset
  (validation, anonymised .nii.gz rewrite, sha256, scp to ``.incoming/``, remote hash check and commit under flock),
  over one SSH connection opened before the clock starts;
- baseline: one OpenSSH ``scp`` command copying the same pairs' .nii.gz files (and then their .nii files) to a
  folder on the login node (key and known_hosts of the cluster, its default cipher).

Printed per link: seconds, raw MB/s (raw voxel bytes per second: what the user gets done), wire MB/s, bytes sent
÷ raw bytes (from ``UploadResult``), and the ratios hpcseg / scp in time. The local preparation alone
(``prepare_pair``: read, validate, re-encode, hash) is timed separately to show where the time goes. Nothing
asserts on time. The link is made fast again and every remote folder removed in ``finally`` blocks.

Run as root (the cluster is Docker containers), under a minute on 2 cores::

    python bench/bench_upload.py
    python bench/bench_upload.py --pairs 2 --size 512 512 300 --links slow --rate 50mbit
"""

from __future__ import annotations

import argparse
import posixpath
import secrets
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(HERE))

from bench_tunnel import LinkGuard, isolate_user_files, loadavg  # noqa: E402


def scp_argv(cluster, files: list[Path], dest: str) -> list[str]:
    return ["scp", "-q", "-F", "/dev/null", "-i", cluster.key_path, "-o", "IdentitiesOnly=yes", "-o", "BatchMode=yes",
            "-o", "StrictHostKeyChecking=yes", "-o", f"UserKnownHostsFile={cluster.known_hosts}",
            "-o", "ConnectTimeout=10", "-P", str(cluster.port), *map(str, files),
            f"{cluster.user}@{cluster.host}:{dest}/"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--pairs", type=int, default=4)
    ap.add_argument("--size", type=int, nargs=3, default=[256, 256, 160], metavar=("X", "Y", "Z"))
    ap.add_argument("--noise", type=float, default=20.0, help="phantom noise σ in HU (default 20)")
    ap.add_argument("--links", nargs="+", default=["fast", "slow"], choices=["fast", "slow"])
    ap.add_argument("--rate", default="100mbit", help="tc rate of the slow link (default 100mbit)")
    args = ap.parse_args()

    from tests.cluster.harness import ensure_cluster, link

    cluster = ensure_cluster()
    tmp = Path(tempfile.mkdtemp(prefix="hpcseg-bench-upload-"))
    isolate_user_files(tmp)

    import SimpleITK as sitk

    from hpcseg.datasets import DatasetUploader, prepare_pair
    from hpcseg.phantoms import LABELS, make_phantom
    from hpcseg.ssh import SSHShell
    from tests.integration.conftest import cluster_profile

    print(f"load average at start: {loadavg()} (2 cores shared with anything else running)", flush=True)
    t = time.perf_counter()
    pairs: list[tuple[Path, Path]] = []
    plain: list[Path] = []
    for i in range(args.pairs):
        image, labels, _ = make_phantom(100 + i, shape=args.size, spacing=(1.2, 1.2, 2.0), noise=args.noise)
        img, lbl = tmp / f"ct{i}.nii.gz", tmp / f"ct{i}-seg.nii.gz"
        sitk.WriteImage(image, str(img), useCompression=True)
        sitk.WriteImage(labels, str(lbl), useCompression=True)
        pairs.append((img, lbl))
        for src, name in ((image, f"ct{i}.nii"), (labels, f"ct{i}-seg.nii")):
            sitk.WriteImage(src, str(tmp / name), useCompression=False)
            plain.append(tmp / name)
    gz_files = [f for p in pairs for f in p]
    gz_bytes = sum(f.stat().st_size for f in gz_files)
    nii_bytes = sum(f.stat().st_size for f in plain)
    print(f"{args.pairs} pairs of {'×'.join(map(str, args.size))} made in {time.perf_counter() - t:.1f} s: "
          f".nii.gz {gz_bytes / 1e6:.1f} MB, .nii {nii_bytes / 1e6:.1f} MB", flush=True)

    t = time.perf_counter()
    prep_raw = prep_out = 0
    for i, (img, lbl) in enumerate(pairs):
        p = prepare_pair(img, lbl, LABELS, tmp / f"prep{i}")
        prep_raw += p.raw_bytes
        prep_out += p.image_file.stat().st_size + p.label_file.stat().st_size
        subprocess.run(["rm", "-rf", str(tmp / f"prep{i}")])
    prep_s = time.perf_counter() - t
    print(f"local prepare_pair alone (read, validate, rewrite .nii.gz, sha256): {prep_s:.2f} s for "
          f"{prep_raw / 1e6:.1f} MB raw -> {prep_out / 1e6:.1f} MB", flush=True)

    profile = cluster_profile(cluster, "slurm")
    shell = SSHShell.from_profile(profile, interactive=False)
    base = posixpath.join(shell.home(), f".hpcseg-bench-upload-{secrets.token_hex(3)}")
    uploader = DatasetUploader(shell, posixpath.join(base, "datasets"), python="python3")
    rows = []
    redone = 0
    try:
        for mode in args.links:
            guard = LinkGuard(cluster, mode == "slow", args.rate)
            guard.ensure()
            name = "fast" if mode == "fast" else f"slow {args.rate}"
            print(f"\nlink: {name}", flush=True)
            dest = posixpath.join(base, f"scp-{mode}")
            shell.run(["mkdir", "-p", dest + "-gz", dest + "-nii"], check=True)
            shell.transport  # noqa: B018  (connected before any clock starts)

            def timed_scp(_attempt: int, files: list[Path], to: str) -> float:
                t = time.perf_counter()
                subprocess.run(scp_argv(cluster, files, to), check=True)
                return time.perf_counter() - t

            scp_gz = guard.run(lambda a, d=dest: timed_scp(a, gz_files, d + "-gz"), "scp of the .nii.gz files")
            print(f"  OpenSSH scp .nii.gz: {scp_gz:.2f} s", flush=True)
            scp_nii = guard.run(lambda a, d=dest: timed_scp(a, plain, d + "-nii"), "scp of the .nii files")
            print(f"  OpenSSH scp .nii:    {scp_nii:.2f} s", flush=True)

            def hpcseg_upload(attempt: int, mode: str = mode, kind: str = "seq") -> tuple[float, list, str]:
                dataset = f"bench-{mode}-{kind}-{attempt}"  # a fresh dataset each try: nothing is skipped
                t = time.perf_counter()
                if kind == "seq":
                    results = [uploader.upload(img, lbl, dataset=dataset, labels=LABELS) for img, lbl in pairs]
                else:
                    results = [r for _i, _m, r in uploader.upload_many(
                        [(img, lbl, LABELS) for img, lbl in pairs], dataset=dataset)]
                    bad = [r for r in results if isinstance(r, Exception)]
                    if bad:
                        raise bad[0]
                return time.perf_counter() - t, results, dataset

            seq_s, _results, _ds = guard.run(hpcseg_upload, "the hpcseg upload, pair by pair")
            print(f"  hpcseg upload() pair by pair: {seq_s:.2f} s", flush=True)
            up_s, results, dataset = guard.run(lambda a: hpcseg_upload(a, kind="many"), "the pipelined upload")
            redone += guard.redone
            sent = sum(r.bytes_sent for r in results)
            raw = sum(r.raw_bytes for r in results)
            statuses = sorted({r.status for r in results})
            print(f"  hpcseg upload_many (`hpcseg upload`): {up_s:.2f} s ({', '.join(statuses)}; "
                  f"{sent / 1e6:.1f} MB sent of "
                  f"{raw / 1e6:.1f} MB raw)", flush=True)
            manifest = uploader.manifest(dataset)
            n_cases = len(manifest["training"]) + len(manifest["validation"])
            rows.append({"link": name, "scp_gz": scp_gz, "scp_nii": scp_nii, "up": up_s, "sent": sent, "raw": raw,
                         "cases": n_cases, "seq": seq_s})
    finally:
        try:
            link(cluster, False)
        finally:
            try:
                shell.run(["rm", "-rf", "--", base], timeout=120)
            except Exception as exc:
                print(f"warning: removing {base} on the cluster: {exc}", file=sys.stderr)
            shell.close()
            subprocess.run(["rm", "-rf", str(tmp)])

    print(f"\nload average at end: {loadavg()}; measurements taken again because the link changed: {redone}")
    print(f"\n{args.pairs} pairs {'×'.join(map(str, args.size))}: raw {rows[0]['raw'] / 1e6:.1f} MB, user's .nii.gz "
          f"{gz_bytes / 1e6:.1f} MB, .nii {nii_bytes / 1e6:.1f} MB; hpcseg sends {rows[0]['sent'] / 1e6:.1f} MB "
          f"(sent/raw {rows[0]['sent'] / rows[0]['raw']:.3f}); local prepare alone {prep_s:.2f} s")
    cols = ["link", "seq s", "hpcseg s", "raw MB/s", "wire MB/s", "scp gz s", "scp nii s", "/scp gz", "/scp nii",
            "cases"]
    print(f"{cols[0]:>14} " + " ".join(f"{c:>9}" for c in cols[1:]))
    for r in rows:
        vals = [f"{r['seq']:.2f}", f"{r['up']:.2f}", f"{r['raw'] / r['up'] / 1e6:.1f}",
                f"{r['sent'] / r['up'] / 1e6:.1f}",
                f"{r['scp_gz']:.2f}", f"{r['scp_nii']:.2f}", f"{r['up'] / r['scp_gz']:.2f}",
                f"{r['up'] / r['scp_nii']:.2f}", str(r["cases"])]
        print(f"{r['link']:>14} " + " ".join(f"{v:>9}" for v in vals))
    print("\nseq s: upload() pair by pair; hpcseg s: upload_many, the next pair prepared while one is sent "
          "(what `hpcseg upload` does)")
    print("/scp gz, /scp nii: hpcseg upload time ÷ OpenSSH scp time of the user's .nii.gz / .nii files "
          "(over 1: slower than scp)")


if __name__ == "__main__":
    main()

"""Throughput of hpcseg's Tunnel vs OpenSSH ``ssh -L`` on the same path: client -> login node -> compute1.

On the real test cluster (tests/cluster, started by ``ensure_cluster()``), a tiny TCP sink/source runs on the
compute node as a Slurm job (``sbatch --wrap`` with the login node's ``python3``; it writes its port to a file in
hpcuser's home). The same bytes then go through:

- ``hpcseg.tunnel.Tunnel``: paramiko direct-tcpip channels over the profile's one SSH connection (SSHShell, which
  prefers aes128-gcm; the negotiated cipher is printed);
- OpenSSH ``ssh -N -L`` with the cluster's key and known_hosts, with its default cipher (chacha20-poly1305 on
  OpenSSH 9.2) and with ``-o Ciphers=aes128-gcm@openssh.com``.

Upload: the client sends N bytes to the sink, which answers with the count received (the clock stops on that
answer, so nothing is left in a buffer). Download: the source sends N bytes, the clock stops at the last one.
Payload is random bytes (nothing on the way compresses). Each figure is the median of ``--repeat`` runs after a
small warm-up; all three forwards stay open and their runs are interleaved, so a background load that comes and
goes on the shared cores hits them alike. Ratios are hpcseg Tunnel / OpenSSH. The link is the fast one unless
``--slow`` (tbf on both ends of the client<->login link), and is made fast again in a ``finally``. The sink job is
cancelled and its folder removed at the end.

Run as root (the cluster is Docker containers), about 30 s on the fast link (2 min with --slow)::

    python bench/bench_tunnel.py                  # 300 MB each way, 3 repeats, fast link
    python bench/bench_tunnel.py --mb 100 --repeat 2 --slow
"""

from __future__ import annotations

import argparse
import contextlib
import os
import posixpath
import re
import secrets
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

ROOT = Path(__file__).resolve().parent.parent
T = TypeVar("T")
sys.path.insert(0, str(ROOT))

# The sink/source, run on the compute node by Slurm. Standard library only; it ends itself when idle.
SINK_PY = r'''
import os, socket, struct, sys, threading
d, idle = sys.argv[1], float(sys.argv[2])
srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind(("0.0.0.0", 0))
srv.listen(16)
srv.settimeout(idle)
tmp = os.path.join(d, "port.tmp")
with open(tmp, "w") as f:
    f.write("%s %d\n" % (socket.gethostname(), srv.getsockname()[1]))
os.replace(tmp, os.path.join(d, "port"))
block = os.urandom(1 << 20)

def recvn(c, n):
    b = b""
    while len(b) < n:
        k = c.recv(n - len(b))
        if not k:
            raise EOFError
        b += k
    return b

def handle(c):
    try:
        c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        h = recvn(c, 9)
        op, n = h[:1], struct.unpack("<Q", h[1:])[0]
        if op == b"U":
            buf, got = bytearray(1 << 20), 0
            while got < n:
                k = c.recv_into(buf, min(len(buf), n - got))
                if not k:
                    break
                got += k
            c.sendall(struct.pack("<Q", got))
        elif op == b"D":
            left = n
            mv = memoryview(block)
            while left:
                k = min(left, len(block))
                c.sendall(mv[:k])
                left -= k
            c.shutdown(socket.SHUT_WR)
            c.recv(1)
    except (OSError, EOFError):
        pass
    finally:
        c.close()

while True:
    try:
        c, _ = srv.accept()
    except socket.timeout:
        break
    threading.Thread(target=handle, args=(c,), daemon=True).start()
'''


def isolate_user_files(tmp: Path) -> None:
    """Never read or write the real user's hpcseg config, state, known_hosts or ~/.ssh/config."""
    os.environ["HPCSEG_CONFIG"] = str(tmp / "config.toml")
    os.environ["HPCSEG_STATE_DIR"] = str(tmp / "state")
    os.environ["HPCSEG_KNOWN_HOSTS"] = str(tmp / "known_hosts")
    os.environ["HPCSEG_SSH_CONFIG"] = str(tmp / "ssh_config")


def loadavg() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def link_state(cluster) -> str:
    """"slow" when both ends of the client<->login link have a tbf qdisc, "fast" when neither, else "half"."""
    res = subprocess.run(["bash", str(Path(cluster.scripts_dir) / "link.sh"), "status"], capture_output=True,
                         text=True, timeout=60, env={**os.environ, "HPCSEG_TESTCLUSTER_DIR": cluster.state_dir})
    n = res.stdout.count("qdisc tbf")
    return "slow" if n >= 2 else "fast" if n == 0 else "half"


class LinkGuard:
    """Keeps the link as wanted around each measurement, and measures again when it changed meanwhile.

    The test cluster is shared: another process's ``ensure_cluster()`` runs check.sh, which makes the link fast.
    ``run(fn)`` sets the link if needed, runs ``fn`` and checks the link is still as wanted; if not, it warns and
    runs ``fn`` again (``tries`` in all), so no figure is taken on the wrong link.
    """

    def __init__(self, cluster, slow: bool, rate: str = "100mbit", tries: int = 4) -> None:
        from tests.cluster.harness import link

        self.cluster, self.slow, self.rate, self.tries, self._link = cluster, slow, rate, tries, link
        self.want = "slow" if slow else "fast"
        self.redone = 0

    def ensure(self) -> None:
        if link_state(self.cluster) != self.want:
            self._link(self.cluster, self.slow, self.rate)

    def run(self, fn: Callable[[int], T], what: str) -> T:
        """``fn(attempt)``; attempt counts from 0."""
        for attempt in range(self.tries):
            self.ensure()
            out = fn(attempt)
            state = link_state(self.cluster)
            if state == self.want:
                return out
            self.redone += 1
            print(f"  warning: the link became {state} during {what} (another process ran check.sh or link.sh?); "
                  "measuring again", file=sys.stderr, flush=True)
        raise RuntimeError(f"the link kept changing during {what}: no figure taken")


class SinkJob:
    """The sink/source as a Slurm job on the compute node; ``host``/``port`` as the login node sees them."""

    def __init__(self, shell, idle: float = 900, walltime_min: int = 30) -> None:
        self.shell = shell
        self.dir = posixpath.join(shell.home(), f".hpcseg-bench-{os.getpid()}-{secrets.token_hex(3)}")
        self.idle = idle
        self.walltime = walltime_min
        self.job_id: str | None = None
        self.host = ""
        self.port = 0

    def start(self, timeout: float = 120) -> SinkJob:
        sh = self.shell
        sh.write_text(posixpath.join(self.dir, "sink.py"), SINK_PY)
        wrap = f"exec python3 {self.dir}/sink.py {self.dir} {self.idle:g}"
        res = sh.run(["sbatch", "--parsable", "-J", "hpcseg-bench-sink", "-t", str(self.walltime), "-n", "1",
                      "-c", "1", "-o", f"{self.dir}/sink.out", "--wrap", wrap], timeout=60, check=True)
        self.job_id = res.stdout.strip().split(";")[0]
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            text = sh.read_text(posixpath.join(self.dir, "port"))
            if text:
                host, port = text.split()
                self.host, self.port = host, int(port)
                return self
            time.sleep(0.3)
        raise RuntimeError(f"sink job {self.job_id} wrote no port in {timeout:.0f} s: "
                           f"{sh.run(['squeue', '-h', '-j', self.job_id]).stdout.strip()} "
                           f"{sh.read_text(posixpath.join(self.dir, 'sink.out'))}")

    def stop(self) -> None:
        try:
            if self.job_id:
                self.shell.run(["scancel", self.job_id], timeout=30)
            self.shell.run(["rm", "-rf", "--", self.dir], timeout=30)
        except Exception as exc:  # cleaning up must not hide the benchmark's own error
            print(f"warning: cleaning up sink job {self.job_id}: {exc}", file=sys.stderr)


def _connect(port: int) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=120)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return s


def upload(port: int, nbytes: int) -> float:
    """Seconds to push ``nbytes`` through the forward at 127.0.0.1:port to the sink (until it confirms them)."""
    block = memoryview(os.urandom(1 << 20))
    with _connect(port) as s:
        t0 = time.perf_counter()
        s.sendall(b"U" + struct.pack("<Q", nbytes))
        left = nbytes
        while left:
            k = min(left, len(block))
            s.sendall(block[:k])
            left -= k
        got = b""
        while len(got) < 8:
            k = s.recv(8 - len(got))
            if not k:
                raise RuntimeError("the sink closed before confirming")
            got += k
        dt = time.perf_counter() - t0
    (n,) = struct.unpack("<Q", got)
    if n != nbytes:
        raise RuntimeError(f"the sink received {n} bytes of {nbytes}")
    return dt


def download(port: int, nbytes: int) -> float:
    """Seconds to receive ``nbytes`` from the source through the forward at 127.0.0.1:port."""
    buf = bytearray(1 << 20)
    with _connect(port) as s:
        t0 = time.perf_counter()
        s.sendall(b"D" + struct.pack("<Q", nbytes))
        got = 0
        while got < nbytes:
            k = s.recv_into(buf)
            if not k:
                break
            got += k
        dt = time.perf_counter() - t0
    if got != nbytes:
        raise RuntimeError(f"received {got} bytes of {nbytes}")
    return dt


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class OpenSSHForward:
    """``ssh -N -L 127.0.0.1:LPORT:HOST:PORT`` to the cluster's login node, strict host key checking."""

    def __init__(self, cluster, host: str, port: int, cipher: str | None, logdir: Path) -> None:
        self.local_port = free_port()
        self.log = logdir / f"ssh-{self.local_port}.log"
        argv = ["ssh", "-v", "-F", "/dev/null", "-i", cluster.key_path, "-o", "IdentitiesOnly=yes",
                "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=yes",
                "-o", f"UserKnownHostsFile={cluster.known_hosts}", "-o", "ConnectTimeout=10",
                "-o", "ExitOnForwardFailure=yes", "-N", "-L", f"127.0.0.1:{self.local_port}:{host}:{port}",
                "-p", str(cluster.port)]
        if cipher:
            argv += ["-o", f"Ciphers={cipher}"]
        argv.append(f"{cluster.user}@{cluster.host}")
        self.argv = argv
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> OpenSSHForward:
        self._logf = open(self.log, "wb")
        self.proc = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=self._logf)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ssh -L exited {self.proc.returncode}: {self.log.read_text()[-2000:]}")
            try:
                socket.create_connection(("127.0.0.1", self.local_port), timeout=1).close()
                return self
            except OSError:
                time.sleep(0.1)
        raise RuntimeError("ssh -L did not listen within 30 s")

    def cipher(self) -> str:
        m = re.search(r"kex: client->server cipher: (\S+)", self.log.read_text(errors="replace"))
        return m.group(1) if m else "?"

    def __exit__(self, *exc) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._logf.close()


def measure_all(ports: list[int], nbytes: int, repeat: int, guard: LinkGuard) -> list[dict[str, list[float]]]:
    """Warm each forward up, then ``repeat`` rounds of (upload, download) on each in turn; seconds of each."""
    warm = min(nbytes, 8 << 20)
    for port in ports:
        upload(port, warm)
        download(port, warm)
    out: list[dict[str, list[float]]] = [{"up": [], "down": []} for _ in ports]
    for _ in range(repeat):
        for port, res in zip(ports, out, strict=True):
            res["up"].append(guard.run(lambda _a, p=port: upload(p, nbytes), "an upload"))
            res["down"].append(guard.run(lambda _a, p=port: download(p, nbytes), "a download"))
    return out


def mbps(nbytes: int, seconds: list[float]) -> float:
    return nbytes / statistics.median(seconds) / 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--mb", type=int, default=300, help="MB each way per run (default 300)")
    ap.add_argument("--repeat", type=int, default=3, help="runs per direction and transport (median reported)")
    ap.add_argument("--slow", action="store_true", help="throttle the client<->login link to --rate first")
    ap.add_argument("--rate", default="100mbit", help="tc rate for --slow (default 100mbit)")
    args = ap.parse_args()

    from tests.cluster.harness import ensure_cluster, link

    cluster = ensure_cluster()
    tmp = Path(tempfile.mkdtemp(prefix="hpcseg-bench-tunnel-"))
    isolate_user_files(tmp)
    from hpcseg.ssh import SSHShell
    from hpcseg.tunnel import Tunnel
    from tests.integration.conftest import cluster_profile

    nbytes = args.mb * 10**6
    shell = SSHShell.from_profile(cluster_profile(cluster, "slurm"), interactive=False)
    sink = SinkJob(shell)
    rows: list[tuple[str, str, dict[str, list[float]]]] = []
    print(f"load average at start: {loadavg()} (2 cores shared with anything else running)")
    try:
        guard = LinkGuard(cluster, args.slow, args.rate)
        guard.ensure()
        print(f"link: {'slow ' + args.rate if args.slow else 'fast'}; {args.mb} MB each way, "
              f"median of {args.repeat}")
        t0 = time.perf_counter()
        sink.start()
        print(f"sink job {sink.job_id} on {sink.host}:{sink.port} after {time.perf_counter() - t0:.1f} s")

        # All three forwards open at once and the runs interleaved (A B C A B C ...): a background load that
        # comes and goes on these shared cores then hits every transport alike.
        t = shell.transport
        ciphers = {t.local_cipher, t.remote_cipher}
        with contextlib.ExitStack() as stack:
            ports = [("hpcseg Tunnel (paramiko)", " / ".join(sorted(ciphers)),
                      stack.enter_context(Tunnel(shell, sink.host, sink.port)))]
            for label, c in (("OpenSSH ssh -L, default", None),
                             ("OpenSSH ssh -L, aes128-gcm", "aes128-gcm@openssh.com")):
                fwd = stack.enter_context(OpenSSHForward(cluster, sink.host, sink.port, c, tmp))
                ports.append((label, fwd.cipher(), fwd.local_port))
            results = measure_all([p for _l, _c, p in ports], nbytes, args.repeat, guard)
            for (label, cipher, _p), res in zip(ports, results, strict=True):
                rows.append((label, cipher, res))
                _print_row(label, cipher, res, nbytes)
    finally:
        try:
            link(cluster, False)
        finally:
            sink.stop()
            shell.close()
            subprocess.run(["rm", "-rf", str(tmp)])

    print(f"\nload average at end: {loadavg()}; runs measured again because the link changed: {guard.redone}")
    print(f"\n{'transport':30} {'cipher':34} {'up MB/s':>9} {'down MB/s':>10}")
    for label, cipher, res in rows:
        print(f"{label:30} {cipher:34} {mbps(nbytes, res['up']):9.1f} {mbps(nbytes, res['down']):10.1f}")
    ours = rows[0][2]
    for label, _c, res in rows[1:]:
        print(f"ratio hpcseg Tunnel / {label}: up {mbps(nbytes, ours['up']) / mbps(nbytes, res['up']):.2f}, "
              f"down {mbps(nbytes, ours['down']) / mbps(nbytes, res['down']):.2f}")


def _print_row(label: str, cipher: str, res: dict[str, list[float]], nbytes: int) -> None:
    fmt: Callable[[list[float]], str] = lambda s: ", ".join(f"{nbytes / x / 1e6:.0f}" for x in s)  # noqa: E731
    print(f"  {label} [{cipher}]: up {mbps(nbytes, res['up']):.1f} MB/s ({fmt(res['up'])}), "
          f"down {mbps(nbytes, res['down']):.1f} MB/s ({fmt(res['down'])})", flush=True)


if __name__ == "__main__":
    main()

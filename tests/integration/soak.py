"""The network soak: interactive requests through the tunnel while the SSH connection carrying it really fails.

Used by tests/integration/test_network_soak.py (a few minutes) and bench/bench_soak.py (30 minutes). One client
(a :class:`~hpcseg.serverjobs.ServerConnection`: tunnel + ServerClient over the profile's SSHShell) sends what a
person in the Slicer module sends: clicks on a session (deepgrow), a whole-image segmentation whose upload is kept
locally, ``/info/`` and session reads. Meanwhile a fault thread, on this test's OWN connection only:

- kills the login sshd processes serving the connection at random moments (a reset, as a killed session);
- restarts the listening login sshd once (by its pid; open sessions survive), and kills the connection just after,
  so the re-login meets the new sshd;
- blackholes the connection once (iptables DROP of its packets both ways) for longer than the keepalive window.

Every answer is compared with the answer to the same request before any fault (same mask, voxel for voxel), every
request's duration with the request deadline; the server's own log says how often each keyed inference ran. The
counts (:class:`SoakCounts`) are printed by both callers and asserted by the test.
"""

from __future__ import annotations

import random
import re
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import SimpleITK as sitk

from . import netfaults


@dataclass
class SoakCounts:
    requests: int = 0
    ok: int = 0
    failed: list[str] = field(default_factory=list)
    hangs: int = 0  # requests that took longer than the request deadline
    wrong_masks: int = 0
    kills: int = 0
    blackholes: int = 0
    sshd_restarts: int = 0
    logins: int = 0  # SSH logins after the first one
    retried: int = 0  # requests the client sent a second time after a lost connection
    ran_twice: int = 0  # keyed inferences the server ran more than once
    late_copies: int = 0  # copies of answered requests that arrived late (held by a fault) and were refused
    inferences_logged: int = 0
    slowest: float = 0.0
    by_kind: Counter = field(default_factory=Counter)
    seconds: list[float] = field(default_factory=list)  # every request's duration

    @property
    def drops(self) -> int:
        return self.kills + self.blackholes

    def lines(self) -> list[str]:
        return [
            f"requests {self.requests} ({', '.join(f'{k} {v}' for k, v in sorted(self.by_kind.items()))}), "
            f"ok {self.ok}, failed {len(self.failed)}, hangs {self.hangs}, wrong masks {self.wrong_masks}",
            f"faults: {self.kills} session kills, {self.blackholes} silent blackholes, {self.sshd_restarts} sshd "
            f"restarts; re-logins {self.logins} for {self.drops} drops; requests sent again {self.retried}",
            f"server: {self.inferences_logged} keyed inferences logged, {self.ran_twice} ran more than once, "
            f"{self.late_copies} late copies of answered requests refused; "
            f"slowest request {self.slowest:.1f} s",
            *(f"  failed: {f}" for f in self.failed[:10]),
        ]


def _transport_port(shell) -> int | None:
    t = shell._transport  # the current connection only: never log in just to find a port
    if t is None or not t.is_active():
        return None
    try:
        return t.sock.getsockname()[1]
    except OSError:
        return None


class _Faults(threading.Thread):
    def __init__(self, cluster, shell, counts: SoakCounts, duration: float, kill_every: tuple[float, float],
                 restart_at: float, blackhole_at: float, blackhole_for: float, seed: int, say) -> None:
        super().__init__(name="soak-faults", daemon=True)
        self.cluster, self.shell, self.counts = cluster, shell, counts
        self.duration, self.kill_every = duration, kill_every
        self.plan = sorted([(restart_at, "restart"), (blackhole_at, "blackhole")])
        self.blackhole_for = blackhole_for
        self.rng = random.Random(seed)
        self.say = say
        self.stop = threading.Event()
        self.error: BaseException | None = None

    def _kill(self) -> None:
        port = _transport_port(self.shell)
        if port is not None and netfaults.kill_session(self.cluster, port):
            self.counts.kills += 1
            self.say(f"  fault: killed the SSH session (client port {port})")

    def run(self) -> None:
        try:
            t0 = time.monotonic()
            next_kill = t0 + self.rng.uniform(*self.kill_every)
            while not self.stop.is_set() and time.monotonic() - t0 < self.duration:
                now = time.monotonic()
                if self.plan and now - t0 >= self.plan[0][0]:
                    _, what = self.plan.pop(0)
                    if what == "restart":
                        netfaults.restart_sshd(self.cluster)
                        self.counts.sshd_restarts += 1
                        self.say("  fault: restarted the login sshd")
                        self._kill()  # the re-login meets the new sshd
                    else:
                        port = _transport_port(self.shell)
                        if port is not None:
                            with netfaults.blackhole(self.cluster, port):
                                self.counts.blackholes += 1
                                self.say(f"  fault: blackholed client port {port} for {self.blackhole_for:.0f} s")
                                self.stop.wait(self.blackhole_for)
                    next_kill = time.monotonic() + self.rng.uniform(*self.kill_every)
                elif now >= next_kill:
                    self._kill()
                    next_kill = now + self.rng.uniform(*self.kill_every)
                self.stop.wait(0.2)
        except BaseException as exc:  # reported by the caller
            self.error = exc


def _same(a: sitk.Image, b: sitk.Image) -> bool:
    return a.GetSize() == b.GetSize() and np.array_equal(sitk.GetArrayViewFromImage(a), sitk.GetArrayViewFromImage(b))


seen_keys: set[str] = set()  # request keys already counted by an earlier run_soak in this process (same server)


def run_soak(conn, cluster, *, duration: float, kill_every: tuple[float, float] = (8.0, 25.0),
             restart_at: float | None = None, blackhole_at: float | None = None, blackhole_for: float = 15.0,
             deadline: float = 120.0, seed: int = 8, say=print, faults: bool = True) -> SoakCounts:
    """Run the soak on an open ServerConnection (see the module docstring); returns the counts.

    ``faults=False`` sends the same requests with no fault at all: the baseline of bench/bench_soak.py."""
    from hpcseg.phantoms import make_phantom

    client, shell = conn.client, conn.jobs.shell
    counts = SoakCounts()
    rng = random.Random(seed)
    image, _, _ = make_phantom(seed, shape=(64, 64, 40))
    small, _, _ = make_phantom(seed + 1, shape=(48, 48, 32))
    seg_params = {"roi_size": [48, 48, 32]}
    clicks = [[[rng.randrange(16, 48), rng.randrange(16, 48), rng.randrange(8, 32)]] for _ in range(6)]
    # the answers before any fault: every later answer to the same request must be the same
    session = client.create_session(image)
    want_click = [client.click(session, "deepgrow-regiongrow", c).mask for c in clicks]
    want_seg = client.segment(small, "phantom-unet", params=seg_params).mask
    logins0, retried0 = shell.logins, client.retried
    injector = _Faults(cluster, shell, counts, duration if faults else 0.0, kill_every,
                       restart_at if restart_at is not None else duration / 3,
                       blackhole_at if blackhole_at is not None else 2 * duration / 3, blackhole_for, seed, say)
    injector.start()
    t0 = time.monotonic()
    try:
        while time.monotonic() - t0 < duration:
            kind = rng.choices(["click", "segment", "info", "session"], weights=[6, 1, 1, 1])[0]
            counts.requests += 1
            counts.by_kind[kind] += 1
            start = time.monotonic()
            try:
                if kind == "click":
                    i = rng.randrange(len(clicks))
                    got: Any = client.click(session, "deepgrow-regiongrow", clicks[i]).mask
                    if not _same(got, want_click[i]):
                        counts.wrong_masks += 1
                elif kind == "segment":
                    got = client.segment(small, "phantom-unet", params=seg_params).mask
                    if not _same(got, want_seg):
                        counts.wrong_masks += 1
                elif kind == "info":
                    assert "deepgrow-regiongrow" in client.info()["models"]
                else:
                    assert isinstance(client.get_session(session), dict)
                counts.ok += 1
            except Exception as exc:
                counts.failed.append(f"{kind} after {time.monotonic() - t0:.0f} s: {type(exc).__name__}: {exc}")
            took = time.monotonic() - start
            counts.seconds.append(took)
            counts.slowest = max(counts.slowest, took)
            if took > deadline:
                counts.hangs += 1
            time.sleep(rng.uniform(0.05, 0.4))  # a person's pace, roughly
    finally:
        injector.stop.set()
        injector.join(60)
    if injector.error is not None:
        raise injector.error
    counts.logins = shell.logins - logins0
    counts.retried = client.retried - retried0
    log = conn.jobs.shell.read_text(f"{conn.record.job_dir}/server.log") or ""
    runs = Counter(re.findall(r"infer \S+ v\S+ request=([0-9a-f]{8}):", log))
    runs = Counter({k: n for k, n in runs.items() if k not in seen_keys})
    seen_keys.update(runs)
    counts.inferences_logged = sum(runs.values())
    counts.ran_twice = sum(1 for n in runs.values() if n > 1)
    late = re.findall(r"request=([0-9a-f]{8}): a late copy of a request already answered", log)
    counts.late_copies = sum(1 for k in late if k in runs)
    return counts

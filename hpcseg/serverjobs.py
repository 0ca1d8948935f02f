"""Find or start a profile's inference-server job, wait until it is really ready, and connect to it.

Ready means three things in turn (scheduler state and server state are two axes, never one): the scheduler runs
the job; the job's ``connection.json`` exists (the server writes it, 0600, after its models are loaded and warmed
up); and ``/health/ready`` answers through the tunnel with the job's token. What a person sees on the way is made
from both axes: "queued: waiting for resources, expected 14:05", "starting on gpu017", "ready".

A start that fails or times out cancels the job (no orphan) and raises with the tail of its logs.

Example::

    with ServerConnection(profile, progress=print) as conn:
        mask, names, version = conn.client.segment("ct.nii.gz", model="phantom-unet")
"""

from __future__ import annotations

import json
import posixpath
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .config import Profile
from .errors import HpcsegError, JobError
from .jobs import JobManager, JobRecord
from .schedulers import JobState, JobStatus
from .schedulers.base import backoff_intervals

Progress = Callable[[str], None]


@dataclass
class ConnectionInfo:
    """What the server job wrote to its connection file (the token never leaves this object unasked)."""

    host: str
    port: int
    token: str
    pid: int = 0
    started: str = ""
    models: list[Any] | None = None
    version: str = ""

    @classmethod
    def parse(cls, text: str) -> ConnectionInfo:
        try:
            d = json.loads(text)
            return cls(host=str(d["host"]), port=int(d["port"]), token=str(d["token"]), pid=int(d.get("pid", 0)),
                       started=str(d.get("started", "")), models=d.get("models"), version=str(d.get("version", "")))
        except (ValueError, KeyError, TypeError) as exc:
            raise JobError(f"the server's connection file is unreadable: {exc}") from exc

    def __repr__(self) -> str:  # keep the token out of logs and tracebacks
        return f"ConnectionInfo(host={self.host!r}, port={self.port}, token=***, pid={self.pid})"


def describe_wait(st: JobStatus) -> str:
    if st.state is JobState.PENDING:
        text = "queued"
        if st.reason:
            text += f": {st.reason}"
        if st.expected_start:
            text += f", expected {st.expected_start:%H:%M}"
        return text
    if st.state is JobState.RUNNING:
        return f"starting on {st.node}" if st.node else "starting"
    return st.state.value


def log_tail(jm: JobManager, job_id: str, lines: int = 15) -> str:
    parts = []
    for name, text in jm.logs(job_id).items():
        tail = "\n".join(text.rstrip().splitlines()[-lines:])
        if tail:
            parts.append(f"--- {name} ---\n{tail}")
    return "\n".join(parts) or "(no log output)"


def read_connection(jm: JobManager, rec: JobRecord) -> ConnectionInfo | None:
    text = jm.shell.read_text(posixpath.join(rec.job_dir, "connection.json"))
    return ConnectionInfo.parse(text) if text else None


def find_server(jm: JobManager) -> tuple[JobRecord, ConnectionInfo] | None:
    """A running server job of this profile that has written its connection file, if any."""
    recs = [r for r in jm.store.list(jm.profile.name)
            if r.template == "server" and not JobState(r.last_state).terminal]
    if not recs:
        return None
    states = jm.status([r.job_id for r in recs])
    for rec in sorted(recs, key=lambda r: r.created, reverse=True):
        if states[rec.job_id].state is JobState.RUNNING:
            conn = read_connection(jm, rec)
            if conn is not None:
                return rec, conn
    return None


def start_server(jm: JobManager, params: dict[str, Any] | None = None, *, timeout: float | None = 1800,
                 progress: Progress | None = None) -> tuple[JobRecord, ConnectionInfo]:
    """Submit a server job and wait for its connection file; on failure or timeout cancel it."""
    rec = jm.submit("server", params or {})
    if progress:
        progress(f"submitted server job {rec.job_id}")
    try:
        return rec, wait_for_connection(jm, rec, timeout=timeout, progress=progress)
    except BaseException as exc:
        jm.cancel([rec.job_id], quiet=True)
        if isinstance(exc, HpcsegError) and not isinstance(exc, KeyboardInterrupt):
            raise JobError(f"{exc.message}; the job was cancelled.\n{log_tail(jm, rec.job_id)}",
                           hint=exc.hint) from exc
        raise


def wait_for_connection(jm: JobManager, rec: JobRecord, *, timeout: float | None,
                        progress: Progress | None = None) -> ConnectionInfo:
    deadline = None if timeout is None else time.monotonic() + timeout
    last = ""
    for delay in backoff_intervals(start=0.5, factor=1.3, cap=5.0):
        st = jm.status([rec.job_id])[rec.job_id]
        if st.state.terminal:
            raise JobError(f"server job {rec.job_id} ended before it was ready ({st.state.value}"
                           + (f", exit code {st.exit_code}" if st.exit_code is not None else "") + ")",
                           hint=f"hpcseg logs {rec.job_id}")
        if st.state is JobState.RUNNING:
            conn = read_connection(jm, rec)
            if conn is not None:
                if st.node and conn.host.split(".")[0] != st.node.split(".")[0] and not jm.profile.is_local:
                    raise JobError(f"the connection file names host {conn.host!r} but the scheduler runs job "
                                   f"{rec.job_id} on {st.node!r}: refusing to connect elsewhere")
                return conn
        msg = describe_wait(st)
        if progress and msg != last:
            progress(msg)
            last = msg
        if deadline is not None and time.monotonic() > deadline:
            raise JobError(f"server job {rec.job_id} was not ready after {timeout:.0f} s ({msg})",
                           hint="raise the timeout (--timeout) or pick a less busy partition", retryable=True)
        time.sleep(delay)
    raise AssertionError("unreachable")  # pragma: no cover


class ServerConnection:
    """A ready server of the profile (found or started), a tunnel to it, and an HTTP client. A context manager."""

    def __init__(self, profile: Profile, *, jobs: JobManager | None = None, start: bool = True,
                 timeout: float | None = 1800, progress: Progress | None = None,
                 params: dict[str, Any] | None = None, new: bool = False) -> None:
        self.profile = profile
        self.jobs = jobs or JobManager(profile)
        self._start = start
        self._new = new
        self._timeout = timeout
        self._progress = progress
        self._params = params
        self._tunnel = None
        self.record: JobRecord | None = None
        self.info: ConnectionInfo | None = None
        self.client = None
        self.url = ""

    def open(self) -> ServerConnection:
        from .client import ServerClient

        found = None if self._new else find_server(self.jobs)
        started_here = found is None
        if found is None:
            if not self._start:
                raise JobError(f"no running server job for profile {self.profile.name}",
                               hint=f"start one with: hpcseg -p {self.profile.name} submit")
            found = start_server(self.jobs, self._params, timeout=self._timeout, progress=self._progress)
        self.record, self.info = found
        try:
            if self.profile.is_local:
                self.url = f"http://127.0.0.1:{self.info.port}"
            else:
                from .tunnel import Tunnel

                self._tunnel = Tunnel(self.jobs.shell, self.info.host, self.info.port)
                self._tunnel.start()
                self.url = self._tunnel.url
            self.client = ServerClient(self.url, self.info.token)
            if self._progress:
                self._progress("loading models")
            self.client.wait_ready(timeout=self._timeout or 600)
            if self._progress:
                self._progress(f"ready: job {self.record.job_id} at {self.url}")
        except BaseException as exc:
            self.close()
            if started_here:  # we started it: a start that fails must not leave a job behind
                self.jobs.cancel([self.record.job_id], quiet=True)
                if isinstance(exc, HpcsegError):
                    raise JobError(f"{exc.message}; the job was cancelled.\n{log_tail(self.jobs, self.record.job_id)}",
                                   hint=exc.hint) from exc
            raise
        return self

    def close(self) -> None:
        if self._tunnel is not None:
            self._tunnel.close()
            self._tunnel = None

    def __enter__(self) -> ServerConnection:
        return self.open()

    def __exit__(self, *exc) -> None:
        self.close()


def stop_servers(jm: JobManager) -> list[str]:
    """Cancel every active server job of the profile; returns their ids."""
    ids = [r.job_id for r in jm.store.list(jm.profile.name)
           if r.template == "server" and not JobState(r.last_state).terminal]
    if ids:
        jm.cancel(ids)
    return ids

"""Find or start a profile's inference-server job, wait until it is really ready, and connect to it.

Ready means three things in turn (scheduler state and server state are two axes, never one): the scheduler runs
the job; the job's ``connection.json`` exists (the server writes it, 0600, after its models are loaded and warmed
up); and ``/health/ready`` answers through the tunnel with the job's token. What a person sees on the way is made
from both axes: "queued: waiting for resources, expected 14:05", "starting on gpu017", "ready".

A start that fails or times out cancels the job (no orphan) and raises with the tail of its logs.

Never a second server: a server job of the profile that is queued or starting is waited for, not duplicated; and
when the scheduler cannot say whether the known job runs (``unknown``: slurmctld down, a timeout) its
``connection.json`` and ``/health/ready`` decide: if they answer, that server is used, else the call refuses with
"cannot tell whether job N is still running: the scheduler does not answer; retry, or `hpcseg stop` it first".
On a real cluster a duplicate is a second GPU allocation, charged to the user, that nobody uses.

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
from .errors import HpcsegError, JobError, ServerError
from .jobs import JobManager, JobRecord
from .schedulers import JobState, JobStatus
from .schedulers.base import backoff_intervals

Progress = Callable[[str], None]
UNCERTAIN_READY_TIMEOUT = 20.0  # how long a server the scheduler cannot vouch for gets to answer /health/ready


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


class UncertainServer(JobError):
    """The scheduler cannot say whether a known server job still runs (its state is ``unknown``)."""

    def __init__(self, rec: JobRecord, conn: ConnectionInfo | None) -> None:
        super().__init__(f"cannot tell whether job {rec.job_id} is still running: the scheduler does not answer; "
                         f"retry, or `hpcseg stop` it first", retryable=True)
        self.record = rec
        self.connection = conn


@dataclass
class FoundServer:
    """A server job of the profile that is not over: ``conn`` once it wrote its connection file.

    ``state`` is the scheduler's word: RUNNING, PENDING (queued or starting: wait for it, do not submit another)
    or UNKNOWN (the scheduler does not answer: only a server that answers may be used).
    """

    record: JobRecord
    state: JobState
    conn: ConnectionInfo | None


def find_active_server(jm: JobManager) -> FoundServer | None:
    """The profile's newest server job that is not over (running first, then unknown, then queued), if any."""
    recs = [r for r in jm.store.list(jm.profile.name)  # a job we cancelled is ending, whatever it reads now
            if r.template == "server" and not JobState(r.last_state).terminal and not r.extra.get("cancelled")]
    if not recs:
        return None
    states = jm.status([r.job_id for r in recs])
    newest = sorted(recs, key=lambda r: r.created, reverse=True)
    for wanted in (JobState.RUNNING, JobState.UNKNOWN):
        for rec in newest:
            st = states.get(rec.job_id)
            if st is not None and st.state is wanted:
                conn = read_connection(jm, rec)
                if conn is not None or wanted is JobState.UNKNOWN:
                    return FoundServer(rec, wanted, conn)
    for rec in newest:  # queued, or running but still loading its models: wait for that one
        st = states.get(rec.job_id)
        if st is not None and not st.state.terminal:
            return FoundServer(rec, JobState.PENDING, None)
    return None


def find_server(jm: JobManager) -> tuple[JobRecord, ConnectionInfo] | None:
    """A running server job of this profile that has written its connection file, if any.

    Raises :class:`UncertainServer` when the scheduler cannot say whether the known server job runs: the caller
    must not take that for "no server" (see the module docstring).
    """
    found = find_active_server(jm)
    if found is None or (found.state is JobState.PENDING):
        return None
    if found.state is JobState.UNKNOWN:
        raise UncertainServer(found.record, found.conn)
    assert found.conn is not None
    return found.record, found.conn


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


class _EndedBeforeReady(JobError):
    pass


def wait_for_connection(jm: JobManager, rec: JobRecord, *, timeout: float | None,
                        progress: Progress | None = None, ended_ok: bool = False) -> ConnectionInfo:
    """Wait until the job's server wrote its connection file. While the scheduler does not answer (``unknown``)
    the file is read anyway: a server that wrote it is running, and no one is submitted meanwhile."""
    deadline = None if timeout is None else time.monotonic() + timeout
    last = ""
    for delay in backoff_intervals(start=0.5, factor=1.3, cap=5.0):
        st = jm.status([rec.job_id])[rec.job_id]
        if st.state.terminal:
            kind = _EndedBeforeReady if ended_ok else JobError
            raise kind(f"server job {rec.job_id} ended before it was ready ({st.state.value}"
                       + (f", exit code {st.exit_code}" if st.exit_code is not None else "") + ")",
                       hint=f"hpcseg logs {rec.job_id}")
        if st.state in (JobState.RUNNING, JobState.UNKNOWN):
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
        found = None if self._new else find_active_server(self.jobs)
        started_here = found is None
        if found is None:
            if not self._start:
                raise JobError(f"no running server job for profile {self.profile.name}",
                               hint=f"start one with: hpcseg -p {self.profile.name} submit")
            self.record, self.info = start_server(self.jobs, self._params, timeout=self._timeout,
                                                  progress=self._progress)
        elif found.state is JobState.PENDING:  # queued or starting: wait for it (it is not ours to cancel)
            if self._progress:
                self._progress(f"waiting for server job {found.record.job_id}")
            try:
                self.info = wait_for_connection(self.jobs, found.record, timeout=self._timeout,
                                                progress=self._progress, ended_ok=True)
                self.record = found.record
            except _EndedBeforeReady:  # it ended meanwhile (cancelled, failed): then a new one is no duplicate
                if not self._start:
                    raise JobError(f"server job {found.record.job_id} ended before it was ready",
                                   hint=f"hpcseg logs {found.record.job_id}") from None
                started_here = True
                self.record, self.info = start_server(self.jobs, self._params, timeout=self._timeout,
                                                      progress=self._progress)
        elif found.state is JobState.UNKNOWN:
            self.record, self.info = found.record, found.conn
            self._use_uncertain(found)
            return self
        else:
            self.record, self.info = found.record, found.conn
        try:
            self._attach(self._timeout or 600)
        except BaseException as exc:
            self.close()
            if started_here:  # we started it: a start that fails must not leave a job behind
                self.jobs.cancel([self.record.job_id], quiet=True)
                if isinstance(exc, ServerError) and exc.status == 426:  # version skew: its one line says it all
                    raise JobError(f"{exc.message}; the job was cancelled", hint=exc.hint) from exc
                if isinstance(exc, HpcsegError):
                    raise JobError(f"{exc.message}; the job was cancelled.\n{log_tail(self.jobs, self.record.job_id)}",
                                   hint=exc.hint) from exc
            raise
        return self

    def _attach(self, ready_timeout: float) -> None:
        """Tunnel (unless local), client, and wait until ``/health/ready`` says ready."""
        from .client import ServerClient

        assert self.info is not None and self.record is not None
        if self.profile.is_local:
            self.url = f"http://127.0.0.1:{self.info.port}"
        else:
            from .tunnel import Tunnel

            self._tunnel = Tunnel(self.jobs.shell, self.info.host, self.info.port)
            self._tunnel.start()
            self.url = self._tunnel.url
        self.client = ServerClient(self.url, self.info.token,
                                   diagnose=self._tunnel.cause if self._tunnel is not None else None)
        # "loading models" only while it is true: a reused server answers at once and says nothing here
        self.client.wait_ready(timeout=ready_timeout,
                               progress=(lambda state: self._progress(f"loading models ({state})"))
                               if self._progress else None)
        if self._progress:
            self._progress(f"ready: job {self.record.job_id} at {self.url}")

    def _use_uncertain(self, found: FoundServer) -> None:
        """The scheduler does not answer about the known job: use it only if its server answers, else refuse."""
        refusal = UncertainServer(found.record, found.conn)
        if found.conn is None:
            raise refusal
        if self._progress:
            self._progress(f"the scheduler does not answer; trying job {found.record.job_id}'s server directly")
        try:
            self._attach(UNCERTAIN_READY_TIMEOUT)
        except HpcsegError as exc:
            self.close()
            raise refusal from exc

    def close(self) -> None:
        if self._tunnel is not None:
            self._tunnel.close()
            self._tunnel = None

    def __enter__(self) -> ServerConnection:
        return self.open()

    def __exit__(self, *exc) -> None:
        self.close()


def stop_servers(jm: JobManager, ended: list[str] | None = None) -> list[str]:
    """Cancel every active server job of the profile; returns the ids cancelled.

    A job the scheduler says has already ended is not "stopped" by us: its id goes to ``ended`` (if given) instead.
    """
    ids = [r.job_id for r in jm.store.list(jm.profile.name)
           if r.template == "server" and not JobState(r.last_state).terminal]
    if not ids:
        return []
    states = jm.status(ids)
    over = [i for i in ids if i in states and states[i].state.terminal]
    if ended is not None:
        ended.extend(over)
    ids = [i for i in ids if i not in over]
    if ids:
        jm.cancel(ids)
    return ids

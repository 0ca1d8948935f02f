"""The status line of the module: job state and server state, two axes shown side by side, never merged.

The scheduler says where the *job* is (queued, running, ended); the server says whether *it* can segment
(starting, loading models, ready, unreachable). A running job with a server still loading its models is not
"ready", and a ready server whose job just ended is not either: the line shows both, e.g.::

    Job 4711: queued: waiting for resources, expected 14:05  ·  Server: not started
    Job 4711: running on gpu017  ·  Server: loading models (ct-body loading)
    Job 4711: running on gpu017  ·  Server: ready
    Job 4711: failed (exit code 1)  ·  Server: gone

Example::

    snap = StatusSnapshot(job=status, server=ServerState.READY, job_id="4711")
    label.text = snap.text; timer.interval = 1000 * next_poll_delay(snap)
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from ..schedulers import JobState, JobStatus
from ..serverjobs import describe_wait


class ServerState(str, enum.Enum):
    """What this client knows of the server in the job."""

    NO_JOB = "no server job"
    NOT_STARTED = "not started"          # the job waits in the queue
    STARTING = "starting"                # the job runs; no connection file yet, or models loading
    NOT_CONNECTED = "running"            # the server wrote its connection file; this Slicer is not connected
    READY = "ready"
    UNREACHABLE = "unreachable"          # connected before, no answer now (tunnel down, server stuck)
    FAILED = "failed"                    # the server could load no model
    ENDING = "ending"                    # this client cancelled the job; the scheduler still shows it
    GONE = "gone"                        # the job ended
    UNKNOWN = "unknown"                  # the status query failed: keep asking

    @property
    def busy(self) -> bool:
        return self in (ServerState.NOT_STARTED, ServerState.STARTING, ServerState.ENDING)


@dataclass
class StatusSnapshot:
    """One poll's view of the two axes (``job`` is None when the profile has no server job)."""

    job: JobStatus | None
    server: ServerState
    job_id: str = ""
    detail: str = ""

    @property
    def text(self) -> str:
        return status_text(self.job, self.server, detail=self.detail, job_id=self.job_id)

    @property
    def ready(self) -> bool:
        return self.server is ServerState.READY

    @property
    def severity(self) -> str:
        """``ok``, ``busy``, ``idle`` or ``error``: how to colour the line."""
        if self.server is ServerState.READY:
            return "ok"
        if self.server.busy or self.server in (ServerState.NOT_CONNECTED, ServerState.UNKNOWN):
            return "busy"
        if self.server is ServerState.NO_JOB or (self.job is not None and self.job.state in
                                                 (JobState.COMPLETED, JobState.CANCELLED)):
            return "idle"
        return "error"


def job_text(job: JobStatus | None) -> str:
    """The job axis in words, for any :class:`JobState`."""
    if job is None:
        return "none"
    state = job.state
    if state in (JobState.PENDING, JobState.RUNNING):
        text = describe_wait(job)  # "queued: Resources, expected 14:05" / "starting on gpu017"
        return text.replace("starting on", "running on") if state is JobState.RUNNING else text
    if state is JobState.COMPLETING:
        return "completing (ending)"
    if state is JobState.STOPPING:
        return "stopping (cancelled, ending)"
    if state is JobState.UNKNOWN:
        return "unknown (the scheduler did not answer; asking again)"
    if state is JobState.LOST:
        return "lost (no scheduler record and no exit code)"
    words = {JobState.COMPLETED: "ended", JobState.FAILED: "failed", JobState.CANCELLED: "cancelled",
             JobState.TIMEOUT: "ended at its walltime", JobState.NODE_FAIL: "ended: its node failed",
             JobState.OUT_OF_MEMORY: "ended: out of memory"}
    text = words.get(state, state.value)
    if job.exit_code not in (None, 0):
        text += f" (exit code {job.exit_code})"
    return text


def status_text(job: JobStatus | None, server: ServerState, *, detail: str = "", job_id: str = "") -> str:
    """``Job <id>: <job axis>  ·  Server: <server axis>``."""
    jid = job_id or (job.job_id if job is not None else "")
    left = f"Job {jid}: {job_text(job)}" if jid else f"Job: {job_text(job)}"
    right = server.value + (f" ({detail})" if detail else "")
    return f"{left}  ·  Server: {right}"


def next_poll_delay(snapshot: StatusSnapshot | None) -> float:
    """Seconds until the next status poll: soon while something changes, rarely when settled."""
    if snapshot is None or snapshot.server in (ServerState.STARTING, ServerState.UNKNOWN, ServerState.ENDING):
        return 2.0
    if snapshot.server in (ServerState.NOT_STARTED, ServerState.UNREACHABLE, ServerState.NOT_CONNECTED):
        return 5.0
    if snapshot.server is ServerState.READY:
        return 15.0
    return 30.0  # no job, or it ended: nothing will change unless someone starts one

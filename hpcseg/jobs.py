"""Submit, follow, cancel and read the logs of hpcseg jobs on any scheduler, through one Shell.

A job's life on the target machine (``<work_dir>/jobs/<name>/``, named by us before submission)::

    job.sh            the exact rendered script that was submitted
    job.out, job.err  the scheduler's output files
    exit_code         written by the job's own EXIT trap: the last word once the scheduler forgets the job
    connection.json   (server jobs) written by the server once ready, mode 0600
    <job_id> -> name  a link from the scheduler's id to the folder

Status comes from the scheduler (live queue, then history/accounting, batched, see :mod:`hpcseg.schedulers`);
a job no source knows any more is resolved from its ``exit_code`` file, else reads ``lost``. A query that fails
reads ``unknown`` and never ends a wait. This client remembers the jobs it started in a small JSON file in its
state dir, so ``hpcseg jobs`` and the Slicer plugin can reattach after a restart.

Example::

    jm = JobManager(profile)
    rec = jm.submit("run", {"command": ["bash", "-c", "exit 3"]})
    st = jm.wait(rec.job_id, lambda s: s.state.terminal)
    st.state, st.exit_code   # (JobState.FAILED, 3)
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import posixpath
import secrets
import shlex
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from .config import Profile, state_dir, walltime_seconds
from .errors import HpcsegError, JobError, SubmitFailed
from .schedulers import JobState, JobStatus, SubmitSpec, drive, get_scheduler
from .schedulers.base import backoff_intervals
from .shell import LocalShell, Shell


def open_shell(profile: Profile, *, interactive: bool | None = None) -> Shell:
    """The shell for a profile: this machine for ``local``, else one SSH connection to the login node."""
    if profile.is_local:
        return LocalShell()
    from .ssh import SSHShell

    return SSHShell.from_profile(profile, interactive=interactive)


@dataclass
class JobRecord:
    """A job this client submitted, as remembered locally."""

    profile: str
    job_id: str
    template: str
    job_dir: str
    name: str
    scheduler: str
    created: str
    host: str = ""
    last_state: str = "pending"
    extra: dict[str, Any] = field(default_factory=dict)


def submitted_walltime(rec: JobRecord, profile: Profile) -> int:
    """Seconds of walltime the job was submitted with (remembered at submit; older records: the profile's)."""
    try:
        return walltime_seconds(str(rec.extra.get("walltime") or profile.walltime))
    except ValueError:
        return walltime_seconds(profile.walltime)


class JobStore:
    """The jobs this client started: one JSON file, updated under a lock, written atomically."""

    def __init__(self, path: Path | None = None) -> None:
        self.path = path or state_dir() / "jobs.json"

    @contextlib.contextmanager
    def _locked(self) -> Iterator[list[JobRecord]]:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path.with_suffix(".lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            records = self._read()
            before = [asdict(r) for r in records]
            yield records
            if [asdict(r) for r in records] != before:
                fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".jobs.", suffix=".json")
                with os.fdopen(fd, "w", encoding="utf-8") as fh:
                    json.dump([asdict(r) for r in records], fh, indent=1)
                os.replace(tmp, self.path)

    def _read(self) -> list[JobRecord]:
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return []
        except (OSError, ValueError) as exc:
            raise JobError(f"cannot read the job list {self.path}: {exc}",
                           hint="move the file away; hpcseg starts a new one") from exc
        return [JobRecord(**d) for d in data]

    def add(self, rec: JobRecord) -> None:
        with self._locked() as records:
            records.append(rec)

    def update(self, profile: str, job_id: str, **changes: Any) -> None:
        with self._locked() as records:
            for r in records:
                if r.profile == profile and r.job_id == job_id:
                    for k, v in changes.items():
                        setattr(r, k, v)

    def list(self, profile: str | None = None) -> list[JobRecord]:
        return [r for r in self._read() if profile is None or r.profile == profile]

    def find(self, profile: str, job_id: str) -> JobRecord | None:
        for r in self.list(profile):
            if r.job_id == job_id or r.name == job_id:
                return r
        return None


class JobManager:
    """Jobs of one profile: render, submit, status, wait, cancel, logs."""

    def __init__(self, profile: Profile, shell: Shell | None = None, store: JobStore | None = None,
                 engine: Any = None, site: Any = "auto", origins: dict[str, str] | None = None) -> None:
        self.profile = profile
        #: the cluster's site bundle (hpcseg.site.SiteBundle): its limits are checked before any submission.
        #: "auto" (the default) looks for it over this manager's shell at the first render, so every way to a
        #: job (CLI, batch, Slicer's worker, the library) meets the same limits; None: no site layer.
        self._site = site
        self.origins = origins
        self._shell = shell
        self.store = store or JobStore()
        self._engine = engine
        opts = {"dialect": profile.pbs_dialect} if profile.scheduler == "pbs" else {}
        self.scheduler = get_scheduler(profile.scheduler, **opts)
        self._work_dir: str | None = None

    @property
    def shell(self) -> Shell:
        if self._shell is None:
            self._shell = open_shell(self.profile)
        return self._shell

    @property
    def site(self) -> Any:
        """The site bundle (found over the shell once when constructed with ``site="auto"``), or None."""
        if isinstance(self._site, str):
            self._site = None
            if self.profile.site != "none" and (self.profile.host or self.profile.site):
                from .site import fetch

                self._site = fetch(self.shell, self.profile.site)
        return self._site

    @site.setter
    def site(self, bundle: Any) -> None:
        self._site = bundle

    @property
    def engine(self):
        if self._engine is None:
            from .templates import TemplateEngine

            self._engine = TemplateEngine.for_profile(self.profile, bundle=self.site)
        return self._engine

    def work_dir(self) -> str:
        """The profile's work dir as an absolute path on the target (``~`` expanded there)."""
        if self._work_dir is None:
            wd = self.profile.work_dir
            if wd == "~" or wd.startswith("~/"):
                wd = self.shell.home().rstrip("/") + wd[1:]
            self._work_dir = wd.rstrip("/")
        return self._work_dir

    def abs_path(self, path: str) -> str:
        if path == "~" or path.startswith("~/"):
            return self.shell.home().rstrip("/") + path[1:]
        return path

    def pbs_dialect(self) -> str | None:
        """For PBS with ``pbs_dialect = "auto"``: ask ``qstat --version`` once which flavour the site runs."""
        sched = self.scheduler
        if self.profile.scheduler != "pbs":
            return None
        if sched.resolved is None:
            cmd = sched.version_command()
            sched.resolved = sched.detect_dialect(self.shell.run(list(cmd.argv), timeout=30))
        return sched.resolved

    # -- submit ------------------------------------------------------------------------------------------------
    def render(self, template: str, params: dict[str, Any] | None = None, *, name: str | None = None,
               work_dir: str | None = None) -> tuple[str, str, str]:
        """Render a job script: returns (script, job_dir, job_name). Nothing is written or submitted."""
        from .templates import build_context

        if self.site is not None:  # past a site limit: refused before anything is written or submitted
            self.site.check(self.profile, self.origins)
        name = name or datetime.now().strftime("%Y%m%d-%H%M%S-") + secrets.token_hex(3)
        wd = work_dir or self.work_dir()
        job_dir = posixpath.join(wd, "jobs", name)
        job_name = f"hpcseg-{template}"
        ctx = build_context(self.profile, template=template, job_dir=job_dir, work_dir=wd, job_name=job_name,
                            params=dict(params or {}), home=self.shell.home(), pbs_dialect=self.pbs_dialect())
        return self.engine.render(template, ctx), job_dir, job_name

    def submit(self, template: str, params: dict[str, Any] | None = None) -> JobRecord:
        """Render, copy and submit a job; remember it locally. A failure after submission cancels the job."""
        script, job_dir, job_name = self.render(template, params)
        if template == "server" and self.site is not None and self.site.limits.max_servers is not None:
            from .site import check_servers

            check_servers(self.site, self.active_servers())
        script_path = posixpath.join(job_dir, "job.sh")
        self.shell.write_text(script_path, script, mode=0o700)
        spec = SubmitSpec(script_path=script_path, job_dir=job_dir, job_name=job_name)
        cmd = self.scheduler.submit_command(spec)
        res = self.shell.run(list(cmd.argv), stdin=cmd.stdin, timeout=120)
        try:
            try:
                job_id = self.scheduler.parse_submit(res)
            except SubmitFailed:
                raise
            except HpcsegError as exc:
                raise SubmitFailed(f"submission of {script_path} failed: {exc}") from exc
        except SubmitFailed:
            if res.exit_code != 124:  # refused for sure (not timed out: that one may have been submitted)
                self.shell.run(["rm", "-rf", "--", job_dir])  # no folder left holding only job.sh
            raise
        try:
            # Link the scheduler's id to the folder, so the cluster side can be read without this client's state.
            self.shell.run(["ln", "-sfn", posixpath.basename(job_dir),
                            posixpath.join(posixpath.dirname(job_dir), job_id)], check=True)
            rec = JobRecord(profile=self.profile.name, job_id=job_id, template=template, job_dir=job_dir,
                            name=posixpath.basename(job_dir), scheduler=self.profile.scheduler,
                            created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
                            host=self.profile.host,
                            # the limit this job runs under, even after the profile's walltime changes
                            extra={"walltime": self.profile.walltime})
            self.store.add(rec)
        except BaseException:
            # No orphan: a job we cannot remember is a job nobody would cancel.
            self.cancel([job_id], quiet=True)
            raise
        return rec

    def active_servers(self) -> int:
        """Server jobs this client started on this profile's host and scheduler that have not ended."""
        ids = [r.job_id for r in self.store.list() if r.template == "server" and r.host == self.profile.host
               and r.scheduler == self.profile.scheduler and not JobState(r.last_state).terminal]
        if not ids:
            return 0
        return sum(1 for st in self.status(ids).values() if not st.state.terminal or st.state is JobState.UNKNOWN)

    # -- status --------------------------------------------------------------------------------------------------
    def _record(self, job_id: str) -> JobRecord | None:
        return self.store.find(self.profile.name, job_id)

    def status(self, job_ids: list[str]) -> dict[str, JobStatus]:
        """Status of many jobs with one batched scheduler query; forgotten jobs resolved from exit_code files."""
        if not job_ids:
            return {}
        result = drive(self.scheduler.status_query(job_ids), self.shell)
        for jid, st in result.items():
            rec = self._record(jid)
            if st.state is JobState.LOST and rec is not None:
                st = self._from_exit_file(rec, st)
                result[jid] = st
            if st.state.active and rec is not None and rec.extra.get("cancelled"):
                st.state, st.reason = JobState.STOPPING, "cancelled; ending (the scheduler still shows it " \
                                                         f"{st.native_state or 'active'})"
            if st.state is JobState.UNKNOWN and rec is not None:
                st.native_state = st.native_state or f"last seen {rec.last_state}"
            elif rec is not None and rec.last_state != st.state.value:
                self.store.update(self.profile.name, jid, last_state=st.state.value)
        self._exit_codes_from_files(result)
        return result

    def _exit_codes_from_files(self, result: dict[str, JobStatus]) -> None:
        """A job that ended other than completed, for which the scheduler says exit code 0 (Slurm's job-level
        ExitCode of a cancelled job reads 0:0), gets the code its own EXIT trap wrote (143 after SIGTERM): one
        batched command for all of them."""
        odd = {jid: rec for jid, st in result.items()
               if st.state in (JobState.CANCELLED, JobState.TIMEOUT, JobState.FAILED) and not st.exit_code
               and (rec := self._record(jid)) is not None}
        if not odd:
            return
        q = shlex.quote
        script = "; ".join(f"printf '%s ' {q(jid)}; cat {q(posixpath.join(rec.job_dir, 'exit_code'))} 2>/dev/null"
                           f" || echo" for jid, rec in odd.items())
        res = self.shell.run(script)
        for line in res.stdout.splitlines():
            jid, _, code = line.strip().partition(" ")
            if jid in odd and code.strip().lstrip("-").isdigit() and int(code) != 0:
                result[jid].exit_code = int(code)

    def _from_exit_file(self, rec: JobRecord, st: JobStatus) -> JobStatus:
        """Resolve a job the scheduler forgot from what the job itself wrote (see templates/base.sh.j2).

        ``exit_code`` holds the status, 128+N after signal N. A SIGTERM (143) is a walltime kill when the job ran
        for its whole walltime (``started`` to the exit_code file's time) or was warned (``ending``), a cancel when
        this client cancelled it, else a failure.
        """
        d = shlex.quote(rec.job_dir)
        res = self.shell.run(f"cd {d} 2>/dev/null && cat exit_code && echo . && cat started 2>/dev/null; echo ."
                             f" && cat ending 2>/dev/null; echo . && stat -c %Y exit_code")
        parts = res.stdout.split(".\n") if res.ok else []
        if len(parts) < 4 or not parts[0].strip().lstrip("-").isdigit():
            if rec.extra.get("cancelled"):  # cancelled before it started: it never wrote an exit code
                return JobStatus(job_id=rec.job_id, state=JobState.CANCELLED, native_state=st.native_state,
                                 reason="cancelled by this client before it wrote an exit code", source=st.source)
            return st
        code = int(parts[0].strip())
        started = int(parts[1].strip()) if parts[1].strip().isdigit() else None
        ended = int(parts[3].strip()) if parts[3].strip().isdigit() else None
        ending = parts[2].strip()
        state = JobState.COMPLETED if code == 0 else JobState.FAILED
        if code == 143:
            limit = submitted_walltime(rec, self.profile)
            if ending == "walltime" or (started and ended and ended - started >= limit - 5):
                state = JobState.TIMEOUT
            elif rec.extra.get("cancelled"):
                state = JobState.CANCELLED
        return JobStatus(job_id=rec.job_id, state=state, native_state=f"exit_code file: {code}", exit_code=code,
                         source="exit-code-file")

    def wait(self, job_id: str, until: Callable[[JobStatus], bool], *, timeout: float | None = None,
             on_update: Callable[[JobStatus], None] | None = None, poll: Callable[[], bool] | None = None
             ) -> JobStatus:
        """Poll (with backoff) until ``until(status)`` holds or the job ends; UNKNOWN never ends a wait.

        ``poll`` is an extra check run each round (e.g. "is the connection file there?"); it ends the wait when
        it returns True. Raises JobError on timeout.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        last: JobStatus | None = None
        delays = backoff_intervals(start=0.5, factor=1.4, cap=10.0)
        while True:
            st = self.status([job_id])[job_id]
            if last is None or st.state is not last.state:
                delays = backoff_intervals(start=0.5, factor=1.4, cap=10.0)  # a change: look again soon
            if on_update and (last is None or st != last):
                on_update(st)
            last = st
            delay = next(delays)
            if until(st) or (st.state.terminal and st.state is not JobState.UNKNOWN):
                return st
            if poll is not None and st.state is JobState.RUNNING and poll():
                return st
            if deadline is not None and time.monotonic() >= deadline:
                raise JobError(f"job {job_id} is still {st.state.value} after {timeout:.0f} s",
                               hint=f"see hpcseg status {job_id} and hpcseg logs {job_id}", retryable=True)
            time.sleep(delay if deadline is None else max(0.0, min(delay, deadline - time.monotonic())))

    def cancel(self, job_ids: list[str], *, quiet: bool = False) -> None:
        cmd = self.scheduler.cancel_command(job_ids)
        res = self.shell.run(list(cmd.argv), stdin=cmd.stdin, timeout=60)
        for jid in job_ids:  # remembered, so a forgotten job's SIGTERM reads "cancelled" later, in any process
            rec = self._record(jid)
            if rec is not None:
                self.store.update(self.profile.name, jid, extra={**rec.extra, "cancelled": True})
        try:
            self.scheduler.parse_cancel(res, job_ids)
        except HpcsegError:
            if not quiet:
                raise

    # -- files of a job ------------------------------------------------------------------------------------------
    def job_dir(self, job_id: str) -> str:
        rec = self._record(job_id)
        if rec is not None:
            return rec.job_dir
        # Not started by this client: follow the id link the submitting client made.
        return posixpath.join(self.work_dir(), "jobs", job_id)

    def read(self, job_id: str, filename: str) -> str | None:
        return self.shell.read_text(posixpath.join(self.job_dir(job_id), filename))

    def logs(self, job_id: str, files: tuple[str, ...] = ("job.out", "job.err", "server.log")) -> dict[str, str]:
        """The job's log files that exist (never the connection file)."""
        out = {}
        for f in files:
            text = self.read(job_id, f)
            if text is not None:
                out[f] = text
        return out

    def follow(self, job_id: str, write: Callable[[str, str], None], *, filename: str = "job.out",
               stop_when_done: bool = True) -> JobStatus | None:
        """Print new lines of a log as they come (``logs -f``) until the job ends."""
        path = posixpath.join(self.job_dir(job_id), filename)
        offset = 0
        st = None
        for delay in backoff_intervals(start=0.5, factor=1.2, cap=3.0):
            res = self.shell.run(f"tail -c +{offset + 1} -- {shlex.quote(path)} 2>/dev/null")
            if res.ok and res.stdout:
                write(filename, res.stdout)
                offset += len(res.stdout.encode())
            if stop_when_done:
                st = self.status([job_id])[job_id]
                if st.state.terminal:
                    res = self.shell.run(f"tail -c +{offset + 1} -- {shlex.quote(path)} 2>/dev/null")
                    if res.ok and res.stdout:
                        write(filename, res.stdout)
                    return st
            time.sleep(delay)
        return st  # pragma: no cover
